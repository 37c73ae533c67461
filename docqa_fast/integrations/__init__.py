"""Integrations with other libraries (transformers' attention backends)."""

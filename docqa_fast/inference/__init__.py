"""Attention for inference: flash-attn 2's ``flash_attn_with_kvcache`` over contiguous and paged
KV caches (decode and chunked prefill), split-KV for long contexts."""

from .kvcache import flash_attn_with_kvcache

__all__ = ["flash_attn_with_kvcache"]

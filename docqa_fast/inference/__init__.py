"""Attention for inference: flash-attn 2's ``flash_attn_with_kvcache`` over contiguous and paged
KV caches (decode and chunked prefill), split-KV for long contexts; and the paged-cache path of
``flash_attn_varlen_func`` (``block_table``, in :mod:`.paged_varlen`)."""

from .kvcache import flash_attn_with_kvcache

__all__ = ["flash_attn_with_kvcache"]

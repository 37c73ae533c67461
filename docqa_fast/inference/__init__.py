"""Attention for inference over contiguous and paged KV caches (decode and chunked prefill),
split-KV for long contexts: the custom ops and validated calls in :mod:`.ops`; flash-attn's
``flash_attn_with_kvcache`` in :mod:`docqa_fast.flash_attn_interface` (also importable from here)."""

__all__ = ["flash_attn_with_kvcache"]


def __getattr__(name):
    # The front end lives in the interface module above this family; resolved on first use.
    if name == "flash_attn_with_kvcache":
        from ..flash_attn_interface import flash_attn_with_kvcache

        return flash_attn_with_kvcache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

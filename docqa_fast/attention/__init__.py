"""Long-context attention for training: forward and backward over Triton kernels.

Dense (B, S, H, D) and packed varlen (total, H, D), GQA, causal (bottom-right), sliding
windows and softcap; head dims up to 256 (multiples of 8). The custom ops and
:func:`.ops.attention` are in :mod:`.ops`; torch's SDPA front end in :mod:`.sdpa`; flash-attn's
functions in :mod:`docqa_fast.flash_attn_interface` (also importable from here).
"""

from .sdpa import scaled_dot_product_attention

_FLASH_ATTN_NAMES = ("flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
                     "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func")

__all__ = [*_FLASH_ATTN_NAMES, "scaled_dot_product_attention"]


def __getattr__(name):
    # flash-attn's front ends live in the interface module above this family (which imports it);
    # resolved on first use so this package never imports upward.
    if name in _FLASH_ATTN_NAMES:
        from .. import flash_attn_interface

        return getattr(flash_attn_interface, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Long-context attention for training: flash-attn 2's and torch SDPA's APIs over Triton kernels.

Forward and backward, dense (B, S, H, D) and packed varlen (total, H, D), GQA, causal
(bottom-right), sliding windows and softcap; head dims up to 256 (multiples of 8).
"""

from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    scaled_dot_product_attention,
)

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "scaled_dot_product_attention"]

"""torch's ``scaled_dot_product_attention`` over the training kernels, where that is exact.

Runs :func:`.ops.attention` when it computes the call exactly (CUDA fp16/bf16, no mask, no
dropout, any head dim up to 256, causal only when seqlen_q == seqlen_k, as SDPA
aligns causal masks top-left); anything else goes to torch's own SDPA unchanged, so the
result is never silently different.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention_core import KERNEL_DTYPES, MAX_HEAD_DIM
from .ops import attention


def _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """Why torch's own SDPA must run this call, or None when our kernel computes it exactly."""
    if attn_mask is not None:
        return "an explicit attn_mask"
    if dropout_p:
        return "dropout"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        return "inputs that are not 4-D (B, H, S, D)"
    if query.dtype not in KERNEL_DTYPES or not query.is_cuda:
        return "a dtype or device our kernels do not take"
    if not 1 <= query.shape[-1] <= MAX_HEAD_DIM or key.shape[-1] != query.shape[-1] \
            or value.shape[-1] != query.shape[-1]:
        return "an unsupported head dim (or one that differs between query, key and value)"
    if key.shape[0] != query.shape[0] or value.shape != key.shape:
        return "key / value shapes that broadcast rather than match"
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return "different head counts without enable_gqa"
    if is_causal and query.shape[2] != key.shape[2]:
        return "is_causal with seqlen_q != seqlen_k (SDPA aligns the mask top-left, flash-attn bottom-right)"
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return "a strided last dimension"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` with (B, H, S, D) tensors.

    Runs our kernel when it computes the call exactly (CUDA fp16/bf16, no mask, no dropout,
    head dim up to 256, causal only when seqlen_q == seqlen_k); anything
    else goes to torch's own SDPA unchanged, so the result is never silently different.
    """
    if _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) is not None:
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, **kwargs)
    # (B, H, S, D) -> (B, S, H, D) views: the kernels take any strides but the last.
    out, _ = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scale,
                       causal=is_causal)
    return out.transpose(1, 2)

"""Drop-in front ends: flash-attn 2's functions and torch's scaled_dot_product_attention.

Signatures, defaults and return values are flash-attn's / torch's, so swapping the import
is the whole migration. All of them call :func:`.ops.attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import FAST_DTYPES, MAX_HEAD_DIM, attention, check_unsupported


def _result(out, lse, return_attn_probs):
    # flash-attn returns (out, softmax_lse, S_dmask); the probabilities are never materialised here.
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over (B, S, H, D) tensors with flash-attn 2's semantics (GQA when H % Hk == 0).

    ``deterministic`` is accepted for compatibility: the backward is always deterministic
    (no atomics). ``return_attn_probs=True`` returns ``(out, softmax_lse (B, H, Sq) fp32, None)``.
    """
    check_unsupported(dropout_p, alibi_slopes)
    out, lse = attention(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                         softcap=softcap)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed attention: q (total_q, H, D), k/v (total_k, Hk, D), int32 cu_seqlens (B + 1,).

    Zero-length sequences are allowed. ``return_attn_probs=True`` returns
    ``(out, softmax_lse (H, total_q) fp32, None)``. With ``block_table`` (B, max_blocks) int32,
    k/v are paged caches (num_blocks, page_size, Hk, D) and cu_seqlens_k gives each sequence's
    key count (forward only; see :mod:`docqa_fast.inference.paged_varlen`).
    """
    check_unsupported(dropout_p, alibi_slopes)
    if block_table is not None:
        # k/v are paged caches (num_blocks, page_size, Hk, D): chunked prefill, forward only, run by the
        # inference family's kernel. Imported here: docqa_fast.inference itself imports this package.
        from ..inference.paged_varlen import flash_attn_varlen_paged

        out, lse = flash_attn_varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                                           softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                           softcap=softcap)
        return _result(out, lse, return_attn_probs)
    out, lse = attention(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                         max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
                         window_size=window_size, softcap=softcap)
    return _result(out, lse, return_attn_probs)


def _unpack(packed, parts, name, dim):
    if not isinstance(packed, torch.Tensor) or packed.dim() <= dim or packed.shape[dim] != parts:
        shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"expected {name} with {parts} stacked along dimension {dim}, got {shape}")
    return packed.unbind(dim)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``qkv`` (B, S, 3, H, D)."""
    q, k, v = _unpack(qkv, 3, "qkv", 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``q`` (B, Sq, H, D), ``kv`` (B, Sk, 2, Hk, D)."""
    k, v = _unpack(kv, 2, "kv", 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``qkv`` (total, 3, H, D) with one ``cu_seqlens`` for queries and keys."""
    q, k, v = _unpack(qkv, 3, "qkv", 1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``q`` (total_q, H, D), ``kv`` (total_k, 2, Hk, D)."""
    k, v = _unpack(kv, 2, "kv", 1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """Why torch's own SDPA must run this call, or None when our kernel computes it exactly."""
    if attn_mask is not None:
        return "an explicit attn_mask"
    if dropout_p:
        return "dropout"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        return "inputs that are not 4-D (B, H, S, D)"
    if query.dtype not in FAST_DTYPES or not query.is_cuda:
        return "a dtype or device our kernels do not take"
    if query.shape[-1] % 8 or query.shape[-1] > MAX_HEAD_DIM or key.shape[-1] != query.shape[-1] \
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
    head dim a multiple of 8 up to 256, causal only when seqlen_q == seqlen_k); anything
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

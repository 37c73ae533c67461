"""flash-attn's API: drop-in front ends over docqa_fast's training and inference attention.

As flash-attn keeps its ``flash_attn_interface.py``, this module holds every flash-attn 2
function -- ``flash_attn_func``, ``flash_attn_varlen_func`` (with ``block_table``: packed
queries over a paged KV cache), the four packed variants and ``flash_attn_with_kvcache`` --
with flash-attn's signatures, defaults and return values, so swapping the import is the whole
migration. Argument errors are ValueErrors / TypeErrors that are also RuntimeErrors, the
type flash-attn raises for them (:func:`docqa_fast._validation.raises_like_flash_attn`). Each is
a thin call into a family: :func:`docqa_fast.attention.ops.attention`
(training, forward + backward), :func:`docqa_fast.inference.ops.kvcache_attention` and
:func:`docqa_fast.inference.ops.varlen_paged_attention` (a KV cache); the rules they share are in
:mod:`docqa_fast.attention_core`.
"""

from __future__ import annotations

import torch

from .attention.ops import attention
from .attention_core import check_dropout
from ._validation import check_tensor, raises_like_flash_attn
from .inference.ops import kvcache_attention, varlen_paged_attention


def _result(out, lse, return_attn_probs):
    # flash-attn returns (out, softmax_lse, S_dmask); the probabilities are never materialised here.
    return (out, lse, None) if return_attn_probs else out


def _check_probs_request(dropout_p, return_attn_probs) -> None:
    # flash-attn's S_dmask (the probabilities with the dropout pattern in their signs) is a
    # testing aid only; with dropout on, our None there would hide the pattern a test asks for.
    if return_attn_probs and not isinstance(dropout_p, bool) and isinstance(dropout_p, (int, float)) and dropout_p > 0:
        raise NotImplementedError("return_attn_probs=True with dropout_p > 0: the dropout pattern is not returned "
                                  "(docqa_fast.reference.attention.dropout_keep_ref recomputes it from the seed)")


@raises_like_flash_attn
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over (B, S, H, D) tensors with flash-attn 2's semantics (GQA when H % Hk == 0).

    ``deterministic=True``: a bitwise reproducible backward, dropout included -- our two-pass
    kernels (no atomics), never torch's cuDNN attention. With ``False`` (the default) the dispatch
    may pick cuDNN, or our one-pass backward (dQ summed by fp32 atomics), where the GPU's tuned
    table measured them faster; see docs/attention_dispatch.md. ``return_attn_probs=True`` returns
    ``(out, softmax_lse (B, H, Sq) fp32, None)``. ``alibi_slopes`` (H,) or (B, H) fp32;
    ``dropout_p`` drops attention weights (pass 0.0 in evaluation, as with flash-attn).
    """
    _check_probs_request(dropout_p, return_attn_probs)
    out, lse = attention(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                         softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, deterministic=deterministic)
    return _result(out, lse, return_attn_probs)


@raises_like_flash_attn
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed attention: q (total_q, H, D), k/v (total_k, Hk, D), int32 cu_seqlens (B + 1,).

    Zero-length sequences are allowed. ``return_attn_probs=True`` returns
    ``(out, softmax_lse (H, total_q) fp32, None)``. With ``block_table`` (B, max_blocks) int32,
    k/v are paged caches (num_blocks, page_size, Hk, D) and cu_seqlens_k gives each sequence's
    key count (forward only; see :func:`docqa_fast.inference.ops.varlen_paged_attention`).
    ``alibi_slopes``, ``dropout_p`` and ``deterministic`` as in :func:`flash_attn_func` (no dropout with
    ``block_table``).
    """
    _check_probs_request(dropout_p, return_attn_probs)
    for name, cu_seqlens in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        # Required here (None would make the call dense, which it is not).
        check_tensor(name, cu_seqlens, dtypes=(torch.int32,), ndims=(1,))
    if block_table is not None:
        # k/v are paged caches (num_blocks, page_size, Hk, D): chunked prefill, forward only (the inference family).
        if check_dropout(dropout_p) > 0:
            raise ValueError("expected dropout_p = 0 with block_table (a paged KV cache serves inference)")
        out, lse = varlen_paged_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                                          softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                          softcap=softcap, alibi_slopes=alibi_slopes)
        return _result(out, lse, return_attn_probs)
    out, lse = attention(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                         max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
                         window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                         deterministic=deterministic)
    return _result(out, lse, return_attn_probs)


def _unpack(packed, parts, name, dim):
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() <= dim or packed.shape[dim] != parts:
        raise ValueError(f"expected {name} with {parts} stacked along dimension {dim}, got {tuple(packed.shape)}")
    return packed.unbind(dim)


@raises_like_flash_attn
def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``qkv`` (B, S, 3, H, D)."""
    q, k, v = _unpack(qkv, 3, "qkv", 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


@raises_like_flash_attn
def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``q`` (B, Sq, H, D), ``kv`` (B, Sk, 2, Hk, D)."""
    k, v = _unpack(kv, 2, "kv", 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


@raises_like_flash_attn
def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``qkv`` (total, 3, H, D) with one ``cu_seqlens`` for queries and keys."""
    q, k, v = _unpack(qkv, 3, "qkv", 1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


@raises_like_flash_attn
def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``q`` (total_q, H, D), ``kv`` (total_k, 2, Hk, D)."""
    k, v = _unpack(kv, 2, "kv", 1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


@raises_like_flash_attn
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q over a KV cache, appending new keys/values first -- flash-attn 2's function.

    Args:
        q: (B, Sq, H, D): Sq = 1 for decode, more for chunked prefill / speculative decoding.
        k_cache, v_cache: (B_cache, S_cache, Hk, D), or paged (num_blocks, page_size, Hk, D) with
            ``block_table``; page_size a multiple of 16. Mutated in place by the append.
        k, v: optional new tokens (B, Sk_new, Hk, D), written at ``cache_seqlens`` then attended to.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2) tables; rotate q and the new k
            (positions: cache_seqlens + i when causal or windowed, else cache_seqlens). Need ``k``/``v``.
        cache_seqlens: int or (B,) int32: valid length of each row before the append (None = full).
        cache_batch_idx: (B,) int32 cache row of each batch row (contiguous caches).
        cache_leftpad: (B,) int32 first valid slot of each row (contiguous caches).
        block_table: (B, max_blocks) int32 physical block of each logical page.
        softmax_scale, causal, window_size, softcap: as :func:`docqa_fast.flash_attn_func`, with the
            masks aligned bottom-right to ``cache_seqlens + Sk_new`` keys.
        alibi_slopes: (H,) or (B, H) fp32: bias ``-slope * |i + L - Sq - j|`` (L = cache_seqlens + Sk_new).
        num_splits: 0 = a heuristic that fills the GPU, 1 = no split, n = n splits of the keys.
        return_softmax_lse: also return the fp32 LSE (B, H, Sq).

    Returns:
        out (B, Sq, H, D), or ``(out, lse)``. A query that sees no key gets out 0 and lse -inf.
    """
    out, lse = kvcache_attention(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                                 cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
                                 rotary_interleaved, num_splits, alibi_slopes)
    return (out, lse) if return_softmax_lse else out

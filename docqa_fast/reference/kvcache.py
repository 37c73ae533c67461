"""Reference ``flash_attn_with_kvcache`` with flash-attn 2's semantics: the oracle of the decode kernels.

Layouts:

* ``q`` (B, Sq, H, D); the cache either contiguous ``k_cache``/``v_cache`` (B_cache, S_cache, Hk, D)
  (batch row b uses cache row ``cache_batch_idx[b]``, or b) or paged (num_blocks, page_size, Hk, D)
  with ``block_table`` (B, max_blocks) int32 mapping a row's logical page i to a physical block.
* ``cache_seqlens`` (B,) int32: the end of each row's valid keys in its cache row *before* the
  append (with ``cache_leftpad`` the valid keys are slots ``[leftpad, cache_seqlens)``).

One call:

1. new ``k``/``v`` (B, Sk_new, Hk, D), when given, are written into slots
   ``[cache_seqlens, cache_seqlens + Sk_new)`` of each row, in place -- after rotary when
   ``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2) are given: the new k at positions
   ``cache_seqlens + i``; q at ``cache_seqlens + i`` when causal or windowed, else every query at
   ``cache_seqlens`` (flash-attn's rule: a non-causal chunk is "one position"). Positions are
   cache slots, leftpad included, as flash-attn's kernel indexes its tables. Interleaved rotary
   rotates pairs (0, 1), (2, 3), ...; non-interleaved (GPT-NeoX) rotates the halves of the
   first rotary_dim dims.
2. q attends to slots ``[leftpad, L)`` with ``L = cache_seqlens + Sk_new``: causal masks and windows
   align bottom-right to that key count (query i's diagonal is slot ``i + L - Sq``), softcap
   and GQA as in :func:`attention_ref`. A query that sees no key gets out 0 and lse -inf.
   ALiBi (``alibi_slopes`` (H,) or (B, H)) adds ``-slope * |i + L - Sq - j|``: the distance
   is the same counted from slot 0 or from ``cache_leftpad`` (flash-attn's), both ends shift.

The math is :func:`docqa_fast.reference.attention.attention_ref` on each row's gathered keys.
"""

from __future__ import annotations

import math

import torch

from .attention import attention_ref
from .rotary import rotate_at


def cache_capacity(k_cache, block_table) -> int:
    """Slots one batch row can address: S_cache, or max_blocks * page_size when paged."""
    return k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)


def normalize_window(window_size, capacity: int) -> tuple[int, int]:
    """flash-attn's rule: a window side that covers the whole cache is no window (-1).

    It changes no mask, but it decides whether the call is "local", and a non-causal,
    non-local call rotates every query at cache_seqlens instead of cache_seqlens + i.
    """
    left, right = window_size
    return (-1 if left >= capacity else left, -1 if right >= capacity else right)


def rotary_positions(cache_seqlens: torch.Tensor, seqlen: int, per_token: bool) -> torch.Tensor:
    """(B, seqlen) int64 positions: cache_seqlens + i, or cache_seqlens repeated when not per_token."""
    steps = torch.arange(seqlen, device=cache_seqlens.device) if per_token else \
        torch.zeros(seqlen, dtype=torch.long, device=cache_seqlens.device)
    return cache_seqlens.long()[:, None] + steps[None, :]


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                     interleaved: bool) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[1] dims of x (B, S, H, D) at ``positions`` (B, S), in fp32
    (as the kernel does), rounded to x's dtype."""
    return rotate_at(x, cos, sin, positions, interleaved, torch.float32).to(x.dtype)


def cache_slots(cache_seqlens, seqlen_new, cache_batch_idx, block_table, page_size):
    """(block or row, slot) index tensors (B, seqlen_new) where the new tokens of each row go."""
    batch = cache_seqlens.shape[0]
    positions = rotary_positions(cache_seqlens, seqlen_new, per_token=True)
    if block_table is not None:
        blocks = torch.gather(block_table.long(), 1, positions // page_size)
        return blocks, positions % page_size
    rows = cache_batch_idx.long() if cache_batch_idx is not None else \
        torch.arange(batch, device=cache_seqlens.device)
    return rows[:, None].expand(batch, seqlen_new), positions


def append_kv_ref(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx=None, block_table=None) -> None:
    """Write k/v (B, Sk_new, Hk, D) into the cache at each row's cache_seqlens, in place.

    Index ops only (no host sync, no value-dependent shapes): only the Sk_new slots per row
    are touched.
    """
    if k is None or k.shape[1] == 0:
        return
    blocks, slots = cache_slots(cache_seqlens, k.shape[1], cache_batch_idx, block_table, k_cache.shape[1])
    k_cache[blocks, slots] = k.to(k_cache.dtype)
    v_cache[blocks, slots] = v.to(v_cache.dtype)


def gather_row(cache, b, length, cache_batch_idx=None, block_table=None):
    """The first ``length`` logical slots (length, Hk, D) of batch row b's cache."""
    if block_table is None:
        row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
        return cache[row, :length]
    page_size = cache.shape[1]
    pages = block_table[b, : math.ceil(length / page_size)].long()
    return cache[pages].flatten(0, 1)[:length]


def flash_attn_with_kvcache_ref(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                return_softmax_lse=False, upcast=True):
    """flash-attn 2's ``flash_attn_with_kvcache`` in plain PyTorch; mutates k_cache/v_cache.

    ``num_splits`` is accepted and ignored (it changes how, not what). ``upcast=False``
    computes the attention in the inputs' dtype (the tolerance rule's "plain PyTorch").
    Returns out (B, Sq, H, D), or (out, lse (B, H, Sq) fp32) with ``return_softmax_lse``.
    """
    batch, seqlen_q = q.shape[0], q.shape[1]
    if cache_seqlens is None:  # flash-attn: no lengths means every row fills the whole cache
        cache_seqlens = cache_capacity(k_cache, block_table)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    seqlen_new = 0 if k is None else k.shape[1]
    window_size = normalize_window(tuple(window_size), cache_capacity(k_cache, block_table))
    local = window_size != (-1, -1)
    if rotary_cos is not None:
        k = apply_rotary_ref(k, rotary_cos, rotary_sin, rotary_positions(cache_seqlens, seqlen_new, True),
                             rotary_interleaved)
        q = apply_rotary_ref(q, rotary_cos, rotary_sin,
                             rotary_positions(cache_seqlens, seqlen_q, causal or local), rotary_interleaved)
    append_kv_ref(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table)

    # Rows are computed one by one; the empty tensors make an empty batch a no-op.
    outs = [q.new_empty((0, *q.shape[1:]))]
    lses = [torch.empty((0, q.shape[2], seqlen_q), dtype=torch.float32, device=q.device)]
    for b in range(batch):
        end = int(cache_seqlens[b]) + seqlen_new
        start = int(cache_leftpad[b]) if cache_leftpad is not None else 0
        keys = gather_row(k_cache, b, end, cache_batch_idx, block_table)[start:]
        values = gather_row(v_cache, b, end, cache_batch_idx, block_table)[start:]
        dtype = q.dtype if not upcast else (torch.float64 if q.dtype == torch.float64 else torch.float32)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        out, lse = attention_ref(q[b:b + 1].to(dtype), keys[None].to(dtype), values[None].to(dtype),
                                 softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                                 softcap=softcap, alibi_slopes=slopes, upcast=upcast)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_softmax_lse else out


def gather_paged_varlen(cache, cu_seqlens_k, block_table):
    """The keys (or values) of every sequence of a packed batch over a paged cache, packed
    densely (total_k, Hk, D) in sequence order, so ``cu_seqlens_k`` describes them."""
    parts = [cache.new_empty((0, *cache.shape[2:]))]
    for b in range(block_table.shape[0]):
        parts.append(gather_row(cache, b, int(cu_seqlens_k[b + 1] - cu_seqlens_k[b]), block_table=block_table))
    return torch.cat(parts)


def flash_attn_varlen_paged_ref(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table, softmax_scale=None,
                                causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, upcast=True):
    """flash-attn 2's ``flash_attn_varlen_func(..., block_table=...)``: packed queries
    (total_q, H, D) over a paged cache (num_blocks, page_size, Hk, D); sequence b's keys are
    its first ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` logical slots (through ``block_table[b]``).
    Gathers each sequence's pages and runs :func:`attention_ref`; returns (out, lse (H, total_q))."""
    keys = gather_paged_varlen(k_cache, cu_seqlens_k, block_table)
    values = gather_paged_varlen(v_cache, cu_seqlens_k, block_table)
    return attention_ref(q, keys, values, softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                         softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         alibi_slopes=alibi_slopes, upcast=upcast)

"""``flash_attn_varlen_func(..., block_table=...)``: chunked prefill of a packed batch over a paged KV cache.

flash-attn 2's semantics (forward only): q (total_q, H, D) packed with ``cu_seqlens_q``; k/v are
paged caches (num_blocks, page_size, Hk, D); sequence b's keys are its first
``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` logical slots, slot j in block ``block_table[b, j // page_size]``;
masks align bottom-right per sequence. Nothing is appended (the caller has written the chunk's
k/v into the cache already, as a paged serving engine does).

It runs the decode / chunked-prefill kernel of :func:`flash_attn_with_kvcache`
(``kernels/inference.py``) with packed query offsets (its VARLEN_Q variant): the same
GQA row packing, paged addressing and split-KV, with the key counts taken as the differences
of cu_seqlens_k (an on-device op: no host sync). fp32, CPU tensors and more than 64 query heads
per KV head run :func:`docqa_fast.reference.kvcache.flash_attn_varlen_paged_ref`.

``docqa_fast::flash_attn_varlen_paged`` is a ``torch.library`` custom op with a fake
implementation; it has no autograd (flash-attn 2 has no backward over a paged cache either).
"""

from __future__ import annotations

import math

import torch

from .._validation import (
    check_cu_seqlens,
    check_same_device,
    check_shape,
    check_tensor,
    value_checks_enabled,
)
from ..attention.ops import bounded_window, check_window
from ..merge_attention import merge_stacked_attention_states
from ..reference.kvcache import flash_attn_varlen_paged_ref
from .kvcache import PAGE_MULTIPLE, _check_cache_and_heads, _num_sms, _use_kernel


def _check_inputs(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table):
    """Every check, before any launch; value checks (one host sync) in eager mode only."""
    _check_cache_and_heads(q, k_cache, v_cache, q_ndim=3, cache_names=("k", "v"))
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndims=(2,))
    check_same_device(("q", "block_table"), (q, block_table))
    page_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
    if page_size % PAGE_MULTIPLE or page_size == 0:
        raise ValueError(f"expected a page size (k.shape[1] with block_table) that is a multiple of {PAGE_MULTIPLE}, "
                         f"got {page_size}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError(f"expected {name} to be a non-negative int, got {value!r}")
    lengths_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q, "q")
    batch = cu_seqlens_q.shape[0] - 1
    check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=(torch.int32,), ndims=(1,))
    check_shape("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape, "one entry per sequence, like cu_seqlens_q")
    if block_table.shape[0] != batch:
        raise ValueError(f"expected block_table with {batch} rows (one per sequence of cu_seqlens_q), "
                         f"got {tuple(block_table.shape)}")
    check_same_device(("q", "cu_seqlens_k"), (q, cu_seqlens_k))
    if not value_checks_enabled() or batch == 0 or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # value checks sync with the host: under compile or a CUDA graph capture, validate before
    # cu_seqlens_k's end is the total key count, which a paged cache does not fix: check the rest.
    lengths_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, int(cu_seqlens_k[-1]), q, "q")
    if int(lengths_q.max()) > max_seqlen_q:
        raise ValueError(f"expected max_seqlen_q >= every query length, got {max_seqlen_q} < {int(lengths_q.max())}")
    if int(lengths_k.max()) > max_seqlen_k:
        raise ValueError(f"expected max_seqlen_k >= every key length, got {max_seqlen_k} < {int(lengths_k.max())}")
    capacity = block_table.shape[1] * page_size
    if int(lengths_k.max()) > capacity:
        raise ValueError(f"expected every key length (cu_seqlens_k) <= the block_table capacity {capacity} "
                         f"(max_blocks * page_size), got {int(lengths_k.max())}")
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size < lengths_k[:, None]
    entries = block_table.long()[used]
    if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= num_blocks):
        raise ValueError(f"expected block_table entries of the pages in use in [0, {num_blocks}) (blocks of k), "
                         f"got values from {int(entries.min())} to {int(entries.max())}")


@torch.library.custom_op("docqa_fast::flash_attn_varlen_paged", mutates_args=())
def _varlen_paged_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, block_table: torch.Tensor, softmax_scale: float,
                     causal: bool, window_left: int, window_right: int, softcap: float,
                     num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    if not _use_kernel(q, k_cache.shape[2]):
        return flash_attn_varlen_paged_ref(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table,
                                           softmax_scale, causal, window, softcap)
    from ..kernels import inference as kernels

    total_q, heads, _ = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    if num_splits == 0:
        num_splits = kernels.num_splits_heuristic(batch, max_seqlen_q, heads, k_cache.shape[2],
                                                  block_table.shape[1] * k_cache.shape[1], _num_sms(q.device))
    # Key counts per sequence, on the device: the kernel reads them where the decode path reads cache_seqlens.
    seqlens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    options = dict(block_table=block_table, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
                   softmax_scale=softmax_scale, causal=causal, window_size=window, softcap=softcap,
                   num_splits=num_splits)
    if num_splits == 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
        kernels.forward(q, k_cache, v_cache, out, lse, seqlens_k, **options)
        return out, lse
    outs = torch.empty((num_splits, *q.shape), dtype=torch.float32, device=q.device)
    lses = torch.empty((num_splits, heads, total_q), dtype=torch.float32, device=q.device)
    kernels.forward(q, k_cache, v_cache, outs, lses, seqlens_k, **options)
    out, lse = merge_stacked_attention_states(outs, lses)
    return out.to(q.dtype), lse


@_varlen_paged_op.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, softmax_scale, causal,
      window_left, window_right, softcap, num_splits):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


def flash_attn_varlen_paged(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, num_splits=0):
    """Packed queries over a paged KV cache -> (out (total_q, H, D), lse (H, total_q) fp32).

    The ``block_table`` path of :func:`docqa_fast.flash_attn_varlen_func` (see the module
    docstring); ``num_splits`` as in :func:`flash_attn_with_kvcache` (0 = heuristic).
    A query that sees no key (an empty key sequence, or causal with more queries than keys)
    gets out 0 and lse -inf.
    """
    _check_inputs(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
    left, right = bounded_window(*check_window(window_size), max_seqlen_q, max_seqlen_k)
    if softcap < 0:
        raise ValueError(f"expected softcap >= 0 (0 = off), got {softcap}")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"expected num_splits to be an int >= 0 (0 = heuristic), got {num_splits!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if block_table.stride(1) != 1:  # the kernel reads rows of the table with unit stride
        block_table = block_table.contiguous()
    return _varlen_paged_op(q, k_cache, v_cache, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q,
                            block_table, float(softmax_scale), bool(causal), left, right, float(softcap),
                            int(num_splits))

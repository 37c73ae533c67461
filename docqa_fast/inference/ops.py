"""Attention over a KV cache: the custom ops, their dispatch entries, and the validated calls
the flash-attn front ends make (:mod:`docqa_fast.flash_attn_interface`).

* ``docqa_fast::flash_attn_with_kvcache`` (:func:`kvcache_attention`): decode and chunked prefill
  over a contiguous or paged cache, the new k/v appended in place (the op declares ``k_cache``
  and ``v_cache`` mutated);
* ``docqa_fast::flash_attn_varlen_paged`` (:func:`varlen_paged_attention`): the ``block_table``
  path of ``flash_attn_varlen_func`` -- packed queries over a paged cache, forward only.

Implementations: the split-KV Triton kernel (``kernels/inference.py``; fp16/bf16, up to
MAX_GROUP query heads per KV head) -- one launch that appends, rotates and attends, then, with
several splits, ``merge_stacked_attention_states`` -- and the reference (fp32, CPU tensors).
Nothing on the ops' path syncs with the host or allocates a size that depends on tensor values
(split count and partial buffers follow from shapes), so they trace under
``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph; the value checks here
(one host sync) run in eager mode only (:func:`docqa_fast._validation.value_checks_enabled`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import Implementation, register_op
from .._validation import FLOAT_DTYPES, check_cu_seqlens_figures, check_int, check_last_dim_contiguous
from .._validation import check_same_device, check_same_dtype, cu_seqlens_figures
from .._validation import check_shape, check_tensor, value_checks_enabled
from ..attention_core import (
    cache_capacity,
    check_alibi_slopes,
    check_block_table,
    check_cu_seqlens_pair,
    check_heads,
    check_num_splits,
    check_op_scalars,
    check_pages_in_use,
    check_paged_varlen_layout,
    check_softcap,
    check_window,
    kernel_dtype_reason,
    normalize_window,
    num_sms,
    pages_in_use_figures,
    softmax_scale_or_default,
)
from ..merge_attention import merge_stacked_attention_states
from ..rotary import check_tables
from ..reference.kvcache import flash_attn_varlen_paged_ref, flash_attn_with_kvcache_ref


def _kernel_reason(q, kv_heads) -> str | None:
    """Why the kernel cannot compute a call (the dispatch table's eligibility rule), or None."""
    from ..kernels.inference import MAX_GROUP

    if q.shape[-2] // kv_heads > MAX_GROUP:  # q (..., H, D): padded or packed
        return f"more than {MAX_GROUP} query heads per KV head (runs on the reference path)"
    return kernel_dtype_reason(q)


def _run_kernel(q, k_cache, v_cache, lse_shape, seqlens, options, num_splits, capacity):
    """One launch of the split-KV kernel (it also appends and rotates), then the combine of the
    fp32 partials when split."""
    from ..kernels import inference as kernels

    varlen = options.get("cu_seqlens_q") is not None
    batch = options["cu_seqlens_q"].shape[0] - 1 if varlen else q.shape[0]
    seqlen_q = options["max_seqlen_q"] if varlen else q.shape[1]
    if num_splits == 0:
        num_splits = kernels.num_splits_heuristic(batch, seqlen_q, q.shape[-2], k_cache.shape[2], capacity,
                                                  num_sms(q.device), **kernels.split_constants(q.device))
    if num_splits == 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
        kernels.forward(q, k_cache, v_cache, out, lse, seqlens, num_splits=1, **options)
        return out, lse
    # fp32 partials: the combine rounds once, to q's dtype, at the end.
    outs = torch.empty((num_splits, *q.shape), dtype=torch.float32, device=q.device)
    lses = torch.empty((num_splits, *lse_shape), dtype=torch.float32, device=q.device)
    kernels.forward(q, k_cache, v_cache, outs, lses, seqlens, num_splits=num_splits, **options)
    out, lse = merge_stacked_attention_states(outs, lses)
    return out.to(q.dtype), lse


# ------------------------------------------------------------- flash_attn_with_kvcache

def _kvcache_lse_shape(q):
    return q.shape[0], q.shape[2], q.shape[1]


def _kvcache_triton(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                    block_table, softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved,
                    num_splits, alibi_slopes):
    window = (window_left, window_right)
    options = dict(k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                   rotary_per_token=causal or window != (-1, -1), cache_leftpad=cache_leftpad,
                   block_table=block_table, cache_batch_idx=cache_batch_idx, softmax_scale=softmax_scale,
                   causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi_slopes)
    return _run_kernel(q, k_cache, v_cache, _kvcache_lse_shape(q), cache_seqlens, options, num_splits,
                       cache_capacity(k_cache, block_table))


def kvcache_attention_unchecked(q, k_cache, v_cache, cache_seqlens, block_table=None, causal=False, num_splits=0):
    """The Triton path of :func:`kvcache_attention` with nothing appended, the default scale and no
    validation, dispatch or host sync: the launches a captured CUDA graph replays. For the tuning
    tool, which times kernels rather than per-call checks; the inputs must be valid."""
    return _kvcache_triton(q, k_cache, v_cache, None, None, None, None, cache_seqlens, None, None, block_table,
                           softmax_scale_or_default(None, q.shape[-1]), causal, -1, -1, 0.0, True, num_splits, None)


def _kvcache_reference(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                       cache_leftpad, block_table, softmax_scale, causal, window_left, window_right, softcap,
                       rotary_interleaved, num_splits, alibi_slopes):
    return flash_attn_with_kvcache_ref(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                       cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                       (window_left, window_right), softcap, rotary_interleaved, alibi_slopes,
                                       return_softmax_lse=True)


KVCACHE = register_op(
    "flash_attn_with_kvcache",
    Implementation("triton", _kvcache_triton, eligible=lambda q, k_cache, *rest: _kernel_reason(q, k_cache.shape[2])),
    Implementation("reference", _kvcache_reference),
)


@torch.library.custom_op("docqa_fast::flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
                v: Optional[torch.Tensor], rotary_cos: Optional[torch.Tensor], rotary_sin: Optional[torch.Tensor],
                cache_seqlens: torch.Tensor, cache_batch_idx: Optional[torch.Tensor],
                cache_leftpad: Optional[torch.Tensor], block_table: Optional[torch.Tensor], softmax_scale: float,
                causal: bool, window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
                num_splits: int, alibi_slopes: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # A direct call gets every check that reads no tensor value, before anything is written to the
    # cache (the values -- lengths within the cache, rows and blocks in range -- are the raw op's
    # preconditions, checked by kvcache_attention).
    _check_kvcache_inputs(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                          cache_leftpad, block_table)
    check_op_scalars(softmax_scale, window_left, window_right, softcap)
    check_num_splits(num_splits)
    check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[2], q)
    return KVCACHE(q.device, q.dtype, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                   cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal, window_left, window_right,
                   softcap, rotary_interleaved, num_splits, alibi_slopes)


@_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
      softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved, num_splits, alibi_slopes):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(_kvcache_lse_shape(q), dtype=torch.float32))


def _check_int32_vector(name, value, batch, q):
    check_tensor(name, value, dtypes=(torch.int32,), ndims=(1,))
    check_shape(name, value, (batch,), "one entry per batch row of q")
    check_same_device(("q", name), (q, value))


def _check_kvcache_inputs(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                          cache_leftpad, block_table):
    """Every check that reads no tensor value, before anything is written to the cache."""
    check_heads(q, k_cache, v_cache, q_ndim=4, kv_ndim=4, names=("q", "k_cache", "v_cache"))
    batch, _, _, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if (k is None) != (v is None):
        raise ValueError("expected k and v together (new tokens to append), got only "
                         + ("k" if k is not None else "v"))
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dtypes=FLOAT_DTYPES, ndims=(4,))
            check_last_dim_contiguous(name, t)
        check_same_dtype(("q", "k", "v"), (q, k, v))
        check_same_device(("q", "k", "v"), (q, k, v))
        check_shape("k", k, (batch, k.shape[1], kv_heads, head_dim), "(B, Sk_new, Hk, D) like q and k_cache")
        check_shape("v", v, k.shape, "the shape of k")
    if block_table is not None:
        check_block_table(block_table, batch, k_cache.shape[1], q, "q's batch", "k_cache")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be used with block_table (a paged cache maps rows itself)")
        if cache_leftpad is not None:
            raise ValueError("cache_leftpad cannot be used with block_table (as in flash-attn 2)")
    elif cache_batch_idx is None and k_cache.shape[0] < batch:
        raise ValueError(f"expected k_cache with at least {batch} rows (q's batch) or a cache_batch_idx, "
                         f"got {k_cache.shape[0]}")
    if cache_batch_idx is not None:
        _check_int32_vector("cache_batch_idx", cache_batch_idx, batch, q)
    if cache_leftpad is not None:
        _check_int32_vector("cache_leftpad", cache_leftpad, batch, q)
    if isinstance(cache_seqlens, torch.Tensor):
        _check_int32_vector("cache_seqlens", cache_seqlens, batch, q)
    elif cache_seqlens is not None and (not isinstance(cache_seqlens, int) or isinstance(cache_seqlens, bool)):
        raise TypeError("expected cache_seqlens to be an int or an int32 tensor (B,), "
                        f"got {type(cache_seqlens).__name__}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("expected rotary_cos and rotary_sin together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need the new k and v to rotate (as in flash-attn)")
        check_tables(q, rotary_cos, rotary_sin, names=("q", "rotary_cos", "rotary_sin"))


def _read_at_once(figures: dict) -> dict:
    """Device figures (0-dim tensors) as Python ints, read in one host sync."""
    return dict(zip(figures, torch.stack([f.long() for f in figures.values()]).tolist()))


_UNUSED_SLOT = 2 ** 62 + 1  # sorts after every entry; odd: "not written" (see below)


def _written_page_shared(block_table, lengths, ends, page_size: int):
    """Whether a page the append writes (slots [lengths, ends) of its row) is in use more than once
    in block_table (by another row, or twice by its own): a 0-dim bool, no host sync (a sort,
    not boolean indexing or torch.unique), memory of the table's size whatever the cache's
    block count. Entries out of [0, num_blocks) are refused on their own, before this is judged.

    Each table entry becomes a key 2 * page + (0 if written else 1) (an entry not in use: a key
    past every page). Sorted, a page's keys are adjacent and a written use comes first, so a
    written page is shared exactly when a written key is followed by a key of the same page."""
    first = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size
    used = first < ends[:, None]
    written = used & (first + page_size > lengths[:, None])
    keys = torch.where(used, 2 * block_table.long() + (~written).long(), _UNUSED_SLOT).flatten().sort().values
    return ((keys[:-1] % 2 == 0) & (keys[:-1] // 2 == keys[1:] // 2)).any()


def _check_kvcache_values(q, k_cache, cache_seqlens, seqlen_new, cache_batch_idx, cache_leftpad, block_table,
                          rotary_cos, causal, local):
    """Checks that read tensor values; all before anything is written. Every figure they need is
    reduced on the device and read back at once: one host sync per call, not one per figure (a
    sync leaves the GPU idle while the host prepares the launch, which at decode sizes costs
    more than the attention itself)."""
    capacity = cache_capacity(k_cache, block_table)
    lengths = cache_seqlens.long()
    ends = lengths + seqlen_new
    figures = {"min_len": lengths.min(), "max_end": ends.max()}
    if cache_batch_idx is not None:
        rows = cache_batch_idx.long()
        figures.update(min_row=rows.min(), max_row=rows.max())
        if seqlen_new > 0:  # a repeated row: two equal neighbours once sorted (no torch.unique: it syncs)
            figures["repeated_row"] = (rows.sort().values.diff() == 0).any()
    if cache_leftpad is not None:
        pad = cache_leftpad.long()
        figures.update(min_pad=pad.min(), pad_past_len=(pad > lengths).any())
    if block_table is not None:
        figures.update(pages_in_use_figures(block_table, ends, k_cache.shape[1]))
        if seqlen_new > 0:
            figures["shared_written_page"] = _written_page_shared(block_table, lengths, ends, k_cache.shape[1])
    read = _read_at_once(figures)
    if read["min_len"] < 0:
        raise ValueError(f"expected cache_seqlens >= 0, got {cache_seqlens.tolist()[:16]}")
    if read["max_end"] > capacity:
        where = "max_blocks * page_size of block_table" if block_table is not None else "S_cache of k_cache"
        raise ValueError(f"expected cache_seqlens + {seqlen_new} new tokens <= the cache capacity {capacity} "
                         f"({where}), got up to {read['max_end']}")
    if cache_batch_idx is not None:
        if read["min_row"] < 0 or read["max_row"] >= k_cache.shape[0]:
            raise ValueError(f"expected cache_batch_idx values in [0, {k_cache.shape[0]}) (rows of k_cache), "
                             f"got {cache_batch_idx.tolist()[:16]}")
        # The append is fused into the attention launch: two batch rows on one cache row would
        # read slots the other writes in the same launch.
        if read.get("repeated_row"):
            raise ValueError("expected distinct cache_batch_idx values when appending new k/v (two rows writing "
                             f"one cache row race), got {cache_batch_idx.tolist()[:16]}")
    if cache_leftpad is not None and (read["min_pad"] < 0 or read["pad_past_len"]):
        raise ValueError("expected 0 <= cache_leftpad <= cache_seqlens in every row, got "
                         f"{cache_leftpad.tolist()[:16]} and {cache_seqlens.tolist()[:16]}")
    if block_table is not None:
        check_pages_in_use(read, k_cache.shape[0], "k_cache")
        # As for cache_batch_idx: the append is fused into the launch, so a page it writes must be
        # no other row's (a shared prefix page that no row writes is fine).
        if read.get("shared_written_page"):
            raise ValueError("expected each block_table page the append writes (slots cache_seqlens onwards) to be "
                             "used by its row alone (two rows on one written page race), got "
                             f"{block_table.tolist()[:16]}")
    if rotary_cos is not None:
        seqlen_q = q.shape[1]
        needed = read["max_end"] - seqlen_new + max(seqlen_new, seqlen_q if (causal or local) else 1)
        if needed > rotary_cos.shape[0]:
            raise ValueError(f"expected rotary_cos/rotary_sin with at least {needed} positions "
                             f"(cache_seqlens + new tokens), got {rotary_cos.shape[0]}")


def kvcache_attention(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                      cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                      window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, num_splits=0, alibi_slopes=None):
    """Validated attention over a KV cache (appending k/v first) -> (out, lse); see
    :func:`docqa_fast.flash_attn_with_kvcache` for the arguments."""
    _check_kvcache_inputs(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                          cache_leftpad, block_table)
    alibi_slopes = check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[2], q)
    softcap = check_softcap(softcap)
    num_splits = check_num_splits(num_splits)
    capacity = cache_capacity(k_cache, block_table)
    left, right = normalize_window(check_window(window_size), capacity, capacity)
    batch = q.shape[0]
    if cache_seqlens is None:
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    seqlen_new = 0 if k is None else k.shape[1]
    if batch and value_checks_enabled():
        _check_kvcache_values(q, k_cache, cache_seqlens, seqlen_new, cache_batch_idx, cache_leftpad, block_table,
                              rotary_cos, causal, (left, right) != (-1, -1))
    # The kernels read these with unit stride.
    cache_seqlens, cache_batch_idx, cache_leftpad = (
        None if t is None else t.contiguous() for t in (cache_seqlens, cache_batch_idx, cache_leftpad))
    if block_table is not None and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    return _kvcache_op(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                       cache_leftpad, block_table, softmax_scale_or_default(softmax_scale, q.shape[-1]), bool(causal),
                       left, right, softcap, bool(rotary_interleaved), num_splits, alibi_slopes)


# ---------------------------------------------- flash_attn_varlen_func with block_table

def _paged_triton(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, softmax_scale, causal,
                  window_left, window_right, softcap, num_splits, alibi_slopes):
    # Key counts per sequence, on the device: the kernel reads them where the decode path reads cache_seqlens.
    seqlens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    options = dict(block_table=block_table, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
                   softmax_scale=softmax_scale, causal=causal, window_size=(window_left, window_right),
                   softcap=softcap, alibi_slopes=alibi_slopes)
    return _run_kernel(q, k_cache, v_cache, (q.shape[1], q.shape[0]), seqlens_k, options, num_splits,
                       block_table.shape[1] * k_cache.shape[1])


def _paged_reference(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, softmax_scale,
                     causal, window_left, window_right, softcap, num_splits, alibi_slopes):
    return flash_attn_varlen_paged_ref(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table, softmax_scale,
                                       causal, (window_left, window_right), softcap, alibi_slopes)


VARLEN_PAGED = register_op(
    "flash_attn_varlen_paged",
    Implementation("triton", _paged_triton, eligible=lambda q, k_cache, *rest: _kernel_reason(q, k_cache.shape[2])),
    Implementation("reference", _paged_reference),
)


@torch.library.custom_op("docqa_fast::flash_attn_varlen_paged", mutates_args=())
def _varlen_paged_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, block_table: torch.Tensor, softmax_scale: float,
                     causal: bool, window_left: int, window_right: int, softcap: float,
                     num_splits: int, alibi_slopes: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    check_paged_varlen_layout(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table)
    check_op_scalars(softmax_scale, window_left, window_right, softcap)
    check_num_splits(num_splits)
    check_alibi_slopes(alibi_slopes, cu_seqlens_q.shape[0] - 1, q.shape[1], q)
    return VARLEN_PAGED(q.device, q.dtype, q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table,
                        softmax_scale, causal, window_left, window_right, softcap, num_splits, alibi_slopes)


@_varlen_paged_op.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, softmax_scale, causal,
      window_left, window_right, softcap, num_splits, alibi_slopes):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


def _check_paged_inputs(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table):
    """Every check, before any launch; value checks in eager mode only, in one host sync: both
    sets of boundaries (check_cu_seqlens's figures) and the pages in use are reduced on the
    device and read together, then judged in check_cu_seqlens's order."""
    check_heads(q, k_cache, v_cache, q_ndim=3, kv_ndim=4)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        check_int(name, value)
    check_cu_seqlens_pair(q, cu_seqlens_q, cu_seqlens_k)  # check_cu_seqlens's layout checks, for both
    batch = cu_seqlens_q.shape[0] - 1
    page_size = k_cache.shape[1]
    check_block_table(block_table, batch, page_size, q, "one per sequence of cu_seqlens_q", "k")
    if batch == 0 or not value_checks_enabled():
        return
    lengths_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    lengths_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    # The pages' figures assume valid key lengths: they are judged only after cu_seqlens_k passes.
    figures = {**cu_seqlens_figures(cu_seqlens_q, "q_"), **cu_seqlens_figures(cu_seqlens_k, "k_"),
               **pages_in_use_figures(block_table, lengths_k, page_size)}
    read = _read_at_once(figures)
    check_cu_seqlens_figures("cu_seqlens_q", read, q.shape[0], cu_seqlens_q, lengths_q, "q_",
                             max_seqlen=max_seqlen_q, max_name="max_seqlen_q")
    # cu_seqlens_k's end is the total key count, which a paged cache does not fix: check the rest.
    check_cu_seqlens_figures("cu_seqlens_k", read, read["k_last"], cu_seqlens_k, lengths_k, "k_",
                             max_seqlen=max_seqlen_k, max_name="max_seqlen_k")
    capacity = block_table.shape[1] * page_size
    if read["k_longest"] > capacity:
        raise ValueError(f"expected every key length (cu_seqlens_k) <= the block_table capacity {capacity} "
                         f"(max_blocks * page_size), got {read['k_longest']}")
    check_pages_in_use(read, k_cache.shape[0], "k")


def varlen_paged_attention(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, num_splits=0,
                           alibi_slopes=None):
    """Validated packed attention over a paged cache -> (out (total_q, H, D), lse (H, total_q) fp32).

    flash-attn 2's semantics (forward only): sequence b's keys are its first
    ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` logical slots, slot j in block
    ``block_table[b, j // page_size]``; masks align bottom-right per sequence; nothing is
    appended (the chunk's k/v are in the cache already). A query that sees no key gets out 0 and
    lse -inf.
    """
    _check_paged_inputs(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)
    left, right = normalize_window(check_window(window_size), max_seqlen_k, max_seqlen_q)
    softcap = check_softcap(softcap)
    num_splits = check_num_splits(num_splits)
    alibi_slopes = check_alibi_slopes(alibi_slopes, cu_seqlens_q.shape[0] - 1, q.shape[1], q)
    if block_table.stride(1) != 1:  # the kernel reads rows of the table with unit stride
        block_table = block_table.contiguous()
    return _varlen_paged_op(q, k_cache, v_cache, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q,
                            block_table, softmax_scale_or_default(softmax_scale, q.shape[-1]), bool(causal), left,
                            right, softcap, num_splits, alibi_slopes)

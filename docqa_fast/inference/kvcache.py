"""``flash_attn_with_kvcache``: validation, the custom op (mutating the cache) and dispatch.

The op ``docqa_fast::flash_attn_with_kvcache`` declares ``k_cache`` and ``v_cache`` as mutated
(the append writes them in place) and has a fake implementation, so it traces under
``torch.compile(fullgraph=True)``. Nothing on its path syncs with the host or allocates a
size that depends on tensor values (split count and partial buffers follow from shapes
only), so it can be captured in a CUDA graph; the value checks below (one host sync) run in
eager mode only and are skipped under ``torch.compile``.

Fast path (CUDA fp16/bf16; CPU under TRITON_INTERPRET=1 fp16), all in ``kernels/inference.py``:
one launch of the split-KV attention kernel, which also appends the new k/v (rotating k and q in
registers) into exactly their Sk_new slots per row, and, with more than one split,
``merge_stacked_attention_states``. Everything else runs the reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import choose_backend, forced_backend
from .._validation import (
    FLOAT_DTYPES,
    check_last_dim_contiguous,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    value_checks_enabled,
)
from ..attention.ops import FAST_DTYPES, MAX_HEAD_DIM, check_window
from ..merge_attention import merge_stacked_attention_states
from ..reference.kvcache import cache_capacity, flash_attn_with_kvcache_ref, normalize_window

_IMPLEMENTED = ("triton",)
PAGE_MULTIPLE = 16
_DEFAULT_NUM_SMS = 132  # H100 SXM; used when the tensors are not on a GPU (interpreter runs)


# ---------------------------------------------------------------------------- validation

def _check_int32_vector(name, value, batch, q):
    check_tensor(name, value, dtypes=(torch.int32,), ndims=(1,))
    check_shape(name, value, (batch,), "one entry per batch row of q")
    check_same_device(("q", name), (q, value))


def _check_values(q, k_cache, cache_seqlens, seqlen_new, cache_batch_idx, cache_leftpad, block_table,
                  rotary_cos, causal, local):
    """Checks that read tensor values (one host sync); all before anything is written."""
    capacity = cache_capacity(k_cache, block_table)
    lengths = cache_seqlens.long()
    if int(lengths.min()) < 0:
        raise ValueError(f"expected cache_seqlens >= 0, got {cache_seqlens.tolist()[:16]}")
    ends = lengths + seqlen_new
    if int(ends.max()) > capacity:
        raise ValueError(f"expected cache_seqlens + {seqlen_new} new tokens <= the cache capacity {capacity} "
                         f"(S_cache, or max_blocks * page_size), got up to {int(ends.max())}")
    if cache_batch_idx is not None:
        rows = cache_batch_idx.long()
        if int(rows.min()) < 0 or int(rows.max()) >= k_cache.shape[0]:
            raise ValueError(f"expected cache_batch_idx values in [0, {k_cache.shape[0]}) (rows of k_cache), "
                             f"got {cache_batch_idx.tolist()[:16]}")
        # The append is fused into the attention launch: two batch rows on one cache row would
        # read slots the other writes in the same launch.
        if seqlen_new > 0 and torch.unique(rows).numel() != rows.numel():
            raise ValueError("expected distinct cache_batch_idx values when appending new k/v (two rows writing "
                             f"one cache row race), got {cache_batch_idx.tolist()[:16]}")
    if cache_leftpad is not None:
        pad = cache_leftpad.long()
        if int(pad.min()) < 0 or bool((pad > lengths).any()):
            raise ValueError("expected 0 <= cache_leftpad <= cache_seqlens in every row, got "
                             f"{cache_leftpad.tolist()[:16]} and {cache_seqlens.tolist()[:16]}")
    if block_table is not None:
        page_size = k_cache.shape[1]
        used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size < ends[:, None]
        entries = block_table.long()[used]
        if entries.numel() and (int(entries.min()) < 0 or int(entries.max()) >= k_cache.shape[0]):
            raise ValueError(f"expected block_table entries of the pages in use in [0, {k_cache.shape[0]}) "
                             f"(blocks of k_cache), got values from {int(entries.min())} to {int(entries.max())}")
    if rotary_cos is not None:
        seqlen_q = q.shape[1]
        needed = int(lengths.max()) + max(seqlen_new, seqlen_q if (causal or local) else 1)
        if needed > rotary_cos.shape[0]:
            raise ValueError(f"expected rotary_cos/rotary_sin with at least {needed} positions "
                             f"(cache_seqlens + new tokens), got {rotary_cos.shape[0]}")


def _capturing_cuda_graph(q) -> bool:
    """Value checks sync with the host, which a CUDA graph capture forbids: validate before capturing."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_cache_and_heads(q, k_cache, v_cache, q_ndim=4, cache_names=("k_cache", "v_cache")):
    """q (..., H, D) and a (contiguous or paged) cache pair: dtypes, devices, shapes, head dims, GQA.
    Shared with the block_table path of flash_attn_varlen_func, whose caches are called k and v."""
    k_name, v_name = cache_names
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndims=(q_ndim,))
    check_tensor(k_name, k_cache, dtypes=FLOAT_DTYPES, ndims=(4,))
    check_tensor(v_name, v_cache, dtypes=FLOAT_DTYPES, ndims=(4,))
    check_same_dtype(("q", k_name, v_name), (q, k_cache, v_cache))
    check_same_device(("q", k_name, v_name), (q, k_cache, v_cache))
    check_shape(v_name, v_cache, k_cache.shape, f"the shape of {k_name}")
    for name, t in (("q", q), (k_name, k_cache), (v_name, v_cache)):
        check_last_dim_contiguous(name, t)
    heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"expected {k_name} with head dim {head_dim} (q's), got {k_cache.shape[3]}")
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        raise ValueError(f"expected a head dim that is a multiple of 8 and at most {MAX_HEAD_DIM}, got {head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"expected q's number of heads ({heads}) to be a multiple of {k_name}'s ({kv_heads})")


def _validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
              block_table, softcap, alibi_slopes, num_splits):
    _check_cache_and_heads(q, k_cache, v_cache)
    batch, _, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not implemented")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"expected num_splits to be an int >= 0 (0 = heuristic), got {num_splits!r}")
    if softcap < 0:
        raise ValueError(f"expected softcap >= 0 (0 = off), got {softcap}")

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
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndims=(2,))
        check_same_device(("q", "block_table"), (q, block_table))
        if block_table.shape[0] != batch:
            raise ValueError(f"expected block_table with {batch} rows (q's batch), got {tuple(block_table.shape)}")
        if k_cache.shape[1] % PAGE_MULTIPLE or k_cache.shape[1] == 0:
            raise ValueError(f"expected a page size (k_cache.shape[1] with block_table) that is a multiple of "
                             f"{PAGE_MULTIPLE}, got {k_cache.shape[1]}")
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
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check_tensor(name, t, dtypes=FLOAT_DTYPES, ndims=(2,))
            check_last_dim_contiguous(name, t)  # the kernel reads the tables' rows with unit stride
        check_same_dtype(("q", "rotary_cos", "rotary_sin"), (q, rotary_cos, rotary_sin))
        check_same_device(("q", "rotary_cos", "rotary_sin"), (q, rotary_cos, rotary_sin))
        check_shape("rotary_sin", rotary_sin, rotary_cos.shape, "the shape of rotary_cos")
        if not 0 < 2 * rotary_cos.shape[1] <= head_dim:
            raise ValueError(f"expected rotary_cos of shape (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                             f"{head_dim}, got {tuple(rotary_cos.shape)}")


# ------------------------------------------------------------------------ the custom op

def _lse_shape(q):
    return q.shape[0], q.shape[2], q.shape[1]


def _use_kernel(q, kv_heads):
    from ..kernels.inference import MAX_GROUP

    reason = None
    if q.dtype not in FAST_DTYPES:
        reason = f"the decode kernel takes fp16/bf16, got {q.dtype} (fp32 runs on the reference path)"
    elif q.shape[-2] // kv_heads > MAX_GROUP:  # q (..., H, D): padded or packed
        reason = f"more than {MAX_GROUP} query heads per KV head (runs on the reference path)"
    if reason is not None:
        forced = forced_backend()
        if forced not in (None, "reference"):
            raise RuntimeError(f"DOCQA_FAST_BACKEND={forced}: {reason}")
        return False
    return choose_backend("flash_attn_with_kvcache", q.device, _IMPLEMENTED, q.dtype) == "triton"


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


@torch.library.custom_op("docqa_fast::flash_attn_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
                v: Optional[torch.Tensor], rotary_cos: Optional[torch.Tensor], rotary_sin: Optional[torch.Tensor],
                cache_seqlens: torch.Tensor, cache_batch_idx: Optional[torch.Tensor],
                cache_leftpad: Optional[torch.Tensor], block_table: Optional[torch.Tensor], softmax_scale: float,
                causal: bool, window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
                num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    if not _use_kernel(q, k_cache.shape[2]):
        return flash_attn_with_kvcache_ref(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, softmax_scale, causal, window, softcap, rotary_interleaved, return_softmax_lse=True)
    from ..kernels import inference as kernels

    batch, seqlen_q, heads, head_dim = q.shape
    if num_splits == 0:
        num_splits = kernels.num_splits_heuristic(batch, seqlen_q, heads, k_cache.shape[2],
                                                  cache_capacity(k_cache, block_table), _num_sms(q.device))
    # One launch appends k/v (rotating k and q in registers) and attends; see kernels/inference.py.
    options = dict(k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                   rotary_per_token=causal or window != (-1, -1), cache_leftpad=cache_leftpad,
                   block_table=block_table, cache_batch_idx=cache_batch_idx, softmax_scale=softmax_scale,
                   causal=causal, window_size=window, softcap=softcap, num_splits=num_splits)
    if num_splits == 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(_lse_shape(q), dtype=torch.float32, device=q.device)
        kernels.forward(q, k_cache, v_cache, out, lse, cache_seqlens, **options)
        return out, lse
    # fp32 partials: the combine rounds once, to q's dtype, at the end.
    outs = torch.empty((num_splits, *q.shape), dtype=torch.float32, device=q.device)
    lses = torch.empty((num_splits, *_lse_shape(q)), dtype=torch.float32, device=q.device)
    kernels.forward(q, k_cache, v_cache, outs, lses, cache_seqlens, **options)
    out, lse = merge_stacked_attention_states(outs, lses)
    return out.to(q.dtype), lse


@_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
      softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved, num_splits):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(_lse_shape(q), dtype=torch.float32))


# --------------------------------------------------------------------------- public API

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
            (positions: see :mod:`docqa_fast.reference.kvcache`). Need ``k``/``v``.
        cache_seqlens: int or (B,) int32: valid length of each row before the append (None = full).
        cache_batch_idx: (B,) int32 cache row of each batch row (contiguous caches).
        cache_leftpad: (B,) int32 first valid slot of each row (contiguous caches).
        block_table: (B, max_blocks) int32 physical block of each logical page.
        softmax_scale, causal, window_size, softcap: as :func:`docqa_fast.flash_attn_func`, with the
            masks aligned bottom-right to ``cache_seqlens + Sk_new`` keys.
        num_splits: 0 = a heuristic that fills the GPU, 1 = no split, n = n splits of the keys.
        return_softmax_lse: also return the fp32 LSE (B, H, Sq).

    Returns:
        out (B, Sq, H, D), or ``(out, lse)``. A query that sees no key gets out 0 and lse -inf.
    """
    _validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
              block_table, softcap, alibi_slopes, num_splits)
    left, right = normalize_window(check_window(window_size), cache_capacity(k_cache, block_table))
    batch = q.shape[0]
    if cache_seqlens is None:
        cache_seqlens = cache_capacity(k_cache, block_table)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    seqlen_new = 0 if k is None else k.shape[1]
    if batch and value_checks_enabled() and not _capturing_cuda_graph(q):
        _check_values(q, k_cache, cache_seqlens, seqlen_new, cache_batch_idx, cache_leftpad, block_table,
                      rotary_cos, causal, (left, right) != (-1, -1))
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    # The kernels read these with unit stride.
    cache_seqlens, cache_batch_idx, cache_leftpad = (
        None if t is None else t.contiguous() for t in (cache_seqlens, cache_batch_idx, cache_leftpad))
    if block_table is not None and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    out, lse = _kvcache_op(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                           cache_leftpad, block_table, float(softmax_scale), bool(causal), left, right,
                           float(softcap), bool(rotary_interleaved), int(num_splits))
    return (out, lse) if return_softmax_lse else out

"""The rules every attention entry point shares: training (:mod:`docqa_fast.attention`),
inference over a KV cache (:mod:`docqa_fast.inference`) and the flash-attn front ends above
both (:mod:`docqa_fast.flash_attn_interface`).

One definition each of: which q/k/v (or q/cache) tensors are acceptable (dtypes, devices,
shapes, head dims, GQA), the window and its normalisation, the softcap, what the kernels
compute (fp16/bf16: the eligibility rule both dispatch entries use), the guard that skips
value checks where a host sync is forbidden, and the paged-cache checks (page size, the range
of the block-table entries in use).
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from ._backend import dtype_rule
from ._validation import (
    FLOAT_DTYPES,
    check_int,
    check_last_dim_contiguous,
    check_real,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)

KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # what the Triton kernels take; fp32 runs the reference
MAX_HEAD_DIM = 256
PAGE_MULTIPLE = 16  # page sizes the paged kernels address (flash-attn 2 needs 256)
# CUDA's grid y axis, which carries the sequences (and z the heads; H <= 65,535 in practice).
MAX_SEQUENCES = 65_535
_DEFAULT_NUM_SMS = 132  # H100 / H200; used when the tensors are not on a GPU (interpreter runs)


def check_heads(q, k, v, *, q_ndim: int, kv_ndim: int, names=("q", "k", "v")) -> None:
    """q (..., H, D) against k and v (..., Hk, D): dtypes, devices, shapes, head dim, GQA."""
    q_name, k_name, v_name = names
    check_tensor(q_name, q, dtypes=FLOAT_DTYPES, ndims=(q_ndim,))
    check_tensor(k_name, k, dtypes=FLOAT_DTYPES, ndims=(kv_ndim,))
    check_tensor(v_name, v, dtypes=FLOAT_DTYPES, ndims=(kv_ndim,))
    check_same_dtype(names, (q, k, v))
    check_same_device(names, (q, k, v))
    check_shape(v_name, v, k.shape, f"the shape of {k_name}")
    for name, t in zip(names, (q, k, v)):
        check_last_dim_contiguous(name, t)
    head_dim, heads, kv_heads = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"expected {k_name} with head dim {head_dim} ({q_name}'s), got {k.shape[-1]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        # Any size: the kernels mask the head dim to the next power of two (no padded copy).
        raise ValueError(f"expected a head dim from 1 to {MAX_HEAD_DIM} (the last dimension of {q_name}), "
                         f"got {head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"expected {q_name}'s number of heads ({heads}) to be a multiple of {k_name}'s ({kv_heads})")


def check_window(window_size) -> tuple[int, int]:
    """(left, right) as Python ints from any 2-element sequence of integers, as flash-attn takes
    it: a tuple or list (of Python or NumPy ints) or a 1-D integer tensor of two elements (read
    once on the host: a sync for a CUDA tensor, as in flash-attn). Floats are refused, not
    truncated."""
    if isinstance(window_size, torch.Tensor):
        if window_size.dim() != 1 or window_size.numel() != 2 or window_size.dtype.is_floating_point \
                or window_size.dtype.is_complex or window_size.dtype == torch.bool:
            raise TypeError(f"expected window_size as a 1-D integer tensor of two elements, got a "
                            f"{window_size.dtype} tensor of shape {tuple(window_size.shape)}")
        window_size = window_size.tolist()
    if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__") or len(window_size) != 2:
        raise TypeError(f"expected window_size to be a pair (left, right), got {window_size!r}")
    try:
        left, right = (operator.index(w) for w in window_size)
    except TypeError:
        raise TypeError(f"expected window_size of two integers, got {tuple(window_size)!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"expected window_size values >= -1 (-1 = unbounded), got {(left, right)}")
    return left, right


def normalize_window(window, left_span: int, right_span: int) -> tuple[int, int]:
    """A window side that restricts nothing becomes -1: a left side >= ``left_span`` or a right
    side >= ``right_span`` covers every key. Training passes the longest key and query ranges
    (left as they are, the kernels' int32 sums of positions and sides near 2^31 would wrap);
    a KV cache passes its capacity for both, flash-attn's rule, which also decides whether a
    call is "local" (and so how q is rotated)."""
    left, right = window
    return (-1 if left >= left_span else left), (-1 if right >= right_span else right)


def check_softcap(softcap) -> float:
    """A finite softcap >= 0 (0 = off); NaN would otherwise pass every comparison and be taken as off."""
    return check_real("softcap", softcap, minimum=0.0)


def softmax_scale_or_default(softmax_scale, head_dim: int) -> float:
    """1 / sqrt(head_dim), or the given scale: any finite real (NaN or inf would make every output NaN)."""
    if softmax_scale is None:
        return float(1.0 / math.sqrt(head_dim))
    return check_real("softmax_scale", softmax_scale)


def check_alibi_slopes(alibi_slopes, batch: int, heads: int, q):
    """ALiBi slopes as flash-attn takes them: None, or fp32 (H,) or (B, H) on q's device."""
    if alibi_slopes is None:
        return None
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), ndims=(1, 2))
    check_same_device(("q", "alibi_slopes"), (q, alibi_slopes))
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"expected alibi_slopes of shape ({heads},) or ({batch}, {heads}) (heads, or batch x heads), "
                         f"got {tuple(alibi_slopes.shape)}")
    return alibi_slopes


def check_dropout(dropout_p) -> float:
    """The dropout probability: a number in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"expected dropout_p to be a float in [0, 1), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"expected dropout_p in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_num_splits(num_splits) -> int:
    """0 = the heuristic, n = n splits of the keys."""
    return check_int("num_splits", num_splits)


def check_op_scalars(softmax_scale, window_left, window_right, softcap) -> None:
    """The scalars as an attention op receives them (the front ends have resolved the defaults)."""
    check_real("softmax_scale", softmax_scale)
    check_softcap(softcap)
    check_int("window_left", window_left, minimum=-1)
    check_int("window_right", window_right, minimum=-1)


def check_cu_seqlens_pair(q, cu_seqlens_q, cu_seqlens_k) -> None:
    """Packed boundaries as the ops index them (no value read): int32 1-D on q's device, at least
    one entry, one per sequence in both."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, dtypes=(torch.int32,), ndims=(1,))
        check_same_device(("q", name), (q, cu))
    if cu_seqlens_q.shape[0] == 0:
        raise ValueError("expected cu_seqlens_q with at least one entry (0 ... the token count), got none")
    check_shape("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape, "one entry per sequence, like cu_seqlens_q")


def check_paged_varlen_layout(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table) -> None:
    """The checks of packed queries over a paged cache that read no tensor value: what the op
    indexes by (the values -- boundaries, block entries in use -- are checked by the front end)."""
    check_heads(q, k_cache, v_cache, q_ndim=3, kv_ndim=4, names=("q", "k_cache", "v_cache"))
    check_int("max_seqlen_q", max_seqlen_q)
    check_cu_seqlens_pair(q, cu_seqlens_q, cu_seqlens_k)
    check_block_table(block_table, cu_seqlens_q.shape[0] - 1, k_cache.shape[1], q,
                      "one per sequence of cu_seqlens_q", "k_cache")


# Why the attention kernels cannot compute a call on q's dtype (an eligibility rule of the
# dispatch table, for training and inference alike), or None.
kernel_dtype_reason = dtype_rule("the attention kernels", KERNEL_DTYPES, " (fp32 runs on the reference path)")


def num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


# ------------------------------------------------------------------------- paged caches

def cache_capacity(k_cache, block_table) -> int:
    """Slots one batch row can address: S_cache, or max_blocks * page_size when paged."""
    return k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)


def check_block_table(block_table, rows: int, page_size: int, q, rows_what: str, cache_name: str) -> None:
    """The static checks of a paged cache: int32 (rows, max_blocks) on q's device, a page size
    the kernels address."""
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndims=(2,))
    check_same_device(("q", "block_table"), (q, block_table))
    if block_table.shape[0] != rows:
        raise ValueError(f"expected block_table with {rows} rows ({rows_what}), got {tuple(block_table.shape)}")
    if block_table.shape[1] == 0 and rows:
        # The kernels read each row's first entry ahead of their loop (the page-table prefetch).
        raise ValueError(f"expected block_table with at least one page per row, got {tuple(block_table.shape)}")
    if page_size % PAGE_MULTIPLE or page_size == 0:
        raise ValueError(f"expected a page size ({cache_name}.shape[1] with block_table) that is a multiple of "
                         f"{PAGE_MULTIPLE}, got {page_size}")


_NO_PAGE = 2 ** 62  # the extremes of no entry at all: lowest above highest


def pages_in_use_figures(block_table, lengths, page_size: int) -> dict:
    """What :func:`check_pages_in_use` judges, reduced on the device with no host sync, so that a
    caller reads it together with its other figures in one sync: the smallest and largest entry
    of the pages in use (row b's first ceil(lengths[b] / page_size) entries), as 0-dim int64
    tensors; with no page in use, lowest > highest. No boolean indexing: its result's size
    depends on the values, which costs a sync of its own."""
    if block_table.numel() == 0:
        return {"min_page": torch.full((), _NO_PAGE, device=block_table.device),
                "max_page": torch.full((), -_NO_PAGE, device=block_table.device)}
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page_size < lengths[:, None]
    entries = block_table.long()
    return {"min_page": torch.where(used, entries, _NO_PAGE).min(),
            "max_page": torch.where(used, entries, -_NO_PAGE).max()}


def check_pages_in_use(read: dict, num_blocks: int, cache_name: str) -> None:
    """Value check on the figures of :func:`pages_in_use_figures`, read on the host: the entries of
    the pages in use lie in [0, num_blocks) (blocks of ``cache_name``)."""
    lowest, highest = read["min_page"], read["max_page"]
    if lowest <= highest and (lowest < 0 or highest >= num_blocks):
        raise ValueError(f"expected block_table entries of the pages in use in [0, {num_blocks}) (blocks of "
                         f"{cache_name}), got values from {lowest} to {highest}")

"""Triton flash attention for training: forward with LSE, and backward (delta, dK/dV, dQ).

One set of kernels serves the dense (B, S, H, D) and the packed varlen (total, H, D)
layouts: a sequence is (start token, length, batch stride); dense sequences start at 0
with a batch stride, varlen ones start at ``cu_seqlens[b]`` with batch stride 0.

Semantics are flash-attn 2's (docqa_fast/reference/attention.py): GQA (query head h reads
KV head h // (H / Hk)), causal and sliding windows aligned bottom-right (query i sees keys
[i + Sk - Sq - left, i + Sk - Sq + right]), softcap ``cap * tanh(s / cap)``, LSE fp32 in
natural log; a query that sees no key gets out 0 and LSE -inf.

Techniques: scores are taken in base 2 with the softmax scale and log2(e) folded into one
multiplier (exp2 is one instruction); key blocks outside a query block's causal / window
band are never visited (the loop bounds are computed per block), and the visited ones run in
two stages: its inside (blocks every row of the tile sees in full) with no mask and unmasked
loads, then its edges with the mask; head dims that are not powers of two (80, 96, 192) are
masked, not padded by a copy. Causal query blocks run longest first. The grid is (block,
sequence, head), so a packed batch holds at most 65,535 sequences (CUDA's y-axis limit, as
in flash-attn; the front end checks it). The
backward is the FlashAttention-2 split: a small kernel for delta = rowsum(dO * O), one kernel
per KV block accumulating dK/dV over every query head of its group (no atomics, so the
gradients are bitwise reproducible), one kernel per query block for dQ.
"""

import itertools
import os

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the masked-load path only
    TensorDescriptor = None

from . import tuning
from .registry import KernelConfig, pointer_type, register

LOG2E = 1.4426950408889634
# Lengths and window sides Triton would otherwise compile as constants when they equal 1: Triton
# 3.6's ptxas crashes (signal 11) on the dQ kernel compiled for seqlen_k == 1 with TMA loads,
# and a variant per length-1 call would buy nothing.
_UNSPECIALIZED = ("seqlen_q", "seqlen_k", "window_left", "window_right")
HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256)


@triton.jit
def _sequence(cu_seqlens_ptr, b, fixed_len, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence b: from cu_seqlens, or (0, fixed_len) for dense."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens_ptr + b)
        return start, tl.load(cu_seqlens_ptr + b + 1) - start
    return b * 0, fixed_len  # a tensor zero (not a Python 0) so .to(tl.int64) works everywhere


@triton.jit
def _head_start(ptr, b, head, start, stride_b, stride_h, stride_t):
    """Pointer to token ``start`` of (batch b, head): int64, as offsets pass 2^31 at 128K tokens."""
    return ptr + b.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h + start.to(tl.int64) * stride_t


@triton.jit
def _tile_offsets(tokens, stride_t, dims):
    """Offsets of a (tokens, head dim) tile from its head's start; the head dim is contiguous."""
    return tokens[:, None].to(tl.int64) * stride_t + dims[None, :]


@triton.jit
def _key_range(m_start, len_q, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW_LEFT, WINDOW_RIGHT,
               CAUSAL: tl.constexpr):
    """[lo, hi) of keys any query of rows [m_start, m_start + BLOCK_M) can see; lo on a BLOCK_N
    boundary so the key tiles stay aligned to the sequence start."""
    offset = len_k - len_q  # bottom-right alignment: query i's diagonal is key i + offset
    lo = len_k * 0  # tensors, not Python ints: the branches below may reassign them
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(hi, m_start + BLOCK_M + offset)
    elif WINDOW_RIGHT >= 0:
        hi = tl.minimum(hi, m_start + BLOCK_M + offset + WINDOW_RIGHT)
    if WINDOW_LEFT >= 0:
        lo = tl.maximum(0, m_start + offset - WINDOW_LEFT) // BLOCK_N * BLOCK_N
    return lo, tl.maximum(hi, lo)


@triton.jit
def _inner_keys(m_start, len_q, len_k, BLOCK_M: tl.constexpr, WINDOW_LEFT, WINDOW_RIGHT, CAUSAL: tl.constexpr):
    """[first, end): the keys every query row of the tile sees (no mask needed for them)."""
    offset = len_k - len_q
    first = len_k * 0
    end = len_k
    if CAUSAL:  # the tile's first row sees the fewest keys on the right
        end = tl.minimum(end, m_start + offset + 1)
    elif WINDOW_RIGHT >= 0:
        end = tl.minimum(end, m_start + offset + WINDOW_RIGHT + 1)
    if WINDOW_LEFT >= 0:  # its last row the fewest on the left
        first = tl.maximum(first, m_start + BLOCK_M - 1 + offset - WINDOW_LEFT)
    return first, end


@triton.jit
def _query_range(n_start, len_q, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW_LEFT, WINDOW_RIGHT,
                 CAUSAL: tl.constexpr):
    """[lo, hi) of queries that see any key of [n_start, n_start + BLOCK_N) (the inverse of
    _key_range), lo on a BLOCK_M boundary; and [first, end), the queries that see all of them."""
    offset = len_k - len_q
    lo = len_q * 0
    hi = len_q
    first = len_q * 0
    end = len_q
    if CAUSAL:
        lo = tl.maximum(0, n_start - offset) // BLOCK_M * BLOCK_M
        first = n_start + BLOCK_N - 1 - offset
    elif WINDOW_RIGHT >= 0:
        lo = tl.maximum(0, n_start - offset - WINDOW_RIGHT) // BLOCK_M * BLOCK_M
        first = n_start + BLOCK_N - 1 - offset - WINDOW_RIGHT
    if WINDOW_LEFT >= 0:
        hi = tl.minimum(len_q, n_start + BLOCK_N - offset + WINDOW_LEFT)
        end = tl.minimum(end, n_start + WINDOW_LEFT - offset + 1)
    if n_start + BLOCK_N > len_k:  # the sequence's last key block is cut: every query tile masks
        end = first * 0
    return lo, tl.maximum(hi, lo), first, end


@triton.jit
def _row_stats(lse_base, delta_base, rows, len_q, CHECK_ROWS: tl.constexpr):
    """LSE (base 2) and delta of query rows, as the backward uses them."""
    if CHECK_ROWS:
        row_ok = rows < len_q
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows that saw no key: p = 0, not NaN
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:  # rows of a tile inside the band: real rows that saw keys, LSE finite
        lse = tl.load(lse_base + rows) * 1.4426950408889634
        delta = tl.load(delta_base + rows)
    return lse, delta


@triton.jit
def _scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, WINDOW_LEFT, WINDOW_RIGHT,
            CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASK: tl.constexpr):
    """Scores of a (BLOCK_M, BLOCK_N) tile in base-2 units (log2(e) folded in), -inf where hidden."""
    s = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP:
        # cap * tanh(s * scale / cap), then to base 2; qk_scale holds scale / cap here.
        s = s * qk_scale
        s = softcap * (2 * tl.sigmoid(2 * s) - 1) * 1.4426950408889634
    else:
        s = s * qk_scale
    if MASK:
        diagonal = rows[:, None] + (len_k - len_q)
        visible = (cols[None, :] < len_k) & (diagonal > -2147483647)  # full (BLOCK_M, BLOCK_N) shape
        if CAUSAL:
            visible &= cols[None, :] <= diagonal
        elif WINDOW_RIGHT >= 0:
            visible &= cols[None, :] <= diagonal + WINDOW_RIGHT
        if WINDOW_LEFT >= 0:
            visible &= cols[None, :] >= diagonal - WINDOW_LEFT
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _load_tile(base, tokens, stride_t, dims, limit, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_TOKENS: tl.constexpr):
    """A (tokens, head dim) tile; tokens at or past ``limit`` (when checked) and dims past
    HEAD_DIM read 0. Unchecked full-width tiles load with no mask at all (the band's inner
    blocks), so the compiler can issue plain vector loads."""
    ptrs = base + _tile_offsets(tokens, stride_t, dims)
    if CHECK_TOKENS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=(tokens < limit)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(tokens < limit)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(dims < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _store_tile(base, tokens, stride_t, dims, limit, value, HEAD_DIM: tl.constexpr):
    tl.store(base + _tile_offsets(tokens, stride_t, dims), value.to(base.dtype.element_ty),
             mask=(tokens < limit)[:, None] & (dims < HEAD_DIM)[None, :])


@triton.jit
def _head_tile(src, start, row0, col0, tokens, stride_t, dims, length, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, MASK: tl.constexpr, USE_TMA: tl.constexpr, ZERO_TAIL: tl.constexpr):
    """A (tokens, head dim) tile of one head (K, V, Q or dO) starting at token ``start``.

    USE_TMA: ``src`` is a tensor descriptor over (tokens, heads * D) and the copy engine moves
    the tile (no per-thread addresses, which is register room in kernels that sit at Hopper's
    limit); rows past the sequence read the next sequence's tokens, or zeros past the tensor.
    The caller's mask covers them where it can; ZERO_TAIL zeroes them where a product meets
    them anyway, so a neighbour's values (even inf) never enter the result. Otherwise ``src``
    points at this head's first token and the loads are masked.
    """
    if USE_TMA:
        tile = src.load([row0 + start, col0])
        if ZERO_TAIL:
            tile = tl.where((tokens < length)[:, None], tile, 0.0)
    else:
        tile = _load_tile(src, tokens, stride_t, dims, length, HEAD_DIM, BLOCK_D, MASK)
    return tile


@triton.jit
def _tile_sources(a_ptr, b_ptr, b, head, start, seqlen, a_sb, a_sh, a_st, b_sb, b_sh, b_st,
                  HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, USE_TMA: tl.constexpr):
    """(a source, b source, first row, first column) for _head_tile, for two tensors of one
    layout (K and V, or Q and dO): the descriptors with this sequence's first token row (the
    batch's tokens follow one another) and this head's columns, or pointers to the head's
    first token."""
    col0 = head * HEAD_DIM
    if USE_TMA:
        a_src = a_ptr
        b_src = b_ptr
        row0 = start if IS_VARLEN else b * seqlen
    else:
        a_src = _head_start(a_ptr, b, head, start, a_sb, a_sh, a_st)
        b_src = _head_start(b_ptr, b, head, start, b_sb, b_sh, b_st)
        row0 = start
    return a_src, b_src, row0, col0


@triton.jit
def _inner_blocks(lo, hi, first_inner, end_inner, BLOCK: tl.constexpr):
    """[a, b): the blocks of the loop ``range(lo, hi, BLOCK)`` lying inside [first_inner, end_inner),
    where no element needs a mask. a and b stay on the loop's grid (lo + k * BLOCK), so the
    masked stages [lo, a) and [b, hi) plus the unmasked one [a, b) visit each block once."""
    a = lo + tl.cdiv(tl.maximum(first_inner - lo, 0), BLOCK) * BLOCK
    a = tl.minimum(a, hi)
    b = a + tl.maximum(tl.minimum(end_inner, hi) - a, 0) // BLOCK * BLOCK
    return a, b


@triton.jit
def _stage_blocks(lo, inner_lo, inner_hi, hi, BLOCK: tl.constexpr, MASK: tl.constexpr):
    """(count, leading) of a stage: the unmasked one walks [inner_lo, inner_hi); the masked one
    walks both edges, [lo, inner_lo) then [inner_hi, hi), in one loop (one loop body less for
    the compiler to hold registers for); ``_stage_start`` maps a step to its block."""
    if MASK:
        # inner_lo is on the block grid, or is hi when the band has no inside: round up.
        leading = tl.cdiv(inner_lo - lo, BLOCK)
        count = leading + tl.cdiv(hi - inner_hi, BLOCK)
    else:
        leading = (inner_hi - inner_lo) // BLOCK
        count = leading
    return count, leading


@triton.jit
def _stage_start(j, lo, inner_lo, inner_hi, leading, BLOCK: tl.constexpr, MASK: tl.constexpr):
    if MASK:
        start = tl.where(j < leading, lo + j * BLOCK, inner_hi + (j - leading) * BLOCK)
    else:
        start = inner_lo + j * BLOCK
    return start


@triton.jit
def _query_block(CAUSAL: tl.constexpr):
    """This program's query block: under a causal mask the longest blocks (the last ones) are
    launched first, so the grid's tail is short blocks instead of one long straggler."""
    if CAUSAL:
        block = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        block = tl.program_id(0)
    return block


@triton.jit
def _forward_blocks(acc, m_i, l_i, q, k_src, v_src, kv_row, kv_col, k_st, v_st, rows, dims, lo, inner_lo,
                    inner_hi, hi, len_q, len_k, qk_scale, softcap, window_l, window_r, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASK: tl.constexpr,
                    BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over one stage's key blocks (see _stage_blocks)."""
    count, leading = _stage_blocks(lo, inner_lo, inner_hi, hi, BLOCK_N, MASK)
    # The edges are a block or two: no software pipeline for them (the inside keeps the launch's).
    for j in tl.range(0, count, num_stages=1 if MASK else None):
        n_start = _stage_start(j, lo, inner_lo, inner_hi, leading, BLOCK_N, MASK)
        cols = n_start + tl.arange(0, BLOCK_N)
        k = _head_tile(k_src, n_start, kv_row, kv_col, cols, k_st, dims, len_k, HEAD_DIM, BLOCK_D, MASK, USE_TMA, False)
        s = _scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                    CAUSAL, HAS_SOFTCAP, MASK)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if MASK:
            # A row that has seen only hidden keys keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new  # every score here is finite
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _head_tile(v_src, n_start, kv_row, kv_col, cols, v_st, dims, len_k, HEAD_DIM, BLOCK_D, MASK, USE_TMA, MASK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, softcap, window_left, window_right,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_st, o_sh, lse_sb, lse_sh,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """USE_TMA: k_ptr / v_ptr are tensor descriptors over (tokens, Hk * D) (see _head_tile)."""
    m_block, b, h = _query_block(CAUSAL), tl.program_id(1), tl.program_id(2)
    q_start, len_q = _sequence(cu_seqlens_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(cu_seqlens_k_ptr, b, seqlen_k, IS_VARLEN)
    m_start = m_block * BLOCK_M
    if m_start >= len_q:
        return
    kv_h = h // heads_per_kv
    rows = m_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_base = _head_start(q_ptr, b, h, q_start, q_sb, q_sh, q_st)
    k_src, v_src, kv_row, kv_col = _tile_sources(k_ptr, v_ptr, b, kv_h, k_start, seqlen_k, k_sb, k_sh, k_st, v_sb,
                                               v_sh, v_st, HEAD_DIM, IS_VARLEN, USE_TMA)
    q = _load_tile(q_base, rows, q_st, dims, len_q, HEAD_DIM, BLOCK_D, True)

    window_l = window_left if HAS_WINDOW else -1
    window_r = window_right if HAS_WINDOW else -1
    lo, hi = _key_range(m_start, len_q, len_k, BLOCK_M, BLOCK_N, window_l, window_r, CAUSAL)
    first, end = _inner_keys(m_start, len_q, len_k, BLOCK_M, window_l, window_r, CAUSAL)
    inner_lo, inner_hi = _inner_blocks(lo, hi, first, end, BLOCK_N)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Two stages: the blocks inside the band, with no mask and unmasked loads; then its edges
    # (window start, diagonal, window end, the sequence's end), which pay for the mask.
    for stage_masked in tl.static_range(2):
        acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, k_src, v_src, kv_row, kv_col, k_st, v_st, rows, dims, lo,
                                        inner_lo, inner_hi, hi, len_q, len_k, qk_scale, softcap, window_l, window_r,
                                        HEAD_DIM, BLOCK_D, CAUSAL, HAS_SOFTCAP, stage_masked == 1, BLOCK_N, USE_TMA)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # Back to natural log: lse = (m + log2 l) / log2(e).
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    _store_tile(_head_start(out_ptr, b, h, q_start, o_sb, o_sh, o_st), rows, o_st, dims, len_q, out, HEAD_DIM)
    lse_base = lse_ptr + b.to(tl.int64) * lse_sb + h.to(tl.int64) * lse_sh + q_start
    tl.store(lse_base + rows, lse, mask=rows < len_q)


@triton.jit
def _softcap_slope(s, softcap):
    """d(cap * tanh(x)) / dx = 1 - tanh(x)^2, from the capped score s (base-2 units)."""
    t = s / (softcap * 1.4426950408889634)
    t = tl.where(s == float("-inf"), 0.0, t)  # hidden keys: p = 0 there, keep 0 * slope finite
    return 1.0 - t * t


@triton.jit
def _score_grad(p, dp, delta, s, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """dL/d(q.k) of a tile: P * (dP - delta), through the softcap, times the softmax scale."""
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * _softcap_slope(s, softcap)
    return ds * sm_scale


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_src, do_src, q_row, q_col, lse_base, delta_base, q_st, do_st, cols, dims, lo,
                 inner_lo, inner_hi, hi, len_q, len_k, qk_scale, sm_scale, softcap, window_l, window_r,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 MASK: tl.constexpr, BLOCK_M: tl.constexpr, USE_TMA: tl.constexpr):
    """dK, dV of one key block from one stage's query blocks of one query head."""
    count, leading = _stage_blocks(lo, inner_lo, inner_hi, hi, BLOCK_M, MASK)
    # The edges are a block or two: no software pipeline for them (the inside keeps the launch's).
    for j in tl.range(0, count, num_stages=1 if MASK else None):
        m_start = _stage_start(j, lo, inner_lo, inner_hi, leading, BLOCK_M, MASK)
        rows = m_start + tl.arange(0, BLOCK_M)
        # Query rows past the sequence must be zero (the scores do not mask rows): then p = 1
        # there meets dO = 0 and delta = 0, and those rows add nothing to dK or dV.
        q = _head_tile(q_src, m_start, q_row, q_col, rows, q_st, dims, len_q, HEAD_DIM, BLOCK_D, MASK, USE_TMA, MASK)
        do = _head_tile(do_src, m_start, q_row, q_col, rows, do_st, dims, len_q, HEAD_DIM, BLOCK_D, MASK, USE_TMA,
                        MASK)
        lse, delta = _row_stats(lse_base, delta_base, rows, len_q, MASK)
        s = _scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                    CAUSAL, HAS_SOFTCAP, MASK)
        p = tl.exp2(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = _score_grad(p, dp, delta, s, sm_scale, softcap, HAS_SOFTCAP)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, sm_scale, softcap, window_left, window_right,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, do_sb, do_st, do_sh,
    dk_sb, dk_st, dk_sh, dv_sb, dv_st, dv_sh, lse_sb, lse_sh,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """USE_TMA: q_ptr / dout_ptr are tensor descriptors over (tokens, H * D) (see _head_tile)."""
    n_block, b, kv_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, len_q = _sequence(cu_seqlens_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(cu_seqlens_k_ptr, b, seqlen_k, IS_VARLEN)
    n_start = n_block * BLOCK_N
    if n_start >= len_k:
        return
    cols = n_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_tile(_head_start(k_ptr, b, kv_h, k_start, k_sb, k_sh, k_st), cols, k_st, dims, len_k, HEAD_DIM,
                   BLOCK_D, True)
    v = _load_tile(_head_start(v_ptr, b, kv_h, k_start, v_sb, v_sh, v_st), cols, v_st, dims, len_k, HEAD_DIM,
                   BLOCK_D, True)

    window_l = window_left if HAS_WINDOW else -1
    window_r = window_right if HAS_WINDOW else -1
    lo, hi, first, end = _query_range(n_start, len_q, len_k, BLOCK_M, BLOCK_N, window_l, window_r, CAUSAL)
    inner_lo, inner_hi = _inner_blocks(lo, hi, first, end, BLOCK_M)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # Every query head of this KV head's group adds to the same dK/dV: summed here, in a
    # fixed order, so GQA needs no atomics and the result is reproducible.
    for g in range(heads_per_kv):
        h = kv_h * heads_per_kv + g
        q_src, do_src, q_row, q_col = _tile_sources(q_ptr, dout_ptr, b, h, q_start, seqlen_q, q_sb, q_sh, q_st,
                                                    do_sb, do_sh, do_st, HEAD_DIM, IS_VARLEN, USE_TMA)
        stat = b.to(tl.int64) * lse_sb + h.to(tl.int64) * lse_sh + q_start
        for stage_masked in tl.static_range(2):  # inside the band first, then its edges
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_src, do_src, q_row, q_col, lse_ptr + stat, delta_ptr + stat, q_st,
                                  do_st, cols, dims, lo, inner_lo, inner_hi, hi, len_q, len_k, qk_scale, sm_scale,
                                  softcap, window_l, window_r, HEAD_DIM, BLOCK_D, CAUSAL, HAS_SOFTCAP,
                                  stage_masked == 1, BLOCK_M, USE_TMA)

    _store_tile(_head_start(dk_ptr, b, kv_h, k_start, dk_sb, dk_sh, dk_st), cols, dk_st, dims, len_k, dk, HEAD_DIM)
    _store_tile(_head_start(dv_ptr, b, kv_h, k_start, dv_sb, dv_sh, dv_st), cols, dv_st, dims, len_k, dv, HEAD_DIM)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_src, v_src, kv_row, kv_col, k_st, v_st, rows, dims, lo, inner_lo, inner_hi,
               hi, len_q, len_k, qk_scale, sm_scale, softcap, window_l, window_r, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """dQ of one query block from one stage's key blocks."""
    count, leading = _stage_blocks(lo, inner_lo, inner_hi, hi, BLOCK_N, MASK)
    # The edges are a block or two: no software pipeline for them (the inside keeps the launch's).
    for j in tl.range(0, count, num_stages=1 if MASK else None):
        n_start = _stage_start(j, lo, inner_lo, inner_hi, leading, BLOCK_N, MASK)
        cols = n_start + tl.arange(0, BLOCK_N)
        # Both tiles enter products with p = 0 past the sequence (dP, then ds @ K): zero their tails.
        k = _head_tile(k_src, n_start, kv_row, kv_col, cols, k_st, dims, len_k, HEAD_DIM, BLOCK_D, MASK, USE_TMA, MASK)
        v = _head_tile(v_src, n_start, kv_row, kv_col, cols, v_st, dims, len_k, HEAD_DIM, BLOCK_D, MASK, USE_TMA, MASK)
        s = _scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                    CAUSAL, HAS_SOFTCAP, MASK)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = _score_grad(p, dp, delta, s, sm_scale, softcap, HAS_SOFTCAP)
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, sm_scale, softcap, window_left, window_right,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, do_sb, do_st, do_sh, dq_sb, dq_st, dq_sh,
    lse_sb, lse_sh,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """USE_TMA: k_ptr / v_ptr are tensor descriptors over (tokens, Hk * D) (see _head_tile)."""
    m_block, b, h = _query_block(CAUSAL), tl.program_id(1), tl.program_id(2)
    q_start, len_q = _sequence(cu_seqlens_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(cu_seqlens_k_ptr, b, seqlen_k, IS_VARLEN)
    m_start = m_block * BLOCK_M
    if m_start >= len_q:
        return
    kv_h = h // heads_per_kv
    rows = m_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_tile(_head_start(q_ptr, b, h, q_start, q_sb, q_sh, q_st), rows, q_st, dims, len_q, HEAD_DIM,
                   BLOCK_D, True)
    do = _load_tile(_head_start(dout_ptr, b, h, q_start, do_sb, do_sh, do_st), rows, do_st, dims, len_q, HEAD_DIM,
                    BLOCK_D, True)
    stat = b.to(tl.int64) * lse_sb + h.to(tl.int64) * lse_sh + q_start
    lse, delta = _row_stats(lse_ptr + stat, delta_ptr + stat, rows, len_q, True)
    k_src, v_src, kv_row, kv_col = _tile_sources(k_ptr, v_ptr, b, kv_h, k_start, seqlen_k, k_sb, k_sh, k_st, v_sb,
                                               v_sh, v_st, HEAD_DIM, IS_VARLEN, USE_TMA)

    window_l = window_left if HAS_WINDOW else -1
    window_r = window_right if HAS_WINDOW else -1
    lo, hi = _key_range(m_start, len_q, len_k, BLOCK_M, BLOCK_N, window_l, window_r, CAUSAL)
    first, end = _inner_keys(m_start, len_q, len_k, BLOCK_M, window_l, window_r, CAUSAL)
    inner_lo, inner_hi = _inner_blocks(lo, hi, first, end, BLOCK_N)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for stage_masked in tl.static_range(2):  # inside the band first, then its edges
        dq = _dq_blocks(dq, q, do, lse, delta, k_src, v_src, kv_row, kv_col, k_st, v_st, rows, dims, lo, inner_lo,
                        inner_hi, hi, len_q, len_k, qk_scale, sm_scale, softcap, window_l, window_r, HEAD_DIM,
                        BLOCK_D, CAUSAL, HAS_SOFTCAP, stage_masked == 1, BLOCK_N, USE_TMA)
    _store_tile(_head_start(dq_ptr, b, h, q_start, dq_sb, dq_sh, dq_st), rows, dq_st, dims, len_q, dq, HEAD_DIM)


@triton.jit
def attention_backward_delta_kernel(
    out_ptr, dout_ptr, grad_lse_ptr, delta_ptr, tokens, seqlen,
    o_st, o_sh, do_st, do_sh, g_sb, g_sh, g_st, d_sb, d_sh,
    HEAD_DIM: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) (minus the LSE's own gradient), in the LSE's layout.

    Tokens are numbered across the batch (dense: b * seqlen + s; varlen: the packed index
    with seqlen = total), so one kernel serves both layouts; out/dout are addressed per
    token (dense (B, S) rows have a uniform stride once B and S are merged).
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    t_ok = t < tokens
    dims = tl.arange(0, BLOCK_D)
    o = _load_tile(out_ptr + h * o_sh, t, o_st, dims, tokens, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(dout_ptr + h * do_sh, t, do_st, dims, tokens, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    b = (t // seqlen).to(tl.int64)
    s = (t % seqlen).to(tl.int64)
    if HAS_GRAD_LSE:
        delta -= tl.load(grad_lse_ptr + b * g_sb + h * g_sh + s * g_st, mask=t_ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + b * d_sb + h * d_sh + s, delta, mask=t_ok)


# ------------------------------------------------------------------------------ launchers

# Built-in (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim: what a launch uses where no
# tuned table covers the GPU (kernels/tuned/, see kernels/tuning.py; on Hopper the sm90 table
# measured on an H200 takes precedence). They were picked to compile for sm_90 without
# spilling, not by measurement: on the H200 the tuned tiles ran up to 3.6x faster.
_FORWARD_TILES = {32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 80: (128, 32, 8, 2), 96: (128, 32, 8, 2),
                  128: (128, 32, 8, 2), 192: (64, 16, 8, 1), 256: (64, 16, 8, 1)}
# With K/V loaded by TMA (power-of-two head dims) the copy engine holds no per-thread addresses,
# which buys D 128 twice the keys per tile (64 instead of 32) and a 3-deep pipeline.
_FORWARD_TMA_TILES = {**_FORWARD_TILES, 128: (64, 64, 4, 3)}
_DKDV_TILES = {32: (64, 64, 4, 2), 64: (32, 64, 8, 1), 80: (32, 64, 8, 1), 96: (32, 64, 8, 1),
               128: (32, 64, 8, 1), 192: (32, 32, 8, 1), 256: (32, 32, 8, 1)}
_DQ_TILES = {32: (64, 64, 4, 2), 64: (64, 32, 8, 1), 80: (64, 16, 8, 1), 96: (64, 16, 8, 1),
             128: (64, 16, 8, 1), 192: (32, 16, 8, 1), 256: (32, 16, 8, 1)}
# TMA-fed K/V free the dQ kernel's address registers: 64-key tiles and a 2-deep pipeline at D 64-128.
_DQ_TMA_TILES = {**_DQ_TILES, 64: (64, 64, 8, 2), 128: (64, 64, 8, 2)}
# The dK/dV kernel loads Q and dO by TMA up to D 128; at D 256 the descriptor path spills (8-16 B
# in the Hopper check) where the pointer path does not.
DKDV_TMA_MAX_HEAD_DIM = 128

# The tunable kernels: name -> (kernel, defaults without TMA, defaults with TMA, largest TMA head dim).
_TILE_PARAMS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
TUNABLE = {
    "attention_forward": (attention_forward_kernel, _FORWARD_TILES, _FORWARD_TMA_TILES, HEAD_DIMS[-1]),
    "attention_backward_dkdv": (attention_backward_dkdv_kernel, _DKDV_TILES, _DKDV_TILES, DKDV_TMA_MAX_HEAD_DIM),
    "attention_backward_dq": (attention_backward_dq_kernel, _DQ_TILES, _DQ_TMA_TILES, HEAD_DIMS[-1]),
}
for _name in TUNABLE:
    tuning.declare(_name, _TILE_PARAMS)

# Short query ranges (decode-like calls, Sq <= 64) take 64-row forward tiles: a 128-row tile
# would be half padding. One warpgroup up to D 64; beyond, two (on 64 rows the second splits
# the head dim), as one would spill with the pointer loads.
SHORT_QUERIES = 64


def tile_key(head_dim: int, tma: bool) -> str:
    """The tuned-table key of a launch: the head-dim bucket and the load path."""
    return f"D={_tile_key(head_dim)}" + (",tma" if tma else "")


def default_tiles(kernel: str, head_dim: int, tma: bool) -> dict:
    _, plain, with_tma, _ = TUNABLE[kernel]
    return tuning.as_dict(kernel, (with_tma if tma else plain)[_tile_key(head_dim)])


def _launch_tiles(kernel: str, head_dim: int, tma: bool, run, device):
    """run(BLOCK_M, BLOCK_N, num_warps, num_stages) with the tiles of the device's tuned table
    (or the built-in ones): see kernels/tuning.py."""
    return tuning.launch(kernel, tile_key(head_dim, tma), default_tiles(kernel, head_dim, tma), device,
                         lambda tiles: run(*tuning.as_tuple(kernel, tiles)))


def _short_query_tiles(tiles, head_dim: int, max_seqlen_q: int):
    """The forward's tiles for a call: 64 query rows when the queries are that few."""
    block_m, block_n, warps, stages = tiles
    if max_seqlen_q <= SHORT_QUERIES and block_m > SHORT_QUERIES:
        return SHORT_QUERIES, block_n, 4 if head_dim <= 64 else 8, stages
    return block_m, block_n, warps, stages


def _tile_key(head_dim: int) -> int:
    """The smallest supported head dim >= head_dim (its tiles and BLOCK_D fit)."""
    for supported in HEAD_DIMS:
        if head_dim <= supported:
            return supported
    raise ValueError(f"head dim {head_dim} is above the supported maximum {HEAD_DIMS[-1]}")


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _strides(t, varlen):
    """(batch, token, head) strides; varlen sequences share one token axis (batch stride 0)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _scales(softmax_scale, softcap):
    """qk_scale turns q.k into base-2 scores (or into tanh's argument under a softcap)."""
    return (softmax_scale / softcap) if softcap > 0 else softmax_scale * LOG2E


def _flags(causal, window_size, softcap, varlen):
    left, right = window_size
    return {"IS_VARLEN": varlen, "CAUSAL": causal, "HAS_WINDOW": left >= 0 or (right >= 0 and not causal),
            "HAS_SOFTCAP": softcap > 0}


def forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            softmax_scale, causal, window_size, softcap):
    """Fill ``out`` (like q) and ``lse`` (B, H, Sq) / (H, total_q). Dense when cu_seqlens_q is None."""
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    heads, head_dim = q.shape[-2], q.shape[-1]
    if max_seqlen_q == 0 or batch == 0:
        return
    tma = _tma_eligible(k, v, varlen)

    def run(block_m, block_n, warps, stages):
        block_m, block_n, warps, stages = _short_query_tiles((block_m, block_n, warps, stages), head_dim,
                                                             max_seqlen_q)
        k_arg, v_arg = _descriptors(k, v, varlen, block_n) if tma else (k, v)
        grid = (triton.cdiv(max_seqlen_q, block_m), batch, heads)
        attention_forward_kernel[grid](
            q, k_arg, v_arg, out, lse, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, heads // k.shape[-2], _scales(softmax_scale, softcap), softcap,
            window_size[0], window_size[1],
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
            *_lse_strides(lse, varlen),
            HEAD_DIM=head_dim, **_flags(causal, window_size, softcap, varlen),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim), USE_TMA=tma,
            num_warps=warps, num_stages=stages,
        )

    _launch_tiles("attention_forward", head_dim, tma, run, q.device)


def _tma_available(device: torch.device) -> bool:
    """Hopper or newer (the copy engine), or the CPU interpreter (which emulates descriptors, so
    the tests run the TMA path); ``DOCQA_FAST_ATTENTION_TMA=0`` turns it off."""
    if TensorDescriptor is None or os.environ.get("DOCQA_FAST_ATTENTION_TMA", "1") == "0":
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tma_head_dim(head_dim: int, max_head_dim: int = HEAD_DIMS[-1]) -> bool:
    """Head dims a TMA tile covers exactly (powers of two), up to a kernel's own limit."""
    return head_dim == _block_d(head_dim) and head_dim <= max_head_dim


def _tma_eligible(a, b, varlen, max_head_dim: int = HEAD_DIMS[-1]) -> bool:
    """Whether two tensors of one layout (K and V, or Q and dO) can be read through TMA
    descriptors over their (tokens, heads * D) matrices. Not for a head dim that is not a power
    of two (the tile would run into the next head's columns; the masked loads handle those), a
    layout whose heads or batch rows do not tile one matrix, or what the copy engine refuses
    (16-byte aligned base and row stride)."""
    head_dim = a.shape[-1]
    if not _tma_head_dim(head_dim, max_head_dim) or not _tma_available(a.device):
        return False
    if (a.shape[0] if varlen else a.shape[0] * a.shape[1]) == 0:
        return False
    for t in (a, b):
        token_stride = t.stride(-3)
        merged = varlen or t.shape[0] == 1 or t.stride(0) == t.shape[1] * token_stride
        # A row stride below the row's width (possible for a single token) may be refused by the encoder.
        if not (merged and t.stride(-1) == 1 and t.stride(-2) == head_dim and t.data_ptr() % 16 == 0
                and token_stride >= t.shape[-2] * head_dim and token_stride * t.element_size() % 16 == 0):
            return False
    return True


def _descriptors(a, b, varlen, block_rows):
    """TMA descriptors over two _tma_eligible tensors, with (block_rows, D) tiles."""
    tokens = a.shape[0] if varlen else a.shape[0] * a.shape[1]
    return tuple(TensorDescriptor(t, [tokens, t.shape[-2] * t.shape[-1]], [t.stride(-3), 1],
                                  [block_rows, t.shape[-1]]) for t in (a, b))


def _delta_block_t(head_dim: int) -> int:
    """Tokens per delta program: two (tokens, BLOCK_D) tiles at 32 values a thread (4 warps)."""
    return max(16, 4096 // _block_d(head_dim))


def _delta(dout, out, lse, grad_lse, varlen):
    """delta_i = rowsum(dO_i * O_i) - dlse_i, fp32 with the LSE's shape and strides (the dK/dV
    and dQ kernels address both with the same offsets)."""
    delta = torch.empty_like(lse)
    heads, head_dim = out.shape[-2], out.shape[-1]
    flat_out, flat_dout = out.reshape(-1, heads, head_dim), dout.reshape(-1, heads, head_dim)
    tokens = flat_out.shape[0]
    if tokens == 0:
        return delta
    seqlen = tokens if varlen else out.shape[1]
    g = grad_lse if grad_lse is not None else lse  # a placeholder pointer when there is no LSE gradient
    g_strides = (0, g.stride(0), g.stride(1)) if varlen else (g.stride(0), g.stride(1), g.stride(2))
    block_t = _delta_block_t(head_dim)
    attention_backward_delta_kernel[(triton.cdiv(tokens, block_t), heads)](
        flat_out, flat_dout, g, delta, tokens, seqlen, flat_out.stride(0), flat_out.stride(1),
        flat_dout.stride(0), flat_dout.stride(1), *g_strides, *_lse_strides(delta, varlen),
        HEAD_DIM=head_dim, HAS_GRAD_LSE=grad_lse is not None, BLOCK_T=block_t, BLOCK_D=_block_d(head_dim),
    )
    return delta


def backward(dout, q, k, v, out, lse, grad_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             softmax_scale, causal, window_size, softcap):
    """Fill dq, dk, dv (shaped like q, k, v). Deterministic: no atomics anywhere.

    ``grad_lse`` (like lse, or None) is the LSE's own gradient: dL/ds_ij = p_ij (dP_ij - delta_i)
    + p_ij dlse_i, so it enters as delta_i - dlse_i and the kernels need nothing more.
    """
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if batch == 0:
        return
    if max_seqlen_k == 0 or max_seqlen_q == 0:  # nothing attends: dq is 0, and so are dk, dv
        dq.zero_(), dk.zero_(), dv.zero_()
        return
    lse = lse.contiguous()  # the kernels address delta (allocated like it) with the LSE's strides
    delta = _delta(dout, out, lse, grad_lse, varlen)
    common = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads // kv_heads,
              _scales(softmax_scale, softcap), softmax_scale, softcap, window_size[0], window_size[1])
    flags = dict(HEAD_DIM=head_dim, **_flags(causal, window_size, softcap, varlen), BLOCK_D=_block_d(head_dim))
    lse_strides = _lse_strides(lse, varlen)
    dkdv_tma = _tma_eligible(q, dout, varlen, DKDV_TMA_MAX_HEAD_DIM)
    dq_tma = _tma_eligible(k, v, varlen)

    def run_dkdv(block_m, block_n, warps, stages):
        q_arg, dout_arg = _descriptors(q, dout, varlen, block_m) if dkdv_tma else (q, dout)
        attention_backward_dkdv_kernel[(triton.cdiv(max_seqlen_k, block_n), batch, kv_heads)](
            q_arg, k, v, dout_arg, lse, delta, dk, dv, *common,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
            *_strides(dk, varlen), *_strides(dv, varlen), *lse_strides, **flags,
            BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=dkdv_tma, num_warps=warps, num_stages=stages,
        )

    def run_dq(block_m, block_n, warps, stages):
        k_arg, v_arg = _descriptors(k, v, varlen, block_n) if dq_tma else (k, v)
        attention_backward_dq_kernel[(triton.cdiv(max_seqlen_q, block_m), batch, heads)](
            q, k_arg, v_arg, dout, lse, delta, dq, *common,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
            *_strides(dq, varlen), *lse_strides, **flags,
            BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=dq_tma, num_warps=warps, num_stages=stages,
        )

    _launch_tiles("attention_backward_dkdv", head_dim, dkdv_tma, run_dkdv, q.device)
    _launch_tiles("attention_backward_dq", head_dim, dq_tma, run_dq, q.device)


def _tile_variants(kernel, head_dim):
    """(name suffix, tiles, USE_TMA) for every way the launchers can launch ``kernel`` at
    ``head_dim``: the built-in tiles and those of every sm90 tuned table, by load path (and for
    the forward, narrowed for short query ranges)."""
    name = kernel.__name__.removesuffix("_kernel")
    max_tma_head_dim = TUNABLE[name][3]
    for tma in (False, True) if _tma_head_dim(head_dim, max_tma_head_dim) else (False,):
        key = tile_key(head_dim, tma)
        choices = [default_tiles(name, head_dim, tma)]
        choices += [t for t in tuning.tables_choices(name, key) if t not in choices]
        seen = set()
        for tiles in choices:
            variants = [tuning.as_tuple(name, tiles)]
            if kernel is attention_forward_kernel:
                variants.append(_short_query_tiles(variants[0], head_dim, SHORT_QUERIES))
            for block_m, block_n, warps, stages in variants:
                if (block_m, block_n, warps, stages) not in seen:
                    seen.add((block_m, block_n, warps, stages))
                    yield (",tma" if tma else "") + f",M{block_m}N{block_n}w{warps}s{stages}", \
                        (block_m, block_n, warps, stages), tma


def _configs():
    """Every tile the launchers pick (head dim x dtype x TMA or not), with two flag sets per tile:
    plain (dense, no mask options) and the heaviest (varlen + causal + window + softcap)."""
    flag_sets = {
        "plain": {"IS_VARLEN": False, "CAUSAL": False, "HAS_WINDOW": False, "HAS_SOFTCAP": False},
        "all_options": {"IS_VARLEN": True, "CAUSAL": True, "HAS_WINDOW": True, "HAS_SOFTCAP": True},
    }
    kernels = (
        (attention_forward_kernel, ("q", "k", "v", "out"), (), ("q", "k", "v", "o")),
        (attention_backward_dkdv_kernel, ("q", "k", "v", "dout", "dk", "dv"), ("sm_scale",),
         ("q", "k", "v", "do", "dk", "dv")),
        (attention_backward_dq_kernel, ("q", "k", "v", "dout", "dq"), ("sm_scale",), ("q", "k", "v", "do", "dq")),
    )
    for dtype in (torch.float16, torch.bfloat16):
        ptr = pointer_type(dtype)
        for head_dim, (flags_name, flags), (kernel, tensors, extra_floats, stride_groups) in itertools.product(
                HEAD_DIMS, flag_sets.items(), kernels):
            if flags_name == "all_options" and dtype == torch.float16:
                continue  # same code as bf16's; one dtype suffices for the option-heavy variant
            signature = {f"{t}_ptr": ptr for t in tensors}
            signature["lse_ptr"] = "*fp32"
            if kernel is not attention_forward_kernel:
                signature["delta_ptr"] = "*fp32"
            signature.update({"cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32", "seqlen_q": "i32",
                              "seqlen_k": "i32", "heads_per_kv": "i32", "qk_scale": "fp32"})
            signature.update({name: "fp32" for name in extra_floats})
            signature.update({"softcap": "fp32", "window_left": "i32", "window_right": "i32"})
            for group in stride_groups:
                signature.update({f"{group}_{axis}": "i64" for axis in ("sb", "st", "sh")})
            signature.update({"lse_sb": "i64", "lse_sh": "i64"})
            for suffix, (block_m, block_n, warps, stages), use_tma in _tile_variants(kernel, head_dim):
                variant = dict(signature)
                constexprs = {"HEAD_DIM": head_dim, **flags, "BLOCK_M": block_m, "BLOCK_N": block_n,
                              "BLOCK_D": _block_d(head_dim)}
                constexprs["USE_TMA"] = use_tma
                if use_tma and kernel is attention_backward_dkdv_kernel:  # Q and dO by TMA, query-block rows
                    variant.update({name: f"tensordesc<{ptr[1:]}[{block_m}, {head_dim}]>"
                                    for name in ("q_ptr", "dout_ptr")})
                elif use_tma:  # K and V by TMA, key-block rows
                    variant.update({name: f"tensordesc<{ptr[1:]}[{block_n}, {head_dim}]>" for name in ("k_ptr", "v_ptr")})
                variant.update({name: "constexpr" for name in constexprs})
                order = kernel.arg_names  # the kernel's own argument order
                yield KernelConfig(
                    name=f"{kernel.__name__.removesuffix('_kernel')}[{ptr[1:]},D={head_dim},{flags_name}{suffix}]",
                    fn=kernel, signature={name: variant[name] for name in order}, constexprs=constexprs,
                    num_warps=warps, num_stages=stages, uses_tensor_cores=True, uses_tma=bool(use_tma),
                    divisible_by_16=tuple(n for n in order if n.endswith(("_st", "_sh"))
                                          or (n.endswith("_ptr") and variant[n].startswith("*"))),
                )


def _delta_configs():
    """The delta kernel per head dim and dtype, with and without an LSE gradient."""
    for dtype in (torch.float16, torch.bfloat16):
        ptr = pointer_type(dtype)
        for head_dim in HEAD_DIMS:
            for has_grad_lse in (False, True):
                constexprs = {"HEAD_DIM": head_dim, "HAS_GRAD_LSE": has_grad_lse,
                              "BLOCK_T": _delta_block_t(head_dim), "BLOCK_D": _block_d(head_dim)}
                signature = {"out_ptr": ptr, "dout_ptr": ptr, "grad_lse_ptr": "*fp32", "delta_ptr": "*fp32",
                             "tokens": "i32", "seqlen": "i32"}
                signature.update({name: "i64" for name in ("o_st", "o_sh", "do_st", "do_sh", "g_sb", "g_sh",
                                                           "g_st", "d_sb", "d_sh")})
                signature.update({name: "constexpr" for name in constexprs})
                yield KernelConfig(
                    name=f"attention_backward_delta[{ptr[1:]},D={head_dim},grad_lse={has_grad_lse}]",
                    fn=attention_backward_delta_kernel, signature=signature, constexprs=constexprs, num_warps=4,
                    num_stages=1, divisible_by_16=("out_ptr", "dout_ptr", "grad_lse_ptr", "delta_ptr", "o_st",
                                                   "do_st", "o_sh", "do_sh"),
                )


register(_configs())
register(_delta_configs())

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
band are never visited (the loop bounds are computed per block); head dims that are not
powers of two (80, 96, 192) are masked, not padded by a copy. Every visited block applies
the mask (MASK=True): splitting off the blocks fully inside the band into an unmasked
stage is left for GPU tuning. The backward is the FlashAttention-2 split: one kernel
per KV block accumulating dK/dV over every query head of its group (no atomics, so the
gradients are bitwise reproducible), one kernel per query block for dQ.
"""

import torch
import triton
import triton.language as tl

from .registry import KernelConfig, pointer_type, register

LOG2E = 1.4426950408889634
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
def _key_range(m_start, len_q, len_k, BLOCK_M: tl.constexpr, WINDOW_LEFT, WINDOW_RIGHT, CAUSAL: tl.constexpr):
    """[lo, hi) of keys any query of rows [m_start, m_start + BLOCK_M) can see."""
    offset = len_k - len_q  # bottom-right alignment: query i's diagonal is key i + offset
    lo = len_k * 0  # tensors, not Python ints: the branches below may reassign them
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(hi, m_start + BLOCK_M + offset)
    elif WINDOW_RIGHT >= 0:
        hi = tl.minimum(hi, m_start + BLOCK_M + offset + WINDOW_RIGHT)
    if WINDOW_LEFT >= 0:
        lo = tl.maximum(0, m_start + offset - WINDOW_LEFT)
    return lo, tl.maximum(hi, lo)


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
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, softcap, window_left, window_right,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_st, o_sh, lse_sb, lse_sh,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    m_block, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, len_q = _sequence(cu_seqlens_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(cu_seqlens_k_ptr, b, seqlen_k, IS_VARLEN)
    m_start = m_block * BLOCK_M
    if m_start >= len_q:
        return
    kv_h = h // heads_per_kv
    rows = m_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_base = _head_start(q_ptr, b, h, q_start, q_sb, q_sh, q_st)
    k_base = _head_start(k_ptr, b, kv_h, k_start, k_sb, k_sh, k_st)
    v_base = _head_start(v_ptr, b, kv_h, k_start, v_sb, v_sh, v_st)
    q = tl.load(q_base + _tile_offsets(rows, q_st, dims),
                mask=(rows < len_q)[:, None] & dim_ok[None, :], other=0.0)

    window_l = window_left if HAS_WINDOW else -1
    window_r = window_right if HAS_WINDOW else -1
    lo, hi = _key_range(m_start, len_q, len_k, BLOCK_M, window_l, window_r, CAUSAL)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        kv_mask = (cols < len_k)[:, None] & dim_ok[None, :]
        k = tl.load(k_base + _tile_offsets(cols, k_st, dims), mask=kv_mask, other=0.0)
        s = _scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                    CAUSAL, HAS_SOFTCAP, True)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only hidden keys keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + _tile_offsets(cols, v_st, dims), mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # Back to natural log: lse = (m + log2 l) / log2(e).
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row_ok = rows < len_q
    o_base = _head_start(out_ptr, b, h, q_start, o_sb, o_sh, o_st)
    tl.store(o_base + _tile_offsets(rows, o_st, dims), out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    lse_base = lse_ptr + b.to(tl.int64) * lse_sb + h.to(tl.int64) * lse_sh + q_start
    tl.store(lse_base + rows, lse, mask=row_ok)


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
def attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, sm_scale, softcap, window_left, window_right,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, do_sb, do_st, do_sh,
    dk_sb, dk_st, dk_sh, dv_sb, dv_st, dv_sh, lse_sb, lse_sh,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n_block, b, kv_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, len_q = _sequence(cu_seqlens_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(cu_seqlens_k_ptr, b, seqlen_k, IS_VARLEN)
    n_start = n_block * BLOCK_N
    if n_start >= len_k:
        return
    cols = n_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    kv_mask = (cols < len_k)[:, None] & dim_ok[None, :]
    k_base = _head_start(k_ptr, b, kv_h, k_start, k_sb, k_sh, k_st)
    v_base = _head_start(v_ptr, b, kv_h, k_start, v_sb, v_sh, v_st)
    k = tl.load(k_base + _tile_offsets(cols, k_st, dims), mask=kv_mask, other=0.0)
    v = tl.load(v_base + _tile_offsets(cols, v_st, dims), mask=kv_mask, other=0.0)

    # Queries that can see any key of this block (the key range of _key_range, inverted).
    window_l = window_left if HAS_WINDOW else -1
    window_r = window_right if HAS_WINDOW else -1
    offset = len_k - len_q
    q_lo = len_q * 0
    q_hi = len_q
    if CAUSAL:
        q_lo = tl.maximum(0, n_start - offset)
    elif window_r >= 0:
        q_lo = tl.maximum(0, n_start - offset - window_r)
    if window_l >= 0:
        q_hi = tl.minimum(len_q, n_start + BLOCK_N - offset + window_l)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # Every query head of this KV head's group adds to the same dK/dV: summed here, in a
    # fixed order, so GQA needs no atomics and the result is reproducible.
    for g in range(heads_per_kv):
        h = kv_h * heads_per_kv + g
        q_base = _head_start(q_ptr, b, h, q_start, q_sb, q_sh, q_st)
        do_base = _head_start(dout_ptr, b, h, q_start, do_sb, do_sh, do_st)
        stat_base = b.to(tl.int64) * lse_sb + h.to(tl.int64) * lse_sh + q_start
        for m_start in range(q_lo, q_hi, BLOCK_M):
            rows = m_start + tl.arange(0, BLOCK_M)
            row_ok = rows < len_q
            q_mask = row_ok[:, None] & dim_ok[None, :]
            q = tl.load(q_base + _tile_offsets(rows, q_st, dims), mask=q_mask, other=0.0)
            do = tl.load(do_base + _tile_offsets(rows, do_st, dims), mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + stat_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows that saw no key: p = 0, not NaN
            delta = tl.load(delta_ptr + stat_base + rows, mask=row_ok, other=0.0)
            s = _scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                        CAUSAL, HAS_SOFTCAP, True)
            p = tl.exp2(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = _score_grad(p, dp, delta, s, sm_scale, softcap, HAS_SOFTCAP)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)

    dk_base = _head_start(dk_ptr, b, kv_h, k_start, dk_sb, dk_sh, dk_st)
    dv_base = _head_start(dv_ptr, b, kv_h, k_start, dv_sb, dv_sh, dv_st)
    tl.store(dk_base + _tile_offsets(cols, dk_st, dims), dk.to(dk_ptr.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_base + _tile_offsets(cols, dv_st, dims), dv.to(dv_ptr.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, sm_scale, softcap, window_left, window_right,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, do_sb, do_st, do_sh, dq_sb, dq_st, dq_sh,
    lse_sb, lse_sh,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    m_block, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start, len_q = _sequence(cu_seqlens_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(cu_seqlens_k_ptr, b, seqlen_k, IS_VARLEN)
    m_start = m_block * BLOCK_M
    if m_start >= len_q:
        return
    kv_h = h // heads_per_kv
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q_base = _head_start(q_ptr, b, h, q_start, q_sb, q_sh, q_st)
    do_base = _head_start(dout_ptr, b, h, q_start, do_sb, do_sh, do_st)
    k_base = _head_start(k_ptr, b, kv_h, k_start, k_sb, k_sh, k_st)
    v_base = _head_start(v_ptr, b, kv_h, k_start, v_sb, v_sh, v_st)
    q = tl.load(q_base + _tile_offsets(rows, q_st, dims), mask=q_mask, other=0.0)
    do = tl.load(do_base + _tile_offsets(rows, do_st, dims), mask=q_mask, other=0.0)
    stat_base = b.to(tl.int64) * lse_sb + h.to(tl.int64) * lse_sh + q_start
    lse = tl.load(lse_ptr + stat_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(delta_ptr + stat_base + rows, mask=row_ok, other=0.0)

    window_l = window_left if HAS_WINDOW else -1
    window_r = window_right if HAS_WINDOW else -1
    lo, hi = _key_range(m_start, len_q, len_k, BLOCK_M, window_l, window_r, CAUSAL)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n_start in range(lo, hi, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        kv_mask = (cols < len_k)[:, None] & dim_ok[None, :]
        k = tl.load(k_base + _tile_offsets(cols, k_st, dims), mask=kv_mask, other=0.0)
        v = tl.load(v_base + _tile_offsets(cols, v_st, dims), mask=kv_mask, other=0.0)
        s = _scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                    CAUSAL, HAS_SOFTCAP, True)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = _score_grad(p, dp, delta, s, sm_scale, softcap, HAS_SOFTCAP)
        dq += tl.dot(ds.to(k.dtype), k)
    dq_base = _head_start(dq_ptr, b, h, q_start, dq_sb, dq_sh, dq_st)
    tl.store(dq_base + _tile_offsets(rows, dq_st, dims), dq.to(dq_ptr.dtype.element_ty),
             mask=q_mask)


# ------------------------------------------------------------------------------ launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim, picked so that every config compiles
# for sm_90 without spilling (tests/test_hopper_compile.py): wide query tiles in the forward
# while the accumulator fits, narrower tiles and 8 warps in the backward, whose dK/dV kernel
# holds two accumulators plus K and V. Measured speed on a GPU may move these.
_FORWARD_TILES = {32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 80: (128, 64, 8, 2), 96: (128, 64, 8, 2),
                  128: (128, 64, 8, 2), 192: (64, 32, 8, 1), 256: (64, 32, 8, 1)}
_DKDV_TILES = {32: (64, 64, 4, 2), 64: (32, 64, 8, 1), 80: (32, 64, 8, 1), 96: (32, 64, 8, 1),
               128: (32, 64, 8, 1), 192: (32, 32, 8, 1), 256: (32, 32, 8, 1)}
_DQ_TILES = {32: (64, 64, 4, 2), 64: (64, 32, 8, 1), 80: (64, 32, 8, 1), 96: (64, 32, 8, 1),
             128: (64, 32, 8, 1), 192: (32, 32, 8, 1), 256: (32, 32, 8, 1)}


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
    block_m, block_n, warps, stages = _FORWARD_TILES[_tile_key(head_dim)]
    grid = (triton.cdiv(max_seqlen_q, block_m), batch, heads)
    if grid[0] == 0 or batch == 0:
        return
    attention_forward_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, heads // k.shape[-2], _scales(softmax_scale, softcap), softcap,
        window_size[0], window_size[1],
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        *_lse_strides(lse, varlen),
        HEAD_DIM=head_dim, **_flags(causal, window_size, softcap, varlen),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim), num_warps=warps, num_stages=stages,
    )


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
    # delta_i = rowsum(dO_i * O_i), in the LSE's layout: one pass in PyTorch.
    delta = (dout.float() * out.float()).sum(-1)
    delta = (delta.t() if varlen else delta.transpose(1, 2)).contiguous()
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    common = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads // kv_heads,
              _scales(softmax_scale, softcap), softmax_scale, softcap, window_size[0], window_size[1])

    def meta(tiles):
        block_m, block_n, warps, stages = tiles[_tile_key(head_dim)]
        return dict(HEAD_DIM=head_dim, **_flags(causal, window_size, softcap, varlen), BLOCK_M=block_m,
                    BLOCK_N=block_n, BLOCK_D=_block_d(head_dim), num_warps=warps, num_stages=stages)

    dkdv_meta, dq_meta = meta(_DKDV_TILES), meta(_DQ_TILES)
    lse_strides = _lse_strides(lse, varlen)
    if max_seqlen_k == 0 or max_seqlen_q == 0:  # nothing attends: dq is 0, and so are dk, dv
        dq.zero_(), dk.zero_(), dv.zero_()
        return
    attention_backward_dkdv_kernel[(triton.cdiv(max_seqlen_k, dkdv_meta["BLOCK_N"]), batch, kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, *common,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
        *_strides(dk, varlen), *_strides(dv, varlen), *lse_strides, **dkdv_meta,
    )
    attention_backward_dq_kernel[(triton.cdiv(max_seqlen_q, dq_meta["BLOCK_M"]), batch, heads)](
        q, k, v, dout, lse, delta, dq, *common,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
        *_strides(dq, varlen), *lse_strides, **dq_meta,
    )


def _configs():
    """Every tile the launchers pick (head dim x dtype), with two flag sets per tile: plain
    (dense, no mask options) and the heaviest (varlen + causal + window + softcap)."""
    flag_sets = {
        "plain": {"IS_VARLEN": False, "CAUSAL": False, "HAS_WINDOW": False, "HAS_SOFTCAP": False},
        "all_options": {"IS_VARLEN": True, "CAUSAL": True, "HAS_WINDOW": True, "HAS_SOFTCAP": True},
    }
    scalar_args = ("seqlen_q", "seqlen_k", "heads_per_kv")
    float_args = ("qk_scale", "softcap")
    for dtype in (torch.float16, torch.bfloat16):
        ptr = pointer_type(dtype)
        for head_dim in HEAD_DIMS:
            for flags_name, flags in flag_sets.items():
                if flags_name == "all_options" and dtype == torch.float16:
                    continue  # same code as bf16's; one dtype suffices for the option-heavy variant
                for kernel, tiles, tensors, extra_floats, stride_groups in (
                    (attention_forward_kernel, _FORWARD_TILES, ("q", "k", "v", "out"), (), ("q", "k", "v", "o")),
                    (attention_backward_dkdv_kernel, _DKDV_TILES, ("q", "k", "v", "dout", "dk", "dv"),
                     ("sm_scale",), ("q", "k", "v", "do", "dk", "dv")),
                    (attention_backward_dq_kernel, _DQ_TILES, ("q", "k", "v", "dout", "dq"),
                     ("sm_scale",), ("q", "k", "v", "do", "dq")),
                ):
                    block_m, block_n, warps, stages = tiles[head_dim]
                    signature = {f"{t}_ptr": ptr for t in tensors}
                    signature["lse_ptr"] = "*fp32"
                    if kernel is not attention_forward_kernel:
                        signature["delta_ptr"] = "*fp32"
                    signature.update({"cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32"})
                    signature.update({name: "i32" for name in scalar_args})
                    signature["qk_scale"] = "fp32"
                    signature.update({name: "fp32" for name in extra_floats})
                    signature.update({"softcap": "fp32", "window_left": "i32", "window_right": "i32"})
                    for group in stride_groups:
                        signature.update({f"{group}_{axis}": "i64" for axis in ("sb", "st", "sh")})
                    signature.update({"lse_sb": "i64", "lse_sh": "i64"})
                    constexprs = {"HEAD_DIM": head_dim, **flags, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                  "BLOCK_D": _block_d(head_dim)}
                    signature.update({name: "constexpr" for name in constexprs})
                    # Reorder to the kernel's own argument order.
                    order = kernel.arg_names
                    yield KernelConfig(
                        name=f"{kernel.__name__.removesuffix('_kernel')}[{ptr[1:]},D={head_dim},{flags_name}]",
                        fn=kernel, signature={name: signature[name] for name in order}, constexprs=constexprs,
                        num_warps=warps, num_stages=stages, uses_tensor_cores=True,
                        divisible_by_16=tuple(n for n in order if n.endswith("_ptr") or n.endswith("_st")
                                              or n.endswith("_sh")),
                    )


register(_configs())

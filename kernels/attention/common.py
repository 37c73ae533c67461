"""Triton helpers shared by the training kernels (:mod:`.training`) and the inference kernels
(:mod:`docqa_fast.kernels.inference`): one definition of a sequence's bounds, of the score tile
and its mask, of the online-softmax step, and of the host-side head-dim and scale rules, so both
apply flash-attn 2's semantics the same way.

Semantics (docqa_fast/reference/attention.py is the oracle): GQA (query head h reads KV head
h // (H / Hk)), causal and sliding windows aligned bottom-right (query i sees keys
[i + Sk - Sq - left, i + Sk - Sq + right]), softcap ``cap * tanh(s / cap)``. Scores are taken
in base 2 with the softmax scale and log2(e) folded into one multiplier (exp2 is one
instruction).
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Head dims with their own tiles; others take the next one up (masked to the next power of two).
HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256)


@triton.jit
def sequence(cu_seqlens_ptr, b, fixed_len, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence b: from cu_seqlens, or (0, fixed_len) for dense."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens_ptr + b)
        return start, tl.load(cu_seqlens_ptr + b + 1) - start
    return b * 0, fixed_len  # a tensor zero (not a Python 0) so .to(tl.int64) works everywhere



@triton.jit
def scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, WINDOW_LEFT, WINDOW_RIGHT,
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
def online_softmax(s, m_i, l_i, MASK: tl.constexpr):
    """One key tile of the online softmax, before its values: (new running max, the tile's weights
    p = exp2(s - max), alpha = exp2(old max - new max), new running sum). The caller adds
    ``p @ v`` to its accumulator scaled by alpha. MASK: s may hold -inf (hidden keys), so a row
    that has seen only hidden keys keeps max -inf and is shifted by 0 (exp2 gives 0, not NaN);
    without it every score is finite and the select is skipped."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASK:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    return m_new, p, alpha, l_i * alpha + tl.sum(p, axis=1)


def head_dim_bucket(head_dim: int) -> int:
    """The smallest supported head dim >= head_dim (its tiles and BLOCK_D fit)."""
    for supported in HEAD_DIMS:
        if head_dim <= supported:
            return supported
    raise ValueError(f"head dim {head_dim} is above the supported maximum {HEAD_DIMS[-1]}")


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def score_scale(softmax_scale, softcap):
    """qk_scale turns q.k into base-2 scores (or into tanh's argument under a softcap)."""
    return (softmax_scale / softcap) if softcap > 0 else softmax_scale * LOG2E


@triton.jit
def alibi_bias(slope, rows, cols, len_q, len_k):
    """ALiBi's bias of a (rows, cols) tile: -slope * |i + Sk - Sq - j| (flash-attn's, bottom-right
    aligned per sequence); ``slope`` already in the scores' base-2 units."""
    distance = tl.abs(rows[:, None] + (len_k - len_q) - cols[None, :])
    return -slope * distance.to(tl.float32)


@triton.jit
def dropout_keep(seed, stream, rows, cols, threshold):
    """Which elements of a (rows, cols) score tile dropout keeps: Philox-4x32 (10 rounds) keyed by
    ``seed`` with counters (key j, query i, stream = b * H + h, 0), sequence-local i and j, kept
    where the first output word is at least ``threshold`` = p * 2^32. The same bits for the same
    element whichever kernel or tile asks (forward, dK/dV, dQ), and in the reference's PyTorch
    Philox (docqa_fast.reference.attention.dropout_keep_ref)."""
    zero = (rows[:, None] + cols[None, :]) * 0
    c0 = (cols[None, :] + zero).to(tl.uint32)
    c1 = (rows[:, None] + zero).to(tl.uint32)
    c2 = (zero + stream).to(tl.uint32)
    word, _, _, _ = tl.philox(seed, c0, c1, c2, c2 * 0)
    return word.to(tl.int64) >= threshold

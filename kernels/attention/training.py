"""The training kernels: forward with LSE, and backward (delta, dK/dV, dQ).

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
masked, not padded by a copy. Causal blocks run longest first: per head, or (BLOCKS_LAST, see
_grid_position) across all heads. The grid is (block, sequence, head) or (head, sequence,
block), so a packed batch holds at most 65,535 sequences (CUDA's y-axis limit, as in
flash-attn; the front end checks it). The
backward is the FlashAttention-2 split: a small kernel for delta = rowsum(dO * O), one kernel
per KV block accumulating dK/dV over every query head of its group (no atomics, so the
gradients are bitwise reproducible), one kernel per query block for dQ. When the caller allows
a non-deterministic result, the dK/dV kernel can take dQ along (FlashAttention-2/3's one-pass
backward, ``ATOMIC_DQ``): each (query tile, key block) pair adds its dS K to an fp32 dQ
buffer by atomic adds, so the scores and probabilities are recomputed once instead of twice;
the sum's order then depends on scheduling, which is why it is opt-in per call.
"""

import triton
import triton.language as tl

from .common import alibi_bias, dropout_keep, online_softmax, scores, sequence

# Lengths and window sides Triton would otherwise compile as constants when they equal 1: Triton
# 3.6's ptxas crashes (signal 11) on the dQ kernel compiled for seqlen_k == 1 with TMA loads,
# and a variant per length-1 call would buy nothing.
UNSPECIALIZED = ("seqlen_q", "seqlen_k", "window_left", "window_right")


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
def _head_extras(alibi_ptr, alibi_sb, alibi_sh, seed_ptr, b, h, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """(ALiBi slope of (b, h) in the scores' base-2 units, dropout seed); zeros when off."""
    slope = 0.0
    seed = 0
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + b.to(tl.int64) * alibi_sb + h.to(tl.int64) * alibi_sh) * 1.4426950408889634
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    return slope, seed


@triton.jit
def _grid_position(BLOCKS_LAST: tl.constexpr, LONGEST_LAST: tl.constexpr):
    """(block, sequence, head, heads) of this program. The grid is (block, sequence, head), or with
    BLOCKS_LAST (head, sequence, block). The GPU starts programs in grid order, x fastest:
    blocks on x launch each head's blocks longest first but the heads one after another, so the
    last head's longest block can start near the end and run alone (a tail of up to one block's
    length: ~15% of a causal 4K forward on 132 SMs, by a list-scheduling model); blocks on z
    launch the longest blocks of every head first (FlashAttention-3's longest-first order).
    A compile-time choice: a runtime one cost the default order registers (the D 128 dK/dV
    kernel's spill 240 -> 600 B on sm_90). LONGEST_LAST: the longest blocks have the highest
    index (causal query blocks) and are counted backwards."""
    if BLOCKS_LAST:
        block, head, heads, blocks = tl.program_id(2), tl.program_id(0), tl.num_programs(0), tl.num_programs(2)
    else:
        block, head, heads, blocks = tl.program_id(0), tl.program_id(2), tl.num_programs(2), tl.num_programs(0)
    if LONGEST_LAST:
        block = blocks - 1 - block
    return block, tl.program_id(1), head, heads


@triton.jit
def _forward_blocks(acc, m_i, l_i, q, k_src, v_src, kv_row, kv_col, k_st, v_st, rows, dims, lo, inner_lo,
                    inner_hi, hi, len_q, len_k, qk_scale, softcap, window_l, window_r, slope, seed, stream, threshold,
                    keep_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Online softmax over one stage's key blocks (see _stage_blocks). ALiBi adds its bias to the
    scores; dropout drops from the values' weights only (the normaliser l counts every key)."""
    count, leading = _stage_blocks(lo, inner_lo, inner_hi, hi, BLOCK_N, MASK)
    # The edges are a block or two: no software pipeline for them (the inside keeps the launch's).
    for j in tl.range(0, count, num_stages=1 if MASK else None):
        n_start = _stage_start(j, lo, inner_lo, inner_hi, leading, BLOCK_N, MASK)
        cols = n_start + tl.arange(0, BLOCK_N)
        k = _head_tile(k_src, n_start, kv_row, kv_col, cols, k_st, dims, len_k, HEAD_DIM, BLOCK_D, MASK, USE_TMA, False)
        s = scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                    CAUSAL, HAS_SOFTCAP, MASK)
        if HAS_ALIBI:
            s += alibi_bias(slope, rows, cols, len_q, len_k)
        m_new, p, alpha, l_i = online_softmax(s, m_i, l_i, MASK)
        if HAS_DROPOUT:
            p = tl.where(dropout_keep(seed, stream, rows, cols, threshold), p * keep_scale, 0.0)
        v = _head_tile(v_src, n_start, kv_row, kv_col, cols, v_st, dims, len_k, HEAD_DIM, BLOCK_D, MASK, USE_TMA, MASK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=UNSPECIALIZED)
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, softcap, window_left, window_right,
    alibi_ptr, alibi_sb, alibi_sh, seed_ptr, dropout_threshold, dropout_scale,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_st, o_sh, lse_sb, lse_sh,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCKS_LAST: tl.constexpr,
):
    """USE_TMA: k_ptr / v_ptr are tensor descriptors over (tokens, Hk * D) (see _head_tile).
    HAS_ALIBI: alibi_ptr holds fp32 slopes at b * alibi_sb + h * alibi_sh. HAS_DROPOUT: seed_ptr
    holds the Philox seed; keys drop where their random word is below dropout_threshold, the
    kept ones scaled by dropout_scale = 1 / (1 - p)."""
    m_block, b, h, heads = _grid_position(BLOCKS_LAST, CAUSAL)
    q_start, len_q = sequence(cu_seqlens_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = sequence(cu_seqlens_k_ptr, b, seqlen_k, IS_VARLEN)
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
    slope, seed = _head_extras(alibi_ptr, alibi_sb, alibi_sh, seed_ptr, b, h, HAS_ALIBI, HAS_DROPOUT)
    stream = b * heads + h  # (sequence, query head): the dropout pattern's stream
    # Two stages: the blocks inside the band, with no mask and unmasked loads; then its edges
    # (window start, diagonal, window end, the sequence's end), which pay for the mask.
    for stage_masked in tl.static_range(2):
        acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, k_src, v_src, kv_row, kv_col, k_st, v_st, rows, dims, lo,
                                        inner_lo, inner_hi, hi, len_q, len_k, qk_scale, softcap, window_l, window_r,
                                        slope, seed, stream, dropout_threshold, dropout_scale,
                                        HEAD_DIM, BLOCK_D, CAUSAL, HAS_SOFTCAP, stage_masked == 1, BLOCK_N, USE_TMA,
                                        HAS_ALIBI, HAS_DROPOUT)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    # Back to natural log: lse = (m + log2 l) / log2(e).
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    _store_tile(_head_start(out_ptr, b, h, q_start, o_sb, o_sh, o_st), rows, o_st, dims, len_q, out, HEAD_DIM)
    lse_base = lse_ptr + b.to(tl.int64) * lse_sb + h.to(tl.int64) * lse_sh + q_start
    tl.store(lse_base + rows, lse, mask=rows < len_q)


@triton.jit
def _probabilities(s, lse, slope, rows, cols, len_q, len_k, HAS_ALIBI: tl.constexpr):
    """The softmax of a recomputed score tile (base 2) from the forward's LSE, ALiBi's bias
    included (the softcap's slope is taken from the scores without it)."""
    if HAS_ALIBI:
        s = s + alibi_bias(slope, rows, cols, len_q, len_k)
    return tl.exp2(s - lse[:, None])


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
def _add_dq(dq_base, ds, k, rows, dq_st, dims, len_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            CHECK_ROWS: tl.constexpr):
    """Add one key block's share of a query tile's dQ, dS K, to the fp32 dQ buffer (the one-pass
    backward): atomics, since every key block of the sequence adds to the same rows. Rows past
    the sequence are left out (their dS is 0 anyway, but the rows belong to the next sequence)."""
    part = tl.dot(ds, k)
    ptrs = dq_base + _tile_offsets(rows, dq_st, dims)
    if CHECK_ROWS:
        tl.atomic_add(ptrs, part, mask=(rows < len_q)[:, None] & (dims < HEAD_DIM)[None, :], sem="relaxed")
    elif HEAD_DIM == BLOCK_D:  # a tile inside the band: every row is the sequence's
        tl.atomic_add(ptrs, part, sem="relaxed")
    else:
        tl.atomic_add(ptrs, part, mask=(dims < HEAD_DIM)[None, :], sem="relaxed")


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_src, do_src, q_row, q_col, lse_base, delta_base, dq_base, q_st, do_st, dq_st, cols,
                 dims, lo, inner_lo, inner_hi, hi, len_q, len_k, qk_scale, sm_scale, softcap, window_l, window_r,
                 slope, seed, stream, threshold, keep_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                 USE_TMA: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK, dV of one key block from one stage's query blocks of one query head; with ATOMIC_DQ,
    also those query blocks' dQ shares (see _add_dq)."""
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
        s = scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                    CAUSAL, HAS_SOFTCAP, MASK)
        p = _probabilities(s, lse, slope, rows, cols, len_q, len_k, HAS_ALIBI)
        dp = tl.dot(do, tl.trans(v))
        if HAS_DROPOUT:
            keep = dropout_keep(seed, stream, rows, cols, threshold)
            dv += tl.dot(tl.trans(tl.where(keep, p * keep_scale, 0.0).to(do.dtype)), do)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        else:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = _score_grad(p, dp, delta, s, sm_scale, softcap, HAS_SOFTCAP).to(q.dtype)
        if ATOMIC_DQ:
            _add_dq(dq_base, ds, k, rows, dq_st, dims, len_q, HEAD_DIM, BLOCK_D, MASK)
        dk += tl.dot(tl.trans(ds), q)
    return dk, dv


@triton.jit(do_not_specialize=UNSPECIALIZED)
def attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, sm_scale, softcap, window_left, window_right,
    alibi_ptr, alibi_sb, alibi_sh, seed_ptr, dropout_threshold, dropout_scale,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, do_sb, do_st, do_sh,
    dk_sb, dk_st, dk_sh, dv_sb, dv_st, dv_sh, dq_sb, dq_st, dq_sh, lse_sb, lse_sh,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCKS_LAST: tl.constexpr,
):
    """USE_TMA: q_ptr / dout_ptr are tensor descriptors over (tokens, H * D) (see _head_tile).
    ALiBi and dropout as in the forward kernel. ATOMIC_DQ: dq_ptr is an fp32 buffer shaped like Q,
    zeroed, that receives dQ by atomic adds (the one-pass backward); otherwise it is not read."""
    n_block, b, kv_h, kv_heads = _grid_position(BLOCKS_LAST, False)  # causal: key block 0 is the longest
    q_start, len_q = sequence(cu_seqlens_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = sequence(cu_seqlens_k_ptr, b, seqlen_k, IS_VARLEN)
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
        slope, seed = _head_extras(alibi_ptr, alibi_sb, alibi_sh, seed_ptr, b, h, HAS_ALIBI, HAS_DROPOUT)
        stream = b * (kv_heads * heads_per_kv) + h
        dq_base = dq_ptr
        if ATOMIC_DQ:
            dq_base = _head_start(dq_ptr, b, h, q_start, dq_sb, dq_sh, dq_st)
        for stage_masked in tl.static_range(2):  # inside the band first, then its edges
            dk, dv = _dkdv_blocks(dk, dv, k, v, q_src, do_src, q_row, q_col, lse_ptr + stat, delta_ptr + stat,
                                  dq_base, q_st, do_st, dq_st, cols, dims, lo, inner_lo, inner_hi, hi, len_q, len_k,
                                  qk_scale, sm_scale, softcap, window_l, window_r, slope, seed, stream,
                                  dropout_threshold, dropout_scale, HEAD_DIM, BLOCK_D, CAUSAL, HAS_SOFTCAP,
                                  stage_masked == 1, BLOCK_M, USE_TMA, HAS_ALIBI, HAS_DROPOUT, ATOMIC_DQ)

    _store_tile(_head_start(dk_ptr, b, kv_h, k_start, dk_sb, dk_sh, dk_st), cols, dk_st, dims, len_k, dk, HEAD_DIM)
    _store_tile(_head_start(dv_ptr, b, kv_h, k_start, dv_sb, dv_sh, dv_st), cols, dv_st, dims, len_k, dv, HEAD_DIM)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_src, v_src, kv_row, kv_col, k_st, v_st, rows, dims, lo, inner_lo, inner_hi,
               hi, len_q, len_k, qk_scale, sm_scale, softcap, window_l, window_r, slope, seed, stream, threshold,
               keep_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
               HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """dQ of one query block from one stage's key blocks."""
    count, leading = _stage_blocks(lo, inner_lo, inner_hi, hi, BLOCK_N, MASK)
    # The edges are a block or two: no software pipeline for them (the inside keeps the launch's).
    for j in tl.range(0, count, num_stages=1 if MASK else None):
        n_start = _stage_start(j, lo, inner_lo, inner_hi, leading, BLOCK_N, MASK)
        cols = n_start + tl.arange(0, BLOCK_N)
        # Both tiles enter products with p = 0 past the sequence (dP, then ds @ K): zero their tails.
        k = _head_tile(k_src, n_start, kv_row, kv_col, cols, k_st, dims, len_k, HEAD_DIM, BLOCK_D, MASK, USE_TMA, MASK)
        v = _head_tile(v_src, n_start, kv_row, kv_col, cols, v_st, dims, len_k, HEAD_DIM, BLOCK_D, MASK, USE_TMA, MASK)
        s = scores(q, k, rows, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                    CAUSAL, HAS_SOFTCAP, MASK)
        p = _probabilities(s, lse, slope, rows, cols, len_q, len_k, HAS_ALIBI)
        dp = tl.dot(do, tl.trans(v))
        if HAS_DROPOUT:
            dp = tl.where(dropout_keep(seed, stream, rows, cols, threshold), dp * keep_scale, 0.0)
        ds = _score_grad(p, dp, delta, s, sm_scale, softcap, HAS_SOFTCAP)
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit(do_not_specialize=UNSPECIALIZED)
def attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    seqlen_q, seqlen_k, heads_per_kv, qk_scale, sm_scale, softcap, window_left, window_right,
    alibi_ptr, alibi_sb, alibi_sh, seed_ptr, dropout_threshold, dropout_scale,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, do_sb, do_st, do_sh, dq_sb, dq_st, dq_sh,
    lse_sb, lse_sh,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCKS_LAST: tl.constexpr,
):
    """USE_TMA: k_ptr / v_ptr are tensor descriptors over (tokens, Hk * D) (see _head_tile).
    ALiBi and dropout as in the forward kernel."""
    m_block, b, h, heads = _grid_position(BLOCKS_LAST, CAUSAL)
    q_start, len_q = sequence(cu_seqlens_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = sequence(cu_seqlens_k_ptr, b, seqlen_k, IS_VARLEN)
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
    slope, seed = _head_extras(alibi_ptr, alibi_sb, alibi_sh, seed_ptr, b, h, HAS_ALIBI, HAS_DROPOUT)
    stream = b * heads + h
    for stage_masked in tl.static_range(2):  # inside the band first, then its edges
        dq = _dq_blocks(dq, q, do, lse, delta, k_src, v_src, kv_row, kv_col, k_st, v_st, rows, dims, lo, inner_lo,
                        inner_hi, hi, len_q, len_k, qk_scale, sm_scale, softcap, window_l, window_r, slope, seed,
                        stream, dropout_threshold, dropout_scale, HEAD_DIM, BLOCK_D, CAUSAL, HAS_SOFTCAP,
                        stage_masked == 1, BLOCK_N, USE_TMA, HAS_ALIBI, HAS_DROPOUT)
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

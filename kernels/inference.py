"""Triton kernels of flash_attn_with_kvcache (and of flash_attn_varlen_func over a paged cache):
split-KV attention over a contiguous or paged KV cache, decode and chunked prefill, with the
append of the new tokens fused into the same launch.

One program handles one KV head of one batch row, a block of queries and one split of the
row's keys. Its BLOCK_M rows are (query, query head) pairs of that KV head's GQA group --
row r is query ``q0 + r // G``, head ``kv_head * G + r % G`` -- so each K/V tile is read once
for all G query heads (28 / 4 heads: 7x less cache traffic than one program per query head),
and the tile product is a tensor-core ``tl.dot`` even at Sq = 1 (G rows, padded to 16).

Contiguous and paged caches share the code: a key slot j lives in block
``block_table[b, j // page_size]`` at slot ``j % page_size``; a contiguous cache is the case
of one page of size S_cache per row (block = the row's cache row), selected by PAGED only
where the block index comes from. With pages of a multiple of BLOCK_N tokens (PAGE_TILES) a
key tile lies in one page: one table entry per tile. The entries of a tile are read one tile
ahead, so that Triton's pipeliner keeps num_stages - 1 K/V tiles in flight for a paged cache as
for a contiguous one (see _cache_tiles). Each split's keys run in three loops of whole tiles --
a masked head (left windows only), the unmasked interior (every row sees every key: no load or
score masks), a masked tail. Keys are slots ``[leftpad, L)`` with
``L = cache_seqlens[b] + seqlen_new``; masks align bottom-right to L exactly as in
:mod:`.attention`, whose score function is reused.

The fused append (APPEND). The new k/v go to slots ``[cache_seqlens, L)``. Programs of one
launch cannot wait for each other, so *no program reads those slots from the cache*: each
reads the cached keys (below cache_seqlens) from the cache and the new keys straight from the
k/v inputs (rotating k in registers), and each new slot is written exactly once, by the
program of the *last* query block whose split covers it. That block sees every new key (its
causal / right-window bound is L); with a left window its range is extended down to
cache_seqlens so that no new token goes unwritten (the score mask still hides what the
window hides). Old slots are only read and new slots only written, so the result does not
depend on program order for any num_splits, paged or contiguous. q is rotated in registers
too where that does not spill (``rotate_q_in_kernel``): a call is one launch (plus the combine
when split).

Split-KV: the row's visible key range is cut into ``num_splits`` equal chunks (multiples of
BLOCK_N) *inside the kernel*, from the loaded lengths -- no host sync, and each split gets an
equal share of the real length rather than of the cache capacity. Each split writes an fp32
partial output and its LSE (out 0 / lse -inf when it has no keys); the caller combines them
with ``merge_stacked_attention_states``. With one split the kernel writes the final output.

Packed queries (VARLEN_Q, for ``flash_attn_varlen_func(..., block_table=...)``): q is
(total_q, H, D) and batch row b's queries start at ``cu_seqlens_q[b]``; its key count comes in
``cache_seqlens`` (the differences of cu_seqlens_k) and nothing is appended.
"""

import torch
import triton
import triton.language as tl

from .attention.common import HEAD_DIMS, alibi_bias, block_d, head_dim_bucket, online_softmax, score_scale, scores
from .attention.common import sequence
from .attention.launch import alibi_arguments
from . import tuning
from .registry import KernelConfig, pointer_type, register
from .rotary import load_rotated, rotate


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, MASK: tl.constexpr):
    """One key tile through the online softmax: base-2 scores s and the tile's values v. MASK: s
    may hold -inf (hidden keys); the unmasked interior's scores are all finite, and it skips the
    -inf guard (:func:`.attention.common.online_softmax`, the training forward's step too)."""
    m_new, p, alpha, l_i = online_softmax(s, m_i, l_i, MASK)
    return m_new, l_i, acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _tile_pages(block_table_ptr, b, bt_sb, n_start, limit, page_size, PAGED: tl.constexpr, PAGE_TILES: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The block-table entries (int64) of the tile at n_start, for keys below ``limit``: with
    PAGE_TILES the one entry of its page (clamped to the last key below ``limit``, so that a
    prefetch past the end reads an entry in use), else one per key (0 past ``limit``); 0 for a
    contiguous cache."""
    pages = b.to(tl.int64) * 0
    if PAGE_TILES:
        slot = tl.maximum(tl.minimum(n_start, limit - 1), 0)
        pages = tl.load(block_table_ptr + b.to(tl.int64) * bt_sb + slot // page_size).to(tl.int64)
    elif PAGED:
        cols = n_start + tl.arange(0, BLOCK_N)
        pages = tl.load(block_table_ptr + b.to(tl.int64) * bt_sb + cols // page_size, mask=cols < limit,
                        other=0).to(tl.int64)
    return pages


@triton.jit
def _kv_offsets(pages, n_start, cache_row, page_size, k_sp, k_st, v_sp, v_st, PAGED: tl.constexpr,
                PAGE_TILES: tl.constexpr, BLOCK_N: tl.constexpr):
    """K and V offsets of the key slots n_start + [0, BLOCK_N) from their block-table entries
    ``pages`` (:func:`_tile_pages`): slot j is slot ``j % page_size`` of its page -- consecutive
    slots of one page with PAGE_TILES -- or slot j of the row's cache row when contiguous."""
    if PAGE_TILES:
        block = pages
        slot = (n_start % page_size + tl.arange(0, BLOCK_N)).to(tl.int64)
    elif PAGED:
        block = pages
        slot = ((n_start + tl.arange(0, BLOCK_N)) % page_size).to(tl.int64)
    else:
        block = cache_row
        slot = (n_start + tl.arange(0, BLOCK_N)).to(tl.int64)
    return block * k_sp + slot * k_st, block * v_sp + slot * v_st


@triton.jit
def _cache_tile(q, m_i, l_i, acc, n_start, limit, pages, k_head, v_head, cache_row, page_size, k_sp, k_st, v_sp, v_st,
                dims, dim_ok, slope, qi, len_q, len_k, qk_scale, softcap, window_l, window_r,
                PAGED: tl.constexpr, PAGE_TILES: tl.constexpr, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr):
    """One BLOCK_N tile of cached keys from slot n_start through the online softmax. MASK: the tile
    may hold keys at or past ``limit`` or keys the causal / window masks hide; without it every
    key of the tile is visible to every row and nothing is masked (with EVEN_D not even the
    head dim). ``pages``: the tile's block-table entries (:func:`_tile_pages`); with PAGE_TILES
    (page_size a multiple of BLOCK_N, tiles aligned to BLOCK_N) the one page that holds the whole
    tile, whose rows are then consecutive slots of it."""
    cols = n_start + tl.arange(0, BLOCK_N)
    col_ok = cols < limit
    k_slot, v_slot = _kv_offsets(pages, n_start, cache_row, page_size, k_sp, k_st, v_sp, v_st, PAGED, PAGE_TILES,
                                 BLOCK_N)
    k_ptrs = k_head + k_slot[:, None] + dims[None, :]
    v_ptrs = v_head + v_slot[:, None] + dims[None, :]
    # Rows of D contiguous elements (strides are multiples of 16 elements wherever the launcher's
    # specialisation sees them so): 16-byte vector loads; num_stages keeps tiles in flight.
    if MASK:
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=dim_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=dim_ok[None, :], other=0.0)
    s = scores(q, k, qi, cols, len_q, len_k, qk_scale, softcap, window_l, window_r, CAUSAL, HAS_SOFTCAP, MASK)
    if HAS_ALIBI:
        s += alibi_bias(slope, qi, cols, len_q, len_k)
    if MASK:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    return _softmax_step(s, v, m_i, l_i, acc, MASK)


@triton.jit
def _cache_tiles(q, m_i, l_i, acc, first, last, limit, k_head, v_head, b, cache_row, block_table_ptr, bt_sb,
                 page_size, k_sp, k_st, v_sp, v_st, dims, dim_ok, slope, qi, len_q, len_k, qk_scale, softcap,
                 window_l, window_r, PAGED: tl.constexpr, PAGE_TILES: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                 EVEN_D: tl.constexpr):
    """The tiles at first, first + BLOCK_N, ... below ``last`` (keys below ``limit``) through
    :func:`_cache_tile`. A tile's block-table entries are read one tile ahead, so its K/V loads
    depend on no load of the same iteration: Triton's pipeliner then keeps num_stages - 1 tiles
    in flight, as for a contiguous cache. (Read in the iteration, they make the K/V loads
    indirect, and the pipeliner gives them a single buffer: one tile in flight, compute and
    loads in turn.)"""
    pages = _tile_pages(block_table_ptr, b, bt_sb, first, limit, page_size, PAGED, PAGE_TILES, BLOCK_N)
    for n_start in range(first, last, BLOCK_N):
        next_pages = _tile_pages(block_table_ptr, b, bt_sb, n_start + BLOCK_N, limit, page_size, PAGED, PAGE_TILES,
                                 BLOCK_N)
        m_i, l_i, acc = _cache_tile(
            q, m_i, l_i, acc, n_start, limit, pages, k_head, v_head, cache_row, page_size, k_sp, k_st, v_sp, v_st,
            dims, dim_ok, slope, qi, len_q, len_k, qk_scale, softcap, window_l, window_r, PAGED, PAGE_TILES, CAUSAL,
            HAS_SOFTCAP, HAS_ALIBI, MASK, BLOCK_N, EVEN_D)
        pages = next_pages
    return m_i, l_i, acc


@triton.jit
def decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, out_ptr, lse_ptr,
    cache_seqlens_ptr, leftpad_ptr, block_table_ptr, cache_rows_ptr, cu_seqlens_q_ptr,
    seqlen_q, seqlen_new, page_size, heads_per_kv, queries_per_block, num_splits, qk_scale, softcap,
    window_left, window_right, rotary_half, rotary_q_step, alibi_ptr, alibi_sb, alibi_sh,
    q_sb, q_st, q_sh, k_sp, k_st, k_sh, v_sp, v_st, v_sh, kn_sb, kn_st, kn_sh, vn_sb, vn_st, vn_sh, cos_st,
    o_ss, o_sb, o_st, o_sh, lse_ss, lse_sb, lse_sh, bt_sb,
    HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_CACHE_ROWS: tl.constexpr,
    VARLEN_Q: tl.constexpr, APPEND: tl.constexpr, HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    ROTATE_Q: tl.constexpr, PAGE_TILES: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_NEW: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """HAS_ALIBI: fp32 slopes at b * alibi_sb + h * alibi_sh; the bias -slope * |i + L - Sq - j| in
    absolute slots, which is flash-attn's distance counted from cache_leftpad too (both ends shift)."""
    pid, b, kv_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_block = pid // num_splits
    split = pid % num_splits
    q0 = q_block * queries_per_block
    q_start, len_q = sequence(cu_seqlens_q_ptr, b, seqlen_q, VARLEN_Q)

    # Rows: (query, head of the group) pairs; rows past the block's queries or past Sq are padding.
    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // heads_per_kv
    h = kv_h * heads_per_kv + r % heads_per_kv
    row_ok = (r < queries_per_block * heads_per_kv) & (qi < len_q)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    old_len = tl.load(cache_seqlens_ptr + b)  # keys in the cache before the append
    len_k = old_len + seqlen_new  # L: keys after the append
    lo = len_k * 0
    if HAS_LEFTPAD:
        lo = tl.load(leftpad_ptr + b)
    # The keys any row of this block can see, bottom-right aligned to L (cf. attention._key_range).
    q_last = tl.minimum(q0 + queries_per_block, len_q) - 1
    offset = len_k - len_q
    window_l = window_left if HAS_WINDOW else -1
    window_r = window_right if HAS_WINDOW else -1
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(hi, q_last + offset + 1)
    elif window_r >= 0:
        hi = tl.minimum(hi, q_last + offset + window_r + 1)
    if window_l >= 0:
        lo = tl.maximum(lo, q0 + offset - window_l)
    if APPEND:
        # The last query block writes the new tokens: it must visit all of them (hi is L for it).
        writer = q_block == tl.num_programs(0) // num_splits - 1
        lo = tl.where(writer, tl.minimum(lo, old_len), lo)
    if PAGE_TILES:
        # Tiles aligned to BLOCK_N, so that each lies in one page. Only a left window (or the
        # writer's extension, which only a left window needs) moves lo off 0 here (no leftpad
        # with a block table), and the keys this adds are hidden by that window's mask.
        lo = lo // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)
    # This split's share, in whole BLOCK_N tiles.
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    stop = tl.minimum(hi, start + chunk)
    # Cached keys end at old_len; a block with no query (past a packed sequence's end, or Sq = 0
    # with new tokens to write) reads none.
    cache_stop = tl.where(q0 < len_q, tl.minimum(stop, old_len), start)

    q_rows = q_ptr + b.to(tl.int64) * q_sb + (q_start + qi).to(tl.int64) * q_st + h.to(tl.int64) * q_sh
    q = load_rotated(q_rows, dims, row_ok, dim_ok, old_len + qi * rotary_q_step, cos_ptr, sin_ptr, cos_st,
                      rotary_half, ROTATE_Q, INTERLEAVED)

    cache_row = b.to(tl.int64)
    if HAS_CACHE_ROWS:
        cache_row = tl.load(cache_rows_ptr + b).to(tl.int64)
    k_head = k_cache_ptr + kv_h.to(tl.int64) * k_sh
    v_head = v_cache_ptr + kv_h.to(tl.int64) * v_sh

    slope = tl.zeros((BLOCK_M, 1), tl.float32)
    if HAS_ALIBI:  # per row: the rows are (query, head) pairs; base-2 units like the scores
        slope = tl.load(alibi_ptr + b.to(tl.int64) * alibi_sb + h.to(tl.int64) * alibi_sh, mask=row_ok,
                        other=0.0)[:, None] * 1.4426950408889634

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # The cached keys [start, cache_stop) in three runs of whole BLOCK_N tiles: a masked head (only
    # under a left window: tiles that some row of the block cannot see on the left), the interior --
    # tiles every row of the block sees whole, loaded and scored with no mask at all, so the loads
    # stay plain 16-byte vectors and the tile needs no compare-and-select -- and a masked tail (the
    # partial last tile, and the tiles the causal / right-window edge cuts). Decode at Sq = 1 has
    # no head and at most one tail tile.
    full_hi = cache_stop  # keys below this every row of the block sees (on the right)
    if CAUSAL:
        full_hi = tl.minimum(full_hi, q0 + offset + 1)
    elif window_r >= 0:
        full_hi = tl.minimum(full_hi, q0 + offset + window_r + 1)
    interior = start
    if HAS_WINDOW:
        if window_l >= 0:  # keys from here on every row of the block sees (on the left)
            interior = start + tl.cdiv(tl.maximum(q_last + offset - window_l - start, 0), BLOCK_N) * BLOCK_N
        m_i, l_i, acc = _cache_tiles(
            q, m_i, l_i, acc, start, tl.minimum(interior, cache_stop), cache_stop, k_head, v_head, b, cache_row,
            block_table_ptr, bt_sb, page_size, k_sp, k_st, v_sp, v_st, dims, dim_ok, slope, qi, len_q, len_k,
            qk_scale, softcap, window_l, window_r, PAGED, PAGE_TILES, CAUSAL, HAS_SOFTCAP, HAS_ALIBI, True, BLOCK_N,
            HEAD_DIM == BLOCK_D)
    interior_stop = interior + tl.maximum(full_hi - interior, 0) // BLOCK_N * BLOCK_N
    m_i, l_i, acc = _cache_tiles(
        q, m_i, l_i, acc, interior, interior_stop, cache_stop, k_head, v_head, b, cache_row, block_table_ptr, bt_sb,
        page_size, k_sp, k_st, v_sp, v_st, dims, dim_ok, slope, qi, len_q, len_k, qk_scale, softcap, window_l,
        window_r, PAGED, PAGE_TILES, CAUSAL, HAS_SOFTCAP, HAS_ALIBI, False, BLOCK_N, HEAD_DIM == BLOCK_D)
    m_i, l_i, acc = _cache_tiles(
        q, m_i, l_i, acc, interior_stop, cache_stop, cache_stop, k_head, v_head, b, cache_row, block_table_ptr, bt_sb,
        page_size, k_sp, k_st, v_sp, v_st, dims, dim_ok, slope, qi, len_q, len_k, qk_scale, softcap, window_l,
        window_r, PAGED, PAGE_TILES, CAUSAL, HAS_SOFTCAP, HAS_ALIBI, True, BLOCK_N, HEAD_DIM == BLOCK_D)

    if APPEND:
        # The new keys, from the inputs (never from their cache slots, which this launch writes).
        k_new_head = k_new_ptr + b.to(tl.int64) * kn_sb + kv_h.to(tl.int64) * kn_sh
        v_new_head = v_new_ptr + b.to(tl.int64) * vn_sb + kv_h.to(tl.int64) * vn_sh
        for n_start in range(tl.maximum(start, old_len), stop, BLOCK_N_NEW):
            cols = n_start + tl.arange(0, BLOCK_N_NEW)
            col_ok = cols < stop
            t = (cols - old_len).to(tl.int64)  # index among the new tokens
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = load_rotated(k_new_head + t * kn_st, dims, col_ok, dim_ok, cols, cos_ptr, sin_ptr, cos_st,
                              rotary_half, HAS_ROTARY, INTERLEAVED).to(k_cache_ptr.dtype.element_ty)
            v = tl.load(v_new_head + t[:, None] * vn_st + dims[None, :], mask=kv_mask, other=0.0)
            s = scores(q, k, qi, cols, len_q, len_k, qk_scale, softcap, window_l, window_r,
                        CAUSAL, HAS_SOFTCAP, True)
            if HAS_ALIBI:
                s += alibi_bias(slope, qi, cols, len_q, len_k)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, True)
            # Each new slot is in exactly one split of the last query block: written once.
            write = col_ok & writer
            pages = _tile_pages(block_table_ptr, b, bt_sb, n_start, stop, page_size, PAGED, False, BLOCK_N_NEW)
            k_slot, v_slot = _kv_offsets(pages, n_start, cache_row, page_size, k_sp, k_st, v_sp, v_st, PAGED, False,
                                         BLOCK_N_NEW)
            write_mask = write[:, None] & dim_ok[None, :]
            tl.store(k_head + k_slot[:, None] + dims[None, :], k, mask=write_mask)
            tl.store(v_head + v_slot[:, None] + dims[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=write_mask)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    split64 = split.to(tl.int64)
    tokens = (q_start + qi).to(tl.int64)
    o_rows = out_ptr + split64 * o_ss + b.to(tl.int64) * o_sb + tokens * o_st + h.to(tl.int64) * o_sh
    tl.store(o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    lse_rows = lse_ptr + split64 * lse_ss + b.to(tl.int64) * lse_sb + h.to(tl.int64) * lse_sh + tokens
    tl.store(lse_rows, lse, mask=row_ok)


# ------------------------------------------------------------------------------ launcher

BLOCK_MS = (16, 64)  # 16: decode (G <= 16 rows); 64: several queries per block (chunked prefill)
MAX_GROUP = BLOCK_MS[-1]
# The split heuristic's constants (num_splits_heuristic): programs per SM it aims for, and the
# fewest keys a split keeps. Tunable: the tuning tool times candidates and writes the winner into
# the device's table under "decode_splits" (kernels/tuning.py); these are the built-in ones.
SPLIT_DEFAULTS = {"waves": 2, "min_keys": 512}
SPLIT_KEY = "H28x4,D=128"  # measured at the decode headline shape, applied to every shape
MAX_SPLITS = 128  # bounds the fp32 partials (splits x B x Sq x H x D) and the combine's work
tuning.declare("decode_splits", tuple(SPLIT_DEFAULTS))


# New tokens come in tiles of 16: a rotated k tile holds four fp32 (tile, D) arrays (x, partner,
# cos, sin), which at 32 x 256 spill on Hopper; decode has one new token per row anyway.
BLOCK_N_NEW = 16


def rotate_q_in_kernel(head_dim: int, block_m: int) -> bool:
    """Whether the kernel rotates q itself: for decode tiles (16 rows) up to D = 128. Larger tiles
    add the rotation's fp32 temporaries (x, partner, cos, sin: BLOCK_M x BLOCK_D each) to a kernel
    already near 255 registers, and spill on Hopper; there the launcher rotates q first (one small
    elementwise pass over q; the append, k's rotation included, stays inside the launch)."""
    return block_m == BLOCK_MS[0] and head_dim <= 128


def block_n(head_dim: int) -> int:
    return 32 if head_dim > 128 else 64


def _block_m(seqlen_q: int, group: int) -> int:
    return BLOCK_MS[0] if seqlen_q * group <= BLOCK_MS[0] else BLOCK_MS[1]


def _warps_stages(head_dim: int, block_m: int) -> tuple[int, int]:
    # Several K/V tiles in flight (stages) hide HBM latency; 8 warps when the tiles are large.
    if block_m == 64:
        return (8, 2) if head_dim > 128 else (4, 3)
    return 4, 3


# Built-in tiles (above) unless the device's tuned table (kernels/tuned/, kernels/tuning.py)
# has measured ones for the variant: keyed by head-dim bucket and BLOCK_M.
tuning.declare("decode_attention", ("BLOCK_N", "num_warps", "num_stages"))


def tile_key(head_dim: int, block_m: int) -> str:
    return f"D={head_dim_bucket(head_dim)},M={block_m}"


def default_tiles(head_dim: int, block_m: int) -> dict:
    return {"BLOCK_N": block_n(head_dim), **dict(zip(("num_warps", "num_stages"), _warps_stages(head_dim, block_m)))}


def page_tiles(paged: bool, page_size: int, block_n: int) -> bool:
    """Whether every key tile lies inside one page (one block-table read per tile, consecutive
    slots): pages of a multiple of BLOCK_N tokens. Smaller pages (16) keep one entry per key."""
    return paged and page_size % block_n == 0


def rotate_queries(q, cos, sin, cache_seqlens, per_token: bool, interleaved: bool):
    """q (B, Sq, H, D) rotated at cache_seqlens (+ i per token) into a new contiguous tensor
    (kernels/rotary.py, the kernel of docqa_fast.rotary.apply_rotary_emb)."""
    batch, seqlen_q, heads, head_dim = q.shape
    steps = torch.arange(seqlen_q, device=q.device) if per_token else torch.zeros(seqlen_q, dtype=torch.long,
                                                                                   device=q.device)
    positions = (cache_seqlens.long()[:, None] + steps[None, :]).reshape(-1)
    tokens = q.reshape(batch * seqlen_q, heads, head_dim)  # a view unless B and Sq do not merge
    out = torch.empty((batch * seqlen_q, heads, head_dim), dtype=q.dtype, device=q.device)
    rotate(tokens, cos, sin, positions, out, interleaved=interleaved)
    return out.view(batch, seqlen_q, heads, head_dim)


def launch_shape(batch: int, seqlen_q: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """(BLOCK_M, queries per block) for a call."""
    group = heads // kv_heads
    block_m = _block_m(seqlen_q, group)
    return block_m, max(1, block_m // group)


def split_constants(device) -> dict:
    """The split heuristic's constants on ``device``: the tuned table's ``decode_splits`` entry
    (measured by the tuning tool at the decode headline shape), else the built-in ones."""
    return tuning.lookup("decode_splits", SPLIT_KEY, SPLIT_DEFAULTS, device)


def num_splits_heuristic(batch: int, seqlen_q: int, heads: int, kv_heads: int, capacity: int, num_sms: int,
                         waves: int = SPLIT_DEFAULTS["waves"], min_keys: int = SPLIT_DEFAULTS["min_keys"]) -> int:
    """Splits of each row's keys so that the launch has about ``waves`` programs per SM (enough
    loads in flight to stream the cache at any batch size), each split keeping >= ``min_keys``
    keys (below that its fixed cost -- q load, partial write, its share of the combine --
    outweighs its bytes), at most MAX_SPLITS.

    A function of shapes only (the cache capacity, not the lengths): it never syncs, and a CUDA
    graph captured once stays valid for any lengths.
    """
    _, per_block = launch_shape(batch, seqlen_q, heads, kv_heads)
    programs = max(1, batch * kv_heads * triton.cdiv(seqlen_q, per_block))  # >= 1: empty batches too
    wanted = triton.cdiv(waves * num_sms, programs)
    return max(1, min(wanted, triton.cdiv(capacity, min_keys), MAX_SPLITS))


def _layout_strides(q, out, lse, varlen):
    """(q batch/token/head), (out split/batch/token/head), (lse split/batch/head) strides; 0 for a
    dimension the layout lacks (packed tensors share one token axis: batch stride 0)."""
    o, l = out.stride(), lse.stride()
    split = out.dim() == (4 if varlen else 5)
    if varlen:
        return ((0, q.stride(0), q.stride(1)), (o[0], 0, o[1], o[2]) if split else (0, 0, o[0], o[1]),
                (l[0], 0, l[1]) if split else (0, 0, l[0]))
    return q.stride()[:3], o[:4] if split else (0, *o[:3]), l[:3] if split else (0, *l[:2])


def forward(q, k_cache, v_cache, out, lse, cache_seqlens, *, k=None, v=None, rotary_cos=None, rotary_sin=None,
            rotary_interleaved=True, rotary_per_token=True, cache_leftpad=None, block_table=None,
            cache_batch_idx=None, cu_seqlens_q=None, max_seqlen_q=0, softmax_scale, causal, window_size,
            softcap, num_splits, alibi_slopes=None):
    """One launch: append k/v (k and q rotated with rotary tables) and fill ``out``/``lse``.
    ``alibi_slopes``: fp32 (H,) or (B, H), or None.

    q (B, Sq, H, D), or packed (total_q, H, D) with ``cu_seqlens_q`` / ``max_seqlen_q``;
    ``out``/``lse`` like q / (B, H, Sq) or (H, total_q), with a leading split dimension of
    fp32 partials when num_splits > 1. ``cache_seqlens`` holds each row's keys before the append.
    """
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    seqlen_q = max_seqlen_q if varlen else q.shape[1]
    heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = k_cache.shape[2]
    append, rotary, paged = k is not None and k.shape[1] > 0, rotary_cos is not None, block_table is not None
    if batch == 0 or (seqlen_q == 0 and not append):
        return
    block_m, per_block = launch_shape(batch, seqlen_q, heads, kv_heads)
    left, right = window_size
    dummy = cache_seqlens  # any int32 tensor for pointers a variant never reads
    if not append:  # pointers of the same types as the registered variants', never read
        k = v = k_cache
    cos, sin = (rotary_cos, rotary_sin) if rotary else (q, q)
    rotate_q = rotary and rotate_q_in_kernel(head_dim, block_m)
    if rotary and not rotate_q:
        q = rotate_queries(q, rotary_cos, rotary_sin, cache_seqlens, rotary_per_token, rotary_interleaved)
    # After the rotation: the rotated copy is laid out afresh, whatever the caller's q strides were.
    q_strides, o_strides, lse_strides = _layout_strides(q, out, lse, varlen)
    # Sq = 0 with new tokens still launches one (query-less) block: it writes them.
    grid = (max(1, triton.cdiv(seqlen_q, per_block)) * num_splits, batch, kv_heads)
    alibi = alibi_arguments(alibi_slopes, lse)  # lse: a pointer never read without HAS_ALIBI

    def run(tiles):
        decode_attention_kernel[grid](
            q, k_cache, v_cache, k, v, cos, sin, out, lse, cache_seqlens,
            cache_leftpad if cache_leftpad is not None else dummy,
            block_table if paged else dummy,
            cache_batch_idx if cache_batch_idx is not None else dummy,
            cu_seqlens_q if varlen else dummy,
            seqlen_q, k.shape[1] if append else 0, k_cache.shape[1], heads // kv_heads, per_block, num_splits,
            score_scale(softmax_scale, softcap), softcap, left, right,
            rotary_cos.shape[1] if rotary else 0, int(rotary_per_token), *alibi,
            *q_strides, *k_cache.stride()[:3], *v_cache.stride()[:3],
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            rotary_cos.stride(0) if rotary else 0, *o_strides, *lse_strides,
            block_table.stride(0) if paged else 0,
            HEAD_DIM=head_dim, PAGED=paged, HAS_LEFTPAD=cache_leftpad is not None,
            HAS_CACHE_ROWS=cache_batch_idx is not None, VARLEN_Q=varlen, APPEND=append, HAS_ROTARY=rotary,
            INTERLEAVED=bool(rotary_interleaved) and rotary, ROTATE_Q=rotate_q,
            PAGE_TILES=page_tiles(paged, k_cache.shape[1], tiles["BLOCK_N"]), CAUSAL=causal,
            HAS_WINDOW=left >= 0 or (right >= 0 and not causal), HAS_SOFTCAP=softcap > 0,
            HAS_ALIBI=alibi_slopes is not None,
            BLOCK_M=block_m, BLOCK_N=tiles["BLOCK_N"], BLOCK_N_NEW=BLOCK_N_NEW, BLOCK_D=block_d(head_dim),
            num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
        )

    tuning.launch("decode_attention", tile_key(head_dim, block_m), default_tiles(head_dim, block_m), q.device, run)


# ------------------------------------------------------------------------ registered configs

_NO_FLAGS = {"PAGED": False, "PAGE_TILES": False, "HAS_LEFTPAD": False, "HAS_CACHE_ROWS": False, "VARLEN_Q": False, "APPEND": False,
             "HAS_ROTARY": False, "INTERLEAVED": False, "CAUSAL": False, "HAS_WINDOW": False, "HAS_SOFTCAP": False,
             "HAS_ALIBI": False}
# The flag sets that matter, each compiled for every head dim and BLOCK_M: the plain decode
# (with and without new tokens), a paged one with every mask option, ALiBi and interleaved rotary
# (pages of whole tiles), a paged causal one with GPT-NeoX rotary (one table entry per key, as for
# pages of 16), the paged decode with pages of whole tiles, a contiguous one with leftpad and
# cache_batch_idx, and the packed (varlen) chunked prefill of flash_attn_varlen_func (both page kinds).
FLAG_SETS = {
    "contiguous_append": {"APPEND": True},
    "contiguous": {},
    "paged_append_rotary_interleaved_all_masks": {"PAGED": True, "PAGE_TILES": True, "APPEND": True, "HAS_ROTARY": True,
                                                  "INTERLEAVED": True, "CAUSAL": True, "HAS_WINDOW": True,
                                                  "HAS_SOFTCAP": True, "HAS_ALIBI": True},
    "paged_append_rotary_halves_causal": {"PAGED": True, "APPEND": True, "HAS_ROTARY": True, "CAUSAL": True},
    "paged_tiles_append": {"PAGED": True, "PAGE_TILES": True, "APPEND": True},
    "contiguous_rows_leftpad_causal_append": {"HAS_LEFTPAD": True, "HAS_CACHE_ROWS": True, "CAUSAL": True,
                                              "APPEND": True},
    "paged_varlen_causal": {"PAGED": True, "VARLEN_Q": True, "CAUSAL": True},
    "paged_tiles_varlen_causal": {"PAGED": True, "PAGE_TILES": True, "VARLEN_Q": True, "CAUSAL": True},
}
# Variants also registered with the direct (num_splits = 1, q-dtype) output, and in fp16; the
# others differ from these only in code both paths share, so bf16 with fp32 partials suffices.
DIRECT_OUTPUT = ("contiguous_append", "paged_varlen_causal", "paged_tiles_varlen_causal")
FP16 = ("contiguous_append",)
_INT_ARGS = ("seqlen_q", "seqlen_new", "page_size", "heads_per_kv", "queries_per_block", "num_splits",
             "window_left", "window_right", "rotary_half", "rotary_q_step")
# Strides that are multiples of 16 elements for every head dim we take (Triton specialises them).
_ALIGNED_STRIDES = ("q_st", "q_sh", "k_sp", "k_st", "k_sh", "v_sp", "v_st", "v_sh", "kn_st", "kn_sh", "vn_st",
                    "vn_sh", "o_ss", "o_sb", "o_st", "o_sh")


def _configs():
    """Every tile the launcher picks (head dim x BLOCK_M) for each flag set and dtype."""
    order = decode_attention_kernel.arg_names
    for dtype in (torch.bfloat16, torch.float16):
        ptr = pointer_type(dtype)
        for head_dim in HEAD_DIMS:
            for block_m in BLOCK_MS:
                for flags_name, flags in FLAG_SETS.items():
                    if dtype == torch.float16 and flags_name not in FP16:
                        continue
                    outs = ("*fp32", ptr) if dtype == torch.bfloat16 and flags_name in DIRECT_OUTPUT else ("*fp32",)
                    for out_ptr in outs:
                        signature = {name: ptr for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "k_new_ptr",
                                                            "v_new_ptr", "cos_ptr", "sin_ptr")}
                        signature.update({"out_ptr": out_ptr, "lse_ptr": "*fp32", "alibi_ptr": "*fp32"})
                        signature.update({name: "*i32" for name in ("cache_seqlens_ptr", "leftpad_ptr",
                                                                    "block_table_ptr", "cache_rows_ptr",
                                                                    "cu_seqlens_q_ptr")})
                        signature.update({name: "i32" for name in _INT_ARGS})
                        signature.update({"qk_scale": "fp32", "softcap": "fp32"})
                        signature.update({name: "i64" for name in order
                                          if name.endswith(("_sb", "_st", "_sh", "_sp", "_ss"))})
                        for tiles in _tile_choices(head_dim, block_m):
                            yield _config(ptr, out_ptr, head_dim, block_m, flags_name, flags, tiles, order,
                                          dict(signature))


def _tile_choices(head_dim, block_m):
    """The built-in tiles and every sm90 table's, for the compile check."""
    choices = [default_tiles(head_dim, block_m)]
    return choices + [t for t in tuning.tables_choices("decode_attention", tile_key(head_dim, block_m))
                      if t not in choices]


def _config(ptr, out_ptr, head_dim, block_m, flags_name, flags, tiles, order, signature):
    rotate_q = flags.get("HAS_ROTARY", False) and rotate_q_in_kernel(head_dim, block_m)
    constexprs = {"HEAD_DIM": head_dim, **_NO_FLAGS, **flags, "ROTATE_Q": rotate_q, "BLOCK_M": block_m,
                  "BLOCK_N": tiles["BLOCK_N"], "BLOCK_N_NEW": BLOCK_N_NEW, "BLOCK_D": block_d(head_dim)}
    signature.update({name: "constexpr" for name in constexprs})
    split = "split" if out_ptr == "*fp32" else "nosplit"
    warps, stages = tiles["num_warps"], tiles["num_stages"]
    return KernelConfig(
        name=f"decode_attention[{ptr[1:]},D={head_dim},M={block_m},{flags_name},{split},"
             f"N{tiles['BLOCK_N']}w{warps}s{stages}]",
        fn=decode_attention_kernel, signature={n: signature[n] for n in order},
        constexprs=constexprs, num_warps=warps, num_stages=stages, uses_tensor_cores=True,
        divisible_by_16=tuple(n for n in order if (n.endswith("_ptr") and n not in ("cos_ptr", "sin_ptr", "alibi_ptr"))
                              or n in _ALIGNED_STRIDES),
    )


register(_configs())

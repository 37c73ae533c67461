"""Triton kernels of flash_attn_with_kvcache: the cache append, and split-KV attention over a
contiguous or paged KV cache (decode and chunked prefill).

One program handles one KV head of one batch row, a block of queries and one split of the
row's keys. Its BLOCK_M rows are (query, query head) pairs of that KV head's GQA group --
row r is query ``q0 + r // G``, head ``kv_head * G + r % G`` -- so each K/V tile is read once
for all G query heads (28 / 4 heads: 7x less cache traffic than one program per query head),
and the tile product is a tensor-core ``tl.dot`` even at Sq = 1 (G rows, padded to 16).

Contiguous and paged caches share the code: a key slot j lives in block
``block_table[b, j // page_size]`` at slot ``j % page_size``; a contiguous cache is the case
of one page of size S_cache per row (block = the row's cache row), selected by PAGED only
where the block index comes from. Keys are slots ``[leftpad, L)`` with
``L = cache_seqlens[b] + seqlen_new`` (the new tokens are already in the cache); masks align
bottom-right to L exactly as in :mod:`.attention`, whose score function is reused.

Split-KV: the row's visible key range is cut into ``num_splits`` equal chunks (multiples of
BLOCK_N) *inside the kernel*, from the loaded lengths -- no host sync, and each split gets an
equal share of the real length rather than of the cache capacity. Each split writes an fp32
partial output and its LSE (out 0 / lse -inf when it has no keys); the caller combines them
with ``merge_stacked_attention_states``. With one split the kernel writes the final output.

The append (``append_kv_kernel``) is one small launch before the attention: each program
writes one (new token, KV head) row of k and v into its slot -- rotating k first when rotary
tables are given -- and touches nothing else; with rotary tables the same launch writes a
rotated copy of q (B x Sq rows) for the attention kernel.
"""

import torch
import triton
import triton.language as tl

from .attention import HEAD_DIMS, _block_d, _scales, _scores
from .registry import KernelConfig, pointer_type, register


@triton.jit
def _rotary_layout(dims, rotary_half, INTERLEAVED: tl.constexpr):
    """Per dim: its partner in the rotation, its frequency index, whether it is the first of the
    pair, and whether it is rotated at all. Pairs are (2i, 2i+1) interleaved, (i, i + half) otherwise."""
    if INTERLEAVED:
        partner = dims ^ 1
        freq = dims // 2
        first = (dims % 2) == 0
    else:
        partner = tl.where(dims < rotary_half, dims + rotary_half, dims - rotary_half)
        freq = dims % rotary_half
        first = dims < rotary_half
    return partner, freq, first, dims < 2 * rotary_half


@triton.jit
def _rotate(x, other, cos, sin, first, rotated):
    """x cos - partner sin for the first of a pair, x cos + partner sin for the second (fp32, as the reference)."""
    turned = tl.where(first, x * cos - other * sin, x * cos + other * sin)
    return tl.where(rotated, turned, x)


@triton.jit
def decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr, cache_seqlens_ptr, leftpad_ptr, block_table_ptr,
    cache_rows_ptr,
    seqlen_q, seqlen_new, page_size, heads_per_kv, queries_per_block, num_splits, qk_scale, softcap,
    window_left, window_right,
    q_sb, q_st, q_sh, k_sp, k_st, k_sh, v_sp, v_st, v_sh, o_ss, o_sb, o_st, o_sh, lse_ss, lse_sb, lse_sh, bt_sb,
    HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_CACHE_ROWS: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid, b, kv_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_block = pid // num_splits
    split = pid % num_splits
    q0 = q_block * queries_per_block

    # Rows: (query, head of the group) pairs; rows past the block's queries or past Sq are padding.
    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // heads_per_kv
    h = kv_h * heads_per_kv + r % heads_per_kv
    row_ok = (r < queries_per_block * heads_per_kv) & (qi < seqlen_q)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    len_k = tl.load(cache_seqlens_ptr + b) + seqlen_new  # L: keys after the append
    lo = len_k * 0
    if HAS_LEFTPAD:
        lo = tl.load(leftpad_ptr + b)
    # The keys any row of this block can see, bottom-right aligned to L (cf. attention._key_range).
    q_last = tl.minimum(q0 + queries_per_block, seqlen_q) - 1
    offset = len_k - seqlen_q
    window_l = window_left if HAS_WINDOW else -1
    window_r = window_right if HAS_WINDOW else -1
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(hi, q_last + offset + 1)
    elif window_r >= 0:
        hi = tl.minimum(hi, q_last + offset + window_r + 1)
    if window_l >= 0:
        lo = tl.maximum(lo, q0 + offset - window_l)
    hi = tl.maximum(hi, lo)
    # This split's share, in whole BLOCK_N tiles.
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    stop = tl.minimum(hi, start + chunk)

    q_rows = q_ptr + b.to(tl.int64) * q_sb + qi.to(tl.int64) * q_st + h.to(tl.int64) * q_sh
    q = tl.load(q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    cache_row = b.to(tl.int64)
    if HAS_CACHE_ROWS:
        cache_row = tl.load(cache_rows_ptr + b).to(tl.int64)
    k_head = k_cache_ptr + kv_h.to(tl.int64) * k_sh
    v_head = v_cache_ptr + kv_h.to(tl.int64) * v_sh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n_start in range(start, stop, BLOCK_N):
        cols = n_start + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        if PAGED:
            # One block-table entry per key: any page size that BLOCK_N does not divide works too.
            block = tl.load(block_table_ptr + b.to(tl.int64) * bt_sb + cols // page_size, mask=col_ok, other=0)
            slot = block.to(tl.int64) * k_sp + (cols % page_size).to(tl.int64) * k_st
            v_slot = block.to(tl.int64) * v_sp + (cols % page_size).to(tl.int64) * v_st
        else:
            slot = cache_row * k_sp + cols.to(tl.int64) * k_st
            v_slot = cache_row * v_sp + cols.to(tl.int64) * v_st
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        # Rows of D contiguous elements: 16-byte vector loads; num_stages keeps tiles in flight.
        k = tl.load(k_head + slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, k, qi, cols, seqlen_q, len_k, qk_scale, softcap, window_l, window_r,
                    CAUSAL, HAS_SOFTCAP, True)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only hidden keys keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + v_slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    split64 = split.to(tl.int64)
    o_rows = out_ptr + split64 * o_ss + b.to(tl.int64) * o_sb + qi.to(tl.int64) * o_st + h.to(tl.int64) * o_sh
    tl.store(o_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    lse_rows = lse_ptr + split64 * lse_ss + b.to(tl.int64) * lse_sb + h.to(tl.int64) * lse_sh + qi
    tl.store(lse_rows, lse, mask=row_ok)


# ------------------------------------------------------------------------------ launcher

BLOCK_MS = (16, 64)  # 16: decode (G <= 16 rows); 64: several queries per block (chunked prefill)
MAX_GROUP = BLOCK_MS[-1]
MIN_KEYS_PER_SPLIT = 512  # below this a split's fixed cost (q load, partial write, combine) dominates
TARGET_WAVES = 2  # programs per SM the heuristic aims for


def block_n(head_dim: int) -> int:
    return 32 if head_dim > 128 else 64


def _block_m(seqlen_q: int, group: int) -> int:
    return BLOCK_MS[0] if seqlen_q * group <= BLOCK_MS[0] else BLOCK_MS[1]


def _warps_stages(head_dim: int, block_m: int) -> tuple[int, int]:
    # Several K/V tiles in flight (stages) hide HBM latency; 8 warps when the tiles are large.
    if block_m == 64:
        return (8, 2) if head_dim > 128 else (4, 3)
    return 4, 3


def launch_shape(batch: int, seqlen_q: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """(BLOCK_M, queries per block) for a call."""
    group = heads // kv_heads
    block_m = _block_m(seqlen_q, group)
    return block_m, max(1, block_m // group)


def num_splits_heuristic(batch: int, seqlen_q: int, heads: int, kv_heads: int, capacity: int,
                         num_sms: int) -> int:
    """Splits that fill the GPU: about TARGET_WAVES programs per SM, each with >= MIN_KEYS_PER_SPLIT keys.

    Depends on shapes only (the cache capacity, not the lengths), so it never syncs and a
    CUDA graph captured once stays valid.
    """
    _, per_block = launch_shape(batch, seqlen_q, heads, kv_heads)
    programs = max(1, batch * kv_heads * triton.cdiv(seqlen_q, per_block))  # >= 1: empty batches too
    wanted = triton.cdiv(TARGET_WAVES * num_sms, programs)
    return max(1, min(wanted, triton.cdiv(capacity, MIN_KEYS_PER_SPLIT), 128))


def forward(q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad, block_table, cache_batch_idx,
            seqlen_new, softmax_scale, causal, window_size, softcap, num_splits):
    """Fill ``out``/``lse``: (n, B, Sq, H, D) / (n, B, H, Sq) partials, or the final (B, Sq, H, D) / (B, H, Sq)
    when num_splits == 1. The cache already holds the new tokens (and q is already rotated)."""
    batch, seqlen_q, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if batch == 0 or seqlen_q == 0:
        return
    block_m, per_block = launch_shape(batch, seqlen_q, heads, kv_heads)
    # The split dimension's strides (0 without one); lse's last dimension has unit stride.
    if out.dim() == 4:
        o_strides, lse_strides = (0, *out.stride()[:3]), (0, *lse.stride()[:2])
    else:
        o_strides, lse_strides = out.stride()[:4], lse.stride()[:3]
    paged = block_table is not None
    left, right = window_size
    warps, stages = _warps_stages(head_dim, block_m)
    dummy = cache_seqlens  # any int32 tensor for pointers a variant never reads
    grid = (triton.cdiv(seqlen_q, per_block) * num_splits, batch, kv_heads)
    decode_attention_kernel[grid](
        q, k_cache, v_cache, out, lse, cache_seqlens,
        cache_leftpad if cache_leftpad is not None else dummy,
        block_table if paged else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        seqlen_q, seqlen_new, k_cache.shape[1], heads // kv_heads, per_block, num_splits,
        _scales(softmax_scale, softcap), softcap, left, right,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *o_strides, *lse_strides,
        block_table.stride(0) if paged else 0,
        HEAD_DIM=head_dim, PAGED=paged, HAS_LEFTPAD=cache_leftpad is not None,
        HAS_CACHE_ROWS=cache_batch_idx is not None, CAUSAL=causal,
        HAS_WINDOW=left >= 0 or (right >= 0 and not causal), HAS_SOFTCAP=softcap > 0,

        BLOCK_M=block_m, BLOCK_N=block_n(head_dim), BLOCK_D=_block_d(head_dim), num_warps=warps, num_stages=stages,
    )


@triton.jit
def append_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, cache_seqlens_ptr, block_table_ptr, cache_rows_ptr,
    q_ptr, q_out_ptr,
    seqlen_new, seqlen_q, kv_heads, page_size, rotary_half, rotary_q_step,
    k_sb, k_st, k_sh, v_sb, v_st, v_sh, kc_sp, kc_st, kc_sh, vc_sp, vc_st, vc_sh, cos_st, bt_sb,
    q_sb, q_st, q_sh, qo_sb, qo_st, qo_sh,
    HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, HAS_CACHE_ROWS: tl.constexpr, HAS_ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t, b, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    if head < kv_heads:
        if t < seqlen_new:
            _append_row(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, cache_seqlens_ptr, block_table_ptr,
                        cache_rows_ptr, t, b, head, dims, dim_ok, page_size, rotary_half,
                        k_sb, k_st, k_sh, v_sb, v_st, v_sh, kc_sp, kc_st, kc_sh, vc_sp, vc_st, vc_sh, cos_st, bt_sb,
                        PAGED, HAS_CACHE_ROWS, HAS_ROTARY, INTERLEAVED)
    elif HAS_ROTARY:
        # Programs past the KV heads rotate q's rows (query head - kv_heads) into q_out: at
        # cache_seqlens + i when rotary_q_step is 1 (causal / windowed), else all at cache_seqlens
        # (flash-attn's rule). Same launch as the append, and the attention kernel stays lean.
        if t < seqlen_q:
            h = head - kv_heads
            pos = (tl.load(cache_seqlens_ptr + b) + t * rotary_q_step).to(tl.int64)
            q_row = q_ptr + b.to(tl.int64) * q_sb + t.to(tl.int64) * q_st + h.to(tl.int64) * q_sh
            x = tl.load(q_row + dims, mask=dim_ok, other=0.0)
            partner, freq, first, rotated = _rotary_layout(dims, rotary_half, INTERLEAVED)
            other = tl.load(q_row + partner, mask=rotated, other=0.0).to(tl.float32)
            cos = tl.load(cos_ptr + pos * cos_st + freq, mask=rotated, other=1.0).to(tl.float32)
            sin = tl.load(sin_ptr + pos * cos_st + freq, mask=rotated, other=0.0).to(tl.float32)
            x = _rotate(x.to(tl.float32), other, cos, sin, first, rotated).to(q_out_ptr.dtype.element_ty)
            tl.store(q_out_ptr + b.to(tl.int64) * qo_sb + t.to(tl.int64) * qo_st + h.to(tl.int64) * qo_sh + dims, x,
                     mask=dim_ok)


@triton.jit
def _append_row(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, cache_seqlens_ptr, block_table_ptr,
                cache_rows_ptr, t, b, kv_h, dims, dim_ok, page_size, rotary_half,
                k_sb, k_st, k_sh, v_sb, v_st, v_sh, kc_sp, kc_st, kc_sh, vc_sp, vc_st, vc_sh, cos_st, bt_sb,
                PAGED: tl.constexpr, HAS_CACHE_ROWS: tl.constexpr, HAS_ROTARY: tl.constexpr,
                INTERLEAVED: tl.constexpr):
    """New token t of row b, KV head kv_h: k (rotated) and v into their cache slot."""
    pos = tl.load(cache_seqlens_ptr + b) + t
    if PAGED:
        block = tl.load(block_table_ptr + b.to(tl.int64) * bt_sb + pos // page_size).to(tl.int64)
        slot = pos % page_size
    else:
        block = b.to(tl.int64)
        if HAS_CACHE_ROWS:
            block = tl.load(cache_rows_ptr + b).to(tl.int64)
        slot = pos
    k_row = k_ptr + b.to(tl.int64) * k_sb + t.to(tl.int64) * k_st + kv_h.to(tl.int64) * k_sh
    k = tl.load(k_row + dims, mask=dim_ok, other=0.0)
    if HAS_ROTARY:
        partner, freq, first, rotated = _rotary_layout(dims, rotary_half, INTERLEAVED)
        other = tl.load(k_row + partner, mask=rotated, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + pos.to(tl.int64) * cos_st + freq, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos.to(tl.int64) * cos_st + freq, mask=rotated, other=0.0).to(tl.float32)
        k = _rotate(k.to(tl.float32), other, cos, sin, first, rotated).to(k_cache_ptr.dtype.element_ty)
    v = tl.load(v_ptr + b.to(tl.int64) * v_sb + t.to(tl.int64) * v_st + kv_h.to(tl.int64) * v_sh + dims, mask=dim_ok)
    slot64 = slot.to(tl.int64)
    tl.store(k_cache_ptr + block * kc_sp + slot64 * kc_st + kv_h.to(tl.int64) * kc_sh + dims, k, mask=dim_ok)
    tl.store(v_cache_ptr + block * vc_sp + slot64 * vc_st + kv_h.to(tl.int64) * vc_sh + dims, v, mask=dim_ok)


def append_kv(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin,
              interleaved, q, q_out, rotary_per_token):
    """Write k (rotated at cache_seqlens + i when rotary tables are given) and v into their cache slots;
    with rotary tables, also write q rotated into ``q_out`` (per token, or all at cache_seqlens)."""
    batch, seqlen_new, kv_heads, head_dim = k.shape
    paged, rotary = block_table is not None, rotary_cos is not None
    seqlen_q, heads = q.shape[1], q.shape[2]
    rows = max(seqlen_new, seqlen_q if rotary else 0)
    if batch == 0 or rows == 0:
        return
    # Unused pointers get a tensor of the same type (the compiled variant is the registered one).
    rotary_cos = rotary_cos if rotary else k
    rotary_sin = rotary_sin if rotary else k
    q_out = q_out if rotary else q
    append_kv_kernel[(rows, batch, kv_heads + (heads if rotary else 0))](
        k, v, k_cache, v_cache, rotary_cos, rotary_sin, cache_seqlens,
        block_table if paged else cache_seqlens, cache_batch_idx if cache_batch_idx is not None else cache_seqlens,
        q, q_out, seqlen_new, seqlen_q, kv_heads, k_cache.shape[1], rotary_cos.shape[1] if rotary else 0,
        int(rotary_per_token),
        *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        rotary_cos.stride(0) if rotary else 0, block_table.stride(0) if paged else 0,
        *q.stride()[:3], *q_out.stride()[:3],
        HEAD_DIM=head_dim, PAGED=paged, HAS_CACHE_ROWS=cache_batch_idx is not None, HAS_ROTARY=rotary,
        INTERLEAVED=bool(interleaved), BLOCK_D=_block_d(head_dim), num_warps=1, num_stages=1,
    )


def _configs():
    """Every tile the launcher picks (head dim x BLOCK_M x dtype), each with the flag sets that matter:
    a plain contiguous decode, a paged one with every mask option, and a contiguous one with
    leftpad and cache_batch_idx. Outputs are the fp32 partials (split) or the q dtype (no split)."""
    flag_sets = {
        "contiguous": {"PAGED": False, "HAS_LEFTPAD": False, "HAS_CACHE_ROWS": False, "CAUSAL": False,
                       "HAS_WINDOW": False, "HAS_SOFTCAP": False},
        "paged_all_options": {"PAGED": True, "HAS_LEFTPAD": False, "HAS_CACHE_ROWS": False, "CAUSAL": True,
                              "HAS_WINDOW": True, "HAS_SOFTCAP": True},
        "contiguous_rows_leftpad_causal": {"PAGED": False, "HAS_LEFTPAD": True, "HAS_CACHE_ROWS": True,
                                           "CAUSAL": True, "HAS_WINDOW": False, "HAS_SOFTCAP": False},
    }
    int_args = ("seqlen_q", "seqlen_new", "page_size", "heads_per_kv", "queries_per_block", "num_splits",
                "window_left", "window_right")
    stride_args = ("q_sb", "q_st", "q_sh", "k_sp", "k_st", "k_sh", "v_sp", "v_st", "v_sh", "o_ss", "o_sb", "o_st",
                   "o_sh", "lse_ss", "lse_sb", "lse_sh", "bt_sb")
    for dtype in (torch.bfloat16, torch.float16):
        ptr = pointer_type(dtype)
        for head_dim in HEAD_DIMS:
            for block_m in BLOCK_MS:
                for flags_name, flags in flag_sets.items():
                    if dtype == torch.float16 and flags_name != "contiguous":
                        continue  # same code as bf16's; one dtype suffices for the option-heavy variants
                    # Split partials (fp32) / direct output; the latter differs only in its store,
                    # so it is registered for the plain bf16 variant.
                    outs = ("*fp32", ptr) if dtype == torch.bfloat16 and flags_name == "contiguous" else ("*fp32",)
                    for out_ptr in outs:
                        signature = {"q_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr, "out_ptr": out_ptr,
                                     "lse_ptr": "*fp32", "cache_seqlens_ptr": "*i32", "leftpad_ptr": "*i32",
                                     "block_table_ptr": "*i32", "cache_rows_ptr": "*i32"}
                        signature.update({name: "i32" for name in int_args})
                        signature.update({"qk_scale": "fp32", "softcap": "fp32"})
                        signature.update({name: "i64" for name in stride_args})
                        warps, stages = _warps_stages(head_dim, block_m)
                        constexprs = {"HEAD_DIM": head_dim, **flags, "BLOCK_M": block_m,
                                      "BLOCK_N": block_n(head_dim), "BLOCK_D": _block_d(head_dim)}
                        signature.update({name: "constexpr" for name in constexprs})
                        order = decode_attention_kernel.arg_names
                        split = "split" if out_ptr == "*fp32" else "nosplit"
                        yield KernelConfig(
                            name=f"decode_attention[{ptr[1:]},D={head_dim},M={block_m},{flags_name},{split}]",
                            fn=decode_attention_kernel, signature={n: signature[n] for n in order},
                            constexprs=constexprs, num_warps=warps, num_stages=stages, uses_tensor_cores=True,
                            divisible_by_16=tuple(n for n in order if n.endswith("_ptr")
                                                  or n in ("q_st", "q_sh", "k_sp", "k_st", "k_sh", "v_sp", "v_st",
                                                           "v_sh", "o_ss", "o_sb", "o_st", "o_sh")),
                        )


    yield from _append_configs()


def _append_configs():
    """The append for every head dim: plain contiguous, and paged with each rotary layout."""
    flag_sets = {
        "contiguous": {"PAGED": False, "HAS_CACHE_ROWS": False, "HAS_ROTARY": False, "INTERLEAVED": False},
        "contiguous_rows": {"PAGED": False, "HAS_CACHE_ROWS": True, "HAS_ROTARY": False, "INTERLEAVED": False},
        "paged_rotary_interleaved": {"PAGED": True, "HAS_CACHE_ROWS": False, "HAS_ROTARY": True,
                                     "INTERLEAVED": True},
        "paged_rotary_halves": {"PAGED": True, "HAS_CACHE_ROWS": False, "HAS_ROTARY": True, "INTERLEAVED": False},
    }
    order = append_kv_kernel.arg_names
    for dtype in (torch.bfloat16, torch.float16):
        ptr = pointer_type(dtype)
        for head_dim in HEAD_DIMS:
            for flags_name, flags in flag_sets.items():
                if dtype == torch.float16 and flags_name != "contiguous":
                    continue
                signature = {name: ptr for name in ("k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "cos_ptr",
                                                     "sin_ptr")}
                signature.update({"cache_seqlens_ptr": "*i32", "block_table_ptr": "*i32", "cache_rows_ptr": "*i32",
                                  "q_ptr": ptr, "q_out_ptr": ptr})
                signature.update({name: "i32" for name in ("seqlen_new", "seqlen_q", "kv_heads", "page_size",
                                                           "rotary_half", "rotary_q_step")})
                signature.update({name: "i64" for name in order if name.endswith(("_sb", "_st", "_sh", "_sp"))})
                signature["cos_st"] = "i64"
                constexprs = {"HEAD_DIM": head_dim, **flags, "BLOCK_D": _block_d(head_dim)}
                signature.update({name: "constexpr" for name in constexprs})
                yield KernelConfig(
                    name=f"decode_append_kv[{ptr[1:]},D={head_dim},{flags_name}]", fn=append_kv_kernel,
                    signature={n: signature[n] for n in order}, constexprs=constexprs, num_warps=1, num_stages=1,
                    divisible_by_16=tuple(n for n in order if n.endswith("_ptr") and n not in ("cos_ptr", "sin_ptr")),
                )


register(_configs())

"""Triton kernels for log-probabilities through the LM head without materialising the logits.

Notation: hidden h (N, H), weight W (V, H) (``lm_head.weight``), optional bias (V,),
labels y (N,), temperature T; the logits are z = (h @ W^T + bias) / T, never stored whole.

Forward (:func:`logit_stats`): one program per (token block, vocabulary split) walks its
vocabulary tiles; each logits tile is a tensor-core matmul over H in BLOCK_K chunks and is
consumed at once by an online log-sum-exp that also picks the label logit, sums the logits
(label smoothing) and accumulates the entropy. Only (N,)-shaped fp32 statistics leave the
kernel (per split; the splits are merged in PyTorch, O(N x splits)):

    lse = log sum_j exp(z_j),  label_logit = z_y,  sum_logits = sum_j z_j,
    entropy = -sum_j p_j log p_j        (p = softmax(z)).

Every loss of docqa_fast.losses is a function of these four, so one backward covers them
all: with per-row coefficients (a, b, c, d) built from the upstream gradients,

    dL/dz_j = p_j * (a + b * log p_j) + c * [j == y] + d

(lse -> a; label logit -> c; sum of logits -> d; entropy -> a = -H g, b = -g).

Backward (:func:`logit_stats_backward`) walks the vocabulary in chunks of ``Vc`` columns:
``logits_grad_kernel`` recomputes the logits tiles of the chunk and writes dL/dlogits for
(N, Vc) only, then two matmuls consume it: d_weight[chunk] = G^T @ h (the whole reduction
over tokens in one fp32 accumulator: written once, no bf16 drift) and d_hidden += G @
W[chunk] into an fp32 accumulator. Memory beyond inputs and gradients stays a small
fraction of the (N, V) logits at every size (:func:`chunk_columns`, :func:`hidden_rows_per_pass`):
the chunk holds at most 1/CHUNK_FRACTION of the logits' bytes (and at most CHUNK_BYTES), and
the fp32 d_hidden accumulator of 16-bit inputs at most 1/ACCUMULATOR_FRACTION -- when (N, H)
fp32 is larger than that (hidden sizes above V/16 in bf16, e.g. 4096 with a 32K vocabulary)
d_hidden is computed for a group of rows at a time, the later groups recomputing their dL/dlogits.
G is stored in the input dtype, divided by a per-call power-of-two scale (at least the
largest row coefficient) so that tiny gradients (a mean over many tokens) do not flush to
zero in fp16; the matmuls multiply the scale back, exactly.

Chunk kernels (:func:`chunk_stats`, :func:`chunk_grad`): the same online statistics and
the same dL/dz, read from a logits chunk that a library matmul (cuBLAS through ``torch.mm``:
docqa_fast/losses/chunked.py) wrote, instead of computing the logits tiles themselves. The
forward kernels also record, per LOG_P_TILE vocabulary columns, an upper bound of log p
over the tokens that count (z - the running max, never below z - lse), which lets the
backward leave out tiles whose every softmax value is negligible.

fp32 inputs are computed as accurately as PyTorch computes them, on the GPU as under the
interpreter: IEEE FMAs (``input_precision="ieee"``, no TF32); every reduction over a long
axis (H in the logits, tokens or vocabulary in the backward matmuls) adds short K blocks,
each a product from zero, with an error-free TwoSum (:func:`dot_accumulate`), where one sequential
FMA chain over thousands of terms drifts by tens of ulps; exp is libdevice's (torch's expf,
within 2 ulp) instead of ``ex2.approx`` of x log2(e), whose error grows with |x|; divisions
are correctly rounded. fp16/bf16 keep the fast forms: tensor cores (HGMMA on sm_90)
accumulating in place, ``ex2.approx``.
"""

import itertools

import torch
import triton
import triton.language as tl

from .exact_math import exact_div, exact_exp, dot_accumulate, dot_result
from . import tuning
from .registry import KernelConfig, pointer_type, register

# The built-in tiles, one entry per dtype, used where the GPU's tuned table (kernels/tuned/,
# kernels/tuning.py) has none: "losses_logits" for the forward's and the backward's logits tiles
# (BLOCK_N tokens x BLOCK_V vocabulary columns, the matmul over the hidden size in BLOCK_K steps),
# "losses_matmul" for the backward's two matmuls (C tile BLOCK_M x BLOCK_N, K steps, L2 grouping).
# They compile for sm_90 without spills, also unaligned; not yet measured. 16-bit: 64-row tiles
# are the M of one warpgroup MMA (HGMMA); 8 warps split the 64 x 128 fp32 logits tile so the
# online softmax state stays in registers; K steps of 32 keep the unaligned loads from spilling.
# fp32 multiplies with IEEE FMAs (no tensor cores) on smaller tiles.
LOGITS_PARAMS = ("BLOCK_N", "BLOCK_V", "BLOCK_K", "num_warps", "num_stages")
MATMUL_PARAMS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_LOGITS_TILES = {torch.float16: (64, 128, 32, 8, 4), torch.bfloat16: (64, 128, 32, 8, 4),
                 torch.float32: (32, 64, 32, 8, 2)}
_MATMUL_TILES = {torch.float16: (64, 128, 32, 8, 8, 4), torch.bfloat16: (64, 128, 32, 8, 8, 4),
                 torch.float32: (32, 64, 32, 8, 8, 2)}
# "losses_chunks": the path whose products are library matmuls (docqa_fast/losses/chunked.py).
# PRODUCTS picks who multiplies: 1 = the library (cuBLAS through torch.mm), 2 = the Triton
# kernels above (the whole all-Triton path then runs, with its own tiles); CHUNK_COLUMNS caps
# the vocabulary columns of one logits chunk (the memory budget may cut it further); BLOCK_N x
# BLOCK_V, num_warps, num_stages are the tiles of the chunk kernels (chunk_stats, chunk_grad),
# which stream the chunk from memory. Not yet measured on a GPU: library products because
# cuBLAS multiplies bf16 at ~2.5x the rate of the Triton matmuls on the H200; 8K columns make
# each product a large matmul; 16 x 256 tiles on 8 warps hold 16 logits per thread (123
# registers on sm_90, 16 warps resident per SM for these memory-bound kernels; 4 warps took
# 212) and give an 8K-token chunk 512 programs.
CHUNKS_PARAMS = ("PRODUCTS", "CHUNK_COLUMNS", "BLOCK_N", "BLOCK_V", "num_warps", "num_stages")
LIBRARY_PRODUCTS, TRITON_PRODUCTS = 1, 2
_CHUNKS_TILES = {torch.float16: (1, 8192, 16, 256, 8, 2), torch.bfloat16: (1, 8192, 16, 256, 8, 2),
                 torch.float32: (1, 4096, 16, 128, 4, 2)}
# "losses_route": when a loss's upstream gradient is one scalar known only in the backward (a
# "mean" or "sum" cross-entropy that needs gradients), ROUTE picks 1 = the statistics forward
# and a backward that recomputes the logits (4 products), or 2 = the gradients computed in the
# forward and only scaled by the backward (3 products: docqa_fast/losses/forward_grad.py). 1
# until a GPU measures 2 faster. CHUNK_ROWS caps the rows of one chunk of route 2, which holds
# their logits over the whole vocabulary in 16 bits; the memory budget sets them below the cap
# (chunked.forward_grad_plan: 2,752 rows at 8K tokens through Qwen2.5's head, 0.86 GiB). Each
# chunk adds its G^T h to all of d_weight, reading and writing it (4-8 bytes per element, ~0.5-1
# ms on an H200), so the built-in cap leaves the budget in charge; not yet measured.
ROUTE_PARAMS = ("ROUTE", "CHUNK_ROWS")
RECOMPUTE_ROUTE, FORWARD_GRAD_ROUTE = 1, 2
_ROUTE_TILES = {dtype: (RECOMPUTE_ROUTE, 16384) for dtype in (torch.float16, torch.bfloat16, torch.float32)}
tuning.declare("losses_logits", LOGITS_PARAMS)
tuning.declare("losses_matmul", MATMUL_PARAMS)
tuning.declare("losses_chunks", CHUNKS_PARAMS)
tuning.declare("losses_route", ROUTE_PARAMS)
_TILES = {"losses_logits": (_LOGITS_TILES, LOGITS_PARAMS), "losses_matmul": (_MATMUL_TILES, MATMUL_PARAMS),
          "losses_chunks": (_CHUNKS_TILES, CHUNKS_PARAMS), "losses_route": (_ROUTE_TILES, ROUTE_PARAMS)}
# Columns per entry of the log p bound the forward records (one entry per LOG_P_TILE vocabulary
# columns); the package passes its own constant (docqa_fast/losses/ops.py), the same number.
LOG_P_TILE = 128


def tile_key(dtype) -> str:
    return pointer_type(dtype)[1:]  # "bf16", "fp16", "fp32"


def default_tiles(kernel: str, dtype) -> dict:
    table, params = _TILES[kernel]
    return dict(zip(params, table[dtype]))


def tiles(kernel: str, dtype, device) -> dict:
    """The tiles a launch of ``kernel`` on ``device`` uses (the tuned table's or the built-in ones)."""
    return tuning.lookup(kernel, tile_key(dtype), default_tiles(kernel, dtype), device)


def launch_tiles(kernel: str, dtype, device, run):
    """run(tiles) with the device's tiles; tuned ones that do not compile fall back to the built-in."""
    return tuning.launch(kernel, tile_key(dtype), default_tiles(kernel, dtype), device, run)


# Forward: split the vocabulary until about this many programs run (two waves on an H100's
# 132 SMs), so short answers (few token blocks) still fill the GPU. A constant, not the
# device's SM count, so results are bitwise the same on every device.
TARGET_PROGRAMS = 264
# Backward memory, relative to the (N, V) logits the fused loss never builds (bytes of N x V
# in the input dtype): the (N, Vc) chunk of dL/dlogits holds at most 1/CHUNK_FRACTION of them
# and at most CHUNK_BYTES (at 128K tokens x 152K vocabulary the cap binds: ~300 chunks of 512
# columns, each a large matmul), never less than one tile of columns; the fp32 d_hidden
# accumulator of 16-bit inputs at most 1/ACCUMULATOR_FRACTION. Together under a fifth of the logits.
CHUNK_BYTES = 128 << 20
CHUNK_FRACTION = 16
ACCUMULATOR_FRACTION = 8
@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv, inv_temperature,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z = (h[rows] @ W[cols]^T + bias[cols]) / T in fp32; columns past the vocabulary are -inf."""
    ks = tl.arange(0, BLOCK_K)
    # int64 offsets: rows * stride passes 2^31 at 128K tokens x 8K hidden.
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hn + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wv + ks[:, None]  # W^T tile: (BLOCK_K, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    err = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k in range(0, H, BLOCK_K):
        k_ok = ks < H - k
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc, err = dot_accumulate(h, w, acc, err)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = dot_result(acc, err, h_ptr.dtype.element_ty == tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _online_update(z, col_ok, m, s, t, ACCURATE: tl.constexpr):
    """One tile of the online log-sum-exp: (m, s, t) after the tile, and z - m for its columns.

    The running state per row is the max m, the sum s = sum exp(z - m) and t = sum exp(z - m)
    * (z - m); the entropy is log s - t / s at the end, relative to the max, so it does not
    cancel when the logits are large. Masked columns hold -inf: exp gives 0 there.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = exact_exp(m - m_new, ACCURATE)
    shifted = z - m_new[:, None]
    e = exact_exp(shifted, ACCURATE)
    # Rescale t to the new max: sum e^(z-m)(z-m_new) = alpha * (t + s (m - m_new)).
    t = alpha * (t + s * (m - m_new)) + tl.sum(e * tl.where(col_ok[None, :], shifted, 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, t, shifted


@triton.jit
def _record_log_p_bound(bound_ptr, shifted, counted, col0, n_bound_tiles,
                        BLOCK_V: tl.constexpr, LOG_P_TILE: tl.constexpr):
    """bound[tile] = max(bound[tile], z - m) over the counted rows, per LOG_P_TILE columns from col0.

    z - m (m the running max after this tile) is never below log p = z - lse, as lse >= the
    final max >= m: an upper bound of the softmax of every counted token in the tile, without
    knowing lse yet. col0 is a multiple of LOG_P_TILE when BLOCK_V >= LOG_P_TILE, and of
    BLOCK_V (which divides LOG_P_TILE) otherwise.
    """
    column_max = tl.max(tl.where(counted[:, None], shifted, float("-inf")), axis=0)
    if BLOCK_V >= LOG_P_TILE:
        tiles = col0 // LOG_P_TILE + tl.arange(0, BLOCK_V // LOG_P_TILE)
        tile_max = tl.max(tl.reshape(column_max, (BLOCK_V // LOG_P_TILE, LOG_P_TILE)), axis=1)
        tl.atomic_max(bound_ptr + tiles, tile_max, mask=tiles < n_bound_tiles)
    else:
        tl.atomic_max(bound_ptr + col0 // LOG_P_TILE, tl.max(column_max, axis=0))


@triton.jit
def _scaled_logits_grad(z, rows, row_ok, cols, col_ok, labels_ptr, lse_ptr, coef_ptr, coef_stride, scale_ptr,
                        ignore_index, ACCURATE: tl.constexpr):
    """dL/dz / scale for a tile (rows x cols) of logits z; ``coef_ptr`` holds the planes a, b, c, d
    (``coef_stride`` apart), ``scale_ptr`` the power-of-two scale (dividing by it is exact)."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    b = tl.load(coef_ptr + coef_stride + rows, mask=row_ok, other=0.0)
    c = tl.load(coef_ptr + 2 * coef_stride + rows, mask=row_ok, other=0.0)
    d = tl.load(coef_ptr + 3 * coef_stride + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    inv_scale = exact_div(1.0, tl.load(scale_ptr), ACCURATE)
    return _logits_grad(z, cols, col_ok, labels, lse, a, b, c, d, ignore_index, ACCURATE) * inv_scale


@triton.jit
def _logits_grad(z, cols, col_ok, labels, lse, a, b, c, d, ignore_index, ACCURATE: tl.constexpr):
    """dL/dz_j = p_j (a + b log p_j) + c [j == label] + d for a tile (rows x cols) of logits z.

    Rows whose coefficients are all 0 give 0: their lse may be 0 (an ignored row the forward did
    not compute), where exp(z - lse) can overflow and inf * 0 would make NaN.
    """
    # Masked columns: p = exp(-inf) = 0, and log p is set to 0 so no 0 * inf arises.
    p = exact_exp(z - lse[:, None], ACCURATE)
    log_p = tl.where(col_ok[None, :], z - lse[:, None], 0.0)
    grad = p * (a[:, None] + b[:, None] * log_p)
    is_label = (cols[None, :] == labels[:, None]) & (labels != ignore_index)[:, None]
    grad += tl.where(is_label, c[:, None], 0.0) + d[:, None]
    active = (a != 0.0) | (b != 0.0) | (c != 0.0) | (d != 0.0)
    return tl.where(active[:, None], grad, 0.0)


@triton.jit
def logit_stats_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, part_ptr, bound_ptr,
    N, V, H, stride_hn, stride_wv, ignore_index, inv_temperature, tiles_per_split, n_bound_tiles, record_bound,
    HAS_BIAS: tl.constexpr, LOG_P_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per (token block, vocabulary split): the split's lse, label logit, logit sum and entropy.

    ``part_ptr`` is (4, n_splits, N) fp32; with ``record_bound`` (0 or 1), ``bound_ptr`` the
    per-tile log p bound (see _record_log_p_bound; a split's running max is below the lse too).
    """
    ACCURATE: tl.constexpr = h_ptr.dtype.element_ty == tl.float32
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    has_label = labels != ignore_index

    # A finite start (not -inf) so the first rescale computes 0 * finite, never 0 * inf.
    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    label_logit = tl.zeros((BLOCK_N,), tl.float32)
    sum_logits = tl.zeros((BLOCK_N,), tl.float32)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first_tile, last_tile):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                         inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K)
        m, s, t, shifted = _online_update(z, col_ok, m, s, t, ACCURATE)
        if record_bound:
            _record_log_p_bound(bound_ptr, shifted, row_ok & has_label, tile * BLOCK_V, n_bound_tiles,
                                BLOCK_V, LOG_P_TILE)
        # col_ok: a label past the vocabulary (unchecked bad input) matches no masked column either.
        is_label = (cols[None, :] == labels[:, None]) & has_label[:, None] & col_ok[None, :]
        label_logit += tl.sum(tl.where(is_label, z, 0.0), axis=1)
        sum_logits += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)

    log_s = tl.log(s)
    out = part_ptr + split * N + rows
    plane = n_splits * N
    tl.store(out, m + log_s, mask=row_ok)
    tl.store(out + plane, label_logit, mask=row_ok)
    tl.store(out + 2 * plane, sum_logits, mask=row_ok)
    tl.store(out + 3 * plane, log_s - exact_div(t, s, ACCURATE), mask=row_ok)


@triton.jit
def logits_grad_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, coef_ptr, scale_ptr, g_ptr,
    N, H, stride_hn, stride_wv, stride_gn, v_start, v_end, ignore_index, inv_temperature,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """G[:, cols - v_start] = dL/dz / scale for the vocabulary columns [v_start, v_end).

    coef_ptr is (4, N) fp32: rows a, b, c, d of dL/dz_j = p_j (a + b log p_j) + c [j == y] + d.
    The temperature's 1/T (dz/dlogits) is folded into the matmuls' scale, not applied here.
    """
    ACCURATE: tl.constexpr = h_ptr.dtype.element_ty == tl.float32
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_end
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv,
                     inv_temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K)
    grad = _scaled_logits_grad(z, rows, row_ok, cols, col_ok, labels_ptr, lse_ptr, coef_ptr, N, scale_ptr,
                               ignore_index, ACCURATE)
    g_ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_gn + (cols - v_start)[None, :]
    tl.store(g_ptrs, grad.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def scaled_matmul_kernel(
    a_ptr, b_ptr, c_ptr, scale_ptr,
    M, N, K, stride_a, stride_bk, stride_cm,
    TRANS_A: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (+)= scale * (A @ B) with an fp32 accumulator; B and C have unit column stride.

    A is (M, K) row-major with row stride ``stride_a``, or with TRANS_A the transpose of a
    row-major (K, M) array (unit stride along M, ``stride_a`` along K): d_weight multiplies
    G^T without a copy. ACCUMULATE adds to C (the fp32 d_hidden accumulator).
    """
    # Grouped order: GROUP_M row blocks share their B columns while they sit in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_size
    pid_n = (pid % (GROUP_M * blocks_n)) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    if TRANS_A:
        a_ptrs = a_ptr + rk.to(tl.int64)[None, :] * stride_a + rm[:, None]
    else:
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_a + rk[None, :]
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * stride_bk + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    err = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = rk < K - k
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc, err = dot_accumulate(a, b, acc, err)
        if TRANS_A:
            a_ptrs += BLOCK_K * stride_a.to(tl.int64)
        else:
            a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk.to(tl.int64)
    acc = dot_result(acc, err, a_ptr.dtype.element_ty == tl.float32) * tl.load(scale_ptr)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    c_ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _chunk_logits(z_ptr, b_ptr, rows, cols, row_ok, col_ok, stride_z, v_start, inv_temperature,
                  HAS_BIAS: tl.constexpr):
    """(z + bias) / T for a tile of a logits chunk that a library matmul wrote (fp32 or the inputs'
    dtype); columns past the chunk are -inf."""
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return _chunk_transform(z.to(tl.float32), b_ptr, cols, col_ok, v_start, inv_temperature, HAS_BIAS)


@triton.jit
def _chunk_transform(z, b_ptr, cols, col_ok, v_start, inv_temperature, HAS_BIAS: tl.constexpr):
    """(z + bias) / T of a tile of raw fp32 logits; columns past the chunk are -inf."""
    if HAS_BIAS:
        z += tl.load(b_ptr + v_start + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], z * inv_temperature, float("-inf"))


@triton.jit
def chunk_stats_kernel(
    z_ptr, b_ptr, labels_ptr, state_ptr, bound_ptr, copy_ptr,
    n_rows, width, stride_z, stride_copy, v_start, state_stride, lane_stride, lane_span, n_bound_tiles, ignore_index,
    inv_temperature, first, record_bound, HAS_BIAS: tl.constexpr, ACCURATE: tl.constexpr, COPY: tl.constexpr,
    LOG_P_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Fold the logits chunk z (n_rows x width, vocabulary columns from v_start) into the rows' state.

    ``state_ptr`` holds five planes of ``state_stride`` fp32 each: the running max m, s, t of
    :func:`_online_update`, the label logit and the sum of the logits; ``first`` (0 or 1)
    starts them (the chunk holding column 0); ``record_bound`` adds the chunk to the log p
    bound. One program walks a block of rows across the chunk, so the state stays in registers.
    With COPY, the raw chunk is also written to ``copy_ptr`` (rows ``stride_copy`` apart) in that
    array's dtype: the forward-gradient route keeps its rows' logits in 16 bits while it takes
    the statistics from the fp32 products (chunked.stats_and_grads). Lanes (program axis 1):
    lane j folds columns [j lane_span, (j + 1) lane_span) into its own state, ``lane_stride``
    from lane 0's (merge_lanes combines them), so a chunk of few rows still has programs enough.
    """
    pid = tl.program_id(0)
    lane = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    has_label = labels != ignore_index
    state = state_ptr + lane * lane_stride + rows
    # Later chunks carry the state on; the first starts from m = -1e30 (finite: the first
    # rescale is 0 * finite, never 0 * inf) and zeros.
    carried = row_ok & (first == 0)
    m = tl.load(state, mask=carried, other=-1.0e30)
    s = tl.load(state + state_stride, mask=carried, other=0.0)
    t = tl.load(state + 2 * state_stride, mask=carried, other=0.0)
    label_logit = tl.load(state + 3 * state_stride, mask=carried, other=0.0)
    sum_logits = tl.load(state + 4 * state_stride, mask=carried, other=0.0)
    for c0 in range(lane * lane_span, tl.minimum(width, lane * lane_span + lane_span), BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        col_ok = cols < tl.minimum(width, lane * lane_span + lane_span)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        raw = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + cols[None, :], mask=tile_ok, other=0.0)
        if COPY:
            tl.store(copy_ptr + rows.to(tl.int64)[:, None] * stride_copy + cols[None, :],
                     raw.to(copy_ptr.dtype.element_ty), mask=tile_ok)
        z = _chunk_transform(raw.to(tl.float32), b_ptr, cols, col_ok, v_start, inv_temperature, HAS_BIAS)
        m, s, t, shifted = _online_update(z, col_ok, m, s, t, ACCURATE)
        if record_bound:
            _record_log_p_bound(bound_ptr, shifted, row_ok & has_label, v_start + c0, n_bound_tiles,
                                BLOCK_V, LOG_P_TILE)
        # col_ok: the columns past this chunk are the next chunk's (and past the vocabulary, none).
        is_label = ((v_start + cols)[None, :] == labels[:, None]) & has_label[:, None] & col_ok[None, :]
        label_logit += tl.sum(tl.where(is_label, z, 0.0), axis=1)
        sum_logits += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
    tl.store(state, m, mask=row_ok)
    tl.store(state + state_stride, s, mask=row_ok)
    tl.store(state + 2 * state_stride, t, mask=row_ok)
    tl.store(state + 3 * state_stride, label_logit, mask=row_ok)
    tl.store(state + 4 * state_stride, sum_logits, mask=row_ok)


@triton.jit
def chunk_grad_kernel(
    z_ptr, g_ptr, b_ptr, labels_ptr, lse_ptr, coef_ptr, scale_ptr,
    n_rows, width, stride_z, stride_g, v_start, coef_stride, ignore_index, inv_temperature,
    HAS_BIAS: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """G = dL/dz / scale, in G's dtype, for a logits chunk z (n_rows x width, columns from v_start).

    coef_ptr holds the planes a, b, c, d (``coef_stride`` apart) of :func:`_logits_grad`. G may
    be z itself (fp32 inputs: each element is read and written by the same thread), else a
    separate 16-bit buffer the gradient matmuls take at full tensor-core rate.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < width
    z = _chunk_logits(z_ptr, b_ptr, rows, cols, row_ok, col_ok, stride_z, v_start, inv_temperature, HAS_BIAS)
    grad = _scaled_logits_grad(z, rows, row_ok, v_start + cols, col_ok, labels_ptr, lse_ptr, coef_ptr, coef_stride,
                               scale_ptr, ignore_index, ACCURATE)
    g_ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :]
    tl.store(g_ptrs, grad.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ------------------------------------------------------------------------------ launchers

def _vocab_splits(n_rows: int, vocab: int, block_n: int, block_v: int) -> tuple[int, int]:
    """(tiles per split, number of splits): enough programs for TARGET_PROGRAMS, whole tiles each."""
    vocab_tiles = triton.cdiv(vocab, block_v)
    wanted = max(1, min(vocab_tiles, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(max(n_rows, 1), block_n))))
    per_split = triton.cdiv(vocab_tiles, wanted)
    return per_split, triton.cdiv(vocab_tiles, per_split)


def _bias_arg(bias, weight):
    # Triton needs a pointer even when HAS_BIAS is off; the weight is never read through it.
    return (bias, True) if bias is not None else (weight, False)


def logit_stats(hidden, weight, bias, labels, ignore_index: int, temperature: float, bound=None,
                log_p_tile: int = LOG_P_TILE):
    """(lse, label_logit, sum_logits, entropy), each (N,) fp32, of z = (hidden @ weight^T + bias) / T.

    hidden (N, H) and weight (V, H) of one dtype with unit stride along H; bias (V,) or
    None; labels (N,) int64. ``bound`` (cdiv(V, log_p_tile),) fp32, when given, is raised to
    an upper bound of log p per tile of columns over the rows whose label counts.
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]

    def run(t):
        per_split, n_splits = _vocab_splits(n_rows, vocab, t["BLOCK_N"], t["BLOCK_V"])
        parts = torch.empty((4, n_splits, n_rows), dtype=torch.float32, device=hidden.device)
        if n_rows:
            bias_ptr, has_bias = _bias_arg(bias, weight)
            logit_stats_kernel[(triton.cdiv(n_rows, t["BLOCK_N"]), n_splits)](
                hidden, weight, bias_ptr, labels, parts, parts if bound is None else bound,
                n_rows, vocab, hidden_size, hidden.stride(0), weight.stride(0), ignore_index, 1.0 / temperature,
                per_split, triton.cdiv(vocab, log_p_tile), int(bound is not None), HAS_BIAS=has_bias,
                LOG_P_TILE=log_p_tile, **t,
            )
        return parts

    parts = launch_tiles("losses_logits", hidden.dtype, hidden.device, run)
    split_lse, label_logit, sum_logits, split_entropy = parts.unbind(0)
    if parts.shape[1] == 1:  # separate tensors, not views of one buffer (a custom op's outputs may not alias)
        return split_lse[0].clone(), label_logit[0].clone(), sum_logits[0].clone(), split_entropy[0].clone()
    lse = torch.logsumexp(split_lse, dim=0)
    # Split s holds probability mass pi_s = exp(lse_s - lse); H = sum pi_s (H_s + lse - lse_s).
    mass = torch.exp(split_lse - lse)
    entropy = (mass * (split_entropy + (lse - split_lse))).sum(0)
    return lse, label_logit.sum(0), sum_logits.sum(0), entropy


def chunk_stats(z, bias, labels, state, bound, v_start: int, first: bool, ignore_index: int, temperature: float,
                accurate: bool, tiles: dict, log_p_tile: int = LOG_P_TILE, copy=None) -> None:
    """Fold the fp32 logits chunk z (rows x width; vocabulary columns from v_start) into ``state``.

    state: (5, rows) fp32 view (m, s, t, label logit, logit sum; planes state.stride(0) apart),
    or (lanes, 5, rows): each lane folds its share of the columns into its own planes (see
    chunk_stats_kernel; :func:`merge_lanes` makes one state of them); started here when
    ``first``; labels (rows,) int64; bound as for :func:`logit_stats` or None; copy: None, or a
    (rows, width) array (unit column stride) that receives z in its dtype.
    """
    n_rows, width = z.shape
    if n_rows == 0 or width == 0:
        return
    if copy is not None and (copy.shape != z.shape or copy.stride(1) != 1):
        raise ValueError(f"copy of shape {tuple(copy.shape)} and strides {copy.stride()}: expected {tuple(z.shape)} "
                         "with unit column stride")
    lanes, lane_stride = (state.shape[0], state.stride(0)) if state.dim() == 3 else (1, 0)
    planes = state if state.dim() == 2 else state[0]
    lane_span = triton.cdiv(triton.cdiv(width, lanes), tiles["BLOCK_V"]) * tiles["BLOCK_V"]
    bias_arg, has_bias = _bias_arg(bias, z)
    chunk_stats_kernel[(triton.cdiv(n_rows, tiles["BLOCK_N"]), lanes)](
        z, bias_arg, labels, planes, planes if bound is None else bound, z if copy is None else copy,
        n_rows, width, z.stride(0), 0 if copy is None else copy.stride(0), v_start, planes.stride(0), lane_stride,
        lane_span, 0 if bound is None else bound.numel(), ignore_index, 1.0 / temperature, int(first),
        int(bound is not None),
        HAS_BIAS=has_bias, ACCURATE=accurate, COPY=copy is not None, LOG_P_TILE=log_p_tile, BLOCK_N=tiles["BLOCK_N"],
        BLOCK_V=tiles["BLOCK_V"], num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )


def stat_lanes(n_rows: int, width: int, tiles: dict) -> int:
    """Lanes for chunk_stats over chunks of ``n_rows`` x ``width``: enough programs for
    TARGET_PROGRAMS (as the all-Triton forward splits its vocabulary), whole BLOCK_V tiles each."""
    return max(1, min(triton.cdiv(width, tiles["BLOCK_V"]),
                      triton.cdiv(TARGET_PROGRAMS, triton.cdiv(max(n_rows, 1), tiles["BLOCK_N"]))))


def merge_lanes(state):
    """(5, rows) fp32: the lanes of a (lanes, 5, rows) chunk_stats state made one.

    Each lane holds m_j, s_j = sum exp(z - m_j), t_j = sum exp(z - m_j) (z - m_j) over its columns;
    relative to M = max m_j: s = sum a_j s_j and t = sum a_j (t_j + s_j (m_j - M)), a_j = exp(m_j - M)
    (a lane that saw no column has s_j = t_j = 0 and m_j = -1e30: a_j = 0).
    """
    m, s, t, label_logit, sum_logits = state.unbind(1)
    top = m.amax(0)
    alpha = torch.exp(m - top)
    return torch.stack([top, (alpha * s).sum(0), (alpha * (t + s * (m - top))).sum(0), label_logit.sum(0),
                        sum_logits.sum(0)])


def chunk_grad(z, g, bias, labels, lse, coefs, scale, v_start: int, ignore_index: int, temperature: float,
               accurate: bool, tiles: dict) -> None:
    """g = dL/dz / scale for the fp32 logits chunk z (rows x width, columns from v_start); g may be z.

    lse (rows,), coefs (4, rows) (planes coefs.stride(0) apart), scale (1,) fp32 on the device.
    """
    n_rows, width = z.shape
    if n_rows == 0 or width == 0:
        return
    bias_arg, has_bias = _bias_arg(bias, z)
    grid = (triton.cdiv(n_rows, tiles["BLOCK_N"]), triton.cdiv(width, tiles["BLOCK_V"]))
    chunk_grad_kernel[grid](
        z, g, bias_arg, labels, lse, coefs, scale,
        n_rows, width, z.stride(0), g.stride(0), v_start, coefs.stride(0), ignore_index, 1.0 / temperature,
        HAS_BIAS=has_bias, ACCURATE=accurate, BLOCK_N=tiles["BLOCK_N"], BLOCK_V=tiles["BLOCK_V"],
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )


def _matmul(a, b, c, scale, *, trans_a: bool, accumulate: bool) -> None:
    """c (+)= scale * (a @ b); with trans_a, ``a`` is given as the (K, M) array to transpose."""
    k, m = a.shape if trans_a else a.shape[::-1]
    n = b.shape[1]
    if m == 0 or n == 0:
        return

    def run(t):
        grid = (triton.cdiv(m, t["BLOCK_M"]) * triton.cdiv(n, t["BLOCK_N"]),)
        scaled_matmul_kernel[grid](a, b, c, scale, m, n, k, a.stride(0), b.stride(0), c.stride(0),
                                   TRANS_A=trans_a, ACCUMULATE=accumulate, **t)

    launch_tiles("losses_matmul", a.dtype, a.device, run)


def chunk_columns(n_rows: int, vocab: int, dtype: torch.dtype, total_rows: int | None = None,
                  block_v: int | None = None) -> int:
    """Vocabulary columns per backward chunk of dL/dlogits for ``n_rows`` tokens.

    Whole tiles of ``block_v`` columns (the logits tiles'; by default the built-in ones), as
    many as fit in min(CHUNK_BYTES, 1/CHUNK_FRACTION of the call's logits: ``total_rows``
    (default ``n_rows``) x ``vocab`` in ``dtype``) but at least one tile, then spread evenly
    over the chunks that takes (no narrow last chunk). Below the CHUNK_BYTES cap that is at
    most 2 x CHUNK_FRACTION chunks, however small the call.
    """
    block_v = block_v or default_tiles("losses_logits", dtype)["BLOCK_V"]
    total_rows = n_rows if total_rows is None else total_rows
    budget = min(CHUNK_BYTES, total_rows * vocab * dtype.itemsize // CHUNK_FRACTION)
    vocab_tiles = triton.cdiv(vocab, block_v)
    count = min(vocab_tiles, max(1, budget // max(1, n_rows * block_v * dtype.itemsize)))
    return triton.cdiv(vocab_tiles, triton.cdiv(vocab_tiles, count)) * block_v


def hidden_rows_per_pass(n_rows: int, vocab: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Tokens whose d_hidden one walk over the vocabulary accumulates (in fp32, for 16-bit inputs).

    All of them when their (N, H) fp32 accumulator fits in 1/ACCUMULATOR_FRACTION of the
    logits' bytes (H <= V / 16 in bf16: Qwen2.5, Llama 3); otherwise whole row tiles that
    fit (at least one), and each further group of rows walks the vocabulary again. fp32
    inputs accumulate in the gradient itself: no extra memory, one walk.
    """
    if dtype == torch.float32:
        return n_rows
    block_n = default_tiles("losses_logits", dtype)["BLOCK_N"]
    fit = n_rows * vocab * dtype.itemsize // ACCUMULATOR_FRACTION // (hidden_size * 4) // block_n * block_n
    return min(n_rows, max(block_n, fit))


def split_runs(runs, columns: int):
    """The (start, end) column ranges ``runs`` cut into pieces of at most ``columns``, spread evenly."""
    for start, end in runs:
        pieces = triton.cdiv(end - start, columns)
        step = triton.cdiv(end - start, pieces)
        for v_start in range(start, end, step):
            yield v_start, min(end, v_start + step)


def _walk_vocabulary(hidden, weight, bias, labels, lse, coefs, scale, out_scale, ignore_index, temperature,
                     total_rows, runs, d_weight=None, d_bias=None, d_hidden=None):
    """dL/dlogits of these tokens over the column ranges ``runs``, chunk by chunk, consumed at
    once by the gradients given (columns outside the runs contribute nothing).

    d_weight / d_bias: written for every chunk (``hidden`` holds every token then).
    d_hidden: an fp32 (R, H) accumulator, R <= the tokens here, += G[:R] @ W[chunk].
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    block_v = tiles("losses_logits", hidden.dtype, hidden.device)["BLOCK_V"]
    columns = chunk_columns(n_rows, vocab, hidden.dtype, total_rows, block_v)
    grad = torch.empty((n_rows, columns), dtype=hidden.dtype, device=hidden.device)
    bias_ptr, has_bias = _bias_arg(bias, weight)
    for v_start, v_end in split_runs(runs, columns):
        width = v_end - v_start

        def run(t):
            logits_grad_kernel[(triton.cdiv(n_rows, t["BLOCK_N"]), triton.cdiv(width, t["BLOCK_V"]))](
                hidden, weight, bias_ptr, labels, lse, coefs, scale, grad,
                n_rows, hidden_size, hidden.stride(0), weight.stride(0), grad.stride(0), v_start, v_end,
                ignore_index, 1.0 / temperature, HAS_BIAS=has_bias, **t,
            )

        launch_tiles("losses_logits", hidden.dtype, hidden.device, run)
        chunk = grad[:, :width]
        if d_weight is not None:  # d_weight[chunk] = G^T @ hidden: every token in one fp32 accumulator
            _matmul(chunk, hidden, d_weight[v_start:v_end], out_scale, trans_a=True, accumulate=False)
        if d_bias is not None:
            d_bias[v_start:v_end] = chunk.sum(0, dtype=torch.float32) * out_scale
        if d_hidden is not None:  # d_hidden += G @ W[chunk], accumulated over the chunks in fp32
            _matmul(chunk[:d_hidden.shape[0]], weight[v_start:v_end], d_hidden, out_scale, trans_a=False,
                    accumulate=True)


def gradient_scale(coefs, temperature: float):
    """(scale, out_scale), (1,) fp32 on the device: G = (dL/dz) / scale is what the 16-bit gradient
    chunks hold, and G * out_scale = dL/dlogits (out_scale = scale / T).

    |dL/dz| <= |a| + |b| / e + |c| + |d| per row; the scale is the power of two above that
    bound, so G lies in (-1, 1) -- fp16 keeps its precision however small the upstream
    gradient -- and dividing by it and multiplying back are exact. No host sync.
    """
    bound = coefs.abs().sum(0).amax().clamp_min(torch.finfo(torch.float32).tiny)
    scale = torch.ldexp(torch.ones_like(bound), torch.frexp(bound).exponent).reshape(1)
    return scale, scale / temperature


def logit_stats_backward(hidden, weight, bias, labels, lse, coefs, ignore_index: int, temperature: float,
                         need_hidden: bool, need_weight: bool, need_bias: bool, runs=None, out_dtype=None):
    """Gradients (d_hidden, d_weight, d_bias) of a loss whose dL/dz rows are given by ``coefs`` (4, N).

    Gradients come back in ``out_dtype`` (default: the inputs' dtype; fp32 keeps fp16 inputs'
    gradients unrounded); unneeded ones as empty tensors. Nothing of
    size (N, V) is allocated: see :func:`chunk_columns` and :func:`hidden_rows_per_pass`.
    ``runs``: the (start, end) vocabulary column ranges to compute (default: all); columns
    outside them contribute nothing (the caller knows their softmax is negligible).
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    out_dtype = out_dtype or weight.dtype
    d_hidden = torch.zeros((n_rows, hidden_size) if need_hidden else (0,), dtype=out_dtype, device=device)
    d_weight = torch.zeros((vocab, hidden_size) if need_weight else (0,), dtype=out_dtype, device=device)
    d_bias = torch.zeros((vocab,) if need_bias else (0,), dtype=torch.float32, device=device)
    if n_rows and vocab and (need_hidden or need_weight or need_bias):
        scale, out_scale = gradient_scale(coefs, temperature)
        group = hidden_rows_per_pass(n_rows, vocab, hidden_size, hidden.dtype) if need_hidden else n_rows
        accumulator = None
        if need_hidden:  # fp32 gradients accumulate in themselves
            accumulator = d_hidden if d_hidden.dtype == torch.float32 else torch.zeros(
                (group, hidden_size), dtype=torch.float32, device=device)
        # The first walk covers every token (d_weight reduces over all of them at once) and the
        # first group's d_hidden; each later group of rows walks the vocabulary again for its own.
        for r0 in range(0, n_rows, group):
            r1 = min(n_rows, r0 + group)
            rows = slice(0, n_rows) if r0 == 0 else slice(r0, r1)
            if r0 > 0:
                accumulator.zero_()
            _walk_vocabulary(
                hidden[rows], weight, bias, labels[rows], lse[rows], coefs[:, rows].contiguous(), scale, out_scale,
                ignore_index, temperature, n_rows, [(0, vocab)] if runs is None else runs,
                d_weight=d_weight if need_weight and r0 == 0 else None,
                d_bias=d_bias if need_bias and r0 == 0 else None,
                d_hidden=accumulator[:r1 - r0] if need_hidden else None)
            if need_hidden and accumulator is not d_hidden:
                d_hidden[r0:r1] = accumulator[:r1 - r0]
    return d_hidden, d_weight, d_bias.to(out_dtype)


# --------------------------------------------------------------------------- configurations

def _configs():
    """Every (kernel, dtype, variant, alignment) the launchers above compile."""
    stats_signature = {
        "h_ptr": "IN", "w_ptr": "IN", "b_ptr": "IN", "labels_ptr": "*i64", "part_ptr": "*fp32", "bound_ptr": "*fp32",
        "N": "i32", "V": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32", "ignore_index": "i32",
        "inv_temperature": "fp32", "tiles_per_split": "i32", "n_bound_tiles": "i32", "record_bound": "i32",
        "HAS_BIAS": "constexpr", "LOG_P_TILE": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
        "BLOCK_K": "constexpr",
    }
    grad_signature = {
        "h_ptr": "IN", "w_ptr": "IN", "b_ptr": "IN", "labels_ptr": "*i64", "lse_ptr": "*fp32",
        "coef_ptr": "*fp32", "scale_ptr": "*fp32", "g_ptr": "IN",
        "N": "i32", "H": "i32", "stride_hn": "i32", "stride_wv": "i32", "stride_gn": "i32",
        "v_start": "i32", "v_end": "i32", "ignore_index": "i32", "inv_temperature": "fp32",
        "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr",
    }
    matmul_signature = {
        "a_ptr": "IN", "b_ptr": "IN", "c_ptr": "OUT", "scale_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
        "stride_a": "i32", "stride_bk": "i32", "stride_cm": "i32",
        "TRANS_A": "constexpr", "ACCUMULATE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
    }
    # Integers are typed as the launcher types Python ints that fit 32 bits (strides at H <= 8192);
    # the kernels widen them to int64 before multiplying by row indices.
    # Aligned: 16-byte aligned tensors and hidden size / row strides multiples of 16 (every
    # real model: hidden 896-8192, vocab 32000 / 152064); unaligned: none of it.
    aligned = {
        "logit_stats": ("h_ptr", "w_ptr", "b_ptr", "labels_ptr", "part_ptr", "bound_ptr", "H", "stride_hn",
                        "stride_wv"),
        "logits_grad": ("h_ptr", "w_ptr", "b_ptr", "labels_ptr", "lse_ptr", "coef_ptr", "g_ptr", "H",
                        "stride_hn", "stride_wv", "stride_gn"),
        "scaled_matmul": ("a_ptr", "b_ptr", "c_ptr", "N", "K", "stride_a", "stride_bk", "stride_cm"),
    }
    for dtype in _LOGITS_TILES:
        ptr = pointer_type(dtype)
        # fp32 multiplies in IEEE fp32 on purpose (exact against the fp32 reference): no tensor cores.
        for alignment, logits in itertools.product(("aligned", "unaligned"), _choices("losses_logits", dtype)):
            name = "{BLOCK_N}x{BLOCK_V}x{BLOCK_K}w{num_warps}s{num_stages}".format(**logits)
            launch = {"num_warps": logits["num_warps"], "num_stages": logits["num_stages"],
                      "uses_tensor_cores": dtype != torch.float32}
            constexprs = {k: logits[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K")}
            for has_bias in (False, True):
                for kind, fn, signature in (("logit_stats", logit_stats_kernel, stats_signature),
                                            ("logits_grad", logits_grad_kernel, grad_signature)):
                    extra = {"LOG_P_TILE": LOG_P_TILE} if kind == "logit_stats" else {}
                    yield KernelConfig(
                        name=f"{kind}[{ptr[1:]}{',bias' if has_bias else ''},{name},{alignment}]", fn=fn,
                        signature={arg: ptr if t == "IN" else t for arg, t in signature.items()},
                        constexprs={"HAS_BIAS": has_bias, **extra, **constexprs},
                        divisible_by_16=aligned[kind] if alignment == "aligned" else (), **launch)
        for alignment, mm in itertools.product(("aligned", "unaligned"), _choices("losses_matmul", dtype)):
            name = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}g{GROUP_M}w{num_warps}s{num_stages}".format(**mm)
            launch = {"num_warps": mm["num_warps"], "num_stages": mm["num_stages"],
                      "uses_tensor_cores": dtype != torch.float32}
            constexprs = {k: mm[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
            # d_weight: A = G^T, C in the weight's dtype (or fp32: the forward-gradient route's fp16
            # gradients, logit_stats_backward's out_dtype); d_hidden: C = the fp32 accumulator.
            roles = [("d_weight", True, False, ptr), ("d_hidden", False, True, "*fp32")]
            if dtype == torch.float16:
                roles.append(("d_weight32", True, False, "*fp32"))
            for role, trans_a, accumulate, out in roles:
                yield KernelConfig(
                    name=f"scaled_matmul[{ptr[1:]},{role},{name},{alignment}]", fn=scaled_matmul_kernel,
                    signature={arg: ptr if t == "IN" else out if t == "OUT" else t
                               for arg, t in matmul_signature.items()},
                    constexprs={"TRANS_A": trans_a, "ACCUMULATE": accumulate, **constexprs},
                    divisible_by_16=aligned["scaled_matmul"] if alignment == "aligned" else (), **launch)
        yield from _chunk_configs(dtype, ptr)


def _chunk_configs(dtype, ptr):
    """The chunk kernels: the logits chunk is fp32 (the library matmul's fp32 output), G the
    inputs' dtype (fp32 inputs: G is the chunk itself), the bias the inputs' dtype. 16-bit inputs
    also compile the forward-gradient route's pair: chunk_stats copying the chunk to 16 bits
    (COPY), and chunk_grad reading that 16-bit copy (z of the inputs' dtype, G in place)."""
    stats_signature = {
        "z_ptr": "*fp32", "b_ptr": ptr, "labels_ptr": "*i64", "state_ptr": "*fp32", "bound_ptr": "*fp32",
        "copy_ptr": ptr, "n_rows": "i32", "width": "i32", "stride_z": "i32", "stride_copy": "i32", "v_start": "i32",
        "state_stride": "i32", "lane_stride": "i32", "lane_span": "i32", "n_bound_tiles": "i32", "ignore_index": "i32",
        "inv_temperature": "fp32",
        "first": "i32", "record_bound": "i32", "HAS_BIAS": "constexpr", "ACCURATE": "constexpr", "COPY": "constexpr",
        "LOG_P_TILE": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
    }
    grad_signature = {
        "z_ptr": "*fp32", "g_ptr": ptr, "b_ptr": ptr, "labels_ptr": "*i64", "lse_ptr": "*fp32",
        "coef_ptr": "*fp32", "scale_ptr": "*fp32", "n_rows": "i32", "width": "i32", "stride_z": "i32",
        "stride_g": "i32", "v_start": "i32", "coef_stride": "i32", "ignore_index": "i32", "inv_temperature": "fp32",
        "HAS_BIAS": "constexpr", "ACCURATE": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr",
    }
    aligned = {"chunk_stats": ("z_ptr", "b_ptr", "labels_ptr", "state_ptr", "bound_ptr", "copy_ptr", "width",
                               "stride_z", "stride_copy", "v_start", "state_stride", "lane_span"),
               "chunk_grad": ("z_ptr", "g_ptr", "b_ptr", "labels_ptr", "lse_ptr", "coef_ptr", "width", "stride_z",
                              "stride_g", "v_start", "coef_stride")}
    accurate = dtype == torch.float32
    # Tile sets that differ only in PRODUCTS or CHUNK_COLUMNS compile the same kernels.
    kernel_tiles = list({tuple(t[k] for k in CHUNKS_PARAMS[2:]): {k: t[k] for k in CHUNKS_PARAMS[2:]}
                         for t in _choices("losses_chunks", dtype)}.values())
    for alignment, t in itertools.product(("aligned", "unaligned"), kernel_tiles):
        name = "{BLOCK_N}x{BLOCK_V}w{num_warps}s{num_stages}".format(**t)
        variants = [("chunk_stats", chunk_stats_kernel, stats_signature, {"COPY": False}, ""),
                    ("chunk_grad", chunk_grad_kernel, grad_signature, {}, "")]
        if not accurate:  # the forward-gradient route's pair
            variants += [("chunk_stats", chunk_stats_kernel, stats_signature, {"COPY": True}, ",copy"),
                         ("chunk_grad", chunk_grad_kernel, {**grad_signature, "z_ptr": ptr}, {}, ",z16")]
        for has_bias in (False, True):
            for kind, fn, signature, flags, tag in variants:
                extra = {"LOG_P_TILE": LOG_P_TILE} if kind == "chunk_stats" else {}
                yield KernelConfig(
                    name=f"{kind}[{ptr[1:]}{',bias' if has_bias else ''}{tag},{name},{alignment}]", fn=fn,
                    signature=signature, num_warps=t["num_warps"], num_stages=t["num_stages"],
                    constexprs={"HAS_BIAS": has_bias, "ACCURATE": accurate, **flags, **extra,
                                "BLOCK_N": t["BLOCK_N"], "BLOCK_V": t["BLOCK_V"]},
                    divisible_by_16=aligned[kind] if alignment == "aligned" else ())


def _choices(kernel, dtype):
    """The built-in tiles and every sm90 table's, for the compile check."""
    choices = [default_tiles(kernel, dtype)]
    return choices + [t for t in tuning.tables_choices(kernel, tile_key(dtype)) if t not in choices]


register(_configs())

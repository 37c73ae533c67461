"""Triton kernels for reward-ensemble scoring: K linear heads on the last token of each sequence.

Forward: each program takes BLOCK_B sequences, gathers their scoring rows (the caller passes
each sequence's token index; the kernel turns it into the row's offset), multiplies them by
the K heads with fp32 accumulation, adds the bias, and writes the rewards plus the ensemble
statistics (mean, unbiased variance, min) -- one launch reads only the B gathered rows and
the (K, H) weights, never the other tokens.

Backward, one launch: G = dL/d rewards (B, K) is folded from the gradients of the rewards
and of the statistics inside the kernel. Programs owning BLOCK_H hidden columns walk all
sequences for d W = G^T @ rows and d bias; the input gradient is either the scoring rows'
G @ W (B, H) (sparse, the caller scatters) or the dense gradient of the input's shape, written
once by fill programs -- zeros, with the scoring rows' values in place (no zeroed tensor
followed by a scatter: the dense write is the whole cost, the byte floor of the backward).

Both matrix products go through tl.dot (tensor cores for fp16/bf16; for fp32 the
"ieee" precision keeps full fp32, as the reference computes). K is padded to a power of
two >= 16, the smallest tile tl.dot takes; padded heads are masked out of every result.

fp32 inputs are reduced as accurately as PyTorch reduces them (see kernels/losses.py,
``dot_accumulate``): the forward walks H in blocks of FP32_FORWARD_BLOCK_H, each product from zero joining the
running sum through TwoSum, and the backward's d W sums its sequence blocks the same way --
``acc += tl.dot(...)`` is otherwise compiled into one FMA chain over all of H (or all
sequences) on the GPU. The statistics divide correctly rounded for fp32.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import tuning
from .exact_math import exact_div, dot_accumulate, dot_result
from .registry import KernelConfig, pointer_type, register

MAX_HEADS = 64
HEAD_TILES = (16, 32, 64)  # K rounded up to a power of two, >= 16
BLOCK_B = 16  # sequences per forward program / per backward step
FORWARD_BLOCK_H = 128
BACKWARD_BLOCK_H = 64
# fp32: the forward's K blocks are short FMA chains, summed with compensation; the backward
# keeps a compensation term beside d W, so its column slice halves to stay in registers
# (64 heads x 64 columns spilled).
FP32_FORWARD_BLOCK_H = 32
FP32_BACKWARD_BLOCK_H = 32
NUM_WARPS = 4
# The dense input gradient: rows and hidden columns per store of the backward's fill programs
# (the one-hot product that places the scoring rows needs 16 rows, tl.dot's smallest tile).
FILL_ROWS = 16
FILL_BLOCK_H = 256
# Pipeline depth of both kernels' loops: launched and registered alike.
NUM_STAGES = 3


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scoring_tokens(token_ptr, seqs, seq_ok, num_tokens):
    """Each sequence's scoring token, clamped to [0, num_tokens): unchecked bad indices
    (check=False) give a wrong row, never an out-of-bounds read or write."""
    tok = tl.load(token_ptr + seqs, mask=seq_ok, other=0).to(tl.int64)
    return tl.minimum(tl.maximum(tok, 0), num_tokens - 1)


# K is never compiled as a constant: the statistics convert it to fp32 (K.to), which a constant
# 1 (one head: Triton specialises an int argument equal to 1) does not have.
@triton.jit(do_not_specialize=("K",))
def reward_heads_forward_kernel(
    x_ptr, token_ptr, seq_stride, token_stride, num_tokens, w_ptr, bias_ptr, rewards_ptr, mean_ptr, var_ptr,
    min_ptr, B, H, K,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    seqs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    seq_ok = seqs < B
    heads = tl.arange(0, BLOCK_K)
    head_ok = heads < K
    # int64 element offsets of each sequence's scoring row (B*T*H passes 2^31 at 32K tokens):
    # padded input has sequence b's row in batch row b (seq_stride = stride(0)), packed input
    # in its only one (seq_stride = 0).
    rows = seqs.to(tl.int64) * seq_stride + _scoring_tokens(token_ptr, seqs, seq_ok, num_tokens) * token_stride
    cols = tl.arange(0, BLOCK_H)

    acc = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    err = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        col_ok = (h0 + cols) < H
        x = tl.load(x_ptr + rows[:, None] + (h0 + cols)[None, :], mask=seq_ok[:, None] & col_ok[None, :], other=0.0)
        # W is (K, H) row-major; read the (BLOCK_H, BLOCK_K) transposed tile directly.
        w = tl.load(w_ptr + heads[None, :] * H + (h0 + cols)[:, None], mask=col_ok[:, None] & head_ok[None, :],
                    other=0.0)
        acc, err = dot_accumulate(x, w, acc, err)
    acc = dot_result(acc, err, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)[None, :]

    tl.store(rewards_ptr + seqs[:, None] * K + heads[None, :], acc, mask=seq_ok[:, None] & head_ok[None, :])
    valid = head_ok[None, :]
    mean = exact_div(tl.sum(tl.where(valid, acc, 0.0), axis=1), K.to(tl.float32), IEEE)
    centered = tl.where(valid, acc - mean[:, None], 0.0)
    # Unbiased variance; a single head has no spread, so K = 1 gives 0 (not 0/0 = NaN).
    var = exact_div(tl.sum(centered * centered, axis=1), tl.maximum(K - 1, 1).to(tl.float32), IEEE)
    lowest = tl.min(tl.where(valid, acc, float("inf")), axis=1)
    tl.store(mean_ptr + seqs, mean, mask=seq_ok)
    tl.store(var_ptr + seqs, var, mask=seq_ok)
    tl.store(min_ptr + seqs, lowest, mask=seq_ok)


# Which gradients of the forward's outputs reach the backward (a run-time bit mask: autograd
# leaves out those of unused outputs, and a constant per combination would compile 16 variants).
GRAD_REWARDS, GRAD_MEAN, GRAD_VAR, GRAD_MIN = 1, 2, 4, 8


@triton.jit
def _folded_grad(seqs, seq_ok, heads, head_ok, K, rewards_ptr, mean_ptr, min_ptr, g_rewards_ptr, g_mean_ptr,
                 g_var_ptr, g_min_ptr, GRADS, IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """G = dL/d rewards (BLOCK_B, BLOCK_K) fp32 with the statistics' gradients folded in, in the
    order and roundings of the reference (ops._fold_statistics_grad); 0 outside the batch/heads."""
    ok = seq_ok[:, None] & head_ok[None, :]
    at = seqs[:, None] * K + heads[None, :]
    g = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    if (GRADS & 1) != 0:
        g += tl.load(g_rewards_ptr + at, mask=ok, other=0.0)
    if (GRADS & 2) != 0:
        g_mean = tl.load(g_mean_ptr + seqs, mask=seq_ok, other=0.0)
        g += exact_div(g_mean, K.to(tl.float32), IEEE)[:, None]
    if (GRADS & 4) != 0:
        if K > 1:
            g_var = tl.load(g_var_ptr + seqs, mask=seq_ok, other=0.0)
            rewards = tl.load(rewards_ptr + at, mask=ok, other=0.0)
            mean = tl.load(mean_ptr + seqs, mask=seq_ok, other=0.0)
            g += exact_div((g_var * 2)[:, None] * (rewards - mean[:, None]), (K - 1).to(tl.float32), IEEE)
    if (GRADS & 8) != 0:
        # Ties share the gradient equally, as torch.amin's does.
        rewards = tl.load(rewards_ptr + at, mask=ok, other=0.0)
        lowest = tl.load(min_ptr + seqs, mask=seq_ok, other=0.0)
        at_min = tl.where(ok & (rewards == lowest[:, None]), 1.0, 0.0)
        ties = tl.maximum(tl.sum(at_min, axis=1), 1.0)
        g_min = tl.load(g_min_ptr + seqs, mask=seq_ok, other=0.0)
        g += exact_div(g_min[:, None] * at_min, ties[:, None], IEEE)
    return tl.where(ok, g, 0.0)


@triton.jit
def _backward_columns(
    x_ptr, token_ptr, seq_stride, token_stride, num_tokens, w_ptr, rewards_ptr, mean_ptr, min_ptr,
    g_rewards_ptr, g_mean_ptr, g_var_ptr, g_min_ptr, grad_x_ptr, grad_w_ptr, grad_b_ptr, B, H, K, GRADS, pid,
    HAS_BIAS: tl.constexpr, SPARSE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Hidden columns [pid * BLOCK_H, +BLOCK_H) over all sequences: d W, d bias (pid 0), and with
    SPARSE the gradient rows G @ W into grad_x (B, H)."""
    heads = tl.arange(0, BLOCK_K)
    head_ok = heads < K
    cols = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    # This program's slice of W stays in registers for every sequence block.
    w = tl.load(w_ptr + heads[:, None] * H + cols[None, :], mask=head_ok[:, None] & col_ok[None, :], other=0.0)
    grad_w = tl.zeros((BLOCK_K, BLOCK_H), tl.float32)
    grad_w_err = tl.zeros((BLOCK_K, BLOCK_H), tl.float32)
    grad_b = tl.zeros((BLOCK_K,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        seqs = b0 + tl.arange(0, BLOCK_B)
        seq_ok = seqs < B
        g = _folded_grad(seqs, seq_ok, heads, head_ok, K, rewards_ptr, mean_ptr, min_ptr, g_rewards_ptr,
                         g_mean_ptr, g_var_ptr, g_min_ptr, GRADS, IEEE, BLOCK_B, BLOCK_K)
        rows = seqs.to(tl.int64) * seq_stride + _scoring_tokens(token_ptr, seqs, seq_ok, num_tokens) * token_stride
        tile_ok = seq_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] + cols[None, :], mask=tile_ok, other=0.0)
        # Like autograd of a linear layer: the gradient is cast to the input dtype for the
        # products, which accumulate in fp32.
        g_in = g.to(x.dtype)
        if SPARSE:
            grad_rows = _dot(g_in, w, IEEE)
            tl.store(grad_x_ptr + seqs[:, None].to(tl.int64) * H + cols[None, :],
                     grad_rows.to(grad_x_ptr.dtype.element_ty), mask=tile_ok)
        grad_w, grad_w_err = dot_accumulate(tl.trans(g_in), x, grad_w, grad_w_err)
        if HAS_BIAS:
            grad_b += tl.sum(g, axis=0)
    grad_w = dot_result(grad_w, grad_w_err, IEEE)
    tl.store(grad_w_ptr + heads[:, None] * H + cols[None, :], grad_w.to(grad_w_ptr.dtype.element_ty),
             mask=head_ok[:, None] & col_ok[None, :])
    if HAS_BIAS:
        if pid == 0:
            tl.store(grad_b_ptr + heads, grad_b.to(grad_b_ptr.dtype.element_ty), mask=head_ok)


@triton.jit
def _first_at_or_after(token_ptr, B, num_tokens, row):
    """The first sequence whose (clamped) scoring row is >= row, over rows sorted by sequence."""
    lo = tl.zeros((), tl.int32)
    hi = tl.zeros((), tl.int32) + B
    while lo < hi:
        mid = (lo + hi) // 2
        tok = tl.minimum(tl.maximum(tl.load(token_ptr + mid).to(tl.int64), 0), num_tokens - 1)
        if tok < row:
            lo = mid + 1
        else:
            hi = mid
    return lo


@triton.jit
def _backward_fill(
    token_ptr, num_tokens, w_ptr, rewards_ptr, mean_ptr, min_ptr, g_rewards_ptr, g_mean_ptr, g_var_ptr, g_min_ptr,
    grad_x_ptr, B, H, K, GRADS, rows_per_seq, num_rows, ROWS_SORTED, block,
    IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    FILL_ROWS: tl.constexpr, FILL_BLOCK_H: tl.constexpr,
):
    """Rows [block * FILL_ROWS, +FILL_ROWS) of the dense input gradient (num_rows, H): zeros,
    except the scoring rows among them (sequence b's is b * rows_per_seq + its token:
    rows_per_seq = T padded, 0 packed), which get G @ W.

    Only the sequences that can score a row of the block are visited: padded, those whose
    batch rows the block spans; packed with rows sorted by sequence (cu_seqlens), the range two
    binary searches find; otherwise (last_index) all of them."""
    heads = tl.arange(0, BLOCK_K)
    head_ok = heads < K
    r0 = block.to(tl.int64) * FILL_ROWS
    r = r0 + tl.arange(0, FILL_ROWS)
    row_ok = r < num_rows
    if rows_per_seq > 0:
        b_start = r0 // rows_per_seq
        b_end = tl.minimum((r0 + FILL_ROWS - 1) // rows_per_seq + 1, B)
    elif ROWS_SORTED != 0:
        b_start = _first_at_or_after(token_ptr, B, num_tokens, r0).to(tl.int64)
        b_end = _first_at_or_after(token_ptr, B, num_tokens, r0 + FILL_ROWS).to(tl.int64)
    else:
        b_start = r0 * 0
        b_end = r0 * 0 + B
    # G of this block's scoring rows, gathered by a one-hot product (a row scored twice sums;
    # dot_accumulate: fp32 products start from zero, as everywhere in these kernels).
    g_rows = tl.zeros((FILL_ROWS, BLOCK_K), tl.float32)
    g_err = tl.zeros((FILL_ROWS, BLOCK_K), tl.float32)
    hits = tl.full((), 0, tl.int32)
    for b0 in range(b_start, b_end, BLOCK_B):
        seqs = (b0 + tl.arange(0, BLOCK_B)).to(tl.int32)
        seq_ok = seqs < b_end
        flat = seqs.to(tl.int64) * rows_per_seq + _scoring_tokens(token_ptr, seqs, seq_ok, num_tokens)
        hit = (r[:, None] == flat[None, :]) & seq_ok[None, :]
        n_hit = tl.sum(hit.to(tl.int32))
        if n_hit > 0:
            g = _folded_grad(seqs, seq_ok, heads, head_ok, K, rewards_ptr, mean_ptr, min_ptr, g_rewards_ptr,
                             g_mean_ptr, g_var_ptr, g_min_ptr, GRADS, IEEE, BLOCK_B, BLOCK_K)
            g_in = g.to(grad_x_ptr.dtype.element_ty)
            g_rows, g_err = dot_accumulate(hit.to(g_in.dtype), g_in, g_rows, g_err)
            hits += n_hit
    g_rows = dot_result(g_rows, g_err, IEEE)
    cols = tl.arange(0, FILL_BLOCK_H)
    for h0 in range(0, H, FILL_BLOCK_H):
        col_ok = (h0 + cols) < H
        if hits > 0:
            w = tl.load(w_ptr + heads[:, None] * H + (h0 + cols)[None, :], mask=head_ok[:, None] & col_ok[None, :],
                        other=0.0)
            values = _dot(g_rows.to(w.dtype), w, IEEE)
        else:
            values = tl.zeros((FILL_ROWS, FILL_BLOCK_H), tl.float32)
        tl.store(grad_x_ptr + r[:, None] * H + (h0 + cols)[None, :], values.to(grad_x_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=("K", "GRADS", "ROWS_SORTED"))
def reward_heads_backward_kernel(
    x_ptr, token_ptr, seq_stride, token_stride, num_tokens, w_ptr,
    rewards_ptr, mean_ptr, min_ptr, g_rewards_ptr, g_mean_ptr, g_var_ptr, g_min_ptr,
    grad_x_ptr, grad_w_ptr, grad_b_ptr,
    B, H, K, GRADS, rows_per_seq, num_rows, ROWS_SORTED,
    HAS_BIAS: tl.constexpr, SPARSE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    FILL_ROWS: tl.constexpr, FILL_BLOCK_H: tl.constexpr,
):
    """The whole backward in one launch: the first cdiv(H, BLOCK_H) programs own hidden columns
    (_backward_columns); without SPARSE the others write the dense input gradient, FILL_ROWS
    rows each (_backward_fill) -- zero-fill and scatter in one pass over the gradient, so no
    row is written twice and no zeroed tensor is read back."""
    pid = tl.program_id(0)
    n_col_programs = tl.cdiv(H, BLOCK_H)
    if pid < n_col_programs:
        _backward_columns(x_ptr, token_ptr, seq_stride, token_stride, num_tokens, w_ptr, rewards_ptr, mean_ptr,
                          min_ptr, g_rewards_ptr, g_mean_ptr, g_var_ptr, g_min_ptr, grad_x_ptr, grad_w_ptr,
                          grad_b_ptr, B, H, K, GRADS, pid, HAS_BIAS, SPARSE, IEEE, BLOCK_B, BLOCK_H, BLOCK_K)
    else:
        if not SPARSE:
            _backward_fill(token_ptr, num_tokens, w_ptr, rewards_ptr, mean_ptr, min_ptr, g_rewards_ptr, g_mean_ptr,
                           g_var_ptr, g_min_ptr, grad_x_ptr, B, H, K, GRADS, rows_per_seq, num_rows, ROWS_SORTED,
                           pid - n_col_programs, IEEE, BLOCK_B, BLOCK_K, FILL_ROWS, FILL_BLOCK_H)


def _head_tile(num_heads: int) -> int:
    if not 1 <= num_heads <= MAX_HEADS:
        raise ValueError(f"number of heads {num_heads} is outside the supported [1, {MAX_HEADS}]")
    return max(16, triton.next_power_of_2(num_heads))


# Rows per step, hidden columns per step or per program, and warps: the built-in values above
# unless the device's tuned table (kernels/tuned/, kernels/tuning.py) has measured ones, keyed by
# the input dtype (fp32 runs other, compensated code) and the head tile (K padded).
_PARAMS = ("BLOCK_B", "BLOCK_H", "num_warps")
tuning.declare("reward_forward", _PARAMS)
tuning.declare("reward_backward", _PARAMS)
# The dense input gradient's fill tile, tunable on its own under the same key (the sparse
# backward launches no fill programs and keeps the built-in tile).
tuning.declare("reward_backward_fill", ("FILL_ROWS", "FILL_BLOCK_H"))
DEFAULT_FILL = {"FILL_ROWS": FILL_ROWS, "FILL_BLOCK_H": FILL_BLOCK_H}


def tile_key(dtype, num_heads: int) -> str:
    return f"{pointer_type(dtype)[1:]},K={_head_tile(num_heads)}"


def default_tiles(kernel: str, dtype) -> dict:
    if kernel == "reward_forward":
        block_h = FP32_FORWARD_BLOCK_H if dtype == torch.float32 else FORWARD_BLOCK_H
    else:
        block_h = FP32_BACKWARD_BLOCK_H if dtype == torch.float32 else BACKWARD_BLOCK_H
    return {"BLOCK_B": BLOCK_B, "BLOCK_H": block_h, "num_warps": NUM_WARPS}


def _rows(x, token_index):
    """(seq_stride, token_stride, num_tokens, rows_per_seq) of padded (B, T, H) or packed (total, H) x."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1), x.shape[1], x.shape[1]
    return 0, x.stride(0), x.shape[0], 0


def forward(x, token_index, weight, bias, rewards, mean, var, minimum) -> None:
    """Score each sequence's row (padded x (B, T, H): ``x[b, token_index[b]]``; packed x
    (total, H): ``x[token_index[b]]``) with ``weight`` (K, H); fill the fp32 outputs.

    ``x`` has a contiguous last dimension; ``weight`` is contiguous with x's dtype; indices
    outside the rows are clamped to them.
    """
    B = token_index.numel()
    K, H = weight.shape
    if B == 0:
        return
    seq_stride, token_stride, num_tokens, _ = _rows(x, token_index)

    def run(t):
        reward_heads_forward_kernel[(triton.cdiv(B, t["BLOCK_B"]),)](
            x, token_index, seq_stride, token_stride, num_tokens, weight, bias if bias is not None else weight,
            rewards, mean, var, minimum, B, H, K, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
            BLOCK_K=_head_tile(K), num_stages=NUM_STAGES, **t,
        )

    tuning.launch("reward_forward", tile_key(x.dtype, K), default_tiles("reward_forward", x.dtype), x.device, run)


def backward(x, token_index, weight, rewards, mean, minimum, grads, grad_x, grad_weight, grad_bias,
             sparse: bool, rows_sorted: bool = False) -> None:
    """The backward of :func:`forward` in one launch.

    ``grads`` = (d rewards (B, K), d mean, d var, d min (B,)), fp32, any of them None (no
    gradient); they are folded into G = dL/d rewards in the kernel. Writes grad_weight (K, H)
    = G^T @ rows, grad_bias (K,) = sum of G (if not None) and either (``sparse``) the scoring
    rows' gradient G @ W into grad_x (B, H), or the dense input gradient into grad_x
    (x's shape, contiguous): zeros except at the scoring rows. ``rows_sorted``: packed x's
    scoring rows increase with the sequence (cu_seqlens), so the fill searches instead of
    scanning every sequence (an unsorted index then misses rows, never reads out of bounds).
    """
    B = token_index.numel()
    K, H = weight.shape
    seq_stride, token_stride, num_tokens, rows_per_seq = _rows(x, token_index)
    num_rows = 0 if sparse else grad_x.numel() // max(H, 1)
    flags = sum(bit for bit, g in zip((GRAD_REWARDS, GRAD_MEAN, GRAD_VAR, GRAD_MIN), grads) if g is not None)
    g_rewards, g_mean, g_var, g_min = (g if g is not None else rewards for g in grads)
    if H == 0:
        return

    key = tile_key(x.dtype, K)

    def run(t, fill):
        grid = triton.cdiv(H, t["BLOCK_H"]) + triton.cdiv(num_rows, fill["FILL_ROWS"])
        reward_heads_backward_kernel[(grid,)](
            x, token_index, seq_stride, token_stride, num_tokens, weight, rewards, mean, minimum,
            g_rewards, g_mean, g_var, g_min, grad_x, grad_weight, grad_bias if grad_bias is not None else grad_weight,
            B, H, K, flags, rows_per_seq, num_rows, int(rows_sorted),
            HAS_BIAS=grad_bias is not None, SPARSE=sparse, IEEE=x.dtype == torch.float32, BLOCK_K=_head_tile(K),
            num_stages=NUM_STAGES, **t, **fill,
        )

    def with_fill(fill):
        return tuning.launch("reward_backward", key, default_tiles("reward_backward", x.dtype), x.device,
                             lambda t: run(t, fill))

    if sparse:
        with_fill(DEFAULT_FILL)
        return
    # Nested: tuned fill tiles that do not compile fall back to the built-in ones like the others.
    tuning.launch("reward_backward_fill", key, DEFAULT_FILL, x.device, with_fill)


def _configs():
    """The (kernel, dtype, head tile, bias, sparse) variants the launchers above compile.

    The scoring rows are gathered, so their pointers carry no alignment hint beyond H; the
    aligned variant (H a multiple of 16, as every model hidden size is) is the one that
    matters, the unaligned one must still compile clean.
    """
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ptr = pointer_type(dtype)
        tensor_cores = dtype != torch.float32  # fp32 runs the exact ("ieee") FMA path
        positions = {"x_ptr": ptr, "token_ptr": "*i64", "seq_stride": "i64", "token_stride": "i64",
                     "num_tokens": "i64", "w_ptr": ptr}
        for block_k, alignment in itertools.product(HEAD_TILES, ("aligned", "unaligned")):
            divisible = ("x_ptr", "w_ptr", "H") if alignment == "aligned" else ()
            for tiles, has_bias in itertools.product(_choices("reward_forward", dtype, block_k), (False, True)):
                yield KernelConfig(
                    name=f"reward_forward[{ptr[1:]},BLOCK_K={block_k},bias={int(has_bias)},{alignment}"
                         f"{_suffix('reward_forward', dtype, tiles)}]",
                    fn=reward_heads_forward_kernel,
                    signature={**positions, "bias_ptr": ptr, "rewards_ptr": "*fp32", "mean_ptr": "*fp32",
                               "var_ptr": "*fp32", "min_ptr": "*fp32", "B": "i32", "H": "i32", "K": "i32",
                               "HAS_BIAS": "constexpr", "IEEE": "constexpr", "BLOCK_B": "constexpr",
                               "BLOCK_H": "constexpr", "BLOCK_K": "constexpr"},
                    constexprs={"HAS_BIAS": has_bias, "IEEE": not tensor_cores, "BLOCK_B": tiles["BLOCK_B"],
                                "BLOCK_H": tiles["BLOCK_H"], "BLOCK_K": block_k},
                    num_warps=tiles["num_warps"], num_stages=NUM_STAGES, uses_tensor_cores=tensor_cores,
                    divisible_by_16=divisible,
                )
            # Alignment changes only the hints: the unaligned backward is registered in its
            # plain variant (no bias, dense), the aligned one in all four.
            variants = itertools.product((False, True), (False, True)) if alignment == "aligned" else [(False, False)]
            fills = [DEFAULT_FILL] + [f for f in tuning.tables_choices("reward_backward_fill",
                                                                       f"{ptr[1:]},K={block_k}") if f != DEFAULT_FILL]
            for tiles, (has_bias, sparse), fill in itertools.product(_choices("reward_backward", dtype, block_k),
                                                                     variants, fills):
                if sparse and fill != DEFAULT_FILL:
                    continue  # the sparse backward always takes the built-in fill tile
                fill_suffix = "" if fill == DEFAULT_FILL else ",fill{FILL_ROWS}x{FILL_BLOCK_H}".format(**fill)
                yield KernelConfig(
                    name=f"reward_backward[{ptr[1:]},BLOCK_K={block_k},bias={int(has_bias)},sparse={int(sparse)},"
                         f"{alignment}{_suffix('reward_backward', dtype, tiles)}{fill_suffix}]",
                    fn=reward_heads_backward_kernel,
                    signature={**positions, "rewards_ptr": "*fp32", "mean_ptr": "*fp32", "min_ptr": "*fp32",
                               "g_rewards_ptr": "*fp32", "g_mean_ptr": "*fp32", "g_var_ptr": "*fp32",
                               "g_min_ptr": "*fp32", "grad_x_ptr": ptr, "grad_w_ptr": ptr, "grad_b_ptr": ptr,
                               "B": "i32", "H": "i32", "K": "i32", "GRADS": "i32", "rows_per_seq": "i64",
                               "num_rows": "i64", "ROWS_SORTED": "i32", "HAS_BIAS": "constexpr", "SPARSE": "constexpr",
                               "IEEE": "constexpr", "BLOCK_B": "constexpr", "BLOCK_H": "constexpr",
                               "BLOCK_K": "constexpr", "FILL_ROWS": "constexpr", "FILL_BLOCK_H": "constexpr"},
                    constexprs={"HAS_BIAS": has_bias, "SPARSE": sparse, "IEEE": not tensor_cores,
                                "BLOCK_B": tiles["BLOCK_B"], "BLOCK_H": tiles["BLOCK_H"], "BLOCK_K": block_k,
                                **fill},
                    num_warps=tiles["num_warps"], num_stages=NUM_STAGES, uses_tensor_cores=tensor_cores,
                    divisible_by_16=divisible + (("grad_x_ptr", "grad_w_ptr") if divisible else ()),
                )


def _choices(kernel, dtype, block_k):
    """The built-in tiles and every sm90 table's, for the compile check."""
    choices = [default_tiles(kernel, dtype)]
    key = f"{pointer_type(dtype)[1:]},K={block_k}"
    return choices + [t for t in tuning.tables_choices(kernel, key) if t not in choices]


def _suffix(kernel, dtype, tiles):
    return "" if tiles == default_tiles(kernel, dtype) else ",B{BLOCK_B}H{BLOCK_H}w{num_warps}".format(**tiles)


register(_configs())

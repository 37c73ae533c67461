"""Triton kernels for reward-ensemble scoring: K linear heads on the last token of each sequence.

Forward: each program takes BLOCK_B sequences, gathers their scoring rows (the last
non-padding token; the caller passes each row's element offset), multiplies them by the
K heads with fp32 accumulation, adds the bias, and writes the rewards plus the ensemble
statistics (mean, unbiased variance, min) -- one launch reads only the B gathered rows and
the (K, H) weights, never the other tokens.

Backward: with G = dL/d rewards (B, K) in fp32, each program owns BLOCK_H hidden columns
and walks all sequences: d rows = G @ W (written to a (B, H) buffer the caller scatters
into the zero gradient of the input) and d W = G^T @ rows, accumulated in fp32.

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
# Pipeline depth of both kernels' loops: launched and registered alike.
NUM_STAGES = 3


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


# K is never compiled as a constant: the statistics convert it to fp32 (K.to), which a constant
# 1 (one head: Triton specialises an int argument equal to 1) does not have.
@triton.jit(do_not_specialize=("K",))
def reward_heads_forward_kernel(
    x_ptr, row_offsets_ptr, w_ptr, bias_ptr, rewards_ptr, mean_ptr, var_ptr, min_ptr,
    B, H, K,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    seqs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    seq_ok = seqs < B
    heads = tl.arange(0, BLOCK_K)
    head_ok = heads < K
    # int64 element offsets of each sequence's scoring row: B*T*H passes 2^31 at 32K tokens.
    rows = tl.load(row_offsets_ptr + seqs, mask=seq_ok, other=0)
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


@triton.jit
def reward_heads_backward_kernel(
    x_ptr, row_offsets_ptr, w_ptr, grad_rewards_ptr, grad_rows_ptr, grad_w_ptr,
    B, H, K,
    IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    heads = tl.arange(0, BLOCK_K)
    head_ok = heads < K
    # This program's slice of W stays in registers for every sequence block.
    w = tl.load(w_ptr + heads[:, None] * H + cols[None, :], mask=head_ok[:, None] & col_ok[None, :], other=0.0)
    grad_w = tl.zeros((BLOCK_K, BLOCK_H), tl.float32)
    grad_w_err = tl.zeros((BLOCK_K, BLOCK_H), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        seqs = b0 + tl.arange(0, BLOCK_B)
        seq_ok = seqs < B
        g = tl.load(grad_rewards_ptr + seqs[:, None] * K + heads[None, :], mask=seq_ok[:, None] & head_ok[None, :],
                    other=0.0)
        rows = tl.load(row_offsets_ptr + seqs, mask=seq_ok, other=0)
        tile_ok = seq_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] + cols[None, :], mask=tile_ok, other=0.0)
        # Like autograd of a linear layer: the gradient is cast to the input dtype for the
        # products, which accumulate in fp32.
        g_in = g.to(x.dtype)
        grad_rows = _dot(g_in, w, IEEE)
        tl.store(grad_rows_ptr + seqs[:, None].to(tl.int64) * H + cols[None, :],
                 grad_rows.to(grad_rows_ptr.dtype.element_ty), mask=tile_ok)
        grad_w, grad_w_err = dot_accumulate(tl.trans(g_in), x, grad_w, grad_w_err)
    grad_w = dot_result(grad_w, grad_w_err, IEEE)
    tl.store(grad_w_ptr + heads[:, None] * H + cols[None, :], grad_w, mask=head_ok[:, None] & col_ok[None, :])


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


def tile_key(dtype, num_heads: int) -> str:
    return f"{pointer_type(dtype)[1:]},K={_head_tile(num_heads)}"


def default_tiles(kernel: str, dtype) -> dict:
    if kernel == "reward_forward":
        block_h = FP32_FORWARD_BLOCK_H if dtype == torch.float32 else FORWARD_BLOCK_H
    else:
        block_h = FP32_BACKWARD_BLOCK_H if dtype == torch.float32 else BACKWARD_BLOCK_H
    return {"BLOCK_B": BLOCK_B, "BLOCK_H": block_h, "num_warps": NUM_WARPS}


def forward(x, row_offsets, weight, bias, rewards, mean, var, minimum) -> None:
    """Score rows ``x.view(-1)[row_offsets[b]:][:H]`` with ``weight`` (K, H); fill the fp32 outputs.

    ``x`` has a contiguous last dimension; ``weight`` is contiguous with x's dtype.
    """
    B = row_offsets.numel()
    K, H = weight.shape
    if B == 0:
        return

    def run(t):
        reward_heads_forward_kernel[(triton.cdiv(B, t["BLOCK_B"]),)](
            x, row_offsets, weight, bias if bias is not None else weight, rewards, mean, var, minimum,
            B, H, K, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_K=_head_tile(K),
            num_stages=NUM_STAGES, **t,
        )

    tuning.launch("reward_forward", tile_key(x.dtype, K), default_tiles("reward_forward", x.dtype), x.device, run)


def backward(x, row_offsets, weight, grad_rewards, grad_rows, grad_weight) -> None:
    """grad_rows (B, H) in x's dtype = G @ W; grad_weight (K, H) fp32 = G^T @ rows."""
    B = row_offsets.numel()
    K, H = weight.shape

    def run(t):
        reward_heads_backward_kernel[(triton.cdiv(H, t["BLOCK_H"]),)](
            x, row_offsets, weight, grad_rewards, grad_rows, grad_weight,
            B, H, K, IEEE=x.dtype == torch.float32, BLOCK_K=_head_tile(K), num_stages=NUM_STAGES, **t,
        )

    tuning.launch("reward_backward", tile_key(x.dtype, K), default_tiles("reward_backward", x.dtype), x.device,
                  run)


def _configs():
    """Every (kernel, dtype, head tile, bias) the launchers above can compile.

    The scoring rows are gathered, so their pointers carry no alignment hint beyond H; the
    aligned variant (H a multiple of 16, as every model hidden size is) is the one that
    matters, the unaligned one must still compile clean.
    """
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ptr = pointer_type(dtype)
        tensor_cores = dtype != torch.float32  # fp32 runs the exact ("ieee") FMA path
        for block_k, alignment in itertools.product(HEAD_TILES, ("aligned", "unaligned")):
            divisible = ("x_ptr", "w_ptr", "H") if alignment == "aligned" else ()
            for tiles in _choices("reward_forward", dtype, block_k):
                for has_bias in (False, True):
                    yield KernelConfig(
                        name=f"reward_forward[{ptr[1:]},BLOCK_K={block_k},bias={int(has_bias)},{alignment}"
                             f"{_suffix('reward_forward', dtype, tiles)}]",
                        fn=reward_heads_forward_kernel,
                        signature={"x_ptr": ptr, "row_offsets_ptr": "*i64", "w_ptr": ptr, "bias_ptr": ptr,
                                   "rewards_ptr": "*fp32", "mean_ptr": "*fp32", "var_ptr": "*fp32",
                                   "min_ptr": "*fp32", "B": "i32", "H": "i32", "K": "i32",
                                   "HAS_BIAS": "constexpr", "IEEE": "constexpr", "BLOCK_B": "constexpr",
                                   "BLOCK_H": "constexpr", "BLOCK_K": "constexpr"},
                        constexprs={"HAS_BIAS": has_bias, "IEEE": not tensor_cores, "BLOCK_B": tiles["BLOCK_B"],
                                    "BLOCK_H": tiles["BLOCK_H"], "BLOCK_K": block_k},
                        num_warps=tiles["num_warps"], num_stages=NUM_STAGES, uses_tensor_cores=tensor_cores,
                        divisible_by_16=divisible,
                    )
            for tiles in _choices("reward_backward", dtype, block_k):
                yield KernelConfig(
                    name=f"reward_backward[{ptr[1:]},BLOCK_K={block_k},{alignment}"
                         f"{_suffix('reward_backward', dtype, tiles)}]",
                    fn=reward_heads_backward_kernel,
                    signature={"x_ptr": ptr, "row_offsets_ptr": "*i64", "w_ptr": ptr, "grad_rewards_ptr": "*fp32",
                               "grad_rows_ptr": ptr, "grad_w_ptr": "*fp32", "B": "i32", "H": "i32", "K": "i32",
                               "IEEE": "constexpr", "BLOCK_B": "constexpr", "BLOCK_H": "constexpr",
                               "BLOCK_K": "constexpr"},
                    constexprs={"IEEE": not tensor_cores, "BLOCK_B": tiles["BLOCK_B"], "BLOCK_H": tiles["BLOCK_H"],
                                "BLOCK_K": block_k},
                    num_warps=tiles["num_warps"], num_stages=NUM_STAGES, uses_tensor_cores=tensor_cores,
                        divisible_by_16=divisible,
                )


def _choices(kernel, dtype, block_k):
    """The built-in tiles and every sm90 table's, for the compile check."""
    choices = [default_tiles(kernel, dtype)]
    key = f"{pointer_type(dtype)[1:]},K={block_k}"
    return choices + [t for t in tuning.tables_choices(kernel, key) if t not in choices]


def _suffix(kernel, dtype, tiles):
    return "" if tiles == default_tiles(kernel, dtype) else ",B{BLOCK_B}H{BLOCK_H}w{num_warps}".format(**tiles)


register(_configs())

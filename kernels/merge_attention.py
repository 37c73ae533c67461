"""Triton kernels merging partial attention results by their log-sum-exp.

A partial result over a key set K_i is (o_i, lse_i) with o_i = softmax-weighted values over
K_i and lse_i = log sum_{k in K_i} exp(s_k). Over disjoint key sets the merged result is

    lse = log sum_i exp(lse_i),    o = sum_i exp(lse_i - lse) * o_i.

Layout (canonical, set up by docqa_fast.merge_attention): outputs (B, S, H, D) with the
last dimension contiguous and any strides elsewhere, LSE (B, H, S) with any strides;
a packed (T, H, D) / (H, T) input arrives as B = 1. The kernels write a contiguous output
and a contiguous LSE. One program merges BLOCK_R rows (a row is one (b, s, h)) of
BLOCK_D >= D columns; the op is memory bound, so the tile is sized to keep enough bytes
in flight per program, not to feed tensor cores.
"""

import itertools

import torch
import triton
import triton.language as tl

from . import tuning
from .registry import KernelConfig, pointer_type, register

# Largest head dim the launchers accept (MLA's 576 included); BLOCK_D is D rounded up to a
# power of two, so these are every block width a launcher can pick.
MAX_HEAD_DIM = 1024
BLOCK_D_CHOICES = (16, 32, 64, 128, 256, 512, 1024)
# Elements of one output tile: 16 per thread per input at 4 warps -- two 16-byte loads of
# fp16 when rows are aligned, and few enough per-element pointers to never spill when not.
TILE_ELEMENTS = 2048
NUM_WARPS = 4
# Tiles in flight per loop (the stacked merge walks its parts): launched and registered alike.
NUM_STAGES = 3


@triton.jit
def _row_coordinates(rows, S, H):
    """Row r of the flattened (B, S, H) grid -> (b, s, h), widened to int64 for the offsets.

    The division runs in int32 (the launcher guarantees B*S*H < 2^31): int64 division is a
    called subroutine on NVIDIA GPUs that costs registers and stack. Element offsets such
    as b * stride_b can pass 2^31 at 128K tokens, hence the int64 results.
    """
    h = rows % H
    s = (rows // H) % S
    b = rows // (H * S)
    return b.to(tl.int64), s.to(tl.int64), h.to(tl.int64)


@triton.jit
def _load_lse(lse_ptr, b, s, h, stride_b, stride_h, stride_s, row_ok):
    lse = tl.load(lse_ptr + b * stride_b + h * stride_h + s * stride_s, mask=row_ok, other=float("-inf"))
    # flash-attn reports +inf for a row that saw no keys; treat it as empty, like -inf.
    return tl.where(lse == float("inf"), float("-inf"), lse)


@triton.jit
def _finish_logsumexp(lse_max_safe, total):
    """(max, sum of exp(lse_i - max)) -> (merged lse, 1/sum); an all-empty row gives (-inf, 0)."""
    empty = total == 0.0
    lse = tl.where(empty, float("-inf"), lse_max_safe + tl.log(total))
    inv_total = tl.where(empty, 0.0, 1.0 / total)
    return lse, inv_total


@triton.jit
def _load_part(ptr, b, s, h, stride_b, stride_s, stride_h, cols, tile_ok, weight):
    """One part's rows in fp32; rows whose weight is 0 (empty parts) are not read."""
    offsets = (b * stride_b + s * stride_s + h * stride_h)[:, None] + cols[None, :]
    return tl.load(ptr + offsets, mask=tile_ok & (weight > 0.0)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _contribution(part, weight):
    """part * weight, 0 where the weight is not > 0: a NaN LSE gives a NaN weight, and 0 * NaN
    would make the row NaN where the reference and the C++ kernels leave the part out."""
    return tl.where((weight > 0.0)[:, None], part * weight[:, None], 0.0)


@triton.jit
def merge_pair_kernel(
    out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, lse_out_ptr,
    S, H, D, n_rows,
    oa_sb, oa_ss, oa_sh, la_sb, la_sh, la_ss,
    ob_sb, ob_ss, ob_sh, lb_sb, lb_sh, lb_ss,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    b, s, h = _row_coordinates(rows, S, H)
    rows = rows.to(tl.int64)  # rows * D passes 2^31 for long contexts

    lse_a = _load_lse(lse_a_ptr, b, s, h, la_sb, la_sh, la_ss, row_ok)
    lse_b = _load_lse(lse_b_ptr, b, s, h, lb_sb, lb_sh, lb_ss, row_ok)
    lse_max = tl.maximum(lse_a, lse_b)
    # Shift by 0 when both parts are empty so that exp(-inf - shift) = 0, not NaN.
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w_a = tl.exp(lse_a - shift)
    w_b = tl.exp(lse_b - shift)
    lse, inv_total = _finish_logsumexp(shift, w_a + w_b)
    w_a = w_a * inv_total
    w_b = w_b * inv_total

    cols = tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (cols < D)[None, :]
    part_a = _load_part(out_a_ptr, b, s, h, oa_sb, oa_ss, oa_sh, cols, tile_ok, w_a)
    part_b = _load_part(out_b_ptr, b, s, h, ob_sb, ob_ss, ob_sh, cols, tile_ok, w_b)
    merged = _contribution(part_a, w_a) + _contribution(part_b, w_b)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], merged.to(out_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(lse_out_ptr + (b * H + h) * S + s, lse, mask=row_ok)


@triton.jit
def merge_stacked_kernel(
    outs_ptr, lses_ptr, out_ptr, lse_out_ptr,
    n_parts, S, H, D, n_rows,
    o_sp, o_sb, o_ss, o_sh, l_sp, l_sb, l_sh, l_ss,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    b, s, h = _row_coordinates(rows, S, H)
    rows = rows.to(tl.int64)

    # Pass 1 over the (small, cached) LSEs: the max; pass 2: the normaliser.
    lse_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for i in range(n_parts):
        lse_i = _load_lse(lses_ptr + i * l_sp, b, s, h, l_sb, l_sh, l_ss, row_ok)
        lse_max = tl.maximum(lse_max, lse_i)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros((BLOCK_R,), tl.float32)
    for i in range(n_parts):
        lse_i = _load_lse(lses_ptr + i * l_sp, b, s, h, l_sb, l_sh, l_ss, row_ok)
        total += tl.exp(lse_i - shift)
    lse, inv_total = _finish_logsumexp(shift, total)

    cols = tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (cols < D)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for i in range(n_parts):
        lse_i = _load_lse(lses_ptr + i * l_sp, b, s, h, l_sb, l_sh, l_ss, row_ok)
        weight = tl.exp(lse_i - shift) * inv_total
        part = _load_part(outs_ptr + i * o_sp, b, s, h, o_sb, o_ss, o_sh, cols, tile_ok, weight)
        acc += _contribution(part, weight)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(lse_out_ptr + (b * H + h) * S + s, lse, mask=row_ok)


def _check_row_count(n_rows: int) -> None:
    if n_rows >= 2**31:
        raise ValueError(f"batch * seqlen * heads = {n_rows} rows is above the supported 2^31 - 1")


# Rows per program and warps: the built-in rule below, unless the device's tuned table
# (kernels/tuned/, kernels/tuning.py) has measured values for the block width.
tuning.declare("merge_attention", ("BLOCK_R", "num_warps"))


def _block_d(head_dim: int) -> int:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is above the supported maximum {MAX_HEAD_DIM}")
    return block_d


def tile_key(head_dim: int) -> str:
    return f"D={_block_d(head_dim)}"


def default_tiles(head_dim: int) -> dict:
    """The whole row in one tile, ~TILE_ELEMENTS per program."""
    return {"BLOCK_R": max(1, TILE_ELEMENTS // _block_d(head_dim)), "num_warps": NUM_WARPS}


def _launch(head_dim: int, device, run):
    """run(BLOCK_R, BLOCK_D, num_warps) with the device's tuned tiles or the built-in ones."""
    block_d = _block_d(head_dim)
    return tuning.launch("merge_attention", tile_key(head_dim), default_tiles(head_dim), device,
                         lambda tiles: run(tiles["BLOCK_R"], block_d, tiles["num_warps"]))


def merge_pair(out_a, lse_a, out_b, lse_b, out, lse_out) -> None:
    """Merge two parts into preallocated contiguous ``out`` (B, S, H, D) and ``lse_out`` (B, H, S)."""
    B, S, H, D = out_a.shape
    n_rows = B * S * H
    if n_rows == 0:
        return
    _check_row_count(n_rows)

    def run(block_r, block_d, warps):
        merge_pair_kernel[(triton.cdiv(n_rows, block_r),)](
            out_a, lse_a, out_b, lse_b, out, lse_out,
            S, H, D, n_rows,
            out_a.stride(0), out_a.stride(1), out_a.stride(2), *lse_a.stride(),
            out_b.stride(0), out_b.stride(1), out_b.stride(2), *lse_b.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps, num_stages=NUM_STAGES,
        )

    _launch(D, out.device, run)


def merge_stacked(outs, lses, out, lse_out) -> None:
    """Merge n stacked parts outs (n, B, S, H, D), lses (n, B, H, S) into preallocated outputs."""
    n_parts, B, S, H, D = outs.shape
    n_rows = B * S * H
    if n_rows == 0:
        return
    _check_row_count(n_rows)

    def run(block_r, block_d, warps):
        merge_stacked_kernel[(triton.cdiv(n_rows, block_r),)](
            outs, lses, out, lse_out,
            n_parts, S, H, D, n_rows,
            *outs.stride()[:4], *lses.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps, num_stages=NUM_STAGES,
        )

    _launch(D, out.device, run)


def _configs():
    """Every (kernel, dtype, tile, alignment) the two launchers above can compile."""
    pair_signature = {
        "out_a_ptr": "OUT", "lse_a_ptr": "*fp32", "out_b_ptr": "OUT", "lse_b_ptr": "*fp32",
        "out_ptr": "OUT", "lse_out_ptr": "*fp32", "S": "i32", "H": "i32", "D": "i64", "n_rows": "i32",
        **dict.fromkeys(("oa_sb", "oa_ss", "oa_sh", "la_sb", "la_sh", "la_ss",
                         "ob_sb", "ob_ss", "ob_sh", "lb_sb", "lb_sh", "lb_ss"), "i64"),
        "BLOCK_R": "constexpr", "BLOCK_D": "constexpr",
    }
    stacked_signature = {
        "outs_ptr": "OUT", "lses_ptr": "*fp32", "out_ptr": "OUT", "lse_out_ptr": "*fp32",
        "n_parts": "i32", "S": "i32", "H": "i32", "D": "i64", "n_rows": "i32",
        **dict.fromkeys(("o_sp", "o_sb", "o_ss", "o_sh", "l_sp", "l_sb", "l_sh", "l_ss"), "i64"),
        "BLOCK_R": "constexpr", "BLOCK_D": "constexpr",
    }
    # Aligned: head dim and output strides multiples of 16 (D = 64, 80, 128, ...), the usual case.
    aligned = {
        "pair": ("out_a_ptr", "lse_a_ptr", "out_b_ptr", "lse_b_ptr", "out_ptr", "lse_out_ptr", "D",
                 "oa_sb", "oa_ss", "oa_sh", "ob_sb", "ob_ss", "ob_sh"),
        "stacked": ("outs_ptr", "lses_ptr", "out_ptr", "lse_out_ptr", "D", "o_sp", "o_sb", "o_ss", "o_sh"),
    }
    kernels = {"pair": (merge_pair_kernel, pair_signature), "stacked": (merge_stacked_kernel, stacked_signature)}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ptr = pointer_type(dtype)
        for block_d, kind, alignment in itertools.product(BLOCK_D_CHOICES, kernels, ("aligned", "unaligned")):
            fn, signature = kernels[kind]
            choices = [default_tiles(block_d)]
            choices += [t for t in tuning.tables_choices("merge_attention", tile_key(block_d)) if t not in choices]
            for tiles in choices:
                suffix = "" if tiles == choices[0] else f",R{tiles['BLOCK_R']}w{tiles['num_warps']}"
                yield KernelConfig(
                    name=f"merge_{kind}[{ptr[1:]},BLOCK_D={block_d},{alignment}{suffix}]",
                    fn=fn,
                    signature={arg: ptr if t == "OUT" else t for arg, t in signature.items()},
                    constexprs={"BLOCK_R": tiles["BLOCK_R"], "BLOCK_D": block_d},
                    num_warps=tiles["num_warps"], num_stages=NUM_STAGES,
                    divisible_by_16=aligned[kind] if alignment == "aligned" else (),
                )


register(_configs())

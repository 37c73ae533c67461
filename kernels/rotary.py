"""Triton kernel of rotary position embedding (RoPE): ``apply_rotary_emb`` and the query rotation
the decode path runs before a launch whose tiles are too large to rotate q in registers.

A row is one (token, head) of x viewed as (tokens, H, D); its position comes from a per-token
int tensor (the caller computes positions -- offsets, cache lengths, varlen starts -- with a few
tensor ops, so one kernel serves every layout). The first ``2 * rotary_half`` dims rotate in
fp32 by the angle's cos / sin (pairs (2i, 2i+1) when interleaved, (i, i + half) otherwise,
GPT-NeoX's layout) and round once to x's dtype; the rest pass through. CONJUGATE rotates by
minus the angle: the backward of a rotation. A row is read whole before it is written, so the
rotation may write in place.
"""

import torch
import triton
import triton.language as tl

from .registry import KernelConfig, pointer_type, register

ELEMENTS_PER_PROGRAM = 2048  # rows of BLOCK_D: ~16 elements per thread at 4 warps
MAX_HEAD_DIM = 1024


@triton.jit
def rotary_layout(dims, rotary_half, INTERLEAVED: tl.constexpr):
    """Per dim: its partner in the rotation, its frequency index, whether it is the first of the
    pair, and whether it is rotated at all."""
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
def load_rotated(rows, dims, row_ok, dim_ok, positions, cos_ptr, sin_ptr, cos_st, rotary_half,
                 HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr = False):
    """The (rows, BLOCK_D) tile at row pointers ``rows``; with HAS_ROTARY rotated at ``positions``
    in fp32 (x cos -/+ partner sin) and rounded once to the tile's dtype, as the reference does."""
    x = tl.load(rows[:, None] + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if HAS_ROTARY:
        partner, freq, first, rotated = rotary_layout(dims, rotary_half, INTERLEAVED)
        turn = row_ok[:, None] & rotated[None, :]
        other = tl.load(rows[:, None] + partner[None, :], mask=turn, other=0.0).to(tl.float32)
        angle = positions.to(tl.int64)[:, None] * cos_st + freq[None, :]
        cos = tl.load(cos_ptr + angle, mask=turn, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + angle, mask=turn, other=0.0).to(tl.float32)
        if CONJUGATE:
            sin = -sin
        x32 = x.to(tl.float32)
        turned = tl.where(first[None, :], x32 * cos - other * sin, x32 * cos + other * sin)
        x = tl.where(rotated[None, :], turned, x32).to(x.dtype)
    return x


@triton.jit
def rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, positions_ptr, out_ptr, rows_total, heads, rotary_half, cos_st, x_st, x_sh, o_st, o_sh,
    HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, h] = x[t, h] rotated at positions[t]; row r is (t, h) = (r // H, r % H)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows_total
    h = (r % heads).to(tl.int64)
    t = (r // heads).to(tl.int64)
    positions = tl.load(positions_ptr + t, mask=row_ok, other=0)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    x = load_rotated(x_ptr + t * x_st + h * x_sh, dims, row_ok, dim_ok, positions, cos_ptr, sin_ptr, cos_st,
                     rotary_half, True, INTERLEAVED, CONJUGATE)
    tl.store((out_ptr + t * o_st + h * o_sh)[:, None] + dims[None, :], x, mask=row_ok[:, None] & dim_ok[None, :])


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _rows_per_program(head_dim: int) -> int:
    return max(1, ELEMENTS_PER_PROGRAM // _block_d(head_dim))


def rotate(x, cos, sin, positions, out, *, interleaved: bool, conjugate: bool = False) -> None:
    """out (tokens, H, D) = x (tokens, H, D) rotated at ``positions`` (tokens,) int; ``out`` may be x.

    Both have a unit last stride; cos / sin (seqlen_ro, rotary_dim / 2) have unit-stride rows.
    """
    tokens, heads, head_dim = x.shape
    rows = tokens * heads
    if rows == 0:
        return
    block_r = _rows_per_program(head_dim)
    rotary_kernel[(triton.cdiv(rows, block_r),)](
        x, cos, sin, positions, out, rows, heads, cos.shape[1], cos.stride(0), x.stride(0), x.stride(1),
        out.stride(0), out.stride(1), HEAD_DIM=head_dim, INTERLEAVED=bool(interleaved), CONJUGATE=bool(conjugate),
        BLOCK_R=block_r, BLOCK_D=_block_d(head_dim), num_warps=4, num_stages=1,
    )


def _configs():
    """Per head dim of the attention tiles and dtype: both layouts, forward and conjugate."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ptr = pointer_type(dtype)
        for head_dim in (32, 64, 80, 96, 128, 192, 256):
            for interleaved in (False, True):
                for conjugate in ((False, True) if dtype == torch.bfloat16 else (False,)):
                    constexprs = {"HEAD_DIM": head_dim, "INTERLEAVED": interleaved, "CONJUGATE": conjugate,
                                  "BLOCK_R": _rows_per_program(head_dim), "BLOCK_D": _block_d(head_dim)}
                    signature = {"x_ptr": ptr, "cos_ptr": ptr, "sin_ptr": ptr, "positions_ptr": "*i64",
                                 "out_ptr": ptr, "rows_total": "i32", "heads": "i32", "rotary_half": "i32",
                                 **dict.fromkeys(("cos_st", "x_st", "x_sh", "o_st", "o_sh"), "i64"),
                                 **dict.fromkeys(constexprs, "constexpr")}
                    yield KernelConfig(
                        name=f"rotary[{ptr[1:]},D={head_dim},interleaved={int(interleaved)},"
                             f"conjugate={int(conjugate)}]",
                        fn=rotary_kernel, signature=signature, constexprs=constexprs, num_warps=4, num_stages=1,
                        divisible_by_16=("x_ptr", "out_ptr", "positions_ptr", "x_st", "x_sh", "o_st", "o_sh"))


register(_configs())

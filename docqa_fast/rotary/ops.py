"""The rotary op: ``docqa_fast::rotary`` (x rotated at per-token positions), its dispatch entry
and autograd (the gradient of a rotation is the rotation by minus the angle)."""

from __future__ import annotations

import torch

from .._backend import Implementation, dtype_rule, register_op
from .._validation import FLOAT_DTYPES, check_last_dim_contiguous, check_same_device, check_shape, check_tensor


def check_tables(x, cos, sin, names=("x", "cos", "sin")) -> None:
    """Rotary tables for x (..., D): cos and sin (seqlen_ro, rotary_dim / 2), unit stride along a
    row (the kernels read rows so), x's dtype and device, 0 < rotary_dim <= D. ``names``: the
    caller's names of x, cos and sin, for the messages (the KV-cache front end's q, rotary_cos,
    rotary_sin)."""
    x_name, cos_name, sin_name = names
    for name, t in ((cos_name, cos), (sin_name, sin)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndims=(2,))
        check_last_dim_contiguous(name, t)
    if sin.shape != cos.shape:
        raise ValueError(f"expected {sin_name} of shape {tuple(cos.shape)} (the shape of {cos_name}), "
                         f"got {tuple(sin.shape)}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise TypeError(f"expected {cos_name} and {sin_name} of dtype {x.dtype} (the dtype of {x_name}), "
                        f"got {cos.dtype} and {sin.dtype}")
    check_same_device(names, (x, cos, sin))
    if not 0 < 2 * cos.shape[1] <= x.shape[-1]:
        raise ValueError(f"expected {cos_name} of shape (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= "
                         f"{x.shape[-1]} ({x_name}'s head dim), got {tuple(cos.shape)}")
    # No position at all: the positions' clamp (under value_checks(False)) would have no row to
    # clamp into, and the kernel would read before the table.
    if cos.shape[0] == 0 and x.numel():
        raise ValueError(f"expected {cos_name} with at least one position (seqlen_ro >= 1), got {tuple(cos.shape)}")


def _rotary_triton(x, cos, sin, positions, interleaved, conjugate):
    from ..kernels import rotary as kernels

    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    kernels.rotate(x, cos, sin, positions, out, interleaved=interleaved, conjugate=conjugate)
    return out


def _rotary_reference(x, cos, sin, positions, interleaved, conjugate):
    from ..reference.rotary import apply_rotary_emb_ref

    # One "sequence" per token: (tokens, 1, H, D) each at its own offset.
    sign = -1.0 if conjugate else 1.0
    return apply_rotary_emb_ref(x[:, None], cos, sin * sign, interleaved, positions.tolist())[:, 0]


ROTARY = register_op(
    "rotary",
    Implementation("triton", _rotary_triton, eligible=dtype_rule("the rotary kernel", FLOAT_DTYPES)),
    Implementation("reference", _rotary_reference),
)


@torch.library.custom_op("docqa_fast::rotary", mutates_args=())
def rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool,
              conjugate: bool) -> torch.Tensor:
    """x (tokens, H, D) rotated at positions (tokens,) int64; conjugate: by minus the angle."""
    # What the kernel indexes by: apply_rotary_emb's table rule (one rule for both), x's rank and
    # the positions' shape (apply_rotary_emb also checks their range).
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndims=(3,))
    check_tables(x, cos, sin)
    check_tensor("positions", positions, dtypes=(torch.int64,), ndims=(1,))
    check_shape("positions", positions, (x.shape[0],), "one position per row of x")
    check_same_device(("x", "positions"), (x, positions))
    return ROTARY(x.device, x.dtype, x, cos, sin, positions, interleaved, conjugate)


@rotary_op.register_fake
def _(x, cos, sin, positions, interleaved, conjugate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    x, cos, sin, positions, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.flags = (interleaved, conjugate)


def _backward(ctx, grad):
    cos, sin, positions = ctx.saved_tensors
    interleaved, conjugate = ctx.flags
    return rotary_op(grad.contiguous(), cos, sin, positions, interleaved, not conjugate), None, None, None, None, None


rotary_op.register_autograd(_backward, setup_context=_setup)

"""The rotary op: ``docqa_fast::rotary`` (x rotated at per-token positions), its dispatch entry
and autograd (the gradient of a rotation is the rotation by minus the angle)."""

from __future__ import annotations

import torch

from .._backend import Implementation, dtype_rule, register_op
from .._validation import FLOAT_DTYPES, check_same_device, check_same_dtype, check_shape, check_tensor


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
    # The shapes the kernel indexes by (apply_rotary_emb checks more, and the positions' range).
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndims=(3,))
    check_tensor("cos", cos, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_tensor("sin", sin, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_shape("sin", sin, cos.shape, "the shape of cos")
    check_same_dtype(("x", "cos", "sin"), (x, cos, sin))
    check_tensor("positions", positions, dtypes=(torch.int64,), ndims=(1,))
    check_shape("positions", positions, (x.shape[0],), "one position per row of x")
    check_same_device(("x", "cos", "sin", "positions"), (x, cos, sin, positions))
    if not 0 < 2 * cos.shape[1] <= x.shape[-1]:
        raise ValueError(f"expected cos of shape (seqlen_ro, rotary_dim / 2) with rotary_dim <= {x.shape[-1]}, "
                         f"got {tuple(cos.shape)}")
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

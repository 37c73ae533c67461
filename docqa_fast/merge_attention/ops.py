"""The merge ops: validation, ``torch.library`` custom ops with their dispatch entries
(extension, then Triton, on CUDA tensors; the reference elsewhere), autograd, public functions."""

from __future__ import annotations

import torch

from .._backend import Implementation, extension, register_op
from .._validation import (
    FLOAT_DTYPES,
    check_last_dim_contiguous,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)
from ..reference.merge_attention import merge_attention_states_ref, merge_stacked_attention_states_ref

MAX_HEAD_DIM = 1024


# ---------------------------------------------------------------------------- validation

def _expected_lse_shape(out_shape) -> tuple[int, ...]:
    """(..., B, S, H, D) -> (..., B, H, S);  (..., T, H, D) -> (..., H, T) is the same rule."""
    *lead, seq, heads, _ = out_shape
    return (*lead, heads, seq)


def _check_part(out_name, out, lse_name, lse, ndims):
    check_tensor(out_name, out, dtypes=FLOAT_DTYPES, ndims=ndims)
    check_tensor(lse_name, lse, dtypes=(torch.float32,))
    check_last_dim_contiguous(out_name, out)
    check_shape(lse_name, lse, _expected_lse_shape(out.shape), f"flash-attn's LSE layout for {out_name}")
    head_dim = out.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"expected {out_name} with a last dimension (head dim) in [1, {MAX_HEAD_DIM}], "
                         f"got {head_dim}")


def _check_pair(out_a, lse_a, out_b, lse_b):
    _check_part("out_a", out_a, "lse_a", lse_a, ndims=(3, 4))
    check_tensor("out_b", out_b, dtypes=FLOAT_DTYPES)
    check_shape("out_b", out_b, out_a.shape, "the shape of out_a")
    _check_part("out_b", out_b, "lse_b", lse_b, ndims=(3, 4))
    check_same_dtype(("out_a", "out_b"), (out_a, out_b))
    check_same_device(("out_a", "lse_a", "out_b", "lse_b"), (out_a, lse_a, out_b, lse_b))


def _check_stacked(outs, lses):
    _check_part("outs", outs, "lses", lses, ndims=(4, 5))
    if outs.shape[0] == 0:
        raise ValueError("expected outs with at least one part along dimension 0, got 0")
    check_same_device(("outs", "lses"), (outs, lses))


# ------------------------------------------------------------------------ the custom ops

def _canonical(out: torch.Tensor, lse: torch.Tensor, stacked: bool):
    """Packed (T, H, D)/(H, T) -> dense with B = 1, the one layout the kernels take."""
    if out.dim() == (4 if stacked else 3):
        return out.unsqueeze(-4), lse.unsqueeze(-3)
    return out, lse


def _empty_result(out_like: torch.Tensor, lse_like: torch.Tensor):
    out = torch.empty(out_like.shape, dtype=out_like.dtype, device=out_like.device)
    lse = torch.empty(lse_like.shape, dtype=torch.float32, device=lse_like.device)
    return out, lse


def _pair_kernel(launch):
    """An implementation of the pair merge from a launcher taking the canonical layout."""
    def run(out_a, lse_a, out_b, lse_b):
        out, lse = _empty_result(out_a, lse_a)
        launch(*_canonical(out_a, lse_a, False), *_canonical(out_b, lse_b, False), *_canonical(out, lse, False))
        return out, lse

    return run


def _stacked_kernel(launch):
    def run(outs, lses):
        out, lse = _empty_result(outs[0], lses[0])
        launch(*_canonical(outs, lses, True), *_canonical(out, lse, False))
        return out, lse

    return run


def _triton_merge(name):
    def launch(*args):
        from ..kernels import merge_attention as kernels

        getattr(kernels, name)(*args)

    return launch


MERGE_PAIR = register_op(
    "merge_attention_states",
    Implementation("extension", _pair_kernel(lambda *args: extension().merge_attention_states(*args))),
    Implementation("triton", _pair_kernel(_triton_merge("merge_pair"))),
    Implementation("reference", merge_attention_states_ref),
)
MERGE_STACKED = register_op(
    "merge_stacked_attention_states",
    Implementation("extension", _stacked_kernel(lambda *args: extension().merge_stacked_attention_states(*args))),
    Implementation("triton", _stacked_kernel(_triton_merge("merge_stacked"))),
    Implementation("reference", merge_stacked_attention_states_ref),
)


@torch.library.custom_op("docqa_fast::merge_attention_states", mutates_args=())
def _merge_pair_op(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    # The shapes the kernels index by (an lse of another shape was written past the output).
    _check_pair(out_a, lse_a, out_b, lse_b)
    return MERGE_PAIR(out_a.device, out_a.dtype, out_a, lse_a, out_b, lse_b)


@_merge_pair_op.register_fake
def _(out_a, lse_a, out_b, lse_b):
    return _empty_result(out_a, lse_a)


@torch.library.custom_op("docqa_fast::merge_stacked_attention_states", mutates_args=())
def _merge_stacked_op(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_stacked(outs, lses)
    return MERGE_STACKED(outs.device, outs.dtype, outs, lses)


@_merge_stacked_op.register_fake
def _(outs, lses):
    return _empty_result(outs[0], lses[0])


# ------------------------------------------------------------------------------ autograd

def _part_gradients(grad_out, grad_lse, part_out, part_lse, out, lse):
    """Gradients of one part (or of n stacked parts: a leading dim broadcasts).

    With w_i = exp(lse_i - lse): d out / d o_i = w_i, d out / d lse_i = w_i (o_i - out) and
    d lse / d lse_i = w_i. Empty parts (w_i = 0) get zero gradients whatever they hold.
    """
    part_lse = part_lse.float()
    empty = (part_lse == float("-inf")) | (part_lse == float("inf")) | (lse == float("-inf"))
    weight = torch.where(empty, 0.0, torch.exp(part_lse - lse))
    weight_rows = weight.transpose(-1, -2).unsqueeze(-1)  # (..., S, H, 1) like the outputs
    grad_part_out = None
    grad_part_lse = None
    if grad_out is not None:
        grad_part_out = (weight_rows * grad_out.float()).to(part_out.dtype)
        delta = torch.where(weight_rows > 0, part_out.float() - out.float(), 0.0)
        grad_part_lse = (weight_rows * grad_out.float() * delta).sum(-1).transpose(-1, -2)
    if grad_lse is not None:
        from_lse = weight * grad_lse
        grad_part_lse = from_lse if grad_part_lse is None else grad_part_lse + from_lse
    return grad_part_out, grad_part_lse


def _save_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _merge_pair_backward(ctx, grad_out, grad_lse):
    out_a, lse_a, out_b, lse_b, out, lse = ctx.saved_tensors
    grad_a, grad_lse_a = _part_gradients(grad_out, grad_lse, out_a, lse_a, out, lse)
    grad_b, grad_lse_b = _part_gradients(grad_out, grad_lse, out_b, lse_b, out, lse)
    return grad_a, grad_lse_a, grad_b, grad_lse_b


def _merge_stacked_backward(ctx, grad_out, grad_lse):
    outs, lses, out, lse = ctx.saved_tensors
    return _part_gradients(grad_out, grad_lse, outs, lses, out, lse)


_merge_pair_op.register_autograd(_merge_pair_backward, setup_context=_save_for_backward)
_merge_stacked_op.register_autograd(_merge_stacked_backward, setup_context=_save_for_backward)


# --------------------------------------------------------------------------- public API

def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attention results over disjoint key sets.

    Args:
        out_a, out_b: (B, S, H, D) or packed (T, H, D) partial outputs, fp16/bf16/fp32,
            same shape and dtype, last dimension contiguous.
        lse_a, lse_b: their fp32 natural-log LSEs, (B, H, S) or (H, T); -inf marks a part
            with no keys.

    Returns:
        ``(out, lse)``: out contiguous, shaped and typed like ``out_a``; lse fp32 like ``lse_a``.
    """
    _check_pair(out_a, lse_a, out_b, lse_b)
    return _merge_pair_op(out_a, lse_a, out_b, lse_b)


def merge_stacked_attention_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine n partial results stacked on a leading dimension (the split-KV combine).

    Args:
        outs: (n, B, S, H, D) or (n, T, H, D), fp16/bf16/fp32, last dimension contiguous.
        lses: (n, B, H, S) or (n, H, T), fp32.

    Returns:
        ``(out, lse)`` shaped like ``outs[0]`` and ``lses[0]``.
    """
    _check_stacked(outs, lses)
    return _merge_stacked_op(outs, lses)

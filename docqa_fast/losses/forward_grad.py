"""The forward-gradient route of a mean / sum cross-entropy: gradients computed in the forward.

When the upstream gradient of a loss is one scalar known only in the backward -- the result of
``linear_cross_entropy(..., reduction="mean" | "sum")`` -- dL/dz of every token is that scalar
times a gradient the forward can already form. So the forward walks chunks of rows, each with
its whole vocabulary's logits, forms G = dL/dz once the rows' log-sum-exp is final, and runs
d_hidden = G W and d_weight += G^T h right there (chunked.stats_and_grads): 3 products in all,
where the statistics forward and a recomputing backward run 4. The backward only multiplies
the saved gradients by the upstream scalar (Liger's fused linear cross-entropy does the same
with Triton products).

``docqa_fast::linear_cross_entropy_grads(hidden, weight, bias, labels, ignore_index,
label_smoothing, z_loss, mean, need_hidden, need_weight, need_bias)`` returns (loss,
grad_scale, d_hidden, d_weight, d_bias): the reduced loss (fp32, fp64 for fp64 inputs), the
gradients of the *summed* per-token losses in that precision (empty (0,) where not needed) and
grad_scale (1, or 1 / the counted tokens for "mean") that turns them into the loss's. Its
autograd saves them and returns grad_output * grad_scale * saved, rounded once to the inputs'
dtype (so a gradient is as exact as the recomputing route's, whatever grad_output is).

Memory beyond inputs and gradients, 16-bit inputs with d_weight needed: the (V, H) fp32
accumulator (2 GiB through Qwen2.5's head) and the (N, H) fp32 d_hidden, both held from the
forward to the backward, and the chunk of rows x V logits (fp32, plus the 16-bit G). Only
callers that need gradients take this route (functional.linear_cross_entropy decides, reading
``DOCQA_FAST_LOSSES_ROUTE`` / the tuned table, fused.route); without them the forward is the
statistics pass. Not for per-token losses or log-probs (reduction "none", sequence_logprobs,
DPO): their upstream gradients differ per token or per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import Implementation, register_op
from .._validation import value_checks_enabled
from ..kernels import losses as kernels
from ..reference.losses import linear_logit_stats_backward_ref, linear_logit_stats_ref
from . import chunked, fused
from .ops import (
    _KERNEL_DTYPES,
    check_op_inputs,
    check_smoothing_and_z_loss,
    cross_entropy_coefs,
    cross_entropy_per_token,
)

# A gradient scaled by the upstream scalar is written this many fp32 elements at a time.
_SCALE_SLICE = 1 << 24


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(losses, counted, mean: bool):
    """(loss, grad_scale): the summed per-token losses, times grad_scale = 1 / max(count, 1) for "mean"."""
    scale = 1.0 / counted.sum().clamp_min(1).to(losses.dtype) if mean else torch.ones((), dtype=losses.dtype,
                                                                                        device=losses.device)
    return losses.sum() * scale, scale


def _grads_triton(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden,
                  need_weight, need_bias):
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    counted = labels != ignore_index
    # Ignored tokens are left out of every product, as by the statistics forward (fused.py).
    rows = fused.counted_rows(counted) if fused.skip_mode() != "off" and n_rows and value_checks_enabled() else None
    h, y = (hidden.index_select(0, rows), labels.index_select(0, rows)) if rows is not None else (hidden, labels)

    def coefs_of(lse, r0, r1):
        return cross_entropy_coefs(lse, y[r0:r1] != ignore_index, vocab, label_smoothing, z_loss)

    def run(tiles, engine):
        if engine == "cublas":
            chunk_rows = kernels.tiles("losses_route", h.dtype, h.device)["CHUNK_ROWS"]
            return chunked.stats_and_grads(h, weight, bias, y, ignore_index, coefs_of, need_hidden, need_weight,
                                           need_bias, tiles, chunk_rows)
        # Triton products (the tuned table's choice, or no fp32-output matmul in this torch): the
        # statistics pass, then the recomputing backward's pass on the same coefficients, both
        # now; its gradients come rounded to the inputs' dtype (a second rounding when scaled).
        lse, label_logit, sum_logits, _ = kernels.logit_stats(h, weight, bias, y, ignore_index, 1.0)
        grads = kernels.logit_stats_backward(h, weight, bias, y, lse, coefs_of(lse, 0, h.shape[0]), ignore_index,
                                             1.0, need_hidden, need_weight, need_bias)
        return (lse, label_logit, sum_logits, *(g.float() for g in grads))

    lse, label_logit, sum_logits, d_hidden, d_weight, d_bias = fused.run_with_tiles(hidden.dtype, hidden.device, run)
    losses = cross_entropy_per_token(lse, label_logit, sum_logits, y != ignore_index, vocab, label_smoothing, z_loss)
    loss, scale = _reduce(losses, counted, mean)
    if rows is not None and need_hidden:
        d_hidden = d_hidden.new_zeros(n_rows, hidden_size).index_copy_(0, rows, d_hidden)
    return loss, scale, d_hidden, d_weight, d_bias


def _grads_reference(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden,
                     need_weight, need_bias):
    counted = labels != ignore_index
    lse, label_logit, sum_logits, _ = linear_logit_stats_ref(hidden, weight, bias, labels, ignore_index, 1.0)
    accumulate = _accumulator_dtype(hidden.dtype)
    lse, label_logit, sum_logits = (t.to(accumulate) for t in (lse, label_logit, sum_logits))
    losses = cross_entropy_per_token(lse, label_logit, sum_logits, counted, weight.shape[0], label_smoothing, z_loss)
    loss, scale = _reduce(losses, counted, mean)
    coefs = cross_entropy_coefs(lse, counted, weight.shape[0], label_smoothing, z_loss)
    grads = linear_logit_stats_backward_ref(hidden, weight, bias, labels, lse, coefs, ignore_index, 1.0)
    # Fresh tensors (a custom op's outputs may not alias each other), empty where not needed.
    return (loss, scale, *(g.to(accumulate).contiguous() if need else g.new_empty(0, dtype=accumulate)
                           for g, need in zip(grads, (need_hidden, need_weight, need_bias))))


GRADS = register_op(
    "linear_cross_entropy_grads",
    Implementation("triton", _grads_triton, eligible=_KERNEL_DTYPES),
    Implementation("reference", _grads_reference),
)


def _check(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden, need_weight,
           need_bias):
    check_op_inputs(hidden, weight, bias, labels, ignore_index, 1.0)
    if not isinstance(label_smoothing, torch.SymFloat) and not isinstance(z_loss, torch.SymFloat):
        check_smoothing_and_z_loss(label_smoothing, z_loss)
    if need_bias and bias is None:
        raise ValueError("need_bias=True without a bias")


@torch.library.custom_op("docqa_fast::linear_cross_entropy_grads", mutates_args=())
def linear_cross_entropy_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               labels: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                               mean: bool, need_hidden: bool, need_weight: bool, need_bias: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_scale, d_hidden, d_weight, d_bias) of the cross-entropy of z = hidden @ weight^T + bias.

    hidden (N, H), labels (N,) int64. loss: the mean ("mean") or sum of the per-token losses
    (ops.cross_entropy_per_token) over the tokens whose label is not ignore_index; d_*: the
    gradients of their sum, fp32 (fp64 for fp64 inputs), empty (0,) unless asked for;
    grad_scale: 1 or 1 / max(count, 1), the factor from those gradients to the loss's.
    """
    _check(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden, need_weight,
           need_bias)
    return GRADS(hidden.device, hidden.dtype, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss,
                 mean, need_hidden, need_weight, need_bias)


@linear_cross_entropy_grads.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden, need_weight, need_bias):
    _check(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden, need_weight,
           need_bias)
    accumulate = _accumulator_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=accumulate), hidden.new_empty((), dtype=accumulate),
            hidden.new_empty(hidden.shape if need_hidden else (0,), dtype=accumulate),
            weight.new_empty(weight.shape if need_weight else (0,), dtype=accumulate),
            weight.new_empty((weight.shape[0],) if need_bias else (0,), dtype=accumulate))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    _, scale, d_hidden, d_weight, d_bias = output
    ctx.mark_non_differentiable(scale, d_hidden, d_weight, d_bias)
    ctx.save_for_backward(scale, d_hidden, d_weight, d_bias)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)


def _scaled(saved, factor, dtype, name: str):
    """saved * factor rounded once to ``dtype``, a slice of rows at a time (no full fp32 temporary)."""
    if saved.numel() == 0:
        raise RuntimeError(f"linear_cross_entropy_grads was called without need_{name}=True, yet d {name} is wanted")
    out = torch.empty(saved.shape, dtype=dtype, device=saved.device)
    flat_saved, flat_out = saved.reshape(saved.shape[0], -1), out.reshape(saved.shape[0], -1)
    step = max(1, _SCALE_SLICE // max(1, flat_saved.shape[1]))
    for r0 in range(0, flat_saved.shape[0], step):
        torch.mul(flat_saved[r0:r0 + step], factor, out=flat_out[r0:r0 + step])
    return out


def _backward(ctx, grad_loss, _grad_scale, _grad_hidden, _grad_weight, _grad_bias):
    scale, d_hidden, d_weight, d_bias = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:3]
    if grad_loss is None or not any(wanted):
        return (None,) * 11
    # Out of place (a second backward with retain_graph finds the saved gradients intact) and
    # without a graph: these gradients have no derivative of their own here (create_graph gets
    # non-differentiable gradients, never silently wrong second derivatives).
    with torch.no_grad():
        factor = grad_loss.to(scale.dtype) * scale
        grads = [_scaled(saved, factor, dtype, name) if want else None
                 for saved, dtype, name, want in zip((d_hidden, d_weight, d_bias), ctx.dtypes,
                                                     ("hidden", "weight", "bias"), wanted)]
    return (*grads, *(None,) * 8)


linear_cross_entropy_grads.register_autograd(_backward, setup_context=_setup_context)


def wants_gradients(*tensors) -> tuple[bool, ...]:
    """Whether autograd will want a gradient of each tensor (None: no)."""
    enabled = torch.is_grad_enabled()
    return tuple(bool(enabled and t is not None and t.requires_grad) for t in tensors)


def cross_entropy(hidden, weight, bias, labels, ignore_index: int, label_smoothing: float, z_loss: float, mean: bool,
                  needs: tuple[bool, bool, bool]):
    """The reduced cross-entropy through the op, on validated, flattened inputs."""
    return linear_cross_entropy_grads(hidden, weight, bias, labels, int(ignore_index), float(label_smoothing),
                                      float(z_loss), bool(mean), *needs)[0]

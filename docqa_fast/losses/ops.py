"""The two custom ops behind every loss of this family, their autograd and dispatch.

``docqa_fast::linear_logit_stats(hidden, weight, bias, labels, ignore_index, temperature)``
returns four (N,) fp32 statistics of z = (hidden @ weight^T + bias) / T -- the log-sum-exp,
the label's logit (0 where ignored), the sum of the logits and the entropy -- without
building z. Every public loss is a few PyTorch ops on these, so autograd of those ops
yields the upstream gradients of the four statistics; the backward turns them into per-row
coefficients of

    dL/dz_j = p_j (a + b log p_j) + c [j == label] + d

and ``docqa_fast::linear_logit_stats_backward`` recomputes the logits tile by tile to apply
them (kernels/losses.py). Per-token upstream gradients of any shape and sign
(``reduction="none"``) are therefore handled exactly, not assumed uniform.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import Implementation, dtype_rule, register_op
from .._validation import (
    FLOAT_DTYPES,
    check_last_dim_contiguous,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    value_checks_enabled,
)
from ..reference.losses import linear_logit_stats_backward_ref, linear_logit_stats_ref

LABEL_DTYPES = (torch.int64, torch.int32)


# ---------------------------------------------------------------------------- validation

def check_head_inputs(hidden, weight, labels, bias=None, *, validate: bool = False):
    """Validate (hidden, weight, labels, bias) and return them flattened: (N, H), (N,) int64.

    hidden (N, H) or (B, T, H); weight (V, H); labels of hidden's leading shape; bias (V,).
    With ``validate`` (eager mode only: one host sync) every label must be in [0, V) or
    ignore_index; that check is left to the caller, who knows ignore_index.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_tensor("labels", labels, dtypes=LABEL_DTYPES)
    hidden_size = hidden.shape[-1]
    if weight.shape[1] != hidden_size:
        raise ValueError(f"expected weight of shape (vocab, {hidden_size}) to match hidden's hidden size "
                         f"{hidden_size}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("expected weight with at least one row (vocabulary entry), got 0")
    check_shape("labels", labels, hidden.shape[:-1], "hidden's leading dimensions")
    names, tensors = ["hidden", "weight", "labels"], [hidden, weight, labels]
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndims=(1,))
        check_shape("bias", bias, (weight.shape[0],), "one value per vocabulary row of weight")
        names.append("bias")
        tensors.append(bias)
    check_same_dtype(("hidden", "weight"), (hidden, weight))
    if bias is not None:
        check_same_dtype(("hidden", "bias"), (hidden, bias))
    check_same_device(names, tensors)
    check_last_dim_contiguous("weight", weight)
    # (B, T, H) -> (N, H): a view when the leading dims are contiguous, else one copy of the rows.
    flat_hidden = hidden.reshape(-1, hidden_size)
    if flat_hidden.stride(-1) != 1:
        flat_hidden = flat_hidden.contiguous()
    return flat_hidden, labels.reshape(-1).long()


def check_label_values(labels, vocab: int, ignore_index: int, validate: bool) -> None:
    """With ``validate`` in eager mode: every label in [0, vocab) or ignore_index (one host sync)."""
    if not (validate and value_checks_enabled()) or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"expected labels in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {int(labels.reshape(-1)[first])} at flat position {first}")


def check_positive(name: str, value: float) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)):
        raise TypeError(f"expected {name} to be a Python number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"expected {name} > 0, got {value}")
    return float(value)


# ------------------------------------------------------------------------ the custom ops

def _empty_stats(hidden):
    return tuple(torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) for _ in range(4))


def _stats_triton(hidden, weight, bias, labels, ignore_index, temperature):
    from ..kernels import losses as kernels

    return kernels.logit_stats(hidden, weight, bias, labels, ignore_index, temperature)


def _stats_reference(hidden, weight, bias, labels, ignore_index, temperature):
    return tuple(s.float().contiguous() if s.dtype != torch.float64 else s.contiguous()
                 for s in linear_logit_stats_ref(hidden, weight, bias, labels, ignore_index, temperature))


def _stats_backward_triton(hidden, weight, bias, labels, lse, coefs, ignore_index, temperature, need_hidden,
                           need_weight, need_bias):
    from ..kernels import losses as kernels

    return kernels.logit_stats_backward(hidden, weight, bias, labels, lse, coefs, ignore_index, temperature,
                                        need_hidden, need_weight, need_bias)


def _stats_backward_reference(hidden, weight, bias, labels, lse, coefs, ignore_index, temperature, need_hidden,
                              need_weight, need_bias):
    d_hidden, d_weight, d_bias = linear_logit_stats_backward_ref(hidden, weight, bias, labels, lse, coefs,
                                                                 ignore_index, temperature)
    # Unneeded gradients are fresh empty tensors: outputs of a custom op may not alias each other.
    return (d_hidden.to(hidden.dtype) if need_hidden else hidden.new_empty(0),
            d_weight.to(weight.dtype) if need_weight else weight.new_empty(0),
            d_bias.to(weight.dtype) if need_bias else weight.new_empty(0))


# fp64 reaches the ops themselves (gradcheck): the reference computes it.
_KERNEL_DTYPES = dtype_rule("the log-prob kernels", (torch.float16, torch.bfloat16, torch.float32))


LOGIT_STATS = register_op(
    "linear_logit_stats",
    Implementation("triton", _stats_triton, eligible=_KERNEL_DTYPES),
    Implementation("reference", _stats_reference),
)
LOGIT_STATS_BACKWARD = register_op(
    "linear_logit_stats_backward",
    Implementation("triton", _stats_backward_triton, eligible=_KERNEL_DTYPES),
    Implementation("reference", _stats_backward_reference),
)


@torch.library.custom_op("docqa_fast::linear_logit_stats", mutates_args=())
def linear_logit_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       labels: torch.Tensor, ignore_index: int, temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, label_logit, sum_logits, entropy) of (hidden @ weight^T + bias) / T; hidden (N, H), labels (N,)."""
    return LOGIT_STATS(hidden.device, hidden.dtype, hidden, weight, bias, labels, ignore_index, temperature)


@linear_logit_stats.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature):
    return _empty_stats(hidden)


@torch.library.custom_op("docqa_fast::linear_logit_stats_backward", mutates_args=())
def linear_logit_stats_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                labels: torch.Tensor, lse: torch.Tensor, coefs: torch.Tensor, ignore_index: int,
                                temperature: float, need_hidden: bool, need_weight: bool, need_bias: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias) for dL/dz rows ``coefs`` (4, N); unneeded ones are empty."""
    return LOGIT_STATS_BACKWARD(hidden.device, hidden.dtype, hidden, weight, bias, labels, lse, coefs, ignore_index,
                                temperature, need_hidden, need_weight, need_bias)


@linear_logit_stats_backward.register_fake
def _(hidden, weight, bias, labels, lse, coefs, ignore_index, temperature, need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


# ------------------------------------------------------------------------------ autograd

def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, temperature = inputs
    lse, _, _, entropy = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.ignore_index = ignore_index
    ctx.temperature = temperature


def _backward(ctx, grad_lse, grad_label, grad_sum, grad_entropy):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not (need_hidden or need_weight or need_bias):
        return None, None, None, None, None, None
    zeros = torch.zeros_like(lse)
    grad_lse, grad_label, grad_sum, grad_entropy = (zeros if g is None else g.to(lse.dtype)
                                                    for g in (grad_lse, grad_label, grad_sum, grad_entropy))
    # d lse/dz = p; d label/dz = onehot; d sum/dz = 1; d entropy/dz = -p (log p + entropy).
    coefs = torch.stack([grad_lse - grad_entropy * entropy, -grad_entropy, grad_label, grad_sum]).contiguous()
    # The bias is passed even when it needs no gradient (a frozen bias): the recomputed logits include it.
    d_hidden, d_weight, d_bias = linear_logit_stats_backward(
        hidden, weight, bias, labels, lse, coefs, ctx.ignore_index, ctx.temperature,
        bool(need_hidden), bool(need_weight), bool(need_bias))
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None,
            None, None, None)


linear_logit_stats.register_autograd(_backward, setup_context=_setup_context)


def logit_stats(hidden, weight, bias, labels, ignore_index: int, temperature: float):
    """The statistics op on validated, flattened inputs (see check_head_inputs)."""
    return linear_logit_stats(hidden, weight, bias, labels, int(ignore_index), float(temperature))

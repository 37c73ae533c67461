"""The custom ops behind every loss of this family, their autograd and dispatch.

``docqa_fast::linear_logit_stats(hidden, weight, bias, labels, ignore_index, temperature)``
returns four (N,) fp32 statistics of z = (hidden @ weight^T + bias) / T -- the log-sum-exp,
the label's logit, the sum of the logits and the entropy, all 0 on rows whose label is
ignore_index -- without building z, and a bound of log p per vocabulary tile. Every public
loss is a few PyTorch ops on these, so autograd of those ops yields the upstream gradients
of the four statistics; the backward turns them into per-row coefficients of

    dL/dz_j = p_j (a + b log p_j) + c [j == label] + d

and ``docqa_fast::linear_logit_stats_backward`` recomputes the logits chunk by chunk to apply
them. Per-token upstream gradients of any shape and sign (``reduction="none"``) are therefore
handled exactly, not assumed uniform.

The triton implementation (fused.py) computes only the rows that count and, in the backward,
the vocabulary tiles that are not negligible, on library matmuls (chunked.py) or on the
all-Triton path (kernels/losses.py); the reference materialises the logits.

``docqa_fast::linear_cross_entropy_grads`` is the forward-gradient route of a mean / sum
cross-entropy (forward_grad.py): the reduced loss and its gradients, formed in the forward. It
has no autograd of its own: _ForwardGradLoss, an autograd.Function around it, saves the
gradients and only scales them by the upstream scalar in the backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import Implementation, dtype_rule, register_op
from .._validation import (
    FLOAT_DTYPES,
    check_last_dim_contiguous,
    check_real,
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
    """A finite Python number > 0 (inf would make every log-prob 0 or NaN; a bool is no number)."""
    return check_real(name, value, positive=True)


def check_smoothing_and_z_loss(label_smoothing, z_loss) -> None:
    """label_smoothing a number in [0, 1], z_loss a finite number >= 0 (the cross-entropy's settings)."""
    if check_real("label_smoothing", label_smoothing) > 1.0 or label_smoothing < 0.0:
        raise ValueError(f"expected label_smoothing in [0, 1], got {label_smoothing!r}")
    check_real("z_loss", z_loss, minimum=0.0)


def cross_entropy_per_token(lse, label_logit, sum_logits, counted, vocab: int, label_smoothing: float,
                            z_loss: float):
    """Per-token cross-entropy from the statistics, 0 where not ``counted``: lse - (1 - eps) z_label
    - (eps / V) sum_j z_j + z_loss lse^2 (F.cross_entropy's label smoothing, PaLM's z-loss)."""
    losses = lse - (1.0 - label_smoothing) * label_logit
    if label_smoothing:
        losses = losses - (label_smoothing / vocab) * sum_logits
    if z_loss:
        losses = losses + z_loss * lse * lse
    return torch.where(counted, losses, 0.0)


def cross_entropy_coefs(lse, counted, vocab: int, label_smoothing: float, z_loss: float):
    """(4, N) coefficients (a, b, c, d) of dL/dz_j = p_j (a + b log p_j) + c [j == label] + d for the
    per-token losses above: a = 1 + 2 z_loss lse, b = 0, c = -(1 - eps), d = -eps / V; 0 where
    not ``counted``."""
    a = 1.0 + (2.0 * z_loss) * lse
    zero = torch.zeros_like(lse)
    coefs = torch.stack([a, zero, zero - (1.0 - label_smoothing), zero - label_smoothing / vocab])
    return torch.where(counted, coefs, 0.0).contiguous()


# ------------------------------------------------------------------------ the custom ops

# Vocabulary columns per entry of the log p bound the forward returns (the kernels' LOG_P_TILE).
LOG_P_TILE = 128


def _bound_tiles(vocab: int) -> int:
    return -(-vocab // LOG_P_TILE)


def check_op_inputs(hidden, weight, bias, labels, ignore_index, temperature, lse=None, coefs=None) -> None:
    """The ops' own argument checks (metadata only, no host sync): flattened (N, H) hidden, (V, H)
    weight, (V,) bias, (N,) int64 labels, and the backward's (N,) fp32 lse and (4, N) coefficients.
    The public functions check and flatten first; these guard direct ``torch.ops`` calls."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES + (torch.float64,), ndims=(2,))
    check_tensor("weight", weight, dtypes=(hidden.dtype,), ndims=(2,))
    check_tensor("labels", labels, dtypes=(torch.int64,), ndims=(1,))
    if weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"expected weight of shape (vocab >= 1, {hidden.shape[1]}), got {tuple(weight.shape)}")
    check_shape("labels", labels, (hidden.shape[0],), "one label per row of hidden")
    tensors, names = [hidden, weight, labels], ["hidden", "weight", "labels"]
    if bias is not None:
        check_tensor("bias", bias, dtypes=(hidden.dtype,), ndims=(1,))
        check_shape("bias", bias, (weight.shape[0],), "one value per vocabulary row of weight")
        tensors.append(bias)
        names.append("bias")
    if lse is not None:
        check_tensor("lse", lse, dtypes=(torch.float32, torch.float64), ndims=(1,))
        check_shape("lse", lse, (hidden.shape[0],), "one value per row of hidden")
        check_tensor("coefs", coefs, dtypes=(lse.dtype,), ndims=(2,))
        check_shape("coefs", coefs, (4, hidden.shape[0]), "four coefficients per row of hidden")
        tensors += [lse, coefs]
        names += ["lse", "coefs"]
    check_same_device(names, tensors)
    check_last_dim_contiguous("hidden", hidden)
    check_last_dim_contiguous("weight", weight)
    # Symbolic scalars (torch.compile with dynamic shapes) are checked when the call runs.
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise TypeError(f"expected ignore_index to be an int, got {type(ignore_index).__name__}")
    if not isinstance(temperature, torch.SymFloat):
        check_positive("temperature", temperature)


def _empty_stats(hidden, vocab):
    stats = tuple(torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) for _ in range(4))
    return (*stats, torch.empty(_bound_tiles(vocab), dtype=torch.float32, device=hidden.device))


def _stats_triton(hidden, weight, bias, labels, ignore_index, temperature):
    from . import fused

    return fused.logit_stats(hidden, weight, bias, labels, ignore_index, temperature, LOG_P_TILE)


def _stats_reference(hidden, weight, bias, labels, ignore_index, temperature):
    stats = tuple(s.float().contiguous() if s.dtype != torch.float64 else s.contiguous()
                  for s in linear_logit_stats_ref(hidden, weight, bias, labels, ignore_index, temperature))
    # A bound of 0 (p <= 1) marks no vocabulary tile negligible: the backward computes them all.
    return (*stats, torch.zeros(_bound_tiles(weight.shape[0]), dtype=torch.float32, device=hidden.device))


def _stats_backward_triton(hidden, weight, bias, labels, lse, coefs, bound, ignore_index, temperature, need_hidden,
                           need_weight, need_bias):
    from . import fused

    return fused.logit_stats_backward(hidden, weight, bias, labels, lse, coefs, bound, ignore_index, temperature,
                                      need_hidden, need_weight, need_bias, LOG_P_TILE)


def _stats_backward_reference(hidden, weight, bias, labels, lse, coefs, bound, ignore_index, temperature,
                              need_hidden, need_weight, need_bias):
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
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, label_logit, sum_logits, entropy, log_p_bound) of z = (hidden @ weight^T + bias) / T.

    hidden (N, H), labels (N,); the four statistics are (N,) fp32, 0 on rows whose label is
    ignore_index (those rows count for nothing: they are not computed). log_p_bound
    (cdiv(V, LOG_P_TILE),) fp32 bounds log p from above over the counted rows, per LOG_P_TILE
    vocabulary columns (0 where not recorded); the backward skips tiles it proves negligible.
    """
    check_op_inputs(hidden, weight, bias, labels, ignore_index, temperature)
    return LOGIT_STATS(hidden.device, hidden.dtype, hidden, weight, bias, labels, ignore_index, temperature)


@linear_logit_stats.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature):
    check_op_inputs(hidden, weight, bias, labels, ignore_index, temperature)
    return _empty_stats(hidden, weight.shape[0])


@torch.library.custom_op("docqa_fast::linear_logit_stats_backward", mutates_args=())
def linear_logit_stats_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                labels: torch.Tensor, lse: torch.Tensor, coefs: torch.Tensor, bound: torch.Tensor,
                                ignore_index: int, temperature: float, need_hidden: bool, need_weight: bool,
                                need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight, d_bias) for dL/dz rows ``coefs`` (4, N); unneeded ones are empty.

    ``bound``: the forward's log_p_bound. Rows whose coefficients are all 0 contribute nothing.
    """
    check_op_inputs(hidden, weight, bias, labels, ignore_index, temperature, lse, coefs)
    check_tensor("bound", bound, dtypes=(torch.float32,), ndims=(1,))
    check_shape("bound", bound, (_bound_tiles(weight.shape[0]),), f"one value per {LOG_P_TILE} vocabulary columns")
    return LOGIT_STATS_BACKWARD(hidden.device, hidden.dtype, hidden, weight, bias, labels, lse, coefs, bound,
                                ignore_index, temperature, need_hidden, need_weight, need_bias)


@linear_logit_stats_backward.register_fake
def _(hidden, weight, bias, labels, lse, coefs, bound, ignore_index, temperature, need_hidden, need_weight,
      need_bias):
    check_op_inputs(hidden, weight, bias, labels, ignore_index, temperature, lse, coefs)
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


# ------------------------------------------------------------------------------ autograd

def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, temperature = inputs
    lse, _, _, entropy, bound = output
    ctx.mark_non_differentiable(bound)
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy, bound)
    ctx.ignore_index = ignore_index
    ctx.temperature = temperature


def _backward(ctx, grad_lse, grad_label, grad_sum, grad_entropy, _grad_bound):
    hidden, weight, bias, labels, lse, entropy, bound = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not (need_hidden or need_weight or need_bias):
        return None, None, None, None, None, None
    zeros = torch.zeros_like(lse)
    grad_lse, grad_label, grad_sum, grad_entropy = (zeros if g is None else g.to(lse.dtype)
                                                    for g in (grad_lse, grad_label, grad_sum, grad_entropy))
    # d lse/dz = p; d label/dz = onehot; d sum/dz = 1; d entropy/dz = -p (log p + entropy).
    coefs = torch.stack([grad_lse - grad_entropy * entropy, -grad_entropy, grad_label, grad_sum])
    # Ignored rows' statistics are constant 0: no gradient flows through them.
    coefs = torch.where(labels != ctx.ignore_index, coefs, 0.0).contiguous()
    # The bias is passed even when it needs no gradient (a frozen bias): the recomputed logits include it.
    d_hidden, d_weight, d_bias = linear_logit_stats_backward(
        hidden, weight, bias, labels, lse, coefs, bound, ctx.ignore_index, ctx.temperature,
        bool(need_hidden), bool(need_weight), bool(need_bias))
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None,
            None, None, None)


linear_logit_stats.register_autograd(_backward, setup_context=_setup_context)


def logit_stats(hidden, weight, bias, labels, ignore_index: int, temperature: float):
    """The four statistics of the op on validated, flattened inputs (see check_head_inputs)."""
    return linear_logit_stats(hidden, weight, bias, labels, int(ignore_index), float(temperature))[:4]


# ------------------------------------- the forward-gradient route's op (forward_grad.py)

def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_scale(counted, mean: bool, dtype: torch.dtype):
    """The factor from the summed per-token losses to the reduced loss: 1 / max(count, 1) for "mean",
    else 1 (a 0-dim tensor of ``dtype`` on the device: no host sync)."""
    if mean:
        return 1.0 / counted.sum().clamp_min(1).to(dtype)
    return torch.ones((), dtype=dtype, device=counted.device)


def _grads_triton(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden,
                  need_weight, need_bias):
    from . import forward_grad

    return forward_grad.cross_entropy_grads(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean,
                                            need_hidden, need_weight, need_bias)


def _grads_reference(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden,
                     need_weight, need_bias):
    counted = labels != ignore_index
    lse, label_logit, sum_logits, _ = linear_logit_stats_ref(hidden, weight, bias, labels, ignore_index, 1.0)
    accumulate = _accumulator_dtype(hidden.dtype)
    lse, label_logit, sum_logits = (t.to(accumulate) for t in (lse, label_logit, sum_logits))
    losses = cross_entropy_per_token(lse, label_logit, sum_logits, counted, weight.shape[0], label_smoothing, z_loss)
    scale = loss_scale(counted, mean, accumulate)
    coefs = cross_entropy_coefs(lse, counted, weight.shape[0], label_smoothing, z_loss) * scale
    grads = linear_logit_stats_backward_ref(hidden, weight, bias, labels, lse, coefs, ignore_index, 1.0)
    # Fresh tensors (a custom op's outputs may not alias each other), empty where not needed.
    out = gradients_dtype(hidden.dtype)
    return (losses.sum() * scale, *(g.to(out).contiguous() if need else g.new_empty(0, dtype=out)
                                    for g, need in zip(grads, (need_hidden, need_weight, need_bias))))


def gradients_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gradients linear_cross_entropy_grads hands to its backward: the inputs',
    but fp32 for fp16 (rounded after the upstream gradient, often a loss scale: rounded at a
    mean's size, fp16 would flush the small ones to 0)."""
    return torch.float32 if dtype == torch.float16 else dtype


# A scaled copy (scaled_copy) goes this many elements at a time.
_SCALE_SLICE_ELEMENTS = 1 << 24


def scaled_copy(source, factor, out) -> None:
    """out = source * factor (a (1,) or 0-dim fp32 tensor), rounded once to ``out``'s dtype, a slice
    of rows at a time (no temporary of the source's size)."""
    columns = source.shape[1] if source.dim() > 1 else 1
    flat_source, flat_out = source.view(source.shape[0], columns), out.view(out.shape[0], columns)
    step = max(1, _SCALE_SLICE_ELEMENTS // max(1, columns))
    for r0 in range(0, flat_source.shape[0], step):
        torch.mul(flat_source[r0:r0 + step], factor, out=flat_out[r0:r0 + step])


GRADS = register_op(
    "linear_cross_entropy_grads",
    Implementation("triton", _grads_triton, eligible=_KERNEL_DTYPES),
    Implementation("reference", _grads_reference),
)


def _check_grads_inputs(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, need_bias):
    check_op_inputs(hidden, weight, bias, labels, ignore_index, 1.0)
    if not isinstance(label_smoothing, torch.SymFloat) and not isinstance(z_loss, torch.SymFloat):
        check_smoothing_and_z_loss(label_smoothing, z_loss)
    if need_bias and bias is None:
        raise ValueError("need_bias=True without a bias")


@torch.library.custom_op("docqa_fast::linear_cross_entropy_grads", mutates_args=())
def linear_cross_entropy_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               labels: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                               mean: bool, need_hidden: bool, need_weight: bool, need_bias: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d_hidden, d_weight, d_bias) of the cross-entropy of z = hidden @ weight^T + bias.

    hidden (N, H), labels (N,) int64. loss: the mean ("mean", over max(count, 1)) or sum of the
    per-token losses (ops.cross_entropy_per_token) over the tokens whose label is not
    ignore_index, fp32 (fp64 for fp64 inputs); d_*: its gradients in the inputs' dtype (fp32 for
    fp16 inputs: they are rounded to fp16 after the upstream gradient), empty (0,) unless asked for.
    """
    _check_grads_inputs(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, need_bias)
    return GRADS(hidden.device, hidden.dtype, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss,
                 mean, need_hidden, need_weight, need_bias)


@linear_cross_entropy_grads.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden, need_weight, need_bias):
    _check_grads_inputs(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, need_bias)
    out = gradients_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=_accumulator_dtype(hidden.dtype)),
            hidden.new_empty(hidden.shape if need_hidden else (0,), dtype=out),
            weight.new_empty(weight.shape if need_weight else (0,), dtype=out),
            weight.new_empty((weight.shape[0],) if need_bias else (0,), dtype=out))


class _ForwardGradLoss(torch.autograd.Function):
    """The loss of linear_cross_entropy_grads, whose backward scales the gradients the op formed.

    An autograd.Function around the op rather than the op's own autograd: the backward scales
    the formed gradients in place, and a custom op's outputs must not change after it returns
    (here they never leave this class)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, needs):
        loss, d_hidden, d_weight, d_bias = linear_cross_entropy_grads(hidden, weight, bias, labels, ignore_index,
                                                                      label_smoothing, z_loss, mean, *needs)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.formed = needs
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.scaled = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        wanted = ctx.needs_input_grad[:3]
        if not any(wanted):
            return (None,) * 9
        if ctx.scaled:  # a flag, not torch's version check: saved-tensor hooks can skip that
            raise RuntimeError("a second backward through a linear_cross_entropy loss: its DOCQA_FAST_LOSSES_ROUTE="
                               "fwd-grad route scaled the gradients it formed in the forward in place in the first "
                               "backward (for retain_graph=True, set DOCQA_FAST_LOSSES_ROUTE=recompute)")
        saved = ctx.saved_tensors
        for name, want, formed in zip(("hidden", "weight", "bias"), wanted, ctx.formed):
            if want and not formed:
                raise RuntimeError(f"linear_cross_entropy_grads was called with need_{name}=False, yet d {name} is "
                                   "wanted")
        # The saved gradients carry no graph back to hidden / weight: under create_graph, gradients
        # without one would make every second derivative through this loss silently 0 (a gradient
        # penalty added to another loss would train on the other loss alone). Refused, as the
        # recomputing route's backward refuses to be differentiated.
        if torch.is_grad_enabled():
            raise RuntimeError("linear_cross_entropy has no second derivative (backward with create_graph=True): "
                               "its DOCQA_FAST_LOSSES_ROUTE=fwd-grad route forms the gradients in the forward")
        # In place, eagerly: the gradients are the saved tensors themselves, so the backward
        # allocates nothing of their size (the (V, H) one is a GiB through Qwen2.5's head) and a
        # leaf's .grad takes the tensor over once this node releases it; a second backward finds
        # them scaled already and is refused above. A traced backward multiplies out of place
        # (the compiler plans its own buffers; graphs do not mutate saved values), and so do fp16
        # inputs' fp32 gradients, rounded once to fp16 after the upstream gradient.
        compiling = torch.compiler.is_compiling()

        def scale(saved_grad, dtype):
            if compiling:
                return (saved_grad * grad_loss).to(dtype)
            if saved_grad.dtype != dtype:
                out = torch.empty(saved_grad.shape, dtype=dtype, device=saved_grad.device)
                scaled_copy(saved_grad, grad_loss, out)
                return out
            ctx.scaled = True
            return saved_grad.mul_(grad_loss)

        return (*(scale(t, dtype) if want else None for t, dtype, want in zip(saved, ctx.dtypes, wanted)),
                *(None,) * 6)


def cross_entropy_with_grads(hidden, weight, bias, labels, ignore_index: int, label_smoothing: float, z_loss: float,
                             mean: bool, needs: tuple[bool, bool, bool]):
    """The reduced cross-entropy through linear_cross_entropy_grads, on validated, flattened inputs
    (``needs``: the gradients of hidden, weight and bias to form)."""
    return _ForwardGradLoss.apply(hidden, weight, bias, labels, int(ignore_index), float(label_smoothing),
                                  float(z_loss), bool(mean), tuple(needs))

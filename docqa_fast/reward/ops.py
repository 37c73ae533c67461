"""The fused scoring op: last-token gather, K reward heads, ensemble statistics, and autograd.

``ensemble_rewards`` finds each sequence's scoring token (from ``attention_mask``,
``cu_seqlens`` or ``last_index``), then one custom op gathers those B rows, applies the K
heads and returns rewards (B, K) with their mean, unbiased variance and min (B,) -- all
fp32. The backward is a second custom op, one launch on the GPU: the statistics' gradients
folded into G = dL/d rewards, d W = G^T @ rows, d bias, and the input gradient -- dense (zeros
and the scoring rows written together) or, with ``sparse_grad``, only the B rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import Implementation, dtype_rule, register_op
from .._validation import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_last_dim_contiguous,
    check_same_device,
    check_shape,
    check_tensor,
    value_checks_enabled,
)
from .losses import ensemble_statistics

MAX_HEADS = 64
INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------- validation

def _check_heads(hidden_states, weight, bias):
    check_tensor("hidden_states", hidden_states, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_last_dim_contiguous("hidden_states", hidden_states)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndims=(2,))
    hidden_size = hidden_states.shape[-1]
    if weight.shape[1] != hidden_size:
        raise ValueError(f"expected weight of shape (num_heads, {hidden_size}) to match hidden_states' hidden size, "
                         f"got {tuple(weight.shape)}")
    if not 1 <= weight.shape[0] <= MAX_HEADS:
        raise ValueError(f"expected weight with 1 to {MAX_HEADS} heads (rows), got {weight.shape[0]}")
    tensors, names = [hidden_states, weight], ["hidden_states", "weight"]
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (weight.shape[0],), "one value per head")
        tensors.append(bias)
        names.append("bias")
    check_same_device(names, tensors)


def _check_index(name, index, expected_shape, upper, hidden_states, check):
    check_tensor(name, index, dtypes=INDEX_DTYPES)
    check_shape(name, index, expected_shape)
    check_same_device(("hidden_states", name), (hidden_states, index))
    if check and value_checks_enabled() and index.numel() and not bool(((index >= 0) & (index < upper)).all()):
        raise ValueError(f"expected every {name} value in [0, {upper}), got min {int(index.min())}, "
                         f"max {int(index.max())}")


def _last_real_token(attention_mask):
    """The last non-padding position per row (left or right padding; 0 for a row of padding
    only, as transformers' argmax finds it): where the mask is set, the largest column -- the
    sum of the mask would miss holes."""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return ((attention_mask != 0) * columns).amax(-1)


def scoring_positions(hidden_states, attention_mask=None, cu_seqlens=None, last_index=None, check=True):
    """Each sequence's scoring token (B,) int64, validated: padded (B, T, H) input scores
    ``hidden_states[b, token[b]]``, packed (total, H) input ``hidden_states[token[b]]``.

    Padded: ``last_index`` (B,), else the last non-padding token of ``attention_mask`` (left
    or right padding), else the last position. Packed: ``last_index`` (B,) rows, else
    ``cu_seqlens[1:] - 1``. With ``check`` (and not under torch.compile) one host sync checks
    the values (all-padding rows, cu_seqlens consistency, ranges); without it nothing syncs,
    and an index out of range is clamped to the rows by every backend (a wrong row, never an
    out-of-bounds access).
    """
    checking = check and value_checks_enabled()
    if hidden_states.dim() == 3:
        batch, seqlen = hidden_states.shape[:2]
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is for packed hidden_states (total, hidden); got padded hidden_states "
                             f"of shape {tuple(hidden_states.shape)} (use attention_mask)")
        if seqlen == 0 and batch:
            raise ValueError("expected hidden_states with at least one token per sequence, got seqlen 0")
        if last_index is not None:
            _check_index("last_index", last_index, (batch,), seqlen, hidden_states, check)
            return last_index.long()
        if attention_mask is not None:
            check_tensor("attention_mask", attention_mask, ndims=(2,))
            check_shape("attention_mask", attention_mask, (batch, seqlen), "hidden_states' (batch, seqlen)")
            check_same_device(("hidden_states", "attention_mask"), (hidden_states, attention_mask))
            if checking and batch:
                padding_only = ~(attention_mask != 0).any(-1)
                if bool(padding_only.any()):
                    rows = padding_only.nonzero().flatten().tolist()
                    raise ValueError(f"attention_mask has all-padding rows {rows[:8]}: they have no token to score")
            return _last_real_token(attention_mask)
        return torch.full((batch,), seqlen - 1, dtype=torch.long, device=hidden_states.device)

    total = hidden_states.shape[0]
    if attention_mask is not None:
        raise ValueError("attention_mask is for padded hidden_states (batch, seqlen, hidden); packed input takes "
                         "cu_seqlens or last_index")
    if last_index is not None:
        check_tensor("last_index", last_index, ndims=(1,))
        _check_index("last_index", last_index, tuple(last_index.shape), total, hidden_states, check)
        return last_index.long()
    if cu_seqlens is None:
        raise ValueError("packed hidden_states (total, hidden) need cu_seqlens or last_index to find each sequence")
    check_cu_seqlens("cu_seqlens", cu_seqlens, total, hidden_states, "hidden_states", dtypes=INDEX_DTYPES,
                     min_entries=2, empty_sequences=False, values=check)
    return cu_seqlens[1:].long() - 1


# ------------------------------------------------------------------------ the custom ops

def _reward_dtype(hidden):
    """Rewards are fp32; fp64 (reachable through the op itself, for gradcheck) stays fp64."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _row_index(hidden, token_index):
    """Index of the scoring rows into ``hidden``, tokens clamped to the rows as the kernels do."""
    num_tokens = hidden.shape[-2]
    token = token_index.clamp(0, max(num_tokens - 1, 0))
    if hidden.dim() == 3:
        return torch.arange(token.shape[0], device=token.device), token
    return (token,)


def _heads_reference(hidden, token_index, weight, bias):
    acc = _reward_dtype(hidden)
    rows = hidden[_row_index(hidden, token_index)].to(acc)
    rewards = rows @ weight.to(acc).t()
    if bias is not None:
        rewards = rewards + bias.to(acc)
    return (rewards, *ensemble_statistics(rewards))


def _heads_triton(hidden, token_index, weight, bias):
    from ..kernels import reward as kernels

    batch, num_heads = token_index.shape[0], weight.shape[0]
    rewards = hidden.new_empty((batch, num_heads), dtype=torch.float32)
    mean, var, minimum = (hidden.new_empty((batch,), dtype=torch.float32) for _ in range(3))
    kernels.forward(hidden, token_index, weight.contiguous(), bias, rewards, mean, var, minimum)
    return rewards, mean, var, minimum


def fold_statistics_grad(rewards, mean, minimum, grad_rewards, grad_mean, grad_var, grad_min):
    """G = dL/d rewards (B, K) from the gradients of the rewards and of their statistics (any
    of them None), in the order the kernel folds them."""
    num_heads = rewards.shape[-1]
    grad = torch.zeros_like(rewards) if grad_rewards is None else grad_rewards.to(rewards.dtype)
    if grad_mean is not None:
        grad = grad + grad_mean[:, None] / num_heads
    if grad_var is not None and num_heads > 1:
        grad = grad + grad_var[:, None] * 2 * (rewards - mean[:, None]) / (num_heads - 1)
    if grad_min is not None:
        # Ties share the gradient equally, as torch.amin's does.
        at_min = (rewards == minimum[:, None]).to(rewards.dtype)
        grad = grad + grad_min[:, None] * at_min / at_min.sum(-1, keepdim=True)
    return grad


def _heads_backward_reference(hidden, token_index, weight, rewards, mean, minimum, grad_rewards, grad_mean, grad_var,
                              grad_min, has_bias, sparse, rows_sorted=False):
    acc = _reward_dtype(hidden)
    grad = fold_statistics_grad(rewards, mean, minimum, grad_rewards, grad_mean, grad_var, grad_min)
    index = _row_index(hidden, token_index)
    rows = hidden[index]
    # Like autograd of a linear layer: the gradient in the input dtype, products in fp32.
    grad_in = grad.to(hidden.dtype).to(acc)
    grad_rows = (grad_in @ weight.to(acc)).to(hidden.dtype)
    grad_weight = (grad_in.t() @ rows.to(acc)).to(weight.dtype)
    grad_bias = grad.sum(0).to(weight.dtype) if has_bias else weight.new_empty((0,))
    if sparse:
        return grad_rows, grad_weight, grad_bias
    # index_put accumulates where a row is scored twice.
    grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    return grad_hidden.index_put_(index, grad_rows, accumulate=True), grad_weight, grad_bias


def _heads_backward_triton(hidden, token_index, weight, rewards, mean, minimum, grad_rewards, grad_mean, grad_var,
                           grad_min, has_bias, sparse, rows_sorted=False):
    from ..kernels import reward as kernels

    grad_x = hidden.new_empty((token_index.shape[0], hidden.shape[-1]) if sparse else hidden.shape)
    grad_weight = hidden.new_empty(weight.shape, dtype=weight.dtype)
    grad_bias = weight.new_empty((weight.shape[0],) if has_bias else (0,))
    grads = tuple(None if g is None else g.contiguous() for g in (grad_rewards, grad_mean, grad_var, grad_min))
    kernels.backward(hidden, token_index, weight.contiguous(), rewards, mean, minimum, grads, grad_x, grad_weight,
                     grad_bias if has_bias else None, sparse, rows_sorted)
    return grad_x, grad_weight, grad_bias


# fp64 reaches the ops themselves (gradcheck): the reference computes it.
_KERNEL_DTYPES = dtype_rule("the reward kernels", (torch.float16, torch.bfloat16, torch.float32))


REWARD_HEADS = register_op(
    "reward_heads",
    Implementation("triton", _heads_triton, eligible=_KERNEL_DTYPES),
    Implementation("reference", _heads_reference),
)
REWARD_HEADS_BACKWARD = register_op(
    "reward_heads_backward",
    Implementation("triton", _heads_backward_triton, eligible=_KERNEL_DTYPES),
    Implementation("reference", _heads_backward_reference),
)


def _check_op_inputs(op, hidden, token_index, weight):
    """What the registered ops need beyond the public checks (they can be called directly)."""
    if hidden.dim() not in (2, 3) or hidden.stride(-1) != 1:
        raise ValueError(f"{op}: expected hidden of 2 or 3 dimensions with a contiguous last one, got shape "
                         f"{tuple(hidden.shape)}")
    if token_index.dtype != torch.int64 or token_index.dim() != 1:
        raise TypeError(f"{op}: expected token_index as a 1-D int64 tensor, got {token_index.dtype} of shape "
                        f"{tuple(token_index.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.dtype != hidden.dtype:
        raise ValueError(f"{op}: expected weight (num_heads, {hidden.shape[-1]}) of {hidden.dtype}, got "
                         f"{tuple(weight.shape)} of {weight.dtype}")
    if hidden.dim() == 3 and token_index.shape[0] != hidden.shape[0]:
        raise ValueError(f"{op}: expected one token_index per sequence ({hidden.shape[0]}), got "
                         f"{token_index.shape[0]}")
    if hidden.shape[-2] == 0 and token_index.numel():
        # Clamping an unchecked position into no rows would still leave row -1: refuse it here.
        raise ValueError(f"{op}: expected hidden with tokens to score {token_index.shape[0]} sequences, got shape "
                         f"{tuple(hidden.shape)}")


@torch.library.custom_op("docqa_fast::reward_heads", mutates_args=())
def _reward_heads_op(hidden: torch.Tensor, token_index: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor], sparse_grad: bool = False, rows_ordered: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards (B, K), mean, var, min (B,)) of the scoring rows.

    ``sparse_grad`` and ``rows_ordered`` only shape the backward. ``rows_ordered``: 0 the
    scoring rows may come in any order (last_index), 1 they increase with the sequence as
    cu_seqlens gives them (unchecked: the dense gradient's fill searches them), 2 they
    certainly do (padded input, or cu_seqlens checked): a sparse input gradient is then marked
    coalesced -- a false mark would break the sparse tensor's invariants, hence the two levels.
    """
    _check_op_inputs("reward_heads", hidden, token_index, weight)
    return REWARD_HEADS(hidden.device, hidden.dtype, hidden, token_index, weight, bias)


@_reward_heads_op.register_fake
def _(hidden, token_index, weight, bias, sparse_grad=False, rows_ordered=0):
    batch, num_heads = token_index.shape[0], weight.shape[0]
    acc = _reward_dtype(hidden)
    return (hidden.new_empty((batch, num_heads), dtype=acc), *(hidden.new_empty((batch,), dtype=acc) for _ in range(3)))


@torch.library.custom_op("docqa_fast::reward_heads_backward", mutates_args=())
def _reward_heads_backward_op(hidden: torch.Tensor, token_index: torch.Tensor, weight: torch.Tensor,
                              rewards: torch.Tensor, mean: torch.Tensor, minimum: torch.Tensor,
                              grad_rewards: Optional[torch.Tensor], grad_mean: Optional[torch.Tensor],
                              grad_var: Optional[torch.Tensor], grad_min: Optional[torch.Tensor], has_bias: bool,
                              sparse: bool, rows_sorted: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias) from the gradients of the forward's outputs (None: unused).

    d hidden is the dense gradient of hidden's shape, or with ``sparse`` the scoring rows'
    gradient (B, H); d bias is empty without ``has_bias``. ``rows_sorted``: the scoring rows
    increase with the sequence (the dense fill then searches them instead of scanning).
    """
    _check_op_inputs("reward_heads_backward", hidden, token_index, weight)
    return REWARD_HEADS_BACKWARD(hidden.device, hidden.dtype, hidden, token_index, weight, rewards, mean, minimum,
                                 grad_rewards, grad_mean, grad_var, grad_min, has_bias, sparse, rows_sorted)


@_reward_heads_backward_op.register_fake
def _(hidden, token_index, weight, rewards, mean, minimum, grad_rewards, grad_mean, grad_var, grad_min, has_bias,
      sparse, rows_sorted=False):
    grad_x = hidden.new_empty((token_index.shape[0], hidden.shape[-1]) if sparse else hidden.shape)
    return grad_x, weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],) if has_bias else (0,))


def _setup_context(ctx, inputs, output):
    hidden, token_index, weight, bias = inputs[:4]
    flags = (*inputs[4:], *(False, 0)[len(inputs) - 4:])  # the defaults of a direct call
    ctx.sparse_grad, ctx.rows_ordered = bool(flags[0]), int(flags[1])
    rewards, mean, _, minimum = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, token_index, weight, rewards, mean, minimum)


def _reward_heads_backward(ctx, grad_rewards, grad_mean, grad_var, grad_min):
    hidden, token_index, weight, rewards, mean, minimum = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _reward_heads_backward_op(
        hidden, token_index, weight, rewards, mean, minimum, grad_rewards, grad_mean, grad_var, grad_min,
        ctx.has_bias, ctx.sparse_grad, ctx.rows_ordered > 0)
    if ctx.sparse_grad:
        # nn.Embedding(sparse=True)'s form: a sparse COO gradient of hidden's shape holding only
        # the scoring rows; coalesced when they are known to be strictly increasing, else a row
        # scored twice appears twice (and sums).
        index = torch.stack(_row_index(hidden, token_index))
        grad_x = torch.sparse_coo_tensor(index, grad_x, hidden.shape, check_invariants=False,
                                         is_coalesced=ctx.rows_ordered == 2)
    return grad_x, None, grad_weight, grad_bias if ctx.has_bias else None, None, None


_reward_heads_op.register_autograd(_reward_heads_backward, setup_context=_setup_context)


def reward_heads(hidden_states, weight, bias=None, *, attention_mask=None, cu_seqlens=None, last_index=None,
                 check=True, sparse_grad=False):
    """Validated call of the fused op -> (rewards (B, K), mean, var, min), all fp32.

    A weight (or bias) of another dtype than ``hidden_states`` is cast to it first, as
    autocast would do for a linear layer. ``check``: one host sync validates the scoring
    positions (see :func:`scoring_positions`); ``sparse_grad``: see :func:`ensemble_rewards`.
    """
    _check_heads(hidden_states, weight, bias)
    if not isinstance(sparse_grad, bool):
        raise TypeError(f"expected sparse_grad to be a bool, got {type(sparse_grad).__name__}")
    token_index = scoring_positions(hidden_states, attention_mask, cu_seqlens, last_index, check)
    weight = weight.to(hidden_states.dtype)
    bias = bias.to(hidden_states.dtype) if bias is not None else None
    # Scoring rows increasing with the sequence: certainly for padded input (one per batch row)
    # and checked cu_seqlens, as given for unchecked ones; in any order with last_index.
    if hidden_states.dim() == 3 or (last_index is None and check and value_checks_enabled()):
        rows_ordered = 2
    else:
        rows_ordered = 1 if last_index is None else 0
    return _reward_heads_op(hidden_states, token_index, weight, bias, sparse_grad, rows_ordered)


def ensemble_rewards(hidden_states, weight, bias=None, *, attention_mask=None, cu_seqlens=None, last_index=None,
                     check=True, sparse_grad=False):
    """Rewards (B, K) fp32 of K linear heads ``weight`` (K, H) (+ ``bias`` (K,)) on each sequence's last token.

    Same result as applying ``nn.Linear(H, K)`` to every token and gathering the last one,
    without touching the other tokens. ``hidden_states`` is padded (B, T, H) with an
    optional ``attention_mask`` (left or right padding) or packed (total, H) with
    ``cu_seqlens``; ``last_index`` (B,) overrides both.

    ``check=False`` skips the one host sync that validates the positions (an all-padding row
    then scores its first token, an index out of range the nearest row). ``sparse_grad=True``
    (as ``torch.gather``'s and ``nn.Embedding``'s option) makes the gradient of
    ``hidden_states`` a sparse COO tensor holding only the B scoring rows -- ``grad.indices()``
    (their (batch, token) or row indices), ``grad.values()`` (B, H) -- instead of a dense
    tensor that is zero everywhere else: for callers that scatter it themselves. It is
    coalesced for padded input and checked ``cu_seqlens``; with ``last_index`` or
    ``check=False`` packed input it is not (a row may be scored twice), nor once autograd has
    accumulated it into a leaf's ``.grad``: ``grad._indices()`` / ``grad._values()`` read it in
    every case. Upstream
    autograd functions must accept a sparse gradient (a leaf, or ops with sparse support);
    eager autograd only. Default: one kernel writes the dense gradient, zeros and rows
    together.
    """
    return reward_heads(hidden_states, weight, bias, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                        last_index=last_index, check=check, sparse_grad=sparse_grad)[0]

"""The fused scoring op: last-token gather, K reward heads, ensemble statistics, and autograd.

``ensemble_rewards`` finds each sequence's scoring token (from ``attention_mask``,
``cu_seqlens`` or ``last_index``), then one custom op gathers those B rows, applies the K
heads and returns rewards (B, K) with their mean, unbiased variance and min (B,) -- all
fp32. The backward is a second custom op: d rows = G @ W and d W = G^T @ rows in one
launch; the rows' gradient is scattered into a zero gradient of the input's shape.
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


def _check_index(name, index, expected_shape, upper, hidden_states):
    check_tensor(name, index, dtypes=INDEX_DTYPES)
    check_shape(name, index, expected_shape)
    check_same_device(("hidden_states", name), (hidden_states, index))
    if value_checks_enabled() and index.numel() and not bool(((index >= 0) & (index < upper)).all()):
        raise ValueError(f"expected every {name} value in [0, {upper}), got min {int(index.min())}, "
                         f"max {int(index.max())}")


def _last_real_token(attention_mask):
    """The last non-padding position per row (left or right padding, -1 for a row of padding
    only): where the mask is set, the largest column -- the sum of the mask would miss holes."""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask != 0).long().mul(columns + 1).amax(-1) - 1


def scoring_positions(hidden_states, attention_mask=None, cu_seqlens=None, last_index=None):
    """(batch index, token index) of each sequence's scoring token, validated.

    Padded (B, T, H): ``last_index`` (B,), else the last non-padding token of
    ``attention_mask`` (left or right padding), else the last position. Packed (total, H):
    ``last_index`` (B,) rows, else ``cu_seqlens[1:] - 1``. In eager mode one host sync checks
    the indices (all-padding rows, cu_seqlens consistency, ranges); compiled code skips it.
    """
    device = hidden_states.device
    if hidden_states.dim() == 3:
        batch, seqlen = hidden_states.shape[:2]
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is for packed hidden_states (total, hidden); got padded hidden_states "
                             f"of shape {tuple(hidden_states.shape)} (use attention_mask)")
        if last_index is not None:
            _check_index("last_index", last_index, (batch,), seqlen, hidden_states)
            token = last_index.long()
        elif attention_mask is not None:
            check_tensor("attention_mask", attention_mask, ndims=(2,))
            check_shape("attention_mask", attention_mask, (batch, seqlen), "hidden_states' (batch, seqlen)")
            check_same_device(("hidden_states", "attention_mask"), (hidden_states, attention_mask))
            token = _last_real_token(attention_mask)
            if value_checks_enabled() and batch and bool((token < 0).any()):
                rows = (token < 0).nonzero().flatten().tolist()
                raise ValueError(f"attention_mask has all-padding rows {rows[:8]}: they have no token to score")
        else:
            token = torch.full((batch,), seqlen - 1, dtype=torch.long, device=device)
        return torch.arange(batch, device=device), token

    total = hidden_states.shape[0]
    if attention_mask is not None:
        raise ValueError("attention_mask is for padded hidden_states (batch, seqlen, hidden); packed input takes "
                         "cu_seqlens or last_index")
    if last_index is not None:
        check_tensor("last_index", last_index, ndims=(1,))
        _check_index("last_index", last_index, tuple(last_index.shape), total, hidden_states)
        token = last_index.long()
    elif cu_seqlens is not None:
        check_cu_seqlens("cu_seqlens", cu_seqlens, total, hidden_states, "hidden_states", dtypes=INDEX_DTYPES,
                         min_entries=2, empty_sequences=False)
        token = cu_seqlens[1:].long() - 1
    else:
        raise ValueError("packed hidden_states (total, hidden) need cu_seqlens or last_index to find each sequence")
    return torch.zeros_like(token), token


# ------------------------------------------------------------------------ the custom ops

def _reward_dtype(hidden):
    """Rewards are fp32; fp64 (reachable through the op itself, for gradcheck) stays fp64."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _gather_rows(hidden, seq_index, token_index):
    return hidden[seq_index, token_index] if hidden.dim() == 3 else hidden[token_index]


def _row_offsets(hidden, seq_index, token_index):
    """Element offset of each scoring row in ``hidden``'s storage view (int64)."""
    if hidden.dim() == 3:
        return seq_index * hidden.stride(0) + token_index * hidden.stride(1)
    return token_index * hidden.stride(0)


def _heads_reference(hidden, seq_index, token_index, weight, bias):
    acc = _reward_dtype(hidden)
    rows = _gather_rows(hidden, seq_index, token_index).to(acc)
    rewards = rows @ weight.to(acc).t()
    if bias is not None:
        rewards = rewards + bias.to(acc)
    return (rewards, *ensemble_statistics(rewards))


def _heads_triton(hidden, seq_index, token_index, weight, bias):
    from ..kernels import reward as kernels

    batch, num_heads = token_index.shape[0], weight.shape[0]
    rewards = hidden.new_empty((batch, num_heads), dtype=torch.float32)
    mean, var, minimum = (hidden.new_empty((batch,), dtype=torch.float32) for _ in range(3))
    kernels.forward(hidden, _row_offsets(hidden, seq_index, token_index), weight.contiguous(), bias,
                    rewards, mean, var, minimum)
    return rewards, mean, var, minimum


def _heads_backward_reference(hidden, seq_index, token_index, weight, grad_rewards):
    acc = _reward_dtype(hidden)
    rows = _gather_rows(hidden, seq_index, token_index)
    grad_rows = (grad_rewards.to(hidden.dtype).to(acc) @ weight.to(acc)).to(hidden.dtype)
    return grad_rows, grad_rewards.to(acc).t() @ rows.to(acc)


def _heads_backward_triton(hidden, seq_index, token_index, weight, grad_rewards):
    from ..kernels import reward as kernels

    grad_rows = hidden.new_empty((token_index.shape[0], hidden.shape[-1]))
    grad_weight = hidden.new_empty(weight.shape, dtype=torch.float32)
    kernels.backward(hidden, _row_offsets(hidden, seq_index, token_index), weight.contiguous(),
                     grad_rewards.contiguous(), grad_rows, grad_weight)
    return grad_rows, grad_weight


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


@torch.library.custom_op("docqa_fast::reward_heads", mutates_args=())
def _reward_heads_op(hidden: torch.Tensor, seq_index: torch.Tensor, token_index: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return REWARD_HEADS(hidden.device, hidden.dtype, hidden, seq_index, token_index, weight, bias)


@_reward_heads_op.register_fake
def _(hidden, seq_index, token_index, weight, bias):
    batch, num_heads = token_index.shape[0], weight.shape[0]
    acc = _reward_dtype(hidden)
    return (hidden.new_empty((batch, num_heads), dtype=acc), *(hidden.new_empty((batch,), dtype=acc) for _ in range(3)))


@torch.library.custom_op("docqa_fast::reward_heads_backward", mutates_args=())
def _reward_heads_backward_op(hidden: torch.Tensor, seq_index: torch.Tensor, token_index: torch.Tensor,
                              weight: torch.Tensor, grad_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rows (B, H) in hidden's dtype, d weight (K, H) fp32) from G = dL/d rewards (B, K) fp32."""
    return REWARD_HEADS_BACKWARD(hidden.device, hidden.dtype, hidden, seq_index, token_index, weight, grad_rewards)


@_reward_heads_backward_op.register_fake
def _(hidden, seq_index, token_index, weight, grad_rewards):
    return (hidden.new_empty((token_index.shape[0], hidden.shape[-1])),
            hidden.new_empty(weight.shape, dtype=_reward_dtype(hidden)))


def _setup_context(ctx, inputs, output):
    hidden, seq_index, token_index, weight, bias = inputs
    rewards, mean, _, minimum = output
    ctx.hidden_shape = hidden.shape
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, seq_index, token_index, weight, rewards, mean, minimum)


def _reward_heads_backward(ctx, grad_rewards, grad_mean, grad_var, grad_min):
    hidden, seq_index, token_index, weight, rewards, mean, minimum = ctx.saved_tensors
    num_heads = rewards.shape[-1]
    # Fold the statistics' gradients into one G = dL/d rewards (B, K), on the tiny (B, K) tensors.
    grad = torch.zeros_like(rewards) if grad_rewards is None else grad_rewards.to(rewards.dtype)
    if grad_mean is not None:
        grad = grad + grad_mean[:, None] / num_heads
    if grad_var is not None and num_heads > 1:
        grad = grad + grad_var[:, None] * 2 * (rewards - mean[:, None]) / (num_heads - 1)
    if grad_min is not None:
        # Ties share the gradient equally, as torch.amin's does.
        at_min = (rewards == minimum[:, None]).to(rewards.dtype)
        grad = grad + grad_min[:, None] * at_min / at_min.sum(-1, keepdim=True)

    grad_rows, grad_weight = _reward_heads_backward_op(hidden, seq_index, token_index, weight, grad.contiguous())
    # Only the B scoring rows get a gradient; index_put accumulates if a row is scored twice.
    grad_hidden = torch.zeros(ctx.hidden_shape, dtype=hidden.dtype, device=hidden.device)
    index = (seq_index, token_index) if len(ctx.hidden_shape) == 3 else (token_index,)
    grad_hidden.index_put_(index, grad_rows, accumulate=True)
    grad_bias = grad.sum(0).to(weight.dtype) if ctx.has_bias else None
    return grad_hidden, None, None, grad_weight.to(weight.dtype), grad_bias


_reward_heads_op.register_autograd(_reward_heads_backward, setup_context=_setup_context)


def reward_heads(hidden_states, weight, bias=None, *, attention_mask=None, cu_seqlens=None, last_index=None):
    """Validated call of the fused op -> (rewards (B, K), mean, var, min), all fp32.

    A weight (or bias) of another dtype than ``hidden_states`` is cast to it first, as
    autocast would do for a linear layer.
    """
    _check_heads(hidden_states, weight, bias)
    seq_index, token_index = scoring_positions(hidden_states, attention_mask, cu_seqlens, last_index)
    weight = weight.to(hidden_states.dtype)
    bias = bias.to(hidden_states.dtype) if bias is not None else None
    return _reward_heads_op(hidden_states, seq_index, token_index, weight, bias)


def ensemble_rewards(hidden_states, weight, bias=None, *, attention_mask=None, cu_seqlens=None, last_index=None):
    """Rewards (B, K) fp32 of K linear heads ``weight`` (K, H) (+ ``bias`` (K,)) on each sequence's last token.

    Same result as applying ``nn.Linear(H, K)`` to every token and gathering the last one,
    without touching the other tokens. ``hidden_states`` is padded (B, T, H) with an
    optional ``attention_mask`` (left or right padding) or packed (total, H) with
    ``cu_seqlens``; ``last_index`` (B,) overrides both.
    """
    return reward_heads(hidden_states, weight, bias, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                        last_index=last_index)[0]

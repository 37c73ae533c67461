"""Ensemble aggregation and ranking losses over rewards.

These act on (B, K) / (B, N) tensors a few hundred values large, so they are plain
vectorised PyTorch (a kernel launch would cost more than the math); the expensive part,
scoring the hidden states, is the fused op in :mod:`.ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import FLOAT_DTYPES, check_real, check_same_device, check_shape, check_tensor, value_checks_enabled

AGGREGATIONS = ("mean", "min", "uwo")
REDUCTIONS = ("mean", "sum", "none")


def check_aggregation(method: str, uwo_lambda: float) -> None:
    if method not in AGGREGATIONS:
        raise ValueError(f"expected aggregation (method) to be one of {AGGREGATIONS}, got {method!r}")
    check_real("uwo_lambda", uwo_lambda, minimum=0.0)  # NaN / inf would make every "uwo" score NaN


def ensemble_statistics(rewards: torch.Tensor):
    """(mean, unbiased variance, min) over the last (heads) dimension; one head has variance 0."""
    mean = rewards.mean(-1)
    var = rewards.var(-1) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return mean, var, rewards.amin(-1)


def combine(method: str, uwo_lambda: float, mean, var, minimum):
    """The aggregate from precomputed statistics (what the fused op returns)."""
    if method == "mean":
        return mean
    if method == "min":
        return minimum
    return mean - uwo_lambda * var


def aggregate(rewards: torch.Tensor, method: str = "mean", uwo_lambda: float = 0.5) -> torch.Tensor:
    """Ensemble score (...,) from per-head rewards (..., K).

    ``"mean"``: the average; ``"min"``: the worst case (ties share the gradient);
    ``"uwo"``: uncertainty-weighted, mean - uwo_lambda * unbiased variance. One head has
    no spread: its variance is defined as 0 (not NaN), so "uwo" equals "mean" for K = 1.
    """
    check_tensor("rewards", rewards, dtypes=FLOAT_DTYPES + (torch.float64,))
    if rewards.dim() == 0 or rewards.shape[-1] == 0:
        raise ValueError(f"expected rewards of shape (..., K) with K >= 1 heads, got {tuple(rewards.shape)}")
    check_aggregation(method, uwo_lambda)
    return combine(method, uwo_lambda, *ensemble_statistics(rewards))


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin=None, reduction: str = "mean"):
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin).

    Per head when given (B, K) rewards, on the aggregate when given (B,) scores (e.g.
    ``RewardOutput.score``); ``margin`` is a number or broadcasts against the rewards.
    """
    check_tensor("chosen", chosen, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor("rejected", rejected, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_shape("rejected", rejected, chosen.shape, "the shape of chosen")
    check_same_device(("chosen", "rejected"), (chosen, rejected))
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction to be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "mean" and chosen.numel() == 0:  # the mean of no pairs is NaN
        raise ValueError(f"expected chosen with at least one pair for reduction='mean', "
                         f"got shape {tuple(chosen.shape)}")
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return _reduce(-F.logsigmoid(diff), reduction)


def all_pairs_ranking_loss(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """InstructGPT's ranking loss over N responses per prompt.

    ``scores`` (B, N); ``ranks`` (B, N) integers, 0 = best. For each prompt, the mean of
    -log sigmoid(s_i - s_j) over the pairs with rank_i < rank_j (C(N, 2) of them when no
    ranks tie; tied pairs carry no preference), then the mean over the prompts that have at
    least one such pair.
    """
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES + (torch.float64,), ndims=(2,))
    check_tensor("ranks", ranks, dtypes=(torch.int32, torch.int64))
    check_shape("ranks", ranks, scores.shape, "one rank per score")
    check_same_device(("scores", "ranks"), (scores, ranks))
    if scores.shape[1] < 2:
        raise ValueError(f"expected scores with at least 2 responses per prompt, got shape {tuple(scores.shape)}")
    preferred = (ranks[:, :, None] < ranks[:, None, :]).to(scores.dtype)  # [b, i, j]: i beats j
    pair_losses = -F.logsigmoid(scores[:, :, None] - scores[:, None, :])
    pairs = preferred.sum((1, 2))
    per_prompt = (pair_losses * preferred).sum((1, 2)) / pairs.clamp(min=1)
    # A prompt whose responses all tie states no preference: it is left out of the mean.
    has_pairs = (pairs > 0).to(scores.dtype)
    return (per_prompt * has_pairs).sum() / has_pairs.sum().clamp(min=1)


def plackett_luce_loss(scores: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Listwise loss: negative log-likelihood of ``order`` under Plackett-Luce, batch mean.

    ``order`` (B, N) lists each prompt's response indices from best to worst:
    -sum_k [s_{o_k} - logsumexp(s_{o_k}, ..., s_{o_N})].
    """
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES + (torch.float64,), ndims=(2,))
    check_tensor("order", order, dtypes=(torch.int32, torch.int64))
    check_shape("order", order, scores.shape, "a permutation of the responses per prompt")
    check_same_device(("scores", "order"), (scores, order))
    expected = torch.arange(scores.shape[1], device=order.device)
    if value_checks_enabled() and not bool((order.sort(-1).values == expected).all()):
        raise ValueError("expected every row of order to be a permutation of 0..N-1")
    ordered = scores.gather(1, order.long())
    # log-sum-exp of each suffix o_k..o_N: a reversed cumulative logsumexp.
    suffix_lse = torch.logcumsumexp(ordered.flip(-1), -1).flip(-1)
    return -(ordered - suffix_lse).sum(-1).mean()

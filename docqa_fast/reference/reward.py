"""Reference reward-ensemble scoring, written the way TRL / OpenRLHF / transformers do it.

K separate ``nn.Linear(hidden, 1)`` score heads are applied to every token, and only then
is the last non-padding token of each sequence gathered. This is the test oracle and the
benchmark baseline the fused kernel is measured against, and the losses here are the
plain formulas the fast path must match.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def last_token_index_ref(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token per row (left or right padding), as transformers
    finds it for sequence classification: the rightmost position whose mask is set."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(-1)


def aggregate_ref(rewards: torch.Tensor, method: str = "mean", uwo_lambda: float = 0.5) -> torch.Tensor:
    """(B, K) rewards -> (B,) ensemble score: mean, worst case (min), or mean - lambda * var."""
    mean = rewards.mean(-1)
    if method == "mean":
        return mean
    if method == "min":
        return rewards.amin(-1)
    if method == "uwo":
        variance = rewards.var(-1, unbiased=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
        return mean - uwo_lambda * variance
    raise ValueError(f"unknown aggregation {method!r}")


class ReferenceRewardEnsemble(nn.Module):
    """K independent score heads over a shared backbone's hidden states, applied to all tokens."""

    def __init__(self, hidden_size: int, num_heads: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Linear(hidden_size, 1, bias=bias, dtype=dtype, device=device) for _ in range(num_heads))

    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, last_index=None) -> torch.Tensor:
        """Rewards (B, K) in fp32 of the last token of each sequence."""
        per_token = torch.cat([head(hidden_states) for head in self.heads], dim=-1)  # (..., T, K)
        if cu_seqlens is not None and last_index is None:
            last_index = cu_seqlens[1:].long() - 1
        if hidden_states.dim() == 2:  # packed (total, H): one row per sequence end
            return per_token[last_index].float()
        if last_index is None:
            last_index = (last_token_index_ref(attention_mask) if attention_mask is not None
                          else torch.full((per_token.shape[0],), per_token.shape[1] - 1, device=per_token.device))
        return per_token[torch.arange(per_token.shape[0], device=per_token.device), last_index].float()


# ------------------------------------------------------------------------------ losses

def pairwise_loss_ref(chosen, rejected, margin=None, reduction="mean"):
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected - margin), elementwise then reduced."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    return {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()


def all_pairs_ranking_loss_ref(scores, ranks):
    """InstructGPT: per prompt, the mean over its pairs (i, j) with rank_i < rank_j (0 = best)
    of -log sigmoid(s_i - s_j) -- C(N, 2) pairs when no ranks tie; then the mean over the
    prompts that have any such pair."""
    per_prompt = []
    for row_scores, row_ranks in zip(scores, ranks):
        losses = [-F.logsigmoid(row_scores[i] - row_scores[j])
                  for i, j in itertools.permutations(range(len(row_scores)), 2) if row_ranks[i] < row_ranks[j]]
        if losses:  # a prompt whose responses all tie states no preference
            per_prompt.append(torch.stack(losses).mean())
    return torch.stack(per_prompt).mean() if per_prompt else scores.sum() * 0


def plackett_luce_loss_ref(scores, order):
    """Negative log-likelihood of the ranking ``order`` (best first) under Plackett-Luce, batch mean."""
    total = []
    for row_scores, row_order in zip(scores, order):
        ordered = row_scores[row_order]
        total.append(-sum(ordered[k] - torch.logsumexp(ordered[k:], 0) for k in range(len(ordered))))
    return torch.stack(total).mean()

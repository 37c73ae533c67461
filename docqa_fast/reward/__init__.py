"""Reward-ensemble scoring: fused last-token gather, K reward heads, aggregation and ranking losses.

See :class:`RewardEnsembleHead` for the module, :func:`ensemble_rewards` for the functional
form, :func:`aggregate` and the losses for what goes on top.
"""

from .head import RewardEnsembleHead, RewardOutput
from .losses import aggregate, all_pairs_ranking_loss, pairwise_loss, plackett_luce_loss
from .ops import ensemble_rewards

__all__ = ["RewardEnsembleHead", "RewardOutput", "aggregate", "all_pairs_ranking_loss", "ensemble_rewards",
           "pairwise_loss", "plackett_luce_loss"]

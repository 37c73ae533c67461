"""nn.Module losses that take the LM head's weight and hidden states, never logits.

A trainer passes ``model.lm_head.weight`` and the last hidden states (``output_hidden_states``
or the decoder's output before the head) and gets the loss; the (tokens x vocabulary) logits
are never built, in the forward or the backward.
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import _check_ignore_index, check_cross_entropy_settings, linear_cross_entropy, sequence_logprobs
from .ops import check_head_inputs
from .preference import _check_beta, _check_lam, dpo_loss, longpo_loss

__all__ = ["LinearCrossEntropyLoss", "FusedLinearDPOLoss", "FusedLinearLongPOLoss"]


class LinearCrossEntropyLoss(nn.Module):
    """``CrossEntropyLoss(lm_head(hidden), labels)`` fused: forward(lm_head_weight, hidden, labels, bias=None).

    Same keywords as :func:`linear_cross_entropy` (ignore_index, reduction, label_smoothing,
    z_loss); the argument order follows Liger's ``LigerFusedLinearCrossEntropyLoss``.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0):
        super().__init__()
        # Checked here, not first at the forward of a training step.
        check_cross_entropy_settings(ignore_index, reduction, label_smoothing, z_loss)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    def forward(self, lm_head_weight, hidden, labels, bias=None):
        return linear_cross_entropy(hidden, lm_head_weight, labels, bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}")


def _answer_logps(lm_head_weight, hidden, labels, ignore_index):
    """(summed log-prob, counted tokens) per sequence of a padded (B, T, H) or single (T, H) batch."""
    sums = sequence_logprobs(hidden, lm_head_weight, labels, ignore_index=ignore_index)
    counted = (labels != ignore_index).reshape(sums.shape[0], -1).sum(-1)
    return sums, counted


class _PairLoss(nn.Module):
    """Shared forward signature: (lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen,
    labels_rejected, ref_chosen_logps, ref_rejected_logps) -> (loss, chosen_rewards, rejected_rewards).

    hidden_* (B, T, H) or (T, H) (one pair); labels_* alike with ignore_index on prompt and
    padding tokens; ref_*_logps (B,) summed reference log-probs of the same answers (e.g.
    :func:`sequence_logprobs` of the frozen reference under ``torch.no_grad()``).
    """

    def __init__(self, beta: float, ignore_index: int):
        super().__init__()
        self.beta = _check_beta(beta)
        self.ignore_index = _check_ignore_index(ignore_index)

    def _pair(self, lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected):
        # Both answers' inputs are checked before either is computed.
        check_head_inputs(hidden_chosen, lm_head_weight, labels_chosen)
        check_head_inputs(hidden_rejected, lm_head_weight, labels_rejected)
        chosen = _answer_logps(lm_head_weight, hidden_chosen, labels_chosen, self.ignore_index)
        rejected = _answer_logps(lm_head_weight, hidden_rejected, labels_rejected, self.ignore_index)
        return chosen, rejected


class FusedLinearDPOLoss(_PairLoss):
    """DPO through the LM head: the batch-mean of :func:`dpo_loss` on fused sequence log-probs.

    ``average_log_prob`` (default: True for loss_type "ipo", as TRL does, else False) uses
    per-token mean log-probs instead of sums; the reference log-probs must then be means too.
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 ignore_index: int = -100, average_log_prob: bool | None = None):
        super().__init__(beta, ignore_index)
        self.label_smoothing = label_smoothing
        self.loss_type = loss_type
        self.average_log_prob = loss_type == "ipo" if average_log_prob is None else average_log_prob

    def forward(self, lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected,
                ref_chosen_logps, ref_rejected_logps):
        (chosen, chosen_count), (rejected, rejected_count) = self._pair(
            lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected)
        if self.average_log_prob:
            chosen = chosen / chosen_count.clamp_min(1)
            rejected = rejected / rejected_count.clamp_min(1)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta=self.beta,
            label_smoothing=self.label_smoothing, loss_type=self.loss_type)
        return losses.mean(), chosen_rewards, rejected_rewards

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"average_log_prob={self.average_log_prob}, ignore_index={self.ignore_index}")


class FusedLinearLongPOLoss(_PairLoss):
    """LongPO through the LM head: batch-mean of chosen NLL + lam * DPO (short-to-long margin).

    The policy hidden states come from the long context, ``ref_*_logps`` from the frozen
    reference on the short chunks; the NLL is the chosen answer's mean per-token NLL.
    """

    def __init__(self, beta: float = 0.01, lam: float = 0.01, ignore_index: int = -100):
        super().__init__(beta, ignore_index)
        self.lam = _check_lam(lam)

    def forward(self, lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected,
                ref_chosen_logps, ref_rejected_logps):
        (chosen, chosen_count), (rejected, _) = self._pair(
            lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected)
        chosen_nll = -chosen / chosen_count.clamp_min(1)
        losses, chosen_rewards, rejected_rewards = longpo_loss(
            chosen, rejected, ref_chosen_logps, ref_rejected_logps, chosen_nll, beta=self.beta, lam=self.lam)
        return losses.mean(), chosen_rewards, rejected_rewards

    def extra_repr(self) -> str:
        return f"beta={self.beta}, lam={self.lam}, ignore_index={self.ignore_index}"

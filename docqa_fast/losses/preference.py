"""DPO and LongPO losses on sequence log-probabilities (TRL's definitions).

These are a handful of elementwise ops on (B,) tensors, so they are plain PyTorch (autograd
and torch.compile work as for any PyTorch code); the expensive part -- the sequence
log-probs through the LM head -- is :func:`docqa_fast.losses.sequence_logprobs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import FLOAT_DTYPES, check_real, check_same_device, check_shape, check_tensor

__all__ = ["dpo_loss", "longpo_loss"]

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _check_logps(names, tensors):
    first = check_tensor(names[0], tensors[0], dtypes=FLOAT_DTYPES + (torch.float64,), ndims=(0, 1))
    for name, tensor in zip(names[1:], tensors[1:]):
        check_tensor(name, tensor, dtypes=FLOAT_DTYPES + (torch.float64,))
        check_shape(name, tensor, first.shape, f"the shape of {names[0]}")
    check_same_device(names, tensors)


def _check_beta(beta) -> float:
    return check_real("beta", beta, positive=True)


def _check_lam(lam) -> float:
    return check_real("lam", lam, minimum=0.0)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """Per-pair DPO losses and the implicit rewards, as TRL's ``DPOTrainer.dpo_loss`` returns them.

    With margin = (pi_c - pi_r) - (ref_c - ref_r):

    * "sigmoid": -(1 - eps) log sigmoid(beta margin) - eps log sigmoid(-beta margin)
      (eps = label_smoothing: conservative DPO);
    * "ipo": (margin - 1 / (2 beta))^2;
    * "hinge": max(0, 1 - beta margin).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,) (or scalars for scalar
    inputs), the rewards beta (pi - ref) detached. ``losses.mean()`` is the batch loss.
    """
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_logps(_NAMES, tensors)
    beta = _check_beta(beta)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"expected loss_type in {LOSS_TYPES}, got {loss_type!r}")
    if check_real("label_smoothing", label_smoothing) > 0.5 or label_smoothing < 0.0:
        raise ValueError(f"expected label_smoothing in [0, 0.5], got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, got loss_type={loss_type!r}")
    margin = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * margin)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def longpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_nll,
                beta: float = 0.01, lam: float = 0.01):
    """Per-pair LongPO losses, chosen_nll + lam * DPO-sigmoid(beta), and the implicit rewards.

    The policy log-probs are of the answers after the long context, the reference log-probs
    of the same answers after the short chunks (the short-to-long margin); ``chosen_nll`` is
    the policy's NLL of the chosen answer on the long context (per pair, e.g. the mean
    per-token NLL). β = λ = 0.01 as in LongPO. Returns ``(losses, chosen_rewards,
    rejected_rewards)`` like :func:`dpo_loss`.
    """
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_nll)
    _check_logps(_NAMES + ("chosen_nll",), tensors)
    lam = _check_lam(lam)
    dpo, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                                     ref_rejected_logps, beta=beta)
    return chosen_nll + lam * dpo, chosen_rewards, rejected_rewards

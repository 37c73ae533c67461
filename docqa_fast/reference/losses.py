"""Reference log-probabilities and preference losses through the LM head, with materialised logits.

This is what a trainer does today -- ``logits = hidden @ weight.T`` (tokens x vocabulary),
``log_softmax``, gather -- written plainly: the test oracle of docqa_fast.losses and its CPU
path. Layout: hidden (N, H) or (B, T, H), weight (V, H) like ``lm_head.weight``, labels of
hidden's leading shape, ``ignore_index`` marking tokens that count for nothing.

Precision: with ``upcast=True`` (the default) the logits and everything after them are fp32
(fp64 when an input is fp64, for exact comparisons); ``upcast=False`` computes in the
inputs' dtype, the "plain PyTorch at the kernel's precision" of the tolerance rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors, upcast: bool = True) -> torch.dtype:
    dtypes = [t.dtype for t in tensors if t is not None]
    if torch.float64 in dtypes:
        return torch.float64
    return torch.float32 if upcast else dtypes[0]


def linear_logits_ref(hidden, weight, bias=None, *, temperature: float = 1.0, upcast: bool = True):
    """The full logits (..., V) = (hidden @ weight^T + bias) / temperature."""
    dtype = _compute_dtype(hidden, weight, bias, upcast=upcast)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits / temperature


def _gather_labels(values, labels, ignore_index):
    """values[..., label] with 0 where the label is ignore_index."""
    valid = labels != ignore_index
    picked = values.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0), valid


def linear_logprobs_ref(hidden, weight, labels, bias=None, *, ignore_index: int = -100, temperature: float = 1.0,
                        return_entropy: bool = False, upcast: bool = True):
    """log p(label) per token (0 where ignored); with ``return_entropy`` also the entropy (0 where ignored)."""
    log_probs = torch.log_softmax(linear_logits_ref(hidden, weight, bias, temperature=temperature, upcast=upcast), -1)
    logprobs, valid = _gather_labels(log_probs, labels, ignore_index)
    if not return_entropy:
        return logprobs
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprobs, torch.where(valid, entropy, 0.0)


def linear_cross_entropy_ref(hidden, weight, labels, bias=None, *, ignore_index: int = -100,
                             reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                             upcast: bool = True):
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` plus ``z_loss * lse**2`` per counted token.

    "mean" divides by the number of counted tokens, as F.cross_entropy does, except that a
    batch with none gives 0 (F.cross_entropy gives NaN).
    """
    logits = linear_logits_ref(hidden, weight, bias, upcast=upcast)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    losses = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
    valid = flat_labels != ignore_index
    if z_loss:
        losses = losses + torch.where(valid, z_loss * torch.logsumexp(flat_logits, -1) ** 2, 0.0)
    if reduction == "none":
        return losses.reshape(labels.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum().clamp_min(1)


def sequence_logprobs_ref(hidden, weight, labels, *, cu_seqlens=None, attention_mask=None, average: bool = False,
                          bias=None, ignore_index: int = -100, temperature: float = 1.0, upcast: bool = True):
    """One summed (or, with ``average``, mean) log-prob per sequence.

    Padded: hidden (B, T, H), labels (B, T), optional attention_mask (B, T) (0 = padding)
    -> (B,). Packed: hidden (N, H) or (1, N, H), labels alike, cu_seqlens (S + 1,) -> (S,).
    A token counts when its label is not ignore_index and its mask is not 0; a sequence with
    no counted token has 0 (also when averaged).
    """
    token_logps = linear_logprobs_ref(hidden, weight, labels, bias, ignore_index=ignore_index,
                                      temperature=temperature, upcast=upcast)
    counted = labels != ignore_index
    if attention_mask is not None:
        counted = counted & (attention_mask != 0)
    token_logps = torch.where(counted, token_logps, 0.0)
    if cu_seqlens is not None:
        token_logps, counted = token_logps.reshape(-1), counted.reshape(-1)
        bounds = cu_seqlens.tolist()
        sums = torch.stack([token_logps[start:end].sum() for start, end in zip(bounds[:-1], bounds[1:])])
        counts = torch.stack([counted[start:end].sum() for start, end in zip(bounds[:-1], bounds[1:])])
    else:
        if token_logps.dim() == 1:
            token_logps, counted = token_logps.unsqueeze(0), counted.unsqueeze(0)
        sums, counts = token_logps.sum(-1), counted.sum(-1)
    if average:
        return torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
    return sums


def dpo_loss_ref(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """Per-pair DPO losses and implicit rewards, as TRL's DPOTrainer.dpo_loss computes them.

    margin = (pi_c - pi_r) - (ref_c - ref_r);
    sigmoid: -(1 - eps) log sigmoid(beta margin) - eps log sigmoid(-beta margin)  (cDPO);
    ipo: (margin - 1 / (2 beta))^2;  hinge: max(0, 1 - beta margin).
    Rewards: beta (pi_c - ref_c) and beta (pi_r - ref_r), detached.
    """
    margin = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                  - label_smoothing * F.logsigmoid(-beta * margin))
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def longpo_loss_ref(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_nll,
                    beta: float = 0.01, lam: float = 0.01):
    """Per-pair LongPO losses: chosen_nll + lam * DPO(sigmoid, beta), and the implicit rewards.

    The policy log-probs come from the long context, the reference ones from the short
    chunks; chosen_nll is the policy's NLL of the chosen answer on the long context.
    """
    dpo, chosen_rewards, rejected_rewards = dpo_loss_ref(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta=beta)
    return chosen_nll + lam * dpo, chosen_rewards, rejected_rewards


def _pair_logps(lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected, ignore_index,
                average, upcast):
    chosen = sequence_logprobs_ref(hidden_chosen, lm_head_weight, labels_chosen, average=average,
                                   ignore_index=ignore_index, upcast=upcast)
    rejected = sequence_logprobs_ref(hidden_rejected, lm_head_weight, labels_rejected, average=average,
                                     ignore_index=ignore_index, upcast=upcast)
    return chosen, rejected


def fused_linear_dpo_loss_ref(lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected,
                              ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
                              label_smoothing: float = 0.0, loss_type: str = "sigmoid", ignore_index: int = -100,
                              average_log_prob: bool | None = None, upcast: bool = True):
    """What FusedLinearDPOLoss computes: (mean loss, chosen rewards, rejected rewards).

    Sequence log-probs are sums over the answer tokens (means for loss_type "ipo", as TRL
    does, unless ``average_log_prob`` says otherwise).
    """
    average = loss_type == "ipo" if average_log_prob is None else average_log_prob
    chosen, rejected = _pair_logps(lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected,
                                   ignore_index, average, upcast)
    losses, chosen_rewards, rejected_rewards = dpo_loss_ref(chosen, rejected, ref_chosen_logps, ref_rejected_logps,
                                                            beta=beta, label_smoothing=label_smoothing,
                                                            loss_type=loss_type)
    return losses.mean(), chosen_rewards, rejected_rewards


def fused_linear_longpo_loss_ref(lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected,
                                 ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.01, lam: float = 0.01,
                                 ignore_index: int = -100, upcast: bool = True):
    """What FusedLinearLongPOLoss computes: (mean loss, chosen rewards, rejected rewards).

    DPO on summed answer log-probs; the NLL is the chosen answer's mean per-token NLL.
    """
    chosen, rejected = _pair_logps(lm_head_weight, hidden_chosen, hidden_rejected, labels_chosen, labels_rejected,
                                   ignore_index, False, upcast)
    chosen_nll = -sequence_logprobs_ref(hidden_chosen, lm_head_weight, labels_chosen, average=True,
                                        ignore_index=ignore_index, upcast=upcast)
    losses, chosen_rewards, rejected_rewards = longpo_loss_ref(chosen, rejected, ref_chosen_logps, ref_rejected_logps,
                                                               chosen_nll, beta=beta, lam=lam)
    return losses.mean(), chosen_rewards, rejected_rewards


# --------------------------------------------------- the statistics the fused kernels compute

def linear_logit_stats_ref(hidden, weight, bias, labels, ignore_index: int = -100, temperature: float = 1.0):
    """(lse, label_logit, sum_logits, entropy), each (N,), of z = (hidden @ weight^T + bias) / T.

    hidden (N, H), labels (N,); all four are 0 where the label is ignore_index (such a token
    counts for nothing). Every loss of docqa_fast.losses is a function of these four; this is
    the CPU path of the op that the fused implementation computes.
    """
    logits = linear_logits_ref(hidden, weight, bias, temperature=temperature)
    lse = torch.logsumexp(logits, -1)
    log_probs = torch.log_softmax(logits, -1)
    # Like the kernel, a label outside [0, V) (unchecked bad input) matches no row: its logit is 0.
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    label_logit, _ = _gather_labels(logits, torch.where(in_range, labels, ignore_index), ignore_index)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    counted = labels != ignore_index
    return tuple(torch.where(counted, s, 0.0) for s in (lse, label_logit, logits.sum(-1), entropy))


def linear_logit_stats_backward_ref(hidden, weight, bias, labels, lse, coefs, ignore_index: int = -100,
                                    temperature: float = 1.0):
    """(d_hidden, d_weight, d_bias) for dL/dz_j = p_j (a + b log p_j) + c [j == label] + d.

    ``coefs`` is (4, N): the rows a, b, c, d built from the upstream gradients of the four
    statistics; dL/dlogits = dL/dz / T. Gradients in fp32 (fp64 for fp64 inputs). Rows whose
    coefficients are all 0 contribute nothing (their lse may be the 0 of an ignored row).
    """
    logits = linear_logits_ref(hidden, weight, bias, temperature=temperature)
    dtype = logits.dtype
    active = (coefs != 0).any(0).unsqueeze(-1)
    log_probs = torch.where(active, logits - lse.to(dtype).unsqueeze(-1), 0.0)
    a, b, c, d = coefs.to(dtype).unsqueeze(-1).unbind(0)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < logits.shape[-1])
    one_hot = F.one_hot(torch.where(valid, labels, 0), logits.shape[-1]).to(dtype) * valid.unsqueeze(-1)
    grad_logits = (log_probs.exp() * (a + b * log_probs) + c * one_hot + d) / temperature
    d_hidden = grad_logits @ weight.to(dtype)
    d_weight = grad_logits.T @ hidden.to(dtype)
    return d_hidden, d_weight, grad_logits.sum(0)

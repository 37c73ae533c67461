"""Token log-probabilities, cross-entropy and sequence log-probabilities through the LM head.

Each function takes the hidden states and the head weight instead of logits and returns
what the materialised-logits computation would (docqa_fast.reference.losses), in fp32,
with gradients to hidden, weight and bias. The logits (tokens x vocabulary) never exist:
everything is a function of four (N,) statistics (see ``ops``).
"""

from __future__ import annotations

import torch

from .._validation import check_cu_seqlens, check_same_device, check_shape, check_tensor
from .ops import (check_head_inputs, check_label_values, check_positive, check_smoothing_and_z_loss,
                  cross_entropy_per_token, cross_entropy_with_grads, logit_stats)

__all__ = ["linear_logprobs", "linear_cross_entropy", "sequence_logprobs"]

REDUCTIONS = ("mean", "sum", "none")


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"expected ignore_index to be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_cross_entropy_settings(ignore_index, reduction, label_smoothing, z_loss) -> int:
    """linear_cross_entropy's settings (also checked when LinearCrossEntropyLoss is built)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"expected reduction in {REDUCTIONS}, got {reduction!r}")
    check_smoothing_and_z_loss(label_smoothing, z_loss)
    return _check_ignore_index(ignore_index)


def _token_logprobs(hidden, weight, labels, bias, ignore_index, temperature, return_entropy, validate):
    """(log p(label), entropy or None, counted mask), shaped like labels; 0 where the label is ignored."""
    ignore_index = _check_ignore_index(ignore_index)
    temperature = check_positive("temperature", temperature)
    flat_hidden, flat_labels = check_head_inputs(hidden, weight, labels, bias)
    check_label_values(flat_labels, weight.shape[0], ignore_index, validate)
    lse, label_logit, _, entropy = logit_stats(flat_hidden, weight, bias, flat_labels, ignore_index, temperature)
    counted = flat_labels != ignore_index
    logprobs = torch.where(counted, label_logit - lse, 0.0).reshape(labels.shape)
    entropy = torch.where(counted, entropy, 0.0).reshape(labels.shape) if return_entropy else None
    return logprobs, entropy, counted.reshape(labels.shape)


def linear_logprobs(hidden, weight, labels, bias=None, *, ignore_index: int = -100, temperature: float = 1.0,
                    return_entropy: bool = False, validate: bool = False):
    """Per-token log p(label) under softmax((hidden @ weight^T + bias) / temperature).

    Args:
        hidden: (N, H) or (B, T, H) hidden states, fp16/bf16/fp32.
        weight: (V, H) head weight (``lm_head.weight``), hidden's dtype, rows contiguous.
        labels: int64 (or int32) of hidden's leading shape; ``ignore_index`` marks tokens to skip.
        bias: optional (V,) head bias.
        temperature: divides the logits (sampling temperature, as RL trainers apply it).
        return_entropy: also return each token's entropy of the full distribution.
        validate: check every label is in [0, V) or ignore_index (one host sync; eager only).

    Returns:
        fp32 log-probs shaped like labels (0 at ignored positions), and with
        ``return_entropy`` a pair (log-probs, entropy) (entropy 0 at ignored positions).
    """
    logprobs, entropy, _ = _token_logprobs(hidden, weight, labels, bias, ignore_index, temperature,
                                           return_entropy, validate)
    return (logprobs, entropy) if return_entropy else logprobs


def linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, validate: bool = False):
    """``F.cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the logits, plus an optional z-loss.

    Per counted token: lse - (1 - eps) z_label - (eps / V) sum_j z_j + z_loss * lse^2 (eps =
    label_smoothing, exactly F.cross_entropy's definition; the z-loss is PaLM's). "mean"
    divides by the number of counted tokens; a batch where every label is ignore_index gives
    0 and zero gradients (F.cross_entropy gives NaN). "none" returns a loss per token, shaped
    like labels, whose gradients are exact for any upstream gradient. "mean" and "sum" with
    gradients wanted may compute them in the forward (``DOCQA_FAST_LOSSES_ROUTE``, see
    forward_grad.py): the same values, 3 products instead of 4.
    """
    ignore_index = check_cross_entropy_settings(ignore_index, reduction, label_smoothing, z_loss)
    flat_hidden, flat_labels = check_head_inputs(hidden, weight, labels, bias)
    check_label_values(flat_labels, weight.shape[0], ignore_index, validate)
    # One upstream scalar for every token: with gradients wanted, the route may form them in the
    # forward (forward_grad.py); without, the statistics pass below is all the forward does.
    # Imported here, not with the package: they import the Triton kernels, and Triton decides
    # compiled-or-interpreted when a kernel module is imported (the sm_90 compile check's workers
    # switch the interpreter off after importing docqa_fast).
    from . import forward_grad, fused

    needs = forward_grad.wants_gradients(hidden, weight, bias)
    if reduction != "none" and any(needs) and fused.route(hidden.device, hidden.dtype) == "fwd-grad":
        return cross_entropy_with_grads(flat_hidden, weight, bias, flat_labels, ignore_index, label_smoothing, z_loss,
                                        reduction == "mean", needs)
    losses = cross_entropy_losses(flat_hidden, weight, bias, flat_labels, ignore_index, label_smoothing, z_loss)
    counted = flat_labels != ignore_index
    if reduction == "none":
        return losses.reshape(labels.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / counted.sum().clamp_min(1)


def cross_entropy_losses(hidden, weight, bias, labels, ignore_index: int, label_smoothing: float, z_loss: float):
    """Per-token losses (N,) on validated (N, H) hidden and (N,) labels, 0 where ignored."""
    lse, label_logit, sum_logits, _ = logit_stats(hidden, weight, bias, labels, ignore_index, 1.0)
    return cross_entropy_per_token(lse, label_logit, sum_logits, labels != ignore_index, weight.shape[0],
                                   label_smoothing, z_loss)


def sequence_logprobs(hidden, weight, labels, *, cu_seqlens=None, attention_mask=None, average: bool = False,
                      bias=None, ignore_index: int = -100, temperature: float = 1.0, validate: bool = False):
    """One summed (``average``: mean) log-prob per sequence, fp32, for padded or packed batches.

    Padded: hidden (B, T, H), labels (B, T), optional attention_mask (B, T) (0 = padding)
    -> (B,). Packed: hidden (N, H) or (1, N, H), labels alike, cu_seqlens (S + 1,) int32/int64
    -> (S,); empty sequences are allowed. A token counts when its label is not ignore_index
    and its mask is not 0; labels are already aligned with hidden (shifted, as TRL's
    ``get_batch_logps`` shifts them). A sequence with no counted token gives 0.
    """
    if cu_seqlens is not None and attention_mask is not None:
        raise ValueError("give cu_seqlens (packed) or attention_mask (padded), not both")
    if cu_seqlens is not None:  # checked before anything is computed
        check_head_inputs(hidden, weight, labels, bias)
        check_cu_seqlens("cu_seqlens", cu_seqlens, labels.numel(), hidden, "hidden", dtypes=(torch.int32, torch.int64),
                         min_entries=2)
    logprobs, _, counted = _token_logprobs(hidden, weight, labels, bias, ignore_index, temperature, False, validate)
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask)
        check_shape("attention_mask", attention_mask, labels.shape, "labels' shape")
        check_same_device(("hidden", "attention_mask"), (hidden, attention_mask))
        if attention_mask.dim() != 2:
            raise ValueError(f"expected attention_mask of shape (batch, seqlen), got {tuple(attention_mask.shape)}")
        counted = counted & (attention_mask != 0)
        logprobs = torch.where(counted, logprobs, 0.0)
    if cu_seqlens is not None:
        if hidden.dim() == 3 and hidden.shape[0] != 1:
            raise ValueError(f"expected packed hidden of shape (N, H) or (1, N, H) with cu_seqlens, "
                             f"got {tuple(hidden.shape)}")
        logprobs, counted = logprobs.reshape(-1), counted.reshape(-1)
        total = logprobs.shape[0]
        check_cu_seqlens("cu_seqlens", cu_seqlens, total, hidden, "hidden", dtypes=(torch.int32, torch.int64),
                         min_entries=2)
        n_seqs = cu_seqlens.shape[0] - 1
        # Sequence of each token; tokens outside [cu[0], cu[-1]) (only with unchecked, wrong
        # cu_seqlens under torch.compile) land in an extra bucket that is dropped.
        positions = torch.arange(total, device=logprobs.device)
        seq = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
        seq = torch.where(positions < cu_seqlens[0].long(), n_seqs, seq)
        sums = logprobs.new_zeros(n_seqs + 1).index_add(0, seq, logprobs)[:n_seqs]
        counts = counted.new_zeros(n_seqs + 1, dtype=torch.float32).index_add(0, seq, counted.float())[:n_seqs]
    else:
        if logprobs.dim() == 1:  # (N, H) hidden without cu_seqlens: one sequence
            logprobs, counted = logprobs.unsqueeze(0), counted.unsqueeze(0)
        sums, counts = logprobs.sum(-1), counted.sum(-1).float()
    if average:
        return torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
    return sums

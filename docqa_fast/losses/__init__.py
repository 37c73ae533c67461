"""Fused linear log-probabilities and preference losses: the LM head's logits are never built.

``lm_head`` -> logits (tokens x 152,064) -> ``log_softmax`` -> gather is the memory wall of
long-context preference training (37 GiB of bf16 logits for one 128K-token sequence). Here
the head projection runs chunk by chunk -- library matmuls (cuBLAS) into one reused buffer,
with Triton kernels for the online log-sum-exp, the label gather and dL/dlogits around them
(``chunked.py``), or the all-Triton tiles (``kernels/losses.py``) -- and only the tokens that
count and the vocabulary tiles that are not negligible are computed (``fused.py``); the
materialised reference, docqa_fast.reference.losses, runs on CPU:

* :func:`linear_logprobs` -- per-token log p(label) (and entropy), fp32;
* :func:`linear_cross_entropy` -- ``F.cross_entropy(hidden @ weight.T, labels)`` with
  label smoothing and z-loss, every reduction;
* :func:`sequence_logprobs` -- summed / averaged log-probs per sequence, padded or packed;
* :func:`dpo_loss`, :func:`longpo_loss` -- TRL's DPO (sigmoid / ipo / hinge) and LongPO;
* modules :class:`LinearCrossEntropyLoss`, :class:`FusedLinearDPOLoss`,
  :class:`FusedLinearLongPOLoss` taking ``(lm_head_weight, hidden, ...)``.

The op underneath is ``torch.ops.docqa_fast.linear_logit_stats`` (a custom op with a fake
implementation and autograd; its backward is ``linear_logit_stats_backward``).
"""

from .functional import linear_cross_entropy, linear_logprobs, sequence_logprobs
from .modules import FusedLinearDPOLoss, FusedLinearLongPOLoss, LinearCrossEntropyLoss
from .preference import dpo_loss, longpo_loss

__all__ = [
    "linear_logprobs", "linear_cross_entropy", "sequence_logprobs", "dpo_loss", "longpo_loss",
    "LinearCrossEntropyLoss", "FusedLinearDPOLoss", "FusedLinearLongPOLoss",
]

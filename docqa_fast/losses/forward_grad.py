"""The forward-gradient route of a mean / sum cross-entropy: gradients computed in the forward.

When the upstream gradient of a loss is one scalar known only in the backward -- the result of
``linear_cross_entropy(..., reduction="mean" | "sum")`` -- dL/dz of every token is that scalar
times a gradient the forward can already form. So the forward walks chunks of rows, each with
its whole vocabulary's logits, forms G = dL/dz once the rows' log-sum-exp is final, and runs
d_hidden = G W and d_weight += G^T h right there (chunked.stats_and_grads): 3 products in all,
where the statistics forward and a recomputing backward run 4. The backward only multiplies
the saved gradients by the upstream scalar (Liger's fused linear cross-entropy does the same
with Triton products).

The op, ``docqa_fast::linear_cross_entropy_grads(hidden, weight, bias, labels, ignore_index,
label_smoothing, z_loss, mean, need_hidden, need_weight, need_bias)`` returns (loss, d_hidden,
d_weight, d_bias): the reduced loss (fp32, fp64 for fp64 inputs) and its gradients in the
inputs' dtype (fp32 for fp16 inputs; empty (0,) where not needed); it is registered, with its
fake, checks and reference, in ops.py, whose autograd.Function around it (_ForwardGradLoss)
multiplies the gradients by the upstream scalar in the backward (in place; out of place for
fp16's fp32 gradients and under torch.compile); this module is its triton implementation.

Memory beyond inputs and gradients (chunked.forward_grad_plan): a chunk of rows x V 16-bit
logits and rows x CHUNK_COLUMNS fp32 products, from a budget of half the rows' 16-bit logits
(0.86 GiB at 8K tokens through Qwen2.5's head), and for bf16 beyond 4 chunks a (V, H) fp32
accumulator. Only callers that need gradients take this route (functional.linear_cross_entropy
decides, reading ``DOCQA_FAST_LOSSES_ROUTE`` / the tuned table, fused.route); without them the
forward is the statistics pass. Not for per-token losses or log-probs (reduction "none",
sequence_logprobs, DPO): their upstream gradients differ per token or per sequence.
"""

from __future__ import annotations

import torch

from ..kernels import losses as kernels
from . import chunked, fused
from .ops import cross_entropy_coefs, cross_entropy_per_token, gradients_dtype, loss_scale


def cross_entropy_grads(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, mean, need_hidden,
                        need_weight, need_bias):
    """The triton implementation of linear_cross_entropy_grads (ops.py): ignored rows gathered out as
    by the statistics forward, then chunked.stats_and_grads (or the all-Triton kernels)."""
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    counted = labels != ignore_index
    # Ignored tokens are left out of every product, as by the statistics forward (fused.py).
    rows = fused.rows_to_compute(counted, fused.skip_mode())
    h, y = (hidden.index_select(0, rows), labels.index_select(0, rows)) if rows is not None else (hidden, labels)
    scale = loss_scale(counted, mean, torch.float32).reshape(1)

    def coefs_of(lse, r0, r1):
        return cross_entropy_coefs(lse, y[r0:r1] != ignore_index, vocab, label_smoothing, z_loss)

    def run(tiles, engine):
        if engine == "cublas":
            chunk_rows = kernels.tiles("losses_route", h.dtype, h.device)["CHUNK_ROWS"]
            return chunked.stats_and_grads(h, weight, bias, y, ignore_index, coefs_of, scale, need_hidden,
                                           need_weight, need_bias, tiles, chunk_rows)
        # Triton products (the tuned table's choice, or no fp32-output matmul in this torch): the
        # statistics pass, then the recomputing backward's pass, both now, on the loss's
        # coefficients, the gradients written in the route's dtype (fp32 for fp16).
        lse, label_logit, sum_logits, _ = kernels.logit_stats(h, weight, bias, y, ignore_index, 1.0)
        grads = kernels.logit_stats_backward(h, weight, bias, y, lse, coefs_of(lse, 0, h.shape[0]) * scale,
                                             ignore_index, 1.0, need_hidden, need_weight, need_bias,
                                             out_dtype=gradients_dtype(h.dtype))
        return (lse, label_logit, sum_logits, *grads)

    lse, label_logit, sum_logits, d_hidden, d_weight, d_bias = fused.run_with_tiles(hidden.dtype, hidden.device, run)
    losses = cross_entropy_per_token(lse, label_logit, sum_logits, y != ignore_index, vocab, label_smoothing, z_loss)
    if rows is not None and need_hidden:
        d_hidden = fused.scatter_rows(d_hidden, rows, n_rows)
    return losses.sum() * scale[0], d_hidden, d_weight, d_bias


def wants_gradients(*tensors) -> tuple[bool, ...]:
    """Whether autograd will want a gradient of each tensor (None: no)."""
    enabled = torch.is_grad_enabled()
    return tuple(bool(enabled and t is not None and t.requires_grad) for t in tensors)

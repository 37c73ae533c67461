"""Benchmarks of reward-ensemble scoring (docqa_fast.reward).

Shapes (README.md, Benchmarks): B pairs (2B sequences: chosen and rejected) of S tokens, hidden
3584 (Qwen2.5-VL-7B), K heads, bf16, right-padded with random lengths. Providers:

* ``docqa_fast[triton]``: the fused gather + K heads + statistics kernel (+ its backward);
  ``docqa_fast[reference]``: our CPU path (gather first, fp32 accumulation);
* ``all-tokens``: what TRL / OpenRLHF / transformers do -- K ``nn.Linear(H, 1)`` heads on
  every token, then the last non-padding token gathered;
* ``gather-first``: the same heads after gathering the rows first (eager), and
  ``torch.compile`` of it.

Forward+backward adds the pairwise (Bradley-Terry) loss on the mean score and takes the
gradients of the hidden states and the head weights. Work model: the bytes that must move
-- the B scoring rows and the weights (twice with the backward), the weight gradient and,
for the backward, the zero-filled gradient of the whole hidden-state tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import docqa_fast
from docqa_fast.reference.reward import last_token_index_ref

from .harness import (CHECK_TOLERANCE, Case, compiled_provider, eager_provider, input_set_count, ours_per_backend,
                      register_family)

FAMILY = "reward"
DTYPE = torch.bfloat16
HIDDEN = 3584
# What a case may hold on the GPU, all of it, for the largest provider: under 70 GB leaves an
# 80 GB card room for the allocator's caching and the CUDA context.
MEMORY_BUDGET_BYTES = 70 * 10**9
SIZES = {
    # (pairs, seqlen, heads); the K sweep runs at 64 pairs x 8K. 64 pairs x 32K is left out: one
    # hidden-state tensor of 2M tokens is 30 GB, and estimated_peak_bytes puts its forward +
    # backward at 180 GB, more than even the H200's 141; 64 x 8K is 45 GB.
    "full": ([(8, s, 8) for s in (1024, 8192, 32768)] + [(64, s, 8) for s in (1024, 8192)]
             + [(64, 8192, 4), (64, 8192, 20)]),
    "quick": [(2, 256, 8), (8, 512, 8), (8, 512, 20)],
}


def _inputs(params, device, requires_grad=False):
    batch, seqlen, heads = 2 * params["pairs"], params["S"], params["K"]
    hidden = torch.randn(batch, seqlen, HIDDEN, device=device, dtype=DTYPE)
    lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), device=device)
    mask = (torch.arange(seqlen, device=device)[None, :] < lengths[:, None]).long()
    weight = torch.randn(heads, HIDDEN, device=device, dtype=DTYPE) / HIDDEN**0.5
    if requires_grad:
        hidden.requires_grad_()
        weight.requires_grad_()
    return hidden, mask, weight


def ours_forward(hidden, mask, weight):
    return docqa_fast.ensemble_rewards(hidden, weight, attention_mask=mask)


def all_tokens_forward(hidden, mask, weight):
    """K separate score heads over every token, then the gather (the peers' code path)."""
    per_token = torch.cat([F.linear(hidden, weight[k : k + 1]) for k in range(weight.shape[0])], dim=-1)
    last = last_token_index_ref(mask)
    return per_token[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def gather_first_forward(hidden, mask, weight):
    last = last_token_index_ref(mask)
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return F.linear(rows, weight).float()


def _with_pairwise_backward(forward):
    """forward -> pairwise loss on the ensemble mean -> (d hidden, d weight)."""

    def step(hidden, mask, weight):
        rewards = forward(hidden, mask, weight)
        pairs = rewards.shape[0] // 2
        score = rewards.mean(-1)
        loss = docqa_fast.pairwise_loss(score[:pairs], score[pairs:])
        return torch.autograd.grad(loss, (hidden, weight))

    return step


def _bytes(params, backward: bool) -> int:
    batch, seqlen, heads = 2 * params["pairs"], params["S"], params["K"]
    rows, weights = batch * HIDDEN * DTYPE.itemsize, heads * HIDDEN * DTYPE.itemsize
    if not backward:
        return rows + weights + batch * (heads + 3) * 4
    zero_filled_grad = batch * seqlen * HIDDEN * DTYPE.itemsize
    return 2 * (rows + weights) + zero_filled_grad + heads * HIDDEN * 4


# Copies of the hidden states a forward + backward case holds beyond its input sets: the
# reference's input gradient, kept for the cross-check, and the worst provider's call. That is
# the all-tokens peer: autograd sums its K heads' (B, S, H) input gradients one at a time, and
# its call peaked at 3.1x the hidden states' size (max RSS, CPU, 8 pairs x 2K; the other
# providers 1.1-1.7x). The GPU's figure is not measured; the same three copies are assumed.
BACKWARD_COPIES = 1 + 3


def estimated_peak_bytes(params, backward: bool, device_memory: int = 80 * 10**9) -> int:
    """GPU memory a case holds at its worst provider's peak, on a card of ``device_memory``.

    The hidden states (2 * pairs * S * 3584 bf16) dominate everything else (mask, K heads,
    the (B, S, K) per-token scores of all-tokens: 0.2% of them at K 8), so the estimate counts
    copies of them: the input sets the harness keeps, plus BACKWARD_COPIES with the backward.
    The forward needs little beyond the inputs, and the cross-check compares in slices
    (harness.compare). 64 pairs x 8K: 7.5 GB a copy, 2 input sets + 4 = 45 GB.
    """
    hidden = 2 * params["pairs"] * params["S"] * HIDDEN * DTYPE.itemsize
    return hidden * (input_set_count(hidden, device_memory) + (BACKWARD_COPIES if backward else 0))


@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    found = []
    for backward in (False, True):
        mode = "fwd_bwd" if backward else "fwd"
        wrap = _with_pairwise_backward if backward else (lambda f: f)
        providers = (
            *ours_per_backend(wrap(ours_forward), backends=("triton", "reference")),
            eager_provider(wrap(all_tokens_forward), name="all-tokens"),
            eager_provider(wrap(gather_first_forward), name="gather-first"),
            compiled_provider(wrap(gather_first_forward), name="torch.compile gather-first"),
        )
        for pairs, seqlen, heads in SIZES["quick" if quick else "full"]:
            params = {"pairs": pairs, "S": seqlen, "H": HIDDEN, "K": heads, "dtype": "bfloat16", "mode": mode}
            found.append(Case(
                family=FAMILY, name=f"{mode}-pairs{pairs}-S{seqlen}-K{heads}", group=f"{mode}-K{heads}-pairs{pairs}",
                description=f"reward ensemble {mode}, {pairs} pairs, hidden {HIDDEN}, K={heads}, bf16",
                params=params, sweep="S",
                make_inputs=(lambda p, d, g=backward: _inputs(p, d, requires_grad=g)),
                providers=providers, reference="all-tokens", bytes_moved=_bytes(params, backward),
                tolerance=CHECK_TOLERANCE[DTYPE],  # fp32 rewards of bf16 inputs
            ))
    return found


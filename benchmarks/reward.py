"""Benchmarks of reward-ensemble scoring (docqa_fast.reward).

Shapes (README.md, Benchmarks): B pairs (2B sequences: chosen and rejected) of S tokens, hidden
3584 (Qwen2.5-VL-7B), K heads, bf16; padded on the right or the left with random lengths
(S/2..S), or packed (total, H) with cu_seqlens. Providers:

* ``docqa_fast[triton]``: the fused gather + K heads + statistics kernel (+ its one-launch
  backward writing the dense input gradient), ``[check=False]`` without the host sync that
  validates the positions, ``[sparse_grad]`` (backward only) returning the scoring rows'
  gradient as a sparse tensor instead of the dense one; ``docqa_fast[reference]``: our CPU path;
* ``all-tokens``: what TRL / OpenRLHF / transformers do -- K ``nn.Linear(H, 1)`` heads on
  every token, then the last non-padding token gathered;
* ``gather-first``: the same heads after gathering the rows first (eager), and
  ``torch.compile`` of it.

Forward+backward adds the pairwise (Bradley-Terry) loss on the mean score and takes the
gradients of the hidden states and the head weights. Work model (the byte floor): the
positions read (the mask, or cu_seqlens), the B scoring rows and the weights (twice with the
backward), the rewards written, the weight gradient and, for the backward, the dense gradient
of the whole hidden-state tensor written once (the sparse_grad row is measured against the
same floor: it beats it by not writing the zeros). Host syncs per provider are in
``params["host_syncs"]`` (the table's "host cost" column), peak memory in "peak MiB".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import docqa_fast
from docqa_fast.reference.reward import last_token_index_ref

from .harness import (CHECK_TOLERANCE, Case, Provider, compiled_provider, eager_provider, input_set_count,
                      ours_per_backend, register_family)
from .packing import counting_host_syncs

FAMILY = "reward"
DTYPE = torch.bfloat16
HIDDEN = 3584
# What a case may hold on the GPU, all of it, for the largest provider: under 70 GB leaves an
# 80 GB card room for the allocator's caching and the CUDA context.
MEMORY_BUDGET_BYTES = 70 * 10**9
LAYOUTS = ("right", "left", "packed")
SIZES = {
    # (pairs, seqlen, heads, layout, modes). 64 pairs x 32K runs the forward only: one
    # hidden-state tensor of 2M tokens is 30 GB, and estimated_peak_bytes puts its forward +
    # backward at 180 GB (the all-tokens peer), more than even the H200's 141.
    "full": ([(8, s, 8, "right", ("fwd", "fwd_bwd")) for s in (1024, 8192, 32768)]
             + [(64, s, 8, "right", ("fwd", "fwd_bwd")) for s in (1024, 8192)]
             + [(64, 32768, 8, "right", ("fwd",))]
             + [(64, 8192, k, "right", ("fwd", "fwd_bwd")) for k in (4, 20)]
             + [(8, 8192, 8, layout, ("fwd", "fwd_bwd")) for layout in ("left", "packed")]
             + [(64, 8192, 8, "packed", ("fwd", "fwd_bwd"))]),
    "quick": [(2, 256, 8, "right", ("fwd", "fwd_bwd")), (8, 512, 8, "right", ("fwd", "fwd_bwd")),
              (8, 512, 20, "right", ("fwd", "fwd_bwd")), (2, 256, 4, "left", ("fwd", "fwd_bwd")),
              (2, 256, 4, "packed", ("fwd", "fwd_bwd"))],
}


def _inputs(params, device, requires_grad=False):
    """(hidden_states, where, weight): ``where`` is the attention mask (padded) or cu_seqlens (packed)."""
    batch, seqlen, heads = 2 * params["pairs"], params["S"], params["K"]
    lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), device=device)
    weight = torch.randn(heads, HIDDEN, device=device, dtype=DTYPE) / HIDDEN**0.5
    if params["layout"] == "packed":
        hidden = torch.randn(int(lengths.sum()), HIDDEN, device=device, dtype=DTYPE)
        where = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    else:
        hidden = torch.randn(batch, seqlen, HIDDEN, device=device, dtype=DTYPE)
        columns = torch.arange(seqlen, device=device)[None, :]
        real = columns < lengths[:, None] if params["layout"] == "right" else columns >= seqlen - lengths[:, None]
        where = real.long()
    if requires_grad:
        hidden.requires_grad_()
        weight.requires_grad_()
    return hidden, where, weight


def _positions(hidden, where):
    return {"cu_seqlens": where} if hidden.dim() == 2 else {"attention_mask": where}


def ours_forward(hidden, where, weight):
    return docqa_fast.ensemble_rewards(hidden, weight, **_positions(hidden, where))


def ours_forward_unchecked(hidden, where, weight):
    return docqa_fast.ensemble_rewards(hidden, weight, **_positions(hidden, where), check=False)


def ours_forward_sparse_grad(hidden, where, weight):
    return docqa_fast.ensemble_rewards(hidden, weight, **_positions(hidden, where), check=False, sparse_grad=True)


def _scoring_rows(hidden, where):
    """Index of each sequence's last token, as the peers find it."""
    if hidden.dim() == 2:
        return (where[1:].long() - 1,)
    return torch.arange(hidden.shape[0], device=hidden.device), last_token_index_ref(where)


def all_tokens_forward(hidden, where, weight):
    """K separate score heads over every token, then the gather (the peers' code path)."""
    per_token = torch.cat([F.linear(hidden, weight[k : k + 1]) for k in range(weight.shape[0])], dim=-1)
    return per_token[_scoring_rows(hidden, where)].float()


def gather_first_forward(hidden, where, weight):
    return F.linear(hidden[_scoring_rows(hidden, where)], weight).float()


def _with_pairwise_backward(forward):
    """forward -> pairwise loss on the ensemble mean -> (d hidden, d weight)."""

    def step(hidden, where, weight):
        rewards = forward(hidden, where, weight)
        pairs = rewards.shape[0] // 2
        score = rewards.mean(-1)
        loss = docqa_fast.pairwise_loss(score[:pairs], score[pairs:])
        return torch.autograd.grad(loss, (hidden, weight))

    return step


def _hidden_bytes(params) -> int:
    batch, seqlen = 2 * params["pairs"], params["S"]
    tokens = batch * seqlen if params["layout"] != "packed" else batch * seqlen * 3 // 4  # lengths S/2..S
    return tokens * HIDDEN * DTYPE.itemsize


def _bytes(params, backward: bool) -> int:
    batch, seqlen, heads = 2 * params["pairs"], params["S"], params["K"]
    rows, weights = batch * HIDDEN * DTYPE.itemsize, heads * HIDDEN * DTYPE.itemsize
    positions = (batch + 1) * 4 if params["layout"] == "packed" else batch * seqlen * 8  # cu_seqlens / int64 mask
    forward = positions + rows + weights + batch * (heads + 3) * 4
    if not backward:
        return forward
    return forward + rows + weights + _hidden_bytes(params) + heads * HIDDEN * DTYPE.itemsize


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


def _providers(backward: bool):
    wrap = _with_pairwise_backward if backward else (lambda f: f)
    ours = ours_per_backend(wrap(ours_forward), backends=("triton",))
    ours.append(Provider("docqa_fast[triton][check=False]", fn=wrap(ours_forward_unchecked), ours=True,
                         env={"DOCQA_FAST_BACKEND": "triton"}, unavailable=ours[0].unavailable))
    if backward:
        ours.append(_sparse_grad_provider(wrap(ours_forward_sparse_grad), ours[0].unavailable))
    return (*ours, *ours_per_backend(wrap(ours_forward), backends=("reference",)),
            eager_provider(wrap(all_tokens_forward), name="all-tokens"),
            eager_provider(wrap(gather_first_forward), name="gather-first"),
            compiled_provider(wrap(gather_first_forward), name="torch.compile gather-first"))


def _sparse_grad_provider(step, unavailable) -> Provider:
    """``step`` returning a sparse d hidden: its first (untimed) call, the one the harness
    cross-checks and reads the peak memory of, returns it densified (so that row's peak MiB
    includes one dense copy); the timed calls return it as it is."""

    def build():
        calls = []

        def call(*inputs):
            grads = step(*inputs)
            if calls:
                return grads
            calls.append(1)
            return (grads[0].to_dense(), *grads[1:])

        return call

    return Provider("docqa_fast[triton][sparse_grad]", build=build, ours=True, env={"DOCQA_FAST_BACKEND": "triton"},
                    unavailable=unavailable)


@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    found = []
    for pairs, seqlen, heads, layout, modes in SIZES["quick" if quick else "full"]:
        for mode in modes:
            backward = mode == "fwd_bwd"
            params = {"pairs": pairs, "S": seqlen, "H": HIDDEN, "K": heads, "layout": layout, "dtype": "bfloat16",
                      "mode": mode}
            syncs: dict = {}
            padding = "packed (cu_seqlens)" if layout == "packed" else f"{layout}-padded"
            found.append(Case(
                family=FAMILY, name=f"{mode}-{layout}-pairs{pairs}-S{seqlen}-K{heads}",
                group=f"{mode}-{layout}-K{heads}-pairs{pairs}",
                description=f"reward ensemble {mode}, {pairs} pairs, {padding}, hidden {HIDDEN}, K={heads}, bf16; "
                            "host syncs per provider in params.host_syncs",
                params={**params, "host_syncs": syncs}, sweep="S",
                make_inputs=(lambda p, d, g=backward: _inputs(p, d, requires_grad=g)),
                providers=tuple(counting_host_syncs(p, syncs) for p in _providers(backward)),
                reference="all-tokens", bytes_moved=_bytes(params, backward),
                tolerance=CHECK_TOLERANCE[DTYPE],  # fp32 rewards of bf16 inputs
            ))
    return found

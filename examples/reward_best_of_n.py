"""A reward-model ensemble against over-optimisation: K heads on one Qwen2.5-VL backbone, best-of-n.

    python -m examples.reward_best_of_n [--tiny] [--steps N] [--heads K] [--candidates N]

Per prompt (a document of page images and a question) n candidate answers: the right value and
values with 1, 2, ... digits changed, ranked by how many are wrong. Every (prompt, candidate)
sequence is packed (:func:`~docqa_fast.plan_packing`, :func:`~docqa_fast.pack_multimodal`) and
runs through the backbone with ``attn_implementation="docqa_fast"``;
:class:`~docqa_fast.RewardEnsembleHead` scores each sequence's last token with K heads at once;
:func:`~docqa_fast.aggregate` gives the ensemble scores -- mean, worst case (min) and
uncertainty-weighted (mean - λ var) -- and best-of-n picks each prompt's top candidate by each.
One AdamW step on the Bradley-Terry pairwise loss (each head: the best candidate against every
other, :func:`~docqa_fast.pairwise_loss`) plus the listwise Plackett-Luce loss of the ranking on
the mean score (:func:`~docqa_fast.plackett_luce_loss`).

The check (first step, unless ``--no-check``): rewards, aggregates, best-of-n picks, the loss and
every gradient (backbone and heads) equal, by the tolerance rule, the plain way -- K separate
``nn.Linear(hidden, 1)`` heads on every token of a padded eager batch, the last real token
gathered, the statistics and losses written out -- in fp64 and at the step's precision.
"""

from __future__ import annotations

import random
import sys

import torch
import torch.nn.functional as F
from torch import nn

from docqa_fast.reward import RewardEnsembleHead, aggregate, pairwise_loss, plackett_luce_loss
from docqa_fast.testing import assert_close_by_rule

from ._common import (Timer, assert_step_matches, build_model, document_sample, image_processor,
                      in_sample_order, model_config, pack_samples, packed_hidden, padded_batch, parameter_grads,
                      parse_args, plan_rows, same_weights, synthetic_documents, wrong_answer)

AGGREGATIONS = ("mean", "min", "uwo")
UWO_LAMBDA = 0.5
REWARD_PAGES = (1, 4)


class RewardModel(nn.Module):
    """A Qwen2.5-VL backbone (its LM head unused) and ``RewardEnsembleHead(hidden, num_heads)``."""

    def __init__(self, backbone, num_heads: int):
        super().__init__()
        check_num_heads(num_heads)
        self.backbone = backbone
        weight = backbone.lm_head.weight
        self.head = RewardEnsembleHead(backbone.config.text_config.hidden_size, num_heads, dtype=weight.dtype,
                                       device=weight.device)


def check_num_heads(num_heads) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"expected num_heads (K, the ensemble's reward heads) to be an int >= 1, got {num_heads!r}")
    return num_heads


def candidate_samples(documents, processor, rng: random.Random, candidates: int):
    """(samples, ranks): for each document ``candidates`` answers -- the right one first, then
    one, two, ... digits wrong -- in a shuffled order; ``ranks`` (prompts, candidates), 0 = best."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise ValueError(f"expected candidates (n answers per prompt) to be an int >= 2, got {candidates!r}")
    if not documents:
        raise ValueError("expected documents to hold at least one document, got none")
    samples, ranks = [], []
    for i, doc in enumerate(documents):
        answers = [doc.answer] + [wrong_answer(rng, doc.answer, digits=k) for k in range(1, candidates)]
        shuffled = rng.sample(range(candidates), candidates)
        samples += [document_sample(doc, processor, answer=answers[k], name=f"documents[{i}]") for k in shuffled]
        ranks.append(shuffled)
    return samples, torch.tensor(ranks)


def docqa_fast_rewards(model: RewardModel, samples, max_tokens: int) -> torch.Tensor:
    """(sequences, K) rewards: packed rows, the backbone's hidden states, the fused K heads at each
    sequence's last token (``cu_seqlens``)."""
    device, dtype = model.head.weight.device, model.head.weight.dtype
    bins = plan_rows(samples, max_tokens)
    per_row = [model.head(packed_hidden(model.backbone, row)[0], cu_seqlens=row.cu_seqlens).rewards
               for row in pack_samples(samples, max_tokens, device, dtype, bins=bins)]
    return in_sample_order(per_row, bins)


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Pairwise (per head: the best candidate against each other) + Plackett-Luce on the mean score."""
    prompts, candidates = ranks.shape
    rewards = rewards.view(prompts, candidates, -1)
    is_best = ranks == 0
    chosen = rewards[is_best]  # (P, K)
    others = rewards[~is_best].view(prompts, candidates - 1, -1)
    pairwise = pairwise_loss(chosen[:, None].expand_as(others), others)
    return pairwise + plackett_luce_loss(aggregate(rewards, "mean"), ranks.argsort(-1))


def scores_and_choices(rewards: torch.Tensor, candidates: int, aggregate_fn=aggregate):
    """Each aggregation's (prompts, n) scores and its best-of-n pick per prompt."""
    scores = {method: aggregate_fn(rewards, method, UWO_LAMBDA).view(-1, candidates) for method in AGGREGATIONS}
    return scores, {method: s.argmax(-1) for method, s in scores.items()}


# ------------------------------------------------------------------------- the plain way

def plain_aggregate(rewards: torch.Tensor, method: str, uwo_lambda: float) -> torch.Tensor:
    if method == "mean":
        return rewards.mean(-1)
    if method == "min":
        return rewards.min(-1).values
    return rewards.mean(-1) - uwo_lambda * rewards.var(-1)


def plain_rewards(backbone, heads: nn.ModuleList, samples) -> torch.Tensor:
    """K ``nn.Linear(hidden, 1)`` heads on every token of a padded eager batch, then the last real token."""
    device, dtype = backbone.lm_head.weight.device, backbone.lm_head.weight.dtype
    batch = padded_batch(samples, device, dtype)
    batch.pop("labels")
    hidden = backbone.model(**batch, use_cache=False).last_hidden_state
    per_token = torch.cat([head(hidden) for head in heads], dim=-1)  # (B, T, K)
    last = batch["attention_mask"].sum(-1) - 1
    return per_token[torch.arange(hidden.shape[0], device=device), last]


def plain_ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    prompts, candidates = ranks.shape
    rewards = rewards.view(prompts, candidates, -1)
    pairwise, pl = [], []
    for p in range(prompts):
        best = int((ranks[p] == 0).nonzero())
        for c in range(candidates):
            if c != best:
                pairwise.append(-F.logsigmoid(rewards[p, best] - rewards[p, c]))
        ordered = rewards[p].mean(-1)[ranks[p].argsort()]
        pl.append(-sum(ordered[k] - torch.logsumexp(ordered[k:], 0) for k in range(candidates)))
    return torch.stack(pairwise).mean() + torch.stack(pl).mean()


def check_against_plain(model: RewardModel, samples, ranks, max_tokens: int) -> int:
    """Rewards, aggregates, picks, loss and every gradient against K nn.Linear heads the plain way."""
    candidates = ranks.shape[1]
    model.zero_grad(set_to_none=True)
    rewards = docqa_fast_rewards(model, samples, max_tokens)
    scores, picks = scores_and_choices(rewards.detach(), candidates)
    loss = ranking_loss(rewards, ranks)
    loss.backward()
    ours = (loss.detach(), parameter_grads(model))
    model.zero_grad(set_to_none=True)
    results, plain_scores = [], []
    for dtype in (torch.float64, model.head.weight.dtype):
        backbone = same_weights(model.backbone, "eager", dtype)
        heads = model.head.to_linear_heads().to(dtype)
        plain = plain_rewards(backbone, heads, samples)
        plain_scores.append((plain.detach(), scores_and_choices(plain.detach(), candidates, plain_aggregate)[0]))
        plain_loss = plain_ranking_loss(plain, ranks)
        plain_loss.backward()
        grads = {f"backbone.{name}": g for name, g in parameter_grads(backbone).items()}
        grads["head.weight"] = torch.cat([head.weight.grad for head in heads])
        results.append((plain_loss.detach(), grads))
    (exact, exact_scores), (plain, plain_agg) = plain_scores
    assert_close_by_rule(rewards.detach(), exact, plain, name="rewards")
    for method in AGGREGATIONS:
        assert_close_by_rule(scores[method], exact_scores[method], plain_agg[method], name=f"{method} score")
        expected = exact_scores[method].argmax(-1)
        if not torch.equal(picks[method].cpu(), expected.cpu()):
            raise AssertionError(f"best-of-n by {method}: picked {picks[method].tolist()}, the plain way "
                                 f"{expected.tolist()}")
    return assert_step_matches(ours, *results)


def train(args) -> list[float]:
    import dataclasses

    check_num_heads(args.heads)
    sizes = dataclasses.replace(args.sizes, pages=REWARD_PAGES)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    processor = image_processor(sizes)
    model = RewardModel(build_model(model_config(sizes), "docqa_fast", args.dtype, args.device), args.heads)
    model.backbone.lm_head.requires_grad_(False)  # a reward model has no use for it
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    prompts = max(2, sizes.documents // 2)
    losses = []
    for step in range(args.steps):
        samples, ranks = candidate_samples(synthetic_documents(rng, prompts, sizes), processor, rng, args.candidates)
        if step == 0 and not args.no_check:
            compared = check_against_plain(model, samples, ranks, sizes.max_tokens)
            print(f"check: rewards, {'/'.join(AGGREGATIONS)} scores, best-of-n picks, the loss and {compared} "
                  f"gradients match {args.heads} nn.Linear heads on a padded eager batch (tolerance rule)")
        with Timer(args.device) as timer:
            optimizer.zero_grad(set_to_none=True)
            rewards = docqa_fast_rewards(model, samples, sizes.max_tokens)
            loss = ranking_loss(rewards, ranks)
            loss.backward()
            optimizer.step()
        _, picks = scores_and_choices(rewards.detach(), args.candidates)
        right = {m: int((ranks.gather(1, p[:, None].cpu()) == 0).sum()) for m, p in picks.items()}
        losses.append(loss.item())
        tokens = sum(s["input_ids"].numel() for s in samples)
        print(f"step {step + 1}: {prompts} prompts x {args.candidates} candidates, K={args.heads}; loss "
              f"{loss.item():.4f}; best-of-n right answers by " + ", ".join(f"{m} {right[m]}/{prompts}"
                                                                            for m in AGGREGATIONS)
              + f"; {tokens / timer.seconds:,.0f} tokens/s")
    return losses


def _options(parser):
    parser.add_argument("--heads", type=int, default=6, help="K, the ensemble's reward heads (default 6)")
    parser.add_argument("--candidates", type=int, default=4, help="n candidate answers per prompt (default 4)")


def main(argv=None) -> int:
    train(parse_args(__doc__.splitlines()[0], argv, extra=_options))
    return 0


if __name__ == "__main__":
    sys.exit(main())

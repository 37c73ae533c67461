"""LongPO, short-to-long preference optimisation: one step of a Qwen2.5-VL policy on docqa_fast.

    python -m examples.longpo_step [--tiny] [--steps N] [--beta B] [--lam L]

Per document: a chosen answer (the right value) and a rejected one (a digit changed). The policy
reads the whole document (every page, then the question) and the frozen reference reads a short
chunk of it -- the page that holds the answer and its neighbours, at most a quarter of the
document's tokens. Policy sequences are packed (:func:`~docqa_fast.plan_packing`,
:func:`~docqa_fast.pack_multimodal`) and run with ``attn_implementation="docqa_fast"``;
:func:`~docqa_fast.sequence_logprobs` turns the hidden states and the LM head's weight into each
answer's log-probability without logits; :func:`~docqa_fast.longpo_loss` gives
``NLL(chosen | long) + lam * DPO(long policy vs short reference)`` (β = λ = 0.01 by default, as in
LongPO) and :func:`~docqa_fast.dpo_loss` the DPO term alone, for the log. One AdamW step.

The check (first step, unless ``--no-check``): the loss and every policy gradient equal, by the
tolerance rule, the same loss computed plainly -- padded batches, ``attn_implementation="eager"``,
logits, ``log_softmax``, ``gather`` and the formula written out -- in fp64 and at the step's
precision, on the same policy and reference.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import sys

import torch
import torch.nn.functional as F

from docqa_fast.losses import dpo_loss, longpo_loss, sequence_logprobs

from ._common import (IGNORE_INDEX, Sizes, Timer, assert_step_matches, build_model, document_sample,
                      image_processor, in_sample_order, model_config, pack_samples, packed_hidden, padded_batch,
                      parameter_grads, parse_args, plan_rows, same_weights, shifted_labels, synthetic_documents,
                      wrong_answer)

# Pages per document, at least: enough that one page and the question are a quarter of it or less.
LONGPO_MIN_PAGES = 12


def short_chunk(doc, processor, name: str) -> list[int]:
    """The pages the reference reads: the answer's page, then its neighbours while the chunk's
    prompt stays within a quarter of the whole document's."""
    whole = document_sample(doc, processor, name=name)
    budget = (whole["input_ids"].numel() - whole["answer_length"]) // 4
    chunk = [doc.answer_page]

    def prompt_length(pages):
        sample = document_sample(doc, processor, pages=pages, name=name)
        return sample["input_ids"].numel() - sample["answer_length"]

    if prompt_length(chunk) > budget:
        raise ValueError(f"{name} is too short for a short chunk: its answer page and question take "
                         f"{prompt_length(chunk)} tokens, more than a quarter of its {budget * 4}-token prompt")
    for page in sorted(range(len(doc.pages)), key=lambda p: abs(p - doc.answer_page))[1:]:
        if prompt_length(sorted(chunk + [page])) > budget:
            break
        chunk = sorted(chunk + [page])
    return chunk


def preference_samples(documents, processor, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(policy samples, reference samples): chosen answers of every document, then rejected ones;
    the policy's over the whole document, the reference's over its short chunk."""
    if not documents:
        raise ValueError("expected documents to hold at least one document, got none")
    rejected = [wrong_answer(rng, doc.answer) for doc in documents]
    chunks = [short_chunk(doc, processor, f"documents[{i}]") for i, doc in enumerate(documents)]
    long, short = [], []
    for answers in ([doc.answer for doc in documents], rejected):
        for i, (doc, answer) in enumerate(zip(documents, answers)):
            long.append(document_sample(doc, processor, answer=answer, name=f"documents[{i}]"))
            short.append(document_sample(doc, processor, answer=answer, pages=chunks[i], name=f"documents[{i}]"))
    return long, short


def docqa_fast_logps(model, samples, max_tokens: int) -> torch.Tensor:
    """Summed answer log-prob of every sample: packed rows, hidden states, fused log-probs."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    bins = plan_rows(samples, max_tokens)
    per_row = []
    for row in pack_samples(samples, max_tokens, device, dtype, bins=bins):
        hidden = packed_hidden(model, row)[0]
        per_row.append(sequence_logprobs(hidden, model.lm_head.weight, shifted_labels(row.labels)[0],
                                         cu_seqlens=row.cu_seqlens))
    return in_sample_order(per_row, bins)


def plain_logps(model, samples) -> torch.Tensor:
    """The same on a padded batch: logits, log_softmax, gather, masked sum (TRL's get_batch_logps)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    batch = padded_batch(samples, device, dtype)
    labels = shifted_labels(batch.pop("labels"))
    logits = model(**batch, use_cache=False).logits
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.clamp_min(0)[..., None])[..., 0]
    return (per_token * (labels != IGNORE_INDEX)).sum(-1)


def answer_lengths(samples, device) -> torch.Tensor:
    return torch.tensor([s["answer_length"] for s in samples], device=device)


def longpo_step_loss(policy, reference, long, short, max_tokens: int, beta: float, lam: float):
    """(LongPO loss, DPO term) with docqa_fast: policy over ``long``, reference over ``short``."""
    with torch.no_grad():
        ref = docqa_fast_logps(reference, short, max_tokens)
    logps = docqa_fast_logps(policy, long, max_tokens)
    pairs = len(long) // 2
    chosen_nll = -logps[:pairs] / answer_lengths(long[:pairs], logps.device)
    losses, _, _ = longpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], chosen_nll, beta=beta, lam=lam)
    dpo, _, _ = dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta=beta)
    return losses.mean(), dpo.mean().detach()


def plain_step_loss(policy, reference, long, short, beta: float, lam: float) -> torch.Tensor:
    """LongPO written out on plainly computed log-probs."""
    with torch.no_grad():
        ref = plain_logps(reference, short)
    logps = plain_logps(policy, long)
    pairs = len(long) // 2
    chosen_nll = -logps[:pairs] / answer_lengths(long[:pairs], logps.device)
    margin = (logps[:pairs] - logps[pairs:]) - (ref[:pairs] - ref[pairs:])
    return (chosen_nll - lam * F.logsigmoid(beta * margin)).mean()


def check_against_plain(policy, reference, long, short, max_tokens: int, beta: float, lam: float) -> int:
    """Loss and every policy gradient against :func:`plain_step_loss` in fp64 and the run's dtype."""
    policy.zero_grad(set_to_none=True)
    loss, _ = longpo_step_loss(policy, reference, long, short, max_tokens, beta, lam)
    loss.backward()
    ours = (loss.detach(), parameter_grads(policy))
    policy.zero_grad(set_to_none=True)
    results = []
    for dtype in (torch.float64, next(policy.parameters()).dtype):
        plain_policy = same_weights(policy, "eager", dtype)
        plain_reference = same_weights(reference, "eager", dtype)
        plain = plain_step_loss(plain_policy, plain_reference, long, short, beta, lam)
        plain.backward()
        results.append((plain.detach(), parameter_grads(plain_policy)))
    return assert_step_matches(ours, *results)


def sizes_for_longpo(sizes: Sizes) -> Sizes:
    return dataclasses.replace(sizes, pages=(LONGPO_MIN_PAGES, max(20, sizes.pages[1])))


def train(args) -> list[float]:
    sizes = sizes_for_longpo(args.sizes)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    processor = image_processor(sizes)
    policy = build_model(model_config(sizes), "docqa_fast", args.dtype, args.device)
    reference = copy.deepcopy(policy).requires_grad_(False)  # frozen
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    pairs = max(2, sizes.documents // 2)
    losses = []
    for step in range(args.steps):
        long, short = preference_samples(synthetic_documents(rng, pairs, sizes), processor, rng)
        if step == 0 and not args.no_check:
            compared = check_against_plain(policy, reference, long, short, sizes.max_tokens, args.beta, args.lam)
            print(f"check: LongPO loss and {compared} policy gradients match logits + log_softmax + gather on "
                  "padded eager batches (tolerance rule)")
        with Timer(args.device) as timer:
            optimizer.zero_grad(set_to_none=True)
            loss, dpo = longpo_step_loss(policy, reference, long, short, sizes.max_tokens, args.beta, args.lam)
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
        tokens = sum(s["input_ids"].numel() for s in long + short)
        print(f"step {step + 1}: {pairs} pairs, policy contexts {[s['input_ids'].numel() for s in long[:pairs]]} "
              f"tokens, reference chunks {[s['input_ids'].numel() for s in short[:pairs]]}; LongPO loss "
              f"{loss.item():.4f} (DPO term {dpo.item():.4f}), {tokens / timer.seconds:,.0f} tokens/s")
    return losses


def _options(parser):
    parser.add_argument("--beta", type=float, default=0.01, help="DPO's beta (LongPO: 0.01)")
    parser.add_argument("--lam", type=float, default=0.01, help="weight of the DPO term (LongPO: 0.01)")


def main(argv=None) -> int:
    train(parse_args(__doc__.splitlines()[0], argv, extra=_options))
    return 0


if __name__ == "__main__":
    sys.exit(main())

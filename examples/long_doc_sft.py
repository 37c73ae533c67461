"""Long-document SFT: packed documents of page images through a Qwen2.5-VL on docqa_fast, one optimiser step.

    python -m examples.long_doc_sft [--tiny] [--steps N]

Per step: synthetic documents (rendered pages, a question, its answer) go through the Qwen2-VL
image processor; :func:`~docqa_fast.plan_packing` bins them into rows of a token budget and
:func:`~docqa_fast.pack_multimodal` makes each row (per-document M-RoPE positions, labels that
never predict across a boundary); the model runs with ``attn_implementation="docqa_fast"``
(varlen attention in the text model and the vision tower); :class:`~docqa_fast.LinearCrossEntropyLoss`
takes the last hidden states and the LM head's weight (the logits are never built); AdamW steps.

The check (first step, unless ``--no-check``): the loss and every parameter gradient equal, by the
tolerance rule of :mod:`docqa_fast.testing`, the same step done the plain way -- one padded row
per document, ``attn_implementation="eager"``, logits and ``F.cross_entropy`` -- run once at the
step's precision and once in fp64; and a packed row never attends across documents (changing one
document leaves the others' hidden states bit for bit the same).
"""

from __future__ import annotations

import dataclasses
import random
import sys

import torch
import torch.nn.functional as F

from docqa_fast.losses import LinearCrossEntropyLoss

from ._common import (FIRST_WORD_ID, IGNORE_INDEX, WORD_COUNT, Timer, assert_step_matches, build_model,
                      document_sample, image_processor, model_config, pack_samples, packed_hidden, padded_batch,
                      parameter_grads, parse_args, same_weights, shifted_labels, synthetic_documents)


def make_samples(documents, processor) -> list[dict]:
    """One processor-made sample per document (``ValueError`` naming ``documents[i]`` for a bad one)."""
    if not documents:
        raise ValueError("expected documents to hold at least one document, got none")
    return [document_sample(doc, processor, name=f"documents[{i}]") for i, doc in enumerate(documents)]


def counted_tokens(samples) -> int:
    """Tokens the loss averages over: the answers (and their end tokens) of every document."""
    return sum(int((shifted_labels(s["labels"]) != IGNORE_INDEX).sum()) for s in samples)


def docqa_fast_loss(model, rows, counted: int) -> torch.Tensor:
    """Mean token loss over the packed rows: hidden states, then the fused linear cross-entropy."""
    loss_fn = LinearCrossEntropyLoss(reduction="sum")
    total = 0.0
    for row in rows:
        hidden = packed_hidden(model, row)[0]
        total = total + loss_fn(model.lm_head.weight, hidden, shifted_labels(row.labels)[0])
    return total / counted


def plain_loss(model, batch: dict) -> torch.Tensor:
    """The plain stack's loss on a padded batch: logits for every token, then F.cross_entropy."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = shifted_labels(batch["labels"])
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / (labels != IGNORE_INDEX).sum()


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), parameter_grads(model)


def check_against_plain(model, samples, rows, counted: int) -> int:
    """Loss and every gradient of ``model`` (docqa_fast) against the padded eager step, fp64 and
    the run's dtype. Returns the number of gradients compared; raises AssertionError otherwise."""
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    ours = loss_and_grads(model, lambda: docqa_fast_loss(model, rows, counted))
    results = []
    for plain_dtype in (torch.float64, dtype):
        plain = same_weights(model, "eager", plain_dtype)
        batch = padded_batch(samples, device, plain_dtype)
        results.append(loss_and_grads(plain, lambda: plain_loss(plain, batch)))
        del plain
    model.zero_grad(set_to_none=True)
    return assert_step_matches(ours, *results)


def check_isolation(model, samples, max_tokens: int, processor=None) -> int:
    """Each packed row, again with every document but one replaced by another document of the
    same length and pages: the kept document's hidden states must not change at all. Returns
    the number of rows of more than one document checked."""
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    rows = pack_samples(samples, max_tokens, device, dtype, what="documents")
    checked = 0
    with torch.no_grad():
        for row in rows:
            if len(row.doc_lengths) < 2:
                continue
            checked += 1
            hidden = packed_hidden(model, row)[0]
            # The other documents: the same layout (special tokens, pages and their grids), other
            # words and other page pixels.
            start = row.doc_lengths[0]
            altered = row.input_ids.clone()
            words = altered[:, start:]
            swap = words >= FIRST_WORD_ID
            words[swap] = FIRST_WORD_ID + (words[swap] - FIRST_WORD_ID + 1) % WORD_COUNT
            first_patches = int(row.image_grid_thw[: _images_of_first(row)].prod(-1).sum())
            pixels = row.pixel_values.clone()
            pixels[first_patches:] = torch.randn_like(pixels[first_patches:])
            row_altered = dataclasses.replace(row, input_ids=altered, pixel_values=pixels)
            hidden_altered = packed_hidden(model, row_altered)[0]
            if not torch.equal(hidden[:start], hidden_altered[:start]):
                diff = (hidden[:start] - hidden_altered[:start]).abs().max().item()
                raise AssertionError(f"a packed row leaks across documents: changing the others moved the first "
                                     f"document's hidden states by up to {diff:.3g}")
            if torch.equal(hidden[start:], hidden_altered[start:]):
                raise AssertionError("the isolation check changed nothing: the test itself is wrong")
    return checked


def _images_of_first(row) -> int:
    return sum(1 for doc, _ in row.image_order if doc == 0)


def train(args) -> list[float]:
    sizes = args.sizes
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    processor = image_processor(sizes)
    model = build_model(model_config(sizes), "docqa_fast", args.dtype, args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(args.steps):
        samples = make_samples(synthetic_documents(rng, sizes.documents, sizes), processor)
        rows = pack_samples(samples, sizes.max_tokens, args.device, args.dtype, what="documents")
        counted = counted_tokens(samples)
        tokens = sum(sum(row.doc_lengths) for row in rows)
        if step == 0 and not args.no_check:
            compared = check_against_plain(model, samples, rows, counted)
            isolated = check_isolation(model, samples, sizes.max_tokens)
            print(f"check: loss and {compared} parameter gradients match the padded eager step (tolerance rule); "
                  f"{isolated} packed rows of several documents do not attend across them")
        with Timer(args.device) as timer:
            optimizer.zero_grad(set_to_none=True)
            loss = docqa_fast_loss(model, rows, counted)
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
        print(f"step {step + 1}: {len(samples)} documents in {len(rows)} rows of <= {sizes.max_tokens} tokens "
              f"(padding {sum(r.padding_ratio for r in rows) / len(rows):.0%}), loss {loss.item():.4f}, "
              f"{tokens / timer.seconds:,.0f} tokens/s")
    return losses


def main(argv=None) -> int:
    train(parse_args(__doc__.splitlines()[0], argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The packing workflow of the README section (.notes_packing.md), run on a tiny random model."""

import random

import pytest
import torch

from docqa_fast.packing import pack_multimodal, patch_transformers_rope_index, plan_packing, unpack, \
    unpatch_transformers_rope_index

from .documents import tiny_qwen_config
from .test_packed import _sample

transformers = pytest.importorskip("transformers")


def packed_batches(samples, max_tokens=131072):
    """The collator: plan the bins once, then one padding-free row per bin."""
    lengths = [s["input_ids"].numel() for s in samples]
    for bin_ in plan_packing(lengths, max_tokens, strategy="bfd"):
        yield pack_multimodal([samples[i] for i in bin_], max_tokens)


def test_readme_workflow():
    from transformers import Qwen2_5_VLForConditionalGeneration

    rng = random.Random(0)
    torch.manual_seed(0)
    # what a Qwen2.5-VL processor returns per document: input_ids, pixel_values, image_grid_thw
    samples = [_sample(rng, rng.randint(0, 3)) for _ in range(6)]
    config = tiny_qwen_config("qwen2_5_vl")
    config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config)
    patch_transformers_rope_index()  # the model's own get_rope_index becomes ours too
    try:
        losses = []
        for batch in packed_batches(samples, max_tokens=96):
            out = model(**batch.model_inputs())  # loss never crosses a document boundary
            out.loss.backward()
            losses.append(out.loss.item())
            per_doc_logits = unpack(batch, out.logits)
            assert [x.shape[1] for x in per_doc_logits] == batch.doc_lengths
            assert batch.padding_ratio < 1
        assert losses and all(torch.isfinite(torch.tensor(losses)))
    finally:
        unpatch_transformers_rope_index()

"""docs/examples.md, "From a document to a training step": its code block, run as printed on the tiny
model, takes a training step whose loss is examples.long_doc_sft's (the README quotes the same block)."""

import random
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from examples import long_doc_sft  # noqa: E402
from examples._common import TINY, pack_samples, synthetic_documents  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "examples.md"


def walkthrough_code() -> str:
    section = DOC.read_text().split("## From a document to a training step", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_walkthrough_takes_the_examples_step(processor, make_tiny_model):
    code = walkthrough_code()
    _, step = code.split("\n\n", 1)[1].split("\n\n")  # imports, model and documents, the step
    assert len(step.strip().splitlines()) <= 12  # "a dozen lines"
    namespace = {}
    exec(compile(code, f"{DOC}:walkthrough", "exec"), namespace)
    # The same model and documents again (the block seeds both), through the example's loss.
    model = make_tiny_model()
    samples = long_doc_sft.make_samples(synthetic_documents(random.Random(0), 4, TINY), processor)
    expected = long_doc_sft.docqa_fast_loss(model, pack_samples(samples, 192, "cpu", torch.float32),
                                            long_doc_sft.counted_tokens(samples))
    torch.testing.assert_close(namespace["total"].detach() / namespace["counted"], expected.detach())
    moved = [name for name, p in namespace["model"].named_parameters()
             if not torch.equal(p, dict(model.named_parameters())[name])]
    assert len(moved) == len(list(model.parameters()))  # the step reached every parameter, the ViT's too

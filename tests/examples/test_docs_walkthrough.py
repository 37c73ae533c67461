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
from examples._common import TINY, build_model, model_config, pack_samples, synthetic_documents  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "examples.md"


def walkthrough_code() -> str:
    section = DOC.read_text().split("## From a document to a training step", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_walkthrough_takes_the_examples_step(processor):
    code = walkthrough_code()
    assert len(code.strip().splitlines()) <= 16  # "a dozen lines"
    torch.manual_seed(0)
    model = build_model(model_config(TINY), "docqa_fast")
    samples = long_doc_sft.make_samples(synthetic_documents(random.Random(4), 4, TINY), processor)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    expected = long_doc_sft.docqa_fast_loss(model, pack_samples(samples, 160, "cpu", torch.float32),
                                            long_doc_sft.counted_tokens(samples))
    model.zero_grad(set_to_none=True)
    namespace = {"model": model, "samples": samples, "max_tokens": 160,
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    exec(compile(code, f"{DOC}:walkthrough", "exec"), namespace)
    torch.testing.assert_close(namespace["total"] / namespace["counted"], expected.detach())
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(moved) == len(before)  # the step reached every parameter, the vision tower's too

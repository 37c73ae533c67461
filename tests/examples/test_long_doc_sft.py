"""examples.long_doc_sft: one packed SFT step on docqa_fast equals the padded eager step (tolerance rule)."""

import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from examples import long_doc_sft  # noqa: E402
from examples._common import TINY, Document, pack_samples, synthetic_documents  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_step_matches_the_plain_way_and_rows_stay_apart(tiny_model, processor):
    rng = random.Random(1)
    # Up to 30 pages each (the range), packed into rows of a budget that splits them.
    samples = long_doc_sft.make_samples(synthetic_documents(rng, 3, TINY, pages=(2, 30))
                                        + synthetic_documents(rng, 2, TINY, pages=(1, 3)), processor)
    rows = pack_samples(samples, 320, "cpu", torch.float32)
    assert len(rows) >= 2 and any(len(row.doc_lengths) >= 2 for row in rows)
    compared = long_doc_sft.check_against_plain(tiny_model, samples, rows, long_doc_sft.counted_tokens(samples))
    assert compared == len(list(tiny_model.parameters()))
    assert long_doc_sft.check_isolation(tiny_model, samples, 320) >= 1


def test_a_wrong_loss_fails_the_check(tiny_model, processor, monkeypatch):
    """The check can fail: the fused loss summed over one token too many (the last of each row)."""
    samples = long_doc_sft.make_samples(synthetic_documents(random.Random(2), 2, TINY), processor)
    rows = pack_samples(samples, 400, "cpu", torch.float32)
    monkeypatch.setattr(long_doc_sft, "shifted_labels",
                        lambda labels: torch.nn.functional.pad(labels[..., 1:], (0, 1), value=3))
    with pytest.raises(AssertionError, match="loss"):
        long_doc_sft.check_against_plain(tiny_model, samples, rows, long_doc_sft.counted_tokens(samples))


def test_cli_runs_two_steps(train_two_steps):
    assert "tokens/s" in train_two_steps(long_doc_sft)


def test_bad_documents_are_refused(processor):
    rng = random.Random(3)
    good = synthetic_documents(rng, 1, TINY)[0]
    with pytest.raises(ValueError, match=r"documents\[1\]\.pages"):
        long_doc_sft.make_samples([good, Document(pages=[], question="what ?", answer="1")], processor)
    with pytest.raises(ValueError, match="documents"):
        long_doc_sft.make_samples([], processor)
    long_answer = Document(pages=good.pages, question=good.question, answer="1" * 50)
    samples = long_doc_sft.make_samples([long_answer], processor)
    with pytest.raises(ValueError, match=r"documents\[0\]\.answer .*max_tokens=40"):
        pack_samples(samples, 40, "cpu", torch.float32, what="documents")
    with pytest.raises(ValueError, match=r"documents\[0\] holds .*max_tokens=60"):
        pack_samples(samples, 60, "cpu", torch.float32, what="documents")
    with pytest.raises(ValueError, match="max_tokens"):
        pack_samples(samples, 0, "cpu", torch.float32)

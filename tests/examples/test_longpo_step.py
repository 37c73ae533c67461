"""examples.longpo_step: the LongPO step on docqa_fast equals logits + log_softmax + gather (tolerance rule)."""

import copy
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from examples import longpo_step  # noqa: E402
from examples._common import TINY, Document, synthetic_documents  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SIZES = longpo_step.sizes_for_longpo(TINY)


@pytest.fixture(scope="module")
def models(tiny_model):
    policy = tiny_model
    reference = copy.deepcopy(policy).requires_grad_(False)
    # A reference that differs from the policy (after some training): the DPO margin is not 0.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return policy, reference


# LongPO's own beta = lam = 0.01, and a heavier DPO term whose gradients the check must also see.
@pytest.mark.parametrize(("beta", "lam"), [(0.01, 0.01), (0.5, 1.0)])
def test_step_matches_the_plain_loss(models, processor, beta, lam):
    policy, reference = models
    rng = random.Random(int(beta * 100))
    long, short = longpo_step.preference_samples(synthetic_documents(rng, 2, SIZES), processor, rng)
    for whole, chunk in zip(long, short):  # the reference's chunk is at most a quarter of the context
        assert (chunk["input_ids"].numel() - chunk["answer_length"]) * 4 <= whole["input_ids"].numel()
    compared = longpo_step.check_against_plain(policy, reference, long, short, 256, beta, lam)
    assert compared == len(list(policy.parameters()))


def test_the_check_sees_the_dpo_term(models, processor, monkeypatch):
    """Swap chosen and rejected in the reference's log-probs of the docqa_fast side only: the check fails."""
    policy, reference = models
    rng = random.Random(5)
    long, short = longpo_step.preference_samples(synthetic_documents(rng, 2, SIZES), processor, rng)
    original = longpo_step.docqa_fast_logps

    def swapped(model, samples, max_tokens):
        logps = original(model, samples, max_tokens)
        return logps.roll(len(samples) // 2) if model is reference else logps

    monkeypatch.setattr(longpo_step, "docqa_fast_logps", swapped)
    with pytest.raises(AssertionError):
        longpo_step.check_against_plain(policy, reference, long, short, 256, 0.5, 1.0)


def test_cli_runs_two_steps(train_two_steps):
    assert "DPO term" in train_two_steps(longpo_step)


def test_bad_documents_are_refused(processor, make_tiny_model):
    rng = random.Random(6)
    short_doc = synthetic_documents(rng, 1, TINY, pages=(2, 2))[0]
    with pytest.raises(ValueError, match=r"documents\[0\] is too short"):
        longpo_step.preference_samples([short_doc], processor, rng)
    with pytest.raises(ValueError, match=r"documents\[0\]\.pages"):
        longpo_step.preference_samples([Document(pages=[], question="what ?", answer="1")], processor, rng)
    with pytest.raises(ValueError, match="documents"):
        longpo_step.preference_samples([], processor, rng)
    doc = synthetic_documents(rng, 1, SIZES)[0]
    long, short = longpo_step.preference_samples([doc], processor, rng)
    with pytest.raises(ValueError, match="max_tokens=20"):
        longpo_step.docqa_fast_logps(make_tiny_model(), long, 20)

"""examples.reward_best_of_n: K fused heads on a packed docqa_fast backbone equal K nn.Linear heads the plain way."""

import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from examples import reward_best_of_n as reward  # noqa: E402
from examples._common import TINY, Document, synthetic_documents  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize(("heads", "candidates"), [(4, 3), (8, 5)])
def test_step_matches_linear_heads(tiny_model, processor, heads, candidates):
    rng = random.Random(heads)
    model = reward.RewardModel(tiny_model, heads)
    samples, ranks = reward.candidate_samples(synthetic_documents(rng, 2, TINY, pages=(1, 4)), processor, rng,
                                              candidates)
    assert sorted(ranks[0].tolist()) == list(range(candidates))
    compared = reward.check_against_plain(model, samples, ranks, 256)
    assert compared == len([p for p in model.parameters() if p is not tiny_model.lm_head.weight])


def test_the_check_sees_a_wrong_head(tiny_model, processor, monkeypatch):
    """Score one position too early (the end-of-answer token's predecessor): the check fails."""
    rng = random.Random(11)
    model = reward.RewardModel(tiny_model, 4)
    samples, ranks = reward.candidate_samples(synthetic_documents(rng, 2, TINY, pages=(1, 2)), processor, rng, 3)
    head_forward = model.head.forward

    def early(hidden, cu_seqlens=None, **kwargs):
        return head_forward(hidden, last_index=(cu_seqlens[1:] - 2).long(), **kwargs)

    monkeypatch.setattr(model.head, "forward", early)
    with pytest.raises(AssertionError, match="rewards"):
        reward.check_against_plain(model, samples, ranks, 256)


def test_cli_runs_two_steps(train_two_steps):
    assert "best-of-n" in train_two_steps(reward, "--heads", "4")


def test_bad_arguments_are_refused(tiny_model, processor):
    rng = random.Random(12)
    with pytest.raises(ValueError, match="num_heads"):
        reward.RewardModel(tiny_model, 0)
    with pytest.raises(ValueError, match="num_heads"):
        reward.train(reward.parse_args("reward", ["--tiny", "--heads", "0"], extra=reward._options))
    docs = synthetic_documents(rng, 1, TINY, pages=(1, 1))
    with pytest.raises(ValueError, match="candidates"):
        reward.candidate_samples(docs, processor, rng, 1)
    with pytest.raises(ValueError, match=r"documents\[1\]\.pages"):
        reward.candidate_samples(docs + [Document(pages=[], question="what ?", answer="1.00")], processor, rng, 2)
    samples, _ = reward.candidate_samples(docs, processor, rng, 2)
    with pytest.raises(ValueError, match=r"samples\[0\] holds .*max_tokens=8"):
        reward.docqa_fast_rewards(reward.RewardModel(tiny_model, 2), samples, 8)

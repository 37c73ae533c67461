"""The examples' checks in bf16 on a GPU (make gpu): docqa_fast's Triton kernels and fused losses under
the tiny Qwen2.5-VL, against the plain stack in fp64 and bf16 by the tolerance rule. Skipped without CUDA."""

import copy
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from examples import long_doc_sft, longpo_step, reward_best_of_n, serve_long_doc  # noqa: E402
from examples._common import TINY, pack_samples, synthetic_documents  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
CUDA, BF16 = "cuda", torch.bfloat16


def test_sft_step(processor, make_tiny_model):
    model = make_tiny_model(BF16, CUDA)
    samples = long_doc_sft.make_samples(synthetic_documents(random.Random(1), 4, TINY, pages=(2, 12)), processor)
    rows = pack_samples(samples, 256, CUDA, BF16)
    assert long_doc_sft.check_against_plain(model, samples, rows, long_doc_sft.counted_tokens(samples)) > 0
    assert long_doc_sft.check_isolation(model, samples, 256) >= 1


def test_longpo_step(processor, make_tiny_model):
    policy = make_tiny_model(BF16, CUDA)
    reference = copy.deepcopy(policy).requires_grad_(False)
    rng = random.Random(2)
    long, short = longpo_step.preference_samples(
        synthetic_documents(rng, 2, longpo_step.sizes_for_longpo(TINY)), processor, rng)
    assert longpo_step.check_against_plain(policy, reference, long, short, 256, 0.5, 1.0) > 0


def test_reward_step(processor, make_tiny_model):
    rng = random.Random(3)
    model = reward_best_of_n.RewardModel(make_tiny_model(BF16, CUDA), 6)
    samples, ranks = reward_best_of_n.candidate_samples(synthetic_documents(rng, 2, TINY, pages=(1, 4)), processor,
                                                        rng, 4)
    assert reward_best_of_n.check_against_plain(model, samples, ranks, 256) > 0


def test_serve(processor, make_tiny_model):
    model = make_tiny_model(BF16, CUDA, initializer_range=serve_long_doc.SERVE_INIT).eval()
    doc = synthetic_documents(random.Random(4), 1, TINY, pages=(12, 12))[0]
    sample = serve_long_doc.prompt_sample(doc, processor)
    tokens, logits = serve_long_doc.generate(model, sample, max_new_tokens=6, chunk=37, return_logits=True,
                                             eos_token_id=None)
    serve_long_doc.check_against_generate(model, sample, tokens, logits, 6, eos_token_id=None)

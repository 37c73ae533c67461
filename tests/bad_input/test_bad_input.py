"""Every case of every family (``cases_<family>.py``) on every backend present, each family's
cases in one spawned worker (all backends, forced per case: one interpreter start per family):
a crash or a hang fails its case (named in the report as ``backend:case``), the rest still run.
See :mod:`.harness` for how a case is judged."""

import importlib

import pytest

import docqa_fast

from .harness import present_backends, report, run_family

FAMILIES = ("attention", "extension", "kvcache", "losses", "merge_attention", "packing", "reward", "rotary_padding")


@pytest.mark.slow  # a worker per family: 5-15 s each on 2 cores
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_is_refused_clearly(family):
    module = importlib.import_module(f"{__package__}.cases_{family}")
    cases = module.cases()
    if not cases:
        pytest.skip(f"no {family} cases here (docqa_fast.backends(): {docqa_fast.backends()})")
    outcomes = run_family(f"cases_{family}", cases, present_backends())
    assert outcomes, "no cases ran"
    failures = report(outcomes)
    assert not failures, f"{len(failures.splitlines())} of {len(outcomes)} calls failed:\n{failures}"


def test_the_harness_attributes_a_crash_and_a_hang_to_their_case():
    """A case that kills its worker and one that never returns each fail alone; the cases after
    them still run in a fresh worker."""
    from . import cases_harness_check as check

    outcomes = run_family("cases_harness_check", check.cases(), ["reference"], timeout_s=5)
    status = {key.split(":", 1)[1]: outcome.status for key, outcome in outcomes.items()}
    assert status == {"before": "ok", "segfault": "crash", "after-crash": "ok", "hang": "hang", "after-hang": "ok",
                      "wrong-type": "fail", "unnamed": "fail"}, status


# Ops whose direct-call checks are tested with their family's own tests instead.
# (cases_reward.py calls reward_heads directly when the op has its token_index layout.)
_OP_CHECKS_ELSEWHERE = {"reward_heads": "tests/reward/test_reward.py",
                        "reward_heads_backward": "tests/reward/test_reward.py"}


def test_every_registered_op_has_bad_input_cases():
    """A new torch.library op joins the suite: each one has cases calling it directly."""
    import torch

    covered = set()
    for family in FAMILIES:  # importing them registers every family's ops (docqa_fast.rotary's too)
        module = importlib.import_module(f"{__package__}.cases_{family}")
        covered |= {case.name.split("/")[0].removeprefix("op:").split("-")[0] for case in module.cases()
                    if case.name.startswith("op:")}
    namespace = torch.ops.docqa_fast
    registered = {name for name in dir(namespace)
                  if isinstance(getattr(namespace, name, None), torch._ops.OpOverloadPacket)}
    missing = registered - covered - set(_OP_CHECKS_ELSEWHERE)
    assert registered and not missing, f"ops without bad-input cases: {sorted(missing)}"

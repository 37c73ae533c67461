"""Every case of every family (``cases_<family>.py``) on every backend present, each family's
cases in one spawned worker (all backends, forced per case: one interpreter start per family):
a crash or a hang fails its case (named in the report as ``backend:case``), the rest still run.
See :mod:`.harness` for how a case is judged."""

import importlib

import pytest

from .harness import present_backends, report, run_family

FAMILIES = ("attention", "kvcache", "losses", "merge_attention", "packing", "reward", "rotary_padding")


@pytest.mark.slow  # a worker per family: 5-15 s each on 2 cores
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_is_refused_clearly(family):
    module = importlib.import_module(f"{__package__}.cases_{family}")
    outcomes = run_family(f"cases_{family}", module.cases(), present_backends())
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

"""Every case of every family (``cases_<family>.py``) on every backend present, each family's
cases in one spawned worker: a crash or a hang fails its case (named in the report), the
rest still run. See :mod:`.harness` for how a case is judged."""

import importlib

import pytest

from .harness import keys_for, report, run_family

FAMILIES = ("attention", "kvcache", "losses", "merge_attention", "packing", "reward", "rotary_padding")


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_is_refused_clearly(family, backend):
    module = importlib.import_module(f"{__package__}.cases_{family}")
    cases = module.cases()
    if not keys_for(cases, [backend]):
        pytest.skip(f"the {family} family has no {backend} implementation")
    outcomes = run_family(f"cases_{family}", cases, [backend])
    failures = report(outcomes)
    assert not failures, f"{len(failures.splitlines())} of {len(outcomes)} cases failed:\n{failures}"

"""The end_to_end benchmark family (benchmarks/end_to_end.py) at its quick sizes: every example's case
runs both providers on the same inputs, and docqa_fast's output matches the plain stack's."""

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import end_to_end, harness  # noqa: E402

CASES = [case for case in end_to_end.cases(quick=True) if case.params["tokens"] == 256]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_case_runs_and_matches_the_plain_stack(case):
    record = harness.run_case(case, torch.device("cpu"), quick=True)
    rows = {row["provider"]: row for row in record["providers"]}
    assert rows["transformers sdpa"]["status"] == "ok", rows["transformers sdpa"]
    assert rows["docqa_fast"]["status"] == "ok", rows["docqa_fast"]
    assert rows["docqa_fast"]["check"] == "ok"


def test_the_family_names_every_example_at_both_sizes():
    quick = {case.name for case in end_to_end.cases(quick=True)}
    full = {case.params["tokens"] for case in end_to_end.cases(quick=False)}
    assert {name.split("-")[0] for name in quick} == {"sft", "longpo", "reward", "serve"}
    assert full == {32768, 131072}

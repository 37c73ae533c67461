"""``make gpu`` (docqa_fast.tools.gpu_run): the parts that can be checked without a GPU."""

import json
import sys

import pytest
import torch

from benchmarks import harness
from docqa_fast.tools import gpu_run


@pytest.mark.parametrize("case", gpu_run.HEADLINE_CASES)
def test_each_headline_case_names_one_full_size_benchmark(case):
    """A renamed benchmark case must not silently drop out of every GPU run."""
    matches = [c.id for c in harness.collect_cases(quick=False, filter=case)]
    assert matches == [case]


def test_several_filters_select_their_union():
    cases = harness.collect_cases(quick=False, filter=",".join(gpu_run.HEADLINE_CASES))
    assert sorted(c.id for c in cases) == sorted(gpu_run.HEADLINE_CASES)


def test_step_limits_keep_the_run_under_ten_minutes():
    build_seconds = 44  # measured on the H200's 16 cores (GPU.md)
    assert build_seconds + sum(gpu_run.LIMITS.values()) < 600
    assert gpu_run.TUNE_BUDGET < gpu_run.LIMITS["tune"]


def test_a_step_past_its_limit_is_killed_and_reported(tmp_path):
    status, seconds = gpu_run._run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                   tmp_path / "log", 1.0, None)
    assert status == "stopped at its 1 s limit" and seconds < 30
    assert "started" in (tmp_path / "log").read_text()


def test_summaries_of_tests_tuning_and_benchmarks(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("....\n==== 1160 passed, 2 skipped in 127.3s ====\n")
    assert gpu_run._test_summary(log) == "1160 passed, 2 skipped in 127.3s"

    tiles = lambda m, n: {"BLOCK_M": m, "BLOCK_N": n, "num_warps": 8, "num_stages": 3}  # noqa: E731
    table = tmp_path / "sm90-triton3.6.json"
    table.write_text(json.dumps({"kernels": {"attention_forward": {"D=128,tma": {
        "tiles": tiles(128, 128), "metric": "TFLOP/s of the forward", "candidates": [
            {"tiles": tiles(64, 64), "status": "ok", "ms": 2.0, "value": 450.0, "note": "current"},
            {"tiles": tiles(128, 128), "status": "ok", "ms": 1.8, "value": 500.0, "note": "chosen"}]}}}}))
    rows = gpu_run._tuned_rows(table, {"attention_forward": {"D=128,tma": tiles(64, 64)}})
    assert rows == ["| attention_forward[D=128,tma] | 64,64,8,3 -> 128,128,8,3 | 450.0 (2.000 ms) -> "
                    "500.0 (1.800 ms) TFLOP/s |"]

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"cases": [{"case": "attention/x", "metric": "TFLOP/s", "providers": [
        {"provider": "docqa_fast[triton]", "ours": True, "status": "ok", "rate": 500.0},
        {"provider": "sdpa", "ours": False, "status": "ok", "rate": 550.0},
        {"provider": "flash-attn", "ours": False, "status": "skipped"}]}]}))
    assert gpu_run._bench_rows(results) == ["| attention/x | docqa_fast[triton] 500.0 | sdpa 550.0 | 0.91x | TFLOP/s |"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_refuses_to_run_without_a_gpu(tmp_path):
    assert gpu_run.main(["--out", str(tmp_path)]) == 2

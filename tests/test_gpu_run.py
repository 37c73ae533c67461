"""``make gpu`` (docqa_fast.tools.gpu_run): the parts that can be checked without a GPU."""

import json
import os
import signal
import sys
import tarfile
import tempfile
import time

import pytest
import torch

from benchmarks import harness
from docqa_fast.tools import gpu_run


@pytest.mark.parametrize("case", gpu_run.HEADLINE_CASES + gpu_run.EXTRA_CASES)
def test_each_headline_and_extra_case_names_one_full_size_benchmark(case):
    """A renamed benchmark case must not silently drop out of every GPU run."""
    matches = [c.id for c in harness.collect_cases(quick=False, filter=case)]
    assert matches == [case]


def test_several_filters_select_their_union():
    cases = harness.collect_cases(quick=False, filter=",".join(gpu_run.HEADLINE_CASES))
    assert sorted(c.id for c in cases) == sorted(gpu_run.HEADLINE_CASES)


def test_step_limits_keep_the_run_under_ten_minutes():
    build_seconds = 44  # measured on the H200's 16 cores (GPU.md)
    assert sum(gpu_run.LIMITS.values()) <= gpu_run.RUN_SECONDS
    # 600 s a device command may run; the rest for a slower build, the wheels, make's checks.
    assert build_seconds + gpu_run.RUN_SECONDS <= 600 - 50
    # After its budget the sweep still finishes the family it is in (a compile, set-ups).
    assert gpu_run.TUNE_BUDGET + 30 <= gpu_run.LIMITS["tune"]
    assert all(gpu_run.LIMITS[step] <= gpu_run.MOST[step] for step in gpu_run.LIMITS)
    assert gpu_run.EXTRA_MIN <= gpu_run.EXTRA_LIMIT


def test_each_step_keeps_the_later_steps_limits_and_takes_what_the_earlier_ones_left():
    limits, most = gpu_run.LIMITS, gpu_run.MOST
    start = 1000.0
    deadline = start + gpu_run.RUN_SECONDS
    assert list(limits) == ["tune", "bench", "tests"]  # the order the run takes them in
    assert gpu_run.step_limit("tune", deadline, ("bench", "tests"), now=start) == limits["tune"]
    # A sweep that ran long leaves the benchmarks less than their limit, never the tests less than theirs.
    late = deadline - limits["bench"] - limits["tests"] + 30
    assert gpu_run.step_limit("bench", deadline, ("tests",), now=late) == limits["bench"] - 30
    # A sweep that ended early: the benchmarks may use the time, up to their MOST ...
    assert gpu_run.step_limit("bench", deadline, ("tests",), now=start + 100) == most["bench"]
    # ... and the tests what both left, up to theirs; a step left out (--skip) reserves nothing.
    assert gpu_run.step_limit("tests", deadline, (), now=start + 200) == most["tests"]
    assert gpu_run.step_limit("bench", deadline, (), now=deadline - 40) == 40
    assert gpu_run.step_limit("tests", deadline, (), now=deadline + 5) == 1.0  # a step never gets 0 or less

    assert gpu_run.extra_plan(deadline, now=deadline - 500) == (gpu_run.EXTRA_LIMIT, "")
    assert gpu_run.extra_plan(deadline, now=deadline - gpu_run.EXTRA_MIN) == (gpu_run.EXTRA_MIN, "")
    seconds, why = gpu_run.extra_plan(deadline, now=deadline - gpu_run.EXTRA_MIN + 1)
    assert seconds is None and why.startswith(f"not run: {gpu_run.EXTRA_MIN - 1} s of the run left")


def test_dry_run_prints_the_plan_without_a_gpu(capsys):
    assert gpu_run.main(["--dry-run"]) == 0
    plan = capsys.readouterr().out
    for case in gpu_run.HEADLINE_CASES + gpu_run.EXTRA_CASES:
        assert case + ":" in plan
    assert "NO CASE MATCHES" not in plan
    from docqa_fast.tools import tune_cases

    families = [line.split(":")[0].strip() for line in plan.splitlines() if line.startswith("         ")
                and line.strip().split(":")[0] in tune_cases.FAMILIES]
    assert families == list(tune_cases.FAMILIES)
    assert "losses_route[" in plan and "attention_backward_fused[" in plan and "dispatch 4 calls" in plan


def test_a_step_past_its_limit_is_killed_and_reported(tmp_path):
    status, seconds = gpu_run._run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                   tmp_path / "log", 1.0, None)
    assert status == "stopped at its 1 s limit" and seconds < 30
    assert "started" in (tmp_path / "log").read_text()


def test_summaries_of_tests_tuning_and_benchmarks(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("....\n==== 1160 passed, 2 skipped in 127.3s ====\n")
    assert gpu_run._test_summary(log) == "1160 passed, 2 skipped in 127.3s"
    log.write_text("..F.\n13 failed, 1314 passed, 3 skipped, 102 warnings in 144.57s (0:02:24)\n")  # -q's form
    assert gpu_run._test_summary(log) == "13 failed, 1314 passed, 3 skipped, 102 warnings in 144.57s (0:02:24)"
    # Stopped at its limit before pytest's summary: what -v printed so far (xdist's form and the plain one).
    log.write_text("[gw0] [  1%] PASSED tests/a.py::test_one \n[gw1] [  2%] FAILED tests/b.py::test_two[x-1] \n"
                   "tests/c.py::test_three SKIPPED (no GPU)  [  3%]\n[gw2] [  4%] PASSED tests/a.py::test_four \n"
                   "a line that says 3 passed in prose\n\n[gpu_run] stopped at its 240 s limit\n")
    assert gpu_run._test_summary(log) == ("no pytest summary; so far 1 failed, 2 passed, 1 skipped "
                                          "(tests/b.py::test_two[x-1])")
    log.write_text("$ python -m pytest\n[gpu_run] stopped at its 240 s limit\n")
    assert gpu_run._test_summary(log) == "no pytest summary (see tests.log)"

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
    assert gpu_run._bench_rows(results) == [
        "| attention/x | docqa_fast[triton] 500.0 | sdpa 550.0 | 0.91x | TFLOP/s | - |"]
    results.write_text(json.dumps({"cases": [{"case": "losses/y", "metric": "TFLOP/s", "wall_s": 41.6, "providers": [
        {"provider": "docqa_fast[triton]", "ours": True, "status": "ok", "rate": 300.0},
        {"provider": "liger", "ours": False, "status": "error"}]}]}))
    assert gpu_run._bench_rows(results) == ["| losses/y | docqa_fast[triton] 300.0 | - | - | TFLOP/s | 42 |"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_refuses_to_run_without_a_gpu(tmp_path):
    assert gpu_run.main(["--out", str(tmp_path)]) == 2


def _fake_gpu_run(tmp_path, monkeypatch, stopped=()):
    """Fake every step of a run on a fake clock: (the calls (command, limit), the tuned table's
    path). A benchmark run whose first case is in ``stopped`` is one stopped at its limit: after
    one case of its results.json (the headline cases) or in the middle of writing it (an extra case)."""
    from docqa_fast.kernels import tuning

    clock = [1000.0]
    step_seconds = {"pytest": 180.0, "docqa_fast.tools.tune": 140.0, "benchmarks": 40.0}
    calls = []

    def fake_run(command, log, limit, env):
        calls.append((command, limit))
        log.write_text("$ " + " ".join(command) + "\n")
        if "pytest" in command:
            log.write_text("== 1400 passed in 150.0s ==\n")
        elif "docqa_fast.tools.tune" in command:
            entry = {"tiles": {"BLOCK_R": 32, "num_warps": 4}, "metric": "GB/s of a merge", "candidates": [
                {"tiles": {"BLOCK_R": 16, "num_warps": 4}, "status": "ok", "ms": 2.0, "value": 1.0, "note": "current"},
                {"tiles": {"BLOCK_R": 32, "num_warps": 4}, "status": "ok", "ms": 1.0, "value": 2.0, "note": "chosen"}]}
            table_path.write_text(json.dumps({"kernels": {"merge_attention": {"D=128": entry}}}))
        else:  # python -m benchmarks --filter CASES ... --out DIR
            out_dir = gpu_run.Path(command[command.index("--out") + 1])
            cases = command[command.index("--filter") + 1].split(",")
            results = json.dumps({"cases": [
                {"case": case, "metric": "GB/s", "wall_s": 9.0, "providers": [
                    {"provider": "docqa_fast[triton]", "ours": True, "status": "ok", "rate": 2.0},
                    {"provider": "eager", "ours": False, "status": "ok", "rate": 1.0}]}
                for case in (cases[:1] if cases[0] in stopped else cases)]})
            (out_dir / "results.json").write_text(results[:40] if len(cases) == 1 and cases[0] in stopped else results)
            if cases[0] not in stopped:
                (out_dir / "summary.md").write_text("tables\n")
                (out_dir / f"{cases[0].replace('/', '__')}.png").write_bytes(b"png")
        clock[0] += 100.0 if len(calls) == 2 else step_seconds[command[2]]  # the headline benchmarks: 100 s
        return "ok", 1.0

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setattr(gpu_run, "_clock", lambda: clock[0])
    monkeypatch.setattr(gpu_run, "_run", fake_run)
    monkeypatch.setattr(gpu_run, "install_wheels", lambda env, folder: "no wheels (test)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(tuning, "device_arch", lambda device: "sm90")
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path / "tuned")
    (tmp_path / "tuned").mkdir()
    table_path = tmp_path / "tuned" / tuning.table_name("sm90", tuning.triton_version())
    return calls, table_path


def test_a_run_brings_back_at_most_eight_files_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """The whole run with every step faked on a fake clock: what each step may run, what comes
    back, the extra cases stopping when the run's time is spent, and no temporary folder left."""
    calls, table_path = _fake_gpu_run(tmp_path, monkeypatch)
    temporary = tmp_path / "tmp"
    out = tmp_path / "out"
    assert gpu_run.main(["--out", str(out)]) == 0

    limits = [limit for _, limit in calls]
    # The sweep (140 s), the headline benchmarks (100 s: they could have had the 60 s the sweep
    # left, up to their MOST), the tests (180 s of the 260 left: up to their MOST), then the
    # extra cases while EXTRA_MIN seconds are left: 80 s, then 40, then none.
    assert limits == [gpu_run.LIMITS["tune"], gpu_run.MOST["bench"], gpu_run.MOST["tests"], 80, 40]
    assert calls[2][0][2] == "pytest"
    assert [command[command.index("--filter") + 1] for command, _ in calls if "benchmarks" in command] == \
        [",".join(gpu_run.HEADLINE_CASES), *gpu_run.EXTRA_CASES[:2]]
    brought_back = sorted(p.name for p in out.iterdir())
    assert len(brought_back) <= 8 and all(p.is_file() for p in out.iterdir())
    assert brought_back == sorted(["summary.md", "tests.log", "tune.log", table_path.name, "bench.log",
                                   "bench_results.json", "bench_summary.md", "bench_files.tgz"])
    with tarfile.open(out / "bench_files.tgz") as tar:
        names = set(tar.getnames())
    slug = gpu_run._case_slug(gpu_run.EXTRA_CASES[0])
    assert {f"{gpu_run.HEADLINE_CASES[0].replace('/', '__')}.png", f"extra/{slug}/results.json",
            f"extra/{slug}/summary.md", f"extra/{slug}/bench.log"} <= names
    summary = (out / "summary.md").read_text()
    assert "1400 passed in 150.0s" in summary and "| merge_attention[D=128] | - -> 32,4 |" in summary
    assert f"| extra {gpu_run.EXTRA_CASES[2]} | not run: 0 s of the run left" in summary
    assert f"| {gpu_run.EXTRA_CASES[1]} | docqa_fast[triton] 2.0 | eager 1.0 | 2.00x | GB/s | 9 |" in summary
    assert list(temporary.iterdir()) == []  # the wheels' and benchmarks' folders went with the run


def test_the_peers_wheels_install_into_the_given_folder_and_a_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_run, "ROOT", tmp_path)
    env = {}
    assert gpu_run.install_wheels(env, tmp_path / "peers").startswith("no .whl/ folder") and env == {}
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    message = gpu_run.install_wheels(env, tmp_path / "peers")
    assert message.startswith("installing .whl/ failed (exit ") and "PYTHONPATH" not in env


def test_benchmarks_stopped_at_their_limit_cost_only_their_missing_files(tmp_path, monkeypatch):
    """The headline benchmarks stopped after one case (results.json, no summary.md nor plots yet)
    and an extra case stopped while writing results.json: the run goes on and says so."""
    calls, _ = _fake_gpu_run(tmp_path, monkeypatch, stopped=(gpu_run.HEADLINE_CASES[0], gpu_run.EXTRA_CASES[0]))
    out = tmp_path / "out"
    assert gpu_run.main(["--out", str(out)]) == 0
    assert [command[2] for command, _ in calls] == ["docqa_fast.tools.tune", "benchmarks", "pytest", "benchmarks",
                                                    "benchmarks"]
    assert json.loads((out / "bench_results.json").read_text())["cases"][0]["case"] == gpu_run.HEADLINE_CASES[0]
    assert not (out / "bench_summary.md").exists()
    summary = (out / "summary.md").read_text()
    assert "| bench | ok: 1 headline cases |" in summary and "1400 passed in 150.0s" in summary
    assert f"| extra {gpu_run.EXTRA_CASES[0]} | ok (results.json unreadable: JSONDecodeError: " in summary
    assert f"| {gpu_run.EXTRA_CASES[1]} | docqa_fast[triton] 2.0 |" in summary


def _running(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie no longer runs; its new parent reaps it


def test_a_step_that_ends_leaves_no_process_of_its_own_behind(tmp_path):
    """A worker that outlives its step (its parent ended normally) would share the GPU with the next step."""
    pid_file = tmp_path / "pid"
    status, _ = gpu_run._run(["sh", "-c", f"sleep 120 & echo $! > {pid_file}"], tmp_path / "log", 60.0, None)
    pid = int(pid_file.read_text())
    try:
        assert status == "ok"
        for _ in range(50):  # SIGKILL is delivered asynchronously
            if not _running(pid):
                break
            time.sleep(0.1)
        assert not _running(pid)
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)

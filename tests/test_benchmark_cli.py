"""`python -m benchmarks` on the command line: contradictory size options are refused, --list
says which providers this machine would skip and why, a case group in which nothing was
measured gets no (empty) plot, a run writes where git does not look unless told, and the quick
sizes stay a smoke run's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a package of the repository, not of the installed distribution.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import harness, report  # noqa: E402

CPU = torch.device("cpu")


def test_quick_and_full_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--quick", "--full"])
    assert exit_.value.code == 2
    assert "--full: not allowed with argument --quick" in capsys.readouterr().err
    assert cli.parse_args(["--full"]).full and cli.parse_args(["--quick"]).quick


def _case(name, *providers, group="group", n=64):
    return harness.Case(family="test", name=name, group=group, description="a test case", params={"n": n},
                        sweep="n", make_inputs=lambda params, device: (torch.randn(params["n"], device=device),),
                        providers=providers, reference="eager", bytes_moved=n * 8)


def _double(x):
    return x * 2


def test_list_marks_the_providers_skipped_here_with_the_reason_once():
    no_gpu = harness.Provider("gpu-only", fn=_double, unavailable=lambda device: "needs a CUDA device")
    cases = [_case("a", harness.Provider("eager", fn=_double), no_gpu), _case("b", no_gpu)]
    text = cli.list_cases(cases, CPU)
    assert text.splitlines()[:2] == ["test/a: eager, gpu-only*", "test/b: gpu-only*"]
    assert text.count("needs a CUDA device") == 1
    assert text.splitlines()[-1] == "  gpu-only: needs a CUDA device"
    assert "skipped" not in cli.list_cases([_case("c", harness.Provider("eager", fn=_double))], CPU)


def test_a_quick_cpu_run_leaves_torch_compile_out_and_says_why():
    compiled = harness.compiled_provider(_double)
    case = _case("a", harness.Provider("eager", fn=_double), compiled)
    assert compiled.unavailable(CPU) is None  # it can run: only a quick CPU run leaves it out
    assert harness.skip_reason(compiled, CPU, quick=True) == harness.COMPILE_QUICK_CPU_SKIP
    assert harness.skip_reason(compiled, CPU, quick=False) is None
    assert harness.skip_reason(compiled, torch.device("cuda"), quick=True) is None
    text = cli.list_cases([case], CPU, quick=True)
    assert text.splitlines()[0] == "test/a: eager, torch.compile*"
    assert f"  torch.compile: {harness.COMPILE_QUICK_CPU_SKIP}" in text
    assert "torch.compile*" not in cli.list_cases([case], CPU, quick=False)
    rows = {row["provider"]: row for row in harness.run_case(case, CPU, quick=True)["providers"]}
    assert rows["eager"]["status"] == "ok"
    assert rows["torch.compile"] == {"provider": "torch.compile", "ours": False, "status": "skipped",
                                     "reason": harness.COMPILE_QUICK_CPU_SKIP, "check": None}
    # Every family's compiled peers, the wrapped ones too (packing's and reward's host-sync counting).
    compiled_peers = [p for case in harness.collect_cases(quick=True) for p in case.providers
                      if p.name.startswith("torch.compile")]
    assert len(compiled_peers) > 10
    assert {harness.skip_reason(p, CPU, quick=True) for p in compiled_peers} == {harness.COMPILE_QUICK_CPU_SKIP}
    # Alone in a case, it makes the case one "skipped here" line, the reason once.
    alone = harness.run_case(_case("b", compiled), CPU, quick=True)
    assert report.case_table(alone) == f"Skipped here, no provider can run: torch.compile: " \
                                       f"{harness.COMPILE_QUICK_CPU_SKIP}."


def test_a_group_with_nothing_measured_gets_no_plot(tmp_path):
    skipped = harness.Provider("eager", fn=_double, unavailable=lambda device: "not here")
    nothing = [harness.run_case(_case(f"empty{n}", skipped, group="empty", n=n), CPU, quick=True) for n in (64, 128)]
    measured = [harness.run_case(_case(f"ok{n}", harness.Provider("eager", fn=_double), group="measured", n=n), CPU,
                                 quick=True) for n in (64, 128)]
    assert all(row["status"] == "skipped" for record in nothing for row in record["providers"])
    plots = report.write_plots(tmp_path, nothing + measured, ceilings={})
    assert [p.name for p in plots] == ["test__measured.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test__measured.png"]


def test_a_case_nothing_can_run_makes_no_inputs_and_says_so_in_one_line():
    def no_inputs(params, device):
        raise AssertionError("inputs made for a case nothing can run")

    gpu_only = [harness.Provider(name, fn=_double, unavailable=lambda device: "needs a CUDA device")
                for name in ("ours", "flash-attn")]
    other = harness.Provider("eager", fn=_double, unavailable=lambda device: "not installed")
    case = harness.Case(family="test", name="nothing", group="g", description="d", params={"n": 1}, sweep="n",
                        make_inputs=no_inputs, providers=(*gpu_only, other), bytes_moved=8)
    done = []
    record = harness.run_case(case, CPU, quick=True, on_provider_done=done.append)
    assert len(done) == 3 and harness.all_skipped(record)
    assert report.case_table(record) == ("Skipped here, no provider can run: ours, flash-attn: needs a CUDA device; "
                                         "eager: not installed.")
    # A case where one provider runs keeps its table, the skipped rows with their reason.
    ran = harness.run_case(_case("some", harness.Provider("eager", fn=_double), gpu_only[0]), CPU, quick=True)
    assert not harness.all_skipped(ran)
    table = report.case_table(ran)
    assert table.startswith("| provider |") and "skipped: needs a CUDA device" in table


REPO = Path(harness.__file__).parents[1]


def _git_ignores(path: Path) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", str(path.relative_to(REPO))], cwd=REPO).returncode == 0


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_git_ignores_what_a_default_run_writes_and_not_the_committed_results():
    # `make bench` leaves `git status` clean: every file a run writes by default is ignored ...
    for name in ("results.json", "summary.md", "losses__ce_qwen_fwd.png"):
        assert _git_ignores(cli.LOCAL_RESULTS / "cpu" / name)
        assert _git_ignores(cli.LOCAL_RESULTS / "nvidia-h200" / name)
    # ... while a run kept with --out benchmarks/results/<device> can be committed.
    assert not _git_ignores(REPO / "benchmarks" / "results" / "nvidia-h200" / "results.json")


def test_a_run_prints_the_reasons_of_cases_nothing_can_run_once(tmp_path, monkeypatch, capsys):
    gpu_only = harness.Provider("ours", fn=_double, unavailable=lambda device: "needs a CUDA device")
    cases = [_case(f"gpu{n}", gpu_only, n=n) for n in (64, 128, 256)] + [_case("cpu", harness.Provider("eager",
                                                                                                      fn=_double))]
    monkeypatch.setattr(harness, "default_device", lambda: CPU)
    monkeypatch.setattr(harness, "collect_cases", lambda quick, filter=None: cases)
    assert cli.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("needs a CUDA device") == 1
    assert out.count("Skipped here, as test/gpu64.") == 2
    # summary.md, read case by case, keeps each case's reasons.
    assert (tmp_path / "summary.md").read_text().count("ours: needs a CUDA device") == 3


def test_a_run_writes_to_the_ignored_folder_unless_told(tmp_path, monkeypatch):
    assert cli.LOCAL_RESULTS == Path(harness.__file__).parent / "results" / "local"
    monkeypatch.setattr(cli, "LOCAL_RESULTS", tmp_path / "local")
    monkeypatch.setattr(harness, "default_device", lambda: CPU)  # the same folders on a GPU machine
    monkeypatch.setattr(harness, "collect_cases", lambda quick, filter=None: [
        _case("a", harness.Provider("eager", fn=_double))])
    assert cli.main(["--quick", "--no-hopper-report"]) == 0
    assert sorted(p.name for p in (tmp_path / "local" / "cpu").iterdir()) == ["results.json", "summary.md",
                                                                               "test__group.png"]
    assert cli.main(["--quick", "--no-hopper-report", "--out", str(tmp_path / "kept")]) == 0
    (case,) = json.loads((tmp_path / "kept" / "results.json").read_text())["cases"]
    assert case["wall_s"] >= 0 and case["cpu_s"] >= 0  # each case's cost, also on a busy machine


def test_list_runs_nothing_and_marks_what_would_be_skipped(capsys, monkeypatch):
    def no_inputs(params, device):
        raise AssertionError("--list made inputs")

    gpu_only = harness.Provider("gpu-only", fn=_double, unavailable=lambda device: "needs a CUDA device")
    case = harness.Case(family="test", name="a", group="g", description="d", params={"n": 1}, sweep="n",
                        make_inputs=no_inputs, providers=(harness.Provider("eager", fn=_double), gpu_only),
                        bytes_moved=8)
    monkeypatch.setattr(harness, "default_device", lambda: CPU)
    monkeypatch.setattr(harness, "collect_cases", lambda quick, filter=None: [case])
    monkeypatch.setattr(harness, "run_case", lambda *args, **kwargs: pytest.fail("--list ran a case"))
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "test/a: eager, gpu-only*" in out and "  gpu-only: needs a CUDA device" in out


def test_quick_cases_are_smoke_sizes():
    """--quick is the default without a GPU and its help promises a few minutes on 2 cores: no
    quick case may hold a workload-sized input (the losses' quick heads once had the full
    151,936-word vocabulary, half of a quick run's time), and the full sizes stay the workload's."""
    from benchmarks import end_to_end, losses

    for case in harness.collect_cases(quick=True, filter="losses/"):
        assert case.params["H"] * case.params["V"] <= 1 << 24, case.id  # 32 MiB of bf16 weight
    assert {c.params["V"] for c in harness.collect_cases(quick=False, filter="losses/")} == {152064, 32000}
    quick_e2e = harness.collect_cases(quick=True, filter="end_to_end/")
    assert {c.params["layers"] for c in quick_e2e} == {1} and max(c.params["tokens"] for c in quick_e2e) <= 256
    assert {c.params["example"] for c in quick_e2e} == set(end_to_end.EXAMPLES)  # every example still runs
    assert losses.SIZES["full"]["ce_tokens"] == (8192, 32768, 131072)


def test_quick_cpu_timing_stops_at_two_calls_once_its_time_is_spent(monkeypatch):
    calls = []

    def slow(x):
        calls.append(x)

    sets = [(torch.ones(1),), (torch.zeros(1),)]
    monkeypatch.setitem(harness.CPU_REPS, "quick", (0, 2, 20, 0.0))  # the budget spent at once
    timing = harness.time_calls(slow, sets, CPU, quick=True)
    assert len(calls) == 2 and len(timing["samples_ms"]) == 2
    assert calls[0] is sets[0][0] and calls[1] is sets[1][0]  # rotated input sets
    calls.clear()
    monkeypatch.setitem(harness.CPU_REPS, "quick", (0, 2, 5, 60.0))  # fast calls: up to the maximum
    assert len(harness.time_calls(slow, sets, CPU, quick=True)["samples_ms"]) == 5 == len(calls)


def test_a_quick_run_leaves_the_hopper_report_out_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "default_device", lambda: CPU)
    monkeypatch.setattr(harness, "collect_cases", lambda quick, filter=None: [
        _case("a", harness.Provider("eager", fn=_double))])
    asked = []
    monkeypatch.setattr(report, "hopper_report", lambda: asked.append(True) or {"skipped": "stub"})
    assert cli.main(["--quick", "--out", str(tmp_path / "quick")]) == 0
    assert not asked
    assert "--hopper-report" in json.loads((tmp_path / "quick" / "results.json").read_text())["hopper"]["skipped"]
    assert cli.main(["--quick", "--hopper-report", "--out", str(tmp_path / "asked")]) == 0
    assert asked == [True]
    with pytest.raises(SystemExit):
        cli.parse_args(["--hopper-report", "--no-hopper-report"])


def test_a_run_stopped_between_cases_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    # make gpu stops the benchmarks at a time limit: the figures measured before must survive.
    monkeypatch.setattr(harness, "default_device", lambda: CPU)
    monkeypatch.setattr(harness, "collect_cases", lambda quick, filter=None: [
        _case("a", harness.Provider("eager", fn=_double)), _case("b", harness.Provider("eager", fn=_double))])
    run_case = harness.run_case

    def stopped_at_the_second(case, *args, **kwargs):
        if case.id.endswith("b"):
            raise KeyboardInterrupt  # what the time limit's signal amounts to, between two cases
        return run_case(case, *args, **kwargs)

    monkeypatch.setattr(harness, "run_case", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--quick", "--no-hopper-report", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [case["case"] for case in saved["cases"]] == ["test/a"]
    assert saved["cases"][0]["providers"]

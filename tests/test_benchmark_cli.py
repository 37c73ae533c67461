"""`python -m benchmarks` on the command line: contradictory size options are refused, --list
says which providers this machine would skip and why, and a case group in which nothing was
measured gets no (empty) plot."""

import json
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


def test_a_run_writes_to_the_ignored_folder_unless_told(tmp_path, monkeypatch):
    assert cli.LOCAL_RESULTS == Path(harness.__file__).parent / "results" / "local"
    ignored = Path(harness.__file__).parents[1] / ".gitignore"
    assert "benchmarks/results/local/" in ignored.read_text().split()
    monkeypatch.setattr(cli, "LOCAL_RESULTS", tmp_path / "local")
    monkeypatch.setattr(harness, "default_device", lambda: CPU)  # the same folders on a GPU machine
    monkeypatch.setattr(harness, "collect_cases", lambda quick, filter=None: [
        _case("a", harness.Provider("eager", fn=_double))])
    assert cli.main(["--quick", "--no-hopper-report"]) == 0
    assert sorted(p.name for p in (tmp_path / "local" / "cpu").iterdir()) == ["results.json", "summary.md",
                                                                               "test__group.png"]
    assert cli.main(["--quick", "--no-hopper-report", "--out", str(tmp_path / "kept")]) == 0
    assert (tmp_path / "kept" / "results.json").exists()


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

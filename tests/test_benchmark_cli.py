"""`python -m benchmarks` on the command line: contradictory size options are refused, --list
says which providers this machine would skip and why, and a case group in which nothing was
measured gets no (empty) plot."""

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

"""python -m docqa_fast.tools.tune: candidates checked against the current choice, failures
reported, the fastest written to a table. On CPU the kernels run under the interpreter, so the
timings mean nothing here; what is tested is the mechanism and that every tunable runs."""

import json

import pytest
import torch
from triton.runtime.errors import OutOfResources

from docqa_fast.kernels import tuning
from docqa_fast.tools import tune, tune_cases

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_tables(monkeypatch):
    monkeypatch.setenv(tuning.TABLE_ENV, "off")
    tuning.reload()
    yield
    tuning.reload()


def _fake_tunable(behaviour):
    """A tunable over the merge kernel's parameters whose run does what ``behaviour`` says for
    the tiles in force (read through the tuning lookup, as a launcher would)."""
    default = {"BLOCK_R": 16, "num_warps": 4}

    def setup(device, quick):
        return tune_cases.State({"x": torch.randn(64, 64).half()}, {"rows": 64}, work=64 * 64 * 2)

    def run(state):
        tiles = tuning.lookup("merge_attention", "D=test", default, CPU)
        return behaviour(tiles["BLOCK_R"], state.tensors["x"])

    candidates = ((16, 4), (8, 4), (32, 4), (64, 4), (16, 8))
    return tune_cases.Tunable("merge_attention", "merge_attention", "D=test", default, "GB/s", "a test",
                              setup, run, candidates)


def test_sweep_reports_failures_rejects_wrong_answers_and_chooses_among_the_rest():
    def behaviour(block_r, x):
        if block_r == 8:
            raise OutOfResources(300000, 232448, "shared memory")
        if block_r == 32:
            return x + 1  # a tile that changes the answer
        if block_r == 64:  # another accumulation order: the last bit moves, nothing more
            return (x.float() * (1 + 2 ** -12)).half()
        return x.clone()

    entry = tune.sweep(_fake_tunable(behaviour), CPU, quick=False, log=lambda _: None)
    status = {(c["tiles"]["BLOCK_R"], c["tiles"]["num_warps"]): c["status"] for c in entry["candidates"]}
    assert status[16, 4] == "ok" and status[64, 4] == "ok" and status[16, 8] == "ok"
    assert status[8, 4].startswith("skipped: out of resources: OutOfResources")
    assert status[32, 4].startswith("rejected: output 0: differs by")
    assert entry["tiles"] in ({"BLOCK_R": 16, "num_warps": 4}, {"BLOCK_R": 64, "num_warps": 4},
                              {"BLOCK_R": 16, "num_warps": 8})
    chosen = [c for c in entry["candidates"] if "chosen" in c.get("note", "")]
    assert len(chosen) == 1 and chosen[0]["tiles"] == entry["tiles"]
    assert all(c["ms"] > 0 for c in entry["candidates"] if c["status"] == "ok")
    assert entry["shape"] == {"rows": 64} and entry["metric"] == "GB/s of a test"


def test_a_current_choice_that_no_longer_builds_does_not_stop_the_sweep():
    def behaviour(block_r, x):
        if block_r == 16:
            raise OutOfResources(300000, 232448, "shared memory")
        return x.clone()

    entry = tune.sweep(_fake_tunable(behaviour), CPU, quick=False, log=lambda _: None)
    assert entry["candidates"][0]["status"].startswith("skipped")
    assert entry["tiles"]["BLOCK_R"] != 16


def test_time_budget_leaves_candidates_unmeasured():
    lines = []
    entry = tune.sweep(_fake_tunable(lambda block_r, x: x.clone()), CPU, quick=False, deadline=0.0,
                       log=lines.append)
    assert entry is None  # nothing measured: the table keeps what it had
    assert lines[0].count("not measured: time budget spent") == 5


def test_a_wrong_row_or_an_unwritten_output_is_rejected():
    """Rounding is judged per element against its row: a tile that zeroes the tail rows of an
    attention output, or leaves a preallocated output unwritten, cannot pass."""
    out = torch.empty(8, 64).half()

    def behaviour(block_r, x):
        if block_r == 32:  # writes nothing: what the previous candidate left stays in the buffer
            return out
        out.copy_(x[:8])
        if block_r == 8:  # the last rows computed wrong (zero), the rest exact
            out[6:] = 0
        return out

    entry = tune.sweep(_fake_tunable(behaviour), CPU, quick=False, log=lambda _: None)
    status = {c["tiles"]["BLOCK_R"]: c["status"] for c in entry["candidates"] if c["tiles"]["num_warps"] == 4}
    assert status[16] == "ok" and status[64] == "ok"
    assert status[8].startswith("rejected: output 0: differs by")
    assert status[32].startswith("rejected: output 0: NaN")
    x = torch.randn(64, 64).half()
    wrong = x.clone()
    wrong[48:] = 0
    assert "differs" in tune.same_up_to_rounding([wrong], [x])


def test_same_up_to_rounding():
    x = torch.randn(100).half()
    assert tune.same_up_to_rounding([x], [x.clone()]) is None
    assert tune.same_up_to_rounding([x.float().mul(1 + 2 ** -11).half()], [x]) is None
    assert "differs" in tune.same_up_to_rounding([x * 1.1], [x])
    nan = x.clone()
    nan[3] = float("nan")
    assert "NaN" in tune.same_up_to_rounding([nan], [x])


def test_command_line_writes_a_table_the_launchers_can_read(tmp_path, monkeypatch, device):
    assert tune.main(["--family", "merge_attention", "--quick", "--out", str(tmp_path), "--jobs", "1"]) == 0
    # Named for the machine it ran on: cpu here, sm90 on an H100 / H200.
    path = tmp_path / tuning.table_name(tune.device_arch(device), tuning.triton_version())
    data = json.loads(path.read_text())
    entry = data["kernels"]["merge_attention"]["D=128"]
    assert tuning.check_tiles("merge_attention", entry["tiles"]) == entry["tiles"]
    assert entry["shape"]["head_dim"] == 128 and len(entry["candidates"]) >= 2
    assert all(c["status"] == "ok" for c in entry["candidates"]), entry["candidates"]
    assert data["torch"] == torch.__version__ and data["date"] and "--family merge_attention" in data["source"]
    # A second run of another family keeps this family's entries.
    renamed = tmp_path / tuning.table_name("sm90", (3, 8))
    path.rename(renamed)
    monkeypatch.setenv(tuning.TABLE_ENV, str(renamed))
    tuning.reload()
    assert tuning.lookup("merge_attention", "D=128", {"BLOCK_R": 1, "num_warps": 1}, CPU) == entry["tiles"]


@pytest.mark.parametrize("index", range(len(tune_cases.tunables())),
                         ids=[f"{t.kernel}[{t.key_for(CPU)}]" for t in tune_cases.tunables()])
def test_every_tunable_builds_and_runs(index, device):
    """What a GPU run would sweep must not fail there for a reason the CPU can show: each
    tunable's inputs, its launch with the current tiles, and the precompile worker's path."""
    tunable = tune_cases.tunables()[index]
    assert tune._precompile_one(tunable.family, index - _family_start(tunable.family), tunable.default_for(device),
                                True) == "ok"
    state = tunable.setup(device, True)
    outputs = tune._tensors(tunable.run(state))
    assert outputs and all(torch.isfinite(o.float()).any() for o in outputs)
    assert state.work > 0 and state.shape


def _family_start(family):
    return next(i for i, t in enumerate(tune_cases.tunables()) if t.family == family)

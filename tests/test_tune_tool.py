"""python -m docqa_fast.tools.tune: candidates checked against the current choice, failures
reported, the fastest written to a table. On CPU the kernels run under the interpreter, so the
timings mean nothing here; what is tested is the mechanism and that every tunable runs."""

import json

import pytest
import torch
from triton.runtime.errors import OutOfResources

from docqa_fast.kernels import tuning
from docqa_fast.testing import tuned_tables
from docqa_fast.tools import tune, tune_cases

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_tables(monkeypatch):
    with tuned_tables(monkeypatch, "off"):
        yield


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


# ------------------------------------------------------------------ dispatched calls

def _fake_dispatch(monkeypatch, other_run, other_available=lambda device: None):
    """An op of two implementations -- ours (slow here) and an outside one -- and a case timing them."""
    import dataclasses
    import time

    from docqa_fast import _backend

    def slow(x):
        time.sleep(0.02)
        return x * 2

    op = _backend.Op("tune_test_op", (_backend.Implementation("triton", slow),
                                      _backend.Implementation("other", other_run, available=other_available),
                                      _backend.Implementation("reference", lambda x: x * 2)),
                     shape_class=lambda x: {"rows": x.shape[0]})
    monkeypatch.setitem(_backend.OPS, op.name, op)

    def setup(device, quick):
        return tune_cases.State({"x": torch.randn(16, 32).half()}, {"rows": 16}, work=16 * 32 * 2)

    return dataclasses.replace(tune_cases.dispatch_cases(["attention"])[0], op=op.name, setup=setup,
                               args=lambda state: (state.tensors["x"],), backends=("triton", "other"), unit="GB/s",
                               what="a test"), op


def test_dispatch_is_timed_through_the_table_and_the_fastest_comes_first(monkeypatch):
    case, _ = _fake_dispatch(monkeypatch, lambda x: x * 2)
    lines = []
    rule = tune.measure_dispatch(case, CPU, quick=True, log=lines.append)
    assert rule["when"] == {"rows": 16} and rule["order"] == ["other", "triton"]
    assert [(c["backend"], c["status"], c.get("note")) for c in rule["candidates"]] == [
        ("triton", "ok", None), ("other", "ok", "chosen")]
    assert rule["metric"] == "GB/s of a test" and rule["shape"] == {"rows": 16} and "cudnn" in rule["versions"]
    assert lines[0].startswith("dispatch tune_test_op[rows=16]  (GB/s of a test)")


def test_dispatch_never_puts_first_what_changes_the_answer_or_cannot_run(monkeypatch):
    wrong, _ = _fake_dispatch(monkeypatch, lambda x: x * 2 + 1)
    rule = tune.measure_dispatch(wrong, CPU, quick=True, log=lambda _: None)
    assert rule["order"] == ["triton"] and rule["candidates"][1]["status"].startswith("rejected: output 0: differs")
    absent, _ = _fake_dispatch(monkeypatch, lambda x: x * 2, other_available=lambda device: "no such library")
    rule = tune.measure_dispatch(absent, CPU, quick=True, log=lambda _: None)
    assert rule["order"] == ["triton"] and rule["candidates"][1]["status"] == "unavailable: no such library"
    assert tune.measure_dispatch(absent, CPU, quick=True, deadline=0.0, log=lambda _: None) is None


def test_a_measured_rule_is_merged_into_the_table_and_read_by_the_dispatch(tmp_path, monkeypatch):
    case, op = _fake_dispatch(monkeypatch, lambda x: x * 2)
    rule = tune.measure_dispatch(case, CPU, quick=True, log=lambda _: None)
    path = tmp_path / "sm90-triton3.8.json"
    # A first table's unconditional order for the op, and another op's rule: both kept.
    path.write_text(json.dumps({"format": tuning.FORMAT, "kernels": {}, "dispatch": {
        op.name: ["reference"], "other_op": [{"when": {}, "order": ["triton"]}]}}))
    tune.write_table(path, CPU, {}, ["--test"], {op.name: [rule]})
    again = dict(rule, order=["triton", "other"])  # a later measurement of the same shape class replaces it
    data = tune.write_table(path, CPU, {}, ["--test"], {op.name: [again]})
    assert [r["order"] for r in data["dispatch"][op.name]] == [["triton", "other"], ["reference"]]
    assert data["dispatch"]["other_op"] == [{"when": {}, "order": ["triton"]}]
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    tuning.reload()
    x = torch.ones(16, 2)
    assert op.decide(torch.device("cuda"), torch.float16, (x,))[0].backend == "triton"
    assert op.decide(torch.device("cuda"), torch.float16, (torch.ones(3, 2),))[0].backend == "reference"


@pytest.mark.parametrize("index", range(len(tune_cases.dispatch_cases())),
                         ids=[f"{c.op}-{c.what.split()[1]}" for c in tune_cases.dispatch_cases()])
def test_every_attention_dispatch_case_is_a_call_both_routes_take(index, device):
    """What a GPU run measures: dense D 128 calls our kernel and cuDNN both compute exactly."""
    from docqa_fast import _backend
    from docqa_fast.attention import ops

    case = tune_cases.dispatch_cases()[index]
    op = _backend.OPS[case.op]
    args = case.args(case.setup(device, True))
    assert op.shape_class(*args) == {"layout": "dense", "head_dim": 128, "causal": "non" not in case.what}
    reason = ops.cudnn_forward_reason if case.op == "attention_forward" else ops.cudnn_backward_reason
    assert reason(*args) is None and op.implementation("triton").eligible(*args) is None


def test_the_attention_forward_case_measured_end_to_end(device, monkeypatch):
    """The causal forward case through measure_dispatch, cuDNN's route standing in as the reference's
    math where cuDNN cannot run (CPU): both outputs checked against each other, timed, ranked."""
    import dataclasses

    from docqa_fast import _backend
    from docqa_fast.attention import ops

    op = _backend.OPS["attention_forward"]
    if ops.cudnn_unavailable_reason(device) is not None:
        stand_in = dataclasses.replace(op.implementation("cudnn"), run=ops._forward_reference,
                                       available=lambda device: None)
        op = dataclasses.replace(op, implementations=tuple(stand_in if i.backend == "cudnn" else i
                                                           for i in op.implementations))
        monkeypatch.setitem(_backend.OPS, "attention_forward", op)
    rule = tune.measure_dispatch(tune_cases.dispatch_cases()[0], device, quick=True, log=lambda _: None)
    assert {c["backend"]: c["status"] for c in rule["candidates"]} == {"triton": "ok", "cudnn": "ok"}
    assert sorted(rule["order"]) == ["cudnn", "triton"]

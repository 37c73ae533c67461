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


def test_time_budget_leaves_candidates_unmeasured_and_not_even_set_up():
    import dataclasses

    lines, set_up = [], []
    tunable = _fake_tunable(lambda block_r, x: x.clone())
    tunable = dataclasses.replace(tunable, setup=lambda device, quick: set_up.append(1) or tunable.setup(device, quick))
    entry = tune.sweep(tunable, CPU, quick=False, deadline=0.0, log=lines.append)
    assert entry is None  # nothing measured: the table keeps what it had
    assert lines[0].count("not measured: time budget spent") == 5 and "current" in lines[0]
    assert set_up == []  # a full-size set-up (allocations, launches) would only spend more time


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
    status, read = tune._precompile_one(tunable.family, index - _family_start(tunable.family),
                                        tunable.default_for(device), True)
    # What it looked up (on CPU the chunked prefill's public function runs the reference: nothing).
    assert status == "ok" and all(kernel in tuning.declared() for kernel, _ in read)
    state = tunable.setup(device, True)
    outputs = tune._tensors(tunable.run(state))
    assert outputs and all(torch.isfinite(o.float()).any() for o in outputs)
    assert state.work > 0 and state.shape


def _family_start(family):
    return next(i for i, t in enumerate(tune_cases.tunables()) if t.family == family)


# ------------------------------------------------------------------ dispatched calls

def _fake_dispatch(monkeypatch, other_run, other_available=lambda device: None, ours=None):
    """An op of two implementations -- ours (slow here) and an outside one -- and a case timing them."""
    import dataclasses
    import time

    from docqa_fast import _backend

    def slow(x):
        time.sleep(0.02)
        return x * 2

    op = _backend.Op("tune_test_op", (_backend.Implementation("triton", ours or slow),
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
    import dataclasses

    wrong, _ = _fake_dispatch(monkeypatch, lambda x: x * 2 + 1)
    rule = tune.measure_dispatch(wrong, CPU, quick=True, log=lambda _: None)
    assert rule["order"] == ["triton"] and rule["candidates"][1]["status"].startswith("rejected: output 0: differs")
    absent, _ = _fake_dispatch(monkeypatch, lambda x: x * 2, other_available=lambda device: "no such library")
    rule = tune.measure_dispatch(absent, CPU, quick=True, log=lambda _: None)
    assert rule["order"] == ["triton"] and rule["candidates"][1]["status"] == "unavailable: no such library"
    lines = []
    spent = dataclasses.replace(absent, setup=lambda device, quick: pytest.fail("set up after the budget"))
    assert tune.measure_dispatch(spent, CPU, quick=True, deadline=0.0, log=lines.append) is None
    assert lines == ["dispatch tune_test_op  (GB/s of a test)\n  triton         not measured: time budget spent  \n"
                     "  other          not measured: time budget spent  "]


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
    # The worker's path that compiles our implementation of the call ahead of the timing.
    status, read = tune._precompile_dispatch(case.family, index, "triton", True)
    assert status == "ok" and ("attention_forward", "D=128,tma") in read


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


# ------------------------------------------------------------------ the run: compiling ahead, the budget

class _InlinePool:
    """Stands in for the worker processes: runs each task at once, here, and records it."""

    def __init__(self, events):
        self.events = events
        self.in_worker = False

    def submit(self, function, *args):
        import concurrent.futures

        self.events.append(("compile", function.__name__, args))
        future = concurrent.futures.Future()
        self.in_worker = True
        try:
            future.set_result(function(*args))
        finally:
            self.in_worker = False
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        self.events.append(("shutdown",))


def _fake_family(monkeypatch, events, times, pool=None, clock=None):
    """A family of three tunables over the merge kernel's parameters -- D=a; D=b, whose run also
    reads D=a's tiles (as dQ's timing reads dK/dV's); D=c, which reads only its own (as the ViT
    kernels after the LLM's) -- and one dispatched call whose compiled implementation reads D=b's.
    Each setup and run in this process is recorded in ``events``, each launch in a worker too,
    with the BLOCK_R of the tiles it read; ``times[key, those]`` is what a run "takes"
    (tune._bench is replaced; 1.0 where not given); ``clock`` advances by that much per run."""
    import dataclasses

    default = {"BLOCK_R": 16, "num_warps": 4}

    def read(keys):
        return tuple(tuning.lookup("merge_attention", key, default, CPU)["BLOCK_R"] for key in keys)

    def tunable(key, reads):
        def setup(device, quick):
            if not (pool and pool.in_worker):
                events.append(("setup", key))
            return tune_cases.State({"x": torch.ones(4, 8).half()}, {"rows": 4}, work=64)

        def run(state):
            tiles = read(reads)
            if pool and pool.in_worker:
                events.append(("launch", key, tiles))  # what a worker compiles
            else:
                events.append(("run", key, tiles))
                if clock is not None:
                    clock[0] += times.get((key, tiles), 1.0)
            return state.tensors["x"].clone()

        return tune_cases.Tunable("merge_attention", "merge_attention", key, default, "GB/s", "a test", setup, run,
                                  ((16, 4), (32, 4)))

    family = [tunable("D=a", ("D=a",)), tunable("D=b", ("D=a", "D=b")), tunable("D=c", ("D=c",))]

    def ours(x):
        events.append(("launch" if pool and pool.in_worker else "run", "dispatch", read(("D=b",))))
        return x * 2

    case, _ = _fake_dispatch(monkeypatch, lambda x: x * 2, ours=ours)
    case_setup = case.setup

    def dispatch_setup(device, quick):
        if not (pool and pool.in_worker):
            events.append(("setup", "dispatch"))
        return case_setup(device, quick)

    case = dataclasses.replace(case, family="merge_attention", setup=dispatch_setup)
    monkeypatch.setattr(tune_cases, "tunables", lambda families: family if families == ["merge_attention"] else [])
    monkeypatch.setattr(tune_cases, "dispatch_cases", lambda families: [case] if families == ["merge_attention"]
                        else [])

    def bench(fn, device):
        fn()
        return times.get(events[-1][1:], 1.0) if events[-1][0] == "run" else 1.0

    monkeypatch.setattr(tune, "_bench", bench)
    if clock is not None:
        monkeypatch.setattr(tune, "_clock", lambda: clock[0])


def _compiled(events):
    return [(name, args[1], args[2], args[4]) for kind, *rest in events if kind == "compile"
            for name, args in [rest]]


A16, A32 = {"BLOCK_R": 16, "num_warps": 4}, {"BLOCK_R": 32, "num_warps": 4}


def test_the_family_is_compiled_ahead_in_the_pool_dispatched_calls_included(tmp_path, monkeypatch):
    """Before anything is timed, the workers launch every candidate of every variant and the
    dispatched call's compiled implementation (not cuDNN's stand-in "other": its plans are per
    process); the current choices stay, so nothing is compiled again and the pool is started once."""
    events = []
    pool = _InlinePool(events)
    _fake_family(monkeypatch, events, {("D=a", (32,)): 2.0, ("D=b", (16, 32)): 3.0, ("D=c", (32,)): 2.0}, pool)
    made = []
    compiler = tune.Compiler(4, make_pool=lambda: made.append(1) or pool)
    lines = []
    tune.run(["merge_attention"], quick=False, out=tmp_path, jobs=4, budget=None, log=lines.append,
             compiler=compiler)
    compiled = [event for event in events if event[0] == "compile"]
    assert _compiled(events) == [("_precompile_dispatch", 0, "triton", ())] + [
        ("_precompile_one", index, tiles, ()) for index in range(3) for tiles in (A16, A32)]
    first_set_up = next(i for i, event in enumerate(events) if event[0] == "setup")
    assert [event for event in events[:first_set_up] if event[0] != "launch"] == compiled  # all of it first
    assert [event[1:] for event in events if event[0] == "launch"] == [
        ("dispatch", (16,)), ("D=a", (16,)), ("D=a", (32,)), ("D=b", (16, 16)), ("D=b", (16, 32)), ("D=c", (16,)),
        ("D=c", (32,))]
    assert events[-1] == ("shutdown",) and made == [1]
    assert lines[0] == "[merge_attention] compiled 7 launches (6 candidates, 1 dispatched calls) in 0 s"
    assert [event[1] for event in events if event[0] == "setup"] == ["D=a", "D=b", "D=c", "dispatch"]


def test_what_reads_a_changed_choice_is_compiled_again_with_it_in_force(tmp_path, monkeypatch):
    """Neither D=a's nor D=b's choice is its current tiles: D=b's candidates (which read D=a's)
    and the dispatched call (which reads D=b's) launch binaries the first compile did not build,
    so they are compiled ahead again, the choices in force in the worker, before this process
    times them; D=c, which reads neither, is not."""
    events = []
    pool = _InlinePool(events)
    _fake_family(monkeypatch, events, {("D=a", (16,)): 2.0, ("D=b", (32, 16)): 3.0}, pool)
    tune.run(["merge_attention"], quick=False, out=tmp_path, jobs=4, budget=None, log=lambda _: None,
             compiler=tune.Compiler(4, make_pool=lambda: pool))
    chose_a = (("merge_attention", "D=a", A32),)
    chose_all = chose_a + (("merge_attention", "D=b", A32), ("merge_attention", "D=c", A16))
    assert _compiled(events)[7:] == [("_precompile_one", 1, A16, chose_a), ("_precompile_one", 1, A32, chose_a),
                                     ("_precompile_dispatch", 0, "triton", chose_all)]
    steps = [event[:2] if event[0] != "compile" else (event[1], event[2][1]) for event in events
             if event[0] != "launch"]
    # D=a timed; D=b compiled with its choice, then set up and timed; the call compiled, then measured.
    after_a = steps.index(("setup", "D=b"))
    assert steps[after_a - 2:after_a] == [("_precompile_one", 1), ("_precompile_one", 1)]
    assert steps[steps.index(("setup", "D=c")) - 1] == ("run", "D=b")
    assert steps[steps.index(("setup", "dispatch")) - 1] == ("_precompile_dispatch", 0)
    # What the workers launched is what this process then timed: D=b's runs with D=a's choice.
    assert {event[2] for event in events if event[:2] == ("run", "D=b")} == {(32, 16), (32, 32)}
    assert [event[1:] for event in events if event[0] == "launch"][7:] == [
        ("D=b", (32, 16)), ("D=b", (32, 32)), ("dispatch", (32,))]


@pytest.mark.parametrize("how", ["lost", "failed"])
def test_a_launch_that_did_not_report_what_it_read_is_compiled_again_after_any_change(tmp_path, monkeypatch, how):
    """D=c's first compile was cut (its worker gave no answer) or failed (what it looked up
    stops where it failed): after D=a's change it is compiled again, as what it reads is not known."""
    import concurrent.futures

    events = []

    class Losing(_InlinePool):
        def submit(self, function, *args):
            future = super().submit(function, *args)
            if args[1] == 2 and not args[4]:  # D=c's, before any choice
                future = concurrent.futures.Future()
                if how == "lost":
                    future.set_exception(RuntimeError("lost"))
                else:
                    future.set_result(("skipped: compile error: CompilationError: at 1:2", (("merge_attention", "D=c"),)))
            return future

    pool = Losing(events)
    _fake_family(monkeypatch, events, {("D=a", (16,)): 2.0}, pool)
    lines = []
    tune.run(["merge_attention"], quick=False, out=tmp_path, jobs=4, budget=None, log=lines.append,
             compiler=tune.Compiler(4, make_pool=lambda: pool))
    assert lines[0] == "[merge_attention] compiled 5 of 7 launches (6 candidates, 1 dispatched calls) in 0 s"
    # D=b reads D=a's choice; the dispatched call reads D=b's, which stayed: not compiled again.
    assert [(name, index) for name, index, _, choices in _compiled(events) if choices] == [
        ("_precompile_one", 1), ("_precompile_one", 1), ("_precompile_one", 2), ("_precompile_one", 2)]


def test_a_candidate_that_broke_a_workers_cuda_context_is_not_launched_here(tmp_path, monkeypatch):
    """D=a's 32-row candidate broke its worker's CUDA context: it is not counted as compiled,
    and this process does not launch it (it would break its own context, and every measurement
    after it): it is listed as rejected with the reason."""
    import concurrent.futures

    events = []
    broken = "skipped: broken CUDA context: RuntimeError: CUDA error: an illegal memory access was encountered"

    class Breaking(_InlinePool):
        def submit(self, function, *args):
            if function is tune._precompile_one and args[1:3] == (0, A32):
                self.events.append(("compile", function.__name__, args))
                future = concurrent.futures.Future()
                future.set_result((broken, ()))
                return future
            return super().submit(function, *args)

    pool = Breaking(events)
    _fake_family(monkeypatch, events, {}, pool)
    lines = []
    path = tune.run(["merge_attention"], quick=False, out=tmp_path, jobs=4, budget=None, log=lines.append,
                    compiler=tune.Compiler(4, make_pool=lambda: pool))
    assert lines[0] == "[merge_attention] compiled 6 of 7 launches (6 candidates, 1 dispatched calls) in 0 s"
    assert [event[2] for event in events if event[:2] == ("run", "D=a")] == [(16,)] * 2  # checked, timed
    entry = json.loads(path.read_text())["kernels"]["merge_attention"]["D=a"]
    assert [c["status"] for c in entry["candidates"]] == [
        "ok", "rejected: broken CUDA context: RuntimeError: CUDA error: an illegal memory access was encountered "
              "(in a compile worker)"]
    assert ("shutdown",) in events[:events.index(("setup", "D=a"))]  # its worker is not given another task


def test_a_set_up_that_fails_ends_its_family_not_the_run(tmp_path, monkeypatch):
    """A set-up that fails in this process (a CUDA context a launch broke fails every later
    one): the family ends there, logged; what it measured before is written, its other variants
    keep their entries; the next family is tuned. A run that measured nothing writes nothing."""
    import dataclasses

    def failing(device, quick):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    good = _fake_tunable(lambda block_r, x: x.clone())
    merge = [dataclasses.replace(good, key="D=a"), dataclasses.replace(good, key="D=b", setup=failing),
             dataclasses.replace(good, key="D=c")]
    by_family = {"merge_attention": merge, "reward": [dataclasses.replace(good, key="D=r")]}
    monkeypatch.setattr(tune_cases, "tunables", lambda families: [t for f in families for t in by_family[f]])
    monkeypatch.setattr(tune_cases, "dispatch_cases", lambda families: [])
    path = tmp_path / tuning.table_name(tune.device_arch(CPU), tuning.triton_version())
    before = {"D=b": {"tiles": {"BLOCK_R": 64, "num_warps": 8}}, "D=c": {"tiles": {"BLOCK_R": 8, "num_warps": 4}}}
    path.write_text(json.dumps({"kernels": {"merge_attention": before}}))
    lines = []
    tune.run(["merge_attention", "reward"], quick=False, out=tmp_path, jobs=1, budget=None, log=lines.append)
    assert "[merge_attention] ended early: error: RuntimeError: CUDA error: an illegal memory access was " \
           "encountered" in lines
    kernels = json.loads(path.read_text())["kernels"]["merge_attention"]
    assert sorted(kernels) == ["D=a", "D=b", "D=c", "D=r"]
    assert {key: kernels[key] for key in before} == before
    assert lines[-1] == f"wrote {path}"

    written = path.read_text()
    by_family["merge_attention"] = merge[1:]
    lines = []
    tune.run(["merge_attention"], quick=False, out=tmp_path, jobs=1, budget=None, log=lines.append)
    assert lines == ["[merge_attention] ended early: error: RuntimeError: CUDA error: an illegal memory access "
                     "was encountered"]
    assert path.read_text() == written

    # When this process's own context is broken, no later family could set up: the run stops.
    monkeypatch.setattr(tune, "_context_error", lambda: "RuntimeError: CUDA error: an illegal memory access")
    lines = []
    tune.run(["merge_attention", "reward"], quick=False, out=tmp_path, jobs=1, budget=None, log=lines.append)
    assert lines[1:] == ["this process's CUDA context is broken (RuntimeError: CUDA error: an illegal memory "
                         "access): no other family is tuned"]
    assert path.read_text() == written


def test_nothing_is_set_up_or_compiled_once_the_budget_is_spent(tmp_path, monkeypatch):
    """On a fake clock: D=a's first run spends the budget. Its other candidate is left unmeasured;
    D=b and the dispatched call are neither compiled ahead, nor set up, nor run; the next family
    is not tuned; what was measured is written."""
    events, clock = [], [0.0]
    pool = _InlinePool(events)
    _fake_family(monkeypatch, events, {("D=a", (16,)): 100.0}, pool, clock)
    lines = []
    path = tune.run(["merge_attention", "reward"], quick=False, out=tmp_path, jobs=4, budget=50.0,
                    log=lines.append, compiler=tune.Compiler(4, make_pool=lambda: pool))
    assert [event[:2] for event in events if event[0] in ("setup", "run")] == [("setup", "D=a"), ("run", "D=a"),
                                                                              ("run", "D=a")]  # check, then time
    assert len(_compiled(events)) == 7  # the first compile only
    assert all("not measured: time budget spent" in line for line in lines[1:4])
    assert lines[4] == "dispatch tune_test_op  (GB/s of a test)\n  triton         not measured: time budget spent  \n" \
                       "  other          not measured: time budget spent  "
    assert lines[5] == "[reward] not tuned: time budget spent"
    entry = json.loads(path.read_text())["kernels"]["merge_attention"]["D=a"]
    assert [c["status"] for c in entry["candidates"]] == ["ok", "not measured: time budget spent"]


def test_compile_waits_no_longer_than_the_budget_and_cancels_what_has_not_started():
    import concurrent.futures

    class Stalled:  # a pool whose workers never get to the tasks
        def __init__(self):
            self.futures = []

        def submit(self, function, *args):
            self.futures.append(concurrent.futures.Future())
            return self.futures[-1]

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    pool = Stalled()
    compiler = tune.Compiler(2, make_pool=lambda: pool)
    assert compiler.compile([(print, ()), (print, ())], deadline=0.0) == [None, None]
    assert len(pool.futures) == 2 and all(f.cancelled() for f in pool.futures)


class _ScriptedPool:
    """A pool whose tasks' outcomes a test names: ``outcome(function, args)`` returns the task's
    result or an exception to set; ``refuse`` (an exception) is raised by submit itself."""

    def __init__(self, log, outcome=None, refuse=None):
        self.log, self.outcome, self.refuse = log, outcome or (lambda function, args: function(*args)), refuse
        log.append("new")

    def submit(self, function, *args):
        import concurrent.futures

        if self.refuse is not None:
            raise self.refuse
        future = concurrent.futures.Future()
        result = self.outcome(function, args)
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        self.log.append("shut")


def test_tasks_lost_to_a_dead_worker_go_once_to_fresh_workers():
    """A worker died (here: left over a broken CUDA context after reporting its task): the tasks
    lost with it run in a new pool; a task lost twice is left to the timing process."""
    from concurrent.futures.process import BrokenProcessPool

    pools = []
    broken = ("skipped: broken CUDA context: RuntimeError: CUDA error: an illegal memory access", ())

    def first(function, args):
        return broken if args == (0,) else BrokenProcessPool("a worker died")

    makers = iter([lambda: _ScriptedPool(pools, first), lambda: _ScriptedPool(pools)])
    compiler = tune.Compiler(12, make_pool=lambda: next(makers)())
    tasks = [(lambda i: ("ok", (i,)), (i,)) for i in range(5)]
    assert compiler.compile(tasks) == [broken] + [("ok", (i,)) for i in range(1, 5)]
    # The second pool took only the lost tasks; a broken context closes the pool even when no
    # worker has left yet (an idle one would take the next compile's first task and leave).
    assert pools == ["new", "shut", "new"]

    pools.clear()
    compiler = tune.Compiler(2, make_pool=lambda: _ScriptedPool(pools, lambda f, a: BrokenProcessPool("died")))
    assert compiler.compile([(print, ())]) == [None]
    assert pools == ["new", "shut", "new", "shut"]  # once again, not more
    assert compiler.compile([(print, ())]) == [None]  # the next compile starts new workers
    assert pools[4] == "new"


def test_a_pool_that_refuses_tasks_is_replaced_once_then_the_timing_process_compiles():
    """A worker that died while idle (the OOM killer) breaks the pool: its next submit raises.
    The compile starts a new pool; when that one cannot take them either, nothing is compiled
    ahead (the timing process compiles) and the run goes on."""
    from concurrent.futures.process import BrokenProcessPool

    pools = []
    makers = iter([lambda: _ScriptedPool(pools, refuse=BrokenProcessPool("a worker died")),
                   lambda: _ScriptedPool(pools)])
    compiler = tune.Compiler(2, make_pool=lambda: next(makers)())
    assert compiler.compile([(lambda: ("ok", ()), ())] * 2) == [("ok", ())] * 2
    assert pools == ["new", "shut", "new"]

    for refusal in (BrokenProcessPool("a worker died"), RuntimeError("cannot schedule new futures after shutdown"),
                    OSError(12, "Cannot allocate memory")):
        pools.clear()
        compiler = tune.Compiler(2, make_pool=lambda: _ScriptedPool(pools, refuse=refusal))
        assert compiler.compile([(print, ())] * 3) == [None] * 3
        assert pools == ["new", "shut", "new", "shut"]


def test_a_real_worker_killed_while_idle_is_replaced():
    """Real worker processes: the OOM killer's SIGKILL between two compiles."""
    import os
    import signal
    import time

    compiler = tune.Compiler(1)
    try:
        [pid] = compiler.compile([(os.getpid, ())])
        os.kill(pid, signal.SIGKILL)
        waited = time.monotonic() + 10
        while not compiler._pool._broken and time.monotonic() < waited:  # the executor notices
            time.sleep(0.05)
        [new_pid] = compiler.compile([(os.getpid, ())])
        assert new_pid not in (None, pid)
    finally:
        compiler.close()


def _exit_status(process, within=5.0):
    """The process's exit status, waiting up to ``within`` seconds: the executor's own thread may
    reap the worker at the same time, and the first look then sees no status yet."""
    import time

    until = time.monotonic() + within
    while process.exitcode is None and time.monotonic() < until:
        time.sleep(0.05)
    return process.exitcode


def test_close_stops_a_worker_still_compiling_when_the_budget_is_spent():
    """Real worker processes: one busy past the budget is terminated, not waited for."""
    import signal
    import time

    compiler = tune.Compiler(1)
    assert compiler.compile([(time.sleep, (60,))], deadline=tune._clock() + 1.0) == [None]
    processes = list(compiler._pool._processes.values())
    assert processes and all(p.is_alive() for p in processes)
    started = time.monotonic()
    compiler.close()
    assert time.monotonic() - started < 30  # not the 60 s task
    assert [_exit_status(p) for p in processes] == [-signal.SIGTERM]


def test_close_stops_what_an_earlier_compile_left_running_and_kills_what_does_not_leave():
    """The first compile's task is still running past its budget when a second compile ends:
    close() still stops it (it is not forgotten by the second compile). A worker that has not
    left 5 s after being stopped is killed rather than waited for."""
    import concurrent.futures

    calls = []

    class Worker:
        def __init__(self, name, stubborn):
            self.name, self.stubborn, self.exitcode = name, stubborn, None

        def terminate(self):
            calls.append(("terminate", self.name))
            self.exitcode = None if self.stubborn else -15

        def join(self, timeout=None):
            calls.append(("join", self.name, timeout))

        def kill(self):
            calls.append(("kill", self.name))
            self.exitcode = -9

    class Pool:
        def __init__(self):
            self._processes = {1: Worker("busy", stubborn=True), 2: Worker("idle", stubborn=False)}

        def submit(self, function, *args):
            future = concurrent.futures.Future()
            if function is print:  # never finishes
                future.set_running_or_notify_cancel()
            else:
                future.set_result(function(*args))
            return future

        def shutdown(self, wait=True, cancel_futures=False):
            calls.append(("shutdown", wait))

    compiler = tune.Compiler(2, make_pool=Pool)
    assert compiler.compile([(print, ())], deadline=0.0) == [None]
    assert compiler.compile([(abs, (-1,))]) == [1]
    compiler.close()
    assert [call[:2] for call in calls] == [("shutdown", False), ("terminate", "busy"), ("terminate", "idle"),
                                            ("join", "busy"), ("join", "idle"), ("kill", "busy"), ("join", "busy")]
    assert all(0 <= call[2] <= 5 for call in calls if call[0] == "join")  # never waited for without end


def test_a_launch_that_breaks_the_cuda_context_is_reported_and_its_worker_takes_no_other(monkeypatch):
    """A sticky CUDA error (an illegal address) leaves the worker's context unusable: the
    synchronize after the failed launch fails too. The task is reported as such; the next task
    given to that worker makes it leave (so the pool is replaced) instead of failing at once."""
    import os

    monkeypatch.setattr(tune, "_context_broken", False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)

    def illegal(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    # A launch that fails with the context intact (out of shared memory): reported, nothing more.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    status, _ = tune._launch_once(lambda device: (_ for _ in ()).throw(OutOfResources(300000, 232448, "shared")))
    assert status.startswith("skipped: out of resources") and not tune._context_broken

    # An asynchronous error that is not sticky: the first synchronize raises it, the next passes.
    raised = []

    def once(device=None):
        if not raised:
            raised.append(1)
            illegal(device)

    monkeypatch.setattr(torch.cuda, "synchronize", once)
    status, _ = tune._launch_once(illegal)
    assert status.startswith("skipped: error: RuntimeError") and not tune._context_broken

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: illegal(device))
    status, _ = tune._launch_once(illegal)
    assert status == "skipped: broken CUDA context: RuntimeError: CUDA error: an illegal memory access was encountered"

    class Left(BaseException):
        pass

    def leave(code):
        raise Left(code)

    monkeypatch.setattr(os, "_exit", leave)
    ran = []
    with pytest.raises(Left) as left:
        tune._launch_once(lambda device: ran.append(1))
    assert left.value.args == (tune.BROKEN_CONTEXT_EXIT,) and ran == []


@pytest.mark.slow
def test_a_real_worker_compiles_a_merge_candidate():
    """A real spawned worker runs the precompile entry point on a real candidate (the
    interpreter here) and reports what its launch looked up."""
    from docqa_fast.kernels import merge_attention

    tunable = tune_cases.tunables(["merge_attention"])[0]
    compiler = tune.Compiler(1)
    try:
        [(status, read)] = compiler.compile([(tune._precompile_one,
                                              ("merge_attention", 0, merge_attention.default_tiles(128), True))])
    finally:
        compiler.close()
    assert status == "ok"
    assert ("merge_attention", tunable.key_for(CPU)) in read

"""Measure Triton tile candidates on the present GPU and write its tuned table.

``python -m docqa_fast.tools.tune [--family F ...] [--quick] [--out DIR] [--jobs N] [--budget S]``

For every tunable kernel variant of the chosen families (``tune_cases.py``: attention forward /
dQ / dK/dV per head dim and load path, decode, linear log-probs, reward, merge), at the shape of
the workload it serves, each candidate tile set is

1. launched through the real launcher (``kernels.tuning.override``), on the same random inputs
   as the current choice (the table's, or the built-in default);
2. rejected if it fails to compile, runs out of shared memory or registers ("skipped" with
   the reason), or if its outputs differ from the current choice's beyond rounding
   ("rejected": a tile that changes the answer is a bug, reported, never chosen);
3. timed: ``triton.testing.do_bench`` median with the L2 flushed (on CPU under the interpreter,
   a wall-clock median: only for testing this tool).

The fastest candidate is written, with the shape, the metric and every candidate's status and
time, to ``<out>/<arch>-triton<M>.<m>.json`` (``kernels/tuned/`` by default, the file launchers
read); entries of other kernels already in that file are kept. Variants of one family are
tuned in order, each with the choices made before it in force (dQ is timed with the dK/dV
tiles just chosen).

On a GPU, ``--jobs`` worker processes, started once for the run, first launch everything the
family will time -- every candidate, and the dispatched calls below with the current choices
(the non-causal attention kernels are no tunable's) -- so that Triton's disk cache serves the
timing process, which then compiles nothing. The workers never run while something is timed.
When a choice differs from the current one, the variants after it (and the dispatched calls)
whose launches looked up that variant's tiles (the workers report what they looked up) launch
kernels not built yet: they are compiled ahead the same way, with the choices in force.
``--budget``: no candidate, set-up or compile starts after it; what is left is reported "not
measured" and the table keeps its entries. A candidate whose launch breaks a worker's CUDA
context is never launched in the timing process (it is reported rejected); tasks lost to a dead
worker go once to fresh workers; a set-up that fails in the timing process ends its family, not
the run.

Then, with the family's new tiles in force, the implementations of its dispatched calls
(``tune_cases.dispatch_cases``: training attention through our kernels against torch's cuDNN
attention) are timed the same way -- through the dispatch table's own functions, an
implementation that cannot run the call reported with its reason, one whose outputs differ from
the first's beyond rounding rejected -- and the table's ``dispatch`` section gets a rule for
the call's shape class: the implementations fastest first, with every one's time (see
``kernels/tuning.py``, ``dispatch_rule``). The calls that follow read it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from ..kernels import tuning

_TRITON_ERRORS = ("OutOfResources", "PTXASError", "CompilationError")
_clock = time.monotonic  # the budget's clock (a test replaces it)
NOT_MEASURED = "not measured: time budget spent"
# Implementations of a dispatched call whose binaries land in Triton's disk cache, so compiling
# them in a worker process spares the timing process (cuDNN builds its plans per process).
PRECOMPILED_BACKENDS = ("triton",)


def _spent(deadline: float | None) -> bool:
    return deadline is not None and _clock() > deadline


def _bench(fn, device) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Units in the last place two implementations of one op (ours, cuDNN's) may differ by, per element
# against its row: beyond the accumulation order, each rounds in places of its own (the
# probabilities to bf16 before the P.V product, exp against exp2). A wrong mask or LSE units
# (log2 for ln: 44%) still differ by whole units.
IMPLEMENTATION_ULPS = 8


def same_up_to_rounding(got, want, ulps: int = 4) -> str | None:
    """None when every output of a candidate equals the current choice's up to rounding, else why
    not. Rounding, element by element: ``ulps`` units of the output dtype's last place relative
    to the element plus its row's largest value (its last dimension: an attention row, a gradient
    row), since another accumulation order moves a small element by the rounding of the large
    terms it came from. A wrong tile (a mask or bound bug) moves elements by whole units, leaves
    a row unwritten (NaN: sweep fills the outputs with NaN first) or zero."""
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for index, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            return f"output {index}: shape {tuple(a.shape)} instead of {tuple(b.shape)}"
        a64, b64 = a.double(), b.double()
        if not torch.equal(torch.isnan(a64), torch.isnan(b64)) or not torch.equal(torch.isinf(a64), torch.isinf(b64)):
            return f"output {index}: NaN or infinities in other places"
        if b64.numel() == 0:
            continue
        finite = torch.isfinite(b64)
        magnitude = torch.where(finite, b64.abs(), 0.0)
        rows = magnitude.reshape(-1, magnitude.shape[-1]) if magnitude.dim() else magnitude.reshape(1, 1)
        row_max = rows.amax(-1, keepdim=True).expand_as(rows).reshape(magnitude.shape)
        eps = max(torch.finfo(a.dtype).eps, 2.0 ** -20) if a.dtype.is_floating_point else 0.0
        allowed = ulps * eps * (magnitude + row_max)
        error = torch.where(finite, (a64 - b64).abs(), 0.0)
        worst = int((error - allowed).argmax())
        if error.flatten()[worst] > allowed.flatten()[worst]:
            return (f"output {index}: differs by {error.flatten()[worst].item():.3g} at element {worst} "
                    f"(allowed {allowed.flatten()[worst].item():.3g})")
    return None


def _status_of(exc: BaseException) -> str:
    name = type(exc).__name__
    kind = "out of resources" if name == "OutOfResources" else "compile error" if name in _TRITON_ERRORS \
        else "error"
    return f"skipped: {kind}: {name}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"


def _tensors(value) -> list[torch.Tensor]:
    values = value if isinstance(value, (tuple, list)) else [value]
    return [t for t in values if isinstance(t, torch.Tensor)]


def _poison(tensors) -> None:
    """NaN into preallocated outputs, so a candidate that leaves part of them unwritten cannot
    pass with the previous candidate's values."""
    for t in tensors:
        if t.is_floating_point():
            t.fill_(float("nan"))


def _refusal(refused, what) -> str | None:
    """Why ``what`` (tiles, a backend) is among ``refused`` [(what, why)], else None."""
    return next((why for refused_what, why in refused if refused_what == what), None)


def sweep_candidates(tunable, device, quick: bool) -> list[dict]:
    """The tiles ``sweep`` times, in order: the current choice (the table's, an override in force,
    or the built-in default), then the tunable's candidates."""
    current = tuning.lookup(tunable.kernel, tunable.key_for(device), tunable.default_for(device), device)
    return [current] + [c for c in tunable.candidates(quick) if c != current]


def sweep(tunable, device, *, quick: bool, deadline: float | None = None, log=print, refused=()) -> dict | None:
    """Measure every candidate of one tunable; return its table entry (without writing it), or
    None when no candidate could be measured (the table keeps what it had). ``refused``:
    [(tiles, why)] not to launch here at all -- a candidate whose launch broke a compile
    worker's CUDA context would break this process's too, and every launch after it."""
    key = tunable.key_for(device)
    results = [{"tiles": tiles} for tiles in sweep_candidates(tunable, device, quick)]
    # Past the budget, not even set up: a full-size set-up allocates the inputs and launches
    # kernels (compiling them here when the precompile did not), seconds for nothing.
    state = None if _spent(deadline) else tunable.setup(device, quick)
    reference, written = None, []
    for record in results:
        tiles = record["tiles"]
        if state is None or _spent(deadline):
            record["status"] = NOT_MEASURED
            continue
        why_refused = _refusal(refused, tiles)
        if why_refused is not None:
            record["status"] = f"rejected: {why_refused}"
            continue
        try:
            with tuning.override(tunable.kernel, key, tiles):
                _poison(written)
                written = _tensors(tunable.run(state))
                outputs = [t.detach().clone() for t in written]
                # The first candidate that runs (the current choice, unless it no longer builds)
                # gives the outputs every other candidate must reproduce.
                why = None if reference is None else same_up_to_rounding(outputs, reference)
                if why is not None:
                    record["status"] = f"rejected: {why}"
                    continue
                reference = outputs if reference is None else reference
                ms = _bench(lambda: tunable.run(state), device)
        except Exception as exc:  # a candidate that does not build or run is reported, never chosen
            record["status"] = _status_of(exc)
            continue
        record.update(status="ok", ms=round(ms, 5), value=round(tunable.value(state, ms), 3))
    results[0]["note"] = "current"
    measured = [r for r in results if r["status"] == "ok"]
    log(format_entry(tunable, key, results))
    if not measured:
        return None
    best = min(measured, key=lambda r: r["ms"])
    best["note"] = ("chosen " + best.get("note", "")).strip()
    return {"tiles": best["tiles"], "shape": state.shape, "metric": tunable.metric, "candidates": results}


def format_entry(tunable, key, results) -> str:
    lines = [f"{tunable.kernel}[{key}]  ({tunable.metric})"]
    for r in results:
        tiles = ", ".join(f"{k}={v}" for k, v in r["tiles"].items())
        figure = f"{r['ms']:9.4f} ms {r['value']:9.2f}" if r["status"] == "ok" else f"  {r['status']}"
        lines.append(f"  {tiles:60s} {figure}  {r.get('note', '')}")
    return "\n".join(lines)


def measure_dispatch(case, device, *, quick: bool, deadline: float | None = None, log=print,
                     refused=()) -> dict | None:
    """Time each implementation ``case`` names for its op at its call; return the dispatch rule
    for the call's shape class (implementations fastest first, every one's status and time), or
    None when none could be measured (the table keeps what it had). ``refused``: [(backend,
    why)] not to run here (as ``sweep``'s)."""
    from .._backend import OPS

    op = OPS[case.op]
    if _spent(deadline):  # not set up either (see sweep); the shape class needs the inputs, so it is not named
        results = [{"backend": backend, "status": NOT_MEASURED} for backend in case.backends]
        log(format_dispatch(case, None, results))
        return None
    state = case.setup(device, quick)
    args = case.args(state)
    dtype = _dtype_of(args)
    when = op.shape_class(*args)
    results, reference = [], None
    for backend in case.backends:
        record = {"backend": backend}
        results.append(record)
        if _spent(deadline):
            record["status"] = NOT_MEASURED
            continue
        why_refused = _refusal(refused, backend)
        if why_refused is not None:
            record["status"] = f"rejected: {why_refused}"
            continue
        impl = op.implementation(backend)
        reason = op.why_not(impl, device, dtype, args)
        if reason:
            record["status"] = f"unavailable: {reason}"
            continue
        try:
            outputs = [t.detach().clone() for t in _tensors(impl.run(*args))]
            # The first implementation that runs (ours, tested against the reference) gives the
            # outputs every other one must reproduce.
            why = None if reference is None else same_up_to_rounding(outputs, reference, IMPLEMENTATION_ULPS)
            if why is not None:
                record["status"] = f"rejected: {why}"
                continue
            reference = outputs if reference is None else reference
            ms = _bench(lambda: impl.run(*args), device)
        except Exception as exc:  # an implementation that fails here is reported, never put first
            record["status"] = _status_of(exc)
            continue
        record.update(status="ok", ms=round(ms, 5), value=round(case.value(state, ms), 3))
    measured = sorted((r for r in results if r["status"] == "ok"), key=lambda r: r["ms"])  # stable: ties keep order
    if measured:
        measured[0]["note"] = "chosen"
    log(format_dispatch(case, when, results))
    if not measured:
        return None
    versions = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    return {"when": when, "order": [r["backend"] for r in measured], "shape": state.shape, "metric": case.metric,
            "candidates": results, "versions": versions}


def format_dispatch(case, when, results) -> str:
    shape = "" if when is None else "[" + ", ".join(f"{k}={v}" for k, v in when.items()) + "]"
    lines = [f"dispatch {case.op}{shape}  ({case.metric})"]
    for r in results:
        figure = f"{r['ms']:9.4f} ms {r['value']:9.2f}" if r["status"] == "ok" else f"  {r['status']}"
        lines.append(f"  {r['backend']:12s} {figure}  {r.get('note', '')}")
    return "\n".join(lines)


def merge_dispatch(section: dict, rules: dict) -> dict:
    """The table's ``dispatch`` section with ``rules`` ({op: [rule, ...]}) in: a new rule replaces
    the one for the same shape class, the op's other rules stay after the new ones (an
    unconditional list of backends, the first tables' form, becomes the last rule)."""
    merged = dict(section)
    for op, new in rules.items():
        existing = merged.get(op, [])
        if existing and all(isinstance(b, str) for b in existing):
            existing = [{"when": {}, "order": existing}]
        classes = [rule["when"] for rule in new]
        merged[op] = list(new) + [rule for rule in existing if rule.get("when") not in classes]
    return dict(sorted(merged.items()))


@contextlib.contextmanager
def _in_force(choices):
    """The choices ``[(kernel, key, tiles)]`` the timing process has made so far, as overrides here."""
    with contextlib.ExitStack() as stack:
        for kernel, key, tiles in choices:
            stack.enter_context(tuning.override(kernel, key, tiles))
        yield


@contextlib.contextmanager
def _reads():
    """The set of the (kernel, key) variants whose tiles the launches inside look up: every
    launcher asks tuning.lookup, directly or through tuning.launch."""
    read: set = set()
    lookup = tuning.lookup

    def recording(kernel, key, default, device):
        read.add((kernel, key))
        return lookup(kernel, key, default, device)

    tuning.lookup = recording
    try:
        yield read
    finally:
        tuning.lookup = lookup


# In a worker: set once a launch left this process's CUDA context broken (an illegal address is
# sticky: every later launch here fails at once). The task that broke it is reported; the worker
# then takes no other (see _launch_once), so the pool is replaced.
_context_broken = False
BROKEN_CONTEXT = "broken CUDA context"
BROKEN_CONTEXT_EXIT = 70  # the exit status of a worker that leaves over a broken context


def _context_error() -> str | None:
    """Why this process's CUDA context cannot run anything any more, or None: after a failed
    launch, a synchronize that fails twice (a sticky error, such as an illegal address, is
    raised again; an asynchronous error that is not sticky is raised once, then cleared)."""
    if not torch.cuda.is_initialized():
        return None
    for _ in range(2):
        try:
            torch.cuda.synchronize()
            return None
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises
            error = exc
    return _status_of(error).split(": ", 2)[-1]


def _launch_once(launch) -> tuple[str, tuple]:
    """Worker: ``launch(device)`` once, so the binaries it builds land in Triton's disk cache and
    the timing process only loads them. Returns ("ok" or why not (the timing process reports it
    again), the variants whose tiles it looked up)."""
    global _context_broken
    if _context_broken:
        # Every launch here would fail at once and take the next task: leave, so that the pool
        # breaks, and compile() gives this task and the others lost with it to fresh workers.
        os._exit(BROKEN_CONTEXT_EXIT)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _reads() as read:
        try:
            why = launch(device)
            _sync(device)
            status = why or "ok"
        except Exception as exc:
            status = _status_of(exc)
            broken = _context_error()
            if broken is not None:
                _context_broken = True
                status = f"skipped: {BROKEN_CONTEXT}: {broken}"
        finally:
            if device.type == "cuda" and not _context_broken:
                # The workers live for the whole run: the blocks their full-size inputs leave
                # cached would hold GPU memory the timing process needs.
                torch.cuda.empty_cache()
    return status, tuple(sorted(read))


def _precompile_one(family: str, index: int, tiles: dict, quick: bool, choices=()) -> tuple[str, tuple]:
    """Worker: launch the family's ``index``-th tunable with ``tiles``, the ``choices`` made
    before it in force (as the sweep will)."""
    from . import tune_cases

    def launch(device):
        tunable = tune_cases.tunables([family])[index]
        with _in_force(choices):
            state = tunable.setup(device, quick)
            with tuning.override(tunable.kernel, tunable.key_for(device), tiles):
                tunable.run(state)

    return _launch_once(launch)


def _precompile_dispatch(family: str, index: int, backend: str, quick: bool, choices=()) -> tuple[str, tuple]:
    """Worker: run implementation ``backend`` of the family's ``index``-th dispatch case at its
    call, the family's tiles ``choices`` in force (as measure_dispatch will)."""
    from .._backend import OPS
    from . import tune_cases

    def launch(device):
        case = tune_cases.dispatch_cases([family])[index]
        op = OPS[case.op]
        with _in_force(choices):
            args = case.args(case.setup(device, quick))
            impl = op.implementation(backend)
            reason = op.why_not(impl, device, _dtype_of(args), args)
            if reason:
                return f"unavailable: {reason}"
            impl.run(*args)
        return None

    return _launch_once(launch)


def _dtype_of(args) -> torch.dtype:
    return next(a.dtype for a in args if isinstance(a, torch.Tensor))


class Compiler:
    """The ``--jobs`` processes that build what the timing process will launch, before it times
    anything (Triton compiles on one core; the workers also launch once, on the GPU, so they
    never run while something is timed). Started at the first family and kept for the run:
    starting them (spawn, import torch, a CUDA context) cost seconds per family."""

    def __init__(self, jobs: int, make_pool=None):
        self._make_pool = make_pool or (
            lambda: ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")))
        self._pool = None
        self._unfinished: list = []

    def compile(self, tasks, deadline: float | None = None) -> list:
        """Run ``tasks`` ([(worker function, args)]) in the workers and wait for them, at most
        until ``deadline``: nothing is timed after it, so what has not started then is cancelled.
        Returns each task's result, None for one that did not finish. Tasks lost to a worker
        that died (a crash, the OOM killer, one leaving over a broken CUDA context) are given
        once to fresh workers; the timing process compiles what is still lost."""
        results: list = [None] * len(tasks)
        todo = list(range(len(tasks)))
        for attempt in range(2):
            if not todo or (attempt and _spent(deadline)):  # (the caller checked the budget before the first)
                break
            futures = self._submit([tasks[i] for i in todo])
            if futures is None:
                break
            timeout = None if deadline is None else max(0.0, deadline - _clock())
            done, pending = concurrent.futures.wait(futures, timeout=timeout)
            for future in pending:
                future.cancel()
            self._unfinished.extend(f for f in pending if not f.done())
            lost = []
            for i, future in zip(todo, futures):
                if future not in done or future.cancelled():
                    continue
                if future.exception() is None:
                    results[i] = future.result()
                elif isinstance(future.exception(), BrokenProcessPool):
                    lost.append(i)
            broken = any(_broke_context(results[i]) for i in todo)
            if lost or broken:
                # A worker died, or one has a broken context (idle now: it would take a task of
                # the next compile and leave): the next tasks go to new workers.
                self.close()
            todo = lost
        return results

    def _submit(self, tasks) -> list | None:
        """The futures of ``tasks`` in the pool (started if need be), or None when no pool takes
        them: one whose worker died while idle refuses new tasks, and so may a fresh one whose
        processes cannot start (out of memory); one retry with a new pool."""
        for _attempt in range(2):
            try:
                if self._pool is None:
                    self._pool = self._make_pool()
                return [self._pool.submit(function, *args) for function, args in tasks]
            except (BrokenProcessPool, RuntimeError, OSError):
                self.close()
        return None

    def close(self) -> None:
        """End the workers. One still compiling when the budget was spent is stopped, not waited
        for: what it builds would never be timed; one that does not leave in 5 s is killed."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        running = any(not f.done() for f in self._unfinished)
        self._unfinished = []
        # Python 3.11 names no way to stop a busy worker but its processes (3.14 has terminate_workers).
        processes = list((getattr(pool, "_processes", None) or {}).values())
        with contextlib.suppress(Exception):  # a broken pool may fail its own shutdown
            pool.shutdown(wait=False, cancel_futures=True)
        if running:
            for process in processes:
                process.terminate()
        until = time.monotonic() + 5  # 5 s for them all, not each: a dozen stuck workers
        for process in processes:
            process.join(max(0.0, until - time.monotonic()))
        for process in processes:
            if process.exitcode is None:
                process.kill()
                process.join(5)


def _broke_context(result) -> bool:
    """Whether a worker's (status, read) result says its launch broke the worker's CUDA context."""
    return isinstance(result, tuple) and str(result[0]).startswith(f"skipped: {BROKEN_CONTEXT}")


def device_arch(device) -> str:
    return tuning.device_arch(device) or device.type


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def write_table(path: Path, device, entries: dict, argv, dispatch: dict | None = None) -> dict:
    """Merge ``entries`` ({kernel: {key: entry}}) and ``dispatch`` rules ({op: [rule, ...]}) into
    the table at ``path`` and write it."""
    import triton

    data = json.loads(path.read_text()) if path.exists() else {}
    kernels = data.get("kernels", {})
    for kernel, by_key in entries.items():
        kernels.setdefault(kernel, {}).update(by_key)
    if dispatch:
        data["dispatch"] = merge_dispatch(data.get("dispatch", {}), dispatch)
    version = tuning.triton_version()
    data.update({
        "format": tuning.FORMAT, "arch": device_arch(device), "triton": f"{version[0]}.{version[1]}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton_version": triton.__version__,
        "date": datetime.date.today().isoformat(), "git_commit": _git_commit(),
        "source": "python -m docqa_fast.tools.tune " + " ".join(argv),
        "kernels": {k: dict(sorted(v.items())) for k, v in sorted(kernels.items())},
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and moved in one step: a run stopped mid-write must not leave the table
    # every launch reads half written.
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)
    return data


def run(families, *, quick: bool, out: Path, jobs: int, budget: float | None, argv=(), log=print,
        compiler: Compiler | None = None) -> Path:
    from . import tune_cases

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deadline = _clock() + budget if budget else None
    path = out / tuning.table_name(device_arch(device), tuning.triton_version())
    entries: dict[str, dict] = {}
    dispatch: dict[str, list] = {}
    if compiler is None and device.type == "cuda" and jobs > 1:  # the interpreter compiles nothing
        compiler = Compiler(jobs)
    written = False
    try:
        for family in families:
            if _spent(deadline):
                log(f"[{family}] not tuned: time budget spent")
                continue
            context_broken = None
            try:
                _tune_family(family, device, quick=quick, deadline=deadline, compiler=compiler,
                             entries=entries, dispatch=dispatch, log=log)
            except Exception as exc:  # noqa: BLE001 - one GPU lease per run: the other families go on
                # A set-up (or a dispatched call's) that fails here, e.g. on a CUDA context a launch
                # broke: the family ends, what it measured before stays, the rest keeps its entries.
                log(f"[{family}] ended early: {_status_of(exc).removeprefix('skipped: ')}")
                context_broken = _context_error()
            if entries or dispatch:
                # After every family: a cut-short run keeps what it measured.
                write_table(path, device, entries, argv, dispatch)
                written = True
            if context_broken is not None:  # every later set-up and launch here would fail too
                log(f"this process's CUDA context is broken ({context_broken}): no other family is tuned")
                break
    finally:
        if compiler is not None:
            compiler.close()
    tuning.reload()
    if written:
        log(f"wrote {path}")
    return path


def _tune_family(family, device, *, quick, deadline, compiler, entries, dispatch, log) -> None:
    """Sweep the family's tunables in order, each with the choices made before it in force, then
    time its dispatched calls with all of them in force; entries and rules go into ``entries``
    and ``dispatch``."""
    from . import tune_cases

    tunables = tune_cases.tunables([family])
    cases = tune_cases.dispatch_cases([family])
    # (a dispatched call's?, index, tiles or backend, why): launches that broke a worker's CUDA context
    refused: list = []

    def compile_ahead(tasks, what) -> list:
        if compiler is None or not tasks or _spent(deadline):
            return [None] * len(tasks)
        started = _clock()
        results = compiler.compile(tasks, deadline)
        done = sum(r is not None and r[0] == "ok" for r in results)  # a failed launch compiled nothing usable
        count = f"{done}" if done == len(tasks) else f"{done} of {len(tasks)}"
        log(f"[{family}] compiled {count} {what} in {_clock() - started:.0f} s")
        for result, (function, args) in zip(results, tasks):
            if _broke_context(result):  # (index, tiles or backend): not to be launched here
                why = f"{result[0].removeprefix('skipped: ')} (in a compile worker)"
                refused.append((function is _precompile_dispatch, args[1], args[2], why))
        return results

    def looked_up(results) -> set | None:
        # None (read everything, to be safe) when a launch did not report or failed: what a
        # failed launch looked up stops where it failed.
        if any(r is None or (r[0] != "ok" and not r[0].startswith("unavailable")) for r in results):
            return None
        return {variant for _, read in results for variant in read}

    def refused_at(index, dispatched=False) -> list:
        return [(what, why) for is_call, at, what, why in refused if (is_call, at) == (dispatched, index)]

    def stale(read) -> bool:
        """Whether launches that looked up ``read`` under the current choices launch something
        else now: they are a program of the tiles they look up, so only if a changed choice is
        among those (dQ's timing after new dK/dV tiles; not the ViT kernels after the LLM's)."""
        return bool(changed) and (read is None or bool(changed & read))

    def dispatch_tasks(choices):
        return [(_precompile_dispatch, (family, index, backend, quick, tuple(choices)))
                for index, case in enumerate(cases) for backend in case.backends if backend in PRECOMPILED_BACKENDS]

    def candidate_tasks(index, choices):
        return [(_precompile_one, (family, index, tiles, quick, tuple(choices)))
                for tiles in sweep_candidates(tunables[index], device, quick)]

    # Everything the family launches with the current choices, the dispatched calls first: each
    # is a chain of kernels (the non-causal forward and backward are no tunable's), the longest tasks.
    calls = dispatch_tasks(())
    per_tunable = [candidate_tasks(index, ()) for index in range(len(tunables))]
    candidates = [task for tasks in per_tunable for task in tasks]
    results = compile_ahead(calls + candidates,
                            f"launches ({len(candidates)} candidates, {len(calls)} dispatched calls)")
    calls_read = looked_up(results[:len(calls)])
    reads, start = [], len(calls)
    for tasks in per_tunable:
        reads.append(looked_up(results[start:start + len(tasks)]))
        start += len(tasks)
    with contextlib.ExitStack() as in_force:  # each choice stays in force for the family's next variants
        choices = []
        changed = set()  # the variants chosen unlike their current tiles
        for index, tunable in enumerate(tunables):
            if stale(reads[index]):
                compile_ahead(candidate_tasks(index, choices), f"candidates of {tunable.kernel}"
                              f"[{tunable.key_for(device)}] with the choices made")
            entry = sweep(tunable, device, quick=quick, deadline=deadline, log=log, refused=refused_at(index))
            if entry is None:
                continue
            key = tunable.key_for(device)
            entries.setdefault(tunable.kernel, {})[key] = entry
            in_force.enter_context(tuning.override(tunable.kernel, key, entry["tiles"]))
            choices.append((tunable.kernel, key, entry["tiles"]))
            if entry["tiles"] != entry["candidates"][0]["tiles"]:
                changed.add((tunable.kernel, key))
        # Our kernels against the other implementations, with the tiles just chosen in force.
        if stale(calls_read):
            compile_ahead(dispatch_tasks(choices), "dispatched calls with the choices made")
        for index, case in enumerate(cases):
            rule = measure_dispatch(case, device, quick=quick, deadline=deadline, log=log,
                                    refused=refused_at(index, dispatched=True))
            if rule is not None:
                dispatch.setdefault(case.op, []).append(rule)


def main(argv=None) -> int:
    from . import tune_cases

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m docqa_fast.tools.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=tune_cases.FAMILIES,
                        help="tune only this family (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and the first few candidates")
    parser.add_argument("--out", type=Path, default=tuning.TUNED_DIR,
                        help="folder of the tables (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes compiling the candidates and dispatched calls before the timing "
                             "(GPU only; 1: the timing process compiles them)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which no candidate is set up, compiled or timed")
    args = parser.parse_args(argv)
    run(args.family or list(tune_cases.FAMILIES), quick=args.quick, out=args.out, jobs=args.jobs,
        budget=args.budget, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

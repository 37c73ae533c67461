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
tiles just chosen). ``--jobs`` compiles candidates in parallel processes first (Triton's disk
cache then serves the timing process), which is what keeps the attention sweep inside its
3-minute share of a GPU run.

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
from pathlib import Path

import torch

from ..kernels import tuning

_TRITON_ERRORS = ("OutOfResources", "PTXASError", "CompilationError")


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


def sweep(tunable, device, *, quick: bool, deadline: float | None = None, log=print) -> dict | None:
    """Measure every candidate of one tunable; return its table entry (without writing it), or
    None when no candidate could be measured (the table keeps what it had)."""
    state = tunable.setup(device, quick)
    key = tunable.key_for(device)
    current = tuning.lookup(tunable.kernel, key, tunable.default_for(device), device)
    candidates = [current] + [c for c in tunable.candidates(quick) if c != current]
    results, reference, written = [], None, []
    for tiles in candidates:
        record = {"tiles": tiles}
        results.append(record)
        if deadline is not None and time.monotonic() > deadline:
            record["status"] = "not measured: time budget spent"
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


def measure_dispatch(case, device, *, quick: bool, deadline: float | None = None, log=print) -> dict | None:
    """Time each implementation ``case`` names for its op at its call; return the dispatch rule
    for the call's shape class (implementations fastest first, every one's status and time), or
    None when none could be measured (the table keeps what it had)."""
    from .._backend import OPS

    op = OPS[case.op]
    state = case.setup(device, quick)
    args = case.args(state)
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
    when = op.shape_class(*args)
    results, reference = [], None
    for backend in case.backends:
        record = {"backend": backend}
        results.append(record)
        if deadline is not None and time.monotonic() > deadline:
            record["status"] = "not measured: time budget spent"
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
    shape = ", ".join(f"{k}={v}" for k, v in when.items())
    lines = [f"dispatch {case.op}[{shape}]  ({case.metric})"]
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


def _precompile_one(family: str, index: int, tiles: dict, quick: bool) -> str:
    """Worker: build and launch one candidate once, so its binary lands in Triton's disk cache."""
    from . import tune_cases

    tunable = tune_cases.tunables([family])[index]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        state = tunable.setup(device, quick)
        with tuning.override(tunable.kernel, tunable.key_for(device), tiles):
            tunable.run(state)
        _sync(device)
        return "ok"
    except Exception as exc:
        return _status_of(exc)


def precompile(family: str, tunables, quick: bool, jobs: int) -> None:
    """Compile every candidate of a family in ``jobs`` processes (Triton compiles on one core)."""
    work = [(family, i, tiles, quick) for i, t in enumerate(tunables) for tiles in t.candidates(quick)]
    if jobs <= 1 or not work:
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_precompile_one, *zip(*work)))


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


def run(families, *, quick: bool, out: Path, jobs: int, budget: float | None, argv=(), log=print) -> Path:
    from . import tune_cases

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deadline = time.monotonic() + budget if budget else None
    path = out / tuning.table_name(device_arch(device), tuning.triton_version())
    entries: dict[str, dict] = {}
    dispatch: dict[str, list] = {}
    for family in families:
        if deadline is not None and time.monotonic() > deadline:
            log(f"[{family}] not tuned: time budget spent")
            continue
        tunables = tune_cases.tunables([family])
        if device.type == "cuda":
            started = time.monotonic()
            precompile(family, tunables, quick, jobs)
            log(f"[{family}] compiled {sum(len(t.candidates(quick)) for t in tunables)} candidates "
                f"in {time.monotonic() - started:.0f} s")
        with contextlib.ExitStack() as chosen:  # each choice stays in force for the family's next variants
            for tunable in tunables:
                entry = sweep(tunable, device, quick=quick, deadline=deadline, log=log)
                if entry is None:
                    continue
                key = tunable.key_for(device)
                entries.setdefault(tunable.kernel, {})[key] = entry
                chosen.enter_context(tuning.override(tunable.kernel, key, entry["tiles"]))
            # Our kernels against the other implementations, with the tiles just chosen in force.
            for case in tune_cases.dispatch_cases([family]):
                rule = measure_dispatch(case, device, quick=quick, deadline=deadline, log=log)
                if rule is not None:
                    dispatch.setdefault(case.op, []).append(rule)
        if entries or dispatch:
            # After every family: a cut-short run keeps what it measured.
            write_table(path, device, entries, argv, dispatch)
    tuning.reload()
    log(f"wrote {path}")
    return path


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
                        help="processes compiling candidates before the timing (GPU only)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which remaining candidates are left unmeasured")
    args = parser.parse_args(argv)
    run(args.family or list(tune_cases.FAMILIES), quick=args.quick, out=args.out, jobs=args.jobs,
        budget=args.budget, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One short GPU run: the tuning sweep, the headline benchmarks, the test suite; run by ``make gpu``.

``python -m docqa_fast.tools.gpu_run --out DIR`` (after ``make install`` built the extension for
this GPU). GPU time is lent in short slices (about 15 minutes with the machine's start), so
the run is sized to stay under 10 minutes and to bring back everything in at most 8 files:

=====================  ===================================================================
``tune.log``           ``python -m docqa_fast.tools.tune``: every candidate's time
``<arch>-triton*.json`` the tuned table the sweep wrote (commit it to ``kernels/tuned/``)
``bench.log``          the headline benchmark cases, each beside its peers
``bench_results.json`` their raw figures; ``bench_summary.md`` the tables
``tests.log``          ``pytest tests -v -n 8 --timeout 150`` with the new table (GPU tensors, bf16,
                       every backend; not the sm_90 compile of every config, which CI runs on CPU)
``bench_files.tgz``    the headline plots, and ``extra/<case>/`` per extra case measured with the
                       time left (its log, results.json, summary.md, plots)
``summary.md``         the short table printed last
=====================  ===================================================================

Each step has its own time limit and the run one in all (:data:`RUN_SECONDS`); a step that
fails or runs out of time is reported and the next one still runs. Steps that end early leave
their time to the later ones (up to :data:`MOST`), and what is left at the end to the extra
benchmark cases (:data:`EXTRA_CASES`), each in a process of its own so that one cut short loses
only itself. ``--dry-run`` prints the plan (steps, limits, the sweep's families and candidate
counts, the benchmark cases the filters select) and runs nothing; it needs no GPU. Peers the
machine lacks (liger-kernel, cut-cross-entropy) travel as wheels in ``.whl/`` (docs/gpu_run.md)
and are installed to a private folder first. Every temporary folder goes when the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_clock = time.monotonic  # the run's clock (a test replaces it)
# The cases a GPU run always measures: LLM attention forward and backward at 16K (H 28/4, D 128,
# causal), the ViT shape, decode over 128K contiguous and paged, the Qwen head's fused
# cross-entropy, and the ring-attention merge.
HEADLINE_CASES = ("attention/llm28x4-causal-fwd-S16384", "attention/llm28x4-causal-bwd-S16384",
                  "attention/vit-fwd_bwd-8x4800", "inference/decode-contiguous-H28x4-B1-ctx131072",
                  "inference/decode-paged256-H28x4-B1-ctx131072", "losses/ce_qwen_fwdbwd-N8192",
                  "merge_attention/ring_pair-S131072")
# Measured after the headline cases while the run's time lasts, in this order (one benchmark
# process each, at most EXTRA_LIMIT seconds; a process stopped at its limit writes no results,
# so the cheap ones come first): the packing copy with pixel values and grids in the same
# launch and reward scoring at 64 pairs x 8K packed (issue 21: never timed on a GPU; the
# latter asked for 84 GiB before), the cross-entropy at 32K tokens (issue 15's second size;
# ~70 s with its reference and peers), the merge forward + backward at 128K and
# get_rope_index on a 100-page document (issue 21).
EXTRA_CASES = ("packing/pack_copy-docs8-pages12", "reward/fwd_bwd-packed-pairs64-S8192-K8",
               "losses/ce_qwen_fwdbwd-N32768", "packing/merge_fwd_bwd-T131072", "packing/rope_index-B1-pages100")
# The steps in order, each with the seconds it may count on: 200 + 120 + 180 = RUN_SECONDS, all
# the run may take (the peers' wheels included), plus the build before it (44 s on the H200's 16
# cores): under the 600 s a device command may run, with room for a slower build. A step may
# also use what the steps before it left unused, up to MOST, keeping the later steps' own
# limits free; what is left after the tests goes to the extra cases. The sweep comes first
# (the measurements are what a lease is for; the benchmarks and the tests then run with the
# table it wrote, so the tests check the new tiles and dispatch rules on the GPU), and stops at
# TUNE_BUDGET: after it nothing is compiled, set up or timed, so what follows is the measurement
# in flight, the table's write and the end of the workers, with the process's start before
# its clock (imports): ~15 s of the 30 s margin. The headline cases took 76 s before the dispatched ("auto") attention rows,
# ViT's dense twins, the losses' three route rows and decode's unchecked and CUDA-graph rows
# (~+30-50 s). The tests took 145 s there for 1,330 tests; the suite has 1,868 now, so they may
# need the 240 s: -v names each test as it ends, so a suite stopped at its limit still says
# which failed.
LIMITS = {"tune": 200, "bench": 120, "tests": 180}
MOST = {"tune": 200, "bench": 170, "tests": 240}
RUN_SECONDS = 500
TUNE_BUDGET = 170  # the sweep starts nothing new after this, then writes what it has
EXTRA_LIMIT = 90  # one extra case's most (the 32K cross-entropy with its peers: ~70 s)
EXTRA_MIN = 30  # an extra case starts only with this much of the run left
# Compiling every registered config for sm_90 needs no GPU and runs on every CPU machine (CI):
# on a fresh GPU machine, with cold caches, it would take a minute of the tests' 180 s, while
# the GPU tests compile and run the kernels for real.
HOPPER_COMPILE_TEST = "tests/test_hopper_compile.py::test_every_config_compiles_clean_for_hopper"


def _run(command, log: Path, limit: float, env) -> tuple[str, float]:
    """Run ``command`` with its output in ``log``; (status, seconds). The whole process group is
    killed at the limit, so a hung test cannot eat the rest of the run, and when the step ends."""
    started = time.monotonic()
    with log.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=limit)
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            status = f"stopped at its {limit:.0f} s limit"
        # The group at the limit, and after a step that ended too: a worker that outlived it
        # would share the GPU and the cores with the next step.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if status.startswith("stopped"):
            out.write(f"\n[gpu_run] {status}\n")
    return status, time.monotonic() - started


def step_limit(step: str, deadline: float, later=(), now: float | None = None) -> float:
    """Seconds ``step`` may run: what is left of the run less the limits of the ``later`` steps,
    at most MOST[step]."""
    left = deadline - (_clock() if now is None else now)
    return max(1.0, min(MOST[step], left - sum(LIMITS[s] for s in later)))


def extra_plan(deadline: float, now: float | None = None) -> tuple[float | None, str]:
    """(seconds the next extra case may run, or None with why it does not start)."""
    left = deadline - (_clock() if now is None else now)
    if left < EXTRA_MIN:
        return None, f"not run: {max(left, 0):.0f} s of the run left (an extra case starts with {EXTRA_MIN} s)"
    return min(EXTRA_LIMIT, left), ""


def install_wheels(env, folder: Path) -> str:
    """pip-install ``.whl/*.whl`` (no network there) into ``folder``, put on PYTHONPATH."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return "no .whl/ folder: peers not installed on this machine are skipped"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(folder), *map(str, wheels)], capture_output=True, text=True)
    if done.returncode != 0:  # the run goes on: those peers' rows say they are not installed
        return f"installing .whl/ failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return f"installed {len(wheels)} wheels from .whl/: {', '.join(w.name.split('-')[0] for w in wheels)}"


_OUTCOME = re.compile(r"^(?:\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)"
                      r"|(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS))")


def _test_summary(log: Path) -> str:
    """pytest's last summary line; for a run stopped before it, the outcomes -v printed so far
    and the tests that failed."""
    text = log.read_text(errors="replace").splitlines()
    lines = [line for line in text if re.search(r"\d+ (passed|failed).* in [\d.]+s", line)]
    if lines:
        return lines[-1].strip("= ")
    outcomes: dict[str, list[str]] = {}
    for line in text:
        match = _OUTCOME.match(line)
        if match:
            outcome = match.group(1) or match.group(4)
            outcomes.setdefault(outcome, []).append(match.group(2) or match.group(3))
    if not outcomes:
        return "no pytest summary (see tests.log)"
    counts = ", ".join(f"{len(ids)} {outcome.lower()}" for outcome, ids in sorted(outcomes.items()))
    failed = outcomes.get("FAILED", []) + outcomes.get("ERROR", [])
    return f"no pytest summary; so far {counts}" + (f" ({', '.join(failed[:10])})" if failed else "")


def _tuned_rows(table: Path, before: dict) -> list[str]:
    rows = []
    for kernel, entries in json.loads(table.read_text())["kernels"].items():
        for key, entry in entries.items():
            chosen = next((c for c in entry["candidates"] if c.get("note", "").startswith("chosen")), None)
            current = next((c for c in entry["candidates"] if "current" in c.get("note", "")), None)
            if chosen is None or "ms" not in chosen:
                continue
            figure = lambda c: f"{c['value']} ({c['ms']:.3f} ms)" if c and "ms" in c else "-"  # noqa: E731
            tiles = lambda t: ",".join(str(v) for v in t.values())  # noqa: E731
            old = before.get(kernel, {}).get(key)
            rows.append(f"| {kernel}[{key}] | {tiles(old) if old else '-'} -> {tiles(chosen['tiles'])} | "
                        f"{figure(current)} -> {figure(chosen)} {entry['metric'].split(' of ')[0]} |")
    return rows


def _bench_rows(results: Path) -> list[str]:
    rows = []
    for case in json.loads(results.read_text())["cases"]:
        timed = [p for p in case["providers"] if p.get("status") == "ok" and p.get("rate")]
        ours = [p for p in timed if p["ours"]]
        peers = [p for p in timed if not p["ours"]]
        best_ours = max(ours, key=lambda p: p["rate"], default=None)
        best_peer = max(peers, key=lambda p: p["rate"], default=None)
        speedup = f"{best_ours['rate'] / best_peer['rate']:.2f}x" if best_ours and best_peer else "-"
        show = lambda p: f"{p['provider']} {p['rate']:.1f}" if p else "-"  # noqa: E731
        # The case's wall time (set-up and checks included), where the harness records it:
        # what sizes the next run's benchmark steps.
        wall = f"{case['wall_s']:.0f}" if isinstance(case.get("wall_s"), (int, float)) else "-"
        rows.append(f"| {case['case']} | {show(best_ours)} | {show(best_peer)} | {speedup} | {case['metric']} | "
                    f"{wall} |")
    return rows


def _read_rows(read, path: Path, *args) -> tuple[list[str], str]:
    """(``read(path, *args)``'s table rows, "" ) or (no rows, why): a file a step stopped at its
    limit left half written (``python -m benchmarks`` rewrites results.json after every case, not
    in one step) must cost its rows, never the later steps."""
    try:
        return read(path, *args), ""
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [], f" ({path.name} unreadable: {type(exc).__name__}: {str(exc)[:120]})"


def _case_slug(case: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", case)


def _bench_command(cases, out: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks", "--filter", ",".join(cases), "--no-hopper-report", "--out", str(out)]


def _pytest_command() -> list[str]:
    # The plugins the suite does not use are left out as make test does (Makefile: PYTEST);
    # -v names each test as it ends (see _test_summary); --durations says which tests take the
    # GPU minutes.
    return [sys.executable, "-m", "pytest", "tests", "-v", "-rs", "-p", "no:cacheprovider", "-p", "no:benchmark",
            "-p", "no:hypothesispytest", "-p", "no:anyio", "--durations=15", "--deselect", HOPPER_COMPILE_TEST,
            *_pytest_speedups()]


def _tune_command() -> list[str]:
    return [sys.executable, "-m", "docqa_fast.tools.tune", "--budget", str(TUNE_BUDGET), "--jobs", "12"]


def dry_run() -> str:
    """The plan of a run, without running it (no GPU needed): the steps and their limits, the
    sweep's families in order with their candidate counts, the benchmark cases the filters select."""
    import torch

    from benchmarks import harness

    from . import tune_cases

    lines = [f"gpu_run plan: at most {RUN_SECONDS} s after the build; steps in order, each with the seconds it "
             f"counts on (and at most, with what earlier steps left)", "",
             f"tune   {LIMITS['tune']:3d} s ({MOST['tune']})  $ {' '.join(_tune_command()[1:])}  (new candidates "
             f"until {TUNE_BUDGET} s; families in this order)"]
    for family in tune_cases.FAMILIES:
        cuda = torch.device("cuda")  # the keys a GPU run writes (a device object needs no GPU)
        counts = [f"{t.kernel}[{t.key_for(cuda)}] {len(t.candidates(False))}" for t in tune_cases.tunables([family])]
        cases = tune_cases.dispatch_cases([family])
        if cases:
            counts.append(f"dispatch {len(cases)} calls x {len(cases[0].backends)} implementations")
        lines.append(f"         {family}: {', '.join(counts)}")

    def providers(case):
        return f"{case.id}: {', '.join(p.name for p in case.providers)}"

    headline = harness.collect_cases(quick=False, filter=",".join(HEADLINE_CASES))
    lines.append(f"bench  {LIMITS['bench']:3d} s ({MOST['bench']})  {len(headline)} headline cases, each with its "
                 f"providers:")
    lines += [f"         {providers(case)}" for case in headline]
    lines.append(f"tests  {LIMITS['tests']:3d} s ({MOST['tests']})  $ {' '.join(_pytest_command()[1:])}")
    lines.append(f"extra  <= {EXTRA_LIMIT} s each, in this order, while {EXTRA_MIN} s of the run are left:")
    for name in EXTRA_CASES:
        selected = harness.collect_cases(quick=False, filter=name)
        lines.append(f"         {'; '.join(map(providers, selected)) or name + ': NO CASE MATCHES'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docqa_fast.tools.gpu_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the (at most 8) files to bring back")
    parser.add_argument("--skip", action="append", default=[], choices=sorted(LIMITS) + ["extra"],
                        help="leave a step out")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and run nothing (no GPU needed)")
    args = parser.parse_args(argv)
    if args.dry_run:
        print(dry_run())
        return 0
    if args.out is None:
        parser.error("--out is required (unless --dry-run)")

    import torch

    if not torch.cuda.is_available():
        print("gpu_run needs a CUDA device", file=sys.stderr)
        return 2
    deadline = _clock() + RUN_SECONDS
    # Every temporary folder (the peers' wheels, each benchmark run's output) lives in this one
    # and goes with it, a run cut short by an exception too.
    with tempfile.TemporaryDirectory(prefix="docqa_fast_gpu_run_") as work:
        return _steps(args, Path(work), deadline)


def _steps(args, work: Path, deadline: float) -> int:
    import torch

    from ..kernels import tuning

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines = ["# GPU run", "", install_wheels(env, work / "peers"), ""]
    steps = ["| step | result | seconds |", "|---|---|---|"]
    device = torch.device("cuda")
    arch = tuning.device_arch(device)
    table_path = tuning.TUNED_DIR / tuning.table_name(arch, tuning.triton_version())
    previous = tuning.load_table(str(table_path)) if table_path.exists() else {}
    import triton

    lines.insert(1, f"{torch.cuda.get_device_name(device)} ({arch}), torch {torch.__version__}, "
                    f"Triton {triton.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")

    tuned, bench = [], []

    def summarise():
        # Written after every step: a run cut short still brings back what it did.
        tables = []
        if tuned:
            tables += ["", "| tuned variant | tiles before -> chosen | current -> chosen |", "|---|---|---|", *tuned]
        if bench:
            tables += ["", "| case | ours (best backend) | best peer | ours / peer | unit | case s |",
                       "|---|---|---|---|---|---|", *bench]
        text = "\n".join(lines + steps + tables) + "\n"
        (out / "summary.md").write_text(text)
        return text

    todo = [step for step in LIMITS if step not in args.skip]

    def limit(step):
        return step_limit(step, deadline, todo[todo.index(step) + 1:])

    if "tune" in todo:
        status, seconds = _run(_tune_command(), out / "tune.log", limit("tune"), env)
        if table_path.exists():
            shutil.copy(table_path, out / table_path.name)
            rows, why = _read_rows(_tuned_rows, table_path, previous)
            tuned += rows
            status += why
        steps.append(f"| tune | {status}: {len(tuned)} variants measured -> {table_path.name} | {seconds:.0f} |")
        summarise()
    files = work / "files"  # what bench_files.tgz holds
    files.mkdir()

    def pack():
        # Rewritten after each benchmark process, like summary.md.
        with tarfile.open(out / "bench_files.tgz", "w:gz") as tar:
            for path in sorted(files.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(files)))

    if "bench" in todo:
        bench_dir = work / "bench"
        bench_dir.mkdir()
        status, seconds = _run(_bench_command(HEADLINE_CASES, bench_dir), out / "bench.log", limit("bench"), env)
        if (bench_dir / "results.json").exists():
            shutil.copy(bench_dir / "results.json", out / "bench_results.json")
            # A run stopped at its limit has results.json (rewritten after every case) but no
            # summary.md or plots yet (written once all its cases are done).
            if (bench_dir / "summary.md").exists():
                shutil.copy(bench_dir / "summary.md", out / "bench_summary.md")
            for plot in bench_dir.glob("*.png"):
                shutil.copy(plot, files / plot.name)
            rows, why = _read_rows(_bench_rows, bench_dir / "results.json")
            bench += rows
            status += why
            pack()
        steps.append(f"| bench | {status}: {len(bench)} headline cases | {seconds:.0f} |")
        summarise()
    if "tests" in todo:
        status, seconds = _run(_pytest_command(), out / "tests.log", limit("tests"), env)
        steps.append(f"| tests | {status}: {_test_summary(out / 'tests.log')} | {seconds:.0f} |")
        summarise()
    if "extra" not in args.skip:
        for case in EXTRA_CASES:
            seconds_left, why = extra_plan(deadline)
            if seconds_left is None:
                steps.append(f"| extra {case} | {why} | 0 |")
                continue
            case_dir = files / "extra" / _case_slug(case)
            case_dir.mkdir(parents=True)
            status, seconds = _run(_bench_command([case], case_dir), case_dir / "bench.log", seconds_left, env)
            rows, why = _read_rows(_bench_rows, case_dir / "results.json") if (case_dir / "results.json").exists() \
                else ([], "")
            bench += rows
            status += why
            steps.append(f"| extra {case} | {status}: {len(rows)} case | {seconds:.0f} |")
            pack()
            summarise()

    print(summarise())
    return 0


def _pytest_speedups() -> list[str]:
    """Parallel workers and a per-test limit where the plugins are installed (the GPU machine
    has pytest-xdist and pytest-timeout; a run elsewhere goes on without them)."""
    import importlib.util

    args = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    return args + (["--timeout", "150"] if importlib.util.find_spec("pytest_timeout") else [])


if __name__ == "__main__":
    raise SystemExit(main())

"""One short GPU run: the test suite, the tuning sweep, the headline benchmarks; run by ``make gpu``.

``python -m docqa_fast.tools.gpu_run --out DIR`` (after ``make install`` built the extension for
this GPU). GPU time is lent in short slices (about 15 minutes with the machine's start), so
the run is sized to stay under 10 minutes and to bring back everything in at most 8 files:

=====================  ===================================================================
``tests.log``          ``pytest tests -n 8 --timeout 150`` (GPU tensors, bf16, every backend; not
                       the sm_90 compile of every config, which CI runs on CPU)
``tune.log``           ``python -m docqa_fast.tools.tune``: every candidate's time
``<arch>-triton*.json`` the tuned table the sweep wrote (commit it to ``kernels/tuned/``)
``bench.log``          the headline benchmark cases, each beside its peers
``bench_results.json`` their raw figures; ``bench_summary.md`` the tables;
``bench_plots.tgz``    the plots (commit the three to ``benchmarks/results/<device>/``)
``summary.md``         the short table printed last
=====================  ===================================================================

Each step has its own time limit; a step that fails or runs out of time is reported and the
next one still runs. Peers the machine lacks (liger-kernel, cut-cross-entropy) travel as
wheels in ``.whl/`` (README: Running on a GPU) and are installed to a private folder first.
"""

from __future__ import annotations

import argparse
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
# The cases a GPU run always measures: LLM attention forward and backward at 16K (H 28/4, D 128,
# causal), the ViT shape, decode over 128K contiguous and paged, the Qwen head's fused
# cross-entropy, and the ring-attention merge.
HEADLINE_CASES = ("attention/llm28x4-causal-fwd-S16384", "attention/llm28x4-causal-bwd-S16384",
                  "attention/vit-fwd_bwd-8x4800", "inference/decode-contiguous-H28x4-B1-ctx131072",
                  "inference/decode-paged256-H28x4-B1-ctx131072", "losses/ce_qwen_fwdbwd-N8192",
                  "merge_attention/ring_pair-S131072")
# Seconds per step: 180 + 210 + 110 = 500, plus the build before it (44 s on the H200's 16 cores):
# under the 600 s a device command may run, with room for the wheels and a slow start.
LIMITS = {"tests": 180, "tune": 210, "bench": 110}
TUNE_BUDGET = 150  # the sweep stops timing new candidates after this, then writes what it has
# Compiling every registered config for sm_90 needs no GPU and runs on every CPU machine (CI):
# on a fresh GPU machine, with cold caches, it would take a minute of the tests' 180 s, while
# the GPU tests compile and run the kernels for real.
HOPPER_COMPILE_TEST = "tests/test_hopper_compile.py::test_every_config_compiles_clean_for_hopper"


def _run(command, log: Path, limit: float, env) -> tuple[str, float]:
    """Run ``command`` with its output in ``log``; (status, seconds). The whole process group is
    killed at the limit, so a hung test cannot eat the rest of the run."""
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
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"stopped at its {limit:.0f} s limit"
            out.write(f"\n[gpu_run] {status}\n")
    return status, time.monotonic() - started


def install_wheels(env) -> str:
    """pip-install ``.whl/*.whl`` (no network there) into a private folder on PYTHONPATH."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return "no .whl/ folder: peers not installed on this machine are skipped"
    target = Path(tempfile.mkdtemp(prefix="docqa_fast_peers_"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), *map(str, wheels)], check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return f"installed {len(wheels)} wheels from .whl/: {', '.join(w.name.split('-')[0] for w in wheels)}"


def _test_summary(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if re.search(r"\d+ (passed|failed)", line)]
    return lines[-1].strip("= ") if lines else "no pytest summary (see tests.log)"


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
        rows.append(f"| {case['case']} | {show(best_ours)} | {show(best_peer)} | {speedup} | {case['metric']} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docqa_fast.tools.gpu_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the (at most 8) files to bring back")
    parser.add_argument("--skip", action="append", default=[], choices=sorted(LIMITS), help="leave a step out")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines = ["# GPU run", "", install_wheels(env), ""]
    steps = ["| step | result | seconds |", "|---|---|---|"]

    from ..kernels import tuning

    import torch

    if not torch.cuda.is_available():
        print("gpu_run needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    arch = tuning.device_arch(device)
    table_path = tuning.TUNED_DIR / tuning.table_name(arch, tuning.triton_version())
    previous = tuning.load_table(str(table_path)) if table_path.exists() else {}
    import triton

    lines.insert(1, f"{torch.cuda.get_device_name(device)} ({arch}), torch {torch.__version__}, "
                    f"Triton {triton.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")

    def summarise(extra=()):
        # Written after every step: a run cut short still brings back what it did.
        text = "\n".join(lines + steps + list(extra)) + "\n"
        (out / "summary.md").write_text(text)
        return text

    if "tests" not in args.skip:
        status, seconds = _run([sys.executable, "-m", "pytest", "tests", "-q", "-rs", "-p", "no:cacheprovider",
                                "--deselect", HOPPER_COMPILE_TEST, *_pytest_speedups()],
                               out / "tests.log", LIMITS["tests"], env)
        steps.append(f"| tests | {status}: {_test_summary(out / 'tests.log')} | {seconds:.0f} |")
        summarise()
    tuned = []
    if "tune" not in args.skip:
        status, seconds = _run([sys.executable, "-m", "docqa_fast.tools.tune", "--budget", str(TUNE_BUDGET),
                                "--jobs", "12"], out / "tune.log", LIMITS["tune"], env)
        if table_path.exists():
            shutil.copy(table_path, out / table_path.name)
            tuned = _tuned_rows(table_path, previous)
        steps.append(f"| tune | {status}: {len(tuned)} variants measured -> {table_path.name} | {seconds:.0f} |")
        summarise()
    bench = []
    if "bench" not in args.skip:
        bench_dir = Path(tempfile.mkdtemp(prefix="docqa_fast_bench_"))
        status, seconds = _run([sys.executable, "-m", "benchmarks", "--filter", ",".join(HEADLINE_CASES),
                                "--no-hopper-report", "--out", str(bench_dir)], out / "bench.log", LIMITS["bench"], env)
        if (bench_dir / "results.json").exists():
            shutil.copy(bench_dir / "results.json", out / "bench_results.json")
            shutil.copy(bench_dir / "summary.md", out / "bench_summary.md")
            with tarfile.open(out / "bench_plots.tgz", "w:gz") as tar:
                for plot in sorted(bench_dir.glob("*.png")):
                    tar.add(plot, arcname=plot.name)
            bench = _bench_rows(bench_dir / "results.json")
        steps.append(f"| bench | {status}: {len(bench)} headline cases | {seconds:.0f} |")

    extra = []
    if tuned:
        extra += ["", "| tuned variant | tiles before -> chosen | current -> chosen |", "|---|---|---|", *tuned]
    if bench:
        extra += ["", "| case | ours (best backend) | best peer | ours / peer | unit |", "|---|---|---|---|---|",
                  *bench]
    print(summarise(extra))
    return 0


def _pytest_speedups() -> list[str]:
    """Parallel workers and a per-test limit where the plugins are installed (the GPU machine
    has pytest-xdist and pytest-timeout; a run elsewhere goes on without them)."""
    import importlib.util

    args = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    return args + (["--timeout", "150"] if importlib.util.find_spec("pytest_timeout") else [])


if __name__ == "__main__":
    raise SystemExit(main())

"""Cases, providers and timing: everything a benchmark run measures, nothing it prints.

A :class:`Case` is one problem size of one op: a maker of random inputs, the providers
that compute it (ours per backend, then the peers) and a work model (bytes moved or
FLOPs) that turns a time into GB/s or TFLOP/s. Family modules register a function
returning their cases (:func:`register_family`); :func:`collect_cases` gathers them.

Timing runs every provider of a case in one process on the same input sets, rotated
between repetitions so no provider is timed on data already sitting in a cache:

* GPU: ``triton.testing.do_bench`` (flushes L2 before every repetition) at quantiles
  0.2/0.5/0.8; peak memory from ``torch.cuda.max_memory_allocated``.
* CPU: ``time.perf_counter`` around each call, p20/p50/p80 over the repetitions.

A provider that raises (out of memory, a missing feature, a bug) gets an "error" row with
the exception's type and first line, and the case goes on; so does a failing reference,
whose place in the cross-check a peer that ran then takes (:func:`run_case`).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

QUANTILES = (0.2, 0.5, 0.8)
DEFAULT_INPUT_SETS = 3
# Repetition settings: (CPU warmup calls, min reps, max reps, seconds per provider),
# and do_bench's (warmup ms, rep ms) on a GPU. prepare()'s untimed call already warmed a provider
# up: a quick run adds no other. A quick CPU run is a smoke run (each provider runs, agrees, and
# gets a rough time): two timed calls of a slow provider -- the losses' reference backward, the
# tiny end-to-end model steps take a second or more a call -- and up to 20 of a fast one.
CPU_REPS = {"quick": (0, 2, 20, 0.25), "full": (2, 10, 200, 2.0)}
GPU_BENCH_MS = {"quick": (5, 20), "full": (25, 100)}
# Relative/absolute tolerance of the cross-check against the reference, by output dtype.
CHECK_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}


class Unavailable(Exception):
    """Raised while preparing a provider that cannot run here; it is reported as skipped."""


@dataclass(frozen=True)
class Provider:
    """One implementation of a case's op, called as ``fn(*inputs)``.

    ``build`` (instead of ``fn``) makes the callable once per case, e.g. a fresh
    ``torch.compile``; ``env`` is set while the provider runs and restored after;
    ``unavailable(device)`` returns why it cannot run here, or None; ``quick_cpu_skip``, why a
    quick run on a CPU leaves it out although it could run (None: it runs). :func:`skip_reason`
    combines the two.
    """

    name: str
    fn: Callable[..., Any] | None = None
    build: Callable[[], Callable[..., Any]] | None = None
    ours: bool = False
    env: dict[str, str] = field(default_factory=dict)
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    quick_cpu_skip: str | None = None

    def make(self) -> Callable[..., Any]:
        return self.build() if self.build is not None else self.fn


@dataclass(frozen=True)
class Case:
    """One size of one op. Cases of a ``group`` differ only in ``params[sweep]`` (a plot's x axis)."""

    family: str
    name: str  # unique within the family, filter- and pytest-friendly: "ring_pair-S8192"
    group: str
    description: str  # one line shared by the group: shapes and dtype
    params: dict[str, Any]
    sweep: str
    make_inputs: Callable[[dict, torch.device], tuple]  # random, never all zeros
    providers: tuple[Provider, ...]
    reference: str = "eager"  # provider whose output every other provider is checked against
    bytes_moved: int | None = None  # -> GB/s against the copy-bandwidth ceiling
    flops: int | None = None  # -> TFLOP/s against the bf16 matmul ceiling
    target: float | None = None  # fraction of the ceiling our providers should reach
    # Cross-check tolerance when the output dtype understates the error (fp32 results of bf16
    # inputs: a peer that rounds through bf16 and ours that does not differ by bf16 rounding).
    tolerance: float | None = None

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"

    @property
    def metric(self) -> str:
        return "TFLOP/s" if self.flops is not None else "GB/s"

    def rate(self, ms: float) -> float:
        """Work per second at a time of ``ms`` milliseconds, in the case's metric."""
        if self.flops is not None:
            return self.flops / (ms * 1e-3) / 1e12
        return self.bytes_moved / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- registry

_FAMILIES: dict[str, Callable[[bool], list[Case]]] = {}


def register_family(name: str):
    """Decorator for a family's ``cases(quick: bool) -> list[Case]``."""

    def register(make_cases):
        _FAMILIES[name] = make_cases
        return make_cases

    return register


def collect_cases(quick: bool, filter: str | None = None) -> list[Case]:
    """Every registered case (quick sizes or full), keeping those whose id contains ``filter``
    (or one of its comma-separated parts: ``make gpu`` names its headline cases this way)."""
    from . import FAMILIES

    for module in FAMILIES:
        importlib.import_module(f"{__package__}.{module}")
    cases = [case for make_cases in _FAMILIES.values() for case in make_cases(quick)]
    ids = [case.id for case in cases]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"benchmark case ids registered twice: {sorted(duplicates)}")
    wanted = [part for part in (filter or "").split(",") if part]
    return [case for case in cases if not wanted or any(part in case.id for part in wanted)]


# ------------------------------------------------------------------- provider helpers

# Why our Triton providers are not timed without a GPU (they could run, under the interpreter).
INTERPRETER_TOO_SLOW = "no GPU: the Triton interpreter is far too slow to time"


def gpu_only(reason: str, then: Callable[[torch.device], str | None] | None = None
             ) -> Callable[[torch.device], str | None]:
    """An availability rule (:attr:`Provider.unavailable`) for a provider timed on GPUs only:
    ``reason`` without a CUDA device; on one, what the further rule ``then`` says (None: it runs)."""
    def check(device: torch.device) -> str | None:
        if device.type != "cuda":
            return reason
        return then(device) if then is not None else None

    return check


def ours_per_backend(fn: Callable, backends=("extension", "triton")) -> list[Provider]:
    """``docqa_fast[<backend>]`` providers of a public op, each forcing its backend.

    The dispatcher reads DOCQA_FAST_BACKEND on every call, so setting it around the
    measurement times exactly that backend. On CPU, ``extension`` runs the extension's C++
    twins; Triton would run only under its interpreter, which is far too slow to time.
    """
    return [Provider(f"docqa_fast[{backend}]", fn=fn, ours=True, env={"DOCQA_FAST_BACKEND": backend},
                     unavailable=_backend_unavailable(backend)) for backend in backends]


def _backend_unavailable(backend: str):
    def check(device: torch.device) -> str | None:
        import docqa_fast

        status = docqa_fast.backends()[backend]
        return None if status.available else status.detail

    return gpu_only(INTERPRETER_TOO_SLOW, then=check) if backend == "triton" else check


def _flash_attn_installed(device: torch.device) -> str | None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed"
    return None


# Why flash-attn (the peer most attention users would pick) cannot run here, or None.
flash_attn_unavailable = gpu_only("flash-attn needs a CUDA device", then=_flash_attn_installed)


def eager_provider(fn: Callable, name: str = "eager") -> Provider:
    return Provider(name, fn=fn)


# A quick CPU run is a smoke run of the suite (--help promises a few minutes on 2 cores), and a
# CPU's torch.compile row says nothing about a GPU: Inductor's cold C++ compile, afresh for each of
# the ~28 quick cases that had one, took 42% of such a run's time (256 s of 603 on 2 busy cores).
COMPILE_QUICK_CPU_SKIP = ("a quick CPU run leaves torch.compile out: Inductor compiles C++ afresh for each "
                          "case, most of such a run's time (--full times it)")


def compiled_provider(fn: Callable, name: str = "torch.compile") -> Provider:
    """``torch.compile(fn)``, compiled afresh for each case before it is timed (not in a quick CPU run)."""

    def build():
        # A fresh start per case: specialised to this shape, and never hitting Dynamo's
        # recompile limit (past it Dynamo silently runs eager).
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)

    def unavailable(device):
        if device.type == "cpu" and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
            return "no C++ compiler for Inductor's CPU code"
        return None

    return Provider(name, build=build, unavailable=unavailable, quick_cpu_skip=COMPILE_QUICK_CPU_SKIP)


def skip_reason(provider: Provider, device: torch.device, quick: bool) -> str | None:
    """Why ``provider`` does not run on ``device`` at these sizes, or None: it cannot run here
    (:attr:`Provider.unavailable`), or a quick CPU run leaves it out (:attr:`Provider.quick_cpu_skip`)."""
    reason = provider.unavailable(device)
    if reason is None and quick and device.type == "cpu":
        reason = provider.quick_cpu_skip
    return reason


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """Set environment variables for the duration of a block, restoring the old values."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------------ inputs

def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


CPU_INPUT_BUDGET = 4 << 30


def input_set_count(set_bytes: int, device_memory: int | None) -> int:
    """How many input sets a case gets: as many as fit an eighth of the device's memory
    (``device_memory`` None: a CPU, CPU_INPUT_BUDGET), between 2 and DEFAULT_INPUT_SETS."""
    budget = CPU_INPUT_BUDGET if device_memory is None else device_memory // 8
    return max(2, min(DEFAULT_INPUT_SETS, budget // max(set_bytes, 1)))


def make_input_sets(case: Case, device: torch.device) -> list[tuple]:
    """Several independent random input sets, as many as fit a memory budget (at least 2)."""
    torch.manual_seed(0)
    first = case.make_inputs(case.params, device)
    set_bytes = sum(t.nbytes for t in _tensors(first))
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    count = input_set_count(set_bytes, memory)
    sets = [first]
    for seed in range(1, count):
        torch.manual_seed(seed)
        sets.append(case.make_inputs(case.params, device))
    for tensor in _tensors(sets):
        # All-zero data lets hardware and kernels take shortcuts real data never allows.
        if tensor.is_floating_point() and not tensor.any():
            raise ValueError(f"{case.id}: make_inputs returned an all-zero tensor {tuple(tensor.shape)}")
    return sets


# ----------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(provider: Provider, inputs: tuple, device: torch.device):
    """Build the provider and call it once, untimed (compiles, JIT, first-touch).

    Returns ``(fn, output, peak_memory_bytes, setup_seconds)``; the peak is the memory
    the call allocated above what was already resident (None on CPU). Raises
    :class:`Unavailable` when the dispatcher refuses a forced backend on this machine.
    """
    start = time.perf_counter()
    fn = provider.make()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        output = fn(*inputs)
    except RuntimeError as exc:
        # docqa_fast's dispatcher says "DOCQA_FAST_BACKEND=x cannot run ...: why" when a
        # forced backend cannot run these tensors (e.g. a CPU-only extension on a GPU).
        if any(str(exc).startswith(f"{key}=") for key in provider.env):
            raise Unavailable(str(exc).splitlines()[0]) from exc
        raise
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else None
    return fn, output, peak, time.perf_counter() - start


def time_calls(fn: Callable, input_sets: list[tuple], device: torch.device, quick: bool) -> dict:
    """p20/p50/p80 in milliseconds (and the raw samples on CPU), rotating the input sets."""
    mode = "quick" if quick else "full"
    rotation = itertools.cycle(input_sets)
    if device.type == "cuda":
        import triton.testing

        warmup_ms, rep_ms = GPU_BENCH_MS[mode]
        # Same call on Triton 3.6 and 3.8: do_bench(fn, warmup, rep, grad_to_none, quantiles, return_mode).
        p20, p50, p80 = triton.testing.do_bench(lambda: fn(*next(rotation)), warmup=warmup_ms, rep=rep_ms,
                                                quantiles=list(QUANTILES))
        return {"p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "samples_ms": None}

    warmup, min_reps, max_reps, seconds = CPU_REPS[mode]
    for _ in range(warmup):
        fn(*next(rotation))
    samples = []
    deadline = time.perf_counter() + seconds
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < deadline):
        args = next(rotation)
        start = time.perf_counter()
        fn(*args)
        samples.append((time.perf_counter() - start) * 1e3)
    p20, p50, p80 = np.quantile(samples, QUANTILES).tolist()
    return {"p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "samples_ms": samples}


# Elements compared at a time: fp32 copies of 256 MB. Compared whole, a 7.5 GB bf16 gradient
# (reward, 64 pairs x 8K) took fp32 twins of both tensors, int64 indices and copies for the
# boolean-mask selections, differences: over 10x its size, ~100 GB on top of the outputs --
# likely why every provider of that case, the reference too, ran out of memory on the H200.
CHECK_CHUNK_ELEMENTS = 1 << 26


def compare(output, expected, tolerance: float | None = None) -> tuple[float, bool]:
    """(max abs difference, whether every tensor is within tolerance: ``tolerance``, or by its dtype).

    Same test as ``torch.allclose`` on the finite entries plus equal non-finite positions,
    done in slices along the first dimension so its memory stays small whatever the outputs.
    """
    got, want = _tensors(output), _tensors(expected)
    if len(got) != len(want):
        return float("inf"), False
    worst, ok = 0.0, True
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return float("inf"), False
        tol = tolerance if tolerance is not None else CHECK_TOLERANCE.get(w.dtype, 1e-4)
        if g.dim() == 0:
            g, w = g[None], w[None]
        if g.numel() == 0:  # nothing to compare (an empty first dimension has no g[0])
            continue
        rows = max(1, CHECK_CHUNK_ELEMENTS // max(1, g[0].numel()))
        for g_part, w_part in zip(g.split(rows), w.split(rows)):
            g_part, w_part = g_part.float(), w_part.float()
            finite = torch.isfinite(w_part)
            ok &= bool(torch.equal(torch.isfinite(g_part), finite))
            if finite.any():
                g_part, w_part = g_part[finite], w_part[finite]
                worst = max(worst, (g_part - w_part).abs().max().item())
                ok &= torch.allclose(g_part, w_part, rtol=tol, atol=tol)
    return worst, ok


# -------------------------------------------------------------------------------- runs

ERROR_MESSAGE_CHARS = 160  # a table cell, not a traceback: the first line, cut to this length


def error_text(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``, short enough for a table cell."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > ERROR_MESSAGE_CHARS:
        message = message[:ERROR_MESSAGE_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def run_case(case: Case, device: torch.device, quick: bool, on_provider_done=None) -> dict:
    """Measure every provider of ``case``; one record with a row per provider, skips and errors included.

    Each provider fails alone, the reference too: its row says why and the others still run.
    Outputs are checked against the reference's; when the reference produced none, against a
    stand-in, the first other provider that runs (peers before ours, which the check is meant
    to test); when nothing else ran, the rows say "unchecked". Rows keep the case's order.
    """
    record = {
        "case": case.id, "family": case.family, "name": case.name, "group": case.group,
        "description": case.description, "params": case.params, "sweep": case.sweep,
        "metric": case.metric, "bytes_moved": case.bytes_moved, "flops": case.flops,
        "target": case.target,
    }
    skipped = _all_skipped_rows(case, device, quick)
    if skipped is not None:  # nothing can run here: no inputs made, one line in the report
        for provider in case.providers:
            if on_provider_done is not None:
                on_provider_done(provider)
        return {**record, "providers": skipped,
                "check": {"reference": case.reference, "against": None, "note": None}}
    failure = None
    try:
        input_sets = make_input_sets(case, device)
    except Exception as exc:  # e.g. out of memory: every provider needs the inputs, none can run
        failure = (f"making the inputs failed: {error_text(exc)}", type(exc).__name__)
    if failure is not None:
        _release(device)  # after the except block: its traceback no longer holds the frames' tensors
        rows = [_error_row(provider, *failure) for provider in case.providers]
        for provider in case.providers:
            if on_provider_done is not None:
                on_provider_done(provider)
        return {**record, "providers": rows,
                "check": {"reference": case.reference, "against": None, "note": "no inputs: nothing ran"}}

    reference = next((i for i, p in enumerate(case.providers) if p.name == case.reference), None)
    rows: dict[int, dict] = {}  # by position in case.providers
    expected, against, notes = None, None, []

    def measure(index, keep_output):
        provider = case.providers[index]
        row, output = _measure(provider, case, input_sets, device, quick, expected, against, keep_output)
        rows[index] = row
        if on_provider_done is not None:
            on_provider_done(provider)
        return row, output

    if reference is not None:
        row, expected = measure(reference, keep_output=True)
        if row["status"] == "ok":
            against = case.reference
            row["check"] = "reference"
        else:
            notes.append(f"reference {case.reference} {row['status']}: {row['reason']}")
    else:
        notes.append(f"no provider is named {case.reference!r}, the case's reference")
    rest = [i for i in range(len(case.providers)) if i != reference]
    if against is None:
        # Peers first: the first that runs becomes the stand-in, and ours are checked against it.
        rest.sort(key=lambda i: case.providers[i].ours)  # stable: the case's order otherwise
    for index in rest:
        row, output = measure(index, keep_output=against is None)
        if against is None and row["status"] == "ok":
            expected, against, stand_in = output, row["provider"], index
            row["check"] = "stand-in reference"
        del output
    if notes:  # the reference gave no output
        if against is None:
            notes.append("no provider ran: unchecked")
        elif any(r["status"] == "ok" for i, r in rows.items() if i != stand_in):
            notes.append(f"checked against {against} instead")
        else:
            rows[stand_in]["check"] = "unchecked"
            notes.append(f"only {against} ran: unchecked")
    del input_sets, expected
    _release(device)
    ordered = [rows[i] for i in range(len(case.providers))]
    _add_speedups(ordered)
    return {**record, "providers": ordered,
            "check": {"reference": case.reference, "against": against, "note": "; ".join(notes) or None}}


def _all_skipped_rows(case: Case, device: torch.device, quick: bool) -> list[dict] | None:
    """The rows of a case none of whose providers runs on ``device``, or None when one does
    (or when an availability probe fails: :func:`_measure` then reports it)."""
    rows = []
    for provider in case.providers:
        try:
            reason = skip_reason(provider, device, quick)
        except Exception:
            return None
        if reason is None:
            return None
        rows.append({"provider": provider.name, "ours": provider.ours, "status": "skipped", "reason": reason,
                     "check": None})
    return rows


def all_skipped(record: dict) -> bool:
    """Whether no provider of a case's record ran (all unavailable here)."""
    return all(row["status"] == "skipped" for row in record["providers"])


def _release(device: torch.device) -> None:
    """Hand cached blocks back after a case or a failure, so the next one starts unfragmented."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_row(provider: Provider, reason: str, exc_type: str | None) -> dict:
    return {"provider": provider.name, "ours": provider.ours, "status": "error", "reason": reason,
            "error_type": exc_type, "check": None}


def _measure(provider, case, input_sets, device, quick, expected, against, keep_output=False):
    """One provider's row, and its first output when ``keep_output`` (None otherwise).

    ``expected`` is the output of ``against`` (a provider name), or None: then the row says
    "unchecked". Anything the provider raises becomes its row (status "error"), never the run's.
    """
    row = {"provider": provider.name, "ours": provider.ours, "status": "skipped", "reason": None, "check": None}
    try:
        reason = skip_reason(provider, device, quick)
    except Exception as exc:  # a broken availability probe is this provider's fault alone
        return _error_row(provider, f"checking availability: {error_text(exc)}", type(exc).__name__), None
    if reason is not None:
        row["reason"] = reason
        return row, None
    failure = None
    with environment(provider.env):
        try:
            fn, output, peak, setup_s = prepare(provider, input_sets[0], device)
            if expected is not None:
                error, matches = compare(output, expected, case.tolerance)
                row["check"] = "ok" if matches else "mismatch"
            else:
                error, matches = None, None
                row["check"] = "unchecked"
            if not keep_output:
                output = None
            timing = time_calls(fn, input_sets, device, quick)
        except Unavailable as exc:
            row.update(reason=str(exc), check=None)
            return row, None
        except Exception as exc:  # a failing provider is reported, and the run goes on
            failure = _error_row(provider, error_text(exc), type(exc).__name__)
    if failure is not None:
        # Out of the except block, the traceback (and the tensors its frames held) is gone:
        # what the failed call allocated can go back before the next provider runs.
        fn = output = None
        _release(device)
        return failure, None
    row.update(status="ok", **timing, rate=case.rate(timing["p50_ms"]), peak_memory_bytes=peak,
               setup_s=setup_s, max_abs_error=error, matches_reference=matches,
               checked_against=against if expected is not None else None)
    return row, output


def _add_speedups(rows: list[dict]) -> None:
    """For each of our providers: how many times faster than each peer (ratio of medians)."""
    peers = [r for r in rows if not r["ours"] and r["status"] == "ok"]
    for row in rows:
        if row["ours"] and row["status"] == "ok":
            row["speedup"] = {peer["provider"]: peer["p50_ms"] / row["p50_ms"] for peer in peers}


def add_ceiling_fractions(record: dict, ceilings: dict) -> None:
    """Each row's fraction of the matching device ceiling, and whether ours meet the target."""
    ceiling = ceilings.get(CEILING_OF_METRIC[record["metric"]])
    for row in record["providers"]:
        if row["status"] != "ok":
            continue
        row["fraction_of_ceiling"] = row["rate"] / ceiling if ceiling else None
        if row["ours"] and record["target"] is not None and ceiling:
            row["meets_target"] = row["fraction_of_ceiling"] >= record["target"]


# --------------------------------------------------------------------------- ceilings

CEILING_OF_METRIC = {"GB/s": "copy_gbps", "TFLOP/s": "matmul_bf16_tflops"}
MATMUL_SIZE = 8192
COPY_BYTES = 1 << 30  # far beyond any L2, so the copy runs at DRAM speed


def measure_ceilings(device: torch.device) -> dict:
    """The device's measured bf16 matmul rate and device-to-device copy bandwidth (GPU only)."""
    if device.type != "cuda":
        return {"skipped": "no GPU; the bf16 matmul and copy-bandwidth ceilings are measured on GPUs only"}
    import triton.testing

    n = MATMUL_SIZE
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_ms = triton.testing.do_bench(lambda: torch.mm(a, b), quantiles=list(QUANTILES))[1]
    del a, b
    src = torch.rand(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=list(QUANTILES))[1]
    del src, dst
    torch.cuda.empty_cache()
    return {
        "matmul_bf16_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "matmul_shape": [n, n, n],
        # A copy reads and writes every byte: count both, like the kernels' bytes moved.
        "copy_gbps": 2 * COPY_BYTES / (copy_ms * 1e-3) / 1e9,
        "copy_bytes": COPY_BYTES,
    }

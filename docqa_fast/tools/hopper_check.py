"""Compile every registered Triton kernel config for Hopper (sm_90a) with no GPU and read its resources.

For each :class:`docqa_fast.kernels.registry.KernelConfig` this compiles PTX and a cubin
with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``, reads registers, stack, local
memory and static shared memory with the ``cuobjdump -res-usage`` shipped in the Triton wheel,
and counts instructions in the SASS (disassembled by the wheel's ``nvdisasm``): HGMMA is
Hopper's warpgroup tensor-core MMA (Triton emits it for tiles of >= 64 rows), HMMA the
warp-level tensor-core MMA it uses for skinnier tiles (e.g. 16 gathered rows), UTMALDG a TMA
load. A config is a problem when it needs more shared memory than a Hopper block can have,
multiplies matrices without any tensor-core instruction, or claims TMA loads without any.
Spills (stack or local memory) are reported, not failed: tiles are chosen by measuring on a
GPU (kernels/tuning.py), and on the H200 the fastest attention backward tiles spill a few
hundred bytes yet run 3.6x faster than spill-free ones.

Speed: a config's figures are cached on disk (``DOCQA_FAST_CACHE_DIR``, default
``~/.cache/docqa_fast``; ``--no-cache`` or ``DOCQA_FAST_CACHE_DIR=off`` to bypass), keyed by the
source files of its kernel module and of the kernels-package modules it imports, the config
itself and the Triton version, so only configs whose kernel changed are compiled again. Configs
that must be compiled are disassembled in batches: starting the disassembler costs about 0.3 s
of CPU, more than the disassembly of a typical kernel, so each worker disassembles the text
sections of a whole batch of cubins at once.

Run ``python -m docqa_fast.tools.hopper_check`` for a table.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import multiprocessing
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

# Shared memory one block may use on sm_90 (227 KiB opt-in maximum).
HOPPER_MAX_SHARED_BYTES = 227 * 1024
CACHE_ENV = "DOCQA_FAST_CACHE_DIR"
# Part of every cache key: change it when what a cache entry holds, or how it is measured, changes.
CACHE_FORMAT = 1
# Configs one worker compiles before disassembling them together: large enough that the
# disassembler's start-up is paid rarely, small enough that the work spreads over the workers
# and progress is reported often.
BATCH = 16
_FIGURES = ("registers", "stack_bytes", "local_bytes", "shared_bytes", "hgmma_count", "hmma_count", "tma_count")


@dataclass
class HopperReport:
    name: str
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int  # dynamic (Triton's allocation) + static
    hgmma_count: int
    hmma_count: int
    uses_tensor_cores: bool
    tma_count: int = 0  # UTMALDG: tiles moved by the copy engine from a tensor descriptor
    uses_tma: bool = False
    problems: list[str] = field(default_factory=list)
    cached: bool = False  # figures read from the cache rather than compiled in this run

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _nvidia_tool(name: str) -> str:
    import triton.backends.nvidia as nvidia_backend

    return os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", name)


def cuobjdump_path() -> str:
    return _nvidia_tool("cuobjdump")


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# A disassembled instruction whose opcode is counted: its address, and the opcode. One pass over
# the text: a batch disassembles to hundreds of thousands of lines.
_COUNTED_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/[^\n]*?\b(HGMMA|HMMA|UTMALDG)\b")
_COUNT_OF = {"HGMMA": "hgmma_count", "HMMA": "hmma_count", "UTMALDG": "tma_count"}


def text_sections(cubin: bytes) -> list[bytes]:
    """The machine code of a cubin: its ``.text.<function>`` sections (ELF64, little-endian)."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF cubin")
    (section_headers,) = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize.
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, section_headers + i * entry_size) for i in range(count)]
    names_offset = headers[names_index][4]

    def name(header) -> str:
        start = names_offset + header[0]
        return cubin[start:cubin.index(b"\0", start)].decode()

    return [cubin[h[4]:h[4] + h[5]] for h in headers if name(h).startswith(".text.")]


def count_instructions(codes: list[bytes]) -> list[dict[str, int]]:
    """HGMMA / HMMA / UTMALDG counts of each piece of sm_90a machine code, with one disassembler run.

    The pieces are concatenated into one raw binary (every sm_90 instruction is 16 bytes, so
    they stay aligned) and each disassembled line is attributed by its address."""
    counts = [dict.fromkeys(_COUNT_OF.values(), 0) for _ in codes]
    starts, blob = [], bytearray()
    for code in codes:
        if len(code) % 16:
            raise ValueError(f"machine code of {len(code)} bytes is not whole 16-byte sm_90 instructions")
        starts.append(len(blob))
        blob += code
    if not blob:
        return counts
    with tempfile.NamedTemporaryFile(suffix=".bin") as raw:
        raw.write(blob)
        raw.flush()
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "--binary", "SM90a", raw.name],
                              capture_output=True, text=True, check=True).stdout
    for match in _COUNTED_INSTRUCTION.finditer(sass):
        address, opcode = match.groups()
        counts[bisect.bisect_right(starts, int(address, 16)) - 1][_COUNT_OF[opcode]] += 1
    return counts


def compile_for_hopper(config):
    """Triton's compiled kernel for sm_90a (``.asm["cubin"]``, ``.metadata``). Triton's own cache
    (~/.triton/cache) returns it without compiling when it holds this kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(config.signature)
    attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in config.divisible_by_16}
    source = ASTSource(config.fn, config.signature, constexprs=config.constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def _compile_figures(configs) -> list[dict[str, int]]:
    """Compile each config for sm_90 and measure it: the figures a report is made of."""
    figures, codes = [], []
    for config in configs:
        compiled = compile_for_hopper(config)
        cubin = compiled.asm["cubin"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
            file.write(cubin)
            file.flush()
            usage = subprocess.run([cuobjdump_path(), "-res-usage", file.name],
                                   capture_output=True, text=True, check=True).stdout
        match = _RES_USAGE.search(usage)
        if match is None:
            raise RuntimeError(f"cannot read cuobjdump -res-usage output for {config.name}:\n{usage}")
        registers, stack, static_shared, local = (int(g) for g in match.groups())
        figures.append({"registers": registers, "stack_bytes": stack, "local_bytes": local,
                        "shared_bytes": static_shared + int(compiled.metadata.shared)})
        codes.append(b"".join(text_sections(cubin)))
    for figure, counts in zip(figures, count_instructions(codes)):
        figure.update(counts)
    return figures


def make_report(config, figures: dict[str, int], cached: bool = False) -> HopperReport:
    """A config's report from its figures; the problems are judged here, never cached."""
    report = HopperReport(name=config.name, num_warps=config.num_warps, num_stages=config.num_stages,
                          uses_tensor_cores=config.uses_tensor_cores, uses_tma=config.uses_tma, cached=cached,
                          **{key: figures[key] for key in _FIGURES})
    if report.shared_bytes > HOPPER_MAX_SHARED_BYTES:
        report.problems.append(f"shared memory {report.shared_bytes} B > Hopper limit {HOPPER_MAX_SHARED_BYTES} B")
    if config.uses_tensor_cores and report.hgmma_count + report.hmma_count == 0:
        report.problems.append("multiplies matrices but has no tensor-core instruction (HGMMA or HMMA)")
    if config.uses_tma and report.tma_count == 0:
        report.problems.append("loads through tensor descriptors but has no TMA instruction (UTMALDG)")
    return report


def compile_config(config) -> HopperReport:
    """Compile one config for sm_90 (no cache) and report its resources and problems."""
    return make_report(config, _compile_figures([config])[0])


# ---------------------------------------------------------------------------- the cache

def cache_dir() -> Path | None:
    """Where compiled configs' figures are kept (outside the repository: a fresh clone on the same
    machine reuses them, as Triton reuses ~/.triton); None when ``DOCQA_FAST_CACHE_DIR=off``."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in ("off", "0", "none"):
        return None
    if setting:
        return Path(setting).expanduser() / "hopper_check"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "docqa_fast" / "hopper_check"


def kernel_source_files(config) -> list[Path]:
    """The source files a config's kernel is built from: the module defining it and every module
    of the kernels package it uses, transitively (jit helpers such as exact_math, common.py)."""
    from docqa_fast.kernels import registry

    function = getattr(config.fn, "fn", config.fn)  # a JITFunction (or the interpreter's wrapper)
    package = registry.__package__
    seen: dict[str, Path] = {}
    pending = [sys.modules[function.__module__]]
    while pending:
        module = pending.pop()
        if module.__name__ in seen or getattr(module, "__file__", None) is None:
            continue
        seen[module.__name__] = Path(module.__file__)
        for value in vars(module).values():
            # A jit helper imported from another file: the interpreter's wrapper keeps it as .fn.
            name = value.__name__ if isinstance(value, ModuleType) else getattr(getattr(value, "fn", value),
                                                                                 "__module__", None)
            if isinstance(name, str) and (name == package or name.startswith(package + ".")) and name in sys.modules:
                pending.append(sys.modules[name])
    return sorted(seen.values())


def cache_key(config, _sources: dict | None = None) -> str:
    """A digest of everything a config's figures depend on (``_sources``: file digests already read)."""
    import triton

    sources = _sources if _sources is not None else {}
    files = kernel_source_files(config)
    for path in files:
        if path not in sources:
            sources[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    description = {
        "format": CACHE_FORMAT, "triton": triton.__version__, "target": "cuda:90",
        "function": getattr(config.fn, "fn", config.fn).__qualname__,
        "sources": sorted(sources[path] for path in files),
        "signature": config.signature, "constexprs": {k: repr(v) for k, v in config.constexprs.items()},
        "num_warps": config.num_warps, "num_stages": config.num_stages,
        "divisible_by_16": sorted(config.divisible_by_16),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _read_cached(directory: Path, key: str) -> dict | None:
    try:
        figures = json.loads((directory / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None  # absent, or a half-written / foreign file: compile again
    return figures if _valid_figures(figures) else None


# Figures recorded in the repository (``--record``) for the configs as committed: a fresh clone
# (CI, a new developer) compiles only the configs whose sources or settings changed since, as a
# warm cache would; the keys are digests of the sources, the config and Triton's version, so a
# stale record is never used, and the tests recompile a sample of it to check it still holds.
RECORD = Path(__file__).with_name("sm90_figures.json")


def _valid_figures(figures) -> bool:
    return isinstance(figures, dict) and all(isinstance(figures.get(k), int) for k in _FIGURES)


def recorded_figures(path: Path | None = None) -> dict[str, dict]:
    """The committed record: cache key -> figures (empty when absent or unreadable)."""
    path = path or RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("figures") if isinstance(data, dict) else None
    return {k: v for k, v in entries.items() if _valid_figures(v)} if isinstance(entries, dict) else {}


def write_record(reports: list[HopperReport], keys: dict[str, str], path: Path | None = None) -> None:
    """Record the figures of ``reports`` (every registered config) under their cache keys."""
    import triton

    path = path or RECORD
    figures = {keys[r.name]: {k: getattr(r, k) for k in _FIGURES} for r in sorted(reports, key=lambda r: keys[r.name])}
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in figures.items())
    path.write_text(f'{{"triton": {json.dumps(triton.__version__)}, "format": {CACHE_FORMAT}, "figures": {{\n'
                    f"{lines}\n}}}}\n")


def _write_cached(directory: Path, key: str, figures: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # Atomic: two runs sharing the cache never see a half-written entry.
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as file:
        json.dump(figures, file)
    os.replace(file.name, directory / f"{key}.json")


# ---------------------------------------------------------------------------- running it all

def _compile_natively() -> None:
    """Pool initializer: compile real kernels even if the parent runs the Triton interpreter.

    Triton decides interpreted-or-compiled when a kernel module is imported, so the
    workers (fresh spawned processes) switch the interpreter off before importing any.
    """
    os.environ["TRITON_INTERPRET"] = "0"


def _compile_by_names(names: list[str]) -> list[dict[str, int]]:
    from docqa_fast.kernels.registry import registered_configs

    by_name = {c.name: c for c in registered_configs()}
    return _compile_figures([by_name[name] for name in names])


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_all(names=None, workers: int | None = None, cache: bool = True, progress=_print_progress,
              recorded: bool = True) -> list[HopperReport]:
    """Compile every registered config (or those in ``names``) that neither the cache nor (with
    ``recorded``) the committed record holds, in parallel processes; ``progress(message)`` hears
    how far the compiling is (None: silent). ``cache=False`` compiles everything."""
    from docqa_fast.kernels.registry import registered_configs

    selected = [c for c in registered_configs() if names is None or c.name in names]
    directory = cache_dir() if cache else None
    record = recorded_figures() if cache and recorded else {}
    sources: dict = {}
    keys = {c.name: cache_key(c, sources) for c in selected} if directory or record else {}
    figures = {}
    for config in selected:
        found = _read_cached(directory, keys[config.name]) if directory else None
        if found is None and record:
            found = record.get(keys[config.name])
        if found is not None:
            figures[config.name] = found
    cached = set(figures)
    missing = [c.name for c in selected if c.name not in figures]
    if missing:
        started = time.monotonic()
        batches = [missing[i:i + BATCH] for i in range(0, len(missing), BATCH)]
        workers = workers or min(len(batches), os.cpu_count() or 1)
        if progress:
            progress(f"hopper_check: compiling {len(missing)} of {len(selected)} configs for sm_90 in {workers} "
                     f"processes ({len(cached)} cached{'' if directory else '; cache off'})")
        done, reported = 0, 0.0
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_compile_natively) as pool:
            futures = {pool.submit(_compile_by_names, batch): batch for batch in batches}
            for future in as_completed(futures):
                batch = futures[future]
                for name, result in zip(batch, future.result()):
                    figures[name] = result
                    if directory:
                        _write_cached(directory, keys[name], result)
                done += len(batch)
                # A line per tenth of the work: a long cold run shows it is moving.
                if progress and (done / len(missing) - reported >= 0.1 or done == len(missing)):
                    reported = done / len(missing)
                    progress(f"hopper_check: {done}/{len(missing)} compiled, {time.monotonic() - started:.0f} s")
    return [make_report(c, figures[c.name], cached=c.name in cached) for c in selected]


def spill_summary(reports: list[HopperReport]) -> str:
    """One line on the spilling configs: a figure to read beside GPU timings, not a verdict."""
    spilling = [r for r in reports if r.stack_bytes or r.local_bytes]
    if not spilling:
        return "no config spills"
    worst = max(spilling, key=lambda r: r.stack_bytes + r.local_bytes)
    return (f"{len(spilling)} of {len(reports)} configs spill (reported, not failed); most: {worst.name} "
            f"with {worst.stack_bytes} B stack, {worst.local_bytes} B local")


def format_table(reports: list[HopperReport]) -> str:
    lines = ["| kernel config | warps | regs | shared KiB | spill B | HGMMA | HMMA | TMA loads | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        verdict = "yes" if r.ok else "NO: " + "; ".join(r.problems)
        lines.append(f"| {r.name} | {r.num_warps} | {r.registers} | {r.shared_bytes / 1024:.1f} | "
                     f"{r.stack_bytes + r.local_bytes} | {r.hgmma_count} | {r.hmma_count} | {r.tma_count} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m docqa_fast.tools.hopper_check [--filter TEXT] [--json PATH] [--no-cache]``: the
    table (and every figure as JSON); exit 1 on a problem."""
    import argparse

    from docqa_fast.kernels.registry import registered_configs

    parser = argparse.ArgumentParser(description="Compile registered Triton configs for sm_90 and report them.")
    parser.add_argument("--filter", default="", help="only configs whose name contains this text")
    parser.add_argument("--json", default=None, help="also write every report to this JSON file")
    parser.add_argument("--no-cache", action="store_true",
                        help=f"compile every config again (the cache: {cache_dir() or 'off'}; and the record)")
    parser.add_argument("--record", action="store_true",
                        help=f"write every config's figures to {RECORD.name} (commit it with kernel changes: a "
                             "fresh clone then compiles only what changed)")
    args = parser.parse_args(argv)
    if args.record and args.filter:
        parser.error("--record writes every config's figures: it takes no --filter")
    names = [c.name for c in registered_configs() if args.filter in c.name]
    if not names:
        parser.error(f"no registered config name contains {args.filter!r}")
    reports = check_all(names, cache=not args.no_cache)
    if args.record:
        configs = {c.name: c for c in registered_configs()}
        sources: dict = {}
        write_record(reports, {name: cache_key(configs[name], sources) for name in names})
    print(format_table(reports))
    print(spill_summary(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in reports], f, indent=1)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Compile every registered Triton kernel config for Hopper (sm_90a) with no GPU and read its resources.

For each :class:`docqa_fast.kernels.registry.KernelConfig` this compiles PTX and a cubin
with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and runs the ``cuobjdump``
shipped in the Triton wheel: ``-res-usage`` for registers, stack, local memory and static
shared memory, ``-sass`` for the instruction mix: HGMMA is Hopper's warpgroup tensor-core
MMA (Triton emits it for tiles of >= 64 rows), HMMA the warp-level tensor-core MMA it uses
for skinnier tiles (e.g. 16 gathered rows). A config is a problem when it needs more shared
memory than a Hopper block can have, multiplies matrices without any tensor-core instruction,
or claims TMA loads without any. Spills (stack or local memory) are reported, not failed:
tiles are chosen by measuring on a GPU (kernels/tuning.py), and on the H200 the fastest
attention backward tiles spill a few hundred bytes yet run 3.6x faster than spill-free ones.

Run ``python -m docqa_fast.tools.hopper_check`` for a table.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

# Shared memory one block may use on sm_90 (227 KiB opt-in maximum).
HOPPER_MAX_SHARED_BYTES = 227 * 1024


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

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def cuobjdump_path() -> str:
    import triton.backends.nvidia as nvidia_backend

    return os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "cuobjdump")


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_config(config) -> HopperReport:
    """Compile one config for sm_90 and report its resources and problems."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(config.signature)
    attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in config.divisible_by_16}
    source = ASTSource(config.fn, config.signature, constexprs=config.constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump_path(), "-res-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump_path(), "-sass", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    match = _RES_USAGE.search(usage)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output for {config.name}:\n{usage}")
    registers, stack, static_shared, local = (int(g) for g in match.groups())
    report = HopperReport(
        name=config.name, num_warps=config.num_warps, num_stages=config.num_stages,
        registers=registers, stack_bytes=stack, local_bytes=local,
        shared_bytes=static_shared + int(compiled.metadata.shared),
        hgmma_count=len(re.findall(r"\bHGMMA\b", sass)), hmma_count=len(re.findall(r"\bHMMA\b", sass)),
        uses_tensor_cores=config.uses_tensor_cores, tma_count=len(re.findall(r"\bUTMALDG\b", sass)),
        uses_tma=config.uses_tma,
    )
    if report.shared_bytes > HOPPER_MAX_SHARED_BYTES:
        report.problems.append(f"shared memory {report.shared_bytes} B > Hopper limit {HOPPER_MAX_SHARED_BYTES} B")
    if config.uses_tensor_cores and report.hgmma_count + report.hmma_count == 0:
        report.problems.append("multiplies matrices but has no tensor-core instruction (HGMMA or HMMA)")
    if config.uses_tma and report.tma_count == 0:
        report.problems.append("loads through tensor descriptors but has no TMA instruction (UTMALDG)")
    return report


def _compile_natively() -> None:
    """Pool initializer: compile real kernels even if the parent runs the Triton interpreter.

    Triton decides interpreted-or-compiled when a kernel module is imported, so the
    workers (fresh spawned processes) switch the interpreter off before importing any.
    """
    os.environ["TRITON_INTERPRET"] = "0"


def _compile_by_name(name: str) -> HopperReport:
    from docqa_fast.kernels.registry import registered_configs

    return compile_config(next(c for c in registered_configs() if c.name == name))


def check_all(names=None, workers: int | None = None) -> list[HopperReport]:
    """Compile every registered config (or those in ``names``), in parallel processes."""
    from docqa_fast.kernels.registry import registered_configs

    selected = [c.name for c in registered_configs() if names is None or c.name in names]
    if not selected:
        return []
    workers = workers or min(len(selected), os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_compile_natively) as pool:
        return list(pool.map(_compile_by_name, selected))


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
    """``python -m docqa_fast.tools.hopper_check [--filter TEXT] [--json PATH]``: the table (and
    every figure as JSON); exit 1 on a problem."""
    import argparse
    import json

    from docqa_fast.kernels.registry import registered_configs

    parser = argparse.ArgumentParser(description="Compile registered Triton configs for sm_90 and report them.")
    parser.add_argument("--filter", default="", help="only configs whose name contains this text")
    parser.add_argument("--json", default=None, help="also write every report to this JSON file")
    args = parser.parse_args(argv)
    names = [c.name for c in registered_configs() if args.filter in c.name]
    if not names:
        parser.error(f"no registered config name contains {args.filter!r}")
    reports = check_all(names)
    print(format_table(reports))
    print(spill_summary(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in reports], f, indent=1)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    raise SystemExit(main())

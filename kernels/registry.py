"""The configurations every Triton kernel can be launched with.

A launcher picks its block sizes from a small fixed set; the kernel module registers that
whole set here (one :class:`KernelConfig` per compile-time variant). The Hopper compile
check (``docqa_fast.tools.hopper_check``) compiles each registered config for sm_90
without a GPU, so a new kernel joins the check by registering, not by new test code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelConfig:
    """One compile-time variant of a Triton kernel, exactly as its launcher launches it."""

    name: str  # unique, readable: "merge_pair[fp16,BLOCK_D=128]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # argument -> Triton type ("*fp16", "i64", "constexpr", ...)
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    uses_tensor_cores: bool = False  # True for kernels that multiply matrices (expects HGMMA)
    uses_tma: bool = False  # True for variants that load through tensor descriptors (expects UTMALDG)
    # Arguments Triton's launcher will find divisible by 16 (pointers: 16-byte aligned) and
    # specialise on; registering both the aligned and the unaligned variant of a kernel
    # covers what the launcher can actually compile.
    divisible_by_16: tuple[str, ...] = ()


_CONFIGS: dict[str, KernelConfig] = {}
# Registered, not yet expanded: a module's configs often list its tuned tables' tiles, and
# reading a table while kernel modules are still being imported would judge its entries
# before every tunable kernel is declared (decode_attention's tiles were dropped that way
# when another module's registration loaded the table mid-import). Expanded on first use.
_PENDING: list = []


def register(configs) -> None:
    """Add a module's configs (any iterable, typically its ``_configs()`` generator; read lazily)."""
    _PENDING.append(configs)


def registered_configs() -> list[KernelConfig]:
    """Every config of every kernel module (importing them all first)."""
    from . import KERNEL_MODULES

    for module in KERNEL_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    while _PENDING:
        for config in _PENDING.pop(0):
            if config.name in _CONFIGS:
                raise ValueError(f"kernel config {config.name!r} registered twice")
            _CONFIGS[config.name] = config
    return list(_CONFIGS.values())


def pointer_type(dtype) -> str:
    """torch dtype -> Triton pointer type string for a signature."""
    import torch

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
             torch.int32: "i32", torch.int64: "i64"}
    return "*" + names[dtype]

"""Which implementation runs an op: the CUDA extension, a Triton kernel, or the reference.

Every public op declares the backends it implements, fastest first for CUDA tensors,
and asks :func:`choose_backend` once per call. The choice:

* ``DOCQA_FAST_BACKEND=reference|triton|cuda`` forces one (read on every call, so tests
  can switch it); a forced backend that cannot run the call raises ``RuntimeError``
  saying why, never falls back silently.
* CUDA tensors: the op's first available backend among ``cuda`` (the extension) and
  ``triton``; the reference when neither is there.
* CPU tensors: the reference. ``triton`` runs on CPU tensors only under the Triton
  interpreter (``TRITON_INTERPRET=1``, set before Triton is imported); ``cuda`` runs on
  CPU tensors through the extension's C++ twins, which share their per-element code with
  the CUDA kernels -- that is how the CUDA code paths are tested on machines with no GPU.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

BACKENDS = ("reference", "triton", "cuda")
BACKEND_ENV = "DOCQA_FAST_BACKEND"


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and a one-line explanation either way."""

    available: bool
    detail: str

    def __str__(self) -> str:
        return ("available: " if self.available else "unavailable: ") + self.detail

    __repr__ = __str__


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton ships with CUDA torch on Linux
        return f"Triton is not importable ({exc})"
    return None


@functools.cache
def _build_info() -> dict:
    path = Path(__file__).with_name("_build_info.json")
    if not path.exists():
        return {"extension": "none", "reason": "package was not built with setup.py (no _build_info.json)"}
    return json.loads(path.read_text())


@functools.cache
def _load_extension():
    """Import docqa_fast._C once; returns (module or None, reason when None)."""
    try:
        module = importlib.import_module("docqa_fast._C")
    except ImportError as exc:
        info = _build_info()
        if info.get("extension") in ("cpu", "cuda"):
            return None, f"docqa_fast._C was built but failed to import: {exc}"
        return None, f"extension not built: {info.get('reason', 'unknown reason')}"
    return module, None


def extension():
    """The compiled extension module ``docqa_fast._C``, or ``None`` when it is missing."""
    return _load_extension()[0]


def extension_has_cuda() -> bool:
    module = extension()
    return module is not None and bool(module.compiled_with_cuda())


def backends() -> dict[str, BackendStatus]:
    """What can run on this machine, and for what cannot, why."""
    status = {"reference": BackendStatus(True, "pure PyTorch; runs on every device")}

    triton_error = _triton_import_error()
    if triton_error:
        status["triton"] = BackendStatus(False, triton_error)
    elif torch.cuda.is_available():
        import triton

        status["triton"] = BackendStatus(True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}")
    elif triton_interpreter_enabled():
        status["triton"] = BackendStatus(True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)")
    else:
        status["triton"] = BackendStatus(False, "no CUDA device, and TRITON_INTERPRET=1 is not set")

    module, reason = _load_extension()
    if module is None:
        status["cuda"] = BackendStatus(False, reason)
    elif not module.compiled_with_cuda():
        status["cuda"] = BackendStatus(
            True, f"C++ CPU twins only; {_build_info().get('reason', 'CUDA kernels not built')}"
        )
    elif not torch.cuda.is_available():
        status["cuda"] = BackendStatus(True, "CUDA kernels built (no CUDA device here); C++ CPU twins run")
    else:
        status["cuda"] = BackendStatus(True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    return status


def _unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when ``backend`` can run on tensors of ``device`` and ``dtype``, else why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        if _triton_import_error():
            return _triton_import_error()
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter_enabled():
            if dtype == torch.bfloat16:
                # The interpreter stores bf16 as raw 16-bit integers: its arithmetic is garbage.
                return "the Triton interpreter computes bf16 wrongly; use fp16/fp32 on CPU or a GPU"
            return None
        return f"Triton kernels run on {device.type} tensors only under TRITON_INTERPRET=1"
    if backend == "cuda":
        module, reason = _load_extension()
        if module is None:
            return reason
        if device.type == "cuda" and not module.compiled_with_cuda():
            return f"docqa_fast._C has no CUDA kernels ({_build_info().get('reason', '')})"
        if device.type not in ("cuda", "cpu"):
            return f"docqa_fast._C has no kernels for {device.type} tensors"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not a backend; expected one of {BACKENDS} or 'auto'")
    return value


def choose_backend(op: str, device: torch.device, implemented: tuple[str, ...],
                   dtype: torch.dtype | None = None, *, cpu_twin: bool = False) -> str:
    """Pick the backend for one call of ``op`` on tensors of ``device`` (and ``dtype``).

    ``implemented`` lists the op's fast backends in order of preference on CUDA tensors
    ("cuda", "triton", or both); the reference is always implemented. ``cpu_twin``: the
    extension's C++ twin is also the op's CPU fast path (data-loader code), so CPU tensors
    take "cuda" by default when the extension is built.
    """
    forced = forced_backend()
    if forced is not None:
        if forced != "reference" and forced not in implemented:
            raise RuntimeError(f"{BACKEND_ENV}={forced}: {op} has no {forced} implementation "
                               f"(it has: reference, {', '.join(implemented)})")
        reason = _unavailable_reason(forced, device, dtype)
        if reason is not None:
            raise RuntimeError(f"{BACKEND_ENV}={forced} cannot run {op} on {device.type} tensors: {reason}")
        return forced
    if device.type == "cuda":
        for backend in implemented:
            if _unavailable_reason(backend, device, dtype) is None:
                return backend
    if cpu_twin and device.type == "cpu" and "cuda" in implemented and _unavailable_reason("cuda", device) is None:
        return "cuda"
    return "reference"

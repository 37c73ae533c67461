"""Which implementation runs a call: one dispatch table for every op.

Each op registers its implementations with :func:`register_op`, in order of preference on
CUDA tensors: a backend name (``extension`` -- the compiled ``docqa_fast._C`` from ``csrc/``,
CUDA kernels and their C++ twins; ``triton`` -- the kernels in ``kernels/``; ``reference`` --
pure PyTorch, always last and always able), the function that computes the call, and an
eligibility rule: why this implementation cannot compute *this* call (a dtype it does not take,
a group too large), or None. Per call the table takes, in order:

* ``DOCQA_FAST_BACKEND=reference|triton|extension`` (read on every call; ``cuda`` is the old
  name of ``extension``), or an op family's own variable (``DOCQA_FAST_ATTENTION=triton|cudnn``
  for the training attention ops, see :class:`Override`): that implementation, or a
  ``RuntimeError`` saying why it cannot run the call -- never a silent fallback;
* CUDA tensors: the first implementation that is available here and eligible for the call,
  in the op's order, or the order a tuned table gives for this GPU and the call's shape class
  (``kernels/tuned/``, section ``dispatch``: written from measurements, e.g. cuDNN's attention
  ahead of ours for dense D 128 calls where it was faster);
* CPU tensors: the reference, unless an implementation is the op's CPU fast path
  (``cpu=True``: the extension's C++ twins, for data-loader code). ``triton`` runs on CPU
  tensors only when forced under ``TRITON_INTERPRET=1`` (how the kernels are tested here).

Implementations that are not docqa_fast's own backends (torch's cuDNN attention, backend name
``cudnn``) say with ``available`` when they cannot run on a device here; they are never a value
of ``DOCQA_FAST_BACKEND``. ``Op.explain`` / ``Op.decision`` answer which implementation runs a
call and why (and why not the others); ``dispatch_log()`` records every choice made inside a
``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import _extension

BACKENDS = ("reference", "triton", "extension")
BACKEND_ENV = "DOCQA_FAST_BACKEND"
_ALIASES = {"cuda": "extension"}  # the extension backend's name before it also served CPU tensors


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


REBUILD_HINT = ("rebuild it for this PyTorch with `python -m docqa_fast.build` (or set DOCQA_FAST_JIT=1 to compile "
                "it at import, once; docs/install.md)")


class ExtensionWarning(UserWarning):
    """docqa_fast._C was built but cannot be loaded here (built for another PyTorch, or broken)."""


@functools.cache
def _build_info() -> dict:
    path = Path(__file__).with_name("_build_info.json")
    if not path.exists():
        return {"extension": "unknown", "reason": "package was not built with setup.py (no _build_info.json)"}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # read at import: a damaged or unreadable file must not stop the import
        return {"extension": "unknown", "reason": f"{path} cannot be read as JSON ({exc}); reinstall docqa_fast"}


def _import_failure(info: dict, exc: ImportError) -> str:
    """Why a built extension does not load; a PyTorch other than the one it was compiled against
    is the usual cause (its C++ ABI changes between releases), so name both versions."""
    built = info.get("torch")
    if built and built != torch.__version__:
        return (f"docqa_fast._C was built for {_extension.describe_build(info)} but "
                f"{_extension.describe_torch(torch.__version__, torch.version.cuda)} is installed, and it does not load "
                f"with it ({exc}); {REBUILD_HINT}")
    return f"docqa_fast._C was built but failed to import ({exc}); {REBUILD_HINT}"


def _import_extension():
    return importlib.import_module("docqa_fast._C")


def _installed_extension(info: dict):
    """The extension installed with the package: (module, None), or (None, why not). One built for
    another PyTorch (release, CUDA major, C++ ABI: its build info says) is not even imported:
    loading a library linked against other PyTorch symbols can crash the process."""
    if info.get("extension") == "none":
        # The last install chose no extension: a _C left in the tree by an older build is not used.
        return None, f"extension not built: {info.get('reason', 'unknown reason')}"
    mismatch = _extension.torch_mismatch(info, torch)
    if mismatch:
        return None, f"{mismatch}: not loaded; {REBUILD_HINT}"
    try:
        return _import_extension(), None
    except ImportError as exc:
        if info.get("extension") in ("cpu", "cuda"):
            return None, _import_failure(info, exc)
        return None, f"extension not built: {info.get('reason', 'unknown reason')}"


def _jit_extension(compile_missing: bool):
    """docqa_fast._extension's just-in-time build for this PyTorch: (module or None, why not or None)."""
    module, info, why = _extension.jit_extension(compile_missing)
    if module is not None:
        module.docqa_fast_build_info = info  # what backends() reports, instead of the installed _C's
    return module, why


@functools.cache
def _load_extension():
    """The extension once: the installed docqa_fast._C when it fits this PyTorch, else a just-in-time
    build of the same sources for it (docqa_fast._extension: from the cache; compiled first under
    DOCQA_FAST_JIT=1). Returns (module or None, reason when None)."""
    info = _build_info()
    module, reason = _installed_extension(info)
    if module is not None:
        return module, None
    setting = _extension.jit_setting()
    if setting == "off":
        return None, reason
    module, why = _jit_extension(compile_missing=setting == "compile")
    if module is not None:
        return module, None
    return None, reason + (f" (no just-in-time build either: {why})" if why else "")


def extension_build_info(module) -> dict:
    """The build info of a loaded extension: a just-in-time build's own, else the installed one's."""
    return getattr(module, "docqa_fast_build_info", None) or _build_info()


def warn_if_extension_unusable() -> str | None:
    """At import: an installed extension that does not fit this PyTorch or does not load, and for
    which no just-in-time build fits either, is said once, as an :class:`ExtensionWarning` naming
    both PyTorch builds and the fix; its ops run on the other backends. Returns what was said."""
    if _build_info().get("extension") not in ("cpu", "cuda"):
        return None
    module, reason = _load_extension()
    if module is not None:
        return None
    warnings.warn(f"{reason}. Until then its ops run on the Triton and reference backends (docqa_fast.backends()).",
                  ExtensionWarning, stacklevel=2)
    return reason


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
        status["extension"] = BackendStatus(False, reason)
    else:
        built = extension_build_info(module)
        # A just-in-time build says so, and where it is (the installed _C did not fit this PyTorch).
        where = f" (built just in time in {built['jit']})" if built.get("jit") else ""
        if not module.compiled_with_cuda():
            detail = f"C++ CPU twins only; {built.get('reason') or 'CUDA kernels not built'}"
        elif not torch.cuda.is_available():
            detail = "CUDA kernels built (no CUDA device here); C++ CPU twins run"
        else:
            detail = f"CUDA kernels on {torch.cuda.get_device_name()}"
        status["extension"] = BackendStatus(True, detail + where)
    return status


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when ``backend`` can run on tensors of ``device`` and ``dtype`` here, else why not."""
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
    if backend == "extension":
        module, reason = _load_extension()
        if module is None:
            return reason
        if device.type == "cuda" and not module.compiled_with_cuda():
            return f"docqa_fast._C has no CUDA kernels ({extension_build_info(module).get('reason', '')})"
        # (Decisions are also asked of a bare device type, on machines without a GPU.)
        if device.type == "cuda" and torch.cuda.is_available():
            archs = extension_build_info(module).get("cuda_archs")
            capability = torch.cuda.get_device_capability(device)
            if _extension.runs_on(archs, capability) is False:
                # Its launches would fail with "no kernel image is available": the next backend runs instead.
                return (f"docqa_fast._C's CUDA kernels were compiled for {';'.join(archs)}, not this GPU's "
                        f"{capability[0]}.{capability[1]} (rebuild with DOCQA_FAST_CUDA_ARCHS naming it; "
                        f"docs/install.md)")
        if device.type not in ("cuda", "cpu"):
            return f"docqa_fast._C has no kernels for {device.type} tensors"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value or value == "auto":
        return None
    value = _ALIASES.get(value, value)
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not a backend; expected one of {BACKENDS} or 'auto'")
    return value


# ---------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Implementation:
    """One way to compute an op: its backend, the function (the op's own signature), when it
    cannot compute a call (``eligible(*args) -> reason or None``), and whether it is the op's
    CPU fast path. An implementation from outside docqa_fast's backends (torch's cuDNN
    attention) also says why it cannot run on a device here: ``available(device) -> reason or
    None`` (ours answer through :func:`unavailable_reason`)."""

    backend: str
    run: Callable
    eligible: Callable[..., str | None] | None = None
    cpu: bool = False
    available: Callable[[torch.device], str | None] | None = None


@dataclass(frozen=True)
class Override:
    """An environment variable that forces one of an op family's implementations, read on every
    call like ``DOCQA_FAST_BACKEND`` (``DOCQA_FAST_ATTENTION=triton|cudnn|auto``): a backend
    name forces it (a ``RuntimeError`` where it cannot run the call), ``auto`` or unset leaves
    the choice to the table. Set together with ``DOCQA_FAST_BACKEND`` it must name the same
    implementation: two settings that disagree are an error, not a precedence rule."""

    env: str
    choices: tuple[str, ...]

    def choice(self) -> str | None:
        value = os.environ.get(self.env, "").strip().lower()
        if not value or value == "auto":
            return None
        if value not in self.choices:
            raise ValueError(f"{self.env}={value!r} is not one of {', '.join(self.choices)} or 'auto'")
        return value


@dataclass(frozen=True)
class Decision:
    """Which implementation runs a call, why, and for each other implementation why not (its
    eligibility or availability reason, or that it comes later in the order)."""

    op: str
    backend: str
    why: str
    others: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        lines = [f"{self.op}: {self.backend} ({self.why})"]
        lines += [f"  {backend}: {status}" for backend, status in self.others]
        return "\n".join(lines)


@dataclass
class Op:
    """An op's implementations in order of preference on CUDA tensors (the reference last).

    ``shape_class(*args) -> dict`` names the features of a call a tuned table's dispatch rules
    may select on (the attention ops: head dim, causal); ``override`` is the family's own
    forcing variable, if it has one."""

    name: str
    implementations: tuple[Implementation, ...]
    shape_class: Callable[..., dict] | None = None
    override: Override | None = None
    _by_backend: dict = field(init=False, repr=False)

    def __post_init__(self):
        backends_ = [i.backend for i in self.implementations]
        if backends_[-1] != "reference" or len(set(backends_)) != len(backends_):
            raise ValueError(f"{self.name}: implementations must be distinct, the reference last, got {backends_}")
        foreign = [i.backend for i in self.implementations if i.backend not in BACKENDS and i.available is None]
        if foreign:
            raise ValueError(f"{self.name}: {foreign} are not docqa_fast backends and need an availability rule "
                             f"(Implementation.available)")
        self._by_backend = {i.backend: i for i in self.implementations}
        if self.override is not None and not set(self.override.choices) <= set(self._by_backend):
            raise ValueError(f"{self.name}: {self.override.env} offers {self.override.choices}, not all of them "
                             f"implementations ({backends_})")

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self._by_backend)

    def implementation(self, backend: str) -> Implementation:
        return self._by_backend[backend]

    def _order(self, device, args) -> tuple[list[Implementation], str]:
        """The preference order for ``device`` and this call, and where it comes from: a tuned
        table's rule for this GPU and the call's shape class, or the registered order (also
        while torch.compile traces a call that dispatches in Python: no file reads there)."""
        if torch.compiler.is_compiling():
            return list(self.implementations), ""
        from .kernels import tuning

        rules = tuning.dispatch_rules(self.name, device)
        # The call's shape class is worked out only where a table has rules for the op.
        features = (self.shape_class(*args) if self.shape_class is not None else {}) if rules else {}
        rule = next((r for r in rules if r.matches(features)), None)
        if rule is None:
            return list(self.implementations), ""
        preferred = [_ALIASES.get(b, b) for b in rule.order]
        first = [self._by_backend[b] for b in preferred if b in self._by_backend]
        return first + [i for i in self.implementations if i not in first], rule.describe()

    def why_not(self, impl: Implementation, device, dtype, args) -> str | None:
        """Why ``impl`` cannot run this call: the call's own rule first (it needs no machine
        state, so it also decides while torch.compile traces), then availability here."""
        if impl.eligible is not None:
            reason = impl.eligible(*args)
            if reason:
                return reason
        if impl.available is not None:
            return impl.available(device)
        return unavailable_reason(impl.backend, device, dtype)

    def _forced(self) -> tuple[str | None, str]:
        """The implementation a variable forces for this op, and which variable says so."""
        backend = forced_backend()
        choice = self.override.choice() if self.override is not None else None
        if backend is not None and choice is not None and backend != choice:
            raise ValueError(f"{BACKEND_ENV}={backend} and {self.override.env}={choice} ask for different "
                             f"implementations of {self.name}: unset one of them")
        if choice is not None:
            return choice, f"{self.override.env}={choice}"
        return backend, f"{BACKEND_ENV}={backend}"

    def _choose(self, device, dtype, args) -> tuple[Implementation, str, dict[str, str]]:
        """(the implementation that runs this call, why in short, {backend: why not} of those
        passed over on the way to it)."""
        forced, setting = self._forced()
        if forced is not None:
            impl = self._by_backend.get(forced)
            if impl is None:
                # Never a fallback to another backend (the variable asked for this one): say which values run the op.
                runs = [b for b in self.backends if b in BACKENDS] + ["auto"]
                raise RuntimeError(f"{setting}: {self.name} has no {forced} implementation "
                                   f"(it has: {', '.join(self.backends)}); {BACKEND_ENV}={'|'.join(runs)} runs it")
            reason = self.why_not(impl, device, dtype, args)
            if reason:
                raise RuntimeError(f"{setting} cannot run {self.name} on {device.type} tensors: {reason}")
            return impl, f"forced by {setting}", {}
        order, source = self._order(device, args)
        passed: dict[str, str] = {}
        for impl in order:
            if impl.backend == "reference":
                break
            if device.type != "cuda" and not impl.cpu:
                passed[impl.backend] = f"not this op's path for {device.type} tensors"
                continue
            reason = self.why_not(impl, device, dtype, args)
            if reason:
                passed[impl.backend] = reason
                continue
            return impl, "first available and eligible" + (f" in {source}" if source else ""), passed
        return self._by_backend["reference"], "", passed

    def decide(self, device, dtype, args) -> tuple[Implementation, str]:
        """(the implementation that runs this call, why: with the reasons of those passed over)."""
        impl, why, passed = self._choose(device, dtype, args)
        skipped = "; ".join(f"{backend}: {reason}" for backend, reason in passed.items())
        if impl.backend == "reference" and not why:
            return impl, (skipped or "the only implementation") + " -> reference"
        return impl, why + (f" ({skipped})" if skipped else "")

    def decision(self, device, dtype, *args) -> Decision:
        """Which implementation runs this call and why, and why not each of the others: the call's
        own rule first (what would keep it out on any machine), then this device and machine.
        Asks every implementation, so it is for explaining, not for the hot path."""
        chosen, why, passed = self._choose(device, dtype, args)
        others = []
        for impl in self.implementations:
            if impl is chosen:
                continue
            status = ((impl.eligible and impl.eligible(*args)) or passed.get(impl.backend)
                      or self.why_not(impl, device, dtype, args))
            others.append((impl.backend, status or f"could run it; {chosen.backend} comes first"))
        return Decision(self.name, chosen.backend, why or "no other implementation can run it", tuple(others))

    def __call__(self, device, dtype, *args):
        """Run the call on the implementation :meth:`decide` picks."""
        impl, why = self.decide(device, dtype, args)
        for log in _LOGS:
            log.append((self.name, impl.backend, why))
        return impl.run(*args)

    def explain(self, device, dtype, *args) -> str:
        impl, why = self.decide(device, dtype, args)
        return f"{self.name} on {device.type} {str(dtype).removeprefix('torch.')}: {impl.backend} ({why})"


def dtype_rule(what: str, dtypes, note: str = "") -> Callable[..., str | None]:
    """An eligibility rule: the implementation takes its first argument in ``dtypes`` only."""
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    names = "/".join(short.get(d, str(d)) for d in dtypes)

    def eligible(first, *rest):
        if first.dtype not in dtypes:
            return f"{what} take {names}, got {first.dtype}{note}"
        return None

    return eligible


OPS: dict[str, Op] = {}
_LOGS: list[list] = []


def register_op(name: str, *implementations: Implementation, shape_class: Callable[..., dict] | None = None,
                override: Override | None = None) -> Op:
    """Add an op to the table (implementations in preference order, the reference last; see
    :class:`Op` for ``shape_class`` and ``override``)."""
    if name in OPS:
        raise ValueError(f"op {name!r} registered twice")
    op = OPS[name] = Op(name, tuple(implementations), shape_class=shape_class, override=override)
    return op


def dispatch_table() -> dict[str, tuple[str, ...]]:
    """Every registered op and its backends in order of preference on CUDA tensors."""
    return {name: op.backends for name, op in sorted(OPS.items())}


@contextlib.contextmanager
def dispatch_log():
    """Record every dispatch decision inside the block: ``[(op, backend, why), ...]``."""
    log: list = []
    _LOGS.append(log)
    try:
        yield log
    finally:
        # By identity: an outer log may hold equal entries.
        del _LOGS[next(i for i, active in enumerate(_LOGS) if active is log)]


# Checked when docqa_fast is imported, not at the first op that needs the extension: a PyTorch
# upgraded under a built extension is then said at once, not discovered as slower runs.
warn_if_extension_unusable()

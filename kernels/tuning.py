"""Per-GPU tile tables: the launch parameters of every Triton kernel, chosen by measurement.

A launcher asks :func:`launch` (or :func:`lookup`) for its kernel's parameters -- block
sizes, ``num_warps``, ``num_stages`` -- under a key that names the variant (``"D=128,tma"``).
The answer comes from, in order:

1. an :func:`override` in force (the tuning tool times candidates through the real launchers);
2. the tuned table of the running GPU, ``kernels/tuned/<arch>-triton<major>.<minor>.json``,
   written by ``python -m docqa_fast.tools.tune`` from timings on such a GPU: of the tables
   for the device's architecture (``sm90`` for an H100 / H200), the one whose Triton version
   is nearest the running one (tiles seldom move between neighbouring releases; one that
   no longer compiles falls back to the default, with a warning, see :func:`launch`);
3. the kernel's built-in default, passed by the launcher.

Nothing is timed at call time: a table is read once per process. Tables record, beside each
choice, the shape it was measured at and every candidate's time, so a choice can be
re-judged later. Why measurement and not the compile check: on the H200 the backward tiles
that compile without spills ran 3.6x slower than the fastest ones, which spill a little.

A table's ``dispatch`` section orders the implementations of dispatched ops on that GPU (read by
the dispatch table, ``docqa_fast/_backend.py``), written by the same tool from measurements:
``{op: [{"when": {feature: value or [values]}, "order": [backends], ...the measurement}]}``, the
first rule whose conditions the call's shape class meets applies (attention: ``layout``,
``head_dim``, ``causal``); no rule, the op's own order. A plain list of backends (the first
tables' form) is one rule for every call. :func:`dispatch_rule` answers for a call.

``DOCQA_FAST_TUNED_TABLE`` (read on every call): ``off`` ignores the tables; an architecture
(``sm90``) or a path to a table applies that table to every device, CPU tensors under the
Triton interpreter included -- how the tests run the tuned tiles without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

TUNED_DIR = Path(__file__).with_name("tuned")
TABLE_ENV = "DOCQA_FAST_TUNED_TABLE"
FORMAT = 1
_TABLE_NAME = re.compile(r"^(sm\d+)-triton(\d+)\.(\d+)\.json$")

# The tunable parameters of each kernel, declared by its module (see declare()).
_PARAMS: dict[str, tuple[str, ...]] = {}
_OVERRIDES: dict[tuple[str, str], dict] = {}
# (table path, kernel, key) whose tuned tiles failed to compile in this process: defaults from then on.
_FAILED: set[tuple[str, str, str]] = set()


def declare(kernel: str, params) -> None:
    """Declare ``kernel``'s tunable parameters (e.g. BLOCK_M, BLOCK_N, num_warps, num_stages):
    table entries with other names are refused, so a stale table cannot pass junk to a launch."""
    _PARAMS[kernel] = tuple(params)


def declared() -> dict[str, tuple[str, ...]]:
    return dict(_PARAMS)


def check_tiles(kernel: str, tiles) -> dict:
    """``tiles`` as a dict of ints if it is a valid parameter set for ``kernel``, else ValueError."""
    if kernel not in _PARAMS:
        raise ValueError(f"unknown tunable kernel {kernel!r}; known: {sorted(_PARAMS)}")
    if not isinstance(tiles, dict) or set(tiles) != set(_PARAMS[kernel]):
        raise ValueError(f"expected tiles of {kernel} with exactly the parameters {_PARAMS[kernel]}, got {tiles!r}")
    for name, value in tiles.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected {kernel} parameter {name} to be an int, got {value!r}")
        if name == "num_warps" and value not in (1, 2, 4, 8, 16):
            raise ValueError(f"expected {kernel} num_warps in (1, 2, 4, 8, 16), got {value}")
        elif name == "num_stages" and not 1 <= value <= 8:
            raise ValueError(f"expected {kernel} num_stages in [1, 8], got {value}")
        elif name.startswith("BLOCK_") and not (1 <= value <= 4096 and value & (value - 1) == 0):
            raise ValueError(f"expected {kernel} {name} to be a power of two <= 4096, got {value}")
        elif value < 1:
            raise ValueError(f"expected {kernel} {name} >= 1, got {value}")
    return {name: tiles[name] for name in _PARAMS[kernel]}


def triton_version() -> tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())


def device_arch(device) -> str | None:
    """``sm90`` for a CUDA device of compute capability 9.0; None for other devices."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def table_name(arch: str, version: tuple[int, int]) -> str:
    return f"{arch}-triton{version[0]}.{version[1]}.json"


def table_files(directory: Path = TUNED_DIR) -> dict[str, list[tuple[tuple[int, int], Path]]]:
    """Tables on disk by architecture: [((triton major, minor), path), ...]."""
    found: dict[str, list[tuple[tuple[int, int], Path]]] = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        match = _TABLE_NAME.match(path.name)
        if match:
            found.setdefault(match.group(1), []).append(((int(match.group(2)), int(match.group(3))), path))
    return found


def nearest_table(arch: str, version: tuple[int, int] | None = None, directory: Path = TUNED_DIR) -> Path | None:
    """The table of ``arch`` whose Triton version is nearest ``version`` (the running one);
    between two equally near, the newer."""
    version = version or triton_version()
    tables = table_files(directory).get(arch, [])
    if not tables:
        return None
    distance = lambda item: (abs(item[0][0] - version[0]), abs(item[0][1] - version[1]),  # noqa: E731
                             (-item[0][0], -item[0][1]))
    return min(tables, key=distance)[1]


def _declare_all() -> None:
    """Import every kernel module: each declares its tunable kernels when imported."""
    import importlib

    from . import KERNEL_MODULES

    for module in KERNEL_MODULES:
        importlib.import_module(f"{__package__}.{module}")


@functools.cache
def load_table(path: str) -> dict:
    """A table file as {kernel: {key: tiles}}; entries that fail check_tiles are dropped with a warning."""
    _declare_all()
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        warnings.warn(f"tuned table {path} has format {data.get('format')!r}, expected {FORMAT}: ignored")
        return {}
    table: dict[str, dict[str, dict]] = {}
    for kernel, entries in data.get("kernels", {}).items():
        for key, entry in entries.items():
            try:
                table.setdefault(kernel, {})[key] = check_tiles(kernel, entry.get("tiles"))
            except (ValueError, AttributeError) as exc:
                warnings.warn(f"tuned table {path}: {kernel}[{key}] ignored ({exc})")
    return table


@dataclass(frozen=True)
class DispatchRule:
    """One rule of a table's ``dispatch`` section: for calls of ``op`` whose shape class matches
    ``when``, try the implementations in ``order`` first (the rest follow in the op's own order)."""

    op: str
    when: tuple[tuple[str, object], ...]
    order: tuple[str, ...]
    table: str

    def matches(self, features: dict) -> bool:
        """Every condition holds: the call's feature equals the value, or is one of a list of values."""
        return all(name in features and (features[name] in value if isinstance(value, tuple)
                                         else features[name] == value) for name, value in self.when)

    def describe(self) -> str:
        shape = ", ".join(f"{name}={'|'.join(map(str, v)) if isinstance(v, tuple) else v}" for name, v in self.when)
        return f"the order of {Path(self.table).name} for {shape or 'every call'}: {', '.join(self.order)}"


def _rule(op: str, entry, path: str) -> DispatchRule:
    """A dispatch entry as a rule. Two forms: a list of backends (every call of the op; the first
    tables' form), or ``{"when": {feature: value or [values]}, "order": [backends], ...}`` (the
    measurement behind it rides along in the other keys)."""
    if isinstance(entry, list):
        entry = {"when": {}, "order": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"expected a rule object or a list of backends, got {entry!r}")
    when, order = entry.get("when", {}), entry.get("order")
    if not isinstance(when, dict) or not all(isinstance(v, (bool, int, str, list)) for v in when.values()):
        raise ValueError(f"expected 'when' as {{feature: value or [values]}}, got {when!r}")
    if not isinstance(order, list) or not order or not all(isinstance(b, str) for b in order):
        raise ValueError(f"expected 'order' as a non-empty list of backend names, got {order!r}")
    conditions = tuple((name, tuple(v) if isinstance(v, list) else v) for name, v in sorted(when.items()))
    return DispatchRule(op, conditions, tuple(order), path)


@functools.cache
def _dispatch_section(path: str) -> dict[str, tuple[DispatchRule, ...]]:
    """{op: its rules in the table's order}; a malformed rule is dropped with a warning."""
    rules: dict[str, list[DispatchRule]] = {}
    for op, entries in json.loads(Path(path).read_text()).get("dispatch", {}).items():
        # One list of backends is a single rule for every call; a list of objects, one rule each.
        items = [entries] if isinstance(entries, list) and all(isinstance(e, str) for e in entries) else entries
        for entry in items if isinstance(items, list) else [items]:
            try:
                rules.setdefault(op, []).append(_rule(op, entry, path))
            except ValueError as exc:
                warnings.warn(f"tuned table {path}: a dispatch rule of {op} ignored ({exc})")
    return {op: tuple(found) for op, found in rules.items()}


def dispatch_rules(op: str, device) -> tuple[DispatchRule, ...]:
    """The rules of the tuned table for ``device`` (its ``dispatch`` section, written from
    measurements such as cuDNN attention beating ours on a GPU) for ``op``, in order."""
    try:
        path = active_table_path(device)
    except ImportError:  # no Triton here: no table applies, whatever the extension can run
        return ()
    return _dispatch_section(path).get(op, ()) if path else ()


def dispatch_rule(op: str, device, features: dict | None = None) -> DispatchRule | None:
    """The first rule for ``op`` on ``device`` that covers a call with these shape-class
    ``features``, or None: the op's own order then holds."""
    return next((r for r in dispatch_rules(op, device) if r.matches(features or {})), None)


def dispatch_order(op: str, device, features: dict | None = None) -> tuple[str, ...] | None:
    """The backends a tuned table prefers for ``op`` on ``device`` (see :func:`dispatch_rule`), or None."""
    rule = dispatch_rule(op, device, features)
    return rule.order if rule else None


def reload() -> None:
    """Forget loaded tables (after the tuning tool writes one)."""
    load_table.cache_clear()
    _dispatch_section.cache_clear()
    _active_path.cache_clear()
    _FAILED.clear()


@functools.cache
def _active_path(arch: str | None, setting: str) -> str | None:
    if setting == "off":
        return None
    if setting:
        if _TABLE_NAME.match(Path(setting).name) or os.sep in setting or setting.endswith(".json"):
            if not Path(setting).is_file():
                raise ValueError(f"{TABLE_ENV}={setting!r}: no such table file")
            return str(Path(setting).resolve())
        if not re.fullmatch(r"sm\d+", setting):
            raise ValueError(f"{TABLE_ENV}={setting!r}: expected 'off', an architecture such as 'sm90', "
                             "or the path of a table file")
        arch = setting
    path = nearest_table(arch) if arch else None
    return str(path) if path else None


def active_table_path(device) -> str | None:
    """The table a launch on ``device`` reads, or None (built-in defaults)."""
    setting = os.environ.get(TABLE_ENV, "").strip()
    if setting.lower() == "off" or re.fullmatch(r"(?i)sm\d+", setting):
        setting = setting.lower()
    # A setting names the table itself: the device's architecture is not asked for.
    return _active_path(None if setting else device_arch(device), setting)


def lookup(kernel: str, key: str, default: dict, device) -> dict:
    """The parameters of ``kernel`` for variant ``key`` on ``device`` (see the module docstring)."""
    if (kernel, key) in _OVERRIDES:
        return dict(_OVERRIDES[kernel, key])
    path = active_table_path(device)
    if path is not None and (path, kernel, key) not in _FAILED:
        tiles = load_table(path).get(kernel, {}).get(key)
        if tiles is not None:
            return dict(tiles)
    return dict(default)


def _compile_error(exc: BaseException) -> bool:
    """Errors of compiling a variant (too much shared memory, ptxas or MLIR failures), after
    which another variant can still run; never errors of a launched kernel."""
    from triton.errors import TritonError

    return isinstance(exc, TritonError) or (isinstance(exc, RuntimeError) and "PassManager" in str(exc))


def launch(kernel: str, key: str, default: dict, device, run):
    """``run(tiles)`` with the parameters :func:`lookup` gives. If tuned tiles (not the default,
    not an override) fail to compile with the running Triton, warn once and run the default:
    a table measured with another Triton version must never break a call."""
    tiles = lookup(kernel, key, default, device)
    if tiles == dict(default) or (kernel, key) in _OVERRIDES:
        return run(tiles)
    try:
        return run(tiles)
    except Exception as exc:
        if not _compile_error(exc):
            raise
        _FAILED.add((active_table_path(device), kernel, key))
        warnings.warn(f"docqa_fast: tuned tiles {tiles} of {kernel}[{key}] do not compile with this Triton "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                      f"using the built-in {dict(default)}", RuntimeWarning, stacklevel=2)
        return run(dict(default))


@contextlib.contextmanager
def override(kernel: str, key: str, tiles: dict):
    """Launch ``kernel``'s variant ``key`` with ``tiles`` inside the block (the tuning tool's hook)."""
    tiles = check_tiles(kernel, tiles)
    previous = _OVERRIDES.get((kernel, key))
    _OVERRIDES[kernel, key] = tiles
    try:
        yield
    finally:
        if previous is None:
            del _OVERRIDES[kernel, key]
        else:
            _OVERRIDES[kernel, key] = previous


def tables_choices(kernel: str, key: str, arch: str = "sm90", directory: Path = TUNED_DIR) -> list[dict]:
    """Every tile set the tables of ``arch`` hold for ``kernel[key]`` (the Hopper compile check
    registers these beside the defaults, so it covers what launchers pick on Hopper)."""
    choices = []
    for _, path in table_files(directory).get(arch, []):
        tiles = load_table(str(path)).get(kernel, {}).get(key)
        if tiles is not None and tiles not in choices:
            choices.append(tiles)
    return choices


def as_tuple(kernel: str, tiles: dict) -> tuple[int, ...]:
    return tuple(tiles[name] for name in _PARAMS[kernel])


def as_dict(kernel: str, values) -> dict:
    return dict(zip(_PARAMS[kernel], values))

"""Test helpers shared by every op family: flash-attn's tolerance rule, inputs whose fp32 sum tells a
compensated reduction from a plain one, CUDA-graph capture, host-sync and dispatched-op watches, and a
test's tuned-table setting.

The rule (README.md, "Numerics and testing rule"): a kernel's max error against an exact (fp64) computation is
at most ``factor`` times the max error of the same computation done in plain PyTorch at the
kernel's precision -- 2x for forward outputs, 2-3x for gradients. NaN never passes, and
infinities must sit in the same places with the same sign.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _error_floor(exact: torch.Tensor, dtype: torch.dtype, magnitude: torch.Tensor | float | None = None) -> float:
    """A few units in the last place of ``dtype`` at the computation's magnitude: the exact result's,
    or ``magnitude`` (see :func:`allowed_error`) where that is larger.

    When the plain-PyTorch computation happens to be exact (fp32 inputs, say), 2x its error
    is 0 and a correct kernel that merely rounds in another order would fail; this floor is
    the rounding any implementation at ``dtype`` is entitled to.
    """
    scale = exact.abs().max().item() if exact.numel() else 0.0
    if isinstance(magnitude, torch.Tensor):
        magnitude = magnitude.double()
        magnitude = magnitude[torch.isfinite(magnitude)]
        magnitude = magnitude.abs().max().item() if magnitude.numel() else None
    if magnitude is not None:
        scale = max(scale, abs(float(magnitude)))
    return 4 * torch.finfo(dtype).eps * max(scale, 1.0)


def allowed_error(exact: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype, *, factor: float = 2.0,
                  magnitude: torch.Tensor | float | None = None) -> float:
    """The largest max error :func:`assert_close_by_rule` accepts from a kernel whose result has
    ``dtype``: ``factor`` x plain's error against ``exact``, plus the rounding floor (4 ulp of ``dtype``
    at the larger of the exact result's magnitude, 1, and ``magnitude``).

    ``magnitude`` is the size of the terms the computation reduces, or an upper bound of its
    intermediates, where it can exceed the result's: a sum that cancels is rounded at its terms'
    scale, not at its result's (an attention LSE of one key is q.k * scale, whose products can be
    far larger than the dot product), and when the plain computation happens to round exactly, the
    floor is all the kernel is allowed. A tensor (NaN and infinities ignored) or a number; None: the
    exact result's magnitude alone.
    """
    exact64 = exact.double()
    return factor * _plain_error(exact64, plain.double()) + _error_floor(exact64[torch.isfinite(exact64)], dtype,
                                                                          magnitude)


def _plain_error(exact64: torch.Tensor, plain64: torch.Tensor) -> float:
    """plain's max error against exact over exact's finite values (plain's NaN counted as 0)."""
    finite = torch.isfinite(exact64)
    return (plain64 - exact64)[finite].abs().nan_to_num(0.0).max().item() if finite.any() else 0.0


def assert_close_by_rule(actual: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, *,
                         factor: float = 2.0, name: str = "output",
                         magnitude: torch.Tensor | float | None = None) -> None:
    """Assert ``actual`` is within ``factor`` x the error of ``plain``, both against ``exact``.

    Args:
        actual: the kernel's result.
        exact: the same computation in fp64 (the ground truth).
        plain: the same computation in plain PyTorch at the kernel's precision.
        factor: 2 for outputs, 2-3 for gradients.
        name: what is compared, for the message.
        magnitude: the size of the reduced terms where it can exceed the result's, for the
            rounding floor (:func:`allowed_error`).
    """
    if actual.shape != exact.shape or plain.shape != exact.shape:
        raise AssertionError(f"{name}: shapes differ: actual {tuple(actual.shape)}, exact {tuple(exact.shape)}, "
                             f"plain {tuple(plain.shape)}")
    actual64, exact64, plain64 = actual.double(), exact.double(), plain.double()
    if torch.isnan(actual64).any():
        raise AssertionError(f"{name}: {int(torch.isnan(actual64).sum())} NaN values (NaN never passes)")
    if torch.isnan(exact64).any():
        raise AssertionError(f"{name}: the exact result has NaN: the test itself is wrong")
    inf_mismatch = torch.isinf(actual64) != torch.isinf(exact64)
    inf_mismatch |= torch.isinf(exact64) & (actual64 != exact64)
    if inf_mismatch.any():
        where = inf_mismatch.nonzero()[0].tolist()
        raise AssertionError(f"{name}: infinities differ from the exact result, first at {where}: "
                             f"got {actual64[tuple(where)].item()}, expected {exact64[tuple(where)].item()}")
    finite = torch.isfinite(exact64)
    error = (actual64 - exact64)[finite].abs().max().item() if finite.any() else 0.0
    allowed = allowed_error(exact64, plain64, actual.dtype, factor=factor, magnitude=magnitude)
    if not error <= allowed:
        plain_error = _plain_error(exact64, plain64)  # for the message only
        raise AssertionError(f"{name}: max error {error:.3g} > {factor} x plain-PyTorch error {plain_error:.3g} "
                             f"(+ rounding floor; allowed {allowed:.3g})")


def long_sum_terms(n_terms: int, device) -> torch.Tensor:
    """fp32 terms 1, d, d, ... whose sum drifts when accumulated block by block or term by term.

    Every 32 consecutive d add up to 0.4 ulp of 1: a running fp32 sum near 1 rounds each 32-term
    block (a K block of the kernels' fp32 tiles) away, so summing block after block loses 0.4 ulp
    per block -- ~100 ulp over 8192 terms -- and a single FMA chain (``acc += tl.dot(...)`` on a
    GPU) loses every term. A pairwise or compensated sum keeps them: exact is 1 + (n - 1) d.
    """
    terms = torch.full((n_terms,), 0.4 * torch.finfo(torch.float32).eps / 32, device=device)
    terms[0] = 1.0
    return terms


class CapturedGraph:
    """A CUDA graph captured from a function, and the outputs every replay writes into.

    ``fn`` stays referenced: the graph reads the tensors it closes over at fixed addresses, so they
    must live as long as the graph does.
    """

    def __init__(self, graph: Any, outputs: Any, fn: Callable[[], Any]):
        self.graph, self.outputs, self.fn = graph, outputs, fn

    def replay(self) -> Any:
        """Run the captured work again on the inputs' current values; the outputs (the same tensors
        each time, overwritten) are returned."""
        self.graph.replay()
        return self.outputs


def capture_cuda_graph(fn: Callable[[], Any], *, warmup: int = 1) -> CapturedGraph:
    """``fn()`` captured in a CUDA graph, after ``warmup`` calls on the stream the capture runs on.

    The warm-up is what a capture needs first: the calls compile the kernels and make the
    first-call allocations and host syncs (a checked call's value checks, the tuned-table
    lookups), none of which a capture may contain. It runs on the capture's own side stream
    because some lazy state is kept per stream (library handles and their workspaces) and must
    exist before the capture starts. ``fn`` takes no arguments (close over the inputs); to replay
    on new values, write them into those same tensors.
    """
    if not callable(fn):
        raise TypeError(f"expected fn to be callable, got {type(fn).__name__}")
    if isinstance(warmup, bool) or not isinstance(warmup, int):
        raise TypeError(f"expected warmup to be an int, got {type(warmup).__name__}")
    if warmup < 1:
        raise ValueError(f"expected warmup >= 1 (the first call compiles and syncs, which a capture cannot "
                         f"hold), got {warmup}")
    if not torch.cuda.is_available():
        raise RuntimeError("capture_cuda_graph needs a CUDA device: none is available")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        outputs = fn()
    return CapturedGraph(graph, outputs, fn)


@contextlib.contextmanager
def no_host_sync(mode: str = "error") -> Iterator[None]:
    """Within: every host synchronisation with the CUDA device (``.item()``, ``.tolist()``,
    ``nonzero``, a copy from pageable host memory, ...) raises (``mode="error"``) or warns
    (``"warn"``: count them with ``warnings.catch_warnings``), through
    ``torch.cuda.set_sync_debug_mode``; the mode before is restored on exit, however the block ends.
    Only syncs with a CUDA device exist: without one this is a RuntimeError, not a check that passes.
    """
    if mode not in ("error", "warn"):
        raise ValueError(f"expected mode 'error' or 'warn', got {mode!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("no_host_sync needs a CUDA device: none is available")
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class OpLog(TorchDispatchMode):
    """The aten ops dispatched under it, by name (``"aten.full.default"``), in call order: ``ops``.

    Outermost only: a custom op is logged as itself, its body is not entered. ``keep(name, args)``,
    when given, picks the ops to log (e.g. those that read tensor values on the host).
    """

    def __init__(self, keep: Callable[[str, tuple], bool] | None = None):
        super().__init__()
        self.ops: list[str] = []
        self.keep = keep

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.keep is None or self.keep(name, args):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def tuned_tables(monkeypatch: Any, setting: str | None = "off") -> Iterator[None]:
    """Within: the tuned-table setting (``DOCQA_FAST_TUNED_TABLE``) is ``setting`` -- ``"off"`` (the
    built-in tiles and choices), a table's name or path, or None (unset: the machine's own table).

    What the tuning module has loaded (table files by path, the setting's resolved table, tiles
    that failed to compile) is process-wide: it is forgotten on entry, so the test starts clean,
    and on exit, so the next test inherits nothing this one loaded, wrote or marked.
    ``monkeypatch`` (pytest's) restores the environment after the test.
    """
    from docqa_fast.kernels import tuning

    if setting is None:
        monkeypatch.delenv(tuning.TABLE_ENV, raising=False)
    else:
        monkeypatch.setenv(tuning.TABLE_ENV, setting)
    tuning.reload()
    try:
        yield
    finally:
        tuning.reload()

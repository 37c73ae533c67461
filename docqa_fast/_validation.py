"""Argument checks shared by every op family.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape,
device, layout) naming the argument and saying what was expected and what was given,
so bad input never reaches a kernel as an illegal memory access or a wrong answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ArgumentValueError(ValueError, RuntimeError):
    """A bad value as docqa_fast reports it (ValueError) that is also what flash-attn raises for
    the same input (RuntimeError, from its C++ checks), so code catching either keeps working."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A bad type or dtype (TypeError) that flash-attn reports as a RuntimeError."""


def raises_like_flash_attn(fn):
    """Re-raise ``fn``'s argument errors as exceptions that are also RuntimeErrors (same message,
    the original chained), for the flash-attn front ends."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ArgumentValueError, ArgumentTypeError):
            raise
        except ValueError as exc:
            raise ArgumentValueError(str(exc)) from exc
        except TypeError as exc:
            raise ArgumentTypeError(str(exc)) from exc

    return wrapper


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d) for d in dtypes)


def check_tensor(name: str, value, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndims: Sequence[int] | None = None) -> torch.Tensor:
    """``value`` is a tensor of one of ``dtypes`` with one of ``ndims`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"expected {name} of dtype {_dtype_names(dtypes)}, got {value.dtype}")
    if ndims is not None and value.dim() not in ndims:
        expected = " or ".join(str(n) for n in ndims)
        raise ValueError(f"expected {name} with {expected} dimensions, got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(value.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"expected {name} of shape {tuple(expected)}{hint}, got {tuple(value.shape)}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0]
    for name, tensor in zip(names[1:], tensors[1:]):
        if tensor.dtype != first.dtype:
            raise TypeError(f"expected {name} of dtype {first.dtype} (the dtype of {names[0]}), got {tensor.dtype}")


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0]
    for name, tensor in zip(names[1:], tensors[1:]):
        if tensor.device != first.device:
            raise ValueError(f"expected {name} on {first.device} (the device of {names[0]}), got {tensor.device}")


def check_last_dim_contiguous(name: str, value: torch.Tensor) -> None:
    """Kernels read rows with unit stride; other dimensions may have any strides."""
    if value.shape[-1] > 1 and value.stride(-1) != 1:
        raise ValueError(f"expected {name} with a contiguous last dimension (stride 1), "
                         f"got strides {tuple(value.stride())}")


# Process-wide, a plain module global (torch.compile guards on it; a ContextVar would break graphs).
_VALUE_CHECKS = True


def value_checks_enabled() -> bool:
    """Checks that read tensor values (one host sync each) run in eager mode only: not inside
    :func:`value_checks` ``(False)``, and not while a CUDA graph is being captured.

    Under ``torch.compile`` a value check would break the graph (or fail with
    ``fullgraph=True``), so compiled code skips them: validate inputs eagerly once.
    """
    return _VALUE_CHECKS and not torch.compiler.is_compiling() and not _capturing_cuda_graph()


def _capturing_cuda_graph() -> bool:
    # A host sync during capture is an error: validate once eagerly, then capture.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class value_checks:
    """Turns the checks that read tensor values (cu_seqlens, cache lengths, block tables,
    positions, labels: the ones that cost a host sync) off or on, process-wide; as a context
    manager it restores the previous setting on exit.

    A serving or training loop whose inputs are built by trusted code calls
    ``with docqa_fast.value_checks(False):`` so that no call waits for the GPU. Shape, dtype and
    device checks still run. What a value check would refuse becomes the caller's precondition,
    exactly as under torch.compile (docs/errors.md lists them): input that breaks one may give a
    wrong answer or read out of bounds.
    """

    def __init__(self, enabled: bool):
        if not isinstance(enabled, bool):
            raise TypeError(f"expected enabled to be a bool, got {enabled!r}")
        global _VALUE_CHECKS
        self._previous, _VALUE_CHECKS = _VALUE_CHECKS, enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _VALUE_CHECKS
        _VALUE_CHECKS = self._previous
        return False


def check_cu_seqlens(name: str, cu_seqlens, total: int, like: torch.Tensor, like_name: str, *,
                     dtypes: Sequence[torch.dtype] = (torch.int32,), min_entries: int = 1,
                     empty_sequences: bool = True, max_seqlen: int | None = None,
                     max_name: str = "max_seqlen", values: bool = True) -> torch.Tensor | None:
    """Packed-batch boundaries: 1-D, on ``like``'s device, starting at 0, ending at ``total``,
    non-decreasing (strictly increasing when ``empty_sequences`` is False); with ``max_seqlen``,
    no sequence longer than it (``max_name`` in the message).

    Returns the sequence lengths, or None when the value checks are skipped: under
    ``torch.compile`` or ``value_checks(False)``, or ``values=False`` (a caller's ``check=False``:
    the layout only, nothing read); they cost one host sync in eager mode. A caller that reads
    other figures too folds them into one sync with :func:`cu_seqlens_figures` and
    :func:`check_cu_seqlens_figures` (the same rule; the layout first, ``values=False``).
    """
    check_tensor(name, cu_seqlens, dtypes=dtypes, ndims=(1,))
    check_same_device((like_name, name), (like, cu_seqlens))
    if cu_seqlens.numel() < min_entries:
        raise ValueError(f"expected {name} with at least {min_entries} entries (0 ... the token count), "
                         f"got {cu_seqlens.numel()}")
    if not (values and value_checks_enabled()):
        return None
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    figures = cu_seqlens_figures(cu_seqlens)
    # Every figure in one read (one host sync): the ends, the shortest and the longest sequence.
    read = dict(zip(figures, torch.stack(list(figures.values())).tolist()))
    check_cu_seqlens_figures(name, read, total, cu_seqlens, lengths, empty_sequences=empty_sequences,
                             max_seqlen=max_seqlen, max_name=max_name)
    return lengths


_BOUNDARY_FIGURES = ("first", "last", "shortest", "longest")


def cu_seqlens_figures(cu_seqlens: torch.Tensor, prefix: str = "") -> dict:
    """What :func:`check_cu_seqlens` judges, as 0-dim int64 device tensors (no host sync), so that
    a caller reads them together with its other figures in one sync: the first and last boundary,
    and, with a sequence or more, the shortest and longest sequence. The lengths are taken in
    int64: int32 differences wrap (boundaries 2**31 - 1 then -2 gave a "length" of 2**31 - 1, and
    a negative boundary passed). Keys: ``prefix`` + first, last, shortest, longest."""
    wide = cu_seqlens.long()
    lengths = wide[1:] - wide[:-1]
    figures = (wide[0], wide[-1]) + ((lengths.min(), lengths.max()) if lengths.numel() else ())
    return {prefix + key: figure for key, figure in zip(_BOUNDARY_FIGURES, figures)}


def check_cu_seqlens_figures(name: str, read: dict, total: int, cu_seqlens: torch.Tensor, lengths: torch.Tensor,
                             prefix: str = "", *, empty_sequences: bool = True, max_seqlen: int | None = None,
                             max_name: str = "max_seqlen") -> None:
    """:func:`check_cu_seqlens`'s value rule on the figures of :func:`cu_seqlens_figures`, read on
    the host (``read``: a dict with at least those keys). A message shows the first boundaries or
    lengths, read only then."""
    figures = [read[prefix + key] for key in _BOUNDARY_FIGURES if prefix + key in read]
    _check_boundary_figures(name, figures, total, empty_sequences, max_seqlen, max_name,
                            lambda: cu_seqlens[:16].tolist(), lambda: lengths[:16].tolist())


def check_cu_seqlens_values(name: str, boundaries: Sequence[int], total: int, *, empty_sequences: bool = True,
                            max_seqlen: int | None = None, max_name: str = "max_seqlen") -> None:
    """:func:`check_cu_seqlens`'s value rule on boundaries already read to the host (a caller that
    reads them with other values in one transfer: ring attention). Its layout checks
    (``values=False``) come first, on the tensor."""
    lengths = [b - a for a, b in zip(boundaries, boundaries[1:])]
    figures = [boundaries[0], boundaries[-1]] + ([min(lengths), max(lengths)] if lengths else [])
    _check_boundary_figures(name, figures, total, empty_sequences, max_seqlen, max_name,
                            lambda: list(boundaries[:16]), lambda: lengths[:16])


def _check_boundary_figures(name, figures, total, empty_sequences, max_seqlen, max_name, shown, shown_lengths):
    """The value rule of cu_seqlens from (first, last[, shortest, longest]); ``shown()`` and
    ``shown_lengths()`` give the first boundaries and lengths for a message (read only then)."""
    first, last, *extremes = figures
    if first != 0 or last != total:
        raise ValueError(f"expected {name} to start at 0 and end at the token count {total}, got {first} ... {last}")
    if extremes and empty_sequences and extremes[0] < 0:
        raise ValueError(f"expected {name} to be non-decreasing, got {shown()}")
    if extremes and not empty_sequences and extremes[0] <= 0:
        raise ValueError(f"expected {name} strictly increasing (every sequence needs a token), "
                         f"got lengths {shown_lengths()}")
    if extremes and max_seqlen is not None and extremes[1] > max_seqlen:
        raise ValueError(f"expected {max_name} >= every sequence length, got {max_seqlen} < {extremes[1]}")


# Sizes the kernels index with int32 arithmetic (grids, offsets): a larger one would wrap.
INT32_LIMIT = 2 ** 31 - 1


def check_int(name: str, value, *, minimum: int = 0, maximum: int = INT32_LIMIT) -> int:
    """A Python (or NumPy) integer in [minimum, maximum]: ``TypeError`` for a float, a bool or
    anything else, ``ValueError`` out of range. Symbolic ints (torch.compile) pass unchecked."""
    import operator

    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool):
        raise TypeError(f"expected {name} to be an int, got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"expected {name} to be an int, got {type(value).__name__} {value!r}") from None
    if not minimum <= number <= maximum:
        raise ValueError(f"expected {name} in [{minimum}, {maximum}], got {number}")
    return number


def check_real(name: str, value, *, minimum: float | None = None, positive: bool = False,
               allow_inf: bool = False) -> float:
    """A real Python number (not a bool, not a tensor), not NaN, finite unless ``allow_inf``,
    >= ``minimum`` (> 0 with ``positive``): ``TypeError`` / ``ValueError`` naming ``name``.
    Symbolic floats, and anything while torch.compile traces, pass unchecked: with dynamic
    shapes Dynamo may trace a Python float as a symbolic one, and math.isnan on it breaks the
    graph; eager calls (and a compiled function's first, eager-checked use) do the checking."""
    import math
    import numbers

    if isinstance(value, (torch.SymFloat, torch.SymInt)) or torch.compiler.is_compiling():
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected {name} to be a Python number (a real), got {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise ValueError(f"expected a finite {name}, got {number}")
    if positive and not number > 0:
        raise ValueError(f"expected {name} > 0, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {number}")
    return number

"""Kinds of bad input, made from a valid call by replacing one argument.

A function's cases start from ``valid()`` -- a fresh dict of keyword arguments that the
function accepts -- and each kind replaces one argument with a bad value derived from the
valid one. The cases of every family use these, so "wrong dtype" or "wrong device" means the
same thing everywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable

import torch

from .harness import Case

DROP = object()  # as a bad value: leave the argument out


def call_with(fn: Callable, valid: Callable[[], dict], arg: str | None, make: Callable[[dict], Any]):
    """A call of ``fn`` on ``valid()`` with ``arg`` replaced by ``make(valid arguments)``
    (``arg`` None: ``make`` edits the dict itself)."""
    def call():
        kwargs = valid()
        if arg is None:
            make(kwargs)
        else:
            value = make(kwargs)
            if value is DROP:
                kwargs.pop(arg)
            else:
                kwargs[arg] = value
        return fn(**kwargs)

    return call


def cases_for(label: str, fn: Callable, valid: Callable[[], dict], kinds, *, op: str | None = None,
              **common) -> list[Case]:
    """One Case per (kind, arg, make, error[, names]) in ``kinds``; the message must name ``arg``
    unless ``names`` says which names count. Bad input must be refused on every backend, before
    the dispatch asks whether the forced one implements the op; a call that must return
    (``error`` None) runs on the backends the dispatch table lists for ``op``."""
    out = []
    for entry in kinds:
        kind, arg, make, error = entry[:4]
        names = entry[4] if len(entry) > 4 else ((arg,) if arg else ())
        backends = implemented(op) if error is None and op is not None else None
        out.append(Case(f"{label}/{kind}/{arg}", call_with(fn, valid, arg, make), error, tuple(names), kind=kind,
                        backends=backends, **common))
    return out


def implemented(op: str) -> tuple[str, ...]:
    from docqa_fast import dispatch_table

    return dispatch_table()[op]


@contextlib.contextmanager
def forced(backend: str):
    """Run a valid call (building another case's inputs) on ``backend`` whatever the case forces."""
    saved = os.environ.get("DOCQA_FAST_BACKEND")
    os.environ["DOCQA_FAST_BACKEND"] = backend
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DOCQA_FAST_BACKEND")
        else:
            os.environ["DOCQA_FAST_BACKEND"] = saved


# ------------------------------------------------------------------ kinds of a tensor argument

def _other_float(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype != torch.float64 else torch.float32


def _presence_rank_device_kinds(arg: str, *, optional: bool, rank: bool, device_mix: bool) -> list[tuple]:
    """The kinds every tensor argument shares: None (when required), one dimension too many,
    and a tensor on another device (``meta``: a second device on any machine)."""
    kinds = []
    if not optional:
        kinds.append(("none", arg, lambda kw: None, TypeError))
    if rank:
        kinds.append(("rank", arg, lambda kw: kw[arg][None], ValueError))
    if device_mix:
        kinds.append(("device-mix", arg, lambda kw: kw[arg].to("meta"), ValueError))
    return kinds


def float_tensor_kinds(arg: str, *, device_mix: bool = True, rank: bool = True, optional: bool = False,
                       strided: bool = False) -> list[tuple]:
    """A floating-point tensor argument: a dtype it does not take, integers, a list, None (when
    required), one dimension too many, and (``device_mix``) a tensor on another device (``meta``:
    a second device on any machine)."""
    kinds = [
        ("dtype", arg, lambda kw: kw[arg].to(_other_float(kw[arg])), TypeError),
        ("int-for-float", arg, lambda kw: kw[arg].to(torch.int32), TypeError),
        ("bool-tensor", arg, lambda kw: kw[arg] != 0, TypeError),
        ("list-for-tensor", arg, lambda kw: kw[arg].tolist(), TypeError),
    ] + _presence_rank_device_kinds(arg, optional=optional, rank=rank, device_mix=device_mix)
    if strided:
        kinds.append(("strided-last-dim", arg, lambda kw: _last_dim_strided(kw[arg]), ValueError))
    return kinds


def int_tensor_kinds(arg: str, dtype: torch.dtype, *, device_mix: bool = True, rank: bool = True,
                     optional: bool = False) -> list[tuple]:
    """An integer tensor argument: floats, the other integer width, bool, a list, None (when
    required), a dimension too many, another device."""
    other = torch.int64 if dtype == torch.int32 else torch.int32
    return [
        ("float-for-int", arg, lambda kw: kw[arg].float(), TypeError),
        ("int-width", arg, lambda kw: kw[arg].to(other), TypeError),
        ("bool-tensor", arg, lambda kw: kw[arg] != 0, TypeError),
    ] + _presence_rank_device_kinds(arg, optional=optional, rank=rank, device_mix=device_mix)


def _last_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with a last-dimension stride of 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def narrowed(t: torch.Tensor, dim: int, by: int = 1) -> torch.Tensor:
    return t.narrow(dim, 0, t.shape[dim] - by)


# ------------------------------------------------------------------ kinds of a scalar argument

def positive_float_kinds(arg: str, *, zero_ok: bool = False) -> list[tuple]:
    """A float that must be finite and > 0 (>= 0 with ``zero_ok``)."""
    kinds = [
        ("nan", arg, lambda kw: math.nan, ValueError),
        ("inf", arg, lambda kw: math.inf, ValueError),
        ("negative", arg, lambda kw: -0.5, ValueError),
        ("str-for-float", arg, lambda kw: "0.5", TypeError),
        ("tensor-for-float", arg, lambda kw: torch.tensor(0.5), TypeError),
    ]
    if not zero_ok:
        kinds.append(("zero", arg, lambda kw: 0.0, ValueError))
    return kinds


def int_kinds(arg: str, *, negative: bool = True) -> list[tuple]:
    """A Python int argument: a float, a bool, a string, (``negative``) a negative value."""
    kinds = [
        ("float-for-int", arg, lambda kw: float(kw[arg]) + 0.5, TypeError),
        ("bool-for-int", arg, lambda kw: True, TypeError),
        ("str-for-int", arg, lambda kw: str(kw[arg]), TypeError),
    ]
    if negative:
        kinds.append(("negative", arg, lambda kw: -3, ValueError))
    return kinds

"""The fused implementation behind the loss ops: which rows and vocabulary tiles it computes, and who
multiplies.

Rows. A token whose label is ``ignore_index`` counts for nothing (its statistics are 0 and its
coefficients are 0), so it is left out of every product: the counted rows are gathered first
(one host sync to learn how many; Cut Cross-Entropy does the same) when at least 1 in
COMPACT_FRACTION rows is ignored -- a long prompt before a short answer costs only the
answer's products. The backward likewise leaves out rows whose coefficients are all 0 (ignored
tokens, masked positions of ``sequence_logprobs``).

Vocabulary tiles (the skip filter). The forward records, per LOG_P_TILE columns, an upper bound
of log p over the counted tokens. The backward leaves out a tile when every softmax value in
it is below tau = u / (4 max(N, V)) (u: the unit roundoff of the inputs' dtype, 2^-8 for bf16),
no counted label falls in it and no row has a gradient on the sum of the logits (label
smoothing adds one to every column). What it leaves out is, per token, a probability mass
below u / 4 in all -- each skipped term of dL/dz below tau (|a| + |b| |ln tau|) -- under a
quarter of the rounding of the gradient's own scale; per vocabulary row, N terms below tau.
It pays in trained models, whose softmax puts e^-19 and less (bf16 at 152K columns) on most of
the vocabulary; on random weights nothing is skipped.

Settings, read on every call: ``DOCQA_FAST_LOSSES_SKIP`` = ``on`` (default: both), ``ignored``
(rows only), ``off`` (nothing left out: no host syncs at all; also what happens while a CUDA
graph is being captured); ``DOCQA_FAST_LOSSES_PRODUCTS`` = ``cublas`` (library matmuls,
``chunked.py``), ``triton`` (the all-Triton path, ``kernels.losses``) or ``auto`` (default: the
tuned table's choice for this GPU and dtype, else library products where torch offers fp32
output for 16-bit matmuls); ``DOCQA_FAST_LOSSES_CHUNK_MIB``: the chunk budget (chunked.py);
``DOCQA_FAST_LOSSES_ROUTE`` = ``recompute`` (the statistics forward, a backward that recomputes
the logits), ``fwd-grad`` (a "mean" / "sum" cross-entropy that needs gradients computes them in
its forward: forward_grad.py) or ``auto`` (default: the tuned table's ``losses_route``, else
``recompute``).
"""

from __future__ import annotations

import math
import os

import torch

from .._validation import value_checks_enabled
from ..kernels import losses as kernels
from . import chunked

SKIP_ENV = "DOCQA_FAST_LOSSES_SKIP"
SKIP_MODES = ("on", "ignored", "off")
PRODUCTS_ENV = "DOCQA_FAST_LOSSES_PRODUCTS"
PRODUCTS = ("cublas", "triton", "auto")
ROUTE_ENV = "DOCQA_FAST_LOSSES_ROUTE"
ROUTES = ("recompute", "fwd-grad", "auto")
# Rows are gathered when at least 1 in COMPACT_FRACTION is ignored: the gather copies the
# counted rows of hidden (and the backward scatters d_hidden back), worth it from ~3% saved.
COMPACT_FRACTION = 32


def skip_mode() -> str:
    """The ``DOCQA_FAST_LOSSES_SKIP`` setting (see the module docstring)."""
    value = os.environ.get(SKIP_ENV, "").strip().lower() or "on"
    if value not in SKIP_MODES:
        raise ValueError(f"{SKIP_ENV}={value!r}: expected one of {SKIP_MODES}")
    return value


def products(device: torch.device, dtype: torch.dtype, tiles: dict) -> str:
    """``"cublas"`` or ``"triton"``: who multiplies this call (see the module docstring)."""
    value = os.environ.get(PRODUCTS_ENV, "").strip().lower() or "auto"
    if value not in PRODUCTS:
        raise ValueError(f"{PRODUCTS_ENV}={value!r}: expected one of {PRODUCTS}")
    reason = chunked.unavailable_reason(device, dtype)
    if value == "cublas":
        if reason:
            raise RuntimeError(f"{PRODUCTS_ENV}=cublas cannot run on {device.type} {dtype}: {reason}")
        return "cublas"
    if value == "triton" or tiles["PRODUCTS"] == kernels.TRITON_PRODUCTS or reason:
        return "triton"
    return "cublas"


@torch.compiler.assume_constant_result  # torch.compile reads it once, when it traces (no file reads in the graph)
def route(device: torch.device, dtype: torch.dtype) -> str:
    """``"recompute"`` or ``"fwd-grad"``: the route of a loss whose upstream gradient is one scalar
    (see the module docstring); the tuned table's ``losses_route`` under ``auto``."""
    value = os.environ.get(ROUTE_ENV, "").strip().lower() or "auto"
    if value not in ROUTES:
        raise ValueError(f"{ROUTE_ENV}={value!r}: expected one of {ROUTES}")
    if value != "auto":
        return value
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "recompute"
    tiles = kernels.tiles("losses_route", dtype, device)
    return "fwd-grad" if tiles["ROUTE"] == kernels.FORWARD_GRAD_ROUTE else "recompute"


def counted_rows(mask: torch.Tensor):
    """Indices of the True rows when at least 1 in COMPACT_FRACTION is False, else None (one host sync)."""
    rows = mask.nonzero().squeeze(1)
    skipped = mask.shape[0] - rows.shape[0]
    return rows if skipped and skipped >= mask.shape[0] // COMPACT_FRACTION else None


def rows_to_compute(counted: torch.Tensor, skip: str):
    """counted_rows(counted) where the skip filter is on and a host sync is allowed, else None."""
    return counted_rows(counted) if skip != "off" and counted.shape[0] and value_checks_enabled() else None


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The computed rows' values back in place among n_rows, 0 in the rows left out."""
    return values.new_zeros((n_rows, *values.shape[1:])).index_copy_(0, rows, values)


def run_with_tiles(dtype, device, run):
    """run(tiles, engine) with the tuned (or built-in) losses_chunks tiles of this GPU and dtype."""
    return kernels.launch_tiles("losses_chunks", dtype, device, lambda t: run(t, products(device, dtype, t)))


def logit_stats(hidden, weight, bias, labels, ignore_index: int, temperature: float, log_p_tile: int):
    """The triton implementation of linear_logit_stats: the four statistics (0 on ignored rows)
    and the log p bound per ``log_p_tile`` columns (-inf where no counted token reaches a tile)."""
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    skip = skip_mode()
    counted = labels != ignore_index
    rows = rows_to_compute(counted, skip)
    if rows is not None:
        hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    # Recorded when tiles may be skipped; 0 (p <= 1: nothing negligible) otherwise.
    bound = torch.full((-(-vocab // log_p_tile),), -math.inf if skip == "on" else 0.0, device=hidden.device)

    def run(tiles, engine):
        record = bound if skip == "on" else None
        if engine == "cublas":
            return chunked.logit_stats(hidden, weight, bias, labels, ignore_index, temperature, record, tiles)
        return kernels.logit_stats(hidden, weight, bias, labels, ignore_index, temperature, record, log_p_tile)

    stats = run_with_tiles(hidden.dtype, hidden.device, run)
    if rows is not None:
        stats = [scatter_rows(s, rows, n_rows) for s in stats]
    else:  # fresh tensors either way: a custom op's outputs may not alias each other
        stats = [torch.where(counted, s, 0.0) for s in stats]
    return (*stats, bound)


def kept_tiles(bound, labels, coefs, dtype: torch.dtype, n_rows: int, vocab: int, log_p_tile: int):
    """(n_tiles,) bool on the device: the vocabulary tiles the backward must compute (see the
    module docstring); ``labels`` and ``coefs`` of the rows that have a gradient."""
    unit_roundoff = torch.finfo(dtype).eps / 2
    log_tau = math.log(unit_roundoff / 4) - math.log(max(n_rows, vocab, 1))
    keep = bound >= log_tau
    n_tiles = keep.shape[0]
    # The tiles of the labels (their c [j == y] term is not small), without a host sync: labels
    # outside [0, V) (ignored, or unchecked bad input: they match no column) go to an extra slot.
    in_range = (labels >= 0) & (labels < vocab)
    slots = torch.where(in_range, labels // log_p_tile, n_tiles)
    holds_label = torch.zeros(n_tiles + 1, dtype=torch.bool, device=keep.device).index_fill_(0, slots, True)
    # A gradient on the sum of the logits (label smoothing) reaches every column.
    return keep | holds_label[:n_tiles] | (coefs[3] != 0).any()


def _column_runs(keep: torch.Tensor, vocab: int, log_p_tile: int):
    """Consecutive kept tiles as (start, end) column ranges (one host sync)."""
    runs, start = [], None
    for tile, kept in enumerate(keep.tolist() + [False]):
        if kept and start is None:
            start = tile
        elif not kept and start is not None:
            runs.append((start * log_p_tile, min(vocab, tile * log_p_tile)))
            start = None
    return runs


def logit_stats_backward(hidden, weight, bias, labels, lse, coefs, bound, ignore_index: int, temperature: float,
                         need_hidden: bool, need_weight: bool, need_bias: bool, log_p_tile: int):
    """The triton implementation of linear_logit_stats_backward (rows without a gradient and
    negligible vocabulary tiles left out, see the module docstring)."""
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    skip = skip_mode()
    rows, runs = None, [(0, vocab)]
    if skip != "off" and n_rows and value_checks_enabled():
        active = (coefs != 0).any(0)
        rows = counted_rows(active)
        if rows is not None:
            hidden, labels, lse, coefs = (hidden.index_select(0, rows), labels.index_select(0, rows),
                                          lse.index_select(0, rows), coefs.index_select(1, rows))
        if skip == "on":
            keep = kept_tiles(bound, labels if rows is not None else torch.where(active, labels, -1), coefs,
                              hidden.dtype, hidden.shape[0], vocab, log_p_tile)
            runs = _column_runs(keep, vocab, log_p_tile)

    def run(tiles, engine):
        if engine == "cublas":
            return chunked.logit_stats_backward(hidden, weight, bias, labels, lse, coefs, ignore_index, temperature,
                                                need_hidden, need_weight, need_bias, runs, tiles)
        return kernels.logit_stats_backward(hidden, weight, bias, labels, lse, coefs, ignore_index, temperature,
                                            need_hidden, need_weight, need_bias, runs)

    d_hidden, d_weight, d_bias = run_with_tiles(hidden.dtype, hidden.device, run)
    if rows is not None and need_hidden:
        d_hidden = scatter_rows(d_hidden, rows, n_rows)
    return d_hidden, d_weight, d_bias

"""The fused losses with library products: torch.mm (cuBLAS) multiplies, Triton streams the chunks.

Three matrix products are nearly all the work of a fused linear loss -- the logits z = h W^T,
d_hidden = G W and d_weight = G^T h (G = dL/dz) -- and on the H200 cuBLAS multiplies bf16 at
~750 TFLOP/s where the Triton matmuls of kernels/losses.py reached ~300. Here the products are
``torch.mm`` calls on chunks of tokens x vocabulary columns, written into one reused buffer,
and the Triton chunk kernels do the rest in one pass over each chunk:

* forward: z chunk = h[rows] @ W[cols]^T; ``chunk_stats`` folds it into the online log-sum-exp,
  label logit, logit sum and entropy of its rows (and the log p bound of the skip filter);
* backward: the z chunk again; ``chunk_grad`` turns it into G = dL/dz / scale (16-bit for 16-bit
  inputs, in place for fp32); then d_weight[cols] (+)= G^T @ h[rows] and d_hidden[rows] (+)=
  G @ W[cols] -- 4 products in all, against 3 for a path that keeps the logits.

Precision: 16-bit products come out in fp32 (``torch.mm(..., out_dtype=torch.float32)``: exact
16-bit products summed in fp32, as the Triton tiles do), so the logits are never rounded to
16 bits and the gradients are summed across chunks in fp32. fp32 inputs multiply in IEEE fp32:
TF32 is switched off around the products, whatever the caller set. On CPU tensors (the
interpreter tests) the 16-bit products run as fp32 matmuls of the upcast operands: the same sums.

Memory beyond inputs and gradients (:func:`plan_chunks`): the chunk buffer -- rows x columns x
4 bytes, + 2 for the 16-bit G -- sized from :func:`chunk_budget`; one fp32 accumulator for the
gradient that sums across chunks, the smaller of the two: d_hidden (N x H) when N <= V (the
backward then walks the vocabulary outside, and each column chunk's d_weight rows are written
once), else d_weight (V x H) (the tokens outside); and a chunk-sized fp32 accumulator of the
other gradient. fp32 inputs accumulate in the gradients themselves.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

from ..kernels import losses as kernels
from .ops import gradients_dtype, scaled_copy

CHUNK_ENV = "DOCQA_FAST_LOSSES_CHUNK_MIB"
# The chunk budget without the setting: 1/CHUNK_FRACTION of the (N, V) logits in the inputs'
# dtype (what the naive path holds at least once), at least CHUNK_FLOOR (a short answer runs as
# one chunk: no launch-bound slivers) and at most CHUNK_CAP (at 128K tokens through Qwen2.5's
# head: 1 GiB, 119 chunks of 1,280 columns, each product still a large matmul).
CHUNK_FRACTION = 8
CHUNK_FLOOR = 32 << 20
CHUNK_CAP = 1 << 30
# Chunks have whole multiples of these: rows a matmul tile's, columns the log p bound's tiles.
ROW_GRAIN = 64
COLUMN_GRAIN = kernels.LOG_P_TILE
# The fallback accumulation (old torch without fp32 accumulation into fp32) goes this many
# bytes of fp32 product at a time.
_FALLBACK_SLICE_BYTES = 64 << 20
# The forward-gradient route (stats_and_grads): its budget is 1/FORWARD_GRAD_FRACTION of the
# rows' (N, V) logits in the inputs' dtype (the naive path holds the logits, their fp32 upcast
# and their gradient: ~6x that; a tenth of it is the target), at least FORWARD_GRAD_FLOOR (a
# short answer is one chunk, not launch-bound slivers: ~750 rows through Qwen2.5's head) and at
# most FORWARD_GRAD_CAP; a bf16 d_weight sums in the gradient itself over at most
# MAX_ROUNDED_CHUNKS chunks (each a rounding).
FORWARD_GRAD_FRACTION = 2
FORWARD_GRAD_FLOOR = 256 << 20
FORWARD_GRAD_CAP = 4 << 30
MAX_ROUNDED_CHUNKS = 4


def _budget_setting() -> int | None:
    """``DOCQA_FAST_LOSSES_CHUNK_MIB`` in bytes, or None when it is not set."""
    setting = os.environ.get(CHUNK_ENV, "").strip()
    if not setting:
        return None
    try:
        mib = float(setting)
    except ValueError:
        mib = float("nan")
    if not mib > 0:
        raise ValueError(f"{CHUNK_ENV}={setting!r}: expected a positive number of MiB")
    return int(mib * (1 << 20))


def chunk_budget(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Bytes the chunk buffers may take: ``DOCQA_FAST_LOSSES_CHUNK_MIB`` when set, else the rule above."""
    setting = _budget_setting()
    if setting is not None:
        return setting
    logits = n_rows * vocab * dtype.itemsize
    return max(CHUNK_FLOOR, min(CHUNK_CAP, logits // CHUNK_FRACTION))


@dataclass(frozen=True)
class GradPlan:
    """How the forward-gradient route (:func:`stats_and_grads`) cuts a call: ``rows`` per chunk,
    each chunk's products written ``columns`` of fp32 at a time (16-bit inputs; fp32 inputs: the
    whole vocabulary at once), and whether d_weight sums in a (V, H) fp32 ``accumulator`` or in
    the gradient itself (see :func:`forward_grad_plan`)."""

    rows: int
    columns: int
    accumulator: bool

    def row_chunks(self, n_rows: int):
        return [(r0, min(n_rows, r0 + self.rows)) for r0 in range(0, n_rows, self.rows)]


def forward_grad_budget(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Bytes the forward-gradient route may hold beyond inputs and gradients:
    ``DOCQA_FAST_LOSSES_CHUNK_MIB`` when set, else 1/FORWARD_GRAD_FRACTION of the rows' (N, V)
    logits in the inputs' dtype, within [FORWARD_GRAD_FLOOR, FORWARD_GRAD_CAP]."""
    setting = _budget_setting()
    if setting is not None:
        return setting
    return max(FORWARD_GRAD_FLOOR, min(FORWARD_GRAD_CAP, n_rows * vocab * dtype.itemsize // FORWARD_GRAD_FRACTION))


def forward_grad_plan(n_rows: int, vocab: int, hidden_size: int, dtype: torch.dtype, chunk_rows: int,
                      max_columns: int, need_weight: bool = True) -> GradPlan:
    """The chunks of :func:`stats_and_grads` for ``n_rows`` computed rows.

    A chunk holds its rows' logits over the whole vocabulary (a row's dL/dz needs its final
    log-sum-exp): 16 bits per logit for 16-bit inputs (the products come out in fp32
    ``columns`` at a time, the statistics are taken from them and the 16-bit copy becomes G in
    place), 32 for fp32. Rows: as many whole ROW_GRAIN as :func:`forward_grad_budget` holds
    beside the accumulator, if any, at most ``chunk_rows`` (the tuned ``losses_route`` entry),
    spread evenly. Fewer, larger chunks cost less: each adds its G^T h to all of d_weight.

    d_weight's sum across chunks: fp32 inputs add into their fp32 gradient; fp16 inputs into an
    fp32 d_weight too, which is what the route returns for them (see stats_and_grads). bf16
    inputs add into the bf16 gradient (cuBLAS sums each product in fp32 and rounds once per
    chunk) when that takes at most MAX_ROUNDED_CHUNKS chunks; beyond (the budget's cap: long
    inputs), into a (V, H) fp32 ``accumulator`` rounded once at the end, with an (R, H) fp32 part
    for d_hidden -- beside the chunk within the budget when it fits there, else beyond it: more
    roundings would cost precision (128 chunks: ~7x the naive path's error), a smaller chunk
    time. Without ``need_weight`` there is nothing to sum.
    """
    n_rows = max(n_rows, 1)
    budget = forward_grad_budget(n_rows, vocab, dtype)
    if dtype == torch.float32:
        per_row, columns = vocab * 4, vocab
    else:
        columns = min(max(COLUMN_GRAIN, max_columns // COLUMN_GRAIN * COLUMN_GRAIN),
                      _cdiv(vocab, COLUMN_GRAIN) * COLUMN_GRAIN)
        per_row = vocab * dtype.itemsize + columns * 4

    def rows_within(limit: int, row_bytes: int) -> int:
        return _spread(n_rows, min(chunk_rows, max(ROW_GRAIN, limit // row_bytes // ROW_GRAIN * ROW_GRAIN)), ROW_GRAIN)

    rows = rows_within(budget, per_row)
    if dtype != torch.bfloat16 or not need_weight or _cdiv(n_rows, rows) <= MAX_ROUNDED_CHUNKS:
        return GradPlan(rows, columns, False)
    accumulator_bytes = vocab * hidden_size * 4
    row_bytes = per_row + hidden_size * 4  # and the (R, H) fp32 part of d_hidden
    fits = accumulator_bytes + ROW_GRAIN * row_bytes <= budget
    return GradPlan(rows_within(budget - accumulator_bytes if fits else budget, row_bytes), columns, True)


@dataclass(frozen=True)
class Plan:
    """How one call is cut: ``rows`` x ``columns`` per chunk; ``vocab_outer``: the backward walks
    the column chunks outside (N <= V: d_hidden accumulates) or the row chunks (d_weight does)."""

    rows: int
    columns: int
    vocab_outer: bool

    def row_chunks(self, n_rows: int):
        return [(r0, min(n_rows, r0 + self.rows)) for r0 in range(0, n_rows, self.rows)]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _spread(total: int, size: int, grain: int) -> int:
    """``size`` (a multiple of ``grain``) made even: as many chunks, none much narrower than the rest."""
    if size >= total:
        return total
    return min(total, _cdiv(_cdiv(total, _cdiv(total, size)), grain) * grain)


def plan_chunks(n_rows: int, vocab: int, hidden_size: int, dtype: torch.dtype, budget: int, max_columns: int,
                backward: bool = True) -> Plan:
    """Chunk shape for N = ``n_rows`` tokens: rows x columns x bytes per logit <= ``budget`` (at least
    one grain of each), at most ``max_columns`` columns, and the chunk-sized fp32 accumulator
    (columns x H when the vocabulary is outside, rows x H otherwise) within the budget too."""
    per_logit = 4 + (dtype.itemsize if backward and dtype != torch.float32 else 0)
    per_accumulator_row = hidden_size * 4
    vocab_outer = n_rows <= vocab
    max_columns = max(COLUMN_GRAIN, max_columns // COLUMN_GRAIN * COLUMN_GRAIN)

    def fit(limit: int, grain: int) -> int:
        return max(grain, limit // grain * grain)

    if vocab_outer:  # every token in one chunk when a grain of columns allows it
        rows = n_rows if n_rows * COLUMN_GRAIN * per_logit <= budget else \
            fit(budget // (COLUMN_GRAIN * per_logit), ROW_GRAIN)
        columns = fit(min(max_columns, budget // (rows * per_logit), budget // per_accumulator_row), COLUMN_GRAIN)
    else:  # every column in one chunk when a grain of rows allows it
        columns = fit(min(max_columns, _cdiv(vocab, COLUMN_GRAIN) * COLUMN_GRAIN,
                          budget // (ROW_GRAIN * per_logit)), COLUMN_GRAIN)
        rows = fit(min(budget // (columns * per_logit), budget // per_accumulator_row), ROW_GRAIN)
    return Plan(_spread(max(n_rows, 1), rows, ROW_GRAIN), _spread(vocab, columns, COLUMN_GRAIN), vocab_outer)


# ------------------------------------------------------------------------------ products

@functools.cache
def _fp32_output(device: torch.device) -> tuple[bool, bool]:
    """(16-bit matmuls write fp32 here, and accumulate into fp32): ``torch.mm(..., out_dtype=)``
    and ``torch.addmm`` into an fp32 ``self`` exist on CUDA from torch 2.8 (the latter later);
    tried once per device on small integers, whose products and sums are exact."""
    a = torch.arange(24, device=device).reshape(4, 6).remainder(5).to(torch.bfloat16)
    b = torch.arange(18, device=device).reshape(6, 3).remainder(7).to(torch.bfloat16)
    expected = a.float() @ b.float()
    try:
        out = torch.empty(4, 3, device=device)
        torch.mm(a, b, out_dtype=torch.float32, out=out)
        mm_ok = bool(torch.equal(out, expected))
    except (RuntimeError, TypeError, NotImplementedError):
        return False, False
    try:
        acc = torch.ones(4, 3, device=device)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        addmm_ok = bool(torch.equal(acc, expected + 1))
    except (RuntimeError, TypeError, NotImplementedError):
        addmm_ok = False
    return mm_ok, addmm_ok


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why library products cannot compute this call here, or None."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    if torch.cuda.is_current_stream_capturing() and _fp32_output.cache_info().currsize == 0:
        return "the fp32-output matmul is not yet probed and a CUDA graph is being captured"
    if not _fp32_output(device)[0]:
        return (f"torch {torch.__version__} has no 16-bit matmul with fp32 output on CUDA "
                "(torch.mm(..., out_dtype=torch.float32))")
    return None


@contextlib.contextmanager
def _ieee_fp32(device: torch.device):
    """fp32 products in IEEE fp32 (no TF32) inside the block, the caller's setting restored after.

    The per-backend setting (torch >= 2.9) leaves a caller's legacy ``allow_tf32`` readable."""
    matmul = torch.backends.cuda.matmul
    if device.type != "cuda":
        yield
    elif hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # pragma: no cover - torch < 2.9
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


class Products:
    """``out = a @ b`` and ``out += a @ b`` for operands of the inputs' dtype: ``mm`` / ``addmm``
    with ``out`` fp32, ``into`` with ``out`` of the operands' dtype.

    ``accumulate`` says how 16-bit products are added to an fp32 ``out``: ``"addmm"`` (cuBLAS
    adds into it), ``"slices"`` (torch without that: an fp32 product of a slice of rows at a
    time, then added) or ``"upcast"`` (CPU tensors: the fp32 matmul of the upcast operands).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.sixteen = dtype != torch.float32
        self.cuda = device.type == "cuda"
        if not self.sixteen:
            self.accumulate = "fp32"
        elif not self.cuda:
            self.accumulate = "upcast"
        else:
            self.accumulate = "addmm" if _fp32_output(device)[1] else "slices"

    def mm(self, a, b, out) -> None:
        if not self.sixteen:
            torch.mm(a, b, out=out)
        elif self.cuda:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        else:  # CPU: the upcast operands' fp32 matmul sums the same exact products in fp32
            torch.mm(a.float(), b.float(), out=out)

    def into(self, a, b, out, add: bool) -> None:
        """out (+)= a @ b with ``out`` of the operands' dtype: the product (and ``out``) summed in
        fp32 and rounded once to ``out``'s dtype, as cuBLAS does; on CPU tensors through fp32."""
        if self.cuda or not self.sixteen:
            out.addmm_(a, b) if add else torch.mm(a, b, out=out)
        else:
            out.copy_(torch.addmm(out.float(), a.float(), b.float()) if add else torch.mm(a.float(), b.float()))

    def addmm(self, out, a, b) -> None:
        if self.accumulate == "fp32":
            out.addmm_(a, b)
        elif self.accumulate == "addmm":
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        elif self.accumulate == "upcast":
            out.addmm_(a.float(), b.float())
        else:
            step = max(1, _FALLBACK_SLICE_BYTES // (4 * max(1, b.shape[1])))
            part = torch.empty((min(step, a.shape[0]), b.shape[1]), dtype=torch.float32, device=out.device)
            for r0 in range(0, a.shape[0], step):
                rows = min(step, a.shape[0] - r0)
                self.mm(a[r0:r0 + rows], b, part[:rows])
                out[r0:r0 + rows].add_(part[:rows])


# ------------------------------------------------------------------------------ the passes

def column_chunks(runs, columns: int):
    """``runs`` (start, end) cut into chunks of at most ``columns``, starting on COLUMN_GRAIN."""
    for start, end in runs:
        pieces = _cdiv(end - start, columns)
        step = _cdiv(_cdiv(end - start, pieces), COLUMN_GRAIN) * COLUMN_GRAIN
        for v_start in range(start, end, step):
            yield v_start, min(end, v_start + step)


def logit_stats(hidden, weight, bias, labels, ignore_index: int, temperature: float, bound, tiles: dict):
    """(lse, label_logit, sum_logits, entropy) of every row, as kernels.logit_stats, on library products.

    ``bound``: the log p bound to raise (see kernels.losses), or None.
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    if n_rows == 0:
        return tuple(torch.empty(0, dtype=torch.float32, device=device) for _ in range(4))
    plan = plan_chunks(n_rows, vocab, hidden_size, dtype, chunk_budget(n_rows, vocab, dtype),
                       tiles["CHUNK_COLUMNS"], backward=False)
    products = Products(device, dtype)
    state = torch.empty((5, n_rows), dtype=torch.float32, device=device)
    buffer = torch.empty(min(n_rows, plan.rows) * plan.columns, dtype=torch.float32, device=device)
    with _ieee_fp32(device):
        for r0, r1 in plan.row_chunks(n_rows):
            for v0, v1 in column_chunks([(0, vocab)], plan.columns):
                z = buffer[:(r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
                products.mm(hidden[r0:r1], weight[v0:v1].T, z)
                kernels.chunk_stats(z, bias, labels[r0:r1], state[:, r0:r1], bound, v0, v0 == 0, ignore_index,
                                    temperature, dtype == torch.float32, tiles)
    m, s, t, label_logit, sum_logits = state.unbind(0)
    log_s = torch.log(s)
    return m + log_s, label_logit, sum_logits, log_s - t / s


def logit_stats_backward(hidden, weight, bias, labels, lse, coefs, ignore_index: int, temperature: float,
                         need_hidden: bool, need_weight: bool, need_bias: bool, runs, tiles: dict):
    """(d_hidden, d_weight, d_bias) as kernels.logit_stats_backward, on library products.

    ``runs``: the (start, end) vocabulary column ranges to compute; the others contribute nothing.
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    sixteen = dtype != torch.float32
    d_hidden = torch.zeros((n_rows, hidden_size) if need_hidden else (0,), dtype=dtype, device=device)
    d_weight = torch.zeros((vocab, hidden_size) if need_weight else (0,), dtype=dtype, device=device)
    d_bias = torch.zeros((vocab,) if need_bias else (0,), dtype=torch.float32, device=device)
    if not (n_rows and runs and (need_hidden or need_weight or need_bias)):
        return d_hidden, d_weight, d_bias.to(dtype)  # empty ones in the dtype too, as the op's fake says
    plan = plan_chunks(n_rows, vocab, hidden_size, dtype, chunk_budget(n_rows, vocab, dtype), tiles["CHUNK_COLUMNS"])
    chunks = list(column_chunks(runs, plan.columns))
    row_chunks = plan.row_chunks(n_rows)
    products = Products(device, dtype)
    scale, out_scale = kernels.gradient_scale(coefs, temperature)
    size = min(n_rows, plan.rows) * plan.columns
    z_buffer = torch.empty(size, dtype=torch.float32, device=device)
    g_buffer = torch.empty(size, dtype=dtype, device=device) if sixteen else z_buffer

    def gradient_chunk(r0, r1, v0, v1):
        """G = dL/dz / scale of rows [r0, r1) x columns [v0, v1), in the buffers."""
        shape = (r1 - r0, v1 - v0)
        z = z_buffer[:shape[0] * shape[1]].view(shape)
        products.mm(hidden[r0:r1], weight[v0:v1].T, z)
        g = g_buffer[:shape[0] * shape[1]].view(shape)
        kernels.chunk_grad(z, g, bias, labels[r0:r1], lse[r0:r1], coefs[:, r0:r1], scale, v0, ignore_index,
                           temperature, not sixteen, tiles)
        if need_bias:
            d_bias[v0:v1] += g.sum(0, dtype=torch.float32)
        return g

    def finish(accumulator, gradient):
        """gradient = accumulator * out_scale (G was divided by the scale; dz/dlogits is 1/T)."""
        accumulator.mul_(out_scale)
        if accumulator is not gradient:
            gradient.copy_(accumulator)

    # The gradient whose sums cross the outer chunks (d_hidden when the vocabulary is outside,
    # d_weight when the tokens are) has one full fp32 accumulator -- the gradient itself for fp32
    # inputs; the other sums over the inner chunks only: a chunk-sized fp32 part, written once
    # per outer chunk.
    if plan.vocab_outer:
        outer, inner = chunks, row_chunks
        total_grad, need_total, part_grad, need_part = d_hidden, need_hidden, d_weight, need_weight
    else:
        outer, inner = row_chunks, chunks
        total_grad, need_total, part_grad, need_part = d_weight, need_weight, d_hidden, need_hidden
    total = (torch.zeros(total_grad.shape, dtype=torch.float32, device=device) if sixteen else total_grad) \
        if need_total else None
    part_rows = plan.columns if plan.vocab_outer else plan.rows
    parts = torch.empty((part_rows, hidden_size), dtype=torch.float32, device=device) if need_part and sixteen \
        else None
    with _ieee_fp32(device):
        for o0, o1 in outer:
            part = parts[:o1 - o0] if parts is not None else part_grad[o0:o1]
            for index, (i0, i1) in enumerate(inner):
                (r0, r1), (v0, v1) = ((i0, i1), (o0, o1)) if plan.vocab_outer else ((o0, o1), (i0, i1))
                g = gradient_chunk(r0, r1, v0, v1)
                # d_weight[v0:v1] (+)= G^T @ hidden[r0:r1]; d_hidden[r0:r1] (+)= G @ weight[v0:v1].
                weight_terms, hidden_terms = (g.T, hidden[r0:r1]), (g, weight[v0:v1])
                part_terms, total_terms = (weight_terms, hidden_terms) if plan.vocab_outer else \
                    (hidden_terms, weight_terms)
                if need_part:
                    (products.mm(*part_terms, part) if index == 0 else products.addmm(part, *part_terms))
                if need_total:
                    products.addmm(total[i0:i1], *total_terms)
            if need_part:
                finish(part, part_grad[o0:o1])
        if need_total:
            finish(total, total_grad)
    return d_hidden, d_weight, (d_bias * out_scale).to(dtype) if need_bias else d_bias.to(dtype)


def stats_and_grads(hidden, weight, bias, labels, ignore_index: int, coefs_of, grad_scale, need_hidden: bool,
                    need_weight: bool, need_bias: bool, tiles: dict, chunk_rows: int):
    """The forward-gradient route: statistics and gradients in one walk over row chunks, 3 products.

    Per chunk of rows (:func:`forward_grad_plan`): the logits of those rows over the whole
    vocabulary -- 16-bit inputs: products of ``columns`` at a time in fp32, which ``chunk_stats``
    folds into the rows' statistics while it copies them to the chunk's 16-bit logits; fp32: one
    product -- so each row's log-sum-exp is final and ``chunk_grad`` turns the chunk into G =
    dL/dz in place, from ``coefs_of(lse, r0, r1)``, the (4, R) coefficients of kernels.losses'
    dL/dz form of the *summed* loss. Then d_hidden[rows] = G W (written once) and d_weight (+)=
    G^T h[rows], 3 products in all.

    ``grad_scale`` (a (1,) fp32 tensor: 1, or 1 / count for a mean) turns the summed loss's
    gradients into the loss's. bf16 and fp32 inputs without the plan's accumulator fold it into
    the coefficients: G and the products are the loss's own, summed in the gradients' dtype.
    Otherwise G is the summed loss's, of order 1, and the fp32 sums are scaled at the end: the
    bf16 accumulator as it is rounded once to the gradient, and fp16's gradients, which stay fp32
    here (rounded to fp16 only after the upstream gradient, often a loss scale: rounded at a
    mean's size, fp16 would flush the small ones to 0). The 16-bit logits are the fp32 products
    rounded once, as the naive path's are; the statistics and so the loss come from the fp32
    products.

    Returns (lse, label_logit, sum_logits) (N,) fp32 (nothing masked) and d_hidden (N, H),
    d_weight (V, H), d_bias (V,) of the loss in the inputs' dtype (fp32 for fp16), each empty
    (0,) when not needed.
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    sixteen = dtype != torch.float32
    out_dtype = gradients_dtype(dtype)
    fp32 = dict(dtype=torch.float32, device=device)
    stats = torch.zeros((5, n_rows), **fp32)  # m, s, t, label logit, logit sum (kernels.chunk_stats)
    d_hidden = torch.empty((n_rows, hidden_size) if need_hidden else (0,), dtype=out_dtype, device=device)
    d_weight = torch.empty((vocab, hidden_size) if need_weight else (0,), dtype=out_dtype, device=device)
    d_bias = torch.zeros((vocab,) if need_bias else (0,), **fp32)
    plan = forward_grad_plan(n_rows, vocab, hidden_size, dtype, chunk_rows, tiles["CHUNK_COLUMNS"], need_weight)
    chunks = plan.row_chunks(n_rows)
    if not chunks:
        d_weight.zero_()
        return stats[0], stats[3], stats[4], d_hidden, d_weight, d_bias.to(out_dtype)
    fold = not plan.accumulator and out_dtype == dtype
    products = Products(device, dtype)
    rows = min(n_rows, plan.rows)
    # A chunk has few rows for the statistics kernel's one program per row block: lanes split
    # its columns, each with its own state, merged once per chunk.
    lanes = torch.empty((kernels.stat_lanes(rows, plan.columns, tiles), 5, rows), **fp32)
    logits = torch.empty(rows * vocab, dtype=dtype, device=device)  # the chunk's logits, then its G
    part = torch.empty(rows * plan.columns, **fp32) if sixteen else None
    weight_sum = torch.empty((vocab, hidden_size), **fp32) if plan.accumulator and need_weight else None
    hidden_part = torch.empty((rows, hidden_size), **fp32) if plan.accumulator and need_hidden else None
    unit_scale = torch.ones(1, **fp32)
    lse = torch.empty(n_rows, **fp32)

    def multiply(a, b, out, add: bool) -> None:
        """out (+)= a @ b: fp32 sums through Products.mm / addmm, 16-bit ones rounded per product."""
        if out.dtype == torch.float32:
            products.addmm(out, a, b) if add else products.mm(a, b, out)
        else:
            products.into(a, b, out, add)

    with _ieee_fp32(device):
        for index, (r0, r1) in enumerate(chunks):
            z = logits[:(r1 - r0) * vocab].view(r1 - r0, vocab)
            state = lanes[:, :, :r1 - r0]
            if sixteen:
                for v0, v1 in column_chunks([(0, vocab)], plan.columns):
                    product = part[:(r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
                    products.mm(hidden[r0:r1], weight[v0:v1].T, product)
                    kernels.chunk_stats(product, bias, labels[r0:r1], state, None, v0, v0 == 0, ignore_index, 1.0,
                                        False, tiles, copy=z[:, v0:v1])
            else:
                products.mm(hidden[r0:r1], weight.T, z)
                kernels.chunk_stats(z, bias, labels[r0:r1], state, None, 0, True, ignore_index, 1.0, True, tiles)
            stats[:, r0:r1] = kernels.merge_lanes(state)
            torch.add(stats[0, r0:r1], torch.log(stats[1, r0:r1]), out=lse[r0:r1])
            coefs = coefs_of(lse[r0:r1], r0, r1)
            kernels.chunk_grad(z, z, bias, labels[r0:r1], lse[r0:r1], coefs * grad_scale if fold else coefs,
                               unit_scale, 0, ignore_index, 1.0, not sixteen, tiles)
            if need_bias:
                d_bias += z.sum(0, dtype=torch.float32)
            if need_hidden:  # every column of these rows at once: written once
                if hidden_part is None:
                    multiply(z, weight, d_hidden[r0:r1], add=False)
                else:
                    products.mm(z, weight, hidden_part[:r1 - r0])
                    scaled_copy(hidden_part[:r1 - r0], grad_scale, d_hidden[r0:r1])
            if need_weight:
                multiply(z.T, hidden[r0:r1], d_weight if weight_sum is None else weight_sum, add=index > 0)
    if weight_sum is not None:
        scaled_copy(weight_sum, grad_scale, d_weight)
    elif not fold:  # fp16: the fp32 gradients of the summed loss, scaled in place
        d_hidden.mul_(grad_scale)
        d_weight.mul_(grad_scale)
    d_bias = (d_bias if fold else d_bias * grad_scale).to(out_dtype)  # empty: in the dtype too, as the fake says
    return lse, stats[3], stats[4], d_hidden, d_weight, d_bias


"""Communication pieces of the context-parallel attention: the ring's point-to-point exchange
(on a side stream on CUDA), an autograd all-to-all, and the cross-rank agreement check that
turns a mismatch or a local error on any rank into an error on every rank instead of a hang."""

from __future__ import annotations

import os
import zlib
from typing import Callable

import torch
import torch.distributed as dist

from .._validation import value_checks_enabled


# DOCQA_FAST_CP_CHECK=0 skips the cross-rank agreement check (one small all_gather and a host
# sync per call) once a job's shapes are known good; value_checks(False) skips it too.
CHECK_ENV = "DOCQA_FAST_CP_CHECK"


class ContextParallelError(ValueError):
    """Raised on every rank of a context-parallel call when any rank's arguments are wrong or
    differ from the others' (shapes, dtypes, options, cu_seqlens)."""


def group_size_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed initialised (init_process_group, or "
                           "launch with torchrun)")
    return dist.get_world_size(group), dist.get_rank(group)


def global_rank(group, rank: int) -> int:
    """The default group's rank of ``group``'s rank ``rank`` (what P2P ops address)."""
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


_MODULUS = 2 ** 31 - 1  # a prime: the checksum below stays in int64 without overflow


def _weights(n: int, device: torch.device) -> torch.Tensor:
    """(2, n) weights in [1, modulus) that look random in the position: multiply-xorshift rounds of
    ``position + 1``, made on the device in integer arithmetic (the same on every rank and GPU, no
    copy). Weights that are a polynomial of the position (``i * a + 1``) would not do: a difference
    whose low moments vanish -- ``(+1, -2, +1)`` at three neighbouring boundaries -- gives equal sums
    whatever ``a`` is."""
    x = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    rows = []
    for multiplier in (0x9E3779B1, 0x85EBCA6B):  # < 2^32, times x < 2^31: below 2^63
        w = x * multiplier % _MODULUS
        for _ in range(2):
            w = (w ^ (w >> 16)) * 0x045D9F3B % _MODULUS
        rows.append(w % (_MODULUS - 1) + 1)
    return torch.stack(rows)


def _checksum(values: torch.Tensor) -> torch.Tensor:
    """Two weighted sums modulo a prime of a 1-D int64 tensor, on its device (no read): equal on two
    ranks when their values are equal and, for a difference that does not depend on the weights,
    unequal but with odds of about 2^-62."""
    residues = values % _MODULUS  # < 2^31 each, so a product < 2^62 and a sum of them fits once reduced
    return ((residues * _weights(values.numel(), values.device)) % _MODULUS).sum(-1) % _MODULUS


def _row_on(values: list[int], device: torch.device) -> torch.Tensor:
    row = torch.tensor(values, dtype=torch.int64)
    # Pinned and non-blocking: putting the row on the GPU does not wait for the GPU's queued work
    # (PyTorch's pinned-memory cache keeps the staging buffer until the copy has run).
    return row.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else row


def checks_enabled() -> bool:
    """Whether calls run the cross-rank agreement check: not with DOCQA_FAST_CP_CHECK=0, not
    under ``value_checks(False)``, torch.compile or CUDA graph capture (a host sync each call)."""
    return os.environ.get(CHECK_ENV) != "0" and value_checks_enabled()


def agree(group, signature: str, error: BaseException | None, what: str, read: torch.Tensor | None = None,
          check_read: Callable[[list[int]], object] | None = None, read_name: str = "values"):
    """Check that every rank of ``group`` reached this call with the same ``signature`` and no
    local ``error``; otherwise raise :class:`ContextParallelError` on every rank, naming the ranks
    and what they hold. One all_gather of a few int64 per rank on the fast path; the descriptive
    all_gather_object only when something is wrong (all ranks then take it, so none waits).

    ``read``: 1-D int64 values of this rank the call needs on the host (ring attention's
    cu_seqlens). A checksum of them joins the gathered row and they come back in the same copy,
    so the call reads the device once; ``check_read(values)`` then validates them and returns
    what :func:`agree` returns (ranks with equal checksums hold equal values and reach the same
    verdict; a rank whose values differ or fail is named, its values shown as ``read_name``).
    Without ``read``: returns None."""
    world, rank = group_size_rank(group)
    if world == 1 or not checks_enabled():
        # Unchecked (one rank, or turned off once a job is known good): a local error still raises
        # here, but a rank that raises alone leaves the others to the group's timeout.
        if error is not None:
            raise error
        return None if read is None else check_read(read.tolist())
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    mine = _row_on([zlib.crc32(signature.encode()), 0 if error is None else 1, 0, 0], device)
    if read is not None:  # the same width either way: every rank's row must be alike for all_gather
        read = read.to(device, torch.int64)
        mine = torch.cat([mine[:2], _checksum(read)])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    # The one host read: every rank's row, and this rank's own values after them.
    flat = torch.cat([torch.stack(gathered).flatten()] + ([read] if read is not None else [])).cpu().tolist()
    width = mine.numel()
    rows, values = [flat[r * width:(r + 1) * width] for r in range(world)], flat[world * width:]
    agreed = all(row == rows[0] for row in rows) and rows[0][1] == 0
    result, local = None, error
    if read is not None and local is None:
        try:
            result = check_read(values)
        except (ValueError, TypeError) as exc:
            local = exc
    if agreed and local is None:
        return result
    if agreed:  # equal values everywhere, so the same verdict everywhere: no need to ask the others
        raise ContextParallelError(f"{what}: every rank: {type(local).__name__}: {local}") from local
    described = [None] * world
    shown = signature + ("" if read is None else f" {read_name}={values[:8]}{'...' if len(values) > 8 else ''}")
    dist.all_gather_object(described, (shown, None if local is None else f"{type(local).__name__}: {local}"),
                           group=group)
    failing = [f"rank {r}: {err}" for r, (_, err) in enumerate(described) if err is not None]
    if failing:
        message = f"{what}: " + "; ".join(failing)
        if local is not None:
            raise ContextParallelError(message) from local
        raise ContextParallelError(message)
    lines = [f"rank {r}: {sig}" for r, (sig, _) in enumerate(described)]
    raise ContextParallelError(f"{what}: the ranks' arguments differ (every rank must pass the same shapes, "
                               "dtypes and options):\n" + "\n".join(lines))


def describe(*tensors, **options) -> str:
    """A signature string of the tensors' shapes/dtypes/devices types and the call's options."""
    parts = [f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}:{t.device.type}" if isinstance(t, torch.Tensor)
             else repr(t) for t in tensors]
    parts += [f"{key}={value!r}" for key, value in options.items()]
    return " ".join(parts)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class Exchange:
    """One round of point-to-point messages: ``send`` tensors to one rank while receiving
    same-shaped tensors from another, started now and finished by :meth:`wait`.

    On CUDA the ops are issued on a side stream that first waits for the producer (the current
    stream), so the next block's compute on the current stream overlaps the transfer; ``wait``
    makes the current stream wait for the side stream and marks the received buffers as used by
    it (the caching allocator must not recycle them early)."""

    def __init__(self, send, to_rank: int, from_rank: int, group, tag: int = 0):
        self.received = [torch.empty_like(t) for t in send]
        # Distinct tags per tensor and per exchange: gloo matches messages by (peer, tag), and a
        # ring's K/V and gradient exchanges are in flight together.
        ops = [dist.P2POp(dist.isend, t, to_rank, group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, from_rank, group, tag + i) for i, t in enumerate(self.received)]
        self.stream = None
        if send[0].is_cuda:
            self.stream = _side_stream(send[0].device)
            self.stream.wait_stream(torch.cuda.current_stream(send[0].device))
            for t in send:
                t.record_stream(self.stream)
            with torch.cuda.stream(self.stream):
                self.requests = dist.batch_isend_irecv(ops)
        else:
            self.requests = dist.batch_isend_irecv(ops)

    def wait(self):
        for request in self.requests:
            request.wait()
        if self.stream is not None:
            current = torch.cuda.current_stream(self.received[0].device)
            current.wait_stream(self.stream)
            for t in self.received:
                t.record_stream(current)
        return self.received


def ring_exchange(send, group, shift: int = 1, tag: int = 0) -> Exchange:
    """Send ``send`` to the rank ``shift`` ahead in ``group``, receive from ``shift`` behind."""
    world, rank = group_size_rank(group)
    return Exchange([t.contiguous() for t in send], global_rank(group, (rank + shift) % world),
                    global_rank(group, (rank - shift) % world), group, tag)


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    world, _ = group_size_rank(group)
    if world == 1:
        return x
    inputs = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """All-to-all that splits ``scatter_dim`` across the group and concatenates what arrives
    along ``gather_dim`` (rank order); its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    return AllToAll.apply(x, scatter_dim, gather_dim, group)


class AllReduceSum(torch.autograd.Function):
    """A sum over the group whose gradient is the sum of the ranks' upstream gradients (each
    rank's input feeds every rank's output)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None

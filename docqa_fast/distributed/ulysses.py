"""DeepSpeed-Ulysses attention (all-to-all between sequence shards and head shards) and the
hybrid of Ulysses inside a node with a zigzag ring across nodes (USP), with the process-group
layout that places them.

Ulysses: each of the U ranks holds a contiguous 1/U of the sequence with all heads; an
all-to-all gives each the whole sequence for 1/U of the heads, any attention runs locally
(our flash-attn front ends: every mask, ALiBi included), and the reverse all-to-all brings the
output back to sequence shards. Its degree is bounded by the KV heads: with U <= Hk every rank
takes Hk/U of them; with U > Hk (U a multiple of Hk) the KV heads are repeated U/Hk times first,
so each rank gets one -- the only case where K/V grow. The all-to-all's gradient is the
reverse all-to-all, so autograd gives the backward (repeated heads' gradients sum back).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..attention_core import check_heads
from ..flash_attn_interface import flash_attn_func, flash_attn_varlen_func
from ._comm import agree, all_to_all, describe, group_size_rank
from .ring import gather_sequence, split_sequence, zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_varlen_func


def _check_ulysses(q, k, v, dense, world, alibi_slopes, window_size):
    check_heads(q, k, v, q_ndim=4 if dense else 3, kv_ndim=4 if dense else 3)
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if heads % world:
        raise ValueError(f"expected q's heads ({heads}) divisible by the Ulysses degree {world}")
    if kv_heads % world and world % kv_heads:
        raise ValueError(f"expected k's heads ({kv_heads}) divisible by the Ulysses degree {world}, or the degree "
                         f"a multiple of them (the KV heads are then repeated)")
    if alibi_slopes is not None and alibi_slopes.shape[-1] != heads:
        raise ValueError(f"expected alibi_slopes with {heads} heads in the last dimension, got "
                         f"{tuple(alibi_slopes.shape)}")


def _ulysses(q, k, v, attend, group, dense, alibi_slopes, window_size, return_lse, what):
    world, rank = group_size_rank(group)
    error = None
    try:
        _check_ulysses(q, k, v, dense, world, alibi_slopes, window_size)
    except (ValueError, TypeError) as exc:
        error = exc
    agree(group, describe(q, k, v, alibi=None if alibi_slopes is None else tuple(alibi_slopes.shape)), error, what)
    heads_dim, seq_dim = (2, 1) if dense else (1, 0)
    if world > k.shape[-2]:  # more ranks than KV heads: each rank takes one (repeated) KV head
        repeat = world // k.shape[-2]
        k, v = k.repeat_interleave(repeat, dim=heads_dim), v.repeat_interleave(repeat, dim=heads_dim)
    q, k, v = (all_to_all(t, heads_dim, seq_dim, group) for t in (q, k, v))
    if alibi_slopes is not None:
        per_rank = alibi_slopes.shape[-1] // world
        alibi_slopes = alibi_slopes[..., rank * per_rank:(rank + 1) * per_rank].contiguous()
    out, lse = attend(q, k, v, alibi_slopes)
    out = all_to_all(out, seq_dim, heads_dim, group)
    if not return_lse:
        return out
    # lse (B, H/U, S) or (H/U, T): sequence last, heads just before it.
    return out, all_to_all(lse, lse.dim() - 1, lse.dim() - 2, group), None


def ulysses_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                            softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """``flash_attn_func`` over contiguous sequence shards (B, S/U, H, D) by Ulysses' all-to-all.
    Needs H divisible by U and Hk divisible by U (or U by Hk). ``alibi_slopes`` (H,)/(B, H) as
    flash-attn's (each rank uses its heads' slopes); ``dropout_p`` must be 0 (each rank would draw
    its own pattern)."""
    if dropout_p:
        raise ValueError(f"expected dropout_p = 0 for context-parallel attention, got {dropout_p}")

    def attend(q, k, v, slopes):
        return flash_attn_func(q, k, v, 0.0, softmax_scale, causal, window_size, softcap, slopes, deterministic,
                               return_attn_probs=True)[:2]

    return _ulysses(q, k, v, attend, group, True, alibi_slopes, window_size, return_attn_probs, "Ulysses attention")


def ulysses_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                   softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                   alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """``flash_attn_varlen_func`` over contiguous shards (T/U, H, D) of a packed batch, with the
    *global* ``cu_seqlens`` and ``max_seqlen`` (after the all-to-all each rank holds every token)."""
    if dropout_p:
        raise ValueError(f"expected dropout_p = 0 for context-parallel attention, got {dropout_p}")

    def attend(q, k, v, slopes):
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
                                      softmax_scale, causal, window_size, softcap, slopes, deterministic,
                                      return_attn_probs=True)[:2]

    return _ulysses(q, k, v, attend, group, False, alibi_slopes, window_size, return_attn_probs,
                    "Ulysses attention")


# ------------------------------------------------------------------------- the hybrid and its layout

@dataclass(frozen=True)
class ContextParallel:
    """The process groups of a context-parallel layout (what :func:`setup_context_parallel`
    returns) and the operations that follow it.

    Rank g of the default group sits in context-parallel group ``g // (U * R)`` (the rest of
    the world is data parallel), at Ulysses rank ``g % U`` and ring rank ``(g // U) % R``:
    Ulysses' all-to-all stays among U consecutive ranks (one node), the ring's P2P crosses nodes.
    The sequence layout: the zigzag split over the ring, then a contiguous split over Ulysses.
    """

    ulysses_degree: int
    ring_degree: int
    ulysses_group: object
    ring_group: object
    cp_group: object
    ulysses_rank: int
    ring_rank: int

    @classmethod
    def single(cls) -> "ContextParallel":
        """No parallelism: the whole sequence on this process, no process group needed (the
        same code path for a single-process run or a reference)."""
        return cls(1, 1, None, None, None, 0, 0)

    @property
    def size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's shard of a full-sequence tensor along ``dim``."""
        if self.ring_degree > 1:
            x = split_sequence(x, dim, "zigzag", self.ring_group)
        if self.ulysses_degree > 1:
            x = split_sequence(x, dim, "contiguous", self.ulysses_group)
        return x

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The full-sequence tensor from every rank's shard (not differentiable)."""
        if self.ulysses_degree > 1:
            x = gather_sequence(x, dim, "contiguous", self.ulysses_group)
        if self.ring_degree > 1:
            x = gather_sequence(x, dim, "zigzag", self.ring_group)
        return x

    def attention(self, q, k, v, *, cu_seqlens=None, max_seqlen=None, softmax_scale=None, causal=False,
                  window_size=(-1, -1), softcap=0.0, deterministic=False):
        """Attention of this rank's shards (dense (B, s, H, D), or packed (t, H, D) with the
        global ``cu_seqlens``): Ulysses over ``ulysses_group`` around a zigzag ring over
        ``ring_group`` (either alone when the other degree is 1)."""
        options = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                       deterministic=deterministic)
        dense = cu_seqlens is None

        def ring(q, k, v, slopes):
            if self.ring_degree == 1:
                if dense:
                    return flash_attn_func(q, k, v, return_attn_probs=True, **options)[:2]
                return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                              return_attn_probs=True, **options)[:2]
            if dense:
                return zigzag_ring_flash_attn_func(q, k, v, return_attn_probs=True, group=self.ring_group,
                                                   **options)[:2]
            return zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, return_attn_probs=True,
                                                      group=self.ring_group, **options)[:2]

        if self.ulysses_degree == 1:
            return ring(q, k, v, None)[0]
        return _ulysses(q, k, v, ring, self.ulysses_group, dense, None, window_size, False,
                        "Ulysses x ring attention")


def ring_layout(group=None) -> ContextParallel:
    """A zigzag ring over ``group`` (the default group when None), no Ulysses: a layout for the
    helpers that take one, from a group made elsewhere."""
    world, rank = group_size_rank(group)
    return ContextParallel(1, world, None, group, group, 0, rank)


def setup_context_parallel(ulysses_degree: int, ring_degree: int, timeout: datetime.timedelta | None = None,
                           backend: str | None = None) -> ContextParallel:
    """Create the process groups of a Ulysses x ring layout; every rank must call it.

    ``ulysses_degree * ring_degree`` must divide the world size; the quotient is the number of
    data-parallel replicas (each with its own groups). ``timeout``: the groups' collective
    timeout (a rank that fails outside a call then ends the others' wait with an error). Put
    the Ulysses degree within a node (its all-to-all wants NVLink) and the ring across nodes.
    """
    world, rank = group_size_rank(None)
    for name, degree in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if not isinstance(degree, int) or degree < 1:
            raise ValueError(f"expected {name} to be a positive int, got {degree!r}")
    size = ulysses_degree * ring_degree
    if world % size:
        raise ValueError(f"expected ulysses_degree x ring_degree ({ulysses_degree} x {ring_degree} = {size}) to "
                         f"divide the world size {world}")
    options = {} if timeout is None else {"timeout": timeout}
    if backend is not None:
        options["backend"] = backend
    mine = {}
    # new_group is collective: every rank creates every group, in the same order.
    for first in range(0, world, size):
        block = list(range(first, first + size))
        group = dist.new_group(block, **options)
        if rank in block:
            mine["cp"] = group
        for r in range(ring_degree):
            ranks = block[r * ulysses_degree:(r + 1) * ulysses_degree]
            group = dist.new_group(ranks, **options)
            if rank in ranks:
                mine["ulysses"] = group
        for u in range(ulysses_degree):
            ranks = block[u::ulysses_degree]
            group = dist.new_group(ranks, **options)
            if rank in ranks:
                mine["ring"] = group
    local = rank % size
    return ContextParallel(ulysses_degree, ring_degree, mine["ulysses"], mine["ring"], mine["cp"],
                           local % ulysses_degree, local // ulysses_degree)

"""Which attention blocks each rank computes at each step of a ring: a host-side plan.

The global sequence (dense: dim 1 of (B, S, H, D); packed: dim 0 of (T, H, D)) is cut into
``n_chunks`` equal chunks. A *layout* says which chunks each of the P ranks holds, in order:
``zigzag`` gives rank r chunks r and 2P-1-r (2P chunks: under a causal mask every rank then
does the same work), ``contiguous`` gives rank r chunk r (P chunks; a plain ring, or Ulysses'
sequence split). At step s of the ring, rank r holds the keys/values of rank (r - s) mod P;
for every (query chunk, key chunk) pair it computes the part of the global attention that
falls in that rectangle of the mask, or nothing when the rectangle is wholly masked.

Expressing a rectangle of the global mask with the flash-attn kernels, whose masks are
relative to the bottom-right corner of the (q, k) block they are given:

* the *diagonal* pair (same chunk for queries and keys) is the global mask restricted to the
  chunk: one call, with the chunk's own ``cu_seqlens`` (documents clipped to the chunk) and the
  call's causal flag and window unchanged (every document's query and key ranges coincide);
* any other pair touches at most one document: a document holding a key of one chunk and a
  query of another spans everything between them, so it holds the last position before the
  later chunk, which only one document does. The rectangle of that document is trimmed to the
  rows and columns the window lets see anything, and the window is re-expressed around the
  block's corner: with query rows [qa, qb) and key columns [ka, kb), the global rule
  ``-L <= t - p <= R`` (p query and t key positions; R = 0 when causal) becomes the kernel's
  window ``(L + kb - qb, R + qb - kb)`` (a side that restricts nothing in the block becomes -1).

Everything here is pure Python on ints (the plan of a call is cached), so it is the same on
every rank and testable without a process group.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

LAYOUTS = ("zigzag", "contiguous")


def chunks_per_rank(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"expected layout in {LAYOUTS}, got {layout!r}")
    return 2 if layout == "zigzag" else 1


def rank_chunks(layout: str, rank: int, world: int) -> tuple[int, ...]:
    """The global chunk ids rank ``rank`` holds, in its local order."""
    return (rank, 2 * world - 1 - rank) if chunks_per_rank(layout) == 2 else (rank,)


@dataclass(frozen=True)
class Block:
    """One kernel call of a ring step: local query rows [q_lo, q_hi) of this rank's shard, local
    key rows [k_lo, k_hi) of the key/value shard held at that step, and the kernel's mask.

    ``cu_seqlens``: the documents of a diagonal block of a packed batch (block-local offsets),
    else None (a dense call, or a packed block of one document: cu_seqlens [0, Sq] / [0, Sk]).
    ``causal`` and the window are the kernel's, relative to the block's bottom-right corner.
    """

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool
    window_left: int
    window_right: int
    cu_seqlens: tuple[int, ...] | None = None

    def visible_pairs(self) -> int:
        """How many (query, key) score elements the block's mask lets through: the work."""
        if self.cu_seqlens is not None:
            return sum(_visible_count(b - a, b - a, self.causal, self.window_left, self.window_right)
                       for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:]))
        return _visible_count(self.q_hi - self.q_lo, self.k_hi - self.k_lo, self.causal, self.window_left,
                              self.window_right)


@functools.lru_cache(maxsize=4096)
def _visible_count(sq: int, sk: int, causal: bool, left: int, right: int) -> int:
    """Score elements a flash-attn mask (bottom-right aligned) keeps in an sq x sk block (a
    row loop, cached: a ring repeats a few block shapes)."""
    if causal:
        right = 0
    total = 0
    for i in range(sq):
        diagonal = i + sk - sq
        lo = 0 if left < 0 else max(0, diagonal - left)
        hi = sk - 1 if right < 0 else min(sk - 1, diagonal + right)
        total += max(0, hi - lo + 1)
    return total


def _window_block(qa, qb, ka, kb, left, right):
    """The part of the global mask ``-left <= t - p <= right`` (-1: unbounded) inside query
    positions [qa, qb) x key positions [ka, kb): the trimmed rectangle and the kernel's
    (left, right) window around its bottom-right corner, or None when nothing is visible."""
    while True:  # shrink to the bounding box of the visible pairs (each bound feeds the others)
        before = (qa, qb, ka, kb)
        if right >= 0:  # t <= p + right: keys past the last query's reach, queries before the first key's
            kb, qa = min(kb, qb + right), max(qa, ka - right)
        if left >= 0:  # t >= p - left
            ka, qb = max(ka, qa - left), min(qb, kb + left)
        if (qa, qb, ka, kb) == before or qb <= qa or kb <= ka:
            break
    if qb <= qa or kb <= ka:
        return None
    # A side restricts the block only if some pair of the rectangle lies past it.
    kernel_right = right + qb - kb if right >= 0 and kb - 1 - qa > right else -1
    kernel_left = left + kb - qb if left >= 0 and qb - 1 - ka > left else -1
    return qa, qb, ka, kb, kernel_left, kernel_right


def _document_of(boundaries: tuple[int, ...], position: int) -> int:
    return bisect.bisect_right(boundaries, position) - 1


def _block(q_range, k_range, q_offset, k_offset, causal, left, right, boundaries):
    """The Block for global query positions q_range and key positions k_range of one chunk pair
    (local rows start at q_offset / k_offset), or None."""
    (qa, qb), (ka, kb) = q_range, k_range
    if causal:
        right = 0
    if (qa, qb) == (ka, kb):  # the diagonal: the mask restricted to the chunk, documents clipped
        cu = None
        if boundaries is not None:
            inside = sorted({min(max(b - qa, 0), qb - qa) for b in boundaries})
            cu = tuple(inside)
        kernel_right = -1 if causal else right
        return Block(q_offset, q_offset + qb - qa, k_offset, k_offset + kb - ka, causal, left, kernel_right, cu)
    if boundaries is not None:  # one document at most: the one holding the position before the later chunk
        edge = qa - 1 if kb <= qa else ka - 1
        document = _document_of(boundaries, edge)
        start, end = boundaries[document], boundaries[document + 1]
        qa, qb, ka, kb = max(qa, start), min(qb, end), max(ka, start), min(kb, end)
        if qb <= qa or kb <= ka:
            return None
    trimmed = _window_block(qa, qb, ka, kb, left, right)
    if trimmed is None:
        return None
    tqa, tqb, tka, tkb, kernel_left, kernel_right = trimmed
    q_lo, k_lo = q_offset + tqa - q_range[0], k_offset + tka - k_range[0]
    # A right side of 0 is the causal mask: say so (the kernels' causal path, and its block skipping).
    block_causal = kernel_right == 0
    return Block(q_lo, q_lo + tqb - tqa, k_lo, k_lo + tkb - tka, block_causal, kernel_left,
                 -1 if block_causal else kernel_right)


def _unmasked(block: Block) -> bool:
    return not block.causal and block.window_left == -1 and block.window_right == -1 and block.cu_seqlens is None


def _fuse(blocks: list[Block]) -> list[Block]:
    """Join unmasked blocks that share their keys and have adjacent query rows, or share their
    queries and have adjacent key rows: one larger kernel call instead of two (zigzag causal's
    off-diagonal steps become one call each, as in ring-flash-attn). Blocks sharing a nonempty
    key or query range lie in the same document, so the join never mixes documents."""
    blocks = list(blocks)
    causal = [b for b in blocks if b.causal and b.window_left == -1 and b.cu_seqlens is None
              and (b.q_lo, b.q_hi) == (b.k_lo, b.k_hi)]
    if len(causal) == 2 and len(blocks) == 3:
        # A rank's own zigzag shard, dense causal: [chunk r; chunk 2P-1-r] with the second chunk
        # seeing all of the first is exactly the causal mask over the concatenation.
        first, second = sorted(causal, key=lambda b: b.q_lo)
        (rest,) = [b for b in blocks if b not in causal]
        if first.q_hi == second.q_lo and _unmasked(rest) and (rest.q_lo, rest.q_hi, rest.k_lo, rest.k_hi) == (
                second.q_lo, second.q_hi, first.k_lo, first.k_hi):
            return [Block(first.q_lo, second.q_hi, first.k_lo, second.k_hi, True, -1, -1)]
    joined = True
    while joined:
        joined = False
        for i, a in enumerate(blocks):
            for j, b in enumerate(blocks):
                if i == j or not (_unmasked(a) and _unmasked(b)):
                    continue
                if (a.k_lo, a.k_hi) == (b.k_lo, b.k_hi) and a.q_hi == b.q_lo:
                    fused = Block(a.q_lo, b.q_hi, a.k_lo, a.k_hi, False, -1, -1)
                elif (a.q_lo, a.q_hi) == (b.q_lo, b.q_hi) and a.k_hi == b.k_lo:
                    fused = Block(a.q_lo, a.q_hi, a.k_lo, b.k_hi, False, -1, -1)
                else:
                    continue
                blocks = [x for n, x in enumerate(blocks) if n not in (i, j)] + [fused]
                joined = True
                break
            if joined:
                break
    return blocks


@dataclass(frozen=True)
class RingPlan:
    """steps[r][s]: the blocks rank r computes with the keys/values of rank r - s (mod P).

    The shards travel both ways round the ring, only as far as some rank needs them: forward
    ``forward_hops`` steps (rank r receives from r-1, r-2, ...) and backward ``backward_hops``
    steps (from r+1, r+2, ...). A full causal ring goes forward only (P - 1 hops); a window can
    cut both (zigzag with a window within a chunk: one hop each way, since a rank's two chunks
    neighbour those of r - 1 and r + 1), so shards no rank needs are neither sent nor computed."""

    world: int
    layout: str
    chunk: int
    steps: tuple[tuple[tuple[Block, ...], ...], ...]
    forward_hops: int
    backward_hops: int

    @property
    def offsets(self) -> tuple[int, ...]:
        """The steps s a rank goes through, in order: its own shard, then forward and backward
        hops interleaved (what :func:`docqa_fast.distributed.ring.ring_kv` yields)."""
        found = [0]
        for hop in range(1, max(self.forward_hops, self.backward_hops) + 1):
            if hop <= self.forward_hops:
                found.append(hop)
            if hop <= self.backward_hops:
                found.append(self.world - hop)
        return tuple(found)

    @property
    def n_steps(self) -> int:
        return 1 + self.forward_hops + self.backward_hops

    def work(self, rank: int) -> int:
        """Visible score elements rank ``rank`` computes (the balance test's measure)."""
        return sum(block.visible_pairs() for step in self.steps[rank] for block in step)


def _hops(needed: set[int], world: int) -> tuple[int, int]:
    """(forward, backward) hops reaching every needed step with the fewest transfers; ties go
    to forward only (a one-way ring)."""
    best = None
    for split in range(world - 1, -1, -1):  # steps <= split go forward, the rest backward
        forward = max((s for s in needed if s <= split), default=0)
        backward = max((world - s for s in needed if s > split), default=0)
        if best is None or forward + backward < sum(best):
            best = (forward, backward)
    return best


@functools.lru_cache(maxsize=64)
def ring_plan(world: int, layout: str, total: int, causal: bool, window: tuple[int, int],
              boundaries: tuple[int, ...] | None = None) -> RingPlan:
    """The plan of one ring call.

    Args:
        world: P, the ranks of the ring.
        layout: "zigzag" or "contiguous".
        total: the global sequence length (dense S, or the packed total T).
        causal, window: the call's mask, flash-attn's (left, right) with -1 unbounded.
        boundaries: the global ``cu_seqlens`` of a packed batch, or None (dense).
    """
    per_rank = chunks_per_rank(layout)
    n_chunks = world * per_rank
    if total % n_chunks:
        raise ValueError(f"expected the global sequence length divisible by {n_chunks} ({layout} layout over "
                         f"{world} ranks), got {total}")
    chunk = total // n_chunks
    left, right = window
    steps = []
    needed = set()
    for rank in range(world):
        mine = rank_chunks(layout, rank, world)
        rank_steps = []
        for step in range(world):
            source = (rank - step) % world
            blocks = []
            for a, q_chunk in enumerate(mine):
                for b, k_chunk in enumerate(rank_chunks(layout, source, world)):
                    block = _block((q_chunk * chunk, (q_chunk + 1) * chunk), (k_chunk * chunk, (k_chunk + 1) * chunk),
                                   a * chunk, b * chunk, causal, left, right, boundaries)
                    if block is not None and block.q_hi > block.q_lo and block.k_hi > block.k_lo:
                        blocks.append(block)
            if blocks and step:
                needed.add(step)
            rank_steps.append(tuple(_fuse(blocks)))
        steps.append(tuple(rank_steps))
    return RingPlan(world, layout, chunk, tuple(steps), *_hops(needed, world))

"""The ring's block plan (no process group): every visible (query, key) pair of the global mask
is computed exactly once, at the rank holding the query; zigzag balances causal work; windows
skip masked blocks and trailing steps."""

import random

import pytest
import torch

from docqa_fast.distributed.plan import _visible_count, rank_chunks, ring_plan
from docqa_fast.reference.attention import _visible


def _global_mask(total, causal, window, boundaries):
    mask = torch.zeros(total, total, dtype=torch.bool)
    boundaries = boundaries or (0, total)
    for a, b in zip(boundaries, boundaries[1:]):
        mask[a:b, a:b] = _visible(b - a, b - a, causal, window, "cpu")
    return mask


def _local_positions(layout, rank, world, chunk):
    return [c * chunk + i for c in rank_chunks(layout, rank, world) for i in range(chunk)]


def _covered(plan, total, boundaries):
    """How many times the plan computes each (query, key) pair of the global sequence."""
    count = torch.zeros(total, total, dtype=torch.int32)
    world = plan.world
    for rank in range(world):
        q_pos = _local_positions(plan.layout, rank, world, plan.chunk)
        for step in plan.offsets:
            k_pos = _local_positions(plan.layout, (rank - step) % world, world, plan.chunk)
            for block in plan.steps[rank][step]:
                qs, ks = q_pos[block.q_lo:block.q_hi], k_pos[block.k_lo:block.k_hi]
                segments = block.cu_seqlens or (0, len(qs))
                k_segments = block.cu_seqlens or (0, len(ks))
                for (a, b), (c, d) in zip(zip(segments, segments[1:]), zip(k_segments, k_segments[1:])):
                    seen = _visible(b - a, d - c, block.causal, (block.window_left, block.window_right), "cpu")
                    rows = torch.tensor(qs[a:b], dtype=torch.long)[:, None]
                    cols = torch.tensor(ks[c:d], dtype=torch.long)[None, :]
                    count[rows.expand_as(seen)[seen], cols.expand_as(seen)[seen]] += 1
    return count


def _random_boundaries(rng, total):
    cuts = sorted(rng.sample(range(1, total), rng.randint(1, 4)))
    cuts.insert(rng.randint(0, len(cuts)), cuts[0])  # an empty document
    return tuple([0] + sorted(cuts) + [total])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_plan_covers_the_mask_once(world, layout):
    rng = random.Random(world * 7 + len(layout))
    chunk = 5
    total = chunk * world * (2 if layout == "zigzag" else 1)
    masks = [(True, (-1, -1)), (False, (-1, -1)), (True, (3, -1)), (False, (2, 6)), (False, (0, 0)), (True, (7, 3))]
    for causal, window in masks:
        for boundaries in (None, _random_boundaries(rng, total)):
            plan = ring_plan(world, layout, total, causal, window, boundaries)
            covered = _covered(plan, total, boundaries)
            expected = _global_mask(total, causal, window, boundaries).int()
            assert torch.equal(covered, expected), (causal, window, boundaries)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_causal_work_is_balanced(world):
    for chunk in (16, 37):
        plan = ring_plan(world, "zigzag", 2 * world * chunk, True, (-1, -1))
        work = [plan.work(r) for r in range(world)]
        balanced = sum(work) / world
        assert sum(work) == _visible_count(2 * world * chunk, 2 * world * chunk, True, -1, -1)
        assert max(abs(w - balanced) for w in work) <= 0.05 * balanced, work


def test_contiguous_causal_work_is_not_balanced():
    # The measure can fail: the plain ring's last rank does ~2P-1 times the first one's work.
    plan = ring_plan(4, "contiguous", 64, True, (-1, -1))
    work = [plan.work(r) for r in range(4)]
    assert work[-1] > 5 * work[0]


def test_window_skips_blocks_and_steps():
    # A window no wider than a contiguous shard needs the previous shard only: one extra step.
    assert ring_plan(8, "contiguous", 8 * 32, True, (31, -1)).offsets == (0, 1)
    assert ring_plan(8, "contiguous", 8 * 32, True, (-1, -1)).offsets == tuple(range(8))
    # Zigzag: a rank's chunks neighbour rank r-1's first and rank r+1's second chunk: one hop
    # each way, the shards of the ranks between are not sent.
    assert ring_plan(8, "zigzag", 8 * 2 * 32, True, (16, -1)).offsets == (0, 1, 7)
    # Two-sided windows reach both neighbours of a contiguous shard.
    assert ring_plan(8, "contiguous", 8 * 32, False, (4, 4)).offsets == (0, 1, 7)
    plan = ring_plan(4, "zigzag", 4 * 2 * 32, True, (16, -1))
    blocks = sum(len(step) for rank in plan.steps for step in rank)
    # Each rank: its 2 diagonal blocks and one neighbour block per chunk (the chunk that touches
    # it), versus 2P+1 blocks per rank unwindowed: masked blocks are not computed.
    assert blocks == 4 * 4 - 1


def test_indivisible_length_is_an_error():
    with pytest.raises(ValueError, match="divisible by 8"):
        ring_plan(4, "zigzag", 30, True, (-1, -1))


def test_zigzag_causal_steps_are_one_call_each():
    # Step 0 is one causal call over the rank's own shard; every later step one call too (its
    # two query chunks over one key chunk, or one query chunk over both), as in ring-flash-attn.
    plan = ring_plan(4, "zigzag", 4 * 2 * 16, True, (-1, -1))
    assert all(len(step) == 1 for rank in plan.steps for step in rank)

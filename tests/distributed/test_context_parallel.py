"""Context-parallel attention on gloo worlds of 2 and 4 CPU processes (torch.multiprocessing
spawn, one world per size running every case of tests/distributed/_worker.py): outputs and
gradients equal the single-process computation by the tolerance rule (ring contiguous and
zigzag, dense and packed, causal / window / GQA / softcap; Ulysses; the Ulysses x ring hybrid),
the bf16 error does not grow with the world size, and every fault ends in an error on every
rank, not a hang."""

import json
import socket

import pytest
import torch.multiprocessing as mp

from . import _worker

WORLDS = (2, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """{world: [rank 0's records, rank 1's, ...]}, each world spawned once."""
    found = {}
    for world in WORLDS:
        out_dir = tmp_path_factory.mktemp(f"world{world}")
        mp.spawn(_worker.run, args=(world, _free_port(), str(out_dir)), nprocs=world, join=True)
        found[world] = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]
    return found


def _case_names(world):
    return [name for name in _worker.cases(world)] + ["fault-rank-raises"]


@pytest.mark.slow
@pytest.mark.parametrize("world,name", [(w, n) for w in WORLDS for n in _case_names(w)])
def test_case_on_every_rank(records, world, name):
    for rank, record in enumerate(records[world]):
        assert name in record, f"rank {rank} did not run {name}"
        assert record[name] is None, f"rank {rank}, world {world}:\n{record[name]}"


@pytest.mark.slow
def test_bf16_error_does_not_grow_with_world_size(records):
    found = {world: records[world][0]["bf16-error"] for world in WORLDS}
    assert all(isinstance(e, list) for e in found.values()), found
    ring_max = {world: e[0] for world, e in found.items()}
    ring_mean = {world: e[2] for world, e in found.items()}
    single_max, single_mean = found[2][1], found[2][3]  # the single-process bf16 call (world 4 computes the same)
    # The tolerance rule on the max: each block's bf16 output and the final rounding.
    for world in WORLDS:
        assert ring_max[world] <= 2 * single_max, (ring_max, single_max)
    # The mean shows the accumulator: kept in bf16 it rounds once per merged block, and at 4
    # ranks its mean error was measured at 1.70x the single call's (1.22x its 2-rank value),
    # against 1.40x (1.08x) with the fp32 accumulator.
    for world in WORLDS:
        assert ring_mean[world] <= 1.5 * single_mean, (ring_mean, single_mean)
    assert ring_mean[4] <= 1.15 * ring_mean[2], ring_mean

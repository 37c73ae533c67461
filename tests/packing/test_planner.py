"""plan_packing: the C++ planner against the Python reference, and the invariants of a plan."""

import random
import zlib

import numpy as np
import pytest
import torch

import docqa_fast
from docqa_fast.packing import plan_packing
from docqa_fast.reference.packing import plan_packing_ref

pytestmark = pytest.mark.backends("reference", "extension")
STRATEGIES = ("bfd", "ffd", "greedy")


def _rng(request):
    return random.Random(zlib.crc32(request.node.nodeid.encode()))


def _check_plan(bins, lengths, max_tokens):
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths))), "every sample placed exactly once"
    for b in bins:
        assert b, "no empty bins"
        assert sum(lengths[i] for i in b) <= max_tokens


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_invariants_and_reference(backend, strategy, request):
    rng = _rng(request)
    for _ in range(60):
        max_tokens = rng.choice([1, 7, 113, 4096, 131072])
        n = rng.choice([0, 1, 2, 17, 203, 1000])
        lengths = [rng.randint(0, max_tokens) for _ in range(n)]
        if n and rng.random() < 0.3:  # many ties and exact fits
            lengths = [rng.choice([0, max_tokens // 2, max_tokens]) for _ in range(n)]
        bins = plan_packing(lengths, max_tokens, strategy=strategy)
        _check_plan(bins, lengths, max_tokens)
        assert bins == plan_packing_ref(lengths, max_tokens, strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_split_long(backend, strategy, request):
    rng = _rng(request)
    for _ in range(40):
        max_tokens = rng.choice([1, 5, 100])
        lengths = [rng.randint(0, 4 * max_tokens) for _ in range(rng.randint(0, 60))]
        bins = plan_packing(lengths, max_tokens, strategy=strategy, split_long=True)
        assert bins == plan_packing_ref(lengths, max_tokens, strategy=strategy, split_long=True)
        covered = {i: [] for i in range(len(lengths))}
        for b in bins:
            assert sum(stop - start for _, start, stop in b) <= max_tokens
            for i, start, stop in b:
                covered[i].append((start, stop))
        for i, spans in covered.items():  # the pieces tile the sample exactly once
            spans.sort()
            assert spans[0][0] == 0 and spans[-1][1] == lengths[i]
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert len(spans) == max(1, -(-lengths[i] // max_tokens))


def test_known_plans(backend):
    assert plan_packing([5, 3, 7, 2, 9, 1], 10, strategy="bfd") == [[4, 5], [2, 1], [0, 3]]
    assert plan_packing([6, 5, 4, 4], 10, strategy="ffd") == [[0, 2], [1, 3]]
    assert plan_packing([6, 5, 4, 4], 10, strategy="greedy") == [[0], [1, 2], [3]]
    # best fit picks the tightest bin, first fit the earliest one
    assert plan_packing([8, 6, 2], 10, strategy="bfd") == [[0, 2], [1]]
    assert plan_packing([8, 6, 1, 3], 10, strategy="ffd") == [[0, 2], [1, 3]]
    assert plan_packing([8, 6, 1, 3], 10, strategy="bfd") == [[0], [1, 3, 2]]  # 1 goes to the room-1 bin
    assert plan_packing([], 10) == []
    assert plan_packing([25, 3], 10, split_long=True) == [[(0, 0, 10)], [(0, 10, 20)], [(0, 20, 25), (1, 0, 3)]]


def test_input_kinds(backend):
    lengths = [3, 9, 4, 1]
    expected = plan_packing(lengths, 10)
    assert plan_packing(torch.tensor(lengths, dtype=torch.int32), 10) == expected
    assert plan_packing(np.array(lengths), 10) == expected
    assert plan_packing(tuple(lengths), 10) == expected


def test_bfd_beats_greedy_on_a_realistic_mix(backend):
    # Document lengths of a long-document SFT mix: 2K-128K tokens, log-uniform.
    gen = np.random.default_rng(0)
    lengths = np.exp(gen.uniform(np.log(2048), np.log(131072), 3000)).astype(np.int64)
    bfd = plan_packing(lengths, 131072, strategy="bfd")
    greedy = plan_packing(lengths, 131072, strategy="greedy")
    assert len(bfd) <= len(greedy)
    assert len(bfd) <= int(np.ceil(lengths.sum() / 131072 * 1.05))


@pytest.mark.parametrize("bad, kind, match", [
    (dict(lengths=[1, 2], max_tokens=0), ValueError, "max_tokens > 0"),
    (dict(lengths=[1, 2], max_tokens=-3), ValueError, "max_tokens > 0"),
    (dict(lengths=[1, -2], max_tokens=4), ValueError, r"lengths\[1\] = -2"),
    (dict(lengths=[1, 5], max_tokens=4), ValueError, r"lengths\[1\] = 5 exceeds max_tokens = 4.*split_long"),
    (dict(lengths=[1, 2], max_tokens=4, strategy="worst"), ValueError, "strategy"),
    (dict(lengths=[1, 2], max_tokens=4.0), TypeError, "max_tokens"),
    (dict(lengths=torch.tensor([1.0]), max_tokens=4), TypeError, "lengths"),
    (dict(lengths=torch.ones(2, 2, dtype=torch.long), max_tokens=4), ValueError, "1-D lengths"),
    (dict(lengths="abc", max_tokens=4), TypeError, "lengths"),
])
def test_bad_input(backend, bad, kind, match):
    with pytest.raises(kind, match=match):
        plan_packing(**bad)


def test_extension_exposes_planner():
    if docqa_fast.backends()["extension"].available:
        ext = docqa_fast._backend.extension()
        sample, start, length, offsets, items = ext.plan_packing(torch.tensor([4, 4, 4]), 8, 2, False)
        assert offsets.tolist() == [0, 2, 3] and items.tolist() == [0, 1, 2]
        with pytest.raises(TypeError, match="int64"):
            ext.plan_packing(torch.tensor([4], dtype=torch.int32), 8, 2, False)
    else:
        pytest.skip("docqa_fast._C not built")

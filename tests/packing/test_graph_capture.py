"""CUDA graph capture of the sync-free calls (``check=False``): captured once, replayed on new
input values, equal to eager calls. Skipped without a GPU (the next GPU run checks them)."""

import pytest
import torch

import docqa_fast
from docqa_fast.packing import get_rope_index, merge_visual_tokens
from docqa_fast.testing import capture_cuda_graph

from .documents import IMAGE_ID

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_rope_index_is_captured_and_replayed():
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]], device="cuda")
    types = torch.zeros(2, 20, dtype=torch.int32, device="cuda")
    mask = torch.ones(2, 20, dtype=torch.long, device="cuda")

    def fill(first, second):  # an image of grid[0] (6 tokens) at `first` in row 0, of grid[1] (1) in row 1
        types.zero_()
        types[0, first:first + 6] = 1
        types[1, second] = 1

    fill(2, 5)
    graph = capture_cuda_graph(lambda: get_rope_index(types.long(), types, grid, attention_mask=mask, check=False))
    for first, second in ((7, 0), (0, 19), (14, 9)):
        fill(first, second)
        positions, deltas = graph.replay()
        expected = get_rope_index(types.long(), types, grid, attention_mask=mask)
        assert torch.equal(positions, expected[0]) and torch.equal(deltas, expected[1])


def test_merge_is_captured_and_replayed():
    ids = torch.randint(0, 1000, (1, 64), device="cuda")
    ids[0, ::3] = IMAGE_ID
    embeds = torch.randn(1, 64, 40, device="cuda")
    visual = torch.randn(int((ids == IMAGE_ID).sum()), 40, device="cuda")
    graph = capture_cuda_graph(lambda: merge_visual_tokens(embeds, ids, visual, IMAGE_ID, check=False))
    for _ in range(2):
        embeds.normal_()
        visual.normal_()
        merged = graph.replay()
        torch.testing.assert_close(merged, merge_visual_tokens(embeds, ids, visual, IMAGE_ID), rtol=0, atol=0)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_reward_forward_backward_is_captured_and_replayed(sparse_grad):
    """The one-launch backward included: the dense gradient (or the sparse rows) of a replay equal
    to an eager step's."""
    x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)
    mask = torch.ones(4, 33, dtype=torch.long, device="cuda")
    mask[1, 20:] = 0
    weight = torch.randn(5, 64, device="cuda", requires_grad=True)

    def step():
        rewards = docqa_fast.ensemble_rewards(x, weight, attention_mask=mask, check=False, sparse_grad=sparse_grad)
        loss = docqa_fast.pairwise_loss(rewards[:2].mean(-1), rewards[2:].mean(-1))
        return torch.autograd.grad(loss, (x, weight))

    graph = capture_cuda_graph(step)
    for _ in range(2):
        with torch.no_grad():
            x.normal_()
            weight.normal_()
        grads = graph.replay()
        expected = step()
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got.to_dense() if got.is_sparse else got,
                                       want.to_dense() if want.is_sparse else want)


def _pack_inputs(lengths, images):
    """The packing copy's arguments on the GPU: token fields per document, grids and odd-width
    bf16 pixels per document with images."""
    cuda = torch.device("cuda")
    ids = [torch.randint(0, 100, (n,), device=cuda) for n in lengths]
    labels = [torch.randint(0, 100, (n,), device=cuda) for n in lengths]
    types = [torch.randint(0, 3, (n,), dtype=torch.int32, device=cuda) for n in lengths]
    mrope = [torch.randint(0, 100, (3, n), device=cuda) for n in lengths]
    grids = [torch.randint(1, 9, (k, 3), device=cuda) for k in images]
    pixels = [torch.randn(113 * k + 1, 59, device=cuda).bfloat16() for k in images]
    return ids, labels, types, mrope, grids, pixels


def test_packing_copy_is_captured_and_replayed():
    """Token fields, grids and pixels in the copy's one launch, its tables passed by value: a
    replay on new values in the same buffers equals an eager call, bit for bit."""
    from docqa_fast.packing.ops import PACK_TOKENS

    ids, labels, types, mrope, grids, pixels = _pack_inputs([5, 1, 300], [2, 1, 3])
    cuda = torch.device("cuda")

    def call():
        tokens = PACK_TOKENS(cuda, None, ids, labels, types, mrope, -100, cuda, [grids, pixels])
        return (*tokens[:4], *tokens[4])

    graph = capture_cuda_graph(call)
    for _ in range(2):
        for t in (*ids, *labels, *mrope, *grids):
            t.random_(0, 100)
        for p in pixels:
            p.normal_()
        replayed = graph.replay()
        for got, want in zip(replayed, call()):
            assert torch.equal(got, want)
        assert torch.equal(replayed[-1], torch.cat(pixels))


def test_packing_copy_too_large_to_capture_is_refused():
    """Tables past the launch argument's room would be staged in host memory a replay could find
    reused: the capture is refused with a ValueError (eager calls take them)."""
    from docqa_fast.packing.ops import PACK_TOKENS

    ids, labels, types, mrope, grids, pixels = _pack_inputs([1] * 100, [1] * 100)
    cuda = torch.device("cuda")

    def call():
        return PACK_TOKENS(cuda, None, ids, labels, types, mrope, -100, cuda, [grids, pixels])

    eager = call()
    assert torch.equal(eager[4][1], torch.cat(pixels))
    with pytest.raises(ValueError, match="a CUDA graph captures rows whose tables fit"):
        capture_cuda_graph(call)

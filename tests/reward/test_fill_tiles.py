"""The dense backward's fill tile (``reward_backward_fill``: FILL_ROWS x FILL_BLOCK_H), a tunable
the tuning tool measures: candidates with more rows and more columns write the same input
gradient as the built-in tile, padded and packed, at odd sizes (rows and hidden columns no
multiple of any tile). On the GPU the tool itself rejects any candidate that changes the answer."""

import pytest
import torch

import docqa_fast
from docqa_fast.kernels import reward as kernels
from docqa_fast.kernels import tuning
from docqa_fast.tools import tune_cases

pytestmark = pytest.mark.backends("triton")

FILLS = [t for t in next(t for t in tune_cases.tunables(["reward"]) if t.kernel == "reward_backward_fill")
         .candidates(quick=False) if t != kernels.DEFAULT_FILL]


def _input_gradient(x, weight, **layout):
    x = x.detach().requires_grad_()
    docqa_fast.ensemble_rewards(x, weight, **layout).sum().backward()
    return x.grad


@pytest.mark.slow  # ~10 s a layout under the interpreter; the tuning tool re-checks on the GPU
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fill_candidates_write_the_builtin_gradient(backend, layout, device):
    hidden, heads = 59, 5
    weight = torch.randn(heads, hidden, device=device).half()
    if layout == "padded":
        x = torch.randn(3, 37, hidden, device=device).half()
        mask = torch.ones(3, 37, dtype=torch.long, device=device)
        mask[1, 20:] = 0
        call = dict(attention_mask=mask)
    else:
        x = torch.randn(113, hidden, device=device).half()
        call = dict(cu_seqlens=torch.tensor([0, 1, 40, 113], dtype=torch.int32, device=device))
    key = kernels.tile_key(x.dtype, heads)
    expected = _input_gradient(x, weight, **call)
    assert expected.abs().sum() > 0
    for fill in FILLS[:2]:  # (16, 512) and (32, 256): more rows and more columns than the built-in tile
        with tuning.override("reward_backward_fill", key, fill):
            assert torch.equal(_input_gradient(x, weight, **call), expected), fill

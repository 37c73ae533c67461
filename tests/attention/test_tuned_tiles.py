"""The training attention kernels with the tiles of the sm90 tuned table (what an H100 / H200
launches), against the reference: on CPU under the interpreter, by forcing that table."""

import pytest
import torch

from docqa_fast.kernels import tuning
from docqa_fast.testing import tuned_tables
from .test_attention import check_attention

pytestmark = pytest.mark.backends("triton")


@pytest.fixture
def launched(monkeypatch):
    """Force the sm90 table and record the tiles each launch looks up."""
    seen = {}
    lookup = tuning.lookup

    def spy(kernel, key, default, device):
        tiles = lookup(kernel, key, default, device)
        seen[kernel, key] = tiles
        return tiles

    monkeypatch.setattr(tuning, "lookup", spy)
    with tuned_tables(monkeypatch, "sm90"):
        yield seen


def _expect_table_tiles(seen, keys):
    table = tuning.load_table(tuning.active_table_path(torch.device("cpu")))
    for kernel, key in keys:
        assert seen.get((kernel, key)) == table[kernel][key], f"{kernel}[{key}] did not launch the table's tiles"


@pytest.mark.parametrize("seqlen_q, seqlen_k, causal", [(150, 150, True), (1, 1, True), (113, 203, True),
                                                        (203, 113, False)], ids=str)
def test_llm_head_dim_128_with_tuned_tiles(backend, launched, seqlen_q, seqlen_k, causal, device):
    """D 128 through TMA (emulated): 128 x 128 forward tiles, 128 x 64 dQ, 64 x 64 dK/dV; GQA 4:2;
    a single token; lengths that leave every tile partial."""
    q = torch.randn(2, seqlen_q, 4, 128, device=device).half()
    k, v = (torch.randn(2, seqlen_k, 2, 128, device=device).half() for _ in range(2))
    check_attention(q, k, v, causal=causal)
    _expect_table_tiles(launched, [("attention_forward", "D=128,tma"), ("attention_backward_dq", "D=128,tma"),
                                   ("attention_backward_dkdv", "D=128,tma")])


def test_vit_head_dim_80_with_tuned_tiles(backend, launched, device):
    """The ViT shape in small: head dim 80 (pointer loads), varlen with an empty and a 1-token image."""
    lengths = [113, 0, 1, 203]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, 4, 80, device=device).half() for _ in range(3))
    check_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    _expect_table_tiles(launched, [("attention_forward", "D=80"), ("attention_backward_dq", "D=80"),
                                   ("attention_backward_dkdv", "D=80")])

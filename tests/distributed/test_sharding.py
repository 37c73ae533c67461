"""The batch helpers of docqa_fast.distributed.transformers that need no process group."""

import pytest
import torch

from docqa_fast.distributed import ContextParallel, zigzag_ring_flash_attn_func
from docqa_fast.distributed.transformers import IGNORE_INDEX, sequence_loss, shard_batch, shifted_labels

SINGLE = ContextParallel.single()


def test_shifted_labels_stop_at_document_ends():
    labels = torch.tensor([[10, 11, 12, 13, 14, 15]])
    cu = torch.tensor([0, 2, 2, 6], dtype=torch.int32)  # documents [0, 2), empty, [2, 6)
    assert shifted_labels(labels, cu).tolist() == [[11, IGNORE_INDEX, 13, 14, 15, IGNORE_INDEX]]
    assert shifted_labels(labels).tolist() == [[11, 12, 13, 14, 15, IGNORE_INDEX]]


def test_shard_batch_and_loss_on_one_rank_match_the_model_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, 5, 6, 7]])
    local = shard_batch(SINGLE, labels=labels, position_ids=torch.arange(6).expand(3, 1, 6),
                        cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    assert local["position_ids"].shape == (3, 1, 6)
    assert local["attention_kwargs"]["max_length_q"] == 6
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(sequence_loss(logits, local["labels"], SINGLE), expected)


def test_ring_without_a_process_group_says_so():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        zigzag_ring_flash_attn_func(q, q, q, causal=True)

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


class _Attention(torch.nn.Module):
    is_causal = True


def test_cp_backend_on_one_process_is_flash_attention(monkeypatch):
    from docqa_fast import flash_attn_func
    from docqa_fast.distributed.transformers import context_parallel, context_parallel_attention_forward

    monkeypatch.setenv("DOCQA_FAST_BACKEND", "reference")
    torch.manual_seed(1)
    query, key, value = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)  # (B, H, S, D)
    with context_parallel(SINGLE):
        out, weights = context_parallel_attention_forward(_Attention(), query, key, value, None, sliding_window=3)
    expected = flash_attn_func(*(t.transpose(1, 2) for t in (query, key, value)), causal=True, window_size=(2, 2))
    assert weights is None
    torch.testing.assert_close(out, expected)


def test_cp_backend_refuses_what_it_cannot_run():
    from docqa_fast.distributed.transformers import context_parallel, context_parallel_attention_forward

    t = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="context_parallel"):
        context_parallel_attention_forward(_Attention(), t, t, t, None)
    with context_parallel(SINGLE), pytest.raises(ValueError, match="padding mask"):
        context_parallel_attention_forward(_Attention(), t, t, t, torch.ones(1, 4))

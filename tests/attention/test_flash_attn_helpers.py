"""flash-attn's remaining helper functions: the in-place packed rotary functions
(apply_rotary_emb_qkv_ / apply_rotary_emb_kv_) and unpad_input_for_concatenated_sequences,
checked against apply_rotary_emb on separate tensors and against sequences unpadded by hand."""

import pytest
import torch

from docqa_fast import flash_attn_varlen_func
from docqa_fast.bert_padding import unpad_input_for_concatenated_sequences
from docqa_fast.rotary import apply_rotary_emb, apply_rotary_emb_func, apply_rotary_emb_kv_, apply_rotary_emb_qkv_


def _tables(seqlen, rotary_dim, device, dtype, base=10000.0):
    inverse = base ** (-torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)
    angles = torch.arange(seqlen, device=device, dtype=torch.float32)[:, None] * inverse
    return angles.cos().to(dtype), angles.sin().to(dtype)


# The rotary and attention ops have these two implementations (no C++ one).
pytestmark = pytest.mark.backends("reference", "triton")


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("separate_k_tables", [False, True])
def test_qkv_in_place_equals_rotating_q_and_k(backend, device, interleaved, separate_k_tables):
    torch.manual_seed(0)
    dtype = torch.float32
    qkv = torch.randn(2, 13, 3, 3, 40, device=device, dtype=dtype)
    cos, sin = _tables(20, 24, device, dtype)
    cos_k, sin_k = _tables(20, 24, device, dtype, base=500.0) if separate_k_tables else (None, None)
    offsets = torch.tensor([0, 5], device=device, dtype=torch.int32)
    expected_q = apply_rotary_emb(qkv[:, :, 0].contiguous(), cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    expected_k = apply_rotary_emb(qkv[:, :, 1].contiguous(), cos if cos_k is None else cos_k,
                                  sin if sin_k is None else sin_k, interleaved=interleaved, seqlen_offsets=offsets)
    v = qkv[:, :, 2].clone()
    out = apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, interleaved=interleaved, seqlen_offsets=offsets)
    assert out is qkv
    torch.testing.assert_close(qkv[:, :, 0], expected_q, rtol=0, atol=0)
    torch.testing.assert_close(qkv[:, :, 1], expected_k, rtol=0, atol=0)
    assert torch.equal(qkv[:, :, 2], v)


@pytest.mark.parametrize("separate_k_tables", [False, True])
def test_grouped_qkv_in_place(backend, device, separate_k_tables):
    torch.manual_seed(1)
    dtype = torch.float32
    heads_q, heads_kv = 4, 2
    qkv = torch.randn(1, 9, heads_q + 2 * heads_kv, 16, device=device, dtype=dtype)
    cos, sin = _tables(9, 16, device, dtype)
    cos_k, sin_k = _tables(9, 16, device, dtype, base=77.0) if separate_k_tables else (None, None)
    before = qkv.clone()
    apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, num_heads_q=heads_q)
    torch.testing.assert_close(qkv[:, :, :heads_q], apply_rotary_emb(before[:, :, :heads_q].contiguous(), cos, sin),
                               rtol=0, atol=0)
    k_tables = (cos, sin) if cos_k is None else (cos_k, sin_k)
    torch.testing.assert_close(qkv[:, :, heads_q:heads_q + heads_kv],
                               apply_rotary_emb(before[:, :, heads_q:heads_q + heads_kv].contiguous(), *k_tables),
                               rtol=0, atol=0)
    assert torch.equal(qkv[:, :, heads_q + heads_kv:], before[:, :, heads_q + heads_kv:])


def test_kv_in_place_and_the_older_name(backend, device):
    torch.manual_seed(2)
    kv = torch.randn(2, 7, 2, 2, 8, device=device)
    cos, sin = _tables(7, 8, device, kv.dtype)
    before = kv.clone()
    assert apply_rotary_emb_kv_(kv, cos, sin, interleaved=True) is kv
    torch.testing.assert_close(kv[:, :, 0], apply_rotary_emb_func(before[:, :, 0].contiguous(), cos, sin,
                                                                  interleaved=True), rtol=0, atol=0)
    assert torch.equal(kv[:, :, 1], before[:, :, 1])


@pytest.mark.parametrize("call, error, message", [
    (lambda qkv, c, s: apply_rotary_emb_qkv_(qkv[:, :, :2], c, s), ValueError, "(B, S, 3, H, D)"),
    (lambda qkv, c, s: apply_rotary_emb_qkv_(qkv, c, s, cos_k=c), ValueError, "cos_k and sin_k"),
    (lambda qkv, c, s: apply_rotary_emb_qkv_(qkv, c, s, num_heads_q=2), ValueError, "num_heads_q"),
    (lambda qkv, c, s: apply_rotary_emb_qkv_(qkv.flatten(2, 3), c, s), TypeError, "num_heads_q"),
    (lambda qkv, c, s: apply_rotary_emb_qkv_(qkv.flatten(2, 3), c, s, num_heads_q=3), ValueError, "num_heads_q"),
    (lambda qkv, c, s: apply_rotary_emb_qkv_(qkv.long(), c, s), TypeError, "qkv"),
    (lambda qkv, c, s: apply_rotary_emb_qkv_(qkv, c[:4], s[:4]), ValueError, "qkv's q"),
    (lambda qkv, c, s: apply_rotary_emb_kv_(qkv, c, s), ValueError, "(B, S, 2, H, D)"),
    (lambda qkv, c, s: apply_rotary_emb_kv_(qkv[0], c, s), ValueError, "kv"),
])
def test_packed_rotary_bad_input(call, error, message):
    qkv = torch.randn(1, 6, 3, 2, 8)
    cos, sin = _tables(6, 8, "cpu", qkv.dtype)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("'", ".")):
        call(qkv, cos, sin)


def test_unpad_concatenated_sequences(backend, device):
    torch.manual_seed(3)
    # fp16: the dtype every attention backend takes (fp32 attention runs on the reference path).
    hidden = torch.randn(3, 6, 2, 8, device=device, dtype=torch.float16)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], device=device)
    rows, indices, cu_seqlens, max_seqlen = unpad_input_for_concatenated_sequences(hidden, lengths)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 5, 11]
    assert max_seqlen == 6
    torch.testing.assert_close(rows, hidden.reshape(18, 2, 8)[indices], rtol=0, atol=0)
    # The two sequences of row 0 are separate documents: causal varlen attention over them equals
    # attending each alone.
    out = flash_attn_varlen_func(rows, rows, rows, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    alone = flash_attn_varlen_func(rows[2:5], rows[2:5], rows[2:5],
                                   torch.tensor([0, 3], dtype=torch.int32, device=device),
                                   torch.tensor([0, 3], dtype=torch.int32, device=device), 3, 3, causal=True)
    torch.testing.assert_close(out[2:5], alone)


@pytest.mark.parametrize("lengths, error, message", [
    (torch.tensor([[2, 5], [0, 0]]), ValueError, "at most 2 per row"),
    (torch.tensor([[-1, 0], [0, 0]]), ValueError, "non-negative"),
    (torch.tensor([[1.0, 0], [0, 0]]), TypeError, "attention_mask_in_length"),
    (torch.tensor([[1, 0, 0]]), ValueError, "attention_mask_in_length of shape"),
])
def test_unpad_concatenated_sequences_bad_input(lengths, error, message):
    with pytest.raises(error, match=message):
        unpad_input_for_concatenated_sequences(torch.zeros(2, 2, 4), lengths)

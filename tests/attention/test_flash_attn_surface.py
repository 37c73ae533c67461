"""The rest of flash-attn 2's surface: any head dim up to 256, windows as flash-attn takes them,
ALiBi, dropout, errors that are RuntimeErrors too, and the padding / rotary helpers."""

import math

import numpy as np
import pytest
import torch

import docqa_fast
from docqa_fast.attention.ops import dropout_seed
from docqa_fast.bert_padding import index_first_axis, pad_input, unpad_input
from docqa_fast.reference.attention import attention_backward_ref, attention_ref, dropout_keep_ref
from docqa_fast.reference.kvcache import flash_attn_varlen_paged_ref, flash_attn_with_kvcache_ref
from docqa_fast.rotary import apply_rotary_emb
from docqa_fast.testing import assert_close_by_rule

from .test_attention import assert_matches_reference, check_attention

pytestmark = pytest.mark.backends("reference", "triton")


def _qkv(device, batch=2, seqlen_q=19, seqlen_k=19, heads=4, kv_heads=2, head_dim=32, dtype=torch.float16):
    return (torch.randn(batch, seqlen_q, heads, head_dim, device=device, dtype=dtype),
            torch.randn(batch, seqlen_k, kv_heads, head_dim, device=device, dtype=dtype),
            torch.randn(batch, seqlen_k, kv_heads, head_dim, device=device, dtype=dtype))


# ------------------------------------------------------------------------------ head dims

HEAD_DIMS = [1, 8, 40, 59, 80, 111, 160, 224, 256]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_any_head_dim_forward_and_backward(backend, head_dim, device):
    q, k, v = _qkv(device, seqlen_q=13, seqlen_k=21, heads=2, kv_heads=1, head_dim=head_dim)
    check_attention(q, k, v, causal=True)


@pytest.mark.parametrize("head_dim", [1, 59, 111, 256])
def test_any_head_dim_varlen_and_kvcache(backend, head_dim, device):
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=device)
    q = torch.randn(20, 2, head_dim, device=device, dtype=torch.float16)
    k, v = (torch.randn(20, 1, head_dim, device=device, dtype=torch.float16) for _ in range(2))
    check_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=13, max_seqlen_k=13, causal=True)

    q = torch.randn(2, 1, 4, head_dim, device=device, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(2, 48, 2, head_dim, device=device, dtype=torch.float16) for _ in range(2))
    lengths = torch.tensor([5, 40], dtype=torch.int32, device=device)
    out = docqa_fast.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    expected = flash_attn_with_kvcache_ref(q, k_cache, v_cache, cache_seqlens=lengths)
    plain = flash_attn_with_kvcache_ref(q, k_cache, v_cache, cache_seqlens=lengths, upcast=False)
    assert_close_by_rule(out, expected.double(), plain, name="out")


def test_sdpa_front_end_odd_head_dims(backend, device):
    for head_dim in (59, 224):
        q, k, v = (torch.randn(1, 2, 11, head_dim, device=device, dtype=torch.float16) for _ in range(3))
        out = docqa_fast.scaled_dot_product_attention(q, k, v, is_causal=True)
        exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        plain = attention_ref(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, upcast=False)[0].transpose(1, 2)
        assert_close_by_rule(out, exact, plain, name=f"out D={head_dim}")


# --------------------------------------------------------------------------------- windows

@pytest.mark.parametrize("window", [(4, 2), [4, 2], (np.int64(4), np.int32(2)), "tensor"])
def test_window_as_flash_attn_takes_it(backend, window, device):
    q, k, v = _qkv(device)
    if window == "tensor":  # as flash-attn's own tests draw it: torch.randint(0, seqlen, (2,))
        window = torch.tensor([4, 2])
    expected = docqa_fast.flash_attn_func(q, k, v, window_size=(4, 2))
    assert torch.equal(docqa_fast.flash_attn_func(q, k, v, window_size=window), expected)
    assert not torch.equal(expected, docqa_fast.flash_attn_func(q, k, v))  # the window did something


@pytest.mark.parametrize("window, error", [
    (torch.tensor([1, 2, 3]), "1-D integer tensor of two elements"),
    (torch.tensor([1.0, 2.0]), "1-D integer tensor of two elements"),
    ((1.5, 2), "two integers"),
    (3, "a pair"),
])
def test_bad_windows(window, error):
    q, k, v = _qkv("cpu")
    with pytest.raises(TypeError, match=error):
        docqa_fast.flash_attn_func(q, k, v, window_size=window)


# ----------------------------------------------------------------------------------- ALiBi

def _slopes(shape, device):
    return torch.rand(shape, device=device) * 0.5 + 0.05


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_dense(backend, per_batch, causal, device):
    q, k, v = _qkv(device, seqlen_q=17, seqlen_k=29)
    check_attention(q, k, v, causal=causal, alibi_slopes=_slopes((2, 4) if per_batch else (4,), device))


def test_alibi_bias_is_flash_attns(device):
    """The reference's bias against the formula written out: -slope * |i + Sk - Sq - j|."""
    q, k, v = _qkv(device, batch=1, seqlen_q=5, seqlen_k=9, heads=2, kv_heads=2, head_dim=8, dtype=torch.float64)
    slopes = torch.tensor([0.3, 0.7], device=device)
    scale = 1 / math.sqrt(8)
    i, j = torch.arange(5, device=device)[:, None], torch.arange(9, device=device)[None, :]
    bias = -slopes.double()[:, None, None] * (i + 9 - 5 - j).abs()
    scores = torch.einsum("qhd,khd->hqk", q[0], k[0]) * scale + bias
    expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[0])
    out, _ = attention_ref(q, k, v, alibi_slopes=slopes)
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_varlen_with_empty_sequences(backend, causal, device):
    cu_q = torch.tensor([0, 9, 9, 22, 23], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 14, 20, 27, 27], dtype=torch.int32, device=device)
    q = torch.randn(23, 4, 32, device=device, dtype=torch.float16)
    k, v = (torch.randn(27, 2, 32, device=device, dtype=torch.float16) for _ in range(2))
    check_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=13, max_seqlen_k=14, causal=causal,
                    alibi_slopes=_slopes((4, 4), device))


@pytest.mark.parametrize("paged", [False, True])
def test_alibi_kvcache(backend, paged, device):
    batch, heads, kv_heads, head_dim = 3, 4, 2, 32
    q = torch.randn(batch, 3, heads, head_dim, device=device, dtype=torch.float16)
    k, v = (torch.randn(batch, 2, kv_heads, head_dim, device=device, dtype=torch.float16) for _ in range(2))
    lengths = torch.tensor([10, 45, 0], dtype=torch.int32, device=device)
    if paged:
        k_cache = torch.randn(12, 16, kv_heads, head_dim, device=device, dtype=torch.float16)
        extra = dict(block_table=torch.randperm(12, device=device)[:batch * 4].view(batch, 4).int())
    else:
        k_cache = torch.randn(batch, 64, kv_heads, head_dim, device=device, dtype=torch.float16)
        extra = dict(cache_leftpad=torch.tensor([3, 0, 0], dtype=torch.int32, device=device))
    v_cache = torch.randn_like(k_cache)

    def reference(options, dtype, absolute=False, **upcast):
        """The reference on copies of the inputs (it appends to its caches) in ``dtype``: -> (out, lse),
        and its caches. ``absolute``: on |q|, |k| (see test_attention.lse_magnitude)."""
        tensors = [t.to(dtype).abs() if absolute else t.to(dtype, copy=True) for t in (q, k_cache, v_cache, k, v)]
        return flash_attn_with_kvcache_ref(*tensors, **options, **upcast), tensors[1:3]

    for slopes in (_slopes((heads,), device), _slopes((batch, heads), device)):
        options = dict(cache_seqlens=lengths, causal=True, alibi_slopes=slopes, return_softmax_lse=True, **extra)
        ours = (k_cache.clone(), v_cache.clone())
        out, lse = docqa_fast.flash_attn_with_kvcache(q, *ours, k, v, **options)
        (exact, exact_lse), exact_caches = reference(options, torch.float64)
        (plain, _), _ = reference(options, q.dtype, upcast=False)
        (_, plain_lse), _ = reference(options, torch.float32, upcast=False)  # the kernel's LSE precision
        (_, magnitude), _ = reference(options, torch.float64, absolute=True)
        assert_close_by_rule(out, exact, plain, name="out")
        assert_close_by_rule(lse, exact_lse, plain_lse, name="lse", magnitude=magnitude)
        assert all(torch.equal(a.double(), b) for a, b in zip(ours, exact_caches))  # fp16 values, exact in fp64


def test_alibi_varlen_over_a_paged_cache(backend, device):
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 40, 45, 100], dtype=torch.int32, device=device)
    q = torch.randn(8, 4, 32, device=device, dtype=torch.float16)
    k_cache, v_cache = (torch.randn(12, 32, 2, 32, device=device, dtype=torch.float16) for _ in range(2))
    block_table = torch.randperm(12, device=device)[:6].view(3, 2).int()
    slopes = _slopes((3, 4), device)
    out, lse, _ = docqa_fast.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 5, 55, causal=True,
                                                    alibi_slopes=slopes, block_table=block_table,
                                                    return_attn_probs=True)
    exact, _ = flash_attn_varlen_paged_ref(q.double(), k_cache.double(), v_cache.double(), cu_q, cu_k, block_table,
                                           causal=True, alibi_slopes=slopes)
    plain, _ = flash_attn_varlen_paged_ref(q, k_cache, v_cache, cu_q, cu_k, block_table, causal=True,
                                           alibi_slopes=slopes, upcast=False)
    assert_close_by_rule(out, exact, plain, name="out")


# --------------------------------------------------------------------------------- dropout

def _dropout_call(q, k, v, p, seed_value, **options):
    """Our attention with dropout, and the Philox seed it drew (the first draw after manual_seed)."""
    torch.manual_seed(seed_value)
    out = docqa_fast.flash_attn_func(q, k, v, dropout_p=p, **options)
    torch.manual_seed(seed_value)
    return out, dropout_seed(q.device)


def test_dropout_keeps_one_minus_p_and_the_reference_mask(backend, device):
    """q = 0 makes every probability 1 / Sk and v = identity makes out[i, j] = keep_ij / (Sk (1 - p)):
    the output is the kernel's dropout mask, read exactly."""
    p, heads, size = 0.3, 4, 128
    q = torch.zeros(1, size, heads, size, device=device, dtype=torch.float16)
    k = torch.randn(1, size, heads, size, device=device, dtype=torch.float16)
    v = torch.eye(size, device=device, dtype=torch.float16)[None, :, None, :].expand(1, size, heads, size).contiguous()
    out, seed = _dropout_call(q, k, v, p, 123)
    kept = (out.float() * size * (1 - p)).round()
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    assert abs(kept.mean().item() - (1 - p)) < 0.01
    expected = dropout_keep_ref(seed, 0, heads, size, size, p, device)  # (H, Sq, Sk)
    assert torch.equal(kept[0].permute(1, 0, 2).bool(), expected)


@pytest.mark.parametrize("causal, alibi", [(True, False), (False, True)])
def test_dropout_forward_and_backward_match_the_reference(backend, causal, alibi, device):
    q, k, v = (t.requires_grad_() for t in _qkv(device, seqlen_q=23, seqlen_k=31))
    p = 0.25
    slopes = _slopes((4,), device) if alibi else None
    out, seed = _dropout_call(q, k, v, p, 5, causal=causal, alibi_slopes=slopes)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert_matches_reference(q, k, v, dout, out, grads, causal=causal, alibi_slopes=slopes, dropout_p=p,
                             dropout_seed=seed)


def test_reference_backward_with_dropout_is_autograds(device):
    """The reference's closed-form backward (ALiBi and dropout included) against autograd through its forward."""
    q, k, v = (t.double() for t in _qkv(device, seqlen_q=9, seqlen_k=12))
    seed, slopes = torch.tensor([987654321987], device=device), _slopes((4,), device)
    options = dict(causal=True, dropout_p=0.4, dropout_seed=seed, alibi_slopes=slopes)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_ref(*leaves, **options)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, dout)
    got = attention_backward_ref(dout, q, k, v, out.detach(), lse, **options)
    for g, e in zip(got, expected):  # the LSE comes back in fp32: fp32's rounding, not fp64's
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_dropout_is_reproducible_and_deterministic(backend, device):
    q, k, v = (t.requires_grad_() for t in _qkv(device))

    def step(seed_value):
        torch.manual_seed(seed_value)
        out = docqa_fast.flash_attn_func(q, k, v, dropout_p=0.2, causal=True, deterministic=True)
        return (out, *torch.autograd.grad(out.float().square().sum(), (q, k, v)))

    first, again, other = step(1), step(1), step(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_dropout_varlen(backend, device):
    cu = torch.tensor([0, 11, 11, 30], dtype=torch.int32, device=device)
    q = torch.randn(30, 4, 32, device=device, dtype=torch.float16)
    k, v = (torch.randn(30, 2, 32, device=device, dtype=torch.float16) for _ in range(2))
    torch.manual_seed(9)
    out = docqa_fast.flash_attn_varlen_func(q, k, v, cu, cu, 19, 19, dropout_p=0.5, causal=True)
    torch.manual_seed(9)
    seed = dropout_seed(device)
    exact, _ = attention_ref(q.double(), k.double(), v.double(), cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                             dropout_p=0.5, dropout_seed=seed)
    plain, _ = attention_ref(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, dropout_p=0.5,
                             dropout_seed=seed, upcast=False)
    assert_close_by_rule(out, exact, plain, name="out")


def test_dropout_with_attention_probabilities_is_refused():
    q, k, v = _qkv("cpu")
    with pytest.raises(NotImplementedError, match="return_attn_probs=True with dropout_p > 0"):
        docqa_fast.flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("change, error, message", [
    (dict(alibi_slopes=torch.rand(5)), ValueError, r"alibi_slopes of shape \(4,\) or \(2, 4\)"),
    (dict(alibi_slopes=torch.rand(3, 4)), ValueError, r"alibi_slopes of shape \(4,\) or \(2, 4\)"),
    (dict(alibi_slopes=torch.rand(4).half()), TypeError, "alibi_slopes"),
    (dict(alibi_slopes=[0.1] * 4), TypeError, "alibi_slopes"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p in \[0, 1\)"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (dict(dropout_p=True), TypeError, "dropout_p"),
])
def test_bad_alibi_and_dropout_name_the_argument(change, error, message):
    q, k, v = _qkv("cpu")
    with pytest.raises(error, match=message) as raised:
        docqa_fast.flash_attn_func(q, k, v, **change)
    assert isinstance(raised.value, RuntimeError)  # flash-attn raises RuntimeError: code catches that


def test_bad_extras_inside_the_op():
    from docqa_fast.attention.ops import _attention_forward_op

    q, k, v = _qkv("cpu")
    args = (q, k, v, None, None, 19, 19, 0.25, False, -1, -1, 0.0)
    with pytest.raises(ValueError, match="dropout_p in"):
        _attention_forward_op(*args, None, 1.5, torch.tensor([1]))
    with pytest.raises(TypeError, match="dropout_seed"):
        _attention_forward_op(*args, None, 0.5, None)
    with pytest.raises(ValueError, match="alibi_slopes of shape"):
        _attention_forward_op(*args, torch.rand(7), 0.0, None)


def test_kvcache_capacity_error_is_a_runtime_error_naming_block_table():
    q = torch.randn(1, 1, 2, 16).half()
    k_cache = torch.randn(4, 16, 1, 16).half()
    block_table = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_table") as raised:
        docqa_fast.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=40, block_table=block_table)
    assert isinstance(raised.value, ValueError)


# ---------------------------------------------------------------------------- the helpers

def test_unpad_and_pad_round_trip_against_plain_pytorch(device):
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 0]], device=device)
    hidden = torch.randn(4, 5, 3, 2, device=device, requires_grad=True)
    rows, indices, cu_seqlens, max_seqlen, seqused = unpad_input(hidden, mask)
    expected_rows = torch.cat([hidden[b][mask[b].bool()] for b in range(4)])
    assert torch.equal(rows, expected_rows)
    assert torch.equal(indices, mask.flatten().nonzero().flatten())
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 3, 3, 8, 10]
    assert max_seqlen == 5 and seqused.tolist() == [3, 0, 5, 2]
    assert torch.equal(index_first_axis(hidden.flatten(0, 1), indices), expected_rows)
    padded = pad_input(rows, indices, 4, 5)
    assert torch.equal(padded, hidden * mask[..., None, None])
    grad, = torch.autograd.grad(padded.square().sum(), hidden)
    assert torch.equal(grad, 2 * hidden * mask[..., None, None])


def test_unpad_with_unused_tokens(device):
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], device=device)
    unused = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1]], device=device)
    rows, indices, cu_seqlens, max_seqlen, seqused = unpad_input(torch.arange(8.0, device=device).view(2, 4, 1),
                                                                 mask, unused)
    assert rows.flatten().tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert cu_seqlens.tolist() == [0, 3, 7] and max_seqlen == 4 and seqused.tolist() == [2, 1]


def _rotate_plain(x, cos, sin, positions, interleaved, dtype=torch.float64):
    """RoPE written out in ``dtype``: x (tokens, H, D) at positions (tokens,). fp64 is the exact
    result of the tolerance rule, x's own dtype its plain one."""
    rotary_dim = 2 * cos.shape[1]
    c, s = cos.to(dtype)[positions][:, None], sin.to(dtype)[positions][:, None]
    x = x.to(dtype)
    rot = x[..., :rotary_dim]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, -1)
        out = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((out, x[..., rotary_dim:]), -1)


def _tables(seqlen, rotary_dim, device, dtype):
    angles = torch.arange(seqlen, device=device)[:, None] * 10000 ** (-torch.arange(0, rotary_dim, 2, device=device)
                                                                     / rotary_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", ["int", "tensor"])
@pytest.mark.parametrize("rotary_dim", [16, 40])
def test_apply_rotary_emb_dense(backend, interleaved, offsets, rotary_dim, device):
    dtype = torch.float16 if backend == "triton" else torch.float32
    x = torch.randn(3, 11, 2, 40, device=device, dtype=dtype, requires_grad=True)
    cos, sin = _tables(32, rotary_dim, device, dtype)
    starts = torch.tensor([0, 5, 17], device=device) if offsets == "tensor" else torch.full((3,), 4, device=device)
    seqlen_offsets = starts.int() if offsets == "tensor" else 4
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=seqlen_offsets)
    positions = (starts[:, None] + torch.arange(11, device=device)).flatten()
    rows = x.detach().flatten(0, 1)
    assert_close_by_rule(out, _rotate_plain(rows, cos, sin, positions, interleaved).view(x.shape),
                         _rotate_plain(rows, cos, sin, positions, interleaved, dtype).view(x.shape))
    # The gradient of a rotation is the rotation by minus the angle.
    dout = torch.randn_like(out)
    grad, = torch.autograd.grad(out, x, dout)
    rows = dout.flatten(0, 1)
    assert_close_by_rule(grad, _rotate_plain(rows, cos, -sin, positions, interleaved).view(x.shape),
                         _rotate_plain(rows, cos, -sin, positions, interleaved, dtype).view(x.shape), factor=3.0,
                         name="grad")


def test_apply_rotary_emb_varlen_and_inplace(backend, device):
    dtype = torch.float16 if backend == "triton" else torch.float32
    cu = torch.tensor([0, 4, 4, 13], dtype=torch.int32, device=device)
    x = torch.randn(13, 3, 32, device=device, dtype=dtype)
    cos, sin = _tables(24, 32, device, dtype)
    offsets = torch.tensor([2, 0, 7], dtype=torch.int32, device=device)
    out = apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=9)
    positions = torch.cat([torch.arange(4) + 2, torch.arange(9) + 7]).to(device)
    assert_close_by_rule(out, _rotate_plain(x, cos, sin, positions, False),
                         _rotate_plain(x, cos, sin, positions, False, dtype))
    copy = x.clone()
    assert apply_rotary_emb(copy, cos, sin, inplace=True, seqlen_offsets=offsets, cu_seqlens=cu) is copy
    assert torch.equal(copy, out)


@pytest.mark.parametrize("call, error, message", [
    (lambda x, c, s: apply_rotary_emb(x, c, s[:, :4]), ValueError, "sin of shape"),
    (lambda x, c, s: apply_rotary_emb(x, c.half(), s.half()), TypeError, "cos and sin of dtype"),
    (lambda x, c, s: apply_rotary_emb(x, c, s, seqlen_offsets=30), ValueError, "positions"),
    (lambda x, c, s: apply_rotary_emb(x, c, s, seqlen_offsets=torch.zeros(5, dtype=torch.int32)), ValueError,
     "seqlen_offsets with 2 entries"),
    (lambda x, c, s: apply_rotary_emb(x[0], c, s), ValueError, "x"),
])
def test_apply_rotary_emb_bad_input(call, error, message):
    x = torch.randn(2, 6, 2, 16)
    cos, sin = _tables(32, 16, "cpu", torch.float32)
    with pytest.raises(error, match=message):
        call(x, cos, sin)

"""Training attention (flash-attn / SDPA front ends) against the reference, forward and backward.

On CPU the Triton kernels run under the interpreter, so sizes stay small there; a GPU run
adds the long sequences (1000, 4096) and bf16.
"""

import re

import pytest
import torch
import torch.nn.functional as F

import docqa_fast
from docqa_fast.attention.ops import _attention_forward_op
from docqa_fast.reference.attention import attention_ref
from docqa_fast.testing import allowed_error, assert_close_by_rule

pytestmark = pytest.mark.backends("reference", "triton")  # no CUDA C++ attention: Triton is the fast path
ON_GPU = torch.cuda.is_available()


# The kernels take fp16/bf16 (fp32 runs on the reference path); the interpreter miscomputes bf16.
PRECISIONS = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]


def check_attention(q, k, v, *, factor_grad=3.0, **options):
    """Forward (out, LSE) and the three gradients of our attention against fp64 and plain PyTorch."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if "cu_seqlens_q" in options:
        out, lse, _ = docqa_fast.flash_attn_varlen_func(q, k, v, return_attn_probs=True, **options)
    else:
        out, lse, _ = docqa_fast.flash_attn_func(q, k, v, return_attn_probs=True, **options)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_options = {key: val for key, val in options.items() if not key.startswith("max_seqlen")}
    assert_matches_reference(q, k, v, dout, out, grads, lse=lse, factor_grad=factor_grad, **ref_options)


def random_qkv(batch=2, seqlen_q=48, seqlen_k=48, heads=4, kv_heads=2, head_dim=64, dtype=torch.float16, device="cpu"):
    """q (batch, seqlen_q, heads, head_dim), k and v (batch, seqlen_k, kv_heads, head_dim): standard normal,
    drawn in fp32 and rounded to ``dtype``."""
    q = torch.randn(batch, seqlen_q, heads, head_dim, device=device).to(dtype)
    k, v = (torch.randn(batch, seqlen_k, kv_heads, head_dim, device=device).to(dtype) for _ in range(2))
    return q, k, v


def plain_lse(q, k, v, **options):
    """The LSE in plain PyTorch at the kernels' LSE precision, fp32 (the inputs are exact in it)."""
    return attention_ref(*(t.detach().float() for t in (q, k, v)), upcast=False, **options)[1]


def lse_magnitude(q, k, **options):
    """A bound of the magnitudes an LSE's computation reaches, for the tolerance rule's floor: the
    LSE (fp64, the reference's masks, windows and biases) of the scores |q|.|k| * scale. It is at
    least the largest sum of |q_d k_d| * scale a row reduces -- where the dot products round, which
    cancellation can put far above the LSE itself (one key: LSE = q.k * scale) -- and at most that
    plus log(keys): the kernels' running maximum plus the log of their sum of exponentials."""
    q, k = (t.detach().double().abs() for t in (q, k))
    return attention_ref(q, k, k, **options)[1]


def assert_matches_reference(q, k, v, dout, out, grads, *, lse=None, factor_grad=3.0, **options):
    """``out`` (and ``lse`` when given) and ``grads`` -- (dq, dk, dv) for the output gradient ``dout`` --
    of an attention call on q, k, v against ``attention_ref(q, k, v, **options)`` by the tolerance
    rule: fp64 exact, plain PyTorch at q's dtype. A gradient the reference leaves unused counts as 0."""
    def reference(dtype, upcast):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = attention_ref(*leaves, upcast=upcast, **options)
        return ref_out, ref_lse, torch.autograd.grad(ref_out, leaves, dout.to(dtype), allow_unused=True)

    exact_out, exact_lse, exact_grads = reference(torch.float64, True)
    plain_out, _, plain_grads = reference(q.dtype, False)
    assert_close_by_rule(out, exact_out, plain_out, name="out")
    if lse is not None:
        assert_close_by_rule(lse, exact_lse, plain_lse(q, k, v, **options), name="lse",
                             magnitude=lse_magnitude(q, k, **options))
    for name, g, e, p in zip(("dq", "dk", "dv"), grads, exact_grads, plain_grads):
        e = torch.zeros_like(g, dtype=torch.float64) if e is None else e
        p = torch.zeros_like(g) if p is None else p
        assert_close_by_rule(g, e, p, factor=factor_grad, name=name)


# (seqlen_q, seqlen_k, head_dim, heads, kv_heads, causal): odd lengths, Sq != Sk both ways,
# the ViT head dim 80, GQA 7:1 and 8:1.
DENSE_CASES = [
    (1, 1, 64, 2, 2, False),
    (17, 17, 80, 7, 1, True),
    (113, 113, 128, 8, 1, True),
    (17, 113, 96, 4, 2, True),  # decode-like: queries at the end of a longer key range
    (113, 17, 64, 2, 1, True),  # more queries than keys: the first rows see no key at all
    (33, 33, 256, 2, 2, False),
    (40, 40, 32, 3, 1, False),
]
if ON_GPU:
    DENSE_CASES += [(1000, 1000, 128, 28, 4, True), (4096, 4096, 128, 8, 1, True), (203, 4096, 80, 16, 16, False)]


@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
@pytest.mark.parametrize("seqlen_q, seqlen_k, head_dim, heads, kv_heads, causal", DENSE_CASES, ids=str)
def test_dense_matches_reference(backend, precision, seqlen_q, seqlen_k, head_dim, heads, kv_heads, causal, device):
    dtype = precision
    q = torch.randn(2, seqlen_q, heads, head_dim, device=device).to(dtype)
    k = torch.randn(2, seqlen_k, kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn(2, seqlen_k, kv_heads, head_dim, device=device).to(dtype)
    check_attention(q, k, v, causal=causal)


def test_lse_check_catches_an_error_a_few_ulps_past_its_floor(backend, device):
    """One key: the LSE is q.k * scale, its plain error often 0, so the floor at the dot products'
    magnitude is most of what the check allows. The kernel's LSE moved, in one element, a few fp32
    ulps (at that magnitude) past the allowance must fail; unmoved it passes."""
    q, k, v = random_qkv(seqlen_q=1, seqlen_k=1, heads=2, kv_heads=2, device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse, _ = docqa_fast.flash_attn_func(q, k, v, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert_matches_reference(q, k, v, dout, out, grads, lse=lse)

    exact = attention_ref(q.detach().double(), k.detach().double(), v.detach().double())[1]
    magnitude = lse_magnitude(q, k)
    allowed = allowed_error(exact, plain_lse(q, k, v), torch.float32, magnitude=magnitude)
    ulp = torch.finfo(torch.float32).eps * magnitude.max().item()
    moved = lse.detach().clone()
    away = 1.0 if moved[0, 0, 0] >= exact[0, 0, 0] else -1.0  # from exact: the error is at least the move
    moved[0, 0, 0] += away * (allowed + 3 * ulp)
    with pytest.raises(AssertionError, match="lse: max error"):
        assert_matches_reference(q, k, v, dout, out, grads, lse=moved)


@pytest.mark.parametrize("window_size, causal", [((8, -1), False), ((8, -1), True), ((5, 3), False),
                                                 ((0, 0), False), ((20, 4), True)], ids=str)
def test_sliding_windows(backend, window_size, causal, device):
    q, k, v = (torch.randn(1, 45, 4, 64, device=device).half() for _ in range(3))
    check_attention(q, k[:, :, :2], v[:, :, :2], causal=causal, window_size=window_size)


# Sequences several tiles long (the forward's tiles are 128 x 64 at D 32): each query tile's
# key range splits into a masked leading edge (window), an unmasked inside and a masked
# trailing edge (diagonal, window, or a cut last block); the backward's dK/dV loop over query
# tiles splits the same way. Edges, insides, and Sq != Sk both ways.
BAND_CASES = [
    (300, 300, False, (-1, -1)),
    (300, 300, True, (-1, -1)),
    (300, 300, False, (200, -1)),
    (300, 300, False, (60, 100)),
    (300, 300, True, (150, -1)),
    (150, 300, True, (-1, -1)),
    (300, 190, True, (90, -1)),
]


@pytest.mark.parametrize("seqlen_q, seqlen_k, causal, window_size", BAND_CASES, ids=str)
def test_band_stages_match_reference(backend, seqlen_q, seqlen_k, causal, window_size, device):
    q = torch.randn(1, seqlen_q, 2, 32, device=device).half()
    k, v = (torch.randn(1, seqlen_k, 1, 32, device=device).half() for _ in range(2))
    check_attention(q, k, v, causal=causal, window_size=window_size)


@pytest.mark.parametrize("layout", ["dense", "kv_packed", "varlen"])
def test_tma_and_pointer_loads_give_the_same_result(backend, layout, device, monkeypatch):
    """Power-of-two head dims load K/V through TMA descriptors where the layout allows (the
    interpreter emulates them); DOCQA_FAST_ATTENTION_TMA=0 forces the masked pointer loads.
    Both must match the reference, including rows past a sequence's end (neighbours' keys)."""
    q = torch.randn(2, 150, 4, 64, device=device).half()
    kv = torch.randn(2, 150, 2, 2, 64, device=device).half()
    options = {"causal": True, "window_size": (90, -1)}
    if layout == "kv_packed":  # k, v strided views of one buffer: still one (tokens, Hk * D) matrix each
        q, k, v = q, kv[:, :, 0], kv[:, :, 1]
    else:
        k, v = kv[:, :, 0].contiguous(), kv[:, :, 1].contiguous()
    if layout == "varlen":
        cu = torch.tensor([0, 70, 70, 300], dtype=torch.int32, device=device)
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        options.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=230, max_seqlen_k=230)
    for tma in ("1", "0"):
        monkeypatch.setenv("DOCQA_FAST_ATTENTION_TMA", tma)
        check_attention(q, k, v, **options)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the neighbour's own rows are NaN, by design
def test_a_neighbour_sequence_with_infinities_does_not_leak(backend, device, monkeypatch):
    """TMA tiles that run past a sequence's end read the next sequence's keys; whatever they hold
    (inf here) must not reach this sequence's output or gradients."""
    lengths = (70, 90)
    cu = torch.tensor([0, 70, 160], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(160, 2, 64, device=device).half() for _ in range(3))
    k[70:], v[70:] = float("inf"), float("-inf")
    for tma in ("1", "0"):
        monkeypatch.setenv("DOCQA_FAST_ATTENTION_TMA", tma)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = docqa_fast.flash_attn_varlen_func(*leaves, cu, cu, max(lengths), max(lengths), causal=True)
        dout = torch.zeros_like(out)
        dout[:70] = 1.0
        grads = torch.autograd.grad(out, leaves, dout)
        alone = [t[:70].clone().requires_grad_() for t in (q, k, v)]
        expected = docqa_fast.flash_attn_func(*(t[None] for t in alone), causal=True)[0]
        expected_grads = torch.autograd.grad(expected, alone, dout[:70])
        torch.testing.assert_close(out[:70], expected, atol=2e-3, rtol=2e-3)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got[:70], want, atol=3e-3, rtol=3e-3)


def test_band_stages_in_a_packed_batch(backend, device):
    lengths = torch.tensor([300, 0, 170, 1])
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(device)
    q = torch.randn(int(lengths.sum()), 2, 32, device=device).half()
    k, v = (torch.randn(int(lengths.sum()), 1, 32, device=device).half() for _ in range(2))
    check_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=300, max_seqlen_k=300, causal=True,
                    window_size=(130, -1))


def test_more_sequences_than_the_grid_holds_is_a_clear_error():
    """65,536 sequences would overflow the grid's y axis: refused before any launch."""
    cu = torch.arange(65_537, dtype=torch.int32)
    q = torch.randn(65_536, 1, 32).half()
    with pytest.raises(ValueError, match="at most 65535 sequences"):
        docqa_fast.flash_attn_varlen_func(q, q, q, cu, cu, 1, 1)


def test_window_sides_near_the_int32_limit_mean_unbounded(backend, device):
    """A window side that covers every key is no restriction, however large (no int32 wrap)."""
    q = torch.randn(1, 40, 2, 32, device=device).half()
    k, v = (torch.randn(1, 70, 2, 32, device=device).half() for _ in range(2))
    huge = 2**31 - 1
    check_attention(q, k, v, window_size=(huge, huge))
    check_attention(q, k, v, window_size=(huge, 3))


def test_softcap_and_scale(backend, device):
    q = torch.randn(2, 37, 4, 64, device=device).half() * 3  # large scores: the cap matters
    k, v = (torch.randn(2, 37, 2, 64, device=device).half() for _ in range(2))
    check_attention(q, k, v, causal=True, softcap=5.0, softmax_scale=0.2)


@pytest.mark.parametrize("num_sequences", [1, 7, 33])
def test_varlen_matches_reference(backend, num_sequences, device):
    lengths_q = torch.randint(1, 30, (num_sequences,))
    if num_sequences > 1:
        lengths_q[num_sequences // 2] = 0  # an empty sequence inside the batch
    lengths_k = lengths_q + torch.randint(0, 6, (num_sequences,))
    cu_q = F.pad(lengths_q.cumsum(0), (1, 0)).to(torch.int32).to(device)
    cu_k = F.pad(lengths_k.cumsum(0), (1, 0)).to(torch.int32).to(device)
    q = torch.randn(int(lengths_q.sum()), 8, 64, device=device).half()
    k, v = (torch.randn(int(lengths_k.sum()), 2, 64, device=device).half() for _ in range(2))
    check_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(lengths_q.max()),
                    max_seqlen_k=int(lengths_k.max()), causal=True)


def test_varlen_equals_dense_per_sequence(backend, device):
    """A packed batch gives each sequence exactly what it gets alone: no attention across documents."""
    lengths = [5, 0, 19, 1]
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(device)
    q, k, v = (torch.randn(sum(lengths), 4, 80, device=device).half() for _ in range(3))
    packed = docqa_fast.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    for start, length in zip(cu[:-1].tolist(), lengths):
        if length:
            alone = docqa_fast.flash_attn_func(*(t[None, start : start + length] for t in (q, k, v)), causal=True)
            torch.testing.assert_close(packed[start : start + length], alone[0], atol=2e-3, rtol=2e-3)


def test_deterministic_backward_is_bitwise_reproducible(backend, device):
    q = torch.randn(2, 50, 8, 64, device=device).half().requires_grad_()
    k, v = (torch.randn(2, 50, 2, 64, device=device).half().requires_grad_() for _ in range(2))
    dout = torch.randn_like(q)

    def grads():
        out = docqa_fast.flash_attn_func(q, k, v, causal=True, deterministic=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    for first, second in zip(grads(), grads()):
        assert torch.equal(first, second)


def test_split_keys_merged_by_lse_match_full_attention_with_gradients(backend, device):
    """Ring / split-KV attention: two halves of the keys merged by their LSEs. The LSE's gradient
    must reach q and k, or dq and dk are silently wrong."""
    q = torch.randn(1, 8, 2, 32, device=device).half().requires_grad_()
    k, v = (torch.randn(1, 16, 2, 32, device=device).half().requires_grad_() for _ in range(2))
    dout = torch.randn(1, 8, 2, 32, device=device).half()
    out_a, lse_a, _ = docqa_fast.flash_attn_func(q, k[:, :8], v[:, :8], return_attn_probs=True)
    out_b, lse_b, _ = docqa_fast.flash_attn_func(q, k[:, 8:], v[:, 8:], return_attn_probs=True)
    merged, _ = docqa_fast.merge_attention_states(out_a, lse_a, out_b, lse_b)
    got = torch.autograd.grad(merged, (q, k, v), dout)
    full = docqa_fast.flash_attn_func(q, k, v)
    expected = torch.autograd.grad(full, (q, k, v), dout)
    torch.testing.assert_close(merged, full, atol=2e-3, rtol=2e-3)
    for name, g, e in zip(("dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(g, e, atol=3e-3, rtol=3e-3, msg=name)


def test_strided_cu_seqlens_are_read_correctly(backend, device):
    cu = torch.tensor([0, 5, 5, 9, 12], dtype=torch.int32, device=device)[::2]  # values [0, 5, 12], stride 2
    q, k, v = (torch.randn(12, 2, 32, device=device).half() for _ in range(3))
    got = docqa_fast.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
    torch.testing.assert_close(got, docqa_fast.flash_attn_varlen_func(q, k, v, cu.contiguous(), cu.contiguous(), 7, 7,
                                                                      causal=True))


def test_packed_variants_equal_the_unpacked_call(backend, device):
    qkv = torch.randn(2, 21, 3, 4, 64, device=device).half()
    expected = docqa_fast.flash_attn_func(*qkv.unbind(2), causal=True)
    torch.testing.assert_close(docqa_fast.flash_attn_qkvpacked_func(qkv, causal=True), expected)
    torch.testing.assert_close(docqa_fast.flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:], causal=True),
                               expected)
    cu = torch.tensor([0, 21, 42], dtype=torch.int32, device=device)
    flat = qkv.flatten(0, 1)
    packed = docqa_fast.flash_attn_varlen_qkvpacked_func(flat, cu, 21, causal=True)
    torch.testing.assert_close(packed, expected.flatten(0, 1))
    packed = docqa_fast.flash_attn_varlen_kvpacked_func(flat[:, 0], flat[:, 1:], cu, cu, 21, 21, causal=True)
    torch.testing.assert_close(packed, expected.flatten(0, 1))


def test_sdpa_front_end(backend, device):
    """Our SDPA equals torch's, whether our kernel runs (CUDA fp16/bf16) or torch's own does."""
    q = torch.randn(2, 4, 33, 64, device=device).half()
    k, v = (torch.randn(2, 2, 33, 64, device=device).half() for _ in range(2))
    for kwargs in ({"is_causal": True, "enable_gqa": True}, {"enable_gqa": True, "scale": 0.3}):
        got = docqa_fast.scaled_dot_product_attention(q, k, v, **kwargs)
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).half()
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    v_narrow = torch.randn(2, 4, 33, 32, device=device).half()  # value head dim != query's: torch's SDPA runs it
    torch.testing.assert_close(docqa_fast.scaled_dot_product_attention(q, q, v_narrow, is_causal=True),
                               F.scaled_dot_product_attention(q, q, v_narrow, is_causal=True))
    mask = torch.rand(33, 33, device=device) > 0.3  # an explicit mask: torch's SDPA runs it
    got = docqa_fast.scaled_dot_product_attention(q, k[:, :1].expand_as(q), v[:, :1].expand_as(q), attn_mask=mask)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k[:, :1].expand_as(q),
                                                                   v[:, :1].expand_as(q), attn_mask=mask))


def test_fp32_runs_on_the_reference_path(device, monkeypatch):
    q, k, v = (torch.randn(1, 11, 2, 32, device=device) for _ in range(3))
    check_attention(q, k, v, causal=True)
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="take fp16/bf16"):
        docqa_fast.flash_attn_func(q, k, v)


def test_fully_masked_rows_give_zero_and_neg_inf(backend, device):
    q, k, v = (torch.randn(1, 9, 2, 32, device=device).half() for _ in range(3))
    out, lse, _ = docqa_fast.flash_attn_func(q, k[:, :4], v[:, :4], causal=True, return_attn_probs=True)
    # 9 queries over 4 keys, bottom-right aligned: queries 0..4 see no key.
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert torch.isneginf(lse[..., :5]).all() and torch.isfinite(lse[..., 5:]).all()


def test_compile_fullgraph_forward_and_backward(backend, device):
    q, k, v = (torch.randn(1, 24, 2, 32, device=device).half().requires_grad_() for _ in range(3))

    def step(q, k, v):
        return docqa_fast.flash_attn_func(q, k, v, causal=True).float().square().sum()

    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected = torch.autograd.grad(step(q, k, v), (q, k, v))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_opcheck(backend, device):
    q, k, v = (torch.randn(1, 7, 2, 16, device=device).half() for _ in range(3))
    torch.library.opcheck(_attention_forward_op, (q, k, v, None, None, 7, 7, 0.25, True, -1, -1, 0.0, None, 0.0, None))
    slopes, seed = torch.rand(2, device=device), torch.tensor([12345], device=device)
    torch.library.opcheck(_attention_forward_op, (q, k, v, None, None, 7, 7, 0.25, False, -1, -1, 0.0, slopes, 0.1,
                                                  seed))


# ------------------------------------------------------------------------- bad input

def _qkv(**changes):
    shapes = {"q": (2, 8, 4, 64), "k": (2, 8, 2, 64), "v": (2, 8, 2, 64)}
    tensors = {name: torch.randn(shape).half() for name, shape in shapes.items()}
    tensors.update(changes)
    return tensors["q"], tensors["k"], tensors["v"]


@pytest.mark.parametrize("call, error, message", [
    (lambda: docqa_fast.flash_attn_func(*_qkv(q=torch.randn(2, 8, 4, 64).int())), TypeError, "q of dtype"),
    (lambda: docqa_fast.flash_attn_func(*_qkv(k=torch.randn(2, 8, 2, 64).float())), TypeError,
     "k of dtype torch.float16"),
    (lambda: docqa_fast.flash_attn_func(*_qkv(k=torch.randn(2, 8, 3, 64).half(), v=torch.randn(2, 8, 3, 64).half())),
     ValueError, "multiple of k's (3)"),
    (lambda: docqa_fast.flash_attn_func(*(torch.randn(1, 8, 2, 264).half() for _ in range(3))), ValueError,
     "head dim from 1 to 256"),
    (lambda: docqa_fast.flash_attn_func(*(torch.randn(1, 8, 2, 0).half() for _ in range(3))), ValueError,
     "head dim from 1 to 256"),
    (lambda: docqa_fast.flash_attn_func(*_qkv(k=torch.randn(2, 8, 2, 32).half(), v=torch.randn(2, 8, 2, 32).half())),
     ValueError, "k with head dim 64"),
    (lambda: docqa_fast.flash_attn_func(*_qkv(v=torch.randn(2, 8, 2, 64).half().to("meta"))), ValueError,
     "v on cpu"),
    (lambda: docqa_fast.flash_attn_func(*_qkv(), window_size=(-2, 0)), ValueError, "window_size values >= -1"),
    (lambda: docqa_fast.flash_attn_func(*_qkv(), dropout_p=1.5), ValueError, "dropout_p in [0, 1)"),
    (lambda: docqa_fast.flash_attn_func(*_qkv(), alibi_slopes=torch.ones(4, 4)), ValueError, "alibi_slopes of shape"),
])
def test_bad_dense_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def _varlen(cu_q, cu_k=None, max_q=8, max_k=8, dtype=torch.int32):
    q, k, v = torch.randn(10, 4, 64).half(), torch.randn(10, 2, 64).half(), torch.randn(10, 2, 64).half()
    cu_q = torch.tensor(cu_q, dtype=dtype)
    cu_k = cu_q if cu_k is None else torch.tensor(cu_k, dtype=dtype)
    return lambda: docqa_fast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


@pytest.mark.parametrize("call, error, message", [
    (_varlen([0, 4, 10], dtype=torch.int64), TypeError, "cu_seqlens_q of dtype torch.int32"),
    (_varlen([0, 6, 4, 10]), ValueError, "cu_seqlens_q to be non-decreasing"),
    (_varlen([0, 4, 9]), ValueError, "end at the token count 10"),
    (_varlen([0, 2, 10], max_q=5, max_k=8), ValueError, "max_seqlen_q >= every sequence length, got 5 < 8"),
    (_varlen([0, 4, 10], [0, 10]), ValueError, "cu_seqlens_k of shape (3,)"),
])
def test_bad_varlen_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_lengths_are_never_compiled_as_constants():
    """Triton compiles an int argument equal to 1 as a constant unless told not to, and Triton
    3.6's ptxas crashed (signal 11) on the dQ kernel compiled for seqlen_k == 1 with TMA loads
    (reproduced here by compiling for sm_90 with Triton 3.6). The training kernels therefore
    never specialise lengths or window sides. Read in a process without the interpreter, which
    keeps no specialisation flags."""
    import subprocess
    import sys

    code = ("from docqa_fast.kernels.attention import training as a\n"
            "for k in (a.attention_forward_kernel, a.attention_backward_dq_kernel, a.attention_backward_dkdv_kernel):\n"
            "    flags = {p.name: p.do_not_specialize for p in k.params}\n"
            "    print(k.__name__, *(f'{n}={flags[n]}' for n in ('seqlen_q', 'seqlen_k', 'window_left', 'window_right')))\n")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "0"}
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert line.count("=True") == 4, line

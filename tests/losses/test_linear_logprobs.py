"""linear_logprobs / linear_cross_entropy against the materialised-logits reference and fp64."""

import pytest
import torch
import triton

import docqa_fast
from docqa_fast.losses import linear_cross_entropy, linear_logprobs
from docqa_fast.losses.functional import cross_entropy_losses
from docqa_fast.losses.ops import linear_logit_stats, linear_logit_stats_backward
from docqa_fast.reference.losses import linear_cross_entropy_ref, linear_logprobs_ref
from docqa_fast.testing import assert_close_by_rule, long_sum_terms
from loss_checks import check_by_rule, random_head, random_labels

pytestmark = pytest.mark.backends("reference", "triton")


def _ce(reduction="mean", label_smoothing=0.0, z_loss=0.0, ignore_index=-100):
    def ours(hidden, weight, bias, labels):
        return linear_cross_entropy(hidden, weight, labels, bias, ignore_index=ignore_index, reduction=reduction,
                                    label_smoothing=label_smoothing, z_loss=z_loss)

    def ref(hidden, weight, bias, labels, upcast):
        return linear_cross_entropy_ref(hidden, weight, labels, bias, ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing, z_loss=z_loss, upcast=upcast)

    return ours, ref


def _logprobs(temperature=1.0, return_entropy=False, ignore_index=-100):
    def ours(hidden, weight, bias, labels):
        return linear_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
                               return_entropy=return_entropy)

    def ref(hidden, weight, bias, labels, upcast):
        return linear_logprobs_ref(hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature,
                                   return_entropy=return_entropy, upcast=upcast)

    return ours, ref


def _check(fns, hidden, weight, bias, labels):
    ours, ref = fns
    # labels are not differentiable: close over them.
    return check_by_rule(lambda hidden, weight, bias: ours(hidden, weight, bias, labels),
                         lambda hidden, weight, bias, upcast: ref(hidden, weight, bias, labels, upcast),
                         {"hidden": hidden, "weight": weight, "bias": bias})


CE_CASES = [  # (reduction, label_smoothing, z_loss, bias)
    ("mean", 0.0, 0.0, False),
    ("sum", 0.0, 0.0, True),
    ("none", 0.0, 0.0, False),
    ("mean", 0.1, 0.0, False),
    ("none", 0.2, 1e-3, True),
    ("sum", 0.0, 1e-2, False),
]


@pytest.mark.parametrize(("reduction", "label_smoothing", "z_loss", "bias"), CE_CASES)
def test_cross_entropy_matches_reference(backend, dtype, device, reduction, label_smoothing, z_loss, bias):
    hidden, weight, b = random_head(37, 48, 300, dtype, device, bias=bias, batch=2)
    labels = random_labels((2, 37), 300, device)
    out = _check(_ce(reduction, label_smoothing, z_loss), hidden, weight, b, labels)[0]
    assert out.shape == (() if reduction != "none" else labels.shape)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_logprobs_matches_reference(backend, dtype, device, temperature, return_entropy):
    hidden, weight, b = random_head(45, 40, 257, dtype, device, bias=temperature == 0.7)
    labels = random_labels((45,), 257, device)
    outs = _check(_logprobs(temperature, return_entropy), hidden, weight, b, labels)
    ignored = labels == -100
    for out in outs:
        assert out.shape == labels.shape and bool((out[ignored] == 0).all())


@pytest.mark.parametrize("ignore", ["everywhere", "nowhere", "scattered"])
def test_ignore_index_patterns(backend, dtype, device, ignore):
    hidden, weight, b = random_head(29, 32, 200, dtype, device)
    labels = random_labels((29,), 200, device, ignore=ignore)
    for fns in (_ce("mean"), _ce("none", label_smoothing=0.1), _logprobs(return_entropy=True)):
        _check(fns, hidden, weight, b, labels)
    if ignore == "everywhere":  # nothing counted: 0 and zero gradients, not NaN
        hidden.requires_grad_()
        loss = linear_cross_entropy(hidden, weight, labels)
        loss.backward()
        assert loss.item() == 0.0 and bool((hidden.grad == 0).all())


def test_ignore_index_inside_the_vocabulary(backend, dtype, device):
    """A pad id used as ignore_index (a valid vocabulary row) is skipped, never gathered."""
    hidden, weight, b = random_head(20, 32, 100, dtype, device)
    labels = random_labels((20,), 100, device, ignore_index=7)
    labels[:3] = 7
    _check(_ce("sum", ignore_index=7), hidden, weight, b, labels)
    _check(_logprobs(ignore_index=7), hidden, weight, b, labels)


@pytest.mark.parametrize("vocab", [1000, 32000, 50257, 152064])
def test_vocabulary_sizes(backend, dtype, device, vocab):
    """Real vocabulary sizes (Mistral, GPT-2 -- not a tile multiple -- and Qwen2.5) with few tokens."""
    interpreted = backend == "triton" and device.type == "cpu"
    if interpreted and vocab > 32000 and dtype == torch.float32:
        pytest.skip("tens of seconds under the Triton interpreter; fp16 covers the same code at this vocabulary")
    hidden, weight, b = random_head(3, 16, vocab, dtype, device)
    labels = torch.tensor([0, vocab - 1, -100], device=device)
    ours, ref = _ce("none", label_smoothing=0.1, z_loss=1e-4)
    if interpreted and vocab == 152064:
        # d_weight's matmul alone takes ~12 s interpreted here; the other sizes check it.
        check_by_rule(lambda hidden: ours(hidden, weight, None, labels),
                      lambda hidden, upcast: ref(hidden, weight.double() if hidden.dtype == torch.float64 else weight,
                                                 None, labels, upcast),
                      {"hidden": hidden})
    else:
        _check((ours, ref), hidden, weight, b, labels)


@pytest.mark.parametrize(("n_rows", "vocab"), [(1, 100), (113, 1000), (70, 50)])
def test_odd_token_counts(backend, dtype, device, n_rows, vocab):
    hidden, weight, b = random_head(n_rows, 24, vocab, dtype, device, bias=True)
    labels = random_labels((n_rows,), vocab, device)
    _check(_ce("mean", label_smoothing=0.05), hidden, weight, b, labels)
    _check(_logprobs(0.9, True), hidden, weight, b, labels)


def test_large_logits_stay_accurate(backend, dtype, device):
    """Peaked distributions (logits of tens) keep entropy and log-probs accurate (no cancellation)."""
    hidden, weight, b = random_head(31, 32, 500, dtype, device, scale=12.0)
    labels = random_labels((31,), 500, device)
    _check(_logprobs(1.0, True), hidden, weight, b, labels)


def test_backward_in_several_vocabulary_chunks(backend, dtype, device, monkeypatch):
    """Force the all-Triton backward to walk the vocabulary in many chunks (as at 128K tokens);
    the library products' chunks: test_fused_paths.py."""
    if backend == "triton":
        from docqa_fast.kernels import losses as kernels

        monkeypatch.setenv("DOCQA_FAST_LOSSES_PRODUCTS", "triton")
        monkeypatch.setattr(kernels, "CHUNK_BYTES", 40 * 256 * dtype.itemsize)  # 40 rows: 256 columns a chunk
        assert kernels.chunk_columns(40, 1000, dtype) < 1000
    hidden, weight, b = random_head(40, 32, 1000, dtype, device, bias=True)
    labels = random_labels((40,), 1000, device)
    _check(_ce("none", label_smoothing=0.1, z_loss=1e-3), hidden, weight, b, labels)
    _check(_logprobs(0.8, True), hidden, weight, b, labels)


# Sizes (tokens, vocabulary, hidden) from one answer to 1M tokens: Mistral/Llama 2 (32K
# vocabulary, hidden up to 8K), GPT-2, Qwen2.5 (152K), the GPU memory test (4K x 32K x 1K).
MEMORY_SIZES = [(1, 1000, 16), (3, 152064, 3584), (37, 300, 48), (1000, 50257, 2048), (4096, 32000, 1024),
                (4096, 32000, 4096), (4096, 32000, 8192), (32768, 152064, 3584), (131072, 152064, 3584),
                (131072, 152064, 8192), (131072, 32000, 4096), (1 << 20, 152064, 8192)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_backward_memory_is_a_small_fraction_of_the_logits(dtype):
    """The backward's buffers beside the gradients, as functions of (N, V, H), against the (N, V) logits.

    The dL/dlogits chunk holds at most 1/16 of the logits (and at most CHUNK_BYTES), unless
    one tile of columns is more; the fp32 d_hidden accumulator of 16-bit inputs at most 1/8
    (unless one tile of rows is more). The old rule (a 128 MiB chunk whatever the logits, an
    (N, H) fp32 accumulator whatever H) held 145 MiB at 4K x 32K x 1K where the logits are 250.
    The vocabulary walks stay few: at most 32 chunks, or twice what the CHUNK_BYTES cap
    needs (~300 chunks of 512 columns at 128K tokens x 152K vocabulary).
    """
    from docqa_fast.kernels import losses as kernels

    tiles = kernels.default_tiles("losses_logits", dtype)
    block_v, block_n = tiles["BLOCK_V"], tiles["BLOCK_N"]
    for n_rows, vocab, hidden_size in MEMORY_SIZES:
        where = f"N={n_rows}, V={vocab}, H={hidden_size}"
        logits = n_rows * vocab * dtype.itemsize
        columns = kernels.chunk_columns(n_rows, vocab, dtype)
        assert columns % block_v == 0 and columns >= block_v, where
        chunk = n_rows * columns * dtype.itemsize
        one_tile = n_rows * block_v * dtype.itemsize
        assert chunk <= max(one_tile, min(kernels.CHUNK_BYTES, logits // 16)), where
        chunks = triton.cdiv(vocab, columns)
        assert chunks <= 2 * max(16, triton.cdiv(logits, kernels.CHUNK_BYTES)), where

        rows = kernels.hidden_rows_per_pass(n_rows, vocab, hidden_size, dtype)
        assert 0 < rows <= n_rows, where
        accumulator = 0 if dtype == torch.float32 else rows * hidden_size * 4  # fp32 sums into the gradient
        assert accumulator <= max(block_n * hidden_size * 4, logits // 8), where
        walks = triton.cdiv(n_rows, rows)
        # Later walks cover only their own rows, so their chunks are wider: each walk has about
        # as many chunks as the first, and the walks are few (H / V x 32 at most, in 16-bit).
        assert walks <= max(1, triton.cdiv(32 * hidden_size, vocab * dtype.itemsize)) + 1, where
        if one_tile <= logits // 16:  # every real vocabulary: the GPU test's bound
            assert chunk + accumulator < logits / 4, where


@pytest.mark.parametrize("frozen_weight", [False, True])
def test_backward_in_row_groups(backend, dtype, device, frozen_weight, monkeypatch):
    """Hidden sizes large beside the vocabulary: d_hidden is accumulated a group of rows at a time.

    At 150 tokens, H 64, V 300 an (N, H) fp32 accumulator would be 43% of the 16-bit logits:
    the backward walks the vocabulary once for every token (d_weight, d_bias and the first
    64 rows' d_hidden) and again for each later group of rows. fp32 needs no accumulator.
    """
    n_rows, hidden_size, vocab = 150, 64, 300
    if backend == "triton":  # the all-Triton path's row groups (library products: one (N, H) accumulator)
        from docqa_fast.kernels import losses as kernels

        monkeypatch.setenv("DOCQA_FAST_LOSSES_PRODUCTS", "triton")
        assert dtype == torch.float32 or kernels.hidden_rows_per_pass(n_rows, vocab, hidden_size, dtype) < n_rows
    hidden, weight, b = random_head(n_rows, hidden_size, vocab, dtype, device, bias=True)
    labels = random_labels((n_rows,), vocab, device)
    ours, ref = _ce("none", label_smoothing=0.1, z_loss=1e-3)
    if frozen_weight:  # d_hidden only: no walk over every token is needed for d_weight
        # The frozen head follows hidden's dtype: fp64 for the exact run, the test's dtype otherwise.
        check_by_rule(lambda hidden: ours(hidden, weight, b, labels),
                      lambda hidden, upcast: ref(hidden, weight.to(hidden.dtype), b.to(hidden.dtype), labels, upcast),
                      {"hidden": hidden})
    else:
        _check((ours, ref), hidden, weight, b, labels)


def test_fp32_long_reduction_over_hidden_is_compensated(device):
    """The logits' reduction over H, fp32: 256 K blocks, each adding 0.4 ulp of the running 1.0.

    Summed block after block, every block rounds away (102 ulp lost over H = 8192); on the
    GPU a single FMA chain over H loses it term by term. The kernel sums each block from
    zero and adds it with TwoSum: within the rule of PyTorch's (pairwise) fp32 sum.
    """
    from docqa_fast.kernels import losses as kernels

    terms = long_sum_terms(8192, device)  # (8192,) fp32: 1, then tiny terms
    hidden = torch.stack([terms, terms.flip(0)])
    weight = torch.ones(64, 8192, device=device)
    labels = torch.tensor([3, 60], device=device)
    label_logit = kernels.logit_stats(hidden, weight, None, labels, -100, 1.0)[1]
    exact = hidden.double().sum(-1)
    assert_close_by_rule(label_logit, exact, hidden.sum(-1), name="label logit")


@pytest.mark.parametrize("role", ["d_weight", "d_hidden"])
def test_fp32_long_reduction_in_backward_matmuls_is_compensated(device, role):
    """The backward matmuls' reductions (tokens for d_weight, a vocabulary chunk for d_hidden), fp32."""
    from docqa_fast.kernels import losses as kernels

    terms = long_sum_terms(8192, device)
    grad = torch.stack([terms, terms.flip(0)], 1)  # (K, 2): K tokens (d_weight) or vocabulary columns
    other = torch.ones(8192, 16, device=device)  # hidden (d_weight) or the weight chunk (d_hidden)
    scale = torch.ones(1, device=device)
    out = torch.zeros(2, 16, device=device)
    if role == "d_weight":  # G^T @ hidden: G given as the (tokens, columns) array
        kernels._matmul(grad, other, out, scale, trans_a=True, accumulate=False)
    else:  # G @ W[chunk] added to the fp32 accumulator
        kernels._matmul(grad.T.contiguous(), other, out, scale, trans_a=False, accumulate=True)
    exact = (grad.double().T @ other.double())
    plain = grad.sum(0)[:, None].expand(2, 16)  # PyTorch's pairwise fp32 sum of the same terms
    assert_close_by_rule(out, exact, plain, name=role)


def test_only_needed_gradients(backend, device):
    """A frozen head (weight without grad) still gives hidden's gradient, and the reverse."""
    hidden, weight, _ = random_head(10, 16, 64, torch.float32, device)
    labels = random_labels((10,), 64, device)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels).backward()
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, labels).backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    linear_cross_entropy_ref(h_ref, w_ref, labels).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-6, rtol=1e-5)


def test_frozen_bias_still_shapes_the_gradients(backend, device):
    """A bias that needs no gradient still enters the recomputed logits of the backward."""
    hidden, weight, _ = random_head(10, 16, 64, torch.float32, device)
    bias = torch.randn(64, device=device) * 3  # large enough to move the softmax
    labels = random_labels((10,), 64, device)
    h, h_ref = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, bias).backward()
    linear_cross_entropy_ref(h_ref, weight, labels, bias).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------- autograd and ops

def test_stats_backward_matches_finite_differences_fp64():
    """The hand-derived backward of all four statistics against gradcheck, through the reference."""
    hidden = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 10, 5, 5])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCQA_FAST_BACKEND", "reference")
        assert torch.autograd.gradcheck(lambda h, w, b: linear_logit_stats(h, w, b, labels, -100, 0.7),
                                        (hidden, weight, bias))
        # The loss composed on the statistics (public API minus its fp16/bf16/fp32 validation).
        assert torch.autograd.gradcheck(
            lambda h, w, b: cross_entropy_losses(h, w, b, labels, -100, label_smoothing=0.2, z_loss=0.1),
            (hidden, weight, bias))


def test_custom_ops_pass_opcheck(backend, device):
    hidden, weight, bias = random_head(9, 16, 70, torch.float32, device, bias=True)
    labels = random_labels((9,), 70, device)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, -100, 0.9)
    torch.library.opcheck(linear_logit_stats, args, test_utils=("test_schema", "test_faketensor",
                                                                "test_autograd_registration"))
    coefs = torch.randn(4, 9, device=device)
    lse = torch.logsumexp((hidden @ weight.T + bias) / 0.9, -1).detach()
    bound = linear_logit_stats(hidden.detach(), weight.detach(), bias.detach(), labels, -100, 0.9)[4]
    assert bound.shape == (1,)  # one entry per 128 vocabulary columns
    torch.library.opcheck(linear_logit_stats_backward,
                          (hidden.detach(), weight.detach(), bias.detach(), labels, lse, coefs, bound, -100, 0.9,
                           True, True, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(backend, device):
    hidden, weight, _ = random_head(2 * 13, 16, 90, torch.float32, device)
    hidden = hidden.reshape(2, 13, 16).requires_grad_()
    labels = random_labels((2, 13), 90, device)

    def step(h, w):
        loss = linear_cross_entropy(h, w, labels, label_smoothing=0.1)
        logps, entropy = linear_logprobs(h, w, labels, temperature=0.8, return_entropy=True)
        return loss + 0.01 * entropy.sum() - 0.001 * logps.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(hidden, weight)
    (got_grad,) = torch.autograd.grad(got, hidden)
    expected = step(hidden, weight)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
def test_no_vocabulary_sized_buffer_on_gpu():
    """Forward + backward at 4K tokens x 32K vocabulary: the extra memory is far below one (N, V) logits."""
    n_rows, hidden_size, vocab = 4096, 1024, 32000
    hidden, weight, _ = random_head(n_rows, hidden_size, vocab, torch.bfloat16, "cuda")
    hidden.requires_grad_()
    weight.requires_grad_()
    labels = random_labels((n_rows,), vocab, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    gradients = hidden.numel() * 2 + weight.numel() * 2
    extra = torch.cuda.max_memory_allocated() - base - gradients
    logits_bytes = n_rows * vocab * 2
    assert extra < logits_bytes / 4, f"{extra / 2**20:.0f} MiB beyond the gradients, logits are {logits_bytes / 2**20:.0f}"
    assert docqa_fast.backends()["triton"].available

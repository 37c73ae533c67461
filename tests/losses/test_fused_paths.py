"""The fused implementation behind the loss ops (docqa_fast/losses/fused.py, chunked.py): both
product paths against the reference and fp64, chunking in both walk orders, the rows and the
vocabulary tiles it leaves out, its memory rule and its settings."""

import pytest
import torch

from docqa_fast.kernels import losses as kernels
from docqa_fast.kernels import tuning
from docqa_fast.losses import chunked, fused, linear_cross_entropy, linear_logprobs, sequence_logprobs
from docqa_fast.losses.ops import LOG_P_TILE, linear_logit_stats
from docqa_fast.reference.losses import linear_cross_entropy_ref, linear_logprobs_ref, sequence_logprobs_ref
from loss_checks import check_by_rule, cross_entropy_step_memory, random_head, random_labels

pytestmark = pytest.mark.backends("triton")
PRODUCTS = ["cublas", "triton"]


def _ce(labels, **options):
    return (lambda hidden, weight, bias: linear_cross_entropy(hidden, weight, labels, bias, **options),
            lambda hidden, weight, bias, upcast: linear_cross_entropy_ref(hidden, weight, labels, bias, upcast=upcast,
                                                                          **options))


def _logprobs(labels, **options):
    return (lambda hidden, weight, bias: linear_logprobs(hidden, weight, labels, bias, **options),
            lambda hidden, weight, bias, upcast: linear_logprobs_ref(hidden, weight, labels, bias, upcast=upcast,
                                                                     **options))


def _check(fns, hidden, weight, bias):
    return check_by_rule(*fns, {"hidden": hidden, "weight": weight, "bias": bias})


class _Spy:
    """Wraps a function, recording each call's arguments."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = []
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)


@pytest.mark.parametrize("products", PRODUCTS)
def test_both_product_paths_match_the_reference(backend, dtype, device, monkeypatch, products):
    monkeypatch.setenv(fused.PRODUCTS_ENV, products)
    engine = _Spy(monkeypatch, chunked if products == "cublas" else kernels, "logit_stats_backward")
    hidden, weight, bias = random_head(37, 48, 300, dtype, device, bias=True, batch=2)
    labels = random_labels((2, 37), 300, device)
    _check(_ce(labels, reduction="none", label_smoothing=0.1, z_loss=1e-3), hidden, weight, bias)
    _check(_logprobs(labels, temperature=0.8, return_entropy=True), hidden, weight, bias)
    assert len(engine.calls) == 2  # the path asked for is the one that ran


@pytest.mark.parametrize("walk", ["vocabulary outside", "tokens outside"])
def test_library_products_in_many_chunks(backend, dtype, device, monkeypatch, walk):
    """A budget of a few chunks' bytes and 128-column chunks: several row and column chunks,
    the vocabulary walked outside (N <= V: d_hidden summed across chunks) or the tokens (N > V:
    d_weight summed), every partial sum in fp32."""
    n_rows, vocab, hidden_size = (150, 1000, 32) if walk == "vocabulary outside" else (300, 200, 32)
    budget_mib = 128 * 128 * (4 + (0 if dtype == torch.float32 else 2)) / 2**20  # 128 x 128 logits
    monkeypatch.setenv(chunked.CHUNK_ENV, str(budget_mib))
    monkeypatch.setenv(fused.PRODUCTS_ENV, "cublas")
    tiles = dict(kernels.default_tiles("losses_chunks", dtype), CHUNK_COLUMNS=128)
    plan = chunked.plan_chunks(n_rows, vocab, hidden_size, dtype, int(budget_mib * 2**20), 128)
    assert plan.rows < n_rows and plan.columns < vocab and plan.vocab_outer == (walk == "vocabulary outside")
    hidden, weight, bias = random_head(n_rows, hidden_size, vocab, dtype, device, bias=True)
    labels = random_labels((n_rows,), vocab, device)
    with tuning.override("losses_chunks", kernels.tile_key(dtype), tiles):
        _check(_ce(labels, reduction="none", label_smoothing=0.1, z_loss=1e-3), hidden, weight, bias)
        _check(_logprobs(labels, temperature=1.3, return_entropy=True), hidden, weight, bias)


def _peaked_head(dtype, device, vocab=1024, n_rows=24):
    """Logits whose columns from 256 on sit ~80 below the rest: their softmax is ~e^-80."""
    hidden, weight, _ = random_head(n_rows, 32, vocab, dtype, device)
    bias = torch.zeros(vocab, device=device)
    bias[256:] = -80.0
    labels = torch.randint(0, 256, (n_rows,), device=device)
    labels[3] = 700  # a label in a negligible tile: its tile is kept (its -1 is not small)
    labels[5] = -100
    return hidden, weight, bias.to(dtype), labels


@pytest.mark.parametrize("products", PRODUCTS)
def test_skip_filter_leaves_out_negligible_tiles(backend, dtype, device, monkeypatch, products):
    monkeypatch.setenv(fused.PRODUCTS_ENV, products)
    if products == "triton":
        # The all-Triton forward splits the vocabulary across programs, each with its own running
        # max, so a split's first tile always bounds at 0; at 24 tokens every tile is a split. One
        # split, as at real sizes (3 splits of ~400 tiles at 8K tokens through Qwen2.5's head).
        monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 1)
    engine = _Spy(monkeypatch, chunked if products == "cublas" else kernels, "logit_stats_backward")
    hidden, weight, bias, labels = _peaked_head(dtype, device)
    _check(_ce(labels, reduction="sum"), hidden, weight, bias)
    runs = engine.calls[-1][-2 if products == "cublas" else -1]
    assert runs == [(0, 256), (640, 768)]  # tiles 0-1 (the labels), 5 (label 700); the rest left out
    # Label smoothing puts eps / V on every column: nothing may be left out.
    _check(_ce(labels, reduction="sum", label_smoothing=0.1), hidden, weight, bias)
    assert engine.calls[-1][-2 if products == "cublas" else -1] == [(0, 1024)]


@pytest.mark.parametrize("setting", ["ignored", "off"])
def test_skip_filter_switched_off(backend, device, monkeypatch, setting):
    monkeypatch.setenv(fused.SKIP_ENV, setting)
    engine = _Spy(monkeypatch, chunked, "logit_stats_backward")
    hidden, weight, bias, labels = _peaked_head(torch.float32, device)
    _check(_ce(labels, reduction="sum"), hidden, weight, bias)
    assert engine.calls[-1][-2] == [(0, 1024)]
    bound = linear_logit_stats(hidden, weight, bias, labels, -100, 1.0)[4]
    assert bound.shape == (1024 // LOG_P_TILE,) and bool((bound == 0).all())  # 0: not recorded


def test_log_p_bound_is_an_upper_bound(backend, dtype, device, monkeypatch):
    """The recorded bound is at least the largest log p of the counted tokens in each tile, on both paths."""
    hidden, weight, _ = random_head(40, 32, 700, dtype, device, scale=6.0)
    labels = random_labels((40,), 700, device)
    logits = (hidden.double() @ weight.double().T)
    log_p = torch.log_softmax(logits, -1)[labels != -100]
    exact = torch.nn.functional.pad(log_p.amax(0), (0, 768 - 700), value=float("-inf")).reshape(6, 128).amax(1)
    for products in PRODUCTS:
        monkeypatch.setenv(fused.PRODUCTS_ENV, products)
        bound = linear_logit_stats(hidden, weight, None, labels, -100, 1.0)[4]
        assert bool((bound.double() >= exact - 1e-3).all()), (products, bound, exact)
        # z - (the running max) is never above 0: a tile can only be kept for its own tokens.
        assert bool((bound <= 0).all()), (products, bound)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_rows_without_a_gradient_are_left_out(backend, device, monkeypatch, setting):
    """Ignored tokens skip the forward's products; masked positions (no gradient) the backward's."""
    monkeypatch.setenv(fused.SKIP_ENV, setting)
    forward = _Spy(monkeypatch, chunked, "logit_stats")
    backward = _Spy(monkeypatch, chunked, "logit_stats_backward")
    hidden, weight, _ = random_head(2 * 32, 16, 90, torch.float32, device, batch=1)
    hidden = hidden.reshape(2, 32, 16)
    labels = random_labels((2, 32), 90, device, ignore="nowhere")
    labels[:, :10] = -100  # prompts
    attention_mask = torch.ones(2, 32, dtype=torch.long, device=device)
    attention_mask[1, 20:] = 0  # padding: counted labels, but no gradient

    def ours(hidden, weight):
        return sequence_logprobs(hidden, weight, labels, attention_mask=attention_mask)

    def ref(hidden, weight, upcast):
        return sequence_logprobs_ref(hidden, weight, labels, attention_mask=attention_mask, upcast=upcast)

    check_by_rule(ours, ref, {"hidden": hidden, "weight": weight})
    computed_forward, computed_backward = forward.calls[-1][0].shape[0], backward.calls[-1][0].shape[0]
    assert (computed_forward, computed_backward) == ((44, 32) if setting == "on" else (64, 64))


def test_few_ignored_rows_are_computed_and_zeroed(backend, device, monkeypatch):
    """Below 1 in COMPACT_FRACTION ignored rows, gathering costs more than it saves: all rows run,
    and the ignored one's statistics are 0 all the same (the op's contract)."""
    forward = _Spy(monkeypatch, chunked, "logit_stats")
    hidden, weight, _ = random_head(64, 16, 90, torch.float32, device)
    labels = random_labels((64,), 90, device, ignore="nowhere")
    labels[7] = -100
    stats = linear_logit_stats(hidden, weight, None, labels, -100, 1.0)[:4]
    assert forward.calls[-1][0].shape[0] == 64
    assert all(float(s[7]) == 0.0 for s in stats) and bool((stats[0][:7] != 0).all())


def test_chunk_memory_is_a_fraction_of_the_logits():
    """Beyond inputs and gradients the backward holds the chunk (rows x columns x (4 + 2) bytes for
    16-bit inputs), the fp32 sum of the gradient that crosses chunks -- the smaller of d_hidden
    (N x H) and d_weight (V x H) -- and a chunk-sized fp32 part of the other. The chunk stays
    within its budget (1/8 of the 16-bit logits, 32 MiB to 1 GiB) unless one grain of each axis
    is more; all of it under a quarter of the logits where the fraction sets the budget and
    max(N, V) >= 16 H (Qwen2.5 and Mistral heads from 8K tokens: ~0.2 at 8K, 0.07 at 128K)."""
    sizes = [(1, 1000, 16), (3, 152064, 3584), (1000, 50257, 2048), (4096, 32000, 1024), (4096, 32000, 8192),
             (8192, 152064, 3584), (32768, 152064, 3584), (131072, 152064, 3584), (131072, 152064, 8192),
             (131072, 32000, 4096), (1 << 20, 152064, 8192)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        per_logit = 4 + (0 if dtype == torch.float32 else dtype.itemsize)
        for n_rows, vocab, hidden_size in sizes:
            where = f"{dtype} N={n_rows} V={vocab} H={hidden_size}"
            budget = chunked.chunk_budget(n_rows, vocab, dtype)
            plan = chunked.plan_chunks(n_rows, vocab, hidden_size, dtype, budget, 8192)
            assert plan.columns % chunked.COLUMN_GRAIN == 0 or plan.columns == vocab, where
            assert plan.vocab_outer == (n_rows <= vocab), where
            chunk = min(n_rows, plan.rows) * plan.columns * per_logit
            assert chunk <= max(budget, chunked.ROW_GRAIN * chunked.COLUMN_GRAIN * per_logit), where
            sixteen = dtype != torch.float32
            total_sum = min(n_rows, vocab) * hidden_size * 4 if sixteen else 0
            part = (plan.columns if plan.vocab_outer else plan.rows) * hidden_size * 4 if sixteen else 0
            assert part <= max(budget, chunked.COLUMN_GRAIN * hidden_size * 4), where
            logits = n_rows * vocab * dtype.itemsize
            if chunked.CHUNK_FLOOR < logits // chunked.CHUNK_FRACTION and max(n_rows, vocab) >= 16 * hidden_size:
                assert chunk + total_sum + part < logits / 4, where
            forward = chunked.plan_chunks(n_rows, vocab, hidden_size, dtype, budget, 8192, backward=False)
            assert min(n_rows, forward.rows) * forward.columns * 4 <= max(budget, 64 * 128 * 4), where


def test_accumulation_without_fp32_addmm(device, monkeypatch):
    """torch without fp32 accumulation into fp32 (addmm out_dtype): fp32 products of row slices, added."""
    monkeypatch.setattr(chunked, "_FALLBACK_SLICE_BYTES", 4 * 16 * 5)  # 5 rows of 16 columns a slice
    products = chunked.Products(device, torch.float16)
    products.accumulate = "slices"
    a, b = torch.randn(23, 40, device=device).half(), torch.randn(40, 16, device=device).half()
    out = torch.randn(23, 16, device=device)
    expected = out.double() + a.double() @ b.double()
    products.addmm(out, a, b)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


def test_fp32_products_switch_tf32_off_and_restore_it():
    """Around fp32 products on CUDA, TF32 is off; the caller's setting comes back after (also on error)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with chunked._ieee_fp32(torch.device("cuda")):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with pytest.raises(KeyError), chunked._ieee_fp32(torch.device("cuda")):
            raise KeyError("inside")
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = previous
    assert isinstance(matmul.allow_tf32, bool)  # a caller of the legacy flag can still read it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output matmul is a CUDA feature")
def test_fp32_output_matmul_is_available_on_this_gpu():
    """The library path needs torch.mm(..., out_dtype=torch.float32) for 16-bit inputs (torch >= 2.8)."""
    mm_ok, _ = chunked._fp32_output(torch.device("cuda"))
    assert mm_ok and chunked.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None


def test_settings_are_checked(backend, device, monkeypatch):
    hidden, weight, _ = random_head(5, 8, 20, torch.float32, device)
    labels = random_labels((5,), 20, device)
    for env, value in ((fused.PRODUCTS_ENV, "cuda"), (fused.SKIP_ENV, "sometimes"), (chunked.CHUNK_ENV, "0"),
                       (chunked.CHUNK_ENV, "lots")):
        with monkeypatch.context() as patch:
            patch.setenv(fused.PRODUCTS_ENV, "cublas")
            patch.setenv(env, value)
            with pytest.raises(ValueError, match=env):
                linear_cross_entropy(hidden, weight, labels)


def test_log_p_tile_is_the_kernels():
    assert LOG_P_TILE == kernels.LOG_P_TILE == chunked.COLUMN_GRAIN


def test_torch_compile_with_dynamic_shapes(backend, device):
    """The ops' fakes and argument checks under symbolic token counts (one graph for both sizes)."""
    def step(hidden, weight, labels):
        return (linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1)
                + linear_logprobs(hidden, weight, labels, temperature=0.7).sum())

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", dynamic=True, fullgraph=True)
    weight = random_head(1, 16, 90, torch.float32, device)[1]
    for n_rows in (13, 21):
        hidden = random_head(n_rows, 16, 90, torch.float32, device)[0].requires_grad_()
        labels = random_labels((n_rows,), 90, device)
        (got_grad,) = torch.autograd.grad(got := compiled(hidden, weight, labels), hidden)
        (expected_grad,) = torch.autograd.grad(expected := step(hidden, weight, labels), hidden)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got_grad, expected_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
@pytest.mark.parametrize("products", PRODUCTS)
def test_memory_at_the_qwen_head_on_gpu(monkeypatch, products):
    """Forward + backward at 8K tokens through Qwen2.5's head (bf16): beyond inputs and gradients,
    under a quarter of the (N, V) bf16 logits (the chunk rule gives ~0.5 GiB of 2.3 GiB; the naive
    path holds ~14 GiB there). A memory bound, not a timing."""
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    monkeypatch.setenv(fused.PRODUCTS_ENV, products)
    monkeypatch.setenv(fused.ROUTE_ENV, "recompute")  # the forward-gradient route's rule: test_forward_grad_route
    n_rows, hidden_size, vocab = 8192, 3584, 152064
    extra = cross_entropy_step_memory(n_rows, hidden_size, vocab)
    logits = n_rows * vocab * 2
    assert extra < logits / 4, f"{extra / 2**20:.0f} MiB beyond the gradients; the logits are {logits / 2**20:.0f}"

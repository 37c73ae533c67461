"""The forward-gradient route of a mean / sum cross-entropy (docqa_fast/losses/forward_grad.py,
chunked.stats_and_grads): against the reference and fp64, gradients included, on both backends;
several row chunks; the upstream scalar applied in the backward; the cheap forward kept when no
gradient is wanted; the setting, the tuned choice and the op's own checks."""

import pytest
import torch

from docqa_fast.kernels import losses as kernels
from docqa_fast.kernels import tuning
from docqa_fast.losses import chunked, fused, linear_cross_entropy, ops
from docqa_fast.reference.losses import linear_cross_entropy_ref
from loss_checks import check_by_rule, cross_entropy_step_memory, random_head, random_labels

pytestmark = pytest.mark.backends("reference", "triton")
ROUTE_NODE = "ForwardGradLoss"  # the autograd node of the route


@pytest.fixture(autouse=True)
def _forward_grad_route(monkeypatch):
    monkeypatch.setenv(fused.ROUTE_ENV, "fwd-grad")


def _small_chunks(dtype, rows=64):
    """Row chunks of ``rows`` through the tuned entry, as a GPU table would set them."""
    return tuning.override("losses_route", kernels.tile_key(dtype),
                           {"ROUTE": kernels.FORWARD_GRAD_ROUTE, "CHUNK_ROWS": rows})


def _ce(labels, **options):
    def ours(hidden, weight, bias=None):
        loss = linear_cross_entropy(hidden, weight, labels, bias, **options)
        assert ROUTE_NODE in type(loss.grad_fn).__name__, loss.grad_fn  # the route under test ran
        return loss

    def reference(hidden, weight, bias=None, upcast=True):
        return linear_cross_entropy_ref(hidden, weight, labels, bias, upcast=upcast, **options)

    return ours, reference


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_the_reference_in_several_row_chunks(backend, dtype, device, reduction):
    """203 tokens in row chunks of 64 (the last of 11), a bias, label smoothing, z-loss and a third
    of the labels ignored; the upstream gradient 3.7 (not a power of two)."""
    hidden, weight, bias = random_head(203, 24, 200, dtype, device, bias=True)
    labels = random_labels((203,), 200, device)
    with _small_chunks(dtype):
        check_by_rule(*_ce(labels, reduction=reduction, label_smoothing=0.1, z_loss=1e-3),
                      {"hidden": hidden, "weight": weight, "bias": bias},
                      grad_outputs=[torch.tensor(3.7, dtype=torch.float64)])


@pytest.mark.backends("triton")
@pytest.mark.parametrize("accumulator", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_both_ways_of_summing_d_weight(backend, device, monkeypatch, reduction, accumulator):
    """bf16's two ways, forced on fp16 (the interpreter has no bf16; fp16 made to keep gradients in
    its own dtype, as bf16 does): d_weight summed in the 16-bit gradient itself (the loss's own G,
    a rounding per chunk) and in the fp32 accumulator (the summed loss's G, scaled and rounded once
    at the end), over 4 chunks of 64 rows, with a bias and the upstream gradient 3.7."""
    original = chunked.forward_grad_plan
    seen, into = [], []

    def forced(*args):
        plan = chunked.GradPlan(64, original(*args).columns, accumulator)
        seen.append(plan)
        return plan

    monkeypatch.setattr(chunked, "forward_grad_plan", forced)
    monkeypatch.setattr(chunked, "gradients_dtype", lambda dtype: dtype)
    original_into = chunked.Products.into
    monkeypatch.setattr(chunked.Products, "into", lambda self, *args: into.append(1) or original_into(self, *args))
    hidden, weight, bias = random_head(203, 24, 200, torch.float16, device, bias=True)
    labels = random_labels((203,), 200, device, ignore="nowhere")
    check_by_rule(*_ce(labels, reduction=reduction, label_smoothing=0.1),
                  {"hidden": hidden, "weight": weight, "bias": bias},
                  grad_outputs=[torch.tensor(3.7, dtype=torch.float64)])
    assert seen and all(plan.accumulator == accumulator for plan in seen)
    assert bool(into) != accumulator  # the 16-bit sums ran (or, with the accumulator, did not)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("accumulator", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_several_column_chunks_and_lanes(backend, dtype, device, monkeypatch, accumulator):
    """868 columns in chunks of 256 (the last 100 wide) and 32-column kernel tiles, so the
    statistics kernel runs several lanes, some of them without a column in the last chunk; 3 row
    chunks of 64; bias, label smoothing, z-loss, ignored labels; the 16-bit d_weight summed in the
    gradient or in the fp32 accumulator (forced here; fp16 summed as bf16 is)."""
    tiles = {"PRODUCTS": 1, "CHUNK_COLUMNS": 256, "BLOCK_N": 16, "BLOCK_V": 32, "num_warps": 4, "num_stages": 2}
    original = chunked.forward_grad_plan
    monkeypatch.setattr(chunked, "forward_grad_plan",
                        lambda *args: chunked.GradPlan(64, original(*args).columns, accumulator and dtype != torch.float32))
    monkeypatch.setattr(chunked, "gradients_dtype", lambda d: d)  # fp16 summed as bf16 is (see above)
    hidden, weight, bias = random_head(150, 24, 868, dtype, device, bias=True)
    labels = random_labels((150,), 868, device)
    with tuning.override("losses_chunks", kernels.tile_key(dtype), tiles):
        assert kernels.stat_lanes(64, 256, kernels.tiles("losses_chunks", dtype, device)) == 8
        check_by_rule(*_ce(labels, label_smoothing=0.1, z_loss=1e-3), {"hidden": hidden, "weight": weight, "bias": bias},
                      grad_outputs=[torch.tensor(0.3, dtype=torch.float64)])


@pytest.mark.backends("triton")
@pytest.mark.parametrize("reduction", ["mean", pytest.param("sum", marks=pytest.mark.slow)])
@pytest.mark.parametrize("products", ["cublas", pytest.param("triton", marks=pytest.mark.slow)])
def test_fp16_gradients_survive_a_loss_scale(backend, device, monkeypatch, products, reduction):
    """fp16 keeps the route's gradients in fp32 until the backward has the upstream gradient: a mean
    d_weight of ~1e-7 (small hidden states over 1,024 tokens), scaled by 1,024 as GradScaler does,
    is as exact as the naive fp16 path's, on either products ("sum": the same gradients x 1/1024).
    Rounded to fp16 at the mean's size first, 42% of it was 0."""
    monkeypatch.setenv(fused.PRODUCTS_ENV, products)
    factor = 1024.0 if reduction == "mean" else 1.0
    hidden, weight, _ = random_head(1024, 16, 1000, torch.float16, device)
    hidden = (hidden.float() * 2e-4).half()
    labels = random_labels((1024,), 1000, device, ignore="nowhere")

    def weight_grad(loss_fn, w):
        w = w.clone().requires_grad_()
        (loss_fn(w) * factor).backward()
        return w.grad.double()

    exact = weight_grad(lambda w: linear_cross_entropy_ref(hidden.double(), w, labels, reduction=reduction),
                        weight.double())
    plain = weight_grad(lambda w: linear_cross_entropy_ref(hidden, w, labels, upcast=False, reduction=reduction),
                        weight)
    ours = weight_grad(lambda w: linear_cross_entropy(hidden, w, labels, reduction=reduction), weight)
    assert exact.abs().median() / 1024 < 1e-6  # the mean's own gradient is below fp16's normal range
    error = lambda g: float((g - exact).norm() / exact.norm())  # noqa: E731
    assert error(ours) <= 2 * error(plain), (error(ours), error(plain))
    assert float((ours == 0).double().mean()) < 0.01


@pytest.mark.parametrize("n_rows", [1, 113])
def test_odd_token_counts_and_batched_hidden(backend, dtype, device, n_rows):
    hidden, weight, _ = random_head(n_rows, 24, 257, dtype, device, batch=1)
    labels = random_labels((1, n_rows), 257, device, ignore="nowhere")
    with _small_chunks(dtype):
        check_by_rule(*_ce(labels), {"hidden": hidden, "weight": weight})


@pytest.mark.parametrize("products", ["cublas", "triton"])
@pytest.mark.parametrize("n_rows", [20, 0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_label_ignored_gives_zero_and_zero_gradients(backend, device, monkeypatch, reduction, n_rows, products):
    """Every label ignored, or no token at all (an empty (2, 0, H) batch), with either products
    (the Triton ones divided by zero rows here)."""
    monkeypatch.setenv(fused.PRODUCTS_ENV, products)
    hidden, weight, bias = random_head(n_rows, 16, 90, torch.float32, device, bias=True, batch=2)
    hidden, weight, bias = (t.requires_grad_() for t in (hidden, weight, bias))
    labels = random_labels((2, n_rows), 90, device, ignore="everywhere")
    loss = linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction)
    assert ROUTE_NODE in type(loss.grad_fn).__name__
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(bool((t.grad == 0).all()) for t in (hidden, weight, bias))


def test_a_second_backward_is_refused_and_a_second_call_gives_the_same_gradients(backend, device):
    """The saved gradients are scaled in place by the backward: a second backward through the same
    loss (retain_graph) raises, naming the other route; a second call gives the same bits."""
    hidden, weight, _ = random_head(50, 16, 120, torch.float32, device)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    labels = random_labels((50,), 120, device)
    with _small_chunks(torch.float32, rows=16):
        loss = linear_cross_entropy(hidden, weight, labels) * 3.7
        first = [g.clone() for g in torch.autograd.grad(loss, (hidden, weight), retain_graph=True)]
        with pytest.raises(RuntimeError, match="second backward.*DOCQA_FAST_LOSSES_ROUTE=recompute"):
            torch.autograd.grad(loss, (hidden, weight))
        # Saved-tensor hooks that hand back the same tensors skip torch's version check: still refused.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            hooked = linear_cross_entropy(hidden, weight, labels) * 3.7
        torch.autograd.grad(hooked, (hidden, weight), retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            torch.autograd.grad(hooked, (hidden, weight))
        again = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels) * 3.7, (hidden, weight))
    for a, c in zip(first, again):
        assert torch.equal(a, c)


def test_the_weight_gradient_is_the_tensor_formed_in_the_forward(backend, device, monkeypatch):
    """No gradient-sized copy in the backward: the leaves' .grad are the very d_weight and d_hidden
    the forward formed (scaled in place by the backward's 0.5)."""
    formed = []
    original = type(ops.GRADS).__call__

    def spy(self, *args):
        out = original(self, *args)
        if self is ops.GRADS:  # addresses only: a reference held here would make autograd copy
            formed.append([t.data_ptr() for t in out])
        return out

    monkeypatch.setattr(type(ops.GRADS), "__call__", spy)
    hidden, weight, _ = random_head(40, 16, 90, torch.float32, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    labels = random_labels((40,), 90, device)
    (linear_cross_entropy(hidden, weight, labels) * 0.5).backward()
    _, d_hidden, d_weight, _ = formed[-1]
    assert weight.grad.data_ptr() == d_weight
    assert hidden.grad.data_ptr() == d_hidden


def test_create_graph_is_refused(backend, device):
    """The saved gradients have no graph back to hidden / weight: a backward with create_graph
    raises (it returned gradients without a graph, so a gradient penalty added to another loss
    silently lost this loss's second derivative), as the recomputing route's does when differentiated."""
    hidden, weight, _ = random_head(10, 8, 20, torch.float32, device)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    labels = random_labels((10,), 20, device)
    loss = linear_cross_entropy(hidden, weight, labels)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_only_the_wanted_gradients_are_formed(backend, device, monkeypatch):
    """A frozen head (weight without a gradient, the LoRA case) needs no (V, H) accumulator."""
    calls = []
    original = type(ops.GRADS).__call__

    def spy(self, *args):
        if self is ops.GRADS:
            calls.append(args[-3:])
        return original(self, *args)

    monkeypatch.setattr(type(ops.GRADS), "__call__", spy)
    hidden, weight, bias = random_head(30, 16, 90, torch.float32, device, bias=True)
    labels = random_labels((30,), 90, device)
    check_by_rule(lambda hidden: _ce(labels)[0](hidden, weight, bias),
                  lambda hidden, upcast: _ce(labels)[1](hidden, weight, bias, upcast), {"hidden": hidden})
    assert calls[-1] == (True, False, False)


def test_without_gradients_the_forward_is_the_statistics_pass(backend, device, monkeypatch):
    """torch.no_grad, or no input wanting a gradient, or reduction="none": the cheap forward."""
    hidden, weight, _ = random_head(30, 16, 90, torch.float32, device)
    labels = random_labels((30,), 90, device)
    expected = linear_cross_entropy_ref(hidden, weight, labels)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels, reduction="sum")
        assert got.grad_fn is None
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), expected)
    hidden.requires_grad_()
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, labels).grad_fn is None
    losses = linear_cross_entropy(hidden, weight, labels, reduction="none")
    assert ROUTE_NODE not in type(losses.grad_fn).__name__
    assert ROUTE_NODE in type(linear_cross_entropy(hidden, weight, labels).grad_fn).__name__


@pytest.mark.backends("triton")
def test_with_triton_products(backend, device, monkeypatch):
    """The all-Triton products (a tuned table's choice, or torch without fp32-output matmuls):
    the same route forms the gradients in the forward with the recomputing kernels."""
    monkeypatch.setenv(fused.PRODUCTS_ENV, "triton")
    hidden, weight, bias = random_head(40, 32, 200, torch.float16, device, bias=True)
    labels = random_labels((40,), 200, device)
    check_by_rule(*_ce(labels, reduction="sum", z_loss=1e-2), {"hidden": hidden, "weight": weight, "bias": bias})


@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype16", [torch.float16, torch.bfloat16])
def test_budget_setting_cuts_row_chunks(backend, device, monkeypatch, dtype16):
    """DOCQA_FAST_LOSSES_CHUNK_MIB bounds the chunk: whole grains of rows over the whole vocabulary,
    16 bits a logit plus the fp32 products' columns."""
    vocab, hidden_size = 130, 16
    per_row = vocab * 2 + 256 * 4  # 16-bit logits; the products 2 column grains wide (the vocabulary's)
    monkeypatch.setenv(chunked.CHUNK_ENV, str((64 * per_row + 100) / 2**20))  # one 64-row grain
    plan = chunked.forward_grad_plan(150, vocab, hidden_size, dtype16, 16384, 8192)
    assert (plan.rows, plan.columns, plan.accumulator) == (64, 256, False)  # 3 chunks: bf16 sums in the gradient
    if dtype16 == torch.bfloat16:
        return  # the interpreter computes no bf16
    seen = []
    original = kernels.chunk_stats
    monkeypatch.setattr(kernels, "chunk_stats",
                        lambda z, *rest, **options: seen.append(z.shape) or original(z, *rest, **options))
    hidden, weight, _ = random_head(150, hidden_size, vocab, dtype16, device)
    labels = random_labels((150,), vocab, device, ignore="nowhere")
    check_by_rule(*_ce(labels), {"hidden": hidden, "weight": weight})
    assert seen == [(64, vocab), (64, vocab), (22, vocab)]


def test_route_setting_and_tuned_choice(backend, device, monkeypatch):
    hidden, weight, _ = random_head(12, 8, 40, torch.float32, device)
    hidden.requires_grad_()
    labels = random_labels((12,), 40, device)
    monkeypatch.setenv(fused.ROUTE_ENV, "sideways")
    with pytest.raises(ValueError, match=fused.ROUTE_ENV):
        linear_cross_entropy(hidden, weight, labels)
    monkeypatch.setenv(fused.ROUTE_ENV, "auto")
    monkeypatch.setenv(tuning.TABLE_ENV, "off")
    assert ROUTE_NODE not in type(linear_cross_entropy(hidden, weight, labels).grad_fn).__name__  # built-in: recompute
    with _small_chunks(torch.float32):
        assert ROUTE_NODE in type(linear_cross_entropy(hidden, weight, labels).grad_fn).__name__
    monkeypatch.setenv(fused.ROUTE_ENV, "recompute")
    with _small_chunks(torch.float32):
        assert ROUTE_NODE not in type(linear_cross_entropy(hidden, weight, labels).grad_fn).__name__


def test_the_op_checks_its_arguments(backend, device):
    op = torch.ops.docqa_fast.linear_cross_entropy_grads
    hidden, weight, bias = random_head(6, 8, 20, torch.float32, device, bias=True)
    labels = random_labels((6,), 20, device)
    good = (hidden, weight, bias, labels, -100, 0.0, 0.0, True, True, True, True)
    loss, d_hidden, d_weight, d_bias = op(*good)
    assert d_hidden.shape == hidden.shape and d_weight.shape == weight.shape and d_bias.shape == bias.shape
    for index, bad, error, match in [
            (0, hidden[None], ValueError, "hidden"), (1, weight.half(), TypeError, "weight"),
            (3, labels.int(), TypeError, "labels"), (3, labels[:2], ValueError, "labels"),
            (2, bias[:3], ValueError, "bias"),
            (5, 1.5, ValueError, "label_smoothing"), (6, -1.0, ValueError, "z_loss"),
            (6, float("nan"), ValueError, "z_loss")]:
        args = list(good)
        args[index] = bad
        with pytest.raises(error, match=match):
            op(*args)
    with pytest.raises(ValueError, match="need_bias"):
        op(hidden, weight, None, labels, -100, 0.0, 0.0, True, True, True, True)
    # A gradient wanted that the call did not form: an error, not a silent zero.
    hidden.requires_grad_()
    loss = ops.cross_entropy_with_grads(hidden, weight, None, labels, -100, 0.0, 0.0, True, (False, True, False))
    with pytest.raises(RuntimeError, match="need_hidden"):
        loss.backward()


@pytest.mark.slow  # the interpreter over a real vocabulary: ~5-25 s each here
@pytest.mark.backends("triton")
@pytest.mark.parametrize("vocab", [32000, 50257, 152064])  # Mistral's, GPT-2's (not a multiple of the tiles), Qwen2.5's
def test_real_vocabulary_size(backend, device, vocab):
    hidden, weight, _ = random_head(9, 16, vocab, torch.float16, device)
    labels = random_labels((9,), vocab, device)
    check_by_rule(*_ce(labels, label_smoothing=0.05), {"hidden": hidden, "weight": weight})


@pytest.mark.parametrize("dtype16", [torch.float32, torch.float16])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False)])
def test_the_op_passes_opcheck(backend, device, dtype16, needs):
    """Schema, fake (fp16's gradients fp32, empty ones included) and AOT tracing of
    linear_cross_entropy_grads (its autograd is an autograd.Function around it, traced by
    test_torch_compile_traces_the_route)."""
    hidden, weight, bias = random_head(6, 8, 20, dtype16, device, bias=True)
    labels = random_labels((6,), 20, device)
    args = (hidden, weight, bias, labels, -100, 0.1, 1e-3, True, *needs)
    torch.library.opcheck(torch.ops.docqa_fast.linear_cross_entropy_grads, args)


def test_bad_input_is_refused_as_on_the_other_route(backend, device):
    """The public function's checks run before the route is chosen: the same errors with gradients wanted."""
    hidden, weight, _ = random_head(6, 8, 20, torch.float32, device)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    labels = random_labels((6,), 20, device, ignore="nowhere")
    for call, error, match in [
            (lambda: linear_cross_entropy(hidden, weight[:, :7], labels), ValueError, "weight of shape"),
            (lambda: linear_cross_entropy(hidden, weight.detach().half(), labels), TypeError, "weight of dtype"),
            (lambda: linear_cross_entropy(hidden, weight, labels[:5]), ValueError, "labels of shape"),
            (lambda: linear_cross_entropy(hidden, weight, labels + 20, validate=True), ValueError, "labels in"),
            (lambda: linear_cross_entropy(hidden, weight, labels, label_smoothing=2.0), ValueError, "label_smoothing"),
            (lambda: linear_cross_entropy(hidden, weight, labels, reduction="avg"), ValueError, "reduction"),
            (lambda: linear_cross_entropy(hidden, weight, labels, ignore_index=-1.0), TypeError, "ignore_index")]:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_rows, vocab, hidden_size", [
    (1, 1000, 16), (113, 32000, 4096), (8192, 32000, 4096), (1000, 50257, 2048), (8192, 152064, 3584),
    (32768, 152064, 3584), (131072, 152064, 3584), (131072, 32000, 4096), (131072, 152064, 8192), (1 << 20, 152064, 8192)])
def test_the_plan_keeps_to_its_budget(n_rows, vocab, hidden_size, dtype):
    """Every plan fits its budget (one grain of rows at least), in whole grains or one chunk of every
    row, and sums a bf16 d_weight in the gradient over at most 4 chunks unless it cannot hold the
    accumulator."""
    plan = chunked.forward_grad_plan(n_rows, vocab, hidden_size, dtype, 16384, 8192)
    budget = chunked.forward_grad_budget(n_rows, vocab, dtype)
    per_row = vocab * 4 if dtype == torch.float32 else vocab * dtype.itemsize + plan.columns * 4
    accumulator = vocab * hidden_size * 4 if plan.accumulator else 0
    per_row += hidden_size * 4 if plan.accumulator else 0
    # The chunk within the budget (one grain at least); the accumulator beside it within the
    # budget too, unless the budget cannot hold it with a grain of rows.
    assert plan.rows * per_row <= max(budget, chunked.ROW_GRAIN * per_row)
    assert plan.rows * per_row + accumulator <= budget or accumulator + chunked.ROW_GRAIN * per_row > budget
    assert plan.rows == n_rows or plan.rows % chunked.ROW_GRAIN == 0
    chunks = -(-n_rows // plan.rows)
    # bf16 sums d_weight in the gradient over at most 4 chunks (4 roundings), else in fp32.
    assert plan.accumulator == (dtype == torch.bfloat16 and chunks > chunked.MAX_ROUNDED_CHUNKS)


def test_statistics_in_lanes_and_the_16_bit_copy(device):
    """chunk_stats over two column chunks (600 + 401 columns), a bias and labels: split into 5
    lanes and merged, the same statistics as one lane and as torch on the fp32 logits; the copy
    is the chunk rounded once to fp16."""
    tiles = kernels.default_tiles("losses_chunks", torch.float16)
    z = torch.randn(37, 1001, device=device) * 4
    bias = torch.randn(1001, device=device).half()
    labels = random_labels((37,), 1001, device)
    copy = torch.empty(37, 1001, dtype=torch.float16, device=device)
    states = []
    for lanes in (1, 5):
        state = torch.empty((lanes, 5, 37), device=device)
        for v0, v1 in ((0, 600), (600, 1001)):
            kernels.chunk_stats(z[:, v0:v1], bias, labels, state if lanes > 1 else state[0], None, v0, v0 == 0, -100,
                                1.0, False, tiles, copy=copy[:, v0:v1])
        states.append(kernels.merge_lanes(state))
    assert kernels.stat_lanes(37, 1001, tiles) > 1  # the rule splits a chunk this narrow
    logits = z + bias.float()
    lse = states[1][0] + states[1][1].log()
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(states[1], states[0], rtol=1e-5, atol=1e-4)
    counted = labels != -100
    label_logit = torch.where(counted, logits.gather(1, labels.clamp_min(0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(states[1][3], label_logit)
    torch.testing.assert_close(states[1][4], logits.sum(1), rtol=1e-5, atol=1e-3)
    assert torch.equal(copy, z.half())


def test_chunk_rule_of_the_route():
    """The budget (half the bf16 logits, at most 4 GiB) sets the rows; bf16 d_weight sums in the
    gradient over at most 4 chunks, else in a (V, H) fp32 accumulator; fp16 and fp32 in their
    fp32 gradients. Qwen2.5's head: hidden 3584, vocabulary 152,064."""
    def plan(n_rows, dtype, chunk_rows=16384, vocab=152064, hidden_size=3584, need_weight=True):
        p = chunked.forward_grad_plan(n_rows, vocab, hidden_size, dtype, chunk_rows, 8192, need_weight)
        return p.rows, p.columns, p.accumulator

    # 8K tokens, an eighth ignored: 3 chunks of 2,432 rows, 0.76 GiB (the naive path: ~13 GiB).
    assert plan(7168, torch.bfloat16) == (2432, 8192, False)
    assert plan(28672, torch.bfloat16) == (9600, 8192, False)  # 32K: 3 chunks, 3 GiB
    # 128K: the 4 GiB cap would take 10 chunks; the 2 GiB fp32 accumulator and 5,760-row chunks.
    assert plan(114688, torch.bfloat16) == (5760, 8192, True)
    assert plan(114688, torch.bfloat16, need_weight=False)[2] is False  # a frozen head: nothing to sum
    assert plan(7168, torch.bfloat16, chunk_rows=2048) == (1792, 8192, False)  # the tuned cap, spread evenly
    assert not plan(7168, torch.float16)[2] and not plan(7168, torch.float32)[2]  # their gradients are fp32
    assert plan(7168, torch.float32) == (3584, 152064, False)  # 32-bit logits, G in place: 2 chunks
    assert plan(300, torch.bfloat16) == (300, 8192, False)  # one chunk of every row
    assert plan(0, torch.bfloat16)[0] == 1
    assert plan(20, torch.bfloat16, vocab=200, hidden_size=8) == (20, 256, False)  # narrow vocabularies: one column chunk


@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype16", [torch.float32, torch.float16])
def test_torch_compile_traces_the_route(backend, device, dtype16):
    """The op's fake and autograd under torch.compile (fullgraph, symbolic token counts; fp16's
    gradients fp32 until the backward rounds them): the same loss and gradients as eager."""
    def step(hidden, weight, labels):
        return linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1, z_loss=1e-3)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", dynamic=True, fullgraph=True)
    weight = random_head(1, 16, 90, dtype16, device)[1].requires_grad_()
    for n_rows in (13, 21):
        hidden = random_head(n_rows, 16, 90, dtype16, device)[0].requires_grad_()
        labels = random_labels((n_rows,), 90, device)
        got = compiled(hidden, weight, labels)
        got_grads = torch.autograd.grad(got, (hidden, weight))
        expected = step(hidden, weight, labels)
        assert ROUTE_NODE in type(expected.grad_fn).__name__
        for a, b in zip((got, *got_grads), (expected, *torch.autograd.grad(expected, (hidden, weight)))):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
def test_memory_at_the_qwen_head_on_gpu(monkeypatch):
    """Forward + backward at 8K tokens through Qwen2.5's head (bf16), route forced: beyond inputs
    and gradients, one chunk of rows x V bf16 logits and rows x CHUNK_COLUMNS fp32 products (and
    the (V, H) fp32 accumulator if the plan takes one) -- 0.86 GiB by the rule (docs/losses.md),
    against ~13 GiB for the naive path -- plus 256 MiB for the library's workspaces and the small
    (N,) and (N, H) vectors. A memory bound, not a timing."""
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    monkeypatch.setenv(fused.ROUTE_ENV, "fwd-grad")
    n_rows, hidden_size, vocab = 8192, 3584, 152064
    extra = cross_entropy_step_memory(n_rows, hidden_size, vocab, labels_ignore="nowhere")
    cuda = torch.device("cuda")
    plan = chunked.forward_grad_plan(n_rows, vocab, hidden_size, torch.bfloat16,
                                     kernels.tiles("losses_route", torch.bfloat16, cuda)["CHUNK_ROWS"],
                                     kernels.tiles("losses_chunks", torch.bfloat16, cuda)["CHUNK_COLUMNS"])
    rule = plan.rows * (vocab * 2 + plan.columns * 4) + (4 * vocab * hidden_size if plan.accumulator else 0)
    assert extra < rule + (256 << 20), f"{extra / 2**20:.0f} MiB beyond the gradients; the rule {rule / 2**20:.0f}"


@pytest.mark.backends("triton")
def test_triton_products_fp16_mean_over_many_rows_stays_finite(backend, device, monkeypatch):
    """The all-Triton products once rounded the summed loss's gradients to fp16 before the
    backward's 1/count: 700 rows of one label with large hidden values put d_weight's label row
    at 700 x 100 (fp16 inf) where the mean's is -100. It was -inf; now it matches the reference."""
    monkeypatch.setenv(fused.PRODUCTS_ENV, "triton")
    hidden = torch.full((700, 8), 100.0, device=device).half()
    weight = (torch.randn(16, 8, device=device) * 0.01).half()
    labels = torch.zeros(700, dtype=torch.long, device=device)
    check_by_rule(*_ce(labels), {"hidden": hidden, "weight": weight})

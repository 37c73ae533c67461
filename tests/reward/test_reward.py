"""Reward-ensemble scoring against the all-tokens-then-gather reference and fp64."""

import re

import pytest
import torch
from torch import nn

import docqa_fast
from docqa_fast.reference.reward import (
    ReferenceRewardEnsemble,
    aggregate_ref,
    all_pairs_ranking_loss_ref,
    pairwise_loss_ref,
    plackett_luce_loss_ref,
)
from docqa_fast.reward.ops import _reward_heads_backward_op, _reward_heads_op
from docqa_fast.testing import assert_close_by_rule, long_sum_terms

pytestmark = pytest.mark.backends("reference", "triton")  # no CUDA C++ kernel: Triton is the fast path


def padded_batch(batch, seqlen, hidden, dtype, device, padding):
    """Random hidden states and a mask with random lengths (>= 1), padded on ``padding``'s side."""
    x = torch.randn(batch, seqlen, hidden, device=device).to(dtype)
    lengths = torch.randint(1, seqlen + 1, (batch,), device=device)
    lengths[0] = seqlen
    positions = torch.arange(seqlen, device=device)
    if padding == "right":
        mask = positions[None, :] < lengths[:, None]
    else:
        mask = positions[None, :] >= (seqlen - lengths)[:, None]
    return x, mask.long()


def packed_batch(lengths, hidden, dtype, device):
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.tensor(lengths, device=device).cumsum(0)
    return torch.randn(sum(lengths), hidden, device=device).to(dtype), cu_seqlens


def make_heads(hidden, num_heads, bias, device):
    reference = ReferenceRewardEnsemble(hidden, num_heads, bias=bias, device=device)
    for head in reference.heads:  # a spread of head scales, so min/var are not trivial
        nn.init.normal_(head.weight, std=1.0 / hidden**0.5)
        if bias:
            nn.init.normal_(head.bias, std=0.5)
    return reference


def scored_inputs(layout, dtype, device, hidden=100):
    if layout in ("right", "left"):
        x, mask = padded_batch(4, 13, hidden, dtype, device, layout)
        return x, {"attention_mask": mask}
    if layout == "packed":
        x, cu = packed_batch([5, 1, 17, 3], hidden, dtype, device)  # a length-1 sequence included
        return x, {"cu_seqlens": cu}
    x = torch.randn(3, 11, hidden, device=device).to(dtype)  # last_index overrides everything
    return x, {"last_index": torch.tensor([10, 0, 6], device=device)}


def _cast(module, dtype):
    copy = ReferenceRewardEnsemble(module.heads[0].in_features, len(module.heads),
                                   bias=module.heads[0].bias is not None, dtype=dtype,
                                   device=module.heads[0].weight.device)
    copy.load_state_dict(module.state_dict())
    return copy


LAYOUTS = ["right", "left", "packed", "last_index"]


@pytest.mark.parametrize("num_heads", [1, 5, 20])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rewards_match_reference(backend, dtype, layout, num_heads, device):
    reference = make_heads(100, num_heads, bias=num_heads != 5, device=device)
    head = docqa_fast.RewardEnsembleHead(100, num_heads, bias=num_heads != 5, dtype=dtype, device=device)
    head.load_state_dict(reference.state_dict())
    x, where = scored_inputs(layout, dtype, device)

    out = head(x, **where)
    reference = _cast(reference, dtype)  # the parameters as the head holds them
    exact = _cast(reference, torch.float64)(x.double(), **where)
    plain = reference(x, **where)  # what the peers compute: Linear in dtype, then gather
    assert out.rewards.dtype == torch.float32 and out.rewards.shape == exact.shape
    assert_close_by_rule(out.rewards, exact, plain, name="rewards")
    for name in ("mean", "min"):
        assert_close_by_rule(getattr(out, name), aggregate_ref(exact, name), aggregate_ref(plain, name), name=name)
    exact_var = exact.var(-1) if num_heads > 1 else torch.zeros_like(exact[:, 0])
    plain_var = plain.var(-1) if num_heads > 1 else torch.zeros_like(plain[:, 0])
    assert_close_by_rule(out.var, exact_var, plain_var, name="var")
    torch.testing.assert_close(out.score, out.mean)


def test_hidden_size_3584(backend, dtype, device):
    """The Qwen2.5-VL hidden size: many hidden tiles, K = 8."""
    reference = make_heads(3584, 8, bias=False, device=device)
    weight = torch.cat([h.weight.detach() for h in reference.heads]).to(dtype)
    x, mask = padded_batch(3, 5, 3584, dtype, device, "left")
    got = docqa_fast.ensemble_rewards(x, weight, attention_mask=mask)
    reference = _cast(reference, dtype)
    exact = _cast(reference, torch.float64)(x.double(), attention_mask=mask)
    plain = _cast(reference, dtype)(x, attention_mask=mask)
    assert_close_by_rule(got, exact, plain, name="rewards")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_reference(backend, dtype, layout, device):
    num_heads = 6
    reference = make_heads(64, num_heads, bias=True, device=device)
    head = docqa_fast.RewardEnsembleHead(64, num_heads, bias=True, dtype=dtype, device=device)
    head.load_state_dict(reference.state_dict())
    x, where = scored_inputs(layout, dtype, device, hidden=64)
    batch = len(next(iter(where.values()))) - (1 if layout == "packed" else 0)
    g_rewards, g_mean, g_var, g_min = (torch.randn(batch, num_heads, device=device), *torch.randn(3, batch,
                                                                                                  device=device))

    def backward(x, params, rewards, mean, var, minimum):
        loss = (rewards * g_rewards).sum() + (mean * g_mean).sum() + (var * g_var).sum() + (minimum * g_min).sum()
        return torch.autograd.grad(loss, (x, *params))

    x_fast = x.detach().requires_grad_()
    out = head(x_fast, **where)
    got = backward(x_fast, (head.weight, head.bias), out.rewards, out.mean, out.var, out.min)

    def reference_grads(module, inputs):
        inputs = inputs.detach().requires_grad_()
        rewards = module(inputs, **where)
        mean, var, minimum = rewards.mean(-1), rewards.var(-1), rewards.amin(-1)
        weight = [h.weight for h in module.heads]
        bias = [h.bias for h in module.heads]
        grads = backward(inputs, (*weight, *bias), rewards, mean, var, minimum)
        return grads[0], torch.cat(grads[1 : 1 + num_heads]), torch.cat(grads[1 + num_heads :])

    reference = _cast(reference, dtype)
    exact = reference_grads(_cast(reference, torch.float64), x.double())
    plain = reference_grads(reference, x)
    for name, g, e, p in zip(("d hidden", "d weight", "d bias"), got, exact, plain):
        assert_close_by_rule(g, e, p, factor=3.0, name=name)


@pytest.fixture
def triton_backend(monkeypatch):
    if not docqa_fast.backends()["triton"].available:
        pytest.skip(f"triton backend {docqa_fast.backends()['triton']}")
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")


def test_fp32_long_hidden_reduction_is_compensated(triton_backend, device):
    """fp32 scores over H = 8192: K blocks summed from zero and joined with TwoSum (kernels/reward.py).

    Blocks of 128 added in sequence lost 24 ulp here (a single FMA chain, as on the GPU, more).
    """
    terms = long_sum_terms(8192, device)
    x = torch.stack([terms, terms.flip(0)])[:, None, :]  # (B=2, T=1, H)
    weight = torch.ones(3, 8192, device=device)
    rewards = docqa_fast.ensemble_rewards(x, weight)
    exact = x[:, 0].double().sum(-1, keepdim=True).expand(2, 3)
    assert_close_by_rule(rewards, exact, x[:, 0].sum(-1, keepdim=True).expand(2, 3), name="rewards")


def test_fp32_long_sequence_reduction_of_weight_gradient_is_compensated(triton_backend, device):
    """d W sums over the sequences (8192 of them here, 16 a block): compensated like the forward."""
    terms = long_sum_terms(8192, device)
    x = terms[:, None, None].expand(8192, 1, 32).contiguous()  # every hidden column of sequence b is terms[b]
    weight = torch.ones(2, 32, device=device, requires_grad=True)
    # sparse_grad: the 8192-row dense input gradient (tested elsewhere) would cost the interpreter a minute
    docqa_fast.ensemble_rewards(x, weight, sparse_grad=True).sum().backward()  # d W[k, h] = sum_b x[b, h]
    exact = terms.double().sum().expand(2, 32)
    assert_close_by_rule(weight.grad, exact, terms.sum().expand(2, 32), name="d weight")


def test_min_ties_share_the_gradient(backend, device):
    head = docqa_fast.RewardEnsembleHead(32, 4, device=device)
    with torch.no_grad():
        head.weight[1:] = head.weight[0]  # heads 0..3 identical: a four-way tie at the min
    x = torch.randn(2, 3, 32, device=device)
    out = head(x)
    out.min.sum().backward()
    torch.testing.assert_close(head.weight.grad, x[:, -1].sum(0).expand(4, 32) / 4)


def test_single_head_variance_is_zero_and_uwo_is_mean(backend, device):
    head = docqa_fast.RewardEnsembleHead(48, 1, aggregation="uwo", uwo_lambda=0.3, device=device)
    out = head(torch.randn(3, 7, 48, device=device))
    assert torch.equal(out.var, torch.zeros(3, device=device))
    torch.testing.assert_close(out.score, out.mean)
    torch.testing.assert_close(out.mean, out.rewards[:, 0])


@pytest.mark.parametrize("aggregation", ["mean", "min", "uwo"])
def test_aggregation_choices(backend, aggregation, device):
    head = docqa_fast.RewardEnsembleHead(40, 5, aggregation=aggregation, uwo_lambda=0.25, device=device)
    out = head(torch.randn(4, 6, 40, device=device))
    expected = aggregate_ref(out.rewards, aggregation, uwo_lambda=0.25)
    torch.testing.assert_close(out.score, expected)
    torch.testing.assert_close(docqa_fast.aggregate(out.rewards, aggregation, uwo_lambda=0.25), expected)


def test_dense_positions_match_linear(device):
    head = docqa_fast.RewardEnsembleHead(24, 3, bias=True, device=device)
    x = torch.randn(2, 5, 24, device=device)
    out = head(x, positions="all")
    torch.testing.assert_close(out.rewards, nn.functional.linear(x, head.weight, head.bias))
    assert out.score.shape == (2, 5)


def test_custom_op_gradcheck_fp64():
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    tok = torch.tensor([3, 0, 2])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCQA_FAST_BACKEND", "reference")
        assert torch.autograd.gradcheck(lambda *a: _reward_heads_op(*a), (x, tok, weight, bias))


def test_opcheck_and_compile(backend, device):
    x = torch.randn(3, 9, 32, device=device)
    weight = torch.randn(4, 32, device=device)
    tok = torch.tensor([8, 2, 5], device=device)
    torch.library.opcheck(_reward_heads_op, (x, tok, weight, None))
    rewards, mean, _, minimum = _reward_heads_op(x, tok, weight, None)
    grads = (torch.randn_like(rewards), None, torch.randn_like(mean), None)
    for sparse in (False, True):
        torch.library.opcheck(_reward_heads_backward_op,
                              (x, tok, weight, rewards, mean, minimum, *grads, False, sparse))

    head = docqa_fast.RewardEnsembleHead(32, 4, aggregation="uwo", device=device)
    mask = torch.ones(3, 9, dtype=torch.long, device=device)
    mask[1, :3] = 0

    def step(x):
        out = head(x, attention_mask=mask)
        return docqa_fast.pairwise_loss(out.score[:1], out.score[1:2])

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))


@pytest.mark.parametrize("layout", LAYOUTS + ["repeated_rows"])
def test_sparse_gradient_equals_the_dense_one(backend, dtype, layout, device):
    """sparse_grad=True: a sparse COO gradient of the B scoring rows whose dense form is the
    dense gradient (a packed row scored twice appears twice and sums)."""
    if layout == "repeated_rows":
        x = torch.randn(40, 24, device=device).to(dtype)
        where = {"last_index": torch.tensor([7, 39, 7, 0, 16], device=device)}
    else:
        x, where = scored_inputs(layout, dtype, device, hidden=24)
    weight = (torch.randn(5, 24, device=device) / 5).to(dtype)
    grads = {}
    for sparse in (False, True):
        x_leaf, w_leaf = x.detach().requires_grad_(), weight.detach().requires_grad_()
        rewards, mean, var, minimum = docqa_fast.reward.ops.reward_heads(x_leaf, w_leaf, sparse_grad=sparse,
                                                                        **where)
        loss = rewards.sum() + mean.sum() - var.sum() + 2 * minimum.sum()
        grads[sparse] = torch.autograd.grad(loss, (x_leaf, w_leaf))
    sparse = grads[True][0]
    assert sparse.is_sparse and sparse.shape == x.shape
    # Coalesced (values() readable) where the rows are known strictly increasing.
    assert sparse.is_coalesced() == (layout != "repeated_rows")  # packed with last_index: unknown order
    assert sparse._values().shape == (len(next(iter(where.values()))) - (layout == "packed"), 24)
    assert not grads[False][0].is_sparse
    torch.testing.assert_close(grads[True][0].to_dense(), grads[False][0])
    torch.testing.assert_close(grads[True][1], grads[False][1])


@pytest.mark.parametrize("check", [True, False])
def test_dense_gradient_of_many_short_packed_sequences(backend, check, device):
    """80 packed sequences of 1-4 tokens: the backward's fill finds each block's scoring rows
    by binary search over cu_seqlens (checked or not), not by scanning every sequence."""
    lengths = torch.randint(1, 5, (80,)).tolist()
    x, cu_seqlens = packed_batch(lengths, 16, torch.float32, device)
    weight = torch.randn(3, 16, device=device)
    x_fast = x.detach().requires_grad_()
    docqa_fast.ensemble_rewards(x_fast, weight, cu_seqlens=cu_seqlens, check=check).sum().backward()
    x_ref = x.detach().requires_grad_()
    (x_ref[cu_seqlens[1:].long() - 1] @ weight.t()).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad)


@pytest.mark.parametrize("used", ["rewards", "mean", "var", "min"])
def test_gradient_of_one_output(backend, used, device):
    """Autograd passes no gradient for unused outputs: each statistic alone, on a hidden size of 203
    over 113 tokens (odd tiles), matches the reference in fp64."""
    x = torch.randn(3, 113, 203, device=device)
    mask = torch.ones(3, 113, dtype=torch.long, device=device)
    mask[1, 1:] = 0  # a sequence of length 1
    mask[2, :50] = 0
    head = make_heads(203, 7, bias=True, device=device)
    fast = docqa_fast.RewardEnsembleHead(203, 7, bias=True, device=device)
    fast.load_state_dict(head.state_dict())
    x_fast = x.detach().requires_grad_()
    out = fast(x_fast, attention_mask=mask)
    getattr(out, used).sum().backward()

    x_ref = x.double().requires_grad_()
    ref = _cast(head, torch.float64)
    rewards = ref(x_ref, attention_mask=mask)
    value = {"rewards": rewards, "mean": rewards.mean(-1), "var": rewards.var(-1), "min": rewards.amin(-1)}[used]
    value.sum().backward()
    for got, expected in ((x_fast.grad, x_ref.grad), (fast.weight.grad, torch.cat([h.weight.grad for h in ref.heads])),
                          (fast.bias.grad, torch.cat([h.bias.grad for h in ref.heads]))):
        torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-5)


def test_unchecked_calls_read_no_values_and_agree_across_backends(device, monkeypatch):
    """check=False: no tensor value is read on the host (no sync on a GPU); an all-padding row
    scores its first token and an out-of-range last_index the nearest row, on every backend."""
    x = torch.randn(3, 6, 16, device=device)
    weight = torch.randn(2, 16, device=device)
    mask = torch.ones(3, 6, dtype=torch.long, device=device)
    mask[1] = 0
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n),
                                                                                              _o(self, *a, **k))[1])
    results = {}
    for backend in ("reference", "triton"):
        if not docqa_fast.backends()[backend].available:
            continue
        monkeypatch.setenv("DOCQA_FAST_BACKEND", backend)
        padded = docqa_fast.ensemble_rewards(x, weight, attention_mask=mask, check=False)
        out_of_range = docqa_fast.ensemble_rewards(x.view(18, 16), weight, last_index=torch.tensor([-3, 40],
                                                   device=device), check=False)
        results[backend] = padded, out_of_range
    monkeypatch.undo()
    assert reads == []
    expected_rows = torch.stack([x[0, 5], x[1, 0], x[2, 5]]), torch.stack([x.view(18, 16)[0], x.view(18, 16)[17]])
    for padded, out_of_range in results.values():
        torch.testing.assert_close(padded, expected_rows[0] @ weight.t())
        torch.testing.assert_close(out_of_range, expected_rows[1] @ weight.t())


def test_unchecked_cu_seqlens_get_the_shared_layout_checks_and_no_value_read(device, monkeypatch):
    """check=False on packed input: cu_seqlens' layout is checked by the shared rule (the same
    messages as a checked call: _validation.check_cu_seqlens), and no value is read."""
    x, weight = torch.randn(9, 16, device=device), torch.randn(2, 16, device=device)
    for bad, error in ((torch.tensor([0], dtype=torch.int32), ValueError),
                       (torch.tensor([[0, 9]], dtype=torch.int32), ValueError),
                       (torch.tensor([0.0, 9.0]), TypeError)):
        messages = []
        for check in (True, False):
            with pytest.raises(error) as raised:
                docqa_fast.ensemble_rewards(x, weight, cu_seqlens=bad.to(device), check=check)
            messages.append(str(raised.value))
        assert messages[0] == messages[1] and "cu_seqlens" in messages[0]
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n),
                                                                                              _o(self, *a, **k))[1])
    rewards = docqa_fast.ensemble_rewards(x, weight, cu_seqlens=cu, check=False)
    monkeypatch.undo()
    assert reads == []
    torch.testing.assert_close(rewards, torch.stack([x[3], x[8]]) @ weight.t())


# ---------------------------------------------------------------------------- losses

def test_pairwise_loss_matches_reference_and_gradcheck():
    chosen = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(6, 1, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        got = docqa_fast.pairwise_loss(chosen, rejected, margin=margin, reduction=reduction)
        torch.testing.assert_close(got, pairwise_loss_ref(chosen, rejected, margin, reduction))
    assert torch.autograd.gradcheck(lambda c, r: docqa_fast.pairwise_loss(c, r, margin=0.5), (chosen, rejected))


def check_listwise_loss(loss, loss_ref, scores, labels):
    """Value and gradient equal to the loop-over-pairs reference; gradcheck in fp64."""
    got, expected = loss(scores, labels), loss_ref(scores, labels)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, scores)[0], torch.autograd.grad(expected, scores)[0])
    assert torch.autograd.gradcheck(lambda s: loss(s, labels), (scores,))


def test_all_pairs_ranking_loss_matches_reference():
    scores = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    ranks = torch.stack([torch.randperm(6) for _ in range(5)])
    ranks[0] = torch.tensor([0, 1, 1, 2, 3, 3])  # ties carry no preference
    ranks[1] = 2  # all tied: no pair, left out of the mean
    check_listwise_loss(docqa_fast.all_pairs_ranking_loss, all_pairs_ranking_loss_ref, scores, ranks)


def test_plackett_luce_loss_matches_reference():
    scores = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    order = torch.stack([torch.randperm(5) for _ in range(4)])
    check_listwise_loss(docqa_fast.plackett_luce_loss, plackett_luce_loss_ref, scores, order)


# ------------------------------------------------------------------------ interop

def test_linear_heads_round_trip():
    heads = [nn.Linear(20, 1) for _ in range(3)]
    ensemble = docqa_fast.RewardEnsembleHead.from_linear_heads(heads, aggregation="min")
    x = torch.randn(2, 4, 20)
    expected = torch.cat([h(x[:, -1]) for h in heads], -1)
    torch.testing.assert_close(ensemble(x).rewards, expected)
    for original, back in zip(heads, ensemble.to_linear_heads()):
        assert torch.equal(original.weight, back.weight) and torch.equal(original.bias, back.bias)


def test_transformers_score_head_loads_directly():
    score = nn.Linear(16, 1, bias=False)  # what *ForSequenceClassification.score is
    ensemble = docqa_fast.RewardEnsembleHead(16, 1)
    ensemble.load_state_dict(score.state_dict())
    assert torch.equal(ensemble.weight, score.weight)
    assert torch.equal(docqa_fast.RewardEnsembleHead.from_linear(score).weight, score.weight)
    assert torch.equal(ensemble.to_linear().weight, score.weight)


def test_reference_checkpoint_round_trip():
    reference = ReferenceRewardEnsemble(12, 4, bias=True)
    ensemble = docqa_fast.RewardEnsembleHead(12, 4, bias=True)
    ensemble.load_state_dict(reference.state_dict())  # K separate heads -> one (K, H) weight
    back = ReferenceRewardEnsemble(12, 4, bias=True)
    back.load_state_dict(ensemble.separate_heads_state_dict())
    for a, b in zip(reference.parameters(), back.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ bad input

def _bad_call(case):
    x = torch.randn(2, 5, 8)
    weight = torch.randn(3, 8)
    kwargs = {}
    if case == "hidden_mismatch":
        weight = torch.randn(3, 9)
    elif case == "all_padding":
        kwargs["attention_mask"] = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    elif case == "cu_seqlens_total":
        x, kwargs["cu_seqlens"] = torch.randn(10, 8), torch.tensor([0, 4, 9], dtype=torch.int32)
    elif case == "cu_seqlens_empty_sequence":
        x, kwargs["cu_seqlens"] = torch.randn(10, 8), torch.tensor([0, 4, 4, 10], dtype=torch.int32)
    elif case == "cu_seqlens_with_padded":
        kwargs["cu_seqlens"] = torch.tensor([0, 5, 10], dtype=torch.int32)
    elif case == "packed_without_boundaries":
        x = torch.randn(10, 8)
    elif case == "last_index_range":
        kwargs["last_index"] = torch.tensor([4, 5])
    elif case == "last_index_float":
        kwargs["last_index"] = torch.tensor([4.0, 1.0])
    elif case == "too_many_heads":
        weight = torch.randn(65, 8)
    elif case == "bias_shape":
        kwargs["bias"] = torch.randn(4)
    elif case == "sparse_grad_type":
        kwargs["sparse_grad"] = "yes"
    elif case == "no_tokens":
        x = torch.randn(2, 0, 8)
    return lambda: docqa_fast.ensemble_rewards(x, weight, **kwargs)


@pytest.mark.parametrize("case, error, message", [
    ("hidden_mismatch", ValueError, "expected weight of shape (num_heads, 8)"),
    ("all_padding", ValueError, "attention_mask has all-padding rows [1]"),
    ("cu_seqlens_total", ValueError, "end at the token count 10"),
    ("cu_seqlens_empty_sequence", ValueError, "cu_seqlens strictly increasing"),
    ("cu_seqlens_with_padded", ValueError, "cu_seqlens is for packed hidden_states"),
    ("packed_without_boundaries", ValueError, "need cu_seqlens or last_index"),
    ("last_index_range", ValueError, "every last_index value in [0, 5)"),
    ("last_index_float", TypeError, "last_index of dtype"),
    ("too_many_heads", ValueError, "1 to 64 heads"),
    ("bias_shape", ValueError, "bias of shape (3,)"),
    ("sparse_grad_type", TypeError, "expected sparse_grad to be a bool"),
    ("no_tokens", ValueError, "at least one token per sequence"),
])
def test_bad_input_names_the_argument(case, error, message):
    with pytest.raises(error, match=re.escape(message)):
        _bad_call(case)()


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="aggregation"):
        docqa_fast.RewardEnsembleHead(8, 2, aggregation="median")
    with pytest.raises(ValueError, match="positions"):
        docqa_fast.RewardEnsembleHead(8, 2)(torch.randn(1, 2, 8), positions="first")
    with pytest.raises(ValueError, match="rejected of shape"):
        docqa_fast.pairwise_loss(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="permutation"):
        docqa_fast.plackett_luce_loss(torch.randn(2, 3), torch.tensor([[0, 1, 1], [2, 1, 0]]))
    with pytest.raises(ValueError, match="ranks of shape"):
        docqa_fast.all_pairs_ranking_loss(torch.randn(2, 3), torch.tensor([[0, 1], [1, 0]]))


def test_registered_ops_check_their_inputs():
    """The custom ops can be called directly (torch.ops.docqa_fast.*): they name what is wrong."""
    x, weight = torch.randn(2, 5, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match="token_index as a 1-D int64"):
        _reward_heads_op(x, torch.tensor([1, 2], dtype=torch.int32), weight, None)
    with pytest.raises(ValueError, match="one token_index per sequence"):
        _reward_heads_op(x, torch.tensor([1, 2, 3]), weight, None)
    with pytest.raises(ValueError, match=re.escape("expected weight (num_heads, 8)")):
        _reward_heads_backward_op(x, torch.tensor([1, 2]), weight.half(), torch.zeros(2, 3), torch.zeros(2),
                                  torch.zeros(2), None, None, None, None, False, False)


def test_one_head_compiles_for_the_gpu():
    """Triton compiles an int argument equal to 1 as a constant unless told not to; the forward's
    statistics call K.to(...), which a constant lacks, so one head failed to compile for sm_90
    (the interpreter never specialises; reproduced by compiling with K = 1 as a constant). K
    must stay a run-time value: read the kernel's flags in a process without the interpreter."""
    import subprocess
    import sys

    code = ("from docqa_fast.kernels import reward\n"
            "flags = {p.name: p.do_not_specialize for p in reward.reward_heads_forward_kernel.params}\n"
            "print(flags['K'])\n")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_packed_input_without_tokens_is_refused_unchecked_too(backend, device):
    # check=False clamps positions into the rows; with no rows at all that would be row -1.
    weight = torch.randn(4, 8, device=device)
    empty = torch.empty(0, 8, device=device)
    with pytest.raises(ValueError, match="hidden with tokens"):
        docqa_fast.ensemble_rewards(empty, weight, cu_seqlens=torch.tensor([0, 0], dtype=torch.int32, device=device),
                                    check=False)
    with pytest.raises(ValueError, match="hidden with tokens"):
        docqa_fast.ensemble_rewards(empty, weight, last_index=torch.tensor([0], device=device), check=False)

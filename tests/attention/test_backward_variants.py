"""The training backward's variants (issue 13): the two-pass backward (dK/dV kernel, then dQ
kernel; bitwise reproducible) and the one-pass one (the dK/dV kernel adds dQ by fp32 atomics),
which a tuned table may choose for calls with deterministic=False.

The one-pass kernel is forced here through the tuning hook (``tuning.override`` of
``attention_backward_passes``) and checked against the reference by flash-attn's tolerance rule
on every feature the two-pass backward has: dense and packed (empty sequences included), GQA,
causal / windows / softcap / ALiBi / dropout, odd lengths and head dims, fp16 and fp32 (the
kernels' own fp32 math, at the launcher: the ops send fp32 to the reference), the TMA load path
(power-of-two head dims) and the masked one.
"""

import contextlib
import json

import pytest
import torch

import docqa_fast
from docqa_fast.kernels import attention as kernels
from docqa_fast.kernels import tuning
from docqa_fast.kernels.attention import launch
from docqa_fast.kernels.attention.common import HEAD_DIMS, head_dim_bucket
from docqa_fast.kernels.registry import registered_configs

from .test_attention import assert_matches_reference, random_qkv

ON_GPU = torch.cuda.is_available()
PRECISIONS = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]
# The kernels' own fp32 math is what the interpreter runs; on a GPU the ops send fp32 to the
# reference, and the kernels' tl.dot would take TF32 there (not what an fp32 caller gets).
CPU_ONLY = pytest.mark.skipif(ON_GPU, reason="fp32 calls run the reference on GPUs")


def _passes(head_dim, passes):
    """Force the backward variant of both load paths of this head dim."""
    stack = contextlib.ExitStack()
    for tma in (False, True):
        stack.enter_context(tuning.override("attention_backward_passes", kernels.tile_key(head_dim, tma),
                                            {"PASSES": passes}))
    return stack


def _order(head_dim, order):
    """Force the causal launch order of this head dim's bucket."""
    return tuning.override("attention_causal_order", f"D={head_dim_bucket(head_dim)}", {"ORDER": order})


def _forward(q, k, v, cu, options):
    """Our forward at the launcher: (out, lse, the launchers' call arguments)."""
    varlen = cu is not None
    lengths = (cu[1:] - cu[:-1]) if varlen else None
    max_q = int(lengths.max()) if varlen else q.shape[1]
    max_k = int(lengths.max()) if varlen else k.shape[1]
    heads = q.shape[-2]
    out = torch.empty_like(q)
    lse = torch.empty((heads, q.shape[0]) if varlen else (q.shape[0], heads, q.shape[1]), device=q.device)
    call = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_q, max_seqlen_k=max_k,
                softmax_scale=q.shape[-1] ** -0.5, **{"causal": False, "window_size": (-1, -1), "softcap": 0.0,
                                                      **options})
    kernels.forward(q, k, v, out, lse, **call)
    return out, lse, call


def _backward(dout, q, k, v, out, lse, call, passes, deterministic=False):
    """Our backward in the given variant, at the launcher: (dq, dk, dv)."""
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))  # every element must be written
    with _passes(q.shape[-1], passes):
        kernels.backward(dout, q, k, v, out, lse, None, dq, dk, dv, **call, deterministic=deterministic)
    return dq, dk, dv


def _check_one_pass(q, k, v, cu=None, **options):
    """The one-pass backward against the reference (fp64 exact, plain PyTorch at the inputs' dtype),
    through our forward, by flash-attn's tolerance rule."""
    dout = torch.randn_like(q)
    out, lse, call = _forward(q, k, v, cu, options)
    grads = _backward(dout, q, k, v, out, lse, call, 1)
    ref_options = dict(options, cu_seqlens_q=cu, cu_seqlens_k=cu) if cu is not None else options
    assert_matches_reference(q, k, v, dout, out, grads, **ref_options)


# (seqlen_q, seqlen_k, head_dim, heads, kv_heads, causal): lengths 1 / 113 / 203, head dims 40 / 59 /
# 80 (masked loads) and 64 (TMA-fed Q and dO), Sq != Sk both ways, GQA 2:1 and 28:4. One sequence
# each (the packed tests below take several): the interpreter's time grows with the grid.
DENSE_CASES = [
    (1, 1, 40, 2, 1, False),
    (113, 113, 59, 2, 1, True),
    (203, 203, 80, 1, 1, False),
    (17, 113, 64, 2, 1, True),  # queries at the end of a longer key range
    (113, 17, 40, 2, 1, True),  # more queries than keys: the first rows see no key
    (5, 7, 40, 28, 4, True),  # the LLM's GQA 28 / 4, tiny lengths
]
if ON_GPU:
    DENSE_CASES += [(1000, 1000, 128, 28, 4, True), (4096, 4096, 128, 8, 1, True)]


@pytest.mark.parametrize("dtype", PRECISIONS, ids=str)
@pytest.mark.parametrize("seqlen_q, seqlen_k, head_dim, heads, kv_heads, causal", DENSE_CASES, ids=str)
def test_one_pass_dense_matches_reference(dtype, seqlen_q, seqlen_k, head_dim, heads, kv_heads, causal, device):
    _check_one_pass(*random_qkv(1, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, device), causal=causal)


@pytest.mark.parametrize("head_dim, options", [
    (64, dict(causal=True, window_size=(8, -1))),
    (64, dict(window_size=(5, 3))),
    (64, dict(causal=True, softcap=5.0, alibi_slopes="per-head")),
    (64, dict(causal=True, window_size=(20, 0), softcap=5.0, alibi_slopes="per-batch", dropout_p=0.2)),
    (59, dict(window_size=(9, 4), softcap=5.0, alibi_slopes="per-head", dropout_p=0.3)),
], ids=["causal_window", "window", "softcap_alibi", "all_options", "all_options_masked_dims"])
def test_one_pass_with_every_option(head_dim, options, device):
    q, k, v = random_qkv(2, 37, 37, 2, 1, head_dim, torch.float16, device)
    _check_one_pass(q, k, v, **_concrete(options, 2, 2, device))


def _concrete(options, batch, heads, device):
    """Options with ALiBi slopes and the dropout seed as tensors."""
    options = dict(options)
    if "alibi_slopes" in options:
        shape = (heads,) if options["alibi_slopes"] == "per-head" else (batch, heads)
        options["alibi_slopes"] = torch.rand(shape, device=device) * 0.5 + 0.05
    if options.get("dropout_p", 0) > 0:
        options["dropout_seed"] = torch.tensor([20261130], device=device)
    return options


@pytest.mark.parametrize("dtype, head_dim, lengths, options", [
    (torch.float16, 59, [0, 113, 1, 0, 37], dict(causal=True)),
    (torch.float16, 64, [0, 45, 1, 0, 30], dict(causal=True, window_size=(30, 2), softcap=5.0,
                                                 alibi_slopes="per-batch", dropout_p=0.25)),
    pytest.param(torch.float32, 40, [0, 23, 1, 0, 17], dict(causal=True, window_size=(12, -1), softcap=5.0,
                                                            alibi_slopes="per-head", dropout_p=0.25), marks=CPU_ONLY),
], ids=["fp16-causal", "fp16-all_options", "fp32-all_options"])
def test_one_pass_packed_with_empty_sequences(dtype, head_dim, lengths, options, device):
    """Empty sequences (no query adds to a neighbour's dQ rows), length 1 and tail blocks."""
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total = sum(lengths)
    q = torch.randn(total, 4, head_dim, device=device).to(dtype)
    k, v = (torch.randn(total, 2, head_dim, device=device).to(dtype) for _ in range(2))
    _check_one_pass(q, k, v, cu, **_concrete(options, len(lengths), 4, device))


@CPU_ONLY
def test_one_pass_in_fp32_computes_in_fp32(device):
    """fp32 inputs: the kernels' fp32 products and the fp32 dQ sum, against fp64."""
    _check_one_pass(*random_qkv(1, 113, 113, 2, 1, 40, torch.float32, device), causal=True)


def _launched(monkeypatch):
    """The tunable kernels each backward launches, in order."""
    names = []
    original = launch._launch_tiles

    def spy(kernel, *args):
        names.append(kernel)
        return original(kernel, *args)

    monkeypatch.setattr(launch, "_launch_tiles", spy)
    return names


@pytest.mark.backends("triton")
def test_the_public_call_takes_one_pass_only_when_allowed(backend, device, monkeypatch):
    """Through flash_attn_func: deterministic=False takes the variant the table (here an override)
    chose; deterministic=True keeps the two kernels, bitwise reproducible, whatever the table says."""
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 50, 50, 4, 2, 64, PRECISIONS[-1], device))
    dout = torch.randn_like(q)

    def grads(deterministic):
        out = docqa_fast.flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
        return torch.autograd.grad(out, (q, k, v), dout)

    launched = _launched(monkeypatch)
    with _passes(64, 1):
        one_pass = grads(False)
        one_pass_names = list(launched)
        launched.clear()
        first, second = grads(True), grads(True)
    assert "attention_backward_fused" in one_pass_names
    assert not {"attention_backward_dkdv", "attention_backward_dq"} & set(one_pass_names)
    assert set(launched) >= {"attention_backward_dkdv", "attention_backward_dq"}
    assert "attention_backward_fused" not in launched
    for a, b, c in zip(first, second, one_pass):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, atol=4e-3, rtol=4e-3)


def test_the_default_is_two_passes(device, monkeypatch):
    """No table entry: the measured-fastest backward of today (two passes) runs."""
    monkeypatch.setenv(tuning.TABLE_ENV, "off")
    assert launch.backward_passes(128, True, device, False) == 2
    assert launch.backward_passes(80, False, device, False) == 2


def test_a_tuned_table_chooses_the_variant(device, monkeypatch, tmp_path):
    """A table's attention_backward_passes entry (what `make gpu` writes) picks one pass for its key
    and only for calls that allow it; its attention_backward_fused tiles are accepted."""
    table = {"format": tuning.FORMAT, "kernels": {
        "attention_backward_passes": {"D=64,tma": {"tiles": {"PASSES": 1}}},
        "attention_backward_fused": {"D=64,tma": {"tiles": {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4,
                                                            "num_stages": 1}}},
    }}
    path = tmp_path / "sm90-triton3.6.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    tuning.reload()
    try:
        assert launch.backward_passes(64, True, device, False) == 1
        assert launch.backward_passes(64, True, device, True) == 2
        assert launch.backward_passes(64, False, device, False) == 2  # another key: the default
        tiles = tuning.lookup("attention_backward_fused", "D=64,tma", launch.default_tiles(
            "attention_backward_fused", 64, True), device)
        assert tiles == {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
        # The table's tiles and variant in a real call.
        q, k, v = random_qkv(1, 40, 40, 2, 1, 64, torch.float16, device)
        launched = _launched(monkeypatch)
        _check_one_pass(q, k, v, causal=True)
        assert "attention_backward_fused" in launched
    finally:
        monkeypatch.delenv(tuning.TABLE_ENV)
        tuning.reload()


@pytest.mark.parametrize("passes", [0, 3])
def test_an_unknown_variant_is_a_clear_error(passes, device):
    q, k, v = random_qkv(1, 8, 8, 2, 1, 40, torch.float16, device)
    out, lse, call = _forward(q, k, v, None, {})
    with pytest.raises(ValueError, match="PASSES"):
        _backward(torch.randn_like(q), q, k, v, out, lse, call, passes)


# ------------------------------------------------------------------ the causal launch order

@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_longest_first_across_heads_changes_no_bit(layout, device):
    """ORDER=2 (grid (head, sequence, block)) runs each program's work unchanged, only launched in
    another order: forward and both backward variants give the same bits as ORDER=1 (but the
    one-pass dQ on a GPU, summed by atomics), dropout's per-(sequence, head) pattern and ALiBi's
    per-head slope included."""
    head_dim = 64 if layout == "dense" else 59
    if layout == "dense":
        cu = None
        q, k, v = random_qkv(2, 45, 45, 4, 2, head_dim, torch.float16, device)
    else:
        lengths = [0, 45, 1, 0, 30]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        q = torch.randn(sum(lengths), 4, head_dim, device=device).half()
        k, v = (torch.randn(sum(lengths), 2, head_dim, device=device).half() for _ in range(2))
    batch = 2 if cu is None else 5
    options = _concrete(dict(causal=True, alibi_slopes="per-batch", dropout_p=0.2), batch, 4, device)
    dout = torch.randn_like(q)
    results = {}
    for order in (1, 2):
        with _order(head_dim, order):
            out, lse, call = _forward(q, k, v, cu, options)
            results[order] = (out, lse, *_backward(dout, q, k, v, out, lse, call, 2),
                              *_backward(dout, q, k, v, out, lse, call, 1))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dq 1-pass", "dk 1-pass", "dv 1-pass"), *results.values()):
        if name == "dq 1-pass" and ON_GPU:  # atomics: fp32 sums in the order the GPU ran them, then rounded
            torch.testing.assert_close(a, b, atol=1e-5, rtol=2 ** -9)
        else:
            assert torch.equal(a, b), name


def test_the_causal_order_default_and_its_bounds(device, monkeypatch):
    monkeypatch.setenv(tuning.TABLE_ENV, "off")
    assert kernels.causal_order(128, True, device) == 1  # today's order until a GPU measures the other
    with _order(128, 2):
        assert kernels.causal_order(128, True, device) == 2
        assert kernels.causal_order(128, False, device) == 1  # equal blocks: the order is moot
    with _order(80, 3), pytest.raises(ValueError, match="ORDER"):
        kernels.causal_order(80, True, device)
    assert launch._grid(10, 2, 28, 2) == ((28, 2, 10), True)
    assert launch._grid(70_000, 2, 28, 2) == ((70_000, 2, 28), False)  # past the z axis: blocks stay on x
    assert launch._grid(10, 2, 28, 1) == ((10, 2, 28), False)


def test_the_one_pass_kernel_is_registered_for_the_hopper_check():
    """Its configs (ATOMIC_DQ on, fp32 dQ buffer) join the sm_90 compile check; the two-pass dK/dV
    configs keep ATOMIC_DQ off."""
    configs = {c.name: c for c in registered_configs()}
    fused = [c for name, c in configs.items() if name.startswith("attention_backward_fused[")]
    assert {c.constexprs["HEAD_DIM"] for c in fused} == set(HEAD_DIMS)
    assert all(c.constexprs["ATOMIC_DQ"] and c.signature["dq_ptr"] == "*fp32" for c in fused)
    assert any(c.uses_tma for c in fused) and any(not c.uses_tma for c in fused)
    dkdv = [c for name, c in configs.items() if name.startswith("attention_backward_dkdv[")]
    assert dkdv and not any(c.constexprs["ATOMIC_DQ"] for c in dkdv)


# ------------------------------------------------ explain_attention reports the launcher's choices

def _launched_orders(monkeypatch):
    """Whether each training-kernel launch put its blocks last (BLOCKS_LAST), in order."""
    blocks_last = []
    original = launch._grid

    def spy(*args):
        grid, last = original(*args)
        blocks_last.append(last)
        return grid, last

    monkeypatch.setattr(launch, "_grid", spy)
    return blocks_last


@contextlib.contextmanager
def _torch_deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.backends("triton")
@pytest.mark.parametrize(("passes", "order", "determinism"), [
    (1, 2, None), (2, 1, None), (1, 1, "deterministic=True"), (1, 2, "torch.use_deterministic_algorithms"),
])
def test_explain_attention_names_the_backward_variant_and_causal_order_the_launcher_takes(
        backend, passes, order, determinism, device, monkeypatch):
    """What explain_attention says the Triton kernels will do (one or two backward passes, the
    causal launch order) is what they then do for the same call, under a table choice
    (here an override), deterministic=True and torch's deterministic switch."""
    head_dim = 16
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 12, 12, 2, 1, head_dim, torch.float16, device))
    deterministic = determinism == "deterministic=True"
    launched, blocks_last = _launched(monkeypatch), _launched_orders(monkeypatch)
    switch = _torch_deterministic() if determinism == "torch.use_deterministic_algorithms" else contextlib.nullcontext()
    with _passes(head_dim, passes), _order(head_dim, order), switch:
        explained = docqa_fast.explain_attention(q, k, v, causal=True, deterministic=deterministic)
        out = docqa_fast.flash_attn_func(q, k, v, causal=True, deterministic=deterministic)
        out.float().sum().backward()
    expected_passes = 1 if passes == 1 and determinism is None else 2
    assert explained.backward_passes.value == expected_passes
    assert ("attention_backward_fused" in launched) == (expected_passes == 1)
    assert ("attention_backward_dq" in launched) == (expected_passes == 2)
    if determinism:
        assert determinism in explained.backward_passes.why
    else:
        assert "attention_backward_passes[D=" in explained.backward_passes.why
    assert explained.causal_order.value == order
    assert blocks_last and set(blocks_last) == {order == 2}  # forward and backward kernels alike
    text = str(explained)
    assert "triton backward: " + ("one pass" if expected_passes == 1 else "two passes") in text
    assert f"triton causal launch order: ORDER {order}" in text


def test_explain_attention_reports_launch_choices_only_where_our_kernels_run(device, monkeypatch):
    """The reference (CPU tensors by default) has no launch choices; a call without a causal
    mask has no launch order to report, but its backward variant."""
    q, k, v = random_qkv(1, 9, 9, 2, 1, 16, torch.float16, device)
    if not ON_GPU:
        explained = docqa_fast.explain_attention(q, k, v, causal=True)
        assert explained.backward.backend == "reference"
        assert explained.backward_passes is None and explained.causal_order is None
        assert "triton" not in str(explained).split("\n")[-1]
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    explained = docqa_fast.explain_attention(q, k, v)
    assert explained.backward_passes.value in (1, 2) and explained.causal_order is None

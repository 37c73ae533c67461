"""The cuDNN route of the training attention ops: when torch's cuDNN attention may compute a call
(never changing an answer), DOCQA_FAST_ATTENTION, explain_attention, and the tuned table's
dispatch rules putting cuDNN first.

cuDNN cannot run here: on CPU, torch's two cuDNN ops are replaced by an emulation that takes and
returns cuDNN's layouts (the reference's math in (B, H, S, D) views, the LSE as (B, H, S, 1)), and
the route is declared runnable on CPU tensors, so everything of ours around the two ops -- layouts,
the LSE handed over, the dispatch -- runs for real. On a GPU the last tests run the real cuDNN
against the reference by the tolerance rule.
"""

import dataclasses
import re

import pytest
import torch

import docqa_fast
from docqa_fast.attention import ops
from docqa_fast.reference.attention import attention_backward_ref, attention_ref
from docqa_fast.testing import tuned_tables

from test_dispatch_rules import write_dispatch_table  # tests/ is on sys.path (pytest's rootdir insertion)

from .test_attention import assert_matches_reference, check_attention, random_qkv

ON_GPU = torch.cuda.is_available()
GPU = torch.device("cuda")  # a decision needs only the device type


@pytest.fixture(autouse=True)
def _settings(monkeypatch):
    """Every test starts from the default dispatch: nothing forced, no tuned table."""
    for name in ("DOCQA_FAST_BACKEND", "DOCQA_FAST_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    with tuned_tables(monkeypatch, "off"):
        yield


# ------------------------------------------------------------------ cuDNN emulated on CPU

def _emulated_forward(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False,
                      return_debug_mask=False, *, scale=None):
    """torch's _scaled_dot_product_cudnn_attention as far as the route uses it: (B, H, S, D) in,
    out laid out like the query, the LSE (B, H, S, 1) fp32. Its causal mask is top-left, which
    the route must only ask for when seqlen_q == seqlen_k."""
    assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0 and not return_debug_mask
    assert not is_causal or query.shape[2] == key.shape[2], "a top-left causal mask asked for a non-square call"
    out, lse = attention_ref(*(t.transpose(1, 2) for t in (query, key, value)), softmax_scale=scale, causal=is_causal)
    unused = torch.zeros((), dtype=torch.int64, device=query.device)
    return out.transpose(1, 2), lse.unsqueeze(-1), None, None, query.shape[2], key.shape[2], unused, unused, None


def _emulated_backward(grad_out, query, key, value, out, logsumexp, philox_seed, philox_offset, attn_bias, cum_seq_q,
                       cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale=None):
    """torch's _scaled_dot_product_cudnn_attention_backward: reads the LSE it is given, in cuDNN's shape."""
    assert logsumexp.shape == (*query.shape[:3], 1) and logsumexp.dtype == torch.float32
    assert attn_bias is None and cum_seq_q is None and dropout_p == 0.0 and (max_q, max_k) == (query.shape[2],
                                                                                              key.shape[2])
    grads = attention_backward_ref(*(t.transpose(1, 2) for t in (grad_out, query, key, value, out)),
                                   logsumexp[..., 0], softmax_scale=scale, causal=is_causal)
    return tuple(g.transpose(1, 2) for g in grads)


def _runnable_on_cpu(op):
    # The cuDNN route answered available and made a CPU path, and so is Triton (the interpreter),
    # so that the order -- registered or tuned -- decides between them as on a GPU.
    return dataclasses.replace(op, implementations=tuple(
        dataclasses.replace(i, available=lambda device: None, cpu=True) if i.backend == "cudnn"
        else dataclasses.replace(i, cpu=True) if i.backend == "triton" else i for i in op.implementations))


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    monkeypatch.setattr(ops, "_cudnn_kernels", lambda: (_emulated_forward, _emulated_backward))
    for name in ("ATTENTION_FORWARD", "ATTENTION_BACKWARD"):
        monkeypatch.setattr(ops, name, _runnable_on_cpu(getattr(ops, name)))


def _ran(call):
    with docqa_fast.dispatch_log() as log:
        result = call()
    return result, [(op, backend) for op, backend, _ in log]


# ------------------------------------------------------------------------- eligibility

@pytest.mark.parametrize("make, reason", [
    (lambda: (random_qkv(dtype=torch.float32), {}), "cuDNN attention takes fp16/bf16, got torch.float32"),
    (lambda: (random_qkv(), {"window_size": (8, 0)}), "a sliding window"),
    (lambda: (random_qkv(), {"softcap": 20.0}), "softcap"),
    (lambda: (random_qkv(), {"alibi_slopes": torch.rand(4)}), "ALiBi"),
    (lambda: (random_qkv(), {"dropout_p": 0.1}), "dropout (the pattern must be docqa_fast's Philox draw"),
    (lambda: (random_qkv(), {"deterministic": True}), "deterministic=True (cuDNN's backward is not guaranteed"),
    (lambda: (random_qkv(head_dim=100), {}), "head dim 100 (cuDNN here: multiples of 8 up to 128)"),
    (lambda: (random_qkv(head_dim=192), {}), "head dim 192"),
    (lambda: (random_qkv(seqlen_q=16), {"causal": True}),
     "causal with seqlen_q != seqlen_k (cuDNN aligns the mask top-left"),
    (lambda: (random_qkv(seqlen_q=1, seqlen_k=1), {}), "cuDNN needs a query and two keys"),
    # Everything it computes exactly: then only the machine keeps it out here.
    (lambda: (random_qkv(seqlen_q=16), {}), "runs on CUDA tensors only"),
    (lambda: (random_qkv(), {"causal": True}), "runs on CUDA tensors only"),
    (lambda: (random_qkv(head_dim=8, kv_heads=1), {"window_size": (100, 100)}),  # a no-op window
     "runs on CUDA tensors only"),
], ids=["fp32", "window", "softcap", "alibi", "dropout", "deterministic", "head-dim-100", "head-dim-192",
        "causal-non-square", "one-key", "eligible", "eligible-causal", "eligible-wide-window"])
def test_forcing_cudnn_on_a_call_it_does_not_compute_exactly_says_why(make, reason, monkeypatch):
    (q, k, v), options = make()
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "cudnn")
    with pytest.raises(RuntimeError, match=re.escape(f"DOCQA_FAST_ATTENTION=cudnn cannot run attention_forward on "
                                                      f"cpu tensors: ") + ".*" + re.escape(reason)):
        docqa_fast.flash_attn_func(q, k, v, **options)


def test_varlen_and_the_lse_gradient_stay_off_cudnn():
    q, k, v = (t[0] for t in random_qkv())
    cu = torch.tensor([0, 20, 48], dtype=torch.int32)
    varlen = docqa_fast.explain_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=28, max_seqlen_k=28)
    assert dict(varlen.forward.others)["cudnn"].startswith("packed (varlen) sequences")
    dense = docqa_fast.explain_attention(*random_qkv(), causal=True)
    assert dict(dense.backward_with_lse_grad.others)["cudnn"].startswith("a gradient to the LSE (ring / split-KV")


def test_the_machine_rules(monkeypatch):
    """Where cuDNN cannot run whatever the call: not CUDA tensors, no CUDA device, and (on a GPU)
    the switches a torch user already has."""
    assert ops.cudnn_unavailable_reason(torch.device("cpu")) == "torch's cuDNN attention runs on CUDA tensors only"
    # torch's own bar (before the GPU is asked anything): below cuDNN 9.15.1 it does not prefer cuDNN.
    with monkeypatch.context() as old_cudnn:
        old_cudnn.setattr(torch.backends.cudnn, "is_available", lambda: True)
        old_cudnn.setattr(torch.backends.cudnn, "version", lambda: 91500)
        assert ops._cudnn_machine_reason.__wrapped__(0).startswith("cuDNN 9.15.0 is older than 9.15.1")
    if not ON_GPU:
        assert ops.cudnn_unavailable_reason(GPU) == "no CUDA device here"
        return
    if ops.cudnn_unavailable_reason(GPU):
        pytest.skip(f"cuDNN attention unavailable: {ops.cudnn_unavailable_reason(GPU)}")
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    assert "cudnn.enabled is False" in ops.cudnn_unavailable_reason(GPU)
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)
    assert "enable_cudnn_sdp(False)" in ops.cudnn_unavailable_reason(GPU)


# ------------------------------------------------------------------------- the override

def test_the_override_is_read_on_every_call_and_checked(monkeypatch):
    q, k, v = random_qkv(dtype=torch.float32)
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "flash")
    with pytest.raises(ValueError, match=re.escape("DOCQA_FAST_ATTENTION='flash' is not one of triton, cudnn or "
                                                   "'auto'")):
        docqa_fast.flash_attn_func(q, k, v)
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "auto")
    _, ran = _ran(lambda: docqa_fast.flash_attn_func(q, k, v))
    assert ran == [("attention_forward", "reference")]


def test_the_override_and_docqa_fast_backend_must_agree(monkeypatch):
    q, k, v = random_qkv()
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "reference")
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="DOCQA_FAST_BACKEND=reference and DOCQA_FAST_ATTENTION=cudnn ask for "
                                         "different implementations of attention_forward"):
        docqa_fast.flash_attn_func(q, k, v)
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "auto")  # auto leaves DOCQA_FAST_BACKEND in charge
    _, ran = _ran(lambda: docqa_fast.flash_attn_func(q, k, v))
    assert ran == [("attention_forward", "reference")]


@pytest.mark.parametrize("setting", ["extension", "cuda"])  # "cuda": the extension's old name
def test_forcing_the_extension_which_has_no_attention_says_what_runs_it(setting, monkeypatch, device):
    """The extension has no training-attention kernel. As for every op that lacks the backend
    DOCQA_FAST_BACKEND forces, the call raises one RuntimeError (never a switch to another
    backend), naming the variable and the values that run the op; explain_attention says the same."""
    q, k, v = random_qkv(dtype=torch.float32)
    monkeypatch.setenv("DOCQA_FAST_BACKEND", setting)
    expected = ("DOCQA_FAST_BACKEND=extension: attention_forward has no extension implementation (it has: triton, "
                "cudnn, reference); DOCQA_FAST_BACKEND=triton|reference|auto runs it")
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        docqa_fast.flash_attn_func(q, k, v)
    cu = torch.tensor([0, q.shape[1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        docqa_fast.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, q.shape[1], q.shape[1])
    explained = docqa_fast.explain_attention(q, k, v)
    assert (explained.forward.backend, explained.forward.why) == ("error", expected)
    assert explained.backward.why == expected.replace("attention_forward", "attention_backward")
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")  # what the message offers runs it
    q, k, v = random_qkv(1, 8, 8, 2, 1, 16, device=device)
    _, ran = _ran(lambda: docqa_fast.flash_attn_func(q, k, v))
    assert ran == [("attention_forward", "triton")]


def test_forcing_triton_runs_our_kernels(monkeypatch, device):
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "triton")
    q, k, v = random_qkv(seqlen_q=20, seqlen_k=20, device=device)
    with docqa_fast.dispatch_log() as log:
        check_attention(q, k, v, causal=True)
    assert {(op, backend) for op, backend, _ in log} == {("attention_forward", "triton"),
                                                       ("attention_backward", "triton")}
    assert log[0][2] == "forced by DOCQA_FAST_ATTENTION=triton"


def test_the_override_is_the_training_attention_ops_only(monkeypatch):
    """Other ops -- the merge, the KV-cache attention -- do not read it."""
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "cudnn")
    out, lse = torch.randn(1, 8, 2, 32), torch.randn(1, 2, 8)
    _, ran = _ran(lambda: docqa_fast.merge_attention_states(out, lse, out, lse))
    assert ran and all(op.startswith("merge_attention") for op, _ in ran)


# ------------------------------------------------------------- the route, emulated on CPU

def test_torchs_cudnn_ops_take_the_arguments_the_route_passes():
    """The real aten ops on meta tensors (their shape functions): the schema accepts our
    positional arguments, and what comes back has our layouts -- out (B, S, H, D) contiguous,
    LSE (B, H, S), gradients shaped like q, k and v (GQA: fewer K/V heads)."""
    q, k, v = random_qkv(batch=2, seqlen_q=40, seqlen_k=40, heads=6, kv_heads=2, head_dim=64, device="meta")
    options = (None, None, 40, 40, 0.125, True, -1, -1, 0.0, None, 0.0, None, False)
    out, lse = ops._forward_cudnn(q, k, v, *options)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (2, 6, 40) and lse.dtype == torch.float32
    grads = ops._backward_cudnn(out, q, k, v, out, lse, None, *options)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape] and all(g.is_contiguous() for g in grads)


@pytest.mark.parametrize("shape, causal", [((2, 48, 48, 4, 2, 64), True), ((1, 37, 21, 3, 1, 32), False),
                                           ((2, 33, 33, 2, 2, 128), False)], ids=str)
def test_the_cudnn_route_computes_what_the_reference_does(cudnn_on_cpu, shape, causal, monkeypatch, device):
    """Forced through the (emulated) cuDNN ops, forward and backward, a call passes the tolerance
    rule against fp64: our layouts, the LSE cuDNN returns and the one we hand its backward."""
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = shape
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "cudnn")
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, device=device)
    with docqa_fast.dispatch_log() as log:
        check_attention(q, k, v, causal=causal)
    assert {(op, backend) for op, backend, _ in log} == {("attention_forward", "cudnn"),
                                                       ("attention_backward", "cudnn")}


@pytest.mark.parametrize("forward, backward", [("cudnn", "triton"), ("triton", "cudnn")])
def test_one_route_backward_of_the_others_forward(cudnn_on_cpu, forward, backward, monkeypatch, device):
    """The two routes' (out, lse) mean the same: either backward differentiates either forward."""
    check_mixed_routes(forward, backward, monkeypatch, device, torch.float16)


def check_mixed_routes(forward, backward, monkeypatch, device, dtype):
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 40, 40, 4, 2, 64, dtype, device))
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", forward)
    out, lse, _ = docqa_fast.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    dout = torch.randn_like(out)
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", backward)
    with docqa_fast.dispatch_log() as log:
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert [(op, b) for op, b, _ in log] == [("attention_backward", backward)]
    assert_matches_reference(q, k, v, dout, out, grads, lse=lse, causal=True)


# ------------------------------------------------------------------ the table's choice

def test_the_default_order_runs_our_kernels_and_a_tuned_rule_puts_cudnn_first(cudnn_on_cpu, tmp_path, monkeypatch,
                                                                                device):
    """No rule: Triton first (no GPU measurement of the cuDNN route yet). A rule for the call's
    shape class -- as the tuning tool writes one from a measurement -- puts cuDNN first, for that
    class only; the answer stays the reference's within the rule either way."""
    q, k, v = random_qkv(seqlen_q=32, seqlen_k=32, device=device)
    _, ran = _ran(lambda: docqa_fast.flash_attn_func(q, k, v, causal=True))
    assert ran == [("attention_forward", "triton")]
    when = {"layout": "dense", "head_dim": 64, "causal": True}
    path = write_dispatch_table(tmp_path, monkeypatch, {"attention_forward": [{"when": when, "order": ["cudnn", "triton"]}],
                                          "attention_backward": [{"when": when, "order": ["cudnn", "triton"]}]})
    with docqa_fast.dispatch_log() as log:
        check_attention(q, k, v, causal=True)
    assert {(op, backend) for op, backend, _ in log} == {("attention_forward", "cudnn"),
                                                       ("attention_backward", "cudnn")}
    assert f"in the order of {path.name} for causal=True, head_dim=64, layout=dense: cudnn, triton" in log[0][2]
    # Another class (not causal; head dim 32) keeps the default order; a call cuDNN does not
    # compute exactly (a window) passes over it to our kernel whatever the rule says.
    for call in (lambda: docqa_fast.flash_attn_func(q, k, v),
                 lambda: docqa_fast.flash_attn_func(q[..., :32], k[..., :32], v[..., :32], causal=True),
                 lambda: docqa_fast.flash_attn_func(q, k, v, causal=True, window_size=(8, 0))):
        assert _ran(call)[1] == [("attention_forward", "triton")]


def test_explain_attention_says_which_route_a_call_takes_and_why(cudnn_on_cpu, tmp_path, monkeypatch, device):
    q, k, v = random_qkv(seqlen_q=32, seqlen_k=32, device=device)
    when = {"layout": "dense", "head_dim": 64, "causal": True}
    write_dispatch_table(tmp_path, monkeypatch, {"attention_forward": [{"when": when, "order": ["cudnn"]}]})
    state = torch.get_rng_state()
    explained = docqa_fast.explain_attention(q, k, v, causal=True)
    assert explained.forward.backend == "cudnn" and "in the order of" in explained.forward.why
    assert dict(explained.forward.others) == {"triton": "could run it; cudnn comes first",
                                              "reference": "could run it; cudnn comes first"}
    assert explained.backward.backend == "triton"  # the table has no backward rule: the default order
    assert explained.backward_with_lse_grad.backend == "triton"
    text = str(explained)
    assert text.splitlines()[0] == f"attention on {device.type} float16: q 2x32x4x64, 2 KV heads, dense, causal"
    assert "  forward: cudnn -- first available and eligible" in text and "    not triton: could run it" in text
    dropout = docqa_fast.explain_attention(q, k, v, 0.1, causal=True)  # nothing runs, no seed is drawn
    assert dropout.forward.backend == "triton" and dict(dropout.forward.others)["cudnn"].startswith("dropout")
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "cudnn")
    forced = docqa_fast.explain_attention(q, k, v)
    assert forced.forward.why == "forced by DOCQA_FAST_ATTENTION=cudnn"
    # What a forced call could not run is the error it would raise, told rather than raised.
    assert forced.backward_with_lse_grad.backend == "error"
    assert forced.backward_with_lse_grad.why.startswith("DOCQA_FAST_ATTENTION=cudnn cannot run attention_backward")


def test_explain_attention_checks_its_arguments_as_a_call_does():
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match=re.escape("expected window_size values >= -1")):
        docqa_fast.explain_attention(q, k, v, window_size=(-2, 0))
    with pytest.raises(TypeError, match="expected deterministic to be a bool, got 'yes'"):
        docqa_fast.explain_attention(q, k, v, deterministic="yes")
    with pytest.raises(TypeError, match="expected deterministic to be a bool"):
        docqa_fast.flash_attn_func(q, k, v, deterministic=None)


# ------------------------------------------------------------------------- on a GPU

def _cudnn_here():
    if not ON_GPU:
        return "needs a CUDA GPU (cuDNN)"
    return ops.cudnn_unavailable_reason(GPU)


@pytest.mark.skipif(_cudnn_here() is not None, reason=f"cuDNN attention cannot run here: {_cudnn_here()}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, causal", [((2, 256, 256, 8, 2, 128), True), ((1, 1000, 1000, 28, 4, 128), True),
                                           ((2, 203, 203, 4, 4, 64), False), ((1, 77, 300, 6, 2, 80), False),
                                           ((1, 129, 129, 4, 1, 32), True)], ids=str)
def test_real_cudnn_matches_the_reference(shape, causal, dtype, device, monkeypatch):
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim = shape
    monkeypatch.setenv("DOCQA_FAST_ATTENTION", "cudnn")
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, device)
    with docqa_fast.dispatch_log() as log:
        check_attention(q, k, v, causal=causal)
    assert {backend for _, backend, _ in log} == {"cudnn"}


@pytest.mark.skipif(_cudnn_here() is not None, reason=f"cuDNN attention cannot run here: {_cudnn_here()}")
@pytest.mark.parametrize("forward, backward", [("cudnn", "triton"), ("triton", "cudnn")])
def test_real_cudnn_and_our_kernels_share_out_and_lse(forward, backward, device, monkeypatch):
    """cuDNN's LSE is flash-attn's (natural log, (B, H, S)): our backward of its forward, and its of ours."""
    check_mixed_routes(forward, backward, monkeypatch, device, torch.bfloat16)

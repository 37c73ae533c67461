"""Bad input to training attention: flash-attn's front ends (dense, varlen, packed), SDPA, and
the ``attention_forward`` / ``attention_backward`` ops called directly."""

from __future__ import annotations

import math

import torch

import docqa_fast as dq
from docqa_fast.flash_attn_interface import flash_attn_varlen_func

from .harness import Case
from .kinds import cases_for, forced, float_tensor_kinds, int_kinds, int_tensor_kinds, narrowed

DT = torch.float16
B, SQ, SK, H, HK, D = 2, 5, 6, 4, 2, 8


def _dense():
    return dict(q=torch.randn(B, SQ, H, D, dtype=DT), k=torch.randn(B, SK, HK, D, dtype=DT),
                v=torch.randn(B, SK, HK, D, dtype=DT))


def _varlen():
    return dict(q=torch.randn(9, H, D, dtype=DT), k=torch.randn(11, HK, D, dtype=DT),
                v=torch.randn(11, HK, D, dtype=DT),
                cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5, 11], dtype=torch.int32), max_seqlen_q=5, max_seqlen_k=6)


def _scalar_kinds() -> list[tuple]:
    """The scalar arguments every flash-attn training front end takes."""
    return [
        ("nan", "softmax_scale", lambda kw: math.nan, ValueError),
        ("inf", "softmax_scale", lambda kw: math.inf, ValueError),
        ("str-for-float", "softmax_scale", lambda kw: "0.3", TypeError),
        ("nan", "softcap", lambda kw: math.nan, ValueError),
        ("negative", "softcap", lambda kw: -1.0, ValueError),
        ("str-for-float", "softcap", lambda kw: "1", TypeError),
        ("float-window", "window_size", lambda kw: (2.5, 0), TypeError),
        ("negative-window", "window_size", lambda kw: (-2, 0), ValueError),
        ("three-window", "window_size", lambda kw: (1, 2, 3), TypeError),
        ("one-or-more", "dropout_p", lambda kw: 1.0, ValueError),
        ("negative", "dropout_p", lambda kw: -0.1, ValueError),
        ("bool-for-float", "dropout_p", lambda kw: True, TypeError),
        ("nan", "dropout_p", lambda kw: math.nan, ValueError),
        ("int-for-bool", "deterministic", lambda kw: 1, TypeError),
        ("dtype", "alibi_slopes", lambda kw: torch.ones(H, dtype=torch.float16), TypeError),
        ("size", "alibi_slopes", lambda kw: torch.ones(H - 1), ValueError),
        ("device-mix", "alibi_slopes", lambda kw: torch.ones(H, device="meta"), ValueError),
        ("probs-with-dropout", "return_attn_probs", lambda kw: kw.update(dropout_p=0.1) or True,
         NotImplementedError, ("return_attn_probs",)),
    ]


def _qkv_kinds(packed_dim: int | None = None) -> list[tuple]:
    return [
        *float_tensor_kinds("q", strided=True), *float_tensor_kinds("k"), *float_tensor_kinds("v", strided=True),
        ("heads-not-multiple", "k", lambda kw: torch.randn(*kw["k"].shape[:-2], 3, D, dtype=DT), ValueError,
         ("q", "k")),
        ("head-dim-mismatch", "k", lambda kw: narrowed(kw["k"], -1), ValueError),
        ("v-shape", "v", lambda kw: narrowed(kw["v"], -3), ValueError),
        ("head-dim-zero", None, lambda kw: kw.update({n: kw[n][..., :0] for n in "qkv"}), ValueError, ("q",)),
        ("head-dim-too-big", None, lambda kw: kw.update({n: torch.zeros(*kw[n].shape[:-1], 264, dtype=DT)
                                                        for n in "qkv"}), ValueError, ("q",)),
    ]


def _dense_cases() -> list[Case]:
    kinds = [*_qkv_kinds(), *_scalar_kinds(),
             ("batch-mismatch", None, lambda kw: kw.update(k=kw["k"][:1], v=kw["v"][:1]), ValueError, ("k",)),
             ("empty-batch", None, lambda kw: kw.update({n: kw[n][:0] for n in "qkv"}), None)]
    return cases_for("flash_attn_func", dq.flash_attn_func, _dense, kinds, op="attention_forward")


def _varlen_cases() -> list[Case]:
    cu = torch.int32
    kinds = [
        *_qkv_kinds(), *_scalar_kinds(),
        *int_tensor_kinds("cu_seqlens_q", cu), *int_tensor_kinds("cu_seqlens_k", cu),
        ("not-monotone", "cu_seqlens_q", lambda kw: torch.tensor([0, 6, 4, 9], dtype=cu), ValueError),
        ("wrong-end", "cu_seqlens_k", lambda kw: torch.tensor([0, 5, 10], dtype=cu), ValueError),
        ("not-at-zero", "cu_seqlens_q", lambda kw: torch.tensor([1, 4, 9], dtype=cu), ValueError),
        ("length-mismatch", "cu_seqlens_k", lambda kw: torch.tensor([0, 11], dtype=cu), ValueError),
        ("empty", "cu_seqlens_q", lambda kw: torch.zeros(0, dtype=cu), ValueError),
        ("too-small", "max_seqlen_q", lambda kw: 3, ValueError),
        ("huge", "max_seqlen_k", lambda kw: 2 ** 40, ValueError),
        ("none", "max_seqlen_q", lambda kw: None, TypeError),
        *int_kinds("max_seqlen_q"), *int_kinds("max_seqlen_k"),
        ("dense-q", "q", lambda kw: kw["q"][None], ValueError),
        ("empty-sequences", None, lambda kw: kw.update(
            cu_seqlens_q=torch.tensor([0, 0, 4, 9, 9], dtype=cu),
            cu_seqlens_k=torch.tensor([0, 3, 3, 11, 11], dtype=cu), max_seqlen_k=8), None),
    ]
    return cases_for("flash_attn_varlen_func", flash_attn_varlen_func, _varlen, kinds, op="attention_forward")


def _packed_cases() -> list[Case]:
    def qkv():
        return dict(qkv=torch.randn(B, SQ, 3, H, D, dtype=DT))

    def kv():
        return dict(q=torch.randn(B, SQ, H, D, dtype=DT), kv=torch.randn(B, SK, 2, HK, D, dtype=DT))

    def vqkv():
        return dict(qkv=torch.randn(9, 3, H, D, dtype=DT), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32),
                    max_seqlen=5)

    def vkv():
        kw = _varlen()
        return dict(q=kw["q"], kv=torch.stack([kw["k"], kw["v"]], 1), cu_seqlens_q=kw["cu_seqlens_q"],
                    cu_seqlens_k=kw["cu_seqlens_k"], max_seqlen_q=5, max_seqlen_k=6)

    # A packed tensor's errors may name the part that is wrong (q, k or v of qkv), as the
    # sequences' do (cu_seqlens_q of cu_seqlens).
    def named(kinds, *also):
        return [(*k[:4], (k[1], *also)) for k in kinds]

    packed = [("two-not-three", "qkv", lambda kw: kw["qkv"].narrow(-3, 0, 2), ValueError),
              *named(float_tensor_kinds("qkv", device_mix=False), "q", "k", "v")]
    out = cases_for("flash_attn_qkvpacked_func", dq.flash_attn_qkvpacked_func, qkv,
                    [*packed, ("rank", "qkv", lambda kw: kw["qkv"][0], ValueError), *_scalar_kinds()])
    out += cases_for("flash_attn_kvpacked_func", dq.flash_attn_kvpacked_func, kv, [
        ("three-not-two", "kv", lambda kw: torch.cat([kw["kv"], kw["kv"][:, :, :1]], 2), ValueError),
        *float_tensor_kinds("q"), *named(float_tensor_kinds("kv", device_mix=False), "k", "v"), *_scalar_kinds()])
    out += cases_for("flash_attn_varlen_qkvpacked_func", dq.flash_attn_varlen_qkvpacked_func, vqkv, [
        *packed, *named(int_tensor_kinds("cu_seqlens", torch.int32), "cu_seqlens_q"),
        *named(int_kinds("max_seqlen"), "max_seqlen_q"), *_scalar_kinds(),
        ("not-monotone", "cu_seqlens", lambda kw: torch.tensor([0, 6, 4, 9], dtype=torch.int32), ValueError,
         ("cu_seqlens_q",))])
    out += cases_for("flash_attn_varlen_kvpacked_func", dq.flash_attn_varlen_kvpacked_func, vkv, [
        *named(float_tensor_kinds("kv", device_mix=False), "k", "v"), *int_tensor_kinds("cu_seqlens_k", torch.int32),
        *int_kinds("max_seqlen_k"), *_scalar_kinds()])
    return out


def _sdpa_cases() -> list[Case]:
    """SDPA keeps torch's contract: what our kernels cannot compute goes to torch's own SDPA, so
    bad input raises what torch raises for it."""
    def valid():
        return dict(query=torch.randn(B, H, SQ, D, dtype=DT), key=torch.randn(B, H, SK, D, dtype=DT),
                    value=torch.randn(B, H, SK, D, dtype=DT))

    def like_torch(make):
        def call():
            kw = valid()
            make(kw)
            try:
                torch.nn.functional.scaled_dot_product_attention(**kw)
            except Exception as exc:  # what torch raises is the contract
                expected = type(exc)
            else:
                expected = None
            try:
                dq.scaled_dot_product_attention(**kw)
            except Exception as exc:
                assert expected is not None and isinstance(exc, expected), f"torch: {expected}, ours: {exc!r}"
                return
            assert expected is None, f"torch raised {expected.__name__}, ours returned"

        return call

    edits = {"dtype": lambda kw: kw.update(key=kw["key"].double()),
             "rank": lambda kw: kw.update(query=kw["query"][0, 0]),
             "head-dim": lambda kw: kw.update(key=kw["key"][..., :7]),
             "heads": lambda kw: kw.update(key=kw["key"][:, :3], value=kw["value"][:, :3]),
             "list": lambda kw: kw.update(value=kw["value"].tolist()),
             "none": lambda kw: kw.update(query=None),
             "int-for-float": lambda kw: kw.update(query=kw["query"].int()),
             "batch": lambda kw: kw.update(key=kw["key"][:1], value=kw["value"][:1]),
             "value-length": lambda kw: kw.update(value=kw["value"][:, :, :3]),
             "mask-shape": lambda kw: kw.update(attn_mask=torch.zeros(3, 3, dtype=torch.bool))}
    return [Case(f"scaled_dot_product_attention/{kind}/like-torch", like_torch(edit), kind=kind)
            for kind, edit in edits.items()]


# ---------------------------------------------------------------- the registered ops, directly

def _op_forward():
    kw = _varlen()
    return dict(q=kw["q"], k=kw["k"], v=kw["v"], cu_seqlens_q=kw["cu_seqlens_q"], cu_seqlens_k=kw["cu_seqlens_k"],
                max_seqlen_q=5, max_seqlen_k=6, softmax_scale=0.3, causal=False, window_left=-1, window_right=-1,
                softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None)


def _op_forward_dense():
    kw = _dense()
    return dict(_op_forward(), q=kw["q"], k=kw["k"], v=kw["v"], cu_seqlens_q=None, cu_seqlens_k=None,
                max_seqlen_q=SQ, max_seqlen_k=SK)


def _op_backward():
    kw = _op_forward_dense()
    with forced("reference"):
        out, lse = torch.ops.docqa_fast.attention_forward(**kw)
    del kw["dropout_seed"], kw["dropout_p"]
    return dict(kw, dout=torch.randn_like(out), out=out, lse=lse, grad_lse=None, dropout_p=0.0, dropout_seed=None)


def _op_cases() -> list[Case]:
    forward, backward = torch.ops.docqa_fast.attention_forward, torch.ops.docqa_fast.attention_backward
    cu = torch.int32
    kinds = [
        ("dtype", "k", lambda kw: kw["k"].float(), TypeError),
        ("dtype", "q", lambda kw: kw["q"].float(), TypeError),
        ("int-for-float", "v", lambda kw: kw["v"].to(torch.int32), TypeError),
        ("rank", "q", lambda kw: kw["q"][None], ValueError),
        ("head-dim-mismatch", "k", lambda kw: narrowed(kw["k"], -1), ValueError),
        ("heads-not-multiple", "k", lambda kw: torch.randn(11, 3, D, dtype=DT), ValueError, ("q", "k")),
        ("v-shape", "v", lambda kw: narrowed(kw["v"], 0), ValueError),
        ("length-mismatch", "cu_seqlens_k", lambda kw: torch.tensor([0, 11], dtype=cu), ValueError),
        ("int-width", "cu_seqlens_q", lambda kw: kw["cu_seqlens_q"].long(), TypeError),
        ("float-for-int", "cu_seqlens_k", lambda kw: kw["cu_seqlens_k"].float(), TypeError),
        ("one-missing", "cu_seqlens_k", lambda kw: None, ValueError),
        ("rank", "cu_seqlens_q", lambda kw: kw["cu_seqlens_q"][None], ValueError),
        ("strided-last-dim", "q", lambda kw: torch.randn(9, H, D, 2, dtype=DT)[..., 0], ValueError),
        ("negative", "max_seqlen_q", lambda kw: -1, ValueError),
        ("huge", "max_seqlen_k", lambda kw: 2 ** 40, ValueError),
        ("nan", "softmax_scale", lambda kw: math.nan, ValueError),
        ("nan", "softcap", lambda kw: math.nan, ValueError),
        ("negative", "softcap", lambda kw: -1.0, ValueError),
        ("below-minus-one", "window_left", lambda kw: -2, ValueError),
        ("one-or-more", "dropout_p", lambda kw: 1.0, ValueError),
        ("missing-seed", "dropout_seed", lambda kw: kw.update(dropout_p=0.1) or None, TypeError),
        ("size", "alibi_slopes", lambda kw: torch.ones(3), ValueError),
    ]
    out = cases_for("op:attention_forward", forward, _op_forward, kinds)
    out += cases_for("op:attention_forward-dense", forward, _op_forward_dense, [
        ("batch-mismatch", None, lambda kw: kw.update(k=kw["k"][:1], v=kw["v"][:1]), ValueError, ("k",)),
        ("dense-with-cu_seqlens", "cu_seqlens_q", lambda kw: torch.tensor([0, 5, 10], dtype=cu), ValueError,
         ("q", "cu_seqlens_q")),
        ("max-seqlen-mismatch", "max_seqlen_q", lambda kw: SQ + 3, ValueError)])
    out += cases_for("op:attention_backward", backward, _op_backward, [
        ("dtype", "dout", lambda kw: kw["dout"].float(), TypeError),
        ("shape", "dout", lambda kw: narrowed(kw["dout"], 1), ValueError),
        ("shape", "out", lambda kw: narrowed(kw["out"], 1), ValueError),
        ("shape", "lse", lambda kw: narrowed(kw["lse"], -1), ValueError),
        ("dtype", "lse", lambda kw: kw["lse"].half(), TypeError),
        ("shape", "grad_lse", lambda kw: narrowed(kw["lse"], -1), ValueError),
        ("dtype", "k", lambda kw: kw["k"].float(), TypeError),
        ("head-dim-mismatch", "k", lambda kw: narrowed(kw["k"], -1), ValueError),
        ("rank", "out", lambda kw: kw["out"][0], ValueError)])
    return out


def cases() -> list[Case]:
    return [*_dense_cases(), *_varlen_cases(), *_packed_cases(), *_sdpa_cases(), *_op_cases()]


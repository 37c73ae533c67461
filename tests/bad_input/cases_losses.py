"""Bad input to the losses: linear_logprobs, linear_cross_entropy, sequence_logprobs, dpo_loss,
longpo_loss, the three modules, the linear_logit_stats ops and linear_cross_entropy_grads (tests/losses/test_bad_input.py
checks the messages in detail; these run every kind on every backend, in a worker)."""

from __future__ import annotations

import math

import torch

import docqa_fast as dq

from .harness import Case
from .kinds import cases_for, float_tensor_kinds, forced, implemented, int_tensor_kinds, narrowed, positive_float_kinds

N, HID, V = 6, 8, 20
DT = torch.float32


def _head():
    return dict(hidden=torch.randn(N, HID, dtype=DT), weight=torch.randn(V, HID, dtype=DT),
                labels=torch.randint(0, V, (N,)))


def _head_kinds() -> list[tuple]:
    return [
        # Any strides, and int32 labels, are taken (copied / widened): no kinds of bad input here.
        *float_tensor_kinds("hidden"), *float_tensor_kinds("weight"),
        *[k for k in int_tensor_kinds("labels", torch.int64) if k[0] != "int-width"],
        ("shape", "weight", lambda kw: narrowed(kw["weight"], 1), ValueError),
        ("shape", "labels", lambda kw: narrowed(kw["labels"], 0), ValueError),
        ("dtype", "bias", lambda kw: torch.zeros(V, dtype=torch.float16), TypeError),
        ("shape", "bias", lambda kw: torch.zeros(V - 1), ValueError),
        ("device-mix", "bias", lambda kw: torch.zeros(V, device="meta"), ValueError),
        ("out-of-range-validated", "labels", lambda kw: kw.update(validate=True) or kw["labels"] + V, ValueError),
        ("float-for-int", "ignore_index", lambda kw: -100.0, TypeError),
        ("bool-for-int", "ignore_index", lambda kw: True, TypeError),
        ("empty-vocabulary", "weight", lambda kw: kw["weight"][:0], ValueError),
    ]


def _logprob_kinds() -> list[tuple]:
    return [*_head_kinds(), *positive_float_kinds("temperature")]


def _ce_kinds() -> list[tuple]:
    return [
        *_head_kinds(),
        ("unknown", "reduction", lambda kw: "avg", ValueError),
        ("none-for-str", "reduction", lambda kw: None, ValueError),
        ("above-one", "label_smoothing", lambda kw: 1.5, ValueError),
        ("nan", "label_smoothing", lambda kw: math.nan, ValueError),
        ("str-for-float", "label_smoothing", lambda kw: "0.1", TypeError),
        ("negative", "z_loss", lambda kw: -1e-4, ValueError),
        ("nan", "z_loss", lambda kw: math.nan, ValueError),
        ("inf", "z_loss", lambda kw: math.inf, ValueError),
        ("zero-tokens", None, lambda kw: kw.update(hidden=kw["hidden"][:0], labels=kw["labels"][:0]), None),
        ("all-ignored", "labels", lambda kw: torch.full((N,), -100), None),
    ]


def _sequence():
    return dict(_head(), cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32))


def _sequence_kinds() -> list[tuple]:
    return [
        *_logprob_kinds(),
        *[k for k in int_tensor_kinds("cu_seqlens", torch.int32, optional=True) if k[0] != "int-width"],
        ("not-monotone", "cu_seqlens", lambda kw: torch.tensor([0, 4, 2, 6], dtype=torch.int32), ValueError),
        ("wrong-end", "cu_seqlens", lambda kw: torch.tensor([0, 2, 5], dtype=torch.int32), ValueError),
        ("with-mask", "attention_mask", lambda kw: torch.ones(N), ValueError, ("attention_mask", "cu_seqlens")),
        ("empty-sequence", "cu_seqlens", lambda kw: torch.tensor([0, 2, 2, 6], dtype=torch.int32), None),
    ]


def _pair():
    return dict(policy_chosen_logps=torch.randn(4), policy_rejected_logps=torch.randn(4),
                ref_chosen_logps=torch.randn(4), ref_rejected_logps=torch.randn(4))


def _pair_tensor_kinds() -> list[tuple]:
    out = []
    for name in ("policy_chosen_logps", "ref_rejected_logps"):
        out += [("shape", name, lambda kw, n=name: narrowed(kw[n], 0), ValueError),
                ("none", name, lambda kw: None, TypeError),
                ("list-for-tensor", name, lambda kw, n=name: kw[n].tolist(), TypeError),
                ("int-for-float", name, lambda kw, n=name: kw[n].int(), TypeError),
                ("device-mix", name, lambda kw, n=name: kw[n].to("meta"), ValueError)]
    return out


def _dpo_kinds() -> list[tuple]:
    return [*_pair_tensor_kinds(), *positive_float_kinds("beta"),
            ("unknown", "loss_type", lambda kw: "kto", ValueError),
            ("above-half", "label_smoothing", lambda kw: 0.7, ValueError),
            ("nan", "label_smoothing", lambda kw: math.nan, ValueError)]


def _longpo():
    return dict(_pair(), chosen_nll=torch.rand(4))


def _longpo_kinds() -> list[tuple]:
    return [*_pair_tensor_kinds(), *positive_float_kinds("beta"),
            ("shape", "chosen_nll", lambda kw: kw["chosen_nll"][:3], ValueError),
            ("none", "chosen_nll", lambda kw: None, TypeError),
            ("negative", "lam", lambda kw: -1.0, ValueError),
            ("nan", "lam", lambda kw: math.nan, ValueError),
            ("inf", "lam", lambda kw: math.inf, ValueError),
            ("str-for-float", "lam", lambda kw: "0.1", TypeError)]


def _module_cases() -> list[Case]:
    """The modules check their settings when built and their inputs when called."""
    def build(cls, **settings):
        return lambda **kw: cls(**settings, **kw)

    out = cases_for("LinearCrossEntropyLoss()", dq.LinearCrossEntropyLoss, dict, [
        ("unknown", "reduction", lambda kw: "avg", ValueError),
        ("above-one", "label_smoothing", lambda kw: 1.5, ValueError),
        ("nan", "z_loss", lambda kw: math.nan, ValueError),
        ("float-for-int", "ignore_index", lambda kw: -100.5, TypeError),
        ("bool-for-int", "ignore_index", lambda kw: True, TypeError),
        ("str-for-float", "label_smoothing", lambda kw: "0.1", TypeError),
        ("negative", "z_loss", lambda kw: -1.0, ValueError),
        ("inf", "z_loss", lambda kw: float("inf"), ValueError),
        ("none-for-str", "reduction", lambda kw: None, ValueError)])
    for cls in (dq.FusedLinearDPOLoss, dq.FusedLinearLongPOLoss):
        out += cases_for(f"{cls.__name__}()", build(cls), dict, [
            *positive_float_kinds("beta"), ("float-for-int", "ignore_index", lambda kw: -100.5, TypeError)])
    out += cases_for("FusedLinearLongPOLoss()", build(dq.FusedLinearLongPOLoss), dict, [
        ("negative", "lam", lambda kw: -1.0, ValueError), ("nan", "lam", lambda kw: math.nan, ValueError)])

    def dpo_call():
        return dict(lm_head_weight=torch.randn(V, HID), hidden_chosen=torch.randn(2, 3, HID),
                    hidden_rejected=torch.randn(2, 3, HID), labels_chosen=torch.randint(0, V, (2, 3)),
                    labels_rejected=torch.randint(0, V, (2, 3)), ref_chosen_logps=torch.randn(2),
                    ref_rejected_logps=torch.randn(2))

    for cls in (dq.FusedLinearDPOLoss, dq.FusedLinearLongPOLoss):
        loss = cls()
        out += cases_for(f"{cls.__name__}.forward", loss, dpo_call, [
            ("shape", "hidden_rejected", lambda kw: kw["hidden_rejected"][:1], ValueError,
             ("hidden_rejected", "labels_rejected", "hidden", "labels")),
            ("dtype", "lm_head_weight", lambda kw: kw["lm_head_weight"].half(), TypeError, ("weight",)),
            ("float-for-int", "labels_chosen", lambda kw: kw["labels_chosen"].float(), TypeError, ("labels",)),
            ("shape", "ref_chosen_logps", lambda kw: kw["ref_chosen_logps"][:1], ValueError,
             ("ref_chosen_logps",))])
    for case in out:  # the reference log-probs are checked with the policy's, once those are computed
        if "ref_chosen_logps" in case.name:
            case.backends = implemented("linear_logit_stats")
    ce = dq.LinearCrossEntropyLoss()
    out += cases_for("LinearCrossEntropyLoss.forward", ce, lambda: dict(
        lm_head_weight=torch.randn(V, HID), hidden=torch.randn(N, HID), labels=torch.randint(0, V, (N,))), [
        ("dtype", "lm_head_weight", lambda kw: kw["lm_head_weight"].half(), TypeError, ("weight",)),
        ("shape", "labels", lambda kw: kw["labels"][:2], ValueError)])
    return out


def _op_cases() -> list[Case]:
    stats = torch.ops.docqa_fast.linear_logit_stats

    def valid():
        kw = _head()
        return dict(hidden=kw["hidden"], weight=kw["weight"], bias=None, labels=kw["labels"], ignore_index=-100,
                    temperature=1.0)

    def backward_valid():
        kw = valid()
        with forced("reference"):
            bound = stats(**kw)[4]
        del kw["temperature"], kw["ignore_index"]
        return dict(kw, lse=torch.zeros(N), coefs=torch.zeros(4, N), bound=bound, ignore_index=-100, temperature=1.0,
                    need_hidden=True, need_weight=True, need_bias=False)

    backward = cases_for("op:linear_logit_stats_backward", torch.ops.docqa_fast.linear_logit_stats_backward,
                         backward_valid, [
                             ("shape", "coefs", lambda kw: kw["coefs"][:3], ValueError),
                             ("dtype", "lse", lambda kw: kw["lse"].half(), TypeError),
                             ("shape", "lse", lambda kw: kw["lse"][:2], ValueError),
                             ("shape", "bound", lambda kw: kw["bound"][:0], ValueError),
                             ("dtype", "bound", lambda kw: kw["bound"].double(), TypeError),
                             ("rank", "hidden", lambda kw: kw["hidden"][None], ValueError)])
    def grads_valid():
        kw = _head()
        return dict(hidden=kw["hidden"], weight=kw["weight"], bias=torch.zeros(V), labels=kw["labels"],
                    ignore_index=-100, label_smoothing=0.0, z_loss=0.0, mean=True, need_hidden=True,
                    need_weight=True, need_bias=True)

    grads = cases_for("op:linear_cross_entropy_grads", torch.ops.docqa_fast.linear_cross_entropy_grads, grads_valid, [
        ("rank", "hidden", lambda kw: kw["hidden"][None], ValueError),
        ("dtype", "weight", lambda kw: kw["weight"].half(), TypeError),
        ("int-width", "labels", lambda kw: kw["labels"].int(), TypeError),
        ("shape", "bias", lambda kw: torch.zeros(V - 1), ValueError),
        ("missing", "bias", lambda kw: None, ValueError, ("need_bias",)),
        ("above-one", "label_smoothing", lambda kw: 1.5, ValueError),
        ("negative", "z_loss", lambda kw: -1.0, ValueError),
        ("nan", "z_loss", lambda kw: math.nan, ValueError)])
    return backward + grads + cases_for("op:linear_logit_stats", stats, valid, [
        ("rank", "hidden", lambda kw: kw["hidden"][None], ValueError),
        ("dtype", "weight", lambda kw: kw["weight"].half(), TypeError),
        ("int-width", "labels", lambda kw: kw["labels"].int(), TypeError),
        ("shape", "labels", lambda kw: kw["labels"][:2], ValueError),
        ("shape", "bias", lambda kw: torch.zeros(V - 1), ValueError),
        ("strided-last-dim", "weight", lambda kw: torch.randn(V, HID, 2)[..., 0], ValueError),
        ("nan", "temperature", lambda kw: math.nan, ValueError),
        ("inf", "temperature", lambda kw: math.inf, ValueError),
        ("negative", "temperature", lambda kw: -1.0, ValueError)])


def cases() -> list[Case]:
    op = "linear_logit_stats"
    out = cases_for("linear_logprobs", dq.linear_logprobs, _head, _logprob_kinds(), op=op)
    out += cases_for("linear_cross_entropy", dq.linear_cross_entropy, _head, _ce_kinds(), op=op)
    out += cases_for("sequence_logprobs", dq.sequence_logprobs, _sequence, _sequence_kinds(), op=op)
    out += cases_for("dpo_loss", dq.dpo_loss, _pair, _dpo_kinds())
    out += cases_for("longpo_loss", dq.longpo_loss, _longpo, _longpo_kinds())
    return out + _module_cases() + _op_cases()


"""Bad input to merge_attention_states / merge_stacked_attention_states and their ops."""

from __future__ import annotations

import torch

import docqa_fast as dq

from .harness import Case
from .kinds import cases_for, float_tensor_kinds, narrowed

B, S, H, D = 2, 3, 4, 8


def _pair():
    return dict(out_a=torch.randn(B, S, H, D, dtype=torch.float16), lse_a=torch.randn(B, H, S),
                out_b=torch.randn(B, S, H, D, dtype=torch.float16), lse_b=torch.randn(B, H, S))


def _stacked():
    return dict(outs=torch.randn(3, B, S, H, D, dtype=torch.float16), lses=torch.randn(3, B, H, S))


def _pair_kinds() -> list[tuple]:
    return [
        *float_tensor_kinds("out_a", strided=True), *float_tensor_kinds("out_b", strided=True),
        ("dtype", "lse_a", lambda kw: kw["lse_a"].half(), TypeError),
        ("dtype", "lse_b", lambda kw: kw["lse_b"].double(), TypeError),
        ("int-for-float", "lse_b", lambda kw: kw["lse_b"].int(), TypeError),
        ("list-for-tensor", "lse_a", lambda kw: kw["lse_a"].tolist(), TypeError),
        ("none", "lse_b", lambda kw: None, TypeError),
        ("shape", "lse_a", lambda kw: narrowed(kw["lse_a"], -1), ValueError),
        ("transposed-layout", "lse_b", lambda kw: kw["lse_b"].transpose(1, 2).contiguous(), ValueError),
        ("shape", "out_b", lambda kw: narrowed(kw["out_b"], 1), ValueError),
        ("dtype-mismatch", "out_b", lambda kw: kw["out_b"].float(), TypeError),
        ("device-mix", "lse_b", lambda kw: kw["lse_b"].to("meta"), ValueError),
        ("head-dim-zero", None, lambda kw: kw.update(out_a=kw["out_a"][..., :0], out_b=kw["out_b"][..., :0]),
         ValueError, ("out_a",)),
        ("rank", None, lambda kw: kw.update(out_a=kw["out_a"][0, 0], out_b=kw["out_b"][0, 0]), ValueError,
         ("out_a",)),
    ]


def _stacked_kinds() -> list[tuple]:
    return [
        *float_tensor_kinds("outs", strided=True, device_mix=False),
        ("dtype", "lses", lambda kw: kw["lses"].half(), TypeError),
        ("none", "lses", lambda kw: None, TypeError),
        ("shape", "lses", lambda kw: narrowed(kw["lses"], 0), ValueError),
        ("shape", "lses", lambda kw: narrowed(kw["lses"], -1), ValueError),
        ("device-mix", "lses", lambda kw: kw["lses"].to("meta"), ValueError),
        ("no-parts", None, lambda kw: kw.update(outs=kw["outs"][:0], lses=kw["lses"][:0]), ValueError, ("outs",)),
        ("rank", None, lambda kw: kw.update(outs=kw["outs"][0, 0, 0], lses=kw["lses"][0, 0]), ValueError,
         ("outs",)),
        ("list-for-tensor", "lses", lambda kw: kw["lses"].tolist(), TypeError),
    ]


def _empty_rows_valid(stacked: bool):
    """Edge values that must merge, not fail: -inf LSEs (a part that saw no key), an empty sequence."""
    def call():
        if stacked:
            kw = _stacked()
            kw["lses"][:, :, :, 0] = float("-inf")
            return dq.merge_stacked_attention_states(**kw)
        kw = _pair()
        kw["lse_a"][..., 0] = float("-inf")
        kw["lse_b"][..., 0] = float("-inf")
        return dq.merge_attention_states(**kw)

    def check(result):
        out, lse = result
        assert torch.isneginf(lse[..., 0]).all() and (out[:, 0] == 0).all(), "rows with no key must give 0 and -inf"
        assert torch.isfinite(lse[..., 1:]).all() and torch.isfinite(out[:, 1:]).all()

    return call, check


def cases() -> list[Case]:
    ops = torch.ops.docqa_fast
    out = cases_for("merge_attention_states", dq.merge_attention_states, _pair, _pair_kinds())
    out += cases_for("op:merge_attention_states", ops.merge_attention_states, _pair,
                     [k for k in _pair_kinds() if k[0] not in ("device-mix", "list-for-tensor", "none")])
    out += cases_for("merge_stacked_attention_states", dq.merge_stacked_attention_states, _stacked, _stacked_kinds())
    out += cases_for("op:merge_stacked_attention_states", ops.merge_stacked_attention_states, _stacked,
                     [k for k in _stacked_kinds() if k[0] not in ("device-mix", "list-for-tensor", "none")])
    for stacked in (False, True):
        call, check = _empty_rows_valid(stacked)
        name = "merge_stacked_attention_states" if stacked else "merge_attention_states"
        out.append(Case(f"{name}/-inf-lse/valid", call, check=check, kind="edge-values"))
    return out

"""Bad input to docqa_fast.rotary.apply_rotary_emb (and its op) and to docqa_fast.bert_padding."""

from __future__ import annotations

import torch

from docqa_fast import bert_padding
from docqa_fast.rotary import apply_rotary_emb

from .harness import Case
from .kinds import cases_for, float_tensor_kinds, int_kinds, int_tensor_kinds, narrowed

DT = torch.float16
B, S, H, D = 2, 5, 3, 8


def _rotary():
    angles = torch.rand(16, D // 2)
    return dict(x=torch.randn(B, S, H, D, dtype=DT), cos=angles.cos().to(DT), sin=angles.sin().to(DT))


def _rotary_varlen():
    return dict(_rotary(), x=torch.randn(7, H, D, dtype=DT), cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32),
                max_seqlen=4)


def _rotary_kinds() -> list[tuple]:
    return [
        *float_tensor_kinds("x", strided=True), *float_tensor_kinds("cos"), *float_tensor_kinds("sin"),
        ("dtype-mismatch", "cos", lambda kw: kw.update(sin=kw["sin"].float()) or kw["cos"].float(), TypeError),
        ("shape", "sin", lambda kw: narrowed(kw["sin"], 0), ValueError),
        ("rotary-dim-too-big", "cos", lambda kw: torch.ones(16, D, dtype=DT), ValueError, ("cos", "sin")),
        ("too-few-positions", "cos", lambda kw: kw.update(sin=kw["sin"][:3]) or kw["cos"][:3], ValueError,
         ("cos", "sin")),
        ("negative", "seqlen_offsets", lambda kw: -1, ValueError),
        ("float-for-int", "seqlen_offsets", lambda kw: 1.5, TypeError),
        ("bool-for-int", "seqlen_offsets", lambda kw: True, TypeError),
        ("shape", "seqlen_offsets", lambda kw: torch.zeros(B + 1, dtype=torch.int32), ValueError),
        ("float-tensor", "seqlen_offsets", lambda kw: torch.zeros(B), TypeError),
        ("past-the-table", "seqlen_offsets", lambda kw: torch.tensor([0, 14], dtype=torch.int32), ValueError,
         ("cos", "sin", "seqlen_offsets")),
    ]


def _rotary_varlen_kinds() -> list[tuple]:
    return [
        *int_tensor_kinds("cu_seqlens", torch.int32, optional=True),
        ("not-monotone", "cu_seqlens", lambda kw: torch.tensor([0, 5, 3, 7], dtype=torch.int32), ValueError),
        ("wrong-end", "cu_seqlens", lambda kw: torch.tensor([0, 3, 9], dtype=torch.int32), ValueError),
        ("dense-x", "x", lambda kw: kw["x"][None], ValueError),
        ("empty-sequence", "cu_seqlens", lambda kw: torch.tensor([0, 3, 3, 7], dtype=torch.int32), None),
    ]


def _op():
    kw = _rotary()
    return dict(x=kw["x"].reshape(B * S, H, D), cos=kw["cos"], sin=kw["sin"], positions=torch.arange(B * S),
                interleaved=False, conjugate=False)


def _op_kinds() -> list[tuple]:
    return [
        ("rank", "x", lambda kw: kw["x"][None], ValueError),
        ("dtype", "cos", lambda kw: kw["cos"].float(), TypeError),
        ("shape", "sin", lambda kw: narrowed(kw["sin"], 0), ValueError),
        ("int-width", "positions", lambda kw: kw["positions"].int(), TypeError),
        ("shape", "positions", lambda kw: kw["positions"][:3], ValueError),
        ("rotary-dim-too-big", "cos", lambda kw: kw.update(sin=torch.ones(16, D, dtype=DT)) or torch.ones(16, D,
                                                                                                        dtype=DT),
         ValueError),
    ]


# ------------------------------------------------------------------------------ bert_padding

def _unpad():
    return dict(hidden_states=torch.randn(B, S, 4), attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))


def _unpad_kinds() -> list[tuple]:
    return [
        ("list-for-tensor", "hidden_states", lambda kw: kw["hidden_states"].tolist(), TypeError),
        ("none", "hidden_states", lambda kw: None, TypeError),
        ("rank", "hidden_states", lambda kw: kw["hidden_states"][0, 0], ValueError),
        ("float-mask", "attention_mask", lambda kw: kw["attention_mask"].float(), TypeError),
        ("none", "attention_mask", lambda kw: None, TypeError),
        ("rank", "attention_mask", lambda kw: kw["attention_mask"][None], ValueError),
        ("shape", "attention_mask", lambda kw: kw["attention_mask"][:, :4], ValueError),
        ("device-mix", "attention_mask", lambda kw: kw["attention_mask"].to("meta"), ValueError),
        ("shape", "unused_mask", lambda kw: kw["attention_mask"][:1], ValueError),
        ("float-mask", "unused_mask", lambda kw: kw["attention_mask"].float(), TypeError),
        ("device-mix", "unused_mask", lambda kw: kw["attention_mask"].to("meta"), ValueError),
        ("rank", "unused_mask", lambda kw: kw["attention_mask"][0], ValueError),
        ("list-for-tensor", "attention_mask", lambda kw: kw["attention_mask"].tolist(), TypeError),
        ("empty-batch", None, lambda kw: kw.update(hidden_states=kw["hidden_states"][:0],
                                                  attention_mask=kw["attention_mask"][:0]), None),
    ]


def _pad():
    return dict(hidden_states=torch.randn(8, 4), indices=torch.tensor([0, 1, 2, 5, 6, 7, 8, 9]), batch=B, seqlen=S)


def _pad_kinds() -> list[tuple]:
    return [
        ("list-for-tensor", "hidden_states", lambda kw: kw["hidden_states"].tolist(), TypeError),
        *[k for k in int_tensor_kinds("indices", torch.int64) if k[0] != "int-width"],  # int32 is taken
        ("shape", "indices", lambda kw: kw["indices"][:5], ValueError),
        ("out-of-range", "indices", lambda kw: kw["indices"] + 3, ValueError),
        ("negative", "indices", lambda kw: kw["indices"] - 1, ValueError),
        *int_kinds("batch"), *int_kinds("seqlen"),
    ]


def _index():
    return dict(input=torch.randn(6, 4), indices=torch.tensor([0, 2, 5]))


def _index_kinds() -> list[tuple]:
    return [
        ("list-for-tensor", "input", lambda kw: kw["input"].tolist(), TypeError),
        ("rank", "input", lambda kw: kw["input"][:, 0], ValueError),
        *[k for k in int_tensor_kinds("indices", torch.int64) if k[0] != "int-width"],
        ("out-of-range", "indices", lambda kw: kw["indices"] + 4, ValueError),
        ("negative", "indices", lambda kw: kw["indices"] - 3, ValueError),
        ("list-for-tensor", "indices", lambda kw: kw["indices"].tolist(), TypeError),
        ("none", "input", lambda kw: None, TypeError),
    ]


def _concatenated():
    return dict(hidden_states=torch.randn(B, S, 4), attention_mask_in_length=torch.tensor([[2, 3, 0, 0, 0],
                                                                                          [4, 0, 0, 0, 0]]))


def _concatenated_kinds() -> list[tuple]:
    return [
        ("bool-mask", "attention_mask_in_length", lambda kw: kw["attention_mask_in_length"] != 0, TypeError),
        ("float-mask", "attention_mask_in_length", lambda kw: kw["attention_mask_in_length"].float(), TypeError),
        ("too-long", "attention_mask_in_length", lambda kw: kw["attention_mask_in_length"] * 2, ValueError),
        ("negative", "attention_mask_in_length", lambda kw: -kw["attention_mask_in_length"], ValueError),
        ("shape", "attention_mask_in_length", lambda kw: kw["attention_mask_in_length"][:1], ValueError),
        ("rank", "hidden_states", lambda kw: kw["hidden_states"][0, 0], ValueError),
        ("list-for-tensor", "hidden_states", lambda kw: kw["hidden_states"].tolist(), TypeError),
        ("none", "attention_mask_in_length", lambda kw: None, TypeError),
        ("device-mix", "attention_mask_in_length", lambda kw: kw["attention_mask_in_length"].to("meta"), ValueError),
        ("rank", "attention_mask_in_length", lambda kw: kw["attention_mask_in_length"][None], ValueError),
    ]


def cases() -> list[Case]:
    out = cases_for("apply_rotary_emb", apply_rotary_emb, _rotary, _rotary_kinds(), op="rotary")
    out += cases_for("apply_rotary_emb+cu_seqlens", apply_rotary_emb, _rotary_varlen, _rotary_varlen_kinds(),
                     op="rotary")
    out += cases_for("op:rotary", torch.ops.docqa_fast.rotary, _op, _op_kinds())
    out += cases_for("unpad_input", bert_padding.unpad_input, _unpad, _unpad_kinds())
    out += cases_for("pad_input", bert_padding.pad_input, _pad, _pad_kinds())
    out += cases_for("index_first_axis", bert_padding.index_first_axis, _index, _index_kinds())
    out += cases_for("unpad_input_for_concatenated_sequences", bert_padding.unpad_input_for_concatenated_sequences,
                     _concatenated, _concatenated_kinds())
    return out

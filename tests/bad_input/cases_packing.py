"""Bad input to the packing family: plan_packing, pack_multimodal, unpack, get_rope_index,
merge_visual_tokens (and its ops), vision_window_index."""

from __future__ import annotations

import torch

import docqa_fast as dq

from .harness import Case
from .kinds import cases_for, float_tensor_kinds, int_kinds, int_tensor_kinds

IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653
HID = 8


def _plan():
    return dict(lengths=[3, 1, 4, 1, 5], max_tokens=6)


def _plan_kinds() -> list[tuple]:
    return [
        ("float-lengths", "lengths", lambda kw: [3.5, 1, 4], TypeError),
        ("float-tensor", "lengths", lambda kw: torch.tensor([3.0, 1.0]), TypeError),
        ("bool-tensor", "lengths", lambda kw: torch.tensor([True, False]), TypeError),
        ("nested", "lengths", lambda kw: [[1, 2], [3, 4]], ValueError),
        ("none", "lengths", lambda kw: None, TypeError),
        ("str", "lengths", lambda kw: "3,1,4", TypeError),
        ("negative", "lengths", lambda kw: [3, -1, 4], ValueError),
        ("too-long", "lengths", lambda kw: [3, 9, 4], ValueError),
        ("astronomical-split", "lengths", lambda kw: kw.update(max_tokens=1, split_long=True) or [10 ** 12],
         ValueError),
        *int_kinds("max_tokens"),
        ("zero", "max_tokens", lambda kw: 0, ValueError),
        ("unknown", "strategy", lambda kw: "worst-fit", ValueError),
        ("int-for-bool", "split_long", lambda kw: 1, TypeError),
        ("empty", "lengths", lambda kw: [], None),
    ]


def _sample(n_text=3):
    ids = [5] * n_text + [START] + [IMAGE] * 2 + [END] + [7] * n_text
    return {"input_ids": torch.tensor(ids), "image_grid_thw": torch.tensor([[1, 2, 4]]),
            "pixel_values": torch.randn(8, 6)}


def _pack():
    return dict(samples=[_sample(), _sample(2)], max_tokens=64)


def _pack_kinds() -> list[tuple]:
    def edit_first(**changes):  # a bad field of the first sample: the message names the field
        return lambda kw: kw.update(samples=[dict(kw["samples"][0], **changes), *kw["samples"][1:]])

    return [
        ("empty", "samples", lambda kw: [], ValueError),
        ("not-a-mapping", "samples", lambda kw: [kw["samples"][0]["input_ids"]], (TypeError, ValueError),
         ("samples", "samples[0]")),
        ("no-input_ids", "samples", lambda kw: [{"image_grid_thw": torch.tensor([[1, 2, 4]])}], ValueError,
         ("samples", "samples[0]", "input_ids")),
        ("float-ids", None, edit_first(input_ids=torch.tensor([5.0, 6.0])), TypeError, ("input_ids",)),
        ("2-d-ids", None, edit_first(input_ids=torch.tensor([[5, 6], [7, 8]])), ValueError, ("input_ids",)),
        ("extra-grid-rows", None, edit_first(image_grid_thw=torch.tensor([[1, 2, 4], [1, 2, 2]])),
         ValueError, ("image_grid_thw",)),
        ("grid-too-small", None, edit_first(image_grid_thw=torch.tensor([[1, 2, 2]])), ValueError,
         ("image_grid_thw",)),
        ("float-grid", None, edit_first(image_grid_thw=torch.tensor([[1.0, 2.0, 4.0]])), TypeError,
         ("image_grid_thw",)),
        ("pixel-rows", None, edit_first(pixel_values=torch.randn(5, 6)), ValueError, ("pixel_values",)),
        ("too-long", "max_tokens", lambda kw: 5, ValueError),
        *int_kinds("max_tokens"),
        ("float-for-int", "image_token_id", lambda kw: 151655.0, TypeError),
        ("zero", "spatial_merge_size", lambda kw: 0, ValueError),
        ("unknown", "model_type", lambda kw: "llava", ValueError),
    ]


def _rope():
    ids = torch.tensor([[5, 5, START, IMAGE, IMAGE, END, 7, 7]])
    types = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.int32)
    return dict(input_ids=ids, mm_token_type_ids=types, image_grid_thw=torch.tensor([[1, 2, 4]]))


def _rope_kinds() -> list[tuple]:
    return [
        *[k for k in int_tensor_kinds("input_ids", torch.int64, device_mix=True) if k[0] != "int-width"],
        ("float-for-int", "mm_token_type_ids", lambda kw: kw["mm_token_type_ids"].float(), TypeError),
        ("shape", "mm_token_type_ids", lambda kw: kw["mm_token_type_ids"][:, :5], ValueError),
        ("unknown-type", "mm_token_type_ids", lambda kw: kw["mm_token_type_ids"] * 5, ValueError),
        # Grid rows past the runs are left unused, as transformers' get_rope_index does (a
        # packed sample's extra rows are pack_multimodal's error).
        ("missing-grid", "image_grid_thw", lambda kw: None, ValueError),
        ("float-grid", "image_grid_thw", lambda kw: kw["image_grid_thw"].float(), TypeError),
        ("grid-shape", "image_grid_thw", lambda kw: kw["image_grid_thw"][:, :2], ValueError),
        ("shape", "attention_mask", lambda kw: torch.ones(1, 5, dtype=torch.long), ValueError),
        ("zero", "spatial_merge_size", lambda kw: 0, ValueError),
        ("float-for-int", "spatial_merge_size", lambda kw: 2.0, TypeError),
        ("unknown", "model_type", lambda kw: "llava", ValueError),
        ("unknown", "video_time_rounding", lambda kw: "round-ish", ValueError),
    ]


def _merge():
    ids = torch.tensor([[5, IMAGE, IMAGE, 7], [IMAGE, 5, 5, 5]])
    return dict(inputs_embeds=torch.randn(2, 4, HID), input_ids=ids, visual_embeds=torch.randn(3, HID),
                token_id=IMAGE)


def _merge_kinds() -> list[tuple]:
    return [
        # visual_embeds of any shape with the right rows x hidden size is taken (as masked_scatter does).
        *float_tensor_kinds("inputs_embeds", rank=False), *float_tensor_kinds("visual_embeds", rank=False),
        *[k for k in int_tensor_kinds("input_ids", torch.int64) if k[0] != "int-width"],
        ("shape", "input_ids", lambda kw: kw["input_ids"][:, :3], ValueError),
        ("too-few-rows", "visual_embeds", lambda kw: kw["visual_embeds"][:2], ValueError),
        ("too-many-rows", "visual_embeds", lambda kw: torch.randn(5, HID), ValueError),
        ("hidden-size", "visual_embeds", lambda kw: torch.randn(3, HID + 1), ValueError),
        ("float-for-int", "token_id", lambda kw: float(IMAGE), TypeError),
        ("bool-for-int", "token_id", lambda kw: True, TypeError),
        ("none", "token_id", lambda kw: None, TypeError),
        ("empty-ids", "token_id", lambda kw: (), (TypeError, ValueError)),
    ]


def _merge_op():
    kw = _merge()
    return dict(inputs_embeds=kw["inputs_embeds"], input_ids=kw["input_ids"], visual_embeds=kw["visual_embeds"],
                token_ids=torch.tensor([IMAGE]))


def _merge_op_kinds() -> list[tuple]:
    return [
        ("dtype", "visual_embeds", lambda kw: kw["visual_embeds"].double(), TypeError),
        ("hidden-size", "visual_embeds", lambda kw: torch.randn(3, HID + 1), ValueError),
        ("shape", "input_ids", lambda kw: kw["input_ids"][:, :3], ValueError),
        ("float-for-int", "input_ids", lambda kw: kw["input_ids"].float(), TypeError),
        ("float-for-int", "token_ids", lambda kw: kw["token_ids"].float(), TypeError),
        ("rank", "token_ids", lambda kw: kw["token_ids"][None], ValueError),
        ("int-width", "token_ids", lambda kw: kw["token_ids"].int(), TypeError),
    ]


def _window():
    return dict(grid_thw=torch.tensor([[1, 8, 12]]))


def _window_kinds() -> list[tuple]:
    return [
        ("float-grid", "grid_thw", lambda kw: kw["grid_thw"].float(), (TypeError, ValueError)),
        ("grid-shape", "grid_thw", lambda kw: kw["grid_thw"][:, :2], ValueError),
        ("list-for-tensor", "grid_thw", lambda kw: kw["grid_thw"].tolist(), TypeError),
        ("none", "grid_thw", lambda kw: None, TypeError),
        ("odd-grid", "grid_thw", lambda kw: torch.tensor([[1, 7, 12]]), ValueError),
        ("zero", "patch_size", lambda kw: 0, ValueError),
        ("zero", "spatial_merge_size", lambda kw: 0, ValueError),
        ("negative", "window_size", lambda kw: -112, ValueError),
        ("float-for-int", "patch_size", lambda kw: 14.0, TypeError),
        ("bool-for-int", "window_size", lambda kw: True, TypeError),
        ("negative", "patch_size", lambda kw: -14, ValueError),
        ("str-for-int", "spatial_merge_size", lambda kw: "2", TypeError),
    ]


def _unpack_cases() -> list[Case]:
    def valid():
        packed = dq.pack_multimodal([_sample(), _sample(2)], max_tokens=64)
        return dict(packed=packed, tensor=torch.randn(1, packed.input_ids.shape[-1], HID))

    return cases_for("unpack", dq.unpack, valid, [
        ("not-a-packed-batch", "packed", lambda kw: {"cu_seqlens": kw["packed"].cu_seqlens}, TypeError),
        ("list-for-tensor", "tensor", lambda kw: kw["tensor"].tolist(), TypeError),
        ("wrong-length", "tensor", lambda kw: kw["tensor"][:, :-1], ValueError),
        ("dim-out-of-range", "dim", lambda kw: 5, ValueError),
        ("float-for-int", "dim", lambda kw: 1.0, TypeError),
        ("bool-for-int", "dim", lambda kw: True, TypeError),
        ("str-for-int", "dim", lambda kw: "1", TypeError),
        ("none", "tensor", lambda kw: None, TypeError),
        ("none", "packed", lambda kw: None, TypeError),
        ("zero-dim", "tensor", lambda kw: kw["tensor"][0, 0, 0], ValueError),
    ])


# The family's ops run on the extension and the reference: forcing triton is refused by the
# dispatch (a RuntimeError saying so) before any argument is looked at.
BACKENDS = ("extension", "reference")


def cases() -> list[Case]:
    out = cases_for("plan_packing", dq.plan_packing, _plan, _plan_kinds(), op="plan_packing")
    out += cases_for("pack_multimodal", dq.pack_multimodal, _pack, _pack_kinds())
    out += _unpack_cases()
    out += cases_for("get_rope_index", dq.get_rope_index, _rope, _rope_kinds())
    out += cases_for("merge_visual_tokens", dq.merge_visual_tokens, _merge, _merge_kinds())
    out += cases_for("op:merge_visual_tokens", torch.ops.docqa_fast.merge_visual_tokens, _merge_op,
                     _merge_op_kinds())
    out += cases_for("op:merge_visual_tokens_backward", torch.ops.docqa_fast.merge_visual_tokens_backward,
                     lambda: dict(grad=torch.randn(2, 4, HID), input_ids=_merge()["input_ids"],
                                  token_ids=torch.tensor([IMAGE]), n_visual=3), [
                         ("int-for-float", "grad", lambda kw: kw["grad"].int(), TypeError),
                         ("shape", "input_ids", lambda kw: kw["input_ids"][:, :2], ValueError),
                         ("float-for-int", "token_ids", lambda kw: kw["token_ids"].float(), TypeError),
                         ("negative", "n_visual", lambda kw: -1, ValueError)])
    out += cases_for("vision_window_index", dq.vision_window_index, _window, _window_kinds())
    for case in out:
        case.backends = BACKENDS
    return out

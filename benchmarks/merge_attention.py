"""Benchmarks of merging partial attention results by log-sum-exp (docqa_fast.merge_attention).

Shapes (Qwen2.5-VL-7B; README.md, Benchmarks):

* ``ring_pair``: ring attention merges two partial results per step; B=1, S = 8K/32K/128K,
  28 heads, D=128 (``merge_attention_states``).
* ``vit_pair_d80``: the vision encoder's head dim 80, packed (T, 16, 80) over 8-100 images
  of ~4,800 patches each.
* ``splitkv_n4`` / ``splitkv_n16``: split-KV decoding combines n partial results per
  query token; B = 1/16/64, S = 1, 28 heads, D=128 (``merge_stacked_attention_states``).

The op is memory bound: bytes moved = every part's out and lse read + the merged out and
lse written. Target (on an H100): ours at >= 85% of copy bandwidth from 64 MB of input.
Everything runs in bf16, the models' dtype; the reference and the C++ twins handle it on
CPU too, so CPU and GPU runs move the same bytes.
"""

from __future__ import annotations

import torch

import docqa_fast
from docqa_fast.reference.merge_attention import merge_attention_states_ref, merge_stacked_attention_states_ref

from .harness import Case, compiled_provider, eager_provider, ours_per_backend, register_family

FAMILY = "merge_attention"
DTYPE = torch.bfloat16
LLM_HEADS, LLM_HEAD_DIM = 28, 128
VIT_HEADS, VIT_HEAD_DIM, PATCHES_PER_IMAGE = 16, 80, 4800
TARGET_FRACTION, TARGET_MIN_INPUT_BYTES = 0.85, 64 * 10**6

SIZES = {  # quick sizes keep a 2-core CPU run to seconds per case
    "full": {"ring_S": (8192, 32768, 131072), "vit_images": (8, 32, 100), "splitkv_B": (1, 16, 64)},
    "quick": {"ring_S": (1024, 4096), "vit_images": (1,), "splitkv_B": (1, 16)},
}
SPLITS = (4, 16)


def _outs(shape, device):
    return torch.randn(shape, device=device, dtype=DTYPE)


def _lses(shape, device):
    # Natural-log LSEs of real attention rows sit around log(#keys) + a few; parts differ by
    # a few units, so every part carries weight and no exp() under- or overflows.
    return 8.0 + 2.0 * torch.randn(shape, device=device, dtype=torch.float32)


def _pair_inputs(params, device):
    if "T" in params:  # packed varlen layout: out (T, H, D), lse (H, T)
        out_shape, lse_shape = (params["T"], params["H"], params["D"]), (params["H"], params["T"])
    else:
        B, S, H, D = params["B"], params["S"], params["H"], params["D"]
        out_shape, lse_shape = (B, S, H, D), (B, H, S)
    return _outs(out_shape, device), _lses(lse_shape, device), _outs(out_shape, device), _lses(lse_shape, device)


def _stacked_inputs(params, device):
    n, B, S, H, D = params["n"], params["B"], params["S"], params["H"], params["D"]
    return _outs((n, B, S, H, D), device), _lses((n, B, H, S), device)


def _bytes_moved(parts: int, rows: int, head_dim: int) -> tuple[int, int]:
    """(input bytes, total bytes moved) for merging ``parts`` results of ``rows`` (b, s, h) rows."""
    part_bytes = rows * head_dim * DTYPE.itemsize + rows * 4  # out + fp32 lse
    return parts * part_bytes, (parts + 1) * part_bytes


def _case(name, group, description, params, sweep, parts, rows, head_dim, make_inputs, providers):
    input_bytes, moved = _bytes_moved(parts, rows, head_dim)
    return Case(family=FAMILY, name=name, group=group, description=description, params=params, sweep=sweep,
                make_inputs=make_inputs, providers=providers, bytes_moved=moved,
                target=TARGET_FRACTION if input_bytes >= TARGET_MIN_INPUT_BYTES else None)


@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    sizes = SIZES["quick" if quick else "full"]
    pair = (*ours_per_backend(docqa_fast.merge_attention_states),
            eager_provider(merge_attention_states_ref), compiled_provider(merge_attention_states_ref))
    stacked = (*ours_per_backend(docqa_fast.merge_stacked_attention_states),
               eager_provider(merge_stacked_attention_states_ref),
               compiled_provider(merge_stacked_attention_states_ref))
    dtype = str(DTYPE).removeprefix("torch.")
    H, D = LLM_HEADS, LLM_HEAD_DIM
    found = []
    for S in sizes["ring_S"]:
        found.append(_case(f"ring_pair-S{S}", "ring_pair", f"ring-attention pair merge, B=1 H={H} D={D} {dtype}",
                           {"B": 1, "S": S, "H": H, "D": D, "dtype": dtype}, "S",
                           parts=2, rows=S * H, head_dim=D, make_inputs=_pair_inputs, providers=pair))
    for images in sizes["vit_images"]:
        T = images * PATCHES_PER_IMAGE
        found.append(_case(f"vit_pair_d80-images{images}", "vit_pair_d80",
                           f"ViT pair merge, packed T={PATCHES_PER_IMAGE}/image H={VIT_HEADS} D={VIT_HEAD_DIM} {dtype}",
                           {"images": images, "T": T, "H": VIT_HEADS, "D": VIT_HEAD_DIM, "dtype": dtype}, "images",
                           parts=2, rows=T * VIT_HEADS, head_dim=VIT_HEAD_DIM, make_inputs=_pair_inputs,
                           providers=pair))
    for n in SPLITS:
        for B in sizes["splitkv_B"]:
            found.append(_case(f"splitkv_n{n}-B{B}", f"splitkv_n{n}",
                               f"split-KV decode combine of {n} splits, S=1 H={H} D={D} {dtype}",
                               {"n": n, "B": B, "S": 1, "H": H, "D": D, "dtype": dtype}, "B",
                               parts=n, rows=B * H, head_dim=D, make_inputs=_stacked_inputs, providers=stacked))
    return found

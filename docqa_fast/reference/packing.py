"""Readable ground truth of the visual-token packing family.

* :func:`plan_packing_ref` -- the bin-packing planner in plain Python; the C++ planner
  (``csrc/packing/planner.cpp``) must give the same bins.
* :func:`merge_visual_tokens_ref` -- ``masked_scatter`` of visual features into the token
  embeddings, the line every Qwen2-VL-style model runs.
* :func:`get_rope_index_ref` -- M-RoPE position ids, one document and one image at a time
  (the shape of transformers' loop, written from its documented semantics).
* :func:`vision_window_index_ref` -- Qwen2.5-VL's window reordering, one window at a time.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

STRATEGIES = ("greedy", "ffd", "bfd")


# ------------------------------------------------------------------------------ planner

def _items(lengths: Sequence[int], max_tokens: int, split_long: bool) -> list[tuple[int, int, int]]:
    """(sample, start, length) per item; a long sample -> full pieces, then the remainder."""
    items = []
    for i, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"expected lengths >= 0, got lengths[{i}] = {length}")
        if length > max_tokens and not split_long:
            raise ValueError(f"lengths[{i}] = {length} exceeds max_tokens = {max_tokens} "
                             "(pass split_long=True to split such samples)")
        start = 0
        while length - start > max_tokens:
            items.append((i, start, max_tokens))
            start += max_tokens
        if start == 0 or length - start > 0:
            items.append((i, start, length - start))
    return items


def plan_packing_ref(lengths: Sequence[int], max_tokens: int, *, strategy: str = "bfd",
                     split_long: bool = False) -> list[list[int]] | list[list[tuple[int, int, int]]]:
    """Bins of sample indices, each bin's lengths summing to at most ``max_tokens``.

    ``greedy``: next fit in sample order. ``ffd`` / ``bfd``: samples by length descending
    (ties in sample order) into the first / the tightest bin with room (ties: the earliest
    bin), else a new bin. Bins are listed in the order they were opened; a bin lists its
    samples in the order they were put in. With ``split_long=True`` every entry is a
    ``(sample, start, stop)`` token span instead of a bare index.
    """
    if max_tokens <= 0:
        raise ValueError(f"expected max_tokens > 0, got {max_tokens}")
    if strategy not in STRATEGIES:
        raise ValueError(f"expected strategy in {STRATEGIES}, got {strategy!r}")
    items = _items([int(x) for x in lengths], max_tokens, split_long)
    bins: list[list[int]] = []
    if strategy == "greedy":
        room = -1
        for k, (_, _, length) in enumerate(items):
            if length > room:
                bins.append([])
                room = max_tokens
            bins[-1].append(k)
            room -= length
    else:
        order = sorted(range(len(items)), key=lambda k: -items[k][2])  # stable: ties keep item order
        rooms: list[int] = []  # ffd: room per bin
        by_room: list[tuple[int, int]] = []  # bfd: sorted (room, bin)
        for k in order:
            length = items[k][2]
            if strategy == "ffd":
                b = next((b for b, room in enumerate(rooms) if room >= length), len(rooms))
                if b == len(rooms):
                    rooms.append(max_tokens)
                    bins.append([])
                rooms[b] -= length
            else:
                pos = bisect.bisect_left(by_room, (length, -1))
                if pos == len(by_room):
                    b, room = len(bins), max_tokens
                    bins.append([])
                else:
                    room, b = by_room.pop(pos)
                bisect.insort(by_room, (room - length, b))
            bins[b].append(k)
    if split_long:
        return [[(items[k][0], items[k][1], items[k][1] + items[k][2]) for k in b] for b in bins]
    return [[items[k][0] for k in b] for b in bins]


# ------------------------------------------------------------------------------- merge

def merge_visual_tokens_ref(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, visual_embeds: torch.Tensor,
                            token_id) -> torch.Tensor:
    """``inputs_embeds.masked_scatter((input_ids == token_id)[..., None], visual_embeds)``."""
    ids = torch.as_tensor([token_id] if isinstance(token_id, int) else list(token_id), device=input_ids.device)
    mask = torch.isin(input_ids, ids).unsqueeze(-1).expand_as(inputs_embeds)
    return inputs_embeds.masked_scatter(mask, visual_embeds)


# --------------------------------------------------------------------------- M-RoPE

def get_rope_index_ref(input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, *, spatial_merge_size=2,
                       tokens_per_second=2, model_type="qwen2_5_vl"):
    """(position_ids (3, B, T), deltas (B, 1)) by walking every document run by run.

    Text tokens get ``p, p, p`` and advance ``p`` by one; a run of image (type 1) or video
    (type 2) tokens with LLM grid (t, h, w) gets ``(p + floor(ti * step), p + hi, p + wi)``
    and advances ``p`` by ``max(h, w)``; ``step`` is 1 for images and Qwen2-VL, and
    ``tokens_per_second * second_per_grid_ts[v]`` for Qwen2.5-VL videos. Padding (mask 0)
    is skipped and keeps position 0. delta = max position + 1 - number of real tokens.
    """
    B, T = input_ids.shape
    positions = torch.zeros(3, B, T, dtype=input_ids.dtype)
    deltas = []
    grids = {1: [] if image_grid_thw is None else image_grid_thw.tolist(),
             2: [] if video_grid_thw is None else video_grid_thw.tolist()}
    used = {1: 0, 2: 0}
    seconds = None if second_per_grid_ts is None else second_per_grid_ts.cpu()
    for b in range(B):
        keep = torch.ones(T, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool().cpu()
        cols = keep.nonzero().flatten().tolist()
        types = mm_token_type_ids[b].cpu()[keep].tolist()
        rows: list[list[int]] = [[], [], []]
        p, k = 0, 0
        while k < len(types):
            kind = types[k]
            if kind == 0:
                for r in rows:
                    r.append(p)
                p, k = p + 1, k + 1
                continue
            t, h, w = grids[kind][used[kind]]
            h, w = h // spatial_merge_size, w // spatial_merge_size
            if kind == 2 and model_type == "qwen2_5_vl":
                sec = 1 if seconds is None else seconds[used[kind]]
                step = tokens_per_second * sec  # a float32 tensor when the seconds are one
            else:
                step = 1
            used[kind] += 1
            ti = (torch.arange(t) * step).long().tolist()
            for a in range(t):
                for i in range(h):
                    for j in range(w):
                        rows[0].append(p + ti[a])
                        rows[1].append(p + i)
                        rows[2].append(p + j)
            k += t * h * w
            p += max(h, w)
        for axis in range(3):
            positions[axis, b, cols] = torch.tensor(rows[axis][:len(cols)], dtype=input_ids.dtype)
        deltas.append(max(max(r) for r in rows) + 1 - len(cols) if cols else 0)
    return positions.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


# -------------------------------------------------------------------- window index

def vision_window_index_ref(grid_thw, window_size=112, patch_size=14, spatial_merge_size=2):
    """Qwen2.5-VL's (window_index, cu_window_seqlens): merged tokens reordered window by window.

    Per image and frame, the (h, w) grid of merged tokens is cut into square windows of
    ``window_size // spatial_merge_size // patch_size`` tokens (the last row / column of
    windows may be smaller); windows go row-major, tokens inside a window row-major.
    ``cu_window_seqlens`` counts ViT patches (``spatial_merge_size ** 2`` per token), int32.
    """
    side = window_size // spatial_merge_size // patch_size
    unit = spatial_merge_size ** 2
    index, cu, base = [], [0], 0
    for t, h, w in grid_thw.tolist():
        h, w = h // spatial_merge_size, w // spatial_merge_size
        for f in range(t):
            for r0 in range(0, h, side):
                for c0 in range(0, w, side):
                    window = [base + f * h * w + r * w + c
                              for r in range(r0, min(r0 + side, h)) for c in range(c0, min(c0 + side, w))]
                    index += window
                    cu.append(cu[-1] + len(window) * unit)
        base += t * h * w
    return (torch.tensor(index, dtype=torch.long),
            torch.tensor(cu, dtype=torch.int32, device=grid_thw.device))

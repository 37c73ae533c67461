"""``pack_multimodal``: several multimodal documents as one padding-free row, correct by construction.

A packed row is only safe if three things agree: the LLM's attention must not cross a
document boundary, the loss must not predict one document's first token from the previous
document, and each document's M-RoPE positions must be the ones it would get alone. This
module builds all three from the per-document samples:

* ``position_ids`` in the 4-row form transformers' Qwen2-VL / Qwen2.5-VL models read as packed:
  row 0 the text positions ``0..L_i-1`` restarting per document (transformers derives its
  block-diagonal attention mask from where they restart), rows 1-3 each document's own
  M-RoPE (t, h, w) positions from :func:`get_rope_index`.
* ``labels`` with ``ignore_index`` at every document's first token.
* ``cu_seqlens`` / ``max_seqlen`` (int32) for varlen attention, and the vision tower's
  per-frame ``vision_cu_seqlens`` (what transformers computes from ``image_grid_thw``).

The token fields (ids, labels, type ids, the 4 position rows) of all documents and the vision
fields (grids, pixel values, seconds per grid step: each the documents' rows one after another,
bit for bit what ``torch.cat`` gives) are written by one call of the extension's ``pack_tokens``
(``csrc/packing/pack_tokens*``): one CUDA launch for CUDA samples, its C++ twin for CPU samples
(the data loader), sharing the per-token and per-tile functions. ``DOCQA_FAST_BACKEND=reference``
(or no extension) concatenates with ``torch.cat`` per field instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .._validation import check_int, check_tensor
from .ops import PACK_TOKENS
from .rope import get_rope_index

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One packed row of documents (all tensors on the CPU unless moved with :meth:`to`)."""

    input_ids: torch.Tensor  # (1, T) int64
    labels: torch.Tensor  # (1, T) int64, ignore_index at each document's first token
    position_ids: torch.Tensor  # (4, 1, T): text positions restarting per document, then t, h, w
    mm_token_type_ids: torch.Tensor  # (1, T) int32: 0 text, 1 image, 2 video
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 document boundaries
    max_seqlen: int
    doc_lengths: list[int]
    image_grid_thw: torch.Tensor | None = None  # (n_images, 3), documents' images in order
    pixel_values: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None
    vision_cu_seqlens: torch.Tensor | None = None  # (frames + 1,) int32 over image_grid_thw's ViT patches
    image_order: list[tuple[int, int]] = field(default_factory=list)  # (document, image in document)
    video_order: list[tuple[int, int]] = field(default_factory=list)
    padding_ratio: float = 0.0  # 1 - T / max_tokens: the share of the row budget left unused

    def model_inputs(self) -> dict:
        """Keyword arguments for a transformers Qwen2-VL / Qwen2.5-VL forward.

        No attention mask and ``use_cache=False``: transformers builds the per-document mask
        from the restarting text positions only when both are absent (a KV cache, which a
        forward creates by default, silently turns the detection off and lets documents
        attend to each other).
        """
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "labels": self.labels,
                  "use_cache": False}
        for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            value = getattr(self, name)
            if value is not None:
                inputs[name] = value
        return inputs

    def to(self, device) -> PackedBatch:
        moved = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                 for name, value in vars(self).items()}
        return PackedBatch(**moved)


def _one_dim(name: str, value, doc: int, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, device=device)
    if value.device != device:
        raise ValueError(f"expected samples[{doc}][{name!r}] on {device} (the device of samples[0]['input_ids']), "
                         f"got {value.device}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"expected samples[{doc}][{name!r}] of an integer dtype, got {value.dtype}")
    if value.dim() == 2 and value.shape[0] == 1:
        value = value[0]
    if value.dim() != 1:
        raise ValueError(f"expected samples[{doc}][{name!r}] of shape (L,) or (1, L), got {tuple(value.shape)}")
    return value


def _check_grid_matches(doc: int, name: str, grid, doc_types, kind: int, pixel_name: str, pixels) -> None:
    """One grid row per vision run of the sample (get_rope_index, like transformers, leaves extra
    rows unused; in a packed sample they would be pixels no token stands for), and one pixel
    row per patch of the grid."""
    runs = int(((doc_types == kind) & (torch.nn.functional.pad(doc_types, (1, 0))[:-1] != kind)).sum())
    rows = 0 if grid is None else grid.shape[0]
    if rows != runs:
        raise ValueError(f"expected samples[{doc}][{name!r}] with one row per {('image', 'video')[kind - 1]} run of "
                         f"its tokens ({runs}), got {rows}")
    if grid is not None and isinstance(pixels, torch.Tensor) and pixels.shape[0] != int(grid.prod(-1).sum()):
        raise ValueError(f"expected samples[{doc}][{pixel_name!r}] with {int(grid.prod(-1).sum())} rows (one per "
                         f"patch of {name}), got {tuple(pixels.shape)}")


# What pack_tokens joins, in this order: each field's parts are the documents' rows.
VISION_FIELDS = ("image_grid_thw", "pixel_values", "video_grid_thw", "pixel_values_videos", "second_per_grid_ts")


def _vision_part(name: str, value, doc: int, device: torch.device, earlier: list) -> torch.Tensor:
    """Sample ``doc``'s rows of a vision field as the packing copy joins them: a tensor on the
    row's device with the dtype and trailing shape of the field's earlier parts (where torch.cat
    would promote the dtype or fail, the packed row would be ambiguous: refused by name)."""
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value, device=device)
    if value.device != device:
        raise ValueError(f"expected samples[{doc}][{name!r}] on {device} (the device of samples[0]['input_ids']), "
                         f"got {value.device}")
    if value.dim() == 0:
        raise ValueError(f"expected samples[{doc}][{name!r}] with a row dimension, got a 0-d tensor")
    if earlier:
        first = earlier[0]
        if value.dtype != first.dtype:
            raise TypeError(f"expected samples[{doc}][{name!r}] of dtype {first.dtype} (the dtype of the earlier "
                            f"samples' {name}), got {value.dtype}")
        if value.shape[1:] != first.shape[1:]:
            raise ValueError(f"expected samples[{doc}][{name!r}] of shape (rows, {', '.join(map(str, first.shape[1:]))})"
                             f" (the earlier samples' {name}), got {tuple(value.shape)}")
    return value.contiguous()


def _all_or_none(name: str, parts: list, lacking: list[int], kind: str) -> None:
    if parts and lacking:
        raise ValueError(f"expected samples[{lacking[0]}][{name!r}]: other samples give {name} for their {kind}s, "
                         f"and a packed row takes every {kind}'s or none")


def pack_multimodal(samples: Sequence[Mapping], max_tokens: int | None = None, *, image_token_id: int = 151655,
                    video_token_id: int = 151656, spatial_merge_size: int = 2, tokens_per_second: float | None = 2,
                    model_type: str = "qwen2_5_vl", ignore_index: int = IGNORE_INDEX) -> PackedBatch:
    """Pack ``samples`` (one bin of :func:`plan_packing`) into one row.

    Each sample is a mapping with ``input_ids`` ((L,) or (1, L)) and optionally ``labels``
    (default: the ids), ``mm_token_type_ids`` (default: from ``image_token_id`` /
    ``video_token_id``), ``image_grid_thw`` + ``pixel_values``, ``video_grid_thw`` +
    ``pixel_values_videos`` + ``second_per_grid_ts`` -- what a Qwen2-VL processor returns
    for one document. Raises ``ValueError`` when the documents exceed ``max_tokens`` or a
    document's visual tokens do not match its grids.
    """
    if not samples:
        raise ValueError("expected samples to hold at least one sample to pack, got none")
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, minimum=1)
    check_int("image_token_id", image_token_id, maximum=2 ** 63 - 1)
    check_int("video_token_id", video_token_id, maximum=2 ** 63 - 1)
    check_int("spatial_merge_size", spatial_merge_size, minimum=1)
    first = samples[0].get("input_ids") if isinstance(samples[0], Mapping) else None
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    ids, labels, types, mrope, lengths, image_order, video_order = [], [], [], [], [], [], []
    vision = {name: [] for name in VISION_FIELDS}  # each field's parts, in document order
    lacking = {name: [] for name in VISION_FIELDS}  # samples with images / videos but without the field
    for d, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise TypeError(f"expected samples[{d}] to be a mapping with 'input_ids', got {type(sample).__name__}")
        if "input_ids" not in sample:
            raise ValueError(f"expected samples[{d}] to be a mapping with 'input_ids'")
        doc_ids = _one_dim("input_ids", sample["input_ids"], d, device).to(torch.long)
        L = doc_ids.shape[0]
        if L == 0:
            raise ValueError(f"expected samples[{d}] with at least one token, got an empty 'input_ids'")
        doc_labels = _one_dim("labels", sample["labels"], d, device).to(torch.long) \
            if sample.get("labels") is not None else doc_ids
        if doc_labels.shape != doc_ids.shape:
            raise ValueError(f"expected samples[{d}]['labels'] of shape {tuple(doc_ids.shape)}, "
                             f"got {tuple(doc_labels.shape)}")
        if sample.get("mm_token_type_ids") is not None:
            doc_types = _one_dim("mm_token_type_ids", sample["mm_token_type_ids"], d, device).to(torch.int32)
            if doc_types.shape != doc_ids.shape:
                raise ValueError(f"expected samples[{d}]['mm_token_type_ids'] of shape {tuple(doc_ids.shape)}, "
                                 f"got {tuple(doc_types.shape)}")
        else:
            doc_types = ((doc_ids == image_token_id).to(torch.int32) + 2 * (doc_ids == video_token_id).to(torch.int32))
        grid = sample.get("image_grid_thw")
        vgrid = sample.get("video_grid_thw")
        secs = sample.get("second_per_grid_ts")
        try:
            pos, _ = get_rope_index(doc_ids[None], doc_types[None], grid, vgrid, secs,
                                    spatial_merge_size=spatial_merge_size, tokens_per_second=tokens_per_second,
                                    model_type=model_type)
        except ValueError as exc:
            raise ValueError(f"samples[{d}]: {exc}") from exc
        # A grid's rows, then the fields that go with it (pixels; a video's seconds per grid
        # step), each appended to its field's parts or, when the sample lacks it, noted.
        for name, g, kind, with_grid in (("image_grid_thw", grid, 1, ("pixel_values",)),
                                         ("video_grid_thw", vgrid, 2, ("pixel_values_videos", "second_per_grid_ts"))):
            if g is not None and bool(((g[:, 1:] % spatial_merge_size) != 0).any()):
                raise ValueError(f"samples[{d}][{name!r}]: expected h and w divisible by spatial_merge_size="
                                 f"{spatial_merge_size}, got {g.tolist()}")
            parts = {}
            if g is not None:
                parts[name] = g.to(torch.long)
                for field_name in with_grid:
                    if sample.get(field_name) is not None:
                        parts[field_name] = sample[field_name]
                    elif g.shape[0]:  # a grid of no rows (a text-only sample given the key) asks for no pixels
                        lacking[field_name].append(d)
            parts = {key: _vision_part(key, value, d, device, vision[key]) for key, value in parts.items()}
            _check_grid_matches(d, name, g, doc_types, kind, with_grid[0], parts.get(with_grid[0]))
            for key, part in parts.items():
                vision[key].append(part)
        ids.append(doc_ids.contiguous())
        labels.append(doc_labels.contiguous())
        types.append(doc_types.contiguous())
        mrope.append(pos[:, 0].contiguous())
        lengths.append(L)
        if grid is not None:
            image_order += [(d, i) for i in range(grid.shape[0])]
        if vgrid is not None:
            video_order += [(d, i) for i in range(vgrid.shape[0])]
    total = sum(lengths)
    if max_tokens is not None and total > max_tokens:
        raise ValueError(f"the samples hold {total} tokens, more than max_tokens = {max_tokens} "
                         "(plan the bins with plan_packing first)")
    for name, kind in (("pixel_values", "image"), ("pixel_values_videos", "video"), ("second_per_grid_ts", "video")):
        _all_or_none(name, vision[name], lacking[name], kind)
    present = [name for name in VISION_FIELDS if vision[name]]
    # Every document's token fields and every vision field's rows in one call (one launch, or
    # its C++ twin for CPU samples).
    input_ids, labels_row, types_row, position_ids, joined = PACK_TOKENS(
        device, None, ids, labels, types, mrope, ignore_index, device, [vision[name] for name in present])
    joined = dict(zip(present, joined))
    image_grid = joined.get("image_grid_thw")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(lengths, device=device).cumsum(0)
    vision_cu = None
    if image_grid is not None:
        frames = torch.repeat_interleave(image_grid[:, 1] * image_grid[:, 2], image_grid[:, 0])
        vision_cu = torch.nn.functional.pad(frames.cumsum(0, dtype=torch.int32), (1, 0))
    return PackedBatch(
        input_ids=input_ids, labels=labels_row, position_ids=position_ids,
        mm_token_type_ids=types_row, cu_seqlens=cu, max_seqlen=max(lengths), doc_lengths=lengths,
        **{name: joined.get(name) for name in VISION_FIELDS}, vision_cu_seqlens=vision_cu,
        image_order=image_order, video_order=video_order,
        padding_ratio=0.0 if max_tokens is None else 1.0 - total / max_tokens)


def unpack(packed: PackedBatch, tensor: torch.Tensor, dim: int | None = None) -> list[torch.Tensor]:
    """Split a tensor over the packed row back into per-document tensors.

    ``dim`` is the token dimension; by default dimension 1 when ``tensor`` is (1, T, ...)
    (logits, hidden states), else dimension 0 ((T, ...)); position ids (4, 1, T) take ``dim=-1``.
    """
    if not isinstance(packed, PackedBatch):
        raise TypeError(f"expected packed to be a PackedBatch (what pack_multimodal returns), got "
                        f"{type(packed).__name__}")
    check_tensor("tensor", tensor)
    if dim is not None:
        check_int("dim", dim, minimum=-max(tensor.dim(), 1), maximum=max(tensor.dim(), 1) - 1)
    T = sum(packed.doc_lengths)
    if dim is None:
        if tensor.dim() >= 2 and tensor.shape[0] == 1 and tensor.shape[1] == T:
            dim = 1
        elif tensor.dim() >= 1 and tensor.shape[0] == T:
            dim = 0
        else:
            raise ValueError(f"expected a tensor of shape (1, {T}, ...) or ({T}, ...) (the packed row), "
                             f"got {tuple(tensor.shape)}; pass dim= for other layouts")
    if tensor.shape[dim] != T:
        raise ValueError(f"expected tensor dimension {dim} of size {T} (the packed row), got {tuple(tensor.shape)}")
    return list(torch.split(tensor, packed.doc_lengths, dim=dim))

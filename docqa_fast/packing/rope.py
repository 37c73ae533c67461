"""M-RoPE position ids (Qwen2-VL / Qwen2.5-VL ``get_rope_index``) without a per-image host sync.

transformers walks every document and every image in Python with a host sync per image
(``.tolist()``, ``.item()``, ``max`` of grid tensors). This module validates a call and
computes each video's time step; the positions come from one of two implementations chosen by
the dispatch table (:mod:`.ops`): the extension's chunked scan (:mod:`.rope_extension`; CUDA
kernels, or their C++ twin on CPU tensors: the data loader's path) or whole-batch tensor ops
(:mod:`.rope_tensor`; without the extension, for a video time step multiplied in half
precision, and under ``torch.compile``).

The installed transformers (5.x) has ``get_rope_index`` as a method of ``Qwen2VLModel`` /
``Qwen2_5_VLModel`` taking ``(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
[second_per_grid_ts,] attention_mask)`` and reading ``spatial_merge_size`` and
``tokens_per_second`` from the config; this function takes those two as keywords.

Video time changed in transformers 5.18: up to 5.17 a video's temporal index is scaled by
``tokens_per_second * int(second_per_grid_ts)`` (the seconds truncated first: 0.5 s per grid
step gives every frame the same temporal position), from 5.18 the product
``t * tokens_per_second * second_per_grid_ts`` is truncated instead. ``video_time_rounding``
picks either; ``patch_transformers_rope_index`` (docqa_fast.integrations.transformers) finds
which one the method it replaces uses by running it once.
"""

from __future__ import annotations

import torch

from .._validation import check_int, check_same_device, check_tensor, value_checks_enabled
from .ops import GET_ROPE_INDEX, INT_DTYPES
from .rope_tensor import IMAGE, TEXT, VIDEO  # noqa: F401  (the type ids, for callers)

_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# "floor_product": transformers >= 5.18; "truncate_seconds": transformers 5.x up to 5.17.
VIDEO_TIME_ROUNDINGS = ("floor_product", "truncate_seconds")



def _check_grid(name, grid, device):
    if grid is None:
        return None
    check_tensor(name, grid, ndims=(2,))
    if grid.shape[-1] != 3:
        raise ValueError(f"expected {name} of shape (n, 3) (t, h, w per item), got {tuple(grid.shape)}")
    if grid.dtype.is_floating_point or grid.dtype == torch.bool:
        raise TypeError(f"expected {name} of an integer dtype, got {grid.dtype}")
    return grid.to(device=device, dtype=torch.long)


def get_rope_index(input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw=None,
                   video_grid_thw=None, second_per_grid_ts=None, attention_mask=None, *,
                   spatial_merge_size: int = 2, tokens_per_second: float | None = None,
                   model_type: str = "qwen2_5_vl", video_time_rounding: str = "floor_product",
                   check: bool = True):
    """M-RoPE ``(position_ids (3, B, T), mrope_position_deltas (B, 1))``, as transformers computes them.

    Args:
        input_ids: (B, T) token ids (only their shape, dtype and device matter).
        mm_token_type_ids: (B, T) 0 text, 1 image, 2 video; each maximal run of 1s (2s) is one
            image (video), taking the next row of ``image_grid_thw`` (``video_grid_thw``).
        image_grid_thw, video_grid_thw: (n, 3) ViT patch grids (t, h, w).
        second_per_grid_ts: (n_videos,) seconds per temporal grid step (Qwen2.5-VL).
        attention_mask: (B, T), 0 at padding (left or right); padding keeps position 0.
        spatial_merge_size: the vision config's merge size (2 for Qwen2-VL / 2.5-VL).
        tokens_per_second: the vision config's value (Qwen2.5-VL); ``None`` = 2, its default
            in the released checkpoints. Ignored for ``model_type="qwen2_vl"``.
        model_type: ``"qwen2_5_vl"`` (video time scaled by ``tokens_per_second *
            second_per_grid_ts``) or ``"qwen2_vl"`` (temporal index as is).
        video_time_rounding: how a Qwen2.5-VL video's temporal index ``t`` becomes a position
            offset, following one transformers version or the other (both bit for bit):
            ``"floor_product"`` (default; transformers >= 5.18) truncates the product
            ``t * (tokens_per_second * second_per_grid_ts)``, multiplied in the seconds' dtype
            (bf16 seconds round as bf16); ``"truncate_seconds"`` (transformers up to 5.17)
            truncates the seconds first: ``t * tokens_per_second * int(second_per_grid_ts)``,
            so with ``tokens_per_second=2`` a 0.5 s step gives every frame offset 0 and 1.5 s
            gives 0, 2, 4, ... (``"floor_product"``: 0, 1, 2, ... and 0, 3, 6, ...). Without
            ``second_per_grid_ts`` both scale by ``tokens_per_second``. Ignored for
            ``model_type="qwen2_vl"``. :func:`patch_transformers_rope_index` detects which one
            the method it replaces uses.
        check: verify (one host sync for the whole batch) that every vision run has
            exactly t*h*w / merge**2 tokens and that there are grids for every run; with
            ``check=False`` nothing syncs and a bad input gives wrong positions, never an
            out-of-bounds access.
    """
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"expected model_type in {_MODEL_TYPES}, got {model_type!r}")
    if video_time_rounding not in VIDEO_TIME_ROUNDINGS:
        raise ValueError(f"expected video_time_rounding in {VIDEO_TIME_ROUNDINGS}, got {video_time_rounding!r}")
    check_tensor("input_ids", input_ids, dtypes=INT_DTYPES, ndims=(2,))
    check_tensor("mm_token_type_ids", mm_token_type_ids, dtypes=INT_DTYPES, ndims=(2,))
    check_same_device(("input_ids", "mm_token_type_ids"), (input_ids, mm_token_type_ids))
    if mm_token_type_ids.shape != input_ids.shape:
        raise ValueError(f"expected mm_token_type_ids of shape {tuple(input_ids.shape)} (the shape of input_ids), "
                         f"got {tuple(mm_token_type_ids.shape)}")
    check_int("spatial_merge_size", spatial_merge_size, minimum=1)
    if check and value_checks_enabled() and mm_token_type_ids.numel():
        low, high = torch.stack(torch.aminmax(mm_token_type_ids)).tolist()  # one host sync
        if low < TEXT or high > VIDEO:  # another type would be read as text: wrong positions, silently
            raise ValueError(f"expected mm_token_type_ids in {{{TEXT}, {IMAGE}, {VIDEO}}} (text, image, video), "
                             f"got values from {low} to {high}")
    device = input_ids.device
    B, T = input_ids.shape
    image_grid = _check_grid("image_grid_thw", image_grid_thw, device)
    video_grid = _check_grid("video_grid_thw", video_grid_thw, device)
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndims=(2,))
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"expected attention_mask of shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device)

    steps = _video_steps(video_grid, second_per_grid_ts, tokens_per_second, model_type, video_time_rounding,
                         device)
    return GET_ROPE_INDEX(device, None, input_ids, mm_token_type_ids, image_grid, video_grid, steps,
                          attention_mask, spatial_merge_size, model_type, second_per_grid_ts, check)


def _video_steps(video_grid, second_per_grid_ts, tokens_per_second, model_type, rounding, device):
    """Per second_per_grid_ts entry (or per video grid without seconds): the step transformers
    multiplies a video's temporal index by, in the dtype the product is taken in (it is then
    truncated). Stays on ``device``: a copy to the host would be a sync on CUDA tensors.
    """
    n = 0 if video_grid is None else video_grid.shape[0]
    if model_type != "qwen2_5_vl":
        return torch.ones(n, dtype=torch.long, device=device)
    tps = 2 if tokens_per_second is None else tokens_per_second
    # arange(t) * a Python number: an int keeps int64 (exact), a float gives the default
    # dtype, the number rounded to it before the product (float32 unless changed).
    number_dtype = torch.long if isinstance(tps, int) else torch.get_default_dtype()
    if second_per_grid_ts is None:
        # Both versions use 1 second per grid step: the step is tokens_per_second itself.
        return torch.full((n,), tps, dtype=number_dtype, device=device)
    check_tensor("second_per_grid_ts", second_per_grid_ts, ndims=(1,))
    seconds = second_per_grid_ts.detach().to(device)
    if rounding == "truncate_seconds":
        # Up to 5.17: tokens_per_second * int(seconds), a Python number. int() truncates
        # toward zero, as trunc() does in float64 (which holds any bf16/fp16/fp32 value
        # exactly), so half-precision seconds need no half-precision product here. (5.17
        # itself fails on a float tokens_per_second, its meshgrid mixing float and int64; a
        # float one is multiplied as a Python float would be, then rounded like 5.18's.)
        return (seconds.to(torch.float64).trunc() * tps).to(number_dtype)
    # From 5.18: tokens_per_second * a 0-d tensor of the seconds, in the seconds' dtype.
    return tps * seconds

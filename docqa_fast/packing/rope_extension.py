"""``get_rope_index`` through the extension (``csrc/packing/mrope*``, ``extension`` backend).

On CUDA tensors the row is cut into 256 chunks, each chunk summarised (tokens, text tokens,
runs started, where the last run started), the summaries scanned, each chunk then walked from
its exact prefix; a run's start position comes from prefix sums of the grids' advances: two
kernels (one block per row, a thread per chunk; the first also sums the advances), nothing
else launched, no host sync unless ``check``. On CPU tensors (the data loader) each row is
walked once, in order, by the same functions (``csrc/packing/mrope.h``); the chunked scan's
C++ twin stays callable (``chunked=True``) for the tests that pin the kernels' logic.
"""

from __future__ import annotations

import torch

from .._backend import extension
from .._validation import value_checks_enabled
from .rope_tensor import real_tokens

_IN_PLACE_MASKS = (torch.bool, torch.int32, torch.int64)


def rope_index_extension(input_ids, mm_token_type_ids, image_grid, video_grid, steps, attention_mask,
                         spatial_merge_size, model_type, second_per_grid_ts, check):
    """(position_ids (3, B, T), mrope_position_deltas (B, 1)) of validated inputs (see rope.py)."""
    device = input_ids.device
    # The extension reads int32/int64 type ids and bool/int32/int64 masks in place.
    types = mm_token_type_ids.to(device) if mm_token_type_ids.dtype in (torch.int32, torch.int64) \
        else mm_token_type_ids.to(device=device, dtype=torch.long)
    mask = attention_mask if attention_mask is not None and attention_mask.dtype in _IN_PLACE_MASKS \
        else real_tokens(attention_mask, input_ids)
    empty = torch.zeros(0, 3, dtype=torch.long, device=device)
    n = 0 if video_grid is None else video_grid.shape[0]
    if steps.shape[0] < n:
        raise ValueError(f"expected second_per_grid_ts with at least {n} entries (one per video grid), "
                         f"got {steps.shape[0]}")
    # The kernels take float64 steps (exact for int64 and float32 ones) and multiply in
    # float32 when transformers does (float32 steps), else in float64 (exact for integers).
    positions, deltas, status = extension().mrope_position_ids(
        types, mask, empty if image_grid is None else image_grid,
        empty if video_grid is None else video_grid, steps.to(torch.float64), steps.dtype == torch.float32,
        spatial_merge_size)
    if check and value_checks_enabled():
        _check_status(status.tolist(), image_grid, video_grid, input_ids.shape[1])  # the kernels' status: one host sync
    return (positions if input_ids.dtype == torch.long else positions.to(input_ids.dtype)), deltas.unsqueeze(1)


def _check_status(rows, image_grid, video_grid, T):
    """Per-row status of the extension (image runs, video runs, bad runs, first bad run's end
    column, length, expected length) against the grids given."""
    n_img, n_vid = sum(r[0] for r in rows), sum(r[1] for r in rows)
    n_img_grids = 0 if image_grid is None else image_grid.shape[0]
    n_vid_grids = 0 if video_grid is None else video_grid.shape[0]
    if n_img > n_img_grids:
        raise ValueError(f"mm_token_type_ids has {n_img} image runs but image_grid_thw has {n_img_grids} rows "
                         "(image tokens without a grid)")
    if n_vid > n_vid_grids:
        raise ValueError(f"mm_token_type_ids has {n_vid} video runs but video_grid_thw has {n_vid_grids} rows "
                         "(video tokens without a grid)")
    for b, (_, _, bad, col, length, expected) in enumerate(rows):
        if bad:
            where = f"at the end of row {b}" if col == T else f"before column {col} of row {b}"
            raise ValueError(f"a vision run ending {where} has {length} tokens, but its grid gives t*h*w/merge**2 = "
                             f"{expected} (token counts do not match image_grid_thw / video_grid_thw)")

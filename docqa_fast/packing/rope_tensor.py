"""``get_rope_index`` in whole-batch tensor ops: the implementation without the extension
(``reference`` backend), and the one traced under ``torch.compile``.

Per row: compact the real tokens to the front (padding keeps position 0), find the vision runs
and which grid each takes (a running count per modality), then one exclusive prefix sum of
each token's advance (+1 per text token, +max(h, w) at a run's last token) gives every
run's start position; a token's (t, h, w) offsets inside its run follow from its column.
No host sync unless ``check`` (one, for the whole batch).
"""

from __future__ import annotations

import torch

from .._validation import value_checks_enabled

TEXT, IMAGE, VIDEO = 0, 1, 2


def _grid_rows(grid: torch.Tensor | None, run_number: torch.Tensor) -> torch.Tensor:
    """grid[run_number] per token, clamped so a bad count can never index out of bounds."""
    if grid is None or grid.shape[0] == 0:
        return torch.ones(*run_number.shape, 3, dtype=torch.long, device=run_number.device)
    return grid[run_number.clamp(0, grid.shape[0] - 1)]


def real_tokens(attention_mask, input_ids):
    """(B, T) bool: the non-padding tokens (every token without a mask)."""
    if attention_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def rope_index_tensor(input_ids, mm_token_type_ids, image_grid, video_grid, steps, attention_mask,
                      spatial_merge_size, model_type, second_per_grid_ts, check):
    """(position_ids (3, B, T), mrope_position_deltas (B, 1)) of validated inputs (see rope.py)."""
    device = input_ids.device
    B, T = input_ids.shape
    keep = real_tokens(attention_mask, input_ids)
    # 1. Compact: real token j of row b moves to column slot[b, j]; the tail is padding (-1).
    types_in = mm_token_type_ids.to(device=device, dtype=torch.long)
    lengths = keep.sum(1)  # (B,)
    slot = torch.where(keep, keep.long().cumsum(1) - 1, T)  # padding goes to a spill column
    types = torch.full((B, T + 1), -1, dtype=torch.long, device=device)
    types.scatter_(1, slot, torch.where(keep, types_in, -1))
    types = types[:, :T]
    col = torch.arange(T, device=device)
    real = col < lengths[:, None]

    # 2. Vision runs and which grid row each one takes.
    is_vis = (types == IMAGE) | (types == VIDEO)
    prev = torch.cat([torch.full((B, 1), -1, dtype=torch.long, device=device), types[:, :-1]], 1)
    nxt = torch.cat([types[:, 1:], torch.full((B, 1), -1, dtype=torch.long, device=device)], 1)
    starts = is_vis & (types != prev)
    ends = is_vis & (types != nxt)
    # run number in batch order (row-major), per modality; every token of a run gets its start's.
    img_no = (starts & (types == IMAGE)).flatten().cumsum(0).view(B, T) - 1
    vid_no = (starts & (types == VIDEO)).flatten().cumsum(0).view(B, T) - 1
    start_col = torch.where(starts, col, 0).cummax(1).values  # column of the current run's start
    grid = torch.where((types == VIDEO)[..., None], _grid_rows(video_grid, vid_no), _grid_rows(image_grid, img_no))
    gt = grid[..., 0]
    gh = grid[..., 1] // spatial_merge_size
    gw = grid[..., 2] // spatial_merge_size

    # 3. Running position: +1 per text token, +max(h, w) on a run's last token.
    advance = torch.where(is_vis, torch.where(ends, torch.maximum(gh, gw), 0), real.long())
    before = advance.cumsum(1) - advance  # exclusive cumulative sum
    run_pos = before.gather(1, start_col)  # p at the run's start (equal to `before` inside it)

    # 4. Offsets inside the run -> (t, h, w).
    offset = col - start_col
    hw = (gh * gw).clamp_min(1)
    ti = offset // hw
    hi = (offset // gw.clamp_min(1)) % gh.clamp_min(1)
    wi = offset % gw.clamp_min(1)
    if model_type == "qwen2_5_vl" and video_grid is not None:
        # transformers' arithmetic: t times the step, in the step's dtype, truncated.
        step = steps if steps.shape[0] else torch.ones(1, dtype=steps.dtype, device=device)
        t_scaled = (ti * step[vid_no.clamp(0, step.shape[0] - 1)]).long()
        t_pos = torch.where(types == VIDEO, t_scaled, ti)
    else:
        t_pos = ti
    vis_pos = torch.stack([run_pos + t_pos, run_pos + hi, run_pos + wi])
    compact = torch.where(is_vis, vis_pos, before.expand(3, B, T))
    compact = torch.where(real, compact, 0)

    if check and value_checks_enabled():
        _check_runs(types, starts, ends, col, start_col, gt * gh * gw, img_no, vid_no, image_grid, video_grid,
                    second_per_grid_ts, model_type)

    # Back to the original columns; padding keeps 0.
    gathered = compact.gather(2, slot.clamp_max(T - 1).expand(3, B, T)) if T else compact
    position_ids = torch.where(keep, gathered, 0).to(input_ids.dtype)
    # A row of padding only has no positions: delta 0, as the reference and the extension give.
    deltas = torch.where(lengths > 0, compact.amax(dim=(0, 2)) + 1 - lengths, 0) if T else torch.zeros_like(lengths)
    return position_ids, deltas.unsqueeze(1)


def _check_runs(types, starts, ends, col, start_col, run_tokens, img_no, vid_no, image_grid, video_grid,
                second_per_grid_ts, model_type):
    """One host sync for the whole batch: run lengths against grids, grid counts against runs."""
    run_len = torch.where(ends, col - start_col + 1, 0)
    bad_len = ends & (run_len != run_tokens)
    n_img = (starts & (types == IMAGE)).sum()
    n_vid = (starts & (types == VIDEO)).sum()
    stats = torch.stack([bad_len.sum(), n_img, n_vid]).tolist()
    if stats[1] > (0 if image_grid is None else image_grid.shape[0]):
        raise ValueError(f"mm_token_type_ids has {stats[1]} image runs but image_grid_thw has "
                         f"{0 if image_grid is None else image_grid.shape[0]} rows (image tokens without a grid)")
    if stats[2] > (0 if video_grid is None else video_grid.shape[0]):
        raise ValueError(f"mm_token_type_ids has {stats[2]} video runs but video_grid_thw has "
                         f"{0 if video_grid is None else video_grid.shape[0]} rows (video tokens without a grid)")
    if (model_type == "qwen2_5_vl" and second_per_grid_ts is not None and stats[2]
            and second_per_grid_ts.shape[0] < stats[2]):
        raise ValueError(f"expected second_per_grid_ts with at least {stats[2]} entries (one per video), "
                         f"got {second_per_grid_ts.shape[0]}")
    if stats[0]:
        b, c = bad_len.nonzero()[0].tolist()
        raise ValueError(f"a vision run ending at column {c} (compacted) of row {b} has {int(run_len[b, c])} tokens, "
                         f"but its grid gives t*h*w/merge**2 = {int(run_tokens[b, c])} "
                         "(token counts do not match image_grid_thw / video_grid_thw)")

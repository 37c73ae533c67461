"""``vision_window_index``: Qwen2.5-VL's window reordering of merged vision tokens, vectorised.

The vision tower attends inside square windows of ``window_size // merge // patch`` merged
tokens on most blocks, so it permutes the tokens window by window first. transformers builds
that permutation with a Python loop over images (pad, reshape, filter the -100s). Here every
token's place is closed-form: in a frame of ``h x w`` merged tokens cut into windows of side
``v``, token (r, c) lies in window (r // v, c // v); the windows above its window row hold
``(r // v) * v * w`` tokens, those to its left in the same band ``(c // v) * v * bh`` (``bh``
the band's height), and inside its window it is number ``(r % v) * ww + c % v`` (``ww`` the
window's width). One scatter then writes the whole permutation.
"""

from __future__ import annotations

import torch

from .._validation import check_int, check_tensor


def _ceil_div(a, b):
    return (a + b - 1) // b


def vision_window_index(grid_thw: torch.Tensor, window_size: int = 112, patch_size: int = 14,
                        spatial_merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(window_index, cu_window_seqlens)`` as Qwen2.5-VL's vision tower computes them.

    Args:
        grid_thw: (n, 3) integer ViT patch grids (t, h, w) of the images / videos, in order;
            h and w must be multiples of ``spatial_merge_size``.
        window_size, patch_size, spatial_merge_size: the vision config's values (112, 14, 2).

    Returns:
        ``window_index`` (int64, one entry per merged token: the source token of each place
        in window order) and ``cu_window_seqlens`` (int32, window boundaries counted in ViT
        patches, starting at 0), both on ``grid_thw``'s device. (transformers returns its
        ``window_index`` on the CPU.) One host sync, for the output size.
    """
    check_tensor("grid_thw", grid_thw, ndims=(2,))
    if grid_thw.shape[-1] != 3 or grid_thw.dtype.is_floating_point or grid_thw.dtype == torch.bool:
        raise ValueError(f"expected grid_thw of an integer dtype and shape (n, 3), got {grid_thw.dtype} "
                         f"{tuple(grid_thw.shape)}")
    for name, value in (("window_size", window_size), ("patch_size", patch_size),
                        ("spatial_merge_size", spatial_merge_size)):
        check_int(name, value, minimum=1)  # before dividing by them
    side = window_size // spatial_merge_size // patch_size
    if side < 1:
        raise ValueError(f"expected window_size // spatial_merge_size // patch_size >= 1, got window_size="
                         f"{window_size}, patch_size={patch_size}, spatial_merge_size={spatial_merge_size}")
    device = grid_thw.device
    grid = grid_thw.to(torch.long)
    m = spatial_merge_size
    t, h, w = grid[:, 0], grid[:, 1] // m, grid[:, 2] // m
    tokens = t * h * w
    nwh, nww = _ceil_div(h, side), _ceil_div(w, side)
    windows = t * nwh * nww
    bad = ((grid[:, 1] % m != 0) | (grid[:, 2] % m != 0) | (grid < 0).any(1)).sum()
    total_tokens, total_windows, n_bad = torch.stack([tokens.sum(), windows.sum(), bad]).tolist()
    if n_bad:
        raise ValueError(f"expected grid_thw with non-negative entries and h, w divisible by spatial_merge_size="
                         f"{m} (t*h*w divisible by {m * m}), got {grid_thw.tolist()}")
    n = grid.shape[0]
    image_ids = torch.arange(n, device=device)

    # Every merged token, in natural (frame, row, column) order.
    img = torch.repeat_interleave(image_ids, tokens, output_size=total_tokens)
    base = tokens.cumsum(0) - tokens
    src = torch.arange(total_tokens, device=device)
    local = src - base[img]
    hi, wi = h[img], w[img]
    frame, rem = local // (hi * wi).clamp_min(1), local % (hi * wi).clamp_min(1)
    r, c = rem // wi.clamp_min(1), rem % wi.clamp_min(1)
    wr, wc = r // side, c // side
    band_h = torch.clamp(hi - wr * side, max=side)
    win_w = torch.clamp(wi - wc * side, max=side)
    dest = (base[img] + frame * hi * wi + wr * side * wi + wc * side * band_h
            + (r - wr * side) * win_w + (c - wc * side))
    window_index = torch.empty(total_tokens, dtype=torch.long, device=device)
    window_index.scatter_(0, dest, src)

    # Every window, in order: its size in ViT patches.
    wimg = torch.repeat_interleave(image_ids, windows, output_size=total_windows)
    wlocal = torch.arange(total_windows, device=device) - (windows.cumsum(0) - windows)[wimg]
    per_frame = (nwh * nww)[wimg].clamp_min(1)
    k = wlocal % per_frame
    wr, wc = k // nww[wimg].clamp_min(1), k % nww[wimg].clamp_min(1)
    sizes = torch.clamp(h[wimg] - wr * side, max=side) * torch.clamp(w[wimg] - wc * side, max=side) * (m * m)
    cu = torch.zeros(total_windows + 1, dtype=torch.int32, device=device)
    cu[1:] = sizes.cumsum(0).to(torch.int32)
    return window_index, cu

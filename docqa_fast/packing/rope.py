"""M-RoPE position ids (Qwen2-VL / Qwen2.5-VL ``get_rope_index``) without a per-image host sync.

transformers walks every document and every image in Python with a host sync per image
(``.tolist()``, ``.item()``, ``max`` of grid tensors). Two implementations here:

* ``cuda`` -- the extension (``csrc/packing/mrope*``): the row is cut into 256 chunks, each
  chunk summarised (tokens, text tokens, runs started, where the last run started), the
  summaries scanned, each chunk then walked from its exact prefix; a run's start position
  comes from prefix sums of the grids' advances. On CUDA tensors two kernels (one block per
  row, a thread per chunk), no host sync unless ``check=True``; on CPU tensors (the data
  loader) the C++ twin runs the same functions (``csrc/packing/mrope.h``). Chosen in eager
  mode whenever the extension is built (its CUDA kernels for CUDA tensors).
* ``reference`` (``DOCQA_FAST_BACKEND=reference``, no extension, a video time step multiplied
  in half precision -- see ``video_time_rounding`` -- or under ``torch.compile``): a few
  whole-batch tensor ops, no host sync unless ``check=True``.

The installed transformers (5.x) has ``get_rope_index`` as a method of ``Qwen2VLModel`` /
``Qwen2_5_VLModel`` taking ``(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
[second_per_grid_ts,] attention_mask)`` and reading ``spatial_merge_size`` and
``tokens_per_second`` from the config; this function takes those two as keywords.

Video time changed in transformers 5.18: up to 5.17 a video's temporal index is scaled by
``tokens_per_second * int(second_per_grid_ts)`` (the seconds truncated first: 0.5 s per grid
step gives every frame the same temporal position), from 5.18 the product
``t * tokens_per_second * second_per_grid_ts`` is truncated instead. ``video_time_rounding``
picks either; :func:`patch_transformers_rope_index` finds which one the method it replaces
uses by running it once.
"""

from __future__ import annotations

import inspect
import types
import warnings

import torch

from .._validation import check_tensor, value_checks_enabled

_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# "floor_product": transformers >= 5.18; "truncate_seconds": transformers 5.x up to 5.17.
VIDEO_TIME_ROUNDINGS = ("floor_product", "truncate_seconds")
TEXT, IMAGE, VIDEO = 0, 1, 2


def _check_grid(name, grid, device):
    if grid is None:
        return None
    check_tensor(name, grid, ndims=(2,))
    if grid.shape[-1] != 3:
        raise ValueError(f"expected {name} of shape (n, 3) (t, h, w per item), got {tuple(grid.shape)}")
    if grid.dtype.is_floating_point or grid.dtype == torch.bool:
        raise TypeError(f"expected {name} of an integer dtype, got {grid.dtype}")
    return grid.to(device=device, dtype=torch.long)


def _grid_rows(grid: torch.Tensor | None, run_number: torch.Tensor) -> torch.Tensor:
    """grid[run_number] per token, clamped so a bad count can never index out of bounds."""
    if grid is None or grid.shape[0] == 0:
        return torch.ones(*run_number.shape, 3, dtype=torch.long, device=run_number.device)
    return grid[run_number.clamp(0, grid.shape[0] - 1)]


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
    check_tensor("input_ids", input_ids, ndims=(2,))
    check_tensor("mm_token_type_ids", mm_token_type_ids, ndims=(2,))
    if mm_token_type_ids.shape != input_ids.shape:
        raise ValueError(f"expected mm_token_type_ids of shape {tuple(input_ids.shape)} (the shape of input_ids), "
                         f"got {tuple(mm_token_type_ids.shape)}")
    if spatial_merge_size < 1:
        raise ValueError(f"expected spatial_merge_size >= 1, got {spatial_merge_size}")
    device = input_ids.device
    B, T = input_ids.shape
    image_grid = _check_grid("image_grid_thw", image_grid_thw, device)
    video_grid = _check_grid("video_grid_thw", video_grid_thw, device)
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndims=(2,))
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"expected attention_mask of shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        keep = attention_mask.to(device)
        keep = keep if keep.dtype == torch.bool else keep != 0
    else:
        keep = torch.ones(B, T, dtype=torch.bool, device=device)

    steps = _video_steps(video_grid, second_per_grid_ts, tokens_per_second, model_type, video_time_rounding,
                         device)
    # The extension multiplies t by a step in float32 or float64 (exact for integer steps); a
    # step in half precision (bf16 seconds under "floor_product", or a half default dtype)
    # rounds in ways only the tensor path mirrors.
    half_steps = steps.dtype in (torch.float16, torch.bfloat16)
    # Under torch.compile the tensor path is traced into the graph (the extension call is not
    # a registered op and would break the graph); eagerly, the extension runs.
    if not half_steps and not torch.compiler.is_compiling() and _use_extension(device):
        # The extension reads int32/int64 type ids and bool/int32/int64 masks in place.
        types_ext = mm_token_type_ids.to(device) if mm_token_type_ids.dtype in (torch.int32, torch.int64) \
            else mm_token_type_ids.to(device=device, dtype=torch.long)
        mask_ext = keep if attention_mask is None or attention_mask.dtype not in (torch.bool, torch.int32, torch.int64) \
            else attention_mask.to(device)
        return _rope_index_ext(input_ids, types_ext, image_grid, video_grid, steps, mask_ext, spatial_merge_size,
                               check)

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


def _use_extension(device: torch.device) -> bool:
    """Whether this call runs the extension (``cuda`` backend) rather than the tensor ops.

    CUDA tensors follow the project's dispatch (the extension's CUDA kernels when built).
    CPU tensors also take the extension when it is built: its C++ twin is the data loader's
    fast path. ``DOCQA_FAST_BACKEND=reference`` keeps the tensor path (how the tests cover
    it on CPU tensors); ``=cuda`` requires the extension and raises, saying why, without it.
    """
    from .._backend import choose_backend

    return choose_backend("get_rope_index", device, ("cuda",), cpu_twin=True) == "cuda"


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


def _rope_index_ext(input_ids, mm_token_type_ids, image_grid, video_grid, steps, keep, spatial_merge_size, check):
    from .._backend import extension

    device = input_ids.device
    empty = torch.zeros(0, 3, dtype=torch.long, device=device)
    n = 0 if video_grid is None else video_grid.shape[0]
    if steps.shape[0] < n:
        raise ValueError(f"expected second_per_grid_ts with at least {n} entries (one per video grid), "
                         f"got {steps.shape[0]}")
    # The kernels take float64 steps (exact for int64 and float32 ones) and multiply in
    # float32 when transformers does (float32 steps), else in float64 (exact for integers).
    positions, deltas, status = extension().mrope_position_ids(
        mm_token_type_ids, keep, empty if image_grid is None else image_grid,
        empty if video_grid is None else video_grid, steps.to(torch.float64), steps.dtype == torch.float32,
        spatial_merge_size)
    if check and value_checks_enabled():
        _check_status(status.tolist(), image_grid, video_grid, input_ids.shape[1])  # the one host sync
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


def patch_transformers_rope_index(*model_classes) -> list[type]:
    """Replace ``get_rope_index`` of transformers' Qwen2-VL / Qwen2.5-VL models with ours.

    With no arguments patches ``Qwen2VLModel`` and ``Qwen2_5_VLModel`` (those importable);
    returns the classes patched. The replacement reads ``spatial_merge_size`` and
    ``tokens_per_second`` from ``self.config.vision_config`` like the original, and keeps
    its signature. A method taking ``second_per_grid_ts`` (Qwen2.5-VL) is first run once on a
    tiny video (:func:`detect_video_time_rounding`) and the replacement uses the
    ``video_time_rounding`` it shows, so patching never changes a position; when that is the
    old ``"truncate_seconds"`` (transformers <= 5.17) a warning says so. Undo with
    :func:`unpatch_transformers_rope_index`.
    """
    if not model_classes:
        model_classes = []
        for module, name in (("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLModel"),
                             ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel")):
            try:
                model_classes.append(getattr(__import__(module, fromlist=[name]), name))
            except (ImportError, AttributeError):
                continue
    patched = []
    for cls in model_classes:
        original = cls.__dict__.get("get_rope_index")
        if original is None:
            raise TypeError(f"{cls.__name__} has no get_rope_index method to replace")
        if getattr(original, "_docqa_fast_original", None) is not None:
            patched.append(cls)
            continue
        # Qwen2.5-VL's method takes the seconds per grid step, Qwen2-VL's does not.
        if "second_per_grid_ts" in inspect.signature(original).parameters:
            rounding = detect_video_time_rounding(cls)
            if rounding == "truncate_seconds":
                warnings.warn(f"{cls.__name__}.get_rope_index truncates second_per_grid_ts to whole seconds before "
                              "scaling video time (transformers <= 5.17; 5.18 truncates the product instead): the "
                              "replacement does the same (video_time_rounding='truncate_seconds'), so videos with "
                              "fractional seconds per grid step keep these coarser temporal positions",
                              stacklevel=2)
            get_rope_index_fast = _qwen2_5_vl_method(rounding)
        else:
            get_rope_index_fast = _qwen2_vl_method()
        get_rope_index_fast._docqa_fast_original = original
        get_rope_index_fast.__doc__ = original.__doc__
        cls.get_rope_index = get_rope_index_fast
        patched.append(cls)
    return patched


def detect_video_time_rounding(model_class) -> str:
    """The ``video_time_rounding`` of ``model_class.get_rope_index`` (transformers' Qwen2.5-VL
    signature), found by running it once on a tiny input where the two differ.

    The probe: a text token then one video of grid (t=2, h=2, w=2) (one token per frame after
    the 2x2 merge), 0.5 s per grid step, ``tokens_per_second=2``: frame 1 is at offset
    floor(1 * 2 * 0.5) = 1 under ``"floor_product"`` and 1 * 2 * int(0.5) = 0 under
    ``"truncate_seconds"``. Raises ``ValueError`` when the method gives neither.
    """
    original = inspect.getattr_static(model_class, "get_rope_index", None)
    if original is None:
        raise TypeError(f"expected model_class with a get_rope_index method, got {model_class!r}")
    original = getattr(original, "_docqa_fast_original", original)  # an already patched class: its original
    if isinstance(original, (staticmethod, classmethod)):
        original = original.__func__
    probe = {
        "input_ids": torch.zeros(1, 3, dtype=torch.long),
        "mm_token_type_ids": torch.tensor([[TEXT, VIDEO, VIDEO]], dtype=torch.int32),
        "image_grid_thw": None,
        "video_grid_thw": torch.tensor([[2, 2, 2]]),
        "second_per_grid_ts": torch.tensor([0.5]),
        "attention_mask": None,
    }
    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2))
    try:
        theirs = original(_ProbeModel(model_class, config), **probe)[0]
    except Exception as exc:  # noqa: BLE001 -- whatever it raises, it cannot be reproduced
        raise TypeError(f"could not run {model_class.__name__}.get_rope_index on a one-video probe "
                        f"(Qwen2.5-VL's signature expected): {exc}") from exc
    for rounding in VIDEO_TIME_ROUNDINGS:
        ours = get_rope_index(**probe, spatial_merge_size=2, tokens_per_second=2, video_time_rounding=rounding)[0]
        if torch.equal(torch.as_tensor(theirs).to(ours.dtype), ours):
            return rounding
    raise ValueError(f"{model_class.__name__}.get_rope_index gives positions {torch.as_tensor(theirs).tolist()} "
                     f"on a one-video probe, which no video_time_rounding in {VIDEO_TIME_ROUNDINGS} reproduces")


class _ProbeModel:
    """A stand-in ``self`` for a model class's ``get_rope_index``: a config, and the class's
    other attributes bound to the stand-in (``self.get_vision_position_ids`` in transformers 5.x),
    so the probe needs no model weights."""

    def __init__(self, model_class, config):
        self._model_class = model_class
        self.config = config

    def __getattr__(self, name):
        attr = inspect.getattr_static(self._model_class, name)  # AttributeError when absent
        return attr.__get__(self, self._model_class) if hasattr(attr, "__get__") else attr


def _qwen2_5_vl_method(video_time_rounding):
    # Qwen2_5_VLModel.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
    #                                second_per_grid_ts, attention_mask, **kwargs)
    def get_rope_index_fast(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                            second_per_grid_ts=None, attention_mask=None, **kwargs):
        vision = self.config.vision_config
        return get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                              attention_mask, spatial_merge_size=vision.spatial_merge_size,
                              tokens_per_second=vision.tokens_per_second, model_type="qwen2_5_vl",
                              video_time_rounding=video_time_rounding)

    return get_rope_index_fast


def _qwen2_vl_method():
    # Qwen2VLModel.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
    #                             attention_mask, **kwargs): no second_per_grid_ts.
    def get_rope_index_fast(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                            attention_mask=None, **kwargs):
        return get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, None, attention_mask,
                              spatial_merge_size=self.config.vision_config.spatial_merge_size, model_type="qwen2_vl")

    return get_rope_index_fast


def unpatch_transformers_rope_index(*model_classes) -> None:
    """Restore the original ``get_rope_index`` of classes patched by :func:`patch_transformers_rope_index`."""
    if not model_classes:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        model_classes = (Qwen2VLModel, Qwen2_5_VLModel)
    for cls in model_classes:
        current = cls.__dict__.get("get_rope_index")
        original = getattr(current, "_docqa_fast_original", None)
        if original is not None:
            cls.get_rope_index = original

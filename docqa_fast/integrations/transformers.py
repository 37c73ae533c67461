"""A transformers attention backend: ``attn_implementation="docqa_fast"``.

``register()`` adds ``"docqa_fast"`` to transformers' public registries
(``AttentionInterface`` for the attention function, ``AttentionMaskInterface`` for the mask
it needs), so any model that dispatches attention through them -- Llama, Mistral, Qwen2,
Qwen2-VL, Qwen2.5-VL among them -- runs on our kernels::

    from docqa_fast.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="docqa_fast")

Like transformers' own flash-attention path, the mask handed to the function is the 2-D
padding mask (or None when nothing is padded). Per call:

* ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments (a padding-free collator, or a
  model that passes them) -> the varlen kernel over the flattened batch;
* a padding mask -> the padded rows are dropped, the varlen kernel runs, the rows go back;
* ``position_ids`` that restart inside a single flattened row (packed documents) -> varlen
  with the boundaries read from them (one host sync, as in transformers);
* otherwise -> the dense kernel.

Vision towers. transformers' Qwen2-VL and Qwen2.5-VL vision attention hands its per-image (and
per-window) ``cu_seqlens`` to the attention function only when the implementation's name
contains "flash" (``is_flash_attention_requested``); for any other name it splits q/k/v per image
in Python and calls the function once per image (a host sync and one launch each). So
``register()`` also registers the alias ``"docqa_fast_flash"`` (the same function) and makes
those vision towers resolve ``"docqa_fast"`` to it, at construction (``from_pretrained``,
``from_config``, a direct constructor) and in ``set_attn_implementation``: the user keeps writing
``attn_implementation="docqa_fast"``, the vision sub-config reads ``"docqa_fast_flash"`` and every
vision layer makes ONE varlen call over all images. Only the vision towers' configs change; the
text model keeps ``"docqa_fast"`` and its path. The alias never goes through
``_check_and_adjust_attn_implementation`` under its own name, which would make transformers try
to load a flash-attention package or hub kernel for it.

M-RoPE positions. ``patch_transformers_rope_index()`` swaps docqa_fast's vectorised
:func:`docqa_fast.packing.get_rope_index` into ``Qwen2VLModel`` / ``Qwen2_5_VLModel`` (their
public ``get_rope_index`` method), keeping the video time rounding of the method it replaces
(:func:`detect_video_time_rounding` runs it once); ``unpatch_transformers_rope_index()``
restores it. The same functions are importable from :mod:`docqa_fast.packing`.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import types
import warnings

import torch
import torch.nn.functional as F

from ..flash_attn_interface import flash_attn_func, flash_attn_varlen_func
from ..packing.rope import VIDEO_TIME_ROUNDINGS, get_rope_index
from ..packing.rope_tensor import TEXT, VIDEO

NAME = "docqa_fast"
# The alias the vision towers resolve NAME to. It must contain "flash" (what transformers tests to
# pass cu_seqlens), no digit after "flash" (``is_flash_attention_requested(version=N)`` reads one),
# and none of "flash_attention_", "sdpa", "flex_attention", "paged|", "/", ":", which select other
# transformers code paths.
VISION_NAME = "docqa_fast_flash"

# Vision towers whose attention takes transformers' flash branch (one call with cu_seq_lens_q/k,
# max_length_q/k) when their config names a "flash" implementation: (module, class).
VARLEN_VISION_TOWERS = (
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
)


def _window(sliding_window):
    # transformers counts the current token in the window: a window of W sees W - 1 keys back.
    return (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _max_length(value) -> int:
    return int(value)


def _packed_boundaries(position_ids: torch.Tensor):
    """cu_seqlens of the documents in one flattened row whose positions restart, or None."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    positions = position_ids[0]
    starts = (positions == positions.min()).nonzero().flatten()
    if starts.numel() < 2:
        return None
    return torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)


def _trim_unfilled_cache(k, v, query_length, position_ids):
    """Drop a static cache's unfilled slots when no mask says where they start.

    With no padding, ``generate`` passes no mask for non-flash implementations, while a static
    cache hands over all ``max_cache_len`` slots; the tokens seen so far are the positions up to
    the current one. Only plain (B, S) position ids are read (one host sync); 3-D M-RoPE
    positions do not count keys.
    """
    if query_length >= k.shape[1] or position_ids is None or position_ids.dim() != 2:
        return k, v
    seen = int(position_ids.max()) + 1
    return (k[:, :seen], v[:, :seen]) if seen < k.shape[1] else (k, v)


def docqa_fast_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                 sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention-function contract: (B, H, S, D) in, ((B, S, H, D) out, None)."""
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='docqa_fast' does not return attention weights; use 'eager'")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by attn_implementation='docqa_fast'")
    batch, query_length = query.shape[0], query.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("attn_implementation='docqa_fast' takes the 2-D padding mask that its registered "
                             f"mask function builds, got a mask of shape {tuple(attention_mask.shape)}")
        # A static cache is longer than the tokens seen so far; the mask covers just those.
        k, v = k[:, : attention_mask.shape[1]], v[:, : attention_mask.shape[1]]
    else:
        k, v = _trim_unfilled_cache(k, v, query_length, kwargs.get("position_ids"))
    causal = module.is_causal if is_causal is None else is_causal
    options = dict(dropout_p=dropout if module.training else 0.0, softmax_scale=scaling,
                   causal=bool(causal) and not (query_length == 1), window_size=_window(sliding_window),
                   softcap=softcap or 0.0)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q = kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max())
        max_k = kwargs.get("max_length_k") or int((cu_k[1:] - cu_k[:-1]).max())
        out = flash_attn_varlen_func(*(t.reshape(-1, *t.shape[-2:]) for t in (q, k, v)), cu_q.to(torch.int32),
                                     cu_k.to(torch.int32), _max_length(max_q), _max_length(max_k), **options)
        return out.view(batch, query_length, *out.shape[-2:]), None

    if attention_mask is not None:
        keep_k = attention_mask[:, -k.shape[1]:].bool()
        keep_q = keep_k[:, -query_length:] if query_length > 1 else torch.ones_like(keep_k[:, :1])
        lengths_q, lengths_k = keep_q.sum(-1), keep_k.sum(-1)
        rows_q = keep_q.flatten().nonzero().flatten()
        out = flash_attn_varlen_func(q.reshape(-1, *q.shape[-2:])[rows_q], k[keep_k], v[keep_k],
                                     _cu_seqlens(lengths_q), _cu_seqlens(lengths_k), int(lengths_q.max()),
                                     int(lengths_k.max()), **options)
        padded = out.new_zeros(batch * query_length, *out.shape[-2:])
        padded[rows_q] = out
        return padded.view(batch, query_length, *out.shape[-2:]), None

    boundaries = _packed_boundaries(kwargs.get("position_ids")) if batch == 1 else None
    if boundaries is not None:
        longest = int((boundaries[1:] - boundaries[:-1]).max())
        out = flash_attn_varlen_func(q[0], k[0], v[0], boundaries, boundaries, longest, longest, **options)
        return out[None], None

    return flash_attn_func(q, k, v, **options), None


# Set while a routed tower runs transformers' own _check_and_adjust_attn_implementation, which calls
# get_correct_attn_implementation and then imports a flash package for any "flash" name it returns.
_RESOLVING = contextvars.ContextVar("docqa_fast_resolving_attn_implementation", default=False)


def _route_vision_tower(cls) -> bool:
    """Make ``cls`` (a vision tower PreTrainedModel) resolve NAME to VISION_NAME. Idempotent."""
    if cls.__dict__.get("_docqa_fast_routed", False):
        return True
    check = getattr(cls, "_check_and_adjust_attn_implementation", None)
    correct = getattr(cls, "get_correct_attn_implementation", None)
    if not callable(check) or not callable(correct):
        return False  # an unknown transformers: the tower keeps calling us once per image (correct, slower)

    @functools.wraps(check)
    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        # Our alias is checked as our own name: under a "flash" name transformers would load a flash package.
        requested = NAME if attn_implementation == VISION_NAME else attn_implementation
        token = _RESOLVING.set(True)
        try:
            resolved = check(self, requested, *args, **kwargs)
        finally:
            _RESOLVING.reset(token)
        return VISION_NAME if resolved == NAME else resolved

    @functools.wraps(correct)
    def get_correct_attn_implementation(self, requested_attention, *args, **kwargs):
        resolved = correct(self, requested_attention, *args, **kwargs)
        return VISION_NAME if resolved == NAME and not _RESOLVING.get() else resolved

    cls._check_and_adjust_attn_implementation = _check_and_adjust_attn_implementation
    cls.get_correct_attn_implementation = get_correct_attn_implementation
    cls._docqa_fast_routed = True
    return True


def register() -> None:
    """Make ``attn_implementation="docqa_fast"`` available to every transformers model.

    Also registers ``"docqa_fast_flash"`` (the same function) and routes the Qwen2-VL / Qwen2.5-VL
    vision towers to it, so that their per-image ``cu_seqlens`` reach one varlen call per layer.
    Call it before building the model: a tower built earlier keeps what it resolved then (call
    ``model.set_attn_implementation("docqa_fast")`` to re-resolve it).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, docqa_fast_attention_forward)
    # The flash-attention mask: None when nothing is padded, else the 2-D padding mask.
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    # The vision alias: the same function; the mask entry only matters if a text config is pointed at it.
    AttentionInterface.register(VISION_NAME, docqa_fast_attention_forward)
    AttentionMaskInterface.register(VISION_NAME, flash_attention_mask)
    for module_name, class_name in VARLEN_VISION_TOWERS:
        try:
            tower = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # this transformers has no such model
        _route_vision_tower(tower)


# -------------------------------------------------------------- get_rope_index (M-RoPE)

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

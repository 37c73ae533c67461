"""Visual-token packing: the data path of a long-document VLM from samples to the model.

* :func:`plan_packing` -- bin-pack samples into rows of ``max_tokens`` (C++ planner in
  ``docqa_fast._C``, O(n log n); ``docqa_fast.reference.plan_packing_ref`` gives the same bins).
* :func:`get_rope_index` -- Qwen2-VL / Qwen2.5-VL M-RoPE position ids, vectorised, no
  per-image host sync; :func:`patch_transformers_rope_index` swaps it into transformers.
* :func:`merge_visual_tokens` -- the ``masked_scatter`` merge of visual features, as a
  custom op with a sync-free path and gather-only backward.
* :func:`vision_window_index` -- Qwen2.5-VL's vision-tower window permutation, vectorised.
* :func:`pack_multimodal` / :class:`PackedBatch` / :func:`unpack` -- one bin of documents as
  one padding-free row (4-row packed M-RoPE positions, boundary-safe labels, cu_seqlens).
"""

from .merge import merge_visual_tokens
from .packed import PackedBatch, pack_multimodal, unpack
from .planner import plan_packing
from .rope import get_rope_index
from .window import vision_window_index

__all__ = ["PackedBatch", "detect_video_time_rounding", "get_rope_index", "pack_multimodal", "unpack", "merge_visual_tokens", "patch_transformers_rope_index", "plan_packing",
           "unpatch_transformers_rope_index", "vision_window_index"]


# The transformers patch lives with the other transformers coupling
# (docqa_fast.integrations.transformers); these names stay importable from here, resolved on
# first use so this family does not import the integrations layer above it.
_FROM_INTEGRATIONS = ("detect_video_time_rounding", "patch_transformers_rope_index", "unpatch_transformers_rope_index")


def __getattr__(name):
    if name in _FROM_INTEGRATIONS:
        from ..integrations import transformers as integration

        return getattr(integration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

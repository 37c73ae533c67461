"""docqa_fast: fused Triton and CUDA kernels for long-context, image-heavy document QA models.

Public ops are drop-in replacements for the reference pieces of a VLM training and serving
stack; each dispatches per call to the CUDA extension, a Triton kernel or the pure-PyTorch
reference (see :func:`backends` and ``DOCQA_FAST_BACKEND``); training attention may also run
torch's cuDNN attention where a GPU's tuned table measured it faster (see
:func:`explain_attention` and ``DOCQA_FAST_ATTENTION``).
"""

from ._backend import BACKENDS, backends, dispatch_log, dispatch_table
from ._validation import value_checks
from .attention import scaled_dot_product_attention
from .attention.ops import explain_attention
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .losses import (
    FusedLinearDPOLoss,
    FusedLinearLongPOLoss,
    LinearCrossEntropyLoss,
    dpo_loss,
    linear_cross_entropy,
    linear_logprobs,
    longpo_loss,
    sequence_logprobs,
)
from .merge_attention import merge_attention_states, merge_stacked_attention_states
from .integrations.transformers import patch_transformers_rope_index
from .packing import (
    PackedBatch,
    get_rope_index,
    merge_visual_tokens,
    pack_multimodal,
    plan_packing,
    unpack,
    vision_window_index,
)
from .reward import (
    RewardEnsembleHead,
    RewardOutput,
    aggregate,
    all_pairs_ranking_loss,
    ensemble_rewards,
    pairwise_loss,
    plackett_luce_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "backends", "dispatch_log", "dispatch_table", "value_checks", "__version__",
    "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "scaled_dot_product_attention",
    "flash_attn_with_kvcache", "explain_attention",
    "merge_attention_states", "merge_stacked_attention_states",
    "linear_logprobs", "linear_cross_entropy", "sequence_logprobs", "dpo_loss", "longpo_loss",
    "LinearCrossEntropyLoss", "FusedLinearDPOLoss", "FusedLinearLongPOLoss",
    "PackedBatch", "get_rope_index", "merge_visual_tokens", "pack_multimodal", "patch_transformers_rope_index",
    "plan_packing", "unpack", "vision_window_index",
    "RewardEnsembleHead", "RewardOutput", "aggregate", "all_pairs_ranking_loss", "ensemble_rewards",
    "pairwise_loss", "plackett_luce_loss",
]


def __getattr__(name):
    # docqa_fast.distributed (context parallelism) loads on first use: most users never need it.
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Pure-PyTorch ground truth for every op: readable, fp32 accumulation, the exact semantics.

These are the test oracles and the CPU fallback; the fast paths must match them.
"""

from .attention import attention_backward_ref, attention_ref
from .kvcache import append_kv_ref, apply_rotary_ref, flash_attn_with_kvcache_ref
from .losses import (
    dpo_loss_ref,
    fused_linear_dpo_loss_ref,
    fused_linear_longpo_loss_ref,
    linear_cross_entropy_ref,
    linear_logits_ref,
    linear_logprobs_ref,
    longpo_loss_ref,
    sequence_logprobs_ref,
)
from .packing import get_rope_index_ref, merge_visual_tokens_ref, plan_packing_ref, vision_window_index_ref
from .merge_attention import merge_attention_states_ref, merge_stacked_attention_states_ref
from .reward import ReferenceRewardEnsemble, aggregate_ref, last_token_index_ref

__all__ = ["get_rope_index_ref", "merge_visual_tokens_ref", "plan_packing_ref", "vision_window_index_ref","append_kv_ref", "apply_rotary_ref", "flash_attn_with_kvcache_ref","dpo_loss_ref", "fused_linear_dpo_loss_ref", "fused_linear_longpo_loss_ref", "linear_cross_entropy_ref",
           "linear_logits_ref", "linear_logprobs_ref", "longpo_loss_ref", "sequence_logprobs_ref","ReferenceRewardEnsemble", "attention_backward_ref", "attention_ref", "aggregate_ref", "last_token_index_ref", "merge_attention_states_ref",
           "merge_stacked_attention_states_ref"]

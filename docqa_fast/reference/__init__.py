"""Pure-PyTorch ground truth for every op: readable, fp32 accumulation, the exact semantics.

These are the test oracles and the CPU fallback; the fast paths must match them.
"""

from .attention import attention_backward_ref, attention_ref
from .merge_attention import merge_attention_states_ref, merge_stacked_attention_states_ref
from .reward import ReferenceRewardEnsemble, aggregate_ref, last_token_index_ref

__all__ = ["ReferenceRewardEnsemble", "attention_backward_ref", "attention_ref", "aggregate_ref", "last_token_index_ref", "merge_attention_states_ref",
           "merge_stacked_attention_states_ref"]

"""Merging partial attention results by their log-sum-exp (split-KV decoding, ring attention).

``merge_attention_states(out_a, lse_a, out_b, lse_b)`` combines two partial results over
disjoint key sets; ``merge_stacked_attention_states(outs, lses)`` combines n of them stacked
along a new first dimension (the split-KV combine). Layouts are flash-attn's:

=====================  ===================  ==================
input                  out                  lse (fp32, natural log)
=====================  ===================  ==================
dense                  (B, S, H, D)         (B, H, S)
packed (varlen)        (T, H, D)            (H, T)
=====================  ===================  ==================

``out`` is fp16, bf16 or fp32 (the result has its dtype); the last dimension must be
contiguous, other strides are free. A part with no keys has lse = -inf (flash-attn's +inf
for such rows is accepted as the same): merging with it returns the other part unchanged,
and when every part is empty the result is out = 0, lse = -inf -- never NaN. Both ops are
``torch.library`` custom ops (``docqa_fast::merge_attention_states``,
``docqa_fast::merge_stacked_attention_states``) with fake implementations and autograd.
"""

from .ops import merge_attention_states, merge_stacked_attention_states

__all__ = ["merge_attention_states", "merge_stacked_attention_states"]

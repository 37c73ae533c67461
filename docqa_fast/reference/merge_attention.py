"""Reference merge of partial attention results by log-sum-exp.

Layouts as flash-attn returns them: out (B, S, H, D) with lse (B, H, S), or packed
out (T, H, D) with lse (H, T); stacked forms put the parts first: (n, ...).
A part with no keys has lse = -inf (or +inf, which flash-attn reports for such rows):
it gets weight 0, and a row whose parts are all empty gives out = 0, lse = -inf.
"""

import torch


def _lse_to_out_layout(lse: torch.Tensor) -> torch.Tensor:
    """(..., H, S) LSE -> (..., S, H, 1) so it broadcasts against (..., S, H, D) outputs."""
    return lse.transpose(-1, -2).unsqueeze(-1)


def merge_stacked_attention_states_ref(outs: torch.Tensor, lses: torch.Tensor):
    """Merge n partial results: outs (n, ..., S, H, D), lses (n, ..., H, S) -> (out, lse).

    Accumulates in fp32 (fp64 when given fp64, for exact comparisons); out keeps outs' dtype.
    """
    acc_dtype = torch.float64 if torch.float64 in (outs.dtype, lses.dtype) else torch.float32
    lses = lses.to(acc_dtype)
    lses = torch.where(lses == float("inf"), float("-inf"), lses)
    lse_max = lses.amax(dim=0)
    # Shift by 0 where every part is empty so exp(-inf - shift) is 0 instead of NaN.
    shift = torch.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = torch.exp(lses - shift)
    total = weights.sum(dim=0)
    empty = total == 0
    lse = torch.where(empty, float("-inf"), shift + torch.log(total))
    weights = weights / torch.where(empty, 1.0, total)
    weights = _lse_to_out_layout(weights)
    # Empty parts may hold anything (even NaN); they contribute nothing.
    contributions = torch.where(weights > 0, outs.to(acc_dtype) * weights, 0.0)
    return contributions.sum(dim=0).to(outs.dtype), lse


def merge_attention_states_ref(out_a, lse_a, out_b, lse_b):
    """Merge two partial results over disjoint key sets -> (out, lse)."""
    return merge_stacked_attention_states_ref(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))

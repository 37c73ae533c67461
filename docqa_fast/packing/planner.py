"""``plan_packing``: which samples share one packed row (C++ planner, Python reference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import PLAN_PACKING, STRATEGY_CODES

STRATEGIES = tuple(STRATEGY_CODES)
# split_long returns a Python list of spans: a sample of 10^12 tokens in rows of 1 would ask for
# 10^12 of them (the reference ran without bound, the C++ planner's allocation was killed).
MAX_PIECES = 1 << 24


def _lengths_tensor(lengths) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1:
            raise ValueError(f"expected 1-D lengths, got shape {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"expected lengths of an integer dtype, got {lengths.dtype}")
        return lengths.detach().to("cpu", torch.int64)
    if not isinstance(lengths, Sequence) and not hasattr(lengths, "__array__"):
        raise TypeError(f"expected lengths to be a sequence of ints or a 1-D tensor, got {type(lengths).__name__}")
    try:
        out = torch.as_tensor(lengths)  # its own dtype first: floats are refused, not truncated
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"expected lengths to be a sequence of ints, got {lengths!r:.80}") from exc
    if out.dim() != 1:
        raise ValueError(f"expected 1-D lengths, got shape {tuple(out.shape)}")
    if out.numel() and (out.dtype.is_floating_point or out.dtype.is_complex or out.dtype == torch.bool):
        raise TypeError(f"expected lengths of integers, got {out.dtype} values {out.tolist()[:8]}")
    return out.to(torch.int64)


def plan_packing(lengths, max_tokens: int, *, strategy: str = "bfd", split_long: bool = False):
    """Bin-pack samples of the given token ``lengths`` into rows of at most ``max_tokens``.

    Args:
        lengths: token count per sample (a sequence of ints, a NumPy array or a 1-D integer tensor).
        max_tokens: capacity of a packed row (> 0).
        strategy: ``"bfd"`` (best-fit decreasing: fewest rows in practice), ``"ffd"``
            (first-fit decreasing) or ``"greedy"`` (next fit in sample order: keeps neighbours
            together, e.g. for curricula).
        split_long: a sample longer than ``max_tokens`` raises ``ValueError`` unless this is
            set; then it is cut into full ``max_tokens`` pieces and a remainder, each packed
            as an item of its own.

    Returns:
        A list of bins in the order they were opened, each a list of sample indices in the
        order they were placed. With ``split_long=True`` each entry is a ``(sample, start,
        stop)`` token span instead. Identical to :func:`docqa_fast.reference.plan_packing_ref`.

    Runs the C++ planner of ``docqa_fast._C`` (O(n log n)) when the extension is built, the
    Python reference otherwise (or when ``DOCQA_FAST_BACKEND=reference``).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise TypeError(f"expected max_tokens to be an int, got {type(max_tokens).__name__}")
    if max_tokens <= 0:
        raise ValueError(f"expected max_tokens > 0, got {max_tokens}")
    if strategy not in STRATEGY_CODES:
        raise ValueError(f"expected strategy in {STRATEGIES}, got {strategy!r}")
    if not isinstance(split_long, bool):
        raise TypeError(f"expected split_long to be a bool, got {type(split_long).__name__}")
    lengths_t = _lengths_tensor(lengths)
    if split_long and lengths_t.numel():
        pieces = int(((lengths_t.clamp_min(0) + max_tokens - 1) // max_tokens).sum())
        if pieces > MAX_PIECES:
            raise ValueError(f"expected lengths that split into at most {MAX_PIECES} pieces of max_tokens = "
                             f"{max_tokens}, got {pieces}")
    # The planner runs on the CPU whatever device the lengths came from; its C++ code is the
    # CPU fast path, and DOCQA_FAST_BACKEND still forces either implementation.
    return PLAN_PACKING(torch.device("cpu"), None, lengths_t, max_tokens, strategy, split_long)

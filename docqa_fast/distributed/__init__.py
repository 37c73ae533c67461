"""Context parallelism: one long sequence across ranks of a ``torch.distributed`` group.

ring-flash-attn's API over docqa_fast's kernels (swap the import line): ring attention in the
contiguous and the load-balanced zigzag layouts, dense and packed (varlen, with the global
``cu_seqlens``), causal or not, GQA, sliding windows, softcap, forward and backward; Ulysses
(all-to-all heads <-> sequence); the Ulysses x ring hybrid with its process-group layout
(:func:`setup_context_parallel`); helpers to shard a batch and gather the loss, and a
transformers attention backend ``"docqa_fast_cp"`` (:mod:`.transformers`). Every call first
checks, with one small all_gather, that all ranks agree on shapes, dtypes and options and that
none failed its own checks: a mistake raises :class:`ContextParallelError` on every rank instead
of a hang. See docs/distributed.md.
"""

from ._comm import ContextParallelError
from .plan import RingPlan, ring_plan
from .ring import (
    gather_sequence,
    ring_flash_attn_func,
    ring_flash_attn_varlen_func,
    split_sequence,
    zigzag_gather,
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_varlen_func,
    zigzag_split,
)
from .ulysses import (
    ContextParallel,
    ring_layout,
    setup_context_parallel,
    ulysses_flash_attn_func,
    ulysses_flash_attn_varlen_func,
)

__all__ = [
    "ContextParallel", "ContextParallelError", "RingPlan", "gather_sequence", "ring_flash_attn_func",
    "ring_flash_attn_varlen_func", "ring_layout", "ring_plan", "setup_context_parallel", "split_sequence",
    "ulysses_flash_attn_func", "ulysses_flash_attn_varlen_func", "zigzag_gather", "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_varlen_func", "zigzag_split",
]

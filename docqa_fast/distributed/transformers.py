"""Context parallelism for transformers models: the attention backend ``"docqa_fast_cp"`` and
the helpers that shard a batch and gather the loss.

::

    from docqa_fast.distributed import setup_context_parallel
    from docqa_fast.distributed.transformers import context_parallel, register, shard_batch, sequence_loss

    register()                                    # "docqa_fast_cp" joins transformers' AttentionInterface
    layout = setup_context_parallel(ulysses_degree=1, ring_degree=world)
    model.set_attn_implementation({"text_config": "docqa_fast_cp", "vision_config": "docqa_fast"})
    local = shard_batch(layout, inputs_embeds=embeds, position_ids=positions, labels=labels, cu_seqlens=cu)
    with context_parallel(layout):
        hidden = model.model.language_model(inputs_embeds=local["inputs_embeds"],
                                            position_ids=local["position_ids"], **local["attention_kwargs"])
    loss = sequence_loss(model.lm_head(hidden.last_hidden_state), local["labels"], layout)

Each rank runs the model on its shard of the sequence; only attention talks to the other
ranks (ring / Ulysses / both, as the layout says), so everything else -- MLPs, norms, rotary
embeddings on the shard's own position ids -- is unchanged. The backward needs no context:
the ring remembers its group. Packed documents: pass the *global* ``cu_seq_lens_q/k``
(``shard_batch`` returns them as ``attention_kwargs``); a padding mask is not supported (pack
instead). Vision towers see whole images: run them outside the context-parallel region (every
rank, or data parallel) and shard the merged embeddings.

Gradients: :func:`sequence_loss` returns the global mean over all ranks' tokens through a
differentiable all-reduce, whose backward sums the ranks' upstream gradients -- each rank's
parameter gradients are then P times its share, and *averaging* them over the context-parallel
ranks (what FSDP2's ``fully_shard`` and DDP do over a mesh that includes them) gives exactly the
single-process gradients.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._comm import AllReduceSum
from .ulysses import ContextParallel, ring_layout

NAME = "docqa_fast_cp"
IGNORE_INDEX = -100

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("docqa_fast_context_parallel", default=None)


def _as_layout(layout) -> ContextParallel:
    if isinstance(layout, ContextParallel):
        return layout
    return ring_layout(layout)  # a process group (or None: the default group) -> a zigzag ring over it


@contextlib.contextmanager
def context_parallel(layout=None):
    """Run ``"docqa_fast_cp"`` attention inside the block over ``layout`` (a
    :class:`ContextParallel`, or a process group for a zigzag ring over it; None: the default
    group)."""
    token = _ACTIVE.set(_as_layout(layout))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def context_parallel_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                       sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers' attention-function contract over this rank's shard: (B, H, s, D) in,
    ((B, s, H, D), None) out."""
    from ..integrations.transformers import _window

    layout = _ACTIVE.get()
    if layout is None:
        raise RuntimeError(f"attn_implementation={NAME!r} runs inside `with context_parallel(layout):` "
                           "(docqa_fast.distributed.transformers), which names the ranks that share the sequence")
    if kwargs.get("output_attentions", False):
        raise ValueError(f"attn_implementation={NAME!r} does not return attention weights")
    if attention_mask is not None:
        raise ValueError(f"attn_implementation={NAME!r} takes no padding mask: pack the batch (one row, "
                         "cu_seq_lens_q/k over the global sequence) instead of padding it")
    if module.training and dropout:
        raise ValueError(f"attn_implementation={NAME!r} does not support attention dropout (got {dropout})")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    causal = module.is_causal if is_causal is None else is_causal
    options = dict(softmax_scale=scaling, causal=bool(causal), window_size=_window(sliding_window),
                   softcap=softcap or 0.0)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if q.shape[0] != 1:
            raise ValueError(f"expected one packed row with cu_seq_lens_q, got a batch of {q.shape[0]}")
        cu = cu_q.to(torch.int32)
        longest = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
        out = layout.attention(q[0], k[0], v[0], cu_seqlens=cu, max_seqlen=int(longest), **options)
        return out[None], None
    return layout.attention(q, k, v, **options), None


def register() -> None:
    """Add ``attn_implementation="docqa_fast_cp"`` to transformers (and ``"docqa_fast"``, for
    the vision tower, through :func:`docqa_fast.integrations.transformers.register`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from ..integrations.transformers import register as register_docqa_fast

    register_docqa_fast()
    AttentionInterface.register(NAME, context_parallel_attention_forward)
    # flash-attention's mask: None when nothing is padded (the only case this backend takes).
    AttentionMaskInterface.register(NAME, flash_attention_mask)


# ------------------------------------------------------------------------- sharding a batch

def shifted_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets aligned with the inputs (what causal-LM losses shift internally),
    computed on the full sequence before sharding: position t's target is token t + 1, and the
    last token of each packed document (and of the row) gets IGNORE_INDEX."""
    shifted = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].long() - 1
        shifted[..., ends[ends >= 0]] = IGNORE_INDEX
    return shifted


def shard_batch(layout, *, input_ids=None, inputs_embeds=None, position_ids=None, labels=None,
                cu_seqlens=None) -> dict:
    """This rank's shard of a full-sequence batch, as the model takes it.

    ``input_ids`` / ``labels`` (B, S) and ``inputs_embeds`` (B, S, hidden) split along S;
    ``position_ids`` (B, S), or M-RoPE's (3, B, S) (or transformers' 4-row variant), along their
    last dimension; ``labels`` are shifted first (:func:`shifted_labels`, documents respected):
    compute the loss on the returned ones without shifting again. ``cu_seqlens`` (the global
    document boundaries of a packed row, B = 1) comes back unsharded as ``attention_kwargs``
    (``cu_seq_lens_q/k``, ``max_length_q/k``) for the model call. S must be divisible by the
    layout's size (x2 for its zigzag ring).
    """
    layout = _as_layout(layout)
    local = {}
    if input_ids is not None:
        local["input_ids"] = layout.split(input_ids, 1)
    if inputs_embeds is not None:
        local["inputs_embeds"] = layout.split(inputs_embeds, 1)
    if position_ids is not None:
        local["position_ids"] = layout.split(position_ids, position_ids.dim() - 1)
    if labels is not None:
        local["labels"] = layout.split(shifted_labels(labels, cu_seqlens), 1)
    kwargs = {}
    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    local["attention_kwargs"] = kwargs
    return local


def local_cu_seqlens(layout, cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The document boundaries *within this rank's shard* (int32, starting at 0): where the
    global documents of a packed row of ``total`` tokens start and end in the local tokens, each
    shard chunk cut at its edges -- for per-document work on the shard (losses per document,
    packing statistics). The attention itself takes the global ``cu_seqlens``."""
    positions = layout.split(torch.arange(total, device=cu_seqlens.device)[None], 1)[0]
    document = torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = (document[1:] != document[:-1]) | (positions[1:] != positions[:-1] + 1)
    return F.pad(starts.nonzero().flatten().to(torch.int32), (0, 1), value=positions.numel())


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, layout) -> torch.Tensor:
    """The mean next-token cross-entropy over every rank's tokens (labels already shifted, as
    :func:`shard_batch` returns them), the same value on every rank; see the module docstring
    for how its gradients add up."""
    layout = _as_layout(layout)
    local_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().to(torch.float32)
    if layout.size == 1:
        return local_sum / count.clamp(min=1)
    dist.all_reduce(count, group=layout.cp_group)
    return AllReduceSum.apply(local_sum, layout.cp_group) / count.clamp(min=1)

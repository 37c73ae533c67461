"""flash-attn's padding helpers: from a padded batch to the packed (varlen) layout and back.

``from flash_attn.bert_padding import unpad_input, pad_input, index_first_axis`` becomes
``from docqa_fast.bert_padding import ...`` with the same signatures and return values
(flash-attn 2.6+: ``unpad_input`` returns five values), ``unpad_input_for_concatenated_sequences``
included. Gathers and scatters of whole rows in
PyTorch, differentiable; the only host sync is ``unpad_input``'s ``max_seqlen`` (an int, as
flash-attn returns it).
"""

from __future__ import annotations

import torch

from ._validation import check_int, check_same_device, check_tensor, value_checks_enabled

__all__ = ["index_first_axis", "pad_input", "unpad_input", "unpad_input_for_concatenated_sequences"]

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def index_first_axis(input, indices):
    """``input[indices]`` along the first axis: input (N, ...), indices (n,) int -> (n, ...)."""
    check_tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"expected input with at least 2 dimensions (rows, ...), got shape {tuple(input.shape)}")
    check_tensor("indices", indices, dtypes=(torch.int64, torch.int32), ndims=(1,))
    check_same_device(("input", "indices"), (input, indices))
    _check_index_range(indices, input.shape[0], "input's rows")
    return input[indices]


def _check_index_range(indices, size: int, what: str) -> None:
    """Value check (one host sync; eager only): indices in [0, size). A negative index would wrap
    around silently, one past the end fails inside torch with a message that names nothing (on
    CUDA, a device-side assert)."""
    if value_checks_enabled() and indices.numel():
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= size:
            raise ValueError(f"expected indices in [0, {size}) ({what}), got values from {low} to {high}")


def pad_input(hidden_states, indices, batch, seqlen):
    """The packed rows back to (batch, seqlen, ...), zeros where nothing was packed.

    hidden_states (total_nnz, ...); indices (total_nnz,) positions in the flattened batch (what
    :func:`unpad_input` returned)."""
    check_tensor("hidden_states", hidden_states)
    check_tensor("indices", indices, dtypes=(torch.int64, torch.int32), ndims=(1,))
    check_same_device(("hidden_states", "indices"), (hidden_states, indices))
    if indices.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"expected indices with one entry per row of hidden_states ({hidden_states.shape[0]}), "
                         f"got {indices.shape[0]}")
    batch, seqlen = check_int("batch", batch), check_int("seqlen", seqlen)
    _check_index_range(indices, batch * seqlen, "positions in the flattened (batch, seqlen)")
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_put((indices.long(),), hidden_states)  # differentiable, no in-place write on a leaf
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """(hidden_states (total_nnz, ...), indices, cu_seqlens (batch + 1,) int32, max_seqlen_in_batch
    (int), seqused (batch,) int32) of a padded batch.

    hidden_states (batch, seqlen, ...); attention_mask (batch, seqlen), nonzero for real tokens;
    unused_mask (batch, seqlen): tokens that are allocated but unused -- kept in the packed rows
    and counted in cu_seqlens, but not in ``seqused`` (the real tokens per sequence).
    """
    check_tensor("hidden_states", hidden_states)
    if hidden_states.dim() < 2:
        raise ValueError(f"expected hidden_states of shape (batch, seqlen, ...), got {tuple(hidden_states.shape)}")
    masks = [("attention_mask", attention_mask)] + ([("unused_mask", unused_mask)] if unused_mask is not None else [])
    for name, mask in masks:
        check_tensor(name, mask, dtypes=_MASK_DTYPES, ndims=(2,))
        if tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            raise ValueError(f"expected {name} of shape {tuple(hidden_states.shape[:2])} (hidden_states' batch and "
                             f"seqlen), got {tuple(mask.shape)}")
        check_same_device(("hidden_states", name), (hidden_states, mask))
    kept = attention_mask != 0
    if unused_mask is not None:
        kept = kept | (unused_mask != 0)
    lengths = kept.sum(-1, dtype=torch.int32)
    seqused = (attention_mask != 0).sum(-1, dtype=torch.int32)
    indices = kept.flatten().nonzero().flatten()
    cu_seqlens = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    rows = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return rows[indices], indices, cu_seqlens, max_seqlen, seqused


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """(hidden_states (total_nnz, ...), indices, cu_seqlens int32, max_seqlen_in_batch) of a batch
    whose rows each hold several sequences back to back, then padding.

    attention_mask_in_length (batch, seqlen) integer: row b lists the lengths of its sequences
    first, then zeros (``[[2, 3, 0, 0, 0, 0], ...]``: a row whose first 5 tokens are two sequences
    of 2 and 3 tokens). Each sequence becomes its own entry of cu_seqlens, so varlen attention
    never lets them see each other. One host sync, for max_seqlen_in_batch and the lengths' checks.
    """
    check_tensor("hidden_states", hidden_states)
    if hidden_states.dim() < 2:
        raise ValueError(f"expected hidden_states of shape (batch, seqlen, ...), got {tuple(hidden_states.shape)}")
    lengths = attention_mask_in_length
    check_tensor("attention_mask_in_length", lengths, dtypes=_MASK_DTYPES[1:], ndims=(2,))
    if tuple(lengths.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"expected attention_mask_in_length of shape {tuple(hidden_states.shape[:2])} (hidden_states' "
                         f"batch and seqlen), got {tuple(lengths.shape)}")
    check_same_device(("hidden_states", "attention_mask_in_length"), (hidden_states, lengths))
    seqlen = lengths.shape[1]
    row_tokens = lengths.long().sum(-1)
    if lengths.numel() and (bool((lengths < 0).any()) or int(row_tokens.max()) > seqlen):
        raise ValueError(f"expected attention_mask_in_length to hold non-negative sequence lengths summing to at most "
                         f"{seqlen} per row, got {lengths.tolist()}")
    flat = lengths.flatten()
    seqlens = flat[flat != 0].to(torch.int32)  # row-major: each row's sequences in order
    kept = torch.arange(seqlen, device=lengths.device)[None, :] < row_tokens[:, None]
    indices = kept.flatten().nonzero().flatten()
    cu_seqlens = torch.zeros(seqlens.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    cu_seqlens[1:] = seqlens.cumsum(0)
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    rows = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return rows[indices], indices, cu_seqlens, max_seqlen

"""Rotary position embedding with flash-attn's ``apply_rotary_emb`` signature.

``from flash_attn.layers.rotary import apply_rotary_emb`` becomes
``from docqa_fast.rotary import apply_rotary_emb``. One Triton kernel (``kernels/rotary.py``;
the reference, ``docqa_fast.reference.rotary``, on CPU) rotates every (token, head) row at its
position; positions are computed with a few tensor ops (no host sync), dense or varlen.
"""

from __future__ import annotations

import torch

from .._validation import FLOAT_DTYPES, check_last_dim_contiguous, check_same_device, check_tensor
from .._validation import value_checks_enabled
from .ops import rotary_op

__all__ = ["apply_rotary_emb"]


def _check_tables(x, cos, sin):
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndims=(2,))
        check_last_dim_contiguous(name, t)
    if sin.shape != cos.shape:
        raise ValueError(f"expected sin of shape {tuple(cos.shape)} (the shape of cos), got {tuple(sin.shape)}")
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise TypeError(f"expected cos and sin of dtype {x.dtype} (the dtype of x), got {cos.dtype} and {sin.dtype}")
    check_same_device(("x", "cos", "sin"), (x, cos, sin))
    if not 0 < 2 * cos.shape[1] <= x.shape[-1]:
        raise ValueError(f"expected cos of shape (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= {x.shape[-1]} "
                         f"(x's head dim), got {tuple(cos.shape)}")


def _offsets(seqlen_offsets, batch, x):
    """Per-sequence start positions (batch,) int64 on x's device."""
    if isinstance(seqlen_offsets, torch.Tensor):
        check_tensor("seqlen_offsets", seqlen_offsets, dtypes=(torch.int32, torch.int64), ndims=(1,))
        if seqlen_offsets.shape[0] != batch:
            raise ValueError(f"expected seqlen_offsets with {batch} entries (one per sequence), "
                             f"got {tuple(seqlen_offsets.shape)}")
        check_same_device(("x", "seqlen_offsets"), (x, seqlen_offsets))
        return seqlen_offsets.long()
    if isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, int):
        raise TypeError(f"expected seqlen_offsets to be an int or an int32/int64 tensor, got {seqlen_offsets!r}")
    if seqlen_offsets < 0:
        raise ValueError(f"expected seqlen_offsets >= 0, got {seqlen_offsets}")
    return torch.full((batch,), seqlen_offsets, dtype=torch.long, device=x.device)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """x rotated by RoPE, as flash-attn's ``apply_rotary_emb``.

    Args:
        x: (B, S, H, D), or packed (total, H, D) with ``cu_seqlens``; fp16 / bf16 / fp32.
        cos, sin: (seqlen_ro, rotary_dim / 2), x's dtype; the first rotary_dim dims of x rotate.
        interleaved: pairs (2i, 2i + 1) (GPT-J) instead of (i, i + rotary_dim / 2) (GPT-NeoX).
        inplace: write the result into x (and return x).
        seqlen_offsets: an int, or (B,) int tensor: the position of each sequence's first token
            (a KV cache's length when rotating new tokens).
        cu_seqlens: (B + 1,) int32 boundaries of the packed sequences; max_seqlen is accepted for
            flash-attn's signature (positions need no bound here).

    Returns:
        The rotated tensor, shaped like x. Gradients flow to x (not to cos / sin, as in flash-attn).
        Positions past ``seqlen_ro`` are a ``ValueError`` in eager mode (one host sync when
        ``seqlen_offsets`` is a tensor); under torch.compile they are clamped, never read out of bounds.
    """
    varlen = cu_seqlens is not None
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndims=(3,) if varlen else (4,))
    check_last_dim_contiguous("x", x)
    _check_tables(x, cos, sin)
    if varlen:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndims=(1,))
        check_same_device(("x", "cu_seqlens"), (x, cu_seqlens))
        batch, total = cu_seqlens.shape[0] - 1, x.shape[0]
        offsets = _offsets(seqlen_offsets, batch, x)
        tokens = torch.arange(total, device=x.device)
        # The sequence of each token: the number of sequence ends at or before it (no host sync).
        sequence = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True).clamp_max(max(batch - 1, 0))
        positions = tokens - cu_seqlens.long()[sequence] + offsets[sequence] if batch else tokens
        rows = x
    else:
        batch, seqlen = x.shape[:2]
        offsets = _offsets(seqlen_offsets, batch, x)
        positions = (offsets[:, None] + torch.arange(seqlen, device=x.device)[None, :]).reshape(-1)
        rows = x.reshape(batch * seqlen, *x.shape[2:])  # a view unless B and S do not merge
    if value_checks_enabled() and positions.numel() and int(positions.max()) >= cos.shape[0]:
        raise ValueError(f"expected cos / sin with at least {int(positions.max()) + 1} positions "
                         f"(seqlen_offsets + sequence length), got {cos.shape[0]}")
    positions = positions.clamp(0, max(cos.shape[0] - 1, 0))
    out = rotary_op(rows, cos, sin, positions, bool(interleaved), False).view(x.shape)
    if inplace:
        return x.copy_(out)
    return out

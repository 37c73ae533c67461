"""Rotary position embedding with flash-attn's ``apply_rotary_emb`` signature.

``from flash_attn.layers.rotary import apply_rotary_emb`` becomes
``from docqa_fast.rotary import apply_rotary_emb`` (also ``apply_rotary_emb_func``, its older
name, and the in-place ``apply_rotary_emb_qkv_`` / ``apply_rotary_emb_kv_`` for packed q/k/v). ``RotaryEmbedding``
(``flash_attn.layers.rotary``'s module: tables built and grown on use) is in ``embedding.py``. One Triton kernel (``kernels/rotary.py``;
the reference, ``docqa_fast.reference.rotary``, on CPU) rotates every (token, head) row at its
position; positions are computed with a few tensor ops (no host sync), dense or varlen.
"""

from __future__ import annotations

import torch

from .._validation import FLOAT_DTYPES, check_cu_seqlens, check_last_dim_contiguous, check_same_device
from .._validation import check_tensor, value_checks_enabled
from .ops import check_tables, rotary_op

__all__ = ["RotaryEmbedding", "apply_rotary_emb", "apply_rotary_emb_func", "apply_rotary_emb_kv_",
           "apply_rotary_emb_qkv_"]


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
    check_tables(x, cos, sin)
    if varlen:
        # Boundaries: int32 on x's device, 0 ... total, non-decreasing (the values: eager only).
        check_cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x, "x")
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


apply_rotary_emb_func = apply_rotary_emb  # flash-attn's older name for the same function


def _rotate_in_place(name, x, cos, sin, interleaved, seqlen_offsets):
    """Rotates the view x of a packed tensor in place (apply_rotary_emb writes back with copy_,
    so a strided view is updated where it lives)."""
    try:
        apply_rotary_emb(x, cos, sin, interleaved=interleaved, inplace=True, seqlen_offsets=seqlen_offsets)
    except (TypeError, ValueError) as error:  # the slice's messages say "x": say which tensor it was
        raise type(error)(f"{name}: {error}") from None


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0,
                          num_heads_q=None):
    """q and k of a packed qkv rotated in place, as flash-attn's ``apply_rotary_emb_qkv_``; returns qkv.

    Args:
        qkv: (B, S, 3, H, D), or (B, S, Hq + 2 * Hk, D) with ``num_heads_q = Hq`` (grouped heads:
            the query heads, then the key heads, then the value heads). V is left as it is.
        cos, sin: (seqlen_ro, rotary_dim / 2) tables for q (and for k unless cos_k / sin_k are given).
        cos_k, sin_k: k's own tables (both or neither).
        interleaved, seqlen_offsets: as :func:`apply_rotary_emb`.
    """
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndims=(4, 5))
    if (cos_k is None) != (sin_k is None):
        raise ValueError("expected cos_k and sin_k both given or both None, got one of them")
    if qkv.dim() == 5:
        if num_heads_q is not None:
            raise ValueError(f"num_heads_q is for qkv of shape (B, S, Hq + 2 * Hk, D); got qkv of shape "
                             f"{tuple(qkv.shape)} with num_heads_q={num_heads_q!r}")
        if qkv.shape[2] != 3:
            raise ValueError(f"expected qkv of shape (B, S, 3, H, D), got {tuple(qkv.shape)}")
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        if isinstance(num_heads_q, bool) or not isinstance(num_heads_q, int):
            raise TypeError(f"expected num_heads_q (an int) with qkv of shape (B, S, Hq + 2 * Hk, D), "
                            f"got {num_heads_q!r}")
        heads_kv, odd = divmod(qkv.shape[2] - num_heads_q, 2)
        if num_heads_q <= 0 or heads_kv <= 0 or odd:
            raise ValueError(f"expected qkv's {qkv.shape[2]} heads to be num_heads_q ({num_heads_q}) query heads "
                             f"plus as many key as value heads")
        q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + heads_kv]
        if cos_k is None:  # q's and k's heads are adjacent: one launch for both
            q, k = qkv[:, :, :num_heads_q + heads_kv], None
    _rotate_in_place("qkv's q", q, cos, sin, interleaved, seqlen_offsets)
    if k is not None:
        _rotate_in_place("qkv's k", k, cos if cos_k is None else cos_k, sin if sin_k is None else sin_k,
                         interleaved, seqlen_offsets)
    return qkv


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """k of a packed kv (B, S, 2, H, D) rotated in place, as flash-attn's ``apply_rotary_emb_kv_``;
    returns kv."""
    check_tensor("kv", kv, dtypes=FLOAT_DTYPES, ndims=(5,))
    if kv.shape[2] != 2:
        raise ValueError(f"expected kv of shape (B, S, 2, H, D), got {tuple(kv.shape)}")
    _rotate_in_place("kv's k", kv[:, :, 0], cos, sin, interleaved, seqlen_offsets)
    return kv


# Last: the module is built on the functions above.
from .embedding import RotaryEmbedding  # noqa: E402

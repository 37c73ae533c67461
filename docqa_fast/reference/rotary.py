"""Reference rotary position embedding (RoPE), flash-attn's ``apply_rotary_emb`` semantics.

x (B, S, H, D), or packed (total, H, D) with ``cu_seqlens``; cos / sin (seqlen_ro, rotary_dim / 2).
Token s of sequence b sits at position ``seqlen_offsets[b] + s`` (an int offset for every
sequence, or one per sequence); its first ``rotary_dim`` dims rotate -- pairs (2i, 2i + 1)
when ``interleaved``, (i, i + rotary_dim / 2) otherwise (GPT-NeoX) -- in fp32, the rest pass
through. Written per sequence in plain PyTorch: the oracle of docqa_fast.rotary.
"""

from __future__ import annotations

import torch


def rotate_at(x, cos, sin, positions, interleaved, dtype=torch.float64):
    """x (..., H, D) rotated at ``positions`` (shaped like x's leading dims), computed in ``dtype``
    (not rounded back: the caller decides when)."""
    rotary_dim = 2 * cos.shape[1]
    c = cos.to(dtype)[positions][..., None, :]  # (..., 1, rotary_dim / 2)
    s = sin.to(dtype)[positions][..., None, :]
    x = x.to(dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        turned = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        turned = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((turned, rest), dim=-1)


def _rotate_sequence(x, cos, sin, start, interleaved):
    """x (S, H, D) at positions start .. start + S - 1, in fp64."""
    return rotate_at(x, cos, sin, torch.arange(start, start + x.shape[0], device=x.device), interleaved)


def apply_rotary_emb_ref(x, cos, sin, interleaved=False, seqlen_offsets=0, cu_seqlens=None):
    """x rotated (a new tensor of x's dtype; computed in fp64, rounded once)."""
    if cu_seqlens is None:
        batch = x.shape[0]
        starts = [int(seqlen_offsets)] * batch if isinstance(seqlen_offsets, int) else \
            [int(o) for o in seqlen_offsets]
        if batch == 0 or x.shape[1] == 0:  # nothing to rotate (torch.stack takes no empty list)
            return x.clone()
        return torch.stack([_rotate_sequence(x[b], cos, sin, starts[b], interleaved) for b in range(batch)]).to(x.dtype)
    batch = len(cu_seqlens) - 1
    starts = [int(seqlen_offsets)] * batch if isinstance(seqlen_offsets, int) else [int(o) for o in seqlen_offsets]
    out = x.double().clone()
    for b in range(batch):
        lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        if hi > lo:
            out[lo:hi] = _rotate_sequence(x[lo:hi], cos, sin, starts[b], interleaved)
    return out.to(x.dtype)


def rotary_tables_ref(dim, seqlen, base=10000.0, scale_base=None, dtype=torch.float64):
    """RotaryEmbedding's tables for positions 0 .. seqlen - 1, computed in ``dtype``:
    (cos, sin, cos_k, sin_k), each (seqlen, dim / 2). Pair i turns by position * base ** (-2 i / dim).
    With ``scale_base`` (XPos) q's tables are multiplied and k's divided by
    ((2 i + 0.4 dim) / (1.4 dim)) ** ((position - seqlen // 2) / scale_base); without, k's are q's."""
    pairs = torch.arange(0, dim, 2, dtype=dtype)
    angles = torch.arange(seqlen, dtype=dtype)[:, None] * base ** (-pairs / dim)[None, :]
    cos, sin = angles.cos(), angles.sin()
    if scale_base is None:
        return cos, sin, cos, sin
    power = (torch.arange(seqlen, dtype=dtype) - seqlen // 2) / scale_base
    scale = ((pairs + 0.4 * dim) / (1.4 * dim))[None, :] ** power[:, None]
    return cos * scale, sin * scale, cos / scale, sin / scale

"""``RotaryEmbedding``: flash-attn's rotary module (``flash_attn.layers.rotary.RotaryEmbedding``)
over our rotary functions.

The module owns the tables: ``cos`` / ``sin`` of position x inverse frequency, built on first use
in the input's dtype and device and rebuilt when a longer length, another dtype or device, or
training after inference mode needs it (flash-attn's rule, and its attribute names:
``_cos_cached``, ``_sin_cached``, ``_seq_len_cached``, ``_update_cos_sin_cache``, which its MHA and
code written for it read). The rotation itself is :func:`apply_rotary_emb_qkv_`,
:func:`apply_rotary_emb_kv_` and :func:`apply_rotary_emb` in place: the rotary op, its kernel,
autograd and checks, nothing of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import FLOAT_DTYPES, check_int, check_last_dim_contiguous, check_real, check_same_device, check_tensor
from . import _rotate_in_place, apply_rotary_emb_kv_, apply_rotary_emb_qkv_

__all__ = ["RotaryEmbedding"]


def _check_bool(name, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} to be a bool, got {value!r}")
    return value


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) of q and k, in place, as flash-attn's ``RotaryEmbedding``.

    Args:
        dim: the rotary dim (even, > 0): the first ``dim`` dims of each head rotate, the rest pass
            through (so ``dim`` <= the head dim).
        base: the frequency base: pair i turns by ``position * base ** (-2 i / dim)``.
        interleaved: pairs (2i, 2i + 1) (GPT-J) instead of (i, i + dim / 2) (GPT-NeoX).
        scale_base: XPos (Sun et al. 2022) when set (flash-attn recommends 512): q's tables are
            multiplied and k's divided by ``((2 i + 0.4 dim) / (1.4 dim)) ** ((position - L // 2) /
            scale_base)``, L the tables' length (as flash-attn: the centre moves when the tables
            grow); computed in fp32 even after the module was cast (flash-attn's newer rule).
        pos_idx_in_fp32: positions (and the inverse frequencies) in fp32 even when the module was
            cast to fp16 / bf16; False reproduces models trained with the positions in the
            buffer's low precision (where, in bf16, positions 1995 and 2000 coincide).
        device: where the ``inv_freq`` (and XPos ``scale``) buffers are made.

    ``forward(qkv, kv=None, seqlen_offset=0, max_seqlen=None, num_heads_q=None)``:

    * ``kv`` None: ``qkv`` is (B, S, 3, H, D), or (B, S, Hq + 2 * Hk, D) with ``num_heads_q = Hq``
      (grouped heads); q and k are rotated in place, v is left as it is; returns ``qkv``.
    * ``kv`` given: ``qkv`` is q (B, S, H, D) and ``kv`` (B, S, 2, Hk, D); q and kv's k are rotated
      in place; returns ``(q, kv)``.
    * ``seqlen_offset``: an int, or a (B,) int32 / int64 tensor: the position of each sequence's
      first token (a KV cache's length when rotating new tokens).
    * ``max_seqlen``: the tables are made at least this long. With an int offset they cover
      ``seqlen_offset + S`` anyway; with a tensor offset pass it (as with flash-attn): without it
      the tables cover S (or what they held), and a position past them is a ``ValueError`` in
      eager mode naming ``max_seqlen`` (under ``torch.compile`` or ``value_checks(False)`` it is
      the caller's precondition: positions are clamped).

    Rotated in place, so ``qkv`` / ``q`` / ``kv`` cannot be leaf tensors that require grad (a
    ``ValueError``; flash-attn returns an alias then); gradients flow to them as computed from
    such tensors (the gradient of a rotation is the rotation by minus the angle). The tables get
    no gradient and are not saved in the state dict.
    """

    def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, pos_idx_in_fp32=True,
                 device=None):
        super().__init__()
        self.dim = check_int("dim", dim, minimum=2)
        if self.dim % 2:
            raise ValueError(f"expected an even dim (the rotary dim: pairs of dims rotate), got {dim}")
        self.base = check_real("base", base, positive=True)
        self.interleaved = _check_bool("interleaved", interleaved)
        self.scale_base = None if scale_base is None else check_real("scale_base", scale_base, positive=True)
        self.pos_idx_in_fp32 = _check_bool("pos_idx_in_fp32", pos_idx_in_fp32)
        # Buffers, so .to(device) moves them; not persistent: recomputed, never loaded.
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        scale = None if self.scale_base is None else self._compute_scale(device)
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = None
        self._cos_k_cached = self._sin_k_cached = None  # XPos: k's tables (the inverse scale)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}, scale_base={self.scale_base}, "
                f"pos_idx_in_fp32={self.pos_idx_in_fp32}")

    def _compute_inv_freq(self, device=None) -> torch.Tensor:
        """base ** (-2 i / dim) for i < dim / 2, in fp32."""
        return 1.0 / self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim)

    def _compute_scale(self, device=None) -> torch.Tensor:
        """XPos's per-pair decay base (2 i + 0.4 dim) / (1.4 dim), in fp32 (in (0, 1))."""
        return (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) + 0.4 * self.dim) / (1.4 * self.dim)

    def _update_cos_sin_cache(self, seqlen, device=None, dtype=None) -> None:
        """(Re)builds the tables for positions 0 .. seqlen - 1 in ``dtype`` on ``device`` when they
        are shorter, elsewhere, of another dtype, or inference tensors while training."""
        if not (seqlen > self._seq_len_cached or self._cos_cached is None or self._cos_cached.device != device
                or self._cos_cached.dtype != dtype or (self.training and self._cos_cached.is_inference())):
            return
        self._seq_len_cached = seqlen
        if self.pos_idx_in_fp32:
            # Positions in the thousands are not representable in bf16 / fp16: fp32, with the
            # frequencies recomputed in fp32 if the module was cast.
            inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._compute_inv_freq(device)
            positions = torch.arange(seqlen, device=device, dtype=torch.float32)
        else:
            inv_freq = self.inv_freq
            positions = torch.arange(seqlen, device=device, dtype=inv_freq.dtype)
        # torch.outer, not einsum: autocast would run einsum in half precision.
        angles = torch.outer(positions, inv_freq.to(device))
        cos, sin = torch.cos(angles), torch.sin(angles)
        if self.scale is None:
            self._cos_cached, self._sin_cached = cos.to(dtype), sin.to(dtype)
            return
        decay = self.scale if self.scale.dtype == torch.float32 else self._compute_scale(self.scale.device)
        power = (torch.arange(seqlen, device=device, dtype=torch.float32) - seqlen // 2) / self.scale_base
        scale = decay.to(device)[None, :] ** power[:, None]  # (seqlen, dim / 2), applied in fp32
        self._cos_cached, self._sin_cached = (cos * scale).to(dtype), (sin * scale).to(dtype)
        self._cos_k_cached, self._sin_k_cached = (cos / scale).to(dtype), (sin / scale).to(dtype)

    def forward(self, qkv, kv=None, seqlen_offset=0, max_seqlen=None, num_heads_q=None):
        """q and k rotated in place; returns ``qkv``, or ``(q, kv)`` when ``kv`` is given (see the
        class docstring)."""
        separate = kv is not None
        q_name = "qkv (q, as kv is given)" if separate else "qkv"
        check_tensor(q_name, qkv, dtypes=FLOAT_DTYPES, ndims=(4,) if separate else (4, 5))
        self._check_rotatable(q_name, qkv)
        batch, seqlen = qkv.shape[:2]
        if separate:
            check_tensor("kv", kv, dtypes=FLOAT_DTYPES, ndims=(5,))
            if kv.shape[:3] != (batch, seqlen, 2):
                raise ValueError(f"expected kv of shape ({batch}, {seqlen}, 2, Hk, D) (q's batch and sequence "
                                 f"length), got {tuple(kv.shape)}")
            if kv.dtype != qkv.dtype:
                raise TypeError(f"expected kv of dtype {qkv.dtype} (the dtype of q), got {kv.dtype}")
            self._check_rotatable("kv", kv)
            # kv's own layout before q is touched: q is rotated in place first.
            check_last_dim_contiguous("kv", kv)
            check_same_device((q_name, "kv"), (qkv, kv))
            if num_heads_q is not None:
                raise ValueError(f"num_heads_q is for a packed qkv (B, S, Hq + 2 * Hk, D) without kv; got it "
                                 f"({num_heads_q!r}) with kv")
        if isinstance(seqlen_offset, torch.Tensor):
            check_tensor("seqlen_offset", seqlen_offset, dtypes=(torch.int32, torch.int64), ndims=(1,))
            if seqlen_offset.shape[0] != batch:
                raise ValueError(f"expected seqlen_offset of shape ({batch},) (one per sequence), "
                                 f"got {tuple(seqlen_offset.shape)}")
            check_same_device((q_name, "seqlen_offset"), (qkv, seqlen_offset))
            # flash-attn reads no offset on the host: the tables keep what they hold (at least S).
            length = max(seqlen, self._seq_len_cached)
        else:
            length = seqlen + check_int("seqlen_offset", seqlen_offset)
        if max_seqlen is not None:
            length = max(length, check_int("max_seqlen", max_seqlen, minimum=1))
        self._update_cos_sin_cache(length, device=qkv.device, dtype=qkv.dtype)
        cos, sin = self._cos_cached, self._sin_cached
        cos_k, sin_k = (cos, sin) if self.scale is None else (self._cos_k_cached, self._sin_k_cached)
        try:
            if not separate:
                return apply_rotary_emb_qkv_(qkv, cos, sin, None if self.scale is None else cos_k,
                                             None if self.scale is None else sin_k, interleaved=self.interleaved,
                                             seqlen_offsets=seqlen_offset, num_heads_q=num_heads_q)
            _rotate_in_place("q", qkv, cos, sin, self.interleaved, seqlen_offset)
            apply_rotary_emb_kv_(kv, cos_k, sin_k, interleaved=self.interleaved, seqlen_offsets=seqlen_offset)
            return qkv, kv
        except ValueError as error:
            # apply_rotary_emb's range check (eager only) on a tensor offset: the fix is here.
            if "positions (seqlen_offsets" not in str(error):
                raise
            raise ValueError(f"{error}: seqlen_offset + S goes past the {self._seq_len_cached} positions of the "
                             f"cos / sin tables; pass max_seqlen (at least the largest seqlen_offset + S) to "
                             f"make them longer") from None

    def _check_rotatable(self, name, x) -> None:
        if x.shape[-1] < self.dim:
            raise ValueError(f"expected {name} with a head dim of at least dim ({self.dim}, the rotary dim), "
                             f"got {tuple(x.shape)}")
        base = x._base if x._base is not None else x  # a view of a leaf is refused as the leaf is
        if x.requires_grad and base.is_leaf and base.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} is rotated in place, which autograd refuses for a leaf tensor that requires "
                             f"grad: pass a tensor computed from it (a projection's output, or .clone())")

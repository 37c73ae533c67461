"""Attention custom ops (forward with LSE, backward), their validation and autograd.

``attention_forward`` / ``attention_backward`` are ``torch.library`` custom ops
(``docqa_fast::attention_forward``, ``docqa_fast::attention_backward``) over the dense
(B, S, H, D) and packed (total, H, D) layouts; the flash-attn and SDPA front ends in
:mod:`.interface` call :func:`attention` after validating.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import choose_backend, forced_backend
from .._validation import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_last_dim_contiguous,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)
from ..reference.attention import attention_backward_ref, attention_ref

_IMPLEMENTED = ("triton",)
FAST_DTYPES = (torch.float16, torch.bfloat16)  # fp32 runs on the reference path
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------- validation

def check_attention_inputs(q, k, v, varlen: bool) -> None:
    ndim = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES, ndims=(ndim,))
        check_last_dim_contiguous(name, t)
    check_same_dtype(("q", "k", "v"), (q, k, v))
    check_same_device(("q", "k", "v"), (q, k, v))
    check_shape("v", v, k.shape, "the shape of k")
    head_dim, heads, kv_heads = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"expected k with head dim {head_dim} (q's), got {k.shape[-1]}")
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        raise ValueError(f"expected a head dim that is a multiple of 8 and at most {MAX_HEAD_DIM}, got {head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"expected q's number of heads ({heads}) to be a multiple of k's ({kv_heads})")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"expected k with batch size {q.shape[0]} (q's), got {k.shape[0]}")


def _check_boundaries(name: str, cu_seqlens, total: int, max_seqlen: int, max_name: str, q) -> None:
    """The shared cu_seqlens check, plus: every length fits in ``max_seqlen``."""
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"expected {max_name} to be a non-negative int, got {max_seqlen!r}")
    lengths = check_cu_seqlens(name, cu_seqlens, total, q, "q")
    if lengths is not None and lengths.numel() and int(lengths.max()) > max_seqlen:
        raise ValueError(f"expected {max_name} >= every sequence length, got {max_seqlen} < {int(lengths.max())}")


# CUDA's grid y axis, which carries the sequences (and z the heads; H <= 65,535 in practice).
MAX_SEQUENCES = 65_535


def check_window(window_size) -> tuple[int, int]:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"expected window_size to be a pair (left, right), got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"expected window_size values >= -1 (-1 = unbounded), got {tuple(window_size)}")
    return left, right


def bounded_window(left: int, right: int, max_seqlen_q: int, max_seqlen_k: int) -> tuple[int, int]:
    """The window with sides that restrict nothing turned into -1: a left side >= max_seqlen_k
    or a right side >= max_seqlen_q covers every key, and left as they are, the kernels' int32
    sums of positions and window sides (up to 2^31 - 1) would wrap around."""
    return (-1 if left >= max_seqlen_k else left), (-1 if right >= max_seqlen_q else right)


def check_unsupported(dropout_p, alibi_slopes) -> None:
    if dropout_p:
        raise NotImplementedError(f"dropout_p={dropout_p}: attention dropout is not implemented (LLM training "
                                  "rarely uses it); pass 0.0")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not implemented yet")


# ------------------------------------------------------------------------ the custom ops

def _choose(q):
    if q.dtype not in FAST_DTYPES:
        forced = forced_backend()
        if forced not in (None, "reference"):
            raise RuntimeError(f"DOCQA_FAST_BACKEND={forced}: the attention kernels take fp16/bf16, got {q.dtype} "
                               "(fp32 runs on the reference path)")
        return "reference"
    return choose_backend("attention", q.device, _IMPLEMENTED, q.dtype)


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("docqa_fast::attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                          cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    if _choose(q) == "reference":
        return attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window,
                             softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    from ..kernels import attention as kernels

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32, device=q.device)
    kernels.forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    causal, window, softcap)
    return out, lse


@_attention_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        _lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.custom_op("docqa_fast::attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, grad_lse: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                           cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                           softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    window = (window_left, window_right)
    if _choose(q) == "reference":
        return attention_backward_ref(dout, q, k, v, out, lse, grad_lse=grad_lse, softmax_scale=softmax_scale,
                                      causal=causal, window_size=window, softcap=softcap,
                                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    from ..kernels import attention as kernels

    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    kernels.backward(dout.contiguous(), q, k, v, out, lse, grad_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, window, softcap)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, window_left, window_right, softcap):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *options = inputs
    ctx.options = options
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, *output)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # The LSE has a gradient when partial results are merged by it (ring / split-KV attention
    # through merge_attention_states): d lse_i / d s_ij = p_ij, folded into the backward's delta.
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                                        *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """Validated attention -> (out, lse). Dense when ``cu_seqlens_q`` is None."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    check_attention_inputs(q, k, v, varlen)
    left, right = check_window(window_size)
    if softcap < 0:
        raise ValueError(f"expected softcap >= 0 (0 = off), got {softcap}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("expected both cu_seqlens_q and cu_seqlens_k for packed (varlen) input")
        _check_boundaries("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q)
        check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=(torch.int32,), ndims=(1,))
        check_shape("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape, "one entry per sequence, like cu_seqlens_q")
        _check_boundaries("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k", q)
        # The kernels read cu_seqlens with unit stride.
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    else:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    left, right = bounded_window(left, right, max_seqlen_q, max_seqlen_k)
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    if batch > MAX_SEQUENCES:
        raise ValueError(f"expected at most {MAX_SEQUENCES} sequences per call (the kernels' grid axis for them, "
                         f"as in flash-attn), got {batch}: split the batch")
    return _attention_forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 float(softmax_scale), bool(causal), left, right, float(softcap))

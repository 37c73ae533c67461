"""Training attention: the custom ops (forward with LSE, backward), their dispatch entries,
autograd, and :func:`attention`, the validated call every front end makes.

``docqa_fast::attention_forward`` / ``docqa_fast::attention_backward`` are ``torch.library``
custom ops over the dense (B, S, H, D) and packed (total, H, D) layouts. Implementations: the
Triton kernels (``kernels/attention/``; fp16/bf16) and the reference (fp32, CPU tensors). The
flash-attn front ends (:mod:`docqa_fast.flash_attn_interface`) and the SDPA one (:mod:`.sdpa`)
call :func:`attention`; the rules it checks are :mod:`docqa_fast.attention_core`'s.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import Implementation, register_op
from .._validation import check_cu_seqlens, check_shape, check_tensor
from ..attention_core import (
    MAX_SEQUENCES,
    check_alibi_slopes,
    check_dropout,
    check_heads,
    check_softcap,
    check_window,
    kernel_dtype_reason,
    normalize_window,
    softmax_scale_or_default,
)
from ..reference.attention import attention_backward_ref, attention_ref


def _check_boundaries(name: str, cu_seqlens, total: int, max_seqlen: int, max_name: str, q) -> None:
    """The shared cu_seqlens check, plus: every length fits in ``max_seqlen``."""
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"expected {max_name} to be a non-negative int, got {max_seqlen!r}")
    lengths = check_cu_seqlens(name, cu_seqlens, total, q, "q")
    if lengths is not None and lengths.numel() and int(lengths.max()) > max_seqlen:
        raise ValueError(f"expected {max_name} >= every sequence length, got {max_seqlen} < {int(lengths.max())}")


# ------------------------------------------------------------------------ the custom ops

def dropout_seed(device) -> torch.Tensor:
    """The Philox seed of one dropout call: one draw of the device's torch generator (so
    ``torch.manual_seed`` reproduces it, and a CUDA graph captures it as a graph-safe draw),
    kept for the backward. Calling this after the same manual_seed gives a call's seed back."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def _check_op_extras(q, cu_seqlens_q, alibi_slopes, dropout_p, dropout_seed) -> None:
    """The ALiBi and dropout arguments as the ops receive them (a direct call of the op skips
    :func:`attention`'s checks; a bad probability would scale by 1 / (1 - p) silently)."""
    batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    check_alibi_slopes(alibi_slopes, batch, q.shape[-2], q)
    if check_dropout(dropout_p) > 0:
        check_tensor("dropout_seed", dropout_seed, dtypes=(torch.int64,), ndims=(1,))
        check_shape("dropout_seed", dropout_seed, (1,), "one Philox seed")

def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _forward_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                    window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed):
    from ..kernels import attention as kernels

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32, device=q.device)
    kernels.forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    causal, (window_left, window_right), softcap, alibi_slopes, dropout_p, dropout_seed)
    return out, lse


def _forward_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                       window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed):
    return attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=(window_left, window_right),
                         softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_seed=dropout_seed)


def _backward_triton(dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed):
    from ..kernels import attention as kernels

    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    kernels.backward(dout.contiguous(), q, k, v, out, lse, grad_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, (window_left, window_right), softcap,
                     alibi_slopes, dropout_p, dropout_seed)
    return dq, dk, dv


def _backward_reference(dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
                        dropout_seed):
    return attention_backward_ref(dout, q, k, v, out, lse, grad_lse=grad_lse, softmax_scale=softmax_scale,
                                  causal=causal, window_size=(window_left, window_right), softcap=softcap,
                                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes,
                                  dropout_p=dropout_p, dropout_seed=dropout_seed)


ATTENTION_FORWARD = register_op(
    "attention_forward",
    Implementation("triton", _forward_triton, eligible=lambda q, *rest: kernel_dtype_reason(q)),
    Implementation("reference", _forward_reference),
)
ATTENTION_BACKWARD = register_op(
    "attention_backward",
    Implementation("triton", _backward_triton, eligible=lambda dout, q, *rest: kernel_dtype_reason(q)),
    Implementation("reference", _backward_reference),
)


@torch.library.custom_op("docqa_fast::attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                          cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                          alibi_slopes: Optional[torch.Tensor], dropout_p: float, dropout_seed: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_extras(q, cu_seqlens_q, alibi_slopes, dropout_p, dropout_seed)
    return ATTENTION_FORWARD(q.device, q.dtype, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
                             dropout_seed)


@_attention_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, dropout_p, dropout_seed):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        _lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.custom_op("docqa_fast::attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, grad_lse: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                           cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                           softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                           alibi_slopes: Optional[torch.Tensor], dropout_p: float,
                           dropout_seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op_extras(q, cu_seqlens_q, alibi_slopes, dropout_p, dropout_seed)
    return ATTENTION_BACKWARD(q.device, q.dtype, dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap,
                              alibi_slopes, dropout_p, dropout_seed)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
     window_right, softcap, alibi_slopes, dropout_p, dropout_seed) = inputs
    ctx.options = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
    ctx.dropout_p = dropout_p
    # The seed travels to the backward, which draws the forward's dropout pattern again from it.
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed, *output)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # The LSE has a gradient when partial results are merged by it (ring / split-KV attention
    # through merge_attention_states): d lse_i / d s_ij = p_ij, folded into the backward's delta.
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                                        *ctx.options, alibi_slopes, ctx.dropout_p, dropout_seed)
    return (dq, dk, dv) + (None,) * 12


_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0):
    """Validated attention -> (out, lse). Dense when ``cu_seqlens_q`` is None.

    ``alibi_slopes`` (H,) / (B, H) fp32: flash-attn's ALiBi bias. ``dropout_p`` > 0 drops
    attention weights; the pattern comes from a Philox seed drawn here from the device's torch
    generator (so ``torch.manual_seed`` reproduces a run and a CUDA graph captures it) and kept
    for the backward."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    check_heads(q, k, v, q_ndim=3 if varlen else 4, kv_ndim=3 if varlen else 4)
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"expected k with batch size {q.shape[0]} (q's), got {k.shape[0]}")
    window = check_window(window_size)
    softcap = check_softcap(softcap)
    dropout_p = check_dropout(dropout_p)
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
    left, right = normalize_window(window, max_seqlen_k, max_seqlen_q)
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    if batch > MAX_SEQUENCES:
        raise ValueError(f"expected at most {MAX_SEQUENCES} sequences per call (the kernels' grid axis for them, "
                         f"as in flash-attn), got {batch}: split the batch")
    alibi_slopes = check_alibi_slopes(alibi_slopes, batch, q.shape[-2], q)
    seed = dropout_seed(q.device) if dropout_p > 0 else None
    return _attention_forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale_or_default(softmax_scale, q.shape[-1]), bool(causal), left, right,
                                 softcap, alibi_slopes, dropout_p, seed)

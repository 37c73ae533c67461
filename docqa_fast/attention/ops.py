"""Training attention: the custom ops (forward with LSE, backward), their dispatch entries,
autograd, and :func:`attention`, the validated call every front end makes.

``docqa_fast::attention_forward`` / ``docqa_fast::attention_backward`` are ``torch.library``
custom ops over the dense (B, S, H, D) and packed (total, H, D) layouts. Implementations, in
the dispatch table's default order: the Triton kernels (``kernels/attention/``; fp16/bf16),
torch's own cuDNN fused attention (``cudnn``: the dense calls it computes exactly, see
:func:`cudnn_forward_reason`; first only where a GPU's tuned table measured it faster) and the
reference (fp32, CPU tensors). ``DOCQA_FAST_ATTENTION=triton|cudnn|auto`` forces one of the two
fast ones; :func:`explain_attention` says which a call takes and why. The flash-attn front ends
(:mod:`docqa_fast.flash_attn_interface`) and the SDPA one (:mod:`.sdpa`) call
:func:`attention`; the rules it checks are :mod:`docqa_fast.attention_core`'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .._backend import Decision, Implementation, Override, register_op
from .._validation import (
    check_cu_seqlens,
    check_int,
    check_last_dim_contiguous,
    check_same_device,
    check_shape,
    check_tensor,
)
from ..attention_core import (
    KERNEL_DTYPES,
    MAX_SEQUENCES,
    check_alibi_slopes,
    check_dropout,
    check_cu_seqlens_pair,
    check_heads,
    check_op_scalars,
    check_softcap,
    check_window,
    kernel_dtype_reason,
    normalize_window,
    softmax_scale_or_default,
)
from ..reference.attention import attention_backward_ref, attention_ref


def _check_boundaries(name: str, cu_seqlens, total: int, max_seqlen: int, max_name: str, q) -> None:
    """The shared cu_seqlens check, plus: every length fits in ``max_seqlen``."""
    check_int(max_name, max_seqlen)
    check_cu_seqlens(name, cu_seqlens, total, q, "q", max_seqlen=max_seqlen, max_name=max_name)


# ------------------------------------------------------------------------ the custom ops

def dropout_seed(device) -> torch.Tensor:
    """The Philox seed of one dropout call: one draw of the device's torch generator (so
    ``torch.manual_seed`` reproduces it, and a CUDA graph captures it as a graph-safe draw),
    kept for the backward. Calling this after the same manual_seed gives a call's seed back."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def _check_op_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     window_left, window_right, softcap) -> None:
    """What a direct call of an op gets checked (:func:`attention` checks more: the values of
    cu_seqlens, one host sync, are the raw op's precondition): the shapes, dtypes and devices
    the kernels index by, and the scalars -- nothing that reads a tensor."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    check_heads(q, k, v, q_ndim=3 if varlen else 4, kv_ndim=3 if varlen else 4)
    check_int("max_seqlen_q", max_seqlen_q)
    check_int("max_seqlen_k", max_seqlen_k)
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("expected both cu_seqlens_q and cu_seqlens_k for packed (varlen) input")
        check_cu_seqlens_pair(q, cu_seqlens_q, cu_seqlens_k)
    else:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"expected k with batch size {q.shape[0]} (q's), got {k.shape[0]}")
        if (max_seqlen_q, max_seqlen_k) != (q.shape[1], k.shape[1]):
            raise ValueError(f"expected max_seqlen_q, max_seqlen_k = {q.shape[1]}, {k.shape[1]} (q's and k's "
                             f"sequence lengths) for dense input, got {max_seqlen_q}, {max_seqlen_k}")
    check_op_scalars(softmax_scale, window_left, window_right, softcap)


def _check_backward_inputs(dout, q, out, lse, grad_lse, varlen: bool) -> None:
    """The backward's own tensors against q: dout and out like q, lse (and grad_lse) fp32 in the LSE layout."""
    for name, t in (("dout", dout), ("out", out)):  # dout may have any strides (the kernels copy it)
        check_tensor(name, t, dtypes=(q.dtype,))
        check_shape(name, t, q.shape, "the shape of q")
    check_last_dim_contiguous("out", out)
    for name, t in (("lse", lse), ("grad_lse", grad_lse)):
        if t is None and name == "grad_lse":
            continue
        check_tensor(name, t, dtypes=(torch.float32,))
        check_shape(name, t, _lse_shape(q, varlen), "flash-attn's LSE layout")
    tensors = [("q", q), ("dout", dout), ("out", out), ("lse", lse)] + ([("grad_lse", grad_lse)] if grad_lse is not None
                                                                          else [])
    check_same_device(*zip(*tensors))


def _check_op_extras(q, cu_seqlens_q, alibi_slopes, dropout_p, dropout_seed) -> None:
    """The ALiBi and dropout arguments as the ops receive them (a direct call of the op skips
    :func:`attention`'s checks; a bad probability would scale by 1 / (1 - p) silently)."""
    batch = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else q.shape[0]
    if batch > MAX_SEQUENCES:
        raise ValueError(f"expected at most {MAX_SEQUENCES} sequences per call (the kernels' grid axis for them, "
                         f"as in flash-attn), got {batch}: split the batch")
    check_alibi_slopes(alibi_slopes, batch, q.shape[-2], q)
    if check_dropout(dropout_p) > 0:
        check_tensor("dropout_seed", dropout_seed, dtypes=(torch.int64,), ndims=(1,))
        check_shape("dropout_seed", dropout_seed, (1,), "one Philox seed")


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


# Every implementation takes the ops' arguments in order; ``deterministic`` last. Our backward reads
# it: True keeps the two-pass kernels (dK/dV sum a GQA group's query heads in a fixed order, no
# atomics: bitwise reproducible); False lets a tuned table choose the one-pass kernel, which adds
# dQ by fp32 atomics (kernels/attention/launch.py, backward_passes). The cuDNN route refuses True.
# torch.use_deterministic_algorithms(True) (not warn-only) counts as True for both routes.


def _torch_requires_determinism() -> bool:
    return torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


def _reproducible_backward_reason(deterministic: bool) -> str | None:
    """Why our backward must be bitwise reproducible (the two-pass kernels), or None: the rule
    the Triton backward runs by and :func:`explain_attention` reports."""
    if deterministic:
        return "deterministic=True"
    if _torch_requires_determinism():
        return "torch.use_deterministic_algorithms(True) is in force"
    return None


def _forward_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                    window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed, deterministic=False):
    from ..kernels import attention as kernels

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32, device=q.device)
    kernels.forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    causal, (window_left, window_right), softcap, alibi_slopes, dropout_p, dropout_seed)
    return out, lse


def _forward_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                       window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed, deterministic=False):
    return attention_ref(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=(window_left, window_right),
                         softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_seed=dropout_seed)


def _backward_triton(dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed,
                     deterministic=False):
    from ..kernels import attention as kernels

    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    kernels.backward(dout.contiguous(), q, k, v, out, lse, grad_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, (window_left, window_right), softcap,
                     alibi_slopes, dropout_p, dropout_seed, _reproducible_backward_reason(deterministic) is not None)
    return dq, dk, dv


def _backward_reference(dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
                        dropout_seed, deterministic=False):
    return attention_backward_ref(dout, q, k, v, out, lse, grad_lse=grad_lse, softmax_scale=softmax_scale,
                                  causal=causal, window_size=(window_left, window_right), softcap=softcap,
                                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes,
                                  dropout_p=dropout_p, dropout_seed=dropout_seed)


# ------------------------------------------------------------------- torch's cuDNN attention
#
# torch's ``_scaled_dot_product_cudnn_attention`` (what SDPA runs on Hopper by default) and its
# backward, called directly: SDPA itself returns no LSE. Their schemas are the same in torch
# 2.11 and 2.14 (native_functions.yaml):
#   (query, key, value, attn_bias?, compute_log_sumexp, dropout_p=0, is_causal=False,
#    return_debug_mask=False, *, scale=None) -> (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
#    philox_seed, philox_offset, debug_attn_mask)
#   backward(grad_out, query, key, value, out, logsumexp, philox_seed, philox_offset, attn_bias,
#    cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale=None) -> (dq, dk, dv)
# Tensors are (B, H, S, D) with fewer K/V heads allowed (GQA: SDPA passes them unexpanded); the
# LSE is fp32 (B, H, S, 1), cuDNN's softmax statistics max + ln(sum exp(s - max)) of the scaled
# scores: flash-attn's natural-log LSE, so either route's (out, lse) feeds the other's backward.

CUDNN_MIN_VERSION = 91501  # torch prefers cuDNN attention only above 9.15.0 (sequence lengths not a multiple of 128)
CUDNN_MAX_HEAD_DIM = 128  # beyond it torch gates by cuDNN release and GPU (and the backward's head dims differ)
_CUDNN_MAX_GRID = 65_535  # cuDNN's limit on the batch size and on the heads


def _cudnn_kernels():
    """torch's cuDNN attention forward and backward ops, looked up per call (tests stand in for them on CPU)."""
    return (torch.ops.aten._scaled_dot_product_cudnn_attention,
            torch.ops.aten._scaled_dot_product_cudnn_attention_backward)


def _bhsd(t):
    # (B, S, H, D) -> the (B, H, S, D) view cuDNN takes. A contiguous (B, S, H, D) tensor is the
    # layout cuDNN reads natively ("BSHD"), so the view costs no copy; only strided views
    # (packed qkv) are copied.
    return t.contiguous().transpose(1, 2)


def _forward_cudnn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                   window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed, deterministic=False):
    forward, _ = _cudnn_kernels()
    out, lse = forward(_bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, bool(causal), False, scale=softmax_scale)[:2]
    # out comes laid out like its query (B, S, H, D); lse as (B, H, S, 1).
    return out.transpose(1, 2).contiguous(), lse.reshape(lse.shape[:3]).contiguous()


def _backward_cudnn(dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed,
                    deterministic=False):
    _, backward = _cudnn_kernels()
    # The dropout seed and offset are read only with dropout, which never takes this route.
    unused = torch.zeros((), dtype=torch.int64, device=q.device)
    grads = backward(_bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.unsqueeze(-1), unused, unused,
                     None, None, None, q.shape[1], k.shape[1], 0.0, bool(causal), scale=softmax_scale)
    return tuple(g.transpose(1, 2).contiguous() for g in grads)


def cudnn_forward_reason(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                         window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed,
                         deterministic=False) -> str | None:
    """Why torch's cuDNN attention does not compute exactly this call, or None.

    It computes plain dense softmax attention: no window, softcap, ALiBi or packed sequences;
    its causal mask is aligned top-left (flash-attn's bottom-right), the same only when
    seqlen_q == seqlen_k; its dropout pattern would not be ours (the reference and our backward
    redraw our Philox bits); its backward is not guaranteed bitwise reproducible."""
    if q.dtype not in KERNEL_DTYPES:
        return f"cuDNN attention takes fp16/bf16, got {q.dtype}"
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        return "packed (varlen) sequences: torch's cuDNN op takes dense batches"
    if window_left != -1 or window_right != -1:
        return "a sliding window"
    if softcap:
        return "softcap"
    if alibi_slopes is not None:
        return "ALiBi"
    if dropout_p:
        return "dropout (the pattern must be docqa_fast's Philox draw, which the backward and the reference redraw)"
    if deterministic:
        return "deterministic=True (cuDNN's backward is not guaranteed bitwise reproducible)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return f"head dim {head_dim} (cuDNN here: multiples of 8 up to {CUDNN_MAX_HEAD_DIM})"
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal and seqlen_q != seqlen_k:
        return "causal with seqlen_q != seqlen_k (cuDNN aligns the mask top-left, flash-attn bottom-right)"
    if q.shape[0] == 0 or seqlen_q == 0 or seqlen_k < 2:
        return f"batch {q.shape[0]}, seqlen_q {seqlen_q}, seqlen_k {seqlen_k} (cuDNN needs a query and two keys)"
    if q.shape[0] > _CUDNN_MAX_GRID or q.shape[2] > _CUDNN_MAX_GRID:
        return f"more than {_CUDNN_MAX_GRID} sequences or heads"
    return None


def cudnn_backward_reason(dout, q, k, v, out, lse, grad_lse, *rest) -> str | None:
    """Why torch's cuDNN backward does not compute exactly this backward, or None: as the
    forward, and no gradient to the LSE (ring / split-KV merges), which it has no input for.
    Its (out, lse) may come from either route: both are flash-attn's."""
    if grad_lse is not None:
        return "a gradient to the LSE (ring / split-KV merges): cuDNN's backward has no input for it"
    return cudnn_forward_reason(q, k, v, *rest)


@functools.cache
def _cudnn_machine_reason(device_index: int) -> str | None:
    """What of this torch build and GPU keeps cuDNN attention out (fixed for a process)."""
    if not hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        return f"torch {torch.__version__} has no _scaled_dot_product_cudnn_attention"
    if not torch.backends.cudnn.is_available():
        return f"torch {torch.__version__} was built without cuDNN"
    version = torch.backends.cudnn.version() or 0
    if version < CUDNN_MIN_VERSION:
        return (f"cuDNN {version // 10000}.{version // 100 % 100}.{version % 100} is older than 9.15.1 "
                "(torch's own bar for preferring it: earlier releases mishandle lengths not a multiple of 128)")
    capability = torch.cuda.get_device_capability(device_index)
    if capability < (8, 0):
        return f"cuDNN attention needs sm80 or newer, this GPU is sm{capability[0]}{capability[1]}"
    return None


def cudnn_unavailable_reason(device) -> str | None:
    """Why torch's cuDNN attention cannot run on ``device`` here, or None. Besides the build and
    the GPU, the switches a torch user already has are honoured: cuDNN off, cuDNN SDPA off,
    deterministic algorithms on."""
    if device.type != "cuda":
        return "torch's cuDNN attention runs on CUDA tensors only"
    if not torch.cuda.is_available():
        return "no CUDA device here"
    reason = _cudnn_machine_reason(device.index if device.index is not None else torch.cuda.current_device())
    if reason:
        return reason
    if not torch.backends.cudnn.enabled:
        return "torch.backends.cudnn.enabled is False"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "torch.backends.cuda.enable_cudnn_sdp(False) is in force"
    if _torch_requires_determinism():
        return "torch.use_deterministic_algorithms(True) is in force (cuDNN attention is not deterministic)"
    return None


# --------------------------------------------------------------------------- the dispatch

def _forward_shape_class(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                         *rest) -> dict:
    """What a tuned table's dispatch rules for the attention ops select on."""
    return {"layout": "dense" if cu_seqlens_q is None else "varlen", "head_dim": q.shape[-1], "causal": bool(causal)}


def _backward_shape_class(dout, q, k, v, out, lse, grad_lse, *rest) -> dict:
    return _forward_shape_class(q, k, v, *rest)


# DOCQA_FAST_ATTENTION=triton|cudnn|auto: the training attention ops' own forcing variable.
ATTENTION_OVERRIDE = Override("DOCQA_FAST_ATTENTION", ("triton", "cudnn"))


ATTENTION_FORWARD = register_op(
    "attention_forward",
    Implementation("triton", _forward_triton, eligible=lambda q, *rest: kernel_dtype_reason(q)),
    Implementation("cudnn", _forward_cudnn, eligible=cudnn_forward_reason, available=cudnn_unavailable_reason),
    Implementation("reference", _forward_reference),
    shape_class=_forward_shape_class, override=ATTENTION_OVERRIDE,
)
ATTENTION_BACKWARD = register_op(
    "attention_backward",
    Implementation("triton", _backward_triton, eligible=lambda dout, q, *rest: kernel_dtype_reason(q)),
    Implementation("cudnn", _backward_cudnn, eligible=cudnn_backward_reason, available=cudnn_unavailable_reason),
    Implementation("reference", _backward_reference),
    shape_class=_backward_shape_class, override=ATTENTION_OVERRIDE,
)


@torch.library.custom_op("docqa_fast::attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                          cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                          softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                          alibi_slopes: Optional[torch.Tensor], dropout_p: float, dropout_seed: Optional[torch.Tensor],
                          deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                     window_right, softcap)
    _check_op_extras(q, cu_seqlens_q, alibi_slopes, dropout_p, dropout_seed)
    return ATTENTION_FORWARD(q.device, q.dtype, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
                             dropout_seed, deterministic)


@_attention_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, dropout_p, dropout_seed, deterministic=False):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        _lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.custom_op("docqa_fast::attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, grad_lse: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                           cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                           softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                           alibi_slopes: Optional[torch.Tensor], dropout_p: float,
                           dropout_seed: Optional[torch.Tensor], deterministic: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_op_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                     window_right, softcap)
    _check_backward_inputs(dout, q, out, lse, grad_lse, cu_seqlens_q is not None)
    _check_op_extras(q, cu_seqlens_q, alibi_slopes, dropout_p, dropout_seed)
    return ATTENTION_BACKWARD(q.device, q.dtype, dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap,
                              alibi_slopes, dropout_p, dropout_seed, deterministic)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed, deterministic=False):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
     window_right, softcap, alibi_slopes, dropout_p, dropout_seed, deterministic) = inputs
    ctx.options = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
    ctx.dropout_p, ctx.deterministic = dropout_p, deterministic
    # An output nobody differentiates gets None, not zeros: a zero LSE gradient would look like a
    # ring merge's to the dispatch (which cannot read values without a sync) and keep the
    # backward off cuDNN, and would cost our kernel a read.
    ctx.set_materialize_grads(False)
    # The seed travels to the backward, which draws the forward's dropout pattern again from it.
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed, *output)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, dropout_seed, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # The LSE has a gradient when partial results are merged by it (ring / split-KV attention
    # through merge_attention_states): d lse_i / d s_ij = p_ij, folded into the backward's delta.
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                                        *ctx.options, alibi_slopes, ctx.dropout_p, dropout_seed, ctx.deterministic)
    return (dq, dk, dv) + (None,) * 13


_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _op_arguments(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                  window_size, softcap, alibi_slopes, dropout_p, deterministic, draw_seed: bool) -> tuple:
    """The forward op's arguments of a validated call (``draw_seed``: draw the dropout seed, which
    advances torch's generator; :func:`explain_attention` must not)."""
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    check_heads(q, k, v, q_ndim=3 if varlen else 4, kv_ndim=3 if varlen else 4)
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"expected k with batch size {q.shape[0]} (q's), got {k.shape[0]}")
    window = check_window(window_size)
    softcap = check_softcap(softcap)
    dropout_p = check_dropout(dropout_p)
    if not isinstance(deterministic, bool):
        raise TypeError(f"expected deterministic to be a bool, got {deterministic!r}")
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("expected both cu_seqlens_q and cu_seqlens_k for packed (varlen) input")
        check_cu_seqlens_pair(q, cu_seqlens_q, cu_seqlens_k)
        _check_boundaries("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q)
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
    seed = dropout_seed(q.device) if dropout_p > 0 and draw_seed else None
    return (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            softmax_scale_or_default(softmax_scale, q.shape[-1]), bool(causal), left, right, softcap, alibi_slopes,
            dropout_p, seed, deterministic)


def attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
              deterministic=False):
    """Validated attention -> (out, lse). Dense when ``cu_seqlens_q`` is None.

    ``alibi_slopes`` (H,) / (B, H) fp32: flash-attn's ALiBi bias. ``dropout_p`` > 0 drops
    attention weights; the pattern comes from a Philox seed drawn here from the device's torch
    generator (so ``torch.manual_seed`` reproduces a run and a CUDA graph captures it) and kept
    for the backward. ``deterministic=True`` keeps the call (forward and backward) on our
    kernels, whose backward is always bitwise reproducible, never on cuDNN's."""
    return _attention_forward_op(*_op_arguments(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, deterministic=deterministic, draw_seed=True))


@dataclass(frozen=True)
class LaunchChoice:
    """A choice our Triton kernels make when they launch a call: the tunable that holds it
    (``attention_backward_passes``, ``attention_causal_order``), its value, what that means, why."""

    tunable: str
    value: int
    meaning: str
    why: str

    def __str__(self) -> str:
        return f"{self.meaning} -- {self.why}"


_PASSES_MEANING = {1: "one pass: the dK/dV kernel adds dQ by fp32 atomics (ATOMIC_DQ)",
                   2: "two passes: the dK/dV kernel, then the dQ kernel (no atomics)"}
_ORDER_MEANING = {1: "ORDER 1: each head's blocks longest first, head after head",
                  2: "ORDER 2 (BLOCKS_LAST): the longest blocks of every head first (while a sequence has at most "
                     "65,535 blocks)"}


@dataclass(frozen=True)
class AttentionExplanation:
    """Which implementation each half of a training-attention call takes, and why (what
    :func:`explain_attention` returns; printing it gives the text). Where our Triton kernels run
    a half: ``backward_passes``, the backward variant they launch, and for causal calls
    ``causal_order``, the order their blocks launch in (None where no half runs on them)."""

    call: str
    forward: Decision
    backward: Decision
    backward_with_lse_grad: Decision
    backward_passes: LaunchChoice | None = None
    causal_order: LaunchChoice | None = None

    def __str__(self) -> str:
        def part(title, decision):
            lines = [f"{title}: {decision.backend} -- {decision.why}"]
            lines += [f"    not {backend}: {status}" for backend, status in decision.others]
            return lines

        launch = [f"  {title}: {choice}" for title, choice in (("triton backward", self.backward_passes),
                                                                ("triton causal launch order", self.causal_order))
                  if choice is not None]
        return "\n".join([self.call, *part("  forward", self.forward), *part("  backward", self.backward),
                          *part("  backward with a gradient to the LSE (ring / split-KV merges)",
                                self.backward_with_lse_grad), *launch])

    __repr__ = __str__


def explain_attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                      alibi_slopes=None, deterministic=False, *, cu_seqlens_q=None, cu_seqlens_k=None,
                      max_seqlen_q=None, max_seqlen_k=None) -> AttentionExplanation:
    """Which implementation ``flash_attn_func(q, k, v, ...)`` (or ``flash_attn_varlen_func`` with
    ``cu_seqlens_*``) would run for its forward and its backward, and why each other one would
    not, without running anything (no kernel, no dropout draw). The arguments are flash-attn's and
    are checked as a call checks them. Reads the same settings as a call: DOCQA_FAST_ATTENTION,
    DOCQA_FAST_BACKEND and the tuned table of q's GPU."""
    args = _op_arguments(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                         max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
                         window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                         deterministic=deterministic, draw_seed=False)
    device, dtype = q.device, q.dtype
    # The backward's decision reads shapes and options only: q stands in for dout and out.
    lse = q.new_empty(0, dtype=torch.float32)
    backward_args = (q, q, k, v, q, lse, None, *args[3:])
    with_lse_grad = (q, q, k, v, q, lse, lse, *args[3:])
    shape = "x".join(map(str, q.shape))
    options = [name for name, on in (("causal", args[8]), ("window", args[9:11] != (-1, -1)), ("softcap", args[11]),
                                     ("ALiBi", alibi_slopes is not None), ("dropout", args[13]),
                                     ("deterministic", deterministic)) if on]
    call = (f"attention on {device.type} {str(dtype).removeprefix('torch.')}: q {shape}, {k.shape[-2]} KV heads, "
            f"{'varlen' if cu_seqlens_q is not None else 'dense'}{', ' if options else ''}{', '.join(options)}")
    decisions = (_decision(ATTENTION_FORWARD, device, dtype, args),
                 _decision(ATTENTION_BACKWARD, device, dtype, backward_args),
                 _decision(ATTENTION_BACKWARD, device, dtype, with_lse_grad))
    return AttentionExplanation(call, *decisions, *_launch_choices(q, args, deterministic, decisions))


def _launch_choices(q, args, deterministic, decisions) -> tuple[LaunchChoice | None, LaunchChoice | None]:
    """(backward variant, causal launch order) our kernels would take for the call, asked of the
    launcher's own rules (kernels.backward_variant, kernels.causal_order), or None where the
    halves concerned do not run on them."""
    from ..kernels import attention as kernels
    from ..kernels import tuning

    forward, *backwards = (decision.backend == "triton" for decision in decisions)
    table = tuning.active_table_path(q.device)
    # Where the launcher reads the value: the table's entry for the key when it has one, else the built-in one.
    source = f"tuned table {table.rsplit('/', 1)[-1]}" if table else "no tuned table for this device"
    head_dim, varlen, causal = q.shape[-1], args[3] is not None, args[8]
    passes = order = None
    if any(backwards):
        reproducible = _reproducible_backward_reason(deterministic)
        # The backward gets dout.contiguous(): a contiguous tensor like q (on meta: nothing allocated) stands in.
        dout = torch.empty(q.shape, dtype=q.dtype, device="meta")
        value, tma = kernels.backward_variant(q, dout, varlen, reproducible is not None)
        why = (f"{reproducible} (bitwise reproducible gradients)" if reproducible
               else f"attention_backward_passes[{kernels.tile_key(head_dim, tma)}] ({source})")
        passes = LaunchChoice("attention_backward_passes", value, _PASSES_MEANING[value], why)
    if causal and (forward or any(backwards)):
        value = kernels.causal_order(head_dim, causal, q.device)
        order = LaunchChoice("attention_causal_order", value, _ORDER_MEANING[value],
                             f"attention_causal_order for head dim {head_dim} ({source})")
    return passes, order


def _decision(op, device, dtype, args) -> Decision:
    try:
        return op.decision(device, dtype, *args)
    except RuntimeError as exc:  # forced onto an implementation that cannot run it: what the call would raise
        return Decision(op.name, "error", str(exc), ())

"""Reference attention with flash-attn's semantics: the oracle of the attention kernels.

Layouts: q (B, Sq, H, D), k/v (B, Sk, Hk, D) with H % Hk == 0 (GQA); or packed varlen
q (total_q, H, D), k/v (total_k, Hk, D) with int32 ``cu_seqlens_q/k`` (B + 1,).

* scores = q k^T * softmax_scale, then ``softcap * tanh(scores / softcap)`` when softcap > 0;
* query i of a sequence sees key j when
  ``i + Sk - Sq - left <= j <= i + Sk - Sq + right`` (window_size = (left, right), -1 =
  unbounded); ``causal`` sets right = 0 -- masks align bottom-right, as in flash-attn 2;
* returns (out like q, lse fp32 (B, H, Sq) or (H, total_q), natural log). A query that sees
  no key gets out = 0 and lse = -inf (flash-attn writes +inf there; merge_attention_states
  accepts both).

Math in fp32 (fp64 for fp64 inputs), the whole score matrix materialised: small sizes only.
"""

from __future__ import annotations

import math

import torch


def _visible(seqlen_q, seqlen_k, causal, window_size, device):
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diagonal = i + seqlen_k - seqlen_q
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        visible &= j <= diagonal + right
    if left >= 0:
        visible &= j >= diagonal - left
    return visible


def _attention_one(q, k, v, softmax_scale, causal, window_size, softcap):
    """q (Sq, H, D), k/v (Sk, Hk, D) -> out (Sq, H, D), lse (H, Sq), in the accumulation dtype."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    visible = _visible(q.shape[0], k.shape[0], causal, window_size, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (H, Sq); -inf where nothing is visible
    probs = torch.exp(scores - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  cu_seqlens_q=None, cu_seqlens_k=None, upcast=True):
    """flash-attn's attention in plain PyTorch -> (out, lse). See the module docstring.

    ``upcast=False`` computes in the inputs' dtype throughout: the "plain PyTorch at the
    kernel's precision" that the tolerance rule compares a kernel's error with.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not upcast:
        acc = q.dtype
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    args = (softmax_scale, causal, tuple(window_size), softcap)
    if cu_seqlens_q is None:
        outs, lses = zip(*(_attention_one(qb.to(acc), kb.to(acc), vb.to(acc), *args) for qb, kb, vb in zip(q, k, v)))
        return torch.stack(outs).to(q.dtype), torch.stack(lses).float()
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if qe == qs:
            continue
        o, l = _attention_one(q[qs:qe].to(acc), k[ks:ke].to(acc), v[ks:ke].to(acc), *args)
        out[qs:qe], lse[:, qs:qe] = o, l.float()
    return out.to(q.dtype), lse


def _attention_backward_one(dout, q, k, v, out, lse, grad_lse, softmax_scale, causal, window_size, softcap):
    """The FlashAttention backward in closed form for one sequence (the kernels' math, written plainly)."""
    groups = q.shape[1] // k.shape[1]
    k_rep, v_rep = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k_rep) * softmax_scale
    slope = torch.full_like(scores, softmax_scale)
    if softcap > 0:
        tanh = torch.tanh(scores / softcap)
        scores, slope = softcap * tanh, softmax_scale * (1 - tanh * tanh)
    visible = _visible(q.shape[0], k.shape[0], causal, window_size, q.device)
    lse = torch.where(lse == float("-inf"), float("inf"), lse)  # rows that saw no key: p = 0
    probs = torch.exp(scores.masked_fill(~visible, float("-inf")) - lse[..., None])
    delta = (dout * out).sum(-1).t()  # (H, Sq): rowsum(dO * O)
    if grad_lse is not None:  # d lse_i / d s_ij = p_ij
        delta = delta - grad_lse
    dv = torch.einsum("hqk,qhd->khd", probs, dout)
    dprobs = torch.einsum("qhd,khd->hqk", dout, v_rep)
    dscores = probs * (dprobs - delta[..., None]) * slope
    dq = torch.einsum("hqk,khd->qhd", dscores, k_rep)
    dk = torch.einsum("hqk,qhd->khd", dscores, q)
    fold = lambda t: t.view(t.shape[0], k.shape[1], groups, t.shape[-1]).sum(2)  # noqa: E731  (GQA: sum the group)
    return dq, fold(dk), fold(dv)


def attention_backward_ref(dout, q, k, v, out, lse, *, grad_lse=None, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None):
    """(dq, dk, dv) of attention_ref given the upstream gradients of out (and of lse) and the forward's results."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    args = (softmax_scale, causal, tuple(window_size), softcap)
    cast = lambda *ts: [t.to(acc) for t in ts]  # noqa: E731
    if cu_seqlens_q is None:
        grad_lses = grad_lse if grad_lse is not None else [None] * len(q)
        grads = [_attention_backward_one(*cast(d, qb, kb, vb, ob), lb.to(acc), None if gl is None else gl.to(acc),
                                         *args)
                 for d, qb, kb, vb, ob, lb, gl in zip(dout, q, k, v, out, lse, grad_lses)]
        return tuple(torch.stack(g).to(t.dtype) for g, t in zip(zip(*grads), (q, k, v)))
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if qe == qs or ke == ks:
            continue
        part_grad_lse = None if grad_lse is None else grad_lse[:, qs:qe].to(acc)
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = _attention_backward_one(
            *cast(dout[qs:qe], q[qs:qe], k[ks:ke], v[ks:ke], out[qs:qe]), lse[:, qs:qe].to(acc), part_grad_lse,
            *args)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

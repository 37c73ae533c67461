"""Reference attention with flash-attn's semantics: the oracle of the attention kernels.

Layouts: q (B, Sq, H, D), k/v (B, Sk, Hk, D) with H % Hk == 0 (GQA); or packed varlen
q (total_q, H, D), k/v (total_k, Hk, D) with int32 ``cu_seqlens_q/k`` (B + 1,).

* scores = q k^T * softmax_scale, then ``softcap * tanh(scores / softcap)`` when softcap > 0;
* query i of a sequence sees key j when
  ``i + Sk - Sq - left <= j <= i + Sk - Sq + right`` (window_size = (left, right), -1 =
  unbounded); ``causal`` sets right = 0 -- masks align bottom-right, as in flash-attn 2;
* ALiBi (``alibi_slopes`` (H,) or (B, H)): ``- slope * |i + Sk - Sq - j|`` is added to the
  (capped) scores, flash-attn's bias, bottom-right aligned per sequence, causal or not; the LSE
  includes it;
* dropout (``dropout_p`` > 0, with a ``dropout_seed``): the probabilities of dropped elements
  become 0 and the kept ones are scaled by 1 / (1 - p) before they weight v; the LSE does not
  change. Element (b, h, i, j) (i, j sequence-local) is kept where the first word of
  Philox-4x32-10 keyed by the seed with counters (j, i, b * H + h, 0) is >= p * 2^32
  (dropout_keep_ref): the kernels draw the same bits, so every backend drops the same elements;
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


_MASK32 = 0xFFFFFFFF


def _mulhilo32(a, b):
    """(high, low) 32-bit halves of a * b for 32-bit a, b held in int64 (b split in 16-bit halves
    so no product overflows int64)."""
    low_b, high_b = b & 0xFFFF, b >> 16
    p_low, p_high = a * low_b, a * high_b
    t = p_low + ((p_high & 0xFFFF) << 16)
    return (p_high >> 16) + (t >> 32), t & _MASK32


def _philox_first_word(seed, c0, c1, c2, c3, rounds=10):
    """The first output word of Philox-4x32 (Salmon et al., 2011) for int64 tensors of 32-bit
    counters, keyed by the 64-bit ``seed`` (low word first): what ``tl.philox`` computes."""
    k0 = torch.full_like(c0, seed & _MASK32)
    k1 = torch.full_like(c0, (seed >> 32) & _MASK32)
    for _ in range(rounds):
        high_b, low_b = _mulhilo32(torch.full_like(c2, 0xCD9E8D57), c2)
        high_a, low_a = _mulhilo32(torch.full_like(c0, 0xD2511F53), c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0


def dropout_keep_ref(seed, first_stream, heads, seqlen_q, seqlen_k, dropout_p, device=None):
    """Which elements dropout keeps, (heads, Sq, Sk) bool, for streams first_stream + h (b * H + h
    of sequence b): see the module docstring. ``seed`` is an int or a one-element int64 tensor."""
    seed = int(seed)
    shape = (heads, seqlen_q, seqlen_k)
    j = torch.arange(seqlen_k, device=device).expand(shape)
    i = torch.arange(seqlen_q, device=device)[:, None].expand(shape)
    stream = (first_stream + torch.arange(heads, device=device))[:, None, None].expand(shape)
    word = _philox_first_word(seed, j.clone(), i.clone(), stream.clone(), torch.zeros(shape, dtype=torch.long,
                                                                                       device=device))
    return word >= min(int(dropout_p * 2 ** 32), 2 ** 32 - 1)


def _alibi(slopes, seqlen_q, seqlen_k, device):
    """ALiBi's (H, Sq, Sk) bias: -slope * |i + Sk - Sq - j|."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return -slopes[:, None, None] * (i + seqlen_k - seqlen_q - j).abs()


def _scores(q, k_rep, softmax_scale, softcap, slopes):
    """(scores (H, Sq, Sk), d scores / d (q.k)): scaled, capped, ALiBi added."""
    scores = torch.einsum("qhd,khd->hqk", q, k_rep) * softmax_scale
    slope = torch.full_like(scores, softmax_scale)
    if softcap > 0:
        tanh = torch.tanh(scores / softcap)
        scores, slope = softcap * tanh, softmax_scale * (1 - tanh * tanh)
    if slopes is not None:
        scores = scores + _alibi(slopes.to(scores.dtype), q.shape[0], k_rep.shape[0], q.device)
    return scores, slope


def _attention_one(q, k, v, softmax_scale, causal, window_size, softcap, slopes, keep, keep_scale):
    """q (Sq, H, D), k/v (Sk, Hk, D) -> out (Sq, H, D), lse (H, Sq), in the accumulation dtype.
    ``slopes`` (H,) or None; ``keep`` (H, Sq, Sk) bool or None (dropout)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores, _ = _scores(q, k, softmax_scale, softcap, slopes)
    visible = _visible(q.shape[0], k.shape[0], causal, window_size, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (H, Sq); -inf where nothing is visible
    probs = torch.exp(scores - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    if keep is not None:
        probs = torch.where(keep, probs * keep_scale, 0.0)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse


def _per_sequence(b, heads, seqlen_q, seqlen_k, alibi_slopes, dropout_p, dropout_seed, device):
    """(slopes (H,) or None, keep mask or None, keep scale) of sequence b."""
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
    if dropout_p <= 0:
        return slopes, None, 1.0
    keep = dropout_keep_ref(dropout_seed, b * heads, heads, seqlen_q, seqlen_k, dropout_p, device)
    return slopes, keep, 1.0 / (1.0 - dropout_p)


def _check_dropout(dropout_p, dropout_seed):
    if dropout_p > 0 and dropout_seed is None:
        raise ValueError("expected a dropout_seed with dropout_p > 0 (the kernels' and the reference's masks come "
                         "from it)")


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  cu_seqlens_q=None, cu_seqlens_k=None, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
                  upcast=True):
    """flash-attn's attention in plain PyTorch -> (out, lse). See the module docstring.

    ``upcast=False`` computes in the inputs' dtype throughout: the "plain PyTorch at the
    kernel's precision" that the tolerance rule compares a kernel's error with.
    """
    _check_dropout(dropout_p, dropout_seed)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not upcast:
        acc = q.dtype
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    args = (softmax_scale, causal, tuple(window_size), softcap)
    heads = q.shape[-2]
    extras = lambda b, sq, sk: _per_sequence(b, heads, sq, sk, alibi_slopes, dropout_p, dropout_seed,  # noqa: E731
                                             q.device)
    if cu_seqlens_q is None and q.shape[0] == 0:  # an empty batch: nothing to stack
        return torch.empty_like(q), torch.empty((0, heads, q.shape[1]), dtype=torch.float32, device=q.device)
    if cu_seqlens_q is None:
        outs, lses = zip(*(_attention_one(qb.to(acc), kb.to(acc), vb.to(acc), *args,
                                          *extras(b, qb.shape[0], kb.shape[0]))
                           for b, (qb, kb, vb) in enumerate(zip(q, k, v))))
        return torch.stack(outs).to(q.dtype), torch.stack(lses).float()
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if qe == qs:
            continue
        o, l = _attention_one(q[qs:qe].to(acc), k[ks:ke].to(acc), v[ks:ke].to(acc), *args,
                              *extras(b, qe - qs, ke - ks))
        out[qs:qe], lse[:, qs:qe] = o, l.float()
    return out.to(q.dtype), lse


def _attention_backward_one(dout, q, k, v, out, lse, grad_lse, softmax_scale, causal, window_size, softcap, slopes,
                            keep, keep_scale):
    """The FlashAttention backward in closed form for one sequence (the kernels' math, written
    plainly). Dropout: O = (P * M / (1 - p)) V, so dV uses the dropped weights, dP_ij is masked and
    scaled the same way, and delta = rowsum(dO * O) = sum_j P_ij dP_ij still holds."""
    groups = q.shape[1] // k.shape[1]
    k_rep, v_rep = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores, slope = _scores(q, k_rep, softmax_scale, softcap, slopes)
    visible = _visible(q.shape[0], k.shape[0], causal, window_size, q.device)
    lse = torch.where(lse == float("-inf"), float("inf"), lse)  # rows that saw no key: p = 0
    probs = torch.exp(scores.masked_fill(~visible, float("-inf")) - lse[..., None])
    delta = (dout * out).sum(-1).t()  # (H, Sq): rowsum(dO * O)
    if grad_lse is not None:  # d lse_i / d s_ij = p_ij
        delta = delta - grad_lse
    weights = probs if keep is None else torch.where(keep, probs * keep_scale, 0.0)
    dv = torch.einsum("hqk,qhd->khd", weights, dout)
    dprobs = torch.einsum("qhd,khd->hqk", dout, v_rep)
    if keep is not None:
        dprobs = torch.where(keep, dprobs * keep_scale, 0.0)
    dscores = probs * (dprobs - delta[..., None]) * slope
    dq = torch.einsum("hqk,khd->qhd", dscores, k_rep)
    dk = torch.einsum("hqk,qhd->khd", dscores, q)
    fold = lambda t: t.view(t.shape[0], k.shape[1], groups, t.shape[-1]).sum(2)  # noqa: E731  (GQA: sum the group)
    return dq, fold(dk), fold(dv)


def attention_backward_ref(dout, q, k, v, out, lse, *, grad_lse=None, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
                           alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
    """(dq, dk, dv) of attention_ref given the upstream gradients of out (and of lse) and the forward's results."""
    _check_dropout(dropout_p, dropout_seed)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    args = (softmax_scale, causal, tuple(window_size), softcap)
    cast = lambda *ts: [t.to(acc) for t in ts]  # noqa: E731
    heads = q.shape[-2]
    extras = lambda b, sq, sk: _per_sequence(b, heads, sq, sk, alibi_slopes, dropout_p, dropout_seed,  # noqa: E731
                                             q.device)
    if cu_seqlens_q is None and q.shape[0] == 0:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if cu_seqlens_q is None:
        grad_lses = grad_lse if grad_lse is not None else [None] * len(q)
        grads = [_attention_backward_one(*cast(d, qb, kb, vb, ob), lb.to(acc), None if gl is None else gl.to(acc),
                                         *args, *extras(b, qb.shape[0], kb.shape[0]))
                 for b, (d, qb, kb, vb, ob, lb, gl) in enumerate(zip(dout, q, k, v, out, lse, grad_lses))]
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
            *args, *extras(b, qe - qs, ke - ks))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

"""Ring attention over docqa_fast's training attention ops: contiguous and zigzag layouts,
dense and packed (varlen), forward and backward.

Forward, on each rank: the local queries stay; the key/value shards go around the ring
(``batch_isend_irecv``, the next shard in flight while the current one is computed); each
step's blocks (:mod:`.plan`) run ``docqa_fast::attention_forward`` and their (out, lse) are
merged into an fp32 accumulator by ``merge_attention_states`` -- accumulating the merged output
in the inputs' bf16 would round once per step and let the error grow with the ring's length.

Backward (the ring-flash-attn scheme): the same ring again. Every block's gradients come from
``docqa_fast::attention_backward`` given the *final* output and the *global* LSE, which makes
each block's probabilities the global ones: no re-merge is needed. dQ accumulates locally; the
dK/dV of a key/value shard travel with it (fp32) and reach its owner after the last step.
"""

from __future__ import annotations

import functools

import torch

from .._validation import check_cu_seqlens, check_cu_seqlens_values, value_checks_enabled
from ..attention_core import check_heads, check_softcap, check_window, softmax_scale_or_default
from ..merge_attention import merge_attention_states
from ._comm import agree, describe, group_size_rank, ring_exchange
from .plan import chunks_per_rank, rank_chunks, ring_plan

_KV_TAG, _GRAD_TAG = 0, 8


# ------------------------------------------------------------------------- sequence layouts

def split_sequence(x: torch.Tensor, dim: int, layout: str, group=None) -> torch.Tensor:
    """This rank's shard of a full tensor along ``dim`` in ``layout`` ("zigzag"/"contiguous")."""
    world, rank = group_size_rank(group)
    n_chunks = world * chunks_per_rank(layout)
    if x.shape[dim] % n_chunks:
        raise ValueError(f"expected x.shape[{dim}] divisible by {n_chunks} ({layout} layout over {world} ranks), "
                         f"got {x.shape[dim]}")
    chunks = x.chunk(n_chunks, dim=dim)
    return torch.cat([chunks[c] for c in rank_chunks(layout, rank, world)], dim=dim)


def gather_sequence(x: torch.Tensor, dim: int, layout: str, group=None) -> torch.Tensor:
    """The full tensor from every rank's ``layout`` shard (the inverse of :func:`split_sequence`;
    not differentiable)."""
    import torch.distributed as dist

    world, _ = group_size_rank(group)
    per_rank = chunks_per_rank(layout)
    if x.shape[dim] % per_rank:
        raise ValueError(f"expected x.shape[{dim}] divisible by {per_rank}, got {x.shape[dim]}")
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    chunks = [None] * (world * per_rank)
    for rank, shard in enumerate(shards):
        for piece, c in zip(shard.chunk(per_rank, dim=dim), rank_chunks(layout, rank, world)):
            chunks[c] = piece
    return torch.cat(chunks, dim=dim)


def zigzag_split(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's zigzag shard of ``x``: chunks r and 2P-1-r of 2P along ``dim``."""
    return split_sequence(x, dim, "zigzag", group)


def zigzag_gather(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """The full tensor from every rank's zigzag shard along ``dim`` (not differentiable)."""
    return gather_sequence(x, dim, "zigzag", group)


# ------------------------------------------------------------------------- block calls

def _rows(x, lo, hi, dense):
    return (x[:, lo:hi] if dense else x[lo:hi]).contiguous()


def _lse_rows(lse, lo, hi):
    return lse[..., lo:hi].contiguous()  # (B, H, S) and (H, T) both keep the sequence last


@functools.lru_cache(maxsize=256)
def _boundaries_on(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Kept per device: a ring makes the same few block boundaries every step and every call, and
    # each fresh one would be a host-to-device copy.
    return torch.tensor(values, dtype=torch.int32, device=device)


def _block_layout(block, dense, device):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of a block's kernel call."""
    sq, sk = block.q_hi - block.q_lo, block.k_hi - block.k_lo
    if dense:
        return None, None, sq, sk
    if block.cu_seqlens is not None:
        cu = _boundaries_on(block.cu_seqlens, device)
        longest = max(b - a for a, b in zip(block.cu_seqlens, block.cu_seqlens[1:]))
        return cu, cu, longest, longest
    return _boundaries_on((0, sq), device), _boundaries_on((0, sk), device), sq, sk


def _block_forward(q, k, v, block, scale, softcap, dense):
    cu_q, cu_k, max_q, max_k = _block_layout(block, dense, q.device)
    return torch.ops.docqa_fast.attention_forward(
        _rows(q, block.q_lo, block.q_hi, dense), _rows(k, block.k_lo, block.k_hi, dense),
        _rows(v, block.k_lo, block.k_hi, dense), cu_q, cu_k, max_q, max_k, scale, block.causal,
        block.window_left, block.window_right, softcap, None, 0.0, None, False)


def _block_backward(dout, q, k, v, out, lse, grad_lse, block, scale, softcap, dense, deterministic):
    cu_q, cu_k, max_q, max_k = _block_layout(block, dense, q.device)
    qs = (block.q_lo, block.q_hi, dense)
    return torch.ops.docqa_fast.attention_backward(
        _rows(dout, *qs), _rows(q, *qs), _rows(k, block.k_lo, block.k_hi, dense),
        _rows(v, block.k_lo, block.k_hi, dense), _rows(out, *qs), _lse_rows(lse, block.q_lo, block.q_hi),
        None if grad_lse is None else _lse_rows(grad_lse, block.q_lo, block.q_hi), cu_q, cu_k, max_q, max_k, scale,
        block.causal, block.window_left, block.window_right, softcap, None, 0.0, None, deterministic)


def _merge_into(acc_out, acc_lse, out, lse, block, dense):
    """Merge a block's (out, lse) into the fp32 accumulators' rows of the block."""
    rows = acc_out[:, block.q_lo:block.q_hi] if dense else acc_out[block.q_lo:block.q_hi]
    lse_rows = acc_lse[..., block.q_lo:block.q_hi]
    merged_out, merged_lse = merge_attention_states(rows, lse_rows.contiguous(), out.float(), lse)
    rows.copy_(merged_out)
    lse_rows.copy_(merged_lse)


def _add_rows(acc, grad, lo, hi, dense):
    (acc[:, lo:hi] if dense else acc[lo:hi]).add_(grad)


def ring_kv(k, v, plan, group):
    """The key/value shards a rank computes with, as (step, k, v) in ``plan.offsets`` order:
    its own, then those passed forward (from rank r-1, r-2, ...) and backward (from r+1, ...)
    interleaved; each next shard is in flight while the caller computes on the current one."""
    forward = ring_exchange([k, v], group, shift=1, tag=_KV_TAG) if plan.forward_hops else None
    backward = ring_exchange([k, v], group, shift=-1, tag=_KV_TAG + 2) if plan.backward_hops else None
    yield 0, k, v
    for hop in range(1, max(plan.forward_hops, plan.backward_hops) + 1):
        if hop <= plan.forward_hops:
            k_f, v_f = forward.wait()
            if hop < plan.forward_hops:
                forward = ring_exchange([k_f, v_f], group, shift=1, tag=_KV_TAG)
            yield hop, k_f, v_f
        if hop <= plan.backward_hops:
            k_b, v_b = backward.wait()
            if hop < plan.backward_hops:
                backward = ring_exchange([k_b, v_b], group, shift=-1, tag=_KV_TAG + 2)
            yield plan.world - hop, k_b, v_b


def ring_forward(q, kv_steps, blocks, scale, softcap, dense):
    """(out fp32, lse) of this rank's queries: the blocks of each step over that step's key/value
    shard (``kv_steps``: (step, k, v) from :func:`ring_kv`, or the shards themselves in a
    single-process simulation; ``blocks[step]``: the plan's blocks of this rank) merged into fp32
    accumulators."""
    acc_out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if dense else (q.shape[1], q.shape[0])
    acc_lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    for step, k_cur, v_cur in kv_steps:
        for block in blocks[step]:
            out, lse = _block_forward(q, k_cur, v_cur, block, scale, softcap, dense)
            _merge_into(acc_out, acc_lse, out, lse, block, dense)
    return acc_out, acc_lse


def ring_backward(dout, grad_lse, q, k, v, out, lse, plan, rank, group, scale, softcap, dense, deterministic):
    """(dq, dk, dv) in fp32: the backward ring. The dK/dV of a key/value shard travel with it,
    in both directions: at each step a rank computes its blocks' contributions for the shard it
    holds, adds the sum the previous holder in that direction sent (it arrived during the
    compute) and passes it on; after the last hop each direction's sum goes home."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    forward_hops, backward_hops = plan.forward_hops, plan.backward_hops
    chain = {}  # direction -> the in-flight sum of the shard held next in that direction
    home = []  # exchanges bringing this rank's own shard's sums back, and its own part
    for step, k_cur, v_cur in ring_kv(k, v, plan, group):
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for block in plan.steps[rank][step]:
            dq_b, dk_b, dv_b = _block_backward(dout, q, k_cur, v_cur, out, lse, grad_lse, block, scale, softcap,
                                               dense, deterministic)
            _add_rows(dq, dq_b, block.q_lo, block.q_hi, dense)
            _add_rows(dk, dk_b, block.k_lo, block.k_hi, dense)
            _add_rows(dv, dv_b, block.k_lo, block.k_hi, dense)
        if step == 0:  # the own shard's part starts the forward chain
            direction, hop, last, shift = 1, 0, forward_hops, 1
        elif step <= forward_hops:
            direction, hop, last, shift = 1, step, forward_hops, 1
        else:
            direction, hop, last, shift = -1, plan.world - step, backward_hops, -1
        if direction in chain and hop > (0 if direction == 1 else 1):
            dk_in, dv_in = chain.pop(direction).wait()
            dk += dk_in
            dv += dv_in
        tag = _GRAD_TAG + (0 if direction == 1 else 2)
        if hop < last:
            chain[direction] = ring_exchange([dk, dv], group, shift=shift, tag=tag)
        elif hop == 0:
            home.append((dk, dv))  # no forward hops: the own part stays
        else:  # the shard of the rank `hop` steps back (forward) or ahead (backward) goes home
            home.append(ring_exchange([dk, dv], group, shift=-shift * hop, tag=tag + 4))
    dk = dv = None
    for part in home:
        dk_part, dv_part = part if isinstance(part, tuple) else part.wait()
        dk = dk_part if dk is None else dk + dk_part
        dv = dv_part if dv is None else dv + dv_part
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, rank, group, scale, softcap, dense, deterministic):
        out, lse = ring_forward(q, ring_kv(k, v, plan, group), plan.steps[rank], scale, softcap, dense)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (plan, rank, group, scale, softcap, dense, deterministic)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ring_backward(dout.contiguous(), grad_lse, q, k, v, out, lse, *ctx.options)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *(None,) * 7


# ------------------------------------------------------------------------- public functions

def _unsupported(dropout_p, alibi_slopes):
    if dropout_p:
        raise ValueError(f"expected dropout_p = 0 for context-parallel attention (the dropout pattern is drawn per "
                         f"block), got {dropout_p}")
    if alibi_slopes is not None:
        raise ValueError("expected alibi_slopes=None for ring attention (the bias is relative to each block's "
                         "corner, not the global positions); ulysses_flash_attn_func takes it")


def _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale, causal, window_size, softcap,
             alibi_slopes, layout, group):
    """Validate locally, agree across ranks, and return the plan and the kernel options. A packed
    call reads cu_seqlens (q's and k's, stacked) once, in the agreement's own read of the device:
    the plan needs the boundaries on the host, and the value checks run on them there."""
    world, rank = group_size_rank(group)
    dense = cu_seqlens_q is None and cu_seqlens_k is None
    error, plan, read, total = None, None, None, None
    scale = window = None
    try:
        check_heads(q, k, v, q_ndim=4 if dense else 3, kv_ndim=4 if dense else 3)
        _unsupported(dropout_p, alibi_slopes)
        window = check_window(window_size)
        softcap = check_softcap(softcap)
        scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
        seq_dim = 1 if dense else 0
        if k.shape[seq_dim] != q.shape[seq_dim] or (dense and k.shape[0] != q.shape[0]):
            raise ValueError(f"expected k with q's local sequence length and batch (self-attention over the same "
                             f"tokens), got q {tuple(q.shape)}, k {tuple(k.shape)}")
        total = q.shape[seq_dim] * world
        if dense:
            plan = ring_plan(world, layout, total, bool(causal), window)
        else:
            if cu_seqlens_q is None or cu_seqlens_k is None:
                raise ValueError("expected both cu_seqlens_q and cu_seqlens_k for packed (varlen) input")
            for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
                check_cu_seqlens(name, cu, total, q, "q", values=False)  # the layout; the values after the read
            read = torch.cat([cu_seqlens_q, cu_seqlens_k])
    except (ValueError, TypeError, RuntimeError) as exc:
        error, read = exc, None

    def boundaries_and_plan(values):
        half = len(values) // 2
        boundaries = tuple(values[:half])
        if value_checks_enabled():
            check_cu_seqlens_values("cu_seqlens_q", boundaries, total)
            if tuple(values[half:]) != boundaries:
                raise ValueError("expected cu_seqlens_k equal to cu_seqlens_q (ring attention is self-attention "
                                 "over the same packed tokens)")
        return ring_plan(world, layout, total, bool(causal), window, boundaries)

    signature = describe(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=bool(causal), window=window, softcap=softcap,
                         scale=scale, layout=layout)
    planned = agree(group, signature, error, f"{layout} ring attention", read,
                    boundaries_and_plan if read is not None else None, "cu_seqlens_q+cu_seqlens_k")
    return plan if read is None else planned, rank, scale, softcap, dense


def _ring(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale, causal, window_size, softcap,
          alibi_slopes, deterministic, return_attn_probs, layout, group):
    plan, rank, scale, softcap, dense = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale,
                                                 causal, window_size, softcap, alibi_slopes, layout, group)
    out, lse = _RingAttention.apply(q, k, v, plan, rank, group, scale, softcap, dense, bool(deterministic))
    return (out, lse, None) if return_attn_probs else out


def zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                group=None):
    """``flash_attn_func`` over a sequence sharded in the zigzag layout (:func:`zigzag_split`):
    q/k/v (B, S/P, H, D) local shards in, this rank's output shard out (and its LSE
    (B, H, S/P) with ``return_attn_probs``). The global S must be divisible by 2P."""
    return _ring(q, k, v, None, None, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 deterministic, return_attn_probs, "zigzag", group)


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                         softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """``flash_attn_func`` over contiguous sequence shards (rank r holds the r-th of P slices).
    Under a causal mask the last rank does P times the first one's work (use the zigzag
    layout); with a sliding window no wider than a shard only one ring step runs."""
    return _ring(q, k, v, None, None, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 deterministic, return_attn_probs, "contiguous", group)


def zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                       dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                       softcap=0.0, alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False, group=None):
    """``flash_attn_varlen_func`` over packed documents sharded in the zigzag layout: q/k/v
    (T/P, H, D) shards of the packed (T, H, D) batch (``zigzag_split(x, 0)``), and
    ``cu_seqlens_q`` = ``cu_seqlens_k`` the *global* boundaries (the same on every rank;
    documents may cross chunk and rank boundaries). ``max_seqlen_*`` are not needed (kept for
    the signature). The LSE with ``return_attn_probs`` is (H, T/P). One host read of
    cu_seqlens per call (the plan is cached per boundaries)."""
    return _ring(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs, "zigzag", group)


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    """As :func:`zigzag_ring_flash_attn_varlen_func` over contiguous shards of the packed batch."""
    return _ring(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, softmax_scale, causal, window_size, softcap,
                 alibi_slopes, deterministic, return_attn_probs, "contiguous", group)

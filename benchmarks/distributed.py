"""Context parallelism (docqa_fast.distributed): the ring's per-rank compute, timed on one GPU,
and a communication model of whole rings at 2-64 GPUs.

Timed cases (GPU only; CPU runs list them as skipped): rank 0 of a zigzag ring of P ranks
simulated in one process -- its blocks of every step over the key/value shards of the ranks
that would send them, merged in fp32, exactly as a rank computes -- against the unsharded
kernel doing the same work: one ``flash_attn_varlen_func`` call computing the same output
rows (rank 0 holds chunks 0 and 2P-1 of 2P: chunk 0 attends to itself, chunk 2P-1 to the whole
sequence, both causal: two packed sequences of one call). The ratio of the two is the ring's
compute efficiency (smaller blocks, merges) before any communication; outputs are compared.
Shapes: Qwen2.5-VL-7B's attention (28 heads over 4 KV heads, D 128), bf16, causal.

The model (``python -m benchmarks.distributed``, no GPU needed) adds communication: per ring
step a rank computes two c x c blocks (c = S/2P) while the next K/V shard (and in the
backward the dK/dV sums, fp32) cross one link; a step lasts the longer of the two, plus the
fp32 merges. Efficiency = (unsharded time / P) / ring time, with the kernel and merge rates
measured on an H200 (benchmarks/results/nvidia-h200) and nominal link bandwidths at
``LINK_EFFICIENCY``. The plain (contiguous) ring is modelled too: its last rank does nearly
all the causal work, which caps it near 50%. Published figures beside it: ring-flash-attn's
README (commit 01c8baf, 8xH800, Llama-3.1-8B attention, 8K tokens per GPU: zigzag 85.2%
forward / 90.2% forward+backward, plain ring 52.1% / 53.9%, varlen zigzag 70.2% / 75.9%) and
USP (Fang & Zhao, arXiv 2405.07719: 47% MFU for LLaMA3-8B at 208K tokens on two 8xA800 nodes, a
whole-model figure).
"""

from __future__ import annotations

import math

import torch

import docqa_fast
from docqa_fast.distributed.plan import ring_plan
from docqa_fast.distributed.ring import _block_backward, ring_forward

from .harness import Case, Provider, gpu_only, register_family

FAMILY = "distributed"
DTYPE = torch.bfloat16
HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
SIZES = {"full": {"S": (32768, 131072), "P": (4, 8, 16)}, "quick": {"S": (8192,), "P": (4, 8)}}

# The model's rates: measured (benchmarks/results/nvidia-h200/results.json: docqa_fast[triton]
# causal D 128 at 16K; merge_attention ring_pair at 128K), and nominal links.
ATTENTION_FWD_TFLOPS = 498.0
ATTENTION_BWD_TFLOPS = 403.0
MERGE_GBPS = 3949.0
LINKS_GBPS = {"NVLink 4 (H100/H200 SXM, 450 GB/s per direction)": 450.0,
              "InfiniBand NDR (400 Gb/s per GPU)": 50.0}
LINK_EFFICIENCY = 0.8  # achievable fraction of a link's nominal bandwidth for large P2P messages

PUBLISHED = {
    "ring-flash-attn 8xH800, zigzag fwd+bwd (README, commit 01c8baf)": 0.902,
    "ring-flash-attn 8xH800, zigzag fwd (README)": 0.852,
    "ring-flash-attn 8xH800, plain ring fwd+bwd (README)": 0.539,
    "ring-flash-attn 8xH800, varlen zigzag fwd+bwd (README)": 0.759,
}


_GPU_ONLY = gpu_only("no GPU: the ring's per-rank compute is timed on CUDA only")


# ------------------------------------------------------------------------- timed cases

def _inputs(params, device):
    S, P = params["S"], params["P"]
    c = S // (2 * P)
    q = torch.randn(1, S, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    k = torch.randn(1, S, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v = torch.randn(1, S, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    dout = torch.randn(1, 2 * c, HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    chunks = lambda t: t.chunk(2 * P, dim=1)  # noqa: E731
    # Rank r's shard: chunks r and 2P-1-r; rank 0 holds the shard of rank -s at step s.
    shards = [(torch.cat([chunks(k)[r], chunks(k)[2 * P - 1 - r]], 1).contiguous(),
               torch.cat([chunks(v)[r], chunks(v)[2 * P - 1 - r]], 1).contiguous()) for r in range(P)]
    q0 = torch.cat([chunks(q)[0], chunks(q)[2 * P - 1]], 1).contiguous()
    steps = [shards[(-s) % P] for s in range(P)]
    # The unsharded call with the same rows: chunk 0 over keys [0, c), chunk 2P-1 over [0, S).
    packed_k = torch.cat([k[0, :c], k[0]]).contiguous()
    packed_v = torch.cat([v[0, :c], v[0]]).contiguous()
    cu_q = torch.tensor([0, c, 2 * c], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, c, c + S], dtype=torch.int32, device=device)
    return q0, steps, dout, packed_k, packed_v, cu_q, cu_k


def _plan(q0, steps):
    P = len(steps)
    return ring_plan(P, "zigzag", q0.shape[1] * P, True, (-1, -1))


def _numbered(steps):
    return ((step, k, v) for step, (k, v) in enumerate(steps))


def _ring_rank_fwd(q0, steps, dout, packed_k, packed_v, cu_q, cu_k):
    plan = _plan(q0, steps)
    out, _ = ring_forward(q0, _numbered(steps), plan.steps[0], 1 / math.sqrt(HEAD_DIM), 0.0, True)
    return out.to(q0.dtype)[0]


def _unsharded_fwd(q0, steps, dout, packed_k, packed_v, cu_q, cu_k):
    c = q0.shape[1] // 2
    return docqa_fast.flash_attn_varlen_func(q0[0], packed_k, packed_v, cu_q, cu_k, c, packed_k.shape[0] - c,
                                             causal=True)


def _ring_rank_fwd_bwd(q0, steps, dout, packed_k, packed_v, cu_q, cu_k):
    """Rank 0's forward, then its backward blocks with the global LSE (dQ returned; the dK/dV
    contributions a rank would pass on are computed and added to its per-shard sums)."""
    plan = _plan(q0, steps)
    scale = 1 / math.sqrt(HEAD_DIM)
    out, lse = ring_forward(q0, _numbered(steps), plan.steps[0], scale, 0.0, True)
    out = out.to(q0.dtype)
    dq = torch.zeros(q0.shape, dtype=torch.float32, device=q0.device)
    for (k, v), blocks in zip(steps, plan.steps[0]):
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        for block in blocks:
            dq_b, dk_b, dv_b = _block_backward(dout, q0, k, v, out, lse, None, block, scale, 0.0, True, False)
            dq[:, block.q_lo:block.q_hi] += dq_b
            dk[:, block.k_lo:block.k_hi] += dk_b
            dv[:, block.k_lo:block.k_hi] += dv_b
    return dq.to(q0.dtype)[0]


def _unsharded_fwd_bwd(q0, steps, dout, packed_k, packed_v, cu_q, cu_k):
    q = q0.detach().requires_grad_()
    out = _unsharded_fwd(q, steps, dout, packed_k, packed_v, cu_q, cu_k)
    out.backward(dout[0])
    return q.grad[0]


@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    sizes = SIZES["quick" if quick else "full"]
    found = []
    for mode, ring_fn, unsharded_fn, factor in (("fwd", _ring_rank_fwd, _unsharded_fwd, 1.0),
                                               ("fwd_bwd", _ring_rank_fwd_bwd, _unsharded_fwd_bwd, 3.5)):
        providers = (Provider("docqa_fast ring rank (simulated)", fn=ring_fn, ours=True, unavailable=_GPU_ONLY),
                     Provider("unsharded, same rows", fn=unsharded_fn, unavailable=_GPU_ONLY))
        for S in sizes["S"]:
            for P in sizes["P"]:
                work = ring_plan(P, "zigzag", S, True, (-1, -1)).work(0)
                found.append(Case(
                    family=FAMILY, name=f"zigzag_rank_{mode}-P{P}-S{S}", group=f"zigzag_rank_{mode}-S{S}",
                    description=f"zigzag ring rank 0 of P, causal, S={S}, H {HEADS}/{KV_HEADS}, D {HEAD_DIM}, bf16, "
                                f"{mode}", params={"S": S, "P": P, "H": HEADS, "Hk": KV_HEADS, "D": HEAD_DIM,
                                                    "mode": mode, "dtype": "bfloat16"},
                    sweep="P", make_inputs=_inputs, providers=providers, reference="unsharded, same rows",
                    flops=int(factor * 4 * work * HEADS * HEAD_DIM)))
    return found


# ------------------------------------------------------------------------- communication model

def _ring_times(P, S, heads, kv_heads, bandwidth, layout, backward):
    """(ideal seconds, ring seconds) of one causal ring of P ranks over S tokens, ``heads`` /
    ``kv_heads`` per rank, the K/V (and dK/dV) shards crossing links of ``bandwidth`` bytes/s."""
    plan = ring_plan(P, layout, S, True, (-1, -1))
    per_pair = 4 * heads * HEAD_DIM  # forward flops per visible (query, key) pair; backward 2.5x
    shard = S // P
    kv_bytes = 2 * shard * kv_heads * HEAD_DIM * 2  # K and V, bf16
    grad_bytes = 2 * shard * kv_heads * HEAD_DIM * 4  # the travelling dK and dV sums, fp32
    merge_seconds = shard * heads * HEAD_DIM * (4 + 2 + 4) / (MERGE_GBPS * 1e9)  # fp32 acc read + block + write
    passes = [(ATTENTION_FWD_TFLOPS, kv_bytes, 1.0)] + ([(ATTENTION_BWD_TFLOPS, kv_bytes + grad_bytes, 2.5)]
                                                          if backward else [])
    total_pairs = sum(plan.work(r) for r in range(P))
    ideal = ring = 0.0
    for tflops, comm_bytes, factor in passes:
        ideal += total_pairs * factor * per_pair / (tflops * 1e12) / P
        slowest = 0.0
        for rank in range(P):
            elapsed = 0.0
            for i, step in enumerate(plan.offsets):
                work = sum(b.visible_pairs() for b in plan.steps[rank][step])
                compute = work * factor * per_pair / (tflops * 1e12) + merge_seconds
                comm = comm_bytes / bandwidth if i + 1 < plan.n_steps else 0.0
                elapsed += max(compute, comm)  # the transfer overlaps the step's compute
            slowest = max(slowest, elapsed)
        ring += slowest
    return ideal, ring


def ring_efficiency(P: int, S: int, link_gbps: float, *, layout: str = "zigzag", backward: bool = True,
                    heads: int = HEADS, kv_heads: int = KV_HEADS) -> float:
    """The model's efficiency of one causal ring (ideal / modelled time)."""
    ideal, ring = _ring_times(P, S, heads, kv_heads, link_gbps * 1e9 * LINK_EFFICIENCY, layout, backward)
    return ideal / ring


def hybrid_efficiency(ulysses: int, ring: int, S: int, ulysses_gbps: float, ring_gbps: float, *,
                      heads: int = HEADS, kv_heads: int = KV_HEADS) -> float:
    """Ulysses of degree ``ulysses`` (all-to-all over ``ulysses_gbps``, not overlapped) around a
    zigzag ring of ``ring`` ranks (over ``ring_gbps``), forward + backward."""
    rank_kv_heads = max(kv_heads, ulysses) // ulysses  # KV heads repeated when the degree exceeds them
    ideal, ring_time = _ring_times(ring, S, heads // ulysses, rank_kv_heads, ring_gbps * 1e9 * LINK_EFFICIENCY,
                                   "zigzag", True) if ring > 1 else (None, None)
    if ring == 1:  # plain Ulysses: the whole sequence per rank, heads / U
        pairs = S * (S + 1) // 2
        per_pair = 4 * heads // ulysses * HEAD_DIM
        ideal = ring_time = pairs * per_pair * (1 / (ATTENTION_FWD_TFLOPS * 1e12) + 2.5 / (ATTENTION_BWD_TFLOPS * 1e12))
    tokens = S // (ulysses * ring)
    # q, k, v in and out back (forward); dout in and dq, dk, dv back (backward): (U-1)/U leaves.
    a2a_bytes = 2 * tokens * (2 * heads + 2 * max(kv_heads, ulysses)) * HEAD_DIM * 2 * (ulysses - 1) / ulysses
    a2a = a2a_bytes / (ulysses_gbps * 1e9 * LINK_EFFICIENCY)
    return ideal / (ring_time + a2a)


def model_table(S: int) -> str:
    """Markdown: per P, the bytes a rank sends per ring step and the expected efficiencies."""
    nvlink, ib = LINKS_GBPS.values()
    lines = [f"Causal attention over S = {S} tokens, H {HEADS}/{KV_HEADS}, D {HEAD_DIM}, bf16, forward + backward; "
             f"links at {LINK_EFFICIENCY:.0%} of nominal; 8 GPUs per node.", "",
             "| P | tokens/GPU | MB/step/rank (K,V + dK,dV) | zigzag, NVLink | zigzag, IB | plain ring, NVLink "
             "| Ulysses 8 x zigzag ring (IB) |", "|---|---|---|---|---|---|---|"]
    for P in (2, 4, 8, 16, 32, 64):
        shard = S // P
        step_bytes = 2 * shard * KV_HEADS * HEAD_DIM * (2 + 4)
        # Within one node (P <= 8) every hop is NVLink; beyond, a ring crosses nodes and its
        # step waits for the InfiniBand hops.
        zig_nv = ring_efficiency(P, S, nvlink) if P <= 8 else None
        zig_ib = ring_efficiency(P, S, ib)
        plain = ring_efficiency(P, S, nvlink, layout="contiguous")
        hybrid = hybrid_efficiency(8, P // 8, S, nvlink, ib) if P >= 8 else None
        fmt = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
        lines.append(f"| {P} | {shard} | {step_bytes / 1e6:.1f} | {fmt(zig_nv)} | {fmt(zig_ib)} | {fmt(plain)} "
                     f"| {fmt(hybrid)} |")
    return "\n".join(lines)


def published() -> str:
    return "\n".join(["Published figures:", *(f"* {name}: {value:.1%}" for name, value in PUBLISHED.items()),
                      "* USP (arXiv 2405.07719): 47% MFU, LLaMA3-8B, 208K tokens, two 8xA800 nodes (whole model, "
                      "not an attention efficiency)"])


if __name__ == "__main__":
    for total in (65536, 131072, 524288):
        print(model_table(total), end="\n\n")
    print(published())

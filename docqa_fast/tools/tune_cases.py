"""What ``python -m docqa_fast.tools.tune`` measures: per tunable kernel variant, the workload
shape it serves, random inputs, the launch, and the tile candidates.

Besides tiles, the implementation of a dispatched call (:class:`DispatchCase`: training attention
through our tuned kernels or torch's cuDNN attention, at the LLM shape, causal and not).

Shapes: the full ones are the headline workloads (LLM attention: 1 x 16K tokens, 28 / 4 heads,
D 128, causal; ViT: 8 images x 4,800 patches, 16 heads, D 80; decode: one token over a 128K
cache; merge: two 128K-token partials; the fused cross-entropy through Qwen2.5's head at 8K
tokens, forward + backward on either product path; reward heads on 128 scoring rows of hidden
3584, the dense backward's fill on 32K packed tokens); ``--quick`` shrinks the long ones (and
times the first three candidates); on a CPU (the Triton interpreter, for testing the tool) they
are tiny. Candidates are the tiles worth timing
on Hopper-class GPUs: around the
H200 sweep's winners, in both directions of each parameter; the current choice is always
timed too (tune.sweep adds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

# Tuned in this order, most valuable first: ``make gpu`` gives the sweep ~170 s (--budget), and
# families the budget does not reach keep their table entries. Attention (most of a training
# step: tiles, one-pass backward, launch order, then the cuDNN dispatch rules), the losses (the
# cross-entropy route, issue 15), decode (tiles and splits), reward, and last merge_attention,
# whose tiles the first H200 sweep confirmed.
FAMILIES = ("attention", "losses", "inference", "reward", "merge_attention")


@dataclass
class State:
    """Inputs and outputs of one tunable at its shape, with the work one run does."""

    tensors: dict
    shape: dict
    work: float  # FLOPs or bytes of one run (see Tunable.unit)


@dataclass
class Tunable:
    family: str
    kernel: str  # the kernels.tuning kernel name
    key: str | Callable[[torch.device], str]  # the variant's table key (a function of the device when it
    default: dict | Callable[[torch.device], dict]  # names the dtype, which the interpreter cannot run in bf16)
    unit: str  # "TFLOP/s" or "GB/s"
    what: str  # what one run does, for the table's metric
    setup: Callable[[torch.device, bool], State]
    run: Callable[[State], Any]
    candidate_tiles: tuple

    @property
    def metric(self) -> str:
        return f"{self.unit} of {self.what}"

    def key_for(self, device) -> str:
        return self.key(device) if callable(self.key) else self.key

    def default_for(self, device) -> dict:
        return self.default(device) if callable(self.default) else self.default

    def candidates(self, quick: bool) -> list[dict]:
        from ..kernels import tuning

        tiles = [tuning.as_dict(self.kernel, values) for values in self.candidate_tiles]
        return tiles[:3] if quick else tiles

    def value(self, state: State, ms: float) -> float:
        return state.work / ms / (1e9 if self.unit == "TFLOP/s" else 1e6)


def _size(device, quick, full, fast, cpu):
    return cpu if device.type != "cuda" else fast if quick else full


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float16  # the interpreter miscomputes bf16


# ------------------------------------------------------------------------------ attention

def _attention_setup(head_dim, heads, kv_heads, causal, lengths_by_size, varlen):
    def setup(device, quick) -> State:
        from ..kernels import attention as kernels

        lengths = _size(device, quick, *lengths_by_size)
        if device.type != "cuda":
            heads_, kv_heads_ = 4, 2
        else:
            heads_, kv_heads_ = heads, kv_heads
        dtype = _dtype(device)
        total = sum(lengths)
        shape = (total,) if varlen else (1, total)
        q = torch.randn(*shape, heads_, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(*shape, kv_heads_, head_dim, device=device, dtype=dtype) for _ in range(2))
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device) \
            if varlen else None
        out = torch.empty_like(q)
        lse = torch.empty((heads_, total) if varlen else (1, heads_, total), device=device, dtype=torch.float32)
        call = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths),
                    softmax_scale=head_dim ** -0.5, causal=causal, window_size=(-1, -1), softcap=0.0)
        kernels.forward(q, k, v, out, lse, **call)
        tensors = dict(q=q, k=k, v=v, out=out, lse=lse, dout=torch.randn_like(out), dq=torch.empty_like(q),
                       dk=torch.empty_like(k), dv=torch.empty_like(v), call=call)
        flops = sum(4 * s * s * heads_ * head_dim for s in lengths) * (0.5 if causal else 1.0)
        description = dict(layout="varlen" if varlen else "dense", sequences=len(lengths), seqlen=max(lengths),
                           heads=heads_, kv_heads=kv_heads_, head_dim=head_dim, causal=causal, dtype=str(dtype)[6:])
        return State(tensors, description, flops)

    return setup


def _attention_forward(state):
    from ..kernels import attention as kernels

    t = state.tensors
    kernels.forward(t["q"], t["k"], t["v"], t["out"], t["lse"], **t["call"])
    return t["out"], t["lse"]


def _attention_backward(state):
    from ..kernels import attention as kernels

    t = state.tensors
    kernels.backward(t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], None, t["dq"], t["dk"], t["dv"],
                     **t["call"])
    return t["dq"], t["dk"], t["dv"]


def _one_pass(run):
    """``run`` with the one-pass backward forced (dQ by atomics in the dK/dV kernel), so its tiles
    (attention_backward_fused) are timed whatever the table's attention_backward_passes says."""
    def one_pass(state):
        import contextlib

        from ..kernels import attention as kernels
        from ..kernels import tuning

        with contextlib.ExitStack() as stack:
            for tma in (False, True):
                stack.enter_context(tuning.override("attention_backward_passes",
                                                    kernels.tile_key(state.shape["head_dim"], tma), {"PASSES": 1}))
            return run(state)

    return one_pass


def _attention_step(state):
    """Forward then backward: what a launch order changes (each kernel's program order)."""
    return (*_attention_forward(state), *_attention_backward(state))


def _backward_state(setup, factor=2.5):
    """The backward's work is 2.5x the forward's (flash-attn's convention); forward + backward 3.5x."""
    def backward_setup(device, quick):
        state = setup(device, quick)
        state.work *= factor
        return state

    return backward_setup


_LLM = _attention_setup(128, 28, 4, True, ([16384], [4096], [70]), varlen=False)
_VIT = _attention_setup(80, 16, 16, False, ([4800] * 8, [4800] * 4, [37, 0, 20]), varlen=True)

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Left out since the first H200 sweep (tune.log of
# c489a27), each at least 1.9x slower than the winner of the same kernel: forward D 128
# (128, 128, 4, 2) 2.8x; dK/dV D 128 (64, 128, 8, 2) 2.6x, (64, 128, 4, 2) 2.4x, (128, 128, 8, 2)
# 2.0x; forward D 80 (128, 32, 8, 2) 1.9x; dK/dV D 80 (64, 128, 8, 2) 2.2x. Their compile and
# timing go to the one-pass backward, the launch order and the dispatch rules. (dK/dV D 80
# (32, 64, 4, 2) stays: it was rejected for changing the answer, which the sweep must re-check.)
_FORWARD_128 = ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4),
                (64, 64, 4, 3), (64, 128, 4, 3))
_DKDV_128 = ((64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2))
_DQ_128 = ((128, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
           (64, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2))
_FORWARD_80 = ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3))
_DKDV_80 = ((64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (128, 64, 8, 2))
_DQ_80 = ((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3))
# The one-pass backward (dK/dV kernel adding dQ by atomics): the two-pass dK/dV winner first, then
# FlashAttention-2/3's backward shape on Hopper (64 query rows x 128 keys, two warpgroups) and its
# neighbours (128 x 128 needs 258 KiB of shared memory at D 128). Then (PASSES,): the two-pass
# backward against the one-pass one, each on its tiles.
_FUSED_128 = ((64, 64, 4, 2), (64, 128, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 1))
_FUSED_80 = ((64, 64, 4, 2), (64, 128, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2))
_PASSES = ((2,), (1,))
# (ORDER,): causal blocks launched head after head (1) or the longest of every head first (2).
_ORDER = ((1,), (2,))


_LLM_FULL = _attention_setup(128, 28, 4, False, ([16384], [4096], [70]), varlen=False)


def _attention_tunables():
    from ..kernels import attention as kernels

    def tunable(kernel, head_dim, tma, setup, run, what, candidates):
        return Tunable("attention", kernel, kernels.tile_key(head_dim, tma),
                       kernels.default_tiles(kernel, head_dim, tma), "TFLOP/s", what, setup, run, candidates)

    def passes(head_dim, tma, setup):
        return Tunable("attention", "attention_backward_passes", kernels.tile_key(head_dim, tma),
                       dict(kernels.DEFAULT_PASSES), "TFLOP/s", "the whole backward, two passes or one", setup,
                       _attention_backward, _PASSES)

    # dK/dV before dQ: the backward is timed whole, each kernel with the other's best tiles so far;
    # then the one-pass kernel's tiles, then which backward deterministic=False calls take.
    return [
        tunable("attention_forward", 128, True, _LLM, _attention_forward, "the forward", _FORWARD_128),
        tunable("attention_backward_dkdv", 128, True, _backward_state(_LLM), _attention_backward,
                "the whole backward (delta, dK/dV, dQ)", _DKDV_128),
        tunable("attention_backward_dq", 128, True, _backward_state(_LLM), _attention_backward,
                "the whole backward (delta, dK/dV, dQ)", _DQ_128),
        tunable("attention_backward_fused", 128, True, _backward_state(_LLM), _one_pass(_attention_backward),
                "the whole one-pass backward (delta, dK/dV with dQ by atomics, the dQ cast)", _FUSED_128),
        passes(128, True, _backward_state(_LLM)),
        Tunable("attention", "attention_causal_order", "D=128", dict(kernels.DEFAULT_ORDER), "TFLOP/s",
                "forward + backward, causal blocks head after head or longest first across heads",
                _backward_state(_LLM, 3.5), _attention_step, _ORDER),
        tunable("attention_forward", 80, False, _VIT, _attention_forward, "the forward", _FORWARD_80),
        tunable("attention_backward_dkdv", 80, False, _backward_state(_VIT), _attention_backward,
                "the whole backward (delta, dK/dV, dQ)", _DKDV_80),
        tunable("attention_backward_dq", 80, False, _backward_state(_VIT), _attention_backward,
                "the whole backward (delta, dK/dV, dQ)", _DQ_80),
        tunable("attention_backward_fused", 80, False, _backward_state(_VIT), _one_pass(_attention_backward),
                "the whole one-pass backward (delta, dK/dV with dQ by atomics, the dQ cast)", _FUSED_80),
        passes(80, False, _backward_state(_VIT)),
    ]


@dataclass
class DispatchCase:
    """A call of a dispatched op at which ``python -m docqa_fast.tools.tune`` times the
    implementations a tuned table may put first (our tuned kernels against torch's cuDNN
    attention): the fastest leads the ``dispatch`` rule it writes for the call's shape class
    (the op's ``shape_class`` of these arguments), the others follow by time."""

    family: str
    op: str  # the dispatch table's op
    setup: Callable[[torch.device, bool], State]
    args: Callable[[State], tuple]  # the op's arguments, from the state's tensors
    backends: tuple[str, ...]  # timed in this order; the first that runs gives the outputs the rest must match
    unit: str
    what: str

    @property
    def metric(self) -> str:
        return f"{self.unit} of {self.what}"

    def value(self, state: State, ms: float) -> float:
        return state.work / ms / (1e9 if self.unit == "TFLOP/s" else 1e6)


def _forward_args(state) -> tuple:
    t, call = state.tensors, state.tensors["call"]
    return (t["q"], t["k"], t["v"], call["cu_seqlens_q"], call["cu_seqlens_k"], call["max_seqlen_q"],
            call["max_seqlen_k"], call["softmax_scale"], call["causal"], -1, -1, call["softcap"], None, 0.0, None,
            False)


def _backward_args(state) -> tuple:
    t = state.tensors
    forward = _forward_args(state)
    # Both routes' backward read the same (out, lse): flash-attn's semantics, whichever forward made them.
    return (t["dout"], *forward[:3], t["out"], t["lse"], None, *forward[3:])


def dispatch_cases(families=FAMILIES) -> list[DispatchCase]:
    """The calls whose implementation the tool measures (training attention: dense D 128 at the
    LLM shape, causal and not, forward and backward; the ViT shape is varlen, which cuDNN's
    dense op does not take)."""
    if "attention" not in families:
        return []
    cases = []
    for setup, kind in ((_LLM, "causal"), (_LLM_FULL, "non-causal")):
        cases += [DispatchCase("attention", "attention_forward", setup, _forward_args, ("triton", "cudnn"), "TFLOP/s",
                               f"the {kind} forward"),
                  DispatchCase("attention", "attention_backward", _backward_state(setup), _backward_args,
                               ("triton", "cudnn"), "TFLOP/s", f"the {kind} backward")]
    return cases


# ------------------------------------------------------------------------------ inference

def _decode_setup(device, quick) -> State:
    context = _size(device, quick, 131072, 32768, 300)
    heads, kv_heads = (28, 4) if device.type == "cuda" else (4, 2)
    dtype = _dtype(device)
    q = torch.randn(1, 1, heads, 128, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(1, context, kv_heads, 128, device=device, dtype=dtype) for _ in range(2))
    seqlens = torch.full((1,), context, dtype=torch.int32, device=device)
    shape = dict(batch=1, context=context, heads=heads, kv_heads=kv_heads, head_dim=128, cache="contiguous",
                 dtype=str(dtype)[6:])
    return State(dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens), shape,
                 2 * context * kv_heads * 128 * dtype.itemsize)


def _prefill_setup(device, quick) -> State:
    chunk, context, page = _size(device, quick, (2048, 131072, 256), (1024, 32768, 256), (40, 300, 16))
    heads, kv_heads = (28, 4) if device.type == "cuda" else (4, 2)
    dtype = _dtype(device)
    pages = -(-context // page)
    q = torch.randn(1, chunk, heads, 128, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(pages, page, kv_heads, 128, device=device, dtype=dtype) for _ in range(2))
    block_table = torch.randperm(pages, device=device).to(torch.int32).reshape(1, pages)
    seqlens = torch.full((1,), context, dtype=torch.int32, device=device)
    shape = dict(batch=1, chunk=chunk, context=context, page_size=page, heads=heads, kv_heads=kv_heads,
                 head_dim=128, causal=True, dtype=str(dtype)[6:])
    keys = context - chunk / 2  # keys a query sees on average under the causal mask
    return State(dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens, block_table=block_table,
                      causal=True), shape, 4 * chunk * keys * heads * 128)


def _kvcache_run(state):
    from ..flash_attn_interface import flash_attn_with_kvcache

    return flash_attn_with_kvcache(**state.tensors)


def _decode_run(state):
    """One decode step on the Triton path without the per-call value checks: each of those is a
    host sync that leaves the GPU idle while the launch is prepared, and at decode sizes that idle
    time, not the tiles, set the step's time (every tile candidate of the first H200 table timed
    0.39 ms); a serving loop replays a captured CUDA graph, which skips them too."""
    from ..inference.ops import kvcache_attention_unchecked

    return kvcache_attention_unchecked(**state.tensors)


def _inference_tunables():
    from ..kernels import inference as kernels

    def tunable(block_m, unit, what, setup, run, candidates):
        return Tunable("inference", "decode_attention", kernels.tile_key(128, block_m),
                       kernels.default_tiles(128, block_m), unit, what, setup, run, candidates)

    # (BLOCK_N, num_warps, num_stages)
    return [
        tunable(16, "GB/s", "K and V read by one decode step", _decode_setup, _decode_run,
                ((64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (64, 8, 2), (128, 4, 2), (32, 4, 4),
                 (128, 8, 4), (64, 8, 4), (32, 4, 6), (128, 4, 4))),
        tunable(64, "TFLOP/s", "a causal chunked prefill over a paged cache", _prefill_setup, _kvcache_run,
                ((64, 4, 3), (128, 8, 2), (128, 8, 3), (64, 8, 3), (64, 4, 2), (128, 4, 3), (64, 4, 4))),
        # The split heuristic's constants (waves: programs per SM aimed at; min_keys: the fewest keys
        # a split keeps), timed after the tiles above with those in force, at the same decode shape.
        Tunable("inference", "decode_splits", kernels.SPLIT_KEY, kernels.SPLIT_DEFAULTS, "GB/s",
                "K and V read by one decode step", _decode_setup, _decode_run,
                ((2, 512), (1, 512), (3, 512), (4, 256), (2, 1024), (4, 1024), (8, 256), (1, 2048))),
    ]


# ------------------------------------------------------------------------------ merge_attention

def _merge_setup(device, quick) -> State:
    seqlen = _size(device, quick, 131072, 32768, 64)
    heads = 28 if device.type == "cuda" else 4
    dtype = _dtype(device)
    parts = [torch.randn(1, seqlen, heads, 128, device=device, dtype=dtype) for _ in range(2)]
    lses = [torch.randn(1, heads, seqlen, device=device) for _ in range(2)]
    out, lse = torch.empty_like(parts[0]), torch.empty_like(lses[0])
    bytes_moved = 3 * parts[0].numel() * dtype.itemsize + 3 * lses[0].numel() * 4
    shape = dict(batch=1, seqlen=seqlen, heads=heads, head_dim=128, parts=2, dtype=str(dtype)[6:])
    return State(dict(a=parts[0], lse_a=lses[0], b=parts[1], lse_b=lses[1], out=out, lse=lse), shape, bytes_moved)


def _merge_run(state):
    from ..kernels import merge_attention as kernels

    t = state.tensors
    kernels.merge_pair(t["a"], t["lse_a"], t["b"], t["lse_b"], t["out"], t["lse"])
    return t["out"], t["lse"]


def _merge_tunables():
    from ..kernels import merge_attention as kernels

    # (BLOCK_R, num_warps)
    return [Tunable("merge_attention", "merge_attention", kernels.tile_key(128), kernels.default_tiles(128), "GB/s",
                    "a two-part merge (both parts read, the result written)", _merge_setup, _merge_run,
                    ((16, 4), (8, 4), (32, 4), (32, 8), (64, 8), (16, 8)))]


# ------------------------------------------------------------------------------ losses

def _losses_setup(device, quick) -> State:
    from ..kernels import losses as kernels

    n_rows, hidden_size, vocab = _size(device, quick, (8192, 3584, 152064), (2048, 3584, 152064), (40, 64, 300))
    dtype = _dtype(device)
    hidden = torch.randn(n_rows, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) * (2.0 / hidden_size ** 0.5)).to(dtype)
    labels = torch.randint(0, vocab, (n_rows,), device=device)
    lse = kernels.logit_stats(hidden, weight, None, labels, -100, 1.0)[0]
    # The coefficients of a mean cross-entropy: dL/dz = (p - onehot) / N.
    coefs = torch.stack([torch.full_like(lse, 1.0 / n_rows), torch.zeros_like(lse),
                         torch.full_like(lse, -1.0 / n_rows), torch.zeros_like(lse)]).contiguous()
    shape = dict(tokens=n_rows, hidden=hidden_size, vocab=vocab, dtype=str(dtype)[6:])
    return State(dict(hidden=hidden, weight=weight, labels=labels, lse=lse, coefs=coefs), shape,
                 2 * n_rows * hidden_size * vocab)


def _losses_backward_setup(device, quick) -> State:
    state = _losses_setup(device, quick)
    state.work *= 3  # the logits' recompute and the two gradient matmuls
    return state


def _losses_forward(state):
    from ..kernels import losses as kernels

    t = state.tensors
    return kernels.logit_stats(t["hidden"], t["weight"], None, t["labels"], -100, 1.0)


def _losses_backward(state):
    from ..kernels import losses as kernels

    t = state.tensors
    return kernels.logit_stats_backward(t["hidden"], t["weight"], None, t["labels"], t["lse"], t["coefs"], -100, 1.0,
                                        True, True, False)[:2]


def _losses_step(state):
    """Forward and backward of a mean cross-entropy through the fused implementation the ops run
    (rows, skip filter, products as a user's call gets them): lse, d_hidden, d_weight."""
    from ..losses import fused
    from ..losses.ops import LOG_P_TILE

    t = state.tensors
    lse, _, _, _, bound = fused.logit_stats(t["hidden"], t["weight"], None, t["labels"], -100, 1.0, LOG_P_TILE)
    d_hidden, d_weight, _ = fused.logit_stats_backward(t["hidden"], t["weight"], None, t["labels"], lse, t["coefs"],
                                                       bound, -100, 1.0, True, True, False, LOG_P_TILE)
    return lse, d_hidden, d_weight


def _losses_route_setup(device, quick) -> State:
    state = _losses_backward_setup(device, quick)
    state.tensors["hidden"].requires_grad_()
    state.tensors["weight"].requires_grad_()
    return state


def _losses_route_step(state):
    """A mean cross-entropy's forward and backward through the public function (the route is
    chosen there): the loss, d_hidden, d_weight."""
    from ..losses import linear_cross_entropy

    t = state.tensors
    loss = linear_cross_entropy(t["hidden"], t["weight"], t["labels"])
    return (loss.detach(), *torch.autograd.grad(loss, (t["hidden"], t["weight"])))


def _losses_tunables():
    from ..kernels import losses as kernels

    def tunable(kernel, what, setup, run, candidates):
        return Tunable("losses", kernel, lambda device: kernels.tile_key(_dtype(device)),
                       lambda device: kernels.default_tiles(kernel, _dtype(device)), "TFLOP/s", what, setup, run,
                       candidates)

    return [
        # (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages)
        # Timed on the forward; the backward's logits-gradient tiles are the same entry.
        tunable("losses_logits", "the fused forward (logits tiles, online log-sum-exp)", _losses_setup,
                _losses_forward, ((64, 128, 32, 8, 4), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 256, 32, 8, 3),
                                  (128, 64, 32, 8, 4), (64, 128, 32, 4, 4), (128, 128, 64, 8, 2))),
        # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
        tunable("losses_matmul", "the backward (logits recompute and both gradient matmuls)", _losses_backward_setup,
                _losses_backward, ((64, 128, 32, 8, 8, 4), (128, 128, 64, 8, 8, 3), (128, 128, 32, 8, 8, 4),
                                   (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4))),
        # (PRODUCTS, CHUNK_COLUMNS, BLOCK_N, BLOCK_V, num_warps, num_stages): after the Triton
        # path's own tiles, so PRODUCTS=2 times that path at its best. Library products (1) with
        # chunks of 2K-8K columns (the budget allows ~6K at this shape; 2K chunks of 8K tokens,
        # 64 MiB, may stay in L2 between the matmul and the chunk kernel) and the chunk kernels'
        # tiles around 16 x 256 (8 warps: 123 registers); the all-Triton path (2) second, so
        # --quick compares the two.
        tunable("losses_chunks", "forward + backward (3 x 2NHV; the backward's recompute not counted)",
                _losses_backward_setup, _losses_step,
                ((1, 8192, 16, 256, 8, 2), (2, 8192, 16, 256, 8, 2), (1, 4096, 16, 256, 8, 2),
                 (1, 2048, 16, 256, 8, 2), (1, 8192, 8, 256, 4, 2), (1, 8192, 16, 128, 4, 2),
                 (1, 8192, 8, 512, 8, 2), (1, 8192, 16, 256, 8, 3))),
        # (ROUTE, CHUNK_ROWS), with the chunk tiles just chosen: 1 = the statistics forward and a
        # recomputing backward (4 products; CHUNK_ROWS unused), 2 = the gradients formed in the
        # forward (3 products), its rows per chunk set by the memory budget (16,384: no cap; 3
        # chunks of 2,752 rows at 8K tokens through Qwen2.5's head) or capped at 4K / 2K rows (more
        # chunks: each reads and writes d_weight once, the statistics kernel gets more lanes). Every
        # candidate stays within a tenth of the naive path's memory, so time alone may pick.
        tunable("losses_route", "forward + backward of a mean cross-entropy (3 x 2NHV)", _losses_route_setup,
                _losses_route_step, ((1, 16384), (2, 16384), (2, 4096), (2, 2048))),
    ]


# ------------------------------------------------------------------------------ reward

def _reward_setup(device, quick) -> State:
    batch, hidden_size, heads = _size(device, quick, (128, 3584, 8), (128, 3584, 8), (20, 100, 8))
    dtype = _dtype(device)
    rows = torch.randn(batch, hidden_size, device=device).to(dtype)  # packed: each sequence's scoring row
    weight = (torch.randn(heads, hidden_size, device=device) / hidden_size ** 0.5).to(dtype)
    token_index = torch.arange(batch, device=device, dtype=torch.int64)
    outputs = dict(rewards=torch.empty(batch, heads, device=device), mean=torch.empty(batch, device=device),
                   var=torch.empty(batch, device=device), minimum=torch.empty(batch, device=device),
                   grad=torch.randn(batch, heads, device=device), grad_rows=torch.empty_like(rows),
                   grad_weight=torch.empty_like(weight))
    shape = dict(sequences=batch, hidden=hidden_size, heads=heads, dtype=str(dtype)[6:])
    return State(dict(rows=rows, weight=weight, token_index=token_index, **outputs), shape,
                 (batch + heads) * hidden_size * dtype.itemsize)


def _reward_forward(state):
    from ..kernels import reward as kernels

    t = state.tensors
    kernels.forward(t["rows"], t["token_index"], t["weight"], None, t["rewards"], t["mean"], t["var"], t["minimum"])
    return t["rewards"], t["mean"], t["var"], t["minimum"]


def _reward_backward(state):
    """The column programs (d rows, d W); the sparse form leaves the dense fill's write out."""
    from ..kernels import reward as kernels

    t = state.tensors
    kernels.backward(t["rows"], t["token_index"], t["weight"], t["rewards"], t["mean"], t["minimum"],
                     (t["grad"], None, None, None), t["grad_rows"], t["grad_weight"], None, sparse=True)
    return t["grad_rows"], t["grad_weight"]


def _reward_fill_setup(device, quick) -> State:
    """Packed hidden states of ``tokens`` rows, one scoring row per sequence (its last token):
    the dense backward writes the whole (tokens, H) input gradient once, so the fill's bytes
    dominate (the sparse setup above has no fill programs)."""
    tokens, batch, hidden_size, heads = _size(device, quick, (32768, 128, 3584, 8), (8192, 32, 3584, 8),
                                              (96, 6, 100, 8))
    dtype = _dtype(device)
    x = torch.randn(tokens, hidden_size, device=device).to(dtype)
    weight = (torch.randn(heads, hidden_size, device=device) / hidden_size ** 0.5).to(dtype)
    token_index = torch.arange(1, batch + 1, device=device, dtype=torch.int64) * (tokens // batch) - 1
    outputs = dict(rewards=torch.zeros(batch, heads, device=device), mean=torch.zeros(batch, device=device),
                   minimum=torch.zeros(batch, device=device), grad=torch.randn(batch, heads, device=device),
                   grad_x=torch.empty_like(x), grad_weight=torch.empty_like(weight))
    shape = dict(tokens=tokens, sequences=batch, hidden=hidden_size, heads=heads, layout="packed",
                 dtype=str(dtype)[6:])
    return State(dict(x=x, weight=weight, token_index=token_index, **outputs), shape,
                 (tokens + batch + heads) * hidden_size * dtype.itemsize)


def _reward_dense_backward(state):
    """The whole backward with the dense input gradient (column programs, then the fill's)."""
    from ..kernels import reward as kernels

    t = state.tensors
    kernels.backward(t["x"], t["token_index"], t["weight"], t["rewards"], t["mean"], t["minimum"],
                     (t["grad"], None, None, None), t["grad_x"], t["grad_weight"], None, sparse=False,
                     rows_sorted=True)
    return t["grad_x"], t["grad_weight"]


def _reward_tunables():
    from ..kernels import reward as kernels

    def tunable(kernel, what, run, candidates):
        return Tunable("reward", kernel, lambda device: kernels.tile_key(_dtype(device), 8),
                       lambda device: kernels.default_tiles(kernel, _dtype(device)), "GB/s", what, _reward_setup, run,
                       candidates)

    # (BLOCK_B, BLOCK_H, num_warps)
    return [
        tunable("reward_forward", "the scoring rows and the head weights read", _reward_forward,
                ((16, 128, 4), (16, 256, 4), (32, 128, 4), (16, 64, 4), (16, 128, 8), (32, 256, 8))),
        tunable("reward_backward", "the scoring rows and the head weights read", _reward_backward,
                ((16, 64, 4), (16, 128, 4), (32, 64, 4), (16, 32, 4), (16, 64, 8), (32, 128, 8))),
        # (FILL_ROWS, FILL_BLOCK_H): the dense input gradient's zero-fill + scatter tile, timed
        # after the column tiles above (in force) on a packed 32K-token backward. FILL_ROWS >= 16
        # (the one-hot product placing the scoring rows is a tl.dot).
        Tunable("reward", "reward_backward_fill", lambda device: kernels.tile_key(_dtype(device), 8),
                dict(kernels.DEFAULT_FILL), "GB/s",
                "the dense input gradient written, the scoring rows and head weights read", _reward_fill_setup,
                _reward_dense_backward,
                ((16, 256), (16, 512), (32, 256), (16, 128), (32, 128), (64, 128), (16, 1024), (64, 64))),
    ]


_BUILDERS = {"attention": _attention_tunables, "inference": _inference_tunables,
             "merge_attention": _merge_tunables, "losses": _losses_tunables, "reward": _reward_tunables}


def tunables(families=FAMILIES) -> list[Tunable]:
    return [t for family in families for t in _BUILDERS[family]()]

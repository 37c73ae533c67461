"""Launchers of the training kernels, their tiles (per-GPU tuned tables, built-in defaults)
and the configurations registered for the Hopper compile check.

Tiles come from the device's tuned table (kernels/tuning.py) by head-dim bucket and load
path, else the built-in ones below. TMA: for power-of-two head dims the forward and dQ
kernels read K/V, and the dK/dV kernel Q/dO, through host tensor descriptors over the
(tokens, heads * D) matrix; other layouts and head dims use masked pointer loads.
"""

import itertools
import os

import torch
import triton

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the masked-load path only
    TensorDescriptor = None

from .. import tuning
from ..registry import KernelConfig, pointer_type, register
from .common import HEAD_DIMS, block_d, head_dim_bucket, score_scale
from .training import (
    attention_backward_delta_kernel,
    attention_backward_dkdv_kernel,
    attention_backward_dq_kernel,
    attention_forward_kernel,
)

# Built-in (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim: what a launch uses where no
# tuned table covers the GPU (kernels/tuned/, see kernels/tuning.py; on Hopper the sm90 table
# measured on an H200 takes precedence). They were picked to compile for sm_90 without
# spilling, not by measurement: on the H200 the tuned tiles ran up to 3.6x faster.
_FORWARD_TILES = {32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 80: (128, 32, 8, 2), 96: (128, 32, 8, 2),
                  128: (128, 32, 8, 2), 192: (64, 16, 8, 1), 256: (64, 16, 8, 1)}
# With K/V loaded by TMA (power-of-two head dims) the copy engine holds no per-thread addresses,
# which buys D 128 twice the keys per tile (64 instead of 32) and a 3-deep pipeline.
_FORWARD_TMA_TILES = {**_FORWARD_TILES, 128: (64, 64, 4, 3)}
_DKDV_TILES = {32: (64, 64, 4, 2), 64: (32, 64, 8, 1), 80: (32, 64, 8, 1), 96: (32, 64, 8, 1),
               128: (32, 64, 8, 1), 192: (32, 32, 8, 1), 256: (32, 32, 8, 1)}
_DQ_TILES = {32: (64, 64, 4, 2), 64: (64, 32, 8, 1), 80: (64, 16, 8, 1), 96: (64, 16, 8, 1),
             128: (64, 16, 8, 1), 192: (32, 16, 8, 1), 256: (32, 16, 8, 1)}
# TMA-fed K/V free the dQ kernel's address registers: 64-key tiles and a 2-deep pipeline at D 64-128.
_DQ_TMA_TILES = {**_DQ_TILES, 64: (64, 64, 8, 2), 128: (64, 64, 8, 2)}
# The dK/dV kernel loads Q and dO by TMA up to D 128; at D 256 the descriptor path spills (8-16 B
# in the Hopper check) where the pointer path does not.
DKDV_TMA_MAX_HEAD_DIM = 128
# The one-pass backward (dK/dV kernel adding dQ by fp32 atomics) holds a (BLOCK_M, D) fp32 dQ
# share beside dK and dV: the dK/dV tiles, not measured yet (see docs/attention_kernels.md).
_FUSED_TILES = dict(_DKDV_TILES)

# Which backward runs when the call allows non-deterministic gradients (deterministic=False):
# PASSES=2, the dK/dV kernel then the dQ kernel (each recomputes the probabilities; bitwise
# reproducible), or PASSES=1, the dK/dV kernel adding dQ by atomics. Two until a GPU measures the
# one-pass kernel faster (the tuning tool's attention_backward_passes entry); deterministic=True
# always takes two.
PASSES_PARAMS = ("PASSES",)
DEFAULT_PASSES = {"PASSES": 2}

# The order causal calls launch their blocks in (every training kernel; see training._grid_position):
# ORDER=1, each head's blocks longest first, head after head (the grid (block, sequence, head));
# ORDER=2, the longest blocks of every head first (the grid (head, sequence, block)). One until a
# GPU measures two faster (the tuning tool's attention_causal_order entry, keyed by head dim).
ORDER_PARAMS = ("ORDER",)
DEFAULT_ORDER = {"ORDER": 1}
_MAX_GRID_Z = 65_535  # CUDA's limit on the grid's y and z sizes

# The tunable kernels: name -> (kernel, defaults without TMA, defaults with TMA, largest TMA head dim).
_TILE_PARAMS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
TUNABLE = {
    "attention_forward": (attention_forward_kernel, _FORWARD_TILES, _FORWARD_TMA_TILES, HEAD_DIMS[-1]),
    "attention_backward_dkdv": (attention_backward_dkdv_kernel, _DKDV_TILES, _DKDV_TILES, DKDV_TMA_MAX_HEAD_DIM),
    "attention_backward_dq": (attention_backward_dq_kernel, _DQ_TILES, _DQ_TMA_TILES, HEAD_DIMS[-1]),
    # The dK/dV kernel with ATOMIC_DQ (the one-pass backward): a variant of its own, own tiles.
    "attention_backward_fused": (attention_backward_dkdv_kernel, _FUSED_TILES, _FUSED_TILES, DKDV_TMA_MAX_HEAD_DIM),
}
for _name in TUNABLE:
    tuning.declare(_name, _TILE_PARAMS)
tuning.declare("attention_backward_passes", PASSES_PARAMS)
tuning.declare("attention_causal_order", ORDER_PARAMS)

# Short query ranges (decode-like calls, Sq <= 64) take 64-row forward tiles: a 128-row tile
# would be half padding. One warpgroup up to D 64; beyond, two (on 64 rows the second splits
# the head dim), as one would spill with the pointer loads.
SHORT_QUERIES = 64


def tile_key(head_dim: int, tma: bool) -> str:
    """The tuned-table key of a launch: the head-dim bucket and the load path."""
    return f"D={head_dim_bucket(head_dim)}" + (",tma" if tma else "")


def default_tiles(kernel: str, head_dim: int, tma: bool) -> dict:
    _, plain, with_tma, _ = TUNABLE[kernel]
    return tuning.as_dict(kernel, (with_tma if tma else plain)[head_dim_bucket(head_dim)])


def _launch_tiles(kernel: str, head_dim: int, tma: bool, run, device):
    """run(BLOCK_M, BLOCK_N, num_warps, num_stages) with the tiles of the device's tuned table
    (or the built-in ones): see kernels/tuning.py."""
    return tuning.launch(kernel, tile_key(head_dim, tma), default_tiles(kernel, head_dim, tma), device,
                         lambda tiles: run(*tuning.as_tuple(kernel, tiles)))


def causal_order(head_dim: int, causal: bool, device) -> int:
    """The ORDER causal calls of this head-dim bucket launch their blocks in (see ORDER_PARAMS);
    1 for calls without a causal mask (their blocks are equally long)."""
    if not causal:
        return 1
    key = f"D={head_dim_bucket(head_dim)}"
    order = tuning.lookup("attention_causal_order", key, DEFAULT_ORDER, device)["ORDER"]
    if order not in (1, 2):
        raise ValueError(f"expected attention_causal_order[{key}] ORDER to be 1 (each head's blocks in turn) or 2 "
                         f"(the longest blocks of every head first), got {order}")
    return order


def _grid(blocks: int, batch: int, heads: int, order: int):
    """(grid, blocks_last) of a training kernel launch in the given ORDER; blocks stay on x when
    they are more than the z axis holds."""
    if order == 2 and blocks <= _MAX_GRID_Z:
        return (heads, batch, blocks), True
    return (blocks, batch, heads), False


def _short_query_tiles(tiles, head_dim: int, max_seqlen_q: int):
    """The forward's tiles for a call: 64 query rows when the queries are that few."""
    block_m, block_n, warps, stages = tiles
    if max_seqlen_q <= SHORT_QUERIES and block_m > SHORT_QUERIES:
        return SHORT_QUERIES, block_n, 4 if head_dim <= 64 else 8, stages
    return block_m, block_n, warps, stages


def _strides(t, varlen):
    """(batch, token, head) strides; varlen sequences share one token axis (batch stride 0)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _flags(causal, window_size, softcap, varlen, alibi_slopes, dropout_p):
    left, right = window_size
    return {"IS_VARLEN": varlen, "CAUSAL": causal, "HAS_WINDOW": left >= 0 or (right >= 0 and not causal),
            "HAS_SOFTCAP": softcap > 0, "HAS_ALIBI": alibi_slopes is not None, "HAS_DROPOUT": dropout_p > 0}


DROPOUT_RANDOM_RANGE = 2 ** 32  # the Philox word dropout compares with p * this


def alibi_arguments(alibi_slopes, placeholder):
    """(alibi_ptr, alibi_sb, alibi_sh) kernel arguments (the training and decode kernels'): slopes
    (H,) or (B, H) fp32, a batch stride of 0 for (H,). ``placeholder`` stands for absent slopes
    (Triton needs a pointer; the HAS_ALIBI flag keeps it unread)."""
    if alibi_slopes is None:
        return placeholder, 0, 0
    if alibi_slopes.dim() == 1:
        return alibi_slopes, 0, alibi_slopes.stride(0)
    return alibi_slopes, alibi_slopes.stride(0), alibi_slopes.stride(1)


def _extras(alibi_slopes, dropout_p, dropout_seed, placeholder):
    """(alibi_ptr, alibi_sb, alibi_sh, seed_ptr, dropout_threshold, dropout_scale) kernel arguments:
    the slopes (:func:`alibi_arguments`); the Philox seed (1,) int64 and the threshold p * 2^32
    below which an element drops. ``placeholder`` stands for absent tensors."""
    alibi = alibi_arguments(alibi_slopes, placeholder)
    if dropout_p > 0:
        threshold = min(int(dropout_p * DROPOUT_RANDOM_RANGE), DROPOUT_RANDOM_RANGE - 1)
        return (*alibi, dropout_seed, threshold, 1.0 / (1.0 - dropout_p))
    return (*alibi, placeholder, 0, 1.0)


def forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            softmax_scale, causal, window_size, softcap, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
    """Fill ``out`` (like q) and ``lse`` (B, H, Sq) / (H, total_q). Dense when cu_seqlens_q is None.
    ALiBi slopes (H,) / (B, H) fp32; dropout with probability ``dropout_p`` from the Philox seed
    ``dropout_seed`` (1,) int64 (the backward must get the same)."""
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    heads, head_dim = q.shape[-2], q.shape[-1]
    if max_seqlen_q == 0 or batch == 0:
        return
    tma = _tma_eligible(k, v, varlen)
    order = causal_order(head_dim, causal, q.device)

    def run(block_m, block_n, warps, stages):
        block_m, block_n, warps, stages = _short_query_tiles((block_m, block_n, warps, stages), head_dim,
                                                             max_seqlen_q)
        k_arg, v_arg = _descriptors(k, v, varlen, block_n) if tma else (k, v)
        grid, blocks_last = _grid(triton.cdiv(max_seqlen_q, block_m), batch, heads, order)
        attention_forward_kernel[grid](
            q, k_arg, v_arg, out, lse, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, heads // k.shape[-2], score_scale(softmax_scale, softcap), softcap,
            window_size[0], window_size[1], *_extras(alibi_slopes, dropout_p, dropout_seed, lse),
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
            *_lse_strides(lse, varlen),
            HEAD_DIM=head_dim, **_flags(causal, window_size, softcap, varlen, alibi_slopes, dropout_p),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d(head_dim), USE_TMA=tma, BLOCKS_LAST=blocks_last,
            num_warps=warps, num_stages=stages,
        )

    _launch_tiles("attention_forward", head_dim, tma, run, q.device)


def _tma_available(device: torch.device) -> bool:
    """Hopper or newer (the copy engine), or the CPU interpreter (which emulates descriptors, so
    the tests run the TMA path); ``DOCQA_FAST_ATTENTION_TMA=0`` turns it off."""
    if TensorDescriptor is None or os.environ.get("DOCQA_FAST_ATTENTION_TMA", "1") == "0":
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tma_head_dim(head_dim: int, max_head_dim: int = HEAD_DIMS[-1]) -> bool:
    """Head dims a TMA tile covers exactly (powers of two), up to a kernel's own limit."""
    return head_dim == block_d(head_dim) and head_dim <= max_head_dim


def _tma_eligible(a, b, varlen, max_head_dim: int = HEAD_DIMS[-1]) -> bool:
    """Whether two tensors of one layout (K and V, or Q and dO) can be read through TMA
    descriptors over their (tokens, heads * D) matrices. Not for a head dim that is not a power
    of two (the tile would run into the next head's columns; the masked loads handle those), a
    layout whose heads or batch rows do not tile one matrix, or what the copy engine refuses
    (16-byte aligned base and row stride)."""
    head_dim = a.shape[-1]
    if not _tma_head_dim(head_dim, max_head_dim) or not _tma_available(a.device):
        return False
    if (a.shape[0] if varlen else a.shape[0] * a.shape[1]) == 0:
        return False
    for t in (a, b):
        token_stride = t.stride(-3)
        merged = varlen or t.shape[0] == 1 or t.stride(0) == t.shape[1] * token_stride
        # A row stride below the row's width (possible for a single token) may be refused by the encoder.
        if not (merged and t.stride(-1) == 1 and t.stride(-2) == head_dim and t.data_ptr() % 16 == 0
                and token_stride >= t.shape[-2] * head_dim and token_stride * t.element_size() % 16 == 0):
            return False
    return True


def _descriptors(a, b, varlen, block_rows):
    """TMA descriptors over two _tma_eligible tensors, with (block_rows, D) tiles."""
    tokens = a.shape[0] if varlen else a.shape[0] * a.shape[1]
    return tuple(TensorDescriptor(t, [tokens, t.shape[-2] * t.shape[-1]], [t.stride(-3), 1],
                                  [block_rows, t.shape[-1]]) for t in (a, b))


def _delta_block_t(head_dim: int) -> int:
    """Tokens per delta program: two (tokens, BLOCK_D) tiles at 32 values a thread (4 warps)."""
    return max(16, 4096 // block_d(head_dim))


def _delta(dout, out, lse, grad_lse, varlen):
    """delta_i = rowsum(dO_i * O_i) - dlse_i, fp32 with the LSE's shape and strides (the dK/dV
    and dQ kernels address both with the same offsets)."""
    delta = torch.empty_like(lse)
    heads, head_dim = out.shape[-2], out.shape[-1]
    flat_out, flat_dout = out.reshape(-1, heads, head_dim), dout.reshape(-1, heads, head_dim)
    tokens = flat_out.shape[0]
    if tokens == 0:
        return delta
    seqlen = tokens if varlen else out.shape[1]
    g = grad_lse if grad_lse is not None else lse  # a placeholder pointer when there is no LSE gradient
    g_strides = (0, g.stride(0), g.stride(1)) if varlen else (g.stride(0), g.stride(1), g.stride(2))
    block_t = _delta_block_t(head_dim)
    attention_backward_delta_kernel[(triton.cdiv(tokens, block_t), heads)](
        flat_out, flat_dout, g, delta, tokens, seqlen, flat_out.stride(0), flat_out.stride(1),
        flat_dout.stride(0), flat_dout.stride(1), *g_strides, *_lse_strides(delta, varlen),
        HEAD_DIM=head_dim, HAS_GRAD_LSE=grad_lse is not None, BLOCK_T=block_t, BLOCK_D=block_d(head_dim),
        num_warps=4, num_stages=1,  # no loop: nothing to pipeline (as registered)
    )
    return delta


def backward_passes(head_dim: int, tma: bool, device, deterministic: bool) -> int:
    """2: the dK/dV kernel then the dQ kernel; 1: the dK/dV kernel adding dQ by atomics. One only
    when the call allows a non-deterministic result and the device's tuned table (or an override)
    chose it for this head-dim bucket and load path."""
    if deterministic:
        return 2
    key = tile_key(head_dim, tma)
    passes = tuning.lookup("attention_backward_passes", key, DEFAULT_PASSES, device)["PASSES"]
    if passes not in (1, 2):
        raise ValueError(f"expected attention_backward_passes[{key}] PASSES to be 1 (dQ by atomics in the dK/dV "
                         f"kernel) or 2 (a dQ kernel of its own), got {passes}")
    return passes


def backward_variant(q, dout, varlen: bool, deterministic: bool) -> tuple[int, bool]:
    """(passes, whether the dK/dV kernel loads Q and dO by TMA) of the backward :func:`backward`
    launches for these tensors; the load path is part of the table key the variant is read by."""
    tma = _tma_eligible(q, dout, varlen, DKDV_TMA_MAX_HEAD_DIM)
    return backward_passes(q.shape[-1], tma, q.device, deterministic), tma


def backward(dout, q, k, v, out, lse, grad_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             softmax_scale, causal, window_size, softcap, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
             deterministic=False):
    """Fill dq, dk, dv (shaped like q, k, v).

    ``grad_lse`` (like lse, or None) is the LSE's own gradient: dL/ds_ij = p_ij (dP_ij - delta_i)
    + p_ij dlse_i, so it enters as delta_i - dlse_i and the kernels need nothing more.
    ``deterministic``: the two-pass backward, no atomics anywhere (bitwise reproducible); else
    the variant :func:`backward_passes` names (the two-pass one unless a table chose one pass).
    """
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    heads, kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if batch == 0:
        return
    if max_seqlen_k == 0 or max_seqlen_q == 0:  # nothing attends: dq is 0, and so are dk, dv
        dq.zero_(), dk.zero_(), dv.zero_()
        return
    lse = lse.contiguous()  # the kernels address delta (allocated like it) with the LSE's strides
    delta = _delta(dout, out, lse, grad_lse, varlen)
    sizes = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads // kv_heads)
    common = (score_scale(softmax_scale, softcap), softmax_scale, softcap, window_size[0], window_size[1],
              *_extras(alibi_slopes, dropout_p, dropout_seed, lse))
    order = causal_order(head_dim, causal, q.device)
    flags = dict(HEAD_DIM=head_dim, **_flags(causal, window_size, softcap, varlen, alibi_slopes, dropout_p),
                 BLOCK_D=block_d(head_dim))
    lse_strides = _lse_strides(lse, varlen)
    passes, dkdv_tma = backward_variant(q, dout, varlen, deterministic)
    dq_tma = _tma_eligible(k, v, varlen)
    # One pass: dQ summed in fp32 by the dK/dV kernel's atomics, then rounded into dq.
    dq_sum = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if passes == 1 else None

    def run_dkdv(block_m, block_n, warps, stages):
        q_arg, dout_arg = _descriptors(q, dout, varlen, block_m) if dkdv_tma else (q, dout)
        dq_arg, dq_strides = (lse, (0, 0, 0)) if dq_sum is None else (dq_sum, _strides(dq_sum, varlen))
        grid, blocks_last = _grid(triton.cdiv(max_seqlen_k, block_n), batch, kv_heads, order)
        attention_backward_dkdv_kernel[grid](
            q_arg, k, v, dout_arg, lse, delta, dk, dv, dq_arg, *sizes, *common,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
            *_strides(dk, varlen), *_strides(dv, varlen), *dq_strides, *lse_strides, **flags,
            BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=dkdv_tma, ATOMIC_DQ=dq_sum is not None,
            BLOCKS_LAST=blocks_last, num_warps=warps, num_stages=stages,
        )

    def run_dq(block_m, block_n, warps, stages):
        k_arg, v_arg = _descriptors(k, v, varlen, block_n) if dq_tma else (k, v)
        grid, blocks_last = _grid(triton.cdiv(max_seqlen_q, block_m), batch, heads, order)
        attention_backward_dq_kernel[grid](
            q, k_arg, v_arg, dout, lse, delta, dq, *sizes, *common,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
            *_strides(dq, varlen), *lse_strides, **flags,
            BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=dq_tma, BLOCKS_LAST=blocks_last, num_warps=warps,
            num_stages=stages,
        )

    if dq_sum is not None:
        _launch_tiles("attention_backward_fused", head_dim, dkdv_tma, run_dkdv, q.device)
        dq.copy_(dq_sum)
        return
    _launch_tiles("attention_backward_dkdv", head_dim, dkdv_tma, run_dkdv, q.device)
    _launch_tiles("attention_backward_dq", head_dim, dq_tma, run_dq, q.device)


def _tile_variants(name, head_dim):
    """(name suffix, tiles, USE_TMA) for every way the launchers can launch the tunable kernel
    ``name`` at ``head_dim``: the built-in tiles and those of every sm90 tuned table, by load path
    (and for the forward, narrowed for short query ranges)."""
    kernel, _, _, max_tma_head_dim = TUNABLE[name]
    for tma in (False, True) if _tma_head_dim(head_dim, max_tma_head_dim) else (False,):
        key = tile_key(head_dim, tma)
        choices = [default_tiles(name, head_dim, tma)]
        choices += [t for t in tuning.tables_choices(name, key) if t not in choices]
        seen = set()
        for tiles in choices:
            variants = [tuning.as_tuple(name, tiles)]
            if kernel is attention_forward_kernel:
                variants.append(_short_query_tiles(variants[0], head_dim, SHORT_QUERIES))
            for block_m, block_n, warps, stages in variants:
                if (block_m, block_n, warps, stages) not in seen:
                    seen.add((block_m, block_n, warps, stages))
                    yield (",tma" if tma else "") + f",M{block_m}N{block_n}w{warps}s{stages}", \
                        (block_m, block_n, warps, stages), tma


def _configs():
    """Every tile the launchers pick (head dim x dtype x TMA or not), with two flag sets per tile:
    plain (dense, no mask options) and the heaviest (varlen + causal + window + softcap)."""
    flag_sets = {
        "plain": {"IS_VARLEN": False, "CAUSAL": False, "HAS_WINDOW": False, "HAS_SOFTCAP": False,
                  "HAS_ALIBI": False, "HAS_DROPOUT": False},
        "all_options": {"IS_VARLEN": True, "CAUSAL": True, "HAS_WINDOW": True, "HAS_SOFTCAP": True,
                        "HAS_ALIBI": True, "HAS_DROPOUT": True},
    }
    # (tunable, its tensors in the kernel's dtype, extra float arguments, stride groups, ATOMIC_DQ)
    dkdv = (("q", "k", "v", "dout", "dk", "dv"), ("sm_scale",), ("q", "k", "v", "do", "dk", "dv", "dq"))
    kernels = (
        ("attention_forward", ("q", "k", "v", "out"), (), ("q", "k", "v", "o"), None),
        ("attention_backward_dkdv", *dkdv, False),
        ("attention_backward_dq", ("q", "k", "v", "dout", "dq"), ("sm_scale",), ("q", "k", "v", "do", "dq"), None),
        ("attention_backward_fused", *dkdv, True),
    )
    for dtype in (torch.float16, torch.bfloat16):
        ptr = pointer_type(dtype)
        for head_dim, (flags_name, flags), (tunable, tensors, extra_floats, stride_groups, atomic_dq) in \
                itertools.product(HEAD_DIMS, flag_sets.items(), kernels):
            if (flags_name == "all_options" or atomic_dq) and dtype == torch.float16:
                continue  # same code as bf16's: one dtype suffices for the option-heavy and one-pass variants
            kernel = TUNABLE[tunable][0]
            signature = {f"{t}_ptr": ptr for t in tensors}
            if atomic_dq is not None:  # the dK/dV kernel's dQ buffer: fp32 (a placeholder when unused)
                signature["dq_ptr"] = "*fp32"
            signature["lse_ptr"] = "*fp32"
            if kernel is not attention_forward_kernel:
                signature["delta_ptr"] = "*fp32"
            signature.update({"cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32", "seqlen_q": "i32",
                              "seqlen_k": "i32", "heads_per_kv": "i32", "qk_scale": "fp32"})
            signature.update({name: "fp32" for name in extra_floats})
            signature.update({"softcap": "fp32", "window_left": "i32", "window_right": "i32",
                              "alibi_ptr": "*fp32", "alibi_sb": "i64", "alibi_sh": "i64", "seed_ptr": "*i64",
                              "dropout_threshold": "i64", "dropout_scale": "fp32"})
            for group in stride_groups:
                signature.update({f"{group}_{axis}": "i64" for axis in ("sb", "st", "sh")})
            signature.update({"lse_sb": "i64", "lse_sh": "i64"})
            for suffix, (block_m, block_n, warps, stages), use_tma in _tile_variants(tunable, head_dim):
                variant = dict(signature)
                constexprs = {"HEAD_DIM": head_dim, **flags, "BLOCK_M": block_m, "BLOCK_N": block_n,
                              "BLOCK_D": block_d(head_dim)}
                constexprs["USE_TMA"] = use_tma
                constexprs["BLOCKS_LAST"] = False  # the built-in order (no table chooses the other yet)
                if atomic_dq is not None:
                    constexprs["ATOMIC_DQ"] = atomic_dq
                if use_tma and atomic_dq is not None:  # dK/dV: Q and dO by TMA, query-block rows
                    variant.update({name: f"tensordesc<{ptr[1:]}[{block_m}, {head_dim}]>"
                                    for name in ("q_ptr", "dout_ptr")})
                elif use_tma:  # K and V by TMA, key-block rows
                    variant.update({name: f"tensordesc<{ptr[1:]}[{block_n}, {head_dim}]>" for name in ("k_ptr", "v_ptr")})
                variant.update({name: "constexpr" for name in constexprs})
                order = kernel.arg_names  # the kernel's own argument order
                yield KernelConfig(
                    name=f"{tunable}[{ptr[1:]},D={head_dim},{flags_name}{suffix}]",
                    fn=kernel, signature={name: variant[name] for name in order}, constexprs=constexprs,
                    num_warps=warps, num_stages=stages, uses_tensor_cores=True, uses_tma=bool(use_tma),
                    divisible_by_16=tuple(n for n in order if n.endswith(("_st", "_sh"))
                                          or (n.endswith("_ptr") and variant[n].startswith("*"))),
                )


def _delta_configs():
    """The delta kernel per head dim and dtype, with and without an LSE gradient."""
    for dtype in (torch.float16, torch.bfloat16):
        ptr = pointer_type(dtype)
        for head_dim in HEAD_DIMS:
            for has_grad_lse in (False, True):
                constexprs = {"HEAD_DIM": head_dim, "HAS_GRAD_LSE": has_grad_lse,
                              "BLOCK_T": _delta_block_t(head_dim), "BLOCK_D": block_d(head_dim)}
                signature = {"out_ptr": ptr, "dout_ptr": ptr, "grad_lse_ptr": "*fp32", "delta_ptr": "*fp32",
                             "tokens": "i32", "seqlen": "i32"}
                signature.update({name: "i64" for name in ("o_st", "o_sh", "do_st", "do_sh", "g_sb", "g_sh",
                                                           "g_st", "d_sb", "d_sh")})
                signature.update({name: "constexpr" for name in constexprs})
                yield KernelConfig(
                    name=f"attention_backward_delta[{ptr[1:]},D={head_dim},grad_lse={has_grad_lse}]",
                    fn=attention_backward_delta_kernel, signature=signature, constexprs=constexprs, num_warps=4,
                    num_stages=1, divisible_by_16=("out_ptr", "dout_ptr", "grad_lse_ptr", "delta_ptr", "o_st",
                                                   "do_st", "o_sh", "do_sh"),
                )


register(_configs())
register(_delta_configs())

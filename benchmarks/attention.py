"""Benchmarks of training attention (docqa_fast.flash_attn_func / flash_attn_varlen_func).

Case families, each swept over the sequence length S (the x axis of its plot) and measured in
three modes -- forward, backward (the graph built once per input set, outside the timing) and
forward + backward:

* ``llm28x4-{causal,full}``: the LLM shape (28 query / 4 KV heads, D 128), causal and not, at
  S = 1K, 4K, 16K, 32K and 128K with B*S = 16K tokens (B = 16 at 1K, B = 1 from 16K on);
  ``llm32x8-*``: Mistral's 32/8 heads at 4K only.
* ``packed``: documents packed into one varlen row, causal, H 28/4, D 128: documents of
  S = 2K ... 32K tokens, as many as make 64K tokens (4-32 documents; 4 x 32K = 128K).
* ``vit``: the ViT shape (16 heads, D 80), non-causal varlen over 8 images of S patches
  (4,800 is one page at 100-144 dpi; 1K a small image, 16K a large one).

The packed and ViT rows hold documents of equal length, so the same tensors viewed as a dense
(documents, S, H, D) batch are the same problem at the same work: their ``... dense`` rows
(our kernels and torch's cuDNN attention on that view) are the dense figures the varlen ones
are judged against (issue 13: packed within 3% of dense, ViT at least cuDNN's dense D 80).

TFLOP/s by flash-attn's formula (:func:`attention_flops`): 4 * S_q * S_k * H * D per sequence
with H the query heads (GQA does the work of H heads), halved for causal, x2.5 for the
backward and x3.5 for forward + backward; rates at the median time.

Ours: ``docqa_fast (auto)`` (the dispatch as a user gets it: torch's cuDNN attention where the
GPU's tuned table measured it faster) and ``docqa_fast[triton]`` (our kernels, forced).
Peers: torch SDPA as torch chooses (``sdpa``) and with each fused backend forced
(FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION; dense cases), FlexAttention (compiled,
with a causal / document block mask), flash-attn's own functions when it is importable.
``sdpa`` (dense) or FlexAttention (varlen) is the output every provider is checked against.
All but ``sdpa`` need a GPU: on a CPU (``--quick``) they are skipped, each with its reason.

Memory: the largest case (128K tokens, backward) holds about 2 GB per input set. The one
provider that could ask for more is ``sdpa`` through torch's math fallback, which materialises
the (B, H, S, S) scores (1.9 TB at 128K): where those would not fit half the device it chooses
among the fused backends only (:func:`math_fallback_fits`), and fails fast if none takes the call.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import docqa_fast

from .harness import (CPU_INPUT_BUDGET, INTERPRETER_TOO_SLOW, Case, Provider, flash_attn_unavailable, gpu_only,
                      register_family)

FAMILY = "attention"
DTYPE = torch.bfloat16
# Per size set: the dense lengths and their tokens per batch (B = tokens // S, at least 1);
# the packed documents' lengths and the tokens a row holds; the ViT images' lengths and count.
SIZES = {
    "full": {"S": (1024, 4096, 16384, 32768, 131072), "tokens": 16384, "mistral_S": 4096,
             "doc_S": (2048, 4096, 8192, 16384, 32768), "packed_tokens": 65536,
             "vit_S": (1024, 4800, 16384), "images": 8},
    "quick": {"S": (128, 256), "tokens": 512, "mistral_S": None,
              "doc_S": (64, 128), "packed_tokens": 512, "vit_S": (64, 128), "images": 2},
}
DOCS_PER_ROW = (4, 32)  # the packed workload: 4-32 documents in one row (WORKLOADS.md)
MODES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


# ------------------------------------------------------------------------------ inputs

def _dense_inputs(params, device):
    B, S, H, Hk, D = params["B"], params["S"], params["H"], params["Hk"], params["D"]
    q = torch.randn(B, S, H, D, device=device, dtype=DTYPE)
    k, v = (torch.randn(B, S, Hk, D, device=device, dtype=DTYPE) for _ in range(2))
    return _with_grad(q, k, v, params)


def _packed_inputs(params, device):
    lengths, H, Hk, D = params["lengths"], params["H"], params["Hk"], params["D"]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(total, H, D, device=device, dtype=DTYPE)
    k, v = (torch.randn(total, Hk, D, device=device, dtype=DTYPE) for _ in range(2))
    return (*_with_grad(q, k, v, params), cu)


def _with_grad(q, k, v, params):
    if params["mode"] != "fwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        return q, k, v, torch.randn_like(q)
    return q, k, v, None


# ----------------------------------------------------------------------------- providers

def _in_mode(forward, mode):
    """forward(q, k, v, *rest) -> out, turned into the timed callable of ``mode``.

    Call it in a provider's ``build`` (once per case), never when the case is made: the bwd
    callable keeps each input set's graph, and a case lives for the whole run -- made with the
    cases, every bwd case's inputs, outputs and saved tensors stayed on the GPU to the end.
    """
    if mode == "fwd":
        return lambda q, k, v, dout, *rest: forward(q, k, v, *rest)
    if mode == "fwd_bwd":
        return lambda q, k, v, dout, *rest: torch.autograd.grad(forward(q, k, v, *rest), (q, k, v), dout)
    graphs = {}  # bwd: one forward per input set, built on first use (the untimed warm-up)

    def backward_only(q, k, v, dout, *rest):
        if id(q) not in graphs:
            graphs[id(q)] = forward(q, k, v, *rest)
        return torch.autograd.grad(graphs[id(q)], (q, k, v), dout, retain_graph=True)

    return backward_only


def _flash_attn_forward(module, causal, packed):
    """forward(q, k, v[, cu]) through a module with flash-attn's two functions: flash_attn
    itself, or docqa_fast (the same signatures: swapping the import is the whole migration)."""
    if not packed:
        return lambda q, k, v: module.flash_attn_func(q, k, v, causal=causal)
    max_seqlen = _max_seqlen()

    def forward(q, k, v, cu):
        return module.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen(cu), max_seqlen(cu), causal=causal)

    return forward


def _max_seqlen():
    """max_seqlen of a cu_seqlens, read once per input set: the int a caller of the varlen
    functions passes along (flash-attn's API), not a device-to-host copy inside every timed call."""
    known = {}

    def of(cu):
        if id(cu) not in known:
            known[id(cu)] = int((cu[1:] - cu[:-1]).max())
        return known[id(cu)]

    return of


def _dense_twin(forward):
    """A dense forward(q, k, v) run on varlen inputs of equal-length documents: the packed
    (total, H, D) tensors viewed as (documents, S, H, D) -- no copy, the same problem."""
    def twin(q, k, v, cu):
        docs = cu.shape[0] - 1
        out = forward(*(t.view(docs, -1, *t.shape[1:]) for t in (q, k, v)))
        return out.reshape(q.shape)

    return twin


# Our rows: the dispatch as a user gets it (the GPU's tuned table may put torch's cuDNN attention
# first for dense calls), and our own Triton kernels forced, so their gap stays in view.
OURS = {"docqa_fast (auto)": {"DOCQA_FAST_BACKEND": "auto", "DOCQA_FAST_ATTENTION": "auto"},
        "docqa_fast[triton]": {"DOCQA_FAST_BACKEND": "triton", "DOCQA_FAST_ATTENTION": "triton"}}


def _ours(mode, causal, packed, name, dense_twin=False):
    def build():
        if dense_twin:
            return _in_mode(_dense_twin(_flash_attn_forward(docqa_fast, causal, packed=False)), mode)
        return _in_mode(_flash_attn_forward(docqa_fast, causal, packed), mode)

    return Provider(name + (" dense" if dense_twin else ""), build=build, ours=True, env=OURS[name],
                    unavailable=gpu_only(INTERPRETER_TOO_SLOW))


def math_fallback_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether SDPA's math fallback could hold its fp32 scores and probabilities, (B, H, S_q, S_k)
    each, in half the device's memory (a CPU: harness.CPU_INPUT_BUDGET). Past that, ``sdpa`` is
    kept to the fused backends: an allocation of terabytes only ends in an out-of-memory error."""
    batch, seqlen_q, heads = q.shape[0], q.shape[1], q.shape[2]
    needed = 2 * 4 * batch * heads * seqlen_q * k.shape[1]
    if q.device.type == "cuda":
        return needed <= torch.cuda.get_device_properties(q.device).total_memory // 2
    return needed <= CPU_INPUT_BUDGET


def _sdpa_forward(causal, backend=None):
    """Dense forward(q, k, v) through torch SDPA: ``backend`` forced, or torch's own choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def forward(q, k, v):
        args = [t.transpose(1, 2) for t in (q, k, v)]
        if backend is not None:
            choice = sdpa_kernel(getattr(SDPBackend, backend))
        else:
            choice = contextlib.nullcontext() if math_fallback_fits(q, k) else sdpa_kernel(fused)
        with choice:
            out = F.scaled_dot_product_attention(*args, is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    return forward


def _sdpa(mode, causal, backend=None, dense_twin=False):
    def build():
        forward = _sdpa_forward(causal, backend)
        return _in_mode(_dense_twin(forward) if dense_twin else forward, mode)

    name = (f"sdpa[{backend}]" if backend else "sdpa") + (" dense" if dense_twin else "")
    unavailable = (lambda device: None) if backend is None else gpu_only(f"{backend} needs a CUDA device")
    return Provider(name, build=build, unavailable=unavailable)


FLEX_BLOCK = 128  # create_block_mask's default block size, in queries and in keys


def document_block_mask(cu_seqlens: torch.Tensor, causal: bool, mask_mod, block: int = FLEX_BLOCK):
    """FlexAttention BlockMask of attention within documents (optionally causal), built per block.

    ``create_block_mask`` evaluates ``mask_mod`` on every (query, key) pair first: at 153,600
    ViT tokens its int64 document lookups alone asked for 176 GiB. Here each block of
    ``block`` tokens only needs the documents of its first and last token (the documents in
    between lie inside it): a (query block, key block) pair is needed when their document
    ranges overlap (and, causal, the key block is not after the query block), and full --
    ``mask_mod`` need not run in it -- when both are whole blocks inside the same document
    (and, causal, the key block comes strictly first). Memory: a few (blocks x blocks) tables,
    14 M entries at 480,000 tokens. The same BlockMask ``create_block_mask`` gives, for
    sequences of cu_seqlens[-1] queries and keys (a ragged last block is never full, as
    there); ``mask_mod`` still decides inside the partial blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    cu = cu_seqlens.long()
    total = int(cu[-1])
    n = -(-total // block)
    index = torch.arange(n, device=cu.device)
    starts = index * block
    ends = torch.clamp(starts + block, max=total)
    # Document of a token: the last document starting at or before it (skips empty documents).
    first = torch.searchsorted(cu, starts, right=True) - 1
    last = torch.searchsorted(cu, ends - 1, right=True) - 1
    # Rows: query blocks, columns: key blocks.
    needed = (first[None, :] <= last[:, None]) & (first[:, None] <= last[None, :])
    whole = (ends - starts == block) & (first == last)
    full = whole[:, None] & whole[None, :] & (first[:, None] == first[None, :])
    if causal:
        needed &= index[:, None] >= index[None, :]
        full &= index[:, None] > index[None, :]
    partial = needed & ~full

    def ordered(blocks):
        # The layout create_block_mask produces: per query block the count, then the key
        # blocks' indices in increasing order (argsort keeps the rest in order behind them).
        counts = blocks.sum(-1, dtype=torch.int32)
        indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]  # (B=1, H=1, ...): broadcast over both

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(total, total))


def _flex(mode, causal, packed):
    def build():
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def forward(q, k, v, cu=None):
            seqlen = q.shape[-3]
            key = (seqlen, None if cu is None else id(cu))
            if key not in masks and (causal or cu is not None):
                if cu is not None:
                    document = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device),
                                                       (cu[1:] - cu[:-1]).long())

                    def mask_mod(b, h, qi, ki):
                        same = document[qi] == document[ki]
                        return (same & (qi >= ki)) if causal else same
                    bounds = cu
                else:  # one causal sequence per batch row: a single document of seqlen tokens
                    def mask_mod(b, h, qi, ki):
                        return qi >= ki
                    bounds = torch.tensor([0, seqlen], device=q.device)
                masks[key] = document_block_mask(bounds, causal, mask_mod)
            if cu is not None:  # one packed row: (1, H, total, D)
                q, k, v = (t[None] for t in (q, k, v))
            args = [t.transpose(-3, -2) for t in (q, k, v)]
            out = compiled(*args, block_mask=masks.get(key), enable_gqa=q.shape[-2] != k.shape[-2])
            out = out.transpose(-3, -2)
            return out[0] if cu is not None else out

        return _in_mode(forward, mode)

    return Provider("flex_attention", build=build,
                    unavailable=gpu_only("FlexAttention is benchmarked on GPUs only (compiling it for a CPU "
                                         "would take longer than a --quick run)"))


def _flash_attn(mode, causal, packed):
    def build():
        import flash_attn

        return _in_mode(_flash_attn_forward(flash_attn, causal, packed), mode)

    return Provider("flash-attn", build=build, unavailable=flash_attn_unavailable)


# ---------------------------------------------------------------------------------- cases

def attention_flops(lengths, heads: int, head_dim: int, causal: bool, mode: str) -> int:
    """flash-attn's benchmark formula: 4 * S^2 * H * D per sequence of S tokens (two matmuls of
    2 * S^2 * D each per head; H the query heads, so GQA counts the work of every query head),
    halved for causal, x2.5 for the backward (five matmuls against the forward's two), x3.5
    for forward + backward. Varlen: the sum over the sequences."""
    per_sequence = sum(4 * s * s * heads * head_dim for s in lengths)
    return int(per_sequence * (0.5 if causal else 1.0) * FLOP_FACTOR[mode])


def _case(name, group, description, params, lengths, causal, packed):
    mode = params["mode"]
    providers = [*(_ours(mode, causal, packed, ours) for ours in OURS), _flex(mode, causal, packed),
                 _flash_attn(mode, causal, packed)]
    if packed:  # equal-length documents: the same tensors as a dense batch, at the same work
        providers += [_ours(mode, causal, packed, "docqa_fast[triton]", dense_twin=True),
                      _sdpa(mode, causal, "CUDNN_ATTENTION", dense_twin=True)]
    else:
        providers += [_sdpa(mode, causal, backend) for backend in
                      (None, "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")]
    return Case(family=FAMILY, name=name, group=group, description=description, params=params, sweep="S",
                make_inputs=_packed_inputs if packed else _dense_inputs, providers=tuple(providers),
                reference="flex_attention" if packed else "sdpa",
                flops=attention_flops(lengths, params["H"], params["D"], causal, mode))


def documents_per_row(doc_len: int, tokens: int) -> int:
    """How many documents of ``doc_len`` tokens a packed row holds: ``tokens`` worth, within
    the workload's 4-32 documents."""
    low, high = DOCS_PER_ROW
    return max(low, min(high, tokens // doc_len))


@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    """Kind by kind (LLM causal, LLM non-causal, Mistral, packed, ViT), each mode swept over S."""
    sizes = SIZES["quick" if quick else "full"]
    found = []
    dense_kinds = [(28, 4, causal, sizes["S"]) for causal in (True, False)]
    if sizes["mistral_S"]:
        dense_kinds += [(32, 8, causal, (sizes["mistral_S"],)) for causal in (True, False)]
    for H, Hk, causal, lengths in dense_kinds:
        tag = "causal" if causal else "full"
        for mode in MODES:
            group = f"llm{H}x{Hk}-{tag}-{mode}"
            for S in lengths:
                B = max(1, sizes["tokens"] // S)
                params = {"B": B, "S": S, "H": H, "Hk": Hk, "D": 128, "mode": mode, "dtype": "bfloat16"}
                found.append(_case(f"{group}-S{S}", group,
                                   f"LLM attention {mode}, {tag}, H {H}/{Hk}, D 128, B = max(1, "
                                   f"{sizes['tokens']} / S), bf16", params, [S] * B, causal, packed=False))
    for mode in MODES:
        for S in sizes["doc_S"]:
            docs = documents_per_row(S, sizes["packed_tokens"])
            params = {"lengths": [S] * docs, "docs": docs, "S": S, "H": 28, "Hk": 4, "D": 128, "mode": mode,
                      "dtype": "bfloat16"}
            found.append(_case(f"packed-{mode}-{docs}x{S}", f"packed-{mode}",
                               f"packed documents {mode}, causal varlen, {DOCS_PER_ROW[0]}-{DOCS_PER_ROW[1]} "
                               f"documents of S tokens ({sizes['packed_tokens']} tokens), H 28/4, D 128, bf16",
                               params, [S] * docs, True, packed=True))
    for mode in MODES:
        for S in sizes["vit_S"]:
            images = sizes["images"]
            params = {"lengths": [S] * images, "images": images, "S": S, "H": 16, "Hk": 16, "D": 80, "mode": mode,
                      "dtype": "bfloat16"}
            found.append(_case(f"vit-{mode}-{images}x{S}", f"vit-{mode}",
                               f"ViT attention {mode}, non-causal varlen, {images} images of S patches, "
                               f"16 heads, D 80, bf16", params, [S] * images, False, packed=True))
    return found

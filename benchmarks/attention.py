"""Benchmarks of training attention (docqa_fast.flash_attn_func / flash_attn_varlen_func).

Cases (README.md, Benchmarks): the LLM shape (28 query / 4 KV heads, D 128; and Mistral's 32/8)
at S = 1K ... 128K with B*S = 16K tokens (B = 1 from 16K on), causal and not; packed
documents (4-32 documents of 2K-32K tokens in one varlen row, causal); the ViT shape
(16 heads, D 80, non-causal, varlen over images of 4,800 patches). Each in three modes:
forward, backward (the graph built once per input set, outside the timing) and forward +
backward. TFLOP/s by flash-attn's formula: 4 * S_q * S_k * H * D per sequence, halved for
causal, x2.5 for the backward, x3.5 for forward + backward.

Ours: ``docqa_fast (auto)`` (the dispatch as a user gets it: torch's cuDNN attention where the
GPU's tuned table measured it faster) and ``docqa_fast[triton]`` (our kernels, forced).
Peers: torch SDPA with each backend (FLASH_ATTENTION, CUDNN_ATTENTION, EFFICIENT_ATTENTION;
dense cases), FlexAttention (compiled, with a causal / document block mask), flash-attn's
own functions when it is importable. ``sdpa`` (torch's choice of backend, dense) or
FlexAttention (packed) is the output every provider is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import docqa_fast

from .harness import Case, Provider, flash_attn_unavailable, register_family

FAMILY = "attention"
DTYPE = torch.bfloat16
PATCHES_PER_IMAGE = 4800
SIZES = {
    "full": {"llm_S": (1024, 4096, 16384, 32768, 131072), "tokens": 16384, "docs": ((4, 2048), (8, 8192), (32, 2048),
                                                                                   (4, 32768)),
             "images": (8, 32, 100)},
    "quick": {"llm_S": (256,), "tokens": 512, "docs": ((4, 128),), "images": (1,)},
}
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


# Our rows: the dispatch as a user gets it (the GPU's tuned table may put torch's cuDNN attention
# first for dense calls), and our own Triton kernels forced, so their gap stays in view.
OURS = {"docqa_fast (auto)": {"DOCQA_FAST_BACKEND": "auto", "DOCQA_FAST_ATTENTION": "auto"},
        "docqa_fast[triton]": {"DOCQA_FAST_BACKEND": "triton", "DOCQA_FAST_ATTENTION": "triton"}}


def _ours(mode, causal, packed, name):
    if packed:
        def forward(q, k, v, cu):
            max_len = int((cu[1:] - cu[:-1]).max())
            return docqa_fast.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)
    else:
        def forward(q, k, v):
            return docqa_fast.flash_attn_func(q, k, v, causal=causal)
    unavailable = (lambda device: None if device.type == "cuda" else
                   "no GPU: the Triton interpreter is far too slow to time")
    return Provider(name, build=lambda: _in_mode(forward, mode), ours=True, env=OURS[name], unavailable=unavailable)


def _sdpa(mode, causal, backend=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forward(q, k, v):
        args = [t.transpose(1, 2) for t in (q, k, v)]
        gqa = q.shape[2] != k.shape[2]
        if backend is None:
            out = F.scaled_dot_product_attention(*args, is_causal=causal, enable_gqa=gqa)
        else:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                out = F.scaled_dot_product_attention(*args, is_causal=causal, enable_gqa=gqa)
        return out.transpose(1, 2)

    unavailable = (lambda device: None) if backend is None else (
        lambda device: None if device.type == "cuda" else f"{backend} needs a CUDA device")
    return Provider(f"sdpa[{backend}]" if backend else "sdpa", build=lambda: _in_mode(forward, mode),
                    unavailable=unavailable)


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
                    unavailable=lambda device: None if device.type == "cuda" else "FlexAttention benchmarked on GPU only")


def _flash_attn(mode, causal, packed):
    def build():
        import flash_attn

        if packed:
            def forward(q, k, v, cu):
                max_len = int((cu[1:] - cu[:-1]).max())
                return flash_attn.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)
        else:
            def forward(q, k, v):
                return flash_attn.flash_attn_func(q, k, v, causal=causal)
        return _in_mode(forward, mode)

    return Provider("flash-attn", build=build, unavailable=flash_attn_unavailable)


# ---------------------------------------------------------------------------------- cases

def _flops(lengths, heads, head_dim, causal, mode):
    per_sequence = sum(4 * s * s * heads * head_dim for s in lengths)
    return int(per_sequence * (0.5 if causal else 1.0) * FLOP_FACTOR[mode])


def _case(name, group, description, params, sweep, lengths, causal, packed):
    mode = params["mode"]
    providers = [*(_ours(mode, causal, packed, name) for name in OURS), _flex(mode, causal, packed),
                 _flash_attn(mode, causal, packed)]
    if not packed:
        providers += [_sdpa(mode, causal, backend) for backend in
                      (None, "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")]
    return Case(family=FAMILY, name=name, group=group, description=description, params=params, sweep=sweep,
                make_inputs=_packed_inputs if packed else _dense_inputs, providers=tuple(providers),
                reference="flex_attention" if packed else "sdpa",
                flops=_flops(lengths, params["H"], params["D"], causal, mode))


@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    sizes = SIZES["quick" if quick else "full"]
    found = []
    for mode in MODES:
        for causal in (True, False):
            tag = "causal" if causal else "full"
            for (H, Hk) in ((28, 4), (32, 8)):
                for S in sizes["llm_S"]:
                    if (H, Hk) == (32, 8) and S != sizes["llm_S"][0] * 4 and not quick:
                        continue  # Mistral's shape at one length
                    B = max(1, sizes["tokens"] // S)
                    params = {"B": B, "S": S, "H": H, "Hk": Hk, "D": 128, "mode": mode, "dtype": "bfloat16"}
                    found.append(_case(f"llm{H}x{Hk}-{tag}-{mode}-S{S}", f"llm{H}x{Hk}-{tag}-{mode}",
                                       f"LLM attention {mode}, {tag}, H {H}/{Hk}, D 128, B*S={B * S}, bf16",
                                       params, "S", [S] * B, causal, packed=False))
        for docs, length in sizes["docs"]:
            params = {"lengths": [length] * docs, "docs": docs, "doc_len": length, "H": 28, "Hk": 4, "D": 128,
                      "mode": mode, "dtype": "bfloat16"}
            found.append(_case(f"packed-{mode}-{docs}x{length}", f"packed-{mode}",
                               f"packed documents {mode}, causal, H 28/4, D 128, bf16", params, "docs",
                               [length] * docs, True, packed=True))
        for images in sizes["images"]:
            params = {"lengths": [PATCHES_PER_IMAGE] * images, "images": images, "H": 16, "Hk": 16, "D": 80,
                      "mode": mode, "dtype": "bfloat16"}
            found.append(_case(f"vit-{mode}-images{images}", f"vit-{mode}",
                               f"ViT attention {mode}, non-causal varlen, 16 heads, D 80, bf16", params, "images",
                               [PATCHES_PER_IMAGE] * images, False, packed=True))
    return found

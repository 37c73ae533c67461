"""Benchmarks of attention for inference (docqa_fast.flash_attn_with_kvcache).

Cases (Qwen2.5-VL-7B: 28 query / 4 KV heads, D 128; Mistral's 32 / 8 at one size), bf16:

* ``decode-<layout>-H28x4-B<B>``: one new token per row appended and attended over a cache
  of ``ctx`` tokens, B = 1, 8, 64 x ctx = 4K ... 512K (B * ctx capped at 2M tokens, 4 GiB of
  K/V per input set), contiguous and paged (pages of 16, 64 and 256 tokens, shuffled). Metric:
  achieved KV-read bandwidth, bytes of K and V read over the time, against the measured
  device-to-device copy bandwidth; target 85% when B * ctx >= 128K tokens (issue 14).
* ``chunked_prefill``: a 2K-token chunk appended and attended (causal) over a 128K paged
  cache (page 256), in TFLOP/s (4 * Sq * keys_seen * H * D, keys_seen averaged over the chunk),
  through both calls a user would make: ``flash_attn_with_kvcache`` (append fused into the
  launch) and ``flash_attn_varlen_func(..., block_table=...)`` after writing the chunk's k/v into
  the pages with an index op (how a paged serving engine runs it; the write is timed too).

Providers: ours (Triton; GPU only -- the interpreter is far too slow to time) called eagerly
(each call validates its inputs: one host sync) and replayed from a captured CUDA graph (how a
serving loop runs a decode step: no validation, no Python; the kernels' own speed), the reference
(``eager``: per-row gather + attention_ref; the output every provider is checked against),
torch SDPA over the contiguous cache (the new token written with an index op, then SDPA on
the valid prefix; each backend that takes GQA shapes), flash-attn's ``flash_attn_with_kvcache``
when importable (paged only with page 256: flash-attn 2 needs a multiple of 256), FlashInfer's
batch decode over the same pages when importable (a contiguous cache is one page per row; decode
cases only; the new token written with an index op, its plan made once per input set, untimed).
FlexAttention is not a natural peer here (no paged cache, a block mask per length) and is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import docqa_fast
import docqa_fast.inference as inference
from docqa_fast.reference.kvcache import append_kv_ref, flash_attn_with_kvcache_ref
from docqa_fast.testing import capture_cuda_graph

from .harness import INTERPRETER_TOO_SLOW, Case, Provider, flash_attn_unavailable, gpu_only, register_family

FAMILY = "inference"
DTYPE = torch.bfloat16
TARGET_FRACTION, TARGET_MIN_TOKENS = 0.85, 128 * 1024
MAX_TOKENS = 2 * 1024 * 1024  # B * ctx per input set (4 GiB of bf16 K/V at Hk 4, D 128)
SIZES = {
    "full": {"B": (1, 8, 64), "ctx": (4096, 32768, 131072, 524288), "layouts": (None, 16, 64, 256),
             "prefill": (2048, 131072)},
    "quick": {"B": (1,), "ctx": (256,), "layouts": (None, 16), "prefill": (32, 256)},
}


# ------------------------------------------------------------------------------ inputs

def _inputs(params, device):
    """(q, k_cache, v_cache, k, v, cache_seqlens, block_table): the cache full up to ctx - Sq."""
    B, ctx, Sq, H, Hk, D, page = (params[n] for n in ("B", "ctx", "Sq", "H", "Hk", "D", "page"))
    q = torch.randn(B, Sq, H, D, device=device, dtype=DTYPE)
    k, v = (torch.randn(B, Sq, Hk, D, device=device, dtype=DTYPE) for _ in range(2))
    seqlens = torch.full((B,), ctx - Sq, dtype=torch.int32, device=device)
    if page is None:
        shape, table = (B, ctx, Hk, D), None
    else:
        pages = -(-ctx // page)
        shape = (B * pages, page, Hk, D)
        table = torch.randperm(B * pages, device=device).view(B, pages).int()
    k_cache, v_cache = (torch.randn(shape, device=device, dtype=DTYPE) for _ in range(2))
    return q, k_cache, v_cache, k, v, seqlens, table


# ----------------------------------------------------------------------------- providers

def _call(fn, causal):
    def run(q, k_cache, v_cache, k, v, seqlens, table):
        return fn(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table, causal=causal)
    return run


def _ours(causal):
    return Provider("docqa_fast[triton]", fn=_call(inference.flash_attn_with_kvcache, causal), ours=True,
                    env={"DOCQA_FAST_BACKEND": "triton"},
                    unavailable=gpu_only(INTERPRETER_TOO_SLOW))


def _ours_unchecked(causal):
    """An eager serving loop that trusts its inputs: docqa_fast.value_checks(False) drops the
    per-call host sync of the value checks (the launches then queue ahead of the GPU)."""
    call = _call(inference.flash_attn_with_kvcache, causal)

    def run(*inputs):
        with docqa_fast.value_checks(False):
            return call(*inputs)
    return Provider("docqa_fast[triton] value_checks(False)", fn=run, ours=True, env={"DOCQA_FAST_BACKEND": "triton"},
                    unavailable=gpu_only(INTERPRETER_TOO_SLOW))


def _ours_graph(causal):
    """The decode step captured once per input set in a CUDA graph (validated eagerly first, as a
    serving loop does before capturing), then replayed."""
    def build():
        graphs = {}
        step = _call(inference.flash_attn_with_kvcache, causal)

        def run(*inputs):
            if id(inputs[0]) not in graphs:
                # Its warm-up call validates, compiles and warms the tuned-table lookups; the graph
                # keeps this input set alive.
                graphs[id(inputs[0])] = capture_cuda_graph(lambda: step(*inputs))
            return graphs[id(inputs[0])].replay()
        return run

    return Provider("docqa_fast[triton] cuda-graph", build=build, ours=True, env={"DOCQA_FAST_BACKEND": "triton"},
                    unavailable=gpu_only("CUDA graphs need a CUDA device"))


def _flashinfer():
    """FlashInfer's batch decode (tensor-core path for GQA) over our cache's pages, NHD layout."""
    def installed(device):
        try:
            import flashinfer  # noqa: F401
        except ImportError:
            return "flashinfer is not installed (pip install flashinfer-python)"
        return None

    def build():
        import flashinfer

        workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        wrappers = {}

        def run(q, k_cache, v_cache, k, v, seqlens, table):
            batch, _, heads, head_dim = q.shape
            page = k_cache.shape[1]
            rows = table if table is not None else torch.arange(batch, device=q.device, dtype=torch.int32)[:, None]
            if id(q) not in wrappers:  # the plan: host work a serving engine does once per step for all layers
                pages = rows.shape[1]  # the cases fill every row to its last page
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
                indptr = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * pages
                last = (seqlens + 1 - (pages - 1) * page).to(torch.int32)
                wrapper.plan(indptr, rows.reshape(-1).contiguous(), last, heads, k_cache.shape[2], head_dim, page,
                             q_data_type=q.dtype)
                wrappers[id(q)] = (wrapper, q)
            # The new token's slot (the last of each row, which the cases fill): an index op, as for SDPA.
            last_page, offset = rows[:, -1].long(), seqlens.long() % page
            k_cache[last_page, offset] = k[:, 0]
            v_cache[last_page, offset] = v[:, 0]
            return wrappers[id(q)][0].run(q[:, 0], (k_cache, v_cache)).unsqueeze(1)
        return run

    return Provider("flashinfer", build=build, unavailable=gpu_only("FlashInfer needs a CUDA device", then=installed))


def _reference(causal):
    return Provider("eager", fn=_call(flash_attn_with_kvcache_ref, causal))


def _sdpa(backend, paged):
    """Append with an index op, then SDPA over the valid prefix of the contiguous cache (decode: no mask)."""
    def run(q, k_cache, v_cache, k, v, seqlens, table):
        length = k_cache.shape[1]  # the cases fill the cache to its end: seqlens + 1 == ctx
        k_cache[:, length - 1:] = k
        v_cache[:, length - 1:] = v
        args = [t.transpose(1, 2) for t in (q, k_cache, v_cache)]
        if backend is None:
            out = F.scaled_dot_product_attention(*args, enable_gqa=True)
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, backend)):
                out = F.scaled_dot_product_attention(*args, enable_gqa=True)
        return out.transpose(1, 2)

    def unavailable(device):
        if paged:
            return "SDPA has no paged cache (a gather first would time a copy, not attention)"
        return gpu_only(f"{backend} needs a CUDA device")(device) if backend is not None else None

    return Provider(f"sdpa[{backend}]" if backend else "sdpa", fn=run, unavailable=unavailable)


def _flash_attn(causal, page):
    def unavailable(device):
        reason = flash_attn_unavailable(device)
        if reason is not None:
            return reason
        if page is not None and page % 256:
            return f"flash-attn 2 needs a page size that is a multiple of 256, not {page}"
        return None

    def build():
        from flash_attn import flash_attn_with_kvcache

        return _call(flash_attn_with_kvcache, causal)

    return Provider("flash-attn", build=build, unavailable=unavailable)


def _varlen_paged(fn):
    """The chunk's k/v written into its pages (an index op), then packed varlen attention over the pages."""
    def run(q, k_cache, v_cache, k, v, seqlens, table):
        batch, chunk = q.shape[:2]
        append_kv_ref(k_cache, v_cache, k, v, seqlens, block_table=table)
        steps = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
        cu_q = steps * chunk
        cu_k = torch.cat((steps[:1], (seqlens + chunk).cumsum(0, dtype=torch.int32)))
        out = fn(q.flatten(0, 1), k_cache, v_cache, cu_q, cu_k, chunk, k_cache.shape[1] * table.shape[1],
                 causal=True, block_table=table)
        return out.view(q.shape)
    return run


def _ours_varlen():
    return Provider("docqa_fast[triton] varlen+block_table", fn=_varlen_paged(docqa_fast.flash_attn_varlen_func),
                    ours=True, env={"DOCQA_FAST_BACKEND": "triton"},
                    unavailable=gpu_only(INTERPRETER_TOO_SLOW))


def _flash_attn_varlen(page):
    def unavailable(device):
        reason = flash_attn_unavailable(device)
        if reason is None and page % 256:
            return f"flash-attn 2 needs a page size that is a multiple of 256, not {page}"
        return reason

    def build():
        from flash_attn import flash_attn_varlen_func

        return _varlen_paged(flash_attn_varlen_func)

    return Provider("flash-attn varlen+block_table", build=build, unavailable=unavailable)


# ---------------------------------------------------------------------------------- cases

def _layout_name(page):
    return "contiguous" if page is None else f"paged{page}"


def _kv_bytes(B, ctx, Hk, D):
    return 2 * B * ctx * Hk * D * DTYPE.itemsize  # K and V, each read once


@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    sizes = SIZES["quick" if quick else "full"]
    found = []
    for (H, Hk) in ((28, 4), (32, 8)):
        for page in sizes["layouts"]:
            for B in sizes["B"]:
                for ctx in sizes["ctx"]:
                    if B * ctx > MAX_TOKENS or ((H, Hk) == (32, 8) and (page is not None or B != 1)):
                        continue  # Mistral's shape: contiguous, batch 1 only
                    params = {"B": B, "ctx": ctx, "Sq": 1, "H": H, "Hk": Hk, "D": 128, "page": page,
                              "dtype": "bfloat16"}
                    providers = (_ours(False), _ours_unchecked(False), _ours_graph(False), _reference(False),
                                 *(_sdpa(backend, page is not None) for backend in
                                   (None, "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")),
                                 _flash_attn(False, page), _flashinfer())
                    group = f"decode-{_layout_name(page)}-H{H}x{Hk}-B{B}"
                    found.append(Case(
                        family=FAMILY, name=f"{group}-ctx{ctx}", group=group,
                        description=f"decode, 1 new token, {_layout_name(page)}, H {H}/{Hk}, D 128, B {B}, bf16",
                        params=params, sweep="ctx", make_inputs=_inputs, providers=providers,
                        bytes_moved=_kv_bytes(B, ctx, Hk, 128),
                        target=TARGET_FRACTION if B * ctx >= TARGET_MIN_TOKENS else None))
    chunk, ctx = sizes["prefill"]
    params = {"B": 1, "ctx": ctx, "Sq": chunk, "H": 28, "Hk": 4, "D": 128, "page": 256 if not quick else 16,
              "dtype": "bfloat16"}
    keys_seen = ctx - chunk + (chunk + 1) / 2  # causal, bottom-right: the average query's key count
    found.append(Case(
        family=FAMILY, name=f"chunked_prefill-chunk{chunk}-ctx{ctx}", group="chunked_prefill",
        description=f"chunked prefill of {chunk} tokens over a paged cache, causal, H 28/4, D 128, bf16",
        params=params, sweep="ctx", make_inputs=_inputs,
        providers=(_ours(True), _ours_varlen(), _reference(True), _flash_attn(True, params["page"]),
                   _flash_attn_varlen(params["page"])),
        flops=int(4 * chunk * keys_seen * 28 * 128)))
    return found

"""Benchmarks of visual-token packing (docqa_fast.packing) against what a user runs today.

Shapes (Qwen2.5-VL-7B; README.md, Benchmarks): pages of grid (1, 60, 80) ViT patches = 1,200
LLM tokens, text runs of 20-200 tokens between pages, 1-8 documents of 12-100 pages.

* ``rope_index``: ``get_rope_index`` vs transformers' own (``Qwen2_5_VLModel.get_rope_index``,
  the installed version, called on a stand-in holding a config). Target: >= 50x on a
  100-page document.
* ``merge``: ``merge_visual_tokens`` vs ``inputs_embeds.masked_scatter`` (hidden 3584, bf16)
  and ``torch.compile`` of it, bytes moved = embeddings read + written + features read;
  ``merge_fwd_bwd`` adds the backward (d out read, d embeddings and d features written).
* ``pack``: ``pack_multimodal`` of 2-8 documents (token fields, grids and pixels through one
  ``pack_tokens`` call) vs its ``torch.cat``-per-field reference; bytes moved = every field read
  and written once.
* ``pack_copy``: that one call alone (the per-document M-RoPE and checks left out) vs
  ``torch.cat`` per field (the reference backend) and ``torch.compile`` of it; bytes = read +
  written, pixels and grids included. Target: >= 80% of the copy bandwidth.
* ``planner``: ``plan_packing`` (C++) vs the pure-Python reference BFD, 100K samples of a
  long-document mix (2K-128K tokens into 128K rows). Target: >= 1M samples/s on one core.
  (TRL's ``pack_dataset`` is added when trl is importable.) Bytes moved = the lengths read.

Besides time, the ``rope_index`` and ``merge`` cases record per provider, in the record's
``params["host_syncs"]`` (results.json), what one call costs the host, counted on the first,
untimed call of each provider:

* ``syncs``: on a GPU, the synchronisations PyTorch reports under
  ``torch.cuda.set_sync_debug_mode("warn")`` (``.item()``, ``.tolist()``, ``nonzero``, blocking
  copies to the host, ...). On CPU tensors there is no device to wait for: ``"n/a"``.
* ``value_reads``: Python-level reads of tensor values (``.item()``, ``.tolist()``, ``bool()``,
  ``int()``, ``float()``, ``index()`` of a tensor), counted by wrapping those methods: each one
  is a host sync when the tensor lives on a GPU. Reads inside C++ (ours, transformers' ATen
  calls) are not seen, so on CPU this shows where the Python code would sync, nothing more.

Peak memory is the table's "peak MiB" column (``torch.cuda.max_memory_allocated`` above the
resident inputs, GPU only; "n/a" on CPU, where PyTorch keeps no such counter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import types
import warnings

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from docqa_fast.packing import get_rope_index, merge_visual_tokens, pack_multimodal, plan_packing
from docqa_fast.packing.ops import PACK_TOKENS
from docqa_fast.reference.packing import merge_visual_tokens_ref, plan_packing_ref
from docqa_fast.testing import no_host_sync

from .harness import Case, Provider, compiled_provider, ours_per_backend, register_family

FAMILY = "packing"
IMAGE_ID, VISION_START, VISION_END = 151655, 151652, 151653
PAGE_GRID = (1, 60, 80)  # ViT patches of one ~100 dpi page; / 4 after the 2x2 merge
HIDDEN, DTYPE = 3584, torch.bfloat16
SIZES = {
    "full": {"rope": ((1, 12), (1, 50), (1, 100), (8, 12)), "merge_T": (16384, 65536, 131072),
             "pack": ((2, 12), (8, 12)), "planner_n": (10_000, 100_000)},
    "quick": {"rope": ((1, 12), (2, 12)), "merge_T": (4096,), "pack": ((2, 1),), "planner_n": (10_000,)},
}


# ------------------------------------------------------------------------- host syncs

_VALUE_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def _count_host_syncs(device: torch.device):
    """Counts what one call costs the host (see the module docstring); yields the result dict."""
    result = {"syncs": "n/a", "value_reads": 0}
    originals = {name: getattr(torch.Tensor, name) for name in _VALUE_READS}

    def counting(original):
        def read(self, *args, **kwargs):
            result["value_reads"] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    on_gpu = device.type == "cuda"
    caught, watched = contextlib.nullcontext([]), contextlib.nullcontext()
    if on_gpu:
        torch.cuda.synchronize(device)
        caught, watched = warnings.catch_warnings(record=True), no_host_sync("warn")
    try:
        with caught as records:
            if on_gpu:
                warnings.simplefilter("always")
            with watched:
                yield result
        if on_gpu:
            result["syncs"] = sum("synchroniz" in str(r.message) for r in records)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def counting_host_syncs(provider: Provider, store: dict) -> Provider:
    """``provider`` whose first call (the untimed one) records its host syncs in store[name]."""
    def build():
        fn = provider.make()  # a fresh torch.compile for build-made providers
        calls = []

        def call(*inputs):
            if calls:
                return fn(*inputs)
            calls.append(1)
            # inputs may hold lists of tensors (the packing copy's per-document parts)
            device = next(t.device for t in tree_leaves(inputs) if isinstance(t, torch.Tensor))
            with _count_host_syncs(device) as result:
                output = fn(*inputs)
            store[provider.name] = result
            return output

        return call

    # replace: every other field (ours, env, availability, quick_cpu_skip) stays the provider's
    return dataclasses.replace(provider, fn=None, build=build)


def _renamed(providers, suffix: str) -> list[Provider]:
    """The same providers with ``suffix`` added to their names (variants of one backend's row)."""
    return [dataclasses.replace(p, name=p.name + suffix) for p in providers]


# ----------------------------------------------------------------------------- M-RoPE

def _document(rng: random.Random, pages: int):
    ids, types_ = [], []
    tokens = PAGE_GRID[0] * PAGE_GRID[1] * PAGE_GRID[2] // 4
    for _ in range(pages):
        n_text = rng.randint(20, 200)
        ids += [rng.randrange(150000) for _ in range(n_text)] + [VISION_START] + [IMAGE_ID] * tokens + [VISION_END]
        types_ += [0] * (n_text + 1) + [1] * tokens + [0]
    return ids, types_


def _rope_inputs(params, device):
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    docs = [_document(rng, params["pages"] - (b % 3)) for b in range(params["B"])]  # unequal lengths: padding
    T = max(len(d[0]) for d in docs)
    input_ids = torch.full((params["B"], T), 151643, dtype=torch.long)
    mm_types = torch.zeros(params["B"], T, dtype=torch.int32)
    mask = torch.zeros(params["B"], T, dtype=torch.long)
    for b, (ids, ty) in enumerate(docs):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        mm_types[b, :len(ids)] = torch.tensor(ty, dtype=torch.int32)
        mask[b, :len(ids)] = 1
    grids = torch.tensor([PAGE_GRID] * sum(params["pages"] - (b % 3) for b in range(params["B"])))
    return tuple(t.to(device) for t in (input_ids, mm_types, grids, mask))


@functools.cache
def _transformers_rope():
    """The installed transformers' Qwen2.5-VL get_rope_index, or None."""
    try:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    except ImportError:
        return None
    holder = types.SimpleNamespace(config=Qwen2_5_VLConfig(vision_config={"tokens_per_second": 2}))
    holder.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, holder)
    return functools.partial(Qwen2_5_VLModel.get_rope_index, holder)


def _rope_theirs(input_ids, mm_types, grids, mask):
    return _transformers_rope()(input_ids, mm_types, image_grid_thw=grids, attention_mask=mask)


def _rope_ours(input_ids, mm_types, grids, mask):
    return get_rope_index(input_ids, mm_types, grids, attention_mask=mask, tokens_per_second=2)


def _rope_ours_unchecked(input_ids, mm_types, grids, mask):
    return get_rope_index(input_ids, mm_types, grids, attention_mask=mask, tokens_per_second=2, check=False)


# ------------------------------------------------------------------------------ merge

def _merge_inputs(params, device, requires_grad=False):
    T = params["T"]
    ids = torch.randint(0, 150000, (1, T), device=device)
    n_visual = T * 9 // 10  # documents are ~90% visual tokens
    ids[0, torch.randperm(T, device=device)[:n_visual]] = IMAGE_ID
    embeds = torch.randn(1, T, HIDDEN, device=device, dtype=DTYPE, requires_grad=requires_grad)
    visual = torch.randn(n_visual, HIDDEN, device=device, dtype=DTYPE, requires_grad=requires_grad)
    return embeds, ids, visual


def _with_backward(merge):
    """merge, then the gradients of the embeddings and the visual features for a fixed d out."""

    def step(embeds, ids, visual):
        out = merge(embeds, ids, visual)
        grad = torch.ones_like(out)
        return torch.autograd.grad(out, (embeds, visual), grad)

    return step


def _merge_theirs(embeds, ids, visual):
    """What transformers does: ``inputs_embeds.masked_scatter`` of the placeholder mask."""
    return merge_visual_tokens_ref(embeds, ids, visual, IMAGE_ID)


# ---------------------------------------------------------------------------- packing copy

PIXEL_DIM = 3 * 2 * 14 * 14  # a ViT patch of Qwen2.5-VL: channels x temporal patch x 14 x 14


def _pack_inputs(params, device):
    """Samples of ``docs`` documents of ``pages`` pages each, as a Qwen2.5-VL processor gives them."""
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    patches = PAGE_GRID[0] * PAGE_GRID[1] * PAGE_GRID[2]
    samples = []
    for _ in range(params["docs"]):
        ids, _ = _document(rng, params["pages"])
        samples.append({"input_ids": torch.tensor(ids, device=device),
                        "image_grid_thw": torch.tensor([PAGE_GRID] * params["pages"], device=device),
                        "pixel_values": torch.randn(params["pages"] * patches, PIXEL_DIM, device=device,
                                                    dtype=DTYPE)})
    return (samples,)


def _pack(samples):
    """The packed row's tensors (a tuple: the harness cross-checks tensors, not dataclasses)."""
    row = pack_multimodal(samples)
    return (row.input_ids, row.labels, row.position_ids, row.mm_token_type_ids, row.cu_seqlens, row.image_grid_thw,
            row.pixel_values)


def _pack_copy_inputs(params, device):
    """The packing op's arguments for ``docs`` documents of ``pages`` pages: token fields as
    pack_multimodal hands them over (ids, labels, type ids, the document's M-RoPE rows) and the
    vision fields' parts (grids, bf16 pixels). The documents' lengths are the same in every
    input set (the values differ): torch.compile specialises on them and would otherwise time a
    recompilation per set."""
    rng = random.Random(1000 * params["docs"] + params["pages"])
    patches = PAGE_GRID[0] * PAGE_GRID[1] * PAGE_GRID[2]
    ids, labels, types_, mrope, grids, pixels = [], [], [], [], [], []
    for _ in range(params["docs"]):
        doc_ids, doc_types = _document(rng, params["pages"])
        L = len(doc_ids)
        ids.append(torch.tensor(doc_ids, device=device))
        labels.append(torch.tensor(doc_ids, device=device))
        types_.append(torch.tensor(doc_types, dtype=torch.int32, device=device))
        mrope.append(torch.randint(0, L, (3, L), device=device))
        grids.append(torch.tensor([PAGE_GRID] * params["pages"], device=device))
        pixels.append(torch.randn(params["pages"] * patches, PIXEL_DIM, device=device, dtype=DTYPE))
    return ids, labels, types_, mrope, grids, pixels


def _pack_copy(ids, labels, types_, mrope, grids, pixels):
    device = ids[0].device
    return PACK_TOKENS(device, None, ids, labels, types_, mrope, -100, device, [grids, pixels])


def _pack_copy_bytes(docs: int, pages: int) -> int:
    """Read + written: per token ids, labels (8 + 8), type id (4), 3 M-RoPE rows read / 4
    position rows written (24 / 32); per page a grid row (24) and its pixels."""
    tokens = docs * pages * 1310  # ~1,200 image tokens and ~110 text tokens a page (_document)
    pixels = docs * pages * PAGE_GRID[0] * PAGE_GRID[1] * PAGE_GRID[2] * PIXEL_DIM * DTYPE.itemsize
    return tokens * (20 + 24 + 20 + 32) + 2 * (pixels + docs * pages * 24)


# ---------------------------------------------------------------------------- planner

def _planner_inputs(params, device):
    gen = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
    lengths = np.exp(gen.uniform(np.log(2048), np.log(131072), params["n"])).astype(np.int64)
    return torch.from_numpy(lengths), params["max_tokens"]


PADDED_BATCH = 8  # what a padding collator would batch: samples in order, each row padded to the batch's longest


def _padding_ratios(n: int, max_tokens: int) -> dict[str, float]:
    """Fraction of the tokens a step computes that are padding, for a fixed draw of the planner
    case's length mix: rows packed by each strategy, versus batches of PADDED_BATCH samples in
    order padded to their longest."""
    gen = np.random.default_rng(0)
    lengths = np.exp(gen.uniform(np.log(2048), np.log(max_tokens), n)).astype(np.int64)
    real = int(lengths.sum())
    ratios = {f"packed ({strategy})": 1 - real / (len(plan_packing(lengths, max_tokens, strategy=strategy))
                                                  * max_tokens) for strategy in ("bfd", "greedy")}
    padded = sum(int(lengths[i:i + PADDED_BATCH].max()) * len(lengths[i:i + PADDED_BATCH])
                 for i in range(0, n, PADDED_BATCH))
    ratios[f"padded (batches of {PADDED_BATCH})"] = 1 - real / padded
    return ratios


def _trl_provider():
    def unavailable(device):
        try:
            import trl  # noqa: F401
            import datasets  # noqa: F401
        except ImportError:
            return "trl / datasets not installed"
        return None

    def build():
        from datasets import Dataset
        from trl import pack_dataset

        def run(lengths, max_tokens):
            ds = Dataset.from_dict({"input_ids": [[0] * int(n) for n in lengths.tolist()]})
            return pack_dataset(ds, max_tokens, strategy="bfd")

        return run

    return Provider("trl.pack_dataset", build=build, unavailable=unavailable)


@register_family(FAMILY)
def cases(quick: bool) -> list[Case]:
    sizes = SIZES["quick" if quick else "full"]
    found = []

    def no_transformers(device):
        return None if _transformers_rope() is not None else "transformers (Qwen2.5-VL) not importable"

    # Forced backends, named so: an unforced "docqa_fast" row silently timed the tensor-op
    # fallback when the extension was missing, and the extension's row vanished from the table.
    rope_providers = (*ours_per_backend(_rope_ours, backends=("extension",)),
                      *_renamed(ours_per_backend(_rope_ours_unchecked, backends=("extension",)), "[check=False]"),
                      # the whole-batch tensor ops (the fallback without the extension)
                      Provider("docqa_fast[reference]", fn=_rope_ours, ours=True,
                               env={"DOCQA_FAST_BACKEND": "reference"}),
                      Provider("transformers", fn=_rope_theirs, unavailable=no_transformers))
    for B, pages in sizes["rope"]:
        tokens = B * pages * 1300
        syncs: dict = {}
        found.append(Case(
            family=FAMILY, name=f"rope_index-B{B}-pages{pages}", group=f"rope_index_B{B}",
            description=f"M-RoPE positions, {B} document(s) of ~{pages} pages (grid {PAGE_GRID}), right padding; "
                        "host syncs per provider in params.host_syncs",
            params={"B": B, "pages": pages, "host_syncs": syncs}, sweep="pages", make_inputs=_rope_inputs,
            providers=tuple(counting_host_syncs(p, syncs) for p in rope_providers),
            reference="transformers", bytes_moved=tokens * (8 + 4 + 8 + 3 * 8)))
    def merge_checked(e, i, v):
        return merge_visual_tokens(e, i, v, IMAGE_ID)

    def merge_unchecked(e, i, v):
        return merge_visual_tokens(e, i, v, IMAGE_ID, check=False)

    def merge_cases(group, what, providers, make_inputs, backward):
        """One case per T: forward bytes = embeddings read + written + features read (+ ids);
        the backward adds d out read, d embeddings and d features written."""
        for T in sizes["merge_T"]:
            n_visual = T * 9 // 10
            pass_bytes = (2 * T + n_visual) * HIDDEN * DTYPE.itemsize
            syncs = {}
            found.append(Case(
                family=FAMILY, name=f"{group}-T{T}", group=group,
                description=f"visual-token {what}, (1, T, {HIDDEN}) bf16, 90% visual tokens (eager = masked_scatter); "
                            "host syncs per provider in params.host_syncs",
                params={"T": T, "H": HIDDEN, "host_syncs": syncs}, sweep="T", make_inputs=make_inputs,
                providers=tuple(counting_host_syncs(p, syncs) for p in providers),
                bytes_moved=pass_bytes + T * 8 + (pass_bytes if backward else 0)))

    merge_cases("merge", "merge", (
        *ours_per_backend(merge_checked, backends=("extension",)),
        *_renamed(ours_per_backend(merge_unchecked, backends=("extension",)), "[check=False]"),
        Provider("docqa_fast[reference]", fn=merge_checked, ours=True, env={"DOCQA_FAST_BACKEND": "reference"}),
        Provider("eager", fn=_merge_theirs),
        compiled_provider(_merge_theirs, name="torch.compile")), _merge_inputs, backward=False)
    # Forward + backward: the merge's backward is a gather (d visual) and a masked copy (d embeds).
    merge_cases("merge_fwd_bwd", "merge forward + backward, ours with check=False", (
        *_renamed(ours_per_backend(_with_backward(merge_unchecked), backends=("extension",)), "[check=False]"),
        Provider("docqa_fast[reference]", fn=_with_backward(merge_checked), ours=True,
                 env={"DOCQA_FAST_BACKEND": "reference"}),
        Provider("eager", fn=_with_backward(_merge_theirs)),
        compiled_provider(_with_backward(_merge_theirs), name="torch.compile")),
        lambda p, d: _merge_inputs(p, d, requires_grad=True), backward=True)
    # pack_multimodal: token fields, pixel values and grids in one pack_tokens call (extension)
    # or torch.cat per field (reference). Bytes: every field read and written once.
    pack_providers = (*ours_per_backend(_pack, backends=("extension",)),
                      Provider("torch.cat (reference)", fn=_pack, env={"DOCQA_FAST_BACKEND": "reference"}))
    for docs, pages in sizes["pack"]:
        tokens = docs * pages * 1310
        pixels = docs * pages * PAGE_GRID[0] * PAGE_GRID[1] * PAGE_GRID[2] * PIXEL_DIM * DTYPE.itemsize
        found.append(Case(
            family=FAMILY, name=f"pack-docs{docs}-pages{pages}", group=f"pack_pages{pages}",
            description=f"pack_multimodal of documents of {pages} pages (grid {PAGE_GRID}, bf16 pixels) into one "
                        "row: ids, labels, type ids, 4 position rows, pixel values, grids",
            params={"docs": docs, "pages": pages}, sweep="docs", make_inputs=_pack_inputs,
            providers=pack_providers, reference="torch.cat (reference)",
            bytes_moved=2 * (tokens * (8 + 8 + 4 + 4 * 8) + pixels)))
    # The packing copy alone (what pack_multimodal's one call does, without its per-document
    # get_rope_index and checks): token fields, grids and pixels in one launch, against the
    # same fields by torch.cat (the reference backend: one cat per field) and torch.compile of it.
    cat_env = {"DOCQA_FAST_BACKEND": "reference"}
    copy_providers = (*ours_per_backend(_pack_copy, backends=("extension",)),
                      Provider("torch.cat", fn=_pack_copy, env=cat_env),
                      dataclasses.replace(compiled_provider(_pack_copy, name="torch.compile"), env=cat_env))
    for docs, pages in sizes["pack"]:
        syncs = {}
        found.append(Case(
            family=FAMILY, name=f"pack_copy-docs{docs}-pages{pages}", group=f"pack_copy_pages{pages}",
            description=f"the packing copy of {docs} documents of {pages} pages: ids, labels, type ids, positions, "
                        f"grids and bf16 pixels ({PIXEL_DIM} per patch) into one row; bytes = read + written; "
                        "host syncs per provider in params.host_syncs",
            params={"docs": docs, "pages": pages, "host_syncs": syncs}, sweep="docs", make_inputs=_pack_copy_inputs,
            providers=tuple(counting_host_syncs(p, syncs) for p in copy_providers), reference="torch.cat",
            bytes_moved=_pack_copy_bytes(docs, pages)))
    # The C++ planner, forced: unforced, a missing extension meant timing the Python reference twice.
    planner_providers = (*ours_per_backend(plan_packing, backends=("extension",)),
                         Provider("eager", fn=lambda lengths, m: plan_packing_ref(lengths.tolist(), m)),
                         _trl_provider())
    for n in sizes["planner_n"]:
        ratios = _padding_ratios(n, 131072)
        padding = ", ".join(f"{name} {ratio:.1%}" for name, ratio in ratios.items())
        found.append(Case(
            family=FAMILY, name=f"planner-n{n}", group="planner",
            description="BFD plan of n samples of 2K-128K tokens (log-uniform) into 128K rows; "
                        f"samples/s = n / time; padding share of the computed tokens: {padding}",
            params={"n": n, "max_tokens": 131072, "padding_ratio": ratios}, sweep="n", make_inputs=_planner_inputs,
            providers=planner_providers, bytes_moved=8 * n))
    return found

"""Bad input to attention over a KV cache -- flash_attn_with_kvcache, flash_attn_varlen_func with
block_table, and their ops -- and the cache's integrity: after every call, valid or refused, the
cache (and the buffer a strided cache is a view of) is bitwise unchanged outside the slots the
call appends, and a refused call writes nothing at all."""

from __future__ import annotations

import math

import torch

import docqa_fast as dq

from .harness import Case
from .kinds import cases_for, float_tensor_kinds, int_tensor_kinds, narrowed

DT = torch.float16
B, H, HK, D, PAGE = 2, 4, 2, 8, 16
I32 = torch.int32

# ------------------------------------------------------------------------------ layouts


def _contiguous():
    return dict(q=torch.randn(B, 1, H, D, dtype=DT), k_cache=torch.randn(3, 20, HK, D, dtype=DT),
                v_cache=torch.randn(3, 20, HK, D, dtype=DT), k=torch.randn(B, 2, HK, D, dtype=DT),
                v=torch.randn(B, 2, HK, D, dtype=DT), cache_seqlens=torch.tensor([3, 7], dtype=I32))


def _paged():
    kw = _contiguous()
    kw.update(k_cache=torch.randn(6, PAGE, HK, D, dtype=DT), v_cache=torch.randn(6, PAGE, HK, D, dtype=DT),
              block_table=torch.tensor([[4, 1], [0, 5]], dtype=I32), cache_seqlens=torch.tensor([15, 20], dtype=I32))
    return kw


def _batch_idx():
    return dict(_contiguous(), cache_batch_idx=torch.tensor([2, 0], dtype=I32))


def _leftpad():
    return dict(_contiguous(), cache_leftpad=torch.tensor([1, 0], dtype=I32))


def _strided():
    """Caches that are views into wider buffers (every stride but the last's differs from a
    contiguous cache's): the rest of the buffers must stay untouched too."""
    kw = _contiguous()
    kw["k_cache"] = torch.randn(3, 20, HK, 2 * D, dtype=DT)[..., :D]
    kw["v_cache"] = torch.randn(3, 20, HK, 2 * D, dtype=DT)[..., D:]
    return kw


def _rotary():
    kw = _contiguous()
    angles = torch.rand(32, D // 4)
    return dict(kw, rotary_cos=angles.cos().to(DT), rotary_sin=angles.sin().to(DT), causal=True)


LAYOUTS = {"contiguous": _contiguous, "paged": _paged, "batch_idx": _batch_idx, "leftpad": _leftpad,
           "strided": _strided, "rotary": _rotary}


# ------------------------------------------------------------------------ cache integrity

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int16)


def _appended(kw) -> torch.Tensor:
    """A mask over k_cache of the slots a valid call of these arguments appends to."""
    mask = torch.zeros(kw["k_cache"].shape[:2], dtype=torch.bool)
    k = kw.get("k")
    if not isinstance(k, torch.Tensor) or not isinstance(kw.get("cache_seqlens"), torch.Tensor):
        return mask
    table, rows = kw.get("block_table"), kw.get("cache_batch_idx")
    for b, start in enumerate(kw["cache_seqlens"].tolist()):
        for slot in range(start, start + k.shape[1]):
            if table is not None:
                mask[int(table[b, slot // PAGE]), slot % PAGE] = True
            else:
                mask[int(rows[b]) if rows is not None else b, slot] = True
    return mask


def checked(fn):
    """``fn`` followed by the cache checks: a refused call changed no bit of either cache or the
    buffer it is a view of; a call that returned changed nothing outside the appended slots."""
    def call(**kw):
        caches = {n: kw[n] for n in ("k_cache", "v_cache")
                  if isinstance(kw.get(n), torch.Tensor) and kw[n].dtype.itemsize == 2 and kw[n].device.type != "meta"}
        before = {n: _bits(c) for n, c in caches.items()}
        bases = {n: (c, _bits(c._base)) for n, c in caches.items() if c._base is not None}
        try:
            result = fn(**kw)
        except Exception:
            for n, c in caches.items():
                assert torch.equal(_bits(c), before[n]), f"a refused call wrote to {n}"
            for n, (c, bits) in bases.items():
                assert torch.equal(_bits(c._base), bits), f"a refused call wrote to {n}'s buffer"
            raise
        outside = ~_appended(kw)
        for n, c in caches.items():
            changed = (_bits(c) != before[n]).flatten(2).any(-1) & outside
            assert not changed.any(), f"{n} changed outside the appended slots at {changed.nonzero()[:4].tolist()}"
        for n, (c, bits) in bases.items():
            inside = torch.zeros(c._base.shape, dtype=torch.bool)
            inside.as_strided(c.shape, c.stride(), c.storage_offset() - c._base.storage_offset()).fill_(True)
            assert torch.equal(_bits(c._base)[~inside], bits[~inside]), f"{n}'s buffer changed outside the view"
        return result

    return call


def _integrity_cases(fn, layouts, label, op) -> list[Case]:
    """Valid calls on every layout, appending and not (the cache checked as above; the backends
    that implement ``op`` compute them), then each refused kind on each layout."""
    out = []
    no_append = dict(k=None, v=None, rotary_cos=None, rotary_sin=None)
    for layout, valid in layouts.items():
        kinds = [("valid", None, lambda kw: None, None),
                 ("valid-no-append", None, lambda kw: kw.update(no_append), None),
                 *[(kind, None, edit, error, names[0] if names else (arg,))
                   for kind, arg, edit, error, *names in _refused_kinds(layout)]]
        for case in cases_for(f"{label}@{layout}", checked(fn), valid, kinds, op=op):
            case.kind = case.kind if case.error is not None else "cache-integrity"
            out.append(case)
    return out


def _set(arg, value_fn):
    return lambda kw: kw.update({arg: value_fn(kw)})


def _refused_kinds(layout) -> list[tuple]:
    """(kind, arg, edit of the arguments, error[, names]) refused on every layout (values the
    kernels would read out of bounds with, checked before anything is written)."""
    kinds = [
        ("beyond-capacity", "cache_seqlens", _set("cache_seqlens", lambda kw: kw["cache_seqlens"] + 100), ValueError),
        ("negative", "cache_seqlens", _set("cache_seqlens", lambda kw: kw["cache_seqlens"] - 10), ValueError),
        ("float-for-int", "cache_seqlens", _set("cache_seqlens", lambda kw: kw["cache_seqlens"].float()), TypeError),
        ("int-width", "cache_seqlens", _set("cache_seqlens", lambda kw: kw["cache_seqlens"].long()), TypeError),
        ("dtype", "k", _set("k", lambda kw: kw["k"].float()), TypeError),
        ("shape", "k", _set("k", lambda kw: narrowed(kw["k"], 0)), ValueError),
        ("k-without-v", "v", _set("v", lambda kw: None), ValueError, ("k", "v")),
        ("head-dim-mismatch", "v_cache", _set("v_cache", lambda kw: narrowed(kw["v_cache"], -1)), ValueError),
        ("nan", "softcap", _set("softcap", lambda kw: math.nan), ValueError),
        ("nan", "softmax_scale", _set("softmax_scale", lambda kw: math.nan), ValueError),
        ("float-window", "window_size", _set("window_size", lambda kw: (2.5, 0)), TypeError),
        ("negative", "num_splits", _set("num_splits", lambda kw: -1), ValueError),
        ("size", "alibi_slopes", _set("alibi_slopes", lambda kw: torch.ones(3)), ValueError),
    ]
    if layout == "paged":
        kinds += [
            ("out-of-range", "block_table", _set("block_table", lambda kw: kw["block_table"].masked_fill(
                kw["block_table"] == 5, 60_000)), ValueError),
            ("negative", "block_table", _set("block_table", lambda kw: -kw["block_table"] - 1), ValueError),
            ("int-width", "block_table", _set("block_table", lambda kw: kw["block_table"].long()), TypeError),
            ("rows", "block_table", _set("block_table", lambda kw: kw["block_table"][:1]), ValueError),
            ("with-leftpad", "cache_leftpad", _set("cache_leftpad", lambda kw: torch.zeros(B, dtype=I32)),
             ValueError),
        ]
    if layout == "batch_idx":
        kinds += [
            ("out-of-range", "cache_batch_idx", _set("cache_batch_idx", lambda kw: kw["cache_batch_idx"] + 5000),
             ValueError),
            ("duplicate-rows-appending", "cache_batch_idx",
             _set("cache_batch_idx", lambda kw: torch.tensor([1, 1], dtype=I32)), ValueError),
            ("int-width", "cache_batch_idx", _set("cache_batch_idx", lambda kw: kw["cache_batch_idx"].long()),
             TypeError),
        ]
    if layout == "leftpad":
        kinds += [("beyond-seqlens", "cache_leftpad", _set("cache_leftpad", lambda kw: kw["cache_leftpad"] + 9),
                   ValueError),
                  ("negative", "cache_leftpad", _set("cache_leftpad", lambda kw: kw["cache_leftpad"] - 2),
                   ValueError)]
    if layout == "rotary":
        kinds += [("too-short", "rotary_cos", lambda kw: kw.update(rotary_cos=kw["rotary_cos"][:4],
                                                                  rotary_sin=kw["rotary_sin"][:4]), ValueError),
                  ("without-k", "rotary_cos", lambda kw: kw.update(k=None, v=None), ValueError),
                  ("dtype", "rotary_sin", _set("rotary_sin", lambda kw: kw["rotary_sin"].float()), TypeError)]
    return kinds


# ------------------------------------------------------------------- argument kinds (contiguous)

def _kvcache_kinds() -> list[tuple]:
    return [
        *float_tensor_kinds("q"), *float_tensor_kinds("k_cache"), *float_tensor_kinds("v_cache", strided=True),
        *float_tensor_kinds("k", optional=True), *float_tensor_kinds("v", optional=True),
        *int_tensor_kinds("cache_seqlens", I32, optional=True),
        ("float-for-int", "cache_seqlens", lambda kw: 3.0, TypeError),
        ("bool-for-int", "cache_seqlens", lambda kw: True, TypeError),
        ("heads-not-multiple", "k_cache", lambda kw: torch.randn(3, 20, 3, D, dtype=DT), ValueError,
         ("q", "k_cache")),
        ("too-few-rows", "k_cache", lambda kw: kw["k_cache"][:1], ValueError),
        ("float-for-int", "num_splits", lambda kw: 1.5, TypeError),
        ("bool-for-int", "num_splits", lambda kw: True, TypeError),
        ("inf", "softmax_scale", lambda kw: math.inf, ValueError),
        ("negative", "softcap", lambda kw: -1.0, ValueError),
        ("dtype", "alibi_slopes", lambda kw: torch.ones(H, dtype=DT), TypeError),
    ]


def _paged_varlen():
    return dict(q=torch.randn(5, H, D, dtype=DT), k=torch.randn(6, PAGE, HK, D, dtype=DT),
                v=torch.randn(6, PAGE, HK, D, dtype=DT), cu_seqlens_q=torch.tensor([0, 2, 5], dtype=I32),
                cu_seqlens_k=torch.tensor([0, 9, 30], dtype=I32), max_seqlen_q=3, max_seqlen_k=21,
                block_table=torch.tensor([[4, 1], [0, 5]], dtype=I32))


def _paged_varlen_kinds() -> list[tuple]:
    return [
        *float_tensor_kinds("q"), *float_tensor_kinds("k"),
        *int_tensor_kinds("block_table", I32, optional=True),
        *int_tensor_kinds("cu_seqlens_k", I32),
        ("out-of-range", "block_table", lambda kw: kw["block_table"] + 60_000, ValueError),
        ("beyond-capacity", "cu_seqlens_k",
         lambda kw: kw.update(max_seqlen_k=41) or torch.tensor([0, 9, 50], dtype=I32), ValueError),
        ("not-monotone", "cu_seqlens_k", lambda kw: torch.tensor([0, 9, 3], dtype=I32), ValueError),
        ("too-small", "max_seqlen_k", lambda kw: 5, ValueError),
        ("negative", "max_seqlen_q", lambda kw: -1, ValueError),
        ("page-size", "k", lambda kw: kw.update(v=kw["v"][:, :12]) or kw["k"][:, :12], ValueError, ("k",)),
        ("with-dropout", "dropout_p", lambda kw: 0.1, ValueError),
        ("nan", "softmax_scale", lambda kw: math.nan, ValueError),
    ]


def _op_kvcache():
    kw = _paged()
    return dict(q=kw["q"], k_cache=kw["k_cache"], v_cache=kw["v_cache"], k=kw["k"], v=kw["v"], rotary_cos=None,
                rotary_sin=None, cache_seqlens=kw["cache_seqlens"], cache_batch_idx=None, cache_leftpad=None,
                block_table=kw["block_table"], softmax_scale=0.3, causal=True, window_left=-1, window_right=-1,
                softcap=0.0, rotary_interleaved=False, num_splits=1, alibi_slopes=None)


def _op_kvcache_kinds() -> list[tuple]:
    """What a direct op call gets checked: shapes, dtypes, layouts -- no values (the contract's
    preconditions of the raw op, as in flash-attn)."""
    return [
        ("dtype", "k_cache", lambda kw: kw["k_cache"].float(), TypeError),
        ("head-dim-mismatch", "v_cache", lambda kw: narrowed(kw["v_cache"], -1), ValueError),
        ("rank", "q", lambda kw: kw["q"][0], ValueError),
        ("shape", "k", lambda kw: narrowed(kw["k"], 0), ValueError),
        ("int-width", "cache_seqlens", lambda kw: kw["cache_seqlens"].long(), TypeError),
        ("shape", "cache_seqlens", lambda kw: kw["cache_seqlens"][:1], ValueError),
        ("int-width", "block_table", lambda kw: kw["block_table"].long(), TypeError),
        ("rows", "block_table", lambda kw: kw["block_table"][:1], ValueError),
        ("page-size", "k_cache", lambda kw: kw.update(v_cache=kw["v_cache"][:, :12]) or kw["k_cache"][:, :12],
         ValueError, ("k_cache",)),
        ("shape", "cache_batch_idx", lambda kw: torch.zeros(5, dtype=I32), ValueError),
        ("nan", "softmax_scale", lambda kw: math.nan, ValueError),
        ("nan", "softcap", lambda kw: math.nan, ValueError),
        ("below-minus-one", "window_left", lambda kw: -2, ValueError),
        ("negative", "num_splits", lambda kw: -1, ValueError),
        ("size", "alibi_slopes", lambda kw: torch.ones(3), ValueError),
    ]


def _op_paged():
    kw = _paged_varlen()
    return dict(q=kw["q"], k_cache=kw["k"], v_cache=kw["v"], cu_seqlens_q=kw["cu_seqlens_q"],
                cu_seqlens_k=kw["cu_seqlens_k"], max_seqlen_q=3, block_table=kw["block_table"], softmax_scale=0.3,
                causal=False, window_left=-1, window_right=-1, softcap=0.0, num_splits=1, alibi_slopes=None)


def _op_paged_kinds() -> list[tuple]:
    return [
        ("dtype", "k_cache", lambda kw: kw["k_cache"].float(), TypeError),
        ("rank", "q", lambda kw: kw["q"][None], ValueError),
        ("int-width", "cu_seqlens_q", lambda kw: kw["cu_seqlens_q"].long(), TypeError),
        ("length-mismatch", "cu_seqlens_k", lambda kw: torch.tensor([0, 30], dtype=I32), ValueError),
        ("int-width", "block_table", lambda kw: kw["block_table"].long(), TypeError),
        ("rows", "block_table", lambda kw: kw["block_table"][:1], ValueError),
        ("negative", "max_seqlen_q", lambda kw: -1, ValueError),
        ("nan", "softmax_scale", lambda kw: math.nan, ValueError),
        ("negative", "num_splits", lambda kw: -1, ValueError),
    ]


def cases() -> list[Case]:
    ops = torch.ops.docqa_fast
    kvcache = checked(dq.flash_attn_with_kvcache)
    out = _integrity_cases(dq.flash_attn_with_kvcache, LAYOUTS, "flash_attn_with_kvcache", "flash_attn_with_kvcache")
    out += cases_for("flash_attn_with_kvcache", kvcache, _contiguous, _kvcache_kinds())
    out += cases_for("flash_attn_varlen_func+block_table", dq.flash_attn_varlen_func, _paged_varlen,
                     _paged_varlen_kinds())
    out += cases_for("op:flash_attn_with_kvcache", checked(ops.flash_attn_with_kvcache), _op_kvcache,
                     _op_kvcache_kinds())
    out += cases_for("op:flash_attn_varlen_paged", ops.flash_attn_varlen_paged, _op_paged, _op_paged_kinds())
    return out

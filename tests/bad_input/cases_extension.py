"""The extension's entry points (docqa_fast._C) called directly with bad arguments: each check
raises ValueError / TypeError naming the argument, its message built without iostreams
(csrc/messages.h) -- on the GPU stack a message that streamed an integer killed the process,
which a spawned worker turns into one failed case here."""

from __future__ import annotations

import torch

from docqa_fast._backend import extension

from .harness import Case


def _merge_args():
    out, lse = torch.randn(1, 3, 2, 8), torch.randn(1, 2, 3)
    return dict(out_a=out, lse_a=lse, out_b=out.clone(), lse_b=lse.clone(), out=torch.empty_like(out),
                lse_out=torch.empty_like(lse))


def _merge(**changes):
    def call():
        args = dict(_merge_args(), **changes)
        return extension().merge_attention_states(*args.values())

    return call


def _stacked(**changes):
    def call():
        args = dict(outs=torch.randn(2, 1, 3, 2, 8), lses=torch.randn(2, 1, 2, 3), out=torch.empty(1, 3, 2, 8),
                    lse_out=torch.empty(1, 2, 3))
        args.update(changes)
        return extension().merge_stacked_attention_states(*args.values())

    return call


def _plan(lengths=(1, 2), max_tokens=4, strategy=0, split_long=False):
    # The planner takes host tensors (its wrapper moves the lengths there).
    return lambda: extension().plan_packing(torch.tensor(lengths, device="cpu"), max_tokens, strategy, split_long)


def cases() -> list[Case]:
    if extension() is None:
        return []
    out, lse = torch.randn(1, 3, 2, 8), torch.randn(1, 2, 3)
    merge = [
        ("dtype", _merge(out_a=out.double()), TypeError, "out_a"),
        ("int-for-float", _merge(out_b=out.int()), TypeError, "out_b"),
        ("lse-dtype", _merge(lse_a=lse.half()), TypeError, "lse_a"),
        ("lse-shape", _merge(lse_b=lse[:, :, :2]), ValueError, "lse_b"),
        ("out-shape", _merge(out=torch.empty(1, 3, 2, 4)), ValueError, "out"),
        ("lse-out-shape", _merge(lse_out=torch.empty(1, 2, 4)), ValueError, "lse_out"),
        ("rank", _merge(out_a=out[0], out_b=out[0]), ValueError, "out_a"),
        ("stacked-lses-shape", _stacked(lses=torch.randn(2, 1, 1, 3)), ValueError, "lses"),
        ("stacked-dtype", _stacked(outs=torch.randn(2, 1, 3, 2, 8, dtype=torch.float64)), TypeError, "outs"),
        ("stacked-out-shape", _stacked(out=torch.empty(1, 3, 2, 7)), ValueError, "out"),
    ]
    plan = [
        ("strategy", _plan(strategy=9), ValueError, "strategy"),
        ("max-tokens", _plan(max_tokens=0), ValueError, "max_tokens"),
        ("negative-length", _plan(lengths=(1, -2)), ValueError, "lengths"),
        ("too-long", _plan(lengths=(1, 9)), ValueError, "lengths"),
        ("float-lengths", lambda: extension().plan_packing(torch.tensor([1.0, 2.0], device="cpu"), 4, 0, False),
         TypeError, "lengths"),
    ]
    only = ("extension",)  # the backend setting does not matter to a direct call: run each once
    return ([Case(f"_C.merge_attention_states/{kind}", call, error, (name,), kind=kind, backends=only)
             for kind, call, error, name in merge]
            + [Case(f"_C.plan_packing/{kind}", call, error, (name,), kind=kind, backends=only)
               for kind, call, error, name in plan])

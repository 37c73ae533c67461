"""Bad input to the reward family: ensemble_rewards, RewardEnsembleHead (built and called),
aggregate and the ranking losses, and the reward_heads op."""

from __future__ import annotations

import math

import torch

import docqa_fast as dq

from .harness import Case
from .kinds import cases_for, float_tensor_kinds, int_kinds, int_tensor_kinds, narrowed

B, T, HID, K = 3, 5, 8, 4


def _padded():
    return dict(hidden_states=torch.randn(B, T, HID), weight=torch.randn(K, HID),
                attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))


def _packed():
    return dict(hidden_states=torch.randn(9, HID), weight=torch.randn(K, HID),
                cu_seqlens=torch.tensor([0, 2, 6, 9], dtype=torch.int32))


def _ensemble_kinds() -> list[tuple]:
    return [
        *float_tensor_kinds("hidden_states"), *float_tensor_kinds("weight"),
        ("shape", "weight", lambda kw: narrowed(kw["weight"], 1), ValueError),
        ("dtype", "bias", lambda kw: torch.zeros(K, dtype=torch.float64), TypeError),
        ("shape", "bias", lambda kw: torch.zeros(K + 1), ValueError),
        ("shape", "attention_mask", lambda kw: kw["attention_mask"][:, :4], ValueError),
        ("all-padding-row", "attention_mask", lambda kw: kw["attention_mask"] * torch.tensor([[1], [0], [1]]),
         ValueError),
        ("out-of-range", "last_index", lambda kw: torch.tensor([0, 500_000, 1]), ValueError),
        ("negative", "last_index", lambda kw: torch.tensor([0, -1, 1]), ValueError),
        ("float-for-int", "last_index", lambda kw: torch.tensor([0.0, 1.0, 2.0]), TypeError),
        ("shape", "last_index", lambda kw: torch.tensor([0, 1]), ValueError),
        ("with-cu_seqlens", "cu_seqlens", lambda kw: torch.tensor([0, 5, 10, 15], dtype=torch.int32), ValueError,
         ("cu_seqlens", "attention_mask", "hidden_states")),
    ]


def _packed_kinds() -> list[tuple]:
    return [
        *[k for k in int_tensor_kinds("cu_seqlens", torch.int32, optional=True) if k[0] != "int-width"],
        ("not-monotone", "cu_seqlens", lambda kw: torch.tensor([0, 6, 2, 9], dtype=torch.int32), ValueError),
        ("wrong-end", "cu_seqlens", lambda kw: torch.tensor([0, 2, 6, 12], dtype=torch.int32), ValueError),
        ("empty-sequence", "cu_seqlens", lambda kw: torch.tensor([0, 2, 2, 9], dtype=torch.int32), ValueError),
    ]


def _head_kinds() -> list[tuple]:
    return [
        ("zero", "num_heads", lambda kw: 0, ValueError),
        ("zero", "hidden_size", lambda kw: 0, ValueError),
        *int_kinds("num_heads"), *int_kinds("hidden_size"),
        ("unknown", "aggregation", lambda kw: "median", ValueError),
        ("nan", "uwo_lambda", lambda kw: math.nan, ValueError),
        ("inf", "uwo_lambda", lambda kw: math.inf, ValueError),
        ("negative", "uwo_lambda", lambda kw: -0.5, ValueError),
        ("str-for-float", "uwo_lambda", lambda kw: "0.5", TypeError),
    ]


def _aggregate():
    return dict(rewards=torch.randn(B, K))


def _aggregate_kinds() -> list[tuple]:
    return [
        ("int-for-float", "rewards", lambda kw: kw["rewards"].int(), TypeError),
        ("bool-tensor", "rewards", lambda kw: kw["rewards"] > 0, TypeError),
        ("list-for-tensor", "rewards", lambda kw: kw["rewards"].tolist(), TypeError),
        ("none", "rewards", lambda kw: None, TypeError),
        ("zero-dim", "rewards", lambda kw: kw["rewards"][0, 0], ValueError),
        ("no-heads", "rewards", lambda kw: kw["rewards"][:, :0], ValueError),
        ("unknown", "method", lambda kw: "median", ValueError),
        ("nan", "uwo_lambda", lambda kw: kw.update(method="uwo") or math.nan, ValueError),
        ("inf", "uwo_lambda", lambda kw: kw.update(method="uwo") or math.inf, ValueError),
        ("str-for-float", "uwo_lambda", lambda kw: "1", TypeError),
    ]


def _pairwise():
    return dict(chosen=torch.randn(B, K), rejected=torch.randn(B, K))


def _pairwise_kinds() -> list[tuple]:
    return [
        # Any floating dtype is taken (fp64 too): no "dtype" kind.
        *[k for k in float_tensor_kinds("chosen", rank=False) + float_tensor_kinds("rejected", rank=False)
          if k[0] != "dtype"],
        ("shape", "rejected", lambda kw: kw["rejected"][:2], ValueError),
        ("unknown", "reduction", lambda kw: "avg", ValueError),
        ("empty-batch", "chosen", lambda kw: kw.update(rejected=kw["rejected"][:0]) or kw["chosen"][:0], ValueError),
        ("none-for-str", "reduction", lambda kw: None, ValueError),
        ("rank-mismatch", "rejected", lambda kw: kw["rejected"][None], ValueError),
    ]


def _ranking():
    return dict(scores=torch.randn(B, K), ranks=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 0, 2]]))


def _ranking_kinds(arg) -> list[tuple]:
    return [
        *[k for k in float_tensor_kinds("scores") if k[0] != "dtype"],
        ("float-for-int", arg, lambda kw: kw[arg].float(), TypeError),
        ("bool-tensor", arg, lambda kw: kw[arg] > 0, TypeError),
        ("none", arg, lambda kw: None, TypeError),
        ("shape", arg, lambda kw: kw[arg][:, :3], ValueError),
        ("device-mix", arg, lambda kw: kw[arg].to("meta"), ValueError),
        ("list-for-tensor", arg, lambda kw: kw[arg].tolist(), TypeError),
    ]


def _plackett():
    return dict(scores=torch.randn(B, K), order=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]]))


def _op_cases() -> list[Case]:
    op = torch.ops.docqa_fast.reward_heads
    args = [a.name for a in op.default._schema.arguments]
    if "token_index" not in args or "seq_index" in args:
        return []  # another layout of the op: its checks are tested in tests/reward

    def valid():
        kw = dict(hidden=torch.randn(B, T, HID), token_index=torch.tensor([2, 4, 4]), weight=torch.randn(K, HID),
                  bias=None)
        return {name: value for name, value in kw.items() if name in args}

    return cases_for("op:reward_heads", op, valid, [
        ("rank", "hidden", lambda kw: kw["hidden"][0, 0], ValueError),
        ("strided-last-dim", "hidden", lambda kw: torch.randn(B, T, HID, 2)[..., 0], ValueError),
        ("int-width", "token_index", lambda kw: kw["token_index"].int(), TypeError),
        ("rank", "token_index", lambda kw: kw["token_index"][None], TypeError),
        ("shape", "token_index", lambda kw: kw["token_index"][:2], ValueError),
        ("shape", "weight", lambda kw: narrowed(kw["weight"], 1), ValueError),
        ("dtype", "weight", lambda kw: kw["weight"].double(), (TypeError, ValueError))])


def cases() -> list[Case]:
    op = "reward_heads"
    out = cases_for("ensemble_rewards", dq.ensemble_rewards, _padded, _ensemble_kinds(), op=op)
    out += cases_for("ensemble_rewards+cu_seqlens", dq.ensemble_rewards, _packed, _packed_kinds(), op=op)
    out += cases_for("RewardEnsembleHead()", dq.RewardEnsembleHead, lambda: dict(hidden_size=HID, num_heads=K),
                     _head_kinds())
    head = dq.RewardEnsembleHead(HID, K)
    out += cases_for("RewardEnsembleHead.forward", head, lambda: {k: v for k, v in _padded().items() if k != "weight"},
                     [k for k in _ensemble_kinds() if k[1] not in ("weight", "bias")], op=op)
    out += cases_for("aggregate", dq.aggregate, _aggregate, _aggregate_kinds())
    out += cases_for("pairwise_loss", dq.pairwise_loss, _pairwise, _pairwise_kinds())
    out += cases_for("all_pairs_ranking_loss", dq.all_pairs_ranking_loss, _ranking, [
        *_ranking_kinds("ranks"),
        ("one-response", "scores", lambda kw: kw.update(ranks=kw["ranks"][:, :1]) or kw["scores"][:, :1], ValueError)])
    out += cases_for("plackett_luce_loss", dq.plackett_luce_loss, _plackett, [
        *_ranking_kinds("order"), ("not-a-permutation", "order", lambda kw: torch.zeros(B, K, dtype=torch.long),
                                   ValueError)])
    return out + _op_cases()

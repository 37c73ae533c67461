"""``RewardEnsembleHead``: K reward heads over a shared backbone, as one fused module."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_int
from .losses import check_aggregation, combine, ensemble_statistics
from .ops import reward_heads

POSITIONS = ("last", "all")


@dataclass
class RewardOutput:
    """Per-head rewards and the ensemble statistics, all fp32.

    ``rewards`` (B, K) (or (B, T, K) with ``positions="all"``); ``mean``, ``var``
    (unbiased; 0 for one head), ``min`` and ``score`` (the head's chosen aggregation) have
    the rewards' shape without the K dimension.
    """

    rewards: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    min: torch.Tensor
    score: torch.Tensor


class RewardEnsembleHead(nn.Module):
    """K linear reward heads ``weight`` (K, hidden) [+ ``bias`` (K,)] scoring each sequence's last token.

    Equivalent to K ``nn.Linear(hidden, 1)`` score heads applied to every token and then
    gathered at the last non-padding one (what TRL / OpenRLHF / transformers do), computed
    by one fused kernel that reads only the B scoring rows. ``aggregation`` picks
    ``RewardOutput.score``: "mean", "min" (worst case) or "uwo" (mean - uwo_lambda * var).
    ``sparse_grad=True``: the gradient of the hidden states is a sparse COO tensor of the B
    scoring rows instead of a dense one (see :func:`ensemble_rewards`).
    """

    def __init__(self, hidden_size: int, num_heads: int, bias: bool = False, aggregation: str = "mean",
                 uwo_lambda: float = 0.5, dtype=None, device=None, sparse_grad: bool = False):
        super().__init__()
        check_int("hidden_size", hidden_size, minimum=1)
        check_int("num_heads", num_heads, minimum=1)  # 0 heads were built, failing later on the weight
        check_aggregation(aggregation, uwo_lambda)
        if not isinstance(sparse_grad, bool):
            raise TypeError(f"expected sparse_grad to be a bool, got {type(sparse_grad).__name__}")
        self.sparse_grad = sparse_grad
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.aggregation, self.uwo_lambda = aggregation, uwo_lambda
        self.weight = nn.Parameter(torch.empty(num_heads, hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(num_heads, dtype=dtype, device=device)) if bias else None
        self.reset_parameters()
        # Checkpoints of K separate heads ("heads.{i}.weight", as ReferenceRewardEnsemble or a
        # list of nn.Linear(H, 1) saves them) load directly.
        self._register_load_state_dict_pre_hook(self._merge_separate_heads)

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, row by row: each head starts as a fresh nn.Linear(H, 1).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.hidden_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, bias={self.bias is not None}, "
                f"aggregation={self.aggregation!r}, uwo_lambda={self.uwo_lambda}"
                + (", sparse_grad=True" if self.sparse_grad else ""))

    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, last_index=None,
                positions: str = "last", check: bool = True) -> RewardOutput:
        """Score padded (B, T, H) or packed (total, H) hidden states.

        ``positions="last"``: one reward per sequence and head, from the last non-padding
        token (``attention_mask``), the end of each packed sequence (``cu_seqlens``), or
        ``last_index``. ``positions="all"``: dense per-token rewards (..., T, K) for
        token-level reward shaping (a plain matrix product; nothing to gather).
        ``check=False``: no host sync validating the scoring positions (see
        :func:`ensemble_rewards`).
        """
        if positions == "all":
            rewards = F.linear(hidden_states, self.weight.to(hidden_states.dtype),
                               None if self.bias is None else self.bias.to(hidden_states.dtype)).float()
            mean, var, minimum = ensemble_statistics(rewards)
        elif positions == "last":
            rewards, mean, var, minimum = reward_heads(hidden_states, self.weight, self.bias,
                                                       attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                                                       last_index=last_index, check=check,
                                                       sparse_grad=self.sparse_grad)
        else:
            raise ValueError(f"expected positions to be one of {POSITIONS}, got {positions!r}")
        score = combine(self.aggregation, self.uwo_lambda, mean, var, minimum)
        return RewardOutput(rewards=rewards, mean=mean, var=var, min=minimum, score=score)

    # ------------------------------------------------------------- interop with nn.Linear

    @classmethod
    def from_linear_heads(cls, heads, aggregation: str = "mean", uwo_lambda: float = 0.5) -> "RewardEnsembleHead":
        """From K ``nn.Linear(H, 1)`` heads (all with or all without bias); copies the parameters."""
        heads = list(heads)
        if not heads or any(not isinstance(h, nn.Linear) or h.out_features != 1 for h in heads):
            raise ValueError("expected a non-empty list of nn.Linear(hidden, 1) heads")
        with_bias = {h.bias is not None for h in heads}
        if len(with_bias) != 1:
            raise ValueError("expected heads that all have a bias or all have none")
        weight = torch.cat([h.weight.detach() for h in heads])
        bias = torch.cat([h.bias.detach() for h in heads]) if with_bias.pop() else None
        return cls._from_parameters(weight, bias, aggregation, uwo_lambda)

    @classmethod
    def from_linear(cls, linear: nn.Linear, aggregation: str = "mean", uwo_lambda: float = 0.5
                    ) -> "RewardEnsembleHead":
        """From one ``nn.Linear(H, K)`` -- e.g. a transformers ``score`` head (K = 1)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected linear to be an nn.Linear, got {type(linear).__name__}")
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls._from_parameters(linear.weight.detach(), bias, aggregation, uwo_lambda)

    @classmethod
    def _from_parameters(cls, weight, bias, aggregation, uwo_lambda):
        head = cls(weight.shape[1], weight.shape[0], bias=bias is not None, aggregation=aggregation,
                   uwo_lambda=uwo_lambda, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        return head

    def to_linear_heads(self) -> nn.ModuleList:
        """K ``nn.Linear(H, 1)`` heads holding copies of this module's parameters."""
        heads = nn.ModuleList()
        for k in range(self.num_heads):
            head = nn.Linear(self.hidden_size, 1, bias=self.bias is not None, dtype=self.weight.dtype,
                             device=self.weight.device)
            with torch.no_grad():
                head.weight.copy_(self.weight[k : k + 1])
                if self.bias is not None:
                    head.bias.copy_(self.bias[k : k + 1])
            heads.append(head)
        return heads

    def to_linear(self) -> nn.Linear:
        """One ``nn.Linear(H, K)`` with a copy of the parameters (K = 1: a transformers score head)."""
        linear = nn.Linear(self.hidden_size, self.num_heads, bias=self.bias is not None, dtype=self.weight.dtype,
                           device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def separate_heads_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's parameters as K separate heads: {"heads.{k}.weight": (1, H), ...}."""
        state = {}
        for k in range(self.num_heads):
            state[f"heads.{k}.weight"] = self.weight.detach()[k : k + 1].clone()
            if self.bias is not None:
                state[f"heads.{k}.bias"] = self.bias.detach()[k : k + 1].clone()
        return state

    def _merge_separate_heads(self, state_dict, prefix, *args):
        weights = [f"{prefix}heads.{k}.weight" for k in range(self.num_heads)]
        if f"{prefix}weight" in state_dict or weights[0] not in state_dict:
            return
        state_dict[f"{prefix}weight"] = torch.cat([state_dict.pop(key) for key in weights])
        biases = [f"{prefix}heads.{k}.bias" for k in range(self.num_heads)]
        if biases[0] in state_dict:
            state_dict[f"{prefix}bias"] = torch.cat([state_dict.pop(key) for key in biases])

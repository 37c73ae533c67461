"""Backend agreement as a property: for each op, random valid inputs with edge values (empty
sequences, length-1 sequences, rows that see no key, -inf / +inf / NaN LSEs, ignore_index
everywhere, no tokens at all) give the same result on every backend present, by the tolerance
rule of docqa_fast.testing -- infinities in the same places, and no NaN anywhere (a NaN LSE
merges to a NaN LSE and a 0 output everywhere, the contract). Integer results (positions, plans)
must be equal.

Each test takes ``backend`` (conftest: every backend here, forced) and compares it with the
reference backend run on the same inputs (the "plain" computation) and on the inputs in fp32
(the "exact" one): the kernels run fp16, so fp32 is exact to well below their rounding.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import docqa_fast as dq
from docqa_fast.bert_padding import pad_input, unpad_input
from docqa_fast.rotary import apply_rotary_emb
from docqa_fast.testing import assert_close_by_rule

DT = torch.float16
TRIALS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _tensors_on_the_test_device(device):
    """CUDA tensors on a GPU machine (Triton runs there), CPU tensors under the interpreter."""
    with device:
        yield


def _on(backend: str, monkeypatch, fn, *args, **kwargs):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", backend)
    try:
        return fn(*args, **kwargs)
    finally:
        monkeypatch.delenv("DOCQA_FAST_BACKEND")


def _implemented_by(*ops: str):
    """Runs a test on the fast backends every one of ``ops`` has (conftest's ``backends`` marker):
    no case for a backend an op lacks (torch's cuDNN route is not a backend of ours), nor for the
    reference, which each case runs as the oracle."""
    return pytest.mark.backends(*(backend for backend in dq.BACKENDS if backend != "reference"
                                  and all(backend in dq.dispatch_table()[op] for op in ops)))


def _as(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_as(v, dtype) for v in value)
    return value


def _agree(backend, monkeypatch, fn, kwargs, names, *, factor=2.0):
    """``fn(**kwargs)`` on ``backend`` against the reference (plain) and the reference in fp32 (exact)."""
    clone = lambda: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}  # noqa: E731
    actual = _on(backend, monkeypatch, fn, **clone())
    plain = _on("reference", monkeypatch, fn, **clone())
    exact = _on("reference", monkeypatch, fn, **{k: _as(v, torch.float32) for k, v in clone().items()})
    results = zip(*(r if isinstance(r, tuple) else (r,) for r in (actual, exact, plain)))
    for name, (a, e, p) in zip(names, results):
        if torch.isnan(e).any():  # NaN where the contract says NaN: the same places on every backend
            assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: NaN in other places than the reference"
            a, e, p = (t.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf) for t in (a, e, p))
        assert_close_by_rule(a, e, p, factor=factor, name=name)


def _lengths(rng: random.Random, n: int, edge: list[int]) -> list[int]:
    """Random lengths with the edge ones (0, 1) mixed in."""
    return [*edge, *(rng.randint(0, 9) for _ in range(n))]


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# ------------------------------------------------------------------------------ attention

@_implemented_by("attention_forward")
@pytest.mark.parametrize("trial", TRIALS)
def test_varlen_attention_agrees(backend, trial, monkeypatch):
    """Empty query and key sequences, length-1 ones, queries that see no key (causal with more
    queries than keys: out 0, lse -inf), odd head dim, GQA."""
    rng = random.Random(trial)
    lq, lk = _lengths(rng, 3, [0, 1, 6, 2]), _lengths(rng, 3, [3, 0, 2, 1])
    q = torch.randn(sum(lq), 4, 59, dtype=DT)
    k, v = (torch.randn(sum(lk), 2, 59, dtype=DT) for _ in range(2))
    kwargs = dict(q=q, k=k, v=v, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=max(lq),
                  max_seqlen_k=max(lk), causal=trial != 1, window_size=(-1, -1) if trial < 2 else (3, 0),
                  return_attn_probs=True)
    _agree(backend, monkeypatch, lambda **kw: dq.flash_attn_varlen_func(**kw)[:2], kwargs, ("out", "lse"))


@_implemented_by("flash_attn_with_kvcache")
@pytest.mark.parametrize("trial", TRIALS)
def test_kvcache_attention_agrees(backend, trial, monkeypatch):
    """Empty cache rows with nothing appended (the query sees no key), length-1 rows, an append."""
    rng = random.Random(trial)
    seqlens = torch.tensor([0, 1, rng.randint(2, 16), rng.randint(0, 16)], dtype=torch.int32)
    appending = trial != 0
    kwargs = dict(q=torch.randn(4, 1, 4, 40, dtype=DT), k_cache=torch.randn(4, 32, 2, 40, dtype=DT),
                  v_cache=torch.randn(4, 32, 2, 40, dtype=DT), cache_seqlens=seqlens, causal=True,
                  return_softmax_lse=True)
    if appending:
        kwargs.update(k=torch.randn(4, 1, 2, 40, dtype=DT), v=torch.randn(4, 1, 2, 40, dtype=DT))
    _agree(backend, monkeypatch, dq.flash_attn_with_kvcache, kwargs, ("out", "lse"))


@_implemented_by("merge_stacked_attention_states")
@pytest.mark.parametrize("trial", TRIALS)
def test_merge_agrees(backend, trial, monkeypatch):
    """-inf (a part that saw no key), +inf (flash-attn's mark of the same), NaN LSEs, rows where
    every part is empty."""
    torch.manual_seed(trial)
    outs, lses = torch.randn(3, 2, 5, 4, 40, dtype=DT), torch.randn(3, 2, 4, 5) * 4
    special = torch.rand(lses.shape)
    lses[special < 0.2] = -math.inf
    lses[(special > 0.2) & (special < 0.25)] = math.inf
    lses[:, :, :, 0] = -math.inf  # every part empty
    if trial == 2:
        lses[0, 0, 0, 1] = math.nan
    _agree(backend, monkeypatch, dq.merge_stacked_attention_states, dict(outs=outs, lses=lses), ("out", "lse"))
    _agree(backend, monkeypatch, dq.merge_attention_states,
           dict(out_a=outs[0], lse_a=lses[0], out_b=outs[1], lse_b=lses[1]), ("out", "lse"))


# --------------------------------------------------------------------------------- losses

@_implemented_by("linear_logit_stats")
@pytest.mark.parametrize("trial", TRIALS)
def test_cross_entropy_agrees(backend, trial, monkeypatch):
    """ignore_index on every token, on some, no tokens at all; label smoothing and z-loss."""
    torch.manual_seed(trial)
    n = (0, 7, 13)[trial]
    labels = torch.randint(0, 50, (n,))
    labels[torch.rand(n) < (1.0 if trial == 1 else 0.3)] = -100
    if trial == 2:  # a label past the vocabulary, unchecked (validate=False): it matches no row, on every backend
        labels[0] = 57
    kwargs = dict(hidden=torch.randn(n, 16, dtype=DT), weight=torch.randn(50, 16, dtype=DT), labels=labels,
                  label_smoothing=0.1 * trial, z_loss=1e-3 * trial)
    for reduction in ("none", "mean", "sum"):
        _agree(backend, monkeypatch, dq.linear_cross_entropy, dict(kwargs, reduction=reduction), ("loss",))


@_implemented_by("linear_logit_stats")
@pytest.mark.parametrize("trial", TRIALS)
def test_sequence_logprobs_agree(backend, trial, monkeypatch):
    """Packed sequences with empty and length-1 members, one fully ignored."""
    rng = random.Random(trial)
    lengths = _lengths(rng, 2, [0, 1, 4])
    n = sum(lengths)
    labels = torch.randint(0, 30, (n,))
    labels[1:5] = -100  # the length-4 sequence: every label ignored
    kwargs = dict(hidden=torch.randn(n, 16, dtype=DT), weight=torch.randn(30, 16, dtype=DT), labels=labels,
                  cu_seqlens=_cu(lengths), average=trial == 1)
    _agree(backend, monkeypatch, dq.sequence_logprobs, kwargs, ("logps",))


# ------------------------------------------------------------------------ rotary, reward

@_implemented_by("rotary")
@pytest.mark.parametrize("trial", TRIALS)
def test_rotary_agrees(backend, trial, monkeypatch):
    """Packed sequences with empty and length-1 members, partial rotary dim, both layouts."""
    rng = random.Random(trial)
    lengths = _lengths(rng, 2, [0, 1, 3])
    angles = torch.rand(16, 12) * 10
    kwargs = dict(x=torch.randn(sum(lengths), 3, 40, dtype=DT), cos=angles.cos().to(DT), sin=angles.sin().to(DT),
                  cu_seqlens=_cu(lengths), max_seqlen=max(lengths), interleaved=trial == 1, seqlen_offsets=trial)
    _agree(backend, monkeypatch, apply_rotary_emb, kwargs, ("x",))


@_implemented_by("reward_heads")
@pytest.mark.parametrize("trial", TRIALS)
def test_ensemble_rewards_agree(backend, trial, monkeypatch):
    """Length-1 sequences, left and right padding."""
    torch.manual_seed(trial)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 1:] = 0  # length 1, right padding
    mask[1, :5] = 0  # length 1, left padding
    mask[2, 3:] = 0
    kwargs = dict(hidden_states=torch.randn(4, 6, 24, dtype=DT), weight=torch.randn(3, 24, dtype=DT),
                  attention_mask=mask)
    _agree(backend, monkeypatch, dq.ensemble_rewards, kwargs, ("rewards",))


# --------------------------------------------------------------------- integer results

def test_padding_round_trip_agrees(backend, monkeypatch):
    """bert_padding has one implementation; its round trip is exact on empty and full rows."""
    mask = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0]])
    x = torch.randn(3, 3, 5)
    rows, indices, cu, max_len, _ = _on(backend, monkeypatch, unpad_input, x, mask)
    assert cu.tolist() == [0, 0, 3, 4] and max_len == 3
    assert torch.equal(pad_input(rows, indices, 3, 3), x * mask[..., None])


@_implemented_by("plan_packing")
@pytest.mark.parametrize("trial", TRIALS)
def test_plan_packing_agrees(backend, trial, monkeypatch):
    rng = random.Random(trial)
    lengths = [0, 1, *(rng.randint(0, 40) for _ in range(30))]
    for strategy in ("bfd", "ffd", "greedy"):
        for split in (False, True):
            args = dict(lengths=lengths, max_tokens=40 if not split else 17, strategy=strategy, split_long=split)
            assert _on(backend, monkeypatch, dq.plan_packing, **args) == \
                _on("reference", monkeypatch, dq.plan_packing, **args), (strategy, split)


@_implemented_by("get_rope_index", "merge_visual_tokens")
@pytest.mark.parametrize("trial", TRIALS)
def test_rope_index_and_visual_merge_agree(backend, trial, monkeypatch):
    """Positions of padded rows (an all-padding row, a text-only row, images) and the visual
    merge, bitwise equal to the reference's."""
    image, start, end = 151655, 151652, 151653
    rng = random.Random(trial)
    rows, grids = [], []
    for _ in range(3):
        ids = [rng.randrange(100, 1000) for _ in range(rng.randint(0, 3))]
        for _ in range(rng.randint(0, 2)):
            h, w = 2 * rng.randint(1, 2), 2 * rng.randint(1, 2)
            ids += [start] + [image] * (h * w // 4) + [end]
            grids.append((1, h, w))
        rows.append(ids + [rng.randrange(100, 1000)])
    width = max(map(len, rows)) + 1
    input_ids = torch.full((4, width), 151643)
    mask = torch.zeros(4, width, dtype=torch.long)  # row 3: all padding
    for b, ids in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(ids)] = 1
    types = (input_ids == image).to(torch.int32)
    kwargs = dict(input_ids=input_ids, mm_token_type_ids=types, attention_mask=mask,
                  image_grid_thw=torch.tensor(grids) if grids else None)
    got = _on(backend, monkeypatch, dq.get_rope_index, **kwargs)
    expected = _on("reference", monkeypatch, dq.get_rope_index, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    n_visual = int((input_ids == image).sum())
    merge = dict(inputs_embeds=torch.randn(4, width, 8), input_ids=input_ids, visual_embeds=torch.randn(n_visual, 8),
                 token_id=image)
    assert torch.equal(_on(backend, monkeypatch, dq.merge_visual_tokens, **merge),
                       _on("reference", monkeypatch, dq.merge_visual_tokens, **merge))

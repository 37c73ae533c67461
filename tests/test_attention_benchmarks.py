"""The training-attention benchmark cases (benchmarks/attention.py) without timing them: which
cases and providers exist, the FLOP count behind their TFLOP/s, what a CPU --quick run skips and
why, the memory of the largest case, the dense twins of the varlen cases, and the overview plot.
"""

import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a package of the repository, not of the installed distribution.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import attention, harness, report  # noqa: E402

CPU = torch.device("cpu")
META = torch.device("meta")
H200_MEMORY = 141 * 10**9
OURS = ("docqa_fast (auto)", "docqa_fast[triton]")


def _cases(quick):
    return list(attention.cases(quick))


def _by_group(cases):
    groups = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
    return groups


def _providers(case):
    return [p.name for p in case.providers]


# --------------------------------------------------------------------------- the case lists

def test_every_kind_and_mode_is_swept_over_the_sequence_lengths_of_the_issue():
    groups = _by_group(_cases(quick=False))
    for mode in attention.MODES:
        for tag in ("causal", "full"):
            members = groups[f"llm28x4-{tag}-{mode}"]
            assert [c.params["S"] for c in members] == [1024, 4096, 16384, 32768, 131072]
            for case in members:  # B*S = 16K tokens: 16 sequences of 1K, one sequence from 16K on
                assert case.params["B"] == max(1, 16384 // case.params["S"])
                assert (case.params["H"], case.params["Hk"], case.params["D"]) == (28, 4, 128)
        packed = groups[f"packed-{mode}"]
        assert [c.params["S"] for c in packed] == [2048, 4096, 8192, 16384, 32768]
        for case in packed:
            docs = case.params["docs"]
            assert 4 <= docs <= 32 and case.params["lengths"] == [case.params["S"]] * docs
        vit = groups[f"vit-{mode}"]
        assert 4800 in [c.params["S"] for c in vit]
        assert all((c.params["H"], c.params["D"]) == (16, 80) and c.params["images"] == 8 for c in vit)
    ids = [case.id for case in _cases(quick=False)]
    assert len(ids) == len(set(ids))
    assert all(case.sweep == "S" and case.metric == "TFLOP/s" for case in _cases(quick=False))


def test_each_case_has_our_two_rows_and_the_peers_of_its_layout():
    for case in _cases(quick=False):
        names = _providers(case)
        assert names[:2] == list(OURS) and "flex_attention" in names and "flash-attn" in names
        if "lengths" in case.params:  # varlen: FlexAttention is the reference, plus the dense twins
            assert case.reference == "flex_attention"
            assert {"docqa_fast[triton] dense", "sdpa[CUDNN_ATTENTION] dense"} <= set(names)
        else:
            assert case.reference == "sdpa"
            assert {f"sdpa[{b}]" for b in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")} <= set(names)
        assert case.reference in names
        assert len(names) == len(set(names))


def test_the_quick_sizes_are_small():
    for case in _cases(quick=True):
        tokens = sum(case.params["lengths"]) if "lengths" in case.params else case.params["B"] * case.params["S"]
        assert tokens <= 512


# ------------------------------------------------------------------------------------ FLOPs

def test_flops_follow_flash_attn_s_formula():
    flops = attention.attention_flops
    assert flops([1000], 3, 64, False, "fwd") == 4 * 1000 * 1000 * 3 * 64
    assert flops([1000], 3, 64, True, "fwd") == 2 * 1000 * 1000 * 3 * 64  # causal halves
    assert flops([1000], 3, 64, True, "bwd") == 2.5 * flops([1000], 3, 64, True, "fwd")
    assert flops([1000], 3, 64, False, "fwd_bwd") == 3.5 * flops([1000], 3, 64, False, "fwd")
    # Varlen: each document attends within itself, so the work is the sum over documents,
    # a quarter of one sequence of both lengths together.
    assert flops([300, 700], 2, 80, False, "fwd") == flops([300], 2, 80, False, "fwd") + flops([700], 2, 80, False,
                                                                                                "fwd")
    assert flops([500, 500], 2, 80, True, "fwd") * 2 == flops([1000], 2, 80, True, "fwd")


def test_a_case_counts_every_query_head_and_every_sequence():
    cases = {case.name: case for case in _cases(quick=False)}
    # GQA 28/4 does the work of 28 heads: 4 * 16384^2 * 28 * 128, halved for causal.
    assert cases["llm28x4-causal-fwd-S16384"].flops == 1_924_145_348_608
    assert cases["llm28x4-full-bwd-S1024"].flops == 2.5 * 16 * 4 * 1024 ** 2 * 28 * 128
    assert cases["packed-fwd_bwd-8x8192"].flops == 3.5 * 8 * 4 * 8192 ** 2 * 28 * 128 / 2
    assert cases["vit-fwd-8x4800"].flops == 8 * 4 * 4800 ** 2 * 16 * 80
    # The packed case and its dense twin do the same work as dense sequences of that length.
    assert cases["packed-fwd-4x32768"].flops == 4 * cases["llm28x4-causal-fwd-S32768"].flops


# ------------------------------------------------------------------------- CPU --quick runs

def test_quick_on_cpu_skips_what_needs_a_gpu_with_its_reason_once(capsys):
    cases = [c for c in _cases(quick=True) if c.name in ("llm28x4-causal-fwd-S128", "packed-fwd-8x64")]
    dense, packed = cases
    record = harness.run_case(dense, CPU, quick=True)
    rows = {row["provider"]: row for row in record["providers"]}
    assert list(rows) == _providers(dense)  # one row per provider
    assert rows["sdpa"]["status"] == "ok" and rows["sdpa"]["check"] == "reference"
    for name, row in rows.items():
        if name != "sdpa":
            assert row["status"] == "skipped" and row["reason"], name
    assert rows["docqa_fast[triton]"]["reason"] == attention.INTERPRETER_TOO_SLOW
    assert "CUDA" in rows["sdpa[CUDNN_ATTENTION]"]["reason"]
    record = harness.run_case(packed, CPU, quick=True)
    assert all(row["status"] == "skipped" and row["reason"] for row in record["providers"])
    table = report.case_table(record)  # nothing runs: one line, each reason once
    assert table.startswith("Skipped here") and table.count(attention.INTERPRETER_TOO_SLOW) == 1
    text = cli.list_cases(_cases(quick=True), CPU)
    for provider in ("flex_attention", "docqa_fast[triton] dense", "sdpa[EFFICIENT_ATTENTION]"):
        assert text.count(f"  {provider}: ") == 1  # its reason said once, not per case


# --------------------------------------------------------------------------------- memory

def test_the_128k_cases_fit_an_h200():
    """The largest inputs, measured on meta tensors (nothing allocated): the input sets a run
    makes, each with its saved forward graph (bwd mode keeps one per set), stay far below 141 GB;
    the math fallback's scores would not, so torch's-choice sdpa is kept off it there."""
    for case in _cases(quick=False):
        if case.params.get("S") != 131072:
            continue
        inputs = case.make_inputs(case.params, META)
        set_bytes = sum(t.nbytes for t in inputs if isinstance(t, torch.Tensor))
        sets = harness.input_set_count(set_bytes, H200_MEMORY)
        q, k = inputs[0], inputs[1]
        graph_bytes = 2 * q.nbytes  # the output and its gradient; the LSE is fp32 (B, H, S): small
        assert sets * (set_bytes + graph_bytes) < H200_MEMORY // 8, case.id
        assert not attention.math_fallback_fits(q, k), case.id
    small = torch.empty(2, 128, 28, 128, device=META)
    assert attention.math_fallback_fits(small, small)


def test_sdpa_kept_to_the_fused_backends_computes_what_torch_s_choice_does(monkeypatch):
    q = torch.randn(2, 64, 4, 32)
    k, v = torch.randn(2, 64, 2, 32), torch.randn(2, 64, 2, 32)
    forward = attention._sdpa_forward(causal=True)
    expected = forward(q, k, v)
    monkeypatch.setattr(attention, "CPU_INPUT_BUDGET", 0)  # as if the math fallback's scores would not fit
    assert not attention.math_fallback_fits(q, k)
    torch.testing.assert_close(forward(q, k, v), expected)


# ---------------------------------------------------------------------------- dense twins

@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_the_dense_twin_of_a_varlen_case_computes_the_same_thing(mode):
    """The dense rows view equal-length documents as a batch: the same outputs (and gradients)
    as the varlen call, so their TFLOP/s is the same problem's. Run here through the dispatch's
    CPU path (the reference) and torch's SDPA."""
    case = next(c for c in _cases(quick=True) if c.group == f"vit-{mode}")
    inputs = case.make_inputs(case.params, CPU)
    providers = {p.name: p for p in case.providers}
    with harness.environment(providers["docqa_fast (auto)"].env):
        varlen = providers["docqa_fast (auto)"].make()(*inputs)
        twin = providers["docqa_fast[triton] dense"].make()(*inputs)
        sdpa_twin = attention._sdpa(mode, causal=False, dense_twin=True).make()(*inputs)
    for got in (twin, sdpa_twin):
        for a, b in zip(harness._tensors(got), harness._tensors(varlen)):
            assert a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------- plots

def _record(group, sizes, measured, family="attention"):
    records = []
    for size in sizes:
        rows = [{"provider": "ours", "ours": True, "status": "ok", "p20_ms": 0.9, "p50_ms": 1.0, "p80_ms": 1.1,
                 "rate": 100.0 + size} if measured else
                {"provider": "ours", "ours": True, "status": "skipped", "reason": "needs a CUDA device"}]
        records.append({"case": f"{family}/{group}-S{size}", "family": family, "group": group, "description": "d",
                        "params": {"S": size}, "sweep": "S", "metric": "TFLOP/s", "target": None,
                        "providers": rows})
    return records


def test_the_sequence_length_overview_is_drawn_only_with_data(tmp_path):
    none = report.write_plots(tmp_path, _record("a-fwd", (1024, 4096), False) + _record("a-bwd", (1024, 4096), False),
                              ceilings={})
    assert none == [] and list(tmp_path.iterdir()) == []
    # One group with data: its own plot, no overview of a single panel.
    one = report.write_plots(tmp_path, _record("a-fwd", (1024, 4096), True) + _record("a-bwd", (1024, 4096), False),
                             ceilings={})
    assert [p.name for p in one] == ["attention__a-fwd.png"]
    # A single size in a group draws no line against S: no panel for it.
    single = report.write_plots(tmp_path, _record("a-fwd", (1024, 4096), True) + _record("b-fwd", (4096,), True),
                                ceilings={})
    assert "attention__overview.png" not in [p.name for p in single]
    both = report.write_plots(tmp_path, _record("a-fwd", (1024, 4096), True) + _record("a-bwd", (1024, 4096), True),
                              ceilings={"matmul_bf16_tflops": 800.0})
    assert [p.name for p in both] == ["attention__overview.png", "attention__a-fwd.png", "attention__a-bwd.png"]
    assert all(p.stat().st_size > 0 for p in both)

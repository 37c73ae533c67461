"""The benchmark harness (benchmarks/), on CPU in a few seconds: failures stay in their row,
the cross-check falls back when the reference fails, the extension's rows stay in the table
when it is missing, the FlexAttention peer's block mask, the reward cases' memory.

The benchmarks themselves (timings) are not run here: ``pytest benchmarks/`` does that.
"""

import dataclasses
import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch

# benchmarks/ is a package of the repository, not of the installed distribution: a plain
# ``pytest tests`` (not ``python -m pytest``) would not find it otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import docqa_fast._backend  # noqa: E402
from benchmarks import attention, harness, reward, report  # noqa: E402

CPU = torch.device("cpu")


def _inputs(params, device):
    return (torch.randn(params["n"], device=device) + 2,)


def _case(*providers, reference="eager", make_inputs=_inputs):
    return harness.Case(family="test", name="case", group="case", description="a test case",
                        params={"n": 64}, sweep="n", make_inputs=make_inputs, providers=providers,
                        reference=reference, bytes_moved=64 * 4 * 2)


def _raise(*_):
    # Two lines: a table cell takes only the first.
    raise RuntimeError("reference blew up\nsecond line of the message")


def _double(x):
    return x * 2


def _wrong(x):
    return x * 3


def _rows(record):
    return {row["provider"]: row for row in record["providers"]}


def test_failing_reference_is_reported_and_the_others_run_checked_against_a_peer():
    # Ours comes first in the case, yet the stand-in must be the peer: ours is what the check tests.
    case = _case(harness.Provider("ours", fn=_double, ours=True), harness.Provider("eager", fn=_raise),
                 harness.Provider("peer", fn=_double), harness.Provider("bad-peer", fn=_wrong))
    record = harness.run_case(case, CPU, quick=True)
    rows = _rows(record)

    assert [row["provider"] for row in record["providers"]] == ["ours", "eager", "peer", "bad-peer"]
    assert rows["eager"]["status"] == "error"
    assert rows["eager"]["error_type"] == "RuntimeError"
    assert rows["eager"]["reason"] == "RuntimeError: reference blew up"
    for name in ("ours", "peer", "bad-peer"):
        assert rows[name]["status"] == "ok" and rows[name]["p50_ms"] > 0
    assert rows["peer"]["check"] == "stand-in reference"
    assert rows["ours"]["matches_reference"] is True and rows["ours"]["checked_against"] == "peer"
    assert rows["bad-peer"]["matches_reference"] is False and rows["bad-peer"]["checked_against"] == "peer"
    assert record["check"]["against"] == "peer"
    assert "reference eager error" in record["check"]["note"] and "checked against peer" in record["check"]["note"]
    assert "peer" in rows["ours"]["speedup"]

    table = report.case_table(record)
    assert "| eager | error: RuntimeError: reference blew up |" in table
    assert "ok vs peer" in table and "MISMATCH vs peer" in table
    assert "Cross-check: reference eager error" in table


def test_failing_peer_is_reported_and_the_rest_checked_against_the_reference():
    case = _case(harness.Provider("ours", fn=_double, ours=True), harness.Provider("eager", fn=_double),
                 harness.Provider("broken-peer", fn=lambda x: x.reshape(3, -1)))
    record = harness.run_case(case, CPU, quick=True)
    rows = _rows(record)

    assert rows["broken-peer"]["status"] == "error"
    assert rows["broken-peer"]["reason"].startswith("RuntimeError: shape '[3, -1]' is invalid")
    assert rows["eager"]["check"] == "reference"
    assert rows["ours"]["status"] == "ok" and rows["ours"]["matches_reference"] is True
    assert rows["ours"]["checked_against"] == "eager"
    assert record["check"]["note"] is None
    table = report.case_table(record)
    assert "| broken-peer | error: RuntimeError: shape" in table and "Cross-check" not in table


def test_only_one_provider_runs_unchecked():
    case = _case(harness.Provider("ours", fn=_raise, ours=True), harness.Provider("eager", fn=_raise),
                 harness.Provider("peer", fn=_double))
    record = harness.run_case(case, CPU, quick=True)
    rows = _rows(record)

    assert rows["peer"]["status"] == "ok" and rows["peer"]["check"] == "unchecked"
    assert rows["ours"]["status"] == rows["eager"]["status"] == "error"
    assert "only peer ran: unchecked" in record["check"]["note"]
    assert "| unchecked |" in report.case_table(record)


def test_inputs_that_cannot_be_made_fail_every_row_not_the_run():
    def no_inputs(params, device):
        raise MemoryError("no room for the inputs")

    done = []
    case = _case(harness.Provider("ours", fn=_double, ours=True), harness.Provider("eager", fn=_double),
                 make_inputs=no_inputs)
    record = harness.run_case(case, CPU, quick=True, on_provider_done=done.append)

    assert [row["status"] for row in record["providers"]] == ["error", "error"]
    assert record["providers"][0]["reason"] == "making the inputs failed: MemoryError: no room for the inputs"
    assert len(done) == 2  # the progress bar still advances over every provider


def test_error_text_is_one_short_line():
    text = harness.error_text(ValueError("x" * 1000 + "\nmore"))
    assert text.startswith("ValueError: xxx") and text.endswith("...") and "\n" not in text
    assert len(text) <= len("ValueError: ") + harness.ERROR_MESSAGE_CHARS
    assert harness.error_text(KeyError()) == "KeyError"


def test_compare_in_slices_matches_whole_tensor_allclose(monkeypatch):
    monkeypatch.setattr(harness, "CHECK_CHUNK_ELEMENTS", 7)  # many slices, one row each and more
    want = torch.randn(9, 5, dtype=torch.bfloat16)
    want[2, 3] = float("inf")
    got = want.clone()
    assert harness.compare(got, want) == (0.0, True)
    got[8, 4] += 1.0  # a mismatch in the last slice only
    error, ok = harness.compare((got,), (want,))
    assert not ok and error == (got[8, 4].float() - want[8, 4].float()).abs().item()
    got = want.clone()
    got[2, 3] = 0.0  # the non-finite positions must agree too
    assert harness.compare(got, want)[1] is False
    assert harness.compare(torch.tensor(1.0), torch.tensor(1.0)) == (0.0, True)  # 0-d outputs


def test_gpu_only_gives_its_reason_off_a_gpu_and_the_further_rule_on_one():
    seen = []

    def further(device):
        seen.append(device.type)
        return "not installed"

    assert harness.gpu_only("needs a GPU")(CPU) == "needs a GPU"
    assert harness.gpu_only("needs a GPU")(torch.device("cuda")) is None
    rule = harness.gpu_only("needs a GPU", then=further)
    assert rule(CPU) == "needs a GPU" and seen == []  # off a GPU the further rule is not asked
    assert rule(torch.device("cuda")) == "not installed" and seen == ["cuda"]
    triton = harness.ours_per_backend(lambda: None, backends=("triton",))[0]
    assert harness.skip_reason(triton, CPU, quick=False) == harness.INTERPRETER_TOO_SLOW


# ----------------------------------------------------------------- the extension's rows

@pytest.fixture
def no_extension(monkeypatch):
    """docqa_fast as it is where the extension was never built."""
    monkeypatch.setattr(docqa_fast._backend, "_load_extension", lambda: (None, "extension not built: test"))


def test_cuda_rows_appear_with_the_reason_when_the_extension_is_missing(no_extension):
    assert not docqa_fast._backend.backends()["extension"].available
    cases = {case.id: case for case in harness.collect_cases(quick=True)}
    # Every family whose op has an extension implementation keeps a docqa_fast[extension] row.
    for case_id in ("merge_attention/ring_pair-S1024", "merge_attention/splitkv_n4-B1",
                    "packing/rope_index-B1-pages12", "packing/merge-T4096", "packing/planner-n10000"):
        names = [p.name for p in cases[case_id].providers]
        assert "docqa_fast[extension]" in names, (case_id, names)

    record = harness.run_case(cases["packing/planner-n10000"], CPU, quick=True)
    row = _rows(record)["docqa_fast[extension]"]
    assert row["status"] == "skipped" and row["reason"] == "extension not built: test"
    assert "| docqa_fast[extension] | skipped: extension not built: test |" in report.case_table(record)


def test_planner_extension_row_forces_the_extension():
    # The planner's row used to be unforced: without the extension it timed the Python fallback.
    case = next(c for c in harness.collect_cases(quick=True, filter="packing/planner"))
    provider = next(p for p in case.providers if p.name == "docqa_fast[extension]")
    assert provider.env == {"DOCQA_FAST_BACKEND": "extension"} and provider.ours


# --------------------------------------------------------------------- attention peers

def _document_mask_mod(cu, causal):
    document = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())

    def mask_mod(b, h, qi, ki):
        same = document[qi] == document[ki]
        return (same & (qi >= ki)) if causal else same

    return mask_mod


def _kept(num_blocks, indices):
    """The meaningful part of a BlockMask's index table: each row's first ``num_blocks``."""
    return [indices[0, 0, row, :int(num_blocks[0, 0, row])].tolist() for row in range(num_blocks.shape[-1])]


LENGTHS = ([5, 17, 3, 40, 1], [16, 16, 32], [100], [7, 0, 30, 0, 9, 64], [3] * 11, [33, 31])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("block", [8, 16])
def test_blockwise_flex_mask_equals_create_block_mask(causal, block):
    from torch.nn.attention.flex_attention import create_block_mask

    generator = torch.Generator().manual_seed(0)
    random_lengths = [torch.randint(0, 50, (int(torch.randint(1, 8, (), generator=generator)),),
                                    generator=generator).tolist() for _ in range(4)]
    for lengths in (*LENGTHS, *[r for r in random_lengths if sum(r)]):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        total = int(cu[-1])
        mask_mod = _document_mask_mod(cu, causal)
        want = create_block_mask(mask_mod, None, None, total, total, device="cpu", BLOCK_SIZE=block)
        got = attention.document_block_mask(cu, causal, mask_mod, block)
        for num, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                             ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
            assert torch.equal(getattr(got, num), getattr(want, num)), (lengths, num)
            assert _kept(getattr(got, num), getattr(got, indices)) == _kept(getattr(want, num), getattr(want, indices))
        assert torch.equal(got.to_dense(), want.to_dense())
        assert got.seq_lengths == want.seq_lengths and got.BLOCK_SIZE == want.BLOCK_SIZE


def test_blockwise_flex_mask_attends_within_documents():
    from torch.nn.attention.flex_attention import flex_attention

    lengths = [70, 200, 5, 130]  # a ragged last block at the default 128-token blocks
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    total = int(cu[-1])
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    q, k, v = (torch.randn(1, 2, total, 16) for _ in range(3))
    dense = (document[:, None] == document[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    with pytest.warns(UserWarning):  # eager FlexAttention on CPU warns that it is unfused
        out = flex_attention(q, k, v, block_mask=attention.document_block_mask(cu, True, _document_mask_mod(cu, True)))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_attention_backward_graphs_do_not_outlive_their_case():
    # The bwd callables keep each input set's graph; built with the cases, they kept every
    # bwd case's inputs alive for the whole run. A tiny case, timed on CPU by SDPA only.
    case = next(c for c in harness.collect_cases(quick=True) if c.id.startswith("attention/llm28x4-causal-bwd"))
    made = []

    def tracked_inputs(params, device):
        inputs = case.make_inputs(params, device)
        made.extend(weakref.ref(t) for t in inputs if isinstance(t, torch.Tensor))
        return inputs

    small = dataclasses.replace(case, params={**case.params, "B": 1, "S": 64, "H": 4, "Hk": 2, "D": 32},
                                make_inputs=tracked_inputs)
    record = harness.run_case(small, CPU, quick=True)
    assert _rows(record)["sdpa"]["status"] == "ok"
    gc.collect()
    assert made and all(ref() is None for ref in made)


# ------------------------------------------------------------------------ reward memory

def test_reward_cases_fit_an_80_gb_card():
    for case in harness.collect_cases(quick=False, filter="reward/"):
        backward = case.params["mode"] == "fwd_bwd"
        peak = reward.estimated_peak_bytes(case.params, backward)
        assert peak <= reward.MEMORY_BUDGET_BYTES, (case.id, peak / 1e9)
    # The size the GPU run could not hold is beyond the budget by the same estimate.
    assert reward.estimated_peak_bytes({"pairs": 64, "S": 32768}, True) > reward.MEMORY_BUDGET_BYTES

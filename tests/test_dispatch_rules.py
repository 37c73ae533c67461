"""The dispatch table's per-call choice beyond one order per op: a tuned table's rules by shape
class, implementations from outside docqa_fast's backends (torch's cuDNN attention), an op
family's own forcing variable, and a call's decision with the reasons of the others."""

import json

import pytest
import torch

from docqa_fast._backend import Implementation, Op, Override
from docqa_fast.kernels import tuning
from docqa_fast.testing import tuned_tables

GPU = torch.device("cuda")  # decisions need no tensors: only the device type
ENV = "DOCQA_FAST_TEST_FAMILY"


@pytest.fixture(autouse=True)
def _no_settings(monkeypatch):
    monkeypatch.delenv("DOCQA_FAST_BACKEND", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    with tuned_tables(monkeypatch, "off"):
        yield


def _op(other_eligible=None, other_available=lambda device: None):
    """triton, then an outside implementation ("other"), then the reference; each returns its
    name. Calls carry (head_dim, causal): the shape class the rules select on."""
    return Op("rule_op", (Implementation("triton", lambda d, c: "triton"),
                          Implementation("other", lambda d, c: "other", eligible=other_eligible,
                                         available=other_available),
                          Implementation("reference", lambda d, c: "reference")),
              shape_class=lambda head_dim, causal: {"head_dim": head_dim, "causal": causal},
              override=Override(ENV, ("triton", "other")))


def write_dispatch_table(tmp_path, monkeypatch, dispatch):
    """A tuned table holding only a ``dispatch`` section, in force for every device (also used by
    the attention family's tests)."""
    path = tmp_path / "sm90-triton3.8.json"
    path.write_text(json.dumps({"format": tuning.FORMAT, "kernels": {}, "dispatch": dispatch}))
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    tuning.reload()
    return path


def test_rules_select_by_shape_class_first_match_wins(tmp_path, monkeypatch):
    write_dispatch_table(tmp_path, monkeypatch, {"rule_op": [
        {"when": {"head_dim": [64, 128], "causal": True}, "order": ["other"], "measured": "kept, ignored"},
        {"when": {"head_dim": 128}, "order": ["reference"]},
    ]})
    op = _op()
    assert op(GPU, torch.float16, 128, True) == "other"
    assert op(GPU, torch.float16, 64, True) == "other"
    assert op(GPU, torch.float16, 128, False) == "reference"  # the second rule; the reference is always able
    assert op(GPU, torch.float16, 80, True) == "triton"  # no rule: the registered order
    assert tuning.dispatch_order("rule_op", GPU, {"head_dim": 64, "causal": True}) == ("other",)
    assert tuning.dispatch_order("rule_op", GPU, {"causal": True}) is None  # a condition on a feature the call lacks
    assert tuning.dispatch_order("rule_op", GPU) is None


def test_the_first_tables_form_applies_to_every_call(tmp_path, monkeypatch):
    write_dispatch_table(tmp_path, monkeypatch, {"rule_op": ["other", "triton"]})
    assert _op()(GPU, torch.float16, 80, False) == "other"
    assert tuning.dispatch_order("rule_op", GPU, {"head_dim": 1}) == ("other", "triton")


def test_a_malformed_rule_is_dropped_with_a_warning(tmp_path, monkeypatch):
    write_dispatch_table(tmp_path, monkeypatch, {"rule_op": [{"when": {"head_dim": 128}, "order": []},
                                               {"when": "always", "order": ["other"]},
                                               {"when": {"head_dim": 128}, "order": ["other"]}]})
    with pytest.warns(UserWarning, match="a dispatch rule of rule_op ignored") as caught:
        assert _op()(GPU, torch.float16, 128, True) == "other"
    assert len(caught) == 2


def test_an_eligible_implementation_later_in_the_order_is_told_apart_from_one_that_cannot_run():
    op = _op(other_eligible=lambda head_dim, causal: "head dim 80" if head_dim == 80 else None)
    decision = op.decision(GPU, torch.float16, 80, True)
    assert decision.backend == "triton" and decision.why == "first available and eligible"
    assert dict(decision.others) == {"other": "head dim 80", "reference": "could run it; triton comes first"}
    assert str(decision).splitlines() == ["rule_op: triton (first available and eligible)", "  other: head dim 80",
                                          "  reference: could run it; triton comes first"]
    unavailable = _op(other_available=lambda device: "no such library")
    assert dict(unavailable.decision(GPU, torch.float16, 64, True).others)["other"] == "no such library"


def test_the_order_a_rule_gives_is_named_in_the_reason(tmp_path, monkeypatch):
    rule = {"when": {"head_dim": 128}, "order": ["other", "triton"]}
    path = write_dispatch_table(tmp_path, monkeypatch, {"rule_op": [rule]})
    impl, why = _op().decide(GPU, torch.float16, (128, False))
    assert impl.backend == "other"
    assert why == f"first available and eligible in the order of {path.name} for head_dim=128: other, triton"
    # An implementation the rule puts first but that cannot run the call is passed over, with its reason.
    impl, why = _op(other_eligible=lambda *call: "not this call").decide(GPU, torch.float16, (128, False))
    assert impl.backend == "triton" and why.endswith("(other: not this call)")


def test_a_family_variable_forces_and_names_itself(monkeypatch):
    monkeypatch.setenv(ENV, "other")
    assert _op()(GPU, torch.float16, 64, True) == "other"
    assert _op().decide(GPU, torch.float16, (64, True))[1] == f"forced by {ENV}=other"
    monkeypatch.setenv(ENV, "AUTO")
    assert _op()(GPU, torch.float16, 64, True) == "triton"
    monkeypatch.setenv(ENV, "reference")  # not one of the family's choices
    with pytest.raises(ValueError, match=f"{ENV}='reference' is not one of triton, other or 'auto'"):
        _op()(GPU, torch.float16, 64, True)


def test_a_forced_implementation_that_cannot_run_the_call_is_an_error_not_a_switch(monkeypatch):
    monkeypatch.setenv(ENV, "other")
    with pytest.raises(RuntimeError, match=f"{ENV}=other cannot run rule_op on cuda tensors: head dim 80"):
        _op(other_eligible=lambda head_dim, causal: "head dim 80")(GPU, torch.float16, 80, True)
    with pytest.raises(RuntimeError, match=f"{ENV}=other cannot run rule_op on cuda tensors: no such library"):
        _op(other_available=lambda device: "no such library")(GPU, torch.float16, 64, True)


def test_the_family_variable_and_docqa_fast_backend_agree_or_it_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV, "triton")
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    assert _op()(GPU, torch.float16, 64, True) == "triton"
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "reference")
    with pytest.raises(ValueError, match=f"DOCQA_FAST_BACKEND=reference and {ENV}=triton ask for different"):
        _op()(GPU, torch.float16, 64, True)
    monkeypatch.delenv(ENV)
    assert _op()(GPU, torch.float16, 64, True) == "reference"  # DOCQA_FAST_BACKEND alone still forces


def test_outside_implementations_need_an_availability_rule_and_overrides_real_choices():
    with pytest.raises(ValueError, match=r"\['other'\] are not docqa_fast backends and need an availability rule"):
        Op("o", (Implementation("other", lambda: 0), Implementation("reference", lambda: 1)))
    with pytest.raises(ValueError, match="offers .*'missing'.*, not all of them implementations"):
        Op("o", (Implementation("triton", lambda: 0), Implementation("reference", lambda: 1)),
           override=Override(ENV, ("triton", "missing")))

"""The dispatch table: what backends() reports, how an op's implementation is chosen per call,
how DOCQA_FAST_BACKEND forces one, and how a call's choice is explained."""

import json
import os
import re
import shutil

import pytest
import torch

import docqa_fast
from docqa_fast import _backend
from docqa_fast._backend import Implementation, Op
from docqa_fast.kernels import tuning
from docqa_fast.testing import tuned_tables

CPU, GPU = torch.device("cpu"), torch.device("cuda")  # decisions need no tensors: GPU is only a device type here


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv("DOCQA_FAST_BACKEND", raising=False)
    with tuned_tables(monkeypatch, "off"):
        yield


def _op(triton_eligible=None):
    """extension (also the CPU fast path), then triton, then the reference; each returns its name."""
    return Op("test_op", (Implementation("extension", lambda: "extension", cpu=True),
                          Implementation("triton", lambda: "triton", eligible=triton_eligible),
                          Implementation("reference", lambda: "reference")))


def _built():
    return _backend.extension() is not None


def test_backends_reports_every_backend_with_a_reason():
    statuses = docqa_fast.backends()
    assert set(statuses) == set(docqa_fast.BACKENDS) == {"reference", "triton", "extension"}
    assert statuses["reference"].available
    for name, status in statuses.items():
        assert status.detail, name
        assert str(status).startswith("available" if status.available else "unavailable")


def test_extension_is_built_and_imports_when_required():
    """`make test` sets DOCQA_FAST_REQUIRE_EXTENSION: there the extension must have been built
    (C++ always; CUDA kernels too when PyTorch is a CUDA build and nvcc is found)."""
    if not os.environ.get("DOCQA_FAST_REQUIRE_EXTENSION"):
        pytest.skip("DOCQA_FAST_REQUIRE_EXTENSION not set (make test sets it)")
    module = _backend.extension()
    assert module is not None, docqa_fast.backends()["extension"].detail
    expect_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None  # setup.py's rule
    assert bool(module.compiled_with_cuda()) == expect_cuda
    info = json.loads(open(os.path.join(os.path.dirname(docqa_fast.__file__), "_build_info.json")).read())
    assert info["extension"] == ("cuda" if expect_cuda else "cpu")


def test_cuda_tensors_take_the_first_available_and_eligible_implementation():
    if not (_built() and _backend.extension_has_cuda()):
        pytest.skip("needs the extension with CUDA kernels built (nvcc)")
    assert _op()(GPU, torch.float16) == "extension"
    only_triton = Op("o", (Implementation("triton", lambda: "triton", eligible=lambda: None),
                           Implementation("reference", lambda: "reference")))
    assert only_triton(GPU, torch.float16) == "triton"
    refusing = Op("o", (Implementation("triton", lambda: "triton", eligible=lambda: "takes fp16/bf16 only"),
                        Implementation("reference", lambda: "reference")))
    assert refusing(GPU, torch.float32) == "reference"
    assert "takes fp16/bf16 only" in refusing.explain(GPU, torch.float32)


def test_cpu_tensors_take_the_reference_unless_an_implementation_is_the_cpu_path():
    """Ops whose C++ twin is their CPU fast path (packing) take it on CPU tensors when it is
    built; Triton never runs CPU tensors unless forced (under the interpreter)."""
    assert _op()(CPU, torch.float32) == ("extension" if _built() else "reference")
    plain = Op("o", (Implementation("extension", lambda: "extension"), Implementation("triton", lambda: "triton"),
                     Implementation("reference", lambda: "reference")))
    assert plain(CPU, torch.float32) == "reference"


def test_forced_backend_is_used(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "reference")
    assert _op()(GPU, torch.float16) == "reference"
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _op()(CPU, torch.float16) == "triton"


def test_cuda_is_the_old_name_of_the_extension(monkeypatch):
    if not _built():
        pytest.skip("extension not built")
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "cuda")
    assert _op()(CPU, torch.float32) == "extension"


def test_unknown_forced_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="DOCQA_FAST_BACKEND='cudnn' is not a backend"):
        _op()(CPU, torch.float32)


def test_forcing_a_backend_the_op_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "extension")
    op = Op("only_triton", (Implementation("triton", lambda: 0), Implementation("reference", lambda: 1)))
    expected = "only_triton has no extension implementation (it has: triton, reference); " \
               "DOCQA_FAST_BACKEND=triton|reference|auto runs it"
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        op(CPU, torch.float32)


def test_forcing_an_implementation_that_cannot_compute_the_call_says_why(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="cannot run test_op on cpu tensors: takes fp16/bf16 only"):
        _op(triton_eligible=lambda: "takes fp16/bf16 only")(CPU, torch.float32)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _op()(CPU, torch.float16)


def test_triton_interpreter_refuses_bf16(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="bf16"):
        _op()(CPU, torch.bfloat16)


def test_forced_extension_without_it_says_why(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "extension")
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, "extension not built: test"))
    with pytest.raises(RuntimeError, match="extension not built: test"):
        _op()(CPU, torch.float32)
    assert not docqa_fast.backends()["extension"].available


def test_a_tuned_table_can_reorder_the_preference(tmp_path, monkeypatch):
    """Where a GPU measurement found another implementation faster (cuDNN attention, say), the
    table of that GPU puts it first for the op."""
    table = tmp_path / "sm90-triton3.6.json"
    table.write_text(json.dumps({"format": tuning.FORMAT, "kernels": {},
                                 "dispatch": {"test_op": ["triton", "extension"]}}))
    monkeypatch.setenv(tuning.TABLE_ENV, str(table))
    tuning.reload()
    assert _op()(GPU, torch.float16) == "triton"
    assert "triton" in _op().explain(GPU, torch.float16)


def test_dispatch_log_records_each_choice_and_why(monkeypatch):
    with docqa_fast.dispatch_log() as log:
        _op()(CPU, torch.float32)
        monkeypatch.setenv("DOCQA_FAST_BACKEND", "reference")
        _op()(CPU, torch.float32)
    assert [entry[:2] for entry in log] == [("test_op", "extension" if _built() else "reference"),
                                           ("test_op", "reference")]
    assert log[1][2] == "forced by DOCQA_FAST_BACKEND=reference"


def test_table_rules():
    with pytest.raises(ValueError, match="reference last"):
        Op("bad", (Implementation("reference", None), Implementation("triton", None)))
    with pytest.raises(ValueError, match="registered twice"):
        _backend.register_op("merge_attention_states", Implementation("reference", None))


def test_every_public_op_is_in_the_table():
    table = docqa_fast.dispatch_table()
    for op in ("merge_attention_states", "merge_stacked_attention_states", "get_rope_index", "merge_visual_tokens",
               "merge_visual_tokens_backward", "pack_tokens", "plan_packing"):
        assert table[op][-1] == "reference", op


def test_dispatch_logs_nest():
    with docqa_fast.dispatch_log() as outer:
        _op()(CPU, torch.float32)
        with docqa_fast.dispatch_log() as inner:
            _op()(CPU, torch.float32)
        _op()(CPU, torch.float32)
    assert len(outer) == 3 and len(inner) == 1
    _op()(CPU, torch.float32)
    assert len(outer) == 3 and len(inner) == 1 and not _backend._LOGS


def test_eligibility_is_asked_before_availability():
    """A call's own rule decides first: under torch.compile the machine-state checks (importing
    the extension, reading table files) must not be traced for an implementation that is out."""
    asked = []
    op = Op("o", (Implementation("extension", lambda: "extension", eligible=lambda: "not for this call", cpu=True),
                  Implementation("reference", lambda: "reference")))
    original = _backend.unavailable_reason
    try:
        _backend.unavailable_reason = lambda *a: asked.append(a) or original(*a)
        assert op(CPU, torch.float32) == "reference"
    finally:
        _backend.unavailable_reason = original
    assert not asked

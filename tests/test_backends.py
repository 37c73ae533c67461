"""The dispatcher: what backends() reports, and how DOCQA_FAST_BACKEND forces a choice."""

import json
import os
import shutil

import pytest
import torch

import docqa_fast
from docqa_fast import _backend


def test_backends_reports_every_backend_with_a_reason():
    statuses = docqa_fast.backends()
    assert set(statuses) == set(docqa_fast.BACKENDS)
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
    assert module is not None, docqa_fast.backends()["cuda"].detail
    expect_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None  # setup.py's rule
    assert bool(module.compiled_with_cuda()) == expect_cuda
    info = json.loads(open(os.path.join(os.path.dirname(docqa_fast.__file__), "_build_info.json")).read())
    assert info["extension"] == ("cuda" if expect_cuda else "cpu")


def test_auto_choice_on_cpu_is_the_reference(monkeypatch):
    monkeypatch.delenv("DOCQA_FAST_BACKEND", raising=False)
    assert _backend.choose_backend("op", torch.device("cpu"), ("cuda", "triton")) == "reference"


def test_cpu_twin_ops_take_the_extension_on_cpu_by_default(monkeypatch):
    """Ops whose C++ twin is their CPU fast path (packing) pick it on CPU tensors when it is
    built; the reference is still what DOCQA_FAST_BACKEND=reference or a plain op gets."""
    monkeypatch.delenv("DOCQA_FAST_BACKEND", raising=False)
    cpu = torch.device("cpu")
    built = _backend.extension() is not None
    assert _backend.choose_backend("op", cpu, ("cuda",), cpu_twin=True) == ("cuda" if built else "reference")
    assert _backend.choose_backend("op", cpu, ("cuda",)) == "reference"
    assert _backend.choose_backend("op", cpu, ("triton",), cpu_twin=True) == "reference"
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "reference")
    assert _backend.choose_backend("op", cpu, ("cuda",), cpu_twin=True) == "reference"


def test_forced_backend_is_used(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "reference")
    assert _backend.choose_backend("op", torch.device("cpu"), ("cuda", "triton")) == "reference"


def test_unknown_forced_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="DOCQA_FAST_BACKEND='cudnn' is not a backend"):
        _backend.choose_backend("op", torch.device("cpu"), ("triton",))


def test_forcing_a_backend_the_op_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="op has no cuda implementation"):
        _backend.choose_backend("op", torch.device("cpu"), ("triton",))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.choose_backend("op", torch.device("cpu"), ("triton",))


def test_triton_interpreter_refuses_bf16(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="bf16"):
        _backend.choose_backend("op", torch.device("cpu"), ("triton",), torch.bfloat16)


def test_forced_cuda_without_extension_says_why(monkeypatch):
    monkeypatch.setenv("DOCQA_FAST_BACKEND", "cuda")
    monkeypatch.setattr(_backend, "_load_extension", lambda: (None, "extension not built: test"))
    with pytest.raises(RuntimeError, match="extension not built: test"):
        _backend.choose_backend("op", torch.device("cpu"), ("cuda",))
    assert not docqa_fast.backends()["cuda"].available

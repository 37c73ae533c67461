"""Shared test setup: which backends run here, on which device and dtypes.

Tests that take a ``backend`` argument (and optionally ``dtype``) are run once per backend
this machine can execute -- on a GPU machine on CUDA tensors (bf16 included), elsewhere on
CPU tensors: the Triton kernels under the interpreter (fp16/fp32: the interpreter
miscomputes bf16) and the extension's C++ twins of the CUDA kernels. Backends that cannot
run here appear as skipped, with the reason docqa_fast.backends() gives.
"""

import atexit
import os
import shutil
import tempfile
import zlib

# A fresh compile cache per run: AOTAutograd's cache keys on the forward graph, not on a
# custom op's Python backward, so a cache left by an older checkout can replay a stale backward.
# Removed when the run ends (each pytest-xdist worker has its own); one set by the caller is kept.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="docqa_fast_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must happen before any Triton kernel module is imported: Triton decides then.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import docqa_fast  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Tests of more than ~5 s each on a 2-core CPU machine, left out by `make check` (`-m "not slow"`)
# and run by `make test` and CI: node-id prefixes, for tests in files whose family marks nothing
# itself (a file may also say @pytest.mark.slow). torch.compile's first compile in a process,
# sm_90 compiles, and the Triton interpreter on real vocabulary sizes are what costs.
SLOW_TESTS = (
    "tests/losses/test_fp32_kernels_compile_exact.py::",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[triton-float16-32000]",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[triton-float32-32000]",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[triton-float16-50257]",
    "tests/losses/test_linear_logprobs.py::test_vocabulary_sizes[triton-float16-152064]",
    "tests/attention/test_attention.py::test_compile_fullgraph_forward_and_backward[",
    "tests/attention/test_attention.py::test_varlen_matches_reference[triton-33]",
    "tests/attention/test_attention.py::test_tma_and_pointer_loads_give_the_same_result[",
    "tests/reward/test_reward.py::test_opcheck_and_compile[",
    "tests/merge_attention/test_merge_attention.py::test_torch_compile_fullgraph[",
    "tests/packing/test_merge_and_window.py::test_merge_compiles_fullgraph[",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


def dtypes_for(backend: str) -> tuple[torch.dtype, ...]:
    if backend == "triton" and not ON_GPU:
        return (torch.float16, torch.float32)
    return ALL_DTYPES


def _backend_param(backend: str, status):
    marks = () if status.available else pytest.mark.skip(reason=f"{backend} backend {status}")
    return backend, marks


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    statuses = docqa_fast.backends()
    # A family whose op lacks a backend says so: pytestmark = pytest.mark.backends("reference", "triton").
    marker = metafunc.definition.get_closest_marker("backends")
    implemented = marker.args if marker else docqa_fast.BACKENDS
    params = []
    for backend in implemented:
        name, marks = _backend_param(backend, statuses[backend])
        if "dtype" in metafunc.fixturenames:
            params += [pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype)[6:]}")
                       for dtype in dtypes_for(name)]
        else:
            params.append(pytest.param(name, marks=marks, id=name))
    argnames = ("backend", "dtype") if "dtype" in metafunc.fixturenames else "backend"
    metafunc.parametrize(argnames, params)


@pytest.fixture(autouse=True)
def _force_backend(request, monkeypatch):
    """A test parametrized by ``backend`` runs every op call through exactly that backend."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if backend is not None:
        monkeypatch.setenv("DOCQA_FAST_BACKEND", backend)
    else:
        monkeypatch.delenv("DOCQA_FAST_BACKEND", raising=False)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Different random inputs in every test, the same ones on every run of that test.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))

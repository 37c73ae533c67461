"""Installing and loading: what setup.py decides (the wheel's requirements, the CUDA architectures,
the build tools a --no-build-isolation build needs, the build info written only on success), the
warning at import when the built extension does not load (built for another PyTorch), the
rebuild command, and that a test run leaves no temporary folder behind.

Building a wheel takes minutes on 2 cores, so setup.py's helpers are called directly; the whole
`pip install --no-build-isolation .` is what README's Install section describes.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import docqa_fast
from docqa_fast import _backend
from docqa_fast import build as rebuild

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: it calls setup() only when run as __main__, as setuptools runs it."""
    spec = importlib.util.spec_from_file_location("docqa_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_wheel_with_the_extension_requires_the_torch_series_it_was_built_against(setup_py):
    assert setup_py.torch_requirement("2.14.1+cu130", extension_built=True) == "torch==2.14.*"
    assert setup_py.torch_requirement("2.13.0", extension_built=True) == "torch==2.13.*"
    # Pure Python: any recent PyTorch will do.
    assert setup_py.torch_requirement("2.14.1", extension_built=False) == "torch>=2.4"
    assert setup_py.torch_requirement(None, extension_built=False) == "torch>=2.4"


def test_installed_metadata_pins_torch_and_declares_numpy():
    """The install this suite runs against (make install: pip install -e .) carries setup.py's requirements."""
    import importlib.metadata

    try:
        requires = importlib.metadata.requires("docqa_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("docqa_fast is imported from the checkout, not installed with pip")
    info = json.loads((Path(docqa_fast.__file__).with_name("_build_info.json")).read_text())
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    expected = f"torch=={major_minor}.*" if info["extension"] in ("cpu", "cuda") else "torch>=2.4"
    assert expected in requires and "numpy" in requires, requires


def _fake_torch(*capabilities):
    cuda = SimpleNamespace(is_available=lambda: bool(capabilities), device_count=lambda: len(capabilities),
                           get_device_capability=lambda i: capabilities[i])
    return SimpleNamespace(cuda=cuda)


def test_cuda_architectures_default_to_the_gpus_of_this_machine(setup_py):
    assert setup_py.local_cuda_archs(_fake_torch()) is None  # no GPU: setup.py uses DEFAULT_CUDA_ARCHS
    assert setup_py.local_cuda_archs(_fake_torch((9, 0))) == "9.0a"  # Hopper's wgmma/TMA need sm_90a
    # Each architecture once, newest last (it also gets the PTX), ordered as numbers, not strings.
    assert setup_py.local_cuda_archs(_fake_torch((10, 0), (8, 0), (10, 0), (9, 0))) == "8.0;9.0a;10.0"
    flags, names = setup_py._gencode_flags("8.0;9.0a;10.0")
    assert names == ["8.0", "9.0a", "10.0"] and flags[-1] == "arch=compute_100,code=compute_100"


def test_a_wheel_build_without_the_wheel_package_says_what_to_install(setup_py, monkeypatch):
    setup_py.check_build_tools(["build_ext", "--inplace"])  # no wheel made: nothing to check
    # setuptools older than 70.1 (no bdist_wheel of its own) and no `wheel` package:
    monkeypatch.setitem(sys.modules, "setuptools.command.bdist_wheel", None)
    monkeypatch.setitem(sys.modules, "wheel", None)
    for command in ("bdist_wheel", "editable_wheel", "dist_info"):
        with pytest.raises(SystemExit, match=r"needs the 'wheel' package .*pip install 'setuptools>=70.1' wheel"):
            setup_py.check_build_tools([command, "--dist-dir", "/tmp/x"])


def test_build_info_is_written_only_when_the_extension_built(setup_py, tmp_path, monkeypatch):
    """A failed build keeps the info that describes the extension already there."""
    monkeypatch.setattr(setup_py, "BUILD_INFO", str(tmp_path / "tree" / "_build_info.json"))

    class Failing:
        def run(self):
            raise RuntimeError("compiler error")

    class Building:
        def run(self):
            pass

    info = {"extension": "cpu", "torch": "2.14.1"}
    for base, inplace in ((Failing, True), (Failing, False)):
        command = setup_py._build_ext_recording(base, info)()
        command.build_lib, command.inplace = str(tmp_path / "lib"), inplace
        with pytest.raises(RuntimeError, match="compiler error"):
            command.run()
    assert not any(tmp_path.rglob("_build_info.json"))

    command = setup_py._build_ext_recording(Building, info)()
    command.build_lib, command.inplace = str(tmp_path / "lib"), False  # a wheel: into its tree only
    command.run()
    assert json.loads((tmp_path / "lib" / "docqa_fast" / "_build_info.json").read_text()) == info
    assert not (tmp_path / "tree").exists()
    command.inplace = True  # an editable install: beside the .so in the source tree too
    command.run()
    assert json.loads((tmp_path / "tree" / "_build_info.json").read_text()) == info


def test_an_editable_build_keeps_its_objects_in_the_tree_for_the_next_one(setup_py):
    class Base:
        def finalize_options(self):
            self.build_temp = "/tmp/pip-xyz.build-temp"  # what pip's editable build would use

    command = setup_py._build_ext_recording(Base, {})()
    command.inplace = True
    command.finalize_options()
    assert command.build_temp == os.path.join(setup_py.ROOT, "build", "editable")
    command.inplace = False  # a wheel: the scratch folder setup.py removes afterwards
    command.finalize_options()
    assert command.build_temp == "/tmp/pip-xyz.build-temp"


@pytest.fixture
def extension_state(monkeypatch):
    """Fake build info and import outcome for the extension loader; its caches cleared around the test."""
    _backend._load_extension.cache_clear()
    attempts = []

    def arrange(info, import_error=None):
        monkeypatch.setattr(_backend, "_build_info", lambda: info)

        def import_extension():
            attempts.append("docqa_fast._C")
            raise import_error

        monkeypatch.setattr(_backend, "_import_extension", import_extension)
        return attempts

    yield arrange
    monkeypatch.undo()
    _backend._load_extension.cache_clear()


def test_an_extension_built_for_another_torch_is_reported_at_import(extension_state):
    extension_state({"extension": "cuda", "torch": "2.13.0+cu126"},
                    ImportError("_C.so: undefined symbol: _ZN3c1017RegisterOperators"))
    with pytest.warns(_backend.ExtensionWarning) as caught:
        reason = _backend.warn_if_extension_unusable()
    message = str(caught[0].message)
    assert f"built for torch 2.13.0+cu126 but torch {torch.__version__} is installed" in message
    assert "undefined symbol" in message and "python -m docqa_fast.build" in message
    assert "its ops run on the other backends" in message
    # backends() gives the same reason, and the dispatch falls back.
    assert not docqa_fast.backends()["extension"].available
    assert docqa_fast.backends()["extension"].detail == reason


def test_an_extension_that_fails_to_load_with_its_own_torch_is_reported_too(extension_state):
    extension_state({"extension": "cpu", "torch": torch.__version__}, ImportError("libfoo.so: cannot open"))
    with pytest.warns(_backend.ExtensionWarning, match=r"built but failed to import \(libfoo.so: cannot open\)"):
        _backend.warn_if_extension_unusable()


def test_an_extension_of_another_torch_release_that_loads_is_still_reported(extension_state, monkeypatch):
    extension_state({"extension": "cpu", "torch": "1.13.1"})
    monkeypatch.setattr(_backend, "_import_extension", lambda: SimpleNamespace(compiled_with_cuda=lambda: False))
    with pytest.warns(_backend.ExtensionWarning,
                      match=re.escape(f"built for torch 1.13.1 but torch {torch.__version__} is installed; it loaded")):
        _backend.warn_if_extension_unusable()
    assert docqa_fast.backends()["extension"].available  # used all the same: it may well work
    # Another build of the same release (a local version label, a patch release) is not a mismatch.
    _backend._load_extension.cache_clear()
    extension_state({"extension": "cpu", "torch": torch.__version__.split("+")[0] + "+other"})
    monkeypatch.setattr(_backend, "_import_extension", lambda: SimpleNamespace(compiled_with_cuda=lambda: False))
    assert _backend.warn_if_extension_unusable() is None


def test_no_warning_and_no_import_when_no_extension_was_built(extension_state, recwarn):
    attempts = extension_state({"extension": "none", "reason": "DOCQA_FAST_NO_EXTENSION was set at install time"},
                               AssertionError("a _C left by an older build must not be imported"))
    assert _backend.warn_if_extension_unusable() is None
    assert _backend.extension() is None and attempts == []
    assert "DOCQA_FAST_NO_EXTENSION" in docqa_fast.backends()["extension"].detail
    assert not [w for w in recwarn if issubclass(w.category, _backend.ExtensionWarning)]


def test_rebuild_command_reinstalls_from_the_recorded_source(capsys):
    source, editable = rebuild.install_source()
    assert source is not None and (source / "setup.py").exists(), "this suite runs from a source checkout"
    assert rebuild.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "--no-build-isolation --no-deps" in printed and str(source) in printed
    assert rebuild.rebuild_command(Path("/src"), editable=True)[-2:] == ["-e", "/src"]
    assert rebuild.rebuild_command(Path("/src"), editable=False)[-2:] == ["--force-reinstall", "/src"]


def test_a_test_run_leaves_no_temporary_folder(tmp_path):
    """tests/conftest.py gives each run a fresh TorchInductor cache in the temporary folder: it goes at exit."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "tests/test_backends.py::test_backends_reports_every_backend_with_a_reason"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not list(tmp_path.glob("docqa_fast_inductor_*")), list(tmp_path.iterdir())

"""Installing and loading: what setup.py decides (the wheel's requirements and version label, the
CUDA architectures, the build tools a --no-build-isolation build needs, the build info written only
on success, the sources shipped for a rebuild), whether an installed extension fits the running
PyTorch (release, CUDA major, C++ ABI) and the one warning and fallback when it does not, the
just-in-time rebuild (its cache key and folder, the arguments it gives PyTorch's compiler, when it
compiles), the rebuild command, and that a test run leaves no temporary folder behind.

Building a wheel or compiling the extension takes minutes on 2 cores, so setup.py's helpers are
called directly and PyTorch's compiler is replaced by a fake that records its arguments; the whole
`pip install --no-build-isolation .` is what docs/install.md describes.
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
from docqa_fast import _backend, _extension
from docqa_fast import build as rebuild
from docqa_fast.reference import plan_packing_ref

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
    flags, names = setup_py.helpers.gencode_flags("8.0;9.0a;10.0")
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
def extension_state(monkeypatch, tmp_path):
    """Fake build info and import outcome for the extension loader; its caches cleared around the test."""
    _backend._load_extension.cache_clear()
    # A just-in-time build in the user's cache must not decide these tests: an empty one of their own.
    monkeypatch.setenv("DOCQA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DOCQA_FAST_JIT", raising=False)
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


def _other_cuda_major() -> str:
    """A CUDA version whose major differs from the running PyTorch's (12.6 under a CPU build)."""
    if torch.version.cuda is None:
        return "12.6"
    return f"{int(torch.version.cuda.split('.')[0]) - 1}.6"


def _running_build(extension="cuda", **changes) -> dict:
    """Build info as setup.py writes it for an extension built against the running PyTorch."""
    info = {"extension": extension, "reason": "", "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cxx11_abi": bool(torch.compiled_with_cxx11_abi())}
    return {**info, **changes}


def _fake_torch_build(version, cuda, abi=True):
    return SimpleNamespace(__version__=version, version=SimpleNamespace(cuda=cuda),
                           compiled_with_cxx11_abi=lambda: abi)


def test_an_extension_fits_the_same_release_cuda_major_and_abi_only():
    cu130 = _fake_torch_build("2.14.1+cu130", "13.0")
    fits = {"extension": "cuda", "torch": "2.14.0+cu130", "torch_cuda": "13.0", "cxx11_abi": True}
    assert _extension.torch_mismatch(fits, cu130) is None  # a patch release, another minor CUDA: same ABI
    assert _extension.torch_mismatch({**fits, "torch_cuda": "13.2"}, cu130) is None
    assert _extension.torch_mismatch(fits, _fake_torch_build("2.14.1", "13.0")) is None  # PyPI's unlabelled build
    cases = {
        "another CUDA major version": (fits, _fake_torch_build("2.14.1+cu126", "12.6")),
        "need a CUDA build of PyTorch": (fits, _fake_torch_build("2.14.1+cpu", None)),
        "another PyTorch release": (fits, _fake_torch_build("2.13.0+cu130", "13.0")),
        "another C++ ABI": (fits, _fake_torch_build("2.14.1+cu130", "13.0", abi=False)),
    }
    for differs, (info, running) in cases.items():
        message = _extension.torch_mismatch(info, running)
        assert message and differs in message, (differs, message)
        assert "built for torch 2.14.0+cu130 (CUDA 13.0)" in message
        assert f"but torch {running.__version__} ({'CUDA ' + running.version.cuda if running.version.cuda else 'CPU'})" \
            " is installed" in message
    # The C++ twins link PyTorch's CPU libraries only: any flavour of the same release will do.
    cpu_twins = {"extension": "cpu", "torch": "2.14.1+cu130", "torch_cuda": "13.0", "cxx11_abi": True}
    assert _extension.torch_mismatch(cpu_twins, _fake_torch_build("2.14.1+cpu", None)) is None
    assert "another PyTorch release" in _extension.torch_mismatch(cpu_twins, _fake_torch_build("2.15.0", None))
    # Build info written before the CUDA version was recorded: its version's label says it.
    old = {"extension": "cuda", "torch": "2.14.1+cu130"}
    assert "CUDA 13.0" in _extension.torch_mismatch(old, _fake_torch_build("2.14.1+cu126", "12.6"))
    # Nothing recorded (PyPI's unlabelled build, no torch_cuda): the release is all that can be checked.
    assert _extension.torch_mismatch({"extension": "cuda", "torch": "2.14.1"}, cu130) is None
    assert _extension.torch_mismatch({"extension": "none"}, cu130) is None


def _only_warning(caught) -> str:
    mine = [w for w in caught if issubclass(w.category, _backend.ExtensionWarning)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    return str(mine[0].message)


def test_an_extension_built_for_another_cuda_major_is_reported_once_and_not_loaded(extension_state, recwarn):
    info = _running_build(torch_cuda=_other_cuda_major(), torch=torch.__version__.split("+")[0] + "+cu126")
    attempts = extension_state(info, AssertionError("an extension for another CUDA must not be imported"))
    reason = _backend.warn_if_extension_unusable()
    message = _only_warning(recwarn)
    assert f"built for torch {info['torch']} (CUDA {info['torch_cuda']})" in message
    running = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    assert f"but torch {torch.__version__} ({running}) is installed" in message
    assert "python -m docqa_fast.build" in message and "DOCQA_FAST_JIT=1" in message
    assert "its ops run on the Triton and reference backends" in message
    assert attempts == []  # never imported: a library linked against another CUDA may crash the process
    # backends() gives the same reason, and the dispatch falls back to the reference on CPU tensors.
    assert _backend.extension() is None
    assert not docqa_fast.backends()["extension"].available
    assert docqa_fast.backends()["extension"].detail == reason
    with docqa_fast.dispatch_log() as log:
        bins = docqa_fast.plan_packing([3, 5, 2, 6], 8)
    assert [(op, backend) for op, backend, _ in log] == [("plan_packing", "reference")]
    assert bins == plan_packing_ref([3, 5, 2, 6], 8)


def test_an_extension_of_another_torch_release_is_not_loaded(extension_state, recwarn):
    attempts = extension_state(_running_build("cpu", torch="1.13.1", torch_cuda=None),
                               AssertionError("an extension for another release must not be imported"))
    reason = _backend.warn_if_extension_unusable()
    assert "built for torch 1.13.1 but" in _only_warning(recwarn) and "another PyTorch release" in reason
    assert attempts == [] and _backend.extension() is None


def test_an_extension_that_fails_to_load_is_reported_with_both_versions(extension_state, recwarn):
    """The recorded versions fit, but the library does not load (a patch release that dropped a
    symbol, a missing libc10_cuda): the import error is said with both builds."""
    info = _running_build(torch=torch.__version__.split("+")[0] + "+other")
    attempts = extension_state(info, ImportError("libc10_cuda.so: cannot open shared object file"))
    _backend.warn_if_extension_unusable()
    message = _only_warning(recwarn)
    assert f"built for torch {info['torch']}" in message and f"torch {torch.__version__} (" in message
    assert "libc10_cuda.so: cannot open" in message and "python -m docqa_fast.build" in message
    assert attempts == ["docqa_fast._C"]


def test_an_extension_that_fails_to_load_with_its_own_torch_is_reported_too(extension_state, recwarn):
    extension_state(_running_build("cpu"), ImportError("_C.so: undefined symbol: _ZN3c1017RegisterOperators"))
    _backend.warn_if_extension_unusable()
    assert re.search(r"built but failed to import \(_C.so: undefined symbol", _only_warning(recwarn))


def test_an_extension_that_fits_is_loaded_without_a_word(extension_state, monkeypatch, recwarn):
    extension_state(_running_build("cpu", torch=torch.__version__.split("+")[0] + "+other"))
    twins = SimpleNamespace(compiled_with_cuda=lambda: False)
    monkeypatch.setattr(_backend, "_import_extension", lambda: twins)
    assert _backend.warn_if_extension_unusable() is None and _backend.extension() is twins
    assert not [w for w in recwarn if issubclass(w.category, _backend.ExtensionWarning)]


def test_cuda_kernels_built_for_other_gpus_leave_the_call_to_the_next_backend(extension_state, monkeypatch):
    """A build for the GPUs of another machine (a shared just-in-time cache, a wheel built on an H100)
    has no kernel image for this GPU: the dispatch says so instead of launching and failing."""
    extension_state(_running_build(cuda_archs=["9.0a"]))
    kernels = SimpleNamespace(compiled_with_cuda=lambda: True)
    monkeypatch.setattr(_backend, "_import_extension", lambda: kernels)
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, fits in (((8, 0), False), ((10, 0), False), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        reason = _backend.unavailable_reason("extension", gpu)
        assert (reason is None) == fits, (capability, reason)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert re.search(r"compiled for 9\.0a, not this GPU's 8\.6 \(rebuild with DOCQA_FAST_CUDA_ARCHS",
                     _backend.unavailable_reason("extension", gpu))
    runs_on = _extension.runs_on
    assert runs_on(["8.0", "9.0a"], (9, 0)) and runs_on(["8.0"], (8, 6)) and runs_on(["8.0"], (9, 0))  # PTX of 8.0
    assert runs_on(["8.6"], (8, 0)) is False and runs_on(["8.0", "9.0a"], (10, 0)) is False
    assert runs_on(None, (9, 0)) is None and runs_on(["10.0f"], (10, 3)) is None  # unknown: not refused


def test_an_unreadable_build_info_does_not_stop_the_import(monkeypatch):
    """Installed by another user with a private file mode, or damaged: the import goes on, and says why."""
    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", lambda self: True)
    monkeypatch.setattr(Path, "read_text", unreadable)
    info = _backend._build_info.__wrapped__()
    assert info["extension"] == "unknown" and "Permission denied" in info["reason"]


def test_no_warning_and_no_import_when_no_extension_was_built(extension_state, recwarn):
    attempts = extension_state({"extension": "none", "reason": "DOCQA_FAST_NO_EXTENSION was set at install time"},
                               AssertionError("a _C left by an older build must not be imported"))
    assert _backend.warn_if_extension_unusable() is None
    assert _backend.extension() is None and attempts == []
    assert "DOCQA_FAST_NO_EXTENSION" in docqa_fast.backends()["extension"].detail
    assert not [w for w in recwarn if issubclass(w.category, _backend.ExtensionWarning)]


def _fake_sources(root: Path) -> Path:
    (root / "packing").mkdir(parents=True)
    for name, text in (("bindings.cpp", "// module"), ("packing/a.cpp", "int a;"), ("packing/a.cu", "// kernel"),
                       ("packing/a.h", "#pragma once"), ("packing/notes.txt", "not a source")):
        (root / name).write_text(text)
    return root


def _fake_plan(kind, root: Path, cuda_home=None) -> _extension.Plan:
    return _extension.Plan(kind, "", _extension.source_files(root, ".cpp"), _extension.source_files(root, ".cu"),
                           [str(root)], cuda_home)


def test_a_just_in_time_build_is_keyed_by_the_torch_build_and_every_source_byte(tmp_path, monkeypatch):
    root = _fake_sources(tmp_path / "csrc")
    plan = _fake_plan("cuda", root)
    cu130 = _fake_torch_build("2.14.1+cu130", "13.0")
    key = _extension.jit_key(plan, cu130, root)
    assert key == _extension.jit_key(plan, cu130, root)
    others = [_extension.jit_key(plan, running, root) for running in (
        _fake_torch_build("2.14.1+cu126", "12.6"), _fake_torch_build("2.14.2+cu130", "13.0"),
        _fake_torch_build("2.14.1+cu130", "13.0", abi=False))]
    others.append(_extension.jit_key(_fake_plan("cpu", root), cu130, root))
    (root / "packing" / "a.h").write_text("#pragma once // edited")  # a header is a source too
    others.append(_extension.jit_key(plan, cu130, root))
    assert len({key, *others}) == 6, others

    monkeypatch.setenv("DOCQA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    folder, name = _extension.jit_folder(plan, cu130, root)
    key = _extension.jit_key(plan, cu130, root)
    assert folder.parent == tmp_path / "cache" / "extension" and name == f"docqa_fast_C_{key}" and name.isidentifier()
    assert folder.name.startswith("torch2.14.1+cu130-") and folder.name.endswith(f"-cuda-{key}")


def test_the_just_in_time_cache_lives_outside_the_package(monkeypatch, tmp_path):
    for variable in ("DOCQA_FAST_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    default = _extension.cache_root()
    assert default == Path.home() / ".cache" / "docqa_fast" / "extension" and ROOT not in default.parents
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _extension.cache_root() == tmp_path / "xdg" / "docqa_fast" / "extension"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    assert _extension.cache_root() == tmp_path / "torch_extensions" / "docqa_fast"
    monkeypatch.setenv("DOCQA_FAST_CACHE_DIR", str(tmp_path / "mine"))
    assert _extension.cache_root() == tmp_path / "mine" / "extension"
    monkeypatch.setenv("DOCQA_FAST_CACHE_DIR", "off")
    assert _extension.cache_root() is None


def test_the_just_in_time_setting_is_opt_in(monkeypatch):
    for value, setting in (("", "cached"), ("auto", "cached"), ("1", "compile"), ("yes", "compile"), ("0", "off")):
        monkeypatch.setenv("DOCQA_FAST_JIT", value)
        assert _extension.jit_setting() == setting, value
    monkeypatch.delenv("DOCQA_FAST_JIT")
    assert _extension.jit_setting() == "cached"  # no compile nobody asked for
    monkeypatch.setenv("DOCQA_FAST_JIT", "maybe")
    with pytest.raises(ValueError, match=r"DOCQA_FAST_JIT='maybe': expected 1 .* 0 .* or unset"):
        _extension.jit_setting()


def test_a_just_in_time_build_gets_the_flags_setup_py_gives(tmp_path):
    root = _fake_sources(tmp_path / "csrc")
    (tmp_path / "cuda" / "lib64").mkdir(parents=True)
    (tmp_path / "cuda" / "lib64" / "libcudart.so").write_text("")
    folder = tmp_path / "build"
    arguments = _extension.jit_arguments(_fake_plan("cuda", root, str(tmp_path / "cuda")), folder, "docqa_fast_C_x",
                                         "8.0;9.0a")
    assert arguments["name"] == "docqa_fast_C_x" and arguments["build_directory"] == str(folder)
    assert arguments["sources"] == [str(root / "bindings.cpp"), str(root / "packing" / "a.cpp"),
                                    str(root / "packing" / "a.cu")]
    assert arguments["with_cuda"] and arguments["extra_include_paths"] == [str(root)]
    assert arguments["extra_cflags"] == ["-O3", "-DDOCQA_FAST_WITH_CUDA=1"]
    cuda_flags = arguments["extra_cuda_cflags"]
    assert "-DDOCQA_FAST_WITH_CUDA=1" in cuda_flags and "--expt-relaxed-constexpr" in cuda_flags
    # -gencode given here: PyTorch then leaves TORCH_CUDA_ARCH_LIST out.
    assert cuda_flags[-6:] == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
                               "-gencode", "arch=compute_90a,code=compute_90a"]
    assert arguments["extra_ldflags"] == [f"-L{tmp_path / 'cuda' / 'lib64'}"]
    cpu = _extension.jit_arguments(_fake_plan("cpu", root), folder, "docqa_fast_C_x", "")
    assert cpu["sources"] == arguments["sources"][:2] and not cpu["with_cuda"] and cpu["extra_cflags"] == ["-O3"]
    assert "extra_cuda_cflags" not in cpu and "extra_ldflags" not in cpu


@pytest.fixture
def fake_compiler(monkeypatch):
    """PyTorch's just-in-time compiler replaced by one that records its arguments and returns a
    module of C++ twins (or raises ``fake_compiler.error``); any executable stands in for c++."""
    from torch.utils import cpp_extension

    calls, twins = [], SimpleNamespace(compiled_with_cuda=lambda: False)
    state = SimpleNamespace(calls=calls, module=twins, error=None)

    def load(**arguments):
        calls.append(arguments)
        if state.error:
            raise state.error
        return twins

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("CXX", sys.executable)
    return state


def test_a_mismatched_extension_is_rebuilt_just_in_time_when_asked(extension_state, fake_compiler, monkeypatch,
                                                                   recwarn, tmp_path):
    extension_state(_running_build(torch="1.13.1"), AssertionError("a mismatched extension must not be imported"))
    assert _backend.warn_if_extension_unusable() and fake_compiler.calls == []  # not asked: a warning only
    recwarn.clear()
    _backend._load_extension.cache_clear()
    monkeypatch.setenv("DOCQA_FAST_JIT", "1")
    assert _backend.warn_if_extension_unusable() is None and _backend.extension() is fake_compiler.module
    assert not [w for w in recwarn if issubclass(w.category, _backend.ExtensionWarning)]
    [arguments] = fake_compiler.calls
    folder = Path(arguments["build_directory"])
    assert folder.parent == tmp_path / "cache" / "extension" and arguments["name"].startswith("docqa_fast_C_")
    assert arguments["sources"] and all(Path(source).is_file() for source in arguments["sources"])
    info = json.loads((folder / "build_info.json").read_text())  # written once the build succeeded
    assert info["torch"] == torch.__version__ and info["jit"] == str(folder)
    assert docqa_fast.backends()["extension"].detail.endswith(f"(built just in time in {folder})")

    # The next process loads it from the cache without being asked, and compiles nothing.
    (folder / f"{arguments['name']}.so").write_bytes(b"")
    cached = SimpleNamespace(compiled_with_cuda=lambda: False)
    monkeypatch.setattr(_extension, "_import_built", lambda path, name: cached)
    monkeypatch.delenv("DOCQA_FAST_JIT")
    _backend._load_extension.cache_clear()
    assert _backend.extension() is cached and len(fake_compiler.calls) == 1
    _backend._load_extension.cache_clear()
    monkeypatch.setenv("DOCQA_FAST_JIT", "0")  # the cache ignored
    assert _backend.extension() is None


def test_a_cached_build_loads_where_nothing_could_compile_it(extension_state, fake_compiler, monkeypatch):
    """A runtime machine (no C++ compiler, no CUDA toolkit) still loads the build a compiling one left in
    the shared cache: looking it up does not depend on what this machine could compile."""
    extension_state(_running_build(torch="1.13.1"), AssertionError("a mismatched extension must not be imported"))
    monkeypatch.setenv("DOCQA_FAST_JIT", "1")
    assert _backend.extension() is fake_compiler.module
    [arguments] = fake_compiler.calls
    (Path(arguments["build_directory"]) / f"{arguments['name']}.so").write_bytes(b"")
    cached = SimpleNamespace(compiled_with_cuda=lambda: False)
    monkeypatch.setattr(_extension, "_import_built", lambda path, name: cached)
    for compiler, toolkit in (("c++", None), ("no-such-c++-compiler", None)):  # no nvcc; then no c++ either
        monkeypatch.setenv("CXX", compiler if compiler != "c++" else sys.executable)
        monkeypatch.setattr(_extension, "find_cuda_home", lambda guess: toolkit)
        for setting in ("", "1"):  # found by the import, and not compiled again when asked to compile
            monkeypatch.setenv("DOCQA_FAST_JIT", setting)
            _backend._load_extension.cache_clear()
            assert _backend.extension() is cached, (compiler, setting, docqa_fast.backends()["extension"])
    assert len(fake_compiler.calls) == 1


def test_build_info_written_by_two_processes_at_once_is_whole(tmp_path, monkeypatch):
    """Every rank of a job under DOCQA_FAST_JIT=1 waits for the one compile, then all write the build's
    info at once: a writer replacing the file between another's write and rename must not take that
    one's half-written file nor leave it without one (a shared temporary name did both)."""
    path = tmp_path / "build" / "build_info.json"
    replace, interleaved = os.replace, []

    def another_process_writes_now(source, target):
        if not interleaved:
            interleaved.append(source)
            _extension.write_json({"writer": "other"}, path)
        replace(source, target)

    monkeypatch.setattr(_extension.os, "replace", another_process_writes_now)
    _extension.write_json({"writer": "this"}, path)
    assert json.loads(path.read_text()) == {"writer": "this"} and interleaved
    assert [p.name for p in path.parent.iterdir()] == ["build_info.json"]
    assert path.stat().st_mode & 0o777 == 0o644  # readable by every user of a shared install or cache


def test_a_failed_just_in_time_build_is_said_in_the_one_warning_and_leaves_no_build(extension_state, fake_compiler,
                                                                                     monkeypatch, recwarn, tmp_path):
    extension_state(_running_build(torch="1.13.1"), AssertionError("a mismatched extension must not be imported"))
    monkeypatch.setenv("DOCQA_FAST_JIT", "1")
    fake_compiler.error = RuntimeError("Error building extension 'docqa_fast_C_x'")
    _backend.warn_if_extension_unusable()
    message = _only_warning(recwarn)
    assert "built for torch 1.13.1" in message and "python -m docqa_fast.build" in message
    assert re.search(r"no just-in-time build either: compiling it into .* failed \(Error building extension", message)
    assert _backend.extension() is None and not list((tmp_path / "cache").rglob("build_info.json"))


def test_the_rebuild_command_compiles_just_in_time_without_a_source_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(rebuild, "install_source", lambda: (None, False))  # an installed wheel
    monkeypatch.setattr(rebuild, "_report_in_fresh_process", lambda: 0)
    calls = []

    def jit_extension(compile_missing, verbose=False):
        calls.append((compile_missing, verbose))
        return SimpleNamespace(), {"torch": torch.__version__, "jit": "/cache/folder"}, None

    monkeypatch.setattr(_extension, "jit_extension", jit_extension)
    assert rebuild.main([]) == 0 and calls == [(True, True)]
    assert f"built for torch {torch.__version__} in /cache/folder" in capsys.readouterr().out
    monkeypatch.setattr(_extension, "jit_extension", lambda compile_missing, verbose=False: (None, None, "no c++"))
    assert rebuild.main([]) == 1 and "docqa_fast.build: no c++" in capsys.readouterr().err

    monkeypatch.setenv("DOCQA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", sys.executable)
    assert rebuild.main(["--jit", "--dry-run"]) == 0
    assert f"into {tmp_path / 'cache' / 'extension'}" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()  # a dry run makes nothing


def test_a_wheel_ships_the_sources_a_rebuild_compiles(setup_py, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_py, "BUILD_INFO", str(tmp_path / "tree" / "_build_info.json"))

    class Base:
        editable_mode = False

        def run(self):
            pass

    none = {"extension": "none", "reason": "DOCQA_FAST_NO_EXTENSION was set at install time"}
    command = setup_py._build_py_shipping(Base, none, has_extension=False)()
    command.build_lib = str(tmp_path / "lib")
    command.run()
    shipped = tmp_path / "lib" / "docqa_fast" / "_csrc"
    relative = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    expected = sorted(str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*")
                      if p.suffix in (".cpp", ".cu", ".h"))
    assert relative == expected and "bindings.cpp" in relative
    # Without an extension the wheel's build info says why (build_ext writes it otherwise); the tree is untouched.
    assert json.loads((tmp_path / "lib" / "docqa_fast" / "_build_info.json").read_text()) == none
    assert not (tmp_path / "tree").exists()
    # An installed wheel finds them there.
    (tmp_path / "site" / "docqa_fast").mkdir(parents=True)
    (tmp_path / "lib" / "docqa_fast" / "_csrc").rename(tmp_path / "site" / "docqa_fast" / "_csrc")
    assert _extension.source_root(tmp_path / "site" / "docqa_fast") == tmp_path / "site" / "docqa_fast" / "_csrc"
    assert _extension.source_root() == ROOT / "csrc"

    # An editable install runs from the tree: nothing is copied; its build info goes beside the tree's _C.
    command = setup_py._build_py_shipping(Base, none, has_extension=False)()
    command.build_lib, command.editable_mode = str(tmp_path / "editable"), True
    command.run()
    assert not (tmp_path / "editable").exists()
    assert json.loads((tmp_path / "tree" / "_build_info.json").read_text()) == none


def test_the_wheel_version_names_what_its_extension_was_compiled_against(setup_py):
    from packaging import version  # pytest's own dependency: always there with the tests
    cuda = {"extension": "cuda", "torch": "2.14.1+cu130", "torch_cuda": "13.0"}
    assert setup_py.local_version(cuda) == "0.1.0+cu130.torch2.14"
    assert setup_py.local_version({**cuda, "torch_cuda": "12.6", "torch": "2.11.0"}) == "0.1.0+cu126.torch2.11"
    assert setup_py.local_version({"extension": "cpu", "torch": "2.14.1+cu130"}) == "0.1.0+cpu.torch2.14"
    assert setup_py.local_version({"extension": "none", "reason": "no compiler"}) == "0.1.0"
    parsed = version.Version(setup_py.local_version(cuda))
    assert parsed.public == "0.1.0" and parsed.local == "cu130.torch2.14"


def test_rebuild_command_reinstalls_from_the_recorded_source(capsys):
    source, editable = rebuild.install_source()
    assert source is not None and (source / "setup.py").exists(), "this suite runs from a source checkout"
    assert rebuild.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "--no-build-isolation --no-deps" in printed and str(source) in printed
    assert rebuild.rebuild_command(Path("/src"), editable=True)[-2:] == ["-e", "/src"]
    assert rebuild.rebuild_command(Path("/src"), editable=False)[-2:] == ["--force-reinstall", "/src"]


def test_a_test_run_leaves_no_temporary_folder(tmp_path):
    """tests/conftest.py gives each run a fresh TorchInductor cache in the temporary folder: it goes at
    exit, and the next run removes those of runs killed before their exit (their process is gone)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    killed = tmp_path / "docqa_fast_inductor_4194305_abc"  # above Linux's largest process id: gone
    running = tmp_path / f"docqa_fast_inductor_{os.getpid()}_abc"  # this process's: still in use
    for folder in (killed, running):
        (folder / "fxgraph").mkdir(parents=True)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "tests/test_backends.py::test_backends_reports_every_backend_with_a_reason"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert [p.name for p in tmp_path.iterdir()] == [running.name]  # nothing else left either

"""Build script for docqa_fast.

The package is pure Python (Triton kernels are compiled at run time); the optional
extension ``docqa_fast._C`` holds the C++ and CUDA kernels from ``csrc/``:

* PyTorch is a CUDA build and ``nvcc`` is found  -> C++ and CUDA sources (``CUDAExtension``);
* otherwise, a C++ compiler is found             -> C++ sources only (the CPU twins);
* ``DOCQA_FAST_NO_EXTENSION=1`` or no PyTorch at build time -> no extension at all.

Environment knobs: ``DOCQA_FAST_CUDA_ARCHS`` (default: the architectures of this machine's
GPUs, or ``8.0;9.0a`` without one), ``MAX_JOBS`` (parallel compile jobs, honoured by
PyTorch's ninja build), ``CUDA_HOME``. Install PyTorch first, then
``pip install --no-build-isolation .`` so the build sees your PyTorch (and uses this
environment's setuptools and wheel, which are checked here).

A wheel that carries the extension requires the PyTorch release series it was compiled
against (``torch==2.14.*``): the extension's C++ ABI changes between them. What was built,
and why not more, is written to ``docqa_fast/_build_info.json`` -- for an extension only once
its build succeeded, so the file always describes the ``_C`` beside it -- so that
``docqa_fast.backends()`` and the import-time check can explain it at run time.
"""

import glob
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "docqa_fast", "_build_info.json")
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
# The setuptools commands pip runs to make a (possibly editable) wheel: they need bdist_wheel.
WHEEL_COMMANDS = ("bdist_wheel", "editable_wheel", "dist_info")


def check_build_tools(argv) -> None:
    """A --no-build-isolation build uses this environment's setuptools and wheel: say what is
    missing and what to run, instead of setuptools' ``error: invalid command 'bdist_wheel'``."""
    if not any(command in argv for command in WHEEL_COMMANDS):
        return
    try:
        import setuptools.command.bdist_wheel  # noqa: F401  (setuptools >= 70.1 builds wheels itself)
        return
    except ImportError:
        pass
    try:
        import wheel  # noqa: F401  (older setuptools borrow bdist_wheel from it)
    except ImportError:
        import setuptools

        raise SystemExit(
            f"docqa_fast: cannot build a wheel: setuptools {setuptools.__version__} needs the 'wheel' package "
            "for it, and 'wheel' is not installed in this environment (a --no-build-isolation build uses "
            "the build tools installed here). Run:  pip install 'setuptools>=70.1' wheel  then install again.")


def torch_requirement(torch_version, extension_built: bool) -> str:
    """The PyTorch a wheel needs: the release series its extension was compiled against
    ('2.14.1+cu130' -> 'torch==2.14.*'), or any recent one for a pure-Python wheel."""
    if not extension_built or not torch_version:
        return "torch>=2.4"
    major, minor = torch_version.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def local_cuda_archs(torch):
    """The architectures of this machine's GPUs ('9.0a' on Hopper: its wgmma/TMA instructions
    need the arch-specific target), newest last; None without a GPU. Building for the GPU at
    hand only takes half the time of the two-architecture default."""
    if not torch.cuda.is_available():
        return None
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" + ("a" if major == 9 else "") for major, minor in capabilities)


def _gencode_flags(archs):
    """'8.0;9.0a' -> nvcc -gencode flags (SASS for each arch, PTX for the newest)."""
    flags = []
    names = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not names:
        raise ValueError(f"DOCQA_FAST_CUDA_ARCHS is empty (got {archs!r}); expected e.g. '8.0;9.0a'")
    for name in names:
        num = name.replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    last = names[-1].replace(".", "")
    flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]
    return flags, names


def _cuda_library_dir(cuda_home):
    """Toolkits keep libcudart in lib64/ or (some packagings) in lib/."""
    for sub in ("lib64", "lib"):
        path = os.path.join(cuda_home, sub)
        if glob.glob(os.path.join(path, "libcudart.so*")):
            return path
    return None


def _find_cuda_home(torch_guess):
    """The CUDA toolkit folder: has bin/nvcc and libcudart in lib64/ or lib/.

    PyTorch guesses from the nvcc on PATH, which on some machines is a wrapper script in
    /usr/local/bin (giving /usr/local); try the explicit settings, then that guess, then
    the folder that owns the real nvcc (found by asking the wrapper), then /usr/local/cuda.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_guess]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc) as f:  # a shell wrapper names the real binary
                candidates += [os.path.dirname(os.path.dirname(word)) for word in f.read(4096).split()
                               if word.endswith("/bin/nvcc")]
        except (OSError, UnicodeDecodeError):
            pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and _cuda_library_dir(home):
            return home
    return None


def write_build_info(info, path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)


def _build_ext_recording(base, info):
    """``base`` (PyTorch's BuildExtension) that writes the build info only once the extension built,
    and keeps an in-place build's objects for the next one."""

    class BuildExtRecording(base):
        def finalize_options(self):
            super().finalize_options()
            if self.inplace:
                # pip builds an editable install (make install) in a new temporary folder each time:
                # keep the objects in build/ (git-ignored) instead, so that ninja recompiles only
                # the sources that changed, not the whole extension (minutes on 2 cores).
                self.build_temp = os.path.join(ROOT, "build", "editable")

        def run(self):
            super().run()
            # Into the wheel's tree, and beside the in-place .so of an editable install: a failed
            # build never gets here, so the info already there still describes the .so already there.
            write_build_info(info, os.path.join(self.build_lib, "docqa_fast", "_build_info.json"))
            if self.inplace:
                write_build_info(info, BUILD_INFO)

    return BuildExtRecording


def _plan_extension():
    """Decide what to build. Returns (ext_modules, cmdclass, build_info)."""
    if os.environ.get("DOCQA_FAST_NO_EXTENSION", "0") not in ("", "0"):
        return [], {}, {"extension": "none", "reason": "DOCQA_FAST_NO_EXTENSION was set at install time"}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}, {
            "extension": "none",
            "reason": "PyTorch was not importable at build time (install PyTorch first, then docqa_fast "
                      "with --no-build-isolation)",
        }

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return [], {}, {"extension": "none", "reason": f"no C++ compiler found ({cxx!r} is not on PATH)",
                        "torch": torch.__version__}

    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    # No -std flag: PyTorch adds the standard its headers need (C++17 or C++20).
    cxx_flags = ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)

    why_no_cuda = None
    cuda_home = _find_cuda_home(cpp_extension.CUDA_HOME)
    if torch.version.cuda is None:
        why_no_cuda = "PyTorch is a CPU build"
    elif cuda_home is None:
        why_no_cuda = "no CUDA toolkit found (nvcc with libcudart in lib64/ or lib/; set CUDA_HOME)"
    else:
        # BuildExtension runs nvcc from this module-level setting.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home

    if why_no_cuda is not None:
        ext = cpp_extension.CppExtension(
            "docqa_fast._C", cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}
        )
        info = {"extension": "cpu", "reason": f"CUDA kernels not built: {why_no_cuda}", "torch": torch.__version__}
        return [ext], {"build_ext": _build_ext_recording(build_ext, info)}, info

    archs = os.environ.get("DOCQA_FAST_CUDA_ARCHS") or local_cuda_archs(torch) or DEFAULT_CUDA_ARCHS
    gencode, arch_names = _gencode_flags(archs)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *gencode]
    ext = cpp_extension.CUDAExtension(
        "docqa_fast._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        library_dirs=[_cuda_library_dir(cuda_home)],
        define_macros=[("DOCQA_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags + ["-DDOCQA_FAST_WITH_CUDA=1"], "nvcc": nvcc_flags},
    )
    info = {"extension": "cuda", "reason": "", "cuda_archs": arch_names, "cuda_home": cuda_home,
            "torch": torch.__version__}
    return [ext], {"build_ext": _build_ext_recording(build_ext, info)}, info


def main():
    check_build_tools(sys.argv[1:])
    try:
        from setuptools import find_packages, setup
    except ImportError:
        raise SystemExit("docqa_fast: setuptools is not installed in this environment (a --no-build-isolation "
                         "build uses the build tools installed here). Run:  pip install 'setuptools>=70.1' wheel")

    ext_modules, cmdclass, build_info = _plan_extension()
    if not ext_modules:
        # Nothing can fail later: record now (the loader then leaves any older _C in the tree alone).
        write_build_info(build_info, BUILD_INFO)
    print(f"docqa_fast build plan: {build_info}")

    options = {}
    scratch = None
    if "bdist_wheel" in sys.argv[1:]:
        # A plain `pip install .` builds in this tree: keep build/ and *.egg-info out of it. An
        # editable install keeps build/ (ninja's objects make the next rebuild incremental).
        scratch = tempfile.mkdtemp(prefix="docqa_fast_build_")
        options = {"build": {"build_base": os.path.join(scratch, "build")}, "egg_info": {"egg_base": scratch}}
    try:
        setup(
            name="docqa_fast",
            version="0.1.0",
            description="Fused Triton and CUDA kernels for long-context, image-heavy document QA models",
            python_requires=">=3.10",
            # kernels/ sits at the top of the repository and installs as docqa_fast.kernels (a
            # top-level "kernels" package would collide with other projects of that name).
            packages=find_packages(include=["docqa_fast", "docqa_fast.*"]) + ["docqa_fast.kernels"],
            package_dir={"docqa_fast.kernels": "kernels"},
            # The per-GPU tile tables (kernels/tuned/*.json) ship with the kernels that read them.
            package_data={"docqa_fast": ["_build_info.json"], "docqa_fast.kernels": ["tuned/*.json"]},
            # numpy: the Triton interpreter (TRITON_INTERPRET=1, Triton kernels on CPU tensors) computes with it.
            install_requires=[torch_requirement(build_info.get("torch"), bool(ext_modules)), "numpy"],
            ext_modules=ext_modules,
            cmdclass=cmdclass,
            options=options,
        )
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


# setuptools runs this file as __main__; tests import it for its helpers.
if __name__ == "__main__":
    main()

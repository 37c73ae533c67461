"""Build script for docqa_fast.

The package is pure Python (Triton kernels are compiled at run time); the optional
extension ``docqa_fast._C`` holds the C++ and CUDA kernels from ``csrc/``:

* PyTorch is a CUDA build and ``nvcc`` is found  -> C++ and CUDA sources (``CUDAExtension``);
* otherwise, a C++ compiler is found             -> C++ sources only (the CPU twins);
* ``DOCQA_FAST_NO_EXTENSION=1`` or no PyTorch at build time -> no extension at all.

Environment knobs: ``DOCQA_FAST_CUDA_ARCHS`` (default ``8.0;9.0a``), ``MAX_JOBS``
(parallel compile jobs, honoured by PyTorch's ninja build), ``CUDA_HOME``.
Install with ``pip install --no-build-isolation .`` so the build sees your PyTorch.

What was built, and why not more, is written to ``docqa_fast/_build_info.json`` so that
``docqa_fast.backends()`` can explain it at run time.
"""

import glob
import json
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "docqa_fast", "_build_info.json")
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


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
            "reason": "PyTorch was not importable at build time (install with --no-build-isolation)",
        }

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return [], {}, {"extension": "none", "reason": f"no C++ compiler found ({cxx!r} is not on PATH)"}

    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    # No -std flag: PyTorch adds the standard its headers need (C++17 or C++20).
    cxx_flags = ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

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
        return [ext], cmdclass, {"extension": "cpu", "reason": f"CUDA kernels not built: {why_no_cuda}"}

    archs = os.environ.get("DOCQA_FAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
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
    info = {"extension": "cuda", "reason": "", "cuda_archs": arch_names, "cuda_home": cuda_home}
    return [ext], cmdclass, info


ext_modules, cmdclass, build_info = _plan_extension()
with open(BUILD_INFO, "w") as f:
    json.dump(build_info, f, indent=1)
print(f"docqa_fast build plan: {build_info}")

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
    install_requires=["torch>=2.4"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

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
against (``torch==2.14.*``): the extension's C++ ABI changes between them. Its version's local
label names the CUDA flavour too (``0.1.0+cu130.torch2.14``), which pip cannot require; the
import checks it. What was built, and why not more, is written to ``docqa_fast/_build_info.json``
-- for an extension only once its build succeeded, so the file always describes the ``_C``
beside it -- so that ``docqa_fast.backends()`` and the import-time check can explain it at run
time. The wheel also carries the sources (``docqa_fast/_csrc``), which ``python -m
docqa_fast.build`` compiles for another PyTorch. What to compile and with which flags is decided
in ``docqa_fast/_extension.py``, shared with that rebuild. See docs/install.md.
"""

import importlib.util
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "docqa_fast", "_build_info.json")
VERSION = "0.1.0"
# The setuptools commands pip runs to make a (possibly editable) wheel: they need bdist_wheel.
WHEEL_COMMANDS = ("bdist_wheel", "editable_wheel", "dist_info")


def _load_build_helpers():
    """docqa_fast/_extension.py, by path: what to compile and how is decided there, for setup.py and for
    the just-in-time rebuild alike (importing the package would import all of it, and PyTorch)."""
    spec = importlib.util.spec_from_file_location("docqa_fast_build_helpers", os.path.join(ROOT, "docqa_fast", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the class is made
    spec.loader.exec_module(module)
    return module


helpers = _load_build_helpers()
local_cuda_archs = helpers.local_cuda_archs
write_build_info = helpers.write_json


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
    ('2.14.1+cu130' -> 'torch==2.14.*'), or any recent one for a pure-Python wheel. pip cannot
    pin the CUDA flavour too (a local label cannot be combined with a wildcard, and PyPI's CUDA
    builds carry none): the version's own label names it (:func:`local_version`) and the import
    refuses an extension built for another CUDA major."""
    if not extension_built or not torch_version:
        return "torch>=2.4"
    major, minor = torch_version.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def local_version(info) -> str:
    """The wheel's version, with a local label naming what its extension was compiled against, as
    PyTorch's own wheels and torchvision's do: '0.1.0+cu130.torch2.14' (CUDA kernels, CUDA 13.0),
    '0.1.0+cpu.torch2.14' (C++ twins only), '0.1.0' (no extension: fits any PyTorch)."""
    if info.get("extension") not in ("cpu", "cuda") or not info.get("torch"):
        return VERSION
    release = ".".join(info["torch"].split("+")[0].split(".")[:2])
    flavour = "cpu"
    if info["extension"] == "cuda" and info.get("torch_cuda"):
        flavour = "cu" + info["torch_cuda"].replace(".", "")
    return f"{VERSION}+{flavour}.torch{release}"


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


def _build_py_shipping(base, info, has_extension: bool):
    """``base`` (setuptools' build_py) that also puts the extension's sources into the wheel
    (docqa_fast/_csrc: what ``python -m docqa_fast.build`` compiles for another PyTorch) and, when
    no extension is built, the build info that says why (build_ext writes it otherwise)."""

    class BuildPyShipping(base):
        def run(self):
            super().run()
            if getattr(self, "editable_mode", False):
                # An editable install runs from the tree: it has csrc/ already, and its build info
                # goes beside a _C an older build may have left (the loader then leaves that alone).
                if not has_extension:
                    write_build_info(info, BUILD_INFO)
                return
            target = os.path.join(self.build_lib, "docqa_fast", helpers.PACKAGED_SOURCES)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(ROOT, "csrc"), target,
                            ignore=lambda folder, names: [n for n in names if os.path.isfile(os.path.join(folder, n))
                                                          and not n.endswith(helpers.SOURCE_SUFFIXES)])
            if not has_extension:
                write_build_info(info, os.path.join(self.build_lib, "docqa_fast", "_build_info.json"))

    return BuildPyShipping


def _plan_extension():
    """Decide what to build. Returns (ext_modules, build_ext command or None, build_info)."""
    if os.environ.get("DOCQA_FAST_NO_EXTENSION", "0") not in ("", "0"):
        return [], None, {"extension": "none", "reason": "DOCQA_FAST_NO_EXTENSION was set at install time"}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], None, {
            "extension": "none",
            "reason": "PyTorch was not importable at build time (install PyTorch first, then docqa_fast "
                      "with --no-build-isolation)",
        }

    plan = helpers.plan_extension(torch, os.path.join(ROOT, "csrc"), relative_to=ROOT,
                                  cuda_home_guess=cpp_extension.CUDA_HOME)
    helpers.use_cuda_home(cpp_extension, plan)
    if plan.kind == "none":
        return [], None, {"extension": "none", "reason": plan.reason, "torch": torch.__version__}
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    if plan.kind == "cpu":
        ext = cpp_extension.CppExtension("docqa_fast._C", plan.sources(), include_dirs=plan.include_dirs,
                                         extra_compile_args={"cxx": plan.cxx_flags()})
        info = helpers.build_info(plan, torch)
        return [ext], _build_ext_recording(build_ext, info), info

    archs = helpers.cuda_archs(torch)
    arch_names = helpers.gencode_flags(archs)[1]
    ext = cpp_extension.CUDAExtension(
        "docqa_fast._C",
        plan.sources(),
        include_dirs=plan.include_dirs,
        library_dirs=[helpers.cuda_library_dir(plan.cuda_home)],
        define_macros=[("DOCQA_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": plan.cxx_flags(), "nvcc": plan.nvcc_flags(archs)},
    )
    info = helpers.build_info(plan, torch, arch_names)
    return [ext], _build_ext_recording(build_ext, info), info


def main():
    check_build_tools(sys.argv[1:])
    try:
        from setuptools import find_packages, setup
    except ImportError:
        raise SystemExit("docqa_fast: setuptools is not installed in this environment (a --no-build-isolation "
                         "build uses the build tools installed here). Run:  pip install 'setuptools>=70.1' wheel")

    ext_modules, build_ext, build_info = _plan_extension()
    from setuptools.command.build_py import build_py

    cmdclass = {"build_py": _build_py_shipping(build_py, build_info, bool(ext_modules))}
    if build_ext is not None:
        cmdclass["build_ext"] = build_ext
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
            version=local_version(build_info),
            description="Fused Triton and CUDA kernels for long-context, image-heavy document QA models",
            python_requires=">=3.10",
            # kernels/ sits at the top of the repository and installs as docqa_fast.kernels (a
            # top-level "kernels" package would collide with other projects of that name).
            packages=find_packages(include=["docqa_fast", "docqa_fast.*"]) + ["docqa_fast.kernels"],
            package_dir={"docqa_fast.kernels": "kernels"},
            # The per-GPU tile tables (kernels/tuned/*.json) ship with the kernels that read them.
            # (docqa_fast/_build_info.json and _csrc/ are written into the wheel by the commands above.)
            package_data={"docqa_fast.kernels": ["tuned/*.json"]},
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

"""The compiled extension ``docqa_fast._C``: what to compile, whether a build fits the running PyTorch,
and builds made just in time for it.

The extension is compiled against one PyTorch -- its release, its CUDA major and its C++ ABI -- and
must not be loaded under another: PyTorch keeps no C++ ABI promise across releases, and a CUDA 13
build does not load under a CUDA 12 or a CPU PyTorch. The build info written beside the extension
(:func:`build_info`) is checked at import against the running PyTorch (:func:`torch_mismatch`).

A just-in-time build compiles the same sources with ``torch.utils.cpp_extension.load`` into a
cache folder outside the package, keyed by the PyTorch build, the Python ABI and the sources' hash
(``DOCQA_FAST_CACHE_DIR``, else ``$TORCH_EXTENSIONS_DIR/docqa_fast``, else
``~/.cache/docqa_fast/extension``): ``python -m docqa_fast.build`` makes one where there is no source
folder to reinstall (an installed wheel ships the sources as ``docqa_fast/_csrc``), and the import
loads it whenever the installed ``_C`` does not fit. ``DOCQA_FAST_JIT=1`` compiles it at import when
no cached build fits (minutes, once); ``DOCQA_FAST_JIT=0`` ignores the cache. Never by default: an
unasked compile of several minutes at import is worse than a warning.

setup.py loads this file by path (importing the package would import all of it), so it imports
nothing outside the standard library at module level.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CUDA_ARCHS = "8.0;9.0a"
# No -std flag: PyTorch adds the standard its headers need (C++17 or C++20).
CXX_FLAGS = ("-O3",)
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo")
WITH_CUDA_DEFINE = "-DDOCQA_FAST_WITH_CUDA=1"
SOURCE_SUFFIXES = (".cpp", ".cu", ".h")
JIT_ENV = "DOCQA_FAST_JIT"
CACHE_ENV = "DOCQA_FAST_CACHE_DIR"
# Where a wheel carries the sources of its extension (setup.py copies csrc/ there).
PACKAGED_SOURCES = "_csrc"


# ---------------------------------------------------------------------------- what to compile

def source_root(package: Path | None = None) -> Path | None:
    """The extension's sources: csrc/ of a checkout, or the copy a wheel ships in the package
    (``package``: the installed docqa_fast folder, this one by default)."""
    package = package or Path(__file__).resolve().parent
    for root in (package.parent / "csrc", package / PACKAGED_SOURCES):
        if (root / "bindings.cpp").is_file():
            return root
    return None


def source_files(root, suffix: str) -> list[str]:
    return sorted(glob.glob(os.path.join(str(root), "**", f"*{suffix}"), recursive=True))


def local_cuda_archs(torch):
    """The architectures of this machine's GPUs ('9.0a' on Hopper: its wgmma/TMA instructions
    need the arch-specific target), newest last; None without a GPU. Building for the GPU at
    hand only takes half the time of the two-architecture default."""
    if not torch.cuda.is_available():
        return None
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" + ("a" if major == 9 else "") for major, minor in capabilities)


def cuda_archs(torch) -> str:
    """DOCQA_FAST_CUDA_ARCHS, else this machine's GPUs, else the two-architecture default."""
    return os.environ.get("DOCQA_FAST_CUDA_ARCHS") or local_cuda_archs(torch) or DEFAULT_CUDA_ARCHS


def gencode_flags(archs):
    """'8.0;9.0a' -> nvcc -gencode flags (SASS for each arch, PTX for the newest), and the names."""
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


def runs_on(archs, capability) -> bool | None:
    """Whether a build for ``archs`` (its build info's names: '8.0', '9.0a') has kernels for a GPU of
    ``capability`` ((9, 0)), None when the names say nothing certain. SASS for X.Y runs on X.Z for
    Z >= Y, an arch-specific 'X.Ya' only on X.Y; the PTX of the last (not arch-specific) arch is
    compiled by the driver for any newer GPU. A build for the GPUs at hand (a just-in-time cache
    shared by machines, a wheel built on an H100) can lack the GPU of this one."""
    if not archs:
        return None
    parsed = []
    for name in archs:
        specific = name.endswith("a")
        major, _, minor = name.removesuffix("a").partition(".")
        if not (major.isdigit() and minor.isdigit()):
            return None  # a family suffix or a spelling this rule does not know: do not refuse
        parsed.append((int(major), int(minor), specific))
    for major, minor, specific in parsed:
        if major == capability[0] and (minor == capability[1] if specific else minor <= capability[1]):
            return True
    major, minor, specific = parsed[-1]
    return not specific and (major, minor) <= tuple(capability)


def cuda_library_dir(cuda_home):
    """Toolkits keep libcudart in lib64/ or (some packagings) in lib/."""
    for sub in ("lib64", "lib"):
        path = os.path.join(cuda_home, sub)
        if glob.glob(os.path.join(path, "libcudart.so*")):
            return path
    return None


def find_cuda_home(torch_guess):
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
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and cuda_library_dir(home):
            return home
    return None


@dataclass
class Plan:
    """What this machine can compile: ``kind`` 'cuda' (C++ and CUDA sources), 'cpu' (the C++ twins
    only) or 'none' (no compiler), why not more, and the sources. The CUDA architectures are
    chosen when compiling (:func:`cuda_archs`): asking the GPU initialises CUDA."""

    kind: str
    reason: str
    cpp_sources: list[str] = field(default_factory=list)
    cuda_sources: list[str] = field(default_factory=list)
    include_dirs: list[str] = field(default_factory=list)
    cuda_home: str | None = None

    def sources(self) -> list[str]:
        return self.cpp_sources + (self.cuda_sources if self.kind == "cuda" else [])

    def cxx_flags(self) -> list[str]:
        return list(CXX_FLAGS) + ([WITH_CUDA_DEFINE] if self.kind == "cuda" else [])

    def nvcc_flags(self, archs: str) -> list[str]:
        return [*NVCC_FLAGS, *gencode_flags(archs)[0]]


def plan_extension(torch, root, relative_to=None, cuda_home_guess=None) -> Plan:
    """Decide what to compile from ``root`` (csrc/) with this PyTorch and toolchain; source paths
    relative to ``relative_to`` when given (setuptools wants a package's sources relative).
    ``cuda_home_guess``: PyTorch's (torch.utils.cpp_extension.CUDA_HOME; importing that module
    logs a warning where it finds no toolkit, so an import-time cache lookup does without)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return Plan("none", f"no C++ compiler found ({cxx!r} is not on PATH)")

    def rel(paths):
        return [os.path.relpath(p, relative_to) for p in paths] if relative_to else paths

    plan = Plan("cpu", "", rel(source_files(root, ".cpp")), rel(source_files(root, ".cu")),
                [os.path.abspath(str(root))])
    cuda_home = find_cuda_home(cuda_home_guess)
    if torch.version.cuda is None:
        plan.reason = "CUDA kernels not built: PyTorch is a CPU build"
    elif cuda_home is None:
        plan.reason = "CUDA kernels not built: no CUDA toolkit found (nvcc with libcudart in lib64/ or lib/; set CUDA_HOME)"
    else:
        plan.kind, plan.cuda_home = "cuda", cuda_home
    return plan


def use_cuda_home(cpp_extension, plan: Plan) -> None:
    """Point PyTorch's build at the toolkit the plan found: it runs nvcc from its module-level CUDA_HOME."""
    if plan.kind == "cuda":
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = plan.cuda_home


def build_info(plan: Plan, torch, archs: list[str] | None = None) -> dict:
    """What a build compiled and against which PyTorch: written beside the extension once it built,
    read at import by :func:`torch_mismatch` and ``docqa_fast.backends()``."""
    info = {"extension": plan.kind, "reason": plan.reason, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cxx11_abi": bool(torch.compiled_with_cxx11_abi())}
    if plan.kind == "cuda":
        info.update(cuda_archs=archs, cuda_home=plan.cuda_home)
    return info


def write_json(info: dict, path) -> None:
    """Atomically: a reader (an import in another process) never sees half a file, and writers at
    once (every rank of a job after the one compile) each rename a temporary file of their own."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                       dir=os.path.dirname(path))
    try:
        os.fchmod(handle, 0o644)  # mkstemp's 0600 would keep other users (of a shared install or cache) out
        with os.fdopen(handle, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise


# ---------------------------------------------------------------------------- does it fit this PyTorch

def _release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _cuda_of(info: dict) -> str | None:
    """The CUDA version of the PyTorch an extension was built against; build info written before it
    was recorded says it only in the version's local label ('2.14.1+cu130' -> '13.0')."""
    if info.get("torch_cuda"):
        return info["torch_cuda"]
    label = info.get("torch", "").partition("+")[2]
    if label.startswith("cu") and label[2:].isdigit() and len(label) >= 5:
        return f"{label[2:-1]}.{label[-1]}"
    return None


def describe_torch(version: str, cuda: str | None) -> str:
    """'torch 2.14.1+cu130 (CUDA 13.0)', 'torch 2.14.1+cpu (CPU)'."""
    return f"torch {version} ({f'CUDA {cuda}' if cuda else 'CPU'})"


def describe_build(info: dict) -> str:
    """The PyTorch an extension was built for, with its CUDA where its CUDA kernels depend on it."""
    cuda = _cuda_of(info) if info.get("extension") == "cuda" else None
    return f"torch {info.get('torch')}" + (f" (CUDA {cuda})" if cuda else "")


def torch_mismatch(info: dict, torch) -> str | None:
    """Why an extension described by ``info`` must not be loaded under this PyTorch, naming both
    builds; None when it fits (or the info does not say what it was built against). Fits: the same
    release series (2.14.0 and 2.14.1 share the ABI), for CUDA kernels the same CUDA major, and the
    same C++ ABI flag."""
    built = info.get("torch")
    if not built or info.get("extension") not in ("cpu", "cuda"):
        return None
    built_cuda = _cuda_of(info)
    if info.get("extension") == "cuda":
        differs = None
        if _release(built) != _release(torch.__version__):
            differs = "another PyTorch release"
        elif torch.version.cuda is None:
            differs = "its CUDA kernels need a CUDA build of PyTorch"
        elif built_cuda and built_cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
            differs = "another CUDA major version"
    else:
        # The C++ twins link PyTorch's CPU libraries only: any CUDA flavour of the same release fits.
        differs = "another PyTorch release" if _release(built) != _release(torch.__version__) else None
    abi = info.get("cxx11_abi")
    if differs is None and abi is not None and bool(abi) != bool(torch.compiled_with_cxx11_abi()):
        differs = "another C++ ABI (_GLIBCXX_USE_CXX11_ABI)"
    if differs is None:
        return None
    return (f"docqa_fast._C was built for {describe_build(info)} but "
            f"{describe_torch(torch.__version__, torch.version.cuda)} is installed ({differs})")


# ---------------------------------------------------------------------------- just-in-time builds

def jit_setting() -> str:
    """DOCQA_FAST_JIT: 'cached' (unset: use a build in the cache, compile nothing), 'compile' (1:
    compile at import when no cached build fits) or 'off' (0: never use the cache)."""
    value = os.environ.get(JIT_ENV, "").strip().lower()
    if value in ("", "auto"):
        return "cached"
    if value in ("1", "true", "yes", "on"):
        return "compile"
    if value in ("0", "false", "no", "off"):
        return "off"
    raise ValueError(f"{JIT_ENV}={value!r}: expected 1 (compile the extension when needed), 0 (never) or unset")


def cache_root() -> Path | None:
    """The folder of just-in-time builds, outside the package (a wheel's folder may be read-only,
    and the source tree stays clean); None when DOCQA_FAST_CACHE_DIR=off."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in ("off", "0", "none"):
        return None
    if setting:
        return Path(setting).expanduser() / "extension"
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "docqa_fast"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "docqa_fast" / "extension"


def jit_key(plan: Plan, torch, root) -> str:
    """A build's identity: the PyTorch build (version, CUDA, C++ ABI), the Python ABI, what is
    compiled with which fixed flags, and every source and header byte. The CUDA architectures are
    left out (choosing them initialises CUDA, which an import must not do); a build records them."""
    digest = hashlib.sha256(json.dumps([
        torch.__version__, torch.version.cuda, bool(torch.compiled_with_cxx11_abi()), sys.implementation.cache_tag,
        plan.kind, plan.cxx_flags(), list(NVCC_FLAGS)]).encode())
    for suffix in SOURCE_SUFFIXES:
        for path in source_files(root, suffix):
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def jit_folder(plan: Plan, torch, root) -> tuple[Path, str] | None:
    """(the cache folder of this build, its module name), or None when the cache is off."""
    cache = cache_root()
    if cache is None:
        return None
    key = jit_key(plan, torch, root)
    folder = cache / f"torch{torch.__version__}-{sys.implementation.cache_tag}-{plan.kind}-{key}"
    return folder, f"docqa_fast_C_{key}"


def jit_arguments(plan: Plan, folder: Path, name: str, archs: str, verbose: bool = False) -> dict:
    """``torch.utils.cpp_extension.load``'s arguments for ``plan``: the sources, defines and flags
    setup.py gives setuptools (-gencode flags given here keep TORCH_CUDA_ARCH_LIST out)."""
    arguments = dict(name=name, sources=plan.sources(), extra_include_paths=plan.include_dirs,
                     extra_cflags=plan.cxx_flags(), build_directory=str(folder), verbose=verbose,
                     with_cuda=plan.kind == "cuda")
    if plan.kind == "cuda":
        # setup.py defines the macro for nvcc through define_macros, which load() does not take.
        arguments.update(extra_cuda_cflags=[WITH_CUDA_DEFINE, *plan.nvcc_flags(archs)],
                         extra_ldflags=[f"-L{cuda_library_dir(plan.cuda_home)}"])
    return arguments


def _import_built(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jit_extension(compile_missing: bool, verbose: bool = False) -> tuple[object | None, dict | None, str | None]:
    """The extension built just in time for the running PyTorch: (module, its build info, None)
    from the cache, compiled first when ``compile_missing`` and none is there; else (None, None,
    why not -- None when there simply is no cached build)."""
    import torch

    root = source_root()
    if root is None:
        return None, None, "its C++ sources are not installed (a wheel built before they shipped with it)"
    plan = plan_extension(torch, root)
    if cache_root() is None:
        return None, None, f"the build cache is off ({CACHE_ENV}=off)"
    # A cached build loads without the compiler or CUDA toolkit that made it (a runtime image has
    # neither): look for every kind this PyTorch runs, CUDA kernels first, whatever this machine
    # could compile -- when compiling, only the kinds at least as complete as the one it would make.
    kinds = ["cuda", "cpu"] if torch.version.cuda else ["cpu"]
    if compile_missing and plan.kind in kinds:
        kinds = kinds[:kinds.index(plan.kind) + 1]
    for kind in kinds:
        folder, name = jit_folder(plan if kind == plan.kind else Plan(kind, ""), torch, root)
        info_path, library = folder / "build_info.json", folder / f"{name}.so"
        if not (info_path.is_file() and library.is_file()):
            continue
        try:
            return _import_built(library, name), json.loads(info_path.read_text()), None
        except (ImportError, OSError, ValueError) as exc:  # damaged: compiling again (if asked) replaces it
            if not (compile_missing and kind == plan.kind):
                return None, None, f"the build in {folder} does not load ({exc}); rebuild it"
            info_path.unlink(missing_ok=True)
            library.unlink(missing_ok=True)
    if not compile_missing:
        return None, None, None
    if plan.kind == "none":
        return None, None, f"cannot compile it here: {plan.reason}"
    folder, name = jit_folder(plan, torch, root)
    info_path = folder / "build_info.json"
    from torch.utils import cpp_extension

    use_cuda_home(cpp_extension, plan)
    if not cpp_extension.is_ninja_available():
        return None, None, "cannot compile it here: ninja is not installed (pip install ninja)"
    archs = cuda_archs(torch) if plan.kind == "cuda" else ""
    print(f"docqa_fast: compiling docqa_fast._C ({plan.kind}) for torch {torch.__version__} into {folder} "
          f"(minutes on a few cores, once)", file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        module = cpp_extension.load(**jit_arguments(plan, folder, name, archs, verbose=verbose))
    except Exception as exc:  # a compiler error: the ops still run on the other backends
        detail = str(exc).strip().splitlines()
        return None, None, f"compiling it into {folder} failed ({detail[-1] if detail else type(exc).__name__})"
    info = dict(build_info(plan, torch, gencode_flags(archs)[1] if archs else None), jit=str(folder))
    write_json(info, info_path)  # last: only a build that succeeded is ever loaded from the cache
    return module, info, None

"""The layering README's "Repository layout" promises, checked on the imports themselves.

* ``kernels/`` imports nothing of the package outside ``kernels/`` (the kernel modules register
  configs with their own registry and read their own tile tables), never the reference;
* the reference is an oracle: production code imports it only in a family's ``ops.py``, where
  the reference backend is registered in the dispatch table;
* no family imports upward at module level: not the flash-attn interface module, not the
  integrations (both sit above the families).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "docqa_fast"
FAMILIES = ("attention", "inference", "losses", "merge_attention", "packing", "reward")


def _imports(path: Path, top_level_only=False):
    """(module as written, level) of every import in a file (module level only if asked)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            yield (node.module or ""), node.level, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0, []


def _resolve(path: Path, module: str, level: int, package_root: Path, package_name: str) -> str:
    """The absolute dotted name an import in ``path`` refers to."""
    if level == 0:
        return module
    parts = list(path.relative_to(package_root).with_suffix("").parts)
    base = [package_name] + parts[:-level] if len(parts) >= level else []
    return ".".join(base + ([module] if module else []))


def test_kernels_import_nothing_of_the_package_outside_kernels():
    kernels = ROOT / "kernels"
    for path in sorted(kernels.rglob("*.py")):
        for module, level, _ in _imports(path):
            target = _resolve(path, module, level, kernels, "docqa_fast.kernels")
            assert not target.startswith("docqa_fast") or target.startswith("docqa_fast.kernels"), \
                f"{path.relative_to(ROOT)} imports {target}"
            assert "reference" not in target.split("."), f"{path.relative_to(ROOT)} imports the reference"


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py")
                                        if "reference" not in p.relative_to(PACKAGE).parts
                                        and p.name != "testing.py"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_reference_is_imported_only_where_the_reference_backend_is_registered(path):
    for module, level, names in _imports(path):
        target = _resolve(path, module, level, PACKAGE, "docqa_fast")
        uses_reference = target.startswith("docqa_fast.reference") or (
            target == "docqa_fast" and "reference" in names)
        assert not uses_reference or path.name == "ops.py", \
            f"{path.relative_to(ROOT)} imports {target}: production code must not use the oracle"


@pytest.mark.parametrize("family", FAMILIES)
def test_families_do_not_import_upward(family):
    for path in sorted((PACKAGE / family).rglob("*.py")):
        for module, level, _ in _imports(path, top_level_only=True):
            target = _resolve(path, module, level, PACKAGE, "docqa_fast")
            assert not target.startswith(("docqa_fast.flash_attn_interface", "docqa_fast.integrations")), \
                f"{path.relative_to(ROOT)} imports {target} (a layer above the families)"


def test_importing_the_package_imports_no_kernel_module():
    # Triton decides compiled-or-interpreted when a kernel module is imported: the sm_90 compile
    # check's workers import docqa_fast, then switch the interpreter off, then import the kernels.
    # (Also what a user pays at import: the kernels bring torch._dynamo and Triton's JIT.)
    import subprocess
    import sys

    code = ("import sys, docqa_fast; print(sorted(m for m in sys.modules "
            "if m.startswith(('docqa_fast.kernels.', 'kernels.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout

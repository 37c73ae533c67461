"""Compile ``docqa_fast._C`` for the PyTorch installed now: ``python -m docqa_fast.build``.

The extension is compiled against one PyTorch (release, CUDA major, C++ ABI); ``import docqa_fast``
warns when the installed one was built for another, and runs its ops on the other backends. This
rebuilds it, one of two ways:

* from a source folder (a checkout, or the folder pip installed from -- pip records it):
  reinstall it with ``--no-build-isolation`` (the build must see this PyTorch) and ``--no-deps``
  (PyTorch stays as it is); an editable install (``make install``, ``pip install -e``) is rebuilt
  in place, any other is reinstalled from that folder;
* otherwise (an installed wheel), or with ``--jit``: compile the sources the wheel ships into the
  just-in-time cache (``docqa_fast._extension``), which the import then loads.

``--dry-run`` prints what would run. ``MAX_JOBS`` and ``DOCQA_FAST_CUDA_ARCHS`` apply to both
(docs/install.md).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from . import _extension

DISTRIBUTION = "docqa_fast"


def install_source() -> tuple[Path | None, bool]:
    """(the source folder docqa_fast was installed from, whether the install is editable), from
    pip's ``direct_url.json``; a checkout imported without installing is its own source.
    (None, False) when neither is known (installed from a wheel or an index)."""
    try:
        recorded = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        recorded = None
    if recorded:
        url = json.loads(recorded)
        if url.get("url", "").startswith("file://"):
            folder = Path(unquote(urlparse(url["url"]).path))
            if (folder / "setup.py").exists():
                return folder, bool(url.get("dir_info", {}).get("editable"))
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "setup.py").exists() and (checkout / "csrc").is_dir():
        return checkout, True
    return None, False


def rebuild_command(source: Path, editable: bool) -> list[str]:
    install = ["-e", str(source)] if editable else ["--force-reinstall", str(source)]
    return [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", *install]


def _report_in_fresh_process() -> int:
    # A fresh process: this one has already loaded (or failed to load) the old extension.
    return subprocess.call([sys.executable, "-c", "import docqa_fast; print('extension:', docqa_fast.backends()"
                                                  "['extension'])"])


def _jit_main(dry_run: bool) -> int:
    if dry_run:
        import torch

        root = _extension.source_root()
        if root is None:
            print("docqa_fast.build: no sources to compile (csrc/ or the package's _csrc/)", file=sys.stderr)
            return 2
        plan = _extension.plan_extension(torch, root)
        located = _extension.jit_folder(plan, torch, root) if plan.kind != "none" else None
        print(f"would compile docqa_fast._C ({plan.kind}; {plan.reason or 'C++ and CUDA'}) from {root} into "
              f"{located[0] if located else 'nowhere: ' + (plan.reason or 'the cache is off')}")
        return 0
    module, info, why = _extension.jit_extension(compile_missing=True, verbose=True)
    if module is None:
        print(f"docqa_fast.build: {why}", file=sys.stderr)
        return 1
    print(f"docqa_fast.build: built for torch {info['torch']} in {info.get('jit')}")
    return _report_in_fresh_process()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docqa_fast.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--jit", action="store_true",
                        help="compile into the cache folder even where a source folder could be reinstalled")
    args = parser.parse_args(argv)
    source, editable = (None, False) if args.jit else install_source()
    if source is None:
        return _jit_main(args.dry_run)
    command = rebuild_command(source, editable)
    print("$ " + " ".join(command), flush=True)
    if args.dry_run:
        return 0
    status = subprocess.call(command)
    if status != 0:
        print(f"docqa_fast.build: the build failed (exit {status}); its output is above", file=sys.stderr)
        return status
    return _report_in_fresh_process()


if __name__ == "__main__":
    raise SystemExit(main())

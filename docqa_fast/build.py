"""Rebuild ``docqa_fast._C`` for the PyTorch installed now: ``python -m docqa_fast.build``.

The extension is compiled against one PyTorch release and does not load under another (its C++
ABI changes between releases); ``import docqa_fast`` then warns, and the ops run without it. This
reinstalls docqa_fast from the folder it was installed from -- pip records it -- with
``--no-build-isolation`` (the build must see this PyTorch) and ``--no-deps`` (PyTorch stays as it
is): an editable install (``make install``, ``pip install -e``) is rebuilt in place, any other is
reinstalled from that folder. ``--dry-run`` prints the command only. ``MAX_JOBS`` and
``DOCQA_FAST_CUDA_ARCHS`` apply as for any build (README: Install).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m docqa_fast.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    args = parser.parse_args(argv)
    source, editable = install_source()
    if source is None:
        print("docqa_fast.build: cannot tell which source folder docqa_fast was installed from (a wheel or an "
              "index records none). Reinstall it from its source with this PyTorch:\n"
              "  pip install --no-build-isolation --no-deps --force-reinstall <source folder or sdist>",
              file=sys.stderr)
        return 2
    command = rebuild_command(source, editable)
    print("$ " + " ".join(command), flush=True)
    if args.dry_run:
        return 0
    status = subprocess.call(command)
    if status != 0:
        print(f"docqa_fast.build: the build failed (exit {status}); its output is above", file=sys.stderr)
        return status
    # A fresh process: this one has already loaded (or failed to load) the old extension.
    return subprocess.call([sys.executable, "-c", "import docqa_fast; print('extension:', docqa_fast.backends()"
                                                  "['extension'])"])


if __name__ == "__main__":
    raise SystemExit(main())

"""Bad-input cases run in a spawned worker, so a crash or a hang fails one case, not the run.

A family module (``cases_<family>.py``) lists :class:`Case` objects: a call that builds its
inputs and calls one public function or registered op, and what must happen -- an exception
of a given type whose message names the argument, or a normal return (then ``check`` may look
at the result, e.g. a KV cache left bitwise unchanged). :func:`run_family` runs every case on
every backend present here in one worker process (``python -m bad_input.harness``), forcing the
backend with ``DOCQA_FAST_BACKEND`` per case. The worker writes a line before each case starts
and one with its outcome after it ends; when the worker dies (a segfault, an abort) or passes
its time limit, the case that started without ending is reported as the crash or the hang, and
a fresh worker goes on with the cases after it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

TESTS_DIR = Path(__file__).resolve().parent.parent
# A case that runs longer than this is a hang (the worker's own watchdog ends it, per case);
# the parent's limit for a whole worker is a backstop.
CASE_TIMEOUT_S = float(os.environ.get("DOCQA_FAST_BAD_INPUT_TIMEOUT", "60"))
WORKER_TIMEOUT_S = 900.0
_WATCHDOG = "Timeout ("  # what faulthandler writes when it ends a hung case


@dataclass
class Case:
    """One call and what it must do.

    ``error``: the exception type it must raise (a subclass is fine), or None when it must
    return; ``names``: the message must name one of these (as a word: the argument's name).
    ``check(result)`` runs after a normal return and raises AssertionError when the result is
    wrong. ``backends``: where the case runs (default: every backend present).
    """

    name: str
    call: Callable[[], Any]
    error: type | tuple[type, ...] | None = None
    names: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    backends: tuple[str, ...] | None = None
    kind: str = ""  # what is wrong with the input ("dtype", "rank", ...): counted in the report


@dataclass
class Outcome:
    key: str
    status: str  # "ok", "fail", "crash", "hang"
    detail: str = ""


def _arg_pattern(name: str) -> re.Pattern:
    # An argument's name as a word: "k" must not match inside "block_table".
    return re.compile(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])")


def judge(case: Case, result: Any = None, exc: BaseException | None = None) -> str:
    """'' when the call did what the case demands, else what went wrong."""
    if case.error is None:
        if exc is not None:
            return f"expected a normal return, got {type(exc).__name__}: {exc}"
        if case.check is not None:
            try:
                case.check(result)
            except AssertionError as failure:
                return f"wrong result: {failure}"
        return ""
    errors = case.error if isinstance(case.error, tuple) else (case.error,)
    expected = " or ".join(e.__name__ for e in errors)
    if exc is None:
        return f"expected {expected}, but the call returned"
    if not isinstance(exc, errors):
        return f"expected {expected}, got {type(exc).__name__}: {exc}"
    message = str(exc)
    if case.names and not any(_arg_pattern(n).search(message) for n in case.names):
        return f"{type(exc).__name__} does not name {' or '.join(case.names)}: {message}"
    return ""


def keys_for(cases: list[Case], backends: list[str]) -> list[str]:
    return [f"{b}:{c.name}" for c in cases for b in backends if c.backends is None or b in c.backends]


# --------------------------------------------------------------------------------- worker

def _worker(module_name: str, keys: list[str], progress_path: str, case_timeout_s: float) -> None:
    import faulthandler
    import importlib

    import torch

    if torch.cuda.is_available():  # the cases' tensors on the GPU, where the kernels run (conftest's rule)
        torch.set_default_device("cuda")
    module = importlib.import_module(f"bad_input.{module_name}")
    cases = {c.name: c for c in module.cases()}
    with open(progress_path, "a", buffering=1) as progress:
        for key in keys:
            backend, name = key.split(":", 1)
            os.environ["DOCQA_FAST_BACKEND"] = backend
            progress.write(json.dumps({"start": key}) + "\n")
            progress.flush()
            case = cases[name]
            faulthandler.dump_traceback_later(case_timeout_s, exit=True)  # a hang ends the worker, blamed on this case
            try:
                result, exc = case.call(), None
            except Exception as caught:  # the verdict is judge's
                result, exc = None, caught
            faulthandler.cancel_dump_traceback_later()
            verdict = judge(case, result, exc)
            progress.write(json.dumps({"end": key, "status": "fail" if verdict else "ok", "detail": verdict}) + "\n")
            progress.flush()


# ---------------------------------------------------------------------------------- parent

def _read(path: str) -> tuple[dict[str, Outcome], str | None]:
    done, started = {}, None
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        else:
            done[record["end"]] = Outcome(record["end"], record["status"], record["detail"])
            started = None
    return done, started


def run_family(module_name: str, cases: list[Case], backends: list[str], *,
               timeout_s: float = CASE_TIMEOUT_S) -> dict[str, Outcome]:
    """Every case on every backend in ``backends``: {key: outcome}, key ``backend:case``."""
    pending = keys_for(cases, backends)
    outcomes: dict[str, Outcome] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    while pending:
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
            progress = handle.name
        try:
            proc = subprocess.run([sys.executable, "-m", "bad_input.harness", module_name, progress, str(timeout_s)],
                                  input=json.dumps(pending), text=True, capture_output=True, env=env,
                                  timeout=WORKER_TIMEOUT_S)
            hung, returncode, stderr = _WATCHDOG in proc.stderr, proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as expired:
            hung, returncode, stderr = True, None, str(expired.stderr or "")
        done, started = _read(progress)
        os.unlink(progress)
        outcomes.update(done)
        if not hung and returncode == 0:
            missing = [k for k in pending if k not in outcomes]
            for key in missing:
                outcomes[key] = Outcome(key, "fail", "the worker never ran it")
            break
        if started is None:  # died outside any case (an import error, say): every case left fails
            for key in pending:
                outcomes.setdefault(key, Outcome(key, "crash", f"worker exited {returncode}: {stderr[-2000:]}"))
            break
        outcomes[started] = Outcome(started, "hang" if hung else "crash",
                                    f"no answer within {timeout_s:.0f} s" if hung else
                                    f"the worker died (exit {returncode}): {stderr[-2000:]}")
        pending = pending[pending.index(started) + 1:]
    return outcomes


def report(outcomes: dict[str, Outcome]) -> str:
    bad = [o for o in outcomes.values() if o.status != "ok"]
    return "\n".join(f"[{o.status}] {o.key}: {o.detail}" for o in bad)


def present_backends() -> list[str]:
    import docqa_fast

    return [name for name, status in docqa_fast.backends().items() if status.available]


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.stdin.read()), sys.argv[2], float(sys.argv[3]))

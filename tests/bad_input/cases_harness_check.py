"""Cases that misbehave on purpose, for the harness's own test: a segfault, a hang, a wrong
exception type, a message that names nothing."""

from __future__ import annotations

import ctypes
import time

from .harness import Case


def _segfault():
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def _hang():
    time.sleep(3600)


def _raise(error, message):
    def call():
        raise error(message)

    return call


def cases() -> list[Case]:
    return [
        Case("before", _raise(ValueError, "expected x > 0"), ValueError, ("x",)),
        Case("segfault", _segfault, ValueError, ("x",)),
        Case("after-crash", lambda: 1),
        Case("hang", _hang, ValueError, ("x",)),
        Case("after-hang", lambda: 2),
        Case("wrong-type", _raise(RuntimeError, "expected x > 0"), ValueError, ("x",)),
        Case("unnamed", _raise(ValueError, "expected a positive number"), ValueError, ("x",)),
    ]

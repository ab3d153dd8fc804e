"""Ending a command at once (imports nothing of the package, so every part may use it)."""

from __future__ import annotations

import contextlib
import os
import sys


def exit_now(code: int) -> None:
    """Ends the process with `code` at once, its output flushed, skipping the interpreter's teardown:
    after a Ctrl-C that landed while XLA compiled, that teardown crashed (exit 139, not 130). What
    the program wrote is closed by then: the KeyboardInterrupt unwound its `with` blocks."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)

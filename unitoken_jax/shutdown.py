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


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a `kill`, `timeout`, a job manager) to a command: it stops as at a Ctrl-C, with
    the same clean-up (a rerun goes on as after one), said as a SIGTERM, exit status 143. (Before,
    the commands died of it at once: no line, and a picture's temporary file left behind.)"""


# the stops raised by `stop_on_signals`' handlers, in order
STOPS: list[type[KeyboardInterrupt]] = []


def _held_back(frame) -> bool:
    """Whether a signal landed where raising would not stop the program as it should: inside a
    garbage collector's callback, or a compiled extension's initialisation (importlib's extension
    loader creating or executing it: its C code imports further modules, NumPy's among them)."""
    import gc
    from importlib.machinery import ExtensionFileLoader

    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if code in callbacks:
            return True
        if (code.co_name in ("create_module", "exec_module") and code.co_filename.startswith("<frozen importlib")
                and isinstance(frame.f_locals.get("self"), ExtensionFileLoader)):
            return True
        frame = frame.f_back
    return False


def _stop(error: type[KeyboardInterrupt]):
    def handler(signum, frame):
        if _held_back(frame):
            # raised in a garbage collector's callback (JAX's runs at every collection, and imports
            # collect often), Python prints the exception as ignored and goes on: a Ctrl-C in a
            # command's first seconds was lost, and the whole job ran. Raised inside an extension's
            # initialisation (jaxlib's, ml_dtypes' importing NumPy), it is printed there as a traceback
            # and comes out as an ImportError. The signal comes again a moment later, outside them
            import threading

            threading.Timer(0.02, os.kill, (os.getpid(), signum)).start()
            return
        STOPS.append(error)  # (raised inside an extension's initialisation, it comes out as an ImportError)
        raise error
    return handler


def stop_on_signals(*, sigterm: bool) -> None:
    """A command's Ctrl-C as KeyboardInterrupt, never lost in a garbage collector's callback, and
    with `sigterm` a SIGTERM as `Terminated` (not for training, which saves on its own SIGTERM
    handler, nor the server, whose own lets a running batch finish). For programs only: a Python
    caller's own handlers are not replaced."""
    import signal

    signal.signal(signal.SIGINT, _stop(KeyboardInterrupt))
    if sigterm:
        signal.signal(signal.SIGTERM, _stop(Terminated))

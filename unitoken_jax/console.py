"""The `unitoken` command's entry point: the stop signals are set up before the package's heavy
imports (JAX, Orbax: a second or two), so that a Ctrl-C then stops the command (it was lost in a
garbage collector's callback, and the job ran on)."""

from __future__ import annotations

import signal
import sys

from unitoken_jax.shutdown import STOPS, Terminated, exit_now, stop_on_signals


def main() -> int:
    stop_on_signals(sigterm=False)  # (the verb, once known, says whether a SIGTERM stops it so: `cli.main`)
    try:
        from unitoken_jax import cli
    except KeyboardInterrupt as e:
        return _stopped_while_starting(e)
    except ImportError:  # a Ctrl-C inside an extension's initialisation (jaxlib's) comes out as this, unchained
        if STOPS:
            return _stopped_while_starting(STOPS[-1]())
        raise
    code = cli.main()
    # the work is done: a Ctrl-C in the interpreter's teardown would only print an ignored exception
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def _stopped_while_starting(e: BaseException) -> int:
    terminated = isinstance(e, Terminated)
    print(f"\nunitoken: stopped ({'SIGTERM' if terminated else 'Ctrl-C'}) while starting", file=sys.stderr)
    exit_now(143 if terminated else 130)
    return 130  # (not reached)


if __name__ == "__main__":
    sys.exit(main())

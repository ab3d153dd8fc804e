"""One process of a two-process training pod, run by `test_train_loop.py`, where process 1 alone
fails at its third batch with one of the package's own errors (what a process's own data or file
system makes happen on one host only): `python tests/pod_fails_alone.py TRAIN_FLAGS...`."""

import sys

from unitoken_jax.train import __main__ as train_main
from unitoken_jax.train import loop

if "--process_id=1" in sys.argv:
    real, calls = loop._global_batch, []

    def _failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # a ValueError raised in the package's code, in this process alone
            loop._check_workdir("gs://bucket/run")
        return real(*args, **kwargs)

    loop._global_batch = _failing

if __name__ == "__main__":
    train_main.run(sys.argv, as_program=True)

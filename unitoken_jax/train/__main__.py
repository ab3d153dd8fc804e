"""python -m unitoken_jax.train --config configs/stage2.py:tiny --workdir DIR [--config.x=y ...]

`--config` takes a get_config file, or a packaged config by name (`stage2.py:tiny`; a
`configs/NAME.py` that does not exist where the command runs means the packaged one too).

On a TPU pod slice or a SLURM cluster, every worker runs the same command with --distributed
(JAX finds the coordinator itself there); elsewhere give --coordinator, --num_processes and
--process_id. On CPU the processes talk through gloo.
"""

import contextlib
import logging
import os
import re
import sys
import textwrap
import threading
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from unitoken_jax import configs
from unitoken_jax.inference.compilation_cache import enable_compilation_cache
from unitoken_jax.shutdown import exit_now
from unitoken_jax.train.config import TrainConfig
from unitoken_jax.train import loop
from unitoken_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "a stage config file, e.g. configs/stage2.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the final model go")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (implies --distributed)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator)")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
    """Drops the INFO lines of Orbax, TFDS and the storage layers (about a hundred a run, each
    checkpoint's internals); their warnings and errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/tensorstore/", "/etils/", "/tensorflow_datasets/"))
        return record.levelno >= logging.WARNING or not noisy


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_QuietLibraries())
    try:  # a setting out of range stops the run here, said in one line (not a traceback), before any device work
        configs.check_no_label_overrides(config_flags.get_override_values(flags.FLAGS["config"]))
        config = TrainConfig.from_config_dict(_CONFIG.value)
    except ValueError as e:
        sys.exit(f"{_PROG}: {e}")
    if not (_DISTRIBUTED.value or _COORDINATOR.value):
        given = [f"--{f.name}" for f in (_NUM_PROCESSES, _PROCESS_ID) if f.value is not None]
        if given:  # (without them, every "process" of a would-be pod trained alone into one workdir)
            sys.exit(f"{_PROG}: {' and '.join(given)} act only with --coordinator (or --distributed); "
                     "give it, or leave them out to train in one process")
    if _DISTRIBUTED.value or _COORDINATOR.value:
        # CPU collectives between processes go through gloo (no effect on TPU / GPU collectives)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        _watch_the_pod()
    # the first process writes what it compiles; every process reads
    try:
        where = enable_compilation_cache(_CONFIG.value.get("compilation_cache") or None)
    except ValueError as e:  # (a blank setting: one line, as the config's other errors)
        sys.exit(f"{_PROG}: config.compilation_cache: {e}")
    logging.getLogger("unitoken_jax.train").info("compilation cache: %s", where or "off")
    try:
        train_and_evaluate(config, _WORKDIR.value)
    except (ValueError, OSError) as e:  # e.g. a dataset that is not there, rows that do not split over the mesh
        if not _raised_by_this_package(e):  # (JAX's, a library's: a fault to read with its traceback)
            raise
        if _pod_client() is not None:
            _stop_the_pod(f"{_PROG}: {e}")
        sys.exit(f"{_PROG}: {e}")
    abandoned = loop.ABANDONED_COMPILE  # a SIGTERM came while the step compiled: it compiles on in a thread
    if _AS_PROGRAM and abandoned is not None and abandoned.is_alive():
        exit_now(0)  # (the interpreter's teardown under XLA's running compile: no)


# --- a pod whose process fails alone --------------------------------------------------------------
# A process that failed alone (its own data, its own file system) ended at JAX's shutdown barrier,
# while the others waited in the step's collective for it: the whole pod hung for the barrier's
# 300 s, then aborted with a coordination-service error. It now writes what failed into the
# coordination service's key-value store, where every process looks each second, and each ends at
# once saying which process failed and why.
_FAILED_KEY = "unitoken_jax.train/failed"
_POLL_S = 1.0  # (a key-value read a second a process: light for the coordinator of a 256-host pod)
_ACK_TIMEOUT_S = 15.0  # (how long the failed process waits for the others to have read it)
_HOST_LINGER_S = 2.0  # (process 0 holds the store: the others end first, or JAX aborts them)
_TOLD = threading.Event()  # another process's failure was read: the watcher ends this one


def _pod_client():
    """The coordination service's client of this process, None where JAX has none (or hides it: a
    JAX without this private path runs as before, the pod ending at the shutdown barrier)."""
    try:
        from jax._src import distributed

        return getattr(distributed.global_state, "client", None)
    except (ImportError, AttributeError):
        return None


def _watch_the_pod() -> None:
    client, me = _pod_client(), jax.process_index()
    if client is None:
        return

    def watch():
        while True:
            time.sleep(_POLL_S)
            if _pod_client() is None:  # (shut down: the run is over)
                return
            try:
                said = client.key_value_try_get(_FAILED_KEY)
            except Exception:  # noqa: BLE001 - not there (NOT_FOUND), or the service going away
                continue
            if not said or said.startswith(f"process {me}:"):
                continue
            _TOLD.set()  # (this process's own collective fails next, its peer gone: that is not news)
            print(f"{_PROG}: stopping, as another process of the pod failed: {said}", file=sys.stderr)
            with contextlib.suppress(Exception):
                client.key_value_set(f"{_FAILED_KEY}/read/{me}", "1")
            if me == 0:
                time.sleep(_HOST_LINGER_S)
            exit_now(1)

    threading.Thread(target=watch, name="unitoken-pod-watch", daemon=True).start()


def _stop_the_pod(message: str, code: int = 1) -> None:
    """Says `message`, tells the pod's other processes (`_watch_the_pod`), waits until they have
    read it and ends this process without JAX's shutdown barrier, which the others, waiting in a
    collective, would never reach. A process the watcher is ending already only waits for that."""
    if _TOLD.is_set():
        time.sleep(_HOST_LINGER_S + 10)
        exit_now(code)
    print(message, file=sys.stderr)
    client = _pod_client()
    if client is not None:
        with contextlib.suppress(Exception):  # (another process's failure there first: ALREADY_EXISTS)
            client.key_value_set(_FAILED_KEY, f"process {jax.process_index()}: {message}")
        others = set(range(jax.process_count())) - {jax.process_index()}
        deadline = time.time() + _ACK_TIMEOUT_S
        while others and time.time() < deadline:
            for i in list(others):
                with contextlib.suppress(Exception):
                    if client.key_value_try_get(f"{_FAILED_KEY}/read/{i}"):
                        others.discard(i)
            time.sleep(0.1)
    exit_now(code)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raised_by_this_package(error: BaseException) -> bool:
    """Whether `error` was raised in this package's code: its messages are written for the person
    running the command (what is wrong, what to do), so they are said in one line."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep)


# what the command is called where its messages say so: `unitoken train` or `python -m unitoken_jax.train`
# (`run` sets it; the first said "unitoken_jax.train" in some lines and its own name in others)
_PROG = "unitoken_jax.train"
_AS_PROGRAM = False  # (`run`'s as_program: the process is the command's own, and may end at once)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a `--config.KEY` the config does not have said in one line (ml_collections
    raises it as an AttributeError, with a did-you-mean, from inside the parser), and a flag that is
    not one (or missing) said as the other verbs' usage errors are: one line, exit status 2 (absl's
    "FATAL Flags parsing error", exit 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        said = str(e).strip()
        if "Traceback" in said:  # a user's own config file failed: its traceback says where, as absl showed it
            said = "\n" + textwrap.indent(said, "  ")
        else:  # (absl's "flag --config=None: Flag --config must have a value other than None.", each a line)
            said = "; ".join(re.sub(r"^flag --(\S+)=None: Flag --\1 must have a value other than None\.$",
                                    r"--\1 is required", line.strip()) for line in said.splitlines() if line.strip())
            said += " (--help lists the flags)"
        print(f"{_PROG}: error: {said}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:
        unknown = configs.unknown_field(e)
        flag = unknown and next((a.split("=")[0] for a in argv if a.startswith("--config.")
                                 and unknown[0] in a.split("=")[0].split(".")), None)
        if flag is None:  # not an override's: not ours to explain
            raise
        key, hint = unknown
        if key == "quantize" and not hint:  # (a model's field, left out of the training configs on purpose)
            hint = ("int8 weights are for inference only: train in float, then quantize the result "
                    "(unitoken convert --from final --to final-int8 --quantize int8)")
        if key == "lora" and not hint:  # (the stage configs train whole weights; the fine-tuning ones adapters)
            hint = ("LoRA adapters are trained by the fine-tuning config: --config finetune.py:lora "
                    "(then --config.model.lora.rank=...)")
        sys.exit(f"{_PROG}: {flag}: the config has no field {key!r}" + (f"; {hint}" if hint else ""))


def _check_config(argv: list[str]) -> None:
    """A ValueError in one line where `--config` names a packaged config that is not a stage's (the
    model presets, the stages' builder) or a variant its file does not have (absl printed the
    config's own error inside a traceback, as a flags parsing error)."""
    spec = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None) \
        or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return
    file = spec.partition(":")[0]
    name = os.path.basename(file)[:-3]
    if os.path.dirname(os.path.abspath(file)) == os.path.dirname(os.path.abspath(configs.__file__)) \
            and name in configs.PACKAGED and name not in configs.TRAINING:
        raise ValueError(f"--config {spec}: {name}.py is not a training config; give one of "
                         f"{', '.join(t + '.py' for t in configs.TRAINING)} (e.g. stage2.py:tiny)")
    try:
        configs.get_config(spec)
    except ValueError as e:
        if not _raised_by_this_package(e):  # (a user's own config file's error: absl's traceback says where)
            return
        raise ValueError(f"--config {spec}: {e}") from None


def run(argv=None, *, as_program: bool | None = None) -> None:
    """Parses `argv` (default: sys.argv) with `--config` resolved, then trains. `as_program` (default:
    whether `argv` is None) ends the process at once on Ctrl-C (`shutdown.exit_now`); a call from Python
    gets SystemExit(130) instead."""
    global _PROG, _AS_PROGRAM
    as_program = argv is None if as_program is None else as_program
    _AS_PROGRAM = as_program
    argv = sys.argv if argv is None else argv
    _PROG = "unitoken train" if argv[:1] == ["unitoken train"] else "unitoken_jax.train"
    try:
        argv = configs.quote_path_lists(configs.resolve_argv(argv))
        _check_config(argv)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{_PROG}: {e}")
    try:
        app.run(main, argv=argv, flags_parser=_parse_flags)
    except Exception as e:  # noqa: BLE001 - JAX's, a library's: its traceback, and on a pod the others told
        if _pod_client() is None:  # (first: a process count would start a backend that may be what failed)
            raise
        if not _TOLD.is_set():
            import traceback

            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        _stop_the_pod(f"{_PROG}: {type(e).__name__}: {first}")
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; the checkpoints written stay
        print(f"\n{_PROG}: stopped (Ctrl-C); a rerun with the same --workdir resumes from its last checkpoint "
              "(a SIGTERM instead saves the step it is at first)", file=sys.stderr)
        if as_program:
            exit_now(130)  # (the loop has closed its checkpointer and writers by now)
        sys.exit(130)


if __name__ == "__main__":
    run()

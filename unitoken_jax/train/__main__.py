"""python -m unitoken_jax.train --config configs/stage2.py:tiny --workdir DIR [--config.x=y ...]

`--config` takes a get_config file, or a packaged config by name (`stage2.py:tiny`; a
`configs/NAME.py` that does not exist where the command runs means the packaged one too).

On a TPU pod slice or a SLURM cluster, every worker runs the same command with --distributed
(JAX finds the coordinator itself there); elsewhere give --coordinator, --num_processes and
--process_id. On CPU the processes talk through gloo.
"""

import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from unitoken_jax import configs
from unitoken_jax.inference.compilation_cache import enable_compilation_cache
from unitoken_jax.train.config import TrainConfig
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
        sys.exit(f"unitoken_jax.train: {e}")
    if _DISTRIBUTED.value or _COORDINATOR.value:
        # CPU collectives between processes go through gloo (no effect on TPU / GPU collectives)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # the first process writes what it compiles; every process reads
    try:
        where = enable_compilation_cache(_CONFIG.value.get("compilation_cache") or None)
    except ValueError as e:  # (a blank setting: one line, as the config's other errors)
        sys.exit(f"unitoken_jax.train: config.compilation_cache: {e}")
    logging.getLogger("unitoken_jax.train").info("compilation cache: %s", where or "off")
    try:
        train_and_evaluate(config, _WORKDIR.value)
    except (ValueError, OSError) as e:  # e.g. a dataset that is not there, rows that do not split over the mesh
        if not _raised_by_this_package(e):  # (JAX's, a library's: a fault to read with its traceback)
            raise
        sys.exit(f"unitoken_jax.train: {e}")


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raised_by_this_package(error: BaseException) -> bool:
    """Whether `error` was raised in this package's code: its messages are written for the person
    running the command (what is wrong, what to do), so they are said in one line."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a `--config.KEY` the config does not have said in one line (ml_collections
    raises it as an AttributeError, with a did-you-mean, from inside the parser)."""
    try:
        return app.parse_flags_with_usage(argv)
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
        sys.exit(f"unitoken_jax.train: {flag}: the config has no field {key!r}" + (f"; {hint}" if hint else ""))


def run(argv=None, *, as_program: bool | None = None) -> None:
    """Parses `argv` (default: sys.argv) with `--config` resolved, then trains. `as_program` (default:
    whether `argv` is None) ends the process at once on Ctrl-C (`shutdown.exit_now`); a call from Python
    gets SystemExit(130) instead."""
    as_program = argv is None if as_program is None else as_program
    argv = sys.argv if argv is None else argv
    try:
        argv = configs.resolve_argv(argv)
    except FileNotFoundError as e:
        sys.exit(f"{argv[0]}: {e}")
    try:
        app.run(main, argv=argv, flags_parser=_parse_flags)
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; the checkpoints written stay
        print(f"\n{argv[0]}: stopped (Ctrl-C); a rerun with the same --workdir resumes from its last checkpoint "
              "(a SIGTERM instead saves the step it is at first)", file=sys.stderr)
        if as_program:
            from unitoken_jax.shutdown import exit_now

            exit_now(130)  # (the loop has closed its checkpointer and writers by now)
        sys.exit(130)


if __name__ == "__main__":
    run()

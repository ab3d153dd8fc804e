"""python -m unitoken_jax.train --config configs/stage2.py:tiny --workdir DIR [--config.x=y ...]

On a TPU pod slice or a SLURM cluster, every worker runs the same command with --distributed
(JAX finds the coordinator itself there); elsewhere give --coordinator, --num_processes and
--process_id. On CPU the processes talk through gloo.
"""

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a stage config file, e.g. configs/stage2.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and the final model go")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (implies --distributed)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    if _DISTRIBUTED.value or _COORDINATOR.value:
        # CPU collectives between processes go through gloo (no effect on TPU / GPU collectives)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from unitoken_jax.train.loop import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)

"""Stage II: everything trains on understanding and generation, 1:1 in every batch. See configs/stages.py.

    python -m unitoken_jax.train --config configs/stage2.py:tiny --workdir /tmp/stage2

A sweep (learning rate x seed, 6 runs; see `sweep` below and unitoken_jax/sweep.py):

    unitoken sweep configs/stage2.py:tiny --root /tmp/stage2_sweep --run-locally
    unitoken sweep configs/stage2.py --root /mnt/bucket/sweeps/stage2 --print-commands \\
        --set init_from.paths=/mnt/bucket/stage1 --set data.sources=/data/meta.yaml \\
        --launcher "launch/tpu_train.sh --name stage2-{i} --zone ZONE --project PROJECT {args}"
    unitoken sweep --root /tmp/stage2_sweep --summary-only
"""

from unitoken_jax.configs import stages as _stages


def get_config(arg: str = ""):
    return _stages.stage_config(2, arg)


def sweep(add, arg: str = ""):
    """big_vision's convention: `add(**{"dotted.key": value, ...})` once per run. Here the learning
    rate at 0.5x, 1x and 2x the variant's own, times data seeds 0 and 1. (`unitoken sweep` passes the
    config argument, `tiny` in `configs/stage2.py:tiny`, as `arg` when `sweep` takes one.)"""
    _stages.learning_rate_seed_sweep(add, 2, arg)

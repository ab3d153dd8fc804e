"""Stage III: instruction fine-tuning of everything (the paper's third stage). See configs/stages.py.

    python -m unitoken_jax.train --config configs/stage3.py:tiny --workdir /tmp/stage3

A sweep (learning rate x seed, 6 runs; see `sweep` below and unitoken_jax/sweep.py):

    unitoken sweep configs/stage3.py:tiny --root /tmp/stage3_sweep --run-locally
    unitoken sweep configs/stage3.py --root /mnt/bucket/sweeps/stage3 --print-commands \\
        --set init_from.paths=/mnt/bucket/stage2 --set data.sources=/data/meta.yaml \\
        --launcher "launch/tpu_train.sh --name stage3-{i} --zone ZONE --project PROJECT {args}"
    unitoken sweep --root /tmp/stage3_sweep --summary-only
"""

from unitoken_jax.configs import stages as _stages


def get_config(arg: str = ""):
    return _stages.stage_config(3, arg)


def sweep(add, arg: str = ""):
    """big_vision's convention: `add(**{"dotted.key": value, ...})` once per run. Here the learning
    rate at 0.5x, 1x and 2x the variant's own, times data seeds 0 and 1. (`unitoken sweep` passes the
    config argument, `tiny` in `configs/stage3.py:tiny`, as `arg` when `sweep` takes one.)"""
    _stages.learning_rate_seed_sweep(add, 3, arg)

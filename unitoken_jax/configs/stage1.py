"""Stage I: the ViT and adapter learn on captions; the decoder is frozen. See configs/stages.py.

    python -m unitoken_jax.train --config configs/stage1.py:tiny --workdir /tmp/stage1

A sweep (learning rate x seed, 6 runs; see `sweep` below and unitoken_jax/sweep.py):

    unitoken sweep configs/stage1.py:tiny --root /tmp/stage1_sweep --run-locally
    unitoken sweep configs/stage1.py --root /mnt/bucket/sweeps/stage1 --print-commands \\
        --set init_from.paths=/ckpt/Lumina-mGPT-7B-512 --set data.sources=/data/meta.yaml \\
        --launcher "launch/tpu_train.sh --name stage1-{i} --zone ZONE --project PROJECT {args}"
    unitoken sweep --root /tmp/stage1_sweep --summary-only
"""

from unitoken_jax.configs import stages as _stages


def get_config(arg: str = ""):
    return _stages.stage_config(1, arg)


def sweep(add, arg: str = ""):
    """big_vision's convention: `add(**{"dotted.key": value, ...})` once per run. Here the learning
    rate at 0.5x, 1x and 2x the variant's own, times data seeds 0 and 1. (`unitoken sweep` passes the
    config argument, `tiny` in `configs/stage1.py:tiny`, as `arg` when `sweep` takes one.)"""
    _stages.learning_rate_seed_sweep(add, 1, arg)

"""Stage 2 of UniToken's training: `python -m unitoken_jax.train --config configs/stage2.py[:tiny|:anyres]`.

The config itself ships with the package (unitoken_jax/configs/stage2.py, built from
unitoken_jax/configs/stages.py); this file is the one to copy and edit: change `get_config`
below, e.g. `config.optimizer.learning_rate = 2e-5`, or its `sweep`.
"""

from unitoken_jax.configs import stage2 as _packaged


def get_config(arg: str = ""):
    config = _packaged.get_config(arg)
    return config


def sweep(add, arg: str = ""):
    _packaged.sweep(add, arg)

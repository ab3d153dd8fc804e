"""Fine-tuning the release on one host: `python -m unitoken_jax.train --config configs/finetune.py[:lora|:full|:tiny]`.

The config itself ships with the package (unitoken_jax/configs/finetune.py); this file is the one
to copy and edit: change `get_config` below, e.g. `config.model.lora.rank = 32`, or its `sweep`.
"""

from unitoken_jax.configs import finetune as _packaged


def get_config(arg: str = ""):
    config = _packaged.get_config(arg)
    return config


def sweep(add, arg: str = ""):
    _packaged.sweep(add, arg)

"""The model presets: `unitoken init --config configs/model.py:tiny` (or `:7b`, `:7b_anyres`).

They ship with the package (unitoken_jax/configs/model.py); this file is the one to copy and
edit for a model of another size.
"""

from unitoken_jax.configs import model as _packaged


def get_config(arg: str = "tiny"):
    config = _packaged.get_config(arg)
    return config

"""Stage II: everything trains on understanding and generation, 1:1 in every batch. See configs/stages.py.

    python -m unitoken_jax.train --config configs/stage2.py:tiny --workdir /tmp/stage2
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("unitoken_configs_stages",
                                               os.path.join(os.path.dirname(os.path.abspath(__file__)), "stages.py"))
_stages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stages)


def get_config(arg: str = ""):
    return _stages.stage_config(2, arg)

"""launch/aot_check.py compiles the real train step for a TPU slice from this CPU machine (needs
libtpu: pip install -e '.[tpu]'); here on v5e:2x2 with the tiny model, and FSDP really splits the
state four ways."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_step_compiles_for_v5e_2x2_and_fsdp_splits_the_state():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'); CI installs it")
    spec = importlib.util.spec_from_file_location("aot_check", os.path.join(ROOT, "launch", "aot_check.py"))
    aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot)
    compiled, _, n_params, flops, chips, _ = aot.compile_step("v5e:2x2", batch=4, seq=256, mesh_shape=(1, 4, 1),
                                                              remat="full", model="tiny")
    assert chips == 4
    mem = compiled.memory_analysis()
    # the state is params + Adam's two moments in float32; FSDP over 4 chips leaves ~1/4 of it on each
    state_bytes = 3 * 4 * n_params
    assert 0 < mem.argument_size_in_bytes < 0.5 * state_bytes
    assert mem.temp_size_in_bytes > 0
    assert flops > 6 * n_params * 4 * 256

"""The released 7B configs, checked with jax.eval_shape only (no memory)."""

import jax
import numpy as np
import pytest

import unitoken_jax
from configs.model import get_config
from unitoken_jax.convert.hf import abstract_params


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["7b", "7b_anyres"])
def test_7b_parameter_counts(name):
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config(name).model)
    params = abstract_params(cfg)
    # What the release's tensors add up to, from their shapes (Chameleon-7B, model_parallel_size=1:
    # QK-norm weight and bias are [1, 128]; SigLIP so400m/14 vision tower without its head).
    d, f, v, layers, hd = 4096, 11008, 65536, 32, 128
    decoder = 2 * v * d + d + layers * (4 * d * d + 3 * d * f + 2 * d + 4 * 1 * hd)
    vd, vf, vl = 1152, 4304, 27
    vision = (vd * 3 * 14 * 14 + vd) + 729 * vd + 2 * vd + vl * (4 * (vd * vd + vd) + 2 * vd * vf + vf + vd + 4 * vd)
    adapter = vd * d + d + d * d + d
    got = {k: _count(params[k]) for k in ("decoder", "vit", "adapter")}
    assert got == {"decoder": decoder, "vit": vision, "adapter": adapter}
    assert abs(got["decoder"] / 7.01e9 - 1) < 1e-3
    assert abs(got["vit"] / 0.413e9 - 1) < 1e-3
    assert abs(got["adapter"] / 21.5e6 - 1) < 1e-3


def test_7b_shapes_and_dtypes():
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("7b").model)
    assert (cfg.dtype, cfg.param_dtype, cfg.remat_policy) == ("bfloat16", "float32", "full")
    p = abstract_params(cfg)
    attn = p["decoder"]["layers"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (32, 4096, 32, 128)
    assert attn["q_norm"]["scale"].shape == (32, 1, 128)
    assert p["vit"]["position_embedding"].shape == (729, 1152)


def test_unknown_config_field_is_an_error():
    d = get_config("tiny").model.to_dict()
    d["decoder"]["num_layer"] = 3
    with pytest.raises(ValueError, match="num_layer"):
        unitoken_jax.UniTokenConfig.from_dict(d)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_configs_build_and_differ_as_the_recipe_says(stage):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"stage{stage}.py")
    spec = importlib.util.spec_from_file_location(f"stage{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    full, tiny = module.get_config(""), module.get_config("tiny")
    unitoken_jax.UniTokenConfig.from_dict(full.model.to_dict()).validate()
    unitoken_jax.UniTokenConfig.from_dict(tiny.model.to_dict()).validate()
    assert full.optimizer.trainable == ("vision" if stage == 1 else "all")
    assert tuple(full.data.mix) == ((1, 0) if stage == 1 else (1, 1))
    assert full.optimizer.learning_rate == {1: 1e-3, 2: 1e-5, 3: 5e-6}[stage]
    assert full.optimizer.vit_lr_scale == (1e-2 if stage == 1 else 1.0)
    assert full.init_from.kind == ("checkpoint" if stage == 1 else "stage")
    assert full.model.decoder.dropout == 0.05 and full.model.z_loss_weight == 1e-5  # DESIGN.md section 2
    assert tiny.init_from.kind == "random" and tiny.data.demo
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("huge")

"""LoRA fine-tuning runs (configs/finetune.py:tiny on the drawn demo data): only the adapters
change and only they have optimizer state, the base stays bit-identical in bfloat16, the run's
PEFT export equals its final model, and a stopped run resumes bit-exactly."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from unitoken_jax.configs import finetune
from unitoken_jax.data.demo import build_demo_dataset
from unitoken_jax.model import UniTokenModel, load
from unitoken_jax.models import lora as lora_lib
from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.sweep import apply_overrides
from unitoken_jax.train.config import TrainConfig
from unitoken_jax.train.loop import train_and_evaluate
from unitoken_jax.train.program import build_program, make_mesh


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_demo_dataset(str(tmp_path_factory.mktemp("demo")), n=64)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny model saved in our format: the checkpoint a fine-tune starts from."""
    config = UniTokenConfig.from_dict(finetune.get_config("tiny").model.to_dict()).replace(lora=None,
                                                                                            param_dtype="float32")
    path = str(tmp_path_factory.mktemp("base") / "model")
    UniTokenModel.random(config, seed=7).save(path)
    return path


def _config(data, base, **overrides):
    c = finetune.get_config("tiny")
    c.data.update(demo=False, sources=(data,), num_threads=1)
    c.init_from.update(kind="checkpoint", paths=(base,))
    c.mesh.num_devices = 1
    c.update(total_steps=4, log_every=2, checkpoint_every=100)
    return apply_overrides(c, overrides)


def _raw_state(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    return checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                                tree))


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data, base):
    """A 4-step LoRA run from `base`, uninterrupted."""
    workdir = str(tmp_path_factory.mktemp("lora") / "whole")
    train_and_evaluate(_config(data, base), workdir)
    return workdir


def test_a_lora_run_trains_the_adapters_alone(whole, base):
    workdir = whole
    start = load(base, param_dtype=None)
    final = load(os.path.join(workdir, "final"), param_dtype=None)
    assert final.config.lora is not None and final.config.lora.rank == 8
    trained_base, adapters = lora_lib.split(final.params)
    flat = traverse_util.flatten_dict(trained_base)
    assert all(v.dtype == jax.numpy.bfloat16 for p, v in flat.items() if p[-1] == "kernel")  # held in bf16
    # the base, bit for bit (the start rounded to bf16 once): nothing but the adapters moved
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(a.dtype)),
                 trained_base, start.params)
    b_factors = [v for p, v in traverse_util.flatten_dict(adapters).items() if p[-1] == "lora_b"]
    assert len(b_factors) == 7 and all(np.abs(np.asarray(v)).max() > 0 for v in b_factors)  # no B is left zero

    # optimizer state for the adapters alone
    opt = _raw_state(workdir, 4)["opt_state"]
    leaves = [(tuple(str(getattr(k, "key", k)) for k in p), v) for p, v in jax.tree_util.tree_leaves_with_path(opt)]
    arrays = [(p, v) for p, v in leaves if np.ndim(v) > 0]
    assert arrays and all(p[-1] in ("lora_a", "lora_b") for p, _ in arrays), [p for p, _ in arrays][:5]

    # the PEFT export of the run equals its final model (merged at load vs applied at run time)
    tokens = np.arange(1, 25).reshape(2, 12) + 8900
    via_peft = load(base, adapters=os.path.join(workdir, "adapters"), param_dtype="bfloat16")
    np.testing.assert_allclose(np.asarray(via_peft.text_logits(tokens)), np.asarray(final.text_logits(tokens)),
                               atol=1e-2, rtol=0)  # bf16 base: the merge rounds the sum once more


def test_a_stopped_lora_run_resumes_bit_exactly(tmp_path, data, base, whole):
    interrupted = str(tmp_path / "interrupted")
    train_and_evaluate(_config(data, base, stop_after=2), interrupted)
    assert os.listdir(os.path.join(interrupted, "checkpoints")) == ["2"]
    train_and_evaluate(_config(data, base), interrupted)
    a, b = _raw_state(interrupted, 4), _raw_state(whole, 4)
    assert int(a["step"]) == 4
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_lora_and_the_optimizer_must_agree(data, base):
    c = _config(data, base, **{"optimizer.trainable": "all"})
    with pytest.raises(ValueError, match="model.lora is set but optimizer.trainable='all'"):
        build_program(TrainConfig.from_config_dict(c), make_mesh(TrainConfig.from_config_dict(c).mesh))
    c = _config(data, base)
    c.model.lora = None
    with pytest.raises(ValueError, match="trainable='lora' needs adapters"):
        build_program(TrainConfig.from_config_dict(c), make_mesh(TrainConfig.from_config_dict(c).mesh))
    c = _config(data, base, **{"model.lora.targets": ("q_proj", "attention")})
    with pytest.raises(ValueError, match="unknown lora target.*'attention'"):
        TrainConfig.from_config_dict(c)

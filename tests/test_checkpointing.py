"""Stop at step k and resume from the checkpoint = the uninterrupted run, bit for bit; restore
onto a different mesh; the keep policy."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from test_train_step import _batch, _setup
from unitoken_jax import sharding
from unitoken_jax.models.unitoken import param_logical_specs
from unitoken_jax.train.checkpoint import Checkpointer
from unitoken_jax.train.optimizer import OptimizerConfig

OPT = OptimizerConfig(learning_rate=1e-3, total_steps=20)


def test_resume_equals_the_uninterrupted_run(tmp_path):
    batches = [_batch(i) for i in range(6)]
    state, step = _setup(OPT)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
    for i, b in enumerate(batches):
        state, _ = step(state, b)
        ckpt.save(i + 1, state, data_state={"next_index": i + 1, "seen": [f"sample-{j}" for j in range(i + 1)]})
    ckpt.wait()
    assert sorted(ckpt.manager.all_steps()) == [5, 6]  # keep policy
    uninterrupted = state

    fresh_state, step = _setup(OPT)  # a new start: same structure, different object
    resumed, data = Checkpointer(str(tmp_path / "ckpt")).restore(jax.eval_shape(lambda: fresh_state), step=5)
    assert data == {"next_index": 5, "seen": [f"sample-{j}" for j in range(5)]}
    resumed, _ = step(resumed, batches[data["next_index"]])
    assert int(resumed.step) == int(uninterrupted.step) == 6
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (resumed.params, resumed.opt_state), (uninterrupted.params, uninterrupted.opt_state))
    np.testing.assert_array_equal(jax.random.key_data(resumed.rng), jax.random.key_data(uninterrupted.rng))


def test_restore_onto_a_different_mesh(tmp_path):
    state, step = _setup(OPT)
    state, _ = step(state, _batch())
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(1, state)
    mesh = sharding.make_mesh(fsdp=4, tensor=2, devices=jax.devices()[:8])
    from test_train_step import _config

    specs = param_logical_specs(_config())
    param_sh = sharding.logical_to_sharding(specs, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda: state)
    by_shape = {p.shape: s for p, s in zip(jax.tree.leaves(abstract.params), jax.tree.leaves(param_sh))}
    target = abstract.replace(
        params=jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract.params, param_sh),
        opt_state=jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=by_shape.get(a.shape, replicated)
                                                              if a.ndim else replicated), abstract.opt_state))
    target = jax.tree.map(lambda a: a if getattr(a, "sharding", None) is not None else
                          jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), target)
    restored, _ = Checkpointer(str(tmp_path / "ckpt")).restore(target)
    kernel = restored.params["decoder"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    # the key too lands on the new mesh, not on the device it was saved from (on a slice without
    # that device, the restore failed and every checkpoint was called damaged)
    assert restored.rng.sharding.device_set == set(jax.devices()[:8])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored.params, state.params)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, caplog):
    """A checkpoint whose data-iterator item is missing resumed silently with a fresh data order,
    and damage to the latest checkpoint blocked every restart (issue 15, item 6): the newest
    complete one is used, the skipped ones are named and set aside, and the run can save them again."""
    import logging
    import os
    import shutil

    import pytest

    from unitoken_jax.convert.files import CheckpointError

    state, step = _setup(OPT)
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, max_to_keep=5, async_save=False)
    states = {}
    for i in range(4):
        state, _ = step(state, _batch(i))
        ckpt.save(i + 1, state, data_state={"next_index": i + 1})
        states[i + 1] = state
    shutil.rmtree(os.path.join(directory, "4", "data"))  # no data-iterator state
    params_dir = os.path.join(directory, "3", "state")
    for root, _, files in os.walk(params_dir):  # array data gone
        for name in files:
            if not name.startswith("_"):
                os.remove(os.path.join(root, name))
    abstract = jax.eval_shape(lambda: state)
    with caplog.at_level(logging.WARNING):
        step_found, restored, data = Checkpointer(directory).restore_latest_complete(abstract)
    assert step_found == 2 and data == {"next_index": 2}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored.params, states[2].params)
    assert "step 4" in caplog.text and "data" in caplog.text and "step 3" in caplog.text
    step_3 = next(r.getMessage() for r in caplog.records if "step 3 " in r.getMessage())
    # the storage layer's reason (which array of which database), without Orbax's wrapper or the spec's JSON
    assert "OCDBT database" in step_3 and not any(s in step_3 for s in ("bound method", "tensorstore_spec")), step_3
    assert os.path.isdir(os.path.join(directory, "4.damaged")) and not os.path.exists(os.path.join(directory, "4"))
    again = Checkpointer(directory, async_save=False)
    assert again.save(3, restored, data_state={"next_index": 3}, force=True)  # the run saves step 3 again
    for s in ("1", "2", "3"):
        shutil.rmtree(os.path.join(directory, s, "data"))
    with pytest.raises(CheckpointError, match="no checkpoint .* can be resumed"):
        Checkpointer(directory).restore_latest_complete(abstract)


def test_a_checkpoint_of_another_optimizer_layout_is_refused_by_name_not_resumed(tmp_path, monkeypatch):
    """LoRA adapters on the vision tower were labelled "train" until they took the ViT's rate
    ("vit"); Orbax restored such a checkpoint in its own layout (it does not enforce the target's
    tree where a label's whole state was empty), the run said "resumed" and failed at its first
    step with a pytree mismatch. The restore names the difference; nothing is set aside."""
    import os

    import pytest

    from test_train_step import _config
    from unitoken_jax.convert.files import CheckpointError
    from unitoken_jax.model import UniTokenModel
    from unitoken_jax.models import lora
    from unitoken_jax.models.config import LoraConfig
    from unitoken_jax.train import optimizer
    from unitoken_jax.train.step import init_state

    params = UniTokenModel.random(_config().replace(lora=LoraConfig(rank=4, targets=("q_proj", "vision"))), 0).params
    config = OptimizerConfig(learning_rate=1e-3, total_steps=20, trainable="lora")
    labels = optimizer.param_labels
    monkeypatch.setattr(optimizer, "param_labels", lambda tree, trainable="all": jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if lora.is_adapter(p) else "frozen", tree))  # the labels before 2026-12-06
    tx = optimizer.make_optimizer(config, params)
    saved = init_state(params, tx)
    monkeypatch.setattr(optimizer, "param_labels", labels)
    directory = str(tmp_path / "ckpt")
    Checkpointer(directory, async_save=False).save(1, saved, data_state={"next_index": 1})
    now = init_state(params, optimizer.make_optimizer(config, params))
    with pytest.raises(CheckpointError, match="laid out differently from this run.s.*vision tower.* only in this run"):
        Checkpointer(directory).restore_latest_complete(jax.tree.map(  # placed, as a run's abstract state is
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), now))
    assert os.listdir(directory) == ["1"]


def test_checkpoints_of_another_optimizer_layout_are_refused_as_such_not_taken_for_damage(tmp_path, monkeypatch):
    """A resume with accumulation_steps 1 -> 2 (or LoRA turned on): Orbax refused each step's tree,
    which was taken for damage: every checkpoint was named unreadable, inviting their deletion."""
    import dataclasses
    import os

    import pytest

    state, _ = _setup(OPT)
    directory = str(tmp_path / "ckpt")
    Checkpointer(directory, async_save=False).save(1, state, data_state={"next_index": 1})
    other, _ = _setup(dataclasses.replace(OPT, accumulation_steps=2))
    restores = []
    monkeypatch.setattr(Checkpointer, "restore", lambda *a, **k: restores.append(1))
    with pytest.raises(ValueError, match=r"laid out differently from this run's \(opt_state: \d+ arrays there, "
                                         r"\d+ here\): .*optimizer.accumulation_steps"):
        Checkpointer(directory).restore_latest_complete(jax.eval_shape(lambda: other))
    assert not restores and os.listdir(directory) == ["1"]


def test_checkpoints_of_a_model_of_other_sizes_are_refused_before_any_restore(tmp_path, monkeypatch):
    """A workdir resumed with another model config (intermediate_size 128 -> 256): every step's
    restore was tried and taken for damage, each failing after Orbax had started its reads, and
    the one line saying why came among 2,000 lines of their abandoned coroutines. The sizes are
    compared first, from the checkpoint's metadata, and nothing is restored or set aside."""
    import os

    import pytest

    state, step = _setup(OPT)
    directory = str(tmp_path / "ckpt")
    Checkpointer(directory, async_save=False).save(1, state, data_state={"next_index": 1})
    abstract = jax.eval_shape(lambda: state)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
        if "up_proj" in jax.tree_util.keystr(p) else x, abstract.params)
    restores = []
    monkeypatch.setattr(Checkpointer, "restore", lambda *a, **k: restores.append(1))
    with pytest.raises(ValueError, match=r"are of a model of other sizes than this run's: "
                                         r"params\['decoder'\]\['layers'\]\['mlp'\]\['up_proj'\]\['kernel'\] is "):
        Checkpointer(directory).restore_latest_complete(abstract.replace(params=params))
    assert not restores and os.listdir(directory) == ["1"]

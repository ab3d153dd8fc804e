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
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored.params, state.params)

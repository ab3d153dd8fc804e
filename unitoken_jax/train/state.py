"""Shardings of the whole train state, and the state created already sharded.

Optimizer-state leaves that mirror a parameter (Adam's moments) take that parameter's sharding;
scalars (step counters) are replicated. The match is by the parameter's key path, which the
moments repeat inside the optimizer state (under their label for `multi_transform`).
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unitoken_jax.train.step import TrainState, init_state


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_shardings)):
        by_path[_dict_keys(path)] = (p.shape, s)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh: Mesh) -> TrainState:
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = opt_state_shardings(jax.eval_shape(tx.init, abstract_params), abstract_params, param_shardings, mesh)
    return TrainState(replicated, param_shardings, opt, replicated, replicated, replicated)


def abstract_state(tx, abstract_params, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: what a checkpoint restores into, and what AOT compiles for."""
    shapes = jax.eval_shape(lambda p: init_state(p, tx), abstract_params)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def create_state(params, tx, shardings: TrainState, seed: int) -> TrainState:
    """The initial state, every leaf created where its sharding puts it (params are donated)."""
    return jax.jit(lambda p: init_state(p, tx, seed), out_shardings=shardings, donate_argnums=0)(params)


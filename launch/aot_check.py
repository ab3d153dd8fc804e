"""Compile the real 7B stage-2 train step for a TPU slice, from a CPU machine, and report its
per-chip memory and FLOPs (needs `pip install -e '.[tpu]'`; nothing runs on a TPU).

    python launch/aot_check.py --topology v5p:4x4x4 --batch 64 --seq 4096 --mesh 1,64,1 --remat full

XLA's cost analysis counts a scanned layer once, so the model FLOPs below are analytic:
6 * trainable-params * tokens + 12 * layers * hidden * seq^2 * batch (attention, fwd + bwd).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from configs.model import get_config  # noqa: E402
from unitoken_jax import sharding  # noqa: E402
from unitoken_jax.model import init_variables  # noqa: E402
from unitoken_jax.models.config import UniTokenConfig  # noqa: E402
from unitoken_jax.train.optimizer import OptimizerConfig, make_optimizer, trainable_mask  # noqa: E402
from unitoken_jax.train.state import abstract_state, state_shardings  # noqa: E402
from unitoken_jax.train.step import make_train_step  # noqa: E402


def compile_step(topology: str, batch: int, seq: int, mesh_shape, remat: str, model: str = "7b",
                 dropout: float = 0.05):
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    devices = np.array(topo.devices)
    if int(np.prod(mesh_shape)) != devices.size:
        raise ValueError(f"mesh {mesh_shape} needs {int(np.prod(mesh_shape))} chips, {topology} has {devices.size}")
    mesh = Mesh(devices.reshape(mesh_shape), sharding.MESH_AXES)
    config = UniTokenConfig.from_dict(get_config(model).model).replace(remat_policy=remat, dtype="bfloat16")
    config = config.replace(decoder=dataclasses.replace(config.decoder, dropout=dropout))  # as the stages train

    boxed = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    param_sh = sharding.logical_to_sharding(nn.get_partition_spec(boxed)["params"], mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed)["params"], param_sh)
    opt = OptimizerConfig(learning_rate=1e-5, total_steps=10_000)
    tx = make_optimizer(opt, params)
    state_sh = state_shardings(tx, params, param_sh, mesh)
    state = abstract_state(tx, params, state_sh)

    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    side = config.vision.image_size

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
            mesh, PartitionSpec(("data", "fsdp"), *([None] * (len(shape) - 1)))))

    batch_spec = {k: spec((batch, seq), jnp.int32) for k in ("tokens", "labels", "positions", "segment_ids",
                                                              "feature_index")}
    batch_spec["is_continuous"] = spec((batch, seq), jnp.bool_)
    batch_spec["pixels"] = spec((batch, side, side, 3), jnp.float32)  # one image a sample

    step = make_train_step(config, tx, trainable_mask(params))
    start = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        lowered = jax.jit(step, in_shardings=(state_sh, jax.tree.map(lambda a: a.sharding, batch_spec)),
                          out_shardings=(state_sh, None), donate_argnums=0).lower(state, batch_spec)
        compiled = lowered.compile()
    seconds = time.time() - start
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    d = config.decoder
    flops = 6 * n_params * batch * seq + 12 * d.num_layers * d.hidden_size * seq * seq * batch
    return compiled, seconds, n_params, flops, devices.size, rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", default="v5p:4x4x4")
    parser.add_argument("--batch", type=int, default=64, help="global batch of sequences")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--mesh", default="1,64,1", help="data,fsdp,tensor")
    parser.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--model", default="7b", help="a configs/model.py name (7b, 7b_anyres, tiny)")
    parser.add_argument("--dropout", type=float, default=0.05, help="the decoder's (configs/stages.py trains with 0.05)")
    args = parser.parse_args()
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    compiled, seconds, n_params, flops, chips, _ = compile_step(args.topology, args.batch, args.seq, mesh_shape,
                                                                args.remat, args.model, args.dropout)
    mem = compiled.memory_analysis()
    per_chip = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
        mem.temp_size_in_bytes
    print(f"{args.topology}: {chips} chips, mesh data,fsdp,tensor = {mesh_shape}, batch {args.batch} x {args.seq}, "
          f"remat {args.remat}; compiled in {seconds:.0f} s")
    print(f"parameters: {n_params / 1e9:.3f} B")
    print(f"per-chip memory: {per_chip / 2**30:.2f} GiB (arguments {mem.argument_size_in_bytes / 2**30:.2f}, "
          f"temporaries {mem.temp_size_in_bytes / 2**30:.2f}, outputs {mem.output_size_in_bytes / 2**30:.2f}, "
          f"aliased {mem.alias_size_in_bytes / 2**30:.2f})")
    print(f"model FLOPs per step: {flops:.3e} ({flops / chips:.3e} per chip)")


if __name__ == "__main__":
    main()

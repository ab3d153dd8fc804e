"""The training program: from a typed config and a mesh, everything a train step needs.

    program = build_program(config, mesh)
    program.abstract_state          # ShapeDtypeStructs with shardings: restore target, AOT input
    program.batch_spec              # the same for one global batch
    compiled = program.compile()    # the jitted step, lowered for those and compiled
    program.model_flops_per_step()  # the analytic FLOPs of one full batch

It is the one place a step is set up: `train_and_evaluate`, `launch/aot_check.py` (on a TPU
topology's devices), `benchmarks/train_step.py` and the shapes world all build their step
here, so the step the AOT check compiles is the step the loop runs (MaxText's train_compile.py
shares training's abstract state and batch spec the same way).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unitoken_jax import sharding
from unitoken_jax.models.unitoken import abstract_params, param_shardings
from unitoken_jax.train import metrics as metrics_lib
from unitoken_jax.train.config import MeshConfig, TrainConfig
from unitoken_jax.train.optimizer import (
    learning_rate_schedule,
    make_optimizer,
    trainable_mask,
)
from unitoken_jax.train.state import TrainState, abstract_state, state_shardings
from unitoken_jax.train.step import make_train_step

BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids", "is_continuous", "feature_index", "pixels")


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The config's mesh over `devices` (default: the first `num_devices` of this job, or all)."""
    if devices is None:
        if config.num_devices > len(jax.devices()):  # (it had used every device there was, unsaid)
            raise ValueError(f"mesh.num_devices={config.num_devices}, but this job has {len(jax.devices())} "
                             "device(s): give at most that, or 0 for every device")
        devices = jax.devices()[:config.num_devices] if config.num_devices else jax.devices()
    return sharding.make_mesh(data=config.data, fsdp=config.fsdp, tensor=config.tensor, devices=devices)


def batch_shards(mesh: Mesh) -> int:
    """The data-parallel shards of a batch: the training input pipeline packs each shard's rows with
    that shard's own images, and the step gathers the image features shard by shard (see
    `UniToken.embed` and `data.packing.RowPacker`)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]  # the batch's sharding below


def batch_shapes(config: TrainConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of each array of one global batch (rows of packed samples; all SigLIP tiles
    of the batch in one `pixels` array)."""
    d, side = config.data, config.model.vision.image_size
    shapes = {k: ((d.rows, d.length), jnp.int32) for k in BATCH_KEYS}
    shapes["is_continuous"] = ((d.rows, d.length), jnp.bool_)
    shapes["pixels"] = ((d.max_images, side, side, config.model.vision.num_channels), jnp.float32)
    return shapes


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    config: TrainConfig
    mesh: Mesh
    abstract_params: Any  # ShapeDtypeStructs with shardings
    tx: optax.GradientTransformation
    state_shardings: TrainState
    abstract_state: TrainState
    batch_shardings: dict[str, NamedSharding]
    batch_spec: dict[str, jax.ShapeDtypeStruct]
    trainable: Any  # bool per parameter: does it receive gradients?
    step_fn: Callable  # the pure `train_step(state, batch) -> (state, metrics)`

    def context(self):
        """The mesh and logical rules the step is traced under."""
        return sharding.mesh_context(self.mesh)

    @functools.cached_property
    def jitted(self):
        return jax.jit(self.step_fn, in_shardings=(self.state_shardings, self.batch_shardings),
                       out_shardings=(self.state_shardings, None), donate_argnums=0)

    def lower(self):
        with self.context():
            return self.jitted.lower(self.abstract_state, self.batch_spec)

    def compile(self):
        return self.lower().compile()

    @functools.cached_property
    def flop_counter(self) -> metrics_lib.FlopCounter:
        return metrics_lib.FlopCounter(self.config.model, self.abstract_params, self.trainable)

    def model_flops_per_step(self, context: float | None = None) -> float:
        """Analytic model FLOPs of one full global batch (every position real). `context`, the mean
        number of positions a token attends to, defaults to one sample filling each row, (L + 1) / 2."""
        d, v = self.config.data, self.config.model.vision
        context = (d.length + 1) / 2 if context is None else context
        patches = d.max_images * v.features_per_image() if v is not None else 0
        return self.flop_counter.per_step(d.rows * d.length, context, patches)


def build_program(config: TrainConfig, mesh: Mesh) -> TrainProgram:
    model = config.model
    if model.decoder is None or model.vision is None:
        raise ValueError("training needs a whole UniToken model (decoder, vision tower and adapter)")
    lora_run = config.optimizer.trainable == "lora"
    if lora_run and model.lora is None:
        raise ValueError("optimizer.trainable='lora' needs adapters: set model.lora (rank, alpha, targets; see "
                         "configs/finetune.py)")
    if model.lora is not None and not lora_run:
        raise ValueError(f"model.lora is set but optimizer.trainable={config.optimizer.trainable!r}; LoRA trains the "
                         "adapters alone: set optimizer.trainable='lora' (or drop model.lora for full training)")
    from unitoken_jax.models.unitoken import uneven_split

    uneven = uneven_split(model, mesh)
    if uneven:  # (JAX's IndivisibleError at the first compile named neither the weight nor the setting)
        raise ValueError(f"the mesh {dict(mesh.shape)} does not split the model's weights evenly: {uneven}; set "
                         "mesh.data / mesh.fsdp / mesh.tensor to sizes that divide it (heads, kv heads, widths)")
    param_sh = param_shardings(model, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params(model),
                          param_sh)
    tx = make_optimizer(config.optimizer, params)
    state_sh = state_shardings(tx, params, param_sh, mesh)
    trainable = trainable_mask(params, config.optimizer.trainable)
    step_fn = make_train_step(model, tx, trainable, learning_rate_schedule(config.optimizer),
                              config.optimizer.accumulation_steps, feature_blocks=batch_shards(mesh))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch_sh = {k: rows for k in BATCH_KEYS}
    batch_spec = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh[k])
                  for k, (shape, dtype) in batch_shapes(config).items()}
    return TrainProgram(config=config, mesh=mesh, abstract_params=params, tx=tx, state_shardings=state_sh,
                        abstract_state=abstract_state(tx, params, state_sh), batch_shardings=batch_sh,
                        batch_spec=batch_spec, trainable=trainable, step_fn=step_fn)

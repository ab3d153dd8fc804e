"""`train_and_evaluate(config, workdir)`: one training stage from a config (configs/stage*.py).

    WORKDIR/checkpoints/<step>/   Orbax: train state + every process's data-iterator state
    WORKDIR/tensorboard/          event files: losses (split), grad norm, lr, tokens/s, MFU
    WORKDIR/config.json           the config this run used
    WORKDIR/samples.jsonl         the ids of the samples each step saw (config.log_sample_ids)
    WORKDIR/final/                the trained model (our Orbax format; the next stage's init_from)

The state is created already sharded on a ('data', 'fsdp', 'tensor') mesh; the step is compiled
before the loop and its memory logged; a run finds its latest checkpoint and resumes exactly
(parameters, optimizer state and data order). A step with a non-finite loss or gradient changes
nothing but its counters; `max_nonfinite_in_a_row` of them stop the run with `TrainingDiverged`,
leaving the last checkpoint, saved before the streak, as it was.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from unitoken_jax import sharding
from unitoken_jax.data.pipeline import InputPipeline, PipelineConfig, sources_from
from unitoken_jax.model import UniTokenModel, load
from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.train import metrics as metrics_lib
from unitoken_jax.train.checkpoint import Checkpointer
from unitoken_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer, trainable_mask
from unitoken_jax.train.state import abstract_state, create_state, state_shardings
from unitoken_jax.train.step import make_train_step

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "labels", "positions", "segment_ids", "is_continuous", "feature_index", "pixels")


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


def _check_workdir(workdir: str) -> None:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", workdir):
        raise ValueError(
            f"workdir {workdir!r} is a URL; the loop writes through the file system. Mount the bucket on every "
            "host with Cloud Storage FUSE (launch/tpu_install.sh --bucket BUCKET mounts it at /mnt/BUCKET) and "
            "give the mounted path, e.g. --workdir /mnt/BUCKET/unitoken/stage2")


# --- parameters at the start of a stage --------------------------------------------------------
def initial_params(config: ml_collections.ConfigDict, model_config: UniTokenConfig, mesh):
    """Random parameters, overwritten part by part (decoder, vit, adapter) by `init_from`."""
    init = config.init_from
    model = UniTokenModel.random(model_config, seed=init.seed, mesh=mesh)
    paths = [init.paths] if isinstance(init.paths, str) else list(init.paths)
    if init.kind == "random":
        if paths:
            raise ValueError("init_from.kind is 'random' but init_from.paths is set; use kind 'checkpoint' or 'stage'")
        return model.params
    if init.kind not in ("checkpoint", "stage"):
        raise ValueError(f"init_from.kind={init.kind!r}; choose random, checkpoint or stage")
    if not paths:
        raise ValueError(f"init_from.kind={init.kind!r} needs init_from.paths")
    params = dict(model.params)
    for path in paths:
        if init.kind == "stage":
            final = os.path.join(path, "final")
            if not os.path.isdir(final):
                raise FileNotFoundError(f"{path} has no finished stage (no {final}); finish that stage first")
            path = final
        loaded = load(path, mesh=mesh, progress=jax.process_index() == 0)
        for part, value in loaded.params.items():
            mine = params.get(part)
            if mine is None:
                raise ValueError(f"{path} has a {part!r} the stage's model does not have")
            want = jax.tree.map(lambda a: a.shape, mine)
            got = jax.tree.map(lambda a: a.shape, value)
            if want != got:
                raise ValueError(f"{path}: the {part!r} shapes differ from the config's model "
                                 f"(e.g. {jax.tree.leaves(got)[:2]} vs {jax.tree.leaves(want)[:2]})")
            params[part] = jax.tree.map(lambda v, m: v.astype(m.dtype), value, mine)
            log.info("init_from: %s <- %s", part, path)
    return params


# --- batches -------------------------------------------------------------------------------
def _mesh(config):
    m = config.mesh
    n = m.get("num_devices", 0)
    return sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, devices=jax.devices()[:n] if n else None)


def _pipeline(config, workdir: str, model_config: UniTokenConfig, mesh) -> InputPipeline:
    d = config.data
    sources = list(sources_from(d.sources)) if d.sources else []
    if d.demo:
        from unitoken_jax.data.demo import build_demo_dataset

        demo_dir = os.path.join(workdir, "demo_data")
        if jax.process_index() == 0:
            build_demo_dataset(demo_dir, siglip_size=model_config.vision.image_size)
        multihost_utils.sync_global_devices("demo dataset")
        sources.append(os.path.join(demo_dir, "dataset"))
    if not sources:
        raise ValueError("config.data.sources is empty: give pre-tokenized dataset directories or a YAML meta file "
                         "(or data.demo=True for the drawn demo data)")
    n = jax.process_count()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for what, value in (("rows", d.rows), ("max_images", d.max_images)):
        if value % shards or value % n:
            raise ValueError(f"data.{what}={value} must split evenly over the {shards} data-parallel shards and "
                             f"{n} processes")
    pc = PipelineConfig(rows=d.rows // n, length=d.length, mix=tuple(d.mix), max_images=d.max_images // n,
                        seed=d.seed, num_threads=d.num_threads, worker_count=d.worker_count)
    pipeline = InputPipeline(sources, pc, process_index=jax.process_index(), process_count=n)
    side = model_config.vision.image_size
    if pipeline.siglip_size != side:
        raise ValueError(f"the data was pre-tokenized for {pipeline.siglip_size}px SigLIP tiles; the model's ViT takes "
                         f"{side}px")
    return pipeline


def _batch_shardings(mesh):
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return {k: rows for k in BATCH_KEYS}


def _global_batch(local: dict, shardings, features_per_process: int) -> dict:
    """Process-local parts -> global arrays; feature indices offset to this process's pixels."""
    local = dict(local)
    local["feature_index"] = np.where(local["is_continuous"],
                                      local["feature_index"] + jax.process_index() * features_per_process, 0)
    return {k: multihost_utils.host_local_array_to_global_array(local[k], shardings[k].mesh, shardings[k].spec)
            if jax.process_count() > 1 else jax.device_put(local[k], shardings[k]) for k in BATCH_KEYS}


def _abstract_batch(config, model_config, shardings) -> dict:
    d, side = config.data, model_config.vision.image_size
    shapes = {k: ((d.rows, d.length), jnp.int32) for k in BATCH_KEYS}
    shapes["is_continuous"] = ((d.rows, d.length), jnp.bool_)
    shapes["pixels"] = ((d.max_images, side, side, 3), jnp.float32)
    return {k: jax.ShapeDtypeStruct(s, t, sharding=shardings[k]) for k, (s, t) in shapes.items()}


# --- data-iterator state of every process --------------------------------------------------
def _gather_data_state(state: dict) -> dict:
    if jax.process_count() == 1:
        return {"processes": [state]}
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    length = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros(length, np.uint8)
    padded[:raw.size] = raw
    everyone = multihost_utils.process_allgather(padded)
    return {"processes": [json.loads(bytes(row).rstrip(b"\0").decode()) for row in everyone]}


def _my_data_state(saved: dict) -> dict:
    states = saved["processes"]
    if len(states) != jax.process_count():
        raise ValueError(f"the checkpoint's data state is from {len(states)} processes, this run has "
                         f"{jax.process_count()}; resume with the same number of processes")
    return states[jax.process_index()]


# --- the loop --------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       batch_transform: Callable[[int, dict], dict] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the stage; returns the last logged metrics. `batch_transform(step, batch)`
    may change a host batch before it is placed (for tests: fault injection)."""
    _check_workdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0
    model_config = UniTokenConfig.from_dict(config.model.to_dict()).validate()
    opt_config = OptimizerConfig(**config.optimizer.to_dict(), total_steps=config.total_steps).validate()
    mesh = _mesh(config)
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    log.info("mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size, jax.process_count())

    pipeline = _pipeline(config, workdir, model_config, mesh)
    data_iter = pipeline.iterator()
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)

    param_sh = sharding.logical_to_sharding(UniTokenModel(model_config, None).logical_specs(), mesh)
    abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   _abstract_params(model_config), param_sh)
    tx = make_optimizer(opt_config, abstract_params)
    state_sh = state_shardings(tx, abstract_params, param_sh, mesh)
    target = abstract_state(tx, abstract_params, state_sh)

    start_step = checkpointer.latest_step()
    if start_step is not None:
        state, data_state = checkpointer.restore(target)
        if data_state is not None:
            data_iter.set_state(_my_data_state(data_state))
        log.info("resumed from step %d", start_step)
    else:
        params = initial_params(config, model_config, mesh)
        state = create_state(params, tx, state_sh, config.seed)
        start_step = 0

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        labels_mask = trainable_mask(abstract_params, opt_config.trainable)
        step_fn = make_train_step(model_config, tx, labels_mask, learning_rate_schedule(opt_config),
                                  opt_config.accumulation_steps)
        batch_sh = _batch_shardings(mesh)
        t0 = time.time()
        compiled = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                           donate_argnums=0).lower(target, _abstract_batch(config, model_config, batch_sh)).compile()
        _log_memory(compiled, time.time() - t0)

        flops = metrics_lib.FlopCounter(model_config, abstract_params, labels_mask)
        writer = metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"), enabled=primary)
        samples_log = _SamplesLog(workdir, start_step, enabled=primary and config.log_sample_ids)
        preempted = _PreemptionFlag()
        features_per_process = pipeline.config.max_images * pipeline.features_per_tile
        total = config.total_steps * opt_config.accumulation_steps
        window = metrics_lib.Window()
        last: dict[str, Any] = {}
        step = start_step
        pending_skips = None
        try:
            while step < total:
                host = next(data_iter)
                if batch_transform is not None:
                    host = batch_transform(step, host)
                samples_log.write(step, host["sample_ids"])
                window.add_batch(host, pipeline.features_per_tile)
                batch = _global_batch(host, batch_sh, features_per_process)
                state, metrics = compiled(state, batch)
                step += 1
                window.add_metrics(metrics)
                # a one-step lag keeps the device busy while the host checks the previous step
                if pending_skips is not None:
                    _check_nonfinite(pending_skips, config.max_nonfinite_in_a_row, checkpointer, step - 1)
                pending_skips = metrics["nonfinite_in_a_row"]
                if step % config.log_every == 0 or step == total:
                    _check_nonfinite(pending_skips, config.max_nonfinite_in_a_row, checkpointer, step)
                    last = window.flush(step, flops, mesh.size)
                    writer.write(step, last)
                stop_here = step == config.get("stop_after", 0)
                if step % config.checkpoint_every == 0 or step == total or stop_here or \
                        preempted.now(checkpointer, step):
                    _check_nonfinite(pending_skips, config.max_nonfinite_in_a_row, checkpointer, step)
                    checkpointer.save(step, state, _gather_data_state(data_iter.get_state()), force=True)
                    samples_log.sync()
                    if preempted.flag or stop_here:
                        log.warning("%s: saved step %d, stopping", "preempted" if preempted.flag else "stop_after",
                                    step)
                        break
        finally:
            getattr(data_iter, "close", lambda: None)()
            checkpointer.wait()
            writer.close()
            samples_log.close()
            preempted.restore()

        if step >= total:
            final = os.path.join(workdir, "final")
            UniTokenModel(model_config, state.params).save(final)
            log.info("stage finished at step %d; model in %s", step, final)
    checkpointer.close()
    return last


def _abstract_params(model_config: UniTokenConfig):
    from unitoken_jax.convert.hf import abstract_params

    return abstract_params(model_config)


def _check_nonfinite(in_a_row, limit: int, checkpointer: Checkpointer, step: int) -> None:
    n = int(jax.device_get(in_a_row))
    if n >= limit:
        checkpointer.wait()
        raise TrainingDiverged(
            f"{n} steps in a row (up to step {step}) had a non-finite loss or gradient and were skipped "
            f"(max_nonfinite_in_a_row={limit}); the run stops. Skipped steps change no parameter, so every "
            f"checkpoint holds finite weights; the latest is step {checkpointer.latest_step()} in "
            f"{checkpointer.directory}. Lower the learning rate, check the data of these steps (samples.jsonl), "
            "or raise the limit.")


def _log_memory(compiled, seconds: float) -> None:
    mem = compiled.memory_analysis()
    if mem is None:
        log.info("train step compiled in %.1f s", seconds)
        return
    gib = lambda b: b / 2**30  # noqa: E731
    per_device = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
        mem.temp_size_in_bytes
    log.info("train step compiled in %.1f s; per-device memory %.3f GiB (arguments %.3f, temporaries %.3f, "
             "outputs %.3f, aliased %.3f)", seconds, gib(per_device), gib(mem.argument_size_in_bytes),
             gib(mem.temp_size_in_bytes), gib(mem.output_size_in_bytes), gib(mem.alias_size_in_bytes))


class _SamplesLog:
    """WORKDIR/samples.jsonl: {"step": s, "ids": [[...row...], ...]} (this process's rows). On resume,
    the lines of steps not covered by the checkpoint are dropped first. Lines are appended to the
    file, which is closed again, at every checkpoint (`sync`), so that a file system that uploads on
    close (a bucket mounted with Cloud Storage FUSE) keeps what the checkpoint covers."""

    def __init__(self, workdir: str, start_step: int, enabled: bool):
        self.path = os.path.join(workdir, "samples.jsonl") if enabled else None
        self.pending: list[str] = []
        if self.path is None:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] < start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, ids) -> None:
        if self.path is not None:
            self.pending.append(json.dumps({"step": step, "ids": ids}) + "\n")

    def sync(self) -> None:
        if self.path is not None and self.pending:
            with open(self.path, "a") as f:
                f.writelines(self.pending)
            self.pending = []

    close = sync


class _PreemptionFlag:
    """SIGTERM (a preempted VM) or Orbax's multi-host preemption notice -> save now and stop."""

    def __init__(self):
        self.flag = False
        self._old = None
        if jax.process_count() > 1:
            return
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, *_):
        self.flag = True

    def now(self, checkpointer: Checkpointer, step: int) -> bool:
        if jax.process_count() > 1:  # every process must agree on the step to save at
            self.flag = checkpointer.manager.reached_preemption(step)
        return self.flag

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

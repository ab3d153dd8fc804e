"""`train_and_evaluate(config, workdir)`: one training stage from a config (configs/stage*.py).

    WORKDIR/checkpoints/<step>/   Orbax: train state + every process's data-iterator state
    WORKDIR/tensorboard/          event files: losses (split), grad norm, lr, tokens/s, MFU; eval/* (held-out
                                  losses, drawn pictures, answers: config.eval, train/evaluate.py)
    WORKDIR/config.json           the config this run used
    WORKDIR/samples.jsonl         the ids of the samples each step saw (config.log_sample_ids; on a pod
                                  process 0's rows, and samples.process<i>.jsonl process i's)
    WORKDIR/samples/step_<N>.png  the pictures evaluation drew at step N (config.eval; train/evaluate.py)
    WORKDIR/final/                the trained model (our Orbax format; the next stage's init_from)

The state is created already sharded on a ('data', 'fsdp', 'tensor') mesh; the step is compiled
before the loop and its memory logged; a run finds its latest checkpoint and resumes exactly
(parameters, optimizer state and data order). A step with a non-finite loss or gradient changes
nothing but its counters; `max_nonfinite_in_a_row` of them stop the run with `TrainingDiverged`,
leaving the last checkpoint, saved before the streak, as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from unitoken_jax import configs
from unitoken_jax.data import pretokenize
from unitoken_jax.data.demo import build_demo_dataset
from unitoken_jax.data.pipeline import InputPipeline, PipelineConfig, dropped_too_long, order_changes, sources_from
from unitoken_jax.inference.compilation_cache import count_cache_hits
from unitoken_jax.inference.pipeline import TRAINED_PICTURES, trained_record
from unitoken_jax.model import UniTokenModel, load, read_config, read_extras
from unitoken_jax.models import attention as attention_lib
from unitoken_jax.models import lora as lora_lib
from unitoken_jax.train import metrics as metrics_lib
from unitoken_jax.train.checkpoint import Checkpointer
from unitoken_jax.train.config import TrainConfig
from unitoken_jax.train.evaluate import Evaluator, Samples
from unitoken_jax.train.program import (
    BATCH_KEYS,
    TrainProgram,
    batch_shards,
    build_program,
    make_mesh,
)
from unitoken_jax.train.state import create_state

log = logging.getLogger(__name__)

class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


def _check_workdir(workdir: str) -> None:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", workdir):
        raise ValueError(
            f"workdir {workdir!r} is a URL; the loop writes through the file system. Mount the bucket on every "
            "host with Cloud Storage FUSE (launch/tpu_install.sh --bucket BUCKET mounts it at /mnt/BUCKET) and "
            "give the mounted path, e.g. --workdir /mnt/BUCKET/unitoken/stage2")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir!r} is a file: give a directory (a new one, or a run's to resume it)")
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):  # (before the program is built: minutes)
        raise ValueError(f"{checkpoints} is a file: the checkpoints go in a directory of that name (move the file "
                         "away)")


# --- parameters at the start of a stage --------------------------------------------------------
def init_model_paths(init) -> list[str]:
    """The model directories `init_from` loads: its paths, or for `stage` each workdir's final/."""
    return [os.path.join(p, "final") if init.kind == "stage" else p for p in init.paths]


def init_extras(init) -> tuple[dict, dict | None, str | dict]:
    """(passthrough tensors, HF config, HF dtype) of the first `init_from` model that has them, for
    final/ to carry (so that `unitoken convert` writes a trained release back as the release was:
    its VQ-GAN tensors, its config.json's other fields, bfloat16). Read when the run starts (a
    resumed run too, which loads no init_from model), before its first step, and kept for the
    export: read at the export, on a pod, a model moved meanwhile failed in one process while the
    others entered Orbax's collective read, and the run died there without final/."""
    if init.kind != "random":
        for path in init_model_paths(init):
            # on a pod, read only where every process sees the model (a path on one host's own disk:
            # the others' reads failed while its read waited for them in Orbax's collective)
            there = sum(metrics_lib.sum_over_processes(float(os.path.isdir(path))))
            if 0 < there < jax.process_count():
                log.warning("%s is there for %d of the pod's %d processes; final/ goes without what it holds besides "
                            "its weights", path, there, jax.process_count())
                continue
            try:
                passthrough, hf_config, dtype = read_extras(path)
            except (OSError, ValueError) as e:  # (moved since: the trained model still gets out)
                log.warning("cannot read what %s holds besides its weights (%s); final/ goes without it", path, e)
                continue
            if passthrough or hf_config is not None:
                return passthrough, hf_config, dtype
    return {}, None, "float32"


def check_init_makers(init, made_with: dict) -> None:
    """Warns where an `init_from` model was trained on data made with another text tokenizer or
    VQ-GAN than this run's data (its `TRAINED_PICTURES` against the datasets' `made_with`): its ids
    and codes meant other words and pictures. (A stage started so trained on, unsaid; inference warns
    of the same mix, `OtherTokenizer` / `OtherVQGAN`.) Said, not refused: a switch may be meant."""
    if init.kind == "random":
        return
    for path in init_model_paths(init):
        record = trained_record(path)
        for key, what in pretokenize.FINGERPRINTS.items():
            trained, now = record.get(key), made_with.get(key)
            if isinstance(trained, str) and isinstance(now, str) and trained != now:
                log.warning("%s was trained on data made with another %s (sha256 %s...) than this run's data (%s...): "
                            "the ids it learned mean other %s here. Pre-tokenize the data with the %s it was "
                            "trained with, unless the switch is meant", path, what, trained[:12], now[:12],
                            "pictures" if key == "vqgan_sha256" else "words", what)


def initial_params(config: TrainConfig, mesh):
    """Random parameters, overwritten part by part (decoder, vit, adapter) by `init_from`. With
    `model.lora`, the checkpoints give the base weights (a LoRA model among them is merged first)
    and the adapters start fresh (B = 0: the run starts from exactly the loaded model)."""
    init = config.init_from
    model = UniTokenModel.random(config.model, seed=init.seed, mesh=mesh)
    if init.kind == "random":
        return model.params
    if not init.paths:
        raise ValueError(f"init_from.kind={init.kind!r} needs init_from.paths (e.g. --config.init_from.paths=DIR)")
    params, adapters = lora_lib.split(model.params)
    for path in init_model_paths(init):
        if init.kind == "stage" and not os.path.isdir(path):
            raise FileNotFoundError(f"{os.path.dirname(path)} has no finished stage (no {path}); finish that stage "
                                    "first")
        stored = read_config(path).quantize  # (refused before the whole model is read)
        if stored != "none":
            raise ValueError(f"{path} holds {stored} weights, which are for inference only; "
                             "initialise training from the float checkpoint (quantize='none')")
        loaded = load(path, mesh=mesh, progress=jax.process_index() == 0, param_dtype=config.model.param_dtype)
        loaded = loaded.merge_adapters()
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
    return lora_lib.join(params, adapters)


# --- batches ---------------------------------------------------------------------------------
def _training_sources(config: TrainConfig, workdir: str) -> list:
    d = config.data
    sources = list(sources_from(d.sources)) if d.sources else []
    if d.demo:
        demo_dir = os.path.join(workdir, "demo_data")
        if jax.process_index() == 0:
            build_demo_dataset(demo_dir, siglip_size=config.model.vision.image_size,
                               patch=config.model.vision.patch_size)
        multihost_utils.sync_global_devices("demo dataset")
        if sources:  # (the tiny configs keep demo=True: a user's own sources would be mixed with it unawares)
            log.warning("data.demo=True: the drawn demo data is trained on beside data.sources; "
                        "--config.data.demo=False trains on yours alone")
        sources.append(os.path.join(demo_dir, "dataset"))
    if not sources:
        raise ValueError("config.data.sources is empty: give pre-tokenized dataset directories or a YAML meta file "
                         "(or data.demo=True for the drawn demo data)")
    paths = [os.path.realpath(getattr(s, "path", s)) for s in sources]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:  # (it doubled that dataset's weight, and its records, counted apart, could share a batch)
        log.warning("data.sources lists %s more than once: each listing is drawn from as a dataset of its own (its "
                    "weight doubled); give a ratio instead", ", ".join(twice))
    held = [os.path.realpath(getattr(s, "path", s)) for s in sources_from(config.eval.sources)] \
        if config.eval.sources and config.eval.every else []
    trained = sorted(set(held) & set(paths))
    if trained:  # (evaluated as held out, while its samples are trained on)
        log.warning("eval.sources names %s, which data.sources trains on too: its evaluation measures samples the "
                    "model trains on, not held-out ones", ", ".join(trained))
    return sources


def _input_pipeline(sources, config: TrainConfig, mesh, **split) -> InputPipeline:
    """This process's pipeline of `sources` for the config's batch shape; `split`: the held-out
    split's PipelineConfig fields."""
    d = config.data
    n = jax.process_count()
    shards = batch_shards(mesh)
    if shards % n:  # (each process reads rows of its own: processes sharing a shard would give it different rows)
        raise ValueError(f"the mesh splits the batch into {shards} data-parallel shards (data x fsdp) over {n} "
                         "processes; each process needs shards of its own: make data x fsdp a multiple of the "
                         "process count (tensor parallelism within a host)")
    for what, value in (("rows", d.rows), ("max_images", d.max_images)):
        if value % shards or value % n:
            raise ValueError(f"data.{what}={value} must split evenly over the {shards} data-parallel shards and "
                             f"{n} processes")
    pc = PipelineConfig(rows=d.rows // n, length=d.length, mix=d.mix, max_images=d.max_images // n,
                        # this process's rows are 1/n of the batch: split so that no block straddles
                        # two shards' (the step gathers each shard's features from its own pixels)
                        blocks=shards // math.gcd(shards, n),
                        seed=d.seed, num_threads=d.num_threads, worker_count=d.worker_count,
                        lookahead=d.lookahead, **split)
    pipeline = InputPipeline(sources, pc, process_index=jax.process_index(), process_count=n)
    side, patch = config.model.vision.image_size, config.model.vision.patch_size
    if (pipeline.siglip_size, pipeline.patch) != (side, patch):
        # (the features' places in the rows follow the data's layout: another patch would gather
        # other pictures' features, silently)
        raise ValueError(f"the data was pre-tokenized for {pipeline.siglip_size}px SigLIP tiles of {pipeline.patch}px "
                         f"patches; the model's ViT takes {side}px tiles of {patch}px patches")
    return pipeline


def input_pipelines(config: TrainConfig, workdir: str, mesh) -> tuple[InputPipeline, InputPipeline | None]:
    """(training pipeline, held-out pipeline or None). With `eval.holdout_fraction` the two split
    the training sources by sample id; with `eval.sources` evaluation reads those, whole. The
    held-out pipeline takes the training batch's shape and mix, in one process of its own order
    (`eval.seed`), and is built only when the run evaluates."""
    e = config.eval
    sources = _training_sources(config, workdir)
    train = _input_pipeline(sources, config, mesh, holdout_fraction=e.holdout_fraction, split="train")
    if not e.every:
        unused = [f"eval.{name}" for name in ("sources", "prompts", "questions", "tokenizer", "vqgan")
                  if getattr(e, name)]
        if unused:  # (said: a user who set them expects an evaluation)
            log.warning("%s set, but eval.every=0: nothing is evaluated (set eval.every to evaluate)",
                        ", ".join(unused))
        return train, None
    held_out = (e.sources, 1.0) if e.sources else (sources, e.holdout_fraction)
    try:
        evaluation = _input_pipeline(held_out[0], config.replace(data=dataclasses.replace(
            config.data, seed=e.seed, worker_count=0)), mesh, holdout_fraction=held_out[1], split="eval")
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"the held-out data ({'eval.sources' if e.sources else 'eval.holdout_fraction'}): {err}") \
            from err
    return train, evaluation


def _global_batch(local: dict, shardings, features_per_process: int, blocks: int) -> dict:
    """Process-local parts -> global arrays; feature indices offset to this process's pixels. The
    step gathers each block's features from its own share of the pixels (`UniToken.embed`), where
    an index outside it would be clipped to a wrong feature in silence: such a batch is refused."""
    rows, share = local["feature_index"].shape[0], features_per_process // blocks
    block_of_index = local["feature_index"] // share
    block_of_row = (np.arange(rows) // (rows // blocks))[:, None]
    outside = local["is_continuous"] & ((local["feature_index"] < 0) | (block_of_index != block_of_row))
    if outside.any():
        row = int(np.flatnonzero(outside.any(axis=1))[0])
        raise ValueError(f"row {row} of this process's batch uses image features outside its block's share of the "
                         f"pixels ({blocks} blocks of {share} features): the batch was not packed in the blocks the "
                         "train step gathers by (PipelineConfig.blocks)")
    local = dict(local)
    local["feature_index"] = np.where(local["is_continuous"],
                                      local["feature_index"] + jax.process_index() * features_per_process, 0)
    return {k: multihost_utils.host_local_array_to_global_array(local[k], shardings[k].mesh, shardings[k].spec)
            if jax.process_count() > 1 else jax.device_put(local[k], shardings[k]) for k in BATCH_KEYS}


# --- data-iterator state of every process --------------------------------------------------
_LOG_WINDOW = "unitoken_log_window"  # a process's data state's entry for its open logging window


def _gather_data_state(state: dict, worker_count: int, order: dict) -> dict:
    """Every process's iterator state, the `data.worker_count` that wrote them (`_my_data_state`)
    and what the sample order follows from (`InputPipeline.order`: a resume compares it)."""
    if jax.process_count() == 1:
        return {"processes": [state], "worker_count": worker_count, "order": order}
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    length = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros(length, np.uint8)
    padded[:raw.size] = raw
    everyone = multihost_utils.process_allgather(padded)
    return {"processes": [json.loads(bytes(row).rstrip(b"\0").decode()) for row in everyone],
            "worker_count": worker_count, "order": order}


def _my_data_state(saved: dict, worker_count: int) -> dict:
    """This process's iterator state, from a checkpoint written by as many processes with the same
    `data.worker_count`: worker processes each pack their own share of the records, so the sample
    order depends on their number, and the state of one count does not restore another (Grain
    failed with a KeyError or an IndexError deep in its interleave)."""
    states = saved["processes"]
    if len(states) != jax.process_count():
        raise ValueError(f"the checkpoint's data state is from {len(states)} processes, this run has "
                         f"{jax.process_count()}; resume with the same number of processes")
    mine = states[jax.process_index()]
    saved_count = saved.get("worker_count")
    if saved_count is None:
        saved_count = _worker_count_of(mine)
    if saved_count is None and worker_count == 0:
        raise ValueError("the checkpoint's data state was written with worker processes (data.worker_count > 0) "
                         "and this run has none; resume with the data.worker_count the run was started with")
    if saved_count is not None and saved_count != worker_count:
        raise ValueError(f"the checkpoint's data state was written with data.worker_count={saved_count} and this "
                         f"run has {worker_count}; the sample order depends on it: resume with "
                         f"--config.data.worker_count={saved_count}")
    return mine


def _worker_count_of(state: dict) -> int | None:
    """The worker count a data state written before the count was recorded came from: the packing
    iterator's own state (no workers) has "streams"; Grain's state for worker processes
    interleaves one iterator per worker and flags each as exhausted or not. None: unknown."""
    if "streams" in state:
        return 0
    exhausted = state.get("exhausted")
    return len(exhausted) if isinstance(exhausted, list) and exhausted else None


# --- the loop --------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict | TrainConfig, workdir: str, *,
                       batch_transform: Callable[[int, dict], dict] | None = None) -> dict[str, Any]:
    """Runs (or resumes) the stage; returns the last logged metrics (and the last evaluation's,
    under "eval/..."). `config` is a stage ConfigDict
    (configs/stage*.py, checked into a `TrainConfig` here) or a `TrainConfig`.
    `batch_transform(step, batch)` may change a host batch before it is placed (for tests: fault
    injection)."""
    _check_workdir(workdir)
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_config_dict(config)
    # from the start: a SIGTERM while the run builds, restores and compiles (minutes for the 7B)
    # stops it before its first step as one during training does, not as a failure
    preempted = _PreemptionFlag()
    lock = _WorkdirLock()
    try:
        return _train(config, workdir, batch_transform, preempted, lock)
    finally:
        lock.release()
        preempted.restore()


class _WorkdirLock:
    """One run a workdir: the first process holds an exclusive `flock` on WORKDIR/.lock while the run
    lives (the system frees it when the process ends, however it ends). A second run on the same
    workdir had resumed from the same checkpoint, saved over the first's and exported over its
    final/, unsaid. (A file system without flock, e.g. some network mounts, is said once, not refused.)"""

    NAME = ".lock"

    def __init__(self):
        self.file = None

    def take(self, workdir: str) -> None:
        if jax.process_index() != 0:  # (a pod's processes are one run: the first speaks for it)
            return
        import fcntl
        import socket

        path = os.path.join(workdir, self.NAME)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"{workdir} is in use by another training run ({holder}): two runs on one workdir "
                             "resume from the same checkpoint and save over each other's. Wait for it to end, "
                             "or give this run another workdir") from None
        except OSError as e:  # (no flock on this file system)
            log.warning("cannot lock %s (%s): nothing stops a second run on this workdir", path, e)
            f.close()
            return
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # (closing frees the lock)
            self.file = None


def _train(config: TrainConfig, workdir: str, batch_transform, preempted: "_PreemptionFlag",
           lock: _WorkdirLock) -> dict[str, Any]:
    # a backend this machine lacks is refused before the workdir is made (it was, while the step traced)
    attention_words = attention_lib.say_backend(config.model, jax.devices()[0])
    _check_same_stage(workdir, config)
    os.makedirs(workdir, exist_ok=True)
    lock.take(workdir)
    mesh = make_mesh(config.mesh)
    log.info("mesh %s over %d devices in %d processes; %s", dict(mesh.shape), mesh.size, jax.process_count(),
             attention_words)

    log.info("building the train step and the data pipeline (the first step compiles; a minute on a CPU)")
    program = build_program(config, mesh)
    pipeline, held_out = input_pipelines(config, workdir, mesh)
    if preempted.signalled_here():  # (a pod's processes agree on their preemption at a step)
        log.warning("preempted before the first step (SIGTERM while the data pipeline was built): nothing new to "
                    "save, stopping")
        return {}
    if jax.process_index() == 0:  # the bound is the datasets', the same for every process: one reads them
        _log_fill_bound(pipeline, config)
    evaluator = _evaluator(program, pipeline, held_out, workdir) if held_out is not None else None
    data_iter = pipeline.iterator()
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)

    resumed = checkpointer.restore_latest_complete(program.abstract_state)
    eval_pending, open_window = False, None
    if resumed is not None:
        start_step, state, data_state = resumed
        mine = dict(_my_data_state(data_state, config.data.worker_count))
        open_window = mine.pop(_LOG_WINDOW, None)  # (a checkpoint between two logging steps)
        changes = order_changes(data_state.get("order"), pipeline.order)
        if changes and not config.data.new_order:  # (it resumed silently at the old read positions)
            checkpointer.close()
            raise ValueError(f"the data changed since the checkpoint at step {start_step}: {'; '.join(changes)}. Its "
                             "read positions belong to the old sample order: on this data they would train some "
                             "samples again and skip others. Resume with the data as it was, or start the order "
                             "anew on this data with --config.data.new_order=True (the model and optimizer go on)")
        if changes:
            log.warning("the data changed since the checkpoint at step %d (%s): the sample order starts anew "
                        "(data.new_order)%s", start_step, "; ".join(changes),
                        "; the held-out split changed with it, so samples trained on before this step may now be "
                        "held out and evaluated" if any(c.startswith("eval.holdout_fraction") for c in changes)
                        else "")
        else:
            data_iter.set_state(mine)
        eval_pending = bool(data_state.get("eval_pending"))  # due when the run was preempted
        log.info("resumed from step %d", start_step)
        end = config.total_steps * config.optimizer.accumulation_steps
        if 0 < config.stop_after <= start_step < end:  # (it was passed by, and the run trained to its end)
            checkpointer.close()
            raise ValueError(f"stop_after={config.stop_after}, but the run resumes after step {start_step}: give a "
                             "later step to stop at, or 0 to train to the end")
        if start_step > end:  # (it exported the model mid-schedule as a finished run of total_steps)
            checkpointer.close()
            at = start_step // config.optimizer.accumulation_steps
            raise ValueError(f"the run in {workdir} is at step {at}, past total_steps={config.total_steps}: give "
                             f"total_steps={at} or more to go on with it, or another workdir for a shorter run")
        if start_step < end:
            _set_aside_stale_exports(workdir, start_step)
    else:
        check_init_makers(config.init_from, pipeline.made_with)
        params = initial_params(config, mesh)
        state = create_state(params, program.tx, program.state_shardings, config.seed)
        start_step = 0
    # recorded once the run is taken: a resume refused above (another worker_count, a passed
    # stop_after) had overwritten the record of what the checkpoints were trained with
    if jax.process_index() == 0:
        record_config(workdir, config.to_dict())

    t0 = time.time()
    with count_cache_hits() as hits:
        compiled, when = _compile_unless_preempted(program, preempted)
    if compiled is not None:
        _log_memory(compiled, time.time() - t0, "loaded from the compilation cache" if hits[0] else "compiled")
    if preempted.flag:
        getattr(data_iter, "close", lambda: None)()
        checkpointer.close()
        log.warning("preempted before the first step (SIGTERM%s): nothing new to save, stopping at step %d", when,
                    start_step)
        return {}
    extras = init_extras(config.init_from)  # (for final/)
    with program.context():
        last = _run(program, compiled, state, pipeline, data_iter, checkpointer, workdir, start_step,
                    batch_transform, evaluator, preempted, eval_pending, extras, open_window)
    checkpointer.close()
    return last


def _check_same_stage(workdir: str, config: TrainConfig) -> None:
    """A workdir whose checkpoints are another stage's is refused: resumed from them, the run
    trained nothing (their step was already its end) and exported that stage's model as its own."""
    path = os.path.join(workdir, "config.json")
    checkpoints = os.path.join(workdir, "checkpoints")
    if not (os.path.exists(path) and os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        return
    try:
        with open(path) as f:
            recorded = json.load(f).get("stage")
    except (OSError, ValueError, AttributeError):
        return  # (record_config says what differs)
    if recorded is not None and recorded != config.stage:
        raise ValueError(f"{workdir} holds the checkpoints of a stage-{recorded} run (its config.json); this run is "
                         f"stage {config.stage} and would resume from them. Give this stage a workdir of its own "
                         f"(to start from that run's model: --config.init_from.kind=stage "
                         f"--config.init_from.paths={workdir})")


def _set_aside(path: str, before: str, after: str = "") -> str:
    """Renames `path` to before + N + after, N the first free number from 1 (what is kept is never
    written over); returns the new name."""
    n = 1
    while os.path.exists(f"{before}{n}{after}"):
        n += 1
    os.replace(path, f"{before}{n}{after}")
    return f"{before}{n}{after}"


def _set_aside_stale_exports(workdir: str, step: int) -> None:
    """A finished run resumed to go further (a larger total_steps): its final/ (and LoRA adapters/)
    are of the step it ended at, and would pass for this run's end to a sweep and to the next
    stage's init_from until the run finishes again; they are kept as final.previousN."""
    if jax.process_index() == 0:
        for name in ("final", "adapters"):
            old = os.path.join(workdir, name)
            if os.path.isdir(old):
                kept = _set_aside(old, f"{old}.previous")
                # (not "of step N": a damaged newest checkpoint resumes from an earlier step than the export's)
                log.warning("%s was exported at an earlier end; the run goes on from step %d, so it is kept as %s",
                            old, step, os.path.basename(kept))
    _sync("stale exports set aside")


def _log_fill_bound(pipeline: InputPipeline, config: TrainConfig) -> None:
    """Logs how full whole samples can keep the rows (`InputPipeline.fill_bound`) and, under 90 %,
    what holds it there: the rows' length, the batch's picture tiles, or both."""
    fill, counted = pipeline.fill_bound()
    more, binds = "", lambda part: fill.bound < 0.9 and part <= fill.bound * (1 + 1e-9)  # noqa: E731
    if binds(fill.by_rows) and fill.next_length is not None:
        more += f"; rows of {fill.next_length} positions would hold {fill.per_row + 1} of the shortest"
    if binds(fill.by_tiles):
        more += (f"; the batch's {config.data.max_images} picture tiles (data.max_images) take at most "
                 f"{config.data.max_images / fill.tiles_each:.0f} samples ({fill.tiles_each:.2g} a sample on average)")
    log.info("packing: over a long run whole samples can fill at most %.1f%% of a batch's positions (a row of %d "
             "holds at most %d of them, the shortest %d; mean %.0f; from %d records%s); real_fraction in the log "
             "says how full the batches are", 100 * fill.bound, config.data.length, fill.per_row, fill.shortest,
             fill.mean, counted, more)


def record_config(workdir: str, config: dict) -> None:
    """Writes WORKDIR/config.json. One that differs there already (the run is resumed with other
    settings: a longer run, another mesh, or a mistake) is kept as config.previousN.json and the
    differences are logged, so the record of what the checkpoints were trained with is not lost."""
    path = os.path.join(workdir, "config.json")
    new = json.loads(json.dumps(config))  # (tuples as lists, as the file holds them)
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    if old is not None and old != new:
        was, now = configs.flat_dict(old), configs.flat_dict(new)
        changed = [f"{k}: {was.get(k, '(none)')!r} -> {now.get(k, '(none)')!r}"
                   for k in sorted(set(was) | set(now)) if was.get(k, "(none)") != now.get(k, "(none)")]
        kept = _set_aside(path, os.path.join(workdir, "config.previous"), ".json")
        log.warning("this run's config differs from the one %s was last run with (kept as %s): %s", workdir,
                    os.path.basename(kept), "; ".join(changed))
    with open(path, "w") as f:
        json.dump(new, f, indent=2)


def _evaluator(program: TrainProgram, pipeline: InputPipeline, held_out: InputPipeline, workdir: str) -> Evaluator:
    """The evaluation of `config.eval`, with its held-out batches read (the first `eval.batches` of
    the held-out pipeline, the same at every evaluation) and its prompts encoded."""
    e = program.config.eval
    features_per_process = held_out.config.max_images * held_out.features_per_tile
    batches, ids = [], []
    it = held_out.iterator()
    try:
        for _ in range(e.batches):
            batch = next(it)
            ids += [i for row in batch.get("sample_ids", ()) for i in row]
            batches.append(_global_batch(batch, program.batch_shardings, features_per_process,
                                         held_out.config.blocks))
    finally:
        getattr(it, "close", lambda: None)()
    counts = collections.Counter(ids)
    if counts and max(counts.values()) > 1:  # the held-out stream repeats: a small held-out set
        log.warning("eval: the %d held-out batches hold %d samples but only %d distinct ones (each up to %d times, "
                    "weighted unevenly in eval/loss): lower eval.batches or hold more out (eval.holdout_fraction, "
                    "eval.sources)", e.batches, len(ids), len(counts), max(counts.values()))
    # on a pod every process decodes the same requests with the pod's parameters
    samples = (Samples(e, program.config.model, program.abstract_params, program.mesh, pipeline.image_settings)
               if e.decodes else None)
    log.info("eval every %d steps: %d held-out batches, %d prompts, %d questions", e.every, len(batches),
             len(e.prompts) if samples else 0, len(e.questions) if samples else 0)
    return Evaluator(e, program.config.model, batches, program.state_shardings.params, program.batch_shardings,
                     program.mesh, workdir, samples)


def _run(program: TrainProgram, compiled, state, pipeline: InputPipeline, data_iter, checkpointer: Checkpointer,
         workdir: str, start_step: int, batch_transform, evaluator: Evaluator | None, preempted: "_PreemptionFlag",
         eval_pending: bool = False, extras: tuple = ({}, None, "float32"),
         open_window: dict | None = None) -> dict[str, Any]:
    config, mesh = program.config, program.mesh
    primary = jax.process_index() == 0
    writer = metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"), enabled=primary)
    samples_log = _SamplesLog(workdir, start_step, enabled=config.log_sample_ids)
    features_per_process = pipeline.config.max_images * pipeline.features_per_tile
    total = config.total_steps * config.optimizer.accumulation_steps
    window = metrics_lib.Window()
    if open_window is not None:
        window.restore(open_window)
    last: dict[str, Any] = {}
    last_eval: dict[str, float] = {}
    step = start_step
    pending_skips = None
    dropped_warned = 0
    stopped = False  # preempted during the evaluation a resumed run owes: nothing to train
    try:
        if eval_pending and evaluator is not None:  # the evaluation a preemption put off, of the saved step
            started = time.time()
            last_eval = evaluator.run(step, state.params, writer)
            window.exclude(time.time() - started)
            if preempted.signalled_here():  # during it: this step is saved already, nothing to train
                log.warning("preempted during the evaluation of step %d, which was saved: stopping", step)
                stopped = True
        vocab = config.model.decoder.vocab_size if config.model.decoder is not None else None
        while step < total and not stopped:
            host = next(data_iter)
            top = int(host["tokens"].max())
            # (each such step had been skipped as non-finite, ending in "lower the learning rate")
            if vocab is not None and top >= vocab:
                raise ValueError(f"the data holds token id {top}, past model.decoder.vocab_size={vocab}: the data was "
                                 "pre-tokenized with a larger tokenizer than the model's vocabulary")
            if batch_transform is not None:
                host = batch_transform(step, host)
            samples_log.write(step, host["sample_ids"])
            window.add_batch(host, pipeline.features_per_tile)
            batch = _global_batch(host, program.batch_shardings, features_per_process, pipeline.config.blocks)
            state, metrics = compiled(state, batch)
            step += 1
            window.add_metrics(metrics)
            # a one-step lag keeps the device busy while the host checks the previous step
            if pending_skips is not None:
                _check_nonfinite(pending_skips, config.max_nonfinite_in_a_row, checkpointer, step - 1)
            pending_skips = metrics["nonfinite_in_a_row"]
            if step % config.log_every == 0 or step == total:
                _check_nonfinite(pending_skips, config.max_nonfinite_in_a_row, checkpointer, step)
                last = window.flush(step, program.flop_counter, mesh.size, total)
                dropped = _dropped_too_long(data_iter)
                last["dropped_too_long"] = dropped
                if dropped > dropped_warned:
                    log.warning("%d samples so far were longer than a row (data.length=%d) and were dropped",
                                dropped, pipeline.config.length)
                    dropped_warned = dropped
                writer.write(step, last)
            # asked at every step (on a pod the processes agree on the step to stop at only when each
            # asks at that very step), and before the evaluation: when preempted the save comes first
            preempting = preempted.now(checkpointer, step)
            eval_due = evaluator is not None and evaluator.due(step, total)
            if eval_due and not preempting:
                jax.block_until_ready(state.params)  # the step still running counts as training time
                started = time.time()
                last_eval = evaluator.run(step, state.params, writer)
                window.exclude(time.time() - started)
                eval_due = False
                preempting = preempted.signalled_here()  # a SIGTERM during the evaluation: save this step
            stop_here = step == config.stop_after
            if step % config.checkpoint_every == 0 or step == total or stop_here or preempting:
                _check_nonfinite(pending_skips, config.max_nonfinite_in_a_row, checkpointer, step)
                own = data_iter.get_state()
                if window.steps:  # this process's unlogged steps, taken up again by a resumed run
                    own = {**own, _LOG_WINDOW: window.state()}
                data_state = _gather_data_state(own, config.data.worker_count, pipeline.order)
                if eval_due:  # put off by the preemption: the resumed run evaluates this step first
                    data_state["eval_pending"] = True
                checkpointer.save(step, state, data_state, force=True)
                samples_log.sync()
                if preempted.flag or stop_here:
                    checkpointer.wait()  # saved, not only begun, before it is said (a failed save raises)
                    log.warning("%s: saved step %d, stopping", "preempted" if preempted.flag else "stop_after", step)
                    break
            checkpointer.check()  # a save that failed in the background stops the run now
    finally:
        getattr(data_iter, "close", lambda: None)()
        checkpointer.wait()
        writer.close()
        samples_log.close()

    if step >= total and not preempted.flag:  # (preempted at the end: the resumed run evaluates if it owes
        # that, and exports; the grace period goes to the checkpoint, and a sweep sees no final/ yet)
        skipped = int(jax.device_get(state.nonfinite_total))
        if skipped:  # (a skipped step is a step: the run still ends at `total`)
            n = config.optimizer.accumulation_steps
            log.warning("%d of the %d steps were skipped (non-finite loss or gradient), so the model had %d updates "
                        "of total_steps=%d%s", skipped, total, (total - skipped) // n, config.total_steps,
                        f" ({(total - skipped) % n} micro-batches of an unfinished window were not applied)"
                        if (total - skipped) % n else "")
        final = os.path.join(workdir, "final")
        export_final(UniTokenModel(config.model, state.params, *extras), final, pictures=_pictures_of(pipeline))
        if config.model.lora is not None:  # the adapters alone, in PEFT's format (gathered; process 0 writes)
            base = ",".join(init_model_paths(config.init_from)) or None  # the model they adapt
            UniTokenModel(config.model, state.params).save_adapters(os.path.join(workdir, "adapters"), base_model=base)
        log.info("stage finished at step %d; model in %s", step, final)
    return {**last, **last_eval}


def _pictures_of(pipeline: InputPipeline) -> dict:
    """How the training data laid out its pictures (the first dataset's), and the fingerprints of the
    tokenizer and VQ-GAN it was made with (all datasets': `data.pipeline` refuses a mix), for
    inference to do the same."""
    s = pipeline.image_settings
    return {"vq_size": s.vq_size, "siglip_size": s.siglip_size, "patch": s.patch, "anyres": s.anyres,
            "continuous": s.continuous, **pipeline.made_with}


def export_final(model: UniTokenModel, final: str, pictures: dict | None = None) -> None:
    """Saves `model` as FINAL, whole or not at all: it is written to FINAL.partial and renamed, so a
    run killed during the export (tens of GB for the 7B) leaves no FINAL that looks finished to a
    sweep, to the next stage's `init_from`, or to a rerun (which exports again). `pictures`: how the
    data laid out pictures, kept beside it (`inference.pipeline.TRAINED_PICTURES`: its VQ crop is
    then inference's default)."""
    partial = final + ".partial"
    primary = jax.process_index() == 0
    if primary and os.path.exists(partial):
        shutil.rmtree(partial)
    _sync("final export starts")
    model.save(partial)  # (it returns on every process once the save is whole)
    if primary:
        if pictures is not None:
            with open(os.path.join(partial, TRAINED_PICTURES), "w") as f:
                json.dump(pictures, f, indent=1)
        if os.path.exists(final):  # a rerun of a finished run exports again
            shutil.rmtree(final)
        os.replace(partial, final)
    _sync("final export in place")


def _sync(what: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(what)


def _check_nonfinite(in_a_row, limit: int, checkpointer: Checkpointer, step: int) -> None:
    n = int(jax.device_get(in_a_row))
    if n >= limit:
        checkpointer.wait()
        latest = checkpointer.latest_step()
        where = (f"the latest is step {latest} in {checkpointer.directory}" if latest is not None else
                 f"none was written yet ({checkpointer.directory} is empty: a rerun starts from the beginning)")
        raise TrainingDiverged(
            f"{n} steps in a row (up to step {step}) had a non-finite loss or gradient and were skipped "
            f"(max_nonfinite_in_a_row={limit}); the run stops. Skipped steps change no parameter, so every "
            f"checkpoint holds finite weights; {where}. Lower the learning rate, check the data of these steps "
            "(samples.jsonl), or raise the limit.")


def _dropped_too_long(data_iter) -> float:
    """The samples dropped so far for being longer than a row, summed over processes (a collective)."""
    return metrics_lib.sum_over_processes(dropped_too_long(data_iter))[0]


def _log_memory(compiled, seconds: float, how: str) -> None:
    mem = compiled.memory_analysis()
    if mem is None:
        log.info("train step %s in %.1f s", how, seconds)
        return
    gib = lambda b: b / 2**30  # noqa: E731
    per_device = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
        mem.temp_size_in_bytes
    log.info("train step %s in %.1f s; per-device memory %.3f GiB (arguments %.3f, temporaries %.3f, "
             "outputs %.3f, aliased %.3f)", how, seconds, gib(per_device), gib(mem.argument_size_in_bytes),
             gib(mem.temp_size_in_bytes), gib(mem.output_size_in_bytes), gib(mem.alias_size_in_bytes))


def samples_log_path(workdir: str, process: int = 0) -> str:
    """The file of the sample ids a process's rows saw: WORKDIR/samples.jsonl for process 0 (the
    whole batch on one host), WORKDIR/samples.process<i>.jsonl for process i of a pod (each host
    reads only its own rows, so each writes its own file; no collective a step)."""
    return os.path.join(workdir, "samples.jsonl" if process == 0 else f"samples.process{process}.jsonl")


class _SamplesLog:
    """`samples_log_path`: {"step": s, "ids": [[...row...], ...]} (this process's rows). On resume,
    the lines of steps not covered by the checkpoint are dropped first. Lines are appended to the
    file, which is closed again, at every checkpoint (`sync`), so that a file system that uploads on
    close (a bucket mounted with Cloud Storage FUSE) keeps what the checkpoint covers."""

    def __init__(self, workdir: str, start_step: int, enabled: bool):
        self.path = samples_log_path(workdir, jax.process_index()) if enabled else None
        self.pending: list[str] = []
        if self.path is None:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for number, line in enumerate(f, 1):
                    try:
                        step = json.loads(line)["step"]
                    except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
                        log.warning("%s line %d is damaged (%r...); dropped", self.path, number, line[:60])
                        continue
                    if isinstance(step, int) and step < start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
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


def _compile_unless_preempted(program: TrainProgram, preempted: "_PreemptionFlag"):
    """(the compiled step, or None if a SIGTERM came first; when it came, for the log). XLA holds
    the thread that compiles for the whole compile (minutes for the 7B, longer than a preemption
    notice), and Python runs a signal's handler only when it returns: a SIGTERM or Ctrl-C waited for
    all of it. The compile runs in a thread of its own while this one waits, so both are acted on at
    once (nothing new to save before the first step). The abandoned compile ends with the process
    (`train.__main__` ends it at once) or, for a Python caller, runs on in the background and is
    waited for at the interpreter's exit (killed there mid-compile, the process aborted: "terminate
    called after throwing...")."""
    if not preempted.listening:  # (a pod's processes agree on their preemption through Orbax)
        return program.compile(), ""
    if preempted.flag:  # (while the run was built: no compile)
        return None, " while the run was built"
    import atexit
    import threading

    # traced here, under the caller's thread-local JAX settings (a `with jax.default_matmul_precision`);
    # XLA's compile, the long part, in the thread
    lowered = program.lower()
    done: dict[str, Any] = {}

    def compile_step():
        try:
            done["compiled"] = lowered.compile()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            done["error"] = e

    def abandon():
        global ABANDONED_COMPILE
        ABANDONED_COMPILE = worker
        atexit.register(worker.join)  # (a Python caller's process, at its exit: not killed mid-compile)

    worker = threading.Thread(target=compile_step, name="unitoken-train-compile", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
            if preempted.flag:
                abandon()
                return None, " while the step compiled"
    except BaseException:  # a Ctrl-C (KeyboardInterrupt) while it compiled
        abandon()
        raise
    if "error" in done:
        raise done["error"]
    return done["compiled"], ""


# the step's compile left running by a SIGTERM (`_compile_unless_preempted`): a program ends its
# process without the interpreter's teardown while it runs, which XLA's threads may not survive
ABANDONED_COMPILE = None


class _PreemptionFlag:
    """SIGTERM (a preempted VM) or Orbax's multi-host preemption notice -> save now and stop."""

    def __init__(self):
        self.flag = False
        self._old = None
        self.listening = False  # (whether the SIGTERM handler is this one's)
        if jax.process_count() > 1:
            return
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
            self.listening = True
        except ValueError:  # not the main thread
            pass

    def _handle(self, *_):
        self.flag = True

    def now(self, checkpointer: Checkpointer, step: int) -> bool:
        if jax.process_count() > 1:  # every process must agree on the step to save at
            self.flag = checkpointer.manager.reached_preemption(step)
        return self.flag

    def signalled_here(self) -> bool:
        """Has this single process had a SIGTERM? (On a pod the processes agree on the step at the
        next `now`.)"""
        return self.flag and jax.process_count() == 1

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

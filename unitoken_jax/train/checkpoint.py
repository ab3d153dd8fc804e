"""Train-state checkpoints with Orbax: a `CheckpointManager` with async saves and a keep policy;
the data iterator's state (JSON) is saved in the same checkpoint as the model and optimizer.

The PRNG key is stored as its raw key data (Orbax stores arrays), and rebuilt on restore.
Restoring takes an abstract state whose leaves carry the shardings wanted, so a checkpoint
written on one mesh restores onto another.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from unitoken_jax.convert.files import CheckpointError
from unitoken_jax.convert.orbax_io import storage_reason

from unitoken_jax.train.step import TrainState

log = logging.getLogger(__name__)


def _check_layout(restored, target) -> None:
    """A ValueError naming the entries of a train state that Orbax restored in the checkpoint's own
    layout where it differs from this run's (it does not enforce the target's tree: the run then
    failed at its first step, "Function compiled with input pytree does not match")."""
    if jax.tree.structure(restored) == jax.tree.structure(target):
        return
    paths = [{jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t)} for t in (restored, target)]
    saved, wanted = sorted(paths[0] - paths[1]), sorted(paths[1] - paths[0])
    raise ValueError("its train state is laid out differently from this run's: another optimizer.trainable or "
                     "model.lora, or LoRA on the vision tower saved before 2026-12-06 (those adapters' moments moved "
                     f"from 'train' to 'vit'); {len(saved)} entries only in the checkpoint, {len(wanted)} only in this "
                     f"run, e.g. {(saved or wanted)[0]}")


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


def _to_saveable(state: TrainState):
    return state.replace(rng=jax.random.key_data(state.rng))


def _check_writable(directory: str) -> None:
    """A ValueError, before training, where checkpoints cannot be written: a directory that is a
    file, or on a file system that refuses writes (read-only, full, no permission). The run had
    trained on until its first save failed, said "saved" and then waited out Orbax's 300 s
    coordination timeout before exiting."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory} is a file: the checkpoints go in a directory of that name (move the file away)")
    probe = os.path.join(directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"checkpoints cannot be written in {directory}: {e.strerror or e}") from None


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        _check_writable(self.directory)
        # a save's directories are made before `save` returns: a failure to make them (the file system
        # turned read-only, or full) raises there, where Orbax's background creation left its threads
        # waiting out a 300 s timeout at exit
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save,
            async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        self._unsaid: int | None = None  # the step of a save begun and not yet said to have finished

    def save(self, step: int, state: TrainState, data_state: dict[str, Any] | None = None, *,
             force: bool = False) -> bool:
        """Saves (asynchronously) if the keep/interval policy asks for `step`, or always with `force`
        (e.g. at preemption). Returns whether a save started."""
        items = {"state": ocp.args.StandardSave(_to_saveable(state))}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        started = self._said(lambda: self.manager.save(step, args=ocp.args.Composite(**items), force=force))
        if started:
            self._unsaid = step
        return started

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: TrainState, step: int | None = None, *,
                _manager: ocp.CheckpointManager | None = None) -> tuple[TrainState, dict | None]:
        """The state at `step` (default: the latest) laid out as `abstract_state` says (shapes,
        dtypes and shardings), and the data iterator's state if one was saved."""
        manager = self.manager if _manager is None else _manager
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        # the key goes in as its raw data, placed where the target's key is (without a sharding Orbax
        # would put it on the devices it was saved from, which a smaller or other slice lacks)
        data = jax.eval_shape(jax.random.key_data, abstract_state.rng)
        target = abstract_state.replace(rng=jax.ShapeDtypeStruct(
            data.shape, data.dtype, sharding=getattr(abstract_state.rng, "sharding", None)))
        items = {"state": ocp.args.StandardRestore(target)}
        if "data" in manager.item_metadata(step):
            items["data"] = ocp.args.JsonRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        _check_layout(state, target)
        state = state.replace(rng=jax.random.wrap_key_data(state.rng))
        return state, restored.get("data")

    def restore_latest_complete(self, abstract_state: TrainState) -> tuple[int, TrainState, dict] | None:
        """The newest checkpoint that restores whole — train state and data iterator state — as
        (step, state, data state); None if there is no checkpoint. A damaged newer one (a missing
        or unreadable item) is skipped with a warning naming it and why, so a restart falls back
        to the previous complete checkpoint instead of failing, or silently starting the data over.

        On a pod every process reads only its own shards, so damage can show on one process alone:
        the processes try the same steps (process 0's list) and take a step only when every one of
        them restored it. (Orbax's own restore ends at a barrier of one fixed name, where a process
        that failed step N and restored N-1 met the others holding N: the pod trained on in two
        states until some collective disagreed.)"""
        steps = _process_0s(sorted(self.manager.all_steps(), reverse=True))
        if not steps:
            return None
        reader = self._reader()
        try:
            return self._first_restorable(abstract_state, steps, reader)
        finally:
            if reader is not self.manager:
                reader.close()

    def _first_restorable(self, abstract_state, steps: list[int], reader) -> tuple[int, TrainState, dict]:
        self._check_sizes(abstract_state, steps[0], reader)
        problems = []
        for step in steps:
            reason, state, data = None, None, None
            try:
                if "data" not in (reader.item_metadata(step) or {}):
                    raise ValueError("it has no data-iterator state (the 'data' item is missing)")
                state, data = self.restore(abstract_state, step, _manager=reader)
            except Exception as e:  # noqa: BLE001 - any damage: try the previous one
                reason = storage_reason(e)
            failed = _processes_that_failed(reason is not None)
            if not failed:
                if problems:
                    log.warning("resuming from step %d, the newest complete checkpoint (skipped: %s)", step,
                                "; ".join(problems))
                    self._set_aside([s for s in steps if s > step])
                elif jax.process_count() > 1:
                    self.manager.reload()  # the step list process 0 saw, for the saves and deletions to come
                return step, state, data
            # restored here, not on another process: let go before the next try (two train states
            # would not fit a chip that one nearly fills)
            state = data = None
            if reason is None:
                reason = (f"process{'es' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of this pod "
                          "cannot read it (its own log says why)")
            log.warning("checkpoint step %d in %s cannot be resumed from (%s); trying the one before", step,
                        self.directory, reason)
            problems.append(f"step {step}: {reason}")
        raise CheckpointError(f"no checkpoint in {self.directory} can be resumed from: " + "; ".join(problems)
                              + ". If they were written for another model or config, resume with that config (a "
                              "shape that differs says so above); only if they are damaged, move the step "
                              "directories away to start over.")

    def _check_sizes(self, abstract_state, step: int, reader) -> None:
        """A ValueError, before any restore, where the newest checkpoint's train state has other
        parts (counted arrays: LoRA, trainable parts, accumulation) or its parameters other shapes
        than this run's (another model config): each step's restore had been tried and
        taken for damage, every one failing after Orbax had started its reads (2,000 lines of their
        abandoned coroutines around the one line saying why). Metadata that cannot be read is left
        to the restore, which says what is damaged."""
        try:
            saved_state = reader.item_metadata(step)["state"]
            saved = saved_state["params"]
            counts = {part: (len(jax.tree_util.tree_leaves(saved_state[part])),
                             len(jax.tree_util.tree_leaves(getattr(abstract_state, part))))
                      for part in ("params", "opt_state")}
        except Exception:  # noqa: BLE001 - damage: the restore's to report
            return
        # other parts (LoRA factors, trainable parts, accumulation's state): Orbax refused each step's
        # tree, which was taken for damage and named every checkpoint unreadable
        other = [f"{part}: {there} arrays there, {here} here" for part, (there, here) in counts.items()
                 if there != here]
        if other:
            raise ValueError(f"the checkpoints in {self.directory} hold a train state laid out differently from this "
                             f"run's ({'; '.join(other)}): another model.lora, optimizer.trainable or "
                             "optimizer.accumulation_steps than they were trained with; resume with the settings "
                             "they were trained with (the workdir's config.json), or give another workdir")
        shapes = [{jax.tree_util.keystr(p): tuple(getattr(x, "shape", ())) for p, x in
                   jax.tree_util.tree_leaves_with_path(tree)} for tree in (saved, abstract_state.params)]
        differ = [k for k in shapes[1] if k in shapes[0] and shapes[0][k] != shapes[1][k]]
        if differ:
            k = differ[0]
            raise ValueError(f"the checkpoints in {self.directory} are of a model of other sizes than this run's: "
                             f"params{k} is {list(shapes[0][k])} there, {list(shapes[1][k])} here"
                             + (f" ({len(differ) - 1} more differ)" if len(differ) > 1 else "")
                             + "; resume with the model config they were trained with (the workdir's config.json), "
                             "or give another workdir")

    def _reader(self) -> ocp.CheckpointManager:
        """What restores: on a pod, a read-only manager of this process alone (no barrier inside
        Orbax's restore; `restore_latest_complete` agrees across processes itself)."""
        if jax.process_count() == 1:
            return self.manager
        me = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                               multiprocessing_options=alone)
        absl_log = logging.getLogger("absl")  # Orbax warns that the training directory is read only
        absl_log.addFilter(_not_read_only_notice)
        try:
            return ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        finally:
            absl_log.removeFilter(_not_read_only_notice)

    def _set_aside(self, steps: list[int]) -> None:
        """Renames damaged step directories to STEP.damaged (kept for a look, hidden from the
        manager) so the run can save those steps again."""
        if jax.process_index() == 0:
            for step in steps:
                path = os.path.join(self.directory, str(step))
                if os.path.isdir(path):
                    target = path + ".damaged"
                    n = 1
                    while os.path.exists(target):
                        target, n = f"{path}.damaged{n}", n + 1
                    os.rename(path, target)
                    log.warning("moved the damaged checkpoint %s to %s", path, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoints set aside")
        self.manager.reload()

    def wait(self):
        """Until the save in the background has finished; a CheckpointError if it failed."""
        self._said(self.manager.wait_until_finished)
        self._say_saved()

    def check(self) -> None:
        """A CheckpointError now if a save that finished in the background failed (Orbax says so
        only at the next save, `checkpoint_every` steps of training later that none could save).
        Never waits: a save still running is asked about at a later step."""
        if not self.manager.is_saving_in_progress():  # (a local read; then the wait returns at once)
            self._said(self.manager.wait_until_finished)
            self._say_saved()

    def _say_saved(self) -> None:
        """A finished save said once, when it has finished (a routine save had logged nothing, so a
        log did not tell where a stopped run would resume from)."""
        if self._unsaid is not None:
            log.info("checkpoint of step %d saved in %s", self._unsaid, self.directory)
            self._unsaid = None

    def _said(self, call):
        """`call()`'s value, a storage error from it raised as a CheckpointError saying where and why."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - whatever the storage raised
            raise CheckpointError(f"a checkpoint could not be saved in {self.directory}: {storage_reason(e)}; "
                                  "free the space or fix the storage, then rerun to resume from the last one "
                                  "saved") from e

    def close(self):
        self.manager.close()


def _item_handlers() -> dict:
    """The items a checkpoint holds, named up front (else Orbax warns at every metadata read that it
    found items it could not restore)."""
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def _process_0s(steps: list[int]) -> list[int]:
    """Process 0's list of steps, on every process (each lists the shared directory itself)."""
    if jax.process_count() == 1:
        return steps
    from jax.experimental import multihost_utils

    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    padded = np.zeros(count, np.int32)
    padded[:min(count, len(steps))] = steps[:count]
    return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]


def _processes_that_failed(failed_here: bool) -> list[int]:
    """The processes (indices) for which an attempt failed; every process gets the same list."""
    if jax.process_count() == 1:
        return [0] if failed_here else []
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(failed_here)))
    return [int(i) for i in np.flatnonzero(flags)]

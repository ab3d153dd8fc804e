"""Our own checkpoint format: an Orbax PyTree checkpoint of the parameters plus a JSON sidecar.

    DIR/unitoken_config.json   {"config": <UniTokenConfig>, "hf_config": ..., "hf_dtype": ...}
    DIR/params/                Orbax (StandardCheckpointer) parameter tree, scanned layout
    DIR/passthrough/           Orbax tree of tensors carried through unchanged (if any)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from unitoken_jax.convert.files import SIDECAR, CheckpointError, is_orbax_checkpoint, read_json_object
from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.models.unitoken import abstract_params

# 2: the decoder's q/k/v kernels are [layers, heads, embed, head_dim] (1: [layers, embed, heads, head_dim])
PARAM_LAYOUT = 2


def remove(path: str) -> bool:
    """Deletes our checkpoint in `path` (sidecar, params/, passthrough/), leaving the folder's other
    files; False if there was none. An HF save into its folder calls it: `load` prefers our format,
    so it would otherwise go on loading these weights instead of the ones just written."""
    if not is_orbax_checkpoint(path):
        return False
    for sub in ("params", "passthrough"):
        for name in (sub, sub + _NEW, sub + _OLD):
            if os.path.isdir(os.path.join(path, name)):
                shutil.rmtree(os.path.join(path, name))
    os.remove(os.path.join(path, SIDECAR))
    return True


# a save writes beside the checkpoint there and then renames over it: Orbax's `force` deletes the
# directory it saves to first, so a save over an earlier checkpoint that was stopped part way (Ctrl-C,
# a full disk) had left neither
_NEW, _OLD = ".partial", ".replaced"


def _nest(flat: dict[str, np.ndarray]) -> dict:
    """{'a.b.c': x} -> {'a': {'b': {'c': x}}}: Orbax joins tree keys with dots itself."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = np.asarray(v)
    return out


# Orbax copies arrays to host before writing; a small concurrency budget keeps that copy to about
# a gigabyte at a time instead of the whole model (converting 7B would otherwise need it twice).
SAVE_CONCURRENT_GB = 1


def _reader() -> ocp.Checkpointer:
    """A restore whose reads take about a gigabyte at a time (Orbax's default budget, 96 GB, lets
    every leaf be read at once: a 1.38 GiB float32 model peaked at 1.63x its size, 1.44x with this)."""
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(restore_concurrent_gb=SAVE_CONCURRENT_GB))


def save(path: str, config: UniTokenConfig, params, passthrough: dict[str, np.ndarray] | None = None,
         extra: dict[str, Any] | None = None) -> None:
    path = os.path.abspath(path)
    # the sidecar made first: a config that cannot be written fails before an earlier checkpoint
    # there is touched, and it is replaced whole (renamed over), never left half written
    sidecar = json.dumps({"config": config.to_dict(), "param_layout": PARAM_LAYOUT, **(extra or {})}, indent=2,
                         sort_keys=True)
    os.makedirs(path, exist_ok=True)
    # on a pod every process saves its shards of the arrays (Orbax's save is collective) and the
    # first writes the rest: two processes renaming one sidecar.partial over, one found it gone
    primary = jax.process_index() == 0
    trees = {"params": params, **({"passthrough": _nest(passthrough)} if passthrough else {})}
    with ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB)) as ckpt:
        for sub, tree in trees.items():  # (what a stopped save left under these names is written over)
            ckpt.save(os.path.join(path, sub + _NEW), tree, force=True)
    if primary:
        with open(os.path.join(path, SIDECAR + ".partial"), "w") as f:
            f.write(sidecar)
        # the swap: renames, each whole; the earlier checkpoint's trees are deleted after it (an earlier
        # passthrough the new model has none of goes too: it would be restored)
        for sub in ("params", "passthrough"):
            here, old = os.path.join(path, sub), os.path.join(path, sub + _OLD)
            if os.path.isdir(old):
                shutil.rmtree(old)
            if os.path.isdir(here):
                os.replace(here, old)
            if sub in trees:
                os.replace(here + _NEW, here)
        os.replace(os.path.join(path, SIDECAR + ".partial"), os.path.join(path, SIDECAR))
        for sub in ("params", "passthrough"):
            shutil.rmtree(os.path.join(path, sub + _OLD), ignore_errors=True)
    if jax.process_count() > 1:  # every process returns with the checkpoint whole (a read after it found no sidecar)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("unitoken_jax orbax_io.save: sidecar written")


def read_sidecar(path: str) -> dict[str, Any]:
    """The checkpoint's JSON sidecar; a checkpoint in an older parameter layout is a CheckpointError
    that says how to remake it."""
    sidecar = read_json_object(os.path.join(os.path.abspath(path), SIDECAR))
    if not isinstance(sidecar.get("config"), dict):
        raise CheckpointError(f"{os.path.join(path, SIDECAR)} has no 'config' object")
    layout = sidecar.get("param_layout", 1)
    if layout != PARAM_LAYOUT and sidecar.get("config", {}).get("decoder") is not None:
        raise CheckpointError(
            f"{path} was written by an older unitoken-jax (parameter layout {layout}: q/k/v kernels "
            f"[embed, heads, head_dim]); this one reads layout {PARAM_LAYOUT}. Convert the HF checkpoint it came "
            f"from again (unitoken convert --from HF_DIR --to {path})")
    return sidecar


@contextlib.contextmanager
def _damage_named(path: str):
    """Orbax / TensorStore failures on a damaged checkpoint (a data file deleted or cut short, the
    manifest gone) as one CheckpointError naming the checkpoint, not a TensorStore traceback."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the storage layer raises
        raise CheckpointError(f"{path}: the stored arrays cannot be read ({storage_reason(e)}); the checkpoint is "
                              "damaged or incomplete: write it again from its source") from None


def storage_reason(error: BaseException) -> str:
    """'Type: first line' of the error at the bottom of `error`'s chain: the storage layer's own
    (which array, what is wrong with its file) under Orbax's wrapping, whose message is an index
    and the repr of a method."""
    while True:
        below = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if below is None:
            break
        error = below
    text = str(error).strip().split(" [tensorstore_spec=")[0]  # (the whole spec, as JSON)
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def check_shapes(path: str, config: UniTokenConfig) -> None:
    """The stored parameters have the names and shapes the sidecar's config implies, or a
    CheckpointError listing the first differences (a restore target's shapes are not enforced by
    Orbax: a mismatch would otherwise load, or convert, into a broken model)."""
    params_dir = os.path.join(os.path.abspath(path), "params")
    with _damage_named(path), ocp.PyTreeCheckpointer() as ckpt:
        metadata = ckpt.metadata(params_dir)
        if metadata is None or metadata.item_metadata is None:  # what Orbax returns with the array index gone
            raise CheckpointError(f"{path}: the index of the stored arrays ({params_dir}: manifest.ocdbt, "
                                  "_METADATA) cannot be read; the checkpoint is damaged or incomplete: write it "
                                  "again from its source")
        stored = traverse_util.flatten_dict(metadata.item_metadata.tree)
    # shapes only: a float64 checkpoint read without JAX's 64-bit mode (into float32) is checked
    # without JAX warning, for each parameter it inits, that float64 is not available
    shapes = dataclasses.replace(config, param_dtype="float32", dtype="float32")
    wanted = traverse_util.flatten_dict(abstract_params(shapes))
    problems = [f"{'/'.join(k)}: missing" for k in wanted if k not in stored]
    problems += [f"{'/'.join(k)}: not in the config" for k in stored if k not in wanted]
    problems += [f"{'/'.join(k)}: stored {tuple(stored[k].shape)}, the config needs {tuple(w.shape)}"
                 for k, w in wanted.items() if k in stored and tuple(stored[k].shape) != tuple(w.shape)]
    if problems:
        raise CheckpointError(f"{path}: the parameters do not match the config in {SIDECAR} ({len(problems)} "
                              f"differences): " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))


def restore(path: str, target=None) -> tuple[UniTokenConfig, Any, dict[str, np.ndarray], dict[str, Any]]:
    """Returns (config, params, passthrough, sidecar). `target`, a tree of `jax.ShapeDtypeStruct`
    with shardings (and the dtype wanted), restores the parameters straight onto devices, on any
    mesh; without it they come back as numpy arrays in the stored dtype."""
    path = os.path.abspath(path)
    sidecar = read_sidecar(path)
    config = UniTokenConfig.from_dict(sidecar["config"])
    check_shapes(path, config)
    with _damage_named(path), _reader() as ckpt:
        if target is None:
            target = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), abstract_params(config))
        params = ckpt.restore(os.path.join(path, "params"), target)
    return config, params, restore_passthrough(path), sidecar


def restore_leaves(path: str, abstract: dict):
    """Yields (leaf path, numpy array) for every leaf of `abstract`, restoring one leaf at a time
    (an Orbax partial restore), so the host holds one parameter, not the model."""
    params_dir = os.path.join(os.path.abspath(path), "params")
    flat = traverse_util.flatten_dict(abstract)
    with _damage_named(path), ocp.PyTreeCheckpointer() as ckpt:
        for leaf_path, leaf in flat.items():
            item = traverse_util.unflatten_dict({leaf_path: np.empty(leaf.shape, leaf.dtype)})
            restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), item)
            tree = ckpt.restore(params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                         partial_restore=True))
            yield leaf_path, traverse_util.flatten_dict(tree)[leaf_path]


def restore_passthrough(path: str) -> dict[str, np.ndarray]:
    directory = os.path.join(os.path.abspath(path), "passthrough")
    if not os.path.exists(directory):
        return {}
    with _reader() as ckpt:
        return _flatten(ckpt.restore(directory))

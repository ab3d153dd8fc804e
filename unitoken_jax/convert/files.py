"""What every reader of safetensors directories shares: the error they raise, the files of a
(possibly sharded) checkpoint, opening one, and walking a parameter tree by key path."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

from safetensors import SafetensorError, safe_open

SHARD_BYTES = 2 * 1024**3  # the largest safetensors file `hf.write_hf` makes (and holds in memory)


# our Orbax checkpoint's record of its config (`orbax_io`; here so that a light reader can tell the format)
SIDECAR = "unitoken_config.json"


def is_orbax_checkpoint(path: str) -> bool:
    """Whether `path` holds a checkpoint in our Orbax format (`orbax_io`)."""
    return os.path.exists(os.path.join(path, SIDECAR))


# beside a model trained here (training's final/): how its data laid out pictures, so that inference cuts
# and draws them as training did (`inference.pipeline.trained_record` reads it)
TRAINED_PICTURES = "trained_pictures.json"


def keep_trained_record(source, dest: str) -> None:
    """Copies `source`'s `TRAINED_PICTURES` (if it is a directory holding one) into `dest`: a model
    saved again (quantized, converted to the other layout) keeps what its training recorded (its
    int8 copy drew at 512 x 512 instead of its own size, and skipped the tokenizer's check)."""
    if not isinstance(source, str) or not os.path.isfile(os.path.join(source, TRAINED_PICTURES)):
        return
    if os.path.isdir(dest) and os.path.samefile(source, dest):
        return
    shutil.copyfile(os.path.join(source, TRAINED_PICTURES), os.path.join(dest, TRAINED_PICTURES))


class CheckpointError(ValueError):
    """A checkpoint that does not match what the model needs."""


def pid_alive(pid) -> bool:
    """Is process `pid` running on this host? (False for anything that is not a positive int.)"""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def read_json_object(path: str) -> dict:
    """A JSON file that must hold an object, or a CheckpointError naming the file and the fault."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


INDEX = "model.safetensors.index.json"


def weight_map(path: str) -> dict[str, str] | None:
    """The sharded checkpoint's index (tensor name -> file name), None where there is none."""
    index = os.path.join(path, INDEX)
    if not os.path.exists(index):
        return None
    names = read_json_object(index).get("weight_map")
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise CheckpointError(f"{index} has no 'weight_map' object of tensor name -> file name")
    return names


_SHARD = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.safetensors$")  # model-00001-of-00003.safetensors


def _missing_shards(files: list[str]) -> list[str]:
    """The shards a set of files named `PREFIX-NNNNN-of-MMMMM.safetensors` lacks (for each PREFIX
    and MMMMM among them), in order."""
    sets: dict[tuple[str, str], set[int]] = {}
    for name in files:
        m = _SHARD.match(name)
        if m:
            sets.setdefault((m.group(1), m.group(3)), set()).add(int(m.group(2)))
    return [f"{prefix}-{i:05d}-of-{total}.safetensors" for (prefix, total), have in sorted(sets.items())
            for i in range(1, int(total) + 1) if i not in have]


ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's adapters, which a model's folder may hold beside it


def _weights_files(path: str, files: list[str]) -> list[str]:
    """Of a folder's safetensors files (no index), the model's: `model.safetensors` or the
    `model-NNNNN-of-MMMMM` shards where it has them, as transformers reads the folder (PEFT's
    adapters saved beside the model, a browser's "model (1).safetensors", were read as its tensors
    and refused as unexpected ones); the others are said. A folder without those names: all."""
    own = [f for f in files if f == "model.safetensors" or (m := _SHARD.match(f)) and m.group(1) == "model"]
    if not own:
        return files
    others = [f for f in files if f not in own]
    if ADAPTER_FILE in others:  # (transformers applies them when PEFT is installed: here they are asked for)
        warnings.warn(f"{path} holds PEFT adapters ({ADAPTER_FILE}) beside the model: its weights are read without "
                      f"them (adapters={path!r}, the CLI's --adapters, applies them)", stacklevel=4)
    rest = [f for f in others if f != ADAPTER_FILE]
    if rest:
        warnings.warn(f"{path}: {', '.join(rest[:3])}{' ...' if len(rest) > 3 else ''} not read (the model's "
                      f"weights are {own[0] if len(own) == 1 else 'its model-*-of-* shards'})", stacklevel=4)
    return own


def checkpoint_files(path: str) -> list[str]:
    names = weight_map(path)
    if names is not None:
        files = sorted(set(names.values()))
    else:
        files = _weights_files(path, sorted(f for f in os.listdir(path) if f.endswith(".safetensors")))
        missing = _missing_shards(files)
        if missing:  # (without an index, a lost shard was blamed on config.json's layer count)
            raise CheckpointError(f"{path} has no index ({INDEX}) and lacks {', '.join(missing[:3])}"
                                  f"{' ...' if len(missing) > 3 else ''}: its shards' names say "
                                  f"{int(_SHARD.match(missing[0]).group(3))} of them")
    if not files:
        torch_files = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth")))
        if torch_files:  # (transformers' save_pretrained(safe_serialization=False), older releases)
            raise CheckpointError(
                f"{path} holds PyTorch weights ({', '.join(torch_files[:3])}{' ...' if len(torch_files) > 3 else ''})"
                ", not safetensors, which is what this loader reads; convert them once with transformers: "
                "AutoModel.from_pretrained(path).save_pretrained(out) writes safetensors")
        raise CheckpointError(f"no .safetensors files in {path}")
    for name in files:
        if not os.path.exists(os.path.join(path, name)):
            raise CheckpointError(f"{path}: the index names {name}, which is missing")
    return [os.path.join(path, f) for f in files]


def check_weight_map(path: str, found: dict[str, str]) -> list[str]:
    """The index of a sharded checkpoint against what its shards hold (`found`: tensor name -> the
    file holding it): a tensor it names that its shard lacks is a CheckpointError (the tensor would
    be missing from the model unsaid); returns what else disagrees (a tensor in another shard than
    named, one the index does not name: read all the same), for the caller to tell."""
    names = weight_map(path)
    if names is None:
        return []
    missing = [f"{k} (in {v})" for k, v in names.items() if k not in found]
    if missing:
        raise CheckpointError(f"{os.path.join(path, INDEX)} names {len(missing)} tensors that its shards do not hold: "
                              + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                              + "; the checkpoint is incomplete (a shard from another save?)")
    elsewhere = [f"{k} (named in {names[k]}, found in {os.path.basename(f)})" for k, f in found.items()
                 if k in names and names[k] != os.path.basename(f)]
    unnamed = [f"{k} (in {os.path.basename(f)})" for k, f in found.items() if k not in names]
    notes = []
    if elsewhere:
        notes.append(f"{len(elsewhere)} tensors are in another shard than the index says: "
                     + ", ".join(elsewhere[:3]) + (" ..." if len(elsewhere) > 3 else ""))
    if unnamed:
        notes.append(f"{len(unnamed)} tensors are not in the index: "
                     + ", ".join(unnamed[:3]) + (" ..." if len(unnamed) > 3 else ""))
    return notes


def open_safetensors(file: str):
    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from e


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _umask() -> int | None:
    """This process's umask, read without changing it (os.umask sets it, racing other threads'
    file creation); None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def save_safetensors(tensors: dict, file: str, metadata: dict | None = None) -> None:
    """safetensors' `save_file`, with the file's permissions the umask's, as every other file here:
    safetensors 0.8 makes it owner-only (0600), so a model written to a shared directory could not
    be read by the lab's other users."""
    from safetensors.numpy import save_file

    save_file(tensors, file, metadata=metadata)
    umask = _umask()
    if umask is not None:  # (unknown: the file stays as safetensors made it, never wider)
        try:
            os.chmod(file, 0o666 & ~umask)
        except OSError:  # a filesystem without permissions (vfat, some FUSE mounts): written all the same
            pass

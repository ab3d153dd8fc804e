"""What every reader of safetensors directories shares: the error they raise, the files of a
(possibly sharded) checkpoint, opening one, and walking a parameter tree by key path."""

from __future__ import annotations

import json
import os

from safetensors import SafetensorError, safe_open


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


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no 'weight_map' object of tensor name -> file name")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {path}")
    for name in files:
        if not os.path.exists(os.path.join(path, name)):
            raise CheckpointError(f"{path}: the index names {name}, which is missing")
    return [os.path.join(path, f) for f in files]


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

"""Reads the tensors of a PyTorch `torch.save` file (the zip format) without PyTorch.

Meta's `vqgan.ckpt` is a PyTorch Lightning checkpoint. Only tensors, plain containers and
OrderedDicts are rebuilt; any other class named in the pickle becomes an inert placeholder and
no code from the file is ever run (unlike `torch.load` with `weights_only=False`).
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from unitoken_jax.convert.files import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class Placeholder:
    """Stands for any object in the pickle that is not a tensor or a plain container. What the
    pickle puts in it is kept, inert: its state, and the items of a dict or list subclass (a
    Lightning checkpoint's AttributeDict of hyperparameters, a defaultdict), which pickle fills
    with `obj[key] = value` and `obj.append` / `obj.extend`."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("values", []).extend(values)

    def __repr__(self):
        return f"<{type(self).__qualname__}>"


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    """A tensor viewing `storage` — only once its offset, size and stride are checked to stay inside
    that storage (a crafted file could otherwise make the view read memory it does not own)."""
    if not isinstance(storage, np.ndarray):
        raise CheckpointError(f"a tensor's storage is {type(storage).__name__}, not a storage record")
    size = tuple(size) if isinstance(size, (tuple, list)) else size
    stride = tuple(stride) if isinstance(stride, (tuple, list)) else stride
    if not (_is_count(offset) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(map(_is_count, size)) and all(map(_is_count, stride))):
        raise CheckpointError(f"a tensor record has an invalid offset {offset!r}, size {size!r} or stride {stride!r}")
    if all(size):  # not empty: the last element it reads must lie inside the storage
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= len(storage):
            raise CheckpointError(f"a tensor record (offset {offset}, size {size}, stride {stride}) reaches element "
                                  f"{last} of a storage of {len(storage)}")
    elif offset > len(storage):
        raise CheckpointError(f"a tensor record's offset {offset} lies past its storage of {len(storage)}")
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    if not all(size):
        return np.zeros(size, storage.dtype)
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *_unused):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    """A tensor saved with Python attributes of its own (or of a Tensor subclass): the tensor, as
    `func` rebuilds it; the attributes and the subclass are not kept."""
    return func(*args)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        return type(f"{module}.{name}", (Placeholder,), {})

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        if key not in self._storages:
            if isinstance(storage_type, _StorageType):
                dtype = storage_type.dtype
            else:  # torch >= 2 may write an untyped storage plus a dtype
                raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise CheckpointError(f"the archive has no storage record {key!r}") from None
            if not _is_count(numel) or numel * dtype.itemsize > len(raw):
                raise CheckpointError(f"storage record {key!r} holds {len(raw)} bytes, not {numel!r} x {dtype}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
        return self._storages[key]


def load_torch_file(path: str) -> Any:
    """The object saved by `torch.save`, with tensors as numpy arrays."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip archive that lost its end (its directory): cut short
                raise CheckpointError(f"{path} is a zip archive without its end: truncated (an interrupted "
                                      "download or copy?)")
        raise CheckpointError(f"{path} is not a PyTorch zip checkpoint: the legacy format (torch < 1.6, or "
                              "_use_new_zipfile_serialization=False) is not read; re-save it with "
                              "torch.save(obj, path) and its default zip format")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("/data.pkl")]
        with archive.open(pkl[0]) as f:
            try:
                return _Unpickler(f, archive, prefix).load()
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
            except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, TypeError, ValueError, KeyError,
                    IndexError, AttributeError) as e:
                raise CheckpointError(f"{path} is damaged or not a torch.save file: {type(e).__name__}: {e}") from None

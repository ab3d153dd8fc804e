"""Weight-only int8 for inference: which parameters become int8, and turning float ones into it.

The rule lives in the modules, not here: every weight that meets an activation in a matmul goes
through `layers.kernel_product`, which in an int8 model declares `kernel` (int8) and
`kernel_scale` (float32, the kernel's shape with its contracted dims at 1). So a parameter is
quantized exactly when the int8 model's parameter tree has an int8 leaf where the float one has a
float leaf — norms, biases, embedding tables and the patch convolution are left as they are,
because no module asks for them in int8. This file only follows that tree.

    q_config = config.replace(quantize="int8")
    q_params = quantize_params(params, config)                     # a whole tree (host or device)
    to_int8 = LeafQuantizer(config)                                 # one leaf at a time, as a loader reads
    values, scale = to_int8(("decoder", "lm_head", "kernel"), w)    # or (w, None) for a leaf left as it is
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unitoken_jax.models.config import UniTokenConfig, check_quantize
from unitoken_jax.models.layers import quantize_int8
from unitoken_jax.models.unitoken import abstract_params

SCALE = "kernel_scale"
_quantize_on_device = jax.jit(quantize_int8, static_argnums=1)


class LeafQuantizer:
    """Quantizes the leaves of a float parameter tree one at a time, by the int8 model's tree.

    `__call__(path, array)` returns (int8 values, float32 scale) for a leaf the int8 model holds
    in int8, else (array, None). The scale belongs beside the values, under `scale_path(path)`.
    A scanned leaf (a leading layers axis the scale keeps) is quantized one layer at a time, so the
    float32 working copy is one layer of one tensor."""

    def __init__(self, config: UniTokenConfig, mode: str = "int8"):
        if check_quantize(mode) == "none":
            raise ValueError("LeafQuantizer needs a quantized mode ('int8')")
        if config.quantize != "none":
            raise ValueError(f"the parameters are already quantized ({config.quantize})")
        if config.lora is not None:  # (int8 kernels beside float adapters would compute neither model)
            raise ValueError("the parameters hold LoRA adapters beside the kernels: fold them in first "
                             "(UniTokenModel.merge_adapters; UniTokenModel.quantize does it)")
        self.config = config.replace(quantize=mode)
        self.int8 = traverse_util.flatten_dict(abstract_params(self.config))

    def is_quantized(self, path: tuple[str, ...]) -> bool:
        leaf = self.int8.get(tuple(path))
        return leaf is not None and leaf.dtype == np.int8 and self.scale_path(path) in self.int8

    @staticmethod
    def scale_path(path: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(path[:-1]) + (SCALE,)

    def scale_struct(self, path: tuple[str, ...]) -> jax.ShapeDtypeStruct:
        return self.int8[self.scale_path(path)]

    def __call__(self, path: tuple[str, ...], array) -> tuple[Any, Any]:
        path = tuple(path)
        if not self.is_quantized(path):
            return array, None
        scale_shape = self.scale_struct(path).shape
        if isinstance(array, jax.Array):  # on devices already: one jitted pass, sharding kept
            values, scale = _quantize_on_device(array, scale_shape)
            finite = bool(jnp.all(jnp.isfinite(array)))  # (XLA's max need not propagate a NaN to the scale)
        else:
            array = np.asarray(array)
            layers = self.by_layer(path, array.shape)
            if layers is not None:  # a layer at a time
                for i in range(array.shape[0]):
                    layers.put(i, array[i])
                return layers.result()
            with np.errstate(invalid="ignore"):  # (an infinity times 0: refused below, by name)
                values, scale = quantize_int8(array, scale_shape)
            finite = bool(np.isfinite(scale).all())
        if not finite:  # (on the host a scale is NaN or infinite where its channel holds a NaN or infinity)
            raise _damaged(path)
        return values, scale

    def by_layer(self, path: tuple[str, ...], shape: tuple[int, ...]) -> "LayerQuantizer | None":
        """For a scanned leaf of `shape` that is quantized a layer at a time: a `LayerQuantizer` to
        give its layers one by one (a reader then never holds the leaf in float); else None."""
        path = tuple(path)
        if not self.is_quantized(path):
            return None
        scale_shape = self.scale_struct(path).shape
        if not _layerwise(shape, scale_shape):
            return None
        return LayerQuantizer(path, shape, scale_shape)


def _damaged(path: tuple[str, ...]) -> ValueError:
    return ValueError(f"{'/'.join(path)} holds NaN or infinite weights, which int8 cannot carry (the float model "
                      "computes NaN from them too): the checkpoint is damaged")


def _layerwise(shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> bool:
    """Whether a leaf is quantized one layer at a time: a leading layers axis its scale keeps."""
    return len(shape) >= 3 and scale_shape[0] == shape[0] and shape[0] > 1


class LayerQuantizer:
    """The int8 values and scales of one scanned leaf, filled a layer at a time (`put`), so that
    the float32 working copy is one layer of one tensor; `result()` gives (values, scale) as
    `LeafQuantizer` does, once every layer is in."""

    def __init__(self, path: tuple[str, ...], shape: tuple[int, ...], scale_shape: tuple[int, ...]):
        self.path, self.scale_shape = path, scale_shape
        self.values = np.empty(shape, np.int8)
        self.scale = np.empty(scale_shape, np.float32)
        self.filled = np.zeros(shape[0], bool)

    def put(self, layer: int, array) -> None:
        with np.errstate(invalid="ignore"):
            self.values[layer], self.scale[layer] = quantize_int8(np.asarray(array), self.scale_shape[1:])
        self.filled[layer] = True

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.filled.all():
            raise ValueError(f"{'/'.join(self.path)}: layers {np.flatnonzero(~self.filled)[:5].tolist()} were never "
                             "given")
        if not np.isfinite(self.scale).all():
            raise _damaged(self.path)
        return self.values, self.scale


def quantize_params(params: dict, config: UniTokenConfig, mode: str = "int8") -> dict:
    """The int8 model's parameter tree (for `config.replace(quantize=mode)`) from float parameters."""
    quantizer = LeafQuantizer(config, mode)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, array in flat.items():
        values, scale = quantizer(path, array)
        out[path] = values
        if scale is not None:
            out[quantizer.scale_path(path)] = scale
    missing = sorted(set(quantizer.int8) - set(out))
    if missing:
        raise ValueError(f"the parameters lack {['/'.join(p) for p in missing[:4]]} of the int8 model")
    return traverse_util.unflatten_dict(out)


def dequantize_params(params: dict) -> dict:
    """int8 values times their scales, as float32 (what the int8 model computes with, for tests
    and for inspecting the rounding error)."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, array in flat.items():
        if path[-1] == SCALE:
            continue
        scale = flat.get(tuple(path[:-1]) + (SCALE,))
        out[path] = array if scale is None else np.asarray(array, np.float32) * np.asarray(scale)
    return traverse_util.unflatten_dict(out)

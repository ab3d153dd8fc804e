"""Low-rank adapters (LoRA): which parameters they are, and folding them into the kernels.

The adapters live where the kernels do: `layers.kernel_product` gives every kernel that
`config.lora` targets two more parameters beside it, `lora_a` [contracted dims..., rank] and
`lora_b` [rank, output dims...], and adds `scaling * (x @ lora_a) @ lora_b` to its product.
So a LoRA model's parameter tree is the base tree plus those leaves, and

    kernel + scaling * einsum(lora_a, lora_b)    (over the rank, back into the kernel's dims)

is the merged kernel. Which dims are which comes from the parameters' logical axis names (the
kernel's and its factors' names are the same names), not from a table of module names.

    lora_config = LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    config = base_config.replace(lora=lora_config)
    params = with_adapters(base_params, config, seed=0)      # B = 0: the model is the base model
    merged_params, base_config = merge(params, config)       # one kernel per projection again
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.models.unitoken import init_variables, param_logical_specs

A, B = "lora_a", "lora_b"


def is_adapter(path) -> bool:
    """Is the leaf at this key path (strings, or jax key entries) a LoRA factor?"""
    last = path[-1]
    return getattr(last, "key", last) in (A, B)


def adapter_kernels(config: UniTokenConfig) -> list[tuple[str, ...]]:
    """The kernel paths of `config`'s model that carry adapters (empty without `config.lora`)."""
    if config.lora is None:
        return []
    specs = traverse_util.flatten_dict(param_logical_specs(config))
    return sorted(p[:-1] + ("kernel",) for p in specs if p[-1] == A)


def split(params: dict) -> tuple[dict, dict]:
    """(base parameters, adapter parameters), two disjoint nested dicts."""
    flat = traverse_util.flatten_dict(params)
    base = {p: v for p, v in flat.items() if not is_adapter(p)}
    adapters = {p: v for p, v in flat.items() if is_adapter(p)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def join(base: dict, adapters: dict) -> dict:
    """The inverse of `split`."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapters)})


def with_adapters(base_params: dict, config: UniTokenConfig, seed: int = 0) -> dict:
    """`base_params` (a model without adapters) plus freshly initialised adapters for
    `config.lora` (A random, B zero: the model computes exactly what the base model does)."""
    if config.lora is None:
        raise ValueError("the config has no lora section")
    fresh = _init_adapters(config, seed)
    flat = traverse_util.flatten_dict(base_params)
    clash = [p for p in flat if is_adapter(p)]
    if clash:
        raise ValueError(f"the parameters already hold adapters ({'/'.join(clash[0])}); merge them first")
    return traverse_util.unflatten_dict({**flat, **fresh})


def _init_adapters(config: UniTokenConfig, seed: int) -> dict:
    scanned = config.replace(scan_layers=True, remat_policy="none")

    def init():
        variables = init_variables(scanned, jax.random.key(seed))
        flat = traverse_util.flatten_dict(variables["params"])
        return {p: (v.value if hasattr(v, "value") else v) for p, v in flat.items() if is_adapter(p)}

    return jax.jit(init)()


def _names(spec) -> tuple[str, ...]:
    return tuple(n if n is not None else f"_{i}" for i, n in enumerate(spec))


def delta_equation(kernel_spec, a_spec, b_spec) -> str:
    """The einsum 'A,B->kernel' of a kernel's low-rank update, from the logical axis names of the
    kernel and its two factors (each name stands for one dim; 'lora_rank' is summed over)."""
    names = sorted(set(_names(kernel_spec)) | set(_names(a_spec)) | set(_names(b_spec)))
    letter = dict(zip(names, string.ascii_letters))
    spell = lambda spec: "".join(letter[n] for n in _names(spec))  # noqa: E731
    return f"{spell(a_spec)},{spell(b_spec)}->{spell(kernel_spec)}"


def _factors(params: dict, config: UniTokenConfig):
    """Yields (kernel path, A, B, the einsum 'A,B->kernel', whether the kernel is stacked over
    layers) for every adapter of `params` (the factors alone will do)."""
    specs = traverse_util.flatten_dict(param_logical_specs(config))
    flat = traverse_util.flatten_dict(params)
    for kernel in adapter_kernels(config):
        owner = kernel[:-1]
        equation = delta_equation(specs[kernel], specs[owner + (A,)], specs[owner + (B,)])
        yield kernel, flat[owner + (A,)], flat[owner + (B,)], equation, tuple(specs[kernel])[:1] == ("layers",)


def kernel_deltas(params: dict, config: UniTokenConfig):
    """Yields (kernel path, scaling * A @ B in the kernel's shape, float32) for every adapter."""
    for kernel, a, b, equation, _ in _factors(params, config):
        xp = jnp if isinstance(a, jax.Array) else np
        delta = xp.einsum(equation, xp.asarray(a, xp.float32), xp.asarray(b, xp.float32))
        yield kernel, delta * np.float32(config.lora.scaling)


class LeafMerger:
    """Folds adapters into their kernels one parameter at a time, as a checkpoint is read: `merge`
    for a model that is never whole in float. `__call__(path, array)` returns the leaf with its
    update added (`scaling * A @ B`, summed in float32 and rounded once to the leaf's dtype), a
    scanned leaf one layer at a time, so the float32 working copy is one layer of one tensor;
    other leaves come back as they are. `adapters`: the factors (host arrays) of `config.lora`."""

    def __init__(self, adapters: dict, config: UniTokenConfig):
        self.scaling = np.float32(config.lora.scaling)
        self.work = {kernel: (np.asarray(a, np.float32), np.asarray(b, np.float32), equation, layered)
                     for kernel, a, b, equation, layered in _factors(adapters, config)}

    def _add(self, w, a, b, equation):
        return (w.astype(np.float32) + np.einsum(equation, a, b) * self.scaling).astype(w.dtype)

    def __call__(self, path: tuple[str, ...], array):
        work = self.work.get(tuple(path))
        if work is None:
            return array
        a, b, equation, layered = work
        if not layered:
            return self._add(np.asarray(array), a, b, equation)
        out = np.array(array)  # (a copy of one leaf in its own dtype; a layer at a time in float32)
        for i in range(out.shape[0]):
            out[i] = self.layer(path, i, out[i])
        return out

    def layer(self, path: tuple[str, ...], i: int, array):
        """Layer `i` of a scanned leaf with its update added (a reader that hands the leaf over a
        layer at a time: an int8 load's quantizer)."""
        work = self.work.get(tuple(path))
        if work is None:
            return array
        a, b, equation, layered = work
        if not layered:
            raise ValueError(f"{'/'.join(path)} is not stacked over layers")
        return self._add(np.asarray(array)[None], a[i:i + 1], b[i:i + 1], equation)[0]


def merge(params: dict, config: UniTokenConfig) -> tuple[dict, UniTokenConfig]:
    """(parameters with every adapter folded into its kernel, the config without `lora`). Each
    kernel keeps its dtype (a bfloat16 base is rounded once, after the float32 sum)."""
    if config.lora is None:
        return params, config
    if config.quantize != "none":
        raise ValueError(f"adapters cannot be merged into {config.quantize} kernels; merge them into the float "
                         "model, then quantize")
    flat = traverse_util.flatten_dict(params)
    for kernel, delta in kernel_deltas(params, config):
        w = flat[kernel]
        xp = jnp if isinstance(w, jax.Array) else np
        flat[kernel] = (xp.asarray(w, xp.float32) + delta).astype(w.dtype)
    base = {p: v for p, v in flat.items() if not is_adapter(p)}
    return traverse_util.unflatten_dict(base), config.replace(lora=None)

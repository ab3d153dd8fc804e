"""Will a model decode on these devices, and in which weight format?

A generation needs its weights and its KV cache on the devices, and little else: the prefill
hands the cache out of the layers and the decode loop updates it in place (AOT-compiled for the
released 7B, 512 x 512 with CFG, both programs have no temporaries to speak of; see
`benchmarks/results/decode_fit.md`). All weights count, the SigLIP tower's too: it stays on the
devices even while no picture is read. For one image on one chip: bfloat16 13.87 + 1.10 =
14.97 GiB, int8 7.19 + 1.10 = 8.29 GiB.

    quantize, why = choose_quantize(unitoken_jax.read_config(path), images=4)
    model = unitoken_jax.load(path, param_dtype="bfloat16", dtype="bfloat16", quantize=quantize)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import jax
import numpy as np

from unitoken_jax import sharding
from unitoken_jax.inference.decode import PROMPT_MULTIPLE, prefill_width
from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.models.unitoken import abstract_params, uneven_split, weight_specs
from unitoken_jax.tokenizer import anyres as anyres_lib, layout

log = logging.getLogger(__name__)

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class DecodeMemory:
    weights: int  # bytes of all parameters
    cache: int  # bytes of the KV cache of the whole batch

    @property
    def peak(self) -> int:
        return self.weights + self.cache


def decode_memory(config: UniTokenConfig, images: int, *, size: tuple[int, int] = (512, 512), cfg: bool = True,
                  prompt_length: int = 64, quantize: str = "none", dtype: str = "bfloat16", rows: int | None = None,
                  positions: int | None = None, cache_dtype: str | None = None) -> DecodeMemory:
    """Bytes of the weights (`dtype`, matmul kernels int8 with `quantize="int8"`) and of the KV
    cache (in `cache_dtype`, the compute dtype; default `dtype`) for `images` generated pictures of
    `size` pixels after a prompt of `prompt_length` tokens (its last the image's <racm3:break>),
    which the decode loop pads up to a multiple of `decode.PROMPT_MULTIPLE`. `rows` and
    `positions` give the cache's shape instead (answers, a server's slots): that many rows of that
    many positions."""
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    params = abstract_params(config.replace(param_dtype=dtype, quantize=quantize))
    weights = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))
    d = config.decoder
    grid_hw = (size[1] // layout.PIXELS_PER_GRID, size[0] // layout.PIXELS_PER_GRID)
    if positions is None:  # the prompt ends with <racm3:break>
        positions = prefill_width(prompt_length, PROMPT_MULTIPLE) + layout.generated_image_length(grid_hw) - 1
    if rows is None:
        rows = images * (2 if cfg else 1)
    cache = 2 * d.num_layers * rows * d.num_kv_heads * positions * d.head_dim * np.dtype(cache_dtype or dtype).itemsize
    return DecodeMemory(weights, cache)


def device_memory(device) -> int | None:
    """Bytes a program may use on `device` (its allocator's limit), or None where it has no
    such limit to report (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        return None
    return None if not stats else stats.get("bytes_limit")


def picture_prompt_length(config: UniTokenConfig, vq_size: int = 512, anyres: bool = False) -> int:
    """Tokens a picture takes in a prompt (to answer about it or edit it): its VQ codes' grid at
    `vq_size` pixels and its SigLIP features: one tile's, or with `anyres` the most a picture can
    take (the base tile, then the largest pinpoint grid's rows of features, each with its newline)."""
    side = vq_size // layout.PIXELS_PER_GRID
    features = 0
    if config.vision is not None:
        tile, patch = config.vision.image_size, config.vision.patch_size
        features = anyres_lib.max_block(tile, patch) - 1 if anyres else (tile // patch) ** 2  # (less its SEP)
    return 1 + layout.generated_image_length((side, side)) + features


def decoder_positions(config: UniTokenConfig, anyres: bool = False) -> int:
    """The positions a conversation may take: the model's, and with `anyres` an AnyRes picture's
    SigLIP block on top of them (the reference's budget; `UniTokenPipeline` allows the same)."""
    positions = config.decoder.max_position_embeddings
    if anyres and config.vision is not None:
        positions += anyres_lib.max_block(config.vision.image_size, config.vision.patch_size)
    return positions


def mesh_devices(mesh) -> list:
    """The devices a model loaded onto `mesh` uses: the mesh's, or the default device without one."""
    return list(mesh.devices.flat) if mesh is not None else jax.local_devices()[:1]


TPU_LANES = 128


def relaid_mlp_bytes(config: UniTokenConfig, tensor: int, quantize: str = "none", dtype: str = "bfloat16") -> int:
    """Bytes a TPU chip's decode loop holds beside its weights and cache when the model is split
    `tensor` ways and each chip's share of the MLP's columns is not a whole number of 128-lane
    tiles (the release's 11,008 over 4 or 8 chips): XLA relays each chip's share of the MLP
    kernels into a copy. AOT for the release on v5e-4 in bfloat16 (benchmarks/results/decode_fit.md):
    the loop needed 1.31-1.34 GiB more than the plan (gate and up) up to 34 pictures with CFG, and
    2.00 GiB from 37 on (down too), to 0.01 GiB of the compiled sizes at 37 and 39 (this counts
    all three)."""
    d = config.decoder
    if tensor <= 1 or (d.intermediate_size % tensor == 0 and d.intermediate_size // tensor % TPU_LANES == 0):
        return 0
    itemsize = 1 if quantize == "int8" else np.dtype(dtype).itemsize
    return 3 * d.num_layers * d.hidden_size * -(-d.intermediate_size // tensor) * itemsize


def _on_tpu(device) -> bool:
    return getattr(device, "platform", None) == "tpu" or str(getattr(device, "device_kind", "")).startswith("TPU")


def choose_quantize(config: UniTokenConfig, images: int, devices: Sequence | None = None, *, what: str | None = None,
                    tensor: int | None = None, **kwargs) -> tuple[str, str]:
    """("none" | "int8", a sentence saying why) for decoding `images` pictures at once on
    `devices` (default: all), the weights and the cache split evenly over them, and on TPU chips
    split `tensor` ways (default: as `choose_mesh` splits them) the relaid MLP shares
    (`relaid_mlp_bytes`). bfloat16 weights when they fit, else int8; a ValueError when neither
    does. A checkpoint stored as int8 (`config.quantize`) stays int8: only whether it fits is
    checked. `kwargs` go to `decode_memory`; `what` names the load in the sentence (default: the
    images)."""
    devices = list(devices if devices is not None else jax.devices())
    limits = [device_memory(d) for d in devices]
    kind = devices[0].device_kind
    stored = f"the checkpoint holds {config.quantize} weights, loaded as they are" \
        if config.quantize != "none" else None
    if any(limit is None for limit in limits):
        return ("none", f"{kind}: no device memory limit to plan with; the weights stay unquantized") \
            if stored is None else (config.quantize, f"{kind}: {stored}")
    limit, n = min(limits), len(devices)
    what = what or f"{images} image(s)"
    if tensor is None:
        tensor = math.gcd(n, *_heads(config))
    tensor = tensor if _on_tpu(devices[0]) else 1
    dtype = kwargs.get("dtype", "bfloat16")  # (the float weights' dtype, named as planned: float32 for a small model)
    if stored is None:
        floats = decode_memory(config, images, **kwargs).peak / n + relaid_mlp_bytes(config, tensor, "none", dtype)
        if floats <= limit:
            return "none", (f"{dtype} weights: {what} need {_size(floats)} a device, "
                            f"{n} x {kind} have {_size(limit)} each")
    int8 = decode_memory(config, images, quantize="int8", **kwargs).peak / n + relaid_mlp_bytes(config, tensor,
                                                                                                 "int8", dtype)
    if int8 <= limit:
        if stored is not None:
            return "int8", (f"{stored}: {what} need {_size(int8)} a device, {n} x {kind} have {_size(limit)} each")
        return "int8", (f"int8 weights: {dtype} would need {_size(floats)} a device for {what}, "
                        f"{n} x {kind} have {_size(limit)} each; int8 needs {_size(int8)}")
    raise ValueError(f"{what} at once do not fit {n} x {kind} ({_size(limit)} each) even with "
                     f"int8 weights ({_size(int8)} a device); ask for fewer at once or use more devices")


def _size(nbytes: float) -> str:
    """GiB to 2 decimals, or MiB where that would read 0.0x GiB (a small model's plan said "0.00 GiB")."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= 0.1 * GIB else f"{nbytes / 2**20:.1f} MiB"


def _heads(config: UniTokenConfig) -> list[int]:
    """The head counts a tensor-parallel split must divide."""
    heads = [config.decoder.num_heads, config.decoder.num_kv_heads]
    if config.vision is not None:
        heads.append(config.vision.num_heads)
    return heads


def choose_mesh(config: UniTokenConfig, devices: Sequence | None = None):
    """The mesh to decode on over `devices` (default: this process's own): None for a single
    device; else all of them, split the tensor-parallel way (`tensor` axis: each chip holds its
    share of every layer's heads, MLP columns and vocabulary, and of the KV cache's heads), as far
    as the attention heads divide, the rest of the way over `fsdp`.

    Tensor-parallel is what a decode step wants: each chip reads only its share of the weights and
    only activations cross the chips, where with the weights split over `fsdp` every step gathers
    each layer's weights onto every chip (AOT for the released 7B on v5e-8, one picture in int8:
    1.38 against 2.50 GiB a chip, and XLA's cost analysis counts 1.14 against 9.51 GiB accessed;
    `benchmarks/results/decode_fit.md`)."""
    devices = list(devices if devices is not None else jax.local_devices())
    if len(devices) == 1:
        return None
    heads = _heads(config)
    specs = weight_specs(config)
    # the most devices whose mesh splits every weight evenly (6 chips would put 3 ways of fsdp on a
    # 4,096-wide dimension, which does not compile): the rest stay idle, and the log says so
    for n in range(len(devices), 1, -1):
        tensor = math.gcd(n, *heads)
        mesh = sharding.make_mesh(fsdp=n // tensor, tensor=tensor, devices=devices[:n])
        if uneven_split(config, mesh, specs) is None:
            if n < len(devices):
                log.warning("decoding on %d of the %d devices: the model's weights do not split evenly over more",
                            n, len(devices))
            return mesh
    return None

"""The HF (transformers / Lumina-mGPT / UniToken) safetensors layout <-> our parameter tree.

Three kinds of checkpoint are read:
- UniToken: `model.*` + `lm_head.*` (Chameleon decoder), `vit.*` (SigLIP vision tower),
  `adapter.0.*` / `adapter.2.*`;
- a plain Chameleon / Lumina-mGPT decoder: `model.*` + `lm_head.*`;
- a SigLIP model: `vision_model.*` (a `SiglipModel`, whose text tower is skipped) or the bare
  `embeddings.*` / `encoder.*` keys that transformers writes for a `SiglipVisionModel`.

Tensors are read one at a time into preallocated arrays, so reading needs the model's size in
memory once, not twice. Every tensor the model needs must be there with the right shape and a
floating dtype; a key that is not recognised is an error. Tensors we keep but do not model (the
SigLIP pooling head; the VQ-GAN under `model.vqmodel.*`) are carried through unchanged as
"passthrough" so that `save_hf` writes them back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from unitoken_jax.convert import orbax_io
from unitoken_jax.convert.files import (
    SHARD_BYTES,
    CheckpointError,
    check_weight_map,
    checkpoint_files,
    get_path,
    open_safetensors,
    read_json_object,
    save_safetensors,
)
from unitoken_jax.models.config import DecoderConfig, UniTokenConfig, VisionConfig
from unitoken_jax.models.unitoken import abstract_params

log = logging.getLogger(__name__)

_FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}
_PASSTHROUGH = (re.compile(r"^model\.vqmodel\."), re.compile(r"^(vit\.|vision_model\.|)head\."))
_SKIPPED = (re.compile(r"^text_model\."), re.compile(r"^logit_(scale|bias)$"))


# --- one tensor: how its HF shape maps to ours -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """A pair of inverse maps between an HF tensor and our parameter (one layer's slice)."""

    to_ours: Callable[[np.ndarray, tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


COPY = Layout(lambda w, s: w.reshape(s), lambda w: w)
LINEAR = Layout(lambda w, s: w.T.reshape(s), lambda w: w.T)  # [out, in] <-> [in, out]
# [(N H), in] <-> [in, N, H]  (and the bias [(N H)] <-> [N, H])
OUT_HEADS = Layout(lambda w, s: w.T.reshape(s), lambda w: w.reshape(w.shape[0], -1).T)
BIAS_HEADS = Layout(lambda w, s: w.reshape(s), lambda w: w.reshape(-1))
# [(N H), in] <-> [N, in, H]: the decoder's q/k/v kernels, heads first (the layout TPU's dots read
# in place; [in, N, H] made XLA copy all 32 layers of each into this order before every decode loop)
HEADS_IN = Layout(lambda w, s: w.reshape(s[0], s[2], s[1]).transpose(0, 2, 1),
                  lambda w: w.transpose(0, 2, 1).reshape(-1, w.shape[1]))
# [out, (N H)] <-> [N, H, out]
IN_HEADS = Layout(lambda w, s: w.T.reshape(s), lambda w: w.reshape(-1, w.shape[-1]).T)
CONV = Layout(lambda w, s: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))  # OIHW <-> HWIO


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_key: str
    path: tuple[str, ...]  # into our params
    layer: int | None  # index along the stacked 'layers' axis, or None
    layout: Layout


def _decoder_specs(cfg: DecoderConfig) -> Iterator[TensorSpec]:
    d = ("decoder",)
    yield TensorSpec("model.embed_tokens.weight", d + ("embed_tokens", "embedding"), None, COPY)
    yield TensorSpec("model.norm.weight", d + ("norm", "scale"), None, COPY)
    yield TensorSpec("lm_head.weight", d + ("lm_head", "kernel"), None, LINEAR)
    layer = d + ("layers",)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj"):
            yield TensorSpec(p + f"self_attn.{name}.weight", layer + ("self_attn", name, "kernel"), i, HEADS_IN)
        yield TensorSpec(p + "self_attn.o_proj.weight", layer + ("self_attn", "o_proj", "kernel"), i, IN_HEADS)
        for norm in ("q_norm", "k_norm"):
            yield TensorSpec(p + f"self_attn.{norm}.weight", layer + ("self_attn", norm, "scale"), i, COPY)
            yield TensorSpec(p + f"self_attn.{norm}.bias", layer + ("self_attn", norm, "bias"), i, COPY)
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield TensorSpec(p + f"mlp.{name}.weight", layer + ("mlp", name, "kernel"), i, LINEAR)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield TensorSpec(p + f"{norm}.weight", layer + (norm, "scale"), i, COPY)


def _vision_specs(cfg: VisionConfig, prefix: str) -> Iterator[TensorSpec]:
    v = ("vit",)
    e = prefix + "embeddings."
    yield TensorSpec(e + "patch_embedding.weight", v + ("patch_embedding", "kernel"), None, CONV)
    yield TensorSpec(e + "patch_embedding.bias", v + ("patch_embedding", "bias"), None, COPY)
    yield TensorSpec(e + "position_embedding.weight", v + ("position_embedding",), None, COPY)
    for norm in ("post_layernorm",):
        yield TensorSpec(prefix + f"{norm}.weight", v + (norm, "scale"), None, COPY)
        yield TensorSpec(prefix + f"{norm}.bias", v + (norm, "bias"), None, COPY)
    layer = v + ("layers",)
    for i in range(cfg.num_layers):
        p = f"{prefix}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj"):
            yield TensorSpec(p + f"self_attn.{name}.weight", layer + (name, "kernel"), i, OUT_HEADS)
            yield TensorSpec(p + f"self_attn.{name}.bias", layer + (name, "bias"), i, BIAS_HEADS)
        yield TensorSpec(p + "self_attn.out_proj.weight", layer + ("out_proj", "kernel"), i, IN_HEADS)
        yield TensorSpec(p + "self_attn.out_proj.bias", layer + ("out_proj", "bias"), i, COPY)
        for norm in ("layer_norm1", "layer_norm2"):
            yield TensorSpec(p + f"{norm}.weight", layer + (norm, "scale"), i, COPY)
            yield TensorSpec(p + f"{norm}.bias", layer + (norm, "bias"), i, COPY)
        for name in ("fc1", "fc2"):
            yield TensorSpec(p + f"mlp.{name}.weight", layer + (name, "kernel"), i, LINEAR)
            yield TensorSpec(p + f"mlp.{name}.bias", layer + (name, "bias"), i, COPY)


def tensor_specs(config: UniTokenConfig, vision_prefix: str = "vit.") -> list[TensorSpec]:
    specs: list[TensorSpec] = []
    if config.decoder is not None:
        specs += _decoder_specs(config.decoder)
    if config.vision is not None:
        specs += _vision_specs(config.vision, vision_prefix)
    if config.has_adapter:
        for hf, ours in (("adapter.0", "fc1"), ("adapter.2", "fc2")):
            specs.append(TensorSpec(f"{hf}.weight", ("adapter", ours, "kernel"), None, LINEAR))
            specs.append(TensorSpec(f"{hf}.bias", ("adapter", ours, "bias"), None, COPY))
    return specs


# --- configs ------------------------------------------------------------------------------------

def decoder_config_from_hf(hf: dict[str, Any], qk_norm_rows: int) -> DecoderConfig:
    for key, ok in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False),
                    ("tie_word_embeddings", False)):
        if hf.get(key, ok) not in (ok,):
            raise CheckpointError(f"config.json sets {key}={hf[key]!r}, which unitoken_jax does not support")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json sets hidden_act={hf['hidden_act']!r}; Chameleon uses 'silu'")
    # transformers >= 5 writes `rope_parameters`; older configs (the release's) `rope_theta`.
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"config.json asks for RoPE type {rope['rope_type']!r}; only plain RoPE is supported")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    heads = hf["num_attention_heads"]
    return DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, rope_theta=theta,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        qk_norm_groups=None if qk_norm_rows == heads else qk_norm_rows,
        swin_norm=bool(hf.get("swin_norm", False)), dropout=float(hf.get("dropout", 0.0)))


def decoder_config_to_hf(cfg: DecoderConfig, base: dict[str, Any] | None) -> dict[str, Any]:
    """`base` (the config.json read) with the decoder's fields replaced; where the decoder's fields
    are nested under `text_config`, which the reader prefers, they are replaced there."""
    hf = dict(base or {"model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
                       "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False})
    text = hf
    if "text_config" in hf:
        text = hf["text_config"] = dict(hf["text_config"])
    text.update(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta,
                max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                swin_norm=cfg.swin_norm, dropout=cfg.dropout)
    if "rope_parameters" in text:
        text["rope_parameters"] = {**text["rope_parameters"], "rope_theta": cfg.rope_theta}
    if cfg.qk_norm_groups is not None:
        text["model_parallel_size"] = cfg.qk_norm_groups
    return hf


def vision_config_from_hf(hf: dict[str, Any] | None, tensors: dict[str, tuple], prefix: str) -> VisionConfig:
    """From a SigLIP `vision_config` when there is one, else from the tensor shapes (UniToken's
    config.json does not describe its ViT); only the head count cannot come from shapes."""
    pos = tensors[prefix + "embeddings.position_embedding.weight"]
    patch = tensors[prefix + "embeddings.patch_embedding.weight"]
    fc1 = tensors[prefix + "encoder.layers.0.mlp.fc1.weight"]
    n_layers = len({k.split(".")[len(prefix.split(".")) + 1] for k in tensors if k.startswith(prefix + "encoder.layers.")})
    hidden = pos[1]
    side = int(round(np.sqrt(pos[0])))
    default = VisionConfig()
    # so400m/14 is trained at 384 px (27 patches a side, the last 6 px unused).
    image_size = default.image_size if (side, patch[-1]) == (default.grid_size, default.patch_size) else side * patch[-1]
    shapes = dict(hidden_size=hidden, intermediate_size=fc1[0], num_layers=n_layers, patch_size=patch[-1],
                  image_size=image_size, num_channels=patch[1])
    if hf is None:
        if hidden != VisionConfig.hidden_size:
            raise CheckpointError(
                f"the vision tower has width {hidden}, not so400m's {VisionConfig.hidden_size}, and config.json "
                "has no 'unitoken_vision_config' saying how many heads it has")
        return VisionConfig(**shapes)
    cfg = VisionConfig(**shapes, num_heads=hf["num_attention_heads"], layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size"):
        ours = getattr(cfg, "num_layers" if key == "num_hidden_layers" else key)
        if key in hf and hf[key] != ours:
            raise CheckpointError(f"config.json's vision config says {key}={hf[key]} but the tensors give {ours}")
    return cfg


def vision_config_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    return {"model_type": "siglip_vision_model", "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "patch_size": cfg.patch_size, "image_size": cfg.image_size,
            "num_channels": cfg.num_channels, "layer_norm_eps": cfg.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh"}


# --- reading ------------------------------------------------------------------------------------

@dataclasses.dataclass
class HFCheckpoint:
    """What `read_hf` found: our config, numpy parameters, and what else the files held."""

    config: UniTokenConfig
    params: dict
    passthrough: dict[str, np.ndarray]
    hf_config: dict[str, Any]
    kind: str  # "unitoken" | "chameleon" | "siglip"
    qk_norm_layout: str | None  # "per-head (transformers)" | "per-shard (Lumina-mGPT, N rows)"
    dtype: str | dict  # the dtype the files were saved in (`saved_dtype`)
    skipped: list[str]


def _scan_headers(files: list[str]) -> dict[str, tuple[str, tuple, str]]:
    """key -> (file, shape, dtype), reading headers only."""
    found: dict[str, tuple[str, tuple, str]] = {}
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                if key in found:
                    raise CheckpointError(f"tensor {key} is in both {found[key][0]} and {file}")
                found[key] = (file, tuple(sl.get_shape()), sl.get_dtype())
    return found


# config.json model types this loader reads: a Chameleon decoder (UniToken's releases, Lumina-mGPT's,
# transformers'), a SigLIP tower (whole, or its vision model)
MODEL_TYPES = ("chameleon", "siglip", "siglip_vision_model")


def _detect_kind(path: str, hf_config: dict[str, Any], keys) -> tuple[str, str]:
    said = hf_config.get("model_type")
    if isinstance(said, str) and said not in MODEL_TYPES:  # (another model's tensors were blamed as missing ones)
        what = hf_config.get("architectures")
        what = f" ({', '.join(map(str, what))})" if isinstance(what, list) and what else ""
        raise CheckpointError(f"{path}/config.json describes a {said!r} model{what}, not a UniToken / Chameleon "
                              f"decoder or a SigLIP tower (model_type {' or '.join(map(repr, MODEL_TYPES))})")
    if any(k.startswith("vit.") for k in keys):
        return "unitoken", "vit."
    if any(k.startswith("vision_model.") for k in keys):
        return "siglip", "vision_model."
    if any(k.startswith("embeddings.patch_embedding.") for k in keys):  # a bare SiglipVisionModel save
        return "siglip", ""
    if any(k.startswith("model.layers.") for k in keys):
        return "chameleon", "vit."
    raise CheckpointError(f"{path} holds neither a Chameleon decoder (model.layers.*) nor a SigLIP tower "
                          "(vit.* / vision_model.*)")


def _build_config(hf_config, kind, prefix, shapes) -> tuple[UniTokenConfig, str | None]:
    decoder = vision = layout = None
    if kind in ("unitoken", "chameleon"):
        text_cfg = hf_config.get("text_config", hf_config)
        key = "model.layers.0.self_attn.q_norm.weight"
        if key not in shapes:
            raise CheckpointError(f"missing tensor {key} (needed to tell the QK-norm layout)")
        rows = shapes[key][1][0]
        heads = text_cfg["num_attention_heads"]
        mp = text_cfg.get("model_parallel_size", 1)
        if rows == heads:
            layout = "per-head (transformers)"
        elif rows == mp:
            layout = f"per-shard (Lumina-mGPT, model_parallel_size={mp})"
        else:
            raise CheckpointError(f"{key} has shape {list(shapes[key][1])}: {rows} rows is neither num_attention_heads "
                                  f"({heads}) nor model_parallel_size ({mp})")
        decoder = decoder_config_from_hf(text_cfg, rows)
    if kind in ("unitoken", "siglip"):
        vcfg = hf_config.get("unitoken_vision_config")
        if kind == "siglip":
            vcfg = hf_config.get("vision_config", hf_config)
        vision = vision_config_from_hf(vcfg, {k: v[1] for k, v in shapes.items()}, prefix)
    z = float(hf_config.get("z_loss_weight", UniTokenConfig.z_loss_weight))
    return UniTokenConfig(decoder=decoder, vision=vision, z_loss_weight=z).validate(), layout


_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _read_header(path: str):
    """(config.json, safetensors headers, kind, key prefix) of an HF-format directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file; give the checkpoint's directory")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path} has no config.json (is it an HF checkpoint directory, or still being written?)")
    hf_config = read_json_object(config_path)
    headers = _scan_headers(checkpoint_files(path))
    for note in check_weight_map(path, {k: v[0] for k, v in headers.items()}):
        log.warning("%s: the index does not match the shards (read as the shards hold them): %s", path, note)
    kind, prefix = _detect_kind(path, hf_config, headers)
    return hf_config, headers, kind, prefix


def _checked_build_config(path, hf_config, kind, prefix, headers):
    """`_build_config`, with a config.json that lacks a key or has a value of the wrong type named."""
    try:
        config, layout = _build_config(hf_config, kind, prefix, headers)
    except CheckpointError as e:  # (said of a tensor or of config.json's numbers, naming no folder)
        raise CheckpointError(f"{path}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{path}/config.json lacks the key {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}/config.json has a value of the wrong type or range: {e}") from None
    _check_sizes_against_files(path, config, headers)
    return config, layout


def _check_sizes_against_files(path, config: UniTokenConfig, headers) -> None:
    """The decoder's sizes in config.json against the tensors the files hold, before anything is
    derived from them (a config.json of absurd sizes would otherwise build millions of specs or
    shapes of terabytes before the first mismatch shows)."""
    d = config.decoder
    if d is None:
        return
    problems = []
    embed = headers.get("model.embed_tokens.weight")
    if embed is not None and tuple(embed[1]) != (d.vocab_size, d.hidden_size):
        problems.append(f"vocab_size x hidden_size = {d.vocab_size} x {d.hidden_size}, but model.embed_tokens.weight "
                        f"is {list(embed[1])}")
    up = headers.get("model.layers.0.mlp.up_proj.weight")
    if up is not None and tuple(up[1]) != (d.intermediate_size, d.hidden_size):
        problems.append(f"intermediate_size = {d.intermediate_size}, but model.layers.0.mlp.up_proj.weight is "
                        f"{list(up[1])}")
    # the heads: a head count that still divides the width passed this check and was blamed on a
    # tensor ("k_proj.weight has shape [64, 64], the model expects [32, 64]")
    for name, heads, what in (("k_proj", d.num_kv_heads, "num_key_value_heads"), ("q_proj", d.num_heads,
                                                                                  "num_attention_heads")):
        proj = headers.get(f"model.layers.0.self_attn.{name}.weight")
        if proj is not None and proj[1][0] != heads * d.head_dim:
            problems.append(f"{what} = {heads} (heads of {d.head_dim}: hidden_size / num_attention_heads), but "
                            f"model.layers.0.self_attn.{name}.weight is {list(proj[1])}")
    norm = headers.get("model.layers.0.self_attn.q_norm.weight")
    if norm is not None and norm[1][-1] != d.head_dim:
        problems.append(f"num_attention_heads = {d.num_heads} makes heads of {d.head_dim}, but "
                        f"model.layers.0.self_attn.q_norm.weight is {list(norm[1])}")
    layers = {int(m.group(1)) for k in headers if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if layers and len(layers) != d.num_layers:
        problems.append(f"num_hidden_layers = {d.num_layers}, but the files hold {len(layers)} layers")
    if problems:
        raise CheckpointError(f"{path}/config.json does not describe the tensors beside it: " + "; ".join(problems))


def read_config(path: str) -> UniTokenConfig:
    """The model config of an HF-format directory, from config.json and the safetensors headers
    only (no tensor is read)."""
    hf_config, headers, kind, prefix = _read_header(path)
    return _checked_build_config(path, hf_config, kind, prefix, headers)[0]


def _main_dtype(headers) -> str:
    """The dtype most of a checkpoint's elements have (the dtype it was saved in)."""
    sizes: dict[str, int] = {}
    for _, shape, dtype in headers.values():
        sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape))
    return _DTYPE_NAMES.get(max(sizes, key=sizes.get), "float32")


def saved_dtype(headers, keys) -> str | dict:
    """The dtype the model tensors `keys` were saved in: its name, or, where they differ (float32
    norms beside bfloat16 matrices, say), {"default": the dtype of most elements, "tensors": {key:
    dtype} for the others}, which `write_hf` writes back as it was."""
    main = _main_dtype({k: headers[k] for k in keys} or headers)
    names = {k: _DTYPE_NAMES.get(headers[k][2], headers[k][2]) for k in sorted(keys)}
    other = {k: name for k, name in names.items() if name != main}
    return {"default": main, "tensors": other} if other else main


def dtype_name(dtype: str | dict) -> str:
    """`saved_dtype`'s value in words."""
    if isinstance(dtype, str):
        return dtype
    kinds = sorted(set(dtype["tensors"].values()))
    return f"{dtype['default']}, {len(dtype['tensors'])} tensor(s) in {'/'.join(kinds)}"


def _passthrough_keys(headers, spec_keys) -> list[str]:
    return [k for k in headers if k not in spec_keys and any(p.match(k) for p in _PASSTHROUGH)]


def read_extras(path: str) -> tuple[dict[str, np.ndarray], dict, str | dict]:
    """What an HF-format directory holds besides the model's parameters, without reading those:
    (the tensors carried through unchanged, config.json, the dtype it was saved in)."""
    hf_config, headers, kind, prefix = _read_header(path)
    config, _ = _checked_build_config(path, hf_config, kind, prefix, headers)
    keys = _passthrough_keys(headers, {s.hf_key for s in tensor_specs(config, prefix)})
    passthrough = {}
    for file in sorted({headers[k][0] for k in keys}):
        with open_safetensors(file) as f:
            passthrough.update({k: f.get_tensor(k) for k in keys if headers[k][0] == file})
    return passthrough, hf_config, saved_dtype(headers, [s.hf_key for s in tensor_specs(config, prefix)])


def read_hf(path: str, param_dtype: str | None = "float32", progress: bool = False,
            place: Callable[[UniTokenConfig, tuple[str, ...], np.ndarray], Any] | None = None,
            by_layer: Callable[[UniTokenConfig, tuple[str, ...], tuple[int, ...]], Any] | None = None) -> HFCheckpoint:
    """Reads an HF-format directory into parameters of our layout, one tensor at a time.

    Every key, shape and dtype is checked against the model before any tensor is read. Each
    parameter (all layers of it) is assembled in host memory and handed to `place(path, array)`
    at once, with the model's config: `load` puts it on the devices there, so the host never holds
    the whole model twice. `by_layer(config, path, shape)` may take a scanned parameter a layer at
    a time instead: where it returns an object (None: whole, to `place`), that object's
    `put(layer, array)` gets each layer as it is read and its `done()` gives the parameter.
    Without `place` the parameters stay numpy arrays. `param_dtype=None` keeps the checkpoint's
    own dtype, or float32 where its tensors' dtypes differ: a lossless conversion.
    """
    hf_config, headers, kind, prefix = _read_header(path)
    config, layout = _checked_build_config(path, hf_config, kind, prefix, headers)
    specs = tensor_specs(config, prefix)
    main_dtype = saved_dtype(headers, [s.hf_key for s in specs if s.hf_key in headers])
    own = main_dtype if isinstance(main_dtype, str) else "float32"
    if own == "float64" and not jax.config.jax_enable_x64:  # (no release has it: rounded, as the README says)
        own = "float32"  # (it was recorded as float64 over float32 arrays, and the conversion could not load back)
    config = config.replace(param_dtype=param_dtype or own)

    spec_keys = {s.hf_key for s in specs}
    passthrough_keys = _passthrough_keys(headers, spec_keys)
    skipped = [k for k in headers if k not in spec_keys and any(p.match(k) for p in _SKIPPED)]
    unexpected = sorted(set(headers) - spec_keys - set(passthrough_keys) - set(skipped))
    missing = sorted(spec_keys - set(headers))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{path} does not match a {kind} model of this config: " + "; ".join(parts))

    abstract = abstract_params(config)
    by_leaf: dict[tuple[str, ...], list[TensorSpec]] = {}
    for spec in specs:
        _, shape, dtype = headers[spec.hf_key]
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {spec.hf_key} (in {os.path.basename(headers[spec.hf_key][0])}) "
                                  f"has dtype {dtype}; a floating dtype ({', '.join(_FLOAT_DTYPES)}) is needed")
        leaf_shape = get_path(abstract, spec.path).shape
        slot_shape = leaf_shape if spec.layer is None else leaf_shape[1:]
        # the HF shape of this slot, traced, not allocated (a config.json of absurd sizes must not
        # make the check itself allocate terabytes)
        expected = jax.eval_shape(spec.layout.to_hf, jax.ShapeDtypeStruct(slot_shape, jnp.int8)).shape
        if shape != expected:
            raise CheckpointError(f"{path}: tensor {spec.hf_key} (in {os.path.basename(headers[spec.hf_key][0])}) has "
                                  f"shape {list(shape)}, the model {path}/config.json describes expects {list(expected)}")
        by_leaf.setdefault(spec.path, []).append(spec)


    np_dtype = np.dtype(jnp.dtype(config.param_dtype))
    params: dict = {}
    passthrough: dict[str, np.ndarray] = {}
    handles: dict[str, Any] = {}

    def read(key: str) -> np.ndarray:
        file = headers[key][0]
        if file not in handles:
            handles[file] = open_safetensors(file).__enter__()
        try:
            return handles[file].get_tensor(key)
        except Exception as e:  # safetensors raises several types for a short read
            raise CheckpointError(f"cannot read tensor {key} from {file}: {e} (truncated file?)") from e

    try:
        with tqdm(total=len(specs), desc=f"reading {os.path.basename(os.path.normpath(path))}",
                  disable=not progress) as bar:
            for leaf_path, leaf_specs in by_leaf.items():
                shape = get_path(abstract, leaf_path).shape
                node = params
                for p in leaf_path[:-1]:
                    node = node.setdefault(p, {})
                # a `place` that takes a scanned leaf a layer at a time (an int8 load's quantizer): the
                # leaf is never whole in float (the 7B's MLP kernels, 5.4 GiB in float32)
                layers = (by_layer(config, leaf_path, shape) if by_layer is not None
                          and all(spec.layer is not None for spec in leaf_specs) else None)
                if layers is not None:
                    slot = np.empty(shape[1:], np_dtype)
                    for spec in leaf_specs:
                        slot[...] = spec.layout.to_ours(read(spec.hf_key), slot.shape)
                        layers.put(spec.layer, slot)
                        bar.update()
                    node[leaf_path[-1]] = layers.done()
                    continue
                leaf = np.empty(shape, np_dtype)
                for spec in leaf_specs:
                    slot = leaf if spec.layer is None else leaf[spec.layer]
                    slot[...] = spec.layout.to_ours(read(spec.hf_key), slot.shape)
                    bar.update()
                node[leaf_path[-1]] = leaf if place is None else place(config, leaf_path, leaf)
                del leaf
        for key in passthrough_keys:
            passthrough[key] = read(key)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)

    if skipped:
        log.info("skipped %d tensors the model does not use (e.g. %s)", len(skipped), skipped[0])
    if passthrough:
        log.info("carrying %d tensors through unchanged (e.g. %s)", len(passthrough), passthrough_keys[0])
    return HFCheckpoint(config, params, passthrough, hf_config, kind, layout, main_dtype, skipped)


# --- writing ------------------------------------------------------------------------------------

_CHAMELEON_IMAGE_TOKEN = 8711  # "<image>" in Chameleon's vocabulary: transformers' picture placeholder


def hf_config_for(config: UniTokenConfig, base: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """config.json for our config (built on the one we loaded, if any) and the vision prefix."""
    if config.decoder is None:
        hf = dict(base or {}) if (base or {}).get("model_type", "").startswith("siglip") else {}
        hf.update(vision_config_to_hf(config.vision))
        hf["architectures"] = ["SiglipVisionModel"]
        return hf, "vision_model."
    hf = decoder_config_to_hf(config.decoder, base)
    # transformers' Chameleon reads the vocabulary map as it loads; a release's config.json has the
    # tokenizer's whole map, a model made here only the placeholder its processor needs (the names
    # of the picture codes are the tokenizer's, which the model does not know)
    hf.setdefault("vocabulary_map", {"<image>": _CHAMELEON_IMAGE_TOKEN})
    if config.vision is not None:
        hf["unitoken_vision_config"] = vision_config_to_hf(config.vision)
        hf["z_loss_weight"] = config.z_loss_weight
    return hf, "vit."


def write_hf(path: str, config: UniTokenConfig, params, passthrough: dict[str, np.ndarray] | None = None,
             base_config: dict[str, Any] | None = None, dtype: str | dict = "float32",
             shard_bytes: int = SHARD_BYTES, progress: bool = False) -> None:
    """Writes safetensors shards (+ index when more than one) and config.json. The shards are
    written under names no reader takes (`.model-N.safetensors.partial`) and renamed once all are
    written: a write that fails leaves what the directory held."""
    # one dtype, or `saved_dtype`'s dtypes by tensor
    default, by_key = (dtype, {}) if isinstance(dtype, str) else (dtype["default"], dtype["tensors"])
    out_dtypes = {name: np.dtype(jnp.dtype(name)) for name in {default, *by_key.values()}}
    for name, out_dtype in out_dtypes.items():
        if not jnp.issubdtype(out_dtype, jnp.floating):  # astype(int8) would truncate every weight to ~0
            raise ValueError(f"dtype={name!r}: an HF checkpoint's weights are floating point (float32, bfloat16, "
                             "float16); for int8, quantize as the model loads (load(path, quantize='int8'))")
    os.makedirs(path, exist_ok=True)
    hf_config, prefix = hf_config_for(config, base_config)
    specs = tensor_specs(config, prefix)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for spec in specs:
            value = np.asarray(jax.device_get(get_path(params, spec.path)) if spec.layer is None
                               else jax.device_get(get_path(params, spec.path)[spec.layer]))
            out_dtype = out_dtypes[by_key.get(spec.hf_key, default)]
            yield spec.hf_key, np.ascontiguousarray(spec.layout.to_hf(value).astype(out_dtype))
        for key, value in (passthrough or {}).items():
            yield key, np.ascontiguousarray(value)

    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    # Group into shards by size while streaming, writing each shard as soon as it is full.
    written: list[tuple[str, list[str]]] = []
    tmp_names: list[str] = []

    def flush():
        name = f".model-{len(written) + 1:05d}.safetensors.partial"
        tmp_names.append(name)
        save_safetensors(shards[-1], os.path.join(path, name), metadata={"format": "pt"})
        written.append((name, list(shards[-1])))
        shards[-1] = {}
        sizes[-1] = 0

    for f in os.listdir(path):  # what a write that was killed left
        if re.fullmatch(r"\.model-\d{5}\.safetensors\.partial", f):
            os.remove(os.path.join(path, f))
    try:
        for key, value in tqdm(tensors(), total=len(specs) + len(passthrough or {}), desc="writing",
                               disable=not progress):
            if shards[-1] and sizes[-1] + value.nbytes > shard_bytes:
                flush()
            shards[-1][key] = value
            sizes[-1] += value.nbytes
        if shards[-1]:
            flush()
    except BaseException:  # (a full disk, an interrupt) the directory keeps what it held
        for name in tmp_names:
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        raise

    total = len(written)
    finals = ["model.safetensors"] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                                                       for i in range(total)]
    # a checkpoint saved here before: its weight files and index go, or a reader would take its index
    # (old weights under the new config.json) or, with no index, its shards beside the new ones
    stale = [f for f in os.listdir(path) if f in ("model.safetensors", "model.safetensors.index.json")
             or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
    for f in stale:
        os.remove(os.path.join(path, f))
    if orbax_io.remove(path):  # `load` would read it, not the files written here
        log.warning("%s held our Orbax checkpoint: removed, the HF checkpoint written there replaces it", path)
    weight_map = {}
    for (name, keys), final in zip(written, finals):
        os.replace(os.path.join(path, name), os.path.join(path, final))
        weight_map.update({k: final for k in keys})
    if total > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    # a dtype word, as transformers reads it (a checkpoint of several dtypes: the main one; each tensor's
    # own is in its file); transformers 5 writes and prefers "dtype", so a source's set one is kept in step
    hf_config["torch_dtype"] = dtype if isinstance(dtype, str) else dtype["default"]
    if hf_config.get("dtype") is not None:
        hf_config["dtype"] = hf_config["torch_dtype"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)

"""Chameleon VQ-GAN weights -> our Flax parameters.

Two sources: Meta's `vqgan.ckpt` (a PyTorch Lightning checkpoint, tensors under "state_dict",
with the training-only `loss.*` tensors skipped) + `vqgan.yaml`, and the `model.vqmodel.*`
tensors of an HF Chameleon checkpoint (transformers keeps no decoder there: such a tokenizer
encodes but cannot draw). Key names are taming-transformers'; conv weights go OIHW -> HWIO.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping

import jax
from flax import traverse_util
import numpy as np
import yaml

from unitoken_jax.convert.files import (
    CheckpointError,
    check_weight_map,
    checkpoint_files,
    get_path,
    open_safetensors,
    read_json_object,
    save_safetensors,
)
from unitoken_jax.convert.torch_pickle import load_torch_file
from unitoken_jax.models.vqgan import VQGAN, VQGANConfig

log = logging.getLogger(__name__)

_MODEL_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def config_from_yaml(path: str) -> VQGANConfig:
    """Meta's `vqgan.yaml` (taming's `model.params.ddconfig` + `embed_dim`, `n_embed`); a file that
    is not YAML, or lacks a field, or has one of the wrong type is a CheckpointError naming it."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read the VQ-GAN config {path}: {e}") from None
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"it holds a {type(raw).__name__}, not a mapping")
        params = raw.get("model", raw).get("params", raw)
        dd = params["ddconfig"]
        return VQGANConfig(in_channels=dd["in_channels"], out_channels=dd["out_ch"], ch=dd["ch"],
                           ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                           attn_resolutions=tuple(dd.get("attn_resolutions") or ()), resolution=dd["resolution"],
                           z_channels=dd["z_channels"], embed_dim=params["embed_dim"], n_embed=params["n_embed"],
                           double_z=bool(dd.get("double_z", False))).validate()
    except KeyError as e:
        raise CheckpointError(f"the VQ-GAN config {path} lacks {e.args[0]!r} (taming's model.params.ddconfig "
                              "layout is expected)") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"the VQ-GAN config {path} is not taming's layout: {e}") from None


def config_from_hf(vq: Mapping[str, Any]) -> VQGANConfig:
    """From the `vq_config` of an HF Chameleon config.json (transformers' renamed fields)."""
    if vq.get("attn_type", "vanilla") != "vanilla":
        raise CheckpointError(f"VQ-GAN attn_type {vq['attn_type']!r} is not supported")
    return VQGANConfig(in_channels=vq.get("in_channels", 3), out_channels=vq.get("out_channels", 3),
                       ch=vq.get("base_channels", 128), ch_mult=tuple(vq.get("channel_multiplier", (1, 1, 2, 2, 4))),
                       num_res_blocks=vq.get("num_res_blocks", 2),
                       attn_resolutions=tuple(vq.get("attn_resolutions") or ()), resolution=vq.get("resolution", 512),
                       z_channels=vq.get("latent_channels", 256), embed_dim=vq.get("embed_dim", 256),
                       n_embed=vq.get("num_embeddings", 8192), double_z=bool(vq.get("double_latent", False))).validate()


def torch_key(path: tuple[str, ...]) -> str:
    """Our parameter path -> the taming-transformers state-dict key."""
    if path == ("codebook",):
        return "quantize.embedding.weight"
    parts = []
    for p in path:
        m = re.fullmatch(r"(down|up)_(\d+)", p)
        s = re.fullmatch(r"(down|up)sample_(\d+)", p)
        b = re.fullmatch(r"(block|attn)_(\d+)", p)
        if m:
            parts += [m.group(1), m.group(2)]
        elif s:
            parts += [s.group(1), s.group(2), f"{s.group(1)}sample"]
        elif b and parts[-1:] != ["mid"]:  # level blocks are "block.j"; the mid block's are "block_1"
            parts += [b.group(1), b.group(2)]
        elif p in ("kernel", "scale"):
            parts.append("weight")
        else:
            parts.append(p)
    return ".".join(parts)


def abstract_params(config: VQGANConfig):
    size = 2 * config.downsample_factor
    return jax.eval_shape(lambda: VQGAN(config).init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32)))[
        "params"]


def params_from_state_dict(config: VQGANConfig, tensors: Mapping[str, np.ndarray], *, require_decoder: bool,
                           source: str) -> dict:
    """Fills our parameters from taming-named tensors; errors name missing/unexpected/misshapen keys."""
    abstract = abstract_params(config)
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    wanted = {}
    for key_path, leaf in leaves:
        path = tuple(k.key for k in key_path)
        if path[0] == "decoder" or path[0] == "post_quant_conv":
            if not require_decoder and torch_key(path) not in tensors:
                continue
        wanted[torch_key(path)] = (path, leaf.shape)
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(f"{source}: the VQ-GAN tensors do not match the config: "
                              f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                              f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    params: dict = {}
    for key, (path, shape) in wanted.items():
        if not isinstance(tensors[key], np.ndarray):  # (np.asarray would make a 0-d object array of it)
            raise CheckpointError(f"{source}: {key} is {type(tensors[key]).__name__}, not a tensor")
        value = np.asarray(tensors[key])
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        if value.shape != shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {list(tensors[key].shape)}, the VQ-GAN expects "
                                  f"{list(shape)} (after OIHW -> HWIO)")
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value.astype(np.float32)
    return params


def read_meta_checkpoint(ckpt_path: str, yaml_path: str | None = None) -> tuple[VQGANConfig, dict]:
    """Meta's `vqgan.ckpt` (+ `vqgan.yaml`, by default next to it)."""
    ckpt_path = os.path.expanduser(ckpt_path)
    yaml_path = os.path.expanduser(yaml_path or os.path.join(os.path.dirname(ckpt_path), "vqgan.yaml"))
    if not os.path.exists(yaml_path):
        raise CheckpointError(f"no VQ-GAN config {yaml_path}; put the vqgan.yaml that came with {ckpt_path} beside "
                              "it under that name (or pass its path as yaml_path)")
    config = config_from_yaml(yaml_path)
    raw = load_torch_file(ckpt_path)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt_path}: no state_dict in the checkpoint")
    tensors = {k: v for k, v in state.items() if k.startswith(_MODEL_PREFIXES)}
    _tell_skipped(ckpt_path, [k for k in state if not k.startswith(_MODEL_PREFIXES)])
    return config, params_from_state_dict(config, tensors, require_decoder=True, source=ckpt_path)


def _tell_skipped(source: str, keys: list[str]) -> None:
    """What a Lightning checkpoint holds beside the model: the training loss's tensors (the
    discriminator, LPIPS) are said at INFO; anything else (EMA weights: taming's `model_ema.*`,
    another model) is a warning, since a user may have meant it."""
    loss = [k for k in keys if k.startswith("loss.")]
    other = [k for k in keys if not k.startswith("loss.")]
    if loss:
        log.info("%s: %d tensors of the training loss (loss.*: the discriminator, LPIPS) are not the model's; "
                 "skipped", source, len(loss))
    if other:
        groups = sorted({k.split(".")[0] + "." if "." in k else k for k in other})
        log.warning("%s: %d entries of its state_dict are not the VQ-GAN's (%s) and were skipped: %s%s; the model is "
                    "read from %s", source, len(other), ", ".join(groups[:5]), ", ".join(other[:3]),
                    " ..." if len(other) > 3 else "", ", ".join(p + "*" for p in _MODEL_PREFIXES))


def read_hf_vqmodel(path: str) -> tuple[VQGANConfig, dict]:
    """The `model.vqmodel.*` tensors of an HF Chameleon / UniToken directory (encoder only)."""
    hf_config = read_json_object(os.path.join(path, "config.json"))
    config = config_from_hf(hf_config.get("vq_config") or {})
    tensors, found = {}, {}
    for file in checkpoint_files(path):
        with open_safetensors(file) as f:
            for key in f.keys():
                found[key] = file
                if key.startswith("model.vqmodel."):
                    tensors[key[len("model.vqmodel."):]] = f.get_tensor(key)
    check_weight_map(path, found)  # (a tensor the index names and no shard holds; read_hf tells the rest)
    if not tensors:
        raise CheckpointError(f"{path} holds no model.vqmodel.* tensors")
    return config, params_from_state_dict(config, tensors, require_decoder=False, source=path)


def read_orbax_vqmodel(path: str) -> tuple[VQGANConfig, dict]:
    """The `model.vqmodel.*` tensors an HF checkpoint carried into our Orbax format (its passthrough),
    with the VQ-GAN config its `config.json` had: a release converted with `unitoken convert` names
    its VQ-GAN by its folder as the HF one did."""
    from unitoken_jax.convert import orbax_io  # (it imports the whole model)

    sidecar = orbax_io.read_sidecar(path)
    prefix = "model.vqmodel."
    tensors = {key[len(prefix):]: value for key, value in orbax_io.restore_passthrough(path).items()
               if key.startswith(prefix)}
    if not tensors:
        raise CheckpointError(f"{path} is a unitoken-jax checkpoint without a VQ-GAN (no model.vqmodel.* tensors were "
                              "carried into it): give the release's vqgan.ckpt, or the HF directory it came from")
    config = config_from_hf((sidecar.get("hf_config") or {}).get("vq_config") or {})
    return config, params_from_state_dict(config, tensors, require_decoder=False, source=path)


def has_decoder(params) -> bool:
    return "decoder" in params and "post_quant_conv" in params


# --- our own format: a VQ-GAN trained here (unitoken_jax.train.vqgan) ---------------------------
WEIGHTS_FILE, CONFIG_FILE = "vqgan.safetensors", "vqgan_config.json"


def save_vqgan(path: str, config: VQGANConfig, params) -> None:
    """`vqgan.safetensors` (keys are '/'-joined parameter paths) + `vqgan_config.json`."""
    os.makedirs(path, exist_ok=True)
    flat = {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v, np.float32)
            for kp, v in jax.tree_util.tree_leaves_with_path(params)}
    save_safetensors(flat, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)


def load_vqgan(path: str) -> tuple[VQGANConfig, dict]:
    """What `save_vqgan` wrote; the tensors must match the config's parameter tree."""
    d = read_json_object(os.path.join(path, CONFIG_FILE))
    try:
        config = VQGANConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)} is not a VQ-GAN config: {e}") from None
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE} beside its {CONFIG_FILE}")
    with open_safetensors(weights) as f:  # (a truncated file is a CheckpointError naming it)
        flat = {tuple(key.split("/")): f.get_tensor(key) for key in f.keys()}
    want = traverse_util.flatten_dict(abstract_params(config))
    missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
    wrong = [k for k in want if k in flat and flat[k].shape != want[k].shape]
    if missing or extra or wrong:
        said = ([f"missing {'/'.join(missing[0])}"] if missing else []) + \
            ([f"unknown {'/'.join(extra[0])}"] if extra else []) + \
            [f"{'/'.join(k)} is {list(flat[k].shape)}, the config needs {list(want[k].shape)}" for k in wrong[:1]]
        raise CheckpointError(f"{weights}: the VQ-GAN tensors do not match its config ({'; '.join(said)}; "
                              f"{len(missing)} missing, {len(extra)} unknown, {len(wrong)} of another shape)")
    return config, traverse_util.unflatten_dict(flat)


__all__ = ["config_from_hf", "config_from_yaml", "get_path", "has_decoder", "params_from_state_dict",
           "load_vqgan", "read_hf_vqmodel", "read_meta_checkpoint", "save_vqgan", "torch_key"]

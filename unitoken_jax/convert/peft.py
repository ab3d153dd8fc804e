"""LoRA adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names a factor after the module it adapts, prefixed by its wrapper:

    base_model.model.<module>.lora_A.weight    [rank, in_features]
    base_model.model.<module>.lora_B.weight    [out_features, rank]

where <module> is the base weight's HF key without `.weight` (`model.layers.3.self_attn.q_proj`,
`lm_head`; for transformers' `ChameleonForConditionalGeneration` these are its module names, so
`peft.PeftModel.from_pretrained(chameleon, DIR)` reads what `save_adapters` writes). Our factors
are `lora_a` [contracted dims..., rank] and `lora_b` [rank, output dims...]; the HF layouts
flatten a kernel's input and output dims in the same order as ours (`convert.hf`), so

    lora_A = lora_a.reshape(-1, rank).T      lora_B = lora_b.reshape(rank, -1).T

per layer. Reading goes the other way, and checks every factor's shape against the model's
kernel, naming the key when they differ.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from flax import traverse_util

from unitoken_jax.convert.files import CheckpointError, open_safetensors, read_json_object, save_safetensors
from unitoken_jax.convert.hf import tensor_specs
from unitoken_jax.models import lora as lora_lib
from unitoken_jax.models.config import DECODER_LORA_TARGETS, LoraConfig, UniTokenConfig
from unitoken_jax.models.unitoken import abstract_params

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
# PEFT saves the base weight of an adapted embedding or head beside its factors
# (`save_embedding_layers="auto"`): a copy of what the base model has, not part of the adapter
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")
PEFT_DEFAULT_ALPHA = 8  # `peft.LoraConfig.lora_alpha`'s default, for a config that leaves it out
_EMBEDDING_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_[AB](?:\.[^.]+)?$")
# initialisations after which PEFT subtracts the initial factors from the base weights at every load
_REWRITES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _number(pc: dict, cfg_path: str, key: str, default: float) -> float:
    value = pc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{cfg_path}: {key}={value!r}; it must be a number")
    return float(value)


def _modules(config: UniTokenConfig) -> dict[tuple[tuple[str, ...], int | None], str]:
    """(kernel path, layer or None) -> HF module name, for every kernel of the model."""
    out = {}
    for spec in tensor_specs(config):
        if spec.path[-1] == "kernel" and spec.hf_key.endswith(".weight"):
            out[(spec.path, spec.layer)] = spec.hf_key[:-len(".weight")]
    return out


def _target_modules(lora: LoraConfig, names: list[str]) -> list[str] | str:
    """PEFT's `target_modules`: the plain names when only the decoder (and its head) is adapted,
    else a pattern naming exactly the adapted modules (a vision q_proj must not match)."""
    if all(t in DECODER_LORA_TARGETS + ("lm_head",) for t in lora.targets):
        return sorted(lora.targets)
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def adapted_modules(config: UniTokenConfig) -> list[str]:
    """The HF module names a LoRA model's adapters adapt, in `save_adapters`' order."""
    modules = _modules(config)
    names = []
    for kernel in lora_lib.adapter_kernels(config):
        layers = sorted(layer for (k, layer) in modules if k == kernel)
        names += [modules[(kernel, layer)] for layer in layers]
    return names


def save_adapters(path: str, config: UniTokenConfig, params: dict, base_model: str | None = None) -> list[str]:
    """Writes the adapters of a LoRA model (`config.lora`) to `path` in PEFT's format; returns the
    module names adapted. `params` needs only the adapter factors (`lora.split`'s second half)."""
    lora = config.lora
    if lora is None:
        raise ValueError("the model has no adapters (its config has no lora section)")
    flat = traverse_util.flatten_dict(params)
    modules = _modules(config)
    tensors, names = {}, []
    for kernel in lora_lib.adapter_kernels(config):
        owner = kernel[:-1]
        a = np.asarray(flat[owner + (lora_lib.A,)], np.float32)
        b = np.asarray(flat[owner + (lora_lib.B,)], np.float32)
        layered = (kernel, 0) in modules
        for layer in (range(a.shape[0]) if layered else [None]):
            name = modules[(kernel, layer)]
            a_l, b_l = (a[layer], b[layer]) if layered else (a, b)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_l.reshape(-1, lora.rank).T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_l.reshape(lora.rank, -1).T)
            names.append(name)
    os.makedirs(path, exist_ok=True)
    save_safetensors(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": _target_modules(lora, names), "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None,
    }
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(peft_config, f, indent=2)
    return names


def read_adapters(path: str, config: UniTokenConfig) -> tuple[LoraConfig, dict]:
    """(the adapters' LoraConfig, their parameters in our tree) for a model of `config` (without
    adapters), from a PEFT directory — ours or one PEFT wrote. Every factor must belong to a kernel
    of the model and have its shape; a PEFT option we do not model (DoRA, rsLoRA, aLoRA, BD-LoRA,
    KaSA, MonteCLoRA, QA-LoRA, Arrow routing, per-module ranks, biases, LoRA on embeddings, an
    initialisation that PEFT subtracts from the base weights at each load) is refused by name.
    Modules that `layers_to_transform` or `exclude_modules` leave out keep zero factors (their base
    kernels)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapters: {path} is not a directory")
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: not a PEFT adapter directory")
    pc: dict[str, Any] = read_json_object(cfg_path)
    if pc.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {pc.get('peft_type')!r}; only LORA adapters are supported")
    for key, off in (("use_dora", False), ("use_rslora", False), ("rank_pattern", {}), ("alpha_pattern", {}),
                     ("bias", "none"), ("modules_to_save", None), ("alora_invocation_tokens", None),
                     ("lora_bias", False), ("layer_replication", None), ("trainable_token_indices", None),
                     # variants whose factors are not plain A and B (block-diagonal, a learned diagonal
                     # between them, sampled ones) or that pool the input (QA-LoRA) or route among adapters
                     ("use_bdlora", None), ("kasa_config", None), ("monteclora_config", None),
                     ("use_qalora", False), ("arrow_config", None)):
        if pc.get(key, off) not in (off, None, [], {}, "none", False):
            raise CheckpointError(f"{cfg_path}: {key}={pc[key]!r} is not supported (only plain LoRA: "
                                  f"{key}={off!r})")
    init = pc.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_REWRITES_BASE):
        raise CheckpointError(
            f"{cfg_path}: init_lora_weights={init!r}: PEFT rewrites the base model's weights when it loads these "
            "adapters (base minus the initial factors), which plain LoRA factors on the original weights do not "
            "do; save them again with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=DIR) "
            "(PiSSA, OLoRA, CorDA: plain LoRA factors of the original weights), or merge them in PEFT "
            "(merge_and_unload) and convert the merged model")
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    rank = pc.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"{cfg_path}: r={rank!r}; the rank must be a positive integer")
    alpha, dropout = (_number(pc, cfg_path, key, default)
                      for key, default in (("lora_alpha", PEFT_DEFAULT_ALPHA), ("lora_dropout", 0.0)))

    by_name = {name: key for key, name in _modules(config).items()}
    found: dict[str, dict[str, np.ndarray]] = {}
    with open_safetensors(weights) as f:
        for key in f.keys():
            if (embedding := _EMBEDDING_FACTOR.match(key)) is not None:
                raise CheckpointError(f"{weights}: {key!r} adapts the embedding {embedding['module']}: LoRA on "
                                      "embeddings is not supported (only on linear layers)")
        for key in f.keys():
            if (copy := _BASE_COPY.match(key)) is not None and copy["module"] in by_name:
                continue
            m = _FACTOR.match(key)
            if m is None:
                raise CheckpointError(f"{weights}: {key!r} is not a LoRA factor (lora_A / lora_B weight)")
            found.setdefault(m["module"], {})[m["factor"]] = f.get_tensor(key)
    unknown = sorted(n for n in found if n not in by_name)
    if unknown:
        raise CheckpointError(f"{weights}: adapters for {', '.join(unknown[:4])}, which the model does not have "
                              f"(its kernels are e.g. {', '.join(sorted(by_name)[:3])})")
    targets = _targets_of(found, by_name)
    lora = LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    lora_config = config.replace(lora=lora.validate())
    want = traverse_util.flatten_dict(_abstract_adapters(lora_config))
    out = {p: np.zeros(s.shape, np.float32) for p, s in want.items()}
    covered = set()
    for name, factors in found.items():
        kernel, layer = by_name[name]
        owner = kernel[:-1]
        for factor, ours in (("A", lora_lib.A), ("B", lora_lib.B)):
            if factor not in factors:
                raise CheckpointError(f"{weights}: {name} has a lora_{'B' if factor == 'A' else 'A'} but no "
                                      f"lora_{factor}")
            target = out[owner + (ours,)]
            one = target[layer] if layer is not None else target
            t = factors[factor].astype(np.float32)
            if t.ndim == 2 and t.shape[0 if factor == "A" else 1] != rank:
                raise CheckpointError(f"{weights}: {PREFIX}{name}.lora_{factor}.weight is {list(t.shape)}, of rank "
                                      f"{t.shape[0 if factor == 'A' else 1]}, but {CONFIG_FILE} says r={rank}")
            shape = (rank, int(np.prod(one.shape[:-1]))) if factor == "A" else (int(np.prod(one.shape[1:])), rank)
            if t.shape != shape:
                raise CheckpointError(f"{weights}: {PREFIX}{name}.lora_{factor}.weight is {list(t.shape)}, the model "
                                      f"needs {list(shape)} (rank {rank}; the adapters were made for a model of "
                                      "other sizes)")
            one[...] = t.T.reshape(one.shape)  # [r, in] -> [in..., r]; [out, r] -> [r, out...]
        covered.add((kernel, layer))
    adapted = set(lora_lib.adapter_kernels(lora_config))  # (not every kernel a target names: the ViT's patch conv)
    chosen = _chosen_by(pc.get("target_modules"))
    missing = sorted(key for name, key in by_name.items() if key[0] in adapted and key not in covered and chosen(name))
    partial = [k for k in ("layers_to_transform", "exclude_modules") if pc.get(k) not in (None, [], "")]
    if missing and not partial:  # (PEFT adapts every module its targets name unless told otherwise)
        kernel, layer = missing[0]
        raise CheckpointError(f"{weights}: the adapters cover {targets} but not layer {layer} of "
                              f"{'/'.join(kernel[:-1])}, and {CONFIG_FILE} sets neither layers_to_transform nor "
                              "exclude_modules (made for a model with fewer layers?)")
    # with them, a module left out keeps zero factors: the base model's kernel, as in PEFT
    return lora, traverse_util.unflatten_dict(out)


def _chosen_by(target_modules):
    """Whether PEFT's `target_modules` picks a module by its name: a string is a regular expression
    the whole name matches (but "all-linear", every linear layer), a list names modules by a last
    part of their dotted names (`q_proj`, or `model.layers.1.self_attn.v_proj` for one module)."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return lambda name: re.fullmatch(target_modules, name) is not None
    if isinstance(target_modules, (list, tuple)):
        return lambda name: any(name == t or name.endswith("." + t) for t in target_modules)
    return lambda name: True


def _target_of(kernel: tuple[str, ...]) -> str:
    """The LoRA target name of a kernel path."""
    if kernel[0] == "adapter":
        return "adapter"
    if kernel[0] == "vit":
        return "vision"
    return kernel[-2]


def _targets_of(found, by_name) -> tuple[str, ...]:
    targets = []
    for name in found:
        t = _target_of(by_name[name][0])
        if t not in targets:
            targets.append(t)
    order = DECODER_LORA_TARGETS + ("lm_head", "adapter", "vision")
    return tuple(sorted(targets, key=order.index))


def _abstract_adapters(config: UniTokenConfig) -> dict:
    _, adapters = lora_lib.split(abstract_params(config))
    return adapters

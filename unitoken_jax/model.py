"""The user-facing model object: config + parameters + jitted entry points.

    model = unitoken_jax.load("path/to/UniToken-base-StageII")   # HF dir or our Orbax dir
    logits = model.text_logits(token_ids)                        # [B, L] -> [B, L, vocab]
    feats = model.image_features(pixels)                         # [N, H, W, 3] -> [N, T, hidden]
    logits, metrics = model.forward(tokens, labels=..., is_continuous=..., feature_index=..., pixels=...)
    model.save_hf("out_dir")                                     # back to the release's layout
    tuned = unitoken_jax.load(base_dir, adapters="lora_dir")     # PEFT-format LoRA adapters, merged
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh

from unitoken_jax import sharding
from unitoken_jax.convert import hf as hf_io
from unitoken_jax.convert import orbax_io
from unitoken_jax.convert import peft as peft_io
from unitoken_jax.convert.files import keep_trained_record
from unitoken_jax.models import lora as lora_lib
from unitoken_jax.models.config import FLOAT_DTYPES, UniTokenConfig, check_quantize
from unitoken_jax.models.loss import lm_loss
from unitoken_jax.models.quantize import LeafQuantizer, quantize_params
from unitoken_jax.models.unitoken import (
    UniToken,
    abstract_params,
    init_variables,
    param_shardings,
    run_layout,
    uneven_split,
)

log = logging.getLogger(__name__)


class UniTokenModel:
    """A UniToken model (or just its decoder, or just its vision tower) with its parameters.

    `params` are always kept in the scanned layout (a leading layers axis), the layout of our
    checkpoints; a config with `scan_layers=False` gets them unrolled when it runs.
    """

    def __init__(self, config: UniTokenConfig, params: dict, passthrough: dict[str, np.ndarray] | None = None,
                 hf_config: dict[str, Any] | None = None, hf_dtype: str | dict = "float32",
                 source: str | None = None):
        self.config = config
        self.params = params
        self.passthrough = dict(passthrough or {})
        self.hf_config = hf_config
        self.hf_dtype = hf_dtype
        self.source = source
        self.mesh: Mesh | None = None
        self.kind: str | None = None  # what an HF load found: "unitoken" | "chameleon" | "siglip"
        self.qk_norm_layout: str | None = None  # which QK-norm layout an HF load found

    def num_params(self) -> int:
        """How many numbers the parameters hold (an int8 weight's scales counted too)."""
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))

    def __repr__(self):
        n = self.num_params()
        parts = [p for p, c in (("decoder", self.config.decoder), ("vision", self.config.vision)) if c is not None]
        return f"UniTokenModel({'+'.join(parts)}, {n / 1e6:.2f}M params, source={self.source!r})"

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def random(cls, config: UniTokenConfig, seed: int = 0, mesh: Mesh | None = None) -> "UniTokenModel":
        """Freshly initialised parameters; with `mesh` they are created already sharded
        (eval_shape -> shardings -> jit(init, out_shardings)), never whole on one device."""
        if config.quantize != "none":  # (an int8 layer's own init is zeros: it holds what a checkpoint gives)
            model = cls.random(config.replace(quantize="none"), seed, mesh).quantize(config.quantize)
            model.source = f"random(seed={seed})"
            return model
        scanned = config.replace(scan_layers=True)
        init = lambda: nn.meta.unbox(init_variables(scanned, jax.random.key(seed)))["params"]  # noqa: E731
        if mesh is None:
            return cls(config, jax.jit(init)(), source=f"random(seed={seed})")
        model = cls(config, None, source=f"random(seed={seed})")
        shardings = _placement(config, mesh)
        with jax.set_mesh(mesh):
            model.params = jax.jit(init, out_shardings=shardings)()
        model.mesh = mesh
        return model

    def shard(self, mesh: Mesh) -> "UniTokenModel":
        """Places the parameters on `mesh` by the logical rules (in place; returns self)."""
        self.params = jax.device_put(self.params, _placement(self.config, mesh))
        self.mesh = mesh
        return self

    # --- running ----------------------------------------------------------------------------
    def _run(self, name, *args):
        if self.mesh is None:
            return _entry_point(name, self.config)(self.params, *args)
        with sharding.mesh_context(self.mesh):
            return _entry_point(name, self.config)(self.params, *args)

    def _need(self, part: str):
        if part == "decoder" and self.config.decoder is None:
            raise ValueError("this model has no decoder (it was loaded from a vision-only checkpoint)")
        if part == "vision" and self.config.vision is None:
            raise ValueError("this model has no vision tower (it was loaded from a decoder-only checkpoint)")
        if part == "adapter" and not self.config.has_adapter:
            raise ValueError("this model has no adapter: image_features needs a UniToken checkpoint; "
                             "use vision_features for the bare SigLIP output")

    def text_logits(self, token_ids) -> jax.Array:
        """float32 logits [B, L, vocab] of the decoder for int token ids [B, L] (one sample a row)."""
        self._need("decoder")
        return self._run("text_logits", self._checked_ids(token_ids, "token_ids"))

    def _checked_ids(self, token_ids, name: str, rows_of_positions: bool = True) -> jax.Array:
        """Token ids [B, L] as int32, or a ValueError naming `name`: ids out of the vocabulary (an id
        equal to its size gave NaN logits, a negative one another row), floats (1.5 read as 1), and,
        with `rows_of_positions` (positions 0..L-1), rows longer than the model's positions."""
        if isinstance(token_ids, jax.Array) and not token_ids.is_fully_addressable:
            ids, values = token_ids, None  # a multi-host array: its values are not all on this host to check
        else:
            ids = values = np.asarray(token_ids)
        if ids.ndim != 2:
            raise ValueError(f"{name} must be [batch, length], got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got {ids.dtype}")
        vocab, positions = self.config.decoder.vocab_size, self.config.decoder.max_position_embeddings
        if ids.shape[1] == 0 or (rows_of_positions and ids.shape[1] > positions):  # (past them: garbage)
            raise ValueError(f"{name} has {ids.shape[1]} tokens a row; the model takes 1 to {positions}")
        if values is not None and (values.min() < 0 or values.max() >= vocab):
            raise ValueError(f"{name}: token ids must be in [0, {vocab}), got {values.min()} to {values.max()}")
        return jnp.asarray(ids, jnp.int32)

    def _pixels(self, pixel_values):
        pixels = jnp.asarray(pixel_values, jnp.float32)
        if pixels.ndim != 4 or pixels.shape[-1] != self.config.vision.num_channels:
            raise ValueError(f"pixel_values must be [N, H, W, {self.config.vision.num_channels}], got {pixels.shape}")
        return pixels

    def image_features(self, pixel_values) -> jax.Array:
        """adapter(vit(x)): the continuous tokens [N, T, hidden] for preprocessed images [N, H, W, 3]."""
        self._need("adapter")
        return self._run("image_features", self._pixels(pixel_values))

    def vision_features(self, pixel_values) -> jax.Array:
        """The SigLIP last hidden state [N, T, vision hidden]."""
        self._need("vision")
        return self._run("vision_features", self._pixels(pixel_values))

    def forward(self, tokens, *, labels=None, positions=None, segment_ids=None, is_continuous=None,
                feature_index=None, pixels=None, generation=None):
        """A forward over full multimodal sequences. Returns (logits [B, L, V], metrics or None).

        tokens [B, L] int; is_continuous [B, L] bool and feature_index [B, L] int place rows of the
        flat image-feature list (all images in `pixels [N, H, W, 3]`, T features each, image i's
        feature j at index i*T + j) at continuous positions. segment_ids (default: all 1) and
        positions (default: 0..L-1 per row) describe packed rows. labels [B, L] (negative = not
        predicted) give the loss; see `unitoken_jax.models.loss`. generation [B, L] bool (default:
        each target's id decides) says which predicted tokens the metrics count as
        `ce_generation` rather than `ce_understanding`.
        """
        self._need("decoder")
        tokens = self._checked_ids(tokens, "tokens", rows_of_positions=positions is None)
        b, length = tokens.shape
        batch = {"tokens": tokens,
                 "segment_ids": jnp.ones_like(tokens) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)}
        batch["positions"] = (jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
                              if positions is None else jnp.asarray(positions, jnp.int32))
        if pixels is not None:
            self._need("adapter")
            if is_continuous is None or feature_index is None:
                raise ValueError("pixels need is_continuous and feature_index to say where their features go")
            batch["pixels"] = self._pixels(pixels)
            batch["is_continuous"] = jnp.asarray(is_continuous, bool)
            batch["feature_index"] = jnp.asarray(feature_index, jnp.int32)
            n_features = batch["pixels"].shape[0] * self.config.vision.features_per_image(batch["pixels"].shape[1:3])
            used = np.asarray(batch["feature_index"])[np.asarray(batch["is_continuous"])]
            if used.size and (used.min() < 0 or used.max() >= n_features):
                raise ValueError(f"feature_index refers to features outside 0..{n_features - 1} "
                                 f"({batch['pixels'].shape[0]} images)")
        elif is_continuous is not None and np.asarray(is_continuous).any():
            raise ValueError("is_continuous marks positions but no pixels were given")
        if labels is not None:  # negative: not predicted; else a token id, checked as the tokens are
            labels = np.asarray(labels)
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be integers, got {labels.dtype}")
            if labels.shape != np.shape(tokens):
                raise ValueError(f"labels have shape {labels.shape}, the tokens {np.shape(tokens)}")
            vocab = self.config.decoder.vocab_size
            if labels.size and labels.max() >= vocab:
                raise ValueError(f"labels hold {labels.max()}, past the vocabulary (0..{vocab - 1}; negative: not "
                                 "predicted)")
            batch["labels"] = jnp.asarray(labels, jnp.int32)
        if generation is not None:
            batch["generation"] = jnp.asarray(generation, bool)
        return self._run("forward", batch)

    # --- saving -----------------------------------------------------------------------------
    def save_hf(self, path: str, dtype: str | None = None, progress: bool = False) -> None:
        """Writes the release's HF layout (safetensors + config.json), by default in the dtype it was
        read in (each tensor in its own where they differed: `convert.hf.saved_dtype`). A LoRA model
        is written merged (each adapter folded into its kernel); its adapters alone go out with
        `save_adapters`."""
        if self.config.quantize != "none":
            raise ValueError(f"this model holds {self.config.quantize} weights, which the HF layout cannot carry; "
                             "save() it in our Orbax format, or write the float checkpoint it came from")
        model = self.merge_adapters()
        path = os.path.expanduser(os.fspath(path))  # (as load reads it: '~/m' was a folder named '~')
        hf_io.write_hf(path, model.config, model.params, model.passthrough, model.hf_config, dtype or self.hf_dtype,
                       progress=progress)
        keep_trained_record(self.source, path)

    # --- LoRA adapters ---------------------------------------------------------------------
    def merge_adapters(self) -> "UniTokenModel":
        """The model with its LoRA adapters folded into the kernels (itself when it has none)."""
        if self.config.lora is None:
            return self
        params, config = lora_lib.merge(self.params, self.config)
        return self._like(config, params)

    def save_adapters(self, path: str, base_model: str | None = None) -> list[str]:
        """Writes the LoRA adapters alone in Hugging Face PEFT's format (adapter_config.json +
        adapter_model.safetensors; see `unitoken_jax.convert.peft`); returns the modules adapted.
        Only the adapters come to the host (a few MB, not the frozen base). On a pod every process
        calls it (the adapters are gathered from all of them) and process 0 writes."""
        if self.config.lora is None:
            raise ValueError("the model has no adapters (its config has no lora section)")
        _, adapters = lora_lib.split(self.params)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            adapters = multihost_utils.process_allgather(adapters, tiled=True)
        else:
            adapters = jax.device_get(adapters)
        if jax.process_index() != 0:
            return peft_io.adapted_modules(self.config)
        return peft_io.save_adapters(os.path.expanduser(os.fspath(path)), self.config, adapters,
                                     base_model or self.source)

    def with_adapters(self, path: str, merge: bool = True) -> "UniTokenModel":
        """This (float) model with the PEFT-format adapters in `path` applied: folded into the
        kernels (`merge`, what inference wants), or kept beside them as a LoRA model. A model with
        adapters of its own (the final/ of a LoRA run that the adapters' run started from) has them
        folded in first: that sum is the base the new adapters were trained on."""
        if self.config.quantize != "none":
            raise ValueError(f"adapters cannot be applied to {self.config.quantize} weights; load the float model, "
                             "apply them, then quantize")
        if self.config.lora is not None:
            log.info("folding the model's own adapters into its kernels before applying %s", path)
            return self.merge_adapters().with_adapters(path, merge)
        path = os.path.expanduser(os.fspath(path))
        lora, adapters = peft_io.read_adapters(path, self.config)
        config = self.config.replace(lora=lora)
        if self.mesh is not None:
            _, shardings = lora_lib.split(param_shardings(config, self.mesh))
            adapters = jax.device_put(adapters, shardings)
        model = self._like(config, lora_lib.join(self.params, adapters))
        log.info("applied %s adapters (rank %d, targets %s) from %s", "merged" if merge else "unmerged", lora.rank,
                 ", ".join(lora.targets), path)
        return model.merge_adapters() if merge else model

    def _like(self, config: UniTokenConfig, params: dict) -> "UniTokenModel":
        model = UniTokenModel(config, params, self.passthrough, self.hf_config, self.hf_dtype, source=self.source)
        model.mesh, model.kind, model.qk_norm_layout = self.mesh, self.kind, self.qk_norm_layout
        return model

    def quantize(self, mode: str = "int8") -> "UniTokenModel":
        """A model with the same parameters in `mode` (weight-only int8: every matmul kernel int8
        with a float32 scale per output channel; see `unitoken_jax.models.quantize`). For
        inference: training refuses quantized weights. The parameters keep their placement."""
        check_quantize(mode)
        if mode == self.config.quantize:
            return self
        if mode == "none":
            raise ValueError(f"this model's weights are {self.config.quantize} already; load the float checkpoint "
                             "to get float weights back")
        merged = self.merge_adapters()  # int8 kernels take no adapters: fold them in first
        model = merged._like(merged.config.replace(quantize=mode), quantize_params(merged.params, merged.config, mode))
        if self.mesh is not None:
            model.shard(self.mesh)
        return model

    def save(self, path: str) -> None:
        """Writes our Orbax checkpoint (see `unitoken_jax.convert.orbax_io`); a quantized model is
        stored quantized, and loads back so."""
        path = os.path.expanduser(os.fspath(path))
        orbax_io.save(path, self.config, self.params, self.passthrough,
                      {"hf_config": self.hf_config, "hf_dtype": self.hf_dtype})
        keep_trained_record(self.source, path)


@functools.lru_cache(maxsize=None)
def _entry_point(name: str, config: UniTokenConfig):
    """One jitted function per entry point and (hashable) config; a changed `model.config`
    recompiles. Keyed by the config, not the model, so the cache keeps no parameters alive."""
    module = UniToken(config)

    def variables(params):
        return {"params": run_layout(params, config)}

    def text_logits(params, tokens):
        b, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        logits, _ = module.apply(variables(params), tokens, positions, jnp.ones_like(tokens))
        return logits

    def image_features(params, pixels):
        return module.apply(variables(params), pixels, method=UniToken.image_features)

    def vision_features(params, pixels):
        return module.apply(variables(params), pixels, method=UniToken.vision_features)

    def forward(params, batch):
        logits, _ = module.apply(variables(params), batch["tokens"], batch["positions"], batch["segment_ids"],
                                 batch.get("is_continuous"), batch.get("feature_index"), batch.get("pixels"))
        if "labels" not in batch:
            return logits, None
        _, metrics = lm_loss(logits, batch["labels"], batch["segment_ids"], config.z_loss_weight,
                             batch.get("generation"))
        return logits, metrics

    fn = {"text_logits": text_logits, "image_features": image_features, "vision_features": vision_features,
          "forward": forward}[name]
    return jax.jit(fn)


def read_extras(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, str | dict]:
    """(tensors carried through, HF config, HF dtype) of a checkpoint, ours or HF, without its
    parameters: what a release brings besides the weights (the VQ-GAN's tensors, its config.json,
    bfloat16), which `save_hf` writes back."""
    if orbax_io.is_orbax_checkpoint(path):
        sidecar = orbax_io.read_sidecar(path)
        return orbax_io.restore_passthrough(path), sidecar.get("hf_config"), sidecar.get("hf_dtype", "float32")
    return hf_io.read_extras(path)


def _load_orbax(path: str, param_dtype: str | None, mesh: Mesh | None, quantize: str | None) -> UniTokenModel:
    stored = UniTokenConfig.from_dict(orbax_io.read_sidecar(path)["config"])
    stored = stored.replace(param_dtype=param_dtype or stored.param_dtype)
    if quantize is None or quantize == stored.quantize:
        config = stored
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params(config), _placement(config, mesh))
        _, params, passthrough, sidecar = orbax_io.restore(path, target)
    elif stored.quantize != "none":
        raise ValueError(f"{path} holds {stored.quantize} weights; it cannot be loaded as quantize={quantize!r} "
                         "(load the float checkpoint it was made from)")
    elif stored.lora is not None:  # int8 kernels take no adapters: restored whole, folded in, then quantized
        return _load_orbax(path, param_dtype, mesh, None).quantize(quantize)
    else:  # a float checkpoint, quantized leaf by leaf as it is restored
        quantizer = LeafQuantizer(stored, quantize)
        config = quantizer.config
        placement = traverse_util.flatten_dict(_placement(config, mesh))
        flat = {}
        orbax_io.check_shapes(path, stored)
        for leaf_path, array in orbax_io.restore_leaves(path, abstract_params(stored)):
            values, scale = quantizer(leaf_path, array)
            flat[leaf_path] = jax.device_put(values, placement[leaf_path])
            if scale is not None:
                scale_path = quantizer.scale_path(leaf_path)
                flat[scale_path] = jax.device_put(scale, placement[scale_path])
        params = traverse_util.unflatten_dict(flat)
        passthrough, sidecar = orbax_io.restore_passthrough(path), orbax_io.read_sidecar(path)
    return UniTokenModel(config, params, passthrough, sidecar.get("hf_config"), sidecar.get("hf_dtype", "float32"),
                         source=path)


def _load_hf(path: str, param_dtype: str | None, mesh: Mesh | None, progress: bool, quantize: str | None,
             fold=None) -> UniTokenModel:
    state: dict[str, Any] = {}
    scales: dict[tuple[str, ...], jax.Array] = {}

    def start(config):
        if not state:  # the first tensor: the config is known now
            state["quantizer"] = LeafQuantizer(config, quantize) if quantize not in (None, "none") else None
            state["tree"] = traverse_util.flatten_dict(
                _placement(state["quantizer"].config if state["quantizer"] else config, mesh))

    def put(leaf_path, array, scale):
        if scale is not None:
            scale_path = LeafQuantizer.scale_path(leaf_path)
            scales[scale_path] = jax.device_put(scale, state["tree"][scale_path])
        return jax.device_put(array, state["tree"][tuple(leaf_path)])

    def place(config, leaf_path, array):
        if fold is not None:  # adapters (`lora.LeafMerger`), before any quantization
            array = fold(leaf_path, array)
        start(config)
        scale = None
        if state["quantizer"] is not None:
            array, scale = state["quantizer"](leaf_path, array)
        return put(leaf_path, array, scale)

    class Layers:  # an int8 leaf quantized as its layers are read (adapters folded into each layer first)
        def __init__(self, leaf_path, quantizer):
            self.leaf_path, self.quantizer = leaf_path, quantizer

        def put(self, layer, array):
            self.quantizer.put(layer, array if fold is None else fold.layer(self.leaf_path, layer, array))

        def done(self):
            return put(self.leaf_path, *self.quantizer.result())

    def by_layer(config, leaf_path, shape):
        start(config)
        layers = None if state["quantizer"] is None else state["quantizer"].by_layer(leaf_path, shape)
        return None if layers is None else Layers(leaf_path, layers)

    ckpt = hf_io.read_hf(path, param_dtype=param_dtype, progress=progress, place=place, by_layer=by_layer)
    log.info("loaded %s checkpoint from %s%s", ckpt.kind, path,
             f"; QK-norm layout: {ckpt.qk_norm_layout}" if ckpt.qk_norm_layout else "")
    config, params = ckpt.config, ckpt.params
    if state.get("quantizer") is not None:
        config = state["quantizer"].config
        params = traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **scales})
    model = UniTokenModel(config, params, ckpt.passthrough, ckpt.hf_config, ckpt.dtype, source=path)
    model.qk_norm_layout = ckpt.qk_norm_layout
    model.kind = ckpt.kind
    return model


def _placement(config: UniTokenConfig, mesh: Mesh | None):
    """Per-parameter shardings: by the logical rules on `mesh`, or the first device."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, abstract_params(config))
    uneven = uneven_split(config, mesh)
    if uneven:  # (JAX's IndivisibleError, a sharding spec and a shape, named no weight and no remedy)
        raise ValueError(f"the mesh {dict(mesh.shape)} does not split the model's weights evenly: {uneven}; "
                         "give axis sizes that divide it (make_mesh(data, fsdp, tensor))")
    return param_shardings(config, mesh)


def read_config(path: str) -> UniTokenConfig:
    """The model config of a checkpoint (HF-format or ours), reading no tensor: what to plan
    memory with before loading (see `unitoken_jax.inference.fit`)."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if orbax_io.is_orbax_checkpoint(path):
        return UniTokenConfig.from_dict(orbax_io.read_sidecar(path)["config"])
    return hf_io.read_config(path)


def auto_dtype(platform: str) -> str:
    """What `"auto"` means for a dtype: bfloat16 on a TPU or GPU (the release in float32 is 28 GiB of
    weights, more than a Colab TPU chip holds), float32 on a CPU (whose bfloat16 dots are slow)."""
    return "float32" if platform == "cpu" else "bfloat16"


def _platform(mesh: Mesh | None) -> str:
    return (mesh.devices.flat[0] if mesh is not None else jax.local_devices()[0]).platform


def load(path: str, *, param_dtype: str | None = "float32", mesh: Mesh | None = None, progress: bool = True,
         quantize: str | None = None, adapters: str | None = None, merge_adapters: bool = True,
         **config_overrides) -> UniTokenModel:
    """Loads an HF-format directory (UniToken, Chameleon / Lumina-mGPT, or SigLIP) or one of our
    Orbax checkpoints, parameters in `param_dtype` (None: the checkpoint's own). `config_overrides` replace fields of the model config (e.g.
    `dtype="bfloat16"`, `remat_policy="full"`); `mesh` places the parameters sharded.

    `quantize="int8"` gives weight-only int8 for inference (see `UniTokenModel.quantize`),
    quantized as each tensor is read; None keeps the checkpoint's own format (a quantized Orbax
    checkpoint loads quantized). Each parameter goes to the devices as soon as it is read (and
    quantized), so the host holds at most one parameter beyond what is already placed.

    `adapters`: a directory of LoRA adapters in PEFT's format (ours, `UniTokenModel.save_adapters`,
    or PEFT's own) for this base model, applied as it loads: folded into the kernels
    (`merge_adapters=True`), or kept beside them. With `quantize`, they are folded in first and
    the sum quantized. From an HF directory they are folded into each tensor as it is read (a layer
    at a time), so the host holds no more than it does without adapters.

    `param_dtype="auto"` / `dtype="auto"`: bfloat16 on a TPU or GPU, float32 on a CPU
    (`auto_dtype`, what the CLI's --param-dtype / --dtype auto take), by the devices of `mesh`,
    else of this host. `progress`: a bar over the tensors as they are read."""
    if "auto" in (param_dtype, config_overrides.get("dtype")):
        platform = _platform(mesh)
        if param_dtype == "auto":
            param_dtype = auto_dtype(platform)
        if config_overrides.get("dtype") == "auto":
            config_overrides["dtype"] = auto_dtype(platform)
    if quantize == "auto":  # (the CLI's --quantize auto plans for a verb's pictures on these devices)
        raise ValueError("quantize='auto' is the CLI's plan for a command's pictures; in Python choose 'none' or "
                         "'int8', or ask unitoken_jax.inference.fit.choose_quantize(config, images) which fits")
    if quantize is not None:
        check_quantize(quantize)
    if param_dtype is not None and (not isinstance(param_dtype, str) or param_dtype not in FLOAT_DTYPES):
        # (before anything is read; a name: np.dtype("float16") == "float16", and it is not JSON)
        raise ValueError(f"param_dtype={param_dtype!r}; choose one of {', '.join(FLOAT_DTYPES)}, 'auto' or None (the "
                         "checkpoint's own)")
    path = os.path.expanduser(os.fspath(path))
    adapters = None if adapters is None else os.path.expanduser(os.fspath(adapters))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    # what is refused is refused before any tensor is read (minutes for a release), not after
    own = read_config(path)
    wanted = (param_dtype or own.param_dtype, config_overrides.get("dtype") or own.dtype)
    if "float64" in wanted and not jax.config.jax_enable_x64:  # (JAX would give float32 arrays, float64 config)
        raise ValueError("float64 weights or compute need JAX's 64-bit mode: jax.config.update('jax_enable_x64', "
                         "True) before loading (or param_dtype= / dtype= another)")
    if config_overrides:
        _overridden(own, config_overrides)
    if adapters is not None and own.quantize != "none":  # (with_adapters refuses it, after the whole model)
        raise ValueError(f"{path} holds {own.quantize} weights: adapters cannot be applied to them; load the float "
                         "model it was made from with the adapters (and quantize='int8' to quantize the sum)")
    orbax = orbax_io.is_orbax_checkpoint(path)
    fold = None
    if adapters is not None and not orbax and (merge_adapters or quantize not in (None, "none")):
        # folded into each kernel as it is read (and then quantized): the float model is never whole
        base_config = own
        lora, factors = peft_io.read_adapters(adapters, base_config)
        fold = lora_lib.LeafMerger(factors, base_config.replace(lora=lora))
        log.info("folding %s adapters (rank %d, targets %s) into the kernels as they load", adapters, lora.rank,
                 ", ".join(lora.targets))
    late_quantize = quantize if adapters is not None and fold is None and quantize not in (None, "none") else None
    if late_quantize:
        quantize = None
    if orbax:
        model = _load_orbax(path, param_dtype, mesh, quantize)
    else:
        model = _load_hf(path, param_dtype, mesh, progress, quantize, fold)
    model.mesh = mesh
    if adapters is not None and fold is None:
        model = model.with_adapters(adapters, merge=merge_adapters or bool(late_quantize))
        if late_quantize:
            model = model.quantize(late_quantize)
    if config_overrides:
        model.config = _overridden(model.config, config_overrides)
    return model


# what says which parameters a model has, and their form: set by the checkpoint (and load's own
# `param_dtype`, `quantize` and `adapters`), never by an override
_STRUCTURE = ("decoder", "vision", "lora", "quantize", "param_dtype")


def _overridden(config: UniTokenConfig, overrides: dict) -> UniTokenConfig:
    """`config` with `load`'s keyword overrides, each checked as a config file's value is (its type:
    'no' was taken for True, 64.0 for a block size, and the model then saved a checkpoint that
    would not load)."""
    settable = sorted({f.name for f in dataclasses.fields(UniTokenConfig)} - set(_STRUCTURE))
    unknown = sorted(set(overrides) - set(settable) - set(_STRUCTURE))
    if unknown:  # (the config's own error listed every field, those refused just below too)
        raise ValueError(f"load() takes no option {', '.join(map(repr, unknown))}: besides its own (param_dtype, mesh, "
                         f"progress, quantize, adapters, merge_adapters) it takes the config fields "
                         f"{', '.join(settable)}")
    fixed = sorted(set(overrides) & set(_STRUCTURE))
    if fixed:
        raise ValueError(f"load(..., {fixed[0]}=...) would not change the parameters the checkpoint holds, only "
                         "what the model expects of them; the parameters' form comes from the checkpoint "
                         "(param_dtype, quantize and adapters are load's own arguments)")
    return UniTokenConfig.from_dict({**config.to_dict(), **overrides}, where="load()")

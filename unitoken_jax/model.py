"""The user-facing model object: config + parameters + jitted entry points.

    model = unitoken_jax.load("path/to/UniToken-base-StageII")   # HF dir or our Orbax dir
    logits = model.text_logits(token_ids)                        # [B, L] -> [B, L, vocab]
    feats = model.image_features(pixels)                         # [N, H, W, 3] -> [N, T, hidden]
    logits, metrics = model.forward(tokens, labels=..., is_continuous=..., feature_index=..., pixels=...)
    model.save_hf("out_dir")                                     # back to the release's layout
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from unitoken_jax import sharding
from unitoken_jax.convert import hf as hf_io
from unitoken_jax.convert import orbax_io
from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.models.loss import lm_loss
from unitoken_jax.models.unitoken import (
    UniToken,
    abstract_params,
    init_variables,
    param_shardings,
    unroll_params,
)

log = logging.getLogger(__name__)


class UniTokenModel:
    """A UniToken model (or just its decoder, or just its vision tower) with its parameters.

    `params` are always kept in the scanned layout (a leading layers axis), the layout of our
    checkpoints; a config with `scan_layers=False` gets them unrolled when it runs.
    """

    def __init__(self, config: UniTokenConfig, params: dict, passthrough: dict[str, np.ndarray] | None = None,
                 hf_config: dict[str, Any] | None = None, hf_dtype: str = "float32", source: str | None = None):
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
        scanned = config.replace(scan_layers=True)
        init = lambda: nn.meta.unbox(init_variables(scanned, jax.random.key(seed)))["params"]  # noqa: E731
        if mesh is None:
            return cls(config, jax.jit(init)(), source=f"random(seed={seed})")
        model = cls(config, None, source=f"random(seed={seed})")
        shardings = param_shardings(config, mesh)
        with jax.set_mesh(mesh):
            model.params = jax.jit(init, out_shardings=shardings)()
        model.mesh = mesh
        return model

    def shard(self, mesh: Mesh) -> "UniTokenModel":
        """Places the parameters on `mesh` by the logical rules (in place; returns self)."""
        self.params = jax.device_put(self.params, param_shardings(self.config, mesh))
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
        tokens = jnp.asarray(token_ids, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"token_ids must be [batch, length], got shape {tokens.shape}")
        return self._run("text_logits", tokens)

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
        predicted) give the loss; see `unitoken_jax.models.loss`.
        """
        self._need("decoder")
        tokens = jnp.asarray(tokens, jnp.int32)
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
        if labels is not None:
            batch["labels"] = jnp.asarray(labels, jnp.int32)
        if generation is not None:
            batch["generation"] = jnp.asarray(generation, bool)
        return self._run("forward", batch)

    # --- saving -----------------------------------------------------------------------------
    def save_hf(self, path: str, dtype: str | None = None, progress: bool = False) -> None:
        """Writes the release's HF layout (safetensors + config.json), by default in the dtype it was read in."""
        hf_io.write_hf(path, self.config, self.params, self.passthrough, self.hf_config, dtype or self.hf_dtype,
                       progress=progress)

    def save(self, path: str) -> None:
        """Writes our Orbax checkpoint (see `unitoken_jax.convert.orbax_io`)."""
        orbax_io.save(path, self.config, self.params, self.passthrough,
                      {"hf_config": self.hf_config, "hf_dtype": self.hf_dtype})


@functools.lru_cache(maxsize=None)
def _entry_point(name: str, config: UniTokenConfig):
    """One jitted function per entry point and (hashable) config; a changed `model.config`
    recompiles. Keyed by the config, not the model, so the cache keeps no parameters alive."""
    module = UniToken(config)

    def variables(params):
        return {"params": params if config.scan_layers else unroll_params(params, config)}

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


def _placement(config: UniTokenConfig, mesh: Mesh | None):
    """Per-parameter shardings: by the logical rules on `mesh`, or the first device."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, abstract_params(config))
    return param_shardings(config, mesh)


def load(path: str, *, param_dtype: str = "float32", mesh: Mesh | None = None, progress: bool = True,
         **config_overrides) -> UniTokenModel:
    """Loads an HF-format directory (UniToken, Chameleon / Lumina-mGPT, or SigLIP) or one of our
    Orbax checkpoints. `config_overrides` replace fields of the model config (e.g.
    `dtype="bfloat16"`, `remat_policy="full"`); `mesh` places the parameters sharded.

    Each parameter goes to the devices as soon as it is read, so the host holds at most one
    parameter beyond what is already placed."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if orbax_io.is_orbax_checkpoint(path):
        config = UniTokenConfig.from_dict(orbax_io.read_sidecar(path)["config"]).replace(param_dtype=param_dtype)
        abstract = abstract_params(config)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                              _placement(config, mesh))
        _, params, passthrough, sidecar = orbax_io.restore(path, target)
        model = UniTokenModel(config, params, passthrough, sidecar.get("hf_config"),
                              sidecar.get("hf_dtype", "float32"), source=path)
    else:
        shardings = {}

        def place(config, leaf_path, array):
            if not shardings:
                shardings["tree"] = _placement(config, mesh)
            return jax.device_put(array, hf_io.get_path(shardings["tree"], leaf_path))

        ckpt = hf_io.read_hf(path, param_dtype=param_dtype, progress=progress, place=place)
        log.info("loaded %s checkpoint from %s%s", ckpt.kind, path,
                 f"; QK-norm layout: {ckpt.qk_norm_layout}" if ckpt.qk_norm_layout else "")
        model = UniTokenModel(ckpt.config, ckpt.params, ckpt.passthrough, ckpt.hf_config, ckpt.dtype, source=path)
        model.qk_norm_layout = ckpt.qk_norm_layout
        model.kind = ckpt.kind
    model.mesh = mesh
    if config_overrides:
        model.config = model.config.replace(**config_overrides)
    return model

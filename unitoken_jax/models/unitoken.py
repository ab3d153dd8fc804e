"""UniToken: the Chameleon decoder fed with token embeddings and continuous SigLIP features.

The merge uses only static shapes. The host gives, for every position of `tokens [B, L]`,
`is_continuous [B, L]` and `feature_index [B, L]`: the row of the flat list of image features
(all images of the batch, `[N * T, D]`) that replaces the token embedding there. Everything else
(SEP, the VQ codes, the AnyRes end-of-row tokens, which are embeddings of token 8803) is an
ordinary token. Any number of images per sequence works, none included.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from unitoken_jax import sharding
from unitoken_jax.models.chameleon import ChameleonDecoder, unstack_layers
from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.models.layers import prefix_kernels
from unitoken_jax.models.siglip import Adapter, SiglipVisionTower


class UniToken(nn.Module):
    config: UniTokenConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if cfg.decoder is not None:
            self.decoder = ChameleonDecoder(cfg.decoder, dtype, param_dtype, cfg.scan_layers, cfg.remat_policy,
                                            cfg.quantize, cfg.attention, cfg.attention_block, cfg.lora)
        if cfg.vision is not None:
            self.vit = SiglipVisionTower(cfg.vision, dtype, param_dtype, cfg.scan_layers, cfg.remat_policy != "none",
                                         cfg.quantize, cfg.lora)
        if cfg.has_adapter:
            self.adapter = Adapter(cfg.decoder.hidden_size, dtype, param_dtype, cfg.quantize, cfg.lora)

    def vision_features(self, pixels_NHWC: jax.Array) -> jax.Array:
        """SigLIP last hidden state [N, T, vision hidden]."""
        return self.vit(pixels_NHWC)

    def image_features(self, pixels_NHWC: jax.Array) -> jax.Array:
        """The continuous tokens the decoder receives: adapter(vit(x)) [N, T, hidden]."""
        return self.adapter(self.vit(pixels_NHWC))

    def embed(self, tokens_BL, is_continuous_BL=None, feature_index_BL=None, pixels_NHWC=None,
              feature_blocks: int = 1):
        """Token embeddings with the image features put in at the continuous positions.

        `feature_blocks` = S > 1 promises the layout the training input pipeline packs for S
        data-parallel shards: rows and images both split into S equal consecutive blocks, and the
        rows of block k use only the features of block k. The gather then runs block by block (a
        batched gather XLA keeps on each chip) instead of gathering every image's features onto
        every chip, and scattering and all-reducing their gradient."""
        x_BLD = self.decoder.embed(tokens_BL)
        if pixels_NHWC is None:
            return x_BLD
        feats_NTD = self.image_features(pixels_NHWC)
        feats_FD = feats_NTD.reshape(-1, feats_NTD.shape[-1]).astype(x_BLD.dtype)
        if feature_blocks == 1:
            gathered_BLD = jnp.take(feats_FD, feature_index_BL, axis=0, mode="clip")
        else:
            (b, length), (f, d), s = feature_index_BL.shape, feats_FD.shape, feature_blocks
            if b % s or f % s:
                raise ValueError(f"feature_blocks={s} must divide the rows ({b}) and the features ({f})")
            feats_SFD = sharding.constrain(feats_FD.reshape(s, f // s, d), ("act_batch", None, "act_embed"))
            local_SBL = feature_index_BL.reshape(s, b // s, length) - (jnp.arange(s) * (f // s))[:, None, None]
            local_SBL = sharding.constrain(local_SBL, ("act_batch", None, "act_length"))
            take = jax.vmap(lambda feats, index: jnp.take(feats, index, axis=0, mode="clip"))
            gathered_BLD = take(feats_SFD, local_SBL).reshape(b, length, d)
        return jnp.where(is_continuous_BL[..., None], gathered_BLD, x_BLD)

    def __call__(self, tokens_BL, positions_BL, segment_ids_BL, is_continuous_BL=None, feature_index_BL=None,
                 pixels_NHWC=None, cache=None, deterministic: bool = True, logits_at_B=None, return_hidden=False,
                 new_cache=None, feature_blocks: int = 1):
        """Returns (float32 logits [B, L, V] — [B, 1, V] at `logits_at_B` — , updated KV cache or None);
        with `return_hidden`, the normalised final hidden states instead of logits (see `head`);
        `new_cache=(length, dtype)`: a prefill, returning a new cache (see `ChameleonDecoder`)."""
        x_BLD = self.embed(tokens_BL, is_continuous_BL, feature_index_BL, pixels_NHWC, feature_blocks)
        return self.decoder(x_BLD, positions_BL, segment_ids_BL, cache, deterministic, logits_at_B, return_hidden,
                            new_cache)

    def head(self, hidden_BTD, stop: int | None = None):
        return self.decoder.head(hidden_BTD, stop)


# --- parameters without a model object --------------------------------------------------------
def init_variables(config: UniTokenConfig, rng: jax.Array):
    """Boxed variables (with logical axis metadata) of a freshly initialised model. (The parameters
    do not depend on the attention backend: init traces with the one every platform has.)"""
    model = UniToken(config.replace(attention="xla"))
    tokens = jnp.zeros((1, 1), jnp.int32)
    if config.vision is not None:
        pixels = jnp.zeros((1, config.vision.image_size, config.vision.image_size, config.vision.num_channels))
    if config.decoder is None:
        return model.init(rng, pixels, method=UniToken.vision_features)
    if config.vision is None:
        return model.init(rng, tokens, tokens, tokens)
    return model.init(rng, tokens, tokens, tokens, jnp.zeros((1, 1), bool), tokens, pixels)


@functools.lru_cache(maxsize=16)  # (a trace each: load, shardings and the mesh checks asked it several times)
def _abstract_variables(config: UniTokenConfig):
    cfg = config.replace(scan_layers=True, remat_policy="none")
    return jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))


def abstract_params(config: UniTokenConfig) -> dict:
    """Shapes and dtypes of the parameter tree (scanned layout), allocating nothing."""
    return nn.meta.unbox(_abstract_variables(config))["params"]


def param_logical_specs(config: UniTokenConfig):
    """Logical PartitionSpecs of the (scanned-layout) parameters."""
    return nn.get_partition_spec(_abstract_variables(config))["params"]


def param_shardings(config: UniTokenConfig, mesh):
    """NamedShardings of the parameters on `mesh`, by the logical rules table."""
    return sharding.logical_to_sharding(param_logical_specs(config), mesh)


def weight_specs(config: UniTokenConfig) -> list[tuple[tuple[str, ...], tuple[int, ...], Any]]:
    """(path, shape, mesh spec) of every weight of `config`'s model."""
    params = traverse_util.flatten_dict(abstract_params(config))
    return [(path, params[path].shape, sharding.logical_to_mesh_spec(tuple(spec)))
            for path, spec in traverse_util.flatten_dict(param_logical_specs(config)).items()]


def uneven_split(config: UniTokenConfig, mesh, specs=None) -> str | None:
    """None when `mesh` splits every weight of `config`'s model evenly, else a sentence naming the
    first that it does not (such a mesh does not compile)."""
    for path, shape, spec in specs if specs is not None else weight_specs(config):
        for dim, axes in zip(shape, spec):
            ways = sharding.mesh_ways(axes, mesh)
            if dim % ways:
                return (f"{'/'.join(path)} {tuple(shape)}: its {dim}-wide dimension does not split {ways} ways "
                        f"(mesh axes {axes})")
    return None


def unroll_params(params: dict, config: UniTokenConfig) -> dict:
    """Scanned-layout parameters -> the layout of a model built with `scan_layers=False`."""
    out = dict(params)
    for part, sub in (("decoder", config.decoder), ("vit", config.vision)):
        if part in out:
            tree = dict(out[part])
            tree.update(unstack_layers(tree.pop("layers"), sub.num_layers))
            out[part] = tree
    return out


def run_layout(params: dict, config: UniTokenConfig) -> dict:
    """Scanned-layout parameters (a model's, a train state's, a checkpoint's) -> the layout
    `UniToken(config)` applies: as they are with `scan_layers`, unrolled without (inside a jitted
    function the unrolling is slicing, and its gradient stacks the layers' gradients back)."""
    return params if config.scan_layers else unroll_params(params, config)


def cpu_decode_config(config: UniTokenConfig) -> UniTokenConfig:
    """The config of the model `cpu_decode_params` lays the parameters out for."""
    decoder = dataclasses.replace(config.decoder, qkv_embed_first=True) if config.decoder is not None else None
    return config.replace(scan_layers=False, decoder=decoder)


def cpu_decode_params(params: dict, config: UniTokenConfig, head_prefix: int | None = None) -> dict:
    """Scanned-layout parameters -> the layout a CPU's dots read without copying a weight at each
    step (the decode loop's own copy on CPU, for `cpu_decode_config(config)`): layers unrolled,
    the decoder's q/k/v kernels (and int8 scales) [embed, heads, head_dim], and with `head_prefix`
    the LM head's first `head_prefix` columns also stored apart (`layers.prefix_kernels`)."""
    out = unroll_params(params, config)
    if "decoder" not in out:
        return out
    decoder = dict(out["decoder"])
    for i in range(config.decoder.num_layers):
        layer = dict(decoder[f"layers_{i}"])
        attn = dict(layer["self_attn"])
        for name in ("q_proj", "k_proj", "v_proj"):
            proj = dict(attn[name])
            for leaf in ("kernel", "kernel_scale"):
                if leaf in proj:
                    proj[leaf] = jnp.transpose(proj[leaf], (1, 0, 2))
            attn[name] = proj
        layer["self_attn"] = attn
        decoder[f"layers_{i}"] = layer
    if head_prefix is not None:
        decoder["lm_head"] = prefix_kernels(decoder["lm_head"], head_prefix)
    out["decoder"] = decoder
    return out

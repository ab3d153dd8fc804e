"""The Chameleon decoder (as in transformers' `ChameleonModel` + `lm_head`), in Flax Linen.

One decoder layer is `Attention` (QK-norm before RoPE) and a SwiGLU `Mlp`, joined by RMSNorms in
the usual pre-norm order or, with `swin_norm`, in Chameleon's post-norm order. Layers are
stacked with `nn.scan` (parameters get a leading 'layers' axis) or unrolled (`layers_0`, ...),
and optionally rematerialised.

Packed rows: `segment_ids` says which sample each position belongs to (0 = padding) and
`positions` its RoPE position inside that sample; attention is causal within a segment only.

KV cache (for decoding): `init_cache` makes a static-shape cache. A call with a cache writes the
new keys/values of row b at slots [index[b], index[b] + T), lets query t of row b see slots
<= index[b] + t, and advances index[b] by the number of non-padding positions (segment_ids != 0)
of that row. The caller keeps index + T within the cache length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from unitoken_jax.models.config import DecoderConfig
from unitoken_jax.models.layers import HeadNorm, Projection, RMSNorm, dot_product_attention, rotary_embedding, segment_causal_mask
from unitoken_jax.sharding import check_names, constrain

Cache = dict[str, jax.Array]

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _kernel_init(axes):
    check_names(axes)
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes)


class Attention(nn.Module):
    config: DecoderConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BTD, positions_BT, mask_BTS, layer_cache: Cache | None, cache_index_B):
        cfg = self.config
        n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size

        def proj(shape, axes, equation, name):
            return Projection(shape, axes, equation, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        q_BTNH = proj((d, n, h), ("embed", "heads", "head_dim"), "BTD,DNH->BTNH", "q_proj")(x_BTD)
        k_BTKH = proj((d, k, h), ("embed", "kv_heads", "head_dim"), "BTD,DKH->BTKH", "k_proj")(x_BTD)
        v_BTKH = proj((d, k, h), ("embed", "kv_heads", "head_dim"), "BTD,DKH->BTKH", "v_proj")(x_BTD)

        groups = cfg.qk_norm_groups or n
        q_BTNH = HeadNorm(groups, cfg.qk_norm_eps, self.param_dtype, name="q_norm")(q_BTNH)
        k_groups = cfg.qk_norm_groups or k
        k_BTKH = HeadNorm(k_groups, cfg.qk_norm_eps, self.param_dtype, name="k_norm")(k_BTKH)

        q_BTNH = rotary_embedding(q_BTNH, positions_BT, cfg.rope_theta)
        k_BTKH = rotary_embedding(k_BTKH, positions_BT, cfg.rope_theta)

        new_cache = None
        if layer_cache is not None:
            write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, 0))
            k_BSKH = write(layer_cache["k"], k_BTKH, cache_index_B)
            v_BSKH = write(layer_cache["v"], v_BTKH, cache_index_B)
            new_cache = {"k": k_BSKH, "v": v_BSKH}
            k_BTKH, v_BTKH = k_BSKH.astype(self.dtype), v_BSKH.astype(self.dtype)
        q_BTNH = constrain(q_BTNH, ("act_batch", "act_length", "act_heads", None))
        out_BTNH = dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTS)
        out_BTD = proj((n, h, d), ("heads", "head_dim", "embed"), "BTNH,NHD->BTD", "o_proj")(out_BTNH)
        return out_BTD, new_cache


class Mlp(nn.Module):
    config: DecoderConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        dense = lambda features, axes, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_kernel_init(axes), name=name)
        gate_BTF = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x_BTD)
        up_BTF = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x_BTD)
        hidden_BTF = constrain(nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_length", "act_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden_BTF)


class DecoderLayer(nn.Module):
    """One layer; its call signature fits `nn.scan` (carry, per-layer cache, broadcast args...)."""

    config: DecoderConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BTD, layer_cache, positions_BT, mask_BTS, cache_index_B, deterministic: bool):
        cfg = self.config
        attn = Attention(cfg, self.dtype, self.param_dtype, name="self_attn")
        mlp = Mlp(cfg, self.dtype, self.param_dtype, name="mlp")
        norm_1 = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_layernorm")
        norm_2 = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")
        drop = nn.Dropout(cfg.dropout)

        if cfg.swin_norm:  # Chameleon's post-norm variant: normalise each branch's output.
            attn_out, new_cache = attn(x_BTD, positions_BT, mask_BTS, layer_cache, cache_index_B)
            x_BTD = x_BTD + drop(norm_1(attn_out), deterministic=deterministic)
            x_BTD = x_BTD + drop(norm_2(mlp(x_BTD)), deterministic=deterministic)
        else:
            attn_out, new_cache = attn(norm_1(x_BTD), positions_BT, mask_BTS, layer_cache, cache_index_B)
            x_BTD = x_BTD + drop(attn_out, deterministic=deterministic)
            x_BTD = x_BTD + drop(mlp(norm_2(x_BTD)), deterministic=deterministic)
        x_BTD = constrain(x_BTD, ("act_batch", "act_length", "act_embed"))
        return x_BTD, new_cache


def _layer_class(remat_policy: str, scanned: bool):
    if remat_policy == "none":
        return DecoderLayer
    # The last positional argument (deterministic) is a Python bool: keep it static.
    return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[remat_policy], prevent_cse=not scanned,
                    static_argnums=(-1,))


class ChameleonDecoder(nn.Module):
    """Token embeddings, the layer stack, the final norm and the untied `lm_head`."""

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=_kernel_init(("vocab", "embed")))
        layer_cls = _layer_class(self.remat_policy, self.scan_layers)
        if self.scan_layers:
            self.layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, self.param_dtype)
        else:
            self.layers = [layer_cls(cfg, self.dtype, self.param_dtype, name=f"layers_{i}")
                           for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.param_dtype)
        self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                kernel_init=_kernel_init(("embed", "vocab")))

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens_BT)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache: Cache | None = None, deterministic: bool = True,
                 logits_at_B: jax.Array | None = None):
        """Runs the layers on input embeddings; returns (float32 logits [B, T, V], updated cache or None).

        `logits_at_B` (an index per row) computes the logits of that one position only ([B, 1, V]):
        what a prefill needs, without a [B, T, V] array."""
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_length", "act_embed"))
        if cache is None:
            mask_BTS = segment_causal_mask(segment_ids_BT)
            index_B = layer_caches = None
        else:
            index_B = cache["index"]
            slots_S = jnp.arange(cache["k"].shape[2])
            query_slot_BT = index_B[:, None] + jnp.arange(x_BTD.shape[1])[None, :]
            mask_BTS = slots_S[None, None, :] <= query_slot_BT[:, :, None]
            layer_caches = {"k": cache["k"], "v": cache["v"]}

        if self.scan_layers:
            x_BTD, new_layer_caches = self.layers(x_BTD, layer_caches, positions_BT, mask_BTS, index_B, deterministic)
        else:
            per_layer = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if layer_caches is None else jax.tree.map(lambda a: a[i], layer_caches)
                x_BTD, new = layer(x_BTD, layer_cache, positions_BT, mask_BTS, index_B, deterministic)
                per_layer.append(new)
            new_layer_caches = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

        if logits_at_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_B[:, None, None].astype(jnp.int32), axis=1)
        logits_BTV = self.lm_head(self.norm(x_BTD)).astype(jnp.float32)
        logits_BTV = constrain(logits_BTV, ("act_batch", "act_length", "act_vocab"))
        if cache is None:
            return logits_BTV, None
        n_new_B = jnp.sum(segment_ids_BT != 0, axis=1).astype(index_B.dtype)
        return logits_BTV, {**new_layer_caches, "index": index_B + n_new_B}


def init_cache(config: DecoderConfig, batch: int, length: int, dtype=jnp.float32) -> Cache:
    """An empty static-shape KV cache: k/v [layers, B, length, kv_heads, head_dim], index [B]."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((batch,), jnp.int32)}


def stack_layers(layer_params: list[dict]) -> dict:
    """[{params of layer i}] -> {params with a leading layers axis} (the scanned layout)."""
    return jax.tree.map(lambda *a: jnp.stack(a), *layer_params)


def unstack_layers(stacked: dict, num_layers: int) -> dict:
    """The scanned layout -> {'layers_0': ..., 'layers_1': ...} (the unrolled layout)."""
    return {f"layers_{i}": jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers)}

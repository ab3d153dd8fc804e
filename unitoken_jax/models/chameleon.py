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
of that row. The caller keeps index + T within the cache length (a write past the end is clamped
back into it, as dynamic_update_slice does).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from unitoken_jax.models.attention import causal_attention
from unitoken_jax.models.config import DecoderConfig
from unitoken_jax.models.layers import (
    HeadNorm,
    Projection,
    RMSNorm,
    apply_rope,
    attend,
    attention_dtype,
    attend_filled,
    kernel_product,
    rope_tables,
)
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
    quantize: str = "none"
    attention: str = "auto"  # the backend of the full-row path (see `unitoken_jax.models.attention`)
    attention_block: int = 128
    lora: Any = None  # a LoraConfig (adapters on the projections it targets), or None

    @nn.compact
    def __call__(self, x_BTD, rope, mask, cache: Cache | None, layer_index, cache_index_B,
                 return_kv: bool = False):
        """(output, updated cache); with `return_kv` (no cache) also this layer's keys and values
        [B, K, T, H], for a prefill to make a cache of. `mask`: with a cache, bool [B, T, S] (which
        slots each query sees); without, the segment ids [B, T] of the packed rows. `rope`: the
        positions' (cos, sin) tables, `layers.rope_tables`."""
        cfg = self.config
        n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size

        def proj(shape, axes, equation, name):
            return Projection(shape, axes, equation, dtype=self.dtype, param_dtype=self.param_dtype,
                              quantize=self.quantize, lora=self.lora, name=name)

        # q/k/v kernels are [heads, embed, head_dim]: the order TPU's dots want (an [embed, heads,
        # head_dim] kernel is copied whole, every layer, into it before each compiled decode loop);
        # a CPU's dots want [embed, heads, head_dim], which the CPU decode loop's copy holds.
        def head_proj(heads, axis, letter, name):
            if cfg.qkv_embed_first:
                shape, axes, kernel = (d, heads, h), ("embed", axis, "head_dim"), f"D{letter}H"
            else:
                shape, axes, kernel = (heads, d, h), (axis, "embed", "head_dim"), f"{letter}DH"
            return proj(shape, axes, f"BTD,{kernel}->BT{letter}H", name)(x_BTD)

        q_BTNH = head_proj(n, "heads", "N", "q_proj")
        k_BTKH = head_proj(k, "kv_heads", "K", "k_proj")
        v_BTKH = head_proj(k, "kv_heads", "K", "v_proj")

        groups = cfg.qk_norm_groups or n
        q_BTNH = HeadNorm(groups, cfg.qk_norm_eps, self.param_dtype, name="q_norm")(q_BTNH)
        k_groups = cfg.qk_norm_groups or k
        k_BTKH = HeadNorm(k_groups, cfg.qk_norm_eps, self.param_dtype, name="k_norm")(k_BTKH)

        q_BTNH = apply_rope(q_BTNH, rope)
        k_BTKH = apply_rope(k_BTKH, rope)

        if cache is not None:
            # Write this layer's new keys/values in place (one dynamic-update-slice per row: XLA
            # updates those in place, while a scatter with per-row indices becomes a loop over the
            # whole cache on CPU), then read the layer's keys and values.
            k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
            if is_per_layer(cache):  # a buffer per layer (unrolled layers): the dots read it as it is
                k_BKSH = _write_rows(cache["k"][layer_index], k_BKTH, cache_index_B)
                v_BKSH = _write_rows(cache["v"][layer_index], v_BKTH, cache_index_B)
                cache = {"k": _replace(cache["k"], layer_index, k_BKSH),
                         "v": _replace(cache["v"], layer_index, v_BKSH)}
            else:
                # the whole stacked cache rides the scan's carry; the layer's slice is read out of it
                # (a copy on CPU, which is why decoding there unrolls the layers: `DecodeLoop`), or
                # with `cache_block` read in blocks, the filled ones only (`attend_filled`)
                cache = {"k": _write_rows(cache["k"], k_BKTH, cache_index_B, layer_index),
                         "v": _write_rows(cache["v"], v_BKTH, cache_index_B, layer_index)}
                k_BKSH = v_BKSH = None  # read below, by `attend_filled` or out of the stack
                if not cfg.cache_block:
                    k_BKSH = jax.lax.dynamic_index_in_dim(cache["k"], layer_index, 0, keepdims=False)
                    v_BKSH = jax.lax.dynamic_index_in_dim(cache["v"], layer_index, 0, keepdims=False)
            if k_BKSH is not None:
                work = attention_dtype(self.dtype)
                k_BKSH, v_BKSH = k_BKSH.astype(work), v_BKSH.astype(work)
        q_BTNH = constrain(q_BTNH, ("act_batch", "act_length", "act_heads", None))
        if cache is None:
            out_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, mask, backend=self.attention,
                                        block=self.attention_block)
        elif k_BKSH is None:
            # slots past the furthest query of any row are seen by none
            limit = jnp.max(cache_index_B) + x_BTD.shape[1]
            out_BTNH = attend_filled(q_BTNH, cache["k"], cache["v"], layer_index, mask, limit, cfg.cache_block)
        else:
            out_BTNH = attend(q_BTNH, k_BKSH, v_BKSH, mask)
        out_BTD = proj((n, h, d), ("heads", "head_dim", "embed"), "BTNH,NHD->BTD", "o_proj")(out_BTNH)
        if return_kv:
            return out_BTD, cache, (k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3))
        return out_BTD, cache


class Mlp(nn.Module):
    config: DecoderConfig
    dtype: Any
    param_dtype: Any
    quantize: str = "none"
    lora: Any = None

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        d, f = cfg.hidden_size, cfg.intermediate_size

        def dense(shape, axes, equation, name):
            return Projection(shape, axes, equation, dtype=self.dtype, param_dtype=self.param_dtype,
                              quantize=self.quantize, lora=self.lora, name=name)

        gate_BTF = dense((d, f), ("embed", "mlp"), "BTD,DF->BTF", "gate_proj")(x_BTD)
        up_BTF = dense((d, f), ("embed", "mlp"), "BTD,DF->BTF", "up_proj")(x_BTD)
        hidden_BTF = constrain(nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_length", "act_mlp"))
        return dense((f, d), ("mlp", "embed"), "BTF,FD->BTD", "down_proj")(hidden_BTF)


class DecoderLayer(nn.Module):
    """One layer; its call signature fits `nn.scan`: carry (hidden, whole KV cache or None), the
    layer's index (scanned), then broadcast arguments. Its per-layer output is None, or with
    `return_kv` the layer's (keys, values): scanned, they stack into a prefill's cache."""

    config: DecoderConfig
    dtype: Any
    param_dtype: Any
    quantize: str = "none"
    attention: str = "auto"
    attention_block: int = 128
    lora: Any = None

    @nn.compact
    def __call__(self, carry, layer_index, rope, mask, cache_index_B, deterministic: bool,
                 return_kv: bool = False):
        x_BTD, cache = carry
        cfg = self.config
        attn = Attention(cfg, self.dtype, self.param_dtype, self.quantize, self.attention, self.attention_block,
                         self.lora, name="self_attn")
        mlp = Mlp(cfg, self.dtype, self.param_dtype, self.quantize, self.lora, name="mlp")
        norm_1 = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_layernorm")
        norm_2 = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")
        drop = nn.Dropout(cfg.dropout)

        kv = None
        if cfg.swin_norm:  # Chameleon's post-norm variant: normalise each branch's output.
            attn_out, cache, *kv = attn(x_BTD, rope, mask, cache, layer_index, cache_index_B, return_kv)
            x_BTD = x_BTD + drop(norm_1(attn_out), deterministic=deterministic)
            x_BTD = x_BTD + drop(norm_2(mlp(x_BTD)), deterministic=deterministic)
        else:
            attn_out, cache, *kv = attn(norm_1(x_BTD), rope, mask, cache, layer_index, cache_index_B,
                                        return_kv)
            x_BTD = x_BTD + drop(attn_out, deterministic=deterministic)
            x_BTD = x_BTD + drop(mlp(norm_2(x_BTD)), deterministic=deterministic)
        x_BTD = constrain(x_BTD, ("act_batch", "act_length", "act_embed"))
        return (x_BTD, cache), (kv[0] if kv else None)


def _layer_class(remat_policy: str, scanned: bool):
    if remat_policy == "none":
        return DecoderLayer
    # `deterministic` and `return_kv` are Python bools: keep them static. Flax counts `self` as
    # argument 0, so they are arguments 6 and 7 (self, carry, layer_index, rope, mask,
    # cache_index, deterministic, return_kv); a negative index does not count from the end here.
    return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[remat_policy], prevent_cse=not scanned,
                    static_argnums=(6, 7))


class ChameleonDecoder(nn.Module):
    """Token embeddings, the layer stack, the final norm and the untied `lm_head`."""

    config: DecoderConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    quantize: str = "none"  # "int8": every projection and the LM head hold int8 kernels (inference)
    attention: str = "auto"  # the full-row attention's backend and block (`unitoken_jax.models.attention`)
    attention_block: int = 128
    lora: Any = None  # a LoraConfig: low-rank adapters beside the kernels it targets (fine-tuning)

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
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, self.param_dtype, self.quantize, self.attention, self.attention_block, self.lora)
        else:
            self.layers = [layer_cls(cfg, self.dtype, self.param_dtype, self.quantize, self.attention,
                                     self.attention_block, self.lora, name=f"layers_{i}")
                           for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.param_dtype)
        self.lm_head = LMHead(cfg.vocab_size, self.dtype, self.param_dtype, self.quantize, self.lora)

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens_BT)

    def head(self, hidden_BTD: jax.Array, stop: int | None = None) -> jax.Array:
        """float32 logits of ids [0, stop) (all by default) for the normalised final hidden states."""
        return self.lm_head(hidden_BTD, stop).astype(jnp.float32)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache: Cache | None = None, deterministic: bool = True,
                 logits_at_B: jax.Array | None = None, return_hidden: bool = False,
                 new_cache: tuple[int, Any] | None = None):
        """Runs the layers on input embeddings; returns (float32 logits [B, T, V], updated cache or None).

        `logits_at_B` (an index per row) computes the logits of that one position only ([B, 1, V]):
        what a prefill needs, without a [B, T, V] array. `return_hidden` gives the normalised final
        hidden states instead of logits (for `head`). `new_cache=(length, dtype)` (with no
        `cache`) is a prefill: the call runs as a full forward and returns a cache of `length`
        slots holding these positions' keys and values, which the layers hand out as they go (so
        no cache-sized buffer is carried through the layers and copied)."""
        x_BTD = constrain(x_BTD.astype(self.dtype), ("act_batch", "act_length", "act_embed"))
        if cache is None:
            mask = segment_ids_BT  # the attention builds what it needs from the segments
            index_B = layer_caches = None
        else:
            if new_cache is not None:
                raise ValueError("new_cache starts a cache: it cannot be given with one")
            index_B = cache["index"]
            slots_S = jnp.arange(cache_length(cache))
            query_slot_BT = index_B[:, None] + jnp.arange(x_BTD.shape[1])[None, :]
            mask = slots_S[None, None, :] <= query_slot_BT[:, :, None]
            layer_caches = _constrain_cache(cache)

        carry = (x_BTD, layer_caches)
        collect = new_cache is not None
        rope = rope_tables(positions_BT, self.config.head_dim, self.config.rope_theta)
        if self.scan_layers:
            layer_ids = jnp.arange(self.config.num_layers)
            carry, kv = self.layers(carry, layer_ids, rope, mask, index_B, deterministic, collect)
        else:
            per_layer = []
            for i, layer in enumerate(self.layers):
                carry, layer_kv = layer(carry, i, rope, mask, index_B, deterministic, collect)
                per_layer.append(layer_kv)
        x_BTD, new_layer_caches = carry
        if collect:  # the T positions' keys and values -> the first T of `length` slots
            index_B = jnp.zeros((x_BTD.shape[0],), jnp.int32)
            length, dtype = new_cache
            if length < x_BTD.shape[1]:
                raise ValueError(f"a cache of {length} slots cannot hold a prompt of {x_BTD.shape[1]} positions")
            pad = ((0, 0), (0, 0), (0, length - x_BTD.shape[1]), (0, 0))
            if self.scan_layers:  # kv: stacked [layers, B, K, T, H]
                pad = ((0, 0),) + pad
                new_layer_caches = {"k": jnp.pad(kv[0].astype(dtype), pad), "v": jnp.pad(kv[1].astype(dtype), pad)}
            else:  # a buffer per layer, as unrolled layers read it
                new_layer_caches = {name: tuple(jnp.pad(layer_kv[i].astype(dtype), pad) for layer_kv in per_layer)
                                    for i, name in enumerate(("k", "v"))}
        if new_layer_caches is not None:
            new_layer_caches = _constrain_cache(new_layer_caches)

        if logits_at_B is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_B[:, None, None].astype(jnp.int32), axis=1)
        if return_hidden:
            out = self.norm(x_BTD)
        else:
            out = self.head(self.norm(x_BTD))
            out = constrain(out, ("act_batch", "act_length", "act_vocab"))
        if new_layer_caches is None:
            return out, None
        n_new_B = jnp.sum(segment_ids_BT != 0, axis=1).astype(index_B.dtype)
        return out, {**new_layer_caches, "index": index_B + n_new_B}


_CACHE_AXES = (None, "act_batch", "act_kv_heads", "act_cache_length", None)  # [layers, B, K, S, H]


def _constrain_cache(cache: Cache) -> Cache:
    """Keys and values stay sharded as the attention reads them (rows over the data axes, KV heads
    over 'tensor'), so the loop never gathers or reshards the cache between steps."""
    if is_per_layer(cache):
        return {name: tuple(constrain(a, _CACHE_AXES[1:]) for a in cache[name]) for name in ("k", "v")}
    return {"k": constrain(cache["k"], _CACHE_AXES), "v": constrain(cache["v"], _CACHE_AXES)}


def is_per_layer(cache: Cache) -> bool:
    """Whether the cache holds a buffer per layer (k/v: tuples of [B, K, S, H], what unrolled
    layers make and read) or one stacked buffer (k/v: [layers, B, K, S, H], what scanned ones do)."""
    return isinstance(cache["k"], (tuple, list))


def cache_length(cache: Cache) -> int:
    """The number of slots a row of the cache has."""
    return (cache["k"][0] if is_per_layer(cache) else cache["k"]).shape[-2]


def _write_rows(buffer, new_BKTH, index_B, layer_index=None):
    """Row b of `new_BKTH` written at slot index_B[b] of a [B, K, S, H] buffer (or of layer
    `layer_index` of a stacked [layers, B, K, S, H] one), one dynamic-update-slice per row."""
    lead = () if layer_index is None else (layer_index,)
    for b in range(new_BKTH.shape[0]):
        row = new_BKTH[None, b:b + 1] if lead else new_BKTH[b:b + 1]
        buffer = jax.lax.dynamic_update_slice(buffer, row.astype(buffer.dtype), (*lead, b, 0, index_B[b], 0))
    return buffer


def _replace(buffers: tuple, i: int, new) -> tuple:
    return tuple(new if j == i else b for j, b in enumerate(buffers))


class LMHead(nn.Module):
    """The untied output projection; `stop` computes only the logits of ids [0, stop) (a decode
    step that may only emit image codes needs 8,196 of the 65,536 columns)."""

    vocab_size: int
    dtype: Any
    param_dtype: Any
    quantize: str = "none"
    lora: Any = None

    @nn.compact
    def __call__(self, x_BTD, stop: int | None = None):
        return kernel_product(self, x_BTD, "BTD,DV->BTV", (x_BTD.shape[-1], self.vocab_size), ("embed", "vocab"),
                              dtype=self.dtype, param_dtype=self.param_dtype, quantize=self.quantize, stop=stop,
                              lora=self.lora)


def init_cache(config: DecoderConfig, batch: int, length: int, dtype=jnp.float32, per_layer: bool = False) -> Cache:
    """An empty static-shape KV cache: k/v [layers, B, kv_heads, length, head_dim] (the layout the
    attention dots read directly), or with `per_layer` a tuple of [B, kv_heads, length, head_dim]
    buffers (what a decoder with unrolled layers makes and reads); index [B]."""
    shape = (batch, config.num_kv_heads, length, config.head_dim)
    if per_layer:
        kv = {name: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)) for name in ("k", "v")}
    else:
        kv = {name: jnp.zeros((config.num_layers, *shape), dtype) for name in ("k", "v")}
    return {**kv, "index": jnp.zeros((batch,), jnp.int32)}


def stack_layers(layer_params: list[dict]) -> dict:
    """[{params of layer i}] -> {params with a leading layers axis} (the scanned layout)."""
    return jax.tree.map(lambda *a: jnp.stack(a), *layer_params)


def unstack_layers(stacked: dict, num_layers: int) -> dict:
    """The scanned layout -> {'layers_0': ..., 'layers_1': ...} (the unrolled layout)."""
    return {f"layers_{i}": jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers)}

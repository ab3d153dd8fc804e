"""Building blocks shared by the decoder and the vision tower.

Shapes are spelled in names: B batch, T query length, S key length, D model width, N query
heads, K key/value heads, G query heads per key/value head, H head dim, F MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from unitoken_jax.sharding import check_names

Dtype = jnp.dtype


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes):
    """`module.param` whose value carries logical axis names (checked against the rules table)."""
    check_names(axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, statistics in float32, output in the input's dtype."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x_BTD.shape[-1],), self.param_dtype, ("norm",))
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x_BTD.dtype) * x.astype(x_BTD.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias over the last axis, statistics in float32."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), self.param_dtype, ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), self.param_dtype, ("norm",))
        y = _normalize(x, self.eps)
        return (y * scale + bias).astype(x.dtype)


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class HeadNorm(nn.Module):
    """Chameleon's QK-norm: LayerNorm over head_dim, then a per-group scale and bias.

    The parameters have `groups` rows; row g serves heads [g*n/groups, (g+1)*n/groups), the
    repeat-interleave of the Lumina-mGPT checkpoints. With groups == heads every head has its own.
    """

    groups: int
    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTNH: jax.Array) -> jax.Array:
        n, h = x_BTNH.shape[-2:]
        axes = ("qk_norm_groups", "head_dim")
        scale = param_with_axes(self, "scale", nn.initializers.ones, (self.groups, h), self.param_dtype, axes)
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.groups, h), self.param_dtype, axes)
        per_group = n // self.groups
        scale_NH = jnp.repeat(scale, per_group, axis=0)
        bias_NH = jnp.repeat(bias, per_group, axis=0)
        y = _normalize(x_BTNH, self.eps) * scale_NH + bias_NH
        return y.astype(x_BTNH.dtype)


def rotary_embedding(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """RoPE in the "rotate half" convention of transformers' Llama/Chameleon (angles in float32)."""
    h = x_BTNH.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)[:, :, None, :]
    cos = jnp.cos(angles_BTH).astype(x_BTNH.dtype)
    sin = jnp.sin(angles_BTH).astype(x_BTNH.dtype)
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTNH * cos + rotated * sin


def dot_product_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Grouped-query attention; logits scaled by 1/sqrt(H), softmax in float32."""
    return attend(q_BTNH, k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3), mask_BTS)


def attend(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """`dot_product_attention` with keys and values laid out [B, K, S, H], the KV cache's layout:
    the dots read them as they are, with no transposed copy of the cache."""
    b, t, n, h = q_BTNH.shape
    k = k_BKSH.shape[1]
    q_BKGTH = q_BTNH.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    logits_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH) * (h**-0.5)
    logits_BKGTS = logits_BKGTS.astype(jnp.float32)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BKSH.dtype)
    out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS, v_BKSH)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


CAUSAL_BLOCK = 128


def causal_dot_product_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, mask_BTS: jax.Array,
                                 block: int = CAUSAL_BLOCK) -> jax.Array:
    """`dot_product_attention` for a causal `mask_BTS` (a full sequence, no cache): queries go in
    blocks of `block`, each against the keys up to its own end only, so the blocks above the
    diagonal, all masked, are never computed (10 of 16 block pairs at 512 positions, forward and
    backward). The mask still applies inside the computed blocks (segments, causality)."""
    t = q_BTNH.shape[1]
    if t != k_BTKH.shape[1] or t % block or t <= block:
        return dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTS)
    k_BKSH, v_BKSH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
    outs = []
    for i in range(t // block):
        end = (i + 1) * block
        outs.append(attend(q_BTNH[:, i * block:end], k_BKSH[:, :, :end], v_BKSH[:, :, :end],
                           mask_BTS[:, i * block:end, :end]))
    return jnp.concatenate(outs, axis=1)


def segment_causal_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """Causal attention restricted to tokens of the same packed segment: mask[b, t, s]."""
    t = segment_ids_BT.shape[1]
    causal_TS = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return causal_TS[None] & same_BTS


class Projection(nn.Module):
    """`einsum(equation, x, kernel)` (+ bias) with a multi-dimensional, logically named kernel.

    Used instead of `nn.DenseGeneral`, which initialises a flattened 2-D kernel and so cannot
    carry per-dimension axis names.
    """

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    equation: str  # e.g. "BTD,DNH->BTNH"
    bias_axes: tuple[str, ...] | None = None  # names of the trailing kernel dims the bias covers
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = param_with_axes(self, "kernel", nn.initializers.normal(stddev=0.02), self.kernel_shape,
                                 self.param_dtype, self.kernel_axes)
        y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_axes is not None:
            shape = self.kernel_shape[len(self.kernel_shape) - len(self.bias_axes):]
            bias = param_with_axes(self, "bias", nn.initializers.zeros, shape, self.param_dtype, self.bias_axes)
            y = y + bias.astype(self.dtype)
        return y

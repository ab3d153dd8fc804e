"""The SigLIP vision tower (transformers' `SiglipVisionTransformer` without its pooling head) and
the adapter that maps its features into the decoder's embedding space.

Images are NHWC. For an input size other than the trained one the position embeddings are
resized with the same bicubic kernel as `torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)`, which is what transformers' `interpolate_pos_encoding` uses.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unitoken_jax.models.config import VisionConfig
from unitoken_jax.models.layers import LayerNorm, Projection, dot_product_attention
from unitoken_jax.sharding import check_names, constrain


def _init(init, axes):
    check_names(axes)
    return nn.with_logical_partitioning(init, axes)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of 1-D bicubic resampling as torch does it (A = -0.75, half-pixel
    centres, border samples clamped, no antialiasing)."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        base = int(np.floor(src))
        t = src - base
        for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[i, min(max(base + offset, 0), in_size - 1)] += w
    return m


def resize_position_embeddings(pos_PD: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
    """[side*side, D] trained position embeddings -> [grid_h*grid_w, D]."""
    side = int(round(np.sqrt(pos_PD.shape[0])))
    if side * side != pos_PD.shape[0]:
        raise ValueError(f"{pos_PD.shape[0]} position embeddings do not form a square grid")
    if (grid_h, grid_w) == (side, side):
        return pos_PD
    rows = jnp.asarray(bicubic_matrix(side, grid_h), jnp.float32)
    cols = jnp.asarray(bicubic_matrix(side, grid_w), jnp.float32)
    grid_hwD = pos_PD.astype(jnp.float32).reshape(side, side, -1)
    out = jnp.einsum("ih,jw,hwD->ijD", rows, cols, grid_hwD, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(grid_h * grid_w, -1).astype(pos_PD.dtype)


class VisionLayer(nn.Module):
    config: VisionConfig
    dtype: Any
    param_dtype: Any
    quantize: str = "none"
    lora: Any = None  # a LoraConfig (adapters on every projection when it targets "vision")

    @nn.compact
    def __call__(self, x_BTD, _unused=None):
        cfg = self.config
        n, h = cfg.num_heads, cfg.hidden_size // cfg.num_heads

        d, f = cfg.hidden_size, cfg.intermediate_size

        def proj(shape, axes, equation, bias_axes, name):
            return Projection(shape, axes, equation, bias_axes, self.dtype, self.param_dtype, self.quantize,
                              lora=self.lora, name=name)

        y = LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="layer_norm1")(x_BTD)
        head_axes = ("embed", "heads", "head_dim")
        q_BTNH = proj((d, n, h), head_axes, "BTD,DNH->BTNH", head_axes[1:], "q_proj")(y)
        k_BTNH = proj((d, n, h), head_axes, "BTD,DNH->BTNH", head_axes[1:], "k_proj")(y)
        v_BTNH = proj((d, n, h), head_axes, "BTD,DNH->BTNH", head_axes[1:], "v_proj")(y)
        t = x_BTD.shape[1]
        full_mask = jnp.ones((x_BTD.shape[0], t, t), jnp.bool_)
        attn_BTNH = dot_product_attention(q_BTNH, k_BTNH, v_BTNH, full_mask)
        x_BTD = x_BTD + proj((n, h, d), ("heads", "head_dim", "embed"), "BTNH,NHD->BTD", ("embed",),
                             "out_proj")(attn_BTNH)

        y = LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="layer_norm2")(x_BTD)
        y = proj((d, f), ("embed", "mlp"), "BTD,DF->BTF", ("mlp",), "fc1")(y)
        y = nn.gelu(y, approximate=True)
        x_BTD = x_BTD + proj((f, d), ("mlp", "embed"), "BTF,FD->BTD", ("embed",), "fc2")(y)
        return constrain(x_BTD, ("act_batch", "act_length", "act_embed")), None


class SiglipVisionTower(nn.Module):
    """pixels [N, H, W, 3] (already normalised) -> last hidden state [N, (H/p)*(W/p), D]."""

    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: bool = False
    quantize: str = "none"  # "int8": the layers' projections hold int8 kernels (the patch conv stays float)
    lora: Any = None

    @nn.compact
    def __call__(self, pixels_NHWC: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        n_img, height, width, _ = pixels_NHWC.shape
        if height < p or width < p:
            raise ValueError(f"image size {height}x{width} is smaller than one {p}x{p} patch")
        # A stride-p VALID convolution, as in transformers: 384 px with 14-px patches gives 27
        # patches a side and ignores the last 6 pixels.
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          kernel_init=_init(nn.initializers.lecun_normal(), ("patch_h", "patch_w", "channels", "embed")),
                          bias_init=_init(nn.initializers.zeros, ("embed",)), name="patch_embedding")(
                              pixels_NHWC.astype(self.dtype))
        grid_h, grid_w = height // p, width // p
        x_BTD = patches.reshape(n_img, grid_h * grid_w, cfg.hidden_size)
        pos_PD = self.param("position_embedding",
                            _init(nn.initializers.normal(0.02), ("positions", "embed")),
                            (cfg.num_positions, cfg.hidden_size), self.param_dtype)
        x_BTD = x_BTD + resize_position_embeddings(pos_PD, grid_h, grid_w).astype(self.dtype)[None]
        x_BTD = constrain(x_BTD, ("act_batch", "act_length", "act_embed"))

        layer_cls = nn.remat(VisionLayer, prevent_cse=not self.scan_layers) if self.remat else VisionLayer
        if self.scan_layers:
            x_BTD, _ = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                               length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(
                                   cfg, self.dtype, self.param_dtype, self.quantize, self.lora, name="layers")(x_BTD,
                                                                                                              None)
        else:
            for i in range(cfg.num_layers):
                x_BTD, _ = layer_cls(cfg, self.dtype, self.param_dtype, self.quantize, self.lora,
                                     name=f"layers_{i}")(x_BTD)
        return LayerNorm(cfg.layer_norm_eps, self.param_dtype, name="post_layernorm")(x_BTD)


class Adapter(nn.Module):
    """Linear -> GELU (exact) -> Linear, from the vision width to the decoder width."""

    out_features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    quantize: str = "none"
    lora: Any = None

    @nn.compact
    def __call__(self, x):
        def dense(d_in, axes, name):
            return Projection((d_in, self.out_features), axes, "...D,DF->...F", axes[1:], self.dtype,
                              self.param_dtype, self.quantize, nn.initializers.lecun_normal(), lora=self.lora,
                              name=name)

        x = dense(x.shape[-1], ("embed", "mlp"), "fc1")(x)
        x = nn.gelu(x, approximate=False)
        return dense(self.out_features, ("mlp", "embed"), "fc2")(x)

"""Chameleon's VQ-GAN image tokenizer (the taming-transformers layout) in Flax Linen, NHWC.

    codes = VQGAN(cfg).apply(v, pixels, method=VQGAN.encode)    # [N, H, W, 3] in [-1, 1] -> [N, h, w]
    pixels = VQGAN(cfg).apply(v, codes, method=VQGAN.decode)    # [N, h, w] -> [N, H, W, 3]

h = H / 2**(len(ch_mult) - 1): 512 px -> 32 x 32 codes for the released (1, 1, 2, 2, 4).
The parameters are small (~70 M) and replicated; big batches are split over the mesh's data axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Defaults: Meta Chameleon's vqgan.yaml."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 512  # only used to decide where attn_resolutions apply
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 8192
    double_z: bool = False
    mid_attention: bool = True  # taming's mid-block always has an attention block

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> "VQGANConfig":
        if self.ch < 1 or not self.ch_mult:
            raise ValueError("ch and ch_mult must be positive")
        # (each was a ZeroDivisionError or a JAX TypeError from inside the model)
        for name in ("in_channels", "out_channels", "z_channels", "embed_dim", "n_embed", "num_res_blocks", *(
                () if all(isinstance(m, int) and m >= 1 for m in self.ch_mult) else ("ch_mult",))):
            value = getattr(self, name)
            if name == "ch_mult" or isinstance(value, bool) or not isinstance(value, int) or value < (
                    0 if name == "num_res_blocks" else 1):
                raise ValueError(f"VQ-GAN config {name}={value!r}: must be a whole number, at least "
                                 f"{0 if name == 'num_res_blocks' else 1}{' each' if name == 'ch_mult' else ''}")
        return self


def _conv(features, kernel=3, stride=1, padding=1, name=None):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   name=name)


def _norm(name, x):
    """GroupNorm with taming's 32 groups; a channel count that is not a multiple of 32 (small
    tokenizers trained here) gets gcd(32, channels) groups."""
    groups = math.gcd(32, x.shape[-1])
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)(x)


class ResnetBlock(nn.Module):
    out_channels: int

    @nn.compact
    def __call__(self, x):
        h = _conv(self.out_channels, name="conv1")(nn.swish(_norm("norm1", x)))
        h = _conv(self.out_channels, name="conv2")(nn.swish(_norm("norm2", h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, kernel=1, padding=0, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of the feature map, 1x1-conv projections."""

    @nn.compact
    def __call__(self, x):
        n, hgt, wid, c = x.shape
        h = _norm("norm", x)
        q, k, v = (_conv(c, 1, padding=0, name=name)(h).reshape(n, hgt * wid, c) for name in ("q", "k", "v"))
        weights = jax.nn.softmax(jnp.einsum("NTC,NSC->NTS", q, k) * (c ** -0.5), axis=-1)
        h = jnp.einsum("NTS,NSC->NTC", weights, v).reshape(n, hgt, wid, c)
        return x + _conv(c, 1, padding=0, name="proj_out")(h)


class Downsample(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # taming pads right/bottom only
        return _conv(x.shape[-1], stride=2, padding=0, name="conv")(x)


class Upsample(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour x2
        return _conv(x.shape[-1], name="conv")(x)


class _Level(nn.Module):
    """One resolution level: res blocks (each optionally followed by attention)."""

    out_channels: int
    num_blocks: int
    attention: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, name=f"block_{j}")(x)
            if self.attention:
                x = AttnBlock(name=f"attn_{j}")(x)
        return x


class _Mid(nn.Module):
    channels: int
    attention: bool

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.channels, name="block_1")(x)
        if self.attention:
            x = AttnBlock(name="attn_1")(x)
        return ResnetBlock(self.channels, name="block_2")(x)


class VQGANEncoder(nn.Module):
    config: VQGANConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = _conv(cfg.ch, name="conv_in")(x)
        res = cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            h = _Level(cfg.ch * mult, cfg.num_res_blocks, res in cfg.attn_resolutions, name=f"down_{i}")(h)
            if i != len(cfg.ch_mult) - 1:
                h = Downsample(name=f"downsample_{i}")(h)
                res //= 2
        h = _Mid(h.shape[-1], cfg.mid_attention, name="mid")(h)
        out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        return _conv(out, name="conv_out")(nn.swish(_norm("norm_out", h)))


class VQGANDecoder(nn.Module):
    config: VQGANConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        h = _conv(cfg.ch * cfg.ch_mult[-1], name="conv_in")(z)
        h = _Mid(h.shape[-1], cfg.mid_attention, name="mid")(h)
        res = cfg.resolution // cfg.downsample_factor
        for i in reversed(range(len(cfg.ch_mult))):
            h = _Level(cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions,
                       name=f"up_{i}")(h)
            if i != 0:
                h = Upsample(name=f"upsample_{i}")(h)
                res *= 2
        return _conv(cfg.out_channels, name="conv_out")(nn.swish(_norm("norm_out", h)))


class VQGAN(nn.Module):
    config: VQGANConfig

    def setup(self):
        cfg = self.config
        self.encoder = VQGANEncoder(cfg)
        self.decoder = VQGANDecoder(cfg)
        self.quant_conv = nn.Conv(cfg.embed_dim, (1, 1))
        self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1))
        self.codebook = self.param("codebook", nn.initializers.uniform(2.0 / cfg.n_embed), (cfg.n_embed, cfg.embed_dim))

    def latents(self, pixels_NHWC: jax.Array) -> jax.Array:
        """The continuous latents before quantisation, [N, h, w, embed_dim]."""
        return self.quant_conv(self.encoder(pixels_NHWC))

    def encode(self, pixels_NHWC: jax.Array) -> jax.Array:
        """Nearest-code indices [N, h, w] (int32) for pixels in [-1, 1]."""
        return nearest_code(self.latents(pixels_NHWC), self.codebook)

    def decode(self, codes_Nhw: jax.Array) -> jax.Array:
        """Pixels [N, H, W, 3] (about [-1, 1]; not clipped) for code indices [N, h, w]."""
        z = jnp.take(self.codebook, codes_Nhw, axis=0)
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, pixels_NHWC):
        return self.decode(self.encode(pixels_NHWC))

    def train_forward(self, pixels_NHWC: jax.Array):
        """For training: (reconstruction, latents z, their nearest codebook vectors e, code indices).
        The decoder sees z + stop_gradient(e - z) (the straight-through estimator)."""
        z = self.latents(pixels_NHWC)
        codes = nearest_code(z, self.codebook)
        e = jnp.take(self.codebook, codes, axis=0)
        z_q = z + jax.lax.stop_gradient(e - z)
        return self.decoder(self.post_quant_conv(z_q)), z, e, codes


def nearest_code(z_NhwE: jax.Array, codebook_KE: jax.Array) -> jax.Array:
    """argmin_k |z - e_k|^2, computed as |z|^2 + |e|^2 - 2 z.e like the reference, in full float32
    (a TPU's default one-pass bfloat16 product would pick another code where two are close)."""
    z = z_NhwE.astype(jnp.float32)
    e = codebook_KE.astype(jnp.float32)
    d = (jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(e * e, axis=-1)
         - 2.0 * jnp.einsum("NhwE,KE->NhwK", z, e, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def init_params(config: VQGANConfig, rng: jax.Array, image_size: int = 64) -> Any:
    pixels = jnp.zeros((1, image_size, image_size, config.in_channels))
    return VQGAN(config).init(rng, pixels)["params"]

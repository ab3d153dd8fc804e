"""The image tokenizer users call: pictures <-> VQ code grids, batched and jit-compiled.

It sits beside `unitoken_jax.model` (the user-facing objects that read checkpoints), not in
`tokenizer/`, which holds the host-side tokenization that needs no model weights.

    vq = VQTokenizer.from_meta("vqgan.ckpt")            # or .from_hf(dir) (encoder only)
    codes = vq.encode_images([pil_a, pil_b])            # [2, 32, 32] int32 (512 px crops)
    pictures = vq.decode_to_pil(codes)                  # [PIL.Image, PIL.Image]
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from unitoken_jax.convert import vqgan as vq_io
from unitoken_jax.convert.files import SIDECAR, is_orbax_checkpoint
from unitoken_jax.models.vqgan import VQGAN, VQGANConfig
from unitoken_jax.tokenizer import images as image_io


@functools.lru_cache(maxsize=None)
def _program(config: VQGANConfig, method: str):
    """The jitted encoder or decoder of a VQ-GAN config, shared by every tokenizer of that config in
    a process (the weights are an argument), so loading one again compiles nothing."""
    module, fn = VQGAN(config), getattr(VQGAN, method)
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=fn))


class VQTokenizer:
    """The VQ-GAN that turns pictures into grids of discrete codes (`encode`: pixels in [-1, 1],
    [N, H, W, 3] -> codes [N, H/16, W/16]) and codes back into pictures (`decode`, where the
    checkpoint holds the decoder). `VQTokenizer.load(path)` reads any format the package knows."""

    def __init__(self, config: VQGANConfig, params, mesh: Mesh | None = None):
        self.config = config
        self.params = params
        self.mesh = mesh
        self.has_decoder = vq_io.has_decoder(params)
        self._fingerprint: tuple[object, str] | None = None  # (the params it was computed from, the digest)

    def fingerprint(self) -> str:
        """sha256 of the config and every weight: what a pre-tokenized dataset's codes were made with.
        Computed once for these params (each pipeline built over a trained model checks it): give
        new weights as a new tree (`vq.params = ...`), not by changing a leaf inside this one."""
        if self._fingerprint is None or self._fingerprint[0] is not self.params:
            digest = hashlib.sha256(repr(self.config).encode())
            for leaf in jax.tree.leaves(self.params):
                digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
            self._fingerprint = (self.params, digest.hexdigest())
        return self._fingerprint[1]

    @classmethod
    def from_meta(cls, ckpt_path: str, yaml_path: str | None = None, mesh: Mesh | None = None) -> "VQTokenizer":
        """Meta's Chameleon VQ-GAN: `vqgan.ckpt` and its `vqgan.yaml` (default: beside it)."""
        config, params = vq_io.read_meta_checkpoint(ckpt_path, yaml_path)
        return cls(config, jax.device_put(params), mesh)

    @classmethod
    def from_hf(cls, path: str, mesh: Mesh | None = None) -> "VQTokenizer":
        """The encoder an HF Chameleon / UniToken checkpoint directory holds (`model.vqmodel.*`; no decoder)."""
        config, params = vq_io.read_hf_vqmodel(path)
        return cls(config, jax.device_put(params), mesh)

    @classmethod
    def from_orbax(cls, path: str, mesh: Mesh | None = None) -> "VQTokenizer":
        """The encoder an HF Chameleon / UniToken checkpoint carried into our Orbax format (`unitoken convert`)."""
        config, params = vq_io.read_orbax_vqmodel(path)
        return cls(config, jax.device_put(params), mesh)

    @classmethod
    def from_dir(cls, path: str, mesh: Mesh | None = None) -> "VQTokenizer":
        """A VQ-GAN saved by `unitoken_jax.convert.vqgan.save_vqgan` (vqgan.safetensors + vqgan_config.json),
        e.g. one trained with `unitoken_jax.train.vqgan`."""
        config, params = vq_io.load_vqgan(path)
        return cls(config, jax.device_put(params), mesh)

    @classmethod
    def load(cls, path: str, mesh: Mesh | None = None) -> "VQTokenizer":
        """Any VQ-GAN format the package reads, by what `path` is: Meta's `vqgan.ckpt` (its
        `vqgan.yaml` beside it), a directory written by `save_vqgan` (`vqgan_config.json`; or its
        `vqgan.safetensors`), or an HF
        Chameleon / UniToken checkpoint directory (its `model.vqmodel.*` encoder), or one converted to
        our Orbax format."""
        path = os.path.expanduser(os.fspath(path))
        if os.path.isdir(path):
            if os.path.exists(os.path.join(path, vq_io.CONFIG_FILE)):
                return cls.from_dir(path, mesh)
            if os.path.exists(os.path.join(path, "config.json")):
                return cls.from_hf(path, mesh)
            if is_orbax_checkpoint(path):
                return cls.from_orbax(path, mesh)
            if os.path.exists(os.path.join(path, "vqgan.ckpt")):
                return cls.from_meta(os.path.join(path, "vqgan.ckpt"), mesh=mesh)
            raise vq_io.CheckpointError(f"{path} holds no VQ-GAN: expected {vq_io.CONFIG_FILE} (ours), config.json "
                                        f"(an HF Chameleon / UniToken checkpoint), {SIDECAR} (one converted to our "
                                        "format) or vqgan.ckpt (Meta's)")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such VQ-GAN file or directory")
        folder = os.path.dirname(path)
        if (path.endswith(".safetensors") or os.path.basename(path) == vq_io.CONFIG_FILE) and \
                os.path.exists(os.path.join(folder, vq_io.CONFIG_FILE)):
            return cls.from_dir(folder, mesh)  # (a file of ours: its folder, not Meta's format's missing vqgan.yaml)
        return cls.from_meta(path, mesh=mesh)

    @classmethod
    def random(cls, config: VQGANConfig, seed: int = 0) -> "VQTokenizer":
        """An untrained VQ-GAN of `config` (encoder and decoder), initialised from `seed`: for tests."""
        size = 2 * config.downsample_factor
        params = VQGAN(config).init(jax.random.key(seed), jnp.zeros((1, size, size, config.in_channels)))["params"]
        return cls(config, params)

    @property
    def _encode(self):
        return _program(self.config, "encode")

    @property
    def _decode(self):
        return _program(self.config, "decode")

    def _batch(self, x):
        """Splits a batch over the mesh's data axes when there is a mesh (padding to a multiple)."""
        if self.mesh is None:
            return x, x.shape[0]
        n = x.shape[0]
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        pad = (-n) % shards
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        spec = PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec)), n

    def encode(self, pixels_NHWC) -> np.ndarray:
        """Code indices [N, h, w] for pixels in [-1, 1]; h, w = H, W / downsample factor. Pixels of
        another range (a picture's 0..255, NaN) are refused: they encoded to codes of nothing."""
        given = np.asarray(pixels_NHWC)
        if given.size and not np.issubdtype(given.dtype, np.floating):
            raise ValueError(f"pixels must be floats in [-1, 1] (images.vq_pixels gives them; encode_images takes "
                             f"pictures), got {given.dtype}")
        pixels = given.astype(np.float32)
        f = self.config.downsample_factor
        c = self.config.in_channels
        if pixels.ndim != 4 or pixels.shape[1] % f or pixels.shape[2] % f or pixels.shape[3] != c:
            raise ValueError(f"pixels must be [N, H, W, {c}] with H and W multiples of {f}, got {pixels.shape}")
        if pixels.size and not (np.isfinite(pixels).all() and -1.001 <= pixels.min() and pixels.max() <= 1.001):
            raise ValueError(f"pixels must be finite and in [-1, 1] (image / 127.5 - 1, as images.vq_pixels gives "
                             f"them), got [{np.nanmin(pixels):g}, {np.nanmax(pixels):g}]"
                             + (" with NaN" if np.isnan(pixels).any() else ""))
        x, n = self._batch(pixels)
        return np.asarray(self._encode(self.params, x))[:n]

    def decode(self, codes_Nhw) -> np.ndarray:
        """Pixels [N, H, W, 3] (not clipped) for code indices [N, h, w]."""
        if not self.has_decoder:
            raise ValueError("this VQ-GAN has no decoder (HF Chameleon checkpoints keep only the encoder); "
                             "load Meta's vqgan.ckpt with VQTokenizer.from_meta to draw pictures")
        codes = np.asarray(codes_Nhw)
        if codes.size and not np.issubdtype(codes.dtype, np.integer):  # (a cast would cut 3.7 to 3)
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.ndim != 3:
            raise ValueError(f"codes must be [N, h, w], got shape {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.config.n_embed):
            raise ValueError(f"codes must lie in 0..{self.config.n_embed - 1}")
        x, n = self._batch(codes.astype(np.int32))  # (in range: the cast cannot wrap)
        return np.asarray(self._decode(self.params, x))[:n]

    def encode_images(self, images: Sequence[Image.Image], size: int = 512, seed: int | None = None) -> np.ndarray:
        """Crops each picture to size x size as the reference does (`image_io.vq_crop`), then encodes."""
        pixels = np.stack([image_io.vq_pixels(image_io.vq_crop(im, size, seed=seed)) for im in images])
        return self.encode(pixels)

    def decode_to_pil(self, codes_Nhw) -> list[Image.Image]:
        """`decode`'s pictures [N, h, w] codes -> N RGB PIL images."""
        return [image_io.pil_from_pixels(p) for p in self.decode(codes_Nhw)]

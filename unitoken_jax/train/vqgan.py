"""Training a VQ-GAN (the image tokenizer) from scratch; none of the reference projects has one.

Loss: L1 + L2 reconstruction, the codebook term |sg(z) - e|^2 and the commitment term
beta |z - sg(e)|^2, with the straight-through estimator (`VQGAN.train_forward`); Adam. Codes
start from the encoder's own latents (the codebook is filled with latents of the first batch) and
codes unused over `restart_every` steps are restarted on latents of the current batch, so the
codebook does not collapse. No adversarial term: on the flat-coloured pictures it is trained for,
reconstruction is enough.

The trained tokenizer is saved as `vqgan.safetensors` + `vqgan_config.json`
(`unitoken_jax.convert.vqgan.save_vqgan`; `VQTokenizer.from_dir` reads it).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from unitoken_jax.models.vqgan import VQGAN, VQGANConfig, init_params

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VQTrainConfig:
    steps: int = 1500
    batch: int = 32
    learning_rate: float = 1e-3
    beta: float = 0.25
    restart_every: int = 100
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch", "restart_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"VQTrainConfig.{name}={value!r}: a whole number, at least 1")
        # (a NaN rate trained NaN weights, a negative one gradient ascent; a negative seed was NumPy's
        # "expected non-negative integer" naming nothing)
        for name, low in (("learning_rate", 0.0), ("beta", None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) \
                    or (value <= low if low is not None else value < 0):
                raise ValueError(f"VQTrainConfig.{name}={value!r}: a finite number, "
                                 f"{'above 0' if low is not None else 'at least 0'}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"VQTrainConfig.seed={self.seed!r}: a whole number, at least 0")


def _check_pixels(pixels, config: VQGANConfig) -> None:
    """Pictures a VQ-GAN can train on, or a ValueError saying what is wrong with them (they were
    Flax's shape errors from inside the encoder, a broadcast TypeError, or, for values outside
    [-1, 1] or NaN, a training that ran to its end and wrote a useless or NaN tokenizer)."""
    f = config.downsample_factor
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 4 or pixels.shape[-1] != config.in_channels \
            or pixels.shape[1] % f or pixels.shape[2] % f or not np.issubdtype(pixels.dtype, np.floating):
        shape = getattr(pixels, "shape", None)
        raise ValueError(f"pixels must be a float NumPy array [N, H, W, {config.in_channels}] with H and W multiples "
                         f"of {f} (the VQ-GAN's downsampling), got {type(pixels).__name__}"
                         f"{f' of shape {tuple(shape)} and dtype {pixels.dtype}' if shape is not None else ''}")
    if not len(pixels):  # (NumPy's "zero-size array to reduction operation minimum" below)
        raise ValueError(f"pixels hold no pictures (shape {tuple(pixels.shape)}): give at least a batch of them")
    if not np.isfinite(pixels).all():
        raise ValueError(f"pixels hold {int((~np.isfinite(pixels)).sum())} values that are not finite (NaN or inf)")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1.001 or high > 1.001:
        raise ValueError(f"pixels must lie in [-1, 1] (image / 127.5 - 1, as images.vq_pixels gives them), got "
                         f"[{low:g}, {high:g}]")


def train_vqgan(config: VQGANConfig, pixels: np.ndarray, tc: VQTrainConfig = VQTrainConfig(), *,
                progress: bool = True):
    """`pixels`: [N, H, W, 3] in [-1, 1]. Returns (params, history of (step, loss, reconstruction L1,
    codes used since the last restart)), logged at the first step, every restart and the last step."""
    config.validate()
    _check_pixels(pixels, config)
    if len(pixels) < tc.batch:  # (each batch draws its pictures without replacement)
        raise ValueError(f"{len(pixels)} pictures cannot fill a batch of {tc.batch}: give at least {tc.batch}")
    rng = np.random.default_rng(tc.seed)
    params = init_params(config, jax.random.key(tc.seed), pixels.shape[1])
    model = VQGAN(config)
    first = pixels[rng.choice(len(pixels), tc.batch, replace=False)]
    z = np.asarray(model.apply({"params": params}, first, method=VQGAN.latents)).reshape(-1, config.embed_dim)
    params = dict(params, codebook=jnp.asarray(z[rng.choice(len(z), config.n_embed, replace=len(z) < config.n_embed)]))
    warmup = max(1, min(50, tc.steps // 10))
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup, max(tc.steps, warmup + 1),
                                                       tc.learning_rate * 0.05))
    opt_state = tx.init(params)

    def loss_fn(p, x):
        recon, z, e, codes = model.apply({"params": p}, x, method=VQGAN.train_forward)
        l1 = jnp.mean(jnp.abs(recon - x))
        loss = l1 + jnp.mean((recon - x) ** 2) + jnp.mean((jax.lax.stop_gradient(z) - e) ** 2) + \
            tc.beta * jnp.mean((z - jax.lax.stop_gradient(e)) ** 2)
        return loss, (l1, codes, z)

    @jax.jit
    def step(p, s, x):
        (loss, (l1, codes, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss, l1, codes, z

    used = np.zeros(config.n_embed, bool)
    history = []
    for i in tqdm(range(tc.steps), desc="VQ-GAN", disable=not progress):
        x = pixels[rng.choice(len(pixels), tc.batch, replace=False)]
        params, opt_state, loss, l1, codes, z = step(params, opt_state, x)
        used[np.asarray(codes).ravel()] = True
        if i == 0 or (i + 1) % tc.restart_every == 0 or i + 1 == tc.steps:
            history.append((i + 1, float(loss), float(l1), int(used.sum())))
        if (i + 1) % tc.restart_every == 0 and i + 1 < tc.steps:
            dead = np.flatnonzero(~used)
            if len(dead):
                zs = np.asarray(z).reshape(-1, config.embed_dim)
                book = np.asarray(params["codebook"]).copy()
                book[dead] = zs[rng.choice(len(zs), len(dead))] + 0.01 * rng.normal(size=(len(dead), config.embed_dim))
                params = dict(params, codebook=jnp.asarray(book, params["codebook"].dtype))
            used[:] = False
    return params, history

"""Batched decoding on the device: prefill, then a compiled loop that samples every row with its
own parameters, grid state machine and random key.

Classifier-free guidance puts each guided row's unconditional partner in the same batch: one
weight read per step serves both. The partner is fed the tokens its row samples; its logits only
ever enter through the guidance formula.

The loop runs `chunk` steps at a time inside one `lax.while_loop` and returns to Python only
between chunks (to report progress), never per token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unitoken_jax.inference import grid, sampling
from unitoken_jax.models.chameleon import init_cache
from unitoken_jax.models.unitoken import UniToken
from unitoken_jax.tokenizer import layout


@dataclasses.dataclass
class Request:
    """One prompt to continue. `feature_index` points into this request's own `pixels`' features."""

    tokens: np.ndarray
    is_continuous: np.ndarray | None = None
    feature_index: np.ndarray | None = None
    pixels: np.ndarray | None = None  # [n, S, S, 3] SigLIP-preprocessed
    max_new_tokens: int = 256
    seed: int = 0
    temperature: float = 0.0  # text tokens; 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    image_temperature: float = 1.0
    image_top_k: int = 2000
    image_top_p: float = 1.0
    cfg_scale: float = 1.0  # 1 = no guidance
    uncond_tokens: np.ndarray | None = None  # the unconditional context; default: from <racm3:break> on
    grid_hw: tuple[int, int] | None = None  # grid units (32 px each) an image must have; None = free
    max_grid: int = 32
    allow_images: bool = False  # may a text row start an image?
    stop_after_image: bool = False
    stop_tokens: tuple[int, ...] = (layout.END_OF_TURN,)

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, np.int32)
        if self.tokens.ndim != 1 or not len(self.tokens):
            raise ValueError("a request needs a non-empty 1-D prompt")
        if self.cfg_scale != 1.0 and self.uncond_tokens is None:
            self.uncond_tokens = np.array([layout.IMAGE_START], np.int32)


def _rows(requests: Sequence[Request]):
    """Guided requests get a second row for their unconditional context, after all cond rows."""
    rows, primary = [], []
    for i, r in enumerate(requests):
        rows.append((r, r.tokens, r.is_continuous, r.feature_index, r.pixels))
        primary.append(i)
    uncond_row = [-1] * len(requests)
    for i, r in enumerate(requests):
        if r.cfg_scale != 1.0:
            uncond_row[i] = len(rows)
            rows.append((r, np.asarray(r.uncond_tokens, np.int32), None, None, None))
            primary.append(i)
    uncond_row += [-1] * (len(rows) - len(requests))
    return rows, np.array(primary, np.int32), np.array(uncond_row, np.int32)


def _build_batch(rows, tokens_per_image: Callable[[tuple[int, int]], int]):
    n = len(rows)
    length = max(len(t) for _, t, *_ in rows)
    tokens = np.zeros((n, length), np.int32)
    segments = np.zeros((n, length), np.int32)
    cont = np.zeros((n, length), bool)
    index = np.zeros((n, length), np.int32)
    pixels, offset = [], 0
    for b, (_, toks, c, fi, px) in enumerate(rows):
        tokens[b, :len(toks)], segments[b, :len(toks)] = toks, 1
        if px is not None and len(px):
            cont[b, :len(toks)] = c
            index[b, :len(toks)] = np.where(c, np.asarray(fi) + offset, 0)
            pixels.append(px)
            offset += len(px) * tokens_per_image(px.shape[1:3])
    prompt_len = segments.sum(1).astype(np.int32)
    return tokens, segments, cont, index, (np.concatenate(pixels) if pixels else None), prompt_len


def _initial_state(rows):
    n = len(rows)
    last = np.array([t[-1] for _, t, *_ in rows])
    for b, (_, t, *_) in enumerate(rows):
        inside = [i for i in t if i in (layout.IMAGE_START, layout.IMAGE_END)]
        if inside and inside[-1] == layout.IMAGE_START and t[-1] != layout.IMAGE_START:
            raise ValueError(f"prompt {b} ends inside an image; end it with <eoss> or exactly at <racm3:break>")

    def per(f):
        return np.array([f(r) for r, *_ in rows])

    forced = per(lambda r: r.grid_hw or (0, 0))
    state = {
        "mode": np.where(last == layout.IMAGE_START, grid.HEIGHT, grid.TEXT).astype(np.int32),
        "col": np.zeros(n, np.int32), "row": np.zeros(n, np.int32),
        "h_codes": np.zeros(n, np.int32), "w_codes": np.zeros(n, np.int32),
        "forced_h": forced[:, 0].astype(np.int32), "forced_w": forced[:, 1].astype(np.int32),
        "max_grid": per(lambda r: r.max_grid).astype(np.int32),
        "allow_images": per(lambda r: r.allow_images), "stop_after_image": per(lambda r: r.stop_after_image),
        "images_done": np.zeros(n, np.int32),
    }
    params = {
        "temperature": per(lambda r: r.temperature).astype(np.float32),
        "top_k": per(lambda r: r.top_k).astype(np.int32), "top_p": per(lambda r: r.top_p).astype(np.float32),
        "image_temperature": per(lambda r: r.image_temperature).astype(np.float32),
        "image_top_k": per(lambda r: r.image_top_k).astype(np.int32),
        "image_top_p": per(lambda r: r.image_top_p).astype(np.float32),
        "cfg_scale": per(lambda r: r.cfg_scale).astype(np.float32),
        "max_new": per(lambda r: r.max_new_tokens).astype(np.int32),
    }
    n_stop = max(len(r.stop_tokens) for r, *_ in rows)
    params["stop_tokens"] = np.array([list(r.stop_tokens) + [-1] * (n_stop - len(r.stop_tokens)) for r, *_ in rows],
                                     np.int32)
    return state, params


@dataclasses.dataclass
class Generation:
    tokens: list[np.ndarray]  # generated ids of each request (prompt excluded)


class Decoder:
    """Compiled prefill and decode loop for one model; call `generate(requests)`."""

    def __init__(self, config, params, mesh=None, cache_dtype=None, banned_ids=None):
        """`banned_ids`: ids never drawn (e.g. the image codes a small VQ-GAN's codebook lacks)."""
        self.config = config
        self.params = params
        self.mesh = mesh
        self.module = UniToken(config)
        self.cache_dtype = cache_dtype or jnp.dtype(config.dtype)
        ok = np.ones(config.decoder.vocab_size, bool)
        if banned_ids is not None and len(banned_ids):
            ok[np.asarray(banned_ids)] = False
        self._ok_ids = ok

    def _tokens_per_image(self, hw):
        p = self.config.vision.patch_size
        return (hw[0] // p) * (hw[1] // p)

    def _apply(self, params, *args, **kwargs):
        from unitoken_jax.model import unroll_params

        p = params if self.config.scan_layers else unroll_params(params, self.config)
        return self.module.apply({"params": p}, *args, **kwargs)

    @functools.cached_property
    def _prefill(self):
        def prefill(params, tokens, segments, cont, index, pixels, cache_len):
            b, length = tokens.shape
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
            cache = init_cache(self.config.decoder, b, cache_len, self.cache_dtype)
            last = jnp.sum(segments, axis=1) - 1
            logits, cache = self._apply(params, tokens, positions, segments, cont if pixels is not None else None,
                                        index if pixels is not None else None, pixels, cache=cache, logits_at_B=last)
            return logits[:, 0], cache

        return jax.jit(prefill, static_argnums=(6,))

    @functools.cached_property
    def _run(self):
        vocab = self.config.decoder.vocab_size

        def run(params, carry, static, chunk_end, max_k):
            keys, primary, uncond_row, prompt_len, p = static

            def cond(c):
                return (c["step"] < chunk_end) & ~jnp.all(c["done"])

            def body(c):
                state, logits = c["state"], c["logits"]
                in_img = grid.in_image(state)
                apply_cfg = state["mode"] == grid.BODY
                lg = sampling.classifier_free_guidance(logits, uncond_row, p["cfg_scale"], apply_cfg)
                lg = jnp.where(grid.allowed(state, vocab) & jnp.asarray(self._ok_ids)[None], lg, sampling.NEG_INF)
                temp = jnp.where(in_img, p["image_temperature"], p["temperature"])
                row_keys = jax.vmap(jax.random.fold_in)(keys, c["n_out"])
                tok = sampling.sample(lg, row_keys, temp, jnp.where(in_img, p["image_top_k"], p["top_k"]),
                                      jnp.where(in_img, p["image_top_p"], p["top_p"]), max_k)
                forced = grid.forced_token(state)
                tok = jnp.where(forced >= 0, forced, tok)
                tok = jnp.take(tok, primary)  # unconditional rows follow their row's choice
                active = ~c["done"]
                r = jnp.arange(tok.shape[0])
                slot = jnp.where(active, c["n_out"], c["out"].shape[1])  # finished rows write nowhere
                out = c["out"].at[r, slot].set(tok, mode="drop")
                n_out = c["n_out"] + active
                stop = jnp.any(tok[:, None] == p["stop_tokens"], axis=1)
                new_state = grid.advance(state, tok, stop)
                state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state)
                done = c["done"] | (state["mode"] == grid.DONE) | (n_out >= p["max_new"])
                done = jnp.take(done, primary)
                feed = active & ~done
                positions = (prompt_len + n_out - 1)[:, None]
                hidden, cache = self._apply(params, tok[:, None], positions, feed[:, None].astype(jnp.int32),
                                            cache=c["cache"], return_hidden=True)

                def code_logits(h):  # only image codes can be drawn next: 1/8 of the projection
                    part = self._apply(params, h, grid.CODE_LOGITS, method=UniToken.head)
                    return jnp.pad(part, ((0, 0), (0, 0), (0, vocab - grid.CODE_LOGITS)),
                                   constant_values=sampling.NEG_INF)

                logits = jax.lax.cond(grid.codes_only(state), code_logits,
                                      lambda h: self._apply(params, h, method=UniToken.head), hidden)
                return {**c, "state": state, "logits": logits[:, 0], "cache": cache, "out": out, "n_out": n_out,
                        "done": done, "step": c["step"] + 1}

            return jax.lax.while_loop(cond, body, carry)

        return jax.jit(run, static_argnums=(4,), donate_argnums=(1,))

    def generate(self, requests: Sequence[Request], *, chunk: int = 64, progress: Callable[[dict], None] | None = None
                 ) -> Generation:
        rows, primary, uncond_row = _rows(requests)
        tokens, segments, cont, index, pixels, prompt_len = _build_batch(rows, self._tokens_per_image)
        state, p = _initial_state(rows)
        max_new = int(p["max_new"].max())
        cache_len = int(tokens.shape[1] + max_new)
        for r, *_ in rows:
            if r.grid_hw is not None:
                need = 3 + r.grid_hw[0] * 2 * (r.grid_hw[1] * 2 + 1) + 1
                if r.max_new_tokens < need - 1:
                    raise ValueError(f"max_new_tokens={r.max_new_tokens} cannot hold a {r.grid_hw[0] * 32}x"
                                     f"{r.grid_hw[1] * 32} image ({need - 1} tokens after <racm3:break>)")
        v = self.config.decoder.vocab_size
        max_k = sampling.num_candidates(v, [pair for r, *_ in rows for pair in
                                            ((r.temperature, r.top_k), (r.image_temperature, r.image_top_k))])
        keys = jax.vmap(jax.random.key)(jnp.array([r.seed for r, *_ in rows], jnp.uint32))

        ctx = _mesh_context(self.mesh)
        with ctx:
            logits, cache = self._prefill(self.params, tokens, segments, cont, index, pixels, cache_len)
            carry = {"state": jax.tree.map(jnp.asarray, state), "logits": logits, "cache": cache,
                     "out": jnp.zeros((len(rows), max_new), jnp.int32), "n_out": jnp.zeros(len(rows), jnp.int32),
                     "done": jnp.zeros(len(rows), bool), "step": jnp.zeros((), jnp.int32)}
            static = (keys, jnp.asarray(primary), jnp.asarray(uncond_row), jnp.asarray(prompt_len),
                      jax.tree.map(jnp.asarray, p))
            step = 0
            while True:
                step = min(step + chunk, max_new)
                carry = self._run(self.params, carry, static, jnp.int32(step), max_k)
                if progress is not None:
                    progress(jax.device_get({"rows_drawn": carry["state"]["row"], "images_done":
                                             carry["state"]["images_done"], "n_out": carry["n_out"]}))
                if step >= max_new or bool(jnp.all(carry["done"])):
                    break
        out, n_out = np.asarray(carry["out"]), np.asarray(carry["n_out"])
        return Generation([out[i, :n_out[i]] for i in range(len(requests))])


def _mesh_context(mesh):
    import contextlib

    if mesh is None:
        return contextlib.nullcontext()
    from unitoken_jax import sharding

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_RULES))
    return stack

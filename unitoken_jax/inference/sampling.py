"""Pure logits transforms for decoding, one row of parameters per batch row.

All functions take per-row arrays; nothing reads row 0 for the batch (the reference's logits
processors do, which makes its batches wrong).

Sampling works on each row's K best candidates (`lax.top_k`, K static: the largest top-k any row
asks for, or the whole vocabulary when some row samples without a top-k), in descending order.
The Gumbel noise is one draw per row and step from the row's key, the j-th value going to the
row's j-th best candidate; JAX's counter-based (partitionable) random bits make the first K
values of a draw the same whatever its length, so a row draws the same token whatever K its batch
needed: a batch of N equals N single runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def classifier_free_guidance(logits_NV, uncond_row_R, scale_R, apply_R):
    """The first R rows of `logits_NV` (N >= R) with an unconditional partner (uncond_row >= 0,
    any row of logits_NV) and `apply` set become uncond + scale * (cond - uncond); every other
    row is left as it is. Returns [R, V]."""
    cond = logits_NV[:uncond_row_R.shape[0]]
    partner = jnp.take(logits_NV, jnp.maximum(uncond_row_R, 0), axis=0)
    guided = partner + scale_R[:, None] * (cond - partner)
    use = (uncond_row_R >= 0) & apply_R
    return jnp.where(use[:, None], guided, cond)


def filter_candidates(values_RK, top_k_R, top_p_R):
    """`values_RK` sorted in descending order. Keeps each row's `top_k` first (0 = all K), then
    the smallest prefix whose probability reaches `top_p` (1 = all); the rest become NEG_INF."""
    k_total = values_RK.shape[1]
    ranks = jnp.arange(k_total)[None, :]
    k = jnp.where((top_k_R <= 0) | (top_k_R > k_total), k_total, top_k_R)[:, None]
    kept = jnp.where(ranks < k, values_RK, NEG_INF)
    probs = jax.nn.softmax(kept, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (ranks < k) & ((mass_before < top_p_R[:, None]) | (ranks == 0))
    return jnp.where(keep, values_RK, NEG_INF)


def sample_candidates(values_RK, ids_RK, keys_R, temperature_R):
    """Greedy (the first candidate) where temperature == 0, else Gumbel-max over the candidates
    of values / temperature, the noise drawn once per row (see the module docstring)."""
    k = values_RK.shape[1]
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (k,), jnp.float32))(keys_R)
    t = jnp.where(temperature_R > 0, temperature_R, 1.0)[:, None]
    choice = jnp.argmax(jnp.where(values_RK > NEG_INF / 2, values_RK / t + gumbel, NEG_INF), axis=-1)
    choice = jnp.where(temperature_R > 0, choice, 0)
    return jnp.take_along_axis(ids_RK, choice[:, None], axis=1)[:, 0].astype(jnp.int32)


def sample(logits_RV, keys_R, temperature_R, top_k_R, top_p_R, num_candidates: int):
    """One token per row from logits [R, V] with the row's temperature / top-k / top-p."""
    values, ids = jax.lax.top_k(logits_RV, num_candidates)
    return sample_candidates(filter_candidates(values, top_k_R, top_p_R), ids, keys_R, temperature_R)


def num_candidates(vocab_size: int, rows) -> int:
    """K for `sample`: rows are (temperature, top_k) pairs; greedy rows need one candidate."""
    need = 1
    for temperature, top_k in rows:
        if temperature > 0:
            need = max(need, vocab_size if top_k <= 0 else min(top_k, vocab_size))
    return need

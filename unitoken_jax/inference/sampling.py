"""Pure logits transforms for decoding, one row of parameters per batch row.

All functions take logits [R, V] and per-row arrays [R]; nothing reads row 0 for the batch (the
reference's logits processors do, which makes its batches wrong).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def classifier_free_guidance(logits_RV, uncond_row_R, scale_R, apply_R):
    """cond rows with an unconditional partner (uncond_row >= 0) and `apply` set get
    uncond + scale * (cond - uncond); every other row is left as it is."""
    partner = jnp.take(logits_RV, jnp.maximum(uncond_row_R, 0), axis=0)
    guided = partner + scale_R[:, None] * (logits_RV - partner)
    use = (uncond_row_R >= 0) & apply_R
    return jnp.where(use[:, None], guided, logits_RV)


def top_k_top_p(logits_RV, top_k_R, top_p_R, max_k: int):
    """Keeps each row's `top_k` largest logits (0 = all) and then its smallest set whose
    probability reaches `top_p` (1 = all). `max_k` (static) bounds top_k for every row; top_p is
    applied inside those `max_k` candidates, so pass max_k = V when some row has top_p < 1 and no
    top_k."""
    v = logits_RV.shape[-1]
    k_cap = min(max_k, v)
    values, _ = jax.lax.top_k(logits_RV, k_cap)  # descending [R, K]
    k = jnp.where((top_k_R <= 0) | (top_k_R > k_cap), k_cap, top_k_R)
    kth = jnp.take_along_axis(values, (k - 1)[:, None], axis=1)  # [R, 1]
    # top-p on the surviving candidates
    ranks = jnp.arange(k_cap)[None, :]
    cand = jnp.where(ranks < k[:, None], values, NEG_INF)
    probs = jax.nn.softmax(cand, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
    keep = (before < top_p_R[:, None]) & (ranks < k[:, None])
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    threshold = jnp.take_along_axis(values, (n_keep - 1)[:, None], axis=1)
    threshold = jnp.maximum(threshold, kth)
    return jnp.where(logits_RV >= threshold, logits_RV, NEG_INF)


def sample(logits_RV, keys_R, temperature_R):
    """Greedy where temperature == 0, else a categorical draw from logits / temperature with each
    row's own key."""
    greedy = jnp.argmax(logits_RV, axis=-1)
    t = jnp.where(temperature_R > 0, temperature_R, 1.0)
    drawn = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys_R, logits_RV / t[:, None])
    return jnp.where(temperature_R > 0, drawn, greedy).astype(jnp.int32)

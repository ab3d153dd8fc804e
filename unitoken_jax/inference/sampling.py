"""Pure logits transforms for decoding, one row of parameters per batch row.

All functions take per-row arrays; nothing reads row 0 for the batch (the reference's logits
processors do, which makes its batches wrong).

Top-k and top-p keep, in each row, the tokens at or above a threshold found bit by bit on the
logits' bits (a counting pass over the row per bit, for top-k usually far fewer than 32; no sort
and no `lax.top_k`, which on a CPU cost a 16-row image step more than the rest of its sampling
together). Gumbel-max then picks among the kept tokens with one noise draw per row and step from
the row's key, the i-th value going to token i: JAX's counter-based (partitionable) random bits
make the first n values of a draw the same whatever its length, so a row draws the same token
whether its batch samples from the 8,196 code logits or the whole vocabulary, and a batch of N
equals N single runs.
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


def _order_keys(x):
    """float32 -> uint32 with the same order (sign bit set for positives, all bits flipped for
    negatives), so thresholds can be found bit by bit."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key_where(test, rows: int, start_value=None, settled=None):
    """Per row, the largest uint32 t for which `test(t)` holds, built from the top bit down (0 if
    it holds nowhere). `test(t)` ([R] thresholds) gives (holds [R], value [R]) and holds for every t
    up to some point and for none after; each row keeps the value of its current t (from
    `start_value` at t = 0), and the search ends early once `settled(value)` holds for every row."""
    def unsettled(carry):
        i, _, value = carry
        return (i < 32) if settled is None else (i < 32) & ~jnp.all(settled(value))

    def step(carry):
        i, t, value = carry
        candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        holds, candidate_value = test(candidate)
        return i + 1, jnp.where(holds, candidate, t), jnp.where(holds, candidate_value, value)

    value = jnp.zeros((rows,), jnp.int32) if start_value is None else start_value
    return jax.lax.while_loop(unsettled, step, (jnp.int32(0), jnp.zeros((rows,), jnp.uint32), value))[1]


def kept(logits_RV, top_k_R, top_p_R, temperature_R=None):
    """Which tokens each row may draw: its `top_k` most likely (0 = all), then of those the
    smallest most-likely set whose probability (softmax of logits / temperature over the top-k
    set, the order of transformers' warpers and of OpenAI's API; temperature 1 where None)
    reaches `top_p` (1 = all); the most likely token always. Tokens tied at a threshold are all
    kept. Masked logits (NEG_INF) are never kept."""
    rows, vocab = logits_RV.shape
    keys = _order_keys(logits_RV)
    real = logits_RV > NEG_INF / 2
    # a top-k that reaches every token that can be drawn keeps them all: no threshold to find
    k = jnp.where((top_k_R <= 0) | (top_k_R >= jnp.sum(real, axis=1)), 0, top_k_R)

    def at_least_k(t):  # keys >= t: at least k of them? (and how many)
        n = jnp.sum(keys >= t[:, None], axis=1)
        return n >= k, n

    def kth_largest():  # a t with exactly k keys >= t where the keys allow it, else the k-th largest key
        return _largest_key_where(at_least_k, rows, jnp.full((rows,), vocab, jnp.int32),
                                  settled=lambda n: (k <= 0) | (n == k))

    low = jax.lax.cond(jnp.any(k > 0), kth_largest, lambda: jnp.zeros((rows,), jnp.uint32))
    keep = (keys >= jnp.where(k > 0, low, 0)[:, None]) & real

    def nucleus():  # keep u iff the mass above u is < top_p: u above the largest t with mass above >= top_p
        # (logits - max) / T <= 0 cannot overflow at a small T; it may underflow to -inf, whose exp is 0
        top = jnp.max(logits_RV, axis=-1, keepdims=True)
        t_R = jnp.ones((rows,)) if temperature_R is None else jnp.where(temperature_R > 0, temperature_R, 1.0)
        probs = jax.nn.softmax(jnp.where(keep, (logits_RV - top) / t_R[:, None], NEG_INF), axis=-1)
        above = lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=1)  # noqa: E731
        t = _largest_key_where(lambda t: (above(t) >= top_p_R, jnp.zeros((rows,), jnp.int32)), rows)
        # a row at top_p = 1 keeps its whole top-k set even when its float32 mass sums to >= 1 (it
        # runs this pass only because another row of its batch asked for a nucleus)
        everything = (top_p_R >= 1) | (above(jnp.zeros((rows,), jnp.uint32)) < top_p_R)
        return keep & ((keys > t[:, None]) | everything[:, None])

    keep = jax.lax.cond(jnp.any(top_p_R < 1), nucleus, lambda: keep)
    return keep | (logits_RV == jnp.max(logits_RV, axis=-1, keepdims=True))


def _argmax(x_RV):
    """The first index of each row's maximum, as jnp.argmax, in two plain reductions (XLA's CPU
    argmax, a reduction over (value, index) pairs, takes 4x as long on a [32, 8196] step)."""
    top = jnp.max(x_RV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x_RV == top, jnp.arange(x_RV.shape[-1], dtype=jnp.int32), x_RV.shape[-1]), axis=-1)


def sample(logits_RV, keys_R, temperature_R, top_k_R, top_p_R):
    """One token per row from logits [R, V] with the row's temperature / top-k / top-p: greedy
    (argmax) where temperature == 0, else Gumbel-max over the kept tokens of logits / temperature,
    the noise drawn once per row (see the module docstring)."""
    greedy = _argmax(logits_RV)

    def draw():
        vocab = logits_RV.shape[1]
        gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32))(keys_R)
        t = jnp.where(temperature_R > 0, temperature_R, 1.0)[:, None]
        scores = jnp.where(kept(logits_RV, top_k_R, top_p_R, temperature_R), logits_RV / t + gumbel, -jnp.inf)
        return jnp.where(temperature_R > 0, _argmax(scores), greedy)

    return jax.lax.cond(jnp.any(temperature_R > 0), draw, lambda: greedy)

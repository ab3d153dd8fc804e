"""Sampling against its definitions, written here in NumPy: the set top-k and top-p keep (on
hand-made logits, boundaries included), greedy = argmax, and the distribution of many draws at a
temperature (with and without top-k / top-p) against softmax(logits / T) renormalised over the
kept set, by a chi-square bound. Classifier-free guidance against its formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitoken_jax.inference import sampling


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _kept_by_definition(logits, top_k, top_p):
    """Indices kept: the top_k most likely (0 = all), then the smallest most-likely prefix of those
    whose probability (renormalised over the top_k) reaches top_p."""
    order = np.argsort(-logits, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    probs = _softmax(logits[order])
    kept, mass = [], 0.0
    for i, p in zip(order, probs):
        kept.append(int(i))
        mass += p
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (1, 1.0), (0, 0.5), (0, 0.8), (0, 0.95), (4, 0.7),
                                         (0, 0.633), (0, 0.634), (0, 0.0)])
def test_the_kept_set_is_the_definitions(top_k, top_p):
    # probabilities 0.4, 0.2333, 0.1667, 0.1, 0.0667, 0.0333: cumulative 0.4, 0.6333, 0.8, 0.9, ...
    logits = np.log(np.array([0.1, 0.4, 1 / 30, 0.7 / 3, 1 / 6, 1 / 15]))
    values, ids = jax.lax.top_k(jnp.asarray(logits[None], jnp.float32), 6)
    out = np.asarray(sampling.filter_candidates(values, jnp.array([top_k]), jnp.array([top_p], jnp.float32)))[0]
    ours = {int(i) for i, v in zip(np.asarray(ids)[0], out) if v > sampling.NEG_INF / 2}
    assert ours == _kept_by_definition(logits, top_k, top_p)


def test_rows_keep_their_own_sets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 40)) * 2
    top_k = np.array([0, 5, 1, 12, 0])
    top_p = np.array([0.9, 1.0, 1.0, 0.5, 0.3], np.float32)
    values, ids = jax.lax.top_k(jnp.asarray(logits, jnp.float32), 40)
    out = np.asarray(sampling.filter_candidates(values, jnp.asarray(top_k), jnp.asarray(top_p)))
    for r in range(5):
        ours = {int(i) for i, v in zip(np.asarray(ids)[r], out[r]) if v > sampling.NEG_INF / 2}
        assert ours == _kept_by_definition(logits[r], top_k[r], top_p[r]), r


def test_greedy_is_argmax_whatever_top_k_and_top_p():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    keys = jax.vmap(jax.random.key)(jnp.arange(6))
    tok = sampling.sample(jnp.asarray(logits), keys, jnp.zeros(6), jnp.array([0, 1, 5, 0, 3, 50]),
                          jnp.array([1.0, 1.0, 0.2, 0.9, 0.5, 1.0]), 50)
    np.testing.assert_array_equal(np.asarray(tok), logits.argmax(-1))


def _chi_square_ok(counts, probs, n):
    """Pearson's chi-square against the expected counts, bounded at the 99.9 % quantile (by the
    Wilson-Hilferty approximation), over categories with expected count >= 5."""
    expected = probs * n
    use = expected >= 5
    stat = float(np.sum((counts[use] - expected[use]) ** 2 / expected[use]))
    dof = int(use.sum()) - 1
    z = 3.09  # 99.9 %
    bound = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert counts[~use].sum() <= max(10, 3 * expected[~use].sum() + 10)  # the rare ones stay rare
    return stat, bound


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.6, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.8),
                                                     (0.5, 5, 0.9)])
def test_draws_follow_softmax_at_the_temperature_over_the_kept_set(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0], np.float32)
    n = 4000
    keys = jax.vmap(jax.random.key)(jnp.arange(n))
    tok = sampling.sample(jnp.broadcast_to(jnp.asarray(logits), (n, 8)), keys, jnp.full(n, temperature),
                          jnp.full(n, top_k), jnp.full(n, top_p, jnp.float32),
                          sampling.num_candidates(8, [(temperature, top_k)]))
    counts = np.bincount(np.asarray(tok), minlength=8).astype(float)
    kept = sorted(_kept_by_definition(logits, top_k, top_p))
    probs = np.zeros(8)
    probs[kept] = _softmax(logits[kept] / temperature)
    assert counts[[i for i in range(8) if i not in kept]].sum() == 0  # nothing outside the kept set
    stat, bound = _chi_square_ok(counts, probs, n)
    assert stat < bound, (stat, bound, counts, probs * n)


def test_the_draws_check_can_tell_temperatures_apart():
    """The chi-square bound is tight enough to reject the wrong temperature."""
    logits = np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0], np.float32)
    n = 4000
    keys = jax.vmap(jax.random.key)(jnp.arange(n))
    tok = sampling.sample(jnp.broadcast_to(jnp.asarray(logits), (n, 8)), keys, jnp.full(n, 0.7), jnp.zeros(n, int),
                          jnp.ones(n), 8)
    counts = np.bincount(np.asarray(tok), minlength=8).astype(float)
    stat, bound = _chi_square_ok(counts, _softmax(logits / 1.0), n)
    assert stat > bound


def test_classifier_free_guidance_is_the_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 10)).astype(np.float32)
    uncond_row = np.array([2, -1, -1, -1])  # row 0 is guided by row 2; row 1 has no partner
    scale = np.array([3.0, 3.0, 1.0, 1.0], np.float32)
    apply = np.array([True, True, True, True])
    out = np.asarray(sampling.classifier_free_guidance(jnp.asarray(logits), jnp.asarray(uncond_row),
                                                       jnp.asarray(scale), jnp.asarray(apply)))
    np.testing.assert_allclose(out[0], logits[2] + 3.0 * (logits[0] - logits[2]), rtol=1e-6)
    np.testing.assert_array_equal(out[1:], logits[1:])
    off = np.asarray(sampling.classifier_free_guidance(jnp.asarray(logits), jnp.asarray(uncond_row),
                                                       jnp.asarray(scale), jnp.asarray(~apply)))
    np.testing.assert_array_equal(off, logits)  # outside the image body: no guidance
    # only the first R rows (the requests') are guided and returned; partners may lie beyond them
    first = np.asarray(sampling.classifier_free_guidance(jnp.asarray(logits), jnp.asarray(uncond_row[:2]),
                                                         jnp.asarray(scale[:2]), jnp.asarray(apply[:2])))
    np.testing.assert_array_equal(first, out[:2])

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


def _kept_by_definition(logits, top_k, top_p, temperature=1.0):
    """Indices kept: the top_k most likely (0 = all), then the smallest most-likely prefix of those
    whose probability (softmax of logits / temperature, renormalised over the top_k: temperature
    first, as transformers' warpers and OpenAI's API order them) reaches top_p."""
    order = np.argsort(-logits, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    if top_p >= 1:
        return {int(i) for i in order}
    probs = _softmax(logits[order] / temperature)
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
    out = np.asarray(sampling.kept(jnp.asarray(logits[None], jnp.float32), jnp.array([top_k]),
                                   jnp.array([top_p], jnp.float32)))[0]
    assert set(np.flatnonzero(out).tolist()) == _kept_by_definition(logits, top_k, top_p)


@pytest.mark.parametrize("temperature,top_p", [(0.5, 0.75), (0.5, 0.9), (2.0, 0.75), (2.0, 0.5)])
def test_top_p_is_taken_of_the_distribution_at_the_temperature(temperature, top_p):
    # at T=0.5, [0, -1] is 0.881 / 0.119: top-p 0.75 keeps one token (at T=1, 0.731: two); at T=2
    # the probabilities flatten and more tokens are needed to reach top-p than at T=1
    logits = np.array([0.0, -1.0, -1.5, -3.0, -4.0])
    out = np.asarray(sampling.kept(jnp.asarray(logits[None], jnp.float32), jnp.array([0]),
                                   jnp.array([top_p], jnp.float32), jnp.array([temperature], jnp.float32)))[0]
    want = _kept_by_definition(logits, 0, top_p, temperature)
    assert want != _kept_by_definition(logits, 0, top_p)  # the case tells the two orders apart
    assert set(np.flatnonzero(out).tolist()) == want


def test_a_row_without_a_nucleus_keeps_its_whole_set_beside_one_with_a_nucleus():
    """A row at top_p = 1 keeps every token, also in a batch where another row asks for top-p < 1
    and its own float32 probabilities sum to 1 or more (a batch of N equals N single runs)."""
    logits = np.full((2, 8196), -30.0, np.float32)
    logits[:, 0] = 0.0  # one token holds all but ~1e-9 of the mass: the rest sums to 1.0 in float32
    top_p = np.array([1.0, 0.5], np.float32)
    both = np.asarray(sampling.kept(jnp.asarray(logits), jnp.zeros(2, int), jnp.asarray(top_p)))
    alone = np.asarray(sampling.kept(jnp.asarray(logits[:1]), jnp.zeros(1, int), jnp.asarray(top_p[:1])))
    assert alone[0].all() and both[0].all()
    assert np.flatnonzero(both[1]).tolist() == [0]


def test_rows_keep_their_own_sets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 40)) * 2
    top_k = np.array([0, 5, 1, 12, 0])
    top_p = np.array([0.9, 1.0, 1.0, 0.5, 0.3], np.float32)
    out = np.asarray(sampling.kept(jnp.asarray(logits, jnp.float32), jnp.asarray(top_k), jnp.asarray(top_p)))
    for r in range(5):
        assert set(np.flatnonzero(out[r]).tolist()) == _kept_by_definition(logits[r], top_k[r], top_p[r]), r


def test_the_kept_set_at_the_image_default_on_a_code_sized_row():
    """Top-2000 of 8,196 code logits (with masked ids among them) and top-p on top: the set the
    threshold search keeps is the definition's, row by row."""
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(4, 8196)) * 3).astype(np.float32)
    logits[:, :4] = sampling.NEG_INF  # grid ids a body row may not draw
    logits[1, 100:] = sampling.NEG_INF  # fewer real ids than the top-k
    top_k, top_p = np.array([2000, 2000, 0, 50]), np.array([1.0, 1.0, 0.9, 0.6], np.float32)
    out = np.asarray(sampling.kept(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    for r in range(4):
        want = {i for i in _kept_by_definition(logits[r].astype(np.float64), top_k[r], top_p[r])
                if logits[r, i] > sampling.NEG_INF / 2}
        assert set(np.flatnonzero(out[r]).tolist()) == want, r


def test_a_row_draws_the_same_token_from_the_codes_or_the_whole_vocabulary():
    """A step that may only draw codes samples from the code logits alone: the noise of token i is
    the same in a narrow and a wide draw, so the token is too (a batch of N equals N runs)."""
    rng = np.random.default_rng(4)
    narrow = rng.normal(size=(64, 40)).astype(np.float32)
    wide = np.concatenate([narrow, np.full((64, 200), sampling.NEG_INF, np.float32)], axis=1)
    keys = jax.vmap(jax.random.key)(jnp.arange(64))
    args = (jnp.full(64, 1.0), jnp.full(64, 10), jnp.full(64, 0.9))
    a = np.asarray(sampling.sample(jnp.asarray(narrow), keys, *args))
    b = np.asarray(sampling.sample(jnp.asarray(wide), keys, *args))
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) > 3  # draws, not the argmax


def test_greedy_is_argmax_whatever_top_k_and_top_p():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    keys = jax.vmap(jax.random.key)(jnp.arange(6))
    tok = sampling.sample(jnp.asarray(logits), keys, jnp.zeros(6), jnp.array([0, 1, 5, 0, 3, 50]),
                          jnp.array([1.0, 1.0, 0.2, 0.9, 0.5, 1.0]))
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
                                                     (0.5, 5, 0.9), (0.5, 0, 0.75), (2.0, 0, 0.8)])
def test_draws_follow_softmax_at_the_temperature_over_the_kept_set(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0], np.float32)
    n = 4000
    keys = jax.vmap(jax.random.key)(jnp.arange(n))
    tok = sampling.sample(jnp.broadcast_to(jnp.asarray(logits), (n, 8)), keys, jnp.full(n, temperature),
                          jnp.full(n, top_k), jnp.full(n, top_p, jnp.float32))
    counts = np.bincount(np.asarray(tok), minlength=8).astype(float)
    kept = sorted(_kept_by_definition(logits, top_k, top_p, temperature))
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
                          jnp.ones(n))
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

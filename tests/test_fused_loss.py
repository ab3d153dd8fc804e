"""`fused_lm_loss` (the head and the loss over predicting positions only, gradients computed in
the forward pass) against `lm_loss` on the full logits `hidden @ kernel` and JAX's autodiff of
it: the value, every metric, and the gradients of the hidden states and the kernel, on packed rows
with prompts, padding and a length that is not a multiple of the chunk; chunks where no row
predicts are skipped. Tolerance: float32, 1e-5 relative (sums in another order); bfloat16 compute,
2e-2 (one bfloat16 rounding of the logits' operands and gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitoken_jax.models.loss import fused_lm_loss, lm_loss
from unitoken_jax.tokenizer import layout


def _batch(b=3, length=200, d=32, v=300, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, length), np.int32)
    seg[0, :90], seg[0, 90:170] = 1, 2
    seg[1, :length] = 1
    seg[2, :40] = 1  # mostly padding: the last chunks of every row but 1 predict nothing
    labels = rng.integers(0, v, (b, length)).astype(np.int32)
    labels[rng.random((b, length)) < 0.4] = -100  # prompts and pictures given as input
    labels[1, 120:] = -100  # row 1 predicts nothing after 120: with the others, later chunks are skipped
    labels[seg == 0] = -100
    gen = rng.random((b, length)) < 0.5
    hidden = rng.normal(size=(b, length, d)).astype(np.float32)
    kernel = (rng.normal(size=(d, v)) * 0.3).astype(np.float32)
    return jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(labels), jnp.asarray(seg), jnp.asarray(gen)


@pytest.mark.parametrize("chunk", [64, 37, 512])
def test_equals_lm_loss_on_full_logits(chunk):
    hidden, kernel, labels, seg, gen = _batch()
    z = 1e-2

    def full(h, w):
        return lm_loss(jnp.einsum("BLD,DV->BLV", h, w), labels, seg, z, gen)

    def fused(h, w):
        return fused_lm_loss(h, w, labels, seg, z, gen, chunk=chunk)

    (want, want_m), want_g = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, kernel)
    (got, got_m), got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(hidden, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert set(got_m) == set(want_m)
    for k in want_m:
        np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, err_msg=k)
    for name, w, g in zip(("hidden", "kernel"), want_g, got_g):
        np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max(), rtol=0, err_msg=name)


def test_default_generation_split_and_bfloat16():
    hidden, kernel, labels, seg, _ = _batch(v=8400, seed=1)  # ids 4-8198 are image codes, 0-3 and 8199+ text
    labels = jnp.where((labels >= 0) & (labels % 3 == 0), 8199 + labels % 200, labels)  # a third text targets
    assert 0 < int(jnp.sum(layout.is_image_id(labels, jnp) & (labels >= 0))) < int(jnp.sum(labels >= 0))
    z = 1e-4

    def full(h, w):
        return lm_loss(jnp.einsum("BLD,DV->BLV", h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).astype(jnp.float32),
                       labels, seg, z)

    def fused(h, w):
        return fused_lm_loss(h, w, labels, seg, z, chunk=48, dtype=jnp.bfloat16)

    (want, want_m), want_g = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, kernel)
    (got, got_m), got_g = jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)(hidden, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5)  # the same bfloat16 logits, summed in float32
    for k in ("tokens_understanding", "tokens_generation"):
        assert int(got_m[k]) == int(want_m[k])
    for name, w, g in zip(("hidden", "kernel"), want_g, got_g):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=2e-2 * np.abs(w).max(), rtol=0, err_msg=name)


def test_a_frozen_head_gets_no_kernel_gradient_and_the_same_hidden_one():
    hidden, kernel, labels, seg, gen = _batch(seed=2)
    grad = lambda kg: jax.grad(lambda h, w: fused_lm_loss(h, w, labels, seg, 1e-3, gen, chunk=64,  # noqa: E731
                                                          kernel_grad=kg)[0], argnums=(0, 1))(hidden, kernel)
    (dh, dk), (dh_frozen, dk_frozen) = grad(True), grad(False)
    assert not np.any(dk_frozen) and np.any(dk)
    np.testing.assert_array_equal(dh_frozen, dh)


@pytest.mark.parametrize("rows, groups", [(8, 4), (6, 6)])
def test_on_a_mesh_each_devices_rows_form_one_group(rows, groups):
    """Over a mesh the predicting positions are gathered per device (its rows joined into one
    group), never across devices; where the batch does not split evenly every row is a group.
    Same value and gradients as the full logits either way."""
    from unitoken_jax.models.loss import batch_groups
    from unitoken_jax.sharding import make_mesh, mesh_context

    hidden, kernel, labels, seg, gen = _batch(b=rows, length=96, seed=3)
    seg = seg.at[3:, :].set(jnp.where(jnp.arange(96) < 50, 1, 2))
    labels = jnp.where(seg == 0, -100, labels)
    z = 1e-2
    full = lambda h, w: lm_loss(jnp.einsum("BLD,DV->BLV", h, w), labels, seg, z, gen)  # noqa: E731
    fused = lambda h, w: fused_lm_loss(h, w, labels, seg, z, gen, chunk=40)  # noqa: E731
    (want, _), want_g = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, kernel)
    assert batch_groups(rows) == 1  # no mesh: the whole batch is one group
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    with mesh_context(mesh):
        assert batch_groups(rows) == groups
        (got, _), got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(hidden, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, w, g in zip(("hidden", "kernel"), want_g, got_g):
        np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max(), rtol=0, err_msg=name)

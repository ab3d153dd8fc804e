"""The optimizer and the train step: the loss falls, frozen parts stay put and carry no state,
the ViT's learning-rate scale, warm-up + half-cosine, accumulation, and non-finite steps skipped."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unitoken_jax
from unitoken_jax.configs.model import get_config
from unitoken_jax.train.optimizer import (OptimizerConfig, learning_rate_schedule, make_optimizer, param_labels,
                                          trainable_mask)
from unitoken_jax.train.step import init_state, make_train_step


def _config():
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    return cfg.replace(decoder=dataclasses.replace(cfg.decoder, dropout=0.05))


def _batch(seed=0, b=4, length=40):
    """Understanding rows (an image in the prompt, a labelled text answer) and generation rows
    (labelled image codes), with a fixed pattern so that there is something to learn."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((b, length), np.int32)
    labels = np.full((b, length), -100, np.int32)
    cont = np.zeros((b, length), bool)
    index = np.zeros((b, length), np.int32)
    for r in range(b):
        if r % 2 == 0:  # understanding: 16 continuous slots, then an answer that repeats a motif
            tokens[r, 1:17], cont[r, 1:17], index[r, 1:17] = 0, True, np.arange(16) + 16 * (r // 2)
            answer = np.tile([8900 + r, 8901 + r, 8902 + r], 8)[: length - 17]
            tokens[r, 17:] = labels[r, 17:] = answer
        else:  # generation: a periodic run of code ids
            codes = np.tile(rng.integers(4, 8196, 4), 10)[:length]
            tokens[r] = labels[r] = codes
    return dict(tokens=jnp.asarray(tokens), labels=jnp.asarray(labels),
                positions=jnp.broadcast_to(jnp.arange(length), (b, length)),
                segment_ids=jnp.ones((b, length), jnp.int32), is_continuous=jnp.asarray(cont),
                feature_index=jnp.asarray(index),
                pixels=jnp.asarray(np.random.default_rng(1).normal(size=(b // 2, 56, 56, 3)), jnp.float32))


def _setup(opt_config, seed=0):
    cfg = _config()
    params = unitoken_jax.UniTokenModel.random(cfg, seed=seed).params
    tx = make_optimizer(opt_config, params)
    step = jax.jit(make_train_step(cfg, tx, trainable_mask(params, opt_config.trainable),
                                   learning_rate_schedule(opt_config), opt_config.accumulation_steps))
    return init_state(params, tx), step


def test_a_tiny_model_learns_a_mixed_batch():
    state, step = _setup(OptimizerConfig(learning_rate=3e-3, total_steps=40, warmup_fraction=0.05))
    batch = _batch()
    losses, parts = [], []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        parts.append((float(m["ce_understanding"]), float(m["ce_generation"])))
    assert losses[-1] < 0.5 * losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[15:20]) < np.mean(losses[:5])  # falls steadily
    assert parts[-1][0] < parts[0][0] and parts[-1][1] < parts[0][1]  # both halves learn


def test_stage_one_trains_only_vit_and_adapter():
    config = OptimizerConfig(learning_rate=1e-3, vit_lr_scale=1e-2, total_steps=10, trainable="vision")
    state, step = _setup(config)
    labels = param_labels(state.params, "vision")
    assert set(jax.tree.leaves(labels)) == {"frozen", "vit", "train"}
    assert labels["vit"]["patch_embedding"]["kernel"] == "frozen"  # as the reference forces
    before = state.params
    state, _ = step(state, _batch())
    state, _ = step(state, _batch(1))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, before)
    assert not any(jax.tree.leaves(moved["decoder"]))
    assert not moved["vit"]["patch_embedding"]["kernel"] and not moved["vit"]["position_embedding"]
    assert all(jax.tree.leaves(moved["adapter"])) and moved["vit"]["layers"]["fc1"]["kernel"]
    # no optimizer state for frozen parameters: only adapter and ViT moments exist
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size") and x.ndim > 0)
    n_trainable = sum(p.size for p, l in zip(jax.tree.leaves(state.params), jax.tree.leaves(labels)) if l != "frozen")
    assert n_state == 2 * n_trainable


def test_vit_learning_rate_scale():
    def vit_update(scale):
        state, step = _setup(OptimizerConfig(learning_rate=1e-3, vit_lr_scale=scale, total_steps=10,
                                             warmup_fraction=0.0, weight_decay=0.0))
        new, _ = step(state, _batch())
        k = ("vit", "layers", "fc1", "kernel")
        a, b = new.params, state.params
        for key in k:
            a, b = a[key], b[key]
        return float(jnp.abs(a - b).mean())

    assert vit_update(0.1) == pytest.approx(0.1 * vit_update(1.0), rel=1e-3)


def test_schedule_is_linear_warmup_then_half_cosine():
    config = OptimizerConfig(learning_rate=2e-3, total_steps=1000, warmup_fraction=0.01)
    schedule = learning_rate_schedule(config)
    for t in (0, 5, 10, 200, 505, 999, 1000):
        expected = 2e-3 * t / 10 if t < 10 else 2e-3 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 990))
        assert float(schedule(t)) == pytest.approx(expected, abs=1e-9)


def test_accumulating_two_halves_equals_one_full_batch():
    full = _batch()
    halves = [jax.tree.map(lambda a: a[:2], full), jax.tree.map(lambda a: a[2:], full)]
    halves[1]["pixels"] = full["pixels"][1:]
    halves[1]["feature_index"] = halves[1]["feature_index"] - 16 * halves[1]["is_continuous"]
    halves[0]["pixels"] = full["pixels"][:1]
    base = dict(learning_rate=1e-3, total_steps=10, warmup_fraction=0.0)
    cfg = _config().replace(decoder=dataclasses.replace(_config().decoder, dropout=0.0))
    params = unitoken_jax.UniTokenModel.random(cfg, seed=0).params

    def run(opt, batches):
        tx = make_optimizer(opt, params)
        step = jax.jit(make_train_step(cfg, tx, trainable_mask(params)))
        state = init_state(params, tx)
        for b in batches:
            state, _ = step(state, b)
        return state.params

    one = run(OptimizerConfig(**base), [full])
    two = run(OptimizerConfig(**base, accumulation_steps=2), halves)
    # the two halves hold the same number of labelled tokens, so the mean of their means is the mean
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), one, two)


def test_a_non_finite_step_changes_nothing_but_its_counters():
    state, step = _setup(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    state, _ = step(state, _batch())
    bad = _batch()
    bad["pixels"] = bad["pixels"].at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1 and int(new.nonfinite_in_a_row) == 1 and int(new.nonfinite_total) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.opt_state, state.opt_state)
    new, metrics = step(new, _batch())
    assert int(metrics["skipped"]) == 0 and int(new.nonfinite_in_a_row) == 0 and int(new.nonfinite_total) == 1

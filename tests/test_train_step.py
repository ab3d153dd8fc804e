"""The optimizer and the train step: the loss falls, frozen parts stay put and carry no state,
the ViT's learning-rate scale, warm-up + half-cosine, accumulation, and non-finite steps skipped."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    """The train step's ViT update at scale 0.1 is a tenth of the one at scale 1 (one Adam step,
    no weight decay, the full rate from step 0), and it is not zero."""
    def vit_update(scale):
        state, step = _setup(OptimizerConfig(learning_rate=1e-3, vit_lr_scale=scale, total_steps=10,
                                             warmup_fraction=0.0, weight_decay=0.0))
        new, _ = step(state, _batch())
        k = ("vit", "layers", "fc1", "kernel")
        a, b = new.params, state.params
        for key in k:
            a, b = a[key], b[key]
        return float(jnp.abs(a - b).mean())

    full = vit_update(1.0)
    assert full > 1e-4  # about lr: every weight moves
    assert vit_update(0.1) == pytest.approx(0.1 * full, rel=1e-3)


@pytest.mark.parametrize("trainable", ["all", "vision"])
def test_unrolled_layers_train_like_scanned_ones_from_the_same_state(trainable):
    """`model.scan_layers=False` (faster on a CPU) trains the same state in the scanned layout:
    the step unrolls the layers inside, so losses, metrics and the updated parameters (and Adam's
    moments) equal the scanned step's after two steps, frozen parts included. (No dropout: the two
    layouts split the dropout key per layer differently.)"""
    config = OptimizerConfig(learning_rate=1e-3, total_steps=10, warmup_fraction=0.0, trainable=trainable)
    cfg = _config()
    cfg = cfg.replace(decoder=dataclasses.replace(cfg.decoder, dropout=0.0))
    params = unitoken_jax.UniTokenModel.random(cfg, seed=3).params
    tx = make_optimizer(config, params)
    mask = trainable_mask(params, trainable)
    out = {}
    for scan in (True, False):
        step = jax.jit(make_train_step(cfg.replace(scan_layers=scan), tx, mask))
        state = init_state(params, tx, seed=5)
        metrics = [step(state, _batch(0))]
        metrics.append(step(metrics[0][0], _batch(1)))
        out[scan] = metrics
    for (s_state, s_m), (u_state, u_m) in zip(out[True], out[False]):
        assert jax.tree.structure(u_state.params) == jax.tree.structure(s_state.params)  # scanned layout kept
        for k in ("loss", "grad_norm", "ce_understanding", "ce_generation"):
            np.testing.assert_allclose(float(u_m[k]), float(s_m[k]), rtol=2e-5, err_msg=k)
        # each leaf's update and moments within 1 % of the leaf's largest, or of a thousandth of
        # the tree's largest (Adam turns a rounding difference of a near-zero gradient into an
        # update of up to the learning rate)
        moved = lambda st: jax.tree.map(lambda a, b: a - b, st.params, params)  # noqa: E731
        for unrolled, scanned in ((moved(u_state), moved(s_state)), (u_state.opt_state, s_state.opt_state)):
            leaves = [(jax.tree_util.keystr(path), np.asarray(a, np.float64), np.asarray(b, np.float64))
                      for a, (path, b) in zip(jax.tree.leaves(unrolled), jax.tree.leaves_with_path(scanned))]
            floor = 1e-3 * max(np.abs(b).max() for _, _, b in leaves)
            for name, a, b in leaves:
                assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max() + floor, name
    assert float(out[True][1][1]["loss"]) != float(out[True][0][1]["loss"])  # the second step saw another batch


# --- the optimizer against AdamW written out in NumPy ------------------------------------------
def _numpy_adamw(params, micro_grads, config: OptimizerConfig):
    """The reference's optimizer from its definition: every `accumulation_steps` micro-batches,
    the mean of their gradients, clipped to a global norm of `grad_clip`, drives AdamW (torch's:
    bias-corrected moments, decoupled weight decay lr * wd * p) with the rate of the schedule
    (linear warm-up, half cosine) times the ViT scale for `vit` parameters; frozen ones stay."""
    flat = {"/".join(path): np.array(v, np.float64) for path, v in _leaves(params)}
    m = {k: np.zeros_like(v) for k, v in flat.items()}
    v2 = {k: np.zeros_like(v) for k, v in flat.items()}
    k_acc = config.accumulation_steps
    warmup = int(round(config.total_steps * config.warmup_fraction))
    for t in range(len(micro_grads) // k_acc):
        group = micro_grads[t * k_acc:(t + 1) * k_acc]
        g = {key: np.mean([dict(("/".join(p), np.array(x, np.float64)) for p, x in _leaves(mg))[key]
                           for mg in group], axis=0) for key in flat}
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        if norm > config.grad_clip:
            g = {key: x * config.grad_clip / norm for key, x in g.items()}
        if t < warmup:
            lr = config.learning_rate * t / warmup
        else:
            lr = config.learning_rate * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (config.total_steps - warmup)))
        for key in flat:
            if key.startswith(("vit/patch_embedding", "vit/position_embedding")):
                continue
            rate = lr * (config.vit_lr_scale if key.startswith("vit/") else 1.0)
            m[key] = config.b1 * m[key] + (1 - config.b1) * g[key]
            v2[key] = config.b2 * v2[key] + (1 - config.b2) * g[key] ** 2
            m_hat, v_hat = m[key] / (1 - config.b1 ** (t + 1)), v2[key] / (1 - config.b2 ** (t + 1))
            flat[key] = flat[key] - rate * (m_hat / (np.sqrt(v_hat) + 1e-8) + config.weight_decay * flat[key])
    return flat


def _leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _toy_params():
    rng = np.random.default_rng(0)
    return {"decoder": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
            "adapter": {"b": rng.normal(size=(5,)).astype(np.float32)},
            "vit": {"layers": {"w": rng.normal(size=(4, 2)).astype(np.float32)},
                    "patch_embedding": {"kernel": rng.normal(size=(2,)).astype(np.float32)}}}


def _toy_grads(norms, seed=1):
    """Micro-batch gradients, in pairs whose mean has the given global norms (frozen leaves get 0,
    as the train step's stop_gradient gives them). The two of a pair differ in size, as halves
    with unequal token counts do."""
    rng = np.random.default_rng(seed)
    out = []
    for norm in norms:
        g = {"decoder": {"w": rng.normal(size=(3, 4))}, "adapter": {"b": rng.normal(size=(5,))},
             "vit": {"layers": {"w": rng.normal(size=(4, 2))}, "patch_embedding": {"kernel": np.zeros(2)}}}
        scale = norm / np.sqrt(sum(np.sum(x ** 2) for _, x in _leaves(g)))
        mean = jax.tree.map(lambda x: x * scale, g)
        skew = jax.tree.map(lambda x: 0.5 * x, mean)  # micro-batches 1.5x and 0.5x the mean
        out += [jax.tree.map(lambda a, b: (a + b).astype(np.float32), mean, skew),
                jax.tree.map(lambda a, b: (a - b).astype(np.float32), mean, skew)]
    return out


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_optimizer_is_adamw_with_clipping_vit_scale_schedule_and_mean_accumulation(accumulation):
    """Gradient norms that cross the clipping threshold only when the micro-batch gradients are
    summed (0.9 and 0.3 of it for their mean) make the steps' relative sizes, which Adam sees,
    depend on averaging; the ViT scale, the frozen embeddings, weight decay and a warm-up with
    the cosine after it are all in play."""
    config = OptimizerConfig(learning_rate=0.1, vit_lr_scale=0.1, total_steps=8, warmup_fraction=0.25,
                             weight_decay=0.1, grad_clip=1.0, accumulation_steps=accumulation)
    params = _toy_params()
    grads = _toy_grads([0.9, 0.3, 0.6, 0.2, 0.9, 0.5])
    if accumulation == 1:  # each micro gradient is a step of its own: use the pairs' means
        grads = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in range(0, len(grads), 2)]
    tx = make_optimizer(config, params)
    state, ours = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
    expected = _numpy_adamw(params, grads, config)
    for path, value in _leaves(ours):
        np.testing.assert_allclose(np.asarray(value), expected["/".join(path)], rtol=2e-5, atol=2e-6,
                                   err_msg="/".join(path))
    moved = np.abs(np.asarray(ours["vit"]["layers"]["w"]) - params["vit"]["layers"]["w"]).max()
    assert moved > 1e-3 and np.array_equal(ours["vit"]["patch_embedding"]["kernel"],
                                           params["vit"]["patch_embedding"]["kernel"])


@pytest.mark.parametrize("trainable", ["lora", "vision"])
def test_accumulation_keeps_no_running_mean_of_frozen_parameters(trainable):
    """`optax.MultiSteps` around the whole optimizer kept a float32 mean of every gradient, frozen
    ones too: 28 GiB for the 7B LoRA config at accumulation_steps=4 (0.3 GiB without). Its state
    now holds the trainable leaves' moments and mean, and nothing of a frozen one."""
    from unitoken_jax.models.config import LoraConfig
    from unitoken_jax.models.unitoken import abstract_params

    config = _config()
    if trainable == "lora":
        config = config.replace(lora=LoraConfig(rank=2, targets=("q_proj", "v_proj")))
    params = abstract_params(config)
    mask = trainable_mask(params, trainable)
    trained = sum(p.size for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
    assert 0 < trained < sum(p.size for p in jax.tree.leaves(params)) / 3
    for k, copies in ((1, 2), (4, 3)):  # Adam's two moments, and the accumulated mean
        tx = make_optimizer(OptimizerConfig(accumulation_steps=k, trainable=trainable), params)
        state = jax.eval_shape(tx.init, params)
        assert sum(leaf.size for leaf in jax.tree.leaves(state) if leaf.ndim) == copies * trained, k


def test_schedule_is_linear_warmup_then_half_cosine():
    config = OptimizerConfig(learning_rate=2e-3, total_steps=1000, warmup_fraction=0.01)
    schedule = learning_rate_schedule(config)
    for t in (0, 5, 10, 200, 505, 999, 1000):
        expected = 2e-3 * t / 10 if t < 10 else 2e-3 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 990))
        assert float(schedule(t)) == pytest.approx(expected, abs=1e-9)
    no_warmup = learning_rate_schedule(OptimizerConfig(learning_rate=2e-3, total_steps=1000, warmup_fraction=0.0))
    for t in (0, 1, 500, 1000):  # the full rate at step 0
        assert float(no_warmup(t)) == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * t / 1000)), abs=1e-9)


def test_accumulating_two_halves_with_equal_token_counts_equals_one_full_batch():
    """Accumulation averages the micro-batches' gradients (each the mean over its own tokens, as
    the reference's solver does); with equal token counts that is the full batch's gradient, so
    the parameters after the step are the same, and they moved."""
    full = _batch()
    halves = [jax.tree.map(lambda a: a[:2], full), jax.tree.map(lambda a: a[2:], full)]
    halves[1]["pixels"] = full["pixels"][1:]
    halves[1]["feature_index"] = halves[1]["feature_index"] - 16 * halves[1]["is_continuous"]
    halves[0]["pixels"] = full["pixels"][:1]
    counts = [int(np.sum(np.asarray(h["labels"])[:, 1:] >= 0)) for h in halves]
    assert counts[0] == counts[1]
    base = dict(learning_rate=1e-3, total_steps=10, warmup_fraction=0.0)
    cfg = _config().replace(decoder=dataclasses.replace(_config().decoder, dropout=0.0))
    params = unitoken_jax.UniTokenModel.random(cfg, seed=0).params

    def run(opt, batches):
        tx = make_optimizer(opt, params)
        step = jax.jit(make_train_step(cfg, tx, trainable_mask(params), accumulation_steps=opt.accumulation_steps))
        state, logged = init_state(params, tx), []
        for b in batches:
            state, metrics = step(state, b)
            logged.append(jax.device_get(metrics))
        return state.params, logged

    (one, full_metrics), (two, micro_metrics) = run(OptimizerConfig(**base), [full]), \
        run(OptimizerConfig(**base, accumulation_steps=2), halves)
    # the logged grad_norm is the clipped gradient's: the halves' mean, which is the full batch's,
    # at the micro-batch that completes the update; each half's own norm is logged beside it
    assert [int(m["updates"]) for m in micro_metrics] == [0, 1]
    np.testing.assert_allclose(micro_metrics[1]["grad_norm"], full_metrics[0]["grad_norm"], rtol=1e-4)
    micro_norms = [float(m["micro_batch_grad_norm"]) for m in micro_metrics]
    assert min(micro_norms) > 1.05 * float(full_metrics[0]["grad_norm"])  # the halves' disagree
    # every weight moves by about lr = 1e-3; float error, which Adam magnifies where a gradient is
    # near 0, stays within 2 % of that
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), one, two)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(params)))
    assert moved > 5e-4


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_non_finite_step_changes_nothing_but_its_counters(accumulation):
    """A skipped batch leaves the parameters and the optimizer (its accumulation too) as they were;
    the logged learning rate is the one of the update a batch goes into, which a skip does not
    advance (it was one update ahead after every skip)."""
    config = OptimizerConfig(learning_rate=1e-3, total_steps=10, warmup_fraction=0.5, accumulation_steps=accumulation)
    schedule = learning_rate_schedule(config)
    state, step = _setup(config)
    rates = []
    for _ in range(accumulation):  # the first update
        state, metrics = step(state, _batch())
        rates.append(float(metrics["learning_rate"]))
    bad = _batch()
    bad["pixels"] = bad["pixels"].at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1 and int(new.nonfinite_in_a_row) == 1 and int(new.nonfinite_total) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.opt_state, state.opt_state)
    for _ in range(accumulation):  # the second update, after the skip
        new, metrics = step(new, _batch())
        rates.append(float(metrics["learning_rate"]))
    assert int(metrics["skipped"]) == 0 and int(new.nonfinite_in_a_row) == 0 and int(new.nonfinite_total) == 1
    want = [float(schedule(u)) for u in (0, 1) for _ in range(accumulation)]
    assert want[0] < want[-1] < float(schedule(2))  # warming up: each update's rate differs
    np.testing.assert_allclose(rates, want, rtol=1e-6)


def test_the_compiled_step_updates_parameters_and_moments_without_copying_them():
    """The update runs behind the finite-step conditional (a skipped step keeps the old state, see
    above), so with the state donated, as the training program donates it, XLA writes each
    parameter and moment in place: the compiled step copies no array of the state. Computing the
    update and then selecting it against the old state kept both live, and XLA copied ~80 of the
    benchmark model's moments every step. (With accumulation, `optax.MultiSteps` itself computes
    the inner update every micro-batch and selects it, and its accumulator is still copied.)"""
    config = OptimizerConfig(learning_rate=1e-3, total_steps=10)  # no accumulation
    cfg = _config()
    params = unitoken_jax.UniTokenModel.random(cfg, seed=0).params
    tx = make_optimizer(config, params)
    step = jax.jit(make_train_step(cfg, tx, trainable_mask(params, config.trainable), learning_rate_schedule(config),
                                   config.accumulation_steps), donate_argnums=0)
    text = step.lower(init_state(params, tx), _batch()).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    copies = [line.strip()[:160] for line in entry.splitlines()
              if re.search(r"= [a-z0-9]+\[[0-9,]+\]\S* copy\(%state_", line)]  # non-scalar state arrays
    assert not copies, copies


def test_vision_adapters_learn_at_the_vit_rate():
    """With `trainable="lora"`, adapters on the SigLIP tower (lora.targets "vision") take
    `vit_lr_scale` as its own weights do; the decoder's adapters keep the full rate. One Adam step
    from fresh adapters (B zero, so only B moves, each entry by about the rate)."""
    from flax import traverse_util

    from unitoken_jax.models.config import LoraConfig

    def b_updates(scale):
        cfg = _config().replace(lora=LoraConfig(rank=4, alpha=8, targets=("q_proj", "vision")))
        params = unitoken_jax.UniTokenModel.random(cfg, seed=0).params
        opt = OptimizerConfig(learning_rate=1e-3, vit_lr_scale=scale, total_steps=10, warmup_fraction=0.0,
                              weight_decay=0.0, trainable="lora")
        tx = make_optimizer(opt, params)
        step = jax.jit(make_train_step(cfg, tx, trainable_mask(params, "lora"), learning_rate_schedule(opt)))
        new, _ = step(init_state(params, tx), _batch())
        moved = {}
        for path, b in traverse_util.flatten_dict(new.params).items():
            if path[-1] == "lora_b":
                before = traverse_util.flatten_dict(params)[path]
                moved.setdefault(path[0], []).append(float(jnp.abs(b - before).mean()))
        return {k: float(np.mean(v)) for k, v in moved.items()}

    labels = traverse_util.flatten_dict(param_labels(unitoken_jax.UniTokenModel.random(
        _config().replace(lora=LoraConfig(rank=4, alpha=8, targets=("q_proj", "vision"))), seed=0).params, "lora"))
    assert {p[0] for p, l in labels.items() if l == "vit"} == {"vit"}
    assert all(l == "vit" for p, l in labels.items() if p[0] == "vit" and p[-1] in ("lora_a", "lora_b"))
    full, tenth = b_updates(1.0), b_updates(0.1)
    assert set(full) == {"decoder", "vit"} and full["vit"] > 1e-4 and full["decoder"] > 1e-4
    assert tenth["vit"] == pytest.approx(0.1 * full["vit"], rel=1e-2)
    assert tenth["decoder"] == pytest.approx(full["decoder"], rel=1e-6)

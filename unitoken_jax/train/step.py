"""The train state and one pure, jitted training step.

Frozen parameters are wrapped in `stop_gradient`, so no weight gradient is ever computed for
them (stage I backpropagates through the frozen decoder into the ViT without the decoder's
weight gradients). A step whose loss or gradient is not finite changes nothing but its counters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.models.layers import lora_dropout
from unitoken_jax.models.loss import fused_lm_loss
from unitoken_jax.models.unitoken import UniToken, run_layout
from unitoken_jax.train.optimizer import accumulation_state


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array


def init_state(params, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, tx.init(params), jax.random.key(seed), zero, zero)


def make_train_step(config: UniTokenConfig, tx: optax.GradientTransformation, mask, schedule=None,
                    accumulation_steps: int = 1, feature_blocks: int = 1):
    """`train_step(state, batch) -> (state, metrics)`; jit it with shardings and donate the state.

    `batch` holds tokens, labels, positions, segment_ids and optionally is_continuous,
    feature_index, pixels and generation (see `UniTokenModel.forward`).

    The state's parameters are always in the scanned layout (a leading layers axis: what
    checkpoints, shardings and the optimizer's moments are laid out for); with
    `config.scan_layers=False` the step slices them into one tree per layer inside the compiled
    step, and the gradient of that slicing stacks the layers' gradients back."""
    module = UniToken(config)
    head = mask["decoder"]["lm_head"]
    head_trains = bool(head["kernel"]) or bool(head.get("lora_b", False))

    def loss_fn(params, batch, rng):
        params = jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)
        hidden, _ = module.apply({"params": run_layout(params, config)}, batch["tokens"], batch["positions"],
                                 batch["segment_ids"], batch.get("is_continuous"), batch.get("feature_index"),
                                 batch.get("pixels"), deterministic=False, rngs={"dropout": rng}, return_hidden=True,
                                 feature_blocks=feature_blocks)
        # the head and the loss together, on the predicting positions only (no [B, L, V] logits)
        hidden, kernel = head_inputs(hidden, params["decoder"]["lm_head"], config, jax.random.fold_in(rng, _HEAD_RNG))
        return fused_lm_loss(hidden, kernel, batch["labels"],
                             batch["segment_ids"], config.z_loss_weight, batch.get("generation"),
                             chunk=config.loss_chunk, dtype=config.dtype, kernel_grad=head_trains)

    def apply_update(params, opt_state, grads):
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # a non-finite step keeps the old state: the update runs behind a conditional instead of being
        # computed and then selected against the old state, which kept old and new of every parameter
        # and moment live at once (XLA copied ~80 of those buffers a step; without the copies the
        # CPU train-step benchmark's step took 0.97x the time, interleaved runs)
        new_params, new_opt_state = jax.lax.cond(ok, apply_update, _unchanged, state.params, state.opt_state, grads)
        bad = jnp.where(ok, 0, 1).astype(jnp.int32)
        # the update this batch goes into: micro-batches kept so far (a skipped one, rolled back, did
        # not count towards the accumulation nor advance the optimizer's schedule) // accumulation
        update = (state.step - state.nonfinite_total) // accumulation_steps
        old_opt_state = state.opt_state
        state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                              nonfinite_in_a_row=jnp.where(ok, 0, state.nonfinite_in_a_row + 1),
                              nonfinite_total=state.nonfinite_total + bad)
        metrics = {**metrics, "grad_norm": grad_norm, "skipped": bad, "nonfinite_in_a_row": state.nonfinite_in_a_row}
        if accumulation_steps > 1:
            trainable = jax.tree.map(lambda g, m: g if m else optax.MaskedNode(), grads, mask)
            metrics.update(accumulated_grad_norm(trainable, accumulation_state(old_opt_state), accumulation_steps,
                                                 ok))
        if schedule is not None:
            metrics["learning_rate"] = schedule(update)  # the rate that update applies
        return state, metrics

    return train_step


def _unchanged(params, opt_state, grads):
    return params, opt_state


def accumulated_grad_norm(grads, opt_state: optax.MultiStepsState, k: int, ok) -> dict:
    """With accumulation, the gradient that is clipped and applied is the mean of k micro-batches'
    (`optax.MultiSteps`'s running mean `acc + (g - acc) / (n + 1)`, written as it writes it: XLA
    computes it once, and the compiled step's memory and FLOPs on CPU are those without it):
    "grad_norm" is its norm at the micro-batch that completes an update and "updates" 1 there (0
    elsewhere, and for a skipped micro-batch), which the logging window averages over
    (`metrics.Window.flush`); "micro_batch_grad_norm" is each micro-batch's own. `grads`: the
    trainable leaves' (what the accumulation holds; the frozen ones' gradients are zero)."""
    n = opt_state.mini_step
    mean = jax.tree.map(lambda g, acc: acc + (g.astype(acc.dtype) - acc) / (n + 1), grads, opt_state.acc_grads)
    completes = (n == k - 1) & ok
    return {"micro_batch_grad_norm": optax.tree.norm(grads), "grad_norm": optax.tree.norm(mean),
            "updates": completes.astype(jnp.int32)}


_HEAD_RNG = 0x4EAD  # folded into the step's dropout key for the head adapter's dropout


def head_inputs(hidden, head: dict, config: UniTokenConfig, rng=None):
    """(hidden states, kernel) for the fused loss. A LoRA head with dropout, in training (`rng`):
    its update `scaling * B(A(dropout(h)))` sees another input than the kernel, so it cannot be
    folded into one kernel (`head_kernel`); it goes in as `rank` more features instead,
    `[h, scaling * A(dropout(h))] @ [[kernel], [B]]`, which is the same sum (and costs a copy of the
    hidden states). Otherwise the folded kernel."""
    if "lora_a" not in head or rng is None or config.lora.dropout == 0:
        return hidden, head_kernel(head, config)
    dtype = jnp.dtype(config.dtype)
    dropped = lora_dropout(hidden.astype(dtype), config.lora.dropout, rng)
    extra = jnp.einsum("BLD,Dr->BLr", dropped, head["lora_a"].astype(dtype)) * jnp.asarray(config.lora.scaling, dtype)
    kernel = jnp.concatenate([head["kernel"].astype(dtype), head["lora_b"].astype(dtype)], axis=0)
    return jnp.concatenate([hidden.astype(dtype), extra], axis=-1), kernel


def head_kernel(head: dict, config: UniTokenConfig):
    """The LM head's kernel, with its LoRA update folded in when it has one (the fused loss takes
    one [D, V] kernel; the gradient reaches the factors through this sum)."""
    if "lora_a" not in head:
        return head["kernel"]
    delta = jnp.einsum("Dr,rV->DV", head["lora_a"], head["lora_b"]) * config.lora.scaling
    return (head["kernel"].astype(jnp.float32) + delta).astype(jnp.dtype(config.dtype))

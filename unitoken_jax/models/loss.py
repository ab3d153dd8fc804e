"""Next-token cross-entropy and z-loss on labelled positions, split into understanding and
generation parts.

`labels [B, L]` are aligned with the inputs, as in the reference: labels[b, t] is the token at
position t if it is to be predicted, negative otherwise. The logits at t predict labels at t+1,
and only when t+1 is in the same packed segment as t. The z-loss, logsumexp(logits)^2, is
averaged over exactly the same (shifted) positions as the cross-entropy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unitoken_jax.models.layers import accumulation
from unitoken_jax.sharding import constrain, logical_to_mesh_spec, mesh_ways
from unitoken_jax.tokenizer import layout


def is_generation_target(targets, previous_labels):
    """Targets that belong to image generation: image ids (`layout.IMAGE_ID_RANGES`), except the SEP
    of a picture given as input, whose codes before it are not predicted (the reference labels that
    SEP in every picture; counting it as generation gave stage I's captions generation tokens).
    `previous_labels` are the labels one position before the targets. Everything else is text."""
    return layout.is_image_id(targets, jnp) & ~((targets == layout.SEP) & (previous_labels < 0))


def lm_loss(logits_BLV: jax.Array, labels_BL: jax.Array, segment_ids_BL: jax.Array, z_loss_weight: float,
            generation_BL: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (total loss, metrics). `generation_BL` marks positions whose target belongs to the
    generation part (aligned with the labels); by default the target's id decides."""
    logits = logits_BLV[:, :-1].astype(jnp.float32)
    targets = labels_BL[:, 1:]
    seg_now, seg_next = segment_ids_BL[:, :-1], segment_ids_BL[:, 1:]
    valid = (targets >= 0) & (seg_next == seg_now) & (seg_next != 0)

    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    ce = lse - target_logit

    gen = is_generation_target(targets, labels_BL[:, :-1]) if generation_BL is None else \
        generation_BL[:, 1:].astype(jnp.bool_)

    def masked_mean(values, mask):
        count = jnp.sum(mask)
        return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1), count

    ce_mean, n_tokens = masked_mean(ce, valid)
    z_loss, _ = masked_mean(jnp.square(lse), valid)
    ce_und, n_und = masked_mean(ce, valid & ~gen)
    ce_gen, n_gen = masked_mean(ce, valid & gen)
    total = ce_mean + z_loss_weight * z_loss
    metrics = {"loss": total, "ce": ce_mean, "z_loss": z_loss, "ce_understanding": ce_und,
               "ce_generation": ce_gen, "tokens": n_tokens, "tokens_understanding": n_und,
               "tokens_generation": n_gen}
    return total, metrics


# --- the LM head and the loss in one pass, over the predicted positions only ---------------------

def fused_lm_loss(hidden_BLD: jax.Array, kernel_DV: jax.Array, labels_BL: jax.Array, segment_ids_BL: jax.Array,
                  z_loss_weight: float, generation_BL: jax.Array | None = None, *, chunk: int = 512,
                  dtype=jnp.float32, kernel_grad: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`lm_loss(head(hidden))` without a [B, L, V] array and without the head's work on positions
    that predict nothing (prompts, pictures given as input, padding).

    The rows each device holds are joined into one group (all rows without a mesh) and the group's
    predicting positions moved to its front; the head runs on chunks of `chunk` positions of every
    group at once, and a chunk in which no group predicts anything is skipped, so the head's work
    follows the number of predicting positions, not the fullest row's. The
    logits' gradient is known in the forward pass (the loss is a fixed weighting of each position's
    cross-entropy and log-sum-exp), so each chunk also computes its share of the hidden states'
    and the kernel's gradients there: the backward pass only scales them, and no chunk's logits are
    kept. Same value, metrics and gradients as `lm_loss` on `hidden @ kernel` in `dtype` (the
    metrics are not differentiable: gradients flow through the total loss). `kernel_grad=False`
    skips the kernel's gradient (a frozen head: its gradient is then zero)."""
    b, length, d = hidden_BLD.shape
    targets_BL = jnp.pad(labels_BL[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    seg_next = jnp.pad(segment_ids_BL[:, 1:], ((0, 0), (0, 1)))
    valid_BL = (targets_BL >= 0) & (seg_next == segment_ids_BL) & (seg_next != 0)
    gen = is_generation_target(targets_BL, labels_BL) if generation_BL is None else jnp.pad(
        generation_BL[:, 1:].astype(jnp.bool_), ((0, 0), (0, 1)))
    # the rows each device holds form one group, whose predicting positions go to its front together:
    # the head then runs on about as many positions as predict, not on every row's longest share
    g = batch_groups(b)
    grouped = lambda x: constrain(x.reshape(g, b // g * length, *x.shape[2:]),  # noqa: E731
                                  ("act_batch", "act_length", "act_embed")[:x.ndim])
    total, sums = _fused(grouped(hidden_BLD), kernel_DV, grouped(jnp.maximum(targets_BL, 0)), grouped(valid_BL),
                         grouped(gen), z_loss_weight, chunk, jnp.dtype(dtype).name, kernel_grad)
    sums = jax.lax.stop_gradient(sums)
    n_tokens, n_und, n_gen = jnp.sum(valid_BL), jnp.sum(valid_BL & ~gen), jnp.sum(valid_BL & gen)
    ce_mean = sums["ce"] / jnp.maximum(n_tokens, 1)
    metrics = {"loss": total, "ce": ce_mean, "z_loss": sums["z"] / jnp.maximum(n_tokens, 1),
               "ce_understanding": sums["ce_und"] / jnp.maximum(n_und, 1),
               "ce_generation": sums["ce_gen"] / jnp.maximum(n_gen, 1),
               "tokens": n_tokens, "tokens_understanding": n_und, "tokens_generation": n_gen}
    return total, metrics


def batch_groups(rows: int) -> int:
    """How many groups of whole rows the batch axis is split into over the active mesh (each
    device's rows are one group): 1 without a mesh, `rows` where the split does not divide them."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    shards = mesh_ways(logical_to_mesh_spec(("act_batch",))[0], mesh)
    return shards if rows % shards == 0 else rows


def _fused_forward(hidden_BLD, kernel_DV, targets_BL, valid_BL, gen_BL, z_loss_weight, chunk, dtype, kernel_grad):
    b, length, d = hidden_BLD.shape
    v = kernel_DV.shape[1]
    chunk = min(chunk, length)
    n = -(-length // chunk)
    order_BL = jnp.argsort(~valid_BL, axis=1, stable=True)  # each row's predicting positions first
    pad = n * chunk - length
    gather = lambda x: jnp.pad(jnp.take_along_axis(x, order_BL, axis=1), ((0, 0), (0, pad)))  # noqa: E731
    t_sorted, valid_sorted, gen_sorted = gather(targets_BL), gather(valid_BL), gather(gen_BL)
    h_sorted = jnp.pad(jnp.take_along_axis(hidden_BLD, order_BL[..., None], axis=1), ((0, 0), (0, pad), (0, 0)))
    count = jnp.maximum(jnp.sum(valid_BL), 1).astype(jnp.float32)
    kernel = kernel_DV.astype(dtype)
    acc = accumulation(dtype)  # 16-bit on a CPU: the head's dots accumulate in float32 (faster there)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("ce", "z", "ce_und", "ce_gen", "loss")}

    def one_chunk(carry, k):
        sums, dk = carry
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, k * chunk, chunk, axis=1)  # noqa: E731
        h_c, t_c, valid_c, gen_c = sl(h_sorted), sl(t_sorted), sl(valid_sorted), sl(gen_sorted)

        def compute(carry):
            sums, dk = carry
            logits = jnp.einsum("BCD,DV->BCV", h_c.astype(dtype), kernel, preferred_element_type=acc)
            logits = logits.astype(jnp.float32)
            logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
            lse = jax.nn.logsumexp(logits, axis=-1)
            ce = lse - jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
            w = valid_c.astype(jnp.float32)
            sums = {"ce": sums["ce"] + jnp.sum(w * ce), "z": sums["z"] + jnp.sum(w * lse * lse),
                    "ce_und": sums["ce_und"] + jnp.sum(w * ce * ~gen_c), "ce_gen": sums["ce_gen"] + jnp.sum(w * ce * gen_c),
                    "loss": sums["loss"] + jnp.sum(w * (ce + z_loss_weight * lse * lse))}
            # d loss / d logits = w / count * ((1 + 2 z lse) softmax - onehot(target))
            g = jnp.exp(logits - lse[..., None]) * ((1 + 2 * z_loss_weight * lse) * w / count)[..., None]
            g = g - jax.nn.one_hot(t_c, v, dtype=jnp.float32) * (w / count)[..., None]
            g = g.astype(dtype)
            dh_c = jnp.einsum("BCV,DV->BCD", g, kernel, preferred_element_type=acc).astype(dtype)
            if kernel_grad:
                dk = dk + jnp.einsum("BCD,BCV->DV", h_c.astype(dtype), g, preferred_element_type=jnp.float32)
                dk = constrain(dk, ("embed", "vocab"))  # sharded as the kernel is, never whole on a chip
            return (sums, dk), dh_c

        def skip(carry):
            return carry, jnp.zeros((b, chunk, d), dtype)

        return jax.lax.cond(jnp.any(valid_c), compute, skip, (sums, dk))

    dk0 = jnp.zeros((d, v) if kernel_grad else (), jnp.float32)
    (sums, dk), dh_NBCD = jax.lax.scan(one_chunk, (zero_sums, dk0), jnp.arange(n))
    dk = dk if kernel_grad else jnp.zeros((d, v), jnp.float32)
    dh_sorted = dh_NBCD.transpose(1, 0, 2, 3).reshape(b, n * chunk, d)[:, :length]
    inverse_BL = jnp.argsort(order_BL, axis=1)
    dh_BLD = jnp.take_along_axis(dh_sorted, inverse_BL[..., None], axis=1)
    total = sums.pop("loss") / count
    return (total, sums), (dh_BLD.astype(hidden_BLD.dtype), dk.astype(kernel_DV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused(hidden_BLD, kernel_DV, targets_BL, valid_BL, gen_BL, z_loss_weight, chunk, dtype, kernel_grad):
    return _fused_forward(hidden_BLD, kernel_DV, targets_BL, valid_BL, gen_BL, z_loss_weight, chunk, dtype,
                          kernel_grad)[0]


def _fused_fwd(hidden_BLD, kernel_DV, targets_BL, valid_BL, gen_BL, z_loss_weight, chunk, dtype, kernel_grad):
    out, grads = _fused_forward(hidden_BLD, kernel_DV, targets_BL, valid_BL, gen_BL, z_loss_weight, chunk, dtype,
                                kernel_grad)
    return out, (grads, targets_BL, valid_BL, gen_BL)


def _fused_bwd(z_loss_weight, chunk, dtype, kernel_grad, residuals, cotangents):
    (dh, dk), targets_BL, valid_BL, gen_BL = residuals
    d_total = cotangents[0]  # the metrics' cotangents are zero (they are stop_gradient'ed outside)
    zero_int = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return ((d_total * dh).astype(dh.dtype), (d_total * dk).astype(dk.dtype), zero_int(targets_BL),
            zero_int(valid_BL), zero_int(gen_BL))


_fused.defvjp(_fused_fwd, _fused_bwd)

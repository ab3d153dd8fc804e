"""Next-token cross-entropy and z-loss on labelled positions, split into understanding and
generation parts.

`labels [B, L]` are aligned with the inputs, as in the reference: labels[b, t] is the token at
position t if it is to be predicted, negative otherwise. The logits at t predict labels at t+1,
and only when t+1 is in the same packed segment as t. The z-loss, logsumexp(logits)^2, is
averaged over exactly the same (shifted) positions as the cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unitoken_jax.tokenizer import layout


def is_generation_target(targets):
    """Targets that belong to image generation (`layout.IMAGE_ID_RANGES`); everything else is text."""
    return layout.is_image_id(targets, jnp)


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

    gen = is_generation_target(targets) if generation_BL is None else generation_BL[:, 1:].astype(jnp.bool_)

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

"""Prefill + one-token-at-a-time decoding with the static KV cache gives the logits of a full
forward over the whole sequence, for rows of different prompt lengths."""

import jax
import jax.numpy as jnp
import numpy as np

import unitoken_jax
from unitoken_jax.configs.model import get_config
from unitoken_jax.models.chameleon import init_cache
from unitoken_jax.models.unitoken import UniToken


def test_cached_decoding_matches_full_forward():
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    cfg = cfg.replace(decoder=__import__("dataclasses").replace(cfg.decoder, num_kv_heads=2))
    model = unitoken_jax.UniTokenModel.random(cfg, seed=4)
    module, variables = UniToken(cfg), {"params": model.params}
    rng = np.random.default_rng(0)
    total, prompt_lens, prefill_width = 14, np.array([5, 8, 3]), 8
    seqs = rng.integers(8800, 8960, (3, total))

    full = np.asarray(model.text_logits(seqs))

    # prefill: right-padded prompts, padding marked by segment id 0
    tokens = np.zeros((3, prefill_width), np.int32)
    segments = np.zeros((3, prefill_width), np.int32)
    for b, n in enumerate(prompt_lens):
        tokens[b, :n], segments[b, :n] = seqs[b, :n], 1
    positions = np.broadcast_to(np.arange(prefill_width), (3, prefill_width))
    cache = init_cache(cfg.decoder, 3, 32)
    step = jax.jit(lambda c, t, p, s: module.apply(variables, t, p, s, cache=c))
    logits, cache = step(cache, tokens, positions, segments)
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits)[b, :n], full[b, :n], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache["index"]), prompt_lens)

    # then one token per step, each row at its own position
    cursor = prompt_lens.copy()
    while (cursor < total).any():
        active = cursor < total
        tok = np.where(active, seqs[np.arange(3), np.minimum(cursor, total - 1)], 0)[:, None]
        logits, cache = step(cache, jnp.asarray(tok, jnp.int32), cursor[:, None], active[:, None].astype(np.int32))
        for b in np.flatnonzero(active):
            np.testing.assert_allclose(np.asarray(logits)[b, 0], full[b, cursor[b]], atol=1e-5)
        cursor = cursor + active
    np.testing.assert_array_equal(np.asarray(cache["index"]), [total] * 3)

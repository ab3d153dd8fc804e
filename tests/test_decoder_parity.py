"""Our decoder against transformers' Chameleon on the same random weights, through the loader."""

import numpy as np
import pytest
import torch

import oracles
import unitoken_jax


@pytest.mark.parametrize("swin_norm", [False, True])
@pytest.mark.parametrize("layout,mp", [("transformers", 1), ("lumina", 1), ("lumina", 2)])
def test_decoder_logits_match_transformers(tmp_path, swin_norm, layout, mp):
    hf = oracles.make_chameleon(seed=3, swin_norm=swin_norm, mp=mp)
    oracles.write_chameleon(tmp_path, hf, layout=layout)
    model = unitoken_jax.load(str(tmp_path))
    assert model.kind == "chameleon"
    assert model.config.decoder.rope_theta == 20000.0 and model.config.decoder.swin_norm == swin_norm
    expected_layout = "per-head" if layout == "transformers" else "per-shard"
    assert model.qk_norm_layout.startswith(expected_layout)

    ids = torch.randint(0, oracles.VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    ours = np.asarray(model.text_logits(ids.numpy()))
    theirs = oracles.hf_logits(hf, input_ids=ids)
    assert ours.shape == (3, 17, oracles.VOCAB)
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


def test_grouped_kv_heads_match_transformers(tmp_path):
    hf = oracles.make_chameleon(seed=4, heads=4, kv_heads=2, mp=4)  # mp=heads: per-head layout
    oracles.write_chameleon(tmp_path, hf)
    model = unitoken_jax.load(str(tmp_path))
    ids = torch.randint(0, oracles.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(np.asarray(model.text_logits(ids.numpy())), oracles.hf_logits(hf, input_ids=ids),
                               atol=2e-4, rtol=0)


@pytest.mark.parametrize("block", [64, 128, 512])
def test_blockwise_causal_attention_matches_transformers_on_long_rows(tmp_path, block):
    """256 positions: the training path's xla attention computes 64- or 128-position blocks with an
    online softmax, skipping the blocks above the diagonal (512: one dense block); the logits
    still match transformers'. (Packed rows, gradients and the splash kernel: test_attention.py.)"""
    hf = oracles.make_chameleon(seed=5, heads=4, kv_heads=2, mp=4)
    oracles.write_chameleon(tmp_path, hf)
    model = unitoken_jax.load(str(tmp_path), attention="xla", attention_block=block)
    ids = torch.randint(0, oracles.VOCAB, (2, 256), generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(np.asarray(model.text_logits(ids.numpy())), oracles.hf_logits(hf, input_ids=ids),
                               atol=2e-4, rtol=0)

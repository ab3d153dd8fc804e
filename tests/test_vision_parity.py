"""SigLIP tower and adapter against transformers / PyTorch on the same random weights."""

import numpy as np
import pytest
import torch

import oracles
import unitoken_jax
from unitoken_jax.models.siglip import bicubic_matrix


@pytest.mark.parametrize("in_size,out_size", [(4, 6), (4, 5), (27, 54), (27, 82), (8, 3)])
def test_bicubic_matrix_matches_torch_interpolate(in_size, out_size):
    x = torch.randn(1, 1, in_size, in_size, generator=torch.Generator().manual_seed(in_size))
    theirs = torch.nn.functional.interpolate(x, size=(out_size, out_size), mode="bicubic", align_corners=False)
    m = bicubic_matrix(in_size, out_size)
    ours = m @ x[0, 0].double().numpy() @ m.T
    # torch works in float32 (source coordinates included): agreement to float32 noise
    np.testing.assert_allclose(ours, theirs[0, 0].double().numpy(), atol=5e-5)


def _siglip_dir(tmp_path, model):
    model.save_pretrained(tmp_path, safe_serialization=True)
    return str(tmp_path)


@pytest.mark.parametrize("height,width", [(56, 56), (84, 70), (42, 98), (60, 60), (71, 57)])
def test_siglip_matches_transformers(tmp_path, height, width):
    hf = oracles.make_siglip()
    model = unitoken_jax.load(_siglip_dir(tmp_path, hf))
    assert model.kind == "siglip" and model.config.decoder is None
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height + width))
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state.numpy()
    ours = np.asarray(model.vision_features(pixels.permute(0, 2, 3, 1).numpy()))
    assert ours.shape == theirs.shape == (2, (height // 14) * (width // 14), 32)
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


def test_image_features_are_adapter_of_vit(tmp_path):
    chameleon = oracles.make_chameleon(seed=5)
    siglip = oracles.make_siglip(seed=6)
    adapter = oracles.make_adapter(32, 64, seed=7)
    oracles.write_unitoken(tmp_path, chameleon, siglip, adapter)
    model = unitoken_jax.load(str(tmp_path))
    assert model.kind == "unitoken"
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        theirs = adapter(siglip(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state).numpy()
    ours = np.asarray(model.image_features(pixels.permute(0, 2, 3, 1).numpy()))
    assert ours.shape == (3, 16, 64)
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


def test_bare_siglip_has_no_image_features(tmp_path):
    model = unitoken_jax.load(_siglip_dir(tmp_path, oracles.make_siglip()))
    with pytest.raises(ValueError, match="no adapter"):
        model.image_features(np.zeros((1, 56, 56, 3), np.float32))
    with pytest.raises(ValueError, match="no decoder"):
        model.text_logits(np.zeros((1, 3), np.int32))


def test_release_config_without_vit_description_reads_as_so400m(tmp_path):
    """The release's config.json describes only the decoder: the ViT comes from tensor shapes and
    so400m's head count. One so400m-wide layer keeps this cheap."""
    chameleon = oracles.make_chameleon(seed=8)
    siglip = oracles.make_siglip(seed=9, hidden=1152, layers=1, heads=16, image_size=384, intermediate=4304)
    adapter = oracles.make_adapter(1152, 64, seed=10)
    oracles.write_unitoken(tmp_path, chameleon, siglip, adapter, describe_vit=False)
    model = unitoken_jax.load(str(tmp_path))
    v = model.config.vision
    assert (v.hidden_size, v.num_heads, v.num_layers, v.intermediate_size, v.image_size, v.grid_size) == (
        1152, 16, 1, 4304, 384, 27)
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        theirs = adapter(siglip(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state).numpy()
    ours = np.asarray(model.image_features(pixels.permute(0, 2, 3, 1).numpy()))
    assert ours.shape == (1, 729, 64)
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)

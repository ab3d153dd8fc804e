"""The VQ-GAN against transformers' ChameleonVQVAE (encoder + quantizer) and taming-transformers'
Encoder/Decoder (the layout of Meta's vqgan.ckpt), on random tiny weights through our loaders."""

import os
import re
import shutil

import jax
import numpy as np
import pytest
import torch

import oracles
from unitoken_jax.convert import vqgan as vq_io
from unitoken_jax.convert.hf import CheckpointError
from unitoken_jax.convert.torch_pickle import load_torch_file
from unitoken_jax.models.vqgan import VQGAN, VQGANConfig
from unitoken_jax.vq_tokenizer import VQTokenizer

from oracles import VQ_N_EMBED as N_EMBED  # noqa: E402


def _taming():
    """taming-transformers, the oracle for Meta's VQ-GAN layout: only the tests that build a
    checkpoint with it need it (CI installs it; see README)."""
    return pytest.importorskip("taming.modules.diffusionmodules.model",
                               reason="pip install --no-deps taming-transformers-rom1504 (see README)")


def _meta_checkpoint(path, **kwargs):
    _taming()
    return oracles.write_meta_vqgan(path, **kwargs)


def test_torch_file_reader_matches_torch_load(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(4, 3).t(), "c": torch.randn(6)[2:5],
               "d": torch.randn(2, 2).bfloat16(), "e": torch.tensor(3)}
    torch.save({"state_dict": tensors, "hparams": {"lr": 1e-4}}, tmp_path / "x.ckpt")
    ours = load_torch_file(str(tmp_path / "x.ckpt"))
    assert ours["hparams"] == {"lr": 1e-4}
    for k, v in tensors.items():
        np.testing.assert_array_equal(ours["state_dict"][k].astype(np.float32), v.float().numpy())
    (tmp_path / "bad.ckpt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a PyTorch zip"):
        load_torch_file(str(tmp_path / "bad.ckpt"))


class _HParams(dict):  # a Lightning checkpoint's AttributeDict of hyperparameters
    pass


class _Steps(list):
    pass


def test_dict_and_list_subclasses_and_tensors_with_attributes_are_read_as_torch_load_reads_them(tmp_path):
    """A dict or list subclass anywhere in the pickle (Lightning's hyperparameters, a defaultdict)
    made the whole file unreadable ("... does not support item assignment"); a tensor carrying a
    Python attribute (pickled through torch._tensor._rebuild_from_type_v2) came back as a
    placeholder, and the VQ-GAN reader failed on it with an AttributeError traceback."""
    import collections

    tagged = torch.randn(2, 3)
    tagged.note = "an attribute of its own"
    param = torch.nn.Parameter(torch.randn(4))
    param.note = "a parameter's too"
    saved = {"state_dict": {"w": tagged, "p": param, "plain": torch.arange(3)},
             "hyper_parameters": _HParams(lr=1e-4, sizes=[1, 2]), "counts": collections.defaultdict(int, a=2),
             "steps": _Steps([3, 4])}
    torch.save(saved, tmp_path / "x.ckpt")
    ours = load_torch_file(str(tmp_path / "x.ckpt"))
    for key in ("w", "p", "plain"):
        np.testing.assert_array_equal(ours["state_dict"][key], saved["state_dict"][key].detach().numpy())
    assert ours["hyper_parameters"].items == {"lr": 1e-4, "sizes": [1, 2]}  # kept, inert
    assert ours["steps"].values == [3, 4]
    legacy = tmp_path / "legacy.ckpt"  # a current torch's old format: what to do is said
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"_use_new_zipfile_serialization=False\) is not read; re-save it"):
        load_torch_file(str(legacy))


def _crafted_checkpoint(path, offset, size, stride, numel=4, data=np.arange(4, dtype=np.float32)):
    """A torch zip file whose one tensor record says (offset, size, stride) over a storage of
    `numel` float32 elements holding `data` — what a crafted checkpoint can claim."""
    import collections
    import io
    import pickle
    import zipfile

    class Ref:
        pass

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (Ref(), offset, size, stride, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, Ref) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"state_dict": {"w": Tensor()}})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", data.tobytes())
    return str(path)


@pytest.mark.parametrize("offset,size,stride,numel", [
    (10, (2,), (1,), 4),          # offset past the storage
    (0, (1000,), (1,), 4),        # size past it
    (0, (2, 2), (100, 1), 4),     # a stride past it
    (1, (2,), (-1,), 4),          # a negative stride
    (-3, (2,), (1,), 4),          # a negative offset
    (0, (2,), (1,), 10**6),       # a storage longer than its bytes
    (0, (2,), (1, 1), 4),         # stride and size of different ranks
], ids=["offset", "size", "stride", "negative-stride", "negative-offset", "numel", "ranks"])
def test_a_crafted_tensor_record_is_refused_not_read_out_of_bounds(tmp_path, offset, size, stride, numel):
    from unitoken_jax.convert.files import CheckpointError

    path = _crafted_checkpoint(tmp_path / "evil.ckpt", offset, size, stride, numel)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_torch_file(path)


def test_a_valid_view_record_and_damaged_files(tmp_path):
    from unitoken_jax.convert.files import CheckpointError

    ok = load_torch_file(_crafted_checkpoint(tmp_path / "ok.ckpt", 1, (3,), (1,)))["state_dict"]["w"]
    np.testing.assert_array_equal(ok, [1.0, 2.0, 3.0])
    edge = load_torch_file(_crafted_checkpoint(tmp_path / "edge.ckpt", 0, (2, 2), (2, 1)))["state_dict"]["w"]
    np.testing.assert_array_equal(edge, [[0.0, 1.0], [2.0, 3.0]])  # the last element of the storage, exactly
    torch.save({"a": torch.randn(3)}, tmp_path / "x.ckpt")
    raw = (tmp_path / "x.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt is a zip archive without its end: truncated"):
        load_torch_file(str(tmp_path / "cut.ckpt"))  # (it had been called a file of torch < 1.6)
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02" + raw[4:100])  # a legacy (non-zip) pickle's start
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint: the legacy format .torch < 1.6"):
        load_torch_file(str(tmp_path / "old.ckpt"))


def test_meta_checkpoint_encodes_and_decodes_like_taming(tmp_path):
    enc, dec, quant_conv, post_quant_conv, codebook = _meta_checkpoint(tmp_path)
    vq = VQTokenizer.from_meta(str(tmp_path / "vqgan.ckpt"))
    assert vq.config.ch_mult == (1, 2, 2) and vq.config.n_embed == N_EMBED and vq.has_decoder

    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = quant_conv(enc(pixels)).permute(0, 2, 3, 1)  # [N, h, w, E]
        e = codebook.weight
        d = (z ** 2).sum(-1, keepdim=True) + (e ** 2).sum(-1) - 2 * torch.einsum("nhwe,ke->nhwk", z, e)
        theirs = d.argmin(-1).numpy()
    ours = vq.encode(pixels.permute(0, 2, 3, 1).numpy())
    assert ours.shape == (2, 8, 12)
    np.testing.assert_array_equal(ours, theirs)
    # the encoder's latents (before the nearest-code search) too, not only the codes they give
    latents = VQGAN(vq.config).apply({"params": vq.params}, pixels.permute(0, 2, 3, 1).numpy(), method=VQGAN.latents)
    np.testing.assert_allclose(np.asarray(latents), z.numpy(), atol=2e-4, rtol=0)

    codes = np.random.default_rng(2).integers(0, N_EMBED, (2, 4, 6))
    with torch.no_grad():
        zq = codebook.weight[torch.from_numpy(codes)].permute(0, 3, 1, 2)
        theirs = dec(post_quant_conv(zq)).permute(0, 2, 3, 1).numpy()
    ours = vq.decode(codes)
    assert ours.shape == (2, 16, 24, 3)
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


def test_what_a_lightning_checkpoint_holds_beside_the_model_is_said_not_dropped_unsaid(tmp_path, caplog):
    """EMA weights (taming's `model_ema.*`) beside the live ones were skipped without a word: a user
    who trained with EMA may have meant them. The loss's tensors are said at INFO, the rest warned."""
    _meta_checkpoint(tmp_path)
    ckpt = torch.load(tmp_path / "vqgan.ckpt", weights_only=False)
    live = [k for k in ckpt["state_dict"] if not k.startswith("loss.")]
    for k in live:  # (LitEma's names: the dots taken out)
        ckpt["state_dict"]["model_ema." + k.replace(".", "")] = ckpt["state_dict"][k] + 1
    torch.save(ckpt, tmp_path / "vqgan.ckpt")
    with caplog.at_level("INFO", logger="unitoken_jax.convert.vqgan"):
        config, params = vq_io.read_meta_checkpoint(str(tmp_path / "vqgan.ckpt"))
    said = {r.levelname: r.getMessage() for r in caplog.records if r.name == "unitoken_jax.convert.vqgan"}
    assert "1 tensors of the training loss (loss.*" in said["INFO"]
    assert f"{len(live)} entries of its state_dict are not the VQ-GAN's (model_ema.) and were skipped" in \
        said["WARNING"]
    # and the live weights are what was read
    np.testing.assert_array_equal(params["codebook"],
                                  ckpt["state_dict"]["quantize.embedding.weight"].numpy())


def test_hf_chameleon_vqmodel_gives_transformers_codes(tmp_path):
    hf = oracles.make_chameleon(seed=5)
    hf.save_pretrained(tmp_path)
    vq = VQTokenizer.from_hf(str(tmp_path))
    assert not vq.has_decoder
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        theirs = hf.model.vqmodel.encode(pixels).image_tokens.reshape(3, 16, 16).numpy()
    np.testing.assert_array_equal(vq.encode(pixels.permute(0, 2, 3, 1).numpy()), theirs)
    with pytest.raises(ValueError, match="no decoder"):
        vq.decode(np.zeros((1, 2, 2), np.int32))
    # converted to our format (`unitoken convert`), the folder still names its VQ-GAN (it was refused:
    # "holds no VQ-GAN")
    import unitoken_jax

    unitoken_jax.load(str(tmp_path), progress=False).save(str(tmp_path / "ours"))
    converted = VQTokenizer.load(str(tmp_path / "ours"))
    np.testing.assert_array_equal(converted.encode(pixels.permute(0, 2, 3, 1).numpy()), theirs)
    # one with no VQ-GAN carried into it says so
    unitoken_jax.load(str(tmp_path / "ours"), progress=False).save(str(tmp_path / "bare"))
    shutil.rmtree(tmp_path / "bare" / "passthrough")
    with pytest.raises(CheckpointError, match="without a VQ-GAN .no model.vqmodel"):
        VQTokenizer.load(str(tmp_path / "bare"))


def test_sharded_batch_gives_the_same_codes(tmp_path):
    from unitoken_jax import sharding

    _meta_checkpoint(tmp_path, seed=3)
    single = VQTokenizer.from_meta(str(tmp_path / "vqgan.ckpt"))
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1, devices=jax.devices()[:8])
    sharded = VQTokenizer.from_meta(str(tmp_path / "vqgan.ckpt"), mesh=mesh)
    pixels = np.random.default_rng(5).uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)  # 5: not a multiple of 8
    np.testing.assert_array_equal(sharded.encode(pixels), single.encode(pixels))
    # a picture's 0..255 (or NaN) was encoded to codes of nothing, unsaid
    with pytest.raises(ValueError, match="pixels must be floats in \\[-1, 1\\].*got uint8"):
        single.encode(np.full((1, 16, 16, 3), 200, np.uint8))
    for bad, said in ((pixels * 127.5 + 127.5, r"got \[0\.\d+, 25\d\.\d+\]$"),
                      (np.where(pixels > 0.9, np.nan, pixels), "with NaN")):
        with pytest.raises(ValueError, match="pixels must be finite and in \\[-1, 1\\].*" + said):
            single.encode(bad)


def test_bad_vq_checkpoints(tmp_path):
    _meta_checkpoint(tmp_path)
    sd = load_torch_file(str(tmp_path / "vqgan.ckpt"))["state_dict"]
    sd.pop("decoder.conv_out.bias")
    with pytest.raises(CheckpointError, match=r"missing \['decoder\.conv_out\.bias'\]"):
        vq_io.params_from_state_dict(vq_io.config_from_yaml(str(tmp_path / "vqgan.yaml")),
                                     {k: v for k, v in sd.items() if not k.startswith("loss.")},
                                     require_decoder=True, source="test")
    config = vq_io.config_from_yaml(str(tmp_path / "vqgan.yaml"))
    sd = {k: v for k, v in load_torch_file(str(tmp_path / "vqgan.ckpt"))["state_dict"].items()
          if not k.startswith("loss.")}
    with pytest.raises(CheckpointError, match="test: encoder.conv_in.weight is str, not a tensor"):
        vq_io.params_from_state_dict(config, {**sd, "encoder.conv_in.weight": "?"}, require_decoder=True, source="test")
    vq = VQTokenizer.from_meta(str(tmp_path / "vqgan.ckpt"))
    for channels in (1, 4):  # it was Flax's ScopeParamShapeError from inside the encoder
        with pytest.raises(ValueError, match=r"pixels must be \[N, H, W, 3\]"):
            vq.encode(np.zeros((1, 32, 32, channels), np.float32))
    # codes were cast to int32 first: 3.7 drew code 3, and 2**32 + 5 wrapped to code 5
    with pytest.raises(ValueError, match="codes must be integers, got float64"):
        vq.decode(np.full((1, 2, 2), 3.7))
    with pytest.raises(ValueError, match="codes must lie in 0.."):
        vq.decode(np.full((1, 2, 2), 2 ** 32 + 5))
    os.remove(tmp_path / "vqgan.yaml")
    with pytest.raises(CheckpointError, match="vqgan.yaml"):
        VQTokenizer.from_meta(str(tmp_path / "vqgan.ckpt"))
    # our own format named by its weights file (as --vqgan names Meta's vqgan.ckpt) is its folder: it
    # was read as Meta's and refused for a vqgan.yaml that format never has
    vq_io.save_vqgan(str(tmp_path / "ours"), vq.config, vq.params)
    by_file = VQTokenizer.load(str(tmp_path / "ours" / "vqgan.safetensors"))
    assert by_file.config == vq.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), by_file.params, vq.params)


def test_full_size_config_shapes():
    import jax

    cfg = VQGANConfig()
    params = vq_io.abstract_params(cfg)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    assert params["codebook"].shape == (8192, 256)
    assert params["encoder"]["conv_out"]["kernel"].shape == (3, 3, 512, 256)
    assert params["decoder"]["up_0"]["block_2"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert cfg.downsample_factor == 16
    # the taming VQModel with Chameleon's ddconfig, counted by torch
    with torch.device("meta"):
        dd = dict(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=[], dropout=0.0,
                  in_channels=3, resolution=512, z_channels=256, double_z=False)
        count = sum(p.numel() for m in (_taming().Encoder(**dd), _taming().Decoder(**dd)) for p in m.parameters())
    count += 2 * (256 * 256 + 256) + 8192 * 256
    assert n == count


def test_cli_reconstruct_writes_the_picture_and_says_the_grid(tmp_path, capsys):
    from PIL import Image
    from skimage import data as skdata

    from unitoken_jax import cli

    _meta_checkpoint(tmp_path, seed=6)
    Image.fromarray(skdata.chelsea()).save(tmp_path / "cat.png")
    out = tmp_path / "out.png"
    assert cli.main(["reconstruct", str(tmp_path / "cat.png"), "--out", str(out), "--size", "64",
                     "--vqgan", str(tmp_path / "vqgan.ckpt"), "--side-by-side"]) == 0
    assert "16x16 codes (256 tokens" in capsys.readouterr().out
    assert Image.open(out).size == (128, 64)
    # the left half is what the VQ-GAN was given: a transparent picture on white (it showed black)
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    clear.paste((200, 30, 30, 255), (16, 16, 48, 48))
    clear.save(tmp_path / "clear.png")
    assert cli.main(["reconstruct", str(tmp_path / "clear.png"), "--out", str(out), "--size", "64",
                     "--vqgan", str(tmp_path / "vqgan.ckpt"), "--side-by-side"]) == 0
    left = np.asarray(Image.open(out).convert("RGB"))[:, :64]
    assert (left[2, 2] == 255).all() and tuple(left[32, 32]) == (200, 30, 30)
    assert cli.main(["reconstruct", str(tmp_path / "missing.png"), "--out", str(out),
                     "--vqgan", str(tmp_path / "vqgan.ckpt")]) == 2
    assert "no such file" in capsys.readouterr().err
    # the picture is checked before the VQ-GAN loads (a 7B release's takes a while): its error comes first
    assert cli.main(["reconstruct", str(tmp_path / "missing.png"), "--out", str(out),
                     "--vqgan", str(tmp_path / "no-vqgan-here")]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and "no-vqgan-here" not in err
    # a side the VQ-GAN cannot take is said by option (it was the encoder's "pixels must be [N, H, W, 3] ...")
    assert cli.main(["reconstruct", str(tmp_path / "cat.png"), "--out", str(out), "--size", "65",
                     "--vqgan", str(tmp_path / "vqgan.ckpt")]) == 2
    assert re.search(r"--size 65: this VQ-GAN takes sides that are multiples of \d+ px", capsys.readouterr().err)
    with pytest.raises(SystemExit):  # (and one of 0 or less by argparse: it was "height and width must be > 0")
        cli.main(["reconstruct", str(tmp_path / "cat.png"), "--out", str(out), "--size", "0"])
    assert "argument --size: 0 is out of range" in capsys.readouterr().err


def test_generated_ids_decode_to_pictures(tmp_path):
    import tokenizer_fixture
    from PIL import Image

    from unitoken_jax.tokenizer import layout
    from unitoken_jax.tokenizer.conversation import decode, pictures
    from unitoken_jax.tokenizer.text import TextTokenizer

    _meta_checkpoint(tmp_path, seed=8)
    vq = VQTokenizer.from_meta(str(tmp_path / "vqgan.ckpt"))
    tok = TextTokenizer(tokenizer_fixture.build())
    codes = np.random.default_rng(3).integers(0, N_EMBED, (4, 6))
    ids = tok.encode_text("he") + layout.discrete_image_ids(tok.codes_to_ids(codes)) + [layout.IMAGE_END, 8710]
    parts = decode(ids, tok, vq)
    (picture,) = pictures(parts)
    assert parts[0] == "he" and isinstance(picture, Image.Image) and picture.size == (24, 16)
    expected = ((np.clip(vq.decode(codes[None])[0], -1, 1) + 1) / 2 * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(picture), expected)


@pytest.mark.parametrize("yaml_text,says", [
    ("model: {params: [1, 2", "cannot read the VQ-GAN config"),
    ("- 1\n- 2\n", "not taming's layout"),
    ("model:\n  params:\n    embed_dim: 8\n", "lacks 'ddconfig'"),
    ("model:\n  params:\n    embed_dim: 8\n    n_embed: 16\n    ddconfig: {ch: 4}\n", "lacks 'in_channels'"),
], ids=["not-yaml", "a-list", "no-ddconfig", "short-ddconfig"])
def test_a_malformed_vqgan_yaml_is_named(tmp_path, yaml_text, says):
    """Raw KeyError / TypeError / YAMLError before (issue 15)."""
    from unitoken_jax.convert.files import CheckpointError
    from unitoken_jax.convert.vqgan import config_from_yaml

    (tmp_path / "vqgan.yaml").write_text(yaml_text)
    with pytest.raises(CheckpointError, match=says):
        config_from_yaml(str(tmp_path / "vqgan.yaml"))


def test_a_garbage_vqgan_ckpt_is_named(tmp_path):
    from unitoken_jax.convert.files import CheckpointError

    (tmp_path / "vqgan.ckpt").write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(CheckpointError, match=r"vqgan\.ckpt is not a PyTorch zip"):
        load_torch_file(str(tmp_path / "vqgan.ckpt"))


def test_the_nearest_code_distance_product_runs_in_full_float32():
    """On a TPU a float32 einsum at default precision is one bfloat16 pass: codes whose distances
    differ by less than that rounding were picked differently from the reference's float32."""
    from unitoken_jax.models.vqgan import nearest_code

    with jax.default_matmul_precision("default"):  # a user's setting (the tests' global one is "highest")
        jaxpr = jax.make_jaxpr(nearest_code)(np.zeros((1, 2, 2, 8), np.float32), np.zeros((16, 8), np.float32))
    (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dot.params["precision"] in ((jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST),
                                       jax.lax.Precision.HIGHEST)


def test_the_fingerprint_is_a_sha256_of_config_and_weights_hashed_once_per_set_of_weights(monkeypatch, tmp_path):
    import hashlib

    from unitoken_jax import vq_tokenizer

    vq = VQTokenizer.random(VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, embed_dim=8,
                                        n_embed=N_EMBED), seed=0)
    digest = hashlib.sha256(repr(vq.config).encode())
    for leaf in jax.tree.leaves(vq.params):
        digest.update(np.asarray(leaf).tobytes())
    calls, sha256 = [], hashlib.sha256
    monkeypatch.setattr(vq_tokenizer.hashlib, "sha256", lambda *a: calls.append(a) or sha256(*a))
    assert vq.fingerprint() == digest.hexdigest() and len(calls) == 1
    assert vq.fingerprint() == digest.hexdigest() and len(calls) == 1  # (each pipeline built checks it)
    vq.params = VQTokenizer.random(vq.config, seed=1).params  # other weights: hashed again, not the kept digest
    assert vq.fingerprint() != digest.hexdigest() and len(calls) == 2
    # saved as ours, loaded by its folder, its weights file or its config file (read as Meta's before, "no
    # VQ-GAN config vqgan.yaml")
    vq_io.save_vqgan(str(tmp_path / "vq"), vq.config, vq.params)
    for given in ("vq", "vq/vqgan.safetensors", f"vq/{vq_io.CONFIG_FILE}"):
        assert VQTokenizer.load(str(tmp_path / given)).fingerprint() == vq.fingerprint(), given

"""load -> save_hf -> load, our Orbax format, `unitoken convert`, and bad checkpoints."""

import json
import os
import re
import shutil
import warnings

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import oracles
import unitoken_jax
from unitoken_jax import cli


def _tensors(path):
    out = {}
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("release")
    chameleon = oracles.make_chameleon(seed=21, mp=2)
    oracles.write_unitoken(path, chameleon, oracles.make_siglip(seed=22), oracles.make_adapter(32, 64, seed=23),
                           layout="lumina", shards=2)
    # The release stores bfloat16: cast every tensor so the round trip must keep the dtype too.
    tensors = {k: v.to(torch.bfloat16) for k, v in _tensors(path).items()}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            os.remove(path / f)
    save_file(tensors, path / "model.safetensors")
    os.remove(path / "model.safetensors.index.json")
    return path


def test_a_stage_trained_from_the_release_exports_what_the_release_brought(release_dir, tmp_path):
    """final/ was built from the trained parameters alone: converted to HF it lost the release's
    VQ-GAN tensors and config.json fields and came out in float32. The export now carries what the
    init_from model had (read when the run starts, a resumed run too, which loads no init model)."""
    from unitoken_jax.model import UniTokenModel
    from unitoken_jax.train.config import InitConfig
    from unitoken_jax.train.loop import export_final, init_extras

    model = unitoken_jax.load(str(release_dir))
    model.save(str(tmp_path / "ours"))
    for path in (str(release_dir), str(tmp_path / "ours")):  # an HF start, and one of ours (a stage's final/)
        passthrough, hf_config, dtype = init_extras(InitConfig(kind="checkpoint", paths=(path,)))
        assert sorted(passthrough) == sorted(model.passthrough) and (hf_config, dtype) == (model.hf_config, "bfloat16")
    assert init_extras(InitConfig(kind="random")) == ({}, None, "float32")
    # a start that is gone by the end of the run: the trained model is still exported
    assert init_extras(InitConfig(kind="checkpoint", paths=(str(tmp_path / "moved"),))) == ({}, None, "float32")
    # what the loop exports at the end of a stage from the release, written back as HF: the release
    trained = UniTokenModel(model.config, model.params, *init_extras(InitConfig(kind="checkpoint",
                                                                              paths=(str(release_dir),))))
    export_final(trained, str(tmp_path / "final"))
    unitoken_jax.load(str(tmp_path / "final")).save_hf(str(tmp_path / "hf"))
    original, written = _tensors(release_dir), _tensors(tmp_path / "hf")
    assert sorted(original) == sorted(written)
    assert all(torch.equal(original[k], written[k]) for k in original)
    config, written_config = (json.loads((d / "config.json").read_text()) for d in (release_dir, tmp_path / "hf"))
    for key, value in config.items():  # every field the release's config.json has, kept (save_hf adds some)
        kept = written_config[key]
        assert (value.items() <= kept.items() if isinstance(value, dict) else kept == value), (key, value, kept)


def test_round_trip_is_bit_exact(release_dir, tmp_path):
    model = unitoken_jax.load(str(release_dir))
    assert model.hf_dtype == "bfloat16"
    assert model.qk_norm_layout.startswith("per-shard")
    assert any(k.startswith("model.vqmodel.") for k in model.passthrough)
    assert any(k.startswith("vit.head.") for k in model.passthrough)
    model.save_hf(str(tmp_path / "out"))
    original, written = _tensors(release_dir), _tensors(tmp_path / "out")
    assert sorted(original) == sorted(written)
    for k in original:
        assert original[k].dtype == written[k].dtype, k
        assert torch.equal(original[k], written[k]), k
    again = unitoken_jax.load(str(tmp_path / "out"))
    flat_a = {k: np.asarray(v) for k, v in _flatten(model.params).items()}
    flat_b = {k: np.asarray(v) for k, v in _flatten(again.params).items()}
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)


@pytest.mark.parametrize("nested", [False, True])
def test_changed_decoder_fields_survive_save_hf_whether_config_json_nests_them_or_not(release_dir, tmp_path, nested):
    """A config.json may keep the decoder's fields under `text_config` (the reader prefers it); the
    writer replaced only the top-level keys, so a stage that changed e.g. the positions exported a
    model that read back with the old ones."""
    import dataclasses

    src = tmp_path / "src"
    shutil.copytree(release_dir, src)
    config = json.loads((src / "config.json").read_text())
    if nested:
        top = {k: config.pop(k) for k in list(config) if k.startswith("unitoken_") or k.endswith("_config")}
        (src / "config.json").write_text(json.dumps({**top, "model_type": "chameleon", "text_config": config}))
    model = unitoken_jax.load(str(src))
    changed = dataclasses.replace(model.config.decoder, max_position_embeddings=512, rope_theta=5e5, dropout=0.1)
    model.config = model.config.replace(decoder=changed)
    model.save_hf(str(tmp_path / "out"))
    assert unitoken_jax.load(str(tmp_path / "out")).config.decoder == changed
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ("text_config" in written) == nested and "text_config" not in written.get("text_config", {})


def test_a_model_made_here_saved_as_hf_loads_in_transformers_with_our_logits(tmp_path):
    """A model that did not come from a release (`unitoken init`, a trained shapes model) had no
    `vocabulary_map` in its config.json, which transformers' Chameleon reads as it loads: it failed
    with "'NoneType' object has no attribute 'get'"."""
    import transformers

    from unitoken_jax.configs.model import get_config

    model = unitoken_jax.UniTokenModel.random(unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model), seed=3)
    model.save_hf(str(tmp_path / "hf"))
    theirs = transformers.ChameleonForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = np.arange(12)[None] + 8900
    with torch.no_grad():
        want = theirs(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.text_logits(tokens)), want, atol=2e-4, rtol=0)


def test_a_checkpoint_of_mixed_dtypes_round_trips_tensor_by_tensor(release_dir, tmp_path, capsys):
    """float32 norms beside bfloat16 matrices (what some trainers save): every tensor was written
    back in the dtype of most elements, and `param_dtype=None` (documented as lossless) rounded the
    norms to bfloat16 as it read them. Each tensor now goes back in its own dtype, through our
    Orbax format too, and `param_dtype=None` reads such a checkpoint in float32."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in os.listdir(release_dir):
        if not name.endswith(".safetensors"):
            (mixed / name).write_bytes((release_dir / name).read_bytes())
    original = {k: (v.float() + 1e-3) if "norm" in k else v for k, v in _tensors(release_dir).items()}
    assert any(v.dtype == torch.float32 for v in original.values())
    save_file(original, mixed / "model.safetensors")

    def same_as_original(path):
        written = _tensors(path)
        assert sorted(written) == sorted(original)
        for k in original:
            assert written[k].dtype == original[k].dtype and torch.equal(written[k], original[k]), k

    model = unitoken_jax.load(str(mixed))
    model.save_hf(str(tmp_path / "out"))
    same_as_original(tmp_path / "out")
    exact = unitoken_jax.load(str(mixed), param_dtype=None)
    assert exact.config.param_dtype == "float32"
    norms = [k for k in original if k.startswith("model.") and "norm" in k and "vqmodel" not in k]
    assert norms and np.asarray(exact.params["decoder"]["norm"]["scale"]).tolist() == \
        original["model.norm.weight"].tolist()
    assert cli.main(["convert", "--from", str(mixed), "--to", str(tmp_path / "orbax")]) == 0
    assert "bfloat16, " in capsys.readouterr().out  # the dtypes said: "bfloat16, N tensor(s) in float32"
    assert cli.main(["convert", "--from", str(tmp_path / "orbax"), "--to", str(tmp_path / "back")]) == 0
    same_as_original(tmp_path / "back")
    unitoken_jax.load(str(tmp_path / "orbax")).save_hf(str(tmp_path / "again"))
    same_as_original(tmp_path / "again")
    # config.json names the main dtype in a word: a {"default", "tensors"} map there made transformers'
    # `torch_dtype="auto"` load the model in float32, twice the memory
    import transformers

    for out in ("out", "back", "again"):
        assert json.loads((tmp_path / out / "config.json").read_text())["torch_dtype"] == "bfloat16", out
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "back")).dtype == torch.bfloat16


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def test_a_save_over_an_earlier_one_leaves_none_of_its_weight_files(release_dir, tmp_path):
    """Sharded first, one file after: the old index and shards go (the index would have been read,
    loading the old weights under the new config.json); other files stay."""
    from unitoken_jax.convert import hf as hf_io

    model = unitoken_jax.load(str(release_dir))
    out = tmp_path / "out"
    hf_io.write_hf(str(out), model.config, model.params, model.passthrough, model.hf_config, "float32",
                   shard_bytes=200_000)
    (out / "README.md").write_text("mine")
    assert (out / "model.safetensors.index.json").exists()
    other = unitoken_jax.UniTokenModel.random(model.config, seed=1)
    other.save_hf(str(out))
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    again = unitoken_jax.load(str(out))
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(other.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hf_io.write_hf(str(out), model.config, model.params, model.passthrough, model.hf_config, "float32",
                   shard_bytes=200_000)  # and back: the single file goes
    assert "model.safetensors" not in os.listdir(out)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(unitoken_jax.load(str(out)).params)[0]),
                                  np.asarray(jax.tree.leaves(model.params)[0]))
    # our format likewise: the tensors carried through from an earlier save are not restored with a later one
    assert model.passthrough
    model.save(str(tmp_path / "ours"))
    other.save(str(tmp_path / "ours"))
    assert unitoken_jax.load(str(tmp_path / "ours")).passthrough == {}
    # and across formats: `load` prefers ours, so an HF save into its folder takes its place
    (tmp_path / "ours" / "README.md").write_text("mine")
    model.save_hf(str(tmp_path / "ours"))
    assert sorted(os.listdir(tmp_path / "ours")) == ["README.md", "config.json", "model.safetensors"]
    for a, b in zip(jax.tree.leaves(unitoken_jax.load(str(tmp_path / "ours")).params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_save_that_fails_part_way_leaves_the_checkpoint_there_as_it_was(release_dir, tmp_path, monkeypatch):
    """Shards went into the folder under reader-visible names (model-00001.safetensors) and stayed
    when a later one failed: beside a one-file checkpoint, with no index, a reader took them all
    ('tensor ... is in both'). An int8 dtype truncated every weight to about 0."""
    from unitoken_jax.convert import hf as hf_io

    model = unitoken_jax.load(str(release_dir))
    out = tmp_path / "out"
    model.save_hf(str(out))
    before = sorted(os.listdir(out))
    real_save, calls = hf_io.save_safetensors, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    other = unitoken_jax.UniTokenModel.random(model.config, seed=1)
    monkeypatch.setattr(hf_io, "save_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        hf_io.write_hf(str(out), other.config, other.params, model.passthrough, model.hf_config, "float32",
                       shard_bytes=200_000)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == before
    for a, b in zip(jax.tree.leaves(unitoken_jax.load(str(out)).params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="dtype='int8': an HF checkpoint's weights are floating point"):
        model.save_hf(str(out), dtype="int8")
    assert sorted(os.listdir(out)) == before


def test_convert_and_init_refuse_what_they_could_not_write_before_reading_anything(release_dir, tmp_path, capsys):
    """--dtype float8 was a traceback and int32 an error from inside random init; a shard limit of 0
    wrote one file a tensor; a --to that is a file failed with 'File exists' after the source was read;
    init took a negative seed, which no sampling verb takes."""
    for argv, said in ((["convert", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
                       (["convert", "--max-shard-gb", "0"], "argument --max-shard-gb: 0 is out of range"),
                       (["convert", "--max-shard-gb", "nan"], "argument --max-shard-gb: nan is out of range"),
                       (["init", "--dtype", "float9"], "argument --dtype: invalid choice: 'float9'"),
                       (["init", "--seed", "-1"], "argument --seed: -1 is out of range: it must be in [0, 4294967")):
        src = ["--from", str(release_dir)] if argv[0] == "convert" else []
        with pytest.raises(SystemExit):
            cli.main([*argv[:1], *src, "--to", str(tmp_path / "out"), *argv[1:]])
        assert said in capsys.readouterr().err, argv
    (tmp_path / "a-file").write_text("")
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(tmp_path / "a-file")]) == 2
    out, err = capsys.readouterr()
    assert f"--to {tmp_path / 'a-file'} is a file; give a directory" in err and "read a" not in out
    assert not (tmp_path / "out").exists()
    # a place no directory can be made in (/proc here; a read-only mount) was found after reading the
    # whole source, as a bare "[Errno 2]"; the check makes nothing where it passes
    assert cli.main(["convert", "--from", str(release_dir), "--to", "/proc/unitoken/out"]) == 2
    out, err = capsys.readouterr()
    assert "--to /proc/unitoken/out cannot be written" in err and "read a" not in out
    assert cli.main(["convert", "--from", str(release_dir), "--to", "/proc"]) == 2  # there, but takes no file
    assert "--to /proc cannot be written" in capsys.readouterr().err
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(tmp_path / "new" / "out"),
                     "--max-shard-gb", "1"]) == 2  # (refused after the check, before any reading)
    assert not (tmp_path / "new").exists()
    # a shard size for an Orbax output (HF -> ours) was silently not used
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(tmp_path / "out"), "--max-shard-gb", "1"]) == 2
    assert "--max-shard-gb sizes the HF layout's safetensors files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_load_and_text_logits_refuse_what_would_run_wrong(release_dir):
    """param_dtype='float8' was numpy's 'data type not understood' and 'int32' an error from inside
    random init; token ids past the vocabulary or below 0 read another embedding row, floats were
    cut to integers, an empty row divided by zero: each silently or far from the cause."""
    for dtype in ("float8", "int32"):
        with pytest.raises(ValueError, match=f"param_dtype='{dtype}'; choose one of float32, bfloat16"):
            unitoken_jax.load(str(release_dir), param_dtype=dtype)
    model = unitoken_jax.load(str(release_dir))
    with pytest.raises(ValueError, match="dtype='int8' is not a dtype the model runs in"):
        model.config.replace(dtype="int8")
    vocab, positions = model.config.decoder.vocab_size, model.config.decoder.max_position_embeddings
    for ids, says in ((np.zeros((1, 0), np.int32), "has 0 tokens a row"),
                      (np.ones((1, positions + 1), np.int32), f"has {positions + 1} tokens a row; the model takes 1 "
                                                              f"to {positions}"),
                      (np.array([[1.5, 2.0]]), "must be integers, got float64"),
                      (np.array([[3, vocab]]), re.escape(f"must be in [0, {vocab}), got 3 to {vocab}")),
                      (np.array([[-1, 3]]), re.escape(f"must be in [0, {vocab}), got -1 to 3"))):
        with pytest.raises(ValueError, match=says):
            model.text_logits(ids)
        with pytest.raises(ValueError, match=says):  # forward had none of these checks (NaN logits for vocab)
            model.forward(ids)
    assert model.text_logits(np.array([[0, vocab - 1]])).shape == (1, 2, vocab)  # the ends are in range
    # config overrides were checked only after the whole checkpoint was read (minutes for a release)
    import unitoken_jax.model as model_module

    real = model_module._load_hf
    model_module._load_hf = lambda *a, **k: pytest.fail("the checkpoint was read before the overrides were checked")
    try:
        with pytest.raises(ValueError, match="dtype='fp16'"):
            unitoken_jax.load(str(release_dir), dtype="fp16")
        # an unknown option lists those load takes (the config's error listed decoder, lora, ..., which
        # it then refused)
        with pytest.raises(ValueError, match=r"load\(\) takes no option 'dtyp': besides its own") as said:
            unitoken_jax.load(str(release_dir), dtyp="bfloat16")
        fields = str(said.value).split("config fields ")[1].split(", ")
        assert "dtype" in fields and not {"decoder", "vision", "lora", "quantize", "param_dtype"} & set(fields)
        # checked as a config file's values are: each was taken, and the model saved a checkpoint
        # that would not load ('no' read as True, a float block size, a NumPy float in the JSON)
        for override, says in ((dict(scan_layers="no"), "load().scan_layers must be bool, got str 'no'"),
                               (dict(attention_block=64.0), "load().attention_block must be int, got float"),
                               (dict(z_loss_weight=np.float32(1e-4)), "load().z_loss_weight must be float"),
                               (dict(vision=None), "load(..., vision=...) would not change the parameters"),
                               (dict(lora=None), "load(..., lora=...) would not change the parameters")):
            with pytest.raises(ValueError, match=re.escape(says)):
                unitoken_jax.load(str(release_dir), **override)
        with pytest.raises(ValueError, match="param_dtype=dtype"):  # (== "float16", and no JSON can hold it)
            unitoken_jax.load(str(release_dir), param_dtype=np.dtype("float16"))
        for asked in (dict(param_dtype="float64"), dict(dtype="float64")):  # (float32 arrays, a float64 config)
            with pytest.raises(ValueError, match="float64 weights or compute need JAX's 64-bit mode"):
                unitoken_jax.load(str(release_dir), **asked)
    finally:
        model_module._load_hf = real
    for labels, says in ((np.array([[1, vocab]]), f"labels hold {vocab}, past the vocabulary"),
                         (np.array([[1.7, 2.0]]), "labels must be integers, got float64"),
                         (np.array([[1, 2, 3]]), "labels have shape")):  # (NaN or a wrong loss, silently)
        with pytest.raises(ValueError, match=re.escape(says)):
            model.forward(np.array([[1, 2]]), labels=labels)


def test_saves_read_a_tilde_as_load_does_and_a_failed_save_leaves_the_earlier_checkpoint(release_dir, tmp_path,
                                                                                           monkeypatch):
    """load('~/m') read the home directory's m, but save('~/m') and save_hf('~/m') wrote a folder named
    '~' in the working directory; a save whose config could not be written as JSON had already
    written over an earlier checkpoint's parameters, and left its config half written."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = unitoken_jax.load(str(release_dir))
    model.save("~/orbax")
    model.save_hf("~/hf")
    assert not (tmp_path / "~").exists()
    for saved in ("~/orbax", "~/hf"):
        for a, b in zip(jax.tree.leaves(unitoken_jax.load(saved).params), jax.tree.leaves(model.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    broken = model._like(model.config, model.params)
    monkeypatch.setattr(type(broken.config), "to_dict", lambda self: {"odd": np.float32(1)})
    with pytest.raises(TypeError, match="not JSON serializable"):
        broken.save("~/orbax")
    monkeypatch.undo()
    for a, b in zip(jax.tree.leaves(unitoken_jax.load(str(tmp_path / "home" / "orbax")).params),
                    jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_save_over_a_checkpoint_stopped_part_way_leaves_the_earlier_one_whole(release_dir, tmp_path, monkeypatch):
    """Orbax's forced save deletes the directory it writes first: `convert --overwrite` (or
    model.save) over an earlier checkpoint stopped by Ctrl-C left neither ("damaged or incomplete")."""

    import orbax.checkpoint as ocp

    model = unitoken_jax.load(str(release_dir))
    path = tmp_path / "ours"
    model.save(str(path))
    doubled = jax.tree.map(lambda a: np.asarray(a) * 2, model.params)
    real_save = ocp.Checkpointer.save

    def stopped(self, directory, *args, **kwargs):  # as far as a forced save gets before the stop
        if os.path.exists(directory):
            shutil.rmtree(directory)
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.Checkpointer, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        unitoken_jax.UniTokenModel(model.config, doubled).save(str(path))
    monkeypatch.setattr(ocp.Checkpointer, "save", real_save)
    for a, b in zip(jax.tree.leaves(unitoken_jax.load(str(path)).params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the next save replaces it whole, and leaves nothing of either beside it
    unitoken_jax.UniTokenModel(model.config, doubled).save(str(path))
    for a, b in zip(jax.tree.leaves(unitoken_jax.load(str(path)).params), jax.tree.leaves(doubled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(os.listdir(path)) == ["params", "unitoken_config.json"], os.listdir(path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_weights_are_as_readable_as_the_umask_makes_files(release_dir, tmp_path, umask):
    """safetensors 0.8 writes owner-only files (0600): a model saved into a lab's shared directory
    could not be read by anyone else, while its config.json could."""
    model = unitoken_jax.load(str(release_dir))
    old = os.umask(umask)
    try:
        model.save_hf(str(tmp_path / "hf"))
    finally:
        os.umask(old)
    modes = {f: os.stat(tmp_path / "hf" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "hf")}
    assert any(f.endswith(".safetensors") for f in modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_filesystem_without_permissions_or_an_unknown_umask_still_saves(release_dir, tmp_path, monkeypatch):
    """A chmod the filesystem refuses (vfat, some FUSE mounts) failed the whole save, half written;
    an umask /proc does not tell widened a private file to 0644."""
    from unitoken_jax.convert import files

    model = unitoken_jax.load(str(release_dir))

    def refused(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refused)
    model.save_hf(str(tmp_path / "no-chmod"))
    assert unitoken_jax.load(str(tmp_path / "no-chmod")).config == model.config
    monkeypatch.undo()
    monkeypatch.setattr(files, "_umask", lambda: None)
    old = os.umask(0o077)
    try:
        model.save_hf(str(tmp_path / "private"))
    finally:
        os.umask(old)
    assert {os.stat(tmp_path / "private" / f).st_mode & 0o077 for f in os.listdir(tmp_path / "private")} == {0}


def test_on_a_pod_only_the_first_process_writes_what_is_not_sharded(release_dir, tmp_path, monkeypatch):
    """Every process of a pod wrote the sidecar to one .partial file and renamed it over: one found it
    gone (FileNotFoundError in the pod's final export, which then hung 300 s at the shutdown barrier)."""
    import types

    from unitoken_jax.convert import orbax_io

    model = unitoken_jax.load(str(release_dir))
    model.save(str(tmp_path / "ours"))
    sidecar = tmp_path / "ours" / "unitoken_config.json"
    sidecar.write_text(sidecar.read_text().replace('"config"', '"first": "process 0 wrote this", "config"', 1))
    was = sidecar.read_text()
    (tmp_path / "ours" / "passthrough" / "kept").write_text("process 0 removes an earlier save's passthrough")
    monkeypatch.setattr(orbax_io, "jax", types.SimpleNamespace(process_index=lambda: 1, process_count=lambda: 1,
                                                               tree=jax.tree))
    unitoken_jax.UniTokenModel(model.config, model.params).save(str(tmp_path / "ours"))  # (without passthrough)
    assert sidecar.read_text() == was
    assert not os.path.exists(str(sidecar) + ".partial")
    assert (tmp_path / "ours" / "passthrough" / "kept").exists()


def test_a_float64_checkpoint_is_refused_without_jax_64_bit_mode(release_dir, tmp_path):
    """Its own float64 (not asked for in load's arguments) gave float32 arrays under a float64 config."""
    import json

    unitoken_jax.load(str(release_dir)).save(str(tmp_path / "ours"))
    sidecar = tmp_path / "ours" / "unitoken_config.json"
    record = json.loads(sidecar.read_text())
    record["config"]["param_dtype"] = "float64"
    sidecar.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="float64 weights or compute need JAX's 64-bit mode"):
        unitoken_jax.load(str(tmp_path / "ours"), param_dtype=None)  # (None: the checkpoint's own)
    # the default, float32: without a warning from JAX for each parameter that float64 is not available
    # (the check of the stored shapes built the checkpoint's own float64 parameters)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert unitoken_jax.load(str(tmp_path / "ours")).config.param_dtype == "float32"
    # an HF checkpoint of float64 tensors is rounded to float32, and says so in its config: it was
    # recorded as float64 over float32 arrays (its conversion then could not load back)
    tensors = {k: v.to(torch.float64) for k, v in _tensors(release_dir).items()}
    os.makedirs(tmp_path / "f64")
    save_file(tensors, tmp_path / "f64" / "model.safetensors")
    (tmp_path / "f64" / "config.json").write_text((release_dir / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = unitoken_jax.load(str(tmp_path / "f64"), param_dtype=None)
    assert model.config.param_dtype == "float32"
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(model.params)} == {"float32"}
    assert cli.main(["convert", "--from", str(tmp_path / "f64"), "--to", str(tmp_path / "f64-orbax")]) == 0
    assert unitoken_jax.load(str(tmp_path / "f64-orbax"), param_dtype=None).config.param_dtype == "float32"


def test_sharded_write_has_an_index(release_dir, tmp_path):
    from unitoken_jax.convert import hf as hf_io

    model = unitoken_jax.load(str(release_dir))
    hf_io.write_hf(str(tmp_path), model.config, model.params, model.passthrough, model.hf_config, "bfloat16",
                   shard_bytes=200_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert sorted(weight_map) == sorted(_tensors(release_dir))
    reloaded = unitoken_jax.load(str(tmp_path))
    tokens = np.arange(10)[None] + 8900
    np.testing.assert_array_equal(np.asarray(reloaded.text_logits(tokens)), np.asarray(model.text_logits(tokens)))


def test_an_index_that_names_a_tensor_its_shard_lacks_is_refused_and_other_mismatches_are_told(
        release_dir, tmp_path, caplog):
    """The index was read for its file names only: a tensor it named that no shard held (a shard
    from another save) loaded without it, unsaid, and a conversion wrote a checkpoint without it."""

    from safetensors.numpy import load_file, save_file

    from unitoken_jax.convert import hf as hf_io, vqgan as vqgan_io
    from unitoken_jax.convert.files import CheckpointError

    model = unitoken_jax.load(str(release_dir))
    sharded = tmp_path / "sharded"
    hf_io.write_hf(str(sharded), model.config, model.params, model.passthrough, model.hf_config, "bfloat16",
                   shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    victim = next(k for k in index if k.startswith("model.vqmodel."))  # (passthrough: not a model parameter)
    lacking = tmp_path / "lacking"
    shutil.copytree(sharded, lacking)
    tensors = load_file(str(lacking / index[victim]))
    del tensors[victim]
    save_file(tensors, str(lacking / index[victim]), metadata={"format": "pt"})
    for read in (unitoken_jax.load, hf_io.read_hf, vqgan_io.read_hf_vqmodel):
        with pytest.raises(CheckpointError, match=re.escape(f"names 1 tensors that its shards do not hold: {victim} "
                                                            f"(in {index[victim]})")):
            read(str(lacking))

    # the same tensors in another shard than named, and one the index does not name: read, and said
    moved = tmp_path / "moved"
    shutil.copytree(sharded, moved)
    files = sorted(set(index.values()))
    other = next(f for f in files if f != index[victim])
    into = load_file(str(moved / other))
    out = load_file(str(moved / index[victim]))
    into[victim] = out.pop(victim)
    save_file(into, str(moved / other), metadata={"format": "pt"})
    save_file(out, str(moved / index[victim]), metadata={"format": "pt"})
    record = json.loads((moved / "model.safetensors.index.json").read_text())
    unnamed = sorted(record["weight_map"])[0]
    del record["weight_map"][unnamed]
    (moved / "model.safetensors.index.json").write_text(json.dumps(record))
    with caplog.at_level("WARNING"):
        back = hf_io.read_hf(str(moved))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"{victim} (named in {index[victim]}, found in {other})" in said
    assert f"1 tensors are not in the index: {unnamed}" in said
    np.testing.assert_array_equal(back.passthrough[victim], model.passthrough[victim])


def test_a_directory_of_pytorch_weights_is_refused_by_what_it_holds(tmp_path):
    """A transformers save with safe_serialization=False was refused as 'no .safetensors files'."""
    from unitoken_jax.convert.files import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chameleon"}))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"holds PyTorch weights \(pytorch_model.bin\), not safetensors.*"
                                              r"save_pretrained"):
        unitoken_jax.load(str(tmp_path))


def test_another_models_checkpoint_and_a_lost_shard_are_said_for_what_they_are(tmp_path):
    """A Llama or Qwen2 checkpoint was refused as a Chameleon missing its QK-norm tensor, naming no
    folder; a shard lost from a checkpoint without an index was blamed on config.json's layer count."""

    from transformers import LlamaConfig, LlamaForCausalLM

    from unitoken_jax.convert.files import CheckpointError

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'llama'}/config.json describes a 'llama' model "
                                                        "(LlamaForCausalLM), not a UniToken / Chameleon decoder")):
        unitoken_jax.load(str(tmp_path / "llama"))
    oracles.write_chameleon(tmp_path / "sharded", oracles.make_chameleon(seed=3), layout="lumina", shards=3)
    unitoken_jax.load(str(tmp_path / "sharded"))  # (whole, it loads)
    shutil.copytree(tmp_path / "sharded", tmp_path / "lost")
    os.remove(tmp_path / "lost" / "model.safetensors.index.json")
    unitoken_jax.load(str(tmp_path / "lost"))  # all three shards, no index: loads
    os.remove(tmp_path / "lost" / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'lost'} has no index (model.safetensors.index.json) and lacks "
            "model-00002-of-00003.safetensors: its shards' names say 3 of them")):
        unitoken_jax.load(str(tmp_path / "lost"))


def test_convert_both_ways_with_the_cli(release_dir, tmp_path, capsys):
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(tmp_path / "orbax")]) == 0
    assert "per-shard" in capsys.readouterr().out
    with open(tmp_path / "orbax" / "unitoken_config.json") as f:
        assert json.load(f)["config"]["param_dtype"] == "bfloat16"  # lossless: kept in the source's dtype
    ours = unitoken_jax.load(str(tmp_path / "orbax"))
    assert ours.params["decoder"]["norm"]["scale"].dtype == np.float32  # load() gives float32 parameters
    hf = unitoken_jax.load(str(release_dir))
    tokens = np.arange(12)[None] + 8900
    np.testing.assert_array_equal(np.asarray(ours.text_logits(tokens)), np.asarray(hf.text_logits(tokens)))
    assert cli.main(["convert", "--from", str(tmp_path / "orbax"), "--to", str(tmp_path / "back")]) == 0
    original, back = _tensors(release_dir), _tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for k in original:
        assert torch.equal(original[k], back[k]), k


def test_a_home_relative_path_the_shell_left_as_written_is_the_users_home(release_dir, tmp_path, monkeypatch, capsys):
    """`--from=~/m` and a quoted `~` in $UNITOKEN_MODEL reach us unexpanded: load() said the
    directory that exists was none."""

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(release_dir, tmp_path / "m")
    assert unitoken_jax.read_config("~/m") == unitoken_jax.read_config(str(release_dir))
    assert unitoken_jax.load("~/m").config == unitoken_jax.load(str(release_dir)).config
    assert cli.main(["convert", "--from=~/m", "--to=~/ours"]) == 0, capsys.readouterr().err
    assert (tmp_path / "ours" / "unitoken_config.json").is_file() and not os.path.exists("~")
    from unitoken_jax.tokenizer.text import TextTokenizer
    from unitoken_jax.world import default

    if default.available():
        shutil.copy(os.path.join(default.DEFAULT_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
        assert TextTokenizer.from_file("~/tokenizer.json").num_codes > 0


def test_cli_convert_quantizes_once(release_dir, tmp_path, capsys):
    """`convert --quantize int8` writes an int8 Orbax checkpoint that loads int8 with no flag, and
    equals quantizing on load; an Orbax checkpoint of the old q/k/v layout is a clear error."""
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(tmp_path / "q8"), "--quantize", "int8"]) == 0
    assert "int8 weights" in capsys.readouterr().out
    stored = unitoken_jax.load(str(tmp_path / "q8"))
    on_load = unitoken_jax.load(str(release_dir), quantize="int8")
    assert stored.config.quantize == on_load.config.quantize == "int8"
    kernel = stored.params["decoder"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.dtype == np.int8
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(on_load.params["decoder"]["layers"]["mlp"]["up_proj"]["kernel"]))
    tokens = np.arange(12)[None] + 8900
    np.testing.assert_array_equal(np.asarray(stored.text_logits(tokens)), np.asarray(on_load.text_logits(tokens)))
    # back to the HF layout: refused (it wrote the int8 codes as float weights and dropped the scales)
    assert cli.main(["convert", "--from", str(tmp_path / "q8"), "--to", str(tmp_path / "hf8")]) == 2
    assert "holds int8 weights, which the HF layout cannot carry" in capsys.readouterr().err
    assert not (tmp_path / "hf8" / "config.json").exists()

    # over a checkpoint: refused without --overwrite (an int8 conversion over the float weights, or
    # into the release's own folder, where ours shadows its files, cannot be undone); never in place
    float_orbax = tmp_path / "f32"
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(float_orbax)]) == 0
    capsys.readouterr()
    for src, dst in ((float_orbax, float_orbax), (release_dir, release_dir)):
        assert cli.main(["convert", "--from", str(src), "--to", str(dst), "--quantize", "int8", "--overwrite"]) == 2
        assert f"--to {dst} is --from: a conversion writes a new checkpoint" in capsys.readouterr().err
    assert not (release_dir / "unitoken_config.json").exists()
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(float_orbax), "--quantize", "int8"]) == 2
    assert f"--to {float_orbax} holds a checkpoint already (our Orbax checkpoint); give a new directory, or " \
        "--overwrite to replace it" in capsys.readouterr().err
    assert unitoken_jax.load(str(float_orbax)).config.quantize == "none"
    assert cli.main(["convert", "--from", str(tmp_path / "q8"), "--to", str(release_dir)]) == 2
    assert "holds a checkpoint already (config.json, model.safetensors" in capsys.readouterr().err
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(float_orbax), "--quantize", "int8",
                     "--overwrite"]) == 0
    assert unitoken_jax.load(str(float_orbax)).config.quantize == "int8"

    sidecar = tmp_path / "q8" / "unitoken_config.json"
    meta = json.loads(sidecar.read_text())
    del meta["param_layout"]  # what a checkpoint written before the heads-first q/k/v kernels has
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(unitoken_jax.CheckpointError, match="older unitoken-jax.*unitoken convert"):
        unitoken_jax.load(str(tmp_path / "q8"))


def test_a_folder_with_peft_adapters_or_a_stray_file_beside_the_weights_loads_its_model(release_dir, tmp_path):
    """`save_pretrained` of a model and then of its PEFT adapters into one folder (transformers loads
    it), or a browser's "model (1).safetensors" beside the weights: every .safetensors file was read
    as the model's and the load refused the adapters' tensors as unexpected, naming no file."""
    folder = tmp_path / "with_adapters"
    shutil.copytree(release_dir, folder)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)}, folder / "adapter_model.safetensors")
    shutil.copy(folder / "model.safetensors", folder / "model (1).safetensors")
    with pytest.warns(UserWarning) as said:
        model = unitoken_jax.load(str(folder))
    words = [str(w.message) for w in said]
    assert any("holds PEFT adapters (adapter_model.safetensors) beside the model: its weights are read without them"
               in w for w in words), words
    assert any("model (1).safetensors not read (the model's weights are model.safetensors)" in w for w in words), words
    tokens = np.arange(12)[None] + 8900
    np.testing.assert_array_equal(np.asarray(model.text_logits(tokens)),
                                  np.asarray(unitoken_jax.load(str(release_dir)).text_logits(tokens)))


def test_a_conversion_with_dtype_says_it_and_converts_back_in_it(release_dir, tmp_path, capsys):
    """`convert --dtype float32` of the (bfloat16) release said only the source's dtype, and its copy
    converted back with no --dtype was written in the source's bfloat16, not the float32 it held."""
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert f"wrote our Orbax checkpoint (float32) to {tmp_path / 'f32'}" in capsys.readouterr().out
    assert cli.main(["convert", "--from", str(tmp_path / "f32"), "--to", str(tmp_path / "back")]) == 0
    with safe_open(str(tmp_path / "back" / "model.safetensors"), "pt") as f:
        name = next(k for k in f.keys() if k.endswith("mlp.up_proj.weight"))
        assert f.get_tensor(name).dtype == torch.float32
    with safe_open(str(release_dir / "model.safetensors"), "pt") as f:  # (the source's own)
        assert f.get_tensor(name).dtype == torch.bfloat16


def test_a_trained_models_record_goes_with_every_copy_of_it(release_dir, tmp_path, capsys):
    """What training records beside its model (`trained_pictures.json`: its pictures' crop, the
    tokenizer's fingerprint) is copied by every conversion and save of it: its int8 copy drew at
    512 x 512, not its own size, and skipped the tokenizer check (the record was left behind)."""
    from unitoken_jax.inference.pipeline import TRAINED_PICTURES, trained_record

    trained = tmp_path / "final"
    shutil.copytree(release_dir, trained)
    record = {"vq_size": 64, "crop": 32, "anyres": False, "tokenizer_sha256": "ab" * 32}
    (trained / TRAINED_PICTURES).write_text(json.dumps(record))
    for argv in (["--to", "q8", "--quantize", "int8"], ["--to", "orbax"]):
        assert cli.main(["convert", "--from", str(trained), *argv[:1], str(tmp_path / argv[1]), *argv[2:]]) == 0
    assert cli.main(["convert", "--from", str(tmp_path / "orbax"), "--to", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    unitoken_jax.load(str(trained), quantize="int8").save(str(tmp_path / "saved"))
    unitoken_jax.load(str(tmp_path / "orbax")).save_hf(str(tmp_path / "saved_hf"))
    for copy in ("q8", "orbax", "hf", "saved", "saved_hf"):
        assert trained_record(str(tmp_path / copy)) == record, copy
    assert trained_record(unitoken_jax.load(str(tmp_path / "q8"))) == record
    model = unitoken_jax.load(str(tmp_path / "q8"))
    model.save(str(tmp_path / "q8"))  # saved over its own directory: the record stays as it was
    assert trained_record(str(tmp_path / "q8")) == record
    assert not os.path.exists(tmp_path / "plain" / TRAINED_PICTURES)
    unitoken_jax.load(str(release_dir)).save(str(tmp_path / "plain"))  # none where the source had none
    assert not os.path.exists(tmp_path / "plain" / TRAINED_PICTURES)


def test_cli_init_writes_a_loadable_random_model(tmp_path, capsys):
    assert cli.main(["init", "--config", "tiny", "--to", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    model = unitoken_jax.load(str(tmp_path / "tiny"))
    assert model.kind == "unitoken" and model.config.decoder.num_layers == 2
    again = unitoken_jax.UniTokenModel.random(model.config, seed=3)
    tokens = np.arange(6)[None] + 8900
    np.testing.assert_array_equal(np.asarray(model.text_logits(tokens)), np.asarray(again.text_logits(tokens)))
    assert cli.main(["init", "--config", "nope.py:x", "--to", str(tmp_path / "x")]) == 2
    assert "no config file" in capsys.readouterr().err
    # a directory that holds a checkpoint is not written over without --overwrite
    before = (tmp_path / "tiny" / "model.safetensors").read_bytes()
    assert cli.main(["init", "--config", "tiny", "--to", str(tmp_path / "tiny"), "--seed", "4"]) == 2
    assert "holds a checkpoint already (config.json, model.safetensors)" in capsys.readouterr().err
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == before
    assert cli.main(["init", "--config", "tiny", "--to", str(tmp_path / "tiny"), "--seed", "4", "--overwrite"]) == 0
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() != before
    model.save(str(tmp_path / "ours"))  # our format too
    assert cli.main(["init", "--config", "tiny", "--to", str(tmp_path / "ours")]) == 2
    assert "holds a checkpoint already (our Orbax checkpoint)" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()  # a directory with other things in it is fine
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert cli.main(["init", "--config", "tiny", "--to", str(tmp_path / "notes")]) == 0


def test_orbax_checkpoint_restores_onto_a_mesh(release_dir, tmp_path):
    from unitoken_jax import sharding

    single = unitoken_jax.load(str(release_dir))
    single.save(str(tmp_path / "orbax"))
    mesh = sharding.make_mesh(fsdp=4, tensor=2, devices=jax.devices()[:8])
    sharded = unitoken_jax.load(str(tmp_path / "orbax"), mesh=mesh)
    up = sharded.params["decoder"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    tokens = np.arange(16).reshape(2, 8) + 8900
    np.testing.assert_allclose(np.asarray(sharded.text_logits(tokens)), np.asarray(single.text_logits(tokens)),
                               atol=1e-5)


# --- bad checkpoints -----------------------------------------------------------------------------

def _rewrite(src, dst, edit):
    tensors = _tensors(src)
    edit(tensors)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(config)
    return str(dst)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}), r"unexpected tensor.*model\.layers\.0\.extra"),
    (lambda t: t.update({"adapter.2.bias": torch.zeros(63)}), r"bad: tensor adapter\.2\.bias \(in model\.safetensors\) has shape \[63\], the model .*bad/config\.json "
     r"describes expects \[64\]"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(8960, 64, dtype=torch.int32)}), r"bad: tensor lm_head\.weight \(in model\.safetensors\) has dtype I32"),
])
def test_bad_checkpoints_name_the_key(release_dir, tmp_path, edit, message):
    path = _rewrite(release_dir, tmp_path / "bad", edit)
    with pytest.raises(unitoken_jax.CheckpointError, match=message):
        unitoken_jax.load(path)


def test_a_config_json_of_other_heads_is_said_of_config_json_not_of_a_tensor(release_dir, tmp_path):
    """A head count that still divides the width was blamed on a tensor ("k_proj.weight has shape
    [64, 64], the model expects [32, 64]"): with a 7B download that reads as a corrupt file."""
    for key in ("num_key_value_heads", "num_attention_heads"):
        folder = tmp_path / key
        shutil.copytree(release_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        text = config.get("text_config", config)
        for halved in {key, "num_key_value_heads"}:  # (fewer query heads than key ones: refused as such)
            text[halved] //= 2
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(unitoken_jax.CheckpointError, match=f"{re.escape(str(folder))}/config.json does not describe "
                           f"the tensors beside it: {key} = {text[key]} "):
            unitoken_jax.load(str(folder))


def test_truncated_file_is_a_clear_error(release_dir, tmp_path):
    path = _rewrite(release_dir, tmp_path / "bad", lambda t: None)
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(unitoken_jax.CheckpointError, match="truncated"):
        unitoken_jax.load(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        unitoken_jax.load(str(tmp_path / "nope"))
    with pytest.raises(unitoken_jax.CheckpointError, match="no config.json"):
        unitoken_jax.load(str(tmp_path))


@pytest.mark.parametrize("edit,says", [
    (lambda c: c["decoder"].update(intermediate_size=c["decoder"]["intermediate_size"] + 8), "stored"),
    (lambda c: c["decoder"].update(num_layers=c["decoder"]["num_layers"] + 1), "stored"),
    (lambda c: c.update(vision=None), "not in the config"),
], ids=["width", "layers", "no-vision"])
def test_a_sidecar_that_disagrees_with_the_arrays_is_refused_before_anything_is_written(release_dir, tmp_path,
                                                                                        capsys, edit, says):
    """`convert` wrote a broken checkpoint and reported success when the Orbax sidecar's config
    did not match the stored arrays (issue 15, item 3): Orbax does not enforce a restore target's shapes."""
    orbax = tmp_path / "orbax"
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(orbax)]) == 0
    sidecar = orbax / "unitoken_config.json"
    meta = json.loads(sidecar.read_text())
    edit(meta["config"])
    sidecar.write_text(json.dumps(meta))
    assert cli.main(["convert", "--from", str(orbax), "--to", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "do not match the config" in err and says in err
    assert not (tmp_path / "hf").exists()
    for quantize in ("none", "int8"):
        with pytest.raises(unitoken_jax.CheckpointError, match="do not match"):
            unitoken_jax.load(str(orbax), quantize=quantize)


@pytest.mark.parametrize("config_text,says", [
    ('{"hidden_size": 64,', r"config\.json is not valid JSON \(line 1"),
    ("[1, 2]", r"config\.json must hold a JSON object, not a list"),
    (None, r"config\.json lacks the key 'hidden_size'"),
    ("string-width", r"config\.json has a value of the wrong type"),
], ids=["invalid-json", "a-list", "missing-key", "wrong-type"])
def test_a_broken_config_json_is_named(release_dir, tmp_path, config_text, says):
    """Invalid JSON, a list, a missing key or a string where a number belongs in config.json gave
    a bare JSONDecodeError / KeyError / TypeError (issue 15)."""
    path = _rewrite(release_dir, tmp_path / "bad", lambda t: None)
    config = json.loads(open(os.path.join(path, "config.json")).read())
    if config_text is None:
        del config["hidden_size"]
        config_text = json.dumps(config)
    elif config_text == "string-width":
        config_text = json.dumps({**config, "hidden_size": "sixty-four"})
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config_text)
    for read in (unitoken_jax.load, unitoken_jax.read_config):
        with pytest.raises(unitoken_jax.CheckpointError, match=says):
            read(path)


def test_broken_index_and_sidecar_files_are_named(release_dir, tmp_path):
    path = _rewrite(release_dir, tmp_path / "bad", lambda t: None)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": ')
    with pytest.raises(unitoken_jax.CheckpointError, match=r"index\.json is not valid JSON"):
        unitoken_jax.load(path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write('{"metadata": {}}')
    with pytest.raises(unitoken_jax.CheckpointError, match="no 'weight_map'"):
        unitoken_jax.load(path)
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(tmp_path / "orbax")]) == 0
    with open(tmp_path / "orbax" / "unitoken_config.json", "w") as f:
        f.write("{not json")
    with pytest.raises(unitoken_jax.CheckpointError, match=r"unitoken_config\.json is not valid JSON"):
        unitoken_jax.load(str(tmp_path / "orbax"))


@pytest.mark.parametrize("damage", ["data-deleted", "data-truncated", "manifest-gone"])
def test_a_damaged_orbax_checkpoint_is_one_clear_error(release_dir, tmp_path, damage):
    """A deleted or truncated data file, or the manifest gone, gave a TensorStore traceback (issue 15)."""
    orbax = tmp_path / "orbax"
    assert cli.main(["convert", "--from", str(release_dir), "--to", str(orbax)]) == 0
    files = [p for p in (orbax / "params").rglob("*") if p.is_file()]
    data = sorted((p for p in files if p.parent.name == "d"), key=lambda p: -p.stat().st_size)
    manifest = [p for p in files if p.name == "manifest.ocdbt"]
    assert data and manifest, sorted(str(p.relative_to(orbax)) for p in files)
    if damage == "data-deleted":
        data[0].unlink()
    elif damage == "data-truncated":
        with open(data[0], "r+b") as f:
            f.truncate(data[0].stat().st_size // 2)
    else:
        for p in manifest:
            p.unlink()
    with pytest.raises(unitoken_jax.CheckpointError, match="orbax") as err:
        unitoken_jax.load(str(orbax))
    # the storage layer's own reason (which array, what is wrong), not Orbax's wrapper (whose
    # "details" are a method's repr) nor a Python error from reading a missing index
    message = str(err.value)
    assert not any(s in message for s in ("bound method", "Encountered error", "NoneType", "tensorstore_spec")), message
    assert ("Error reading" in message) if damage.startswith("data") else ("index of the stored arrays" in message)


@pytest.mark.parametrize("key,value", [("hidden_size", 10**9), ("vocab_size", 10**12), ("intermediate_size", 10**12),
                                       ("num_hidden_layers", 3)])
def test_config_sizes_that_do_not_match_the_files_are_refused_at_once(release_dir, tmp_path, key, value):
    """Absurd sizes in config.json made the loader allocate terabytes to compute a shape (issue 15)."""
    path = _rewrite(release_dir, tmp_path / "bad", lambda t: None)
    config = json.loads(open(os.path.join(path, "config.json")).read())
    config[key] = value
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(unitoken_jax.CheckpointError, match=f"does not describe the tensors.*{value}"):
        unitoken_jax.load(path)


def test_auto_dtypes_are_bfloat16_on_accelerators_and_float32_on_a_cpu(release_dir, monkeypatch):
    """`load(param_dtype="auto", dtype="auto")` takes what the CLI's `auto` takes: bfloat16 weights and
    compute on a TPU or GPU (the release in float32 does not fit a Colab chip), float32 on a CPU."""
    from unitoken_jax import model as model_lib

    def dtypes(model):
        return {str(leaf.dtype) for leaf in jax.tree.leaves(model.params)}, model.config.dtype

    assert dtypes(unitoken_jax.load(str(release_dir), param_dtype="auto", dtype="auto")) == ({"float32"}, "float32")
    for platform in ("tpu", "gpu"):
        monkeypatch.setattr(model_lib, "_platform", lambda mesh, p=platform: p)
        assert dtypes(unitoken_jax.load(str(release_dir), param_dtype="auto", dtype="auto")) == ({"bfloat16"},
                                                                                                  "bfloat16")
    assert dtypes(unitoken_jax.load(str(release_dir), param_dtype="auto"))[0] == {"bfloat16"}  # dtype as stored

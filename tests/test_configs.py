"""The released 7B configs, checked with jax.eval_shape only (no memory)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import unitoken_jax
from unitoken_jax.configs.model import get_config
from unitoken_jax import configs
from unitoken_jax.models.unitoken import abstract_params
from unitoken_jax.train.config import TrainConfig


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["7b", "7b_anyres"])
def test_7b_parameter_counts(name):
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config(name).model)
    params = abstract_params(cfg)
    # What the release's tensors add up to, from their shapes (Chameleon-7B, model_parallel_size=1:
    # QK-norm weight and bias are [1, 128]; SigLIP so400m/14 vision tower without its head).
    d, f, v, layers, hd = 4096, 11008, 65536, 32, 128
    decoder = 2 * v * d + d + layers * (4 * d * d + 3 * d * f + 2 * d + 4 * 1 * hd)
    vd, vf, vl = 1152, 4304, 27
    vision = (vd * 3 * 14 * 14 + vd) + 729 * vd + 2 * vd + vl * (4 * (vd * vd + vd) + 2 * vd * vf + vf + vd + 4 * vd)
    adapter = vd * d + d + d * d + d
    got = {k: _count(params[k]) for k in ("decoder", "vit", "adapter")}
    assert got == {"decoder": decoder, "vit": vision, "adapter": adapter}
    assert abs(got["decoder"] / 7.01e9 - 1) < 1e-3
    assert abs(got["vit"] / 0.413e9 - 1) < 1e-3
    assert abs(got["adapter"] / 21.5e6 - 1) < 1e-3


def test_7b_shapes_and_dtypes():
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("7b").model)
    assert (cfg.dtype, cfg.param_dtype, cfg.remat_policy) == ("bfloat16", "float32", "full")
    p = abstract_params(cfg)
    attn = p["decoder"]["layers"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (32, 32, 4096, 128)  # [layers, heads, embed, head_dim]
    assert attn["q_norm"]["scale"].shape == (32, 1, 128)
    assert p["vit"]["position_embedding"].shape == (729, 1152)


def test_unknown_config_field_is_an_error():
    d = get_config("tiny").model.to_dict()
    d["decoder"]["num_layer"] = 3
    with pytest.raises(ValueError, match="num_layer"):
        unitoken_jax.UniTokenConfig.from_dict(d)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_configs_build_and_differ_as_the_recipe_says(stage):
    import importlib.util
    import os

    # the repository's configs/stageN.py, the file users copy, gives the packaged config
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"stage{stage}.py")
    spec = importlib.util.spec_from_file_location(f"stage{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    full, tiny = module.get_config(""), module.get_config("tiny")
    assert full.to_dict() == configs.get_config(f"stage{stage}").to_dict()
    for config in (full, tiny):  # every key is a field of the typed config, of the right type
        TrainConfig.from_config_dict(config)
    unitoken_jax.UniTokenConfig.from_dict(full.model.to_dict()).validate()
    unitoken_jax.UniTokenConfig.from_dict(tiny.model.to_dict()).validate()
    assert full.optimizer.trainable == ("vision" if stage == 1 else "all")
    assert tuple(full.data.mix) == ((1, 0) if stage == 1 else (1, 1))
    assert full.optimizer.learning_rate == {1: 1e-3, 2: 1e-5, 3: 5e-6}[stage]
    assert full.optimizer.vit_lr_scale == (1e-2 if stage == 1 else 1.0)
    assert full.init_from.kind == ("checkpoint" if stage == 1 else "stage")
    assert full.model.decoder.dropout == 0.05 and full.model.z_loss_weight == 1e-5  # DESIGN.md section 2
    assert tiny.init_from.kind == "random" and tiny.data.demo
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("huge")


def test_the_typed_training_config_refuses_unknown_keys_and_wrong_types_by_name():
    base = configs.get_config("stage2.py:tiny")
    typed = TrainConfig.from_config_dict(base)
    assert typed.optimizer.learning_rate == base.optimizer.learning_rate and typed.data.mix == (1, 1)
    assert typed.optimizer.total_steps == base.total_steps  # the schedule spans the run

    misspelt = base.copy_and_resolve_references()
    misspelt.optimizer.learning_rat = 1e-3
    with pytest.raises(ValueError, match=r"config\.optimizer\.learning_rat\b"):
        TrainConfig.from_config_dict(misspelt)
    for key, value, message in (("data.rows", "8", r"config\.data\.rows must be int, got str"),
                                ("log_sample_ids", 1, r"config\.log_sample_ids must be bool, got int"),
                                ("data.mix", (1, 1, 1), r"config\.data\.mix must have 2 entries"),
                                ("model.decoder.hidden_size", 64.5, r"config\.model\.decoder\.hidden_size must be int"),
                                ("optimizer.trainable", "decoder", r"trainable='decoder'")):
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_config_dict(_set(base.copy_and_resolve_references(), key, value))
    # ints are floats, a single path is a tuple of one
    loose = base.copy_and_resolve_references()
    with loose.ignore_type():
        loose.optimizer.learning_rate, loose.data.sources = 1, "/data/meta.yaml"
    typed = TrainConfig.from_config_dict(loose)
    assert typed.optimizer.learning_rate == 1.0 and isinstance(typed.optimizer.learning_rate, float)
    assert typed.data.sources == ("/data/meta.yaml",)


@pytest.mark.parametrize("spec", ["stage1.py", "stage2.py", "stage3.py", "stage2.py:tiny", "stage2.py:anyres",
                                  "finetune.py:lora"])
def test_the_models_speed_settings_can_be_set_from_the_command_line_on_every_config(spec):
    """`--config.model.X=...` reaches only keys the config has: `loss_chunk` once was in the model's
    dataclass and in the README's advice, but in no config, so the override was refused."""
    from unitoken_jax.sweep import parse_like_train

    settings = dict(scan_layers=False, loss_chunk=256, attention="xla", attention_block=64)
    flags = [f"--config.model.{k}={v}" for k, v in settings.items()]
    typed = TrainConfig.from_config_dict(parse_like_train(configs.resolve_spec(spec), flags))  # as the train command
    assert {k: getattr(typed.model, k) for k in settings} == settings
    # without the flags: the model dataclass's own defaults (the 7B's attention blocks are its choice)
    untouched = TrainConfig.from_config_dict(configs.get_config(spec)).model
    assert untouched.loss_chunk == unitoken_jax.UniTokenConfig.loss_chunk and untouched.attention == "auto"


@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", -1e-3, "positive"), ("learning_rate", 0.0, "positive"),
    ("learning_rate", float("nan"), "positive"),
    ("vit_lr_scale", -0.1, "0 or more"), ("warmup_fraction", 1.5, r"in \[0, 1\]"), ("b1", 1.0, r"in \[0, 1\)"),
    ("b2", -0.5, r"in \[0, 1\)"), ("weight_decay", -0.1, "0 or more"), ("grad_clip", 0.0, "positive"),
])
def test_optimizer_settings_out_of_range_are_refused_by_name(field, value, message):
    """A negative learning rate trained (the loss climbed to 4e5 in 40 steps of the tiny stage 2) and a
    clip of 0 would zero every update: such settings stop the run before it starts."""
    base = configs.get_config("stage2.py:tiny")
    TrainConfig.from_config_dict(base)  # (the config's own values pass)
    wrong = base.copy_and_resolve_references()
    wrong.optimizer[field] = value
    with pytest.raises(ValueError, match=f"optimizer.{field}={value!r} must be {message}"):
        TrainConfig.from_config_dict(wrong)
    # a negative stop_after was read as "none": the time-boxed job ran to its end
    with pytest.raises(ValueError, match=r"stop_after=-5: give a step to save and stop at \(> 0\), or 0"):
        TrainConfig.from_config_dict({**base.to_dict(), "stop_after": -5})
    # the edges that are allowed
    edge = base.copy_and_resolve_references()
    edge.optimizer.update(vit_lr_scale=0.0, warmup_fraction=1.0, b1=0.0, weight_decay=0.0, grad_clip=float("inf"))
    TrainConfig.from_config_dict(edge)


@pytest.mark.parametrize("flag,said", [
    ("--config.optimizer.learning_rate=-1", "optimizer.learning_rate=-1.0 must be positive"),
    # a field the config lacks, said by absl's parser as an AttributeError's traceback before
    ("--config.data.sourcez=x", "--config.data.sourcez: the config has no field 'sourcez'; "
                                'did you mean "sources" instead of "sourcez"?'),
    # int8, which load / convert take, is for inference only: said so, not only that the field is missing
    ("--config.model.quantize=int8", "--config.model.quantize: the config has no field 'quantize'; int8 weights are "
                                     "for inference only: train in float, then quantize the result (unitoken convert "
                                     "--from final --to final-int8 --quantize int8)"),
    # LoRA on a stage config: the field is the fine-tuning config's (said where it is)
    ("--config.model.lora.rank=8", "--config.model.lora.rank: the config has no field 'lora'; LoRA adapters are "
                                   "trained by the fine-tuning config: --config finetune.py:lora (then "
                                   "--config.model.lora.rank=...)"),
    # data that is not there: the traceback of an open() before
    ("--config.data.sources=/no/such/meta.yaml",
     "/no/such/meta.yaml: no such data meta file (YAML with a 'META' list of {path, ratio})"),
    # labels: the tiny stage-2 run went ahead, its config.json saying stage 1 / the 7B model
    ("--config.stage=1", "--config.stage would only relabel the run: a stage's recipe (what trains, its learning "
                         "rate, its data mix) is built by that stage's config: pass its file instead (stage1.py, "
                         "stage2.py, stage3.py)"),
    ("--config.model_name=7b", "--config.model_name would only relabel the run: the model is built from the config's "
                               "argument (stage2.py:tiny, stage2.py:anyres; none: the 7B) or set field by field "
                               "(--config.model.decoder.num_layers=...)"),
    # a blank cache setting: a traceback before
    ("--config.compilation_cache= ", "config.compilation_cache: a compilation cache is a directory or 'off', not ' '"),
])
def test_the_training_command_says_a_bad_setting_in_one_line(tmp_path, flag, said):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "unitoken_jax.train", "--config", "configs/stage2.py:tiny", "--workdir",
                        str(tmp_path / "run"), flag], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"unitoken_jax.train: {said}"
    if "learning_rate" in flag or "stage" in flag or "model_name" in flag:
        assert not (tmp_path / "run").exists()  # nothing written


def test_only_this_packages_own_errors_are_cut_to_one_line(tmp_path):
    """The training command says our messages in one line; an error a library raised, called from
    our code or not, keeps its traceback."""
    import yaml

    from unitoken_jax.data.pipeline import read_meta
    from unitoken_jax.train.__main__ import _raised_by_this_package

    with pytest.raises(FileNotFoundError) as ours:
        read_meta("/no/such/meta.yaml")
    (tmp_path / "meta.yaml").write_text("META: [path: {")
    with pytest.raises(yaml.YAMLError) as yamls_under_ours:
        read_meta(str(tmp_path / "meta.yaml"))
    with pytest.raises(ValueError) as numpys:
        np.zeros(6).reshape(4, 4)
    assert _raised_by_this_package(ours.value)
    assert not _raised_by_this_package(yamls_under_ours.value)
    assert not _raised_by_this_package(numpys.value)


def test_a_config_named_by_the_readme_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the packaged config of that name
    for spec in ("configs/stage2.py:tiny", "stage2.py:tiny", "stage2:tiny"):
        path, _, arg = configs.resolve_spec(spec).partition(":")
        assert path == configs.packaged_path("stage2") and arg == "tiny"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "stage2.py").write_text("def get_config(arg=''):\n    return {'mine': arg}\n")
    assert configs.get_config("configs/stage2.py:x") == {"mine": "x"}  # a file that exists wins
    with pytest.raises(FileNotFoundError, match="no config file 'elsewhere/stage9.py'"):
        configs.resolve_spec("elsewhere/stage9.py")


def test_a_skip_fails_the_run_in_ci_and_only_there(tmp_path):
    """tests/conftest.py's rule: with CI=true a skipped test fails the session (CI installs every
    test extra, so a skip there means a test that stopped proving anything)."""
    import inspect
    import os
    import subprocess
    import sys

    import conftest

    (tmp_path / "conftest.py").write_text("import os\nimport sys\n\n\n" + inspect.getsource(conftest.pytest_sessionfinish))
    (tmp_path / "test_skips.py").write_text("import pytest\n\n\ndef test_a():\n    pytest.skip('no oracle here')\n\n\n"
                                            "def test_b():\n    pass\n")
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    here = subprocess.run(run, cwd=tmp_path, env=base, capture_output=True, text=True)
    ci = subprocess.run(run, cwd=tmp_path, env={**base, "CI": "true"}, capture_output=True, text=True)
    assert here.returncode == 0, here.stdout + here.stderr
    assert ci.returncode == 1 and "test_skips.py::test_a: no oracle here" in ci.stderr, ci.stdout + ci.stderr


@pytest.mark.parametrize("key,value,says", [
    # out of range: a ZeroDivisionError's traceback, a run that "finished" with every step skipped
    # (rope_theta), or one that trained on (0 layers until the save, a negative z-loss, dropout 1.5)
    ("model.decoder.num_layers", 0, "decoder.num_layers=0 must be a whole number of at least 1"),
    ("model.decoder.num_heads", 0, "decoder.num_heads=0 must be"),
    ("model.decoder.num_kv_heads", 0, "decoder.num_kv_heads=0 must be"),
    ("model.decoder.rope_theta", -1.0, "decoder.rope_theta=-1.0 must be a positive number"),
    ("model.decoder.dropout", 1.5, "decoder.dropout=1.5 must be in [0, 1)"),
    ("model.vision.patch_size", 0, "vision.patch_size=0 must be"),
    ("model.z_loss_weight", -1.0, "model.z_loss_weight=-1.0 must be 0 or more"),
    ("model.z_loss_weight", float("nan"), "model.z_loss_weight=nan must be 0 or more"),
    # -1 workers trained as 0 and then locked the workdir's resume to -1; -1 threads was Grain's traceback
    ("data.worker_count", -1, "data.worker_count must be 0 or more, got -1"),
    ("data.num_threads", -1, "data.num_threads must be 0 or more, got -1"),
    ("data.sources", ("",), "data.sources=('',) holds an empty path"),  # "  is not a finished ... dataset"
    ("mesh.num_devices", -1, "mesh.num_devices=-1 must be 0 (every device) or the number to use"),
    ("total_steps", -5, "total_steps must be at least 1, got -5"),  # had named accumulation_steps too
    ("optimizer.trainable", "none", "optimizer.trainable='none'"),
])
def test_values_out_of_range_are_refused_by_their_key(key, value, says):
    import re

    with pytest.raises(ValueError, match=re.escape(says)):
        TrainConfig.from_config_dict(_set(configs.get_config("stage2.py:tiny"), key, value))


def _set(config, key: str, value):
    """`config` with the dotted `key` set to `value`, whatever its type."""
    parent, _, leaf = key.rpartition(".")
    node = config
    for part in filter(None, parent.split(".")):
        node = node[part]
    with node.ignore_type():
        node[leaf] = value
    return config


def test_a_config_that_is_not_a_stages_a_missing_variant_and_too_many_devices_are_one_line(tmp_path):
    """`--config stage2.py:tinyy` printed absl's flags error around a traceback, `stages.py:tiny` an
    AttributeError's; `mesh.num_devices` above the devices there are was passed over (every device
    used, unsaid); a comma list of datasets was one path named "a,b"."""
    from unitoken_jax.data.pipeline import Source, sources_from
    from unitoken_jax.train import __main__ as train_main
    from unitoken_jax.train.config import MeshConfig
    from unitoken_jax.train.program import make_mesh

    for spec, says in (("stage2.py:tinyy", "unknown variant 'tinyy'; use '' (7B), 'anyres' (7B AnyRes) or 'tiny'"),
                       ("stages.py:tiny", "stages.py is not a training config; give one of stage1.py"),
                       ("model.py:tiny", "model.py is not a training config")):
        with pytest.raises(SystemExit) as stop:
            train_main.run(["train", "--config", spec, "--workdir", str(tmp_path / "w")])
        assert says in str(stop.value.code) and "Traceback" not in str(stop.value.code)
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match=f"mesh.num_devices={len(jax.devices()) + 1}, but this job has "
                                         f"{len(jax.devices())} device"):
        make_mesh(MeshConfig(num_devices=len(jax.devices()) + 1))
    assert sources_from(("a, b",)) == [Source("a"), Source("b")]
    (tmp_path / "x,y").mkdir()  # a directory whose name holds a comma is itself
    assert sources_from((str(tmp_path / "x,y"),)) == [Source(str(tmp_path / "x,y"))]


def test_a_list_of_dataset_paths_takes_the_readme_s_comma_form(tmp_path):
    """`--config.data.sources=/data/captions,/data/t2i` (the README's form) was ml_collections' "Error
    while parsing string ... as tuple": it is written as the tuple literal ml_collections parses."""
    from unitoken_jax import configs

    argv = ["x", "--config.data.sources=/a,/b", "--config.eval.sources", "/c, /d", "--config.data.sources=('/e',)",
            "--config.data.sources=/f", "--config.data.seed=1,2"]
    assert configs.quote_path_lists(argv) == [
        "x", "--config.data.sources=('/a', '/b')", "--config.eval.sources", "('/c', '/d')",
        "--config.data.sources=('/e',)", "--config.data.sources=/f", "--config.data.seed=1,2"]
    # and the command takes it: the first path is read (and said missing as a directory)
    r = subprocess.run([sys.executable, "-m", "unitoken_jax.train", "--config", "configs/stage2.py:tiny", "--workdir",
                        str(tmp_path / "run"), "--config.data.demo=False", "--config.mesh.num_devices=1",
                        "--config.data.sources=/no/such/a,/no/b"],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "unitoken_jax.train: /no/such/a is not a finished pre-tokenized dataset (no such directory)"), r.stderr[-2000:]

"""launch/aot_check.py compiles the training loop's own step for a TPU slice from this CPU machine
(needs libtpu: pip install -e '.[tpu]'); here on v5e:2x2 with the tiny model, and FSDP really
splits the state four ways. And the step it compiles is the loop's: for the tiny stage-2 config,
the lowered text of the step `train_and_evaluate` runs equals the one the AOT check builds."""

import dataclasses
import importlib.util
import os
import re

import jax
import numpy as np
import pytest

from unitoken_jax.train import loop, program as program_lib  # noqa: I001

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot_module():
    spec = importlib.util.spec_from_file_location("aot_check", os.path.join(ROOT, "launch", "aot_check.py"))
    aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot)
    return aot


def test_tiny_step_compiles_for_v5e_2x2_and_fsdp_splits_the_state():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'); CI installs it")
    aot = _aot_module()
    config = aot.stage_config("stage2.py:tiny", batch=4, seq=256, remat="full")
    program, compiled, _ = aot.compile_program(config, aot.topology_mesh("v5e:2x2", (1, 4, 1)))
    assert program.mesh.size == 4
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(program.abstract_params))
    mem = compiled.memory_analysis()
    # the state is params + Adam's two moments in float32; FSDP over 4 chips leaves ~1/4 of it on each
    state_bytes = 3 * 4 * n_params
    assert 0 < mem.argument_size_in_bytes < 0.5 * state_bytes
    assert mem.temp_size_in_bytes > 0
    # every decoder weight trains in stage 2: at least 6 FLOPs a weight a token, plus attention and the ViT
    n_decoder = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(program.abstract_params["decoder"]))
    assert program.model_flops_per_step() > 6 * n_decoder * 4 * 256


def test_the_aot_check_compiles_exactly_the_loops_step(tmp_path, monkeypatch):
    """The loop runs a few steps of the tiny stage-2 config on 2 CPU devices; the AOT check's
    builder, given the same config spec (and nothing overridden), lowers its step on the same
    devices. A difference anywhere (optimizer, dropout, trainable mask, batch spec, shardings)
    changes the text."""
    lowered = []
    real_lower = program_lib.TrainProgram.lower

    def recording_lower(self):
        out = real_lower(self)
        lowered.append(out.as_text())
        return out

    monkeypatch.setattr(program_lib.TrainProgram, "lower", recording_lower)
    from unitoken_jax import configs

    config = configs.get_config("stage2.py:tiny")
    config.total_steps, config.mesh.num_devices, config.log_sample_ids = 2, 2, False
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert len(lowered) == 1

    aot = _aot_module()
    typed = aot.stage_config("stage2.py:tiny", overrides={"total_steps": 2, "mesh.num_devices": 2,
                                                          "log_sample_ids": False})
    mesh = program_lib.make_mesh(typed.mesh)
    aot_text = program_lib.build_program(typed, mesh).lower().as_text()
    assert len(lowered) == 2 and aot_text == lowered[0]
    # and the check can see a difference: another learning rate is another step
    other = aot.stage_config("stage2.py:tiny", overrides={"total_steps": 2, "mesh.num_devices": 2,
                                                          "optimizer.learning_rate": 1e-2})
    assert program_lib.build_program(other, mesh).lower().as_text() != lowered[0]


def test_the_check_s_flags_and_its_set_overrides_never_drop_one_another():
    """`--set data.max_images=N` with `--batch B` compiled B images a row, silently; a flag and a
    --set of the same key that disagree are refused, and --batch sets the images only when nothing else does."""
    aot = _aot_module()
    assert aot.stage_config("stage2.py:tiny", batch=4, overrides={"data.max_images": 12}).data.max_images == 12
    assert aot.stage_config("stage2.py:tiny", batch=4).data.max_images == 4
    assert aot.stage_config("stage2.py:tiny", batch=4, images=8).data.max_images == 8
    for kw, key in ((dict(images=8), "data.max_images"), (dict(batch=4), "data.rows"), (dict(seq=256), "data.length")):
        with pytest.raises(ValueError, match=f"--set {key}=.* disagree"):
            aot.stage_config("stage2.py:tiny", overrides={key: 2}, **kw)


def test_the_check_refuses_malformed_flags_by_name_and_counts_a_v4_chips_cores(capsys):
    """Malformed input is an argparse error naming the flag and the form it takes (it was an
    IndexError for Google's slice name `v5e-4`, JAX's ndim error for a 2-entry mesh, "needs -1 chips",
    `max()` of an empty sequence for --images 0, and --size 100 compiled 96 px). A v4 topology's
    devices are TensorCores (two a chip) with XLA's 15.25 GiB each, where the check said "chips" of
    32 GiB; and a mesh's sizes that are no number of devices are refused by `make_mesh` itself."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'); CI installs it")
    from unitoken_jax import sharding

    aot = _aot_module()
    for argv, says in ((["decode", "--topology", "v5e-4"], "--topology 'v5e-4': give the TPU generation"),
                       (["decode", "--mesh", "1,4"], "--mesh '1,4': give DATA,FSDP,TENSOR"),
                       (["decode", "--images", "0"], "--images 0: at least 1"),
                       (["decode", "--size", "100"], "--size 100: pictures are drawn in whole grid units of 32"),
                       (["decode", "--model", "tiny"], "tiny, 1 x 512px: the 448 positions"),
                       (["--topology", "v4:2x2x1", "--mesh", "1,4,1"],
                        "needs 4 devices, v4:2x2x1 has 8 devices .4 chips x 2 TensorCores."),
                       # (these were tracebacks: a config's key, file or value, and a slice libtpu lacks)
                       (["--set", "optimizer.learnin_rate=1e-3"], "unknown config key 'optimizer.learnin_rate'"),
                       (["--config", "nofile.py"], "no config file 'nofile.py'"),
                       (["--batch", "0"], "data.rows must be at least 1"),
                       (["--topology", "v9:2x2"], "--topology 'v9:2x2': libtpu has no such slice"),
                       (["decode", "--topology", "v5e:3x3"], "--topology 'v5e:3x3': libtpu has no such slice"),
                       # a backend the chips lack: a usage error before the trace (it was a traceback from it)
                       (["--config", "stage2.py:tiny", "--topology", "v5e:1x1", "--mesh", "1,1,1", "--set",
                         "model.attention=cudnn"], "attention='cudnn' does not run on tpu; available there: auto, "
                                                   "splash, xla"),
                       (["--config", "stage2.py:tiny", "--topology", "v3:2x2", "--mesh", "1,8,1", "--set",
                         "model.attention=splash"], "TPU v4 or later, this is TPU v3.; available there: auto, xla")):
        with pytest.raises(SystemExit) as stopped:
            aot.main(argv)
        assert stopped.value.code == 2 and re.search(says, capsys.readouterr().err), argv
    assert sharding.parse_mesh_shape("1,-1,1", 8) == (1, 8, 1)
    devices = aot.topology_devices("v4:1x1x1")
    assert devices.size == 2 and aot.hbm_bytes(devices.flat[0]) == int(15.25 * 2**30)
    assert aot.devices_in_words("v5e:2x2", aot.topology_devices("v5e:2x2")) == "4 chips"
    for bad in (dict(data=0), dict(fsdp=-2), dict(tensor=1.5)):
        with pytest.raises(ValueError, match="each axis is a whole number of devices"):
            sharding.make_mesh(**bad, devices=jax.devices()[:1])


def test_the_decode_loop_lowers_for_a_one_chip_topology():
    """`aot_check.py decode` compiles the prefill and decode loop of `DecodeLoop.generate` for one
    v5e chip (the tiny model; the 7B figures are in the README)."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'); CI installs it")
    aot = _aot_module()
    config, (prefill, loop) = aot.decode_lowered("tiny", aot.topology_mesh("v5e:1x1", (1, 1, 1)), images=2, size=64)
    # the decoder's weights in bfloat16 are arguments on the chip (the unused vision tower is pruned)
    n_decoder = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(aot.abstract_params(config)["decoder"]))
    for lowered in (prefill, loop):
        mem = lowered.compile().memory_analysis()
        assert mem.argument_size_in_bytes >= 2 * n_decoder


def test_lowering_the_decode_loop_gives_the_program_generate_runs():
    """What `DecodeLoop.lower` compiles, run on this CPU, draws the tokens `generate` draws."""
    import jax.numpy as jnp

    import unitoken_jax
    from unitoken_jax.configs.model import get_config
    from unitoken_jax.inference.decode import DecodeLoop, Request
    from unitoken_jax.tokenizer import layout

    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    model = unitoken_jax.UniTokenModel.random(cfg, seed=3)
    loop = DecodeLoop(cfg, model.params)
    prompt = np.array([0, 9000, 9001, layout.END_OF_TURN, layout.IMAGE_START])
    requests = [Request(prompt, max_new_tokens=layout.generated_image_length((1, 2)) - 1, grid_hw=(1, 2),
                        cfg_scale=2.0, image_top_k=50, stop_after_image=True, seed=s) for s in (0, 1)]
    expected = loop.generate(requests, chunk=10_000).tokens
    prefill, run = (lowered.compile() for lowered in loop.lower(requests))
    rows, batch, params, max_new, _ = loop._prepare(requests)
    logits, cache = prefill(loop.params, *batch)  # the parameters in the layout the loop runs
    state = run(loop.params, loop._initial_state(rows, logits, cache, max_new), jax.tree.map(jnp.asarray, params),
                jnp.int32(max_new))
    out, n_out = np.asarray(state.out), np.asarray(state.n_out)
    for i, tokens in enumerate(expected):
        np.testing.assert_array_equal(out[i, :n_out[i]], tokens)


def test_the_lora_step_holds_a_fraction_of_the_full_steps_state():
    """finetune.py:tiny for v5e:2x2: the LoRA step's arguments (a bfloat16 base, adapters and their
    moments) are far below the full step's (float32 weights and two moments for every parameter),
    and the command line prints the fit against the chip's HBM."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'); CI installs it")
    aot = _aot_module()
    mesh = aot.topology_mesh("v5e:2x2", (1, 4, 1))
    lora = aot.stage_config("finetune.py:tiny", batch=4, seq=64)
    full = aot.stage_config("finetune.py:tiny", batch=4, seq=64,
                            overrides={"optimizer.trainable": "all", "model.lora": None, "model.param_dtype": "float32"})
    lora_compiled = aot.compile_program(lora, mesh)[1]
    lora_args = lora_compiled.memory_analysis().argument_size_in_bytes
    full_args = aot.compile_program(full, mesh)[1].memory_analysis().argument_size_in_bytes
    # ~2 bytes a weight against ~12 (the batch, the same in both, is the rest): moments for the base
    # or a float32 base would put the LoRA step near the full one
    assert lora_args < 0.4 * full_args, (lora_args, full_args)
    line = aot.fit_line(lora_compiled, mesh)  # what the command prints after its memory line
    assert re.fullmatch(r"fits: [\d.]+ of 15\.75 GiB a device \(\d+%\)", line), line


def test_the_check_says_what_does_not_fit_in_a_line_with_its_exit_status_and_counts_the_tower(capsys):
    """A train step that does not fit was a 49-line traceback; decode printed "does not compile"
    and exited 0; its "fits" left out the SigLIP tower and adapter a loaded model holds (the 7B's
    2 pictures in bfloat16 on a v5e: 15.34 GiB "fits", 16.15 with the tower); a slice whose chips
    choose_mesh does not all use (a v5p-24) was refused ("mesh (1, 4, 2) needs 8 devices"); XLA's
    limits for v2, v3 and v5p (7.48, 15.48, 95.74 GiB) were the nominal 8, 16 and 95."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'); CI installs it")
    from unitoken_jax import configs
    from unitoken_jax.models.config import UniTokenConfig
    from unitoken_jax.models.unitoken import abstract_params

    aot = _aot_module()
    assert aot.main(["--config", "stage2.py:tiny", "--topology", "v5e:1x1", "--mesh", "1,1,1", "--batch", "65536",
                     "--seq", "512"]) == 1
    out = capsys.readouterr().out
    assert re.fullmatch(r"v5e:1x1, mesh \(1, 1, 1\), stage2.py:tiny: does NOT fit: RESOURCE_EXHAUSTED: .*\n", out), out
    assert aot.main(["decode", "--model", "tiny", "--size", "128", "--topology", "v5p:2x2x3"]) == 0
    out = capsys.readouterr().out
    assert "12 chips (4 idle) (95.74 GiB usable each), mesh (1, 4, 2)" in out
    assert re.search(r"decode loop: [\d.]+ GiB a device, [\d.]+ with the tower, fits", out), out
    for generation, gib in (("v2:2x2", 7.48), ("v3:2x2", 15.48), ("v5p:2x2x1", 95.74), ("v5e:1x1", 15.75)):
        assert aot.hbm_bytes(aot.topology_devices(generation).flat[0]) == int(gib * 2**30), generation
    # the tower's bytes, counted independently: the 7B's SigLIP and adapter in bfloat16 and in int8
    seven_b = UniTokenConfig.from_dict(configs.get_config("model.py:7b").model).replace(param_dtype="bfloat16")
    v = seven_b.vision
    per_layer = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
    # (its layers' weights; the embeddings, norms and the adapter add ~6 %)
    assert 1.0 < aot.resident_vision_bytes(seven_b) / (2 * v.num_layers * per_layer) < 1.1
    int8 = aot.resident_vision_bytes(seven_b.replace(quantize="int8"))
    assert 0.45 < int8 / aot.resident_vision_bytes(seven_b) < 0.6
    assert abstract_params(seven_b)["decoder"]  # (and the decoder is not among them)


def test_decoding_compiles_for_the_tpus_pallas_does_not_target_and_tensor_parallel_is_chosen():
    """TPU v2 and v3 (Colab's v2-8) have no Pallas kernels: the splash attention the prefill used on
    every TPU failed to compile there ("Unsupported matmul RHS type"); `auto` now takes the xla path
    on them. And `choose_mesh` splits a model over a host's chips the tensor-parallel way as far as
    its heads divide."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'); CI installs it")
    from unitoken_jax import configs
    from unitoken_jax.inference.fit import choose_mesh
    from unitoken_jax.models.config import UniTokenConfig

    aot = _aot_module()
    for topology in ("v2:2x2", "v3:2x2"):
        mesh = aot.topology_mesh(topology, (1, 8, 1))
        _, (prefill, loop_) = aot.decode_lowered("tiny", mesh, 1, 64)
        prefill.compile(), loop_.compile()
    seven_b = UniTokenConfig.from_dict(configs.get_config("model.py:7b").model)  # 32 heads, SigLIP 16
    shape = lambda mesh: tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor"))  # noqa: E731
    assert shape(choose_mesh(seven_b, list(aot.topology_devices("v5e:2x4").flat))) == (1, 1, 8)
    assert shape(choose_mesh(seven_b, list(aot.topology_devices("v5e:2x2").flat))) == (1, 1, 4)
    odd = seven_b.replace(decoder=dataclasses.replace(seven_b.decoder, num_heads=12, num_kv_heads=12,
                                                            hidden_size=3072))  # 8 chips
    assert shape(choose_mesh(odd, list(aot.topology_devices("v5e:2x4").flat))) == (1, 2, 4)
    assert choose_mesh(seven_b, list(aot.topology_devices("v5e:1x1").flat)) is None
    assert shape(choose_mesh(seven_b, jax.devices("cpu")[:8])) == (1, 1, 8)  # the CLI's auto keeps CPUs to one

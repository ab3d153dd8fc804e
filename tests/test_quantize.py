"""Weight-only int8 (issue 13): what is quantized, how close the int8 model stays to the bfloat16
one, the ways a user gets an int8 model (quantize a model, quantize on load from either format,
load a saved int8 checkpoint) and the errors for what is not supported.

The tolerance: int8 rounds each weight by at most half a step, amax/254 of its output channel,
about 1 % of the weights' spread for Gaussian weights; through a few layers of matmuls the
logits move by a few per cent of their own spread. bfloat16 itself moves them by ~3 % (measured
here for the model below: 0.03 max, int8 0.08-0.11 max), so the bound is 5 % rms and 20 % max
of the bfloat16 logits' standard deviation. A quantizer with a wrong scale axis or rounding is
off by the whole logit spread."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import unitoken_jax
from unitoken_jax.inference.decode import DecodeLoop, Request
from unitoken_jax.model import UniTokenModel
from unitoken_jax.models.config import DecoderConfig, UniTokenConfig, VisionConfig
from unitoken_jax.models.quantize import dequantize_params

TINY = UniTokenConfig(
    decoder=DecoderConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                          num_kv_heads=2),
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=8, image_size=32))
BF16 = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")


@pytest.fixture(scope="module")
def bf16_model():
    return UniTokenModel.random(BF16, seed=0)


def _flat(params):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_only_matmul_kernels_become_int8_and_the_rest_is_untouched(bf16_model):
    q = bf16_model.quantize("int8")
    assert q.config.quantize == "int8" and bf16_model.config.quantize == "none"
    before, after = _flat(bf16_model.params), _flat(q.params)
    int8 = sorted(k for k, v in after.items() if v.dtype == np.int8)
    # every weight a projection, the MLPs, the adapter or the LM head multiplies ...
    expected = sorted(k for k in before if k.endswith("/kernel") and "patch_embedding" not in k)
    assert int8 == expected and len(int8) == 4 + 3 + 2 + 1 + 6  # decoder attn, mlp, adapter, head, vit
    for k in int8:
        scale = after[k + "_scale"]
        assert scale.dtype == np.float32 and scale.ndim == after[k].ndim
        w = before[k].astype(np.float32)
        # ... within half a quantization step of the float weight
        assert np.all(np.abs(after[k] * scale - w) <= scale / 2 + 1e-6 * np.abs(w).max()), k
        assert np.abs(after[k]).max() == 127  # the largest weight of some channel uses the full range
    # ... and nothing else: norms, biases, embeddings, the patch convolution stay as they were
    left = sorted(set(before) - set(int8))
    assert {"decoder/embed_tokens/embedding", "decoder/norm/scale", "vit/patch_embedding/kernel",
            "vit/layers/layer_norm1/scale", "adapter/fc1/bias"} <= set(left)
    for k in left:
        assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
    assert set(after) == set(before) | {k + "_scale" for k in int8}


def test_int8_logits_stay_close_to_bfloat16(bf16_model):
    q = bf16_model.quantize("int8")
    tokens = np.random.default_rng(0).integers(0, 1024, (2, 24))
    ref = np.asarray(bf16_model.text_logits(tokens), np.float32)  # every step of a teacher-forced decode
    got = np.asarray(q.text_logits(tokens), np.float32)
    spread = ref.std()
    err = got - ref
    assert np.sqrt(np.mean(err**2)) <= 0.05 * spread, np.sqrt(np.mean(err**2)) / spread
    assert np.abs(err).max() <= 0.2 * spread, np.abs(err).max() / spread
    # the int8 model computes exactly with its dequantized weights (no other change slipped in)
    f32 = TINY
    deq = UniTokenModel(f32, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dequantize_params(q.params)))
    q32 = UniTokenModel(f32.replace(quantize="int8"), q.params)
    np.testing.assert_allclose(np.asarray(q32.text_logits(tokens)), np.asarray(deq.text_logits(tokens)),
                               atol=1e-5 * np.abs(ref).max())


def test_int8_images_features_stay_close(bf16_model):
    q = bf16_model.quantize("int8")
    pixels = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    ref = np.asarray(bf16_model.image_features(pixels), np.float32)
    got = np.asarray(q.image_features(pixels), np.float32)
    assert np.sqrt(np.mean((got - ref) ** 2)) <= 0.05 * ref.std()


def test_quantize_on_load_save_and_reload(tmp_path, bf16_model):
    """HF and float Orbax checkpoints quantize as they load (the same int8 values as quantizing
    the loaded model); the int8 model saves in our format and loads back int8, decoding the same
    tokens."""
    bf16_model.save_hf(str(tmp_path / "hf"))
    bf16_model.save(str(tmp_path / "orbax"))
    expected = _flat(bf16_model.quantize("int8").params)
    for source in ("hf", "orbax"):
        loaded = unitoken_jax.load(str(tmp_path / source), param_dtype="bfloat16", quantize="int8", progress=False)
        assert loaded.config.quantize == "int8"
        got = _flat(loaded.params)
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert got[k].dtype == v.dtype, k
            # the host (NumPy) and device quantizers round alike, the scales too (an ulp apart before)
            np.testing.assert_array_equal(got[k], v, err_msg=k)

    q = unitoken_jax.load(str(tmp_path / "hf"), param_dtype="bfloat16", quantize="int8", progress=False)
    q.save(str(tmp_path / "int8"))
    back = unitoken_jax.load(str(tmp_path / "int8"), param_dtype="bfloat16", progress=False)
    assert back.config.quantize == "int8"
    for k, v in _flat(q.params).items():
        np.testing.assert_array_equal(_flat(back.params)[k], v, err_msg=k)
    requests = [Request(np.array([1, 5, 9, 200]), max_new_tokens=12, stop_tokens=()),
                Request(np.array([3, 7]), max_new_tokens=12, temperature=1.0, seed=4, stop_tokens=())]
    first = DecodeLoop(q.config, q.params).generate(requests).tokens
    again = DecodeLoop(back.config, back.params).generate(requests).tokens
    assert all(len(t) == 12 for t in first)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # and reloading with quantize="int8" asked again is the same model
    assert unitoken_jax.load(str(tmp_path / "int8"), quantize="int8", progress=False).config.quantize == "int8"


def test_unsupported_modes_are_clear_errors(tmp_path, bf16_model):
    with pytest.raises(ValueError, match="'none', 'int8'"):
        bf16_model.quantize("int4")
    with pytest.raises(ValueError, match="'none', 'int8'"):
        TINY.replace(quantize="fp8")
    bf16_model.save(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="'none', 'int8'"):
        unitoken_jax.load(str(tmp_path / "m"), quantize="int4", progress=False)
    with pytest.raises(ValueError, match=r"'auto' is the CLI's plan .* choose 'none' or 'int8', or ask "
                                         r"unitoken_jax\.inference\.fit\.choose_quantize"):
        unitoken_jax.load(str(tmp_path / "m"), quantize="auto", progress=False)
    q = bf16_model.quantize("int8")
    with pytest.raises(ValueError, match="Orbax"):
        q.save_hf(str(tmp_path / "hf"))
    q.save(str(tmp_path / "q"))
    with pytest.raises(ValueError, match="float checkpoint"):
        unitoken_jax.load(str(tmp_path / "q"), quantize="none", progress=False)
    # unmerged adapters: quantize_params kept them in float beside the int8 kernels (neither model)
    from unitoken_jax.models.config import LoraConfig
    from unitoken_jax.models.quantize import quantize_params

    adapted = UniTokenModel.random(BF16.replace(lora=LoraConfig(rank=2, targets=("q_proj",))), seed=0)
    with pytest.raises(ValueError, match="LoRA adapters beside the kernels: fold them in first"):
        quantize_params(adapted.params, adapted.config)
    assert adapted.quantize("int8").config.lora is None  # (the model's quantize folds them in)


def test_what_an_int8_checkpoint_cannot_do_is_refused_before_a_tensor_is_read(tmp_path, bf16_model, monkeypatch,
                                                                             capsys):
    """Adapters on a stored int8 checkpoint, its conversion to the HF layout and a training started
    from it were refused only after the whole model was read (about 7 GiB for the release)."""
    from unitoken_jax import cli
    from unitoken_jax.convert import orbax_io
    from unitoken_jax.models.config import LoraConfig
    from unitoken_jax.train import loop
    from unitoken_jax.train.config import TrainConfig

    bf16_model.quantize("int8").save(str(tmp_path / "q"))
    lora = UniTokenModel.random(BF16.replace(lora=LoraConfig(rank=2, targets=("q_proj",))), seed=1)
    lora.save_adapters(str(tmp_path / "adapters"))

    def read(*_, **__):
        raise AssertionError("a tensor was read")
    monkeypatch.setattr(orbax_io, "restore", read)
    monkeypatch.setattr(orbax_io, "restore_leaves", read)
    for quantize in (None, "int8"):
        with pytest.raises(ValueError, match="holds int8 weights: adapters cannot be applied to them; load the float"):
            unitoken_jax.load(str(tmp_path / "q"), adapters=str(tmp_path / "adapters"), quantize=quantize)
    assert cli.main(["convert", "--from", str(tmp_path / "q"), "--to", str(tmp_path / "hf")]) == 2
    # the command says it by its flags (it said load's quantize='int8')
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    capsys.readouterr()
    assert cli.main(["understand", str(tmp_path / "a.png"), "What is it?", "--model", str(tmp_path / "q"), "--adapters",
                     str(tmp_path / "adapters"), "--tokenizer", "demo", "--vqgan", "demo"]) == 2
    said = capsys.readouterr().err
    assert f"--adapters: --model {tmp_path / 'q'} holds int8 weights, to which adapters cannot be applied; give " \
        "--model the float checkpoint it was made from (with --quantize int8 to quantize the sum)" in said
    from unitoken_jax import configs

    config = configs.get_config("stage2.py:tiny")
    config.init_from.kind, config.init_from.paths = "checkpoint", (str(tmp_path / "q"),)
    with pytest.raises(ValueError, match="holds int8 weights, which are for inference only"):
        loop.initial_params(TrainConfig.from_config_dict(config), None)


def test_a_random_int8_model_is_a_quantized_random_model_not_zeros():
    """An int8 layer initialises its kernel as zeros (a checkpoint fills it): a random int8 model
    computed nothing."""
    q = UniTokenModel.random(BF16.replace(quantize="int8"), seed=3)
    expected = _flat(UniTokenModel.random(BF16, seed=3).quantize("int8").params)
    got = _flat(q.params)
    assert set(got) == set(expected) and q.config.quantize == "int8"
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert any(v.dtype == np.int8 and np.abs(v).max() > 0 for v in got.values())


def test_training_refuses_int8(tmp_path):
    from unitoken_jax import configs
    from unitoken_jax.train.config import TrainConfig

    config = configs.get_config("stage2.py:tiny")
    config.model.quantize = "int8"
    with pytest.raises(ValueError, match="inference only.*'none', 'int8'"):
        TrainConfig.from_config_dict(config)


def test_the_int8_head_computes_the_code_logits_alone(bf16_model):
    """A decode step that may only draw image codes asks the head for the first `stop` logits: in
    int8 they must be the same columns (values and scales) as the full head's."""
    from unitoken_jax.models.unitoken import UniToken

    q = bf16_model.quantize("int8")
    module, variables = UniToken(q.config), {"params": q.params}
    hidden = jax.random.normal(jax.random.key(5), (2, 1, TINY.decoder.hidden_size)).astype(jnp.bfloat16)
    full = np.asarray(module.apply(variables, hidden, method=UniToken.head))
    part = np.asarray(module.apply(variables, hidden, 600, method=UniToken.head))
    assert part.shape == (2, 1, 600)
    np.testing.assert_allclose(part, full[..., :600], rtol=1e-6, atol=1e-6 * np.abs(full).max())


def test_an_int8_decode_loop_on_a_cpu_makes_no_float_copy_of_the_weights():
    """`layers="auto"` on a CPU unrolled int8 models too, and XLA's CPU then converted every layer's
    int8 kernels to float together: the compiled loop's temporaries held a float32 copy of the
    weights, what int8 is for avoiding (43 MB of temporaries against a 34 MB copy for this model,
    one layer's worth and the cache's when scanned: 9 MB). It scans them now; the prefill's and the
    loop's temporaries stay under half that copy (compiled from shapes alone: no weights are made)."""
    import numpy as np

    from unitoken_jax.inference.decode import DecodeLoop, Request
    from unitoken_jax.models.config import DecoderConfig, UniTokenConfig
    from unitoken_jax.models.unitoken import abstract_params

    config = UniTokenConfig(decoder=DecoderConfig(vocab_size=8960, hidden_size=256, intermediate_size=1024,
                                                  num_layers=8, num_heads=4, num_kv_heads=4,
                                                  max_position_embeddings=256),
                            vision=None).replace(quantize="int8", param_dtype="float32", dtype="float32")
    params = abstract_params(config)
    layers = params["decoder"]["layers"]
    float_copy = sum(int(np.prod(a.shape)) * 4 for a in jax.tree.leaves(layers) if a.dtype == np.int8)
    loop = DecodeLoop(config, params)
    assert loop.layers == "scan"
    for program in loop.lower([Request(tokens=np.arange(1, 20), max_new_tokens=16)]):
        temporaries = program.compile().memory_analysis().temp_size_in_bytes
        assert temporaries < float_copy / 2, (temporaries, float_copy)


def test_the_host_and_device_quantizers_agree_on_zero_and_denormal_channels():
    """One scale a column, values round(w * 127 / max |w|): a column of zeros, or of denormals
    (which a device flushes to zero), is all zeros with scale 1 on both sides. The host's 127 / a
    denormal had overflowed, giving +-127 for the denormals and NaN cast to int8 for the zeros."""
    import jax.numpy as jnp

    from unitoken_jax.models.layers import quantize_int8

    w = np.zeros((4, 3), np.float32)
    w[:, 0] = [1e-38, 5e-39, 0, -2e-39]
    w[:, 1] = [1.0, 0.5, 0.0, -0.25]
    host, host_scale = quantize_int8(w, (1, 3))
    device, device_scale = (np.asarray(a) for a in quantize_int8(jnp.asarray(w), (1, 3)))
    np.testing.assert_array_equal(host, device)
    np.testing.assert_array_equal(host_scale, device_scale)
    np.testing.assert_array_equal(host[:, 0], 0)
    np.testing.assert_array_equal(host[:, 2], 0)
    np.testing.assert_array_equal(host[:, 1], np.round(w[:, 1] * 127))
    np.testing.assert_allclose(host_scale[0], [1.0, 1 / 127, 1.0], rtol=1e-7)
    # a column whose scale max |w| / 127 is no normal float32 (max below ~1.5e-36, past the
    # denormals): zeros with scale 1 too, alike on both sides (the host's 127 / max had overflowed:
    # a 5e-38 became 127; its scale was a denormal where the device's was 0); one above keeps its values
    w = np.zeros((2, 3), np.float32)
    w[:, 0], w[:, 1], w[:, 2] = [1e-36, -4e-37], [5e-38, 0], [3e-36, -1.5e-36]
    with np.errstate(over="raise", invalid="raise"):  # (no overflow, no invalid cast)
        host, host_scale = quantize_int8(w, (1, 3))
    device, device_scale = (np.asarray(a) for a in quantize_int8(jnp.asarray(w), (1, 3)))
    np.testing.assert_array_equal(host, device)
    np.testing.assert_array_equal(host_scale, device_scale)
    np.testing.assert_array_equal(host[:, :2], 0)
    np.testing.assert_array_equal(host_scale[0, :2], 1.0)
    np.testing.assert_array_equal(host[:, 2], [127, -64])
    rng = np.random.default_rng(0)  # and ordinary kernels: the same values and scales, to the bit
    w = rng.normal(size=(64, 48)).astype(np.float32) * rng.uniform(0.01, 3, size=48).astype(np.float32)
    host, host_scale = quantize_int8(w, (1, 48))
    device, device_scale = (np.asarray(a) for a in jax.jit(quantize_int8, static_argnums=1)(jnp.asarray(w), (1, 48)))
    np.testing.assert_array_equal(host, device)
    np.testing.assert_array_equal(host_scale, device_scale)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["host", "device"])
def test_a_nan_or_infinite_weight_is_refused_by_name_not_quantized_away(bf16_model, bad, where):
    """A NaN weight made its whole output channel zeros with scale 1 (the float model's logits all
    NaN, the int8 model's finite: the damage hidden); an infinity gave NaN after dequantizing."""
    from unitoken_jax.models.quantize import quantize_params

    params = jax.tree.map(np.asarray, bf16_model.params)
    kernel = np.array(params["decoder"]["layers"]["self_attn"]["k_proj"]["kernel"], np.float32)
    kernel[0, 1, 2, 3] = bad
    params["decoder"]["layers"]["self_attn"]["k_proj"]["kernel"] = jnp.asarray(kernel) if where == "device" else kernel
    with pytest.raises(ValueError, match="^decoder/layers/self_attn/k_proj/kernel holds NaN or infinite weights, "
                                         "which int8 cannot carry"):
        quantize_params(params, bf16_model.config.replace(param_dtype="float32"))


def test_an_int8_load_from_hf_quantizes_each_layer_as_it_is_read(tmp_path):
    """The README's "one layer of one tensor in float32 at a time": an HF load with quantize="int8"
    filled each scanned parameter's every layer in float32 before quantizing it (the 7B's MLP
    kernels: 5.4 GiB beside the int8 model). Host allocations (NumPy's, which tracemalloc follows;
    on a CPU the placed arrays are among them) exceed the int8 model by less than half of one such
    parameter now (by 13 MB, 1.6 of them, before); the values are those of quantizing the loaded
    model."""
    import tracemalloc

    config = TINY.replace(decoder=dataclasses.replace(TINY.decoder, hidden_size=256, intermediate_size=1024,
                                                      num_layers=8))
    model = UniTokenModel.random(config, seed=1)
    model.save_hf(str(tmp_path / "hf"))
    leaf = model.params["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert leaf.shape[0] == 8 and leaf.dtype == jnp.float32
    whole = leaf.size * 4  # one scanned parameter, every layer of it, in float32
    tracemalloc.start()
    try:
        loaded = unitoken_jax.load(str(tmp_path / "hf"), quantize="int8", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    placed = sum(a.nbytes for a in jax.tree.leaves(loaded.params))
    assert peak - placed < whole / 2, (peak, placed, whole)
    expected = _flat(model.quantize("int8").params)
    got = _flat(loaded.params)
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # a NaN in one layer is refused by name, as the whole-leaf quantizer refuses it
    params = jax.tree.map(np.array, model.params)  # (writable copies)
    params["decoder"]["layers"]["mlp"]["up_proj"]["kernel"][5, 3, 7] = np.nan
    UniTokenModel(config, params).save_hf(str(tmp_path / "nan"))
    with pytest.raises(ValueError, match="^decoder/layers/mlp/up_proj/kernel holds NaN or infinite weights"):
        unitoken_jax.load(str(tmp_path / "nan"), quantize="int8", progress=False)

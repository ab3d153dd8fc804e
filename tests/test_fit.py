"""The decode memory plan (`unitoken_jax.inference.fit`): its byte counts are those of the real
arrays a generation holds, and it picks int8 exactly where bfloat16 does not fit — the 7B
numbers below are the ones the AOT compiles for one v5e / v6e chip confirm
(benchmarks/results/decode_fit.md)."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import Chip
from unitoken_jax import configs
from unitoken_jax.inference.decode import DecodeLoop, Request
from unitoken_jax.inference.fit import choose_quantize, decode_memory, relaid_mlp_bytes
from unitoken_jax.model import UniTokenModel
from unitoken_jax.models.config import DecoderConfig, UniTokenConfig, VisionConfig
from unitoken_jax.tokenizer import layout

SEVEN_B = UniTokenConfig.from_dict(configs.get_config("model.py:7b").model)


def test_counts_are_the_bytes_of_the_real_arrays():
    config = UniTokenConfig(decoder=DecoderConfig(vocab_size=9000, hidden_size=64, intermediate_size=128,
                                                  num_layers=2, num_heads=4, num_kv_heads=2),
                            vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                                patch_size=8, image_size=32),
                            dtype="bfloat16", param_dtype="bfloat16")
    model = UniTokenModel.random(config)
    for quantize in ("none", "int8"):
        m = model.quantize(quantize) if quantize != "none" else model
        plan = decode_memory(config, images=2, size=(64, 64), prompt_length=5, quantize=quantize)
        assert plan.weights == sum(a.nbytes for a in jax.tree.leaves(m.params))
        # the plan's cache is in the model's dtype, as an accelerator holds it (a CPU's loop keeps a
        # 16-bit model's cache in float32 unless told: `models.layers.attention_dtype`)
        loop = DecodeLoop(m.config, m.params, cache_dtype=config.dtype)
        prompt = np.array([1, 2, 3, 4, layout.IMAGE_START])
        requests = [Request(prompt, max_new_tokens=layout.generated_image_length((2, 2)) - 1, grid_hw=(2, 2),
                            cfg_scale=3.0, seed=i) for i in range(2)]
        rows, batch, params, max_new, cache_len = loop._prepare(requests)
        _, cache = loop._prefill(loop.params, *batch, cache_len)
        kv_bytes = sum(a.nbytes for a in jax.tree.leaves((cache["k"], cache["v"])))  # a buffer per layer on CPU
        assert plan.cache == kv_bytes  # 4 rows (2 images with CFG)


def test_int8_only_where_bfloat16_does_not_fit():
    v5e, v6e = [Chip(15.75)], [Chip(31.25, "TPU v6 lite")]
    assert choose_quantize(SEVEN_B, 1, v5e)[0] == "none"  # 13.87 + 1.10 GiB
    quantize, why = choose_quantize(SEVEN_B, 4, v5e)  # bfloat16 18.26 GiB; int8 7.19 + 4.39
    assert quantize == "int8" and "18.26" in why and "11.58" in why
    assert choose_quantize(SEVEN_B, 4, v6e)[0] == "none"
    assert choose_quantize(SEVEN_B, 8, v5e * 4)[0] == "none"  # a v5e-4 shares the weights and the cache
    # split 4 ways, 11,008 MLP columns are not whole 128-lane tiles a chip: the loop holds a relaid copy
    # of the MLP kernels' shares. AOT for v5e:2x2 in bfloat16 (launch/aot_check.py decode, 2026-12-05):
    # 37 pictures compile at 15.61 GiB a chip, 39 and 40 need 16.16 and 16.43; the plan had taken
    # bfloat16 up to 44 (weights and cache alone: 14.43 GiB at 40)
    assert relaid_mlp_bytes(SEVEN_B, 4) == 3 * 32 * 4096 * 2752 * 2
    assert relaid_mlp_bytes(SEVEN_B, 4, "int8") == 3 * 32 * 4096 * 2752
    assert relaid_mlp_bytes(SEVEN_B, 1) == 0
    tiled = SEVEN_B.replace(decoder=dataclasses.replace(SEVEN_B.decoder, intermediate_size=11264))
    assert relaid_mlp_bytes(tiled, 4) == 0  # 2,816 a chip: 22 tiles
    assert choose_quantize(SEVEN_B, 37, v5e * 4)[0] == "none"
    quantize, why = choose_quantize(SEVEN_B, 38, v5e * 4)
    assert quantize == "int8" and "15.90" in why, why
    assert choose_quantize(SEVEN_B, 40, v5e * 4)[0] == "int8"
    assert choose_quantize(SEVEN_B, 40, v5e * 4, tensor=1)[0] == "none"  # split over fsdp: no relaid copy
    assert choose_quantize(tiled, 40, v5e * 4)[0] == "none"
    assert choose_quantize(SEVEN_B, 40, [Chip(15.75, "NVIDIA H100")] * 4)[0] == "none"  # the tiles are a TPU's
    with pytest.raises(ValueError, match="16 image.s. at once do not fit .* ask for fewer at once"):
        choose_quantize(SEVEN_B, 16, v5e)
    # the float dtype planned is the one named (a float32 plan said "bfloat16 weights"), and a small
    # model's need in MiB (it said "0.00 GiB")
    small = SEVEN_B.replace(decoder=dataclasses.replace(SEVEN_B.decoder, num_layers=1, hidden_size=128,
                                                        intermediate_size=256, num_heads=2, num_kv_heads=2,
                                                        vocab_size=9216), vision=None)
    quantize, why = choose_quantize(small, 12, v5e, dtype="float32", size=(64, 64))
    plan = decode_memory(small, 12, dtype="float32", size=(64, 64)).peak
    assert quantize == "none" and why == f"float32 weights: 12 image(s) need {plan / 2**20:.1f} MiB a device, " \
        "1 x TPU v5 lite have 15.75 GiB each", why
    # a checkpoint stored as int8 stays int8, even where bfloat16 would fit; still refused where it does not fit
    stored = SEVEN_B.replace(quantize="int8")
    quantize, why = choose_quantize(stored, 1, v5e)
    assert quantize == "int8" and "holds int8 weights" in why, why
    assert choose_quantize(stored, 1, jax.devices()[:1])[0] == "int8"  # a CPU: no limit to plan with
    with pytest.raises(ValueError, match="16 image.s. at once do not fit"):
        choose_quantize(stored, 16, v5e)
    with pytest.raises(ValueError, match="at least 1"):
        decode_memory(SEVEN_B, 0)
    assert choose_quantize(SEVEN_B, 4, jax.devices("cpu"))[0] == "none"  # no limit to plan with


def test_the_cli_quantizes_by_itself_only_where_the_commands_pictures_need_it(caplog):
    """`--quantize auto` (the CLI's default) plans for what a command decodes at once. On a v5e chip
    the release draws one picture in bfloat16 and four in int8 (the AOT table's verdicts); an edit
    holds the input picture's tokens too (2 rows of ~2,900 positions: int8); a continuous server
    holds its slots (16 rows of 4,096 positions, 32 GiB of cache, fit nowhere and are refused before
    anything loads, naming the flags), a static one a batch of guided pictures. A checkpoint stored
    as int8, float32 weights asked for, or a CPU (no limit to plan with) keep the checkpoint's own
    format."""
    from unitoken_jax import cli
    from unitoken_jax.inference.fit import picture_prompt_length

    def args(command, **kw):  # each verb's own parsed flags, so a flag a verb lacks is an error here too
        words = {"generate": ["a fox", "--out", "x.png"], "edit": ["a.png", "make it red", "--out", "x.png"],
                 "understand": ["a.png", "Q?"], "caption": ["pictures/", "--out", "x.json"]}.get(command, [])
        flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in kw.items()]
        return cli._parser().parse_args([command, *words, *flags])

    # a 512 px picture in a prompt: <racm3:break>, 32 rows of 32 codes and a row end, the grid's
    # size tokens and <eoss> (1,060 after the break), and 27 x 27 SigLIP features
    assert picture_prompt_length(SEVEN_B) == 1 + 1060 + 729
    v5e = [Chip(15.75)]
    assert cli._quantize(args("generate", n=1), SEVEN_B, v5e, "bfloat16") is None
    assert cli._quantize(args("generate", n=4), SEVEN_B, v5e, "bfloat16") == "int8"
    assert cli._quantize(args("generate", n=4, batch_size=1), SEVEN_B, v5e, "bfloat16") is None
    # any cfg but 1 guides, a row more a picture (a cfg under 1 was planned as unguided)
    assert [cli._plan(args(c, cfg=g), SEVEN_B)[2]["cfg"] for c in ("generate", "edit") for g in (0.5, 1, 3)] == \
        [True, False, True] * 2
    assert cli._quantize(args("generate", prompts_file="p.txt"), SEVEN_B, [Chip(15.75)] * 8, "bfloat16") is None
    assert cli._quantize(args("understand"), SEVEN_B, v5e, "bfloat16") is None  # 1 row of 2,110 positions
    # --anyres: a square picture takes the base tile and 2 x 2 tiles' features, 54 rows of 54 and a
    # newline (what the pipeline's tiling really lays out), ~2,950 positions more than one tile
    from PIL import Image

    from unitoken_jax.tokenizer.anyres import anyres_image
    assert len(anyres_image(Image.new("RGB", (900, 900))).entries) == 729 + 54 * 55
    assert picture_prompt_length(SEVEN_B, anyres=True) == 1 + 1060 + 729 + 54 * 55
    assert cli._quantize(args("understand", anyres=True), SEVEN_B, v5e, "bfloat16") == "int8"
    # a model trained here with AnyRes pictures (its final/ records it) is planned so without the flag,
    # as the pipeline lays its pictures out (it was planned one tile a picture: bfloat16, not fitting)
    assert cli._quantize(args("understand"), SEVEN_B, v5e, "bfloat16", trained={"anyres": True}) == "int8"
    assert cli._quantize(args("understand"), SEVEN_B, v5e, "bfloat16", trained={"anyres": False}) is None
    asked = args("understand")
    assert cli._plan(asked, SEVEN_B, {"vq_size": 256})[2]["positions"] == \
        64 + picture_prompt_length(SEVEN_B, 256) + asked.max_new_tokens  # (its recorded crop: no --vq-size)
    assert cli._quantize(args("edit"), SEVEN_B, v5e, "bfloat16") == "int8"
    # without --size, the size the pipeline will draw: a model trained on 256 px crops, 256 x 256 (512 before)
    assert cli._plan(args("generate"), SEVEN_B, {"vq_size": 256})[2]["size"] == (256, 256)
    assert cli._plan(args("generate", size="512x512"), SEVEN_B, {"vq_size": 256})[2]["size"] == (512, 512)
    assert cli._plan(args("edit"), SEVEN_B)[2]["size"] == (512, 512)
    assert cli._quantize(args("caption", batch_size=4), SEVEN_B, v5e, "bfloat16") == "int8"
    assert cli._quantize(args("chat"), SEVEN_B, v5e, "bfloat16") == "int8"  # a picture and 2,048 tokens, guided
    assert cli._quantize(args("chat"), SEVEN_B, [Chip(31.25, "TPU v6 lite")], "bfloat16") is None
    continuous = dict(batching="continuous")
    with pytest.raises(ValueError, match="16 rows of 4096 positions .--max-batch, --slot-length. at once do not fit"):
        cli._quantize(args("serve", **continuous), SEVEN_B, v5e, "bfloat16")
    assert cli._quantize(args("serve", max_batch=4, slot_length=2048, **continuous), SEVEN_B, v5e, "bfloat16") == "int8"
    # static batching: a batch of max_batch / 2 guided pictures (8 do not fit one v5e even in int8, 4 do)
    with pytest.raises(ValueError, match="8 guided picture.s. in a batch .--max-batch 16. at once do not fit"):
        cli._quantize(args("serve"), SEVEN_B, v5e, "bfloat16")
    assert cli._quantize(args("serve", max_batch=8), SEVEN_B, v5e, "bfloat16") == "int8"
    assert cli._quantize(args("generate", n=4), SEVEN_B.replace(quantize="int8"), v5e, "bfloat16") is None
    # stored int8 is kept, and still checked: 16 guided pictures do not fit one v5e even so (it was
    # loaded unchecked, to fail in the compile)
    with pytest.raises(ValueError, match="16 picture.s. .--n / --batch-size. at once do not fit 1 x TPU v5 lite"):
        cli._quantize(args("generate", n=16), SEVEN_B.replace(quantize="int8"), v5e, "bfloat16")
    # the cache is in the compute dtype: bfloat16 weights computing in float32 hold one picture's cache
    # in float32 (13.87 + 2.19 GiB, over the chip's 15.75: int8); planned as a bfloat16 cache, it fit
    assert cli._quantize(args("generate", n=1), SEVEN_B, v5e, "bfloat16", 1, "float32") == "int8"
    with caplog.at_level("INFO", logger="unitoken_jax.cli"):  # said, as every other choice is (it was not)
        assert cli._quantize(args("generate", n=4), SEVEN_B, v5e, "float32") is None
    assert "--quantize auto: float32 weights (--dtype / --param-dtype) are kept as they are" in caplog.text
    assert cli._quantize(args("generate", n=4), SEVEN_B, jax.devices("cpu")[:1], "bfloat16") is None
    assert cli._quantize(args("generate", n=4, quantize="none"), SEVEN_B, v5e, "bfloat16") == "none"
    with pytest.raises(ValueError, match="--quantize none: the checkpoint holds int8 weights, which cannot be made"):
        cli._quantize(args("generate", quantize="none"), SEVEN_B.replace(quantize="int8"), v5e, "bfloat16")


def test_the_decoding_mesh_splits_every_weight_evenly_or_uses_fewer_devices():
    """On 6 devices the heads allow 2 tensor ways and `fsdp` took the other 3, over a 4,096-wide
    dimension: the model did not compile there at all. The mesh now uses the most devices that
    split every weight evenly (4 of the 6 for the 7B, all 8 of 8)."""
    from flax import traverse_util

    from unitoken_jax import sharding
    from unitoken_jax.inference.fit import choose_mesh
    from unitoken_jax.models.unitoken import abstract_params, param_logical_specs

    def even(config, mesh):
        params = traverse_util.flatten_dict(abstract_params(config))
        return all(dim % sharding.mesh_ways(axes, mesh) == 0
                   for path, spec in traverse_util.flatten_dict(param_logical_specs(config)).items()
                   for dim, axes in zip(params[path].shape, sharding.logical_to_mesh_spec(tuple(spec))))

    shape = lambda mesh: tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor"))  # noqa: E731
    six = jax.devices("cpu")[:6]
    mesh = choose_mesh(SEVEN_B, six)
    assert shape(mesh) == (1, 1, 4) and even(SEVEN_B, mesh)
    assert shape(choose_mesh(SEVEN_B, six[:3])) == (1, 1, 2)  # 3: fsdp 3 fits no 4,096-wide weight
    mesh = choose_mesh(SEVEN_B, jax.devices("cpu")[:8])
    assert shape(mesh) == (1, 1, 8) and even(SEVEN_B, mesh)  # all of them where they split evenly

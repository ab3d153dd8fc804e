"""16-bit models on a CPU: the weight products accumulate into float32 and round once (XLA's
CPU dots run bfloat16 operands fast only when they write float32), attention runs in float32
(its batched dots in bfloat16 are ~10x slower there) and a decode loop keeps a float32 cache;
a program built for a TPU keeps its 16-bit dots (`benchmarks/cpu_dots.py` measures why)."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unitoken_jax
from unitoken_jax.configs.model import get_config
from unitoken_jax.inference.decode import DecodeLoop, Request
from unitoken_jax.models import layers
from unitoken_jax.models.config import LoraConfig
from unitoken_jax.models.loss import fused_lm_loss
from unitoken_jax.tokenizer import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOT = re.compile(r"stablehlo\.dot_general.*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)")


def _dots(text: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every dot_general in a lowered module's text."""
    kind = lambda t: t.rsplit("x", 1)[-1]  # noqa: E731  'tensor<4x8xbf16>' -> 'bf16'
    return [tuple(kind(t.rstrip(">")) for t in m.groups()) for m in _DOT.finditer(text)]


def _product(x, kernel):
    return layers._contract("BTD,DV->BTV", x, kernel)


def test_a_16_bit_weight_product_on_a_cpu_accumulates_in_float32_and_rounds_once():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 96)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((96, 40)), jnp.bfloat16)
    y = jax.jit(_product)(x, kernel)
    assert y.dtype == jnp.bfloat16
    # the float64 product of the same bfloat16 values, rounded to bfloat16 once: within one unit in
    # the last place of it (a bfloat16 running sum over 96 terms strays by several)
    exact = np.einsum("btd,dv->btv", np.asarray(x, np.float64), np.asarray(kernel, np.float64))
    rounded = np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64)
    ulp = np.abs(rounded) * 2.0**-7
    assert np.all(np.abs(np.asarray(y, np.float64) - rounded) <= ulp + 1e-30)
    dots = _dots(jax.jit(_product).lower(x, kernel).as_text())
    assert dots == [("bf16", "bf16", "f32")], dots
    # float32 operands: the dot as it was
    assert _dots(jax.jit(_product).lower(x.astype(jnp.float32), kernel.astype(jnp.float32)).as_text()) == [
        ("f32", "f32", "f32")]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_a_16_bit_models_decode_on_a_cpu_attends_in_float32_from_a_float32_cache(lora):
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model).replace(dtype="bfloat16",
                                                                                 param_dtype="bfloat16")
    if lora:  # the adapters' products too
        cfg = cfg.replace(lora=LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj", "lm_head")))
    model = unitoken_jax.UniTokenModel.random(cfg, seed=2)
    loop = DecodeLoop(cfg, model.params)
    assert loop.cache_dtype == jnp.float32
    assert DecodeLoop(cfg, model.params, cache_dtype="bfloat16").cache_dtype == jnp.bfloat16  # asked for
    prompt = np.array([0, 9000, 9001, layout.END_OF_TURN, layout.IMAGE_START])
    requests = [Request(prompt, max_new_tokens=layout.generated_image_length((1, 2)) - 1, grid_hw=(1, 2),
                        cfg_scale=2.0, seed=s) for s in (0, 1)]
    out = loop.generate(requests, chunk=10_000)
    assert all(len(t) == layout.generated_image_length((1, 2)) - 1 for t in out.tokens)
    for lowered in loop.lower(requests):
        dots = _dots(lowered.as_text())
        assert dots
        # every dot either multiplies 16-bit operands into float32 (a weight product) or is all
        # float32 (attention): none writes bfloat16, none has float32 meet bfloat16
        assert {d for d in dots} <= {("bf16", "bf16", "f32"), ("f32", "f32", "f32")}, set(dots)
        assert ("f32", "f32", "f32") in dots and ("bf16", "bf16", "f32") in dots


def test_the_fused_lm_loss_in_bfloat16_on_a_cpu_accumulates_its_head_products_in_float32():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((32, 100)) * 0.1, jnp.float32)
    labels, segments = jnp.asarray(rng.integers(-1, 100, (2, 16))), jnp.ones((2, 16), jnp.int32)

    def loss(hidden, kernel, dtype):
        return fused_lm_loss(hidden, kernel, labels, segments, 1e-4, chunk=8, dtype=dtype)[0]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    dots = _dots(grad.lower(hidden, kernel, jnp.bfloat16).as_text())
    assert dots == [("bf16", "bf16", "f32")] * 3, dots  # logits, the hidden states' and the kernel's gradients
    # the same loss and gradients as in float32, to bfloat16's precision
    np.testing.assert_allclose(loss(hidden, kernel, jnp.bfloat16), loss(hidden, kernel, jnp.float32), rtol=2e-2)
    for a, b in zip(grad(hidden, kernel, jnp.bfloat16), grad(hidden, kernel, jnp.float32)):
        np.testing.assert_allclose(a, b, rtol=0.1, atol=0.05 * float(np.abs(b).max()))


def test_a_program_built_for_a_tpu_keeps_its_16_bit_dots():
    """The rule is the target's platform, not this machine's: the v5e decode loop that
    `aot_check.py decode` compiles from this CPU has no float32-accumulating dot."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]'); CI installs it")
    spec = importlib.util.spec_from_file_location("aot_check", os.path.join(ROOT, "launch", "aot_check.py"))
    aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot)
    _, (prefill, loop) = aot.decode_lowered("tiny", aot.topology_mesh("v5e:1x1", (1, 1, 1)), images=1, size=64)
    for lowered in (prefill, loop):
        dots = _dots(lowered.as_text())
        assert dots and all(d == ("bf16", "bf16", "bf16") for d in dots), set(dots)


def test_a_16_bit_models_logits_enter_guidance_and_sampling_as_float32():
    """As transformers' `generate` hands its logits processors float32 (the reference's CFG works
    in float32), and as the continuous server's slots hold them: a bfloat16 model's logits are its
    own bfloat16 values, converted, and the decode loop's state keeps them in float32, so
    u + scale * (c - u) is not rounded to bfloat16 again."""
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model).replace(dtype="bfloat16",
                                                                                 param_dtype="bfloat16")
    model = unitoken_jax.UniTokenModel.random(cfg, seed=3)
    loop = DecodeLoop(cfg, model.params)
    prompt = np.array([0, 9000, 9001, layout.END_OF_TURN, layout.IMAGE_START])
    requests = [Request(prompt, max_new_tokens=layout.generated_image_length((1, 2)) - 1, grid_hw=(1, 2),
                        cfg_scale=2.0, seed=0)]
    _, batch, _, _, cache_len = loop._prepare(requests)
    logits, _ = loop._prefill(loop.params, *batch, cache_len)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, logits.astype(jnp.bfloat16).astype(jnp.float32))  # the model's values
    _, run = loop.lower(requests)
    state_logits = [a for a in jax.tree.leaves(run.args_info) if a.shape == logits.shape]
    assert state_logits and all(a.dtype == jnp.float32 for a in state_logits)

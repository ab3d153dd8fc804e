"""The one product every weight of the model goes through (`models.layers._contract`): each
projection's equation gives NumPy's einsum, forward and backward, and reaches XLA as one 2-D matmul
(the flattened form the train step is faster with on CPU; see its docstring)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitoken_jax.models.layers import _contract

# the model's projections (decoder, SigLIP, LM head), and two the flattening does not apply to
EQUATIONS = {
    "BTD,DF->BTF": ((2, 5, 6), (6, 7)),
    "BTF,FD->BTD": ((2, 5, 7), (7, 6)),
    "BTD,DNH->BTNH": ((2, 5, 6), (6, 3, 4)),
    "BTNH,NHD->BTD": ((2, 5, 3, 4), (3, 4, 6)),
    "BCD,DV->BCV": ((1, 4, 6), (6, 9)),
    "BTNH,HND->BTD": ((2, 5, 3, 4), (4, 3, 6)),  # contracted in another order than x's
    "BTD,DF->BFT": ((2, 5, 6), (6, 7)),  # output not (x's free dims, kernel's)
}
FLATTENED = [e for e in EQUATIONS if e not in ("BTNH,HND->BTD", "BTD,DF->BFT")]


@pytest.mark.parametrize("equation", EQUATIONS)
def test_each_equation_gives_numpys_product_and_gradients(equation):
    x_shape, k_shape = EQUATIONS[equation]
    rng = np.random.default_rng(0)
    x, k = rng.normal(size=x_shape), rng.normal(size=k_shape)
    out = np.einsum(equation, x, k)
    ct = rng.normal(size=out.shape)
    y, vjp = jax.vjp(lambda a, b: _contract(equation, a, b), jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), out, rtol=1e-5, atol=1e-5)
    dx, dk = vjp(jnp.asarray(ct, jnp.float32))
    inputs, result = equation.split("->")
    xs, ks = inputs.split(",")
    np.testing.assert_allclose(np.asarray(dx), np.einsum(f"{result},{ks}->{xs}", ct, k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dk), np.einsum(f"{xs},{result}->{ks}", x, ct), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation", FLATTENED)
def test_a_projection_reaches_xla_as_one_2d_matmul(equation):
    x_shape, k_shape = EQUATIONS[equation]
    text = jax.jit(lambda a, b: _contract(equation, a, b)).lower(
        jnp.zeros(x_shape), jnp.zeros(k_shape)).as_text()
    dots = re.findall(r"stablehlo.dot_general.*", text)
    assert len(dots) == 1, dots
    operands = re.findall(r"tensor<([\dx]+)xf32>", dots[0])
    assert all(len(o.split("x")) == 2 for o in operands), dots[0]
    x_letters, out = equation.split(",")[0], equation.split("->")[1]
    n_free = sum(c in out for c in x_letters)
    assert operands[0] == f"{int(np.prod(x_shape[:n_free]))}x{int(np.prod(x_shape[n_free:]))}", dots[0]


def test_on_a_mesh_of_several_devices_the_dot_keeps_its_dims():
    """Sharded programs keep the N-D dot: flattened on an 8-device mesh (fsdp 4 x tensor 2, 2
    rows), the padding token's embedding got a gradient (`test_attention.py`'s mesh test caught it)."""
    from unitoken_jax import sharding

    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
    with sharding.mesh_context(mesh):
        product = jax.jit(lambda a, b: _contract("BTD,DF->BTF", a, b))
        text = product.lower(jnp.zeros((2, 5, 6)), jnp.zeros((6, 7))).as_text()
    dots = re.findall(r"stablehlo.dot_general.*", text)
    assert len(dots) == 1 and "tensor<2x5x6xf32>" in dots[0], dots

"""Building blocks shared by the decoder and the vision tower.

Shapes are spelled in names: B batch, T query length, S key length, D model width, N query
heads, K key/value heads, G query heads per key/value head, H head dim, F MLP width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unitoken_jax.models.config import check_quantize
from unitoken_jax.sharding import check_names

Dtype = jnp.dtype


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes):
    """`module.param` whose value carries logical axis names (checked against the rules table)."""
    check_names(axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, statistics in float32, output in the input's dtype."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x_BTD.shape[-1],), self.param_dtype, ("norm",))
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x_BTD.dtype) * x.astype(x_BTD.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias over the last axis, statistics in float32."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), self.param_dtype, ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), self.param_dtype, ("norm",))
        y = _normalize(x, self.eps)
        return (y * scale + bias).astype(x.dtype)


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class HeadNorm(nn.Module):
    """Chameleon's QK-norm: LayerNorm over head_dim, then a per-group scale and bias.

    The parameters have `groups` rows; row g serves heads [g*n/groups, (g+1)*n/groups), the
    repeat-interleave of the Lumina-mGPT checkpoints. With groups == heads every head has its own.
    """

    groups: int
    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTNH: jax.Array) -> jax.Array:
        n, h = x_BTNH.shape[-2:]
        axes = ("qk_norm_groups", "head_dim")
        scale = param_with_axes(self, "scale", nn.initializers.ones, (self.groups, h), self.param_dtype, axes)
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.groups, h), self.param_dtype, axes)
        per_group = n // self.groups
        scale_NH = jnp.repeat(scale, per_group, axis=0)
        bias_NH = jnp.repeat(bias, per_group, axis=0)
        y = _normalize(x_BTNH, self.eps) * scale_NH + bias_NH
        return y.astype(x_BTNH.dtype)


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """float32 (cos, sin) [B, T, H] of RoPE's angles, in the "rotate half" layout of transformers'
    Llama/Chameleon. A decoder computes them once a forward and hands them to every layer: left to
    each layer, XLA evaluates the sine and cosine inside each fused consumer, once per head and
    element, forward and backward (3 % of `benchmarks/train_step.py`'s step on a 2-core CPU)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos_BTh, sin_BTh = jnp.cos(angles_BTh), jnp.sin(angles_BTh)
    return jnp.concatenate([cos_BTh, cos_BTh], axis=-1), jnp.concatenate([sin_BTh, sin_BTh], axis=-1)


def apply_rope(x_BTNH: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates `x` by the angles of `rope_tables` (the same for every head)."""
    cos, sin = (t[:, :, None, :].astype(x_BTNH.dtype) for t in tables)
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTNH * cos + rotated * sin


def dot_product_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Grouped-query attention; logits scaled by 1/sqrt(H), softmax in float32."""
    return attend(q_BTNH, k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3), mask_BTS)


def attend(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """`dot_product_attention` with keys and values laid out [B, K, S, H], the KV cache's layout:
    the dots read them as they are, with no transposed copy of the cache."""
    b, t, n, h = q_BTNH.shape
    k = k_BKSH.shape[1]
    out_dtype, work = q_BTNH.dtype, attention_dtype(q_BTNH.dtype)
    q_BTNH, k_BKSH, v_BKSH = (a.astype(work) for a in (q_BTNH, k_BKSH, v_BKSH))
    # with one query a row (decoding), moving T is a reshape: no transpose for XLA to place on the
    # projections' kernels instead (on CPU it copied o_proj's whole kernel every step)
    q_BKGTH = q_BTNH.reshape(b, t, k, n // k, h)
    q_BKGTH = q_BKGTH.reshape(b, k, n // k, t, h) if t == 1 else q_BKGTH.transpose(0, 2, 3, 1, 4)
    logits_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH) * (h**-0.5)
    logits_BKGTS = logits_BKGTS.astype(jnp.float32)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BKSH.dtype)
    out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", probs_BKGTS, v_BKSH).astype(out_dtype)
    if t == 1:
        return out_BKGTH.reshape(b, t, n, h)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def attend_filled(q_BTNH: jax.Array, k_LBKSH: jax.Array, v_LBKSH: jax.Array, layer: jax.Array,
                  mask_BTS: jax.Array, limit: jax.Array, block: int) -> jax.Array:
    """`attend` over layer `layer` of stacked [layers, B, K, S, H] keys and values, reading them
    `block` slots at a time and only the blocks below `limit` (traced: no query sees a slot at or
    past it), with an online softmax across the blocks. A step early in a long generation then
    reads the slots the rows have filled, not the whole cache, and no layer's slice of the cache is
    copied out first. The last block starts at S - block when S is not a multiple of it; the slots
    it shares with the block before are counted once."""
    b, t, n, h = q_BTNH.shape
    k, s = k_LBKSH.shape[2], k_LBKSH.shape[3]
    block = min(block, s)
    out_dtype = q_BTNH.dtype
    q_BTNH = q_BTNH.astype(attention_dtype(out_dtype))
    q_BKGTH = q_BTNH.reshape(b, t, k, n // k, h)
    q_BKGTH = q_BKGTH.reshape(b, k, n // k, t, h) if t == 1 else q_BKGTH.transpose(0, 2, 3, 1, 4)
    low = jnp.finfo(jnp.float32).min

    def read(cache, start):
        return jax.lax.dynamic_slice(cache, (layer, 0, 0, start, 0), (1, b, k, block, h))[0]

    def body(j, carry):
        top_BKGT, total_BKGT, acc_BKGTH = carry
        start = jnp.minimum(j * block, s - block)
        k_BKSH, v_BKSH = (read(c, start).astype(q_BKGTH.dtype) for c in (k_LBKSH, v_LBKSH))
        seen_BTS = jax.lax.dynamic_slice_in_dim(mask_BTS, start, block, axis=2)
        seen_BTS = seen_BTS & (start + jnp.arange(block) >= j * block)
        logits_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH) * (h**-0.5)
        logits_BKGTS = jnp.where(seen_BTS[:, None, None], logits_BKGTS.astype(jnp.float32), low)
        new_top = jnp.maximum(top_BKGT, logits_BKGTS.max(axis=-1))
        # a row whose blocks so far were all unseen holds exp(0) terms here; its first seen slot's
        # larger maximum zeroes them (exp(low - max)) before they reach the output
        p_BKGTS = jnp.exp(logits_BKGTS - new_top[..., None])
        fade = jnp.exp(top_BKGT - new_top)
        acc_BKGTH = acc_BKGTH * fade[..., None] + jnp.einsum(
            "BKGTS,BKSH->BKGTH", p_BKGTS.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32)
        return new_top, total_BKGT * fade + p_BKGTS.sum(axis=-1), acc_BKGTH

    shape = (b, k, n // k, t)
    init = (jnp.full(shape, low), jnp.zeros(shape), jnp.zeros((*shape, h)))
    blocks = (jnp.minimum(limit, s) + block - 1) // block
    _, total_BKGT, acc_BKGTH = jax.lax.fori_loop(0, blocks, body, init)
    out_BKGTH = (acc_BKGTH / total_BKGT[..., None]).astype(out_dtype)
    if t == 1:
        return out_BKGTH.reshape(b, t, n, h)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def segment_causal_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """Causal attention restricted to tokens of the same packed segment: mask[b, t, s]."""
    t = segment_ids_BT.shape[1]
    causal_TS = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return causal_TS[None] & same_BTS


def _kept_letters(equation: str) -> tuple[str, str, str]:
    """(kernel letters, contracted letters, kernel letters kept in the output) of 'x,kernel->out'."""
    inputs, out = equation.replace(" ", "").split("->")
    kernel = inputs.split(",")[1]
    contracted = "".join(c for c in kernel if c not in out)
    kept = "".join(c for c in kernel if c in out)
    if not out.endswith(kept):
        raise ValueError(f"{equation}: the kernel's output dims must end the output, in the kernel's order "
                         "(the int8 scales broadcast over them)")
    return kernel, contracted, kept


def scale_shape(kernel_shape: tuple[int, ...], equation: str) -> tuple[int, ...]:
    """The int8 scale of a kernel: its shape with the contracted dims set to 1 (one scale per
    output channel)."""
    kernel, contracted, _ = _kept_letters(equation)
    return tuple(1 if c in contracted else n for c, n in zip(kernel, kernel_shape))


def kernel_product(module: nn.Module, x: jax.Array, equation: str, shape: tuple[int, ...], axes: tuple[str, ...],
                   *, dtype, param_dtype, quantize: str = "none", init=nn.initializers.normal(stddev=0.02),
                   stop: int | None = None, lora=None) -> jax.Array:
    """`einsum(equation, x, kernel)` for the module's parameter `kernel` — the one place a weight
    meets an activation, and so the rule for what int8 quantizes: every such kernel, and nothing
    else (norms, biases, embedding tables, convolutions stay as they are).

    With `quantize="int8"` the module holds `kernel` as int8 and `kernel_scale` (float32, the
    kernel's shape with the contracted dims at 1): the int8 values enter the dot converted to
    `dtype` — inside the computation, one layer at a time — and the per-output-channel scale
    multiplies the (much smaller) result. `stop` keeps the first `stop` entries of the kernel's
    last dim (an LM head computing the image-code logits only).

    With a `lora` config (`models.config.LoraConfig`) that targets this module's path, the module
    also holds `lora_a` [contracted dims..., rank] and `lora_b` [rank, output dims...] (float32)
    and adds `lora.scaling * (x @ lora_a) @ lora_b` to the product (see `models.lora`)."""
    y = _base_product(module, x, equation, shape, axes, dtype, param_dtype, quantize, init, stop)
    if lora is not None and lora.targets_path(module.path):
        y = y + lora_delta(module, x, equation, shape, axes, lora, dtype, stop)
    return y


def lora_equations(equation: str) -> tuple[str, str, str]:
    """('x,A->h', 'h,B->out', 'A,B->kernel') for the low-rank factors of `equation`'s kernel: A
    carries the kernel's contracted dims then the rank 'r', B the rank then the output dims."""
    inputs, out = equation.replace(" ", "").split("->")
    x_letters = inputs.split(",")[0]
    kernel, contracted, kept = _kept_letters(equation)
    mid = "".join(c for c in x_letters if c not in contracted)
    return (f"{x_letters},{contracted}r->{mid}r", f"{mid}r,r{kept}->{out}", f"{contracted}r,r{kept}->{kernel}")


def lora_shapes(shape: tuple[int, ...], axes: tuple[str, ...], equation: str, rank: int):
    """((A shape, A axes), (B shape, B axes)) of the adapter of a kernel of `shape`."""
    kernel, contracted, kept = _kept_letters(equation)
    dims, names = dict(zip(kernel, shape)), dict(zip(kernel, axes))
    a = (tuple(dims[c] for c in contracted) + (rank,), tuple(names[c] for c in contracted) + ("lora_rank",))
    b = ((rank,) + tuple(dims[c] for c in kept), ("lora_rank",) + tuple(names[c] for c in kept))
    return a, b


def _lora_a_init(fan_in: int):
    """PEFT's default for lora_A (torch's kaiming_uniform with a=sqrt(5)): uniform in +-1/sqrt(in)."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def lora_dropout(x, rate: float, key):
    """An adapter's input in training: each element dropped with probability `rate`, the rest
    scaled by 1 / (1 - rate), in `x`'s dtype."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def lora_delta(module: nn.Module, x, equation, shape, axes, lora, dtype, stop=None):
    (a_shape, a_axes), (b_shape, b_axes) = lora_shapes(shape, axes, equation, lora.rank)
    fan_in = int(np.prod(a_shape[:-1]))
    a = param_with_axes(module, "lora_a", _lora_a_init(fan_in), a_shape, jnp.float32, a_axes)
    b = param_with_axes(module, "lora_b", nn.initializers.zeros, b_shape, jnp.float32, b_axes)
    if stop is not None:
        b = b[..., :stop]
    if lora.dropout > 0 and module.has_rng("dropout"):  # training: the step passes a dropout rng
        x = lora_dropout(x, lora.dropout, module.make_rng("dropout"))
    to_rank, from_rank, _ = lora_equations(equation)
    acc = accumulation(dtype)  # 16-bit on a CPU: accumulate in float32 (see `accumulation`)
    h = jnp.einsum(to_rank, x.astype(dtype), a.astype(dtype), preferred_element_type=acc).astype(dtype)
    y = jnp.einsum(from_rank, h, b.astype(dtype), preferred_element_type=acc).astype(dtype)
    return y * jnp.asarray(lora.scaling, dtype)


PREFIX_KERNEL = "prefix_kernel"


def prefix_kernels(params: dict, stop: int) -> dict:
    """`params` of a module whose product `kernel_product` may run with `stop` (an LM head), with
    the kernel's first `stop` output columns (and scales) also stored apart, as `prefix_kernel`
    (and `prefix_kernel_scale`), which such a product then reads instead of slicing the kernel:
    a slice of a row-major kernel's columns is a strided copy on XLA's CPU backend, made at every
    call (at every step, inside a decode loop's branch)."""
    out = dict(params)
    out[PREFIX_KERNEL] = params["kernel"][..., :stop]
    if "kernel_scale" in params:
        out[PREFIX_KERNEL + "_scale"] = params["kernel_scale"][..., :stop]
    return out


def one_device() -> bool:
    """Is the program being traced for one device (no mesh, or a mesh of one)?"""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def current_device():
    """The device the program is built for: the active mesh's (an AOT compile for a TPU topology
    from a CPU machine is for a TPU), else JAX's first."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device if device is not None else jax.devices()[0]


_SIXTEEN_BIT = (jnp.bfloat16, jnp.float16)


def attention_dtype(dtype, platform: str | None = None):
    """The type attention's scores and weighted sums are computed in for a model computing in
    `dtype` on `platform` (default: `current_device()`'s): float32 on a CPU for 16-bit types, else
    `dtype`. XLA's CPU dots with batch dims in bfloat16 run ~9x slower than in float32 (a decode
    step of 16 rows: 0.66 s against 19 ms), so there queries, keys and values enter them as
    float32, and a decode loop keeps its cache in float32 (`benchmarks/cpu_dots.py`)."""
    dtype = jnp.dtype(dtype)
    platform = current_device().platform if platform is None else platform
    return jnp.dtype(jnp.float32) if dtype in _SIXTEEN_BIT and platform == "cpu" else dtype


def accumulation(*dtypes):
    """A dot's output type where it is not its operands' own (`preferred_element_type`): float32
    when every operand is a 16-bit float and the program is for a CPU, rounded back once after;
    else None (the operands' type). XLA's CPU dots of bfloat16 operands run up to 2-3x faster than
    float32 ones when they accumulate into float32, and up to ~2-3x slower than float32 when they
    write bfloat16 (`benchmarks/cpu_dots.py`); float16 ones ran ~1.1-1.7x float32's time either
    way (2026-12-05). TPUs and GPUs accumulate 16-bit dots in float32 anyway: their programs are
    left as they were."""
    if all(jnp.dtype(d) in _SIXTEEN_BIT for d in dtypes) and current_device().platform == "cpu":
        return jnp.float32
    return None


def _contract(equation: str, x, kernel):
    """`einsum(equation, x, kernel)` as one dot_general that contracts the kernel's dims in the
    kernel's own order. (`jnp.einsum` orders them alphabetically: o_proj's "BTNH,NHD->BTD"
    contracted H before N, and XLA on CPU copied the whole kernel into that order at every call.)

    Where x is (free dims, contracted dims) and the kernel (contracted dims, output dims), as every
    projection of the model is, the product is one 2-D matmul of the two flattened (reshapes that
    move no data): with [batch, length, ...] kept apart, XLA on CPU wrote the MLP's gate gradient
    transposed for its weight gradient (~30 ms a layer at 8 x 512 tokens) and the train step ran
    ~7 % slower (`benchmarks/train_step.py`). Only where no mesh of several devices is active: where
    the batch does not divide over the mesh (2 rows over fsdp 4), XLA's partitioner gave the
    flattened form's padding token embedding a gradient it does not have (`tests/test_attention.py`;
    reproduced in plain JAX with one embedding lookup and one flattened matmul, exact with 4 or 8
    rows), so sharded programs keep the N-D dot."""
    inputs, out = equation.replace(" ", "").split("->")
    x_letters, kernel_letters = inputs.split(",")
    contracted = [c for c in kernel_letters if c not in out]
    free_x = [c for c in x_letters if c not in contracted]
    kept = [c for c in kernel_letters if c not in contracted]
    accumulate = accumulation(x.dtype, kernel.dtype)
    rounded = (lambda y: y) if accumulate is None else (lambda y: y.astype(jnp.result_type(x, kernel)))  # noqa: E731
    if "".join(free_x + kept) != out or len(set(x_letters)) != len(x_letters):
        return rounded(jnp.einsum(equation, x, kernel, preferred_element_type=accumulate))
    if one_device() and list(x_letters) == free_x + contracted and list(kernel_letters) == contracted + kept:
        n_free, n_in = len(free_x), len(contracted)
        y = jax.lax.dot_general(x.reshape(-1, int(np.prod(x.shape[n_free:]))),
                                kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1), (((1,), (0,)), ((), ())),
                                preferred_element_type=accumulate)
        return rounded(y).reshape(x.shape[:n_free] + kernel.shape[n_in:])
    dims = ((tuple(x_letters.index(c) for c in contracted), tuple(kernel_letters.index(c) for c in contracted)),
            ((), ()))
    return rounded(jax.lax.dot_general(x, kernel, dims, preferred_element_type=accumulate))


def _base_product(module, x, equation, shape, axes, dtype, param_dtype, quantize, init, stop):
    int8 = check_quantize(quantize) == "int8"
    kernel = param_with_axes(module, "kernel", nn.initializers.zeros if int8 else init, shape,
                             jnp.int8 if int8 else param_dtype, axes)
    if int8:
        s_shape = scale_shape(shape, equation)
        s_axes = tuple(None if n == 1 and m != 1 else a for n, m, a in zip(s_shape, shape, axes))
        scale = param_with_axes(module, "kernel_scale", nn.initializers.ones, s_shape, jnp.float32, s_axes)
    if stop is not None:
        if module.has_variable("params", PREFIX_KERNEL) and module.get_variable(
                "params", PREFIX_KERNEL).shape[-1] == stop:
            # its first `stop` columns, stored apart (`prefix_kernels`): a slice of the kernel is a copy on CPU
            kernel = module.get_variable("params", PREFIX_KERNEL)
            scale = module.get_variable("params", PREFIX_KERNEL + "_scale") if int8 else None
        else:
            kernel, scale = kernel[..., :stop], (scale[..., :stop] if int8 else None)
    if not int8:
        return _contract(equation, x.astype(dtype), kernel.astype(dtype))
    letters, contracted, _ = _kept_letters(equation)
    scale_out = scale.reshape([n for c, n in zip(letters, scale.shape) if c not in contracted])
    y = _contract(equation, x.astype(dtype), kernel.astype(dtype))
    return y * scale_out.astype(y.dtype)


def quantize_int8(kernel, shape_of_scale: tuple[int, ...]):
    """Symmetric int8 quantization of a float kernel with one scale per entry of `shape_of_scale`
    (the dims of size 1 are reduced): returns (int8 values, float32 scale), kernel ~= values * scale.
    Works on NumPy (host) and JAX arrays alike."""
    xp = jnp if isinstance(kernel, jax.Array) else np
    w = xp.asarray(kernel, xp.float32)
    axes = tuple(i for i, (n, m) in enumerate(zip(shape_of_scale, w.shape)) if n == 1 and m != 1)
    amax = xp.max(xp.abs(w), axis=axes, keepdims=True) if axes else xp.abs(w)
    # a channel whose scale amax / 127 would not be a normal float32 (amax under ~1.5e-36: denormals,
    # which a device flushes to zero, and the host's 127 / amax overflowing, among them) is a zero
    # channel; a NaN or infinite amax is kept where the max propagates it (`LeafQuantizer` refuses such
    # a tensor by name: a NaN channel had become zeros with scale 1, unsaid)
    smallest = np.float32(127.0) * np.finfo(np.float32).tiny
    amax = xp.where(amax < smallest, np.float32(127.0), amax).astype(xp.float32)
    # w * (127 / amax), not w / (amax / 127), and the scale amax * (1 / 127), not amax / 127: XLA turns
    # a division by a broadcast or a constant into a product, and the host (NumPy) and device
    # quantizers must round exactly alike (the scale was an ulp apart)
    values = xp.clip(xp.round(w * (xp.float32(127.0) / amax)), -127, 127)
    values = xp.where(xp.isfinite(values), values, 0).astype(xp.int8)  # (a NaN's cast to int8 is undefined)
    return values, (amax * xp.float32(1.0 / 127.0)).reshape(shape_of_scale)


class Projection(nn.Module):
    """`einsum(equation, x, kernel)` (+ bias) with a multi-dimensional, logically named kernel
    (int8 with a per-output-channel scale when `quantize="int8"`; see `kernel_product`).

    Used instead of `nn.DenseGeneral`, which initialises a flattened 2-D kernel and so cannot
    carry per-dimension axis names.
    """

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    equation: str  # e.g. "BTD,DNH->BTNH"
    bias_axes: tuple[str, ...] | None = None  # names of the trailing kernel dims the bias covers
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantize: str = "none"
    kernel_init: Any = nn.initializers.normal(stddev=0.02)
    lora: Any = None  # a LoraConfig: adapters beside the kernel when it targets this module

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = kernel_product(self, x, self.equation, self.kernel_shape, self.kernel_axes, dtype=self.dtype,
                           param_dtype=self.param_dtype, quantize=self.quantize, init=self.kernel_init,
                           lora=self.lora)
        if self.bias_axes is not None:
            shape = self.kernel_shape[len(self.kernel_shape) - len(self.bias_axes):]
            bias = param_with_axes(self, "bias", nn.initializers.zeros, shape, self.param_dtype, self.bias_axes)
            y = y + bias.astype(self.dtype)
        return y

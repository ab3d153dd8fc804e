"""The training / prefill attention backends (issue 14) against the definition: NumPy float64
softmax over the keys s <= t of the same segment (`_reference` below), on packed rows with
several segments, padding (segment 0), a one-token segment, and a length that is not a multiple
of the block. The splash kernel runs in Pallas' interpreter here (the TPU kernel's own code).

Tolerances: float32 inputs, 2e-5 relative to the output's scale (the blocked softmax sums in a
different order); bfloat16 inputs, 2e-2 (bfloat16 has 8 bits of mantissa: one rounding of q, k,
v and p is ~4e-3 each). Gradients: against JAX's autodiff of the dense masked attention in
float32, the same tolerances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitoken_jax.models import attention
from unitoken_jax.models.layers import dot_product_attention, segment_causal_mask


def _packed(t=256, b=2, seed=0):
    """Rows of several samples: lengths 100, 1 (a one-token segment), 60, then padding; and 40,
    180, then padding (blocks of 128: row 0's blocks 0 and 1 share segment 3, nothing reaches
    block 2)."""
    seg = np.zeros((b, t), np.int32)
    seg[0, :100], seg[0, 100], seg[0, 101:161] = 1, 2, 3
    seg[1, :40], seg[1, 40:220] = 1, 2
    return seg


def _qkv(shape_bt, n=4, k=2, h=16, dtype=jnp.float32, seed=0):
    b, t = shape_bt
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
    kk = jax.random.normal(keys[1], (b, t, k, h), jnp.float32)
    v = jax.random.normal(keys[2], (b, t, k, h), jnp.float32)
    return q.astype(dtype), kk.astype(dtype), v.astype(dtype)


def _reference(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT) -> np.ndarray:
    """The definition, in NumPy float64 (for tests): softmax over s <= t of the same segment."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BTNH, k_BTKH, v_BTKH))
    seg = np.asarray(segment_ids_BT)
    b, t, n, h = q.shape
    g = n // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    mask = np.tril(np.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    logits = np.where(mask[:, None], logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


BACKENDS = [("xla", {}), ("splash", {"interpret": True})]


@pytest.mark.parametrize("backend,kw", BACKENDS, ids=[b for b, _ in BACKENDS])
@pytest.mark.parametrize("t,block", [(384, 128), (300, 128), (256, 512)], ids=["blocked", "ragged", "one-block"])
def test_outputs_equal_the_definition(backend, kw, t, block):
    seg = _packed(t)
    q, k, v = _qkv(seg.shape)
    want = _reference(q, k, v, seg)
    got = np.asarray(attention.causal_attention(q, k, v, jnp.asarray(seg), backend=backend, block=block, **kw))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("backend,kw", BACKENDS, ids=[b for b, _ in BACKENDS])
def test_bfloat16_within_its_rounding(backend, kw):
    seg = _packed(384)
    q, k, v = _qkv(seg.shape, dtype=jnp.bfloat16)
    want = _reference(q, k, v, seg)
    got = np.asarray(attention.causal_attention(q, k, v, jnp.asarray(seg), backend=backend, block=128, **kw),
                     np.float32)
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("backend,kw", BACKENDS, ids=[b for b, _ in BACKENDS])
@pytest.mark.parametrize("t,dtype,tol", [(384, jnp.float32, 2e-5), (300, jnp.float32, 2e-5), (384, jnp.bfloat16, 3e-2)],
                         ids=["f32", "f32-ragged", "bf16"])
def test_gradients_equal_the_dense_attention(backend, kw, t, dtype, tol):
    seg = jnp.asarray(_packed(t))
    q, k, v = _qkv(seg.shape, seed=3, dtype=dtype)
    cot = jax.random.normal(jax.random.key(9), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    dense = loss(lambda q, k, v: dot_product_attention(q, k, v, segment_causal_mask(seg)))
    ours = loss(lambda q, k, v: attention.causal_attention(q, k, v, seg, backend=backend, block=128, **kw))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(dense, argnums=(0, 1, 2))(*f32)  # bfloat16 inputs: against float32 autodiff of the same values
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
    for name, w, g in zip("qkv", want, got):
        assert g.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=tol * np.abs(w).max(), rtol=0,
                                   err_msg=name)


def test_the_splash_kernels_forward_and_backward_take_the_inputs_precision():
    """Mosaic refuses a float32 contraction of bfloat16 operands, which a global
    jax_default_matmul_precision="highest" (this suite's, or a user's) asks for: every dot of the
    splash kernels, the backward's dq and dkv kernels too, must stay at DEFAULT. A context around
    the forward call alone left the backward's at HIGHEST, so bf16 training failed on a TPU only."""
    seg = jnp.ones((1, 128), jnp.int32)
    q = jnp.ones((1, 128, 2, 16), jnp.bfloat16)
    k = jnp.ones((1, 128, 1, 16), jnp.bfloat16)

    def loss(q, k, v):
        out = attention.causal_attention(q, k, v, seg, backend="splash", block=128, interpret=True)
        return out.astype(jnp.float32).sum()

    precisions, kernels = [], []

    def walk(jaxpr):  # every equation, inside the kernels' (pallas_call's) and custom rules' jaxprs too
        from jax.extend.core import ClosedJaxpr, Jaxpr

        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                precisions.append(str(eqn.params["precision"]))
            if eqn.primitive.name == "pallas_call":
                kernels.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                        walk(sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub)

    with jax.default_matmul_precision("highest"):
        walk(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, k).jaxpr)
    assert len(kernels) == 3 and len(precisions) >= 6, (len(kernels), len(precisions))  # fwd, dq and dkv reached
    assert not [p for p in precisions if "HIGHEST" in p], sorted(set(precisions))


@pytest.mark.parametrize("t", [300, 301])
def test_the_cudnn_call_equals_the_definition(t, monkeypatch):
    """The cudnn backend's exact call (segment mask, is_causal, BTNH layout, grouped heads), run
    through XLA's implementation of the same `jax.nn.dot_product_attention` API (no GPU here). cuDNN
    takes no mask on an odd length (JAX raises "Unsupported sequence length"): an odd row is padded
    by one position of its own, and the result is the definition's still."""
    lengths, call = [], jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, *a, **kw: (lengths.append(q.shape[1]),
                                                                               call(q, *a, **kw))[1])
    seg = _packed(t)
    q, k, v = _qkv(seg.shape)
    out = attention._cudnn(q, k, v, jnp.asarray(seg), implementation="xla")
    assert lengths == [t + t % 2] and out.shape == q.shape
    want = _reference(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2e-5 * np.abs(want).max())


def _every_pair_visible(t=384, b=2):
    """`_packed`'s first row, and a second row of one sample over all but the last 10 positions:
    a segment that spans every block makes every block pair visible for the batch."""
    seg = _packed(t, b)
    seg[1] = 0
    seg[1, :t - 10] = 1
    return seg


@pytest.mark.parametrize("rows", ["some-pairs-skipped", "every-pair-visible"])
def test_the_xla_paths_with_and_without_skipping_equal_the_definition(rows):
    """The xla backend computes every block pair without conditionals when the batch sees them all
    (`_by_visibility`), and skips the others behind one each otherwise: both runs of the same code,
    outputs and gradients, against the definition (each layout takes the path its name says)."""
    seg = jnp.asarray(_packed(384) if rows == "some-pairs-skipped" else _every_pair_visible(384))
    every = bool(attention._every_pair_visible(attention.visible_blocks(seg, 128)))
    assert every == (rows == "every-pair-visible")
    q, k, v = _qkv(seg.shape, seed=5)
    want = _reference(q, k, v, seg)
    got = np.asarray(attention.causal_attention(q, k, v, seg, backend="xla", block=128))
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)

    cot = jax.random.normal(jax.random.key(9), q.shape)

    def dense(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, segment_causal_mask(seg)) * cot)

    def ours(q, k, v):
        return jnp.sum(attention.causal_attention(q, k, v, seg, backend="xla", block=128) * cot)

    want_g = jax.grad(dense, argnums=(0, 1, 2))(q, k, v)
    got_g = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
    for name, w, g in zip("qkv", want_g, got_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * np.abs(w).max(), rtol=0, err_msg=name)


def test_xla_backward_keeps_no_score_matrix():
    """The xla path's gradient saves the output and a log-sum-exp per query, and recomputes each
    block's probabilities: its compiled temporaries stay under half of the T x T float32 scores
    (JAX's autodiff of the online softmax kept every block pair's: 1.65x the scores here)."""
    t, n = 1024, 2
    seg = jnp.asarray(np.repeat(np.arange(1, 3, dtype=np.int32), t // 2)[None])
    q, k, v = _qkv((1, t), n=n, k=n)

    def loss(q, k, v):
        return jnp.sum(attention.causal_attention(q, k, v, seg, backend="xla", block=128) ** 2)

    memory = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().memory_analysis()
    scores = n * t * t * 4
    assert memory.temp_size_in_bytes < scores / 2, (memory.temp_size_in_bytes, scores)  # autodiff: 1.65x


def test_only_blocks_that_share_a_segment_are_visible():
    seg = np.zeros((1, 256), np.int32)
    seg[0, :64], seg[0, 64:192], seg[0, 192:] = 1, 2, 3  # blocks of 64: [1], [2], [2], [3]
    vis = np.asarray(attention.visible_blocks(jnp.asarray(seg), 64))
    want = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(vis, want)
    # another row that shares a segment across blocks 0 and 3 makes that pair visible for the batch
    other = np.ones((1, 256), np.int32)
    vis2 = np.asarray(attention.visible_blocks(jnp.asarray(np.concatenate([seg, other])), 64))
    assert vis2[3, 0] and vis2.sum() == 10


def test_backend_choice_and_errors():
    import types

    assert attention.resolve("auto", "cpu") == "xla"
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu") == "cudnn"
    with pytest.raises(ValueError, match="does not run on cpu; available there: auto, xla"):
        attention.resolve("splash", "cpu")
    with pytest.raises(ValueError, match="auto, splash, cudnn, xla"):
        attention.resolve("flash", "cpu")
    # by chip: Pallas' TPU compiler does not target v2 / v3 (Colab's v2-8), cuDNN's kernel needs Ampere
    # and 16-bit inputs; auto falls back to xla there, and asking for the kernel says why
    tpu = lambda kind: types.SimpleNamespace(platform="tpu", device_kind=kind)  # noqa: E731
    gpu = lambda kind, cc: types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=cc)  # noqa: E731
    for kind in ("TPU v2", "TPU v3"):
        assert attention.resolve("auto", tpu(kind)) == "xla"
        with pytest.raises(ValueError, match=f"TPU v4 or later, this is {kind}\\); available there: auto, xla"):
            attention.resolve("splash", tpu(kind))
    for kind in ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite"):
        assert attention.resolve("auto", tpu(kind), jnp.float32) == "splash"
    assert attention.resolve("auto", gpu("NVIDIA H100", "9.0"), jnp.bfloat16) == "cudnn"
    assert attention.resolve("auto", gpu("NVIDIA A100", "8.0"), jnp.float16) == "cudnn"
    assert attention.resolve("auto", gpu("Tesla T4", "7.5"), jnp.bfloat16) == "xla"
    assert attention.resolve("auto", gpu("NVIDIA H100", "9.0"), jnp.float32) == "xla"
    with pytest.raises(ValueError, match="compute capability 8.0 .* Tesla T4 has 7.5"):
        attention.resolve("cudnn", gpu("Tesla T4", "7.5"), jnp.bfloat16)
    # under a mesh the device is JAX's abstract one (kind, no capability): this host's GPUs of that kind tell
    abstract = types.SimpleNamespace(platform="gpu", device_kind="Tesla T4", num_cores=None)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(jax, "local_devices", lambda: [gpu("Tesla T4", "7.5"), gpu("Tesla T4", "7.5")])
        assert attention.resolve("auto", abstract, jnp.bfloat16) == "xla"
        with pytest.raises(ValueError, match="Tesla T4 has 7.5"):
            attention.resolve("cudnn", abstract, jnp.bfloat16)
    with pytest.raises(ValueError, match="takes bfloat16 or float16, the compute dtype is float32"):
        attention.resolve("cudnn", gpu("NVIDIA H100", "9.0"), jnp.float32)
    # head sizes cuDNN's kernel takes (JAX raises NotImplementedError at trace time for the others):
    # multiples of 8, up to 256 on Hopper and 128 before; auto falls back to xla
    assert attention.resolve("auto", gpu("NVIDIA H100", "9.0"), jnp.bfloat16, head_dim=256) == "cudnn"
    for cc, head_dim in (("9.0", 12), ("9.0", 264), ("8.0", 256)):
        assert attention.resolve("auto", gpu("NVIDIA GPU", cc), jnp.bfloat16, head_dim=head_dim) == "xla"
        with pytest.raises(ValueError, match=f"multiples of 8 up to .*, this one is {head_dim}"):
            attention.resolve("cudnn", gpu("NVIDIA GPU", cc), jnp.bfloat16, head_dim=head_dim)
    # a model config's backend and block, as a run's log says them (nothing said which auto took, nor
    # that splash rounds a block up to its 128 lanes)
    from unitoken_jax.configs.model import get_config
    from unitoken_jax.models.config import UniTokenConfig

    tiny = UniTokenConfig.from_dict(get_config("tiny").model).replace(attention_block=100)
    assert attention.model_backend(tiny, "cpu") == ("xla", 100)
    assert attention.model_backend(tiny, tpu("TPU v5 lite")) == ("splash", 128)
    assert attention.say_backend(tiny, tpu("TPU v5 lite")) == "attention: splash (auto on tpu), blocks of 128 " \
        "positions (attention_block 100: splash's blocks are whole multiples of 128)"
    assert attention.say_backend(tiny.replace(attention="xla"), "cpu") == "attention: xla, blocks of 100 positions"
    with pytest.raises(ValueError, match="attention='splash' does not run on cpu"):
        attention.model_backend(tiny.replace(attention="splash"), "cpu")
    # a block of no positions is refused by name (it divided by zero)
    q = jnp.zeros((1, 8, 2, 4))
    for block in (0, -4):
        with pytest.raises(ValueError, match=f"block of {block} positions"):
            attention.causal_attention(q, q, q, jnp.ones((1, 8), jnp.int32), block=block)


def _packed_batch(rng, length=256):
    """Two packed rows of the tiny model's text: samples of 100, 1 and 60 tokens then padding; 40 and
    180 then padding. Positions restart in each sample; padding is labelled -100."""
    seg = _packed(length)
    positions = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for s in np.unique(seg[b]):
            where = seg[b] == s
            positions[b, where] = np.arange(where.sum())
    tokens = rng.integers(8800, 8960, seg.shape)
    labels = np.where(seg > 0, tokens, -100)
    return {k: jnp.asarray(v, jnp.int32) for k, v in
            dict(tokens=tokens, labels=labels, positions=positions, segment_ids=seg).items()}


def _loss_and_grads(config, params, batch):
    from unitoken_jax.models.loss import lm_loss
    from unitoken_jax.models.unitoken import UniToken

    module = UniToken(config)

    def loss_fn(p):
        logits, _ = module.apply({"params": p}, batch["tokens"], batch["positions"], batch["segment_ids"])
        return lm_loss(logits, batch["labels"], batch["segment_ids"], config.z_loss_weight)[0]

    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.slow
def test_every_backend_trains_the_same_on_one_device_and_a_mesh():
    """The same loss and gradients from the dense attention (one 512 block), the blocked xla path
    and the splash kernel (interpreted), with remat off and on, on one device and on a
    fsdp x tensor mesh of 8 (splash then runs under shard_map, heads split over 'tensor')."""
    from unitoken_jax import sharding
    from unitoken_jax.configs.model import get_config
    from unitoken_jax.model import UniTokenModel
    from unitoken_jax.models.config import UniTokenConfig
    from unitoken_jax.models.unitoken import param_shardings

    base = UniTokenConfig.from_dict(get_config("tiny").model).replace(vision=None, attention="xla",
                                                                       attention_block=512)
    params = UniTokenModel.random(base, seed=1).params
    batch = _packed_batch(np.random.default_rng(0))
    ref_loss, ref_grads = _loss_and_grads(base, params, batch)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
    for where in ("one device", "mesh"):
        for backend, block in (("xla", 64), ("splash", 128)):
            for remat in ("none", "full"):
                cfg = base.replace(attention=backend, attention_block=block, remat_policy=remat)
                with attention.splash_interpreter(), sharding.mesh_context(mesh if where == "mesh" else None):
                    p = params if where == "one device" else jax.device_put(params, param_shardings(cfg, mesh))
                    loss, grads = _loss_and_grads(cfg, p, batch)
                what = f"{backend} block {block}, remat {remat}, {where}"
                np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-6, err_msg=what)
                jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                                     atol=2e-5 * np.abs(np.asarray(b)).max(),
                                                                     err_msg=what), grads, ref_grads)


@pytest.mark.parametrize("b,t,n,k,s,block", [(3, 1, 4, 2, 37, 8), (2, 5, 4, 4, 64, 16), (4, 1, 2, 2, 10, 32),
                                             (2, 3, 4, 1, 50, 7), (2, 1, 4, 2, 40, 8)],
                         ids=["ragged-last-block", "five-queries", "one-block", "one-kv-head", "early-step"])
def test_a_decode_step_reading_the_filled_cache_blocks_equals_the_definition(b, t, n, k, s, block):
    """`attend_filled` (a scanned decode step's attention: the stacked cache read `block` slots at a
    time, only the blocks below the furthest slot reached) against the NumPy softmax over the slots
    each query sees (slot <= its index + t), for every layer of the stack. Unseen slots in a block
    it reads hold large values (counting one shows, and so does counting a ragged last block's
    overlap twice); the blocks past the furthest slot hold NaN, which reading one would spread."""
    from unitoken_jax.models.layers import attend_filled

    rng = np.random.default_rng(s + t)
    h, layers = 16, 2
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    kv = rng.standard_normal((2, layers, b, k, s, h)).astype(np.float32)
    if s > 3 * block and t == 1 and b == 2:  # early in a generation: most blocks unfilled
        index = np.array([block + 2, 3], np.int32)
    else:
        index = rng.integers(0, s - t + 1, b).astype(np.int32)
        index[0] = s - t  # a row that reaches the last slot
    top = int(index.max()) + t
    kv[:, :, :, :, top:] = 1e4
    kv[:, :, :, :, -(-top // block) * block:] = np.nan
    seen_BTS = np.arange(s)[None, None] <= (index[:, None] + np.arange(t))[:, :, None]
    for layer in range(layers):
        keys = np.repeat(kv[0, layer].transpose(0, 2, 1, 3), n // k, axis=2).astype(np.float64)
        values = np.repeat(kv[1, layer].transpose(0, 2, 1, 3), n // k, axis=2).astype(np.float64)
        logits = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), np.nan_to_num(keys)) / np.sqrt(h)
        logits = np.where(seen_BTS[:, None], logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        want = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), np.nan_to_num(values))
        got = jax.jit(attend_filled, static_argnums=6)(q, kv[0], kv[1], layer, seen_BTS, jnp.int32(top), block)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())

"""Layer stacking, rematerialisation and sharding change how the model runs, never what it computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses
import re

import unitoken_jax
from unitoken_jax.configs.model import get_config
from unitoken_jax import sharding
from unitoken_jax.models.unitoken import param_logical_specs, unroll_params
from unitoken_jax.models.loss import lm_loss
from unitoken_jax.models.unitoken import UniToken


def _batch(rng, b=2, length=24, n_images=2):
    tokens = rng.integers(8800, 8960, (b, length))
    cont = np.zeros((b, length), bool)
    index = np.zeros((b, length), np.int32)
    cont[0, 3:3 + 16], index[0, 3:3 + 16] = True, np.arange(16)
    cont[1, 5:5 + 16], index[1, 5:5 + 16] = True, np.arange(16, 32)
    labels = np.where(cont, -100, tokens)
    return dict(tokens=jnp.asarray(tokens, jnp.int32), labels=jnp.asarray(labels, jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(length), (b, length)),
                segment_ids=jnp.ones((b, length), jnp.int32), is_continuous=jnp.asarray(cont),
                feature_index=jnp.asarray(index), pixels=jnp.asarray(rng.normal(size=(n_images, 56, 56, 3)), jnp.float32))


def _loss_and_grads(config, params, batch, dropout_key=None):
    module = UniToken(config)
    train = {} if dropout_key is None else dict(deterministic=False, rngs={"dropout": dropout_key})

    def loss_fn(p):
        logits, _ = module.apply({"params": p}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                 batch["is_continuous"], batch["feature_index"], batch["pixels"], **train)
        return lm_loss(logits, batch["labels"], batch["segment_ids"], config.z_loss_weight)[0]

    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("swin_norm", [False, True])
def test_scan_unrolled_and_remat_agree(swin_norm):
    base = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    base = base.replace(decoder=dataclasses.replace(base.decoder, swin_norm=swin_norm))
    model = unitoken_jax.UniTokenModel.random(base, seed=0)
    batch = _batch(np.random.default_rng(0))
    ref_loss, ref_grads = _loss_and_grads(base, model.params, batch)
    for scan in (True, False):
        for remat in ("none", "full", "dots") if not swin_norm else ("none", "full"):  # dots: pre-norm only
            cfg = base.replace(scan_layers=scan, remat_policy=remat)
            params = model.params if scan else unroll_params(model.params, cfg)
            loss, grads = _loss_and_grads(cfg, params, batch)
            if not scan:
                # fold the unrolled gradients back into the scanned layout to compare leaf by leaf
                from unitoken_jax.models.chameleon import stack_layers
                for part, n in (("decoder", cfg.decoder.num_layers), ("vit", cfg.vision.num_layers)):
                    g = dict(grads[part])
                    g["layers"] = stack_layers([g.pop(f"layers_{i}") for i in range(n)])
                    grads = {**grads, part: g}
            np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=f"scan={scan} remat={remat}")
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, ref_grads)


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "none"), (True, "full"), (False, "dots")])
def test_rope_angles_are_computed_once_a_step_not_once_a_layer(scan, remat):
    """The decoder hands every layer the same RoPE tables: the training step's program holds one
    sine and one cosine of [B, T, H / 2] angles however many layers there are, and no layer (nor
    its rematerialised copy) evaluates them again inside its fused q / k arithmetic (which cost the
    train-step benchmark ~3 % of its time on a CPU)."""
    base = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    base = base.replace(decoder=dataclasses.replace(base.decoder, num_layers=3), vision=None,
                        scan_layers=scan, remat_policy=remat)
    model = unitoken_jax.UniTokenModel.random(base, seed=0)
    params = model.params if scan else unroll_params(model.params, base)
    batch = _batch(np.random.default_rng(0))
    module = UniToken(base)

    def loss_fn(p):
        logits, _ = module.apply({"params": p}, batch["tokens"], batch["positions"], batch["segment_ids"])
        return lm_loss(logits, batch["labels"], batch["segment_ids"], base.z_loss_weight)[0]

    text = jax.jit(jax.value_and_grad(loss_fn)).lower(params).as_text()
    half = base.decoder.head_dim // 2
    sines = re.findall(r"stablehlo\.sine %\S+ : tensor<([0-9x]+)xf32>", text)
    cosines = re.findall(r"stablehlo\.cosine %\S+ : tensor<([0-9x]+)xf32>", text)
    assert sines == [f"2x24x{half}"] and cosines == [f"2x24x{half}"], (sines, cosines)


def test_remat_with_dropout_trains_and_matches_no_remat():
    # the training configs use dropout 0.05 with full remat: the dropout masks must be the same
    # ones when the layer is recomputed, and `deterministic` must stay a Python bool under remat
    base = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    base = base.replace(decoder=dataclasses.replace(base.decoder, dropout=0.2))
    model = unitoken_jax.UniTokenModel.random(base, seed=0)
    batch = _batch(np.random.default_rng(0))
    key = jax.random.key(7)
    ref_loss, ref_grads = _loss_and_grads(base, model.params, batch, key)
    eval_loss, _ = _loss_and_grads(base, model.params, batch)
    assert abs(float(ref_loss) - float(eval_loss)) > 1e-4  # dropout really is on
    for remat in ("full", "dots"):
        loss, grads = _loss_and_grads(base.replace(remat_policy=remat), model.params, batch, key)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=remat)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, ref_grads)


def test_dropout_is_active_only_when_asked():
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    cfg = cfg.replace(decoder=dataclasses.replace(cfg.decoder, dropout=0.3))
    model = unitoken_jax.UniTokenModel.random(cfg, seed=1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(8800, 8960, (1, 12)), jnp.int32)
    pos, seg = jnp.arange(12)[None], jnp.ones((1, 12), jnp.int32)
    module = UniToken(cfg)
    eval_a, _ = module.apply({"params": model.params}, tokens, pos, seg)
    eval_b, _ = module.apply({"params": model.params}, tokens, pos, seg)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, _ = module.apply({"params": model.params}, tokens, pos, seg, deterministic=False,
                              rngs={"dropout": jax.random.key(0)})
    train_b, _ = module.apply({"params": model.params}, tokens, pos, seg, deterministic=False,
                              rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)


def test_sharded_forward_equals_single_device():
    assert jax.device_count() >= 8, "tests/conftest.py fakes 16 CPU devices"
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    single = unitoken_jax.UniTokenModel.random(cfg, seed=2)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
    sharded = unitoken_jax.UniTokenModel(cfg, single.params).shard(mesh)
    # the parameters really are split: the embedding over fsdp x tensor, the MLP over tensor
    emb = sharded.params["decoder"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len({str(s.index) for s in emb.addressable_shards}) == 8
    batch = _batch(np.random.default_rng(2), b=4)
    batch["is_continuous"] = batch["is_continuous"].at[2:].set(False)
    kwargs = {k: batch[k] for k in ("labels", "positions", "segment_ids", "is_continuous", "feature_index", "pixels")}
    logits_1, metrics_1 = single.forward(batch["tokens"], **kwargs)
    logits_8, metrics_8 = sharded.forward(batch["tokens"], **kwargs)
    np.testing.assert_allclose(np.asarray(logits_8), np.asarray(logits_1), atol=1e-5)
    np.testing.assert_allclose(float(metrics_8["loss"]), float(metrics_1["loss"]), rtol=1e-6)


def test_random_init_is_created_sharded():
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    mesh = sharding.make_mesh(fsdp=4, tensor=2, devices=jax.devices()[:8])
    sharded = unitoken_jax.UniTokenModel.random(cfg, seed=3, mesh=mesh)
    plain = unitoken_jax.UniTokenModel.random(cfg, seed=3)
    kernel = sharded.params["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded.params, plain.params)


def test_bfloat16_compute_stays_close_to_float32():
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    model = unitoken_jax.UniTokenModel.random(cfg, seed=5)
    bf16 = unitoken_jax.UniTokenModel(cfg.replace(dtype="bfloat16"), model.params)
    tokens = np.random.default_rng(5).integers(8800, 8960, (2, 16))
    full, half = np.asarray(model.text_logits(tokens)), np.asarray(bf16.text_logits(tokens))
    assert half.dtype == np.float32  # logits are always returned in float32
    assert not np.array_equal(full, half)  # the compute really ran in bfloat16
    np.testing.assert_allclose(half, full, atol=0.05 * np.abs(full).max())


def test_unknown_logical_name_is_an_error():
    with pytest.raises(ValueError, match="no rule"):
        sharding.check_names(["embed", "embedding_typo"])
    with pytest.raises(ValueError, match="no rule"):
        sharding.constrain(jnp.zeros((2, 3)), ("act_batch", "nonsense"))


def test_every_parameter_has_logical_names():
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    specs = param_logical_specs(cfg)
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert leaves and all(isinstance(s, jax.sharding.PartitionSpec) and len(s) > 0 for s in leaves)


def test_the_blocked_feature_gather_computes_the_same_and_moves_no_features():
    """`feature_blocks` (the training step on a mesh, with batches packed so that each shard's rows
    use its own pictures): the same loss and gradients as the plain gather on one device, and the
    compiled program moves no image features between devices, where the plain gather on the same
    mesh moves them (XLA's choice here: every shard gathers what its features give every row, then
    an all-reduce sums those and an all-gather spreads them, [rows, length, hidden] each)."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec

    from unitoken_jax.models.unitoken import param_shardings

    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    params = unitoken_jax.UniTokenModel.random(cfg, seed=4).params
    rng = np.random.default_rng(4)
    b, length, blocks, per_block = 8, 40, 8, 3  # 24 pictures of 16 features: 3 a block, 384 in all
    batch = _batch(rng, b=b, length=length, n_images=blocks * per_block)
    cont = np.zeros((b, length), bool)
    index = np.zeros((b, length), np.int32)
    for row in range(b):  # each row a picture of its own block (not the block's first), row 0 two
        first = 16 * (per_block * row + 2 - row % 2)
        cont[row, 3:19], index[row, 3:19] = True, first + np.arange(16)
    cont[0, 22:38], index[0, 22:38] = True, 16 * 1 + np.arange(16)
    batch.update(is_continuous=jnp.asarray(cont), feature_index=jnp.asarray(index),
                 labels=jnp.asarray(np.where(cont, -100, np.asarray(batch["tokens"])), jnp.int32))
    module = UniToken(cfg)

    def loss_fn(p, batch, feature_blocks):
        logits, _ = module.apply({"params": p}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                 batch["is_continuous"], batch["feature_index"], batch["pixels"],
                                 feature_blocks=feature_blocks)
        return lm_loss(logits, batch["labels"], batch["segment_ids"], cfg.z_loss_weight)[0]

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=2)(params, batch, 1)
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1, devices=jax.devices()[:8])
    moved = {}
    with sharding.mesh_context(mesh):
        p = jax.device_put(params, param_shardings(cfg, mesh))
        rows = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        for feature_blocks in (1, blocks):
            compiled = jax.jit(jax.value_and_grad(loss_fn), static_argnums=2).lower(p, rows, feature_blocks).compile()
            # collectives of the features (flat or in blocks) or of the whole batch's embeddings
            moved[feature_blocks] = re.findall(r"= f32\[(?:384,64|8,48,64|8,40,64)\]\S* (all-gather|all-reduce)",
                                               compiled.as_text())
            if feature_blocks == blocks:
                loss, grads = compiled(p, rows)
    assert "all-gather" in moved[1] and "all-reduce" in moved[1]  # (what the check below would see)
    assert moved[blocks] == []
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-6)
    # (some gradients are ~1e-14, rounding noise of a true 0: the absolute floor)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                         atol=max(2e-5 * np.abs(np.asarray(b)).max(), 1e-9)),
                 grads, ref_grads)


def test_a_batch_the_mesh_does_not_divide_is_split_where_it_can_be_and_warns_of_nothing(capfd):
    """One picture or one prompt on a data x fsdp = 4 mesh: the activation constraints asked XLA to
    split a batch of 1 four ways; it padded it and printed "[SPMD] Involuntary full
    rematerialization" for ~11 ops on a fresh compile (`--mesh 2,2,1`). A dimension its mesh axes
    do not divide is split over the leading axes that do, or not at all."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=1, devices=jax.devices()[:4])
    with sharding.mesh_context(mesh):
        spread = jax.jit(lambda x: sharding.constrain(x, ("act_batch", "act_embed")))
        for rows, spec in ((4, P(("data", "fsdp"))), (6, P("data")), (2, P("data")), (1, P()), (3, P())):
            out = spread(jnp.ones((rows, 8)))
            assert out.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2), (rows, out.sharding)
    cfg = unitoken_jax.UniTokenConfig.from_dict(get_config("tiny").model)
    single = unitoken_jax.UniTokenModel.random(cfg, seed=4)
    sharded = unitoken_jax.UniTokenModel(cfg, single.params).shard(mesh)
    batch = _batch(np.random.default_rng(4), n_images=1)  # (its first row: one picture)
    kwargs = {k: batch[k][:1] if k != "pixels" else batch[k]
              for k in ("positions", "segment_ids", "is_continuous", "feature_index", "pixels")}
    capfd.readouterr()
    logits_4, _ = sharded.forward(batch["tokens"][:1], **kwargs)
    np.testing.assert_allclose(np.asarray(logits_4), np.asarray(single.forward(batch["tokens"][:1], **kwargs)[0]),
                               atol=1e-5)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err

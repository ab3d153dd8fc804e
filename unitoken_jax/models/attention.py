"""Causal attention over packed rows (training and prefill), with a backend per platform.

Every backend computes the same thing as `layers.dot_product_attention` with
`layers.segment_causal_mask(segment_ids)`: query t of row b sees keys s <= t of the same segment
(padding, segment 0, is a segment of its own), logits scaled by 1/sqrt(H), softmax in float32.

- `xla` (any platform): queries and keys in blocks; a key block is computed for a query block
  only when, in some row of the batch, a query of that block and a key of that block share a
  segment (the blocks above the diagonal never, those of other packed samples not either). The
  softmax runs online over the computed blocks (float32 running max and sum). Rows of at most 4
  blocks whose batch sees every block pair compute them all without the per-pair conditionals
  (`_by_visibility`).
- `splash` (TPU): Pallas splash attention (causal mask, segment ids), under `shard_map` over the
  mesh's batch and head axes when a mesh is active.
- `cudnn` (GPU): cuDNN flash attention through `jax.nn.dot_product_attention`, the segments given
  as its boolean mask and causality as its mask type (so the kernel skips the upper tiles).
- `auto`: splash on TPU v4 and later, cudnn on Ampere and later GPUs for 16-bit inputs (head sizes
  cuDNN takes), xla elsewhere (TPU v2 / v3, older GPUs, float32 on a GPU, CPU).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from unitoken_jax.models.config import ATTENTION_BACKENDS as BACKENDS
from unitoken_jax.models.layers import attention_dtype, current_device, dot_product_attention, one_device

_BY_PLATFORM = {"tpu": ("splash", "xla"), "gpu": ("cudnn", "xla"), "cuda": ("cudnn", "xla")}
# TPU generations Pallas' TPU compiler (Mosaic) does not target: compiled ahead of time for v2 and
# v3, the splash kernel fails ("Unsupported matmul RHS type"); v4, v5e, v5p and v6e compile it.
# Colab's v2-8 is one of them.
_NO_PALLAS_TPUS = ("TPU v2", "TPU v3")
# cuDNN's fused attention needs an Ampere or later GPU (compute capability 8.0) and 16-bit inputs
_CUDNN_CAPABILITY = 8.0
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _lacks(backend: str, device, dtype, head_dim: int | None = None) -> str | None:
    """Why `backend` cannot run on `device` (an object with `platform` and `device_kind`, or a
    platform name) for `dtype` inputs of `head_dim` features a head; None when it can."""
    kind = getattr(device, "device_kind", "") or ""
    if backend == "splash" and kind.startswith(_NO_PALLAS_TPUS):
        return f"Pallas' TPU kernels need TPU v4 or later, this is {kind}"
    if backend == "cudnn":
        capability = getattr(device, "compute_capability", None)
        if capability is None and getattr(device, "platform", None) in ("gpu", "cuda"):
            # a mesh's abstract device names the kind only: this host's GPU of that kind says more
            local = [d for d in jax.local_devices() if getattr(d, "platform", None) in ("gpu", "cuda")
                     and getattr(d, "device_kind", None) == kind]
            capability = getattr(local[0], "compute_capability", None) if local else None
        if capability is not None and float(capability) < _CUDNN_CAPABILITY:
            return f"cuDNN's fused attention needs compute capability 8.0 (Ampere) or later, {kind} has {capability}"
        if dtype is not None and jnp.dtype(dtype) not in _CUDNN_DTYPES:
            return (f"cuDNN's fused attention takes bfloat16 or float16, the compute dtype is {jnp.dtype(dtype)} "
                    "(set the model's dtype to bfloat16)")
        # (JAX's own check: up to 256 on Hopper and later, 128 before; where the GPU is not known, 128)
        most = 256 if capability is not None and float(capability) >= 9.0 else 128
        if head_dim is not None and (head_dim % 8 or head_dim > most):
            return (f"cuDNN's fused attention takes head sizes that are multiples of 8 up to {most}, "
                    f"this one is {head_dim}")
    return None


def available(device=None, dtype=None, head_dim: int | None = None) -> tuple[str, ...]:
    """The backends that run on `device` (a device, or a platform name; default: `current_device()`)
    for inputs of `dtype` with `head_dim` features a head (None: any), fastest first."""
    device = current_device() if device is None else device
    platform = (device if isinstance(device, str) else device.platform).lower()
    return tuple(b for b in _BY_PLATFORM.get(platform, ("xla",)) if _lacks(b, device, dtype, head_dim) is None)


def resolve(backend: str, device=None, dtype=None, head_dim: int | None = None) -> str:
    """The backend to run: `auto` picks the fastest that runs on `device` (see `available`) for
    `dtype` and `head_dim`; one that does not is an error saying why."""
    if backend not in BACKENDS:
        raise ValueError(f"attention={backend!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    device = current_device() if device is None else device
    have = available(device, dtype, head_dim)
    if backend == "auto":
        return have[0]
    if backend not in have:
        platform = device if isinstance(device, str) else device.platform
        why = _lacks(backend, device, dtype, head_dim) if backend in _BY_PLATFORM.get(platform.lower(), ()) else None
        raise ValueError(f"attention={backend!r} does not run on {platform}" + (f" ({why})" if why else "")
                         + f"; available there: {', '.join(('auto',) + have)}")
    return backend


def model_backend(config, device=None) -> tuple[str, int]:
    """(backend, block) that a model `config` (`UniTokenConfig`) trains and prefills with on `device`
    (default: `current_device()`): `resolve`'s answer for its `attention`, compute dtype and head
    size, and its `attention_block` as that backend takes it (splash: whole multiples of 128).
    Asked before a run builds anything, so a backend the device lacks is refused at once."""
    backend = resolve(config.attention, device, jnp.dtype(config.dtype), config.decoder.head_dim)
    return backend, _splash_block(config.attention_block) if backend == "splash" else config.attention_block


def _splash_block(block: int) -> int:
    """The block the splash kernel runs for `block` positions: whole multiples of the TPU's 128 lanes."""
    return -(-block // 128) * 128


def say_backend(config, device=None) -> str:
    """`model_backend` in words for a log: e.g. "attention: splash (auto on tpu), blocks of 512"."""
    device = current_device() if device is None else device
    backend, block = model_backend(config, device)
    platform = device if isinstance(device, str) else device.platform
    words = f"attention: {backend}" + (f" (auto on {platform})" if config.attention == "auto" else "")
    if backend == "cudnn":
        return words + " (cuDNN's own blocks)"
    rounded = f" (attention_block {config.attention_block}: splash's blocks are whole multiples of 128)" \
        if block != config.attention_block else ""
    return words + f", blocks of {block} positions{rounded}"


_SPLASH_INTERPRETER = [False]


@contextlib.contextmanager
def splash_interpreter():
    """Within this block `splash` runs in Pallas' interpreter on any platform (how the tests
    check the TPU kernel's numbers on a CPU; slow)."""
    _SPLASH_INTERPRETER.append(True)
    try:
        yield
    finally:
        _SPLASH_INTERPRETER.pop()


def causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, segment_ids_BT: jax.Array, *,
                     backend: str = "xla", block: int = 128, interpret: bool = False) -> jax.Array:
    """Causal attention within segments for full rows (no cache): [B, T, N, H] out.
    `block` is the query / key block of the xla and splash backends; `interpret` runs the splash
    kernel in Pallas' interpreter (how it is tested off a TPU)."""
    if block < 1:
        raise ValueError(f"an attention block of {block} positions: it must be at least 1")
    interpret = interpret or (backend == "splash" and _SPLASH_INTERPRETER[-1])
    backend = ("splash" if backend == "splash" and interpret
               else resolve(backend, dtype=q_BTNH.dtype, head_dim=q_BTNH.shape[-1]))
    if backend == "cudnn":
        return _cudnn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    t = q_BTNH.shape[1]
    block = min(block, t)
    if backend == "splash":
        block = _splash_block(block)
    pad = -t % block
    if pad:  # a ragged tail: padded positions form a segment (-1) that no real position sees
        q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTNH, k_BTKH, v_BTKH))
        segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, pad)), constant_values=-1)
    if backend == "splash":
        out = _splash(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block, interpret)
    else:  # float32 on a CPU for 16-bit inputs (`layers.attention_dtype`)
        work = attention_dtype(q_BTNH.dtype)
        out = _xla_blocked(*(x.astype(work) for x in (q_BTNH, k_BTKH, v_BTKH)), segment_ids_BT, block)
        out = out.astype(q_BTNH.dtype)
    return out[:, :t]


def _cudnn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, implementation: str = "cudnn"):
    """cuDNN's fused attention: the segments as a boolean mask (cuDNN adds it as a bias), and
    `is_causal` besides (the mask holds causality already), which lets the kernel skip the tiles
    above the diagonal instead of computing them and masking them out. `implementation="xla"` runs
    the same call through XLA's implementation of the API (how it is tested off a GPU)."""
    t = q_BTNH.shape[1]
    if t % 2:  # cuDNN takes no mask (bias) on an odd length: one padded position, a segment of its own
        q_BTNH, k_BTKH, v_BTKH = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q_BTNH, k_BTKH, v_BTKH))
        segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, 1)), constant_values=-1)
    mask_B1TS = _segment_causal(segment_ids_BT)[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TS, is_causal=True,
                                        implementation=implementation)[:, :t]


def _segment_causal(segment_ids_BT):
    t = segment_ids_BT.shape[1]
    causal_TS = jnp.tril(jnp.ones((t, t), jnp.bool_))
    return causal_TS[None] & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])


# --- xla: online softmax over the visible blocks -------------------------------------------------

def visible_blocks(segment_ids_BT: jax.Array, block: int) -> jax.Array:
    """bool [nq, nk]: does any query of block i share a segment with any key of block j in some
    row (j <= i; the diagonal always)? Exact for any segment order; costs B*T*T comparisons of
    ids, no heads, no floats."""
    b, t = segment_ids_BT.shape
    n = t // block
    seg = segment_ids_BT.reshape(b, n, block)
    share_BijTS = seg[:, :, None, :, None] == seg[:, None, :, None, :]
    vis = jnp.any(share_BijTS, axis=(0, 3, 4))
    return vis & jnp.tril(jnp.ones((n, n), jnp.bool_))


def _xla_blocked(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block):
    b, t, n, h = q_BTNH.shape
    k = k_BTKH.shape[2]
    if t <= block:
        return _xla_dense(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    q_BKGTH = (q_BTNH * (h ** -0.5)).reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    out_BKGTH = _flash(q_BKGTH, k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3), segment_ids_BT, block)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


_LOW = float(jnp.finfo(jnp.float32).min)


def _block_mask(seg_BNC, i, j, block):
    """bool [B, block, block]: query block i may see key block j (same segment; causal on the diagonal)."""
    mask_BTS = seg_BNC[:, i, :, None] == seg_BNC[:, j, None, :]
    return mask_BTS & jnp.tril(jnp.ones((block, block), jnp.bool_)) if i == j else mask_BTS


def _scores(q_BKGTH, k_BKSH, mask_BTS):
    s = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH, preferred_element_type=jnp.float32)
    return jnp.where(mask_BTS[:, None, None], s, _LOW)


def _key_block(x_BKSH, j, block):
    return x_BKSH[:, :, j * block:(j + 1) * block]


def _every_pair_visible(vis):
    """Whether `visible_blocks` marks every block pair on and below the diagonal."""
    return jnp.all(vis == jnp.tril(jnp.ones(vis.shape, jnp.bool_)))


# Rows of at most this many blocks compute every block pair without conditionals when the batch
# sees them all (see `_by_visibility`).
_MAX_BLOCKS_UNCONDITIONAL = 4


def _by_visibility(blocks_fn, vis, *operands):
    """`blocks_fn(*operands, vis, skip)`: with `skip`, each block pair below the diagonal is
    computed behind a conditional on `vis`; without, every pair is computed.

    A conditional is a barrier that XLA can neither fuse across nor run beside other work. Short
    rows of long samples see every pair in most batches (8 rows of 512 positions, 4 blocks, of
    140-512 token samples: 11 batches in 12), where the conditionals only cost: there, one
    conditional on the whole batch picks the unconditional version (the training step of
    `benchmarks/train_step.py`, run A/B on a 2-core CPU: 0.90x the time). Longer rows always skip:
    they rarely see every pair, and without the conditionals' order XLA keeps more pairs' scores
    live at once (a backward's temporaries 1.6x the T x T scores at 8 blocks, against 0.4x)."""
    if vis.shape[0] > _MAX_BLOCKS_UNCONDITIONAL:
        return blocks_fn(*operands, vis, skip=True)
    return jax.lax.cond(_every_pair_visible(vis), functools.partial(blocks_fn, skip=False),
                        functools.partial(blocks_fn, skip=True), *operands, vis)


def _unchanged(carry, *_):
    return carry


def _flash_forward(q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, block):
    """(out [B, K, G, T, H], log-sum-exp [B, K, G, T] float32, the visible blocks): an online
    softmax over the key blocks that `visible_blocks` marks, one query block at a time (`q` already
    scaled; at least two blocks, `_xla_blocked` takes one block dense)."""
    vis = visible_blocks(segment_ids_BT, block)
    blocks_fn = functools.partial(_forward_blocks, block=block)
    return *_by_visibility(blocks_fn, vis, q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT), vis


def _forward_blocks(q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, vis, *, block, skip):
    b, kh, g, t, h = q_BKGTH.shape
    nb = t // block
    seg = segment_ids_BT.reshape(b, nb, block)
    outs, lses = [], []
    for i in range(nb):
        q_i = q_BKGTH[:, :, :, i * block:(i + 1) * block]

        def step(carry, k_j, v_j, mask_BTS, q_i=q_i):
            m, total, acc = carry
            s = _scores(q_i, k_j, mask_BTS)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            acc = acc * correction[..., None] + jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v_j.dtype), v_j,
                                                           preferred_element_type=jnp.float32)
            return m_new, total * correction + p.sum(-1), acc

        carry = (jnp.full((b, kh, g, block), _LOW, jnp.float32), jnp.zeros((b, kh, g, block), jnp.float32),
                 jnp.zeros((b, kh, g, block, h), jnp.float32))
        for j in range(i + 1):  # the diagonal block always (each query sees itself), the others if visible
            operands = (carry, _key_block(k_BKSH, j, block), _key_block(v_BKSH, j, block),
                        _block_mask(seg, i, j, block))
            if skip and j < i:
                carry = jax.lax.cond(vis[i, j], step, _unchanged, *operands)
            else:
                carry = step(*operands)
        m, total, acc = carry
        outs.append((acc / total[..., None]).astype(v_BKSH.dtype))
        lses.append(m + jnp.log(total))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, block):
    return _flash_forward(q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, block)[0]


def _flash_fwd(q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, block):
    out, lse, vis = _flash_forward(q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, block)
    return out, (q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, out, lse, vis)


def _flash_bwd(block, residuals, d_out_BKGTH):
    """The backward pass block by block, each visible block's probabilities recomputed from the
    saved log-sum-exp: nothing of size T x T is kept from the forward pass."""
    q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, out, lse, vis = residuals  # vis: the forward's, not recomputed
    blocks_fn = functools.partial(_backward_blocks, block=block)
    dq, dk, dv = _by_visibility(blocks_fn, vis, q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, out, lse, d_out_BKGTH)
    return dq, dk, dv, None


def _backward_blocks(q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT, out, lse, d_out_BKGTH, vis, *, block, skip):
    b, kh, g, t, h = q_BKGTH.shape
    nb = t // block
    seg = segment_ids_BT.reshape(b, nb, block)
    d_out = d_out_BKGTH.astype(jnp.float32)
    delta_BKGT = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)
    rows = lambda x, i: x[:, :, :, i * block:(i + 1) * block]  # noqa: E731
    dk = [jnp.zeros((b, kh, block, h), jnp.float32) for _ in range(nb)]
    dv = [jnp.zeros((b, kh, block, h), jnp.float32) for _ in range(nb)]
    dq = []
    for i in range(nb):
        q_i, do_i, lse_i, delta_i = rows(q_BKGTH, i), rows(d_out, i), rows(lse, i), rows(delta_BKGT, i)

        def grads(acc, k_j, v_j, mask_BTS, q_i=q_i, do_i=do_i, lse_i=lse_i, delta_i=delta_i):
            dq_i, dk_j, dv_j = acc
            p = jnp.exp(_scores(q_i, k_j, mask_BTS) - lse_i[..., None])
            dv_j = dv_j + jnp.einsum("BKGTS,BKGTH->BKSH", p, do_i)
            dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None])
            dq_i = dq_i + jnp.einsum("BKGTS,BKSH->BKGTH", ds, k_j, preferred_element_type=jnp.float32)
            dk_j = dk_j + jnp.einsum("BKGTS,BKGTH->BKSH", ds, q_i, preferred_element_type=jnp.float32)
            return dq_i, dk_j, dv_j

        dq_i = jnp.zeros((b, kh, g, block, h), jnp.float32)
        for j in range(i + 1):
            operands = ((dq_i, dk[j], dv[j]), _key_block(k_BKSH, j, block), _key_block(v_BKSH, j, block),
                        _block_mask(seg, i, j, block))
            if skip and j < i:
                dq_i, dk[j], dv[j] = jax.lax.cond(vis[i, j], grads, _unchanged, *operands)
            else:
                dq_i, dk[j], dv[j] = grads(*operands)
        dq.append(dq_i)
    join = lambda parts, like, axis: jnp.concatenate(parts, axis=axis).astype(like.dtype)  # noqa: E731
    return join(dq, q_BKGTH, 3), join(dk, k_BKSH, 2), join(dv, v_BKSH, 2)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _xla_dense(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT):
    return dot_product_attention(q_BTNH, k_BTKH, v_BTKH, _segment_causal(segment_ids_BT))


# --- splash (TPU Pallas) -----------------------------------------------------------------------

def _splash(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block, interpret):
    if one_device():
        return _splash_local(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block, interpret)
    from jax.sharding import PartitionSpec as P

    from unitoken_jax.sharding import dividing, logical_to_mesh_spec

    mesh = jax.sharding.get_abstract_mesh()
    # as the activations' constraints split them: over the longest run of their mesh axes that
    # divides the dim (a batch of 2 on data x fsdp = 4 goes over data alone, not unsplit)
    batch_axes = dividing(logical_to_mesh_spec(("act_batch",))[0], q_BTNH.shape[0], mesh)
    head_axes = logical_to_mesh_spec(("act_heads",))[0]
    head_axes = dividing(dividing(head_axes, q_BTNH.shape[2], mesh), k_BTKH.shape[2], mesh)
    qkv = P(batch_axes, None, head_axes, None)
    kv = qkv
    seg = P(batch_axes, None)
    fn = functools.partial(_splash_local, block=block, interpret=interpret)
    return jax.shard_map(fn, in_specs=(qkv, kv, kv, seg), out_specs=qkv, check_vma=False)(
        q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


def _splash_local(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, block, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q_BTNH.shape
    k = k_BTKH.shape[2]
    g = n // k
    blk = block
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(g)])
    kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    q_BKGTH = (q_BTNH * (h ** -0.5)).reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)
    k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)

    out_BKGTH = _splash_rows(q_BKGTH, k_BKTH, v_BKTH, segment_ids_BT.astype(jnp.int32), kernel)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_BTNH.dtype)


def _splash_rows_at_any_precision(q_BKGTH, k_BKTH, v_BKTH, segment_ids_BT, kernel):
    """The splash `kernel` (a pytree: its mask tables are arrays) on every row and KV head."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    def one_row(q_KGTH, k_KTH, v_KTH, seg_T):
        ids = sk.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda q, kk, vv: kernel(q, kk, vv, segment_ids=ids))(q_KGTH, k_KTH, v_KTH)

    return jax.vmap(one_row)(q_BKGTH, k_BKTH, v_BKTH, segment_ids_BT)


# Every dot of the kernels, forward and backward, at the inputs' own precision: Mosaic refuses a
# float32 contraction of bfloat16 operands, which a global jax_default_matmul_precision="highest"
# asks for. A context around the call alone reaches the forward kernel only: the backward's kernels
# are traced later, when the gradient is taken. (The kernel is an argument, not a closure: its mask
# tables may be tracers of an enclosing scan, which the backward, traced later, must not capture.)
@jax.custom_vjp
def _splash_rows(q, k, v, segment_ids, kernel):
    with jax.default_matmul_precision("default"):
        return _splash_rows_at_any_precision(q, k, v, segment_ids, kernel)


def _splash_rows_forward(q, k, v, segment_ids, kernel):
    with jax.default_matmul_precision("default"):
        out, vjp = jax.vjp(lambda q, k, v: _splash_rows_at_any_precision(q, k, v, segment_ids, kernel), q, k, v)
    return out, vjp


def _splash_rows_backward(vjp, g):
    with jax.default_matmul_precision("default"):
        return (*vjp(g), None, None)


_splash_rows.defvjp(_splash_rows_forward, _splash_rows_backward)

"""Meshes and the one table that maps logical axis names to mesh axes.

Every parameter and every activation constraint in the models names its dimensions with the
logical names below. `LOGICAL_RULES` is the single place that says where each one goes on a
`('data', 'fsdp', 'tensor')` mesh; a name that is not in the table is an error, never a silent
replication.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None for replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qk_norm_groups", None),
    ("norm", None),
    ("layers", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("positions", None),
    ("lora_rank", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_cache_length", None),
)

_KNOWN = frozenset(name for name, _ in LOGICAL_RULES)


def check_names(names: Iterable[str | None]) -> None:
    """Raises if any logical axis name is missing from `LOGICAL_RULES`."""
    unknown = sorted({n for n in names if n is not None and n not in _KNOWN})
    if unknown:
        raise ValueError(f"logical axis name(s) {unknown} have no rule in unitoken_jax.sharding.LOGICAL_RULES")


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`nn.with_logical_constraint` that refuses names missing from the rules table. A dimension
    that its mesh axes do not divide (one picture or one prompt on a mesh whose data x fsdp is 4)
    is split over the longest run of those axes that divides it, or not at all: asked to split it
    anyway, XLA pads it and then rebuilds whole operands ("[SPMD] Involuntary full
    rematerialization", a warning per op on a fresh compile)."""
    check_names(names)
    if x.ndim != len(names):
        raise ValueError(f"constraint names {tuple(names)} do not fit an array of shape {x.shape}")
    rules, mesh = nn.get_logical_axis_rules(), jax.sharding.get_abstract_mesh()
    if rules and not mesh.empty:
        spec = tuple(nn.logical_to_mesh_axes(tuple(names), rules))
        fitted = tuple(dividing(axes, size, mesh) for axes, size in zip(spec, x.shape))
        if fitted != spec:
            return jax.lax.with_sharding_constraint(x, PartitionSpec(*fitted))
    return nn.with_logical_constraint(x, tuple(names))


def dividing(axes, size: int, mesh):
    """The longest leading run of `axes` (a `PartitionSpec` entry) whose devices divide `size`
    evenly: `axes` itself where they do, None where not even the first does."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for end in range(len(names), 0, -1):
        if size % mesh_ways(names[:end], mesh) == 0:
            return axes if end == len(names) else names[0] if end == 1 else names[:end]
    return None


def parse_mesh_shape(text: str, n_devices: int, flag: str = "--mesh", devices_said: str | None = None,
                     words: Sequence[str] = ()) -> tuple[int, int, int]:
    """A `DATA,FSDP,TENSOR` flag over `n_devices` devices, one axis possibly -1 (the rest of
    them, resolved here); a ValueError naming the flag and its form otherwise (`devices_said`:
    the devices in words, for the message; `words`: the flag's other forms, named there too)."""
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3 or any(v == 0 or v < -1 for v in shape) or shape.count(-1) > 1:
        other = f", or {' or '.join(words)}" if words else ""
        raise ValueError(f"{flag} {text!r}: give DATA,FSDP,TENSOR, whole numbers of devices (one may be -1 for the "
                         f"rest), e.g. 1,4,2{other}")
    known = int(np.prod([v for v in shape if v != -1]))
    said = devices_said or f"{n_devices} device(s)"
    if known > n_devices:
        raise ValueError(f"{flag} {text} needs {known} devices; there are {said}")
    if -1 in shape and n_devices % known:
        raise ValueError(f"{flag} {text}: the other axes' {known} devices do not divide {said}, so -1 has no "
                         "whole size")
    if -1 in shape:
        shape[shape.index(-1)] = n_devices // known
    return tuple(shape)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh; one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    bad = [f"{name}={size!r}" for name, size in zip(MESH_AXES, shape)
           if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1)]
    if bad:
        raise ValueError(f"mesh {', '.join(bad)}: each axis is a whole number of devices, at least 1, or -1 for "
                         "the rest of them")
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split as data={data} fsdp={fsdp} tensor={tensor}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        needs = int(np.prod(shape))
        hint = f" (devices=jax.devices()[:{needs}] uses {needs} of them)" if needs < len(devices) else ""
        raise ValueError(f"mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]} needs {needs} devices, "
                         f"{len(devices)} are available{hint}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh):
    """Maps a pytree of logical `PartitionSpec`s to `NamedSharding`s on `mesh`."""
    leaves = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for spec in leaves:
        for entry in spec:
            check_names(entry if isinstance(entry, tuple) else (entry,))
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def mesh_context(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """`jax.set_mesh(mesh)` with the logical rules active (nothing for `mesh=None`): what every
    jitted entry point runs under, so that logical constraints resolve on that mesh."""
    if mesh is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    return stack


def logical_to_mesh_spec(names: Sequence[str | None]) -> PartitionSpec:
    """The mesh `PartitionSpec` of logical axis names (e.g. for `shard_map`'s in/out specs)."""
    check_names(names)
    return nn.logical_to_mesh_axes(tuple(names), LOGICAL_RULES)


def mesh_ways(axes, mesh) -> int:
    """Into how many parts `axes` (one entry of a `PartitionSpec`: a mesh axis name, a tuple of
    them or None) split a dimension on `mesh` (an abstract mesh will do)."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in names if a in mesh.shape] or [1]))

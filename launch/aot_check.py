"""Compile a stage's real train step for a TPU slice, from a CPU machine, and report its per-chip
memory and FLOPs (needs `pip install -e '.[tpu]'`; nothing runs on a TPU).

    python launch/aot_check.py --topology v5p:4x4x4 --mesh 1,64,1                  # stage 2, 7B
    python launch/aot_check.py --config stage1.py --topology v5e:16x16 --mesh 2,128,1 --batch 256

Or the inference side, the prefill and the decode loop of `DecodeLoop.generate` (its `lower`) for
a model preset drawing pictures with CFG:

    python launch/aot_check.py decode --topology v5e:1x1 --images 1               # 7B, bfloat16

The step is the training loop's own (`unitoken_jax.train.program.build_program`, from the stage
config: its optimizer, dropout, trainable parameters and batch spec); only the fields given here
(`--batch`, `--seq`, `--images`, `--remat`, `--set KEY=VALUE`) override the config. XLA's cost
analysis counts a scanned layer once, so the FLOPs printed are the program's analytic count.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# only a topology is read here, no TPU is opened: let this run beside another process using libtpu
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from unitoken_jax import configs, sharding  # noqa: E402
from unitoken_jax.inference.decode import DecodeLoop, Request  # noqa: E402
from unitoken_jax.models import attention as attention_lib  # noqa: E402
from unitoken_jax.models.config import QUANTIZE_MODES, UniTokenConfig  # noqa: E402
from unitoken_jax.models.unitoken import abstract_params, param_shardings  # noqa: E402
from unitoken_jax.tokenizer import layout  # noqa: E402
from unitoken_jax.sweep import apply_overrides  # noqa: E402
from unitoken_jax.train.config import TrainConfig  # noqa: E402
from unitoken_jax.train.program import TrainProgram, build_program  # noqa: E402


TOPOLOGY = re.compile(r"v\d[a-z]*:\d+(x\d+){1,2}")


def check_topology(topology: str) -> None:
    """A TPU topology name as libtpu takes it ('v5e:2x2', 'v5p:4x4x4'), or a ValueError saying so."""
    if not TOPOLOGY.fullmatch(topology):
        raise ValueError(f"--topology {topology!r}: give the TPU generation and its chips' grid, e.g. v5e:1x1, "
                         "v5e:2x2 (a v5e-4), v5p:4x4x4 (64 chips), v4:2x2x1, v2:2x2 (a v2-8)")


def topology_devices(topology: str) -> np.ndarray:
    """The devices of a TPU topology (no TPU needed); a one-chip one ('v5e:1x1') as one host's. A
    device is a chip, except on v2, v3 and v4, whose chips' two TensorCores are a device each."""
    check_topology(topology)
    one_chip = all(int(n) == 1 for n in topology.split(":")[1].split("x"))
    kwargs = {"chips_per_host_bounds": (1, 1, 1)} if one_chip else {}
    try:
        return np.array(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
    except jax.errors.JaxRuntimeError as e:  # a generation or grid libtpu does not know ('v9:2x2', 'v5e:3x3')
        said = (str(e).strip().splitlines() or [""])[0].removeprefix("INVALID_ARGUMENT: ")
        raise ValueError(f"--topology {topology!r}: libtpu has no such slice ({said}); e.g. v5e:1x1, v5e:2x2, "
                         "v6e:2x2, v5p:4x4x4, v4:2x2x1, v2:2x2") from None


# HBM a program may use on one device (a chip; a TensorCore on v2, v3 and v4, whose topologies
# give each core as a device): the limit XLA's out-of-memory refusals state for each generation
# (the nominal 8, 16 and 95 GiB of v2, v3 and v5p had overstated v2's and v3's, understated v5p's)
USABLE_HBM_GIB = {"v2": 7.48, "v3": 15.48, "v4": 15.25, "v5 lite": 15.75, "v5e": 15.75, "v5p": 95.74, "v5": 95.74,
                  "v6 lite": 31.25, "v6e": 31.25}


def devices_in_words(topology: str, devices) -> str:
    """'4 chips' or, where each chip is two devices, '8 devices (4 chips x 2 TensorCores)'."""
    n, chips = np.size(devices), math.prod(int(x) for x in topology.split(":")[1].split("x"))
    if chips and n > chips and n % chips == 0:
        return f"{n} devices ({chips} chips x {n // chips} TensorCores)"
    return f"{n} chip{'s' if n != 1 else ''}"


def hbm_bytes(device) -> int:
    """Usable HBM of one device of a topology, by its kind ('TPU v5 lite' -> 15.75 GiB)."""
    kind = device.device_kind.lower().replace("tpu", "").strip()
    for name in sorted(USABLE_HBM_GIB, key=len, reverse=True):
        if kind.startswith(name):
            return int(USABLE_HBM_GIB[name] * 2**30)
    raise ValueError(f"no HBM size known for {device.device_kind!r}; add it to USABLE_HBM_GIB")


def topology_mesh(topology: str, mesh_shape, some: bool = False) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over the chips of a TPU topology (no TPU needed); with
    `some`, over the first of them when it takes fewer (the others idle, as the CLI leaves them)."""
    devices = topology_devices(topology)
    if some and int(np.prod(mesh_shape)) < devices.size:
        devices = devices.flat[:int(np.prod(mesh_shape))]
    if int(np.prod(mesh_shape)) != devices.size:
        raise ValueError(f"mesh {tuple(mesh_shape)} needs {int(np.prod(mesh_shape))} devices, {topology} has "
                         f"{devices_in_words(topology, devices)}")
    return Mesh(devices.reshape(mesh_shape), sharding.MESH_AXES)


def stage_config(spec: str = "stage2.py", *, batch: int | None = None, seq: int | None = None,
                 images: int | None = None, remat: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """The typed config of a stage spec with the check's overrides (None: the config's own)."""
    changes = dict(overrides or {})
    for key, value, flag in (("data.rows", batch, "--batch"), ("data.length", seq, "--seq"),
                             ("model.remat_policy", remat, "--remat"), ("data.max_images", images, "--images")):
        if value is not None:
            if key in changes and changes[key] != value:  # (one of the two would be silently dropped)
                raise ValueError(f"{flag} {value} and --set {key}={changes[key]} disagree; give one of them")
            changes[key] = value
    if batch is not None and "data.max_images" not in changes:
        changes["data.max_images"] = batch  # one image a sample, unless said otherwise
    return TrainConfig.from_config_dict(apply_overrides(configs.get_config(spec), changes))


def compile_program(config: TrainConfig, mesh: Mesh) -> tuple[TrainProgram, object, float]:
    program = build_program(config, mesh)
    start = time.time()
    compiled = program.compile()
    return program, compiled, time.time() - start


def decode_lowered(model: str, mesh: Mesh, images: int, size: int = 512, cfg: float = 3.0,
                   dtype: str = "bfloat16", prompt_length: int = 64, quantize: str = "none"):
    """The prefill and decode loop for `images` pictures of size x size (with CFG: two rows each),
    the model's parameters in `dtype` (`quantize="int8"`: its matmul kernels in int8), placed on
    `mesh` by the logical rules; nothing allocated."""
    config = UniTokenConfig.from_dict(configs.get_config(f"model.py:{model}").model).replace(
        dtype=dtype, param_dtype=dtype, remat_policy="none", quantize=quantize)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params(config),
                          param_shardings(config, mesh))
    loop = DecodeLoop(config, params, mesh)
    grid_hw = (size // layout.PIXELS_PER_GRID, size // layout.PIXELS_PER_GRID)
    prompt = np.full(prompt_length, 9000, np.int32)
    prompt[-1] = layout.IMAGE_START
    requests = [Request(prompt, max_new_tokens=layout.generated_image_length(grid_hw) - 1, grid_hw=grid_hw,
                        cfg_scale=cfg, image_top_k=2000, stop_after_image=True, seed=i) for i in range(images)]
    return config, loop.lower(requests)


def decode_mesh_shape(model: str, topology: str) -> tuple[int, int, int]:
    """(data, fsdp, tensor) as `inference.fit.choose_mesh` splits a model preset over a topology's
    chips: what the CLI and the notebook take on such a host."""
    from unitoken_jax.inference.fit import choose_mesh

    config = UniTokenConfig.from_dict(configs.get_config(f"model.py:{model}").model)
    chosen = choose_mesh(config, list(topology_devices(topology).flat))
    return (1, 1, 1) if chosen is None else tuple(chosen.shape[a] for a in sharding.MESH_AXES)


def decode_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="aot_check.py decode", description="compile the prefill and decode loop",
                                     allow_abbrev=False)
    parser.add_argument("--topology", default="v5e:1x1", help="the TPU slice (default: v5e:1x1, one v5e chip)")
    parser.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: choose_mesh's, as the CLI and the "
                                                       "notebook split a model: tensor-parallel as far as the heads "
                                                       "divide)")
    parser.add_argument("--model", default="7b", help="a model preset (configs/model.py): 7b, 7b_anyres, tiny "
                                                      "(default: 7b)")
    parser.add_argument("--images", type=int, default=1, help="pictures drawn at once, with CFG (default: 1)")
    parser.add_argument("--size", type=int, default=512, help="their side in pixels (default: 512)")
    parser.add_argument("--dtype", default="bfloat16", help="what the model computes in (default: bfloat16)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                        help="weight format (int8: weight-only; default: none)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images {args.images}: at least 1")
    if args.size < layout.PIXELS_PER_GRID or args.size % layout.PIXELS_PER_GRID:
        parser.error(f"--size {args.size}: pictures are drawn in whole grid units of {layout.PIXELS_PER_GRID} "
                     "pixels (e.g. 512)")
    try:
        devices = topology_devices(args.topology)
        shape = (sharding.parse_mesh_shape(args.mesh, devices.size) if args.mesh
                 else decode_mesh_shape(args.model, args.topology))
        # choose_mesh may leave chips idle (the weights split evenly over 8 of a v5p-24's 12)
        mesh = topology_mesh(args.topology, shape, some=not args.mesh)
    except ValueError as e:
        parser.error(str(e))
    start = time.time()
    try:
        config, (prefill, loop) = decode_lowered(args.model, mesh, args.images, args.size, dtype=args.dtype,
                                                 quantize=args.quantize)
    except ValueError as e:  # e.g. a picture larger than the model's positions hold
        parser.error(f"{args.model}, {args.images} x {args.size}px: {e}")
    weights = f"{args.dtype}" + (f", {args.quantize} weights" if args.quantize != "none" else "")
    hbm = hbm_bytes(devices.flat[0])
    idle = f" ({devices.size - mesh.size} idle)" if mesh.size < devices.size else ""
    # the SigLIP tower and adapter stay on the devices beside what these programs hold (a loaded
    # model's; split over the mesh as evenly as their shapes allow: an estimate)
    resident = resident_vision_bytes(config) / mesh.size
    print(f"{args.topology}: {devices_in_words(args.topology, devices)}{idle} ({hbm / 2**30:.2f} GiB usable each), "
          f"mesh {shape}; {args.model} in {weights}, {args.images} x {args.size}px with CFG ({2 * args.images} rows); "
          f"the SigLIP tower and adapter, resident beside the programs: ~{resident / 2**30:.2f} GiB a device")
    failed = False
    for name, lowered in (("prefill", prefill), ("decode loop", loop)):
        try:
            mem = lowered.compile().memory_analysis()
        except jax.errors.JaxRuntimeError as e:  # XLA's out-of-memory refusal names the size it needed
            print(f"{name}: does not compile: {str(e).splitlines()[0][:300]}")
            failed = True
            continue
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
            mem.temp_size_in_bytes
        fits = total + resident <= hbm
        failed |= not fits
        print(f"{name}: {total / 2**30:.2f} GiB a device, {(total + resident) / 2**30:.2f} with the tower, "
              f"{'fits' if fits else 'does NOT fit'} "
              f"(arguments {mem.argument_size_in_bytes / 2**30:.2f}, "
              f"temporaries {mem.temp_size_in_bytes / 2**30:.2f}, outputs {mem.output_size_in_bytes / 2**30:.2f}, "
              f"aliased {mem.alias_size_in_bytes / 2**30:.2f})")
    print(f"compiled in {time.time() - start:.0f} s")
    return 1 if failed else 0


def resident_vision_bytes(config) -> int:
    """Bytes of the model's parameters outside the decoder (the SigLIP tower and the adapter), in
    the config's parameter dtype and weight format: on the devices while the decoder's programs run."""
    from unitoken_jax.models.unitoken import abstract_params

    params = abstract_params(config)
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for part, tree in params.items() if part != "decoder" for a in jax.tree.leaves(tree))


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def fit_line(compiled, mesh: Mesh) -> str:
    """'fits: X of Y GiB a chip (Z%)': a compiled step's memory a chip against the chip's HBM."""
    mem = compiled.memory_analysis()
    per_chip = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    hbm = hbm_bytes(mesh.devices.flat[0])
    return f"{'fits' if per_chip <= hbm else 'does NOT fit'}: {per_chip / 2**30:.2f} of {hbm / 2**30:.2f} GiB a " \
        f"device ({per_chip / hbm:.0%})"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["decode"]:
        return decode_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", default="stage2.py", help="a stage config spec (default: the packaged stage 2, "
                                                              "7B); e.g. stage1.py, stage2.py:anyres")
    parser.add_argument("--topology", default="v5p:4x4x4", help="the TPU slice (default: v5p:4x4x4)")
    parser.add_argument("--mesh", default="1,64,1", help="data,fsdp,tensor (default: 1,64,1)")
    parser.add_argument("--batch", type=int, default=None, help="global rows (default: the config's data.rows)")
    parser.add_argument("--seq", type=int, default=None, help="row length (default: the config's data.length)")
    parser.add_argument("--images", type=int, default=None, help="SigLIP tiles a batch (default: one a row)")
    parser.add_argument("--remat", default=None, choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config field, as --config.KEY=VALUE for training (repeatable)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, eq, text = item.partition("=")
        if not eq:
            parser.error(f"--set {item!r}: use KEY=VALUE")
        overrides[key] = _value(text)
    try:
        config = stage_config(args.config, batch=args.batch, seq=args.seq, images=args.images, remat=args.remat,
                              overrides=overrides)
        devices = topology_devices(args.topology)
        shape = sharding.parse_mesh_shape(args.mesh, devices.size)
        mesh = topology_mesh(args.topology, shape)
        # a backend the chips lack, said as a usage error (it was a traceback from inside the trace)
        attention_words = attention_lib.say_backend(config.model, devices.flat[0])
    except (ValueError, FileNotFoundError) as e:  # (a config key, value or file; the slice; the attention)
        parser.error(str(e))
    try:
        program, compiled, seconds = compile_program(config, mesh)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # (a traceback, for the check's most common answer)
        print(f"{args.topology}, mesh {shape}, {args.config}: does NOT fit: {str(e).splitlines()[0][:300]}")
        return 1
    mem = compiled.memory_analysis()
    per_chip = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + \
        mem.temp_size_in_bytes
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(program.abstract_params))
    flops = program.model_flops_per_step()
    d = config.data
    print(f"{args.topology}: {devices_in_words(args.topology, devices)}, mesh data,fsdp,tensor = {shape}; "
          f"{args.config}: batch "
          f"{d.rows} x {d.length}, {d.max_images} images, remat {config.model.remat_policy}, dropout "
          f"{config.model.decoder.dropout}, trainable {config.optimizer.trainable}; {attention_words}; compiled in "
          f"{seconds:.0f} s")
    print(f"parameters: {n_params / 1e9:.3f} B")
    print(f"per-chip memory: {per_chip / 2**30:.2f} GiB (arguments {mem.argument_size_in_bytes / 2**30:.2f}, "
          f"temporaries {mem.temp_size_in_bytes / 2**30:.2f}, outputs {mem.output_size_in_bytes / 2**30:.2f}, "
          f"aliased {mem.alias_size_in_bytes / 2**30:.2f})")
    print(f"model FLOPs per step: {flops:.3e} ({flops / mesh.size:.3e} per chip)")
    print(fit_line(compiled, mesh))
    return 0 if per_chip <= hbm_bytes(mesh.devices.flat[0]) else 1


if __name__ == "__main__":
    sys.exit(main())

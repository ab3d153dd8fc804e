"""Which TPU slices the released 7B decodes on: the prefill and the decode loop of
`DecodeLoop.generate`, compiled ahead of time for each slice from this CPU machine (libtpu's
topologies; nothing runs on a TPU), in bfloat16 and int8 weights, for 1 / 4 / 8 images of
512 x 512 with CFG. Writes benchmarks/results/decode_fit.md.

    python benchmarks/decode_fit.py            # every slice below, ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch"))

import re  # noqa: E402

import aot_check  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from unitoken_jax import configs  # noqa: E402
from unitoken_jax.inference.fit import decode_memory  # noqa: E402
from unitoken_jax.models.config import UniTokenConfig  # noqa: E402
from report import counts, out_path, write_report  # noqa: E402

# (label, topology): the Colab runtimes, then the serving slices a lab would use; the mesh is
# `aot_check.decode_mesh_shape`'s (`choose_mesh`), what the CLI and the notebook take
# (tensor-parallel over a host's chips)
SLICES = [
    ("v5e-1, Colab", "v5e:1x1"),
    ("v6e-1, Colab", "v6e:1x1"),
    ("v2-8, Colab (8 cores)", "v2:2x2"),
    ("v5e-4", "v5e:2x2"),
    ("v5e-8", "v5e:2x4"),
    ("v6e-4", "v6e:2x2"),
]


def measure(topology: str, mesh_shape, images: int, quantize: str) -> dict:
    mesh = aot_check.topology_mesh(topology, mesh_shape)
    _, (prefill, loop) = aot_check.decode_lowered("7b", mesh, images, 512, quantize=quantize)
    out = {}
    for name, lowered in (("prefill", prefill), ("loop", loop)):
        try:
            mem = lowered.compile().memory_analysis()
        except Exception as e:  # XLA's out-of-memory refusal names the size it needed
            out[name] = {"error": str(e).splitlines()[0]}
            continue
        out[name] = {"total": mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                     + mem.temp_size_in_bytes, "temp": mem.temp_size_in_bytes,
                     "args": mem.argument_size_in_bytes}
    return out


def cell(result: dict, hbm: int) -> str:
    if "error" in result:
        needed = re.search(r"\(([\d.]+)G\) exceeds", result["error"])
        return "**does not fit**" + (f" (needs {needed.group(1)})" if needed else "")
    gib = result["total"] / 2**30
    return f"{gib:.2f}" + ("" if result["total"] <= hbm else " **over**")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="default: benchmarks/results/decode_fit.md (other --images: its "
                                                    "trial/ folder)")
    parser.add_argument("--images", type=counts(1), default=[1, 4, 8])
    args = parser.parse_args()
    args.out = out_path(parser, args, "decode_fit.md", shape=("images",))
    images = args.images
    rows, one_chip = [], []
    config = UniTokenConfig.from_dict(configs.get_config("model.py:7b").model)
    start = time.time()
    for label, topology in SLICES:
        shape = aot_check.decode_mesh_shape("7b", topology)
        hbm = aot_check.hbm_bytes(aot_check.topology_devices(topology).flat[0])
        for quantize in ("none", "int8"):
            cells = []
            for n in images:
                r = measure(topology, shape, n, quantize)
                cells.append(f"{cell(r['prefill'], hbm)} / {cell(r['loop'], hbm)}")
                if "temp" in r["loop"] and int(np.prod(shape)) == 1:
                    cache = decode_memory(config, n).cache
                    one_chip.append(f"| {label} | {'bfloat16' if quantize == 'none' else 'int8'} | {n} | "
                                    f"{r['loop']['args'] / 2**30:.2f} | {cache / 2**30:.2f} | "
                                    f"{r['loop']['temp'] / 2**30:.3f} | {r['loop']['temp'] / cache:.3f} |")
                print(label, quantize, n, r, flush=True)
            fmt = "bfloat16" if quantize == "none" else "int8"
            rows.append(f"| {label} (`{topology}`, {hbm / 2**30:.2f} GiB; mesh {shape}) | {fmt} | "
                        + " | ".join(cells) + " |")
    lines = [
        "# The released 7B decoding 512 x 512 images with CFG: memory a chip, from AOT compiles", "",
        f"{datetime.date.today()}, compiled on this CPU machine for each TPU topology (jax {jax.__version__}, libtpu "
        f"topologies; `python benchmarks/decode_fit.py`, in {time.time() - start:.0f} s). Each cell: prefill / "
        "decode loop, GiB a chip (arguments + outputs - aliased + temporaries); the model split over every chip "
        "of the slice as `unitoken_jax.inference.fit.choose_mesh` splits it (mesh data, fsdp, tensor: "
        "tensor-parallel as far as the heads divide), activations and KV cache in bfloat16. 'does not fit' is XLA "
        "refusing the "
        "program for the chip's HBM.", "",
        "| slice (HBM a chip) | weights | " + " | ".join(f"{n} image{'s' if n > 1 else ''}" for n in images) + " |",
        "|---|---|" + "---|" * len(images), *rows, "",
        "On one chip, the decode loop's arguments (weights read, the cache and the rows' state, GiB), the KV "
        "cache (GiB) and the loop's temporaries (GiB) beside it: the cache is updated in place.", "",
        "| chip | weights | images | arguments | KV cache | temporaries | temporaries / cache |",
        "|---|---|---|---|---|---|---|", *one_chip, "",
        "On several chips the loop's temporaries are mostly a relaid copy of each chip's share of the MLP's gate and "
        "up kernels: 11,008 columns split 4 or 8 ways is not a whole number of the TPU's 128-lane tiles (a 7B "
        "variant with 11,264 columns, v5e-4, bfloat16, 1 image: 0.13 GiB of loop temporaries instead of 1.50; "
        "2026-12-02). The copy is made once a call of the loop program, before its step loop (the compiled HLO "
        "copies the two kernels in its entry computation and hands them to the while loop), so it costs memory, "
        "not time a step. From about 74 rows the down kernel's share is relaid too: v5e-4, bfloat16, the loop "
        "needed 1.31-1.34 GiB a chip more than its weights and cache up to 34 images, 2.00 GiB at 37, 39 and 40 "
        "(2026-12-05, `launch/aot_check.py decode --topology v5e:2x2 --images N`). "
        "`unitoken_jax.inference.fit.choose_quantize` counts all three shares on TPU chips "
        "(`relaid_mlp_bytes`): on a v5e-4 it takes int8 from 38 images, where 38 no longer compile in "
        "bfloat16 (the loop needs 15.88 GiB of temporaries; AOT 2026-12-07, `--images 38`; it had taken "
        "bfloat16 up to 44).", "",
        "The programs' arguments are the weights they read: the SigLIP tower (0.77 GiB in bfloat16, 0.39 GiB in "
        "int8, split over the chips) is resident too when the model is loaded whole but no picture is read; "
        "`unitoken_jax.inference.fit.choose_quantize` counts it.", ""]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

"""Decoding on an accelerator: a 7B-shaped random model (the released config, random weights made
on the device) in bfloat16 and int8 weights, one 512 x 512 image with CFG at batch 1 and 8,
against the HBM roofline (weight bytes / memory bandwidth per step). Run on demand where a GPU or
TPU is at hand; results to benchmarks/results/decode_accel.md.

    python benchmarks/decode_accel.py --bandwidth-gbs 4800          # an H200
    python benchmarks/decode_accel.py --model tiny --grid 2         # a smoke run on a CPU

The roofline: a decode step reads every weight once (all rows of the batch share the read), so a
step takes at least weight bytes / bandwidth; an image is `tokens` steps. What the batch adds (the
KV cache reads, the rows' own arithmetic) is left out, so it is a lower bound.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from unitoken_jax import configs  # noqa: E402
from unitoken_jax.inference.decode import DecodeLoop, Request  # noqa: E402
from unitoken_jax.model import UniTokenModel  # noqa: E402
from unitoken_jax.models.config import UniTokenConfig  # noqa: E402
from unitoken_jax.tokenizer import layout  # noqa: E402
from report import write_report  # noqa: E402


BLOCK = 256


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="7b", help="a model preset of configs/model.py")
    parser.add_argument("--grid", type=int, default=16, help="grid units a side: 16 = 512 px")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="memory bandwidth, GB/s (H200: 4800)")
    parser.add_argument("--out", default="benchmarks/results/decode_accel.md")
    args = parser.parse_args()
    base = UniTokenConfig.from_dict(configs.get_config(f"model.py:{args.model}").model).replace(
        dtype="bfloat16", param_dtype="bfloat16", remat_policy="none", vision=None)
    grid_hw = (args.grid, args.grid)
    tokens = layout.generated_image_length(grid_hw) - 1
    prompt = np.full(64, 9000, np.int32)
    prompt[-1] = layout.IMAGE_START

    def requests(n):
        return [Request(prompt, max_new_tokens=tokens, grid_hw=grid_hw, cfg_scale=3.0, image_top_k=2000,
                        stop_after_image=True, seed=i) for i in range(n)]

    results = {}
    model = UniTokenModel.random(base, seed=0)
    for name in ("bfloat16", "int8"):
        if name == "int8":
            model = model.quantize("int8")
        weight_bytes = sum(a.nbytes for a in jax.tree.leaves(model.params))
        loop = DecodeLoop(model.config, model.params)
        row = {"weights_gib": weight_bytes / 2**30,
               "roofline_s": weight_bytes / (args.bandwidth_gbs * 1e9) * tokens}
        for n in (1, args.batch):
            loop.generate(requests(n))  # compile
            start = time.perf_counter()
            out = loop.generate(requests(n))
            row[n] = time.perf_counter() - start
            assert all(len(t) == tokens for t in out.tokens)
        results[name] = row
        print(name, row, flush=True)
        del loop
    # the int8 loop again with its attention reading the cache in blocks, the filled ones only
    # (`DecodeLoop(cache_block=...)`, a CPU's default): at batch 8 a step reads more cache than
    # int8 weights, about half of it not yet filled on average
    blocked = DecodeLoop(model.config, model.params, cache_block=BLOCK)
    blocked.generate(requests(args.batch))  # compile
    start = time.perf_counter()
    out = blocked.generate(requests(args.batch))
    results[f"int8, cache read in blocks of {BLOCK}"] = {**results["int8"], 1: float("nan"),
                                                         args.batch: time.perf_counter() - start}
    assert all(len(t) == tokens for t in out.tokens)
    print("blocked", results[f"int8, cache read in blocks of {BLOCK}"], flush=True)
    del blocked

    device = jax.devices()[0]
    lines = [f"# Decoding a {args.model}-shaped model on {device.device_kind}", "",
             f"{datetime.date.today()}, jax {jax.__version__}, {jax.device_count()} x {device.device_kind}; random "
             f"weights, decoder only (bfloat16 compute and cache), {2 * args.grid * 32}px image = {tokens} tokens "
             f"after the prompt, CFG 3, top-k 2000. Roofline: weight bytes / {args.bandwidth_gbs:.0f} GB/s x "
             f"{tokens} steps (`benchmarks/decode_accel.py`).", "",
             f"| weights | GiB | s / image, batch 1 | roofline s / image | images / s, batch {args.batch} | "
             f"roofline images / s, batch {args.batch} |", "|---|---|---|---|---|---|"]
    for name, row in results.items():
        batch_1 = "-" if np.isnan(row[1]) else f"{row[1]:.2f}"
        lines.append(f"| {name} | {row['weights_gib']:.2f} | {batch_1} | {row['roofline_s']:.2f} | "
                     f"{args.batch / row[args.batch]:.3f} | {args.batch / row['roofline_s']:.3f} |")
    write_report(lines + [""], args.out)


if __name__ == "__main__":
    main()

"""Decoding on an accelerator: a 7B-shaped random model (the released config, random weights made
on the device) in bfloat16 and int8 weights, each with the decode loop's own layer layout
(`inference.decode.auto_layers`), and bfloat16 with scanned layers beside; one 512 x 512 image
with CFG at batch 1 and 8, against the HBM roofline (weight bytes / memory bandwidth per step),
and each first call with its compiles. Run on demand where a GPU or TPU is at hand; results to
benchmarks/results/decode_accel.md.

    python benchmarks/decode_accel.py --bandwidth-gbs 4800          # an H200
    python benchmarks/decode_accel.py --model tiny --grid 2         # a smoke run on a CPU

The roofline: a decode step reads each weight it uses once (all rows of the batch share the read:
the decoder's, less the embedding table, of which it gathers a row per row, and the LM head's
columns beyond the image codes; `report.weight_bytes_per_step`), so a step takes at least those
bytes / bandwidth; an image is `tokens` steps. What the batch adds (the
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
from unitoken_jax.inference.decode import DecodeLoop, Request, code_logit_count  # noqa: E402
from unitoken_jax.model import UniTokenModel  # noqa: E402
from unitoken_jax.models.config import UniTokenConfig  # noqa: E402
from unitoken_jax.tokenizer import layout  # noqa: E402
from report import count, out_path, weight_bytes_per_step, write_report  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="7b", choices=("7b", "7b_anyres", "tiny"),
                        help="a model preset of configs/model.py")
    parser.add_argument("--grid", type=count(1), default=16, help="grid units a side: 16 = 512 px")
    parser.add_argument("--batch", type=count(1), default=8)
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="memory bandwidth, GB/s (H200: 4800)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/decode_accel.md (another model, "
                                                    "picture or batch, as a smoke run: its trial/ folder)")
    args = parser.parse_args()
    args.out = out_path(parser, args, "decode_accel.md", shape=("model", "grid", "batch"))
    base = UniTokenConfig.from_dict(configs.get_config(f"model.py:{args.model}").model).replace(
        dtype="bfloat16", param_dtype="bfloat16", remat_policy="none", vision=None)
    grid_hw = (args.grid, args.grid)
    tokens = layout.generated_image_length(grid_hw) - 1
    prompt = np.full(64, 9000, np.int32)
    prompt[-1] = layout.IMAGE_START

    def requests(n):
        return [Request(prompt, max_new_tokens=tokens, grid_hw=grid_hw, cfg_scale=3.0, image_top_k=2000,
                        stop_after_image=True, seed=i) for i in range(n)]

    device = jax.devices()[0]
    header = [f"# Decoding a {args.model}-shaped model on {device.device_kind}", "",
              f"{datetime.date.today()}, jax {jax.__version__}, {jax.device_count()} x {device.device_kind}; random "
              f"weights, decoder only (bfloat16 compute and cache), {args.grid * 32}px image = {tokens} tokens "
              f"after the prompt, CFG 3, top-k 2000. Roofline: weight bytes / {args.bandwidth_gbs:.0f} GB/s x "
              f"{tokens} steps (`benchmarks/decode_accel.py`). First call: the same call's first run, its "
              "compiles included.", "",
              f"| weights, layers | GiB read a step | s / image, batch 1 | roofline s / image | "
              f"images / s, batch {args.batch} | "
              f"roofline images / s, batch {args.batch} | first call, s: batch 1 / {args.batch} |",
              "|---|---|---|---|---|---|---|"]

    def report(results, echo):
        lines = [f"| {name} | {row['weights_gib']:.2f} | {row[1]:.2f} | {row['roofline_s']:.2f} | "
                 f"{args.batch / row[args.batch]:.3f} | {args.batch / row['roofline_s']:.3f} | "
                 f"{row['first 1']:.1f} / {row[f'first {args.batch}']:.1f} |" for name, row in results.items()]
        write_report(header + lines + [""], args.out, echo=echo)

    results = {}
    models = {"bfloat16": UniTokenModel.random(base, seed=0)}
    # each weight format with `DecodeLoop`'s own choice of layer layout (`auto_layers`: unrolled for
    # float weights on one GPU with room for the copy, scanned for int8), then bfloat16 scanned; the
    # table is written after each row, so a run stopped by its time limit still leaves the rows it ran
    for weights, layers in (("bfloat16", "auto"), ("int8", "auto"), ("bfloat16", "scan")):
        if weights not in models:
            models[weights] = models["bfloat16"].quantize(weights)
        model = models[weights]
        # what a step reads (until 2026-12-05: every parameter, the embedding table, the whole LM head
        # and the SigLIP tower too, which put the roofline ~8 % above a lower bound)
        weight_bytes = weight_bytes_per_step(model.params, code_logit_count(model.config))
        loop = DecodeLoop(model.config, model.params, layers=layers)
        row = {"weights_gib": weight_bytes / 2**30,
               "roofline_s": weight_bytes / (args.bandwidth_gbs * 1e9) * tokens}
        for n in (1, args.batch):
            start = time.perf_counter()
            loop.generate(requests(n))  # compiles: its programs, and one per cache size where it grows
            row[f"first {n}"] = time.perf_counter() - start
            start = time.perf_counter()
            out = loop.generate(requests(n))
            row[n] = time.perf_counter() - start
            assert all(len(t) == tokens for t in out.tokens)
        layout_name = {"scan": "scanned", "unrolled": "unrolled"}[loop.layers]
        results[f"{weights}, {layout_name} layers" + (" (auto)" if layers == "auto" else "")] = row
        print(weights, loop.layers, row, flush=True)
        del loop
        report(results, echo=False)
    report(results, echo=True)

if __name__ == "__main__":
    main()

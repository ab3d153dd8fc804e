"""A scanned decode loop's attention reading the stacked KV cache in blocks, the filled ones only
(`DecodeLoop(cache_block=N)`), against reading every slot at each step (`cache_block=0`): the
model-only step (`decode.model_only_step_seconds`: the cached forward and the code head, no
sampling) over a whole 512 x 512 picture's steps, on the decode benchmark's model and this CPU.
The unrolled loop (a CPU's default for float weights; its cache grows instead) is timed beside.

    python benchmarks/decode_blocks.py [--layers 8 --hidden 512 --grid 16] [--out benchmarks/results/decode_blocks.md]
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import torch  # noqa: E402
from transformers import ChameleonForConditionalGeneration  # noqa: E402

import unitoken_jax  # noqa: E402
from unitoken_jax.inference.decode import CPU_CACHE_BLOCK, DecodeLoop  # noqa: E402
from unitoken_jax.tokenizer import layout  # noqa: E402
from decode import chameleon_config, model_arguments, model_only_step_seconds  # noqa: E402
from report import cpu_name, write_report  # noqa: E402


def main():
    args = model_arguments("decode_blocks.md", rounds=False)
    cfg = chameleon_config(args.layers, args.hidden)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ChameleonForConditionalGeneration(cfg).save_pretrained(tmp)
        model = unitoken_jax.load(tmp, progress=False)
    prompt = [0] + list(range(9000, 9020)) + [layout.END_OF_TURN, layout.IMAGE_START]
    steps = 2 + 2 * args.grid * (2 * args.grid + 1) + 1
    loops = {"scanned, every slot (`cache_block=0`)": DecodeLoop(model.config, model.params, layers="scan",
                                                                  cache_block=0),
             f"scanned, filled blocks of {CPU_CACHE_BLOCK} (a CPU's default)": DecodeLoop(
                 model.config, model.params, layers="scan"),
             "unrolled, growing cache (a CPU's default for float weights)": DecodeLoop(
                 model.config, model.params, layers="unrolled")}
    rows = (2, 2 * args.batch)
    ms = {name: [1e3 * model_only_step_seconds(loop, prompt, r, steps) for r in rows] for name, loop in loops.items()}
    whole = ms["scanned, every slot (`cache_block=0`)"]
    lines = [
        "# Decoding with a scanned loop: the KV cache read in filled blocks, or every slot", "",
        f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}. Model: "
        f"Chameleon-shaped, {args.layers} layers, hidden {args.hidden}, vocab 65,536, random float32 weights; "
        f"the model-only step (the cached forward and the image-code head, no sampling) averaged over the "
        f"{steps} steps of a {32 * args.grid} x {32 * args.grid} picture (`benchmarks/decode_blocks.py`).", "",
        f"| loop | {rows[0]} rows (batch 1 with CFG), ms | {rows[1]} rows (batch {args.batch}), ms | "
        f"vs every slot, {rows[0]} / {rows[1]} rows |", "|---|---|---|---|",
        *(f"| {name} | {a:.1f} | {b:.1f} | {a / whole[0]:.2f} / {b / whole[1]:.2f} |"
          for name, (a, b) in ms.items()), ""]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

"""The training step on an accelerator, per attention backend: a ~1B-parameter Chameleon-shaped
decoder (random weights made on the device; a small SigLIP-style tower, since the question here is
attention), bfloat16 compute, the stage-II step (`unitoken_jax.train.program`, what training
runs) on packed rows of several samples each. For each backend: real tokens per second, the
model FLOPs per second (the training log's analytic count), their fraction of the chip's
bfloat16 peak (MFU), and the step's temporaries as the compiler plans them (what a fused
attention kernel saves in memory). Run on demand where a GPU or TPU is at hand; results to
benchmarks/results/train_accel.md.

    python benchmarks/train_accel.py --peak-tflops 989                          # an H100 / H200 (bf16 dense)
    python benchmarks/train_accel.py --backends xla,splash --peak-tflops 197    # one v5e chip
    python benchmarks/train_accel.py --smoke                                    # tiny shapes, a CPU check

A backend the platform lacks, or one that fails to compile or run (e.g. cuDNN refusing the mask),
is reported in its row with the error, not skipped silently; the others still run.
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

from unitoken_jax.configs import stages  # noqa: E402
from unitoken_jax.model import UniTokenModel  # noqa: E402
from unitoken_jax.models.config import UniTokenConfig  # noqa: E402
from unitoken_jax.train.config import TrainConfig  # noqa: E402
from unitoken_jax.train.program import BATCH_KEYS, batch_shapes, build_program, make_mesh  # noqa: E402
from unitoken_jax.train.state import create_state  # noqa: E402
from report import count, out_path, write_report  # noqa: E402

# ~1.08 B parameters: 16 layers of hidden 2,048 (16 heads of 128, the head size cuDNN's flash
# kernel takes), SwiGLU 5,504, Chameleon's 65,536-token vocabulary (embedding and head untied)
ONE_B = dict(vocab_size=65536, hidden_size=2048, intermediate_size=5504, num_layers=16, num_heads=16,
             num_kv_heads=16)
SMOKE = dict(vocab_size=9216, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4)


def packed_batch(config: TrainConfig, samples_per_row: int, seed: int = 0) -> tuple[dict, float]:
    """One global batch of random text-like samples, `samples_per_row` a row with random lengths
    that fill each row exactly (no padding, so every position is a real token); positions restart
    in each sample. Returns the batch and the mean context length of a token."""
    rng = np.random.default_rng(seed)
    shapes = batch_shapes(config)
    rows, length = config.data.rows, config.data.length
    vocab = config.model.decoder.vocab_size
    batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
    batch["tokens"] = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    batch["labels"] = batch["tokens"].copy()
    for b in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, length), samples_per_row - 1, replace=False))
        for s, (start, end) in enumerate(zip([0, *cuts], [*cuts, length])):
            batch["segment_ids"][b, start:end] = s + 1
            batch["positions"][b, start:end] = np.arange(end - start)
    context = float((batch["positions"] + 1).mean())
    return batch, context


def train_config(args, backend: str) -> TrainConfig:
    config = stages.stage_config(2, "tiny")
    model = config.model
    model.decoder.update(SMOKE if args.smoke else ONE_B)
    model.decoder.max_position_embeddings = args.length
    model.dtype, model.param_dtype = ("float32" if args.smoke else "bfloat16"), "float32"
    model.remat_policy, model.scan_layers = args.remat, True
    model.attention, model.attention_block = backend, args.block
    # a SigLIP tile for each data-parallel device (one tile cannot be split over several)
    config.data.rows, config.data.length = args.rows, args.length
    config.data.max_images = args.devices or jax.device_count()
    config.optimizer.warmup_fraction = 0.0
    config.total_steps, config.mesh.num_devices = 1000, args.devices
    return TrainConfig.from_config_dict(config)


def measure(args, backend: str) -> dict:
    config = train_config(args, backend)
    program = build_program(config, make_mesh(config.mesh))
    model = UniTokenModel.random(UniTokenConfig.from_dict(config.model.to_dict()), seed=0, mesh=program.mesh)
    state = create_state(model.params, program.tx, program.state_shardings, config.seed)
    del model
    batch, context = packed_batch(config, args.samples_per_row)
    batch = {k: jax.device_put(batch[k], program.batch_shardings[k]) for k in BATCH_KEYS}
    with program.context():
        start = time.perf_counter()
        step = program.jitted.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        memory = step.memory_analysis()  # what the compiler plans for the step's temporaries
        temp_bytes = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
        state, metrics = step(state, batch)  # warm
        jax.block_until_ready(metrics["loss"])
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        loss = float(metrics["loss"])
        seconds = (time.perf_counter() - start) / args.steps
    tokens = config.data.rows * config.data.length
    flops = program.flop_counter.per_step(tokens, context, config.data.max_images
                                          * config.model.vision.features_per_image())
    return dict(step_s=seconds, tokens_per_s=tokens / seconds, tflops=flops / seconds / 1e12,
                # (the step's FLOPs over all its devices' peak: --peak-tflops is one device's)
                mfu=flops / seconds / (args.peak_tflops * 1e12 * program.mesh.devices.size) if args.peak_tflops
                else None,
                compile_s=compile_s, loss=loss, temp_gib=temp_bytes / 2**30 if temp_bytes is not None else None)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="xla,cudnn", help="attention backends to compare, comma-separated")
    parser.add_argument("--rows", type=count(1), default=4,
                        help="rows of --length positions a step (8 left the xla backend out of an H200's memory)")
    parser.add_argument("--length", type=count(1), default=4096)
    parser.add_argument("--samples-per-row", type=count(1), default=4, help="packed samples a row (segment ids)")
    parser.add_argument("--block", type=count(1), default=512, help="model.attention_block")
    parser.add_argument("--remat", default="none", help="model.remat_policy (full on a chip short of memory)")
    parser.add_argument("--steps", type=count(1), default=10, help="timed steps (after a compile and a warm-up step)")
    parser.add_argument("--devices", type=count(0), default=1, help="devices of the (fsdp) mesh; 0: all")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the chip's dense bfloat16 peak, for MFU (H100/H200 SXM: 989; v5e: 197; v5p: 459)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, float32: checks the script on a CPU (rows "
                        "2, length 256, block 128, 2 steps unless given)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/train_accel.md (--smoke: its "
                                                    "trial/ folder)")
    args = parser.parse_args()
    args.out = out_path(parser, args, "train_accel.md", trial=args.smoke)
    if args.smoke:  # the smoke run's sizes where none was given (a given one had been overridden unsaid)
        for name, small in (("rows", 2), ("length", 256), ("block", 128), ("steps", 2)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, small)

    rows = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            rows[backend] = measure(args, backend)
        except Exception as e:  # reported in the table: a backend that cannot run here is a result too
            rows[backend] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        print(backend, rows[backend], flush=True)

    device = jax.devices()[0]
    shape = SMOKE if args.smoke else ONE_B
    lines = [f"# Training step per attention backend on {device.device_kind}", "",
             f"{datetime.date.today()}, jax {jax.__version__}, {args.devices or jax.device_count()} x "
             f"{device.device_kind}. Decoder {shape['num_layers']} layers x {shape['hidden_size']} "
             f"(heads {shape['num_heads']}, MLP {shape['intermediate_size']}, vocab {shape['vocab_size']}), "
             f"{'float32' if args.smoke else 'bfloat16'} compute, float32 parameters and AdamW, remat "
             f"`{args.remat}`; {args.rows} rows x {args.length} positions, {args.samples_per_row} packed "
             f"samples a row (random lengths, no padding); attention blocks of {args.block}; mean of "
             f"{args.steps} steps after a warm-up (`benchmarks/train_accel.py`). MFU: the analytic model FLOPs "
             f"(the training log's count) / the peak given ({args.peak_tflops or 'none'} TFLOP/s).", "",
             "| attention | step, s | real tokens / s | model TFLOP/s | MFU | step temporaries, GiB | compile, s "
             "| loss |",
             "|---|---|---|---|---|---|---|---|"]
    for backend, r in rows.items():
        if "error" in r:
            lines.append(f"| {backend} | could not run: {r['error']} | | | | | | |")
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "—"
            temp = f"{r['temp_gib']:.2f}" if r["temp_gib"] is not None else "—"
            lines.append(f"| {backend} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {mfu} | "
                         f"{temp} | {r['compile_s']:.0f} | {r['loss']:.3f} |")
    write_report(lines + [""], args.out)
    return rows


if __name__ == "__main__":
    main()

"""How XLA's CPU dots run 16-bit operands, next to float32 and to torch on the same shapes: the
measurements behind the CPU rule for 16-bit models (`models.layers.accumulation`,
`models.layers.attention_dtype`).

- Weight products (a [rows, in] activation times an [in, out] kernel): float32; bfloat16 operands
  writing bfloat16 (what a 16-bit model's products were until 2026-12-05); bfloat16 operands
  accumulating into float32 (what they are now, rounded to bfloat16 after); torch's `linear` in
  float32 and bfloat16.
- Attention's batched dots at a decode step's shape (one query a row against the KV cache), in
  float32 and in bfloat16, and torch's `scaled_dot_product_attention` in both.
- Where a float32 decode step's time goes as its rows grow: weight products whose kernels come from
  memory (many different kernels, each read once a pass, as a step reads its layers; the products
  above reuse one cached kernel), XLA and torch, at 1 to 32 rows; and attention's dots at a 16-row
  step by cache length, on both cores and (through `taskset`, where there is one) on one.

Each time is the best of 5 runs of a loop of calls (compiled once before).

    python benchmarks/cpu_dots.py [--out benchmarks/results/cpu_dots.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from report import cpu_name, out_path, write_report  # noqa: E402

PRODUCTS = ((2, 512, 8192), (16, 512, 512), (16, 512, 8192), (16, 256, 9216), (256, 512, 1376),
            (2048, 256, 768), (2048, 256, 9216))
# a decode step of the decode benchmark's model at batch 8 with CFG: 16 rows, 8 heads of 64, 576 slots
ATTENTION = (16, 8, 576, 64)
# the decode benchmark's layer kernels and code head, read from memory: (in, out), and the rows
STREAMED = ((512, 512), (512, 1376), (1376, 512), (512, 8192))
STREAMED_ROWS = (1, 2, 8, 16, 32)
KERNELS = 24  # different kernels a pass (24 x 2.75 MiB: far more than this CPU's caches)
CACHE_SLOTS = (256, 288, 512, 576, 1024, 1088)  # attention by cache length, at ATTENTION's rows and heads


def best_ms(fn, *args, calls: int = 50, runs: int = 5) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def torch_ms(fn, *args, calls: int = 50, runs: int = 5) -> float:
    with torch.inference_mode():
        fn(*args)
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def streamed_products(rng) -> list[tuple]:
    """(in, out, rows, XLA ms, torch ms) a product, each pass multiplying one activation by
    KERNELS different float32 kernels, so every kernel comes from memory as in a decode step."""
    out = []
    for d_in, d_out in STREAMED:
        kernels = [rng.standard_normal((d_in, d_out), np.float32) for _ in range(KERNELS)]
        kj = [jnp.asarray(k) for k in kernels]
        kt = [torch.from_numpy(k.T.copy()) for k in kernels]
        for rows in STREAMED_ROWS:
            x = rng.standard_normal((rows, d_in), np.float32)

            def chain(x, kernels):  # each product depends on the last, as a layer's on the one before
                acc = jnp.zeros((x.shape[0], kernels[0].shape[1]), jnp.float32)
                for k in kernels:
                    acc = acc + (x + 0 * acc[:, :1]) @ k
                return acc

            def chain_torch(x, kernels):
                acc = torch.zeros(x.shape[0], kernels[0].shape[0])
                for k in kernels:
                    acc = acc + torch.nn.functional.linear(x + 0 * acc[:, :1], k)
                return acc

            xla = best_ms(jax.jit(chain), jnp.asarray(x), kj, calls=5) / KERNELS
            ref = torch_ms(chain_torch, torch.from_numpy(x), kt, calls=5) / KERNELS
            out.append((d_in, d_out, rows, xla, ref))
    return out


def attention_by_length(rng) -> list[tuple[int, float]]:
    """(cache slots, ms) of a decode step's attention dots at ATTENTION's rows and heads."""
    b, k, _, h = ATTENTION

    def attend(q, keys, values):
        scores = jnp.einsum("BKTH,BKSH->BKTS", q, keys) * h**-0.5
        return jnp.einsum("BKTS,BKSH->BKTH", jax.nn.softmax(scores, axis=-1), values)

    attend = jax.jit(attend)
    out = []
    for s in CACHE_SLOTS:
        q = jnp.asarray(rng.standard_normal((b, k, 1, h), np.float32))
        keys, values = (jnp.asarray(rng.standard_normal((b, k, s, h), np.float32)) for _ in range(2))
        out.append((s, best_ms(attend, q, keys, values, calls=20)))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="default: benchmarks/results/cpu_dots.md (--quick: its trial/ "
                                                    "folder)")
    parser.add_argument("--attention-by-length", action="store_true",
                        help="print only the attention-by-cache-length times (what the one-core run reports)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few kernels (tests: it still runs)")
    args = parser.parse_args()
    if not args.attention_by_length:
        args.out = out_path(parser, args, "cpu_dots.md", trial=args.quick)
    torch.set_num_threads(os.cpu_count())
    if args.quick:
        global PRODUCTS, ATTENTION, STREAMED_ROWS, KERNELS, CACHE_SLOTS
        PRODUCTS, ATTENTION, STREAMED_ROWS, KERNELS, CACHE_SLOTS = ((2, 64, 128),), (2, 2, 32, 16), (1, 2), 2, (16, 32)
    if args.attention_by_length:
        print(json.dumps(attention_by_length(np.random.default_rng(1))))
        return
    rng = np.random.default_rng(0)
    bf16 = jnp.bfloat16

    plain = jax.jit(lambda x, w: jnp.dot(x, w))
    into_f32 = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    products = []
    for rows, d_in, d_out in PRODUCTS:
        x = rng.standard_normal((rows, d_in), np.float32)
        w = rng.standard_normal((d_in, d_out), np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        calls = max(5, min(200, int(2e8 // (rows * d_in * d_out))))
        f32 = best_ms(plain, xj, wj, calls=calls)
        old = best_ms(plain, xj.astype(bf16), wj.astype(bf16), calls=calls)
        new = best_ms(into_f32, xj.astype(bf16), wj.astype(bf16), calls=calls)
        xt, wt = torch.from_numpy(x), torch.from_numpy(w.T.copy())
        t32 = torch_ms(torch.nn.functional.linear, xt, wt, calls=calls)
        t16 = torch_ms(torch.nn.functional.linear, xt.bfloat16(), wt.bfloat16(), calls=calls)
        products.append((rows, d_in, d_out, f32, old, new, t32, t16))

    b, k, s, h = ATTENTION
    q = rng.standard_normal((b, k, 1, h), np.float32)
    kv = rng.standard_normal((2, b, k, s, h), np.float32)

    def attend(q, keys, values):
        scores = jnp.einsum("BKTH,BKSH->BKTS", q, keys, preferred_element_type=jnp.float32) * h**-0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        return jnp.einsum("BKTS,BKSH->BKTH", probs, values, preferred_element_type=jnp.float32)

    attend = jax.jit(attend)
    att_f32 = best_ms(attend, jnp.asarray(q), jnp.asarray(kv[0]), jnp.asarray(kv[1]))
    att_16 = best_ms(attend, *(jnp.asarray(a, bf16) for a in (q, kv[0], kv[1])), calls=10)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qt, kt, vt = torch.from_numpy(q), torch.from_numpy(kv[0]), torch.from_numpy(kv[1])
    sdpa_f32 = torch_ms(sdpa, qt, kt, vt)
    sdpa_16 = torch_ms(sdpa, qt.bfloat16(), kt.bfloat16(), vt.bfloat16(), calls=10)

    streamed = streamed_products(rng)
    by_length = attention_by_length(np.random.default_rng(1))
    one_core = None
    if shutil.which("taskset") and os.cpu_count() > 1:  # the same measurement with the process on one core
        run = subprocess.run(["taskset", "-c", "0", sys.executable, os.path.abspath(__file__), "--attention-by-length",
                              *(["--quick"] if args.quick else [])], capture_output=True, text=True, check=True)
        one_core = dict(json.loads(run.stdout.strip().splitlines()[-1]))
    kv_gib = {s: 2 * b * k * s * h * 4 / 2**30 for s, _ in by_length}  # keys and values read
    # the decode benchmark's step (8 layers: q, k, v, o 512 x 512, gate and up 512 x 1376, down
    # 1376 x 512; the code head 512 x 8192) from these products, by rows
    per_layer = {(512, 512): 4, (512, 1376): 2, (1376, 512): 1}
    step_ms = {r: [sum(8 * per_layer.get((i, o), 0) * t[j] + (t[j] if (i, o) == (512, 8192) else 0)
                       for i, o, rr, *t in streamed if rr == r) for j in (0, 1)] for r in STREAMED_ROWS}

    lines = [
        "# XLA's CPU dots with 16-bit operands", "",
        f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, "
        f"torch {torch.__version__}. Best of 5 loops of calls, compiled first (`benchmarks/cpu_dots.py`).", "",
        "Weight products, [rows, in] x [in, out], ms:", "",
        "| rows x in x out | XLA float32 | XLA bfloat16, writing bfloat16 | XLA bfloat16, accumulating in float32 "
        "| accumulating / float32 | torch float32 | torch bfloat16 |", "|---|---|---|---|---|---|---|",
        *(f"| {r} x {i} x {o} | {f32:.3f} | {old:.3f} | {new:.3f} | {new / f32:.2f} | {t32:.3f} | {t16:.3f} |"
          for r, i, o, f32, old, new, t32, t16 in products), "",
        f"Attention at a decode step ({b} rows, {k} heads of {h}, {s} cache slots, one query a row: two "
        "batched dots and a softmax), ms:", "",
        "| | float32 | bfloat16 (accumulating in float32) | bfloat16 / float32 |", "|---|---|---|---|",
        f"| XLA | {att_f32:.2f} | {att_16:.2f} | {att_16 / att_f32:.1f} |",
        f"| torch `scaled_dot_product_attention` | {sdpa_f32:.2f} | {sdpa_16:.2f} | {sdpa_16 / sdpa_f32:.1f} |", "",
        "Hence the rule for 16-bit models on a CPU: weight products take their 16-bit operands and "
        "accumulate in float32 (rounded to the model's type once, after), attention computes in float32, and "
        "a decode loop's KV cache is float32 unless asked otherwise. Programs built for a TPU or GPU keep "
        "their 16-bit dots (those accumulate in float32 in hardware).", "",
        "## Where a float32 decode step's time goes as its rows grow", "",
        f"Weight products with the kernels read from memory ({KERNELS} different float32 kernels a pass, each "
        "product waiting for the one before, as a step's layers do), microseconds a product and the kernel "
        "bytes read a second:", "",
        "| in x out | rows | XLA, us | XLA, GiB/s | XLA, GFLOP/s | torch, us | torch, GiB/s |",
        "|---|---|---|---|---|---|---|",
        *(f"| {i} x {o} | {r} | {1e3 * x:.0f} | {i * o * 4 / 2**30 / (x / 1e3):.1f} | "
          f"{2 * r * i * o / (x / 1e3) / 1e9:.0f} | {1e3 * t:.0f} | {i * o * 4 / 2**30 / (t / 1e3):.1f} |"
          for i, o, r, x, t in streamed), "",
        "The decode benchmark's weight products a step (8 layers and the code head, 113 MiB) from these times, "
        "XLA's against torch's (the reference's `nn.Linear`, its kernels [out, in]): "
        + ", ".join(f"{step_ms[r][0]:.1f} against {step_ms[r][1]:.1f} ms at {r} row{'s' if r > 1 else ''}"
                    for r in STREAMED_ROWS) + ".", "",
        f"Attention's dots at a decode step by cache length ({b} rows, {k} heads of {h}, float32), ms and the "
        "keys' and values' bytes read a second" + (", on both cores and with the process on one (`taskset -c 0`)"
                                                   if one_core else "") + ":", "",
        "| cache slots | ms | GiB/s |" + (" one core, ms | one core, GiB/s |" if one_core else ""),
        "|---|---|---|" + ("---|---|" if one_core else ""),
        *(f"| {s} | {ms:.3f} | {kv_gib[s] / (ms / 1e3):.1f} |"
          + (f" {one_core[s]:.3f} | {kv_gib[s] / (one_core[s] / 1e3):.1f} |" if one_core else "")
          for s, ms in by_length), ""]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

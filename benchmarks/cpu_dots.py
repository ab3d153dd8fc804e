"""How XLA's CPU dots run 16-bit operands, next to float32 and to torch on the same shapes: the
measurements behind the CPU rule for 16-bit models (`models.layers.accumulation`,
`models.layers.attention_dtype`).

- Weight products (a [rows, in] activation times an [in, out] kernel): float32; bfloat16 operands
  writing bfloat16 (what a 16-bit model's products were until 2026-12-05); bfloat16 operands
  accumulating into float32 (what they are now, rounded to bfloat16 after); torch's `linear` in
  float32 and bfloat16.
- Attention's batched dots at a decode step's shape (one query a row against the KV cache), in
  float32 and in bfloat16, and torch's `scaled_dot_product_attention` in both.

Each time is the best of 5 runs of a loop of calls (compiled once before).

    python benchmarks/cpu_dots.py [--out benchmarks/results/cpu_dots.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from report import write_report  # noqa: E402

PRODUCTS = ((2, 512, 8192), (16, 512, 512), (16, 512, 8192), (16, 256, 9216), (256, 512, 1376),
            (2048, 256, 768), (2048, 256, 9216))
# a decode step of the decode benchmark's model at batch 8 with CFG: 16 rows, 8 heads of 64, 576 slots
ATTENTION = (16, 8, 576, 64)


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_dots.md"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
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

    lines = [
        "# XLA's CPU dots with 16-bit operands", "",
        f"{datetime.date.today()}, {platform.machine()} CPU, {os.cpu_count()} cores; jax {jax.__version__}, "
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
        "their 16-bit dots (those accumulate in float32 in hardware).", ""]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

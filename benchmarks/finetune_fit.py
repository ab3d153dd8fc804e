"""Does fine-tuning the released 7B fit one TPU VM host? The LoRA step (`configs/finetune.py:lora`:
bfloat16 frozen base, adapters and their AdamW moments in float32) and the full step
(`configs/finetune.py:full`: float32 master weights and moments for every parameter) at
4,096-position rows, remat full, one SigLIP tile a row, compiled ahead of time for `v5e:2x4` and
`v6e:2x4` (8 chips, fsdp over them) from this CPU machine; nothing runs on a TPU. For each, the
per-chip memory at growing batches, up to the largest that compiles within the chip's HBM.
Writes benchmarks/results/finetune_fit.md.

    python benchmarks/finetune_fit.py          # ~1 h on 2 cores (a 7B compile takes 4-8 min)

Each compile's result is kept in benchmarks/results/finetune_fit.json and reused by a later run
with the same settings (so an interrupted run goes on where it stopped); --fresh ignores it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch"))

import aot_check  # noqa: E402
import jax  # noqa: E402

from report import count, counts, out_path, write_report  # noqa: E402

HOSTS = [("v5e-8", "v5e:2x4"), ("v6e-8", "v6e:2x4")]
# the LoRA batches each host tries unless --lora-batches says (the committed table's: v6e-8 from 32 rows,
# where v5e-8 stops fitting, up to 128, where v6e-8 does)
LORA_BATCHES = {"v5e-8": [8, 16, 32, 64], "v6e-8": [32, 64, 128]}


def compile_once(variant: str, topology: str, rows: int, seq: int) -> dict:
    config = aot_check.stage_config(f"finetune.py:{variant}", batch=rows, seq=seq)
    mesh = aot_check.topology_mesh(topology, (1, 8, 1))
    try:
        _, compiled, seconds = aot_check.compile_program(config, mesh)
    except Exception as e:  # XLA refuses a program over the chip's HBM, naming what it needed
        message = str(e)
        needed = re.search(r"([\d.]+)G\) exceeds", message) or re.search(r"Used ([\d.]+)G of", message)
        return {"fits": False, "needed": float(needed.group(1)) if needed else None, "error": message.splitlines()[0]}
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return {"fits": True, "total": total / 2**30, "args": mem.argument_size_in_bytes / 2**30,
            "temp": mem.temp_size_in_bytes / 2**30, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="default: benchmarks/results/finetune_fit.md (another --seq: its "
                                                    "trial/ folder); the compiles are kept beside it, in a .json")
    parser.add_argument("--seq", type=count(1), default=4096)
    parser.add_argument("--hosts", default=",".join(label for label, _ in HOSTS))
    each = "; ".join(f"{host} {','.join(map(str, rows))}" for host, rows in LORA_BATCHES.items())
    parser.add_argument("--lora-batches", type=counts(1), default=None,
                        help=f"global rows to try, smallest first; the first that does not fit ends the list "
                             f"(default: {each})")
    parser.add_argument("--full-batches", type=counts(1), default=[8, 16])
    parser.add_argument("--fresh", action="store_true", help="compile everything again (ignore the kept results)")
    args = parser.parse_args()
    args.out = out_path(parser, args, "finetune_fit.md", shape=("seq",))
    unknown = sorted(set(args.hosts.split(",")) - {label for label, _ in HOSTS})
    if unknown:
        parser.error(f"--hosts {','.join(unknown)}: unknown; the hosts are {', '.join(label for label, _ in HOSTS)}")
    cache_path = os.path.splitext(args.out)[0] + ".json"
    cache = {} if args.fresh or not os.path.exists(cache_path) else json.load(open(cache_path))
    key = lambda topology, variant, rows: f"{topology} {variant} {rows}x{args.seq} jax {jax.__version__}"  # noqa: E731
    for label, topology in HOSTS:
        if label not in args.hosts.split(","):
            continue
        for variant, batches in (("lora", args.lora_batches or LORA_BATCHES[label]), ("full", args.full_batches)):
            for rows in batches:
                k = key(topology, variant, rows)
                if k not in cache:
                    cache[k] = compile_once(variant, topology, rows, args.seq)
                    with open(cache_path, "w") as f:
                        json.dump(cache, f, indent=1)
                print(label, variant, rows, cache[k], flush=True)
                if not cache[k]["fits"]:
                    break

    rows_md, largest = [], []
    for label, topology in HOSTS:  # the report: every kept result of these settings
        hbm = aot_check.hbm_bytes(aot_check.topology_devices(topology).flat[0]) / 2**30
        for variant in ("lora", "full"):
            tried = sorted((int(k.split()[2].split("x")[0]), r) for k, r in cache.items()
                           if k.startswith(f"{topology} {variant} ") and k.endswith(f"x{args.seq} jax {jax.__version__}"))
            for rows, r in tried:
                if r["fits"]:
                    cell = f"{r['total']:.2f} (weights and state {r['args']:.2f}, temporaries {r['temp']:.2f})"
                    if r["total"] > hbm:  # XLA compiled it, but the sum says more than the chip holds
                        cell += " **over the chip's HBM by this sum, though XLA compiled it**"
                else:
                    cell = "**does not fit**" + (f" (XLA: its temporaries need {r['needed']:.2f})" if r["needed"]
                                                 else "")
                rows_md.append(f"| {label} (`{topology}`, {hbm:.2f} GiB) | {variant} | {rows} x {args.seq} | {cell} |")
            fitting = [rows for rows, r in tried if r["fits"] and r["total"] <= hbm]
            if tried:
                best = max(fitting) if fitting else None
                largest.append(f"| {label} | {variant} | {f'{best} rows ({best // 8} a chip)' if best else 'none'} |")
    lines = [
        "# Fine-tuning the released 7B on one host: memory a chip, from AOT compiles", "",
        f"{datetime.date.today()}, compiled on this CPU machine for each TPU topology (jax {jax.__version__}, libtpu "
        f"topologies; `{' '.join(['python benchmarks/finetune_fit.py', *sys.argv[1:]])}`; the "
        f"fitting compiles, this run's and those it reused from the cache file of earlier runs, took "
        f"{sum(r.get('seconds', 0) for r in cache.values()):.0f} s). The step is the training "
        "loop's own (`configs/finetune.py`: `lora` trains rank-16 adapters on every decoder projection beside a "
        "frozen bfloat16 base; `full` trains every weight with float32 master weights and AdamW moments), "
        f"{args.seq}-position rows, remat full, one SigLIP tile a row, every chip on the fsdp axis. GiB a chip "
        "(arguments + outputs - aliased + temporaries); 'does not fit' is XLA refusing the program for the chip's "
        "HBM.", "",
        "| host (HBM a chip) | variant | batch | per chip, GiB |", "|---|---|---|---|", *rows_md, "",
        "Largest batch that fits (of those tried):", "",
        "| host | variant | largest batch |", "|---|---|---|", *largest, ""]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

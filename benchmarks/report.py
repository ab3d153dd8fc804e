"""What every benchmark does with its result: write the markdown to a file and print it."""

from __future__ import annotations

import argparse
import os
import platform

from unitoken_jax import argtypes

# the instruction sets that decide this project's CPU numbers (XLA's and torch's kernels differ on them)
_FEATURES = (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX"))


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """This machine's processor as a results file names it: the model, the architecture and the
    vector features that move the numbers, e.g. "Intel(R) Xeon(R) Processor (x86_64; AVX-512,
    AVX-512 BF16, AMX)". Sessions land on different machines, and their speeds differ by 2x."""
    model, flags = "", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    model = model or platform.processor() or "CPU"
    features = [name for flag, name in _FEATURES if flag in flags]
    return f"{model} ({platform.machine()}" + (f"; {', '.join(features)})" if features else ")")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TRIALS = os.path.join(RESULTS, "trial")  # (git-ignored)


count, counts = argtypes.whole, argtypes.wholes  # (argparse types: a count of 0 is refused at once)


def out_path(parser: argparse.ArgumentParser, args, name: str, *, trial: bool | None = None,
             shape: tuple[str, ...] = ()) -> str:
    """Where the results go: `--out` as given; else benchmarks/results/NAME (from any directory)
    when the run has the settings that file documents, and benchmarks/results/trial/NAME (not
    committed) when not: `trial`, or any of the `shape` options away from its default (a smoke
    run had overwritten the committed results). The place is checked before anything is measured
    (a bad one was a traceback at the end, the results lost)."""
    path = args.out
    if path is None:
        if trial is None:
            trial = any(getattr(args, k) != parser.get_default(k) for k in shape)
        path = os.path.join(TRIALS if trial else RESULTS, name)
        if trial:
            print(f"(settings other than the committed results': writing {os.path.relpath(path)})", flush=True)
    problem = unwritable(path)
    if problem:
        parser.error(f"--out {path}: {problem}")
    return path


def unwritable(path: str) -> str | None:
    """Why a file cannot be written at `path` (its folders made as needed), or None."""
    if os.path.isdir(path):
        return "is a directory; give a file"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} cannot be written"
    return None


def write_report(lines: list[str], out: str, echo: bool = True) -> str:
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    if echo:
        print(text)
    return text


def weight_bytes_per_step(params: dict, head_stop: int) -> int:
    """The weight bytes a decode step reads: every decoder weight but the embedding table (a step
    gathers one row of it per row) and, of the LM head, the columns of the ids [0, head_stop) it
    computes (the code logits, while every row draws a picture's codes); nothing of the SigLIP
    tower or its adapter (a prompt's pictures are read in the prefill)."""
    import jax

    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params["decoder"]):
        name = jax.tree_util.keystr(path)
        if "embed_tokens" in name:
            continue
        total += leaf.nbytes * head_stop // leaf.shape[-1] if "lm_head" in name else leaf.nbytes
    return total

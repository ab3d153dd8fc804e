"""How long the README's two commands take from a fresh process, with and without the CLI's
compilation cache (a fresh cache directory: the first call fills it, later calls load from it),
and then the same verb with prompts the cache has not seen (other lengths: each is padded to the
prefill's multiple, `DecodeLoop(prompt_multiple=...)`). Each command is a new `unitoken` process,
as a user runs it; the median of the runs. Writes benchmarks/results/cli_latency.md.

    python benchmarks/cli_latency.py [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import count, cpu_name, out_path, write_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=count(1), default=3)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/cli_latency.md")
    args = parser.parse_args()
    args.out = out_path(parser, args, "cli_latency.md")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    work = tempfile.mkdtemp()
    picture = os.path.join(work, "red.png")
    unitoken = [sys.executable, "-m", "unitoken_jax.cli"]
    commands = {"generate": unitoken + ["generate", "a red circle at the top left", "--out", picture],
                "understand": unitoken + ["understand", picture, "What colour is the shape?"]}
    # prompts of other lengths than the README's, each new to the cache when it runs
    others = {"generate": [unitoken + ["generate", p, "--out", os.path.join(work, "other.png")] for p in (
                  "a blue square at the bottom right", "a green circle",
                  "a yellow triangle at the top right and a red square at the bottom left",
                  "a green square at the bottom left and a blue circle at the top right and a red triangle at "
                  "the bottom right")],
              "understand": [unitoken + ["understand", picture, q] for q in (
                  "How many shapes are there?", "Describe the picture.", "What shape is at the top left?",
                  "What colour is the shape at the top left?")]}
    rows = []
    try:
        for name, cmd in commands.items():
            off = [_time(cmd + ["--compilation-cache", "off"], env) for _ in range(args.runs)]
            cache = os.path.join(work, f"xla-{name}")
            first = _time(cmd + ["--compilation-cache", cache], env)
            warm = [_time(cmd + ["--compilation-cache", cache], env) for _ in range(args.runs)]
            entries = sum(p.endswith("-cache") for p in os.listdir(cache))
            new = [_time(other + ["--compilation-cache", cache], env) for other in others[name]]
            added = sum(p.endswith("-cache") for p in os.listdir(cache)) - entries
            off_s, warm_s = statistics.median(off), statistics.median(warm)
            rows.append(f"| `unitoken {name}` | {off_s:.2f} | {first:.2f} | {warm_s:.2f} | {off_s / warm_s:.2f}x "
                        f"| {entries} | {statistics.median(new):.2f} ({len(new)} prompts, {added} programs added) |")
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# The README's commands from a fresh process, with and without the compilation cache", "",
        f"{datetime.date.today()}, {cpu_name()} with {os.cpu_count()} cores, the bundled model, "
        f"`python benchmarks/cli_latency.py --runs {args.runs}`: wall time of the whole process (imports, loading, "
        "compiling, decoding, writing), the median of the runs; 'first' fills a fresh cache directory. 'Other "
        "prompts' then runs the verb once each with captions / questions of other lengths, on the filled cache.", "",
        "| command | no cache, s | first with the cache, s | cache filled, s | speed-up | programs kept "
        "| other prompts, cache filled, s |",
        "|---|---|---|---|---|---|---|", *rows, ""]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

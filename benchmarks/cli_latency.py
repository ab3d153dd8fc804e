"""How long the README's two commands take from a fresh process, with and without the CLI's
compilation cache (a fresh cache directory: the first call fills it, later calls load from it).
Each command is a new `unitoken` process, as a user runs it; the median of the runs. Writes
benchmarks/results/cli_latency.md.

    python benchmarks/cli_latency.py [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import write_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cli_latency.md"))
    args = parser.parse_args()
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    work = tempfile.mkdtemp()
    picture = os.path.join(work, "red.png")
    unitoken = [sys.executable, "-m", "unitoken_jax.cli"]
    commands = {"generate": unitoken + ["generate", "a red circle at the top left", "--out", picture],
                "understand": unitoken + ["understand", picture, "What colour is the shape?"]}
    rows = []
    try:
        for name, cmd in commands.items():
            off = [_time(cmd + ["--compilation-cache", "off"], env) for _ in range(args.runs)]
            cache = os.path.join(work, f"xla-{name}")
            first = _time(cmd + ["--compilation-cache", cache], env)
            warm = [_time(cmd + ["--compilation-cache", cache], env) for _ in range(args.runs)]
            entries = sum(p.endswith("-cache") for p in os.listdir(cache))
            off_s, warm_s = statistics.median(off), statistics.median(warm)
            rows.append(f"| `unitoken {name}` | {off_s:.2f} | {first:.2f} | {warm_s:.2f} | {off_s / warm_s:.2f}x "
                        f"| {entries} |")
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "# The README's commands from a fresh process, with and without the compilation cache", "",
        f"{datetime.date.today()}, {platform.machine()} CPU with {os.cpu_count()} cores, the bundled model, "
        f"`python benchmarks/cli_latency.py --runs {args.runs}`: wall time of the whole process (imports, loading, "
        "compiling, decoding, writing), the median of the runs; 'first' fills a fresh cache directory.", "",
        "| command | no cache, s | first with the cache, s | cache filled, s | speed-up | programs kept |",
        "|---|---|---|---|---|---|", *rows, ""]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

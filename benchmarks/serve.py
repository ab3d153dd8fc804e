"""`unitoken serve` under load on this CPU, with the bundled model: N concurrent clients (the
official `openai` client, one thread each), half asking questions about pictures and half asking
for guided pictures, against the same calls run one after another through the pipeline. For each
batching mode: throughput (calls a second) and p50 / p95 latency, warm (a first round compiles).
Writes benchmarks/results/serve.md.

    python benchmarks/serve.py [--clients 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import threading
import time

import numpy as np
import openai
import uvicorn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import count, cpu_name, out_path, write_report  # noqa: E402

from unitoken_jax.serve import ServeSettings, create_app  # noqa: E402
from unitoken_jax.world import default, shapes  # noqa: E402

QUESTIONS = list(shapes.QUESTIONS.values())


def _serve(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def _calls(n: int, rng):
    things = shapes.train_things()
    calls = []
    for i in range(n):
        thing = things[rng.integers(len(things))]
        if i % 2 == 0:
            calls.append(("ask", shapes.draw([thing], rng), QUESTIONS[i // 2 % len(QUESTIONS)], i))
        else:
            calls.append(("draw", thing.text, None, i))
    return calls


def _one(client, call):
    kind, what, question, seed = call
    if kind == "ask":
        import base64
        import io

        buf = io.BytesIO()
        what.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        client.chat.completions.create(model="unitoken-shapes", seed=seed, max_tokens=32, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}])
    else:
        client.images.generate(model="unitoken-shapes", prompt=what, size="64x64",
                               extra_body={"guidance_scale": 3, "seed": seed})


def _round(url, calls):
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    latencies = [0.0] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        start = time.perf_counter()
        _one(client, calls[i])
        latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies


def _sequential(pipe, calls):
    latencies = []
    start = time.perf_counter()
    for kind, what, question, seed in calls:
        t = time.perf_counter()
        if kind == "ask":
            pipe.understand([what], question, seed=seed, max_new_tokens=32)
        else:
            pipe.generate_image(what, size=(64, 64), cfg=3.0, seed=seed)
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - start, latencies


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=count(1), default=16)
    parser.add_argument("--rounds", type=count(1), default=3)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/serve.md (another --clients: its "
                                                    "trial/ folder)")
    args = parser.parse_args()
    args.out = out_path(parser, args, "serve.md", shape=("clients",))
    pipe = default.pipeline()
    calls = _calls(args.clients, np.random.default_rng(0))
    rows = []

    def line(label, seconds, latencies):
        p50, p95 = np.percentile(latencies, 50), np.percentile(latencies, 95)
        rows.append(f"| {label} | {len(calls) / seconds:.1f} | {seconds:.2f} | {p50 * 1000:.0f} | {p95 * 1000:.0f} |")
        print(rows[-1], flush=True)

    _sequential(pipe, calls)  # compiles
    best = min((_sequential(pipe, calls) for _ in range(args.rounds)), key=lambda r: r[0])
    line("one after another, through the pipeline", *best)
    for batching, slot_length in (("static", None), ("continuous", None), ("continuous", 128)):
        settings = ServeSettings(model_name="unitoken-shapes", max_batch=2 * args.clients, default_size=(64, 64),
                                 sizes=((64, 64),), batching=batching, slot_length=slot_length)
        server, thread, url = _serve(create_app(pipe, settings))
        try:
            for _ in range(2):
                _round(url, calls)  # compiles the shapes a burst meets
            best = min((_round(url, calls) for _ in range(args.rounds)), key=lambda r: r[0])
            label = f"{args.clients} concurrent clients, `--batching {batching}`"
            line(label + (f" `--slot-length {slot_length}`" if slot_length else ""), *best)
        finally:
            server.should_exit = True
            thread.join(30)
    lines = [
        "# `unitoken serve` under load: the bundled model on this CPU", "",
        f"{datetime.date.today()}, {cpu_name()} with {os.cpu_count()} cores, "
        f"`python benchmarks/serve.py --clients {args.clients} --rounds {args.rounds}`: {args.clients} calls, half "
        "questions about a picture (greedy, at most 32 tokens), half guided 64 x 64 pictures (CFG 3), each client a "
        "thread with the official `openai` client; the best of the rounds after two warm-up rounds. Latency is "
        "from a call's start to its answer.", "",
        "| how | calls / s | all calls, s | p50 latency, ms | p95 latency, ms |", "|---|---|---|---|---|", *rows, ""]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

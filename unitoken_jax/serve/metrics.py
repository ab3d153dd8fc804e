"""/metrics in Prometheus' text format (version 0.0.4), written by hand: a few counters and gauges
need no client library."""

from __future__ import annotations

import threading
from collections import Counter

ENDPOINTS = ("/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/models", "/health",
             "/metrics")


class RequestCounter:
    """HTTP answers by endpoint and status. Paths that are no endpoint count as "other", so that a
    client cannot grow the label set."""

    def __init__(self):
        self._counts: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()

    def add(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        with self._lock:
            self._counts[endpoint, status] += 1

    def items(self) -> list[tuple[tuple[str, int], int]]:
        with self._lock:
            return sorted(self._counts.items())


def render(requests: RequestCounter, scheduler, shapes: int) -> str:
    """The exposition text: requests, the queue, the running batch, tokens and throughput."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    metric("unitoken_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
           [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in requests.items()])
    metric("unitoken_queue_length", "gauge", "Calls waiting for a batch.", [("", scheduler.queue_length)])
    metric("unitoken_queue_rows", "gauge", "Batch rows the waiting calls need (a guided picture takes two).",
           [("", scheduler.queue_rows)])
    metric("unitoken_rows_in_use", "gauge", "Rows of the running batch that belong to requests.",
           [("", scheduler.rows_in_use)])
    metric("unitoken_batch_rows", "gauge", "Rows of the running batch, padding included.", [("", scheduler.batch_rows)])
    metric("unitoken_max_batch_rows", "gauge", "Rows a batch may have (--max-batch).", [("", scheduler.max_rows)])
    metric("unitoken_batches_total", "counter", "Batches run.", [("", scheduler.batches)])
    metric("unitoken_failed_batches_total", "counter", "Batches that raised an error.",
           [("", scheduler.failed_batches)])
    metric("unitoken_generated_tokens_total", "counter", "Tokens generated for requests (padding not counted).",
           [("", scheduler.generated_tokens)])
    metric("unitoken_generated_tokens_per_second", "gauge", "Tokens generated per second by the last batch.",
           [("", scheduler.tokens_per_second)])
    metric("unitoken_busy_seconds_total", "counter", "Seconds spent running batches.", [("", scheduler.busy_seconds)])
    metric("unitoken_cancelled_total", "counter", "Calls dropped before they started: their client went away.",
           [("", scheduler.cancelled)])
    metric("unitoken_expired_total", "counter", "Calls dropped before they started: past their deadline.",
           [("", scheduler.expired)])
    metric("unitoken_prompt_positions_reused_total", "counter", "Prompt positions taken from a free slot's kept "
           "cache instead of computed (--batching continuous: a conversation's next turn).",
           [("", getattr(getattr(scheduler, "decoder", None), "reused_positions", 0))])
    metric("unitoken_batch_shapes", "gauge", "Distinct padded batch shapes run (each compiled once).", [("", shapes)])
    return "\n".join(lines) + "\n"

"""The batching worker: one thread owns the model; calls wait in a bounded queue and run together.

Each HTTP call becomes a `Job` of one or more `Request`s (a chat's `n` choices, an images call's
`n` pictures), which always run in the same batch. The worker waits for work, lets a burst
arrive (`batch_wait`: until no call has come for that long), drops the calls whose client went
away or whose deadline passed before they started, asks the `policy` which waiting calls make the
next batch, and runs them as one batch through the engine. The engine reports after every chunk
of decoding steps (the tokens each request has so far) and at the end; the job's callbacks get
both, on the worker's thread.

The policy is the one piece that decides what runs together: `FifoPolicy` takes calls in arrival
order while the padded batch fits `max_rows`. A batch, once started, runs to its end: a call
cannot join a running batch (continuous batching needs the decode loop to admit rows into free
slots between chunks) and a row cannot leave it early.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Callable, Protocol, Sequence

import jax
import numpy as np

from unitoken_jax.inference.decode import Request

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `queue_limit` calls already."""


class Expired(Exception):
    """A call whose deadline passed before it could start."""


class ShuttingDown(Expired):
    """A call the server stopped before it could finish (the app answers 503)."""


class DoesNotFit(ValueError):
    """A call longer than a continuous server's slots (`--slot-length`)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One HTTP call's requests. `on_progress(ids)` (the ids each request has so far, after every
    chunk of decoding steps) and `on_finish(outputs or exception)` are called on the worker's thread."""

    requests: list[Request]
    on_finish: Callable[[object], None]
    on_progress: Callable[[list[np.ndarray]], None] | None = None
    # which of its requests are over already, from the ids they have (a stop string seen): they
    # end there instead of running to their end, after the chunk that showed it
    ended: Callable[[list[np.ndarray]], list[bool]] | None = None
    deadline: float | None = None  # time.monotonic() by which it must have started
    state: str = "waiting"  # waiting -> running -> done; or cancelled / expired before running
    abandoned: bool = False  # its client left while it ran: the result goes nowhere
    created: float = dataclasses.field(default_factory=time.monotonic)


class Policy(Protocol):
    def take(self, waiting: Sequence[Job], fits: Callable[[list[Job]], bool]) -> list[Job]:
        """The waiting jobs to run next (at least one, if any fits alone)."""


class FifoPolicy:
    """Arrival order, while the batch fits; a call that does not fit waits for the next batch and
    nothing behind it jumps ahead (no call waits forever behind smaller ones)."""

    def take(self, waiting: Sequence[Job], fits: Callable[[list[Job]], bool]) -> list[Job]:
        batch: list[Job] = []
        for job in waiting:
            if not fits(batch + [job]):
                break
            batch.append(job)
        return batch


class Scheduler:
    """Owns the engine's thread. `submit` from any thread; `start` / `stop` around serving."""

    def __init__(self, engine, *, max_rows: int, queue_limit: int, policy: Policy | None = None,
                 batch_wait: float = 0.0):
        self.engine, self.max_rows, self.queue_limit = engine, max_rows, queue_limit
        self.policy = policy or FifoPolicy()
        self.batch_wait = batch_wait
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # read by /metrics
        self._batch: list[Job] = []  # the static batch running now
        self.rows_in_use = 0  # the running batch's requests' rows (padding not counted)
        self.batch_rows = 0  # the running batch's rows, padding included
        self.batches = 0
        self.generated_tokens = 0
        self.busy_seconds = 0.0
        self.tokens_per_second = 0.0  # over the last batch
        self.cancelled = 0
        self.expired = 0
        self.failed_batches = 0

    # --- the callers' side ------------------------------------------------------------------------
    def rows(self, jobs: Sequence[Job]) -> int:
        return self.engine.rows([r for j in jobs for r in j.requests])

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (what /health reports)."""
        return self._thread is not None and self._thread.is_alive()

    def fits(self, jobs: Sequence[Job]) -> bool:
        return self.rows(jobs) <= self.max_rows

    def submit(self, job: Job) -> None:
        """Queues `job`, or raises `QueueFull` (the caller answers 429) or `ValueError` (a call
        too big for any batch)."""
        if not self.fits([job]):
            padded = "" if isinstance(self, ContinuousScheduler) else "; static batches are padded to powers of two"
            raise ValueError(f"the call needs {self.rows([job])} batch rows (a guided picture takes two{padded}); "
                             f"this server's --max-batch is {self.max_rows}")
        with self._cond:
            if self._stopping:  # (it would wait for a worker that takes no more batches)
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.queue_limit:
                raise QueueFull(f"{len(self._waiting)} calls are waiting already (--queue-limit {self.queue_limit})")
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> bool:
        """Drops `job` if it has not started (True); a running one finishes and its result is
        dropped."""
        with self._cond:
            if job.state == "waiting":
                self._waiting.remove(job)
                job.state = "cancelled"
                self.cancelled += 1
                return True
            job.abandoned = True
            return False

    @property
    def queue_length(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def queue_rows(self) -> int:
        with self._cond:
            return sum(len(j.requests) + sum(r.cfg_scale != 1.0 for r in j.requests) for j in self._waiting)

    # --- the worker -------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="unitoken-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops after the running batch; calls still waiting get `Expired`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            left, self._waiting = list(self._waiting), deque()
        for job in left:
            job.state = "expired"
            job.on_finish(ShuttingDown("the server is shutting down"))

    def _gather(self) -> None:
        """Under the lock: waits until no call has arrived for `batch_wait` seconds (at most ten
        times that), or the waiting calls fill a batch."""
        end = time.monotonic() + 10 * self.batch_wait
        # (a call dropped meanwhile, its client gone, can leave the queue empty: then there is nothing to gather)
        while self._waiting and not self._stopping and time.monotonic() < end and self.fits(self._waiting):
            count = len(self._waiting)
            self._cond.wait(min(self.batch_wait, max(0.0, end - time.monotonic())))
            if len(self._waiting) == count:
                return

    def _next_batch(self) -> tuple[list[Job], list[Job]] | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if self.batch_wait > 0:
                self._gather()
                if self._stopping:  # stopped while gathering: no new batch (`stop` tells the waiting calls)
                    return None
            now = time.monotonic()
            expired = [j for j in self._waiting if j.deadline is not None and j.deadline <= now]
            for job in expired:
                self._waiting.remove(job)
                job.state = "expired"
            self.expired += len(expired)
            # every call fits a batch alone (`submit` checked): a policy that takes none gets the first
            batch = self.policy.take(list(self._waiting), self.fits) or list(self._waiting)[:1]
            for job in batch:
                self._waiting.remove(job)
                job.state = "running"
            requests = [r for j in batch for r in j.requests]
            self.rows_in_use = len(requests) + sum(r.cfg_scale != 1.0 for r in requests)
            self.batch_rows = self.engine.rows(requests) if batch else 0
            return batch, expired

    def _work(self) -> None:
        while True:
            taken = self._next_batch()
            if taken is None:
                return
            batch, expired = taken
            for job in expired:
                job.on_finish(Expired("the call waited in the queue past its deadline"))
            if batch:
                self._run(batch)

    def tell_running(self) -> None:
        """Answers the calls of the batch still running `ShuttingDown` now (the server is about to
        close their connections: a plain 500 or a stream cut mid-way otherwise); what the batch
        gives them later goes nowhere."""
        with self._cond:
            for job in self._batch:
                if not job.abandoned:
                    job.abandoned = True
                    job.on_finish(ShuttingDown("the server is shutting down"))

    def _run(self, batch: list[Job]) -> None:
        with self._cond:
            self._batch = batch
        requests = [r for j in batch for r in j.requests]
        bounds = np.cumsum([0] + [len(j.requests) for j in batch])

        def progress(ids: list[np.ndarray]) -> list[int]:
            ended = []
            for job, lo, hi in zip(batch, bounds[:-1], bounds[1:]):
                if job.on_progress is not None and not job.abandoned:
                    job.on_progress(ids[lo:hi])
                if job.ended is not None:
                    ended += [lo + i for i, over in enumerate(job.ended(ids[lo:hi])) if over]
            return ended

        start = time.monotonic()
        try:
            outputs = self.engine.run(requests, progress)
        except Exception as e:  # the batch's calls fail; the server goes on
            log.exception("a batch of %d requests failed", len(requests))
            self.failed_batches += 1
            outputs = None
            failure = e
        seconds = time.monotonic() - start
        with self._cond:
            self.rows_in_use = self.batch_rows = 0
            self.batches += 1
            self.busy_seconds += seconds
            if outputs is not None:
                tokens = sum(len(o.ids) for o in outputs if not isinstance(o, Exception))
                self.generated_tokens += tokens
                self.tokens_per_second = tokens / seconds if seconds > 0 else 0.0
        with self._cond:  # (`tell_running` may answer them at the same time: each call is answered once)
            self._batch = []
            for job, lo, hi in zip(batch, bounds[:-1], bounds[1:]):
                job.state = "done"
                if not job.abandoned:
                    # an answer that could not be read back (`PipelineEngine.run`) fails its own call only
                    own = outputs[lo:hi] if outputs is not None else None
                    error = failure if own is None else next((o for o in own if isinstance(o, Exception)), None)
                    job.on_finish(own if error is None else error)


class ContinuousScheduler(Scheduler):
    """Continuous batching (`unitoken_jax.inference.slots.SlotDecoder`): the worker runs the compiled
    loop a chunk at a time over `slots` rows; between chunks, finished requests leave and waiting
    calls are admitted into the free slots (a guided picture takes two), in arrival order with
    no call jumping ahead of one that does not fit yet. A short question joins while a picture is
    being drawn instead of waiting for it; a call whose client goes away has its rows freed at the
    next chunk. A `Scheduler` with another worker: the queue, `submit`, `cancel` and the metrics are
    the same, so the app takes either."""

    def __init__(self, engine, *, slots: int, length: int, queue_limit: int, chunk: int = 8):
        from unitoken_jax.inference.slots import SlotDecoder

        super().__init__(engine, max_rows=slots, queue_limit=queue_limit)
        self.decoder = SlotDecoder(engine.pipe.decode_loop, slots=slots, length=length, chunk=chunk)
        self.length = length
        self._running: dict[int, tuple[Job, list]] = {}  # id(job) -> (job, outputs so far)

    def rows(self, jobs: Sequence[Job]) -> int:
        return sum(self.decoder.slots_needed(r) for j in jobs for r in j.requests)

    def submit(self, job: Job) -> None:
        for r in job.requests:
            if r.longest_prompt + r.max_new_tokens > self.length:
                raise DoesNotFit(f"a prompt of {r.longest_prompt} positions and {r.max_new_tokens} new tokens do not "
                                 f"fit this server's slots of {self.length} positions (--slot-length)")
        super().submit(job)  # a running call that is cancelled has its rows freed at the next chunk

    def stop(self, timeout: float = 30.0) -> None:
        """Stops after the current chunk; waiting and running calls get `ShuttingDown`. The worker
        tells its running calls itself when it stops, so that a chunk still running after `timeout`
        (a long compile) cannot answer a call that has been told already."""
        super().stop(timeout)
        if self._thread is not None and self._thread.is_alive() and self._running:
            log.warning("the decoding worker is still running after %g s; its %d call(s) are told when its chunk "
                        "ends", timeout, len(self._running))

    def tell_running(self) -> None:
        """Answers the running calls `ShuttingDown` now, the chunk still running (a first compile, a
        long prefill): the server is about to close their connections. Their rows are freed at
        the next chunk, if there is one."""
        with self._cond:
            for job, _ in list(self._running.values()):  # (the worker's deletions: the copy is one C call)
                if not job.abandoned:
                    job.abandoned = True
                    job.on_finish(ShuttingDown("the server is shutting down"))

    def _shut(self) -> None:
        """The worker's last act: its running calls are told the server is shutting down."""
        for key, (job, _) in list(self._running.items()):
            del self._running[key]
            job.state = "done"
            if not job.abandoned:
                job.on_finish(ShuttingDown("the server is shutting down"))

    # --- the worker ---------------------------------------------------------------------------------
    def _take(self) -> tuple[list[Job], dict]:
        """Under the lock: waits for work; drops expired calls; takes waiting calls in order while
        they fit the free slots. Returns the expired ones (told outside the lock) and the taken
        ones' requests, which `_work` admits outside the lock: a prefill (and the compile of a new
        shape) must not hold up `submit`, `cancel` and /metrics on the server's event loop."""
        while not self._waiting and not self._running and not self._stopping:
            self._cond.wait()
        if self._stopping:
            return [], {}
        now = time.monotonic()
        expired = [j for j in self._waiting if j.deadline is not None and j.deadline <= now]
        for job in expired:
            self._waiting.remove(job)
            job.state = "expired"
        self.expired += len(expired)
        admitted, free = {}, self.decoder.free_slots  # (only this thread changes the decoder)
        while self._waiting and self.rows([self._waiting[0]]) <= free:
            job = self._waiting.popleft()
            free -= self.rows([job])
            for i, r in enumerate(job.requests):
                admitted[(id(job), i)] = r
            job.state = "running"
            self._running[id(job)] = (job, [None] * len(job.requests))
        return expired, admitted

    def _work(self) -> None:
        while True:
            with self._cond:
                expired, admitted = self._take()
                stopping = self._stopping
            if stopping:
                self._shut()
                return
            for job in expired:
                job.on_finish(Expired("the call waited in the queue past its deadline"))
            if admitted:  # one prefill for every call taken now
                try:
                    self.decoder.admit_many(admitted)
                except Exception as e:  # those calls fail (and the running ones if the decoder lost them)
                    log.exception("admitting %d request(s) failed", len(admitted))
                    self._fail(e)
            with self._cond:
                self.rows_in_use = self.batch_rows = self.decoder.rows_in_use()
            for key, (job, _) in list(self._running.items()):
                if job.abandoned:  # its client left: free its rows now
                    for i in range(len(job.requests)):
                        self.decoder.cancel((key, i))
                    del self._running[key]
                    job.state = "done"
            if not self.decoder.busy:
                with self._cond:  # (the rows the cancels freed)
                    self.rows_in_use = self.batch_rows = self.decoder.rows_in_use()
                continue
            start = time.monotonic()
            # tokens are counted on each request's own row, not on a guided picture's partner
            rows = [running.slots[0] for running in self.decoder.running.values()]
            before = int(np.asarray(self.decoder.state.n_out)[rows].sum())
            try:
                finished = self.decoder.step()
            except Exception as e:  # every running call fails; the server goes on with new ones
                log.exception("a decoding chunk failed")
                self._fail(e)
                continue
            seconds = time.monotonic() - start
            self._account(finished, int(np.asarray(self.decoder.state.n_out)[rows].sum()) - before, seconds)
            with self._cond:  # the rows the chunk's finished calls left (0 once idle: the worker then waits)
                self.rows_in_use = self.batch_rows = self.decoder.rows_in_use()

    def _fail(self, error: Exception) -> None:
        """After a failed admission or chunk: every running call of which the decoder lost a
        request (it left its slots: `SlotDecoder._recover`) fails with `error`; its other
        requests leave theirs."""
        self.failed_batches += 1
        for key, (job, outputs) in list(self._running.items()):
            names = [(key, i) for i, o in enumerate(outputs) if o is None]
            if all(name in self.decoder.running for name in names):
                continue
            for name in names:
                self.decoder.cancel(name)
            del self._running[key]
            job.state = "done"
            job.on_finish(error)

    def _output(self, key: int, i: int, ids) -> None:
        """Reads request i of running call `key` back into its answer; if that fails (a picture the
        VQ-GAN cannot decode, say), that call fails and leaves its slots, and the worker goes on."""
        job, outputs = self._running[key]
        try:
            outputs[i] = self.engine._output(job.requests[i], ids)
        except Exception as e:
            log.exception("reading an answer back failed")
            for j in range(len(job.requests)):
                if (key, j) in self.decoder.running:
                    self.decoder.cancel((key, j))
            del self._running[key]
            job.state = "done"
            if not job.abandoned:
                job.on_finish(e)

    def _account(self, finished: dict, tokens: int, seconds: float) -> None:
        """Metrics of one chunk (`tokens` generated in it), and the calls that finished or moved on."""
        with self._cond:
            self.batches += 1  # chunks, here
            self.busy_seconds += seconds
            self.generated_tokens += tokens
            self.tokens_per_second = tokens / seconds if seconds else 0.0
        for (key, i), ids in finished.items():
            if key in self._running:  # (not if reading an earlier request's answer failed the call)
                self._output(key, i, ids)
        so_far = None  # every row's ids, fetched once a chunk if a call streams or may end early

        def ids_so_far(key, i, request):
            nonlocal so_far
            if so_far is None:
                state = jax.device_get({"out": self.decoder.state.out, "n_out": self.decoder.state.n_out})
                so_far = lambda row: state["out"][row, :state["n_out"][row]]  # noqa: E731
            return so_far(self.decoder.running[(key, i)].slots[0])[:request.max_new_tokens]

        for key, (job, outputs) in list(self._running.items()):
            if job.ended is not None and not job.abandoned and any(o is None for o in outputs):
                left = [i for i, o in enumerate(outputs) if o is None]
                ids = [ids_so_far(key, i, job.requests[i]) for i in left]
                for i, x, over in zip(left, ids, job.ended(ids)):
                    if over and key in self._running:  # a stop string: its rows are freed now
                        self.decoder.cancel((key, i))
                        self._output(key, i, x)
                if key not in self._running:
                    continue
            if all(o is not None for o in outputs):
                del self._running[key]
                job.state = "done"
                job.on_finish(outputs)
            elif job.on_progress is not None:
                job.on_progress([ids_so_far(key, i, r) if o is None else o.ids
                                 for i, (r, o) in enumerate(zip(job.requests, outputs))])

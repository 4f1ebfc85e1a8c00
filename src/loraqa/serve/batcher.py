"""Many clients, one model: a bounded queue of requests answered in micro-batches by one worker thread.

What must hold:

* one thread, the worker, uses the model; the event loop only queues requests and awaits their futures;
* the queue is bounded: a request that finds it full is refused at once (:class:`QueueFull`, a 503), never
  held;
* every queued request is answered exactly once, with exactly its own answers, or failed with a reason: the
  worker answers its questions in one call with the questions of the other requests taken with it, and hands
  each request back its own slice of the answers;
* the questions of one micro-batch go through :meth:`loraqa.answering.Answerer.answer`, the path evaluation
  takes, so questions on the same paragraph, whichever requests they came in, share its KV cache;
* a request whose client has gone (:meth:`Job.cancel`) is skipped if the worker has not taken it yet, and an
  answer for a request nobody awaits any more is dropped: neither disturbs the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds as many requests as it may; ``retry_after`` is a guess, in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class WorkerFailed(Exception):
    """The model could not answer the micro-batch a request was in (500), or the server is stopping (503)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One request in the queue: its questions, and the future its handler awaits (on the event loop)."""

    id: int
    context: str
    questions: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set on the event loop when the client goes; read by the worker

    def cancel(self) -> None:
        self.cancelled = True
        self.future.cancel()

    def settle(self, result=None, error: BaseException | None = None) -> None:
        """Hand the result to the awaiting handler, from any thread; nothing happens if it has stopped waiting."""
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is waiting
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # cancelled: its client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class Stats:
    requests: int = 0  # taken into the queue
    rejected: int = 0  # refused with 503: the queue was full
    cancelled: int = 0  # clients that went away before their answers
    batches: int = 0
    questions_answered: int = 0
    largest_batch: int = 0  # questions in the largest micro-batch
    failed_batches: int = 0
    busy_seconds: float = 0.0  # the worker's time answering


class Batcher:
    """The queue and its worker thread: :meth:`start`, :meth:`submit` from the event loop, :meth:`stop`."""

    def __init__(self, answerer, *, queue_size: int, max_batch: int, gather: float = 0.2):
        self.answerer = answerer
        self.queue_size, self.max_batch, self.gather = queue_size, max_batch, gather
        self._in_flight, self._last_seconds = 0, 0.0  # requests when the last batch ended, its answering time
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._carry: Job | None = None  # taken from the queue but left for the next batch (it would overflow)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards stats
        self.stats = Stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraqa-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def waiting(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    def snapshot(self) -> dict:
        with self._lock:
            stats = dataclasses.asdict(self.stats)
        return {**stats, "busy_seconds": round(stats["busy_seconds"], 3), "waiting": self.waiting()}

    def submit(self, context: str, questions: list[str]) -> Job:
        """Queue a request (on the event loop); :class:`QueueFull` when there is no room."""
        loop = asyncio.get_running_loop()
        job = Job(next(self._ids), context, list(questions), loop, loop.create_future())
        if not self.alive():
            raise WorkerFailed("the server is stopping", status=503)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._count(rejected=1)
            raise QueueFull(self._retry_after()) from None
        self._count(requests=1)
        return job

    def cancel(self, job: Job) -> None:
        """The client of ``job`` has gone: skip it if it has not been taken, drop its answers otherwise."""
        if not job.future.done():
            self._count(cancelled=1)
        job.cancel()

    def _retry_after(self) -> int:
        """Seconds until the queue has room, judged by the answers a second so far (1 to 60)."""
        with self._lock:
            rate = self.stats.questions_answered / self.stats.busy_seconds if self.stats.busy_seconds else 0.0
            per_request = self.stats.questions_answered / max(self.stats.requests, 1) or 1.0
        seconds = self.waiting() * per_request / rate if rate else 1.0
        return int(min(max(math.ceil(seconds), 1), 60))

    def _count(self, **deltas) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch under way, then fail what is still queued ("the server is stopping")."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        leftover = [self._carry] if self._carry else []
        self._carry = None
        while True:
            try:
                leftover.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in leftover:
            job.settle(error=WorkerFailed("the server is stopping", status=503))

    # ------------------------------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._take(wait=0.1)
            if jobs:
                self._answer(jobs)

    def _next(self, wait: float | None) -> Job | None:
        """The next job not cancelled: the carried one first, then the queue's (waiting up to ``wait`` s
        for the first; None: do not wait)."""
        while True:
            if self._carry is not None:
                job, self._carry = self._carry, None
            else:
                try:
                    job = self._queue.get(timeout=wait) if wait else self._queue.get_nowait()
                except queue.Empty:
                    return None
            if not job.cancelled:
                return job

    def _take(self, wait: float) -> list[Job]:
        """Whatever is queued, in order, up to ``max_batch`` questions (at least one request, however many
        questions it has); a request that would overflow the batch is carried to the next one.

        The clients in flight when the last batch ended (those it answered, and those then queued) tend to ask
        again within a round trip: the batch waits for that many requests, so that clients stay together
        instead of splitting into two halves that take turns (16 clients in batches of 8). It waits at most
        an eighth of the last batch's answering time (waiting in vain costs at most ~12% of the throughput),
        and at most ``gather`` seconds."""
        first = self._next(wait)
        if first is None:
            return []
        jobs, n = [first], len(first.questions)
        expected = max(self._in_flight, 1)
        deadline = time.monotonic() + min(self.gather, self._last_seconds / 8)
        while n < self.max_batch:
            patience = deadline - time.monotonic() if len(jobs) < expected else 0.0
            job = self._next(patience if patience > 0 else None)
            if job is None:
                break
            if n + len(job.questions) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            n += len(job.questions)
        return jobs

    def _answer(self, jobs: list[Job]) -> None:
        """Answer the jobs' questions together and settle each job with its own answers."""
        from ..answering import asked  # imported with the model, not with the app

        examples = [ex for job in jobs for ex in asked(job.context, job.questions, prefix=f"{job.id}:")]
        start = time.perf_counter()
        try:
            records, _ = self.answerer.answer(examples)
            if [r["id"] for r in records] != [ex.id for ex in examples]:
                # each answer must go to its own question: a mismatch fails the batch, never misroutes
                raise RuntimeError("the answers came back out of order")
        except Exception as e:
            # the model failed on this batch: its requests get the error, the worker goes on
            log.exception("loraqa serve: a batch of %d questions failed", len(examples))
            self._count(failed_batches=1, busy_seconds=time.perf_counter() - start)
            for job in jobs:
                job.settle(error=WorkerFailed(f"the model failed on this batch ({type(e).__name__})"))
            return
        done = time.perf_counter()
        self._in_flight, self._last_seconds = len(jobs) + self.waiting(), done - start
        self._count(batches=1, questions_answered=len(examples), busy_seconds=done - start)
        with self._lock:
            self.stats.largest_batch = max(self.stats.largest_batch, len(examples))
        at = 0
        for job in jobs:
            mine = records[at : at + len(job.questions)]
            at += len(job.questions)
            job.settle(
                result={"records": mine, "seconds": done - job.arrived, "batch_questions": len(examples)}
            )

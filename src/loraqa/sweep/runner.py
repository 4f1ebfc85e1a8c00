"""Runners: what runs a sweep's attempts. Both run the same :func:`~.attempt.run_attempt` per trial.

- :class:`LocalRunner` (the default): child processes on this machine, ``parallel`` at a time, each worker
  with its own GPU (``CUDA_VISIBLE_DEVICES``) or its share of the cores (``OMP_NUM_THREADS``).
- ``RayRunner`` (loraqa.sweep.ray_runner, ``--backend ray``): one Ray task per trial, on a local Ray
  instance or a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from .attempt import Children, Job, OnEnd, Outcome, record_crash, run_attempt
from .machine import nvidia_gpus

log = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the sweep alone (not its children, as Ctrl-C does): stopping must pass it on."""


class Runner(Protocol):
    def run(self, jobs: Iterable[Job], on_end: OnEnd | None = None) -> None:
        """Run every job's attempt and return when all have ended. A job is taken from ``jobs`` only when a
        worker is free for it (a search asks its next trial then; under Ray, when fewer than ``parallel`` are in
        flight); ``on_end(job, outcome)`` is called as each attempt ends, one call at a time, before that worker
        takes its next job. On KeyboardInterrupt (Ctrl-C, or
        :class:`Terminated`) stop the running attempts, let them record themselves as interrupted, re-raise."""

    def stop(self, forward: int | None) -> None:
        """Start no new attempt; pass signal ``forward`` (None: they already got it) to the running ones and
        wait for them to end."""


def worker_slots(parallel: int, device: str | None) -> list[dict]:
    """One slot per parallel worker: on GPUs its own CUDA_VISIBLE_DEVICES (round robin when there are more
    workers than GPUs); on CPUs its share of the cores as OMP_NUM_THREADS."""
    slots = [{"id": i, "env": {}, "where": ""} for i in range(parallel)]
    if parallel == 1:
        return slots
    gpus = [] if (device or "").startswith("cpu") or (device or "").startswith("cuda:") else nvidia_gpus()
    if gpus:
        if parallel > len(gpus):
            log.warning("--parallel %d with %d GPUs: workers share GPUs", parallel, len(gpus))
        for s in slots:
            idx, _name = gpus[s["id"] % len(gpus)]
            s["env"]["CUDA_VISIBLE_DEVICES"] = idx
            s["where"] = f"GPU {idx}"
    elif "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, usable_cores() // parallel)
        for s in slots:
            s["env"]["OMP_NUM_THREADS"] = str(threads)
    return slots


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: taskset, a Slurm job's --cpus-per-task), not all
    the host's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class LocalRunner:
    """Attempts in child processes of this one, ``parallel`` worker threads each waiting on its child."""

    def __init__(self, parallel: int, device: str | None, view, on_change: Callable[[], None]):
        self.parallel, self.device, self.view, self.on_change = parallel, device, view, on_change
        self.children = Children()

    def run(self, jobs: Iterable[Job], on_end: OnEnd | None = None) -> None:
        source, take = iter(jobs), threading.Lock()  # one worker at a time takes a job or reports one's end
        slots = worker_slots(self.parallel, self.device)
        interrupted = None
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="trial") as pool:
            workers = [pool.submit(self._work, slot, source, take, on_end) for slot in slots]
            try:
                while any(not w.done() for w in workers):
                    time.sleep(0.2)
            except KeyboardInterrupt as e:
                interrupted = e
                self.stop(signal.SIGTERM if isinstance(e, Terminated) else None)
        if interrupted is not None:
            raise interrupted
        for w in workers:  # the job source failed (a search's study, say): the sweep cannot go on
            if w.exception() is not None:
                raise w.exception()

    def _work(self, slot: dict, source: Iterator[Job], take: threading.Lock, on_end: OnEnd | None) -> None:
        """One worker: its slot's attempts, one job after another, until the jobs or the sweep end. Should the
        job source or ``on_end`` fail (a search's study), the sweep stops at once, its running trials with it
        (each saving a checkpoint), and :meth:`run` raises that error."""
        try:
            self._attempts(slot, source, take, on_end)
        except Exception as e:
            log.error("the sweep stops: %r", e)
            self.stop(signal.SIGTERM)
            raise

    def _attempts(
        self, slot: dict, source: Iterator[Job], take: threading.Lock, on_end: OnEnd | None
    ) -> None:
        while not self.children.stop.is_set():
            with take:
                job = next(source, None)
            if job is None:
                return
            job = dataclasses.replace(
                job, env={**job.env, **slot["env"]}, worker=slot["id"], where=slot["where"]
            )
            try:
                outcome = run_attempt(job, self.children, self.view, self.on_change)
            except Exception as e:  # raised outside run_attempt's own recording, which holds the trial's lock
                record_crash(job.trial_dir, job.name, e)
                outcome = Outcome(job.name, "failed", f"FAILED {job.name}: sweep error: {e!r}")
            self.finish(outcome)
            if on_end is not None:
                with take:
                    on_end(job, outcome)

    def finish(self, outcome: Outcome) -> None:
        if outcome.message:
            shown = outcome.status if outcome.status in ("done", "failed") else "skipped"
            self.view.finish(outcome.name, shown, outcome.message)

    def stop(self, forward: int | None) -> None:
        self.view.note("stopping: waiting for the running trials to exit…", style="yellow")
        self.children.stop_all(forward)

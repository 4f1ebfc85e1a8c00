"""Trials as Ray tasks: ``loraqa sweep CONFIG -o DIR --backend ray [--address ADDR]``.

Without an address (``--address``, else ``$RAY_ADDRESS`` as ``ray.init`` reads it), a local Ray instance is
started for the sweep and stopped after it; with one, the sweep first checks that something answers there (a
wrong address fails in seconds, naming it) and joins that cluster (``ray start --head`` on one node, ``ray start --address=HEAD:6379`` on the others). Each
trial is one Ray task holding ``sweep.resources_per_trial`` (CPUs, GPUs; Ray sets CUDA_VISIBLE_DEVICES and
OMP_NUM_THREADS for it). The task runs the same attempt as the local runner -- ``loraqa train`` in a child
process, so a crash ends that trial only -- and writes the same files into the trial's folder, which must be
on storage every node sees under the same path. Bookkeeping lives in those files, not in Ray: a rerun after
the driver was killed skips finished trials and resumes interrupted ones from their checkpoints, and Ray
retries nothing itself (``max_retries=0``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from ..config import ConfigError
from ..layout import METRICS_FILE, TRIAL_RUN_FILE
from .attempt import Children, Job, OnEnd, Outcome, record_crash, run_attempt
from .runner import usable_cores
from .state import read_json_or, try_lock
from .view import QuietView

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 60.0  # after ray.cancel, how long the tasks get to stop their children and record it


# a reachable head answers at once; a wrong address must fail well within a minute, not after Ray's retries
CONNECT_TIMEOUT_SECONDS = 10.0
INIT_TIMEOUT_SECONDS = 50.0


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """The cluster to join (None: a fresh local instance) and where that came from: ``--address``, else
    ``$RAY_ADDRESS`` as ``ray.init`` reads it (``local`` there, or nothing, means a local instance)."""
    if address:
        return address, "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return (env, "RAY_ADDRESS") if env and env != "local" else (None, "")


def check_reachable(address: str, where: str) -> None:
    """Fail at once, naming the address, when nothing listens there: ``ray.init`` would retry for minutes.
    ``auto`` (the cluster this node belongs to) is left to Ray."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    hint = "check that a Ray head runs there (`ray status` on that node; `ray start --head` prints its address)"
    if not host or not port.isdigit():
        raise ConfigError(f"{where} {address!r}: expected HOST:PORT, the Ray head's address (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as e:
        raise ConfigError(f"{where} {address}: no Ray cluster answers ({e.strerror or e}); {hint}") from None


def _give_up_on_init(address: str, where: str) -> None:
    """``ray.init`` has not connected in time (something listens at the address, but no Ray head answers):
    nothing has started yet, so leaving at once loses nothing."""
    print(f"loraqa: error: {where} {address}: no Ray cluster answered within {INIT_TIMEOUT_SECONDS:.0f} s; check "
          "that a Ray head runs there (`ray status` on that node)", file=sys.stderr, flush=True)
    os._exit(2)


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'loraqa[ray]'") from None
    return ray


def ray_attempt(job: Job, driver_python: str) -> Outcome:
    """The Ray task: one attempt at one trial, on the node that holds its resources. The attempt runs in a
    thread so that ``ray.cancel`` (a KeyboardInterrupt in this, the main thread) can stop the child and let the
    attempt record itself as interrupted."""
    import ray

    if job.command and job.command[0] == driver_python:
        # the driver's interpreter need not exist on this node; the one running this task has loraqa
        job = dataclasses.replace(job, command=[sys.executable, *job.command[1:]])
    gpus = ray.get_gpu_ids()
    where = socket.gethostname() + (f" GPU {','.join(map(str, gpus))}" if gpus else "")
    job = dataclasses.replace(job, where=where, worker=os.getpid())
    parent = (
        os.getppid()
    )  # the raylet; when it dies (with the driver of a local instance) Ray kills our child
    children = Children(orphaned=lambda: os.getppid() != parent)
    box: dict = {}

    def attempt():
        try:
            box["outcome"] = run_attempt(job, children, QuietView())
        except BaseException as e:  # handed to the driver by ray.get
            box["error"] = e

    thread = threading.Thread(target=attempt, name=f"attempt {job.name}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:  # ray.cancel
        children.stop_all(signal.SIGTERM)
        thread.join()
        raise
    if "error" in box:
        raise box["error"]
    return box["outcome"]


class RayRunner:
    """Submits one Ray task per trial (at most ``parallel`` in flight, if given), reports them as they start
    and end, and rewrites sweep.json (``on_change``) as they do; the tasks themselves write only their trial's
    folder."""

    def __init__(self, resources: dict[str, float], address: str | None, parallel: int | None, view,
                 on_change: Callable[[], None], where: str = "--address"):  # fmt: skip
        self.resources, self.address, self.parallel, self.where = resources, address, parallel, where
        self.view, self.on_change = view, on_change
        self.pending: dict = {}  # ObjectRef -> (job, attempts recorded before it started)
        self.on_end: OnEnd | None = None
        self.ray = None

    def run(self, jobs: Iterable[Job], on_end: OnEnd | None = None) -> None:
        source = iter(jobs)
        first = next(source, None)
        if first is None:  # nothing to run: no Ray instance to start
            return
        source = itertools.chain([first], source)
        self.on_end = on_end
        ray = self.ray = import_ray()
        self._init()
        try:
            self._check_fits()
            task = ray.remote(
                num_cpus=self.resources["cpus"], num_gpus=self.resources["gpus"], max_retries=0
            )(ray_attempt)
            try:
                while True:
                    # a job is taken only once it has a place: a search asks its next trial then
                    while (self.parallel is None or len(self.pending) < self.parallel) and (
                        job := next(source, None)
                    ) is not None:
                        ref = task.options(name=f"loraqa trial {job.name}").remote(job, sys.executable)
                        self.pending[ref] = (job, _attempts(job))
                    if not self.pending:
                        break
                    ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
                    for ref in ready:
                        self._collect(ref)
                    self._report_starts()
            except BaseException:  # Ctrl-C, or the job source or on_end failed: the running trials stop cleanly
                self.stop(None)
                raise
        finally:
            ray.shutdown()  # a local instance stops; from a cluster this driver disconnects

    def _init(self) -> None:
        previous_term = signal.getsignal(signal.SIGTERM)
        if self.address:
            watchdog = threading.Timer(INIT_TIMEOUT_SECONDS, _give_up_on_init, (self.address, self.where))
            watchdog.daemon = True
            watchdog.start()
            try:
                self.ray.init(address=self.address, logging_level=logging.WARNING)
            finally:
                watchdog.cancel()
        else:  # a fresh local instance
            self.ray.init(address="local", num_cpus=usable_cores(), include_dashboard=False,
                          logging_level=logging.WARNING)  # fmt: skip
        if callable(previous_term):  # Ray installs its own SIGTERM handler: the sweep's must stay
            signal.signal(signal.SIGTERM, previous_term)

    def _check_fits(self) -> None:
        """A trial that fits on no node would wait forever: refuse it on a local instance, warn on a cluster
        (an autoscaler may add such a node)."""
        need = {"CPU": self.resources["cpus"], "GPU": self.resources["gpus"]}
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
            return
        have = "; ".join(f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs" for r in nodes) or "no node"
        msg = (f"sweep.resources_per_trial asks for {need['CPU']:g} CPUs and {need['GPU']:g} GPUs per trial, "
               f"but no Ray node has that much ({have})")  # fmt: skip
        if not self.address:
            raise ConfigError(msg + ": lower it, or run on a cluster with --address")
        log.warning("%s: trials wait until such a node joins", msg)

    def _collect(self, ref) -> None:
        ray = self.ray
        job, before = self.pending.pop(ref)
        started = before is None or self._report_start(job, before)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.TaskCancelledError:  # one that never started ends silently
            message = f"interrupted {job.name} (rerun the command to resume it)" if started else ""
            outcome = Outcome(job.name, "interrupted", message)
        except ray.exceptions.RayError as e:  # the worker or its node died, or the bookkeeping failed
            outcome = _lost(job, e)
        if outcome.message:
            shown = outcome.status if outcome.status in ("done", "failed") else "skipped"
            self.view.finish(outcome.name, shown, outcome.message)
        self.on_change()
        if self.on_end is not None:
            self.on_end(job, outcome)

    def _report_starts(self) -> None:
        for ref, (job, before) in list(self.pending.items()):
            if before is not None and self._report_start(job, before):
                self.pending[ref] = (job, None)

    def _report_start(self, job: Job, before: int | None) -> bool:
        """Tell the view once the task has recorded its attempt (it may have waited for resources)."""
        if before is None:
            return False
        attempts = (read_json_or(Path(job.trial_dir) / TRIAL_RUN_FILE, {}) or {}).get("attempts", [])
        if len(attempts) <= before:
            return False
        self.view.start(job.name, attempts[-1].get("where") or "", len(attempts))
        self.on_change()
        return True

    def stop(self, forward: int | None) -> None:
        """Cancel every task: one not started never runs; a running one gets a KeyboardInterrupt, stops its
        child with SIGTERM and records the attempt as interrupted. Tasks still running after the grace period
        are killed (their attempts are then found lost by the rerun)."""
        if not self.pending:
            return
        ray = self.ray
        self.view.note("stopping: cancelling the running trials…", style="yellow")
        refs = list(self.pending)
        for ref in refs:
            ray.cancel(ref)
        _, left = ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_SECONDS)
        for ref in left:
            ray.cancel(ref, force=True)
        for ref in refs:
            if ref not in left:
                self._collect(ref)
        self.pending.clear()


def _lost(job: Job, error: Exception) -> Outcome:
    """A Ray task that ended without an outcome: its trial is recorded failed, but only under the trial's lock,
    since the task's ``loraqa train`` child can outlive it (and may still finish or save a checkpoint)."""
    tdir = Path(job.trial_dir)
    fd = try_lock(tdir)
    if fd is None:
        return Outcome(job.name, "interrupted", f"lost the Ray task of {job.name} ({type(error).__name__}); its "
                                                "trial process still runs: rerun the command to resume it")  # fmt: skip
    try:
        if (tdir / METRICS_FILE).exists():
            return Outcome(job.name, "done", f"done {job.name} (its Ray task was lost after it finished)")
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        record_crash(tdir, job.name, RuntimeError(f"Ray task lost: {type(error).__name__}: {first}"))
    finally:
        os.close(fd)
    return Outcome(job.name, "failed", f"FAILED {job.name}: the Ray task was lost ({type(error).__name__})")


def _attempts(job: Job) -> int:
    return len((read_json_or(Path(job.trial_dir) / TRIAL_RUN_FILE, {}) or {}).get("attempts", []))

"""One attempt at one trial, the same under every runner: take the trial's lock, record the attempt in run.json,
run the trial's command (``loraqa train``) in a child process with its output in trial.log, and record how
it ended: done (metrics.json), interrupted (the sweep was stopping, or a stop signal reached this trial alone)
or failed (error.json with the exit code and the tail of stderr).

The local runner calls :func:`run_attempt` from a worker thread; the Ray runner from a Ray task on whichever
node holds the trial's resources. What it needs travels in a picklable :class:`Job`.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import locks, signals
from ..io import write_json_atomic, write_text_atomic
from ..layout import (
    ERROR_FILE,
    METRICS_FILE,
    TRIAL_CONFIG_FILE,
    TRIAL_LOCK_FILE,
    TRIAL_LOG_FILE,
    TRIAL_RUN_FILE,
)
from .machine import machine_info, now
from .state import read_json_or, try_lock
from .view import fmt_score, hms

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 40
STDERR_TAIL_CHARS = 6000
# Ctrl-C reaches the sweep and its children (one process group) at once, so a worker thread may reap a child
# stopped by it before the main thread has woken up, taken the KeyboardInterrupt and set the stop flag (under
# load this happened in 6 of 40 tries). After a child's SIGINT exit the worker waits this long for the flag before
# it moves on, so that no new trial starts during a Ctrl-C; on an idle machine the flag is set within
# milliseconds, so it costs nothing but a delay when a child alone gets a SIGINT. (The children keep the sweep's
# process group so that killing the group, or closing the terminal, still ends them all; and SIGTERM cannot
# race: the sweep sets the flag before passing it on.)
SIGINT_GRACE_SECONDS = 30.0
# how a child reports Ctrl-C: killed by SIGINT (Python's default), or KeyboardInterrupt caught and exit
# status 130 = 128 + SIGINT (what `loraqa train` does)
SIGINT_EXITS = (-signal.SIGINT, signals.exit_status(signal.SIGINT))
# how long a rerun waits for the trial process of a dead sweep to save its checkpoint and exit
ORPHAN_STOP_SECONDS = 300.0


def trial_command(trial_yaml: Path, trial_dir: Path, device: str | None) -> list[str]:
    """The child process that runs one trial (tests replace this)."""
    cmd = [sys.executable, "-m", "loraqa.cli", "train", str(trial_yaml), "--output-dir", str(trial_dir)]
    return cmd + (["--device", device] if device else [])


@dataclass
class Job:
    """Everything one attempt needs; picklable, as a Ray task receives it."""

    name: str
    overrides: dict[str, Any]
    config_yaml: str  # the trial's resolved config, written to trial.yaml
    trial_dir: str
    command: list[str]
    shard: str
    env: dict[str, str] = field(default_factory=dict)  # set on top of the environment for the child
    worker: int | str | None = None
    where: str = ""  # "GPU 1", a Ray node, ...
    machine: dict | None = None  # None: found out where the attempt runs
    retry_failed: bool = False  # a trial that failed (error.json) runs again: --retry-failed


@dataclass
class Outcome:
    name: str
    status: str  # done, failed, interrupted, skipped
    message: str  # the line the sweep prints


OnEnd = Callable[[Job, Outcome], None]  # told how each attempt ended (Runner.run)


class Children:
    """The child processes running attempts in this process, and the stop flag.

    The flag is set under the same lock that spawning takes, so once :meth:`request_stop` returns no new child
    starts and :meth:`signal_all` reaches every child there will be."""

    def __init__(self, orphaned: Callable[[], bool] | None = None):
        self.stop = threading.Event()
        # whether the process that hosts these attempts has lost what started it (a Ray worker whose raylet
        # died with the driver): a child then killed by SIGKILL was killed in the teardown, not by a fault
        self.orphaned = orphaned or (lambda: False)
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, cmd: list[str], **popen_kwargs) -> subprocess.Popen | None:
        with self._lock:
            if self.stop.is_set():
                return None
            proc = subprocess.Popen(cmd, **popen_kwargs)
            self._procs[name] = proc
            return proc

    def forget(self, name: str) -> None:
        with self._lock:
            self._procs.pop(name, None)

    def request_stop(self) -> None:
        with self._lock:
            self.stop.set()

    def signal_all(self, sig: int) -> None:
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def any_running(self) -> bool:
        with self._lock:
            return any(p.returncode is None for p in self._procs.values())

    def stop_all(self, first: int | None, grace: float = 30.0) -> None:
        """Stop the sweep: no new child starts; send ``first`` (None: they were signalled already, as by
        Ctrl-C), give them ``grace`` seconds to exit, then SIGTERM, then SIGKILL. A second Ctrl-C here kills
        them at once."""
        self.request_stop()
        try:
            for sig, wait in ((first, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                if sig is not None:
                    self.signal_all(sig)
                deadline = time.monotonic() + wait
                while self.any_running() and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not self.any_running():
                    return
        except KeyboardInterrupt:
            self.signal_all(signal.SIGKILL)


def record_crash(trial_dir: str | os.PathLike, name: str, error: BaseException) -> None:
    """A bug in the bookkeeping or a lost Ray worker: recorded like a failed trial (``--retry-failed`` runs it
    again)."""
    log.error("trial %s: %r", name, error)
    write_json_atomic(Path(trial_dir) / ERROR_FILE, {
        "trial": name, "exit_code": None, "summary": f"sweep error: {error!r}", "stderr_tail": "",
    })  # fmt: skip


def run_attempt(job: Job, children: Children, view, on_change: Callable[[], None] = lambda: None) -> Outcome:
    """Run one attempt at ``job``'s trial unless another process holds it or it finished meanwhile.
    ``on_change`` is called after run.json changes (the local runner rewrites sweep.json there)."""
    tdir = Path(job.trial_dir)
    if children.stop.is_set():
        return Outcome(job.name, "skipped", "")
    fd = try_lock(tdir)
    if fd is None:  # a descriptor may be 0 (stdin closed): only None means not held
        fd = _wait_for_orphan(tdir, children)
    if fd is None:
        return Outcome(job.name, "skipped", f"skip {job.name}: another process is running it")
    try:
        if (tdir / METRICS_FILE).exists():  # finished by another process meanwhile
            os.close(fd)
            fd = None
            settle_finished(tdir)
            return Outcome(job.name, "done", f"done {job.name} (finished elsewhere)")
        if (tdir / ERROR_FILE).exists() and not job.retry_failed:  # failed under another process meanwhile
            return Outcome(job.name, "skipped", f"skip {job.name}: it failed in another process "
                                                f"(see {tdir / ERROR_FILE}; --retry-failed runs it again)")  # fmt: skip
        return _attempt(job, tdir, fd, children, view, on_change)
    except Exception as e:  # a bug in the bookkeeping: recorded while the trial is still ours, so no other
        record_crash(tdir, job.name, e)  # shard can have started it again meanwhile
        return Outcome(job.name, "failed", f"FAILED {job.name}: sweep error: {e!r} — see {tdir / ERROR_FILE}")
    finally:
        if fd is not None:
            os.close(fd)


def _wait_for_orphan(tdir: Path, children: Children) -> int | None:
    """The trial's lock, once its holder lets go, when the holder is a trial process whose sweep died on this
    host: such a child is stopping by itself (signals.watch_parent), saving a checkpoint, and the trial is
    this sweep's to resume. None at once when a live sweep (here or elsewhere) runs the trial, or once this
    sweep is stopping."""
    attempts = (read_json_or(tdir / TRIAL_RUN_FILE, {}) or {}).get("attempts", [])
    last = attempts[-1] if attempts else {}
    pid = last.get("pid")
    if last.get("status") != "running" or last.get("host") != socket.gethostname() or not pid or locks.process_alive(pid):
        return None
    deadline = time.monotonic() + ORPHAN_STOP_SECONDS
    while time.monotonic() < deadline and not children.stop.is_set():
        fd = try_lock(tdir)
        if fd is not None:
            return fd
        time.sleep(0.2)
    return None


def _begin(job: Job, tdir: Path, machine: dict) -> tuple[dict, dict]:
    """Record a new attempt in run.json (an older one still marked running was lost with its sweep: we hold
    the lock now). Returns run.json's content and the new attempt."""
    write_text_atomic(tdir / TRIAL_CONFIG_FILE, job.config_yaml)
    run = read_json_or(tdir / TRIAL_RUN_FILE, {}) or {}
    attempts = run.get("attempts", [])
    for a in attempts:
        if a.get("status") == "running":
            a.update(status="lost", wall_seconds=_lost_wall_seconds(tdir, a), wall_seconds_estimated=True)
    attempt = {"started_at": now(), "host": machine["host"], "shard": job.shard, "worker": job.worker,
               "where": job.where or None, "status": "running", "pid": os.getpid()}  # fmt: skip
    attempts.append(attempt)
    run.update(name=job.name, overrides=job.overrides, machine=machine, attempts=attempts)
    write_json_atomic(tdir / TRIAL_RUN_FILE, run)
    return run, attempt


def settle_finished(trial_dir: str | os.PathLike) -> None:
    """A trial whose child wrote metrics.json, but whose sweep was killed before it recorded the end (run.json
    still says running): record that attempt as done, its wall time estimated from its files, so the rerun,
    which skips the finished trial, does not leave it without a wall time. Only while nobody holds the trial."""
    tdir = Path(trial_dir)
    run = read_json_or(tdir / TRIAL_RUN_FILE, {}) or {}
    if not any(a.get("status") == "running" for a in run.get("attempts", [])):
        return
    fd = try_lock(tdir)
    if fd is None:
        return
    try:
        run = read_json_or(tdir / TRIAL_RUN_FILE, {}) or {}
        attempts = run.get("attempts", [])
        for i, a in enumerate(attempts):
            if a.get("status") == "running":  # the last one finished the trial; any other was lost
                done = i == len(attempts) - 1 and (tdir / METRICS_FILE).exists()
                a.update(status="done" if done else "lost", wall_seconds=_lost_wall_seconds(tdir, a),
                         wall_seconds_estimated=True)  # fmt: skip
        run["wall_seconds"] = round(sum(a.get("wall_seconds") or 0 for a in attempts), 3)
        write_json_atomic(tdir / TRIAL_RUN_FILE, run)
    finally:
        os.close(fd)


def _undo_begin(tdir: Path, run: dict) -> None:
    run["attempts"].pop()
    if run["attempts"]:
        write_json_atomic(tdir / TRIAL_RUN_FILE, run)
    else:
        (tdir / TRIAL_RUN_FILE).unlink(missing_ok=True)


def _attempt(job: Job, tdir: Path, lock_fd: int, children: Children, view, on_change) -> Outcome:
    machine = job.machine or machine_info()
    run, attempt = _begin(job, tdir, machine)
    on_change()
    cmd = job.command
    # the child stops (resumably) when this process dies: see signals.watch_parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **job.env, signals.PARENT_ENV: str(os.getpid())}
    view.start(job.name, job.where, len(run["attempts"]))
    start = time.perf_counter()
    with open(tdir / TRIAL_LOG_FILE, "ab") as log_file:
        log_file.write(
            f"\n===== attempt {len(run['attempts'])} {attempt['started_at']}: {shlex.join(cmd)}\n".encode()
        )
        log_file.flush()
        # the child inherits the lock, so the trial stays locked while an orphaned child still runs
        proc = children.spawn(job.name, cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.PIPE,
                              env=env, pass_fds=(lock_fd,) if locks.SUPPORTED else ())  # fmt: skip
        if proc is None:  # the sweep began stopping meanwhile: this attempt never started
            _undo_begin(tdir, run)
            on_change()
            return Outcome(job.name, "skipped", "")
        (tdir / ERROR_FILE).unlink(missing_ok=True)  # the last failure's record, kept until a new attempt runs
        pump = StderrPump(job.name, log_file, view)
        reader = threading.Thread(target=pump.run, args=(proc.stderr,), daemon=True)
        reader.start()
        rc, max_rss_mb = _wait(proc)
        reader.join()
        proc.stderr.close()
        children.forget(job.name)
    wall = time.perf_counter() - start
    status = _verdict(tdir, rc, children)
    attempt.update(finished_at=now(), wall_seconds=round(wall, 3), exit_code=rc, status=status,
                   max_rss_mb=max_rss_mb)  # fmt: skip
    run["wall_seconds"] = round(sum(a.get("wall_seconds") or 0 for a in run["attempts"]), 3)
    if status == "failed":
        attempt["error"] = _failure_summary(rc, pump.tail)
        write_json_atomic(tdir / ERROR_FILE, {
            "trial": job.name, "exit_code": rc, "signal": signal_name(rc), "summary": attempt["error"],
            "stderr_tail": pump.text(), "wall_seconds": round(wall, 3), "max_rss_mb": max_rss_mb,
            "command": shlex.join(cmd), "host": machine["host"], "finished_at": attempt["finished_at"],
            "log": TRIAL_LOG_FILE,
        })  # fmt: skip
    write_json_atomic(tdir / TRIAL_RUN_FILE, run)
    on_change()
    return Outcome(job.name, status, _message(job.name, status, tdir, wall, attempt.get("error")))


def _verdict(tdir: Path, rc: int | None, children: Children) -> str:
    if (tdir / METRICS_FILE).exists():
        return "done"
    if children.stop.is_set():
        return "interrupted"
    if rc in SIGINT_EXITS and children.stop.wait(SIGINT_GRACE_SECONDS):  # Ctrl-C: see SIGINT_GRACE_SECONDS
        return "interrupted"
    if signals.stopped_by_request(rc):  # a stop meant for this trial alone: it saved what it could; a rerun
        return "interrupted"  # resumes it, as after a stopped sweep (and it is no failure to look into)
    if rc == -signal.SIGKILL and children.orphaned():  # as a rerun finds an attempt of a killed sweep
        return "lost"
    return "failed"


def _message(name: str, status: str, tdir: Path, wall: float, error: str | None) -> str:
    if status == "done":
        m = read_json_or(tdir / METRICS_FILE, {}) or {}
        if m.get("pruned"):
            return f"pruned {name} at step {m.get('pruned_at')} (best in-training F1 {fmt_score(m.get('best_eval_f1'))})"
        return (
            f"done {name}: F1 {fmt_score(m.get('f1'))}  EM {fmt_score(m.get('exact_match'))}  ({hms(wall)})"
        )
    if status == "failed":
        return f"FAILED {name}: {error} — see {tdir / ERROR_FILE}"
    if status == "lost":
        return f"lost {name}: its sweep went away (rerun the command to resume it)"
    return f"interrupted {name} (rerun the command to resume it)"


def _lost_wall_seconds(tdir: Path, attempt: dict) -> float | None:
    """For an attempt whose sweep was killed: from its start to the last file its child wrote."""
    try:
        started = datetime.fromisoformat(attempt["started_at"]).timestamp()
    except (KeyError, ValueError):
        return None
    skip = {TRIAL_LOCK_FILE, TRIAL_RUN_FILE, TRIAL_CONFIG_FILE, ERROR_FILE}
    mtimes = [p.stat().st_mtime for p in tdir.rglob("*") if p.is_file() and p.name not in skip]
    last = max((m for m in mtimes if m >= started), default=None)
    return round(last - started, 3) if last is not None else 0.0


def _wait(proc: subprocess.Popen) -> tuple[int, float | None]:
    """Wait for the child; its exit code (negative: killed by that signal) and peak RSS in MiB."""
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere
        return (proc.returncode if proc.returncode is not None else proc.wait()), None
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return proc.returncode, round(rss, 1)


def signal_name(rc: int | None) -> str | None:
    if rc is None or rc >= 0:
        return None
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _failure_summary(rc: int | None, tail) -> str:
    sig = signal_name(rc)
    if sig:
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if sig == "SIGKILL" else ""
        return f"killed by {sig}{hint}"
    last = next((line for line in reversed(tail) if line.strip()), "")
    return f"exit code {rc}: {last.strip()[:300]}" if last else f"exit code {rc}"


_TQDM = re.compile(r"\|\s*[\d.]+[kMG]?/[\d.?]+[kMG]?\s*\[")


class StderrPump:
    """Reads a child's stderr: copies it to the trial log, keeps the last lines for error.json, hands tqdm
    progress updates (``\\r``-separated) and ordinary lines to the view."""

    def __init__(self, trial: str, log_file, view):
        self.trial, self.log_file, self.view = trial, log_file, view
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    def run(self, pipe) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        buf = ""
        while True:
            chunk = pipe.read1(65536)
            if not chunk:
                break
            self.log_file.write(chunk)
            self.log_file.flush()
            buf += decoder.decode(chunk)
            while True:
                m = re.search(r"[\r\n]", buf)
                if not m:
                    break
                segment, sep, buf = buf[: m.start()], buf[m.start()], buf[m.end() :]
                self._segment(segment, sep)
        buf += decoder.decode(b"", final=True)
        if buf:
            self._segment(buf, "\n")

    def _segment(self, segment: str, sep: str) -> None:
        text = segment.rstrip()
        if not text:
            return
        if _TQDM.search(text):
            self.view.progress(self.trial, text.strip())
        elif sep == "\n":
            self.tail.append(text)
            self.view.line(self.trial, text)

    def text(self) -> str:
        out = "\n".join(self.tail)
        return out[-STDERR_TAIL_CHARS:]

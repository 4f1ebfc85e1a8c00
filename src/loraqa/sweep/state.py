"""Trial state, read from the files alone: locks, a trial's status, its entry in sweep.json, and sweep.json.

The files are the truth (a sweep killed at any moment leaves nothing else behind), so any process on any
machine that sees the folder can tell what is done: ``metrics.json`` = done, a held lock = running,
``error.json`` = failed, other files = unfinished, nothing = pending.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from ..io import read_json, write_json_atomic
from ..layout import (
    CHECKPOINTS_DIR,
    ERROR_FILE,
    LOG_FILE,
    METRICS_FILE,
    SWEEP_CONFIG_FILE,
    SWEEP_INDEX_FILE,
    SWEEP_INDEX_LOCK_FILE,
    TRAIN_METRICS_FILE,
    TRIAL_LOCK_FILE,
    TRIAL_RUN_FILE,
    sweep_command,
)
from ..metrics import RUN_FIGURES
from .machine import now
from .trials import Trial, axis_values, reference_values

try:  # advisory locks so two processes never run the same trial at once
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

STATUSES = ("done", "failed", "running", "unfinished", "pending")


# A status probe (is_locked) holds a shared lock for a moment; an exclusive try that meets one tries again
LOCK_RETRY_SECONDS = (0.02, 0.05, 0.1)


def try_lock(trial_dir: Path) -> int | None:
    """An open, exclusively flock-ed file descriptor, or None if another process holds the trial."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(trial_dir / TRIAL_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    for pause in (*LOCK_RETRY_SECONDS, None):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if pause is None:
                os.close(fd)
                return None
            time.sleep(pause)
    raise AssertionError("unreachable")


def is_locked(trial_dir: Path, lock_file: str = TRIAL_LOCK_FILE) -> bool:
    """Whether a process holds the trial (or, with ``lock_file=layout.LOCK_FILE``, the run folder). The probe
    takes a shared lock for a moment: probes never block each other, and a read-only lock file (another user's
    sweep) can still be probed."""
    path = Path(trial_dir) / lock_file
    if fcntl is None or not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # unreadable: nobody can tell
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


@contextlib.contextmanager
def _index_lock(sweep_dir: Path):
    """Held while sweep.json is read, merged and rewritten, so that shards writing at once keep each other's
    entries. Without one (a read-only folder, no fcntl) the write goes ahead unguarded."""
    fd = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # read-only: another user's lock file still locks
        with contextlib.suppress(OSError):
            fd = os.open(sweep_dir / SWEEP_INDEX_LOCK_FILE, flags, 0o666)
            break
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):  # no locks on this filesystem (ENOLCK): unguarded, as documented
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def trial_status(trial_dir: Path) -> str:
    """From the files: done (metrics.json), running (locked by a process), failed (error.json), unfinished
    (started, interrupted), or pending."""
    trial_dir = Path(trial_dir)
    if (trial_dir / METRICS_FILE).exists():
        return "done"
    if is_locked(trial_dir):
        return "running"
    if (trial_dir / ERROR_FILE).exists():
        return "failed"
    if any((trial_dir / f).exists() for f in (LOG_FILE, CHECKPOINTS_DIR, TRAIN_METRICS_FILE, TRIAL_RUN_FILE)):
        return "unfinished"
    return "pending"


def read_json_or(path: Path, default=None):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return default


def trial_record(trial: Trial, sweep_dir: Path) -> dict:
    """One trial's entry in sweep.json: overrides, status, wall time, key metrics or the error."""
    tdir = sweep_dir / trial.name
    status = trial_status(tdir)
    run = read_json_or(tdir / TRIAL_RUN_FILE, {}) or {}
    rec: dict[str, Any] = {
        "name": trial.name,
        "dir": trial.name,
        "overrides": trial.overrides,
        "values": trial.values,
        "status": status,
        "attempts": len(run.get("attempts", [])),
        "wall_seconds": run.get("wall_seconds"),
    }
    if status == "done":
        metrics = read_json_or(tdir / METRICS_FILE, {}) or {}
        rec["metrics"] = {k: metrics.get(k) for k in RUN_FIGURES if k in metrics}  # what sweep.json keeps
    elif status == "failed":
        err = read_json_or(tdir / ERROR_FILE, {}) or {}
        rec["exit_code"] = err.get("exit_code")
        rec["error"] = err.get("summary")
    return rec


@dataclass
class SweepIndex:
    """sweep.json: the trials with their status, rebuilt from the trial folders and rewritten atomically. Each
    invocation (a run of ``loraqa sweep`` on this folder, one per shard or rerun) keeps its own entry."""

    cfg: ExperimentConfig
    dir: Path
    trials: list[Trial]
    machine: dict
    invocation: dict
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self) -> None:
        assert self.cfg.sweep is not None
        with self.lock, _index_lock(self.dir):
            path = self.dir / SWEEP_INDEX_FILE
            old = read_json_or(path, {}) or {}
            invocations = [i for i in old.get("invocations", []) if i.get("id") != self.invocation["id"]]
            invocations.append(self.invocation)
            records = [trial_record(t, self.dir) for t in self.trials]
            counts = collections.Counter(r["status"] for r in records)
            index = {
                "name": self.cfg.name,
                "mode": self.cfg.sweep.mode,
                "axes": axis_values(self.cfg),
                "reference": reference_values(self.cfg),
                "config": SWEEP_CONFIG_FILE,
                "command": old.get("command") or self.invocation["command"],
                "reproduce": sweep_command(self.dir, lambda p: shlex.quote(str(p))),
                "created_at": old.get("created_at") or self.invocation["started_at"],
                "updated_at": now(),
                "machine": self.machine,
                "counts": {s: counts.get(s, 0) for s in STATUSES},
                "invocations": invocations[-50:],
                "trials": records,
            }
            write_json_atomic(path, index)

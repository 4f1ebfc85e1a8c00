"""Trial state, read from the files alone: locks, a trial's status, its entry in sweep.json, and sweep.json.

The files are the truth (a sweep killed at any moment leaves nothing else behind), so any process on any
machine that sees the folder can tell what is done: ``metrics.json`` = done, a held lock = running,
``error.json`` = failed, other files = unfinished, nothing = pending.
"""

from __future__ import annotations

import collections
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import locks
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
    TRIAL_CONFIG_FILE,
    TRIAL_LOCK_FILE,
    TRIAL_RUN_FILE,
    sweep_command,
)
from ..metrics import RUN_FIGURES
from .machine import now
from .trials import Trial, axis_values, reference_values

STATUSES = ("done", "failed", "running", "unfinished", "pending")


def try_lock(trial_dir: Path) -> int | None:
    """An open file descriptor holding the trial's lock (:func:`loraqa.locks.try_hold`), or None if another
    process holds the trial."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    return locks.try_hold(trial_dir / TRIAL_LOCK_FILE)


def is_locked(trial_dir: Path, lock_file: str = TRIAL_LOCK_FILE) -> bool:
    """Whether a process holds the trial (or, with ``lock_file=layout.LOCK_FILE``, the run folder)."""
    return locks.held(Path(trial_dir) / lock_file)


def trial_folders(sweep_dir: Path) -> list[str]:
    """The names of the trial folders in ``sweep_dir`` (each holds its trial.yaml), sorted."""
    return sorted(p.name for p in Path(sweep_dir).iterdir() if (p / TRIAL_CONFIG_FILE).is_file())


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
        with self.lock, locks.exclusive(self.dir / SWEEP_INDEX_LOCK_FILE):  # shards merge their entries
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

"""A sweep folder read back: each trial's config, status, metrics, log history and per-question predictions,
without loading a model. Damaged files are left out and named (``unreadable``), never raised."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ..card import portable_path
from ..config import ConfigError, from_dict
from ..io import read_json
from ..layout import SWEEP_CONFIG_FILE, SWEEP_INDEX_FILE, TRIAL_RUN_FILE
from ..runfolder import RunFolder
from ..sweep.state import trial_folders, trial_status
from ..sweep.trials import Trial, axis_values, expand_trials, format_value, reference_values


@dataclass(eq=False)
class TrialResult:
    trial: Trial
    dir: Path
    status: str
    metrics: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    error: dict = field(default_factory=dict)
    unreadable: list = field(default_factory=list)  # shared with SweepData: damaged files left out

    @property
    def name(self) -> str:
        return self.trial.name

    @property
    def done(self) -> bool:
        return self.status == "done"

    def m(self, key: str):
        return self.metrics.get(key)

    @cached_property
    def folder(self) -> RunFolder:
        return RunFolder(self.dir)

    @cached_property
    def history(self) -> list[dict]:
        return read_or(self.folder.history, self.folder.log_file, [], self.unreadable)

    @cached_property
    def progress(self) -> tuple[int, int] | None:
        """(the last step logged, the steps of the whole run) from the log history, where the Trainer logs the
        epochs done beside the step; None before the first log line."""
        last = next((h for h in reversed(self.history) if h.get("step") and h.get("epoch")), None)
        if last is None:
            return None
        step, train = int(last["step"]), self.trial.config.train
        total = train.max_steps if train.max_steps > 0 else round(step * train.epochs / float(last["epoch"]))
        return step, max(total, step)

    @cached_property
    def seconds_per_step(self) -> float | None:
        """Train time a step so far, from the clock in the latest checkpoint (its totals sum every segment of an
        interrupted run, and leave out steps trained again after one); None before the first checkpoint."""
        clocks = self.folder.checkpoint_clocks()
        if not clocks:
            return None
        step = max(clocks)
        seconds = (_read_or(clocks[step], {}) or {}).get("train_seconds")  # a half-written one: no estimate
        return seconds / step if isinstance(seconds, (int, float)) and seconds > 0 else None

    def curve(self, key: str) -> dict[int, float]:
        """step -> value of ``loss`` or ``eval_loss`` (the last logged value where a step repeats)."""
        return {int(h["step"]): float(h[key]) for h in self.history if key in h and "step" in h}

    @cached_property
    def per_question(self) -> dict[str, dict]:
        try:
            return {r["id"]: r for r in self.folder.predictions()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.unreadable.append(_problem(self.folder.predictions_file, e))
            return {}

    @property
    def wall_seconds(self):
        return self.run.get("wall_seconds")

    @property
    def max_rss_mb(self):
        rss = [a.get("max_rss_mb") for a in self.run.get("attempts", []) if a.get("max_rss_mb")]
        return max(rss) if rss else None


@dataclass
class SweepData:
    dir: Path
    cfg: Any
    trials: list[TrialResult]
    axes: dict[str, list]
    reference: dict[str, Any]
    index: dict  # sweep.json (may be empty)
    strays: list[str]  # trial folders on disk that the config no longer makes
    unreadable: list[str] = field(default_factory=list)  # damaged files, left out (named in the report)

    def by_name(self, name: str) -> TrialResult | None:
        return next((t for t in self.trials if t.name == name), None)

    def axis_rows(self, key: str) -> list[TrialResult]:
        """Trials that differ from the reference point in ``key`` alone (the reference included), in the axis's
        value order."""
        others = {k: v for k, v in self.reference.items() if k != key}
        rows = [t for t in self.trials if all(t.trial.values[k] == v for k, v in others.items())]
        order = {format_value(v): i for i, v in enumerate(self.axes[key])}
        return sorted(rows, key=lambda t: order.get(format_value(t.trial.values[key]), len(order)))

    def read_all(self) -> list[str]:
        """Read every trial's log and predictions now, so that a report's header can name each damaged file;
        returns those files."""
        for t in self.trials:
            _ = t.history, t.per_question
        return self.unreadable

    @property
    def reference_trial(self) -> TrialResult | None:
        return next((t for t in self.trials if t.trial.values == self.reference), None)


def _problem(path: Path, error: BaseException) -> str:
    """``PATH: what is wrong``, the path as the user gave the folder (relative where it was absolute)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = text.removeprefix(f"{path}: ")
    return f"{portable_path(path)}: {text}"


def read_or(read, path: Path, default, unreadable: list | None = None):
    """``read()`` (which reads ``path``), or ``default`` where the file is damaged, named in ``unreadable`` when
    given: a report leaves a damaged file out and says so."""
    try:
        return read()
    except (OSError, ValueError) as e:
        if unreadable is not None:
            unreadable.append(_problem(path, e))
        return default


def _read_or(path: Path, default, unreadable: list | None = None):
    return read_or(lambda: read_json(path) if path.exists() else default, path, default, unreadable)


def load_sweep(sweep_dir: str | os.PathLike) -> SweepData:
    sweep_dir = Path(sweep_dir)
    cfg_path = sweep_dir / SWEEP_CONFIG_FILE
    if not cfg_path.is_file():
        raise ConfigError(f"{sweep_dir}: not a sweep folder (no sweep.yaml; `loraqa sweep` writes it)")
    cfg = from_dict(yaml.safe_load(cfg_path.read_text()), where=str(cfg_path))
    trials = []
    bad: list[str] = []
    for t in expand_trials(cfg):
        run = RunFolder(sweep_dir / t.name)
        status = trial_status(run.path)
        metrics = _read_or(run.metrics_file, {}, bad) if status == "done" else {}
        error = _read_or(run.error_file, {}, bad) if status == "failed" else {}
        attempts = _read_or(run.path / TRIAL_RUN_FILE, {}, bad)
        trials.append(TrialResult(t, run.path, status, metrics, attempts, error, unreadable=bad))
    names = {t.name for t in trials}
    strays = [name for name in trial_folders(sweep_dir) if name not in names]
    index = _read_or(sweep_dir / SWEEP_INDEX_FILE, {}, bad)
    return SweepData(sweep_dir, cfg, trials, axis_values(cfg), reference_values(cfg), index, strays, bad)

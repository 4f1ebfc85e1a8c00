"""``sweep.mode: search``: an Optuna study picks the trials, judged by their generated answers while they train.

The study lives in the sweep folder (``search.db``, Optuna's RDB storage on SQLite) next to one run folder per
trial (``trial-000``, ...), each trained by ``loraqa train`` in a child process through the same runners as a
grid sweep (local processes, ``--parallel``; Ray tasks, ``--backend ray``). A trial reports each in-training
score (``eval.score_steps``) to the study from its own process; the pruner may stop it there, with a
checkpoint, as ``pruned``. The driver alone asks for new trials and tells the study how each ended, from the
trial's files: ``metrics.json`` done (its value: the trial's best in-training ``sweep.metric`` with
``train.keep_best``, else its last), ``error.json`` failed.

Killed at any moment and rerun, the driver continues the same study: a trial the study still holds as running
was asked by a driver that died, so it is resumed in its folder (from its last checkpoint), or told from its
files if it finished meanwhile; new trials are asked only up to ``sweep.n_trials`` in all (the grid's size at most).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..config import SEED_MAX, ConfigError, ExperimentConfig, apply_overrides, search_range, search_trials
from ..io import read_json
from ..layout import (
    ERROR_FILE,
    METRICS_FILE,
    SEARCH_STUDY_FILE,
    TRIAL_CONFIG_FILE,
    search_storage,
    search_trial_name,
)
from ..metrics import scorings
from ..runfolder import RunFolder
from . import attempt
from .driver import (
    _check_sweep_yaml,
    _command_line,
    _prefetch_data,
    _run,
    _runner,
    _save_sweep_yaml,
    check_backend,
    check_device,
    read_sweep_yaml,
)
from .machine import machine_info, now
from .reporter import ENV_METRIC, ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL, import_optuna, make_pruner
from .state import SweepIndex
from .trials import Trial, base_config
from .view import View

log = logging.getLogger(__name__)


# the sweep section's fields a study is built on: changed for a folder's existing study, its trials would be
# judged or sampled under two settings (Optuna refuses a changed choice list only when it asks, mid-search)
STUDY_FIELDS = ("space", "metric", "direction", "sampler")


def make_sampler(sweep, asked: int = 0):
    """The sampler, seeded with ``sweep.seed`` + the trials the study already holds: a fresh study's suggestions
    are reproducible, and a driver that resumes a study does not replay its predecessor's random draws (with the
    seed alone, its first suggestion would repeat the study's first trial). The grid is the exception: its
    order is one shuffle by the seed, trial k taking point k, so every driver of a study must shuffle alike."""
    optuna = import_optuna()
    if sweep.sampler == "grid":
        return _grid_sampler(optuna, sweep)
    seed = None if sweep.seed is None else (sweep.seed + asked) % (SEED_MAX + 1)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # running trials count as poor ones


def _grid_sampler(optuna, sweep):
    """Optuna's GridSampler without its stop at the grid's end: ``Study.stop`` works inside ``study.optimize``
    only (elsewhere it raises), and this driver asks and tells by itself, up to :func:`search_trials`."""

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid(dict(sweep.space), seed=sweep.seed)


def check_study_fields(sweep_dir: Path, cfg: ExperimentConfig) -> None:
    """Refuse a sweep section that changes what the folder's study is built on (:data:`STUDY_FIELDS`; the
    grid's seed, which orders its points), against the ``sweep.yaml`` the study was begun with."""
    if not (sweep_dir / SEARCH_STUDY_FILE).is_file():
        return
    begun = read_sweep_yaml(sweep_dir)
    if begun is None:
        return
    old = begun.sweep
    fields = STUDY_FIELDS + (("seed",) if cfg.sweep.sampler == "grid" else ())
    for field in fields:
        if getattr(old, field) != getattr(cfg.sweep, field):
            raise ConfigError(
                f"sweep.{field}: the search in {sweep_dir} was begun with {getattr(old, field)!r}; a study "
                f"keeps its {', '.join(fields)} (change n_trials to extend it), so give it back or pick another "
                "--output-dir"
            )


def open_study(cfg: ExperimentConfig, sweep_dir: Path):
    optuna = import_optuna()
    study = optuna.create_study(study_name=cfg.name, storage=search_storage(sweep_dir),
                                direction=cfg.sweep.direction, sampler=make_sampler(cfg.sweep),
                                pruner=make_pruner(cfg.sweep.pruner, cfg.eval.score_steps),
                                load_if_exists=True)  # fmt: skip
    asked = len(study.get_trials(deepcopy=False))
    if asked:
        study.sampler = make_sampler(cfg.sweep, asked)
    return study


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's value for every key of the space (Optuna records them as the trial's params)."""
    out = {}
    for key, value in space.items():
        rng = search_range(value)
        if rng is None:
            out[key] = trial.suggest_categorical(key, value)
        elif all(isinstance(b, int) for b in rng[:2]):
            out[key] = trial.suggest_int(key, rng[0], rng[1], log=rng[2])
        else:
            out[key] = trial.suggest_float(key, float(rng[0]), float(rng[1]), log=rng[2])
    return out


def as_trial(cfg: ExperimentConfig, number: int, params: dict[str, Any]) -> Trial:
    config = apply_overrides(base_config(cfg), list(params.items()), where="sweep.space")
    return Trial(search_trial_name(number), dict(params), dict(params), config, number)


def trial_value(trial_dir: Path, cfg: ExperimentConfig) -> float | None:
    """What the study optimises for a finished trial: its best logged ``sweep.metric`` with train.keep_best
    (the adapter it keeps; for eval_f1 the same step keep_best picks), else its last one."""
    seen = scorings(RunFolder(trial_dir).history(), cfg.sweep.metric)
    if not seen:
        return None
    if not cfg.train.keep_best:
        return seen[-1][1]
    values = [v for _, v in seen]
    return max(values) if cfg.sweep.direction == "maximize" else min(values)


def settle(study, cfg: ExperimentConfig, sweep_dir: Path, number: int) -> str:
    """Tell the study how trial ``number`` ended, from its folder; returns the state told, or "running"
    (unfinished: to be resumed)."""
    optuna = import_optuna()
    tdir = sweep_dir / search_trial_name(number)
    if (tdir / METRICS_FILE).is_file():
        attempt.settle_finished(tdir)  # finished after its driver died: run.json still says running
        metrics = read_json(tdir / METRICS_FILE)
        if metrics.get("pruned"):
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
            return "pruned"
        value = trial_value(tdir, cfg)
        if value is None:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
            return "failed"
        study.tell(number, value)
        return "done"
    if (tdir / ERROR_FILE).is_file():
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        return "failed"
    return "running"


def _running(study) -> list:
    optuna = import_optuna()
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]


def trials_to_run(study, cfg: ExperimentConfig, sweep_dir: Path):
    """The trials to run, each asked only when taken (a worker is free for it): the study's unfinished ones first
    (a killed driver's), then new ones while the study holds fewer than :func:`~loraqa.config.search_trials`.
    The sampler so sees every trial told before (:func:`settle`, as each ends) and, with TPE's constant liar,
    the ones still running."""
    optuna = import_optuna()
    for t in _running(study):
        if settle(study, cfg, sweep_dir, t.number) == "running":
            # its stored params, and any its driver died before asking for
            yield as_trial(cfg, t.number, suggest(optuna.trial.Trial(study, t._trial_id), cfg.sweep.space))
    while len(study.get_trials(deepcopy=False)) < search_trials(cfg.sweep):
        trial = study.ask()
        t = as_trial(cfg, trial.number, suggest(trial, cfg.sweep.space))
        (sweep_dir / t.name).mkdir(parents=True, exist_ok=True)
        yield t


def run_search(cfg: ExperimentConfig, output_dir, parallel: int | None = None, device: str | None = None, *,
               backend: str = "local", address: str | None = None, progress: bool | None = None) -> int:  # fmt: skip
    """Run the search to ``sweep.n_trials`` trials, ``parallel`` at a time (default 1): a worker that frees up
    takes the next trial, asked then; resumable. Returns 0 when every trial ended (done, pruned or failed), 1
    when one was held by another process or stopped alone, 130 or 143 when Ctrl-C or SIGTERM stopped it."""
    address, where = check_backend(backend, parallel, address)
    check_device(device, backend)
    sweep_dir = Path(output_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _check_sweep_yaml(sweep_dir, cfg)
    check_study_fields(sweep_dir, cfg)
    _prefetch_data([as_trial(cfg, 0, {})])
    _save_sweep_yaml(sweep_dir, cfg)
    study = open_study(cfg, sweep_dir)
    machine = machine_info()
    command, real = _command_line(sweep_dir, "1/1", parallel, backend, address)
    view = View(f"search {cfg.name} -> {sweep_dir}", search_trials(cfg.sweep),
                sys.stderr.isatty() if progress is None else progress)  # fmt: skip
    invocation = {"id": f"{machine['host']}-{os.getpid()}-{time.time():.0f}", "command": command,
                  "command_is_reconstructed": not real, "shard": "1/1", "parallel": parallel, "backend": backend,
                  "address": address, "device": device, "host": machine["host"], "started_at": now()}  # fmt: skip
    trials = [as_trial(cfg, t.number, t.params) for t in study.get_trials(deepcopy=False)]
    index_file = SweepIndex(cfg, sweep_dir, trials, machine, invocation)
    index_file.write()
    runner = _runner(cfg, backend, address, parallel or 1, device, view, index_file, where)
    view.note(f"search: {search_trials(cfg.sweep)} trials ({cfg.sweep.sampler} sampler, {cfg.sweep.pruner} pruner, "
              f"{cfg.sweep.direction} {cfg.sweep.metric}); {len(trials)} in the study already")  # fmt: skip
    feed = Feed(study, cfg, sweep_dir, index_file,
                lambda t: _search_job(t, sweep_dir, cfg, device, machine, backend == "ray"))  # fmt: skip
    stopped_by = _run(runner, feed.jobs(), view, index_file, feed.on_end)
    if stopped_by:
        view.note("interrupted; rerun the same command to resume the search", style="yellow")
        from .. import signals

        return signals.exit_status(stopped_by)
    if feed.unsettled:  # held by another process, or stopped alone: one driver never runs a trial twice
        view.note(f"not finished: {', '.join(feed.unsettled)} (another process holds them, or they were "
                  "stopped); rerun the same command to resume the search", style="yellow")  # fmt: skip
        return 1
    return _summary(study, view, sweep_dir)


class Feed:
    """The search's side of a runner (:meth:`~.runner.Runner.run`): its jobs, each trial asked as a worker
    takes it (:func:`trials_to_run`) and listed in sweep.json; each attempt's end told to the study."""

    def __init__(self, study, cfg: ExperimentConfig, sweep_dir: Path, index_file: SweepIndex, make_job):
        self.study, self.cfg, self.sweep_dir = study, cfg, sweep_dir
        self.index_file, self.make_job = index_file, make_job
        self.numbers: dict[str, int] = {}  # job name -> the study's trial number
        self.unsettled: list[str] = []  # ended neither done, pruned nor failed: a rerun resumes them

    def jobs(self):
        for trial in trials_to_run(self.study, self.cfg, self.sweep_dir):
            self.numbers[trial.name] = trial.index
            with self.index_file.lock:
                if trial.name not in {t.name for t in self.index_file.trials}:
                    self.index_file.trials.append(trial)
            yield self.make_job(trial)

    def on_end(self, job, outcome) -> None:
        if settle(self.study, self.cfg, self.sweep_dir, self.numbers[job.name]) == "running":
            self.unsettled.append(job.name)


def _search_job(trial: Trial, sweep_dir: Path, cfg: ExperimentConfig, device, machine, absolute: bool):
    from .attempt import Job

    tdir = (sweep_dir.resolve() if absolute else sweep_dir) / trial.name
    env = {ENV_STORAGE: search_storage(sweep_dir), ENV_STUDY: cfg.name, ENV_TRIAL: str(trial.index),
           ENV_METRIC: cfg.sweep.metric, ENV_PRUNER: cfg.sweep.pruner}  # fmt: skip
    return Job(name=trial.name, overrides=trial.overrides, config_yaml=trial.config.to_yaml(), trial_dir=str(tdir),
               command=attempt.trial_command(tdir / TRIAL_CONFIG_FILE, tdir, device), shard="1/1", env=env,
               machine=None if absolute else machine)  # fmt: skip


def _summary(study, view: View, sweep_dir: Path) -> int:
    optuna = import_optuna()
    states = [t.state for t in study.get_trials(deepcopy=False)]
    count = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState}
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    best = f"; best {search_trial_name(study.best_trial.number)}: {study.best_value:.2f}" if done else ""
    view.note(f"{len(states)} trials: {count['complete']} done, {count['pruned']} pruned, {count['fail']} failed"
              f"{best}; study: {sweep_dir / SEARCH_STUDY_FILE}; report: loraqa report {sweep_dir}")  # fmt: skip
    return 0

"""``loraqa sweep``: check the folder, pick this shard's unfinished trials, hand them to a runner, summarise."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import yaml

from .. import signals
from ..config import SWEEP_BACKENDS, ConfigError, ExperimentConfig, from_dict
from ..io import write_text_atomic
from ..layout import SWEEP_CONFIG_FILE, SWEEP_INDEX_FILE, TRIAL_CONFIG_FILE, sweep_command
from ..runfolder import run_marker
from . import attempt
from .attempt import Job, OnEnd
from .machine import machine_info, now
from .runner import LocalRunner, Runner, Terminated
from .state import SweepIndex, trial_folders, trial_status
from .trials import Trial, base_differences, config_differences, expand_trials, parse_shard, shard_trials
from .view import View


def run_sweep(
    cfg: ExperimentConfig,
    output_dir: str | os.PathLike,
    shard: str = "1/1",
    parallel: int | None = None,
    device: str | None = None,
    *,
    backend: str = "local",
    address: str | None = None,
    progress: bool | None = None,
    retry_failed: bool = False,
) -> int:
    """Run this shard's unfinished trials, each in a child process: ``parallel`` at a time on this machine
    (default 1), or with ``backend="ray"`` as Ray tasks holding ``sweep.resources_per_trial`` (on a local Ray
    instance, or the cluster at ``address``; ``parallel`` then caps the trials in flight). Returns 0 when all
    of them finished; 1 if any failed (error.json in its folder) or was stopped alone (a signal to that trial's
    process: it is resumable, as an interrupted one); 130 or 143 if Ctrl-C or SIGTERM interrupted the sweep.
    ``progress``: a live display (default: when stderr is a terminal). A failed trial (error.json) is run again
    only with ``retry_failed``: a failure is a fact to look into before paying for another attempt."""
    index, count = parse_shard(shard)
    address, where = check_backend(backend, parallel, address)
    check_device(device, backend)
    trials = expand_trials(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_sweep_yaml(output_dir, cfg)
    _check_trial_folders(output_dir, trials)
    _say_strays(output_dir, trials)
    mine = shard_trials(trials, index, count)
    skip = ("done",) if retry_failed else ("done", "failed")
    todo = [t for t in mine if trial_status(output_dir / t.name) not in skip]
    for t in mine:
        if t not in todo:
            attempt.settle_finished(output_dir / t.name)
    already = sum(trial_status(output_dir / t.name) == "done" for t in mine)
    failed_before = len(mine) - len(todo) - already
    if todo:
        _prefetch_data(todo)
    _save_sweep_yaml(output_dir, cfg)  # once the data are found: a mistyped --data-dir leaves no sweep behind
    machine = machine_info()
    command, real = _command_line(output_dir, f"{index}/{count}", parallel, backend, address)
    title = f"sweep {cfg.name} -> {output_dir}" + (f" (shard {index}/{count})" if count > 1 else "")
    view = View(title, len(mine), sys.stderr.isatty() if progress is None else progress)
    view.counts["done"] = already
    invocation = {
        "id": f"{machine['host']}-{os.getpid()}-{time.time():.0f}", "command": command,
        "command_is_reconstructed": not real, "shard": f"{index}/{count}", "parallel": parallel,
        "backend": backend, "address": address, "device": device, "host": machine["host"], "started_at": now(),
    }  # fmt: skip
    index_file = SweepIndex(cfg, output_dir, trials, machine, invocation)
    index_file.write()
    view.note(
        f"{cfg.sweep.mode} sweep: {len(trials)} trials"
        + (f", {len(mine)} in shard {index}/{count}" if count > 1 else "")
        + f"; {already} finished already, {len(todo)} to run, {_at_once(backend, parallel)}"
        + (f"; {failed_before} failed before, left as they are (--retry-failed runs them again)"
           if failed_before else "")
    )
    runner = _runner(cfg, backend, address, parallel, device, view, index_file, where)
    jobs = [_job(t, output_dir, f"{index}/{count}", device, machine, absolute=backend == "ray",
                 retry_failed=retry_failed) for t in todo]  # fmt: skip
    stopped_by = _run(runner, jobs, view, index_file)
    return _summary(view, output_dir, mine, stopped_by)


def check_backend(backend: str, parallel: int | None, address: str | None) -> tuple[str | None, str]:
    """Refuse bad runner options before any work; for Ray, the cluster to join (None: a local instance) and
    where its address came from, checked reachable: a wrong address fails here, in seconds."""
    if backend not in SWEEP_BACKENDS:
        raise ConfigError(f"--backend {backend!r}: expected one of {', '.join(SWEEP_BACKENDS)}")
    if parallel is not None and parallel < 1:
        raise ConfigError(f"--parallel {parallel}: must be >= 1")
    if address and backend != "ray":
        raise ConfigError("--address names a Ray cluster: use it with --backend ray")
    if backend != "ray":
        return address, ""
    from .ray_runner import check_reachable, cluster_address

    address, where = cluster_address(address)
    if address:
        check_reachable(address, where)
    return address, where


def check_device(device: str | None, backend: str = "local") -> None:
    """A ``--device`` the trials would refuse fails here, once, not in every trial (each failed trial would then
    wait for --retry-failed, and a search would spend its trials): on this machine's trials, as ``loraqa train``
    checks it; for Ray trials, which run elsewhere, only that torch can parse it."""
    if device:
        # torch, imported only when a device is named
        from ..devices import check_training_device, parse_device, resolve_device

        try:
            if backend == "ray":
                parse_device(device)
            else:
                check_training_device(resolve_device(device), 1)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _at_once(backend: str, parallel: int | None) -> str:
    if backend == "local":
        return f"{parallel or 1} at a time"
    return "as Ray tasks" + (f", at most {parallel} at a time" if parallel else "")


def _runner(cfg, backend, address, parallel, device, view, index_file, where) -> Runner:
    if backend == "ray":
        from .ray_runner import RayRunner  # Ray is an extra (loraqa[ray]), imported only when asked for

        return RayRunner(cfg.sweep.resources_per_trial, address, parallel, view, index_file.write, where)
    return LocalRunner(parallel or 1, device, view, index_file.write)


def _job(trial: Trial, output_dir: Path, shard: str, device, machine, absolute: bool, retry_failed: bool) -> Job:
    """A Ray task may run on another node, in another working folder: it gets absolute paths (which must name
    the same storage there) and finds out its machine itself."""
    tdir = (output_dir.resolve() if absolute else output_dir) / trial.name
    return Job(name=trial.name, overrides=trial.overrides, config_yaml=trial.config.to_yaml(), trial_dir=str(tdir),
               command=attempt.trial_command(tdir / TRIAL_CONFIG_FILE, tdir, device), shard=shard,
               machine=None if absolute else machine, retry_failed=retry_failed)  # fmt: skip


def _run(runner: Runner, jobs: Iterable[Job], view: View, index_file: SweepIndex, on_end: OnEnd | None = None
         ) -> int | None:  # fmt: skip
    """Run the jobs (:meth:`Runner.run`); the signal that interrupted the sweep (Ctrl-C's SIGINT, or SIGTERM),
    or None."""

    def on_term(signum, frame):
        raise Terminated

    try:
        with signals.handling([signal.SIGTERM], on_term), view:
            runner.run(jobs, on_end)
    except KeyboardInterrupt as e:
        return signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
    finally:
        index_file.write()
    return None


def _summary(view: View, output_dir: Path, mine: list[Trial], stopped_by: int | None) -> int:
    final = {t.name: trial_status(output_dir / t.name) for t in mine}
    failed = [n for n, s in final.items() if s == "failed"]
    others = [f"{n} ({s})" for n, s in final.items() if s not in ("done", "failed")]
    done = sum(s == "done" for s in final.values())
    retry = " (rerun with --retry-failed to run them again)"
    view.note(f"{done}/{len(mine)} trials done" + (f", failed: {', '.join(failed)}{retry}" if failed else "")
              + (f", not finished: {', '.join(others)}" if others else "") + f"; index: {output_dir / SWEEP_INDEX_FILE}; tables and verdicts: loraqa report {output_dir}")  # fmt: skip
    if stopped_by:
        view.note("interrupted; rerun the same command to resume", style="yellow")
        return signals.exit_status(stopped_by)
    return 0 if done == len(mine) else 1


def _prefetch_data(trials: list[Trial]) -> None:
    """Find (and where needed download or generate) the data once here, so parallel trials do not race and a
    missing data set is reported once instead of by every trial."""
    from ..data import resolve_data_dir

    for data_dir in dict.fromkeys(t.config.data.data_dir for t in trials):
        resolve_data_dir(data_dir)


def _command_line(output_dir: Path, shard: str, parallel: int | None, backend: str, address: str | None):
    """The command that started this sweep: the real one when run from the ``loraqa`` command line, else a
    reconstruction from the saved sweep.yaml (second value False)."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("loraqa", "cli.py", "__main__.py") and "sweep" in argv[1:]:
        return "loraqa " + shlex.join(argv[1:]), True
    cmd = sweep_command(output_dir, lambda p: shlex.quote(str(p)))
    if shard != "1/1":
        cmd += f" --shard {shard}"
    if parallel not in (None, 1):
        cmd += f" --parallel {parallel}"
    if backend != "local":
        cmd += f" --backend {backend}" + (f" --address {shlex.quote(address)}" if address else "")
    return cmd, False


def _say_strays(output_dir: Path, trials: list) -> None:
    """A changed sweep section keeps the trials it still makes; say which trial folders it no longer makes (they
    stay as they are, and its report lists them apart)."""
    names = {t.name for t in trials}
    strays = [name for name in trial_folders(output_dir) if name not in names]
    if strays:
        print(
            f"loraqa sweep: {output_dir} holds {len(strays)} trial folder(s) this config no longer makes "
            f"({', '.join(strays[:5])}{', ...' if len(strays) > 5 else ''}): kept as they are, not run, and listed "
            "apart in its report",
            file=sys.stderr,
        )


def _check_not_a_run(output_dir: Path) -> None:
    """Refuse a run folder (``loraqa train -o``, or one trial of a sweep) as a sweep's folder: the sweep's files
    and trial folders would be mixed into the run's."""
    if found := run_marker(output_dir):
        raise ConfigError(
            f"{output_dir}: holds a run ({found}), not a sweep; pick another --output-dir "
            "(a new folder, or the sweep's own)"
        )


def read_sweep_yaml(output_dir: Path) -> ExperimentConfig | None:
    """The config a sweep folder was begun with (None: none yet); a ConfigError naming the file when it cannot
    be read, since the new config could not be checked against it."""
    path = output_dir / SWEEP_CONFIG_FILE
    if not path.exists():
        return None
    try:
        return from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), where=str(path))
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(
            f"{path}: the config the sweep in {output_dir} was begun with cannot be read "
            f"({str(e).splitlines()[0]}); restore it, or pick another --output-dir"
        ) from None


def _check_sweep_yaml(output_dir: Path, cfg: ExperimentConfig) -> None:
    """A folder holds one sweep: refuse one whose base config differs, or a search where a grid was begun (or
    the other way); a changed sweep section is allowed (trials are named by their values, so old trials are
    reused where they still belong, :func:`_check_trial_folders`). A run's folder is no sweep's."""
    _check_not_a_run(output_dir)
    old = read_sweep_yaml(output_dir)
    if old is None:
        return
    differs = base_differences(old, cfg)
    if differs:
        raise ConfigError(
            f"{output_dir}: holds a sweep of a different config (differs in {', '.join(differs)}); "
            "pick another --output-dir"
        )
    if old.sweep is None:
        raise ConfigError(f"{output_dir / SWEEP_CONFIG_FILE}: holds no sweep section; restore it, or pick another "
                          "--output-dir")  # fmt: skip
    assert cfg.sweep is not None
    if (old.sweep.mode == "search") != (cfg.sweep.mode == "search"):
        raise ConfigError(
            f"{output_dir}: holds a sweep of mode {old.sweep.mode}, not {cfg.sweep.mode}; pick another --output-dir"
        )


def _save_sweep_yaml(output_dir: Path, cfg: ExperimentConfig) -> None:
    write_text_atomic(output_dir / SWEEP_CONFIG_FILE, cfg.to_yaml())


def _check_trial_folders(output_dir: Path, trials: list[Trial]) -> None:
    """Refuse a trial folder this sweep names alike but which holds another config (a changed sweep section
    can name two trials alike: ``eval.batch_size: [16]`` and ``train.batch_size: [16]`` both make
    ``batch_size16``): its results would pass for this trial's."""
    for t in trials:
        path = output_dir / t.name / TRIAL_CONFIG_FILE
        if not path.is_file():
            continue
        try:
            old = from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), where=str(path))
        except (ConfigError, yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{path}: cannot be read ({str(e).splitlines()[0]}); move {path.parent} aside, "
                              "or pick another --output-dir") from None  # fmt: skip
        differs = config_differences(old, t.config)
        if differs:
            raise ConfigError(
                f"{path.parent}: holds a trial of another config (differs in {', '.join(differs[:5])}) where this "
                f"sweep makes its trial {t.name}; move that folder aside, or pick another --output-dir"
            )

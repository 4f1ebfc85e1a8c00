"""Sweeps: expand a config's ``sweep:`` section into trials and run each in its own process, resumably.

A sweep folder holds::

    sweep.yaml              the resolved sweep config (``loraqa sweep DIR/sweep.yaml -o DIR`` reruns it)
    sweep.json              the trials, their overrides and status, rewritten atomically as trials finish
    <trial>/                one run folder per trial (see loraqa.runfolder), named from the trial's values:
        trial.yaml          the trial's resolved config (the child process trains from it)
        config.yaml ...     what the training pipeline writes; metrics.json present means the trial is finished
        run.json            sweep bookkeeping: every attempt's exit code, wall time, peak RSS, machine
        error.json          the last attempt failed: exit code and the tail of its stderr
        trial.log           the trial's stdout and stderr, all attempts

Each trial runs as ``python -m loraqa.cli train <trial>/trial.yaml -o <trial>``, so a crash or an
out-of-memory kill ends that trial only and peak memory is the trial's own. Rerunning the same command skips
finished trials and resumes interrupted ones from their last checkpoint; failed ones (error.json) wait for
``--retry-failed``. ``shard="i/n"``
takes every n-th trial (starting at the i-th), so n machines sharing the folder split the work; a trial being
run by another process is locked (flock) and skipped.

The modules, one job each (none imports this package's ``__init__``):

- ``trials``: expansion of the axes into trials, their names, shards;
- ``machine``: where trials run and which code (``machine_info``, ``code_version``);
- ``state``: trial status and locks from the files alone, sweep.json;
- ``attempt``: one attempt at one trial (lock, run.json, the child process, error.json);
- ``view``: the progress display;
- ``runner``: the ``Runner`` interface and the local runner (child processes of this machine);
- ``ray_runner``: the Ray runner (``--backend ray``: one Ray task per trial; needs the ``loraqa[ray]`` extra);
- ``driver``: ``run_sweep``, which picks the trials and hands them to a runner;
- ``search``: ``run_search`` (``sweep.mode: search``), whose Optuna study picks the trials;
- ``reporter``: a search trial's side, in its own process: the pruner and each in-training score to the study.
"""

import lazy_loader

from .machine import code_version, describe_machine, machine_info
from .state import STATUSES, is_locked, trial_record, trial_status
from .trials import (
    Trial,
    axis_values,
    base_config,
    expand_trials,
    format_value,
    parse_shard,
    reference_values,
    shard_trials,
    trial_name,
)

# The scheduler (attempt, driver, the runners, the view) is imported on first use of its names or modules
# (``loraqa.sweep.run_sweep``, ``loraqa.sweep.attempt``), so that importing this package or any of its record
# modules (``trials``, ``state``, ``machine``: what the report and sync read) does not import it.
__getattr__ = lazy_loader.attach(
    __name__,
    submodules=["attempt", "driver", "runner", "ray_runner", "view"],
    submod_attrs={"driver": ["run_sweep"], "attempt": ["trial_command"]},
)[0]

__all__ = [
    "STATUSES",
    "Trial",
    "axis_values",
    "base_config",
    "code_version",
    "describe_machine",
    "expand_trials",
    "format_value",
    "is_locked",
    "machine_info",
    "parse_shard",
    "reference_values",
    "run_sweep",
    "shard_trials",
    "trial_command",
    "trial_name",
    "trial_record",
    "trial_status",
]

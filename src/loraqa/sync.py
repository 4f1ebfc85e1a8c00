"""``loraqa sync SRC DST``: a run or sweep folder copied to another place (persistent storage, a shared disk,
version control), so that its results outlive the machine and its unfinished runs resume wherever the copy
goes: on a fresh machine, sync it back and rerun the same ``loraqa train`` or ``loraqa sweep`` command.

What goes, for each run folder (a run, or each trial of a sweep; a sweep's own files go too): every file but
the locks and temporary files, and of the checkpoints only the newest complete one, the one a resume reads
(with ``train.keep_best``, also the best scoring's that it names: the run takes its weights back at its end).
A run that DST already has further along (finished there, or at a later checkpoint) is left as it is, so a
stale copy never undoes newer work, and a run that a process holds in DST is skipped. ``results_only`` keeps
the records alone (configs, log history, metrics, predictions, a search's study), small enough for version
control: no checkpoint, no weights, no process log, no TensorBoard event. A run resumed from such a copy
starts again from its first step; a sweep resumed from it keeps every finished trial.

SQLite files (a search's Optuna study) are copied through SQLite's own backup, so a copy taken while the driver
writes is a consistent database, never a torn page.

Written by hand rather than calling rsync: rsync copies files, not runs. It would copy a checkpoint while it is
being saved or rotated away, the lock files, and an older copy of a run over a newer one.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, load_config
from .io import read_json
from .layout import (
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    SWEEP_CONFIG_FILE,
    SWEEP_INDEX_LOCK_FILE,
    TENSORBOARD_DIR,
    TRAIN_METRICS_FILE,
    TRAINER_STATE_FILE,
    TRIAL_CONFIG_FILE,
    TRIAL_LOCK_FILE,
    TRIAL_LOG_FILE,
    WEIGHT_SUFFIXES,
    checkpoint_name,
)
from .runfolder import RunFolder, run_marker, same_config_files
from .sweep.state import is_locked, trial_folders
from .sweep.trials import base_differences

LOCKS = frozenset({LOCK_FILE, TRIAL_LOCK_FILE, SWEEP_INDEX_LOCK_FILE})
MARKERS = frozenset({CONFIG_FILE, TRIAL_CONFIG_FILE, SWEEP_CONFIG_FILE})  # what makes a run or sweep folder
FINISHED = frozenset({TRAIN_METRICS_FILE, METRICS_FILE})  # what says a run has trained, and is done
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


class SyncError(ValueError):
    """The folders themselves are wrong: SRC is no run or sweep folder, DST holds another sweep, one is inside
    the other. The message names the folder and what to do."""


@dataclass
class Synced:
    name: str  # the run folder, relative to SRC ("." for a lone run)
    action: str  # "copied ...", "up to date", "skipped: ..."
    problem: bool = False  # skipped for a reason the user must act on (not merely "DST is further along")


def progress(run_dir: Path) -> tuple[int, int]:
    """How far a run folder got, comparable between copies (see :meth:`RunFolder.progress`)."""
    return RunFolder(run_dir).progress()


def describe(p: tuple[int, int]) -> str:
    return {3: "finished", 2: "trained, not scored", 0: "started"}.get(p[0]) or f"at checkpoint {p[1]}"


def sync(src: str | os.PathLike, dst: str | os.PathLike, results_only: bool = False) -> list[Synced]:
    """Copy the run or sweep folder ``src`` into ``dst`` (created if missing); one :class:`Synced` a run."""
    src, dst = Path(src), Path(dst)
    runs = _run_folders(src)
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise SyncError(
            f"{dst}: is {src} or lies inside it (or it inside {dst}); sync into a folder of its own"
        )
    _check_destination(src, dst)
    if (src / SWEEP_CONFIG_FILE).is_file():
        theirs = dst / SWEEP_CONFIG_FILE
        differs = _sweep_differences(theirs, src / SWEEP_CONFIG_FILE) if theirs.is_file() else []
        if differs:
            raise SyncError(
                f"{dst}: holds another sweep ({theirs} differs from {src / SWEEP_CONFIG_FILE} in "
                f"{', '.join(differs)}); sync into an empty folder"
            )
        trials = runs | (_run_folders(dst) if theirs.is_file() else set())  # DST's own trials stay untouched
        _copy_tree(src, dst, skip=lambda rel: rel.parts[0] in trials or rel.name in LOCKS)
    return [_sync_run(src / name, dst / name, name, results_only) for name in sorted(runs)]


def _check_destination(src: Path, dst: Path) -> None:
    """Refuse a DST whose files a sync would remove or overwrite by mistake (a sync removes what SRC lacks):
    a file, a folder of the user's own, a run where SRC is a sweep or a sweep where SRC is a run. DST may be
    missing, empty, a run or sweep folder of SRC's kind (each run's config is then compared), or a copy of SRC
    cut short before its config arrived: nothing in it but copies of SRC's files as they are (checkpoints
    aside, which rotate). A file of the same name that is not such a copy (a README.md of the user's own beside a
    run's model card) is the user's, and refused."""
    if not dst.exists() and not dst.is_symlink():
        return
    if not dst.is_dir():
        raise SyncError(f"{dst}: exists and is not a folder; sync into a new folder or an earlier copy of {src}")
    sweep = (src / SWEEP_CONFIG_FILE).is_file()
    if (dst / SWEEP_CONFIG_FILE).is_file():
        if not sweep:
            raise SyncError(
                f"{dst}: holds a sweep ({SWEEP_CONFIG_FILE}), and {src} is a run; sync into a new folder "
                f"or an earlier copy of {src}"
            )
        return  # the same sweep or another: sync() compares the two configs
    if found := run_marker(dst):
        if sweep:
            raise SyncError(
                f"{dst}: holds a run ({found}), and {src} is a sweep; sync into a new folder "
                f"or an earlier copy of {src}"
            )
        return  # the same run or another: _sync_run compares the two configs
    theirs = _walk(dst, lambda rel: rel.name in LOCKS)
    ours = _walk(src, lambda rel: False)
    strays = sorted(
        str(rel)
        for rel, path in theirs.items()
        if CHECKPOINTS_DIR not in rel.parts and (rel not in ours or not _same(ours[rel], path))
    )
    if strays:
        raise SyncError(
            f"{dst}: exists and is not a run or sweep folder (no {CONFIG_FILE} or {SWEEP_CONFIG_FILE}; it holds "
            f"{', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''}, which {src} has not as they are), and "
            f"a sync would replace or remove its files; sync into a new folder or an earlier copy of {src}"
        )


def _sweep_differences(theirs: Path, ours: Path) -> list[str]:
    """Where two sweep folders' configs differ, by the rule ``loraqa sweep`` resumes by (a newer loraqa may
    write a default the older one left out: still one sweep); [] for one sweep. SRC's file is then copied."""
    try:
        return base_differences(load_config(theirs), load_config(ours))
    except ConfigError as e:
        return [f"a config this loraqa cannot read ({e})"]


def _run_folders(src: Path) -> set[str]:
    if (src / SWEEP_CONFIG_FILE).is_file():
        return set(trial_folders(src))
    if run_marker(src):
        return {"."}
    raise SyncError(
        f"{src}: not a run folder (no {CONFIG_FILE}) or a sweep folder (no {SWEEP_CONFIG_FILE}); "
        "name the folder `loraqa train -o` or `loraqa sweep -o` wrote"
    )


def _sync_run(src: Path, dst: Path, name: str, results_only: bool) -> Synced:
    for config in (CONFIG_FILE, TRIAL_CONFIG_FILE):
        ours, theirs = src / config, dst / config
        if ours.is_file() and theirs.is_file() and not same_config_files(ours, theirs):
            return Synced(name, f"skipped: {theirs} is another experiment's; move it away first", True)
    if dst.is_dir() and (is_locked(dst) or is_locked(dst, LOCK_FILE)):
        return Synced(name, f"skipped: a process is working in {dst}; sync when it has stopped", True)
    have, had = progress(src), progress(dst)
    if had > have:
        return Synced(name, f"left as it is: {describe(had)} there, {describe(have)} here")
    try:
        # a results-only copy of an unfinished run has no weights to resume from: nothing in it may say that
        # training has finished, or a resume would go on to evaluate weights that are not there
        unfinished = results_only and have[0] < 3
        changed = _copy_tree(src, dst, skip=lambda rel: _left_out(rel, results_only, unfinished))
        if not results_only or have[0] != 1:  # a results-only copy gets no checkpoint, but loses stale ones
            changed += _sync_checkpoint(src / CHECKPOINTS_DIR, dst / CHECKPOINTS_DIR, have)
    except FileNotFoundError as e:  # a live run rotated a checkpoint or replaced a file meanwhile
        return Synced(name, f"skipped: {e.filename} changed while it was copied; sync again", True)
    where = describe(have) + (
        " (records only: resumed from this copy, it starts again)" if results_only and have[0] in (1, 2) else ""
    )
    return Synced(name, f"copied {changed} file(s); {where}" if changed else "up to date")


def _left_out(rel: Path, results_only: bool, unfinished: bool) -> bool:
    if rel.name in LOCKS or rel.parts[0] == CHECKPOINTS_DIR or (unfinished and rel.name == TRAIN_METRICS_FILE):
        return True
    if not results_only:
        return False
    return rel.name == TRIAL_LOG_FILE or TENSORBOARD_DIR in rel.parts or rel.suffix in WEIGHT_SUFFIXES


def _sync_checkpoint(src: Path, dst: Path, have: tuple[int, int]) -> int:
    """DST's checkpoints become SRC's newest complete one alone, with the files beside it (the clock's totals
    that bridge a rotation); none once SRC has finished training. The checkpoint is copied beside its place
    under a hidden name and renamed into it, so a sync cut short leaves DST as it was."""
    if have[0] != 1:
        shutil.rmtree(dst, ignore_errors=True)
        return 0
    newest = src / checkpoint_name(have[1])  # the one progress() found
    for stale in dst.glob(".*.tmp"):  # left by a sync cut short
        shutil.rmtree(stale, ignore_errors=True)
    changed, targets = 0, []
    for checkpoint in _kept_checkpoints(newest):
        target = dst / checkpoint.name
        targets.append(target)
        if target.is_dir() and _same_files(checkpoint, target):
            continue
        dst.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dst, prefix=f".{checkpoint.name}.", suffix=".tmp"))
        try:
            changed += _copy_tree(checkpoint, tmp, skip=lambda rel: False)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in dst.glob(f"{CHECKPOINT_PREFIX}*"):
        if old not in targets:
            shutil.rmtree(old, ignore_errors=True)
    return changed + _copy_tree(src, dst, skip=lambda rel: rel.parts[0].startswith(CHECKPOINT_PREFIX))


def _kept_checkpoints(newest: Path) -> list[Path]:
    """``newest``, then the keep_best checkpoint its trainer state names where that is another one: the run
    takes its weights back at the end of training, so a copy resumed without it could not finish."""
    try:
        best = read_json(newest / TRAINER_STATE_FILE).get("best_global_step")
    except (OSError, ValueError, AttributeError):
        return [newest]
    other = newest.parent / checkpoint_name(best) if isinstance(best, int) and best > 0 else newest
    return [newest, other] if other != newest and (other / TRAINER_STATE_FILE).is_file() else [newest]


def _walk(root: Path, skip) -> dict[Path, Path]:
    """Relative path -> file under ``root``, leaving out what ``skip(relative path)`` says and temporary files."""
    files = {}
    for folder, dirs, names in os.walk(root):
        rel_dir = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if not skip(rel_dir / d)]
        for n in names:
            if not skip(rel_dir / n) and not (n.startswith(".") and n.endswith(".tmp")):
                files[rel_dir / n] = Path(folder) / n
    return files


def _same(a: Path, b: Path) -> bool:
    sa, sb = a.stat(), b.stat()
    return sa.st_size == sb.st_size and sa.st_mtime_ns == sb.st_mtime_ns  # copy2 keeps the mtime


def _same_files(a: Path, b: Path) -> bool:
    fa, fb = _walk(a, lambda rel: False), _walk(b, lambda rel: False)
    return fa.keys() == fb.keys() and all(_same(fa[k], fb[k]) for k in fa)


def _copy_tree(src: Path, dst: Path, skip) -> int:
    """Copy the files of ``src`` that ``dst`` lacks or holds another version of (size, mtime), each through a
    temporary file and a rename; remove DST's files that SRC no longer has (a failed attempt's error.json),
    but not those ``skip`` leaves out. Returns the files copied."""
    ours = _walk(src, skip)
    changed = 0
    # the configs first: a copy cut short is then known for a run or sweep folder, and resumed; what says a run
    # finished last: a copy cut short never claims weights it lacks (as save_trained writes them)
    order = {**dict.fromkeys(MARKERS, 0), **dict.fromkeys(FINISHED, 2)}
    for rel, path in sorted(ours.items(), key=lambda item: order.get(item[0].name, 1)):
        target = dst / rel
        if target.is_file() and _same(path, target):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            _copy_file(path, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        changed += 1
    for rel, path in _walk(dst, skip).items() if dst.is_dir() else ():
        if rel not in ours:
            path.unlink()
    return changed


def _copy_file(src: Path, dst: str) -> None:
    """Contents, mode and mtime (what :func:`_same` compares); a SQLite database through its backup API, which
    reads a consistent snapshot while another process writes."""
    if src.suffix not in SQLITE_SUFFIXES:
        shutil.copy2(src, dst)
        return
    stat = src.stat()
    source, target = sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True), sqlite3.connect(dst)
    try:
        source.backup(target)
    except sqlite3.DatabaseError:  # named like a database, but not one: its bytes as they are
        shutil.copy2(src, dst)
        return
    finally:
        source.close()
        target.close()
    os.utime(dst, ns=(stat.st_atime_ns, stat.st_mtime_ns))

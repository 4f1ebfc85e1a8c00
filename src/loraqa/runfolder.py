"""The run folder, without a model: where each file goes, its lock, its checkpoints and its results.

A run folder holds::

    config.yaml                 the resolved experiment
    log_history.jsonl           the Trainer's log history (train loss, eval loss, lr), one JSON object a line
    adapter_config.json         the PEFT adapter (PeftModel.from_pretrained(base, RUN_DIR) loads it);
    adapter_model.safetensors   a full fine-tune saves model.safetensors + config.json instead
    train_metrics.json          written when training has finished (its presence means: skip training)
    predictions.jsonl           one dev question a line: id, prediction, answers, exact_match, f1
    predictions.json            the official SQuAD format, {id: answer}: the official scripts score it as is
    metrics.json                EM/F1, speeds, parameters, memory; written last (its presence means: done)
    README.md                   the model card: base, data, prompt, LoRA settings, EM/F1, command, version
    checkpoints/                Trainer checkpoints while training (removed once training is saved)
    error.json                  why the last attempt failed (removed when a new attempt starts)
    .loraqa.lock                flock-ed by the process working in the folder (a second one is refused)

The names are defined once, in :mod:`loraqa.layout`. This module imports neither torch nor the sweep scheduler,
so that ``loraqa sync``, ``loraqa report`` and a sweep's status probes read run folders without loading either;
saving and loading the trained model is :mod:`loraqa.model`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

from . import locks
from .card import portable_model_name
from .config import ConfigError, ExperimentConfig, load_config
from .io import (
    CorruptFileError,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from .layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    CLOCK_FILE,
    CONFIG_FILE,
    ERROR_FILE,
    FULL_WEIGHTS_FILE,
    LOCK_FILE,
    LOG_FILE,
    METRICS_FILE,
    MODEL_CARD_FILE,
    MODEL_CONFIG_FILE,
    OFFICIAL_PREDICTIONS_FILE,
    PREDICTIONS_FILE,
    SAFETENSORS_SUFFIX,
    SAVING_DIR,
    TENSORBOARD_DIR,
    TORCH_SAVE_SUFFIXES,
    TRAIN_METRICS_FILE,
    TRAINER_STATE_FILE,
    TRIAL_CONFIG_FILE,
)
from .metrics import ZERO_SHOT

log = logging.getLogger(__name__)


def check_run_config(run_dir: str | os.PathLike) -> Path:
    """The config of the finished or trained run in ``run_dir``; a ConfigError where there is none (before any
    model loads: :func:`loraqa.model.load_run`, ``loraqa predict``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); train one with `loraqa train`")
    if not path.read_bytes().strip():  # loraqa writes every field: an empty one would read as the defaults
        raise RunFolderError(
            f"{path}: empty; the run's config is lost: retrain it (`loraqa train ... --overwrite`)"
        )
    return path


def run_marker(folder: str | os.PathLike) -> str | None:
    """The file that makes ``folder`` a run's (its config; a sweep trial's config), None where it holds neither."""
    return next((f for f in (CONFIG_FILE, TRIAL_CONFIG_FILE) if (Path(folder) / f).is_file()), None)


class RunFolderError(ConfigError):
    """A run folder that cannot be used as it is (busy, not a folder, a corrupt file); the message names it."""


class RunFolder:
    """One run folder by its path: the paths of its files, its lock, its checkpoints and its results, read from
    the files alone. Nothing here loads a model."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- the layout (names from loraqa.layout)
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def train_metrics_file(self) -> Path:
        return self.path / TRAIN_METRICS_FILE

    @property
    def predictions_file(self) -> Path:
        return self.path / PREDICTIONS_FILE

    @property
    def official_predictions_file(self) -> Path:
        return self.path / OFFICIAL_PREDICTIONS_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def model_card_file(self) -> Path:
        return self.path / MODEL_CARD_FILE

    @property
    def error_file(self) -> Path:
        return self.path / ERROR_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    def weights_file(self, full: bool) -> Path:
        return self.path / weights_file(full)

    # -- the folder and its lock
    def make(self) -> None:
        make_run_folder(self.path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunFolder]:
        """Hold the folder's lock for the block (see :func:`lock_run_folder`); a :class:`RunFolderError` at once
        if another process holds it."""
        fd = lock_run_folder(self.path)
        try:
            yield self
        finally:
            os.close(fd)

    # -- checkpoints
    def checkpoints(self) -> tuple[list[Path], list[Path]]:
        """(complete checkpoints, oldest first; half-written ones): see :func:`complete_checkpoints`."""
        return complete_checkpoints(self.checkpoints_dir)

    def newest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, as it is (nothing is removed or checked here)."""
        complete, _ = self.checkpoints()
        return complete[-1] if complete else None

    def checkpoint_clocks(self) -> dict[int, Path]:
        """step -> the clock file (train time, tokens, peak memory so far) of each checkpoint past step 0 that
        has one, complete or not."""
        clocks = {}
        for d in self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*") if self.checkpoints_dir.is_dir() else ():
            step = checkpoint_step(d)
            if step and (d / CLOCK_FILE).is_file():
                clocks[step] = d / CLOCK_FILE
        return clocks

    # -- results
    def progress(self) -> tuple[int, int]:
        """How far the run got, comparable between copies of the folder: finished (3), trained but not scored
        (2), at a complete checkpoint (1, its step), or started at most (0)."""
        if self.metrics_file.exists():
            return 3, 0
        if self.train_metrics_file.exists():
            return 2, 0
        newest = self.newest_checkpoint()
        return (1, checkpoint_step(newest)) if newest else (0, 0)

    def read_json(self, name: str, default=None):
        """The JSON file ``name`` of the folder, or ``default`` when it is missing; a damaged one raises
        (:class:`~loraqa.io.CorruptFileError`, ``OSError``), naming the file."""
        path = self.path / name
        return read_json(path) if path.exists() else default

    def history(self) -> list[dict]:
        """The Trainer's log history; [] before the first line. A damaged file raises, naming itself."""
        return read_jsonl(self.log_file) if self.log_file.exists() else []

    def predictions(self) -> list[dict]:
        """The per-question records of the last evaluation; [] before one. A damaged file raises."""
        return read_jsonl(self.predictions_file) if self.predictions_file.exists() else []


def weights_file(full: bool) -> str:
    return FULL_WEIGHTS_FILE if full else ADAPTER_WEIGHTS_FILE


def checkpoint_step(checkpoint: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder; None for any other name."""
    name = Path(checkpoint).name
    step = name.removeprefix(CHECKPOINT_PREFIX)
    return int(step) if step != name and step.isascii() and step.isdigit() else None


def make_run_folder(run_dir: Path) -> None:
    """Create ``run_dir`` (and its parents), or say in one line why it cannot be."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: exists and is not a folder; pick another --output-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(
            f"{run_dir}: cannot create the run folder ({e.strerror or e}); pick another --output-dir"
        ) from None


def lock_run_folder(run_dir: Path) -> int:
    """Take ``run_dir``'s lock (:mod:`loraqa.locks`, on ``.loraqa.lock``) for this process and return the file
    descriptor that holds it (closing it releases the lock); a :class:`RunFolderError` naming the holder's pid
    if another process holds it."""
    make_run_folder(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd = locks.try_hold(path)
    except OSError as e:
        raise RunFolderError(f"{run_dir}: cannot write in the run folder ({e.strerror or e})") from None
    if fd is None:
        raise RunFolderError(
            f"{run_dir}: another loraqa process (pid {locks.holder(path)}) is working in this run folder; wait "
            "for it to finish, or pick another --output-dir"
        )
    locks.write_holder(fd)
    return fd


def record_failure(run_dir: Path, error: BaseException) -> None:
    """``error.json``: why this attempt failed, for whoever looks at the folder (a sweep reads the reason from
    the process's last line of stderr). Best effort: a full disk may refuse this file too."""
    summary = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    with contextlib.suppress(OSError):
        write_json_atomic(run_dir / ERROR_FILE, {"error": type(error).__name__, "summary": summary})


def prepare_run_dir(run_dir: Path, cfg: ExperimentConfig, overwrite: bool) -> None:
    """Write the config into ``run_dir``; refuse a folder holding another config's run. With ``overwrite``
    everything in it is removed first (but the lock file the caller holds)."""
    cfg_path = run_dir / CONFIG_FILE
    make_run_folder(run_dir)
    if not overwrite and _finished_method(run_dir) == ZERO_SHOT:
        raise RunFolderError(
            f"{run_dir}: holds a zero-shot evaluation (loraqa eval --model), not a trained run; pick another "
            "--output-dir, or pass --overwrite to replace it"
        )
    # a run that failed before it trained (a bad setting, missing data) leaves its config and error.json only:
    # nothing to keep, so the corrected command may take the folder
    failed_early = {e.name for e in run_dir.iterdir()} <= {CONFIG_FILE, ERROR_FILE, LOCK_FILE}
    if overwrite:
        others = [e.name for e in run_dir.iterdir() if e.name != LOCK_FILE]
        if others and not cfg_path.is_file():  # a mistyped -o (a folder of runs, a home folder) is not wiped
            raise RunFolderError(
                f"{run_dir}: not a run folder (no {CONFIG_FILE}; it holds {', '.join(sorted(others)[:3])}"
                f"{', ...' if len(others) > 3 else ''}), so --overwrite will not empty it; pick another --output-dir"
            )
        for entry in run_dir.iterdir():
            if entry.name == LOCK_FILE:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    # what a kill can leave behind: an atomic write's temporary file, a half-moved adapter (the lock held
    # means no other process is writing them)
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    shutil.rmtree(run_dir / SAVING_DIR, ignore_errors=True)
    try:
        old = cfg_path.read_text(encoding="utf-8") if cfg_path.exists() else None
    except (OSError, UnicodeDecodeError):
        old = "unreadable"
    if old is not None and old != cfg.to_yaml() and not failed_early and not _same_experiment(cfg_path, cfg):
        raise ConfigError(
            f"{run_dir}: holds a run of a different config ({cfg_path}); pick another --output-dir, "
            "or pass --overwrite to replace it"
        )
    write_text_atomic(cfg_path, cfg.to_yaml())


def _finished_method(run_dir: Path) -> str | None:
    """The method metrics.json names (lora, full, zero-shot), None where there is none to read."""
    try:
        return read_json(run_dir / METRICS_FILE).get("method")
    except (OSError, ValueError, AttributeError):
        return None


def _same_experiment(cfg_path: Path, cfg: ExperimentConfig) -> bool:
    """Whether a saved config, read with today's defaults for fields added since, is ``cfg``."""
    try:
        return load_config(cfg_path) == cfg
    except ConfigError:
        return False


def same_config_files(a: Path, b: Path) -> bool:
    """Whether two saved configs are one experiment: equal text, or equal once read (a loraqa that added a field
    spells out its default, an older one left it out)."""
    if a.read_bytes() == b.read_bytes():
        return True
    try:
        return _same_experiment(a, load_config(b))
    except ConfigError:
        return False


def _state_is_complete(path: Path) -> bool:
    """trainer_state.json is whole: the Trainer writes it in place, last, so a kill can leave half of it."""
    try:
        return "global_step" in json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False


def complete_checkpoints(ckpt_dir: Path) -> tuple[list[Path], list[Path]]:
    """The checkpoints in ``ckpt_dir`` as (complete ones, oldest first; half-written ones). The Trainer writes
    trainer_state.json last, so a folder without a whole one was being saved when the run was killed."""
    complete, partial = [], []
    for d in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*") if ckpt_dir.is_dir() else ():
        if d.is_dir() and checkpoint_step(d) is not None:
            (complete if _state_is_complete(d / TRAINER_STATE_FILE) else partial).append(d)
    return sorted(complete, key=checkpoint_step), partial


def check_checkpoint(checkpoint: Path) -> None:
    """A :class:`RunFolderError` naming the first file of a complete checkpoint that cannot be read back (a
    damaged disk or a hand edit: a kill cannot do this, as these files are written before trainer_state.json).
    Safetensors files are opened (header and size checked), torch pickles (zip archives) are CRC-checked."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(checkpoint.iterdir()):
        problem = None
        try:
            if f.suffix == SAFETENSORS_SUFFIX:
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            elif f.suffix in TORCH_SAVE_SUFFIXES:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
                    problem = f"member {bad} fails its checksum" if bad else None
            elif f.suffix == ".json":
                read_json(f)
        except (SafetensorError, zipfile.BadZipFile, CorruptFileError, OSError, ValueError) as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        if problem:
            raise RunFolderError(
                f"{f}: corrupt checkpoint file ({problem}); delete {checkpoint} to resume from an earlier "
                "checkpoint or from the start"
            )


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint, checked readable; half-written ones are removed rather than resumed
    from."""
    complete, partial = complete_checkpoints(ckpt_dir)
    for d in partial:
        log.info("removing incomplete checkpoint %s", d)
        shutil.rmtree(d, ignore_errors=True)
    if not complete:
        return None
    check_checkpoint(complete[-1])
    return str(complete[-1])


def check_weights(run_dir: Path, full: bool) -> None:
    """A :class:`RunFolderError` naming the trained-weights file (or its config) that cannot be read back."""
    from safetensors import SafetensorError, safe_open

    files = [weights_file(full), MODEL_CONFIG_FILE if full else ADAPTER_CONFIG_FILE]
    for name in files:
        path = run_dir / name
        if not path.is_file():
            raise RunFolderError(f"{path}: missing; retrain the run (`loraqa train ... --overwrite`)")
        try:
            if name.endswith(SAFETENSORS_SUFFIX):
                with safe_open(str(path), framework="pt") as st:
                    st.keys()
            elif not isinstance(config := read_json(path), dict):
                raise ValueError("not a JSON object")
            elif name == ADAPTER_CONFIG_FILE and "peft_type" not in config:
                raise ValueError("no peft_type: not a PEFT adapter config")
        except PermissionError:
            raise RunFolderError(
                f"{path}: cannot be read by this user; ask its owner to make it readable (chmod a+r)"
            ) from None
        except (SafetensorError, CorruptFileError, OSError, ValueError) as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RunFolderError(
                f"{path}: corrupt ({problem}); retrain the run (`loraqa train ... --overwrite`)"
            ) from None


def write_predictions(folder: Path, records: list[dict]) -> None:
    """``predictions.jsonl`` (one record a question) and ``predictions.json``, the official SQuAD format
    ``{id: answer}`` that the official evaluation scripts read as is; both written atomically."""
    write_jsonl_atomic(Path(folder) / PREDICTIONS_FILE, records)
    write_json_atomic(Path(folder) / OFFICIAL_PREDICTIONS_FILE, {r["id"]: r["prediction"] for r in records})


def make_portable(folder: Path, base_name: str | None) -> None:
    """Take the training machine's paths out of what PEFT's ``save_pretrained`` wrote into ``folder`` (the run
    folder's adapter, and every checkpoint, which ``loraqa sync`` may carry to other machines and into git):
    ``adapter_config.json`` names the base as ``base_name`` does (see :func:`portable_model_name`) instead of
    the path it was loaded from, and PEFT's template model card, which names the base by that path, is removed.
    """
    folder = Path(folder)
    adapter_cfg = folder / ADAPTER_CONFIG_FILE
    if base_name is not None and adapter_cfg.is_file():
        # set in the file, not on the model: PEFT's save would look the name up on the hub
        saved = read_json(adapter_cfg)
        write_json_atomic(adapter_cfg, {**saved, "base_model_name_or_path": portable_model_name(base_name)})
    (folder / MODEL_CARD_FILE).unlink(missing_ok=True)

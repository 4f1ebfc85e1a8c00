"""The run folder: its layout, and saving and loading what a run trained.

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

The names are defined once, in :mod:`loraqa.layout`. :func:`load_run` is the one way back from a folder to a model:
evaluation, prediction and export share it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .card import portable_model_name
from .config import ConfigError, ExperimentConfig, apply_overrides, load_config
from .io import CorruptFileError, read_json, write_json_atomic, write_jsonl_atomic, write_text_atomic
from .layout import (
    CONFIG_FILE,
    ERROR_FILE,
    LOCK_FILE,
    MODEL_CARD_FILE,
    OFFICIAL_PREDICTIONS_FILE,
    PREDICTIONS_FILE,
)
from .model import LoadedModel, load_model_and_tokenizer, prepare_for_generation

log = logging.getLogger(__name__)



class RunFolderError(ConfigError):
    """A run folder that cannot be used as it is (busy, not a folder, a corrupt file); the message names it."""


def weights_file(full: bool) -> str:
    return "model.safetensors" if full else "adapter_model.safetensors"


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
    """Take ``run_dir``'s lock (``fcntl.flock`` on ``.loraqa.lock``) for this process and return the file
    descriptor that holds it (closing it releases the lock); a :class:`RunFolderError` if another process holds
    it. The kernel drops the lock when the process dies, however it dies, so a killed run never leaves the
    folder locked."""
    import fcntl

    make_run_folder(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunFolderError(f"{run_dir}: cannot write in the run folder ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunFolderError(
            f"{run_dir}: another loraqa process (pid {holder}) is working in this run folder; wait for it to "
            "finish, or pick another --output-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd  # the file stays when the lock is released (unlinking it would let two processes lock two files)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """:func:`lock_run_folder` as a context manager."""
    fd = lock_run_folder(run_dir)
    try:
        yield
    finally:
        os.close(fd)


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
    shutil.rmtree(run_dir / ".saving", ignore_errors=True)
    try:
        old = cfg_path.read_text(encoding="utf-8") if cfg_path.exists() else None
    except (OSError, UnicodeDecodeError):
        old = "unreadable"
    if old is not None and old != cfg.to_yaml() and not _same_experiment(cfg_path, cfg):
        raise ConfigError(
            f"{run_dir}: holds a run of a different config ({cfg_path}); pick another --output-dir, "
            "or pass --overwrite to replace it"
        )
    write_text_atomic(cfg_path, cfg.to_yaml())


def _state_is_complete(path: Path) -> bool:
    """trainer_state.json is whole: the Trainer writes it in place, last, so a kill can leave half of it."""
    try:
        return "global_step" in json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False


def check_checkpoint(checkpoint: Path) -> None:
    """A :class:`RunFolderError` naming the first file of a complete checkpoint that cannot be read back (a
    damaged disk or a hand edit: a kill cannot do this, as these files are written before trainer_state.json).
    Safetensors files are opened (header and size checked), torch pickles (zip archives) are CRC-checked."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(checkpoint.iterdir()):
        problem = None
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            elif f.suffix in (".pt", ".pth", ".bin"):
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


def _same_experiment(cfg_path: Path, cfg: ExperimentConfig) -> bool:
    """Whether a saved config, read with today's defaults for fields added since, is ``cfg``."""
    try:
        return load_config(cfg_path) == cfg
    except ConfigError:
        return False


def complete_checkpoints(ckpt_dir: Path) -> tuple[list[Path], list[Path]]:
    """The checkpoints in ``ckpt_dir`` as (complete ones, oldest first; half-written ones). The Trainer writes
    trainer_state.json last, so a folder without a whole one was being saved when the run was killed."""
    complete, partial = [], []
    for d in ckpt_dir.glob("checkpoint-*") if ckpt_dir.is_dir() else ():
        if d.is_dir() and d.name.split("-")[-1].isdigit():
            (complete if _state_is_complete(d / "trainer_state.json") else partial).append(d)
    return sorted(complete, key=lambda d: int(d.name.split("-")[-1])), partial


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


def write_predictions(folder: Path, records: list[dict]) -> None:
    """``predictions.jsonl`` (one record a question) and ``predictions.json``, the official SQuAD format
    ``{id: answer}`` that the official evaluation scripts read as is; both written atomically."""
    write_jsonl_atomic(Path(folder) / PREDICTIONS_FILE, records)
    write_json_atomic(Path(folder) / OFFICIAL_PREDICTIONS_FILE, {r["id"]: r["prediction"] for r in records})


def save_trained(model, tok, run_dir: Path, full: bool, base_name: str | None = None) -> None:
    """Save the adapter (or the full model) into ``run_dir``. ``base_name`` (the config's model name) goes into
    ``adapter_config.json`` as ``base_model_name_or_path`` instead of the path the base was loaded from."""
    # save_pretrained writes each file in place; write into a temporary folder and move the files in,
    # so an interruption never leaves a half-written adapter under the run folder's names
    tmp = run_dir / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    make_portable(tmp, base_name)  # the run's own card comes later
    if full:
        tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


def make_portable(folder: Path, base_name: str | None) -> None:
    """Take the training machine's paths out of what PEFT's ``save_pretrained`` wrote into ``folder`` (the run
    folder's adapter, and every checkpoint, which ``loraqa sync`` may carry to other machines and into git):
    ``adapter_config.json`` names the base as ``base_name`` does (see :func:`portable_model_name`) instead of
    the path it was loaded from, and PEFT's template model card, which names the base by that path, is removed.
    """
    folder = Path(folder)
    adapter_cfg = folder / "adapter_config.json"
    if base_name is not None and adapter_cfg.is_file():
        # set in the file, not on the model: PEFT's save would look the name up on the hub
        write_json_atomic(adapter_cfg, {**read_json(adapter_cfg),
                                        "base_model_name_or_path": portable_model_name(base_name)})  # fmt: skip
    (folder / MODEL_CARD_FILE).unlink(missing_ok=True)


def check_weights(run_dir: Path, full: bool) -> None:
    """A :class:`RunFolderError` naming the trained-weights file (or its config) that cannot be read back."""
    from safetensors import SafetensorError, safe_open

    files = [weights_file(full), "config.json" if full else "adapter_config.json"]
    for name in files:
        path = run_dir / name
        if not path.is_file():
            raise RunFolderError(f"{path}: missing; retrain the run (`loraqa train ... --overwrite`)")
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(path), framework="pt") as st:
                    st.keys()
            elif not isinstance(read_json(path), dict):
                raise ValueError("not a JSON object")
        except (SafetensorError, CorruptFileError, OSError, ValueError) as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RunFolderError(
                f"{path}: corrupt ({problem}); retrain the run (`loraqa train ... --overwrite`)"
            ) from None


def load_checkpoint_weights(model, checkpoint: Path, full: bool) -> None:
    """Load a Trainer checkpoint's trained weights (the adapter, or the full model) into ``model`` in place."""
    from safetensors.torch import load_file

    if full:
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)  # tied weights
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))


def load_trained(model, run_dir: Path, full: bool, device):
    check_weights(run_dir, full)
    if full:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32).to(device)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(run_dir / "adapter_model.safetensors")))
    return model


@dataclass
class LoadedRun:
    cfg: ExperimentConfig
    lm: LoadedModel  # the base as loaded (tokenizer, device, precision)
    model: torch.nn.Module  # the trained model, ready for generation (adapter merged as the config asks)


def load_run(
    run_dir: str | Path, *, overrides: list[tuple[str, object]] = (), device: str | None = None
) -> LoadedRun:
    """A trained run folder's config (with ``overrides``, e.g. ``("data.eval_limit", 100)``) and its trained
    model, ready for generation."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); train one with `loraqa train`")
    cfg = load_config(run_dir / CONFIG_FILE)
    cfg = apply_overrides(cfg, list(overrides)) if overrides else cfg
    full = cfg.train.method == "full"
    if not (run_dir / weights_file(full)).is_file():
        raise ConfigError(f"{run_dir}: has no trained weights yet; finish it with `loraqa train` first")
    check_weights(run_dir, full)
    # the seed the run's base was made with: a random built-in (tiny-random-gpt2) is made from it, and the
    # adapter was trained on exactly those weights
    lm = load_model_and_tokenizer(cfg.model.name, cfg.model.precision, cfg.model.attn_implementation, device,
                                  seed=cfg.train.seed, trainable_base=full)  # fmt: skip
    if full:
        model = load_trained(lm.model, run_dir, True, lm.device)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(lm.model, run_dir)
    model = prepare_for_generation(model, merge=cfg.eval.merge_adapter, precision=lm.precision)
    return LoadedRun(cfg=cfg, lm=lm, model=model)

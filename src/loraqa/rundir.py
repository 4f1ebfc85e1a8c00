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

:func:`load_run` is the one way back from a folder to a model: evaluation, prediction and export share it.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, ExperimentConfig, apply_overrides, load_config
from .io import read_json, write_json_atomic, write_jsonl_atomic, write_text_atomic
from .model import LoadedModel, load_model_and_tokenizer, prepare_for_generation

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOG_FILE = "log_history.jsonl"
TRAIN_METRICS_FILE = "train_metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
OFFICIAL_PREDICTIONS_FILE = "predictions.json"
MODEL_CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"


def weights_file(full: bool) -> str:
    return "model.safetensors" if full else "adapter_model.safetensors"


def prepare_run_dir(run_dir: Path, cfg: ExperimentConfig, overwrite: bool) -> None:
    cfg_path = run_dir / "config.yaml"
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if cfg_path.exists() and cfg_path.read_text() != cfg.to_yaml():
        raise ConfigError(
            f"{run_dir}: holds a run of a different config ({cfg_path}); pick another --output-dir, "
            "or pass --overwrite to replace it"
        )
    write_text_atomic(cfg_path, cfg.to_yaml())


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint. The Trainer writes trainer_state.json last, so a folder without it was
    being saved when the run was killed; it is removed rather than resumed from."""
    if not ckpt_dir.is_dir():
        return None
    complete = []
    for d in ckpt_dir.glob("checkpoint-*"):
        if not d.is_dir() or not d.name.split("-")[-1].isdigit():
            continue
        if (d / "trainer_state.json").is_file():
            complete.append(d)
        else:
            log.info("removing incomplete checkpoint %s", d)
            shutil.rmtree(d, ignore_errors=True)
    return str(max(complete, key=lambda d: int(d.name.split("-")[-1]))) if complete else None


def write_predictions(folder: Path, records: list[dict]) -> None:
    """``predictions.jsonl`` (one record a question) and ``predictions.json``, the official SQuAD format
    ``{id: answer}`` that the official evaluation scripts read as is; both written atomically."""
    write_jsonl_atomic(Path(folder) / PREDICTIONS_FILE, records)
    write_json_atomic(Path(folder) / OFFICIAL_PREDICTIONS_FILE, {r["id"]: r["prediction"] for r in records})


def portable_model_name(name: str) -> str:
    """The base model as another machine can name it: a hub id or built-in name as is, a local folder or
    ``.gguf`` file by its file name (never a path of the machine that trained it)."""
    return Path(name).name if Path(name).expanduser().is_absolute() or Path(name).exists() else name


def save_trained(model, tok, run_dir: Path, full: bool, base_name: str | None = None) -> None:
    """Save the adapter (or the full model) into ``run_dir``. ``base_name`` (the config's model name) goes into
    ``adapter_config.json`` as ``base_model_name_or_path`` instead of the path the base was loaded from."""
    # save_pretrained writes each file in place; write into a temporary folder and move the files in,
    # so an interruption never leaves a half-written adapter under the run folder's names
    tmp = run_dir / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    adapter_cfg = tmp / "adapter_config.json"
    if base_name is not None and adapter_cfg.is_file():
        # set in the file, not on the model: PEFT's save would look the name up on the hub
        write_json_atomic(adapter_cfg, {**read_json(adapter_cfg),
                                        "base_model_name_or_path": portable_model_name(base_name)})  # fmt: skip
    if full:
        tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


def load_trained(model, run_dir: Path, full: bool, device):
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
    lm = load_model_and_tokenizer(cfg.model.name, cfg.model.precision, cfg.model.attn_implementation, device,
                                  trainable_base=full)  # fmt: skip
    if full:
        model = load_trained(lm.model, run_dir, True, lm.device)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(lm.model, run_dir)
    model = prepare_for_generation(model, merge=cfg.eval.merge_adapter, precision=lm.precision)
    return LoadedRun(cfg=cfg, lm=lm, model=model)

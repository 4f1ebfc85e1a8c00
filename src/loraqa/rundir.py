"""A run folder's trained model: saving it, and loading it back for generation.

The folder itself (its files, lock, checkpoints and results) is :mod:`loraqa.runfolder`, which loads no model;
its functions are importable from here too. :func:`load_run` is the one way back from a folder to a model:
evaluation, prediction and export share it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, ExperimentConfig, apply_overrides, load_config
from .layout import CONFIG_FILE
from .model import LoadedModel, load_model, prepare_for_generation
from .runfolder import (
    RunFolder,
    RunFolderError,
    check_checkpoint,
    check_weights,
    complete_checkpoints,
    last_checkpoint,
    lock_run_folder,
    make_portable,
    make_run_folder,
    prepare_run_dir,
    record_failure,
    weights_file,
    write_predictions,
)

__all__ = [
    # saving and loading the model
    "LoadedRun",
    "load_checkpoint_weights",
    "load_run",
    "load_trained",
    "save_trained",
    # the run folder, from loraqa.runfolder
    "RunFolder",
    "RunFolderError",
    "check_checkpoint",
    "check_weights",
    "complete_checkpoints",
    "last_checkpoint",
    "lock_run_folder",
    "make_portable",
    "make_run_folder",
    "prepare_run_dir",
    "record_failure",
    "weights_file",
    "write_predictions",
]


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
    lm = load_model(cfg.model, device, seed=cfg.train.seed, trainable_base=full)
    if full:
        model = load_trained(lm.model, run_dir, True, lm.device)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(lm.model, run_dir)
    model = prepare_for_generation(model, merge=cfg.eval.merge_adapter, precision=lm.precision)
    return LoadedRun(cfg=cfg, lm=lm, model=model)

"""``train.report_to``: where a run's curves and scores go besides its own files.

tensorboard is loraqa's own (event files in ``RUN/tensorboard``: the Trainer would log under ``output_dir``, the
checkpoints folder, which is removed after training); wandb, mlflow and the Trainer's other integrations pass
through to it, each checked installed before anything is loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .config import ConfigError
from .layout import TENSORBOARD_DIR
from .metrics import V2_PARTS, v2_keys

TENSORBOARD = "tensorboard"


def report_names(report_to: str | list[str]) -> list[str]:
    """``train.report_to`` as a list of names (``none`` names nothing)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n for n in names if n != "none"]


def reporters(report_to: str | list[str]) -> list[str]:
    """The Trainer's ``report_to``: the integrations ``train.report_to`` names but tensorboard, each installed."""
    names = [n for n in report_names(report_to) if n != TENSORBOARD]
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to: {name} is not installed; pip install {name}, or drop it")
    return names


def tensorboard_callback(run_dir: Path):
    """The Trainer's own TensorBoardCallback, writing its event files to ``RUN/tensorboard``."""
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(run_dir / TENSORBOARD_DIR)
    return callback


def log_final_scores(run_dir: Path, metrics: dict, step: int) -> None:
    """EM and F1 (and SQuAD 2.0's HasAns/NoAns ones) of the final evaluation as TensorBoard scalars
    ``final/exact_match`` ... at the last training step, beside the training curves (``eval/f1`` is the
    in-training scores' series, on other questions: a final point there would read as one more of them)."""
    from torch.utils.tensorboard import SummaryWriter

    # each SQuAD 2.0 part's exact match and F1, not its count of questions
    keys = ["exact_match", "f1"] + [key for part in V2_PARTS for key in v2_keys(part)[:2]]
    with SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR)) as writer:
        for key in keys:
            if metrics.get(key) is not None:
                writer.add_scalar(f"final/{key}", metrics[key], step)

"""train.report_to: TensorBoard event files in the run folder (curves and the final EM/F1); other integrations
pass through to the Trainer when installed."""

from __future__ import annotations

import importlib.util

import pytest

from loraqa.config import ConfigError
from loraqa.tracking import reporters


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    for events in sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_by_default_with_the_final_scores(tmp_path, synthetic_dir):
    from loraqa.pipeline import run_experiment
    from test_train import tiny_config

    metrics = run_experiment(tiny_config(synthetic_dir), tmp_path / "run", progress=False)
    got = scalars(tmp_path / "run" / "tensorboard")
    assert len(got["train/loss"]) >= 4 and "train/learning_rate" in got and "eval/loss" in got
    assert got["final/exact_match"] == [(4, pytest.approx(metrics["exact_match"]))]
    assert got["final/f1"] == [(4, pytest.approx(metrics["f1"]))]
    assert "eval/f1" not in got  # the in-training scores' series (none here): the final scores are apart


def test_report_to_none_writes_no_events(tmp_path, synthetic_dir):
    from loraqa.pipeline import run_experiment
    from test_train import tiny_config

    cfg = tiny_config(synthetic_dir, **{"train.report_to": "none", "train.max_steps": 1, "train.eval_steps": 0,
                                        "train.save_steps": 0})  # fmt: skip
    run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_other_integrations_pass_through_when_installed():
    assert reporters("tensorboard") == [] and reporters("none") == []
    for name in ("wandb", "mlflow"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(ConfigError, match=f"train.report_to: {name} is not installed"):
                reporters(["tensorboard", name])
        else:
            assert reporters(["tensorboard", name]) == [name]

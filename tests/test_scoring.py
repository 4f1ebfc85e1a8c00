"""Scores during training: EM/F1 of generated answers logged every eval.score_steps, the best adapter kept,
early stopping, and both surviving an interruption (tiny random GPT-2, synthetic data)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from loraqa.config import ConfigError, ExperimentConfig, apply_overrides
from loraqa.metrics import best_scoring, scorings_since_best
from loraqa.pipeline import run_experiment
from loraqa.scoring import ScoreCallback


def tiny_config(data_dir, **overrides) -> ExperimentConfig:
    base = {
        "model.name": "tiny-random-gpt2", "model.precision": "fp32", "data.data_dir": str(data_dir),
        "data.train_limit": 16, "data.eval_limit": 8, "data.loss_eval_limit": 4, "data.score_limit": 6,
        "train.max_steps": 8, "train.batch_size": 4, "train.warmup_steps": 0, "train.eval_steps": 0,
        "train.save_steps": 100, "train.logging_steps": 1, "train.lr": 5e-3, "eval.batch_size": 4,
        "eval.max_new_tokens": 4, "eval.score_steps": 2,
    }  # fmt: skip
    base.update(overrides)
    return apply_overrides(ExperimentConfig(), list(base.items()))


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log_history.jsonl").read_text().splitlines()]


def scripted(monkeypatch, f1_by_step: dict[int, float]):
    """In-training F1 as a function of the step (a random tiny model scores 0 everywhere): the decisions are
    what is tested here; the real scoring is tested on its own below."""
    calls = []

    def score(self, model):
        step = self.trainer.state.global_step
        calls.append(step)
        return {"eval_exact_match": 0.0, "eval_f1": f1_by_step[step], "eval_score_seconds": 0.5}

    monkeypatch.setattr(ScoreCallback, "score", score)
    return calls


class AdapterAt:
    """A callback keeping a copy of the LoRA weights at the end of given steps."""

    def __new__(cls, steps):
        from transformers import TrainerCallback

        class _Snap(TrainerCallback):
            def __init__(self):
                self.weights = {}

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step in steps:
                    self.weights[state.global_step] = {
                        k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k
                    }

        return _Snap()


def test_scores_are_logged_every_n_steps_with_the_final_generator(tmp_path, synthetic_dir):
    cfg = tiny_config(synthetic_dir, **{"train.max_steps": 4})
    metrics = run_experiment(cfg, tmp_path / "run", progress=False)
    rows = [h for h in history(tmp_path / "run") if "eval_f1" in h]
    assert [h["step"] for h in rows] == [2, 4]
    assert all(0 <= h["eval_f1"] <= 100 and 0 <= h["eval_exact_match"] <= 100 for h in rows)
    assert metrics["scorings"] == 2 and metrics["score_questions"] == 6 and metrics["score_seconds"] > 0
    # the best scoring is the highest logged F1, the earlier step on a tie
    best = max(rows, key=lambda h: (h["eval_f1"], -h["step"]))
    assert (metrics["best_step"], metrics["best_eval_f1"]) == (best["step"], best["eval_f1"])
    # the final evaluation's own scores on the same questions come from the same generator: at the last step
    # (no keep_best) the slice's F1 equals the final F1 when the slice is the evaluated questions
    same = tiny_config(synthetic_dir, **{"train.max_steps": 4, "data.eval_limit": 6})
    m2 = run_experiment(same, tmp_path / "same", progress=False)
    last = [h for h in history(tmp_path / "same") if "eval_f1" in h][-1]
    assert last["eval_f1"] == pytest.approx(m2["f1"]) and last["eval_exact_match"] == pytest.approx(m2["exact_match"])


def test_keep_best_evaluates_and_saves_the_best_scoring_adapter(tmp_path, synthetic_dir, monkeypatch):
    scripted(monkeypatch, {2: 10.0, 4: 30.0, 6: 20.0, 8: 25.0})
    snap = AdapterAt({4, 8})
    cfg = tiny_config(synthetic_dir, **{"train.keep_best": True})
    metrics = run_experiment(cfg, tmp_path / "run", callbacks=[snap], progress=False)
    assert metrics["train_steps"] == 8 and metrics["best_step"] == 4 and metrics["kept_step"] == 4
    assert metrics["best_eval_f1"] == 30.0
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    at4 = snap.weights[4]
    assert len(saved) == len(at4)
    for name, value in at4.items():  # the saved adapter is step 4's, not the last step's
        key = next(k for k in saved if name.replace(".default", "").endswith(k.split("base_model.model.", 1)[-1]))
        assert torch.equal(saved[key], value), name
    assert any(not torch.equal(snap.weights[8][n], at4[n]) for n in at4)
    assert not (tmp_path / "run" / "checkpoints").exists()
    card = (tmp_path / "run" / "README.md").read_text()  # the card says which adapter it describes
    assert "- 8 steps (2 epochs) of 8 steps asked" in card
    assert "- the adapter is step 4's, the best scoring (train.keep_best)" in card


def test_early_stopping_stops_after_patience_scorings_without_a_better_f1(tmp_path, synthetic_dir, monkeypatch):
    calls = scripted(monkeypatch, {2: 10.0, 4: 5.0, 6: 10.0, 8: 50.0})
    cfg = tiny_config(synthetic_dir, **{"train.early_stopping_patience": 2})
    metrics = run_experiment(cfg, tmp_path / "run", progress=False)
    assert calls == [2, 4, 6] and metrics["train_steps"] == 6 and metrics["stopped_early_at"] == 6
    assert metrics["best_step"] == 2
    card = (tmp_path / "run" / "README.md").read_text()
    assert "- 6 steps (1.5 epochs) of 8 steps asked" in card and "- stopped early at step 6" in card


@pytest.mark.parametrize("save_steps", [100, 0])  # 0: checkpoints at keep_best's and the stop's request alone
def test_keep_best_and_early_stopping_resume_after_an_interruption(tmp_path, synthetic_dir, monkeypatch, save_steps):
    from transformers import TrainerCallback

    from loraqa.callbacks import Interrupted

    f1 = {2: 10.0, 4: 30.0, 6: 20.0, 8: 25.0, 10: 28.0, 12: 99.0}
    scripted(monkeypatch, f1)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(synthetic_dir, **{"train.max_steps": 12, "train.keep_best": True,
                                        "train.early_stopping_patience": 3, "train.save_steps": save_steps})  # fmt: skip
    with pytest.raises(Interrupted):
        run_experiment(cfg, tmp_path / "resumed", callbacks=[Stop()], progress=False)
    resumed = run_experiment(cfg, tmp_path / "resumed", progress=False)
    straight = run_experiment(cfg, tmp_path / "straight", progress=False)
    assert resumed["resumed_from"] == "checkpoint-5"
    for m in (resumed, straight):  # best at 4; 6, 8, 10 no better: stopped at 10, step 12's 99 never seen
        assert (m["best_step"], m["kept_step"], m["stopped_early_at"], m["train_steps"]) == (4, 4, 10, 10)
    a = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert resumed["exact_match"] == straight["exact_match"] and resumed["f1"] == straight["f1"]


def test_best_and_patience_from_the_log_history():
    log = [{"loss": 1.0, "step": 1}, {"eval_f1": 10.0, "step": 2}, {"eval_f1": 30.0, "step": 4},
           {"eval_f1": 30.0, "step": 6}, {"eval_f1": 20.0, "step": 8}]  # fmt: skip
    assert best_scoring(log) == (4, 30.0)  # a tie keeps the earlier adapter
    assert scorings_since_best(log) == 2
    assert best_scoring([{"loss": 1.0, "step": 1}]) is None and scorings_since_best([]) == 0


def test_keep_best_without_scores_is_a_config_error(synthetic_dir):
    with pytest.raises(ConfigError, match="train.keep_best: needs scores during training; set eval.score_steps"):
        tiny_config(synthetic_dir, **{"eval.score_steps": 0, "train.keep_best": True})
    with pytest.raises(ConfigError, match="train.early_stopping_patience"):
        tiny_config(synthetic_dir, **{"eval.score_steps": 0, "train.early_stopping_patience": 2})
    # a first scoring past the last step: no decision would ever be made
    with pytest.raises(ConfigError, match="train.keep_best: eval.score_steps 10 is past train.max_steps 6"):
        tiny_config(synthetic_dir, **{"eval.score_steps": 10, "train.max_steps": 6, "train.keep_best": True})


def test_the_final_evaluation_can_be_held_out_from_the_scored_slice(tmp_path, synthetic_dir):
    """data.eval_skip: in-training scores on the first data.score_limit dev questions, the final evaluation on
    data.eval_limit questions after the first data.eval_skip (none of which a decision saw)."""
    from loraqa.answering import eval_run_dir

    cfg = tiny_config(synthetic_dir, **{"train.max_steps": 2, "data.eval_skip": 6, "data.eval_limit": 5})
    metrics = run_experiment(cfg, tmp_path / "run", progress=False)
    ids = [json.loads(x)["id"] for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert ids == [f"dev-{i:05d}" for i in range(6, 11)] and metrics["n_questions"] == 5
    assert metrics["score_questions"] == 6  # dev-00000 .. dev-00005, scored during training
    again = eval_run_dir(tmp_path / "run", out_dir=tmp_path / "again", progress=False)
    assert again["n_questions"] == 5 and again["f1"] == metrics["f1"]


def test_a_pruning_decided_as_a_stop_arrives_is_kept_on_resume(tmp_path, synthetic_dir, monkeypatch):
    """A search's pruner stops the trial at step 4 while a stop signal comes in: the checkpoint saved there says
    pruned (in its log history), so the rerun ends as pruned at 4, as an unstopped trial does, rather than
    training on past a rung the pruner has already judged."""
    from loraqa.callbacks import Interrupted

    scripted(monkeypatch, {2: 10.0, 4: 5.0, 6: 1.0, 8: 1.0})

    def prune_at_4_as_a_stop_comes(step, scores):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            return True
        return False

    cfg = tiny_config(synthetic_dir)
    with pytest.raises(Interrupted):
        run_experiment(cfg, tmp_path / "run", on_score=prune_at_4_as_a_stop_comes, progress=False)
    resumed = run_experiment(cfg, tmp_path / "run", on_score=lambda step, scores: False, progress=False)
    straight = run_experiment(cfg, tmp_path / "straight", on_score=lambda s, sc: s == 4, progress=False)
    for m in (resumed, straight):
        assert m["pruned"] and m["pruned_at"] == 4 and m["train_steps"] == 4 and m["f1"] is None


def test_the_final_eval_loss_is_logged_once_and_keep_bests_under_its_own_key(tmp_path, synthetic_dir, monkeypatch):
    """The Trainer evaluates the eval loss at the last step: the run reuses it (no second entry at that step);
    with keep_best's earlier adapter back, its loss is logged as kept_eval_loss, not as that step's eval_loss."""
    scripted(monkeypatch, {2: 10.0, 4: 30.0, 6: 20.0, 8: 25.0})
    for keep_best in (False, True):
        run = tmp_path / f"keep-{keep_best}"
        m = run_experiment(tiny_config(synthetic_dir, **{"train.eval_steps": 2, "train.keep_best": keep_best}),
                           run, progress=False)  # fmt: skip
        steps = [h["step"] for h in history(run) if "eval_loss" in h]
        assert steps == [2, 4, 6, 8]  # once each
        kept = [h for h in history(run) if "kept_eval_loss" in h]
        if keep_best:
            assert m["kept_step"] == 4 and len(kept) == 1 and m["final_eval_loss"] == kept[0]["kept_eval_loss"]
        else:
            assert not kept and m["final_eval_loss"] == next(h["eval_loss"] for h in history(run)[::-1] if "eval_loss" in h)


def test_scorings_leave_the_logged_train_losses_as_without_them(tmp_path, synthetic_dir, monkeypatch):
    """Trainer.log (the scores) clears the flag the Trainer logs the step's own loss by: at a scoring step
    that is also a logging step, the loss must still be logged, and final_train_loss be the last step's."""
    scripted(monkeypatch, {2: 10.0, 4: 20.0, 6: 30.0})
    losses, finals = {}, {}
    for name, every in (("plain", 0), ("scored", 2)):
        cfg = tiny_config(synthetic_dir, **{"train.max_steps": 6, "train.logging_steps": 2, "eval.score_steps": every})
        metrics = run_experiment(cfg, tmp_path / name, progress=False)
        losses[name] = [(h["step"], h["loss"]) for h in history(tmp_path / name) if "loss" in h]
        finals[name] = metrics["final_train_loss"]
    assert [s for s, _ in losses["plain"]] == [1, 2, 4, 6]  # the first step logged too
    assert losses["scored"] == losses["plain"] and finals["scored"] == finals["plain"] == losses["plain"][-1][1]

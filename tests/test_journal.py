"""An evaluation interrupted midway resumes from its journal: only the rest is generated, in the same batches, and
the answers are those of an uninterrupted evaluation; a journal that is not this evaluation's is not trusted."""

from __future__ import annotations

import json

import pytest
import torch

from loraqa import generate
from loraqa.answering import answer
from loraqa.config import EvalConfig
from loraqa.journal import AnswerJournal
from loraqa.layout import ANSWER_JOURNAL_FILE

EVAL = EvalConfig(batch_size=2, max_new_tokens=4, batch_invariant=False)  # the batched path: batches to count


class Stop(Exception):
    pass


@pytest.fixture
def lm():
    from loraqa.config import ModelConfig
    from loraqa.model import load_model

    return load_model(ModelConfig(name="tiny-random-gpt2", precision="fp32"), "cpu")


@pytest.fixture
def dev(synthetic_dir):
    from loraqa.data import load_squad

    return load_squad(synthetic_dir, split="dev", limit=12)[0]


@pytest.fixture
def batches(monkeypatch):
    """How many batches the model answers (calls of generate.greedy_continue)."""
    seen = []
    real = generate.greedy_continue
    monkeypatch.setattr(generate, "greedy_continue", lambda *a, **k: seen.append(1) or real(*a, **k))
    return seen


def interrupt_after(monkeypatch, n: int):
    """Every journal stops the evaluation (as a kill would) once it has kept ``n`` batches."""
    real = AnswerJournal.record

    def record(self, idx, answers):
        real(self, idx, answers)
        self.kept = getattr(self, "kept", 0) + 1
        if self.kept == n:
            raise Stop

    monkeypatch.setattr(AnswerJournal, "record", record)
    return lambda: monkeypatch.setattr(AnswerJournal, "record", real)


def answers(records):
    return [r["prediction"] for r in records]


def interrupted(lm, dev, folder, monkeypatch, n=3):
    undo = interrupt_after(monkeypatch, n)
    with pytest.raises(Stop):
        answer(
            lm.model, lm.tokenizer, dev, eval_cfg=EVAL, progress=False, journal=folder / ANSWER_JOURNAL_FILE
        )
    undo()
    return folder / ANSWER_JOURNAL_FILE


def test_an_interrupted_evaluation_answers_only_the_rest_and_the_same(
    lm, dev, tmp_path, monkeypatch, batches
):
    whole, summary = answer(lm.model, lm.tokenizer, dev, eval_cfg=EVAL, progress=False)
    total = len(batches)
    assert total == 6 and len(set(answers(whole))) > 1  # answers that can tell a mix-up
    journal = interrupted(lm, dev, tmp_path, monkeypatch)
    kept = journal.read_text().splitlines()
    assert len(kept) == 1 + 3 and sum(len(json.loads(line)["i"]) for line in kept[1:]) == 6
    batches.clear()
    resumed, again = answer(
        lm.model, lm.tokenizer, dev, eval_cfg=EVAL, progress=False, journal=tmp_path / ANSWER_JOURNAL_FILE
    )
    assert len(batches) == total - 3
    assert answers(resumed) == answers(whole) and again["f1"] == summary["f1"]
    assert again["eval_seconds"] >= sum(json.loads(line)["s"] for line in kept[1:])
    # kept until the results are written (by their writer): killed before that, the answers are all there
    batches.clear()
    third, _ = answer(
        lm.model, lm.tokenizer, dev, eval_cfg=EVAL, progress=False, journal=tmp_path / ANSWER_JOURNAL_FILE
    )
    assert len(batches) == 0 and answers(third) == answers(whole)


def test_kept_answers_are_read_back_not_generated_again(lm, dev, tmp_path, monkeypatch):
    journal = interrupted(lm, dev, tmp_path, monkeypatch)
    lines = journal.read_text().splitlines()
    first = json.loads(lines[1])
    first["a"][0] = "kept answer"
    journal.write_text("\n".join([lines[0], json.dumps(first), *lines[2:]]) + "\n")
    resumed, _ = answer(
        lm.model, lm.tokenizer, dev, eval_cfg=EVAL, progress=False, journal=tmp_path / ANSWER_JOURNAL_FILE
    )
    assert answers(resumed)[first["i"][0]] == "kept answer"


def test_a_line_cut_short_is_dropped_and_the_rest_resumes(lm, dev, tmp_path, monkeypatch, batches):
    whole, _ = answer(lm.model, lm.tokenizer, dev, eval_cfg=EVAL, progress=False)
    journal = interrupted(lm, dev, tmp_path, monkeypatch)
    with journal.open("a") as f:
        f.write('{"i": [7, 8], "a": ["cut')  # killed while writing
    batches.clear()
    resumed, _ = answer(
        lm.model, lm.tokenizer, dev, eval_cfg=EVAL, progress=False, journal=tmp_path / ANSWER_JOURNAL_FILE
    )
    assert answers(resumed) == answers(whole) and len(batches) == 6 - 3


@pytest.mark.parametrize("change", ["weights", "settings"])
def test_a_journal_of_another_model_or_settings_is_answered_again(
    lm, dev, tmp_path, monkeypatch, batches, change
):
    journal = interrupted(lm, dev, tmp_path, monkeypatch)
    lines = journal.read_text().splitlines()
    first = json.loads(lines[1])
    first["a"][0] = "kept answer"
    journal.write_text("\n".join([lines[0], json.dumps(first), *lines[2:]]) + "\n")
    cfg = EVAL
    if change == "weights":
        with torch.no_grad():
            next(lm.model.parameters()).view(-1)[0] += 1e-3  # one weight, slightly
    else:
        cfg = EvalConfig(batch_size=2, max_new_tokens=5, batch_invariant=False)  # another answer length
    batches.clear()
    resumed, _ = answer(
        lm.model, lm.tokenizer, dev, eval_cfg=cfg, progress=False, journal=tmp_path / ANSWER_JOURNAL_FILE
    )
    assert len(batches) == 6 and "kept answer" not in answers(resumed)


def test_a_run_stopped_while_answering_resumes_its_answers(tmp_path, synthetic_dir, monkeypatch, batches):
    """``loraqa train`` keeps its answers in the run folder: stopped during its final evaluation, the rerun
    loads the trained adapter, answers only the batches not kept, and writes what an uninterrupted run does."""
    from loraqa.pipeline import run_experiment
    from test_train import tiny_config

    cfg = tiny_config(
        synthetic_dir, **{"train.lr": 0.05, "eval.batch_size": 2, "eval.batch_invariant": False}
    )
    whole = run_experiment(cfg, tmp_path / "whole", progress=False)
    total = len(batches)
    undo = interrupt_after(monkeypatch, 2)
    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "run", progress=False)
    undo()
    assert (tmp_path / "run" / ANSWER_JOURNAL_FILE).is_file() and not (
        tmp_path / "run" / "metrics.json"
    ).exists()
    batches.clear()
    again = run_experiment(cfg, tmp_path / "run", progress=False)
    assert len(batches) == total - 2
    for name in ("predictions.json", "predictions.jsonl"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert again["f1"] == whole["f1"] and not (tmp_path / "run" / ANSWER_JOURNAL_FILE).exists()

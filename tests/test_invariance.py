"""An answer does not depend on the questions asked with it (eval.batch_invariant, the default): a tiny bf16 run's
own predictions, ``loraqa predict`` and ``loraqa ask`` (one question at a time) agree question for question."""

from __future__ import annotations

import json
import random

import pytest

from helpers import train_tiny_run
from loraqa.answering import load_answerer
from loraqa.cli import main
from loraqa.data import load_squad
from loraqa.layout import ANSWER_JOURNAL_FILE
from loraqa.predict import ask


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, synthetic_dir):
    return train_tiny_run(
        tmp_path_factory.mktemp("invariance") / "run", synthetic_dir, precision="bf16", eval_limit=12
    )


def test_ask_predict_and_the_run_agree_question_for_question(bf16_run, synthetic_dir, tmp_path):
    run = json.loads((bf16_run / "predictions.json").read_text())
    out = tmp_path / "answers.jsonl"
    dev = synthetic_dir / "dev-v1.1.json"
    assert main(["predict", str(bf16_run), "-i", str(dev), "-o", str(out), "--batch-size", "5"]) == 0
    predicted = {json.loads(x)["id"]: json.loads(x)["answer"] for x in out.read_text().splitlines()}
    assert {i: predicted[i] for i in run} == run
    answerer = load_answerer(str(bf16_run))
    assert answerer.model.dtype.is_floating_point and str(answerer.model.dtype) == "torch.bfloat16"
    examples, _ = load_squad(dev, split="dev")
    by_id = {ex.id: ex for ex in examples}
    alone = {i: ask(answerer, [by_id[i].question], by_id[i].context)[0] for i in run}
    assert alone == run


def test_the_same_question_in_any_company_gets_the_same_answer(bf16_run, synthetic_dir):
    """Questions answered in other groupings and orders: every answer as when asked alone."""
    from loraqa.answering import answer

    answerer = load_answerer(str(bf16_run))
    examples, _ = load_squad(synthetic_dir / "dev-v1.1.json", split="dev")
    examples = examples[:16]
    cfg = answerer.cfg.eval

    def answers(subset):
        max_length = answerer.cfg.prompt.max_length
        records, _ = answer(
            answerer.model, answerer.tokenizer, subset, cfg, max_length=max_length, progress=False
        )
        return {r["id"]: r["prediction"] for r in records}

    together = answers(examples)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    assert answers(shuffled) == together
    assert answers(shuffled[:5]) == {ex.id: together[ex.id] for ex in shuffled[:5]}
    assert {ex.id: answers([ex])[ex.id] for ex in examples[:6]} == {
        ex.id: together[ex.id] for ex in examples[:6]
    }


def test_an_interrupted_invariant_evaluation_resumes_with_the_same_answers(bf16_run, synthetic_dir, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    from loraqa.answering import answer
    from loraqa.journal import AnswerJournal

    answerer = load_answerer(str(bf16_run))
    examples, _ = load_squad(synthetic_dir / "dev-v1.1.json", split="dev")
    kwargs = dict(eval_cfg=answerer.cfg.eval, progress=False, max_length=answerer.cfg.prompt.max_length)
    whole, _ = answer(answerer.model, answerer.tokenizer, examples, **kwargs)

    class Stop(Exception):
        pass

    real, kept = AnswerJournal.record, []

    def record(self, idx, texts):
        real(self, idx, texts)
        kept.append(idx)
        if len(kept) == 2:
            raise Stop

    monkeypatch.setattr(AnswerJournal, "record", record)
    with pytest.raises(Stop):
        answer(answerer.model, answerer.tokenizer, examples, journal=tmp_path / ANSWER_JOURNAL_FILE, **kwargs)
    monkeypatch.setattr(AnswerJournal, "record", real)
    resumed, _ = answer(
        answerer.model, answerer.tokenizer, examples, journal=tmp_path / ANSWER_JOURNAL_FILE, **kwargs
    )
    assert [r["prediction"] for r in resumed] == [r["prediction"] for r in whole]

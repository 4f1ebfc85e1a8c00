"""Score generated answers: SQuAD v1.1 exact match and F1.

This is the official v1.1 evaluation script (``evaluate-v1.1.py``) rewritten as importable functions,
so the numbers are comparable with every published SQuAD v1.1 result: lowercase, drop punctuation,
drop the articles a/an/the, collapse whitespace; F1 over token multisets; the best score over the
gold answers; a question without a prediction scores 0; means are reported x 100.
(``evaluate`` on the hub has the same code, but loading it needs the network.)
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official v1.1 order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def best_over_answers(metric, prediction: str, answers: Iterable[str]) -> float:
    """The official ``metric_max_over_ground_truths``: a prediction is right if it matches any gold answer."""
    return max(metric(prediction, gold) for gold in answers)


def score_one(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact_match, f1) of one prediction, each in [0, 1]."""
    if not answers:
        raise ValueError("a question needs at least one gold answer to be scored")
    return best_over_answers(exact_match_score, prediction, answers), best_over_answers(
        f1_score, prediction, answers
    )


def squad_scores(predictions: Mapping[str, str], gold: Mapping[str, Sequence[str]]) -> dict[str, float | int]:
    """Corpus EM/F1 (x 100) over every question in ``gold``; a missing prediction scores 0."""
    em = f1 = 0.0
    for qid, answers in gold.items():
        if qid not in predictions:
            continue
        e, f = score_one(predictions[qid], answers)
        em += e
        f1 += f
    n = len(gold)
    return {
        "exact_match": 100.0 * em / n if n else 0.0,
        "f1": 100.0 * f1 / n if n else 0.0,
        "n_questions": n,
    }


def score_predictions(examples, predictions: Sequence[str]) -> tuple[list[dict], dict[str, float | int]]:
    """Per-question records (``id``, ``question``, ``prediction``, ``answers``, ``exact_match``, ``f1``; the
    last two in [0, 1]) and the corpus scores (x 100) for examples answered in order."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} questions but {len(predictions)} predictions")
    records = []
    for ex, pred in zip(examples, predictions, strict=True):
        em, f1 = score_one(pred, ex.answers)
        records.append(
            {"id": ex.id, "question": ex.question, "prediction": pred, "answers": list(ex.answers),
             "exact_match": em, "f1": f1}
        )  # fmt: skip
    summary = squad_scores(
        {r["id"]: r["prediction"] for r in records}, {ex.id: ex.answers for ex in examples}
    )
    return records, summary

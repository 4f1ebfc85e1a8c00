"""Score generated answers: SQuAD v1.1 exact match and F1, and the SQuAD 2.0 rules for unanswerable questions.

This is the official v1.1 evaluation script (``evaluate-v1.1.py``) rewritten as importable functions,
so the numbers are comparable with every published SQuAD v1.1 result: lowercase, drop punctuation,
drop the articles a/an/the, collapse whitespace; F1 over token multisets; the best score over the
gold answers; a question without a prediction scores 0; means are reported x 100.
(``evaluate`` on the hub has the same code, but loading it needs the network.)

SQuAD 2.0 (``evaluate-v2.0.py``): a question without an answer has the gold answer ``""`` and the no-answer
prediction is ``""``; a gold answer that normalizes to nothing is dropped; F1 is 1 or 0 when either side has
no tokens; EM and F1 are reported overall and for the answerable (``HasAns``) and unanswerable (``NoAns``)
questions. The model answers unanswerable questions with a fixed text (``data.unanswerable_answer``), which
`official_answer` turns into ``""``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

# The figures of a finished run (metrics.json) that a sweep's index (sweep.json) and its results.csv carry,
# in this order: one list for both
RUN_FIGURES = (
    "exact_match",
    "f1",
    "final_train_loss",
    "final_eval_loss",
    "trainable_params",
    "total_params",
    "train_seconds",
    "train_tokens_per_second",
    "train_questions_per_second",
    "peak_memory_mb",
    "eval_seconds",
    "train_steps",
    "train_examples",
    "n_questions",
    "device",
)

# SQuAD 2.0's parts, answerable and unanswerable questions, by the official script's names; each part's exact
# match, F1 and number of questions are reported under the keys v2_keys gives
V2_PARTS = ("HasAns", "NoAns")


def v2_keys(part: str) -> tuple[str, str, str]:
    """The (exact match, F1, questions) keys of a SQuAD 2.0 part: ``HasAns_exact``, ``HasAns_f1``,
    ``HasAns_total``."""
    return f"{part}_exact", f"{part}_f1", f"{part}_total"


V2_KEYS = tuple(key for part in V2_PARTS for key in v2_keys(part))

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


def score_predictions(
    examples, predictions: Sequence[str], unanswerable_answer: str | None = None
) -> tuple[list[dict], dict[str, float | int]]:
    """With ``unanswerable_answer`` (a SQuAD 2.0 task), `score_predictions_v2`. Otherwise per-question records (``id``, ``question``, ``prediction``, ``answers``, ``exact_match``, ``f1``; the
    last two in [0, 1]) and the corpus scores (x 100) for examples answered in order."""
    if unanswerable_answer is not None:
        return score_predictions_v2(examples, predictions, unanswerable_answer)
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} questions but {len(predictions)} predictions")
    records = []
    for ex, pred in zip(examples, predictions, strict=True):
        record = {"id": ex.id, "question": ex.question, "prediction": pred, "answers": list(ex.answers)}
        if ex.answers:  # a question without gold answers (prediction-only input) is answered, not scored
            em, f1 = score_one(pred, ex.answers)
            record.update(exact_match=em, f1=f1)
        records.append(record)
    summary = squad_scores(
        {r["id"]: r["prediction"] for r in records}, {ex.id: ex.answers for ex in examples if ex.answers}
    )
    return records, summary


# ---------------------------------------------------------------------------------------------- SQuAD 2.0


def official_answer(generated: str, unanswerable_answer: str) -> str:
    """The answer in the official v2.0 form: ``""`` when the model gave the no-answer text."""
    return "" if normalize_answer(generated) == normalize_answer(unanswerable_answer) else generated


def _v2_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # the official rule: a no-answer scores 1 only against a no-answer
        return float(pred_tokens == gold_tokens)
    return f1_score(prediction, gold)


def score_one_v2(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact_match, f1) of one prediction under the v2.0 rules; ``answers`` empty means unanswerable."""
    gold = [a for a in answers if normalize_answer(a)] or [""]
    return best_over_answers(exact_match_score, prediction, gold), best_over_answers(_v2_f1, prediction, gold)


def _means(rows: list[tuple[float, float]]) -> tuple[float, float]:
    n = len(rows)
    return 100.0 * sum(r[0] for r in rows) / n, 100.0 * sum(r[1] for r in rows) / n


def score_predictions_v2(examples, predictions: Sequence[str], unanswerable_answer: str):
    """`score_predictions` under the SQuAD 2.0 rules. Records carry ``prediction`` in the official form (``""``
    for no answer) and ``generated``, the model's text; the summary adds ``HasAns_*`` and ``NoAns_*`` (the
    official script's names). Examples with no gold answers that are not unanswerable are not scored."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} questions but {len(predictions)} predictions")
    records, has, no = [], [], []
    for ex, generated in zip(examples, predictions, strict=True):
        pred = official_answer(generated, unanswerable_answer)
        record = {
            "id": ex.id,
            "question": ex.question,
            "prediction": pred,
            "generated": generated,
            "answers": list(ex.answers),
            "is_impossible": ex.is_impossible,
        }
        if ex.answers or ex.is_impossible:
            em, f1 = score_one_v2(pred, ex.answers)
            record.update(exact_match=em, f1=f1)
            (no if ex.is_impossible else has).append((em, f1))
        records.append(record)
    scored = has + no
    summary: dict = {"exact_match": None, "f1": None, "n_questions": len(scored)}
    if scored:
        summary["exact_match"], summary["f1"] = _means(scored)
    for part, rows in zip(V2_PARTS, (has, no), strict=True):
        if rows:
            exact, f1, total = v2_keys(part)
            summary[exact], summary[f1] = _means(rows)
            summary[total] = len(rows)
    return records, summary


# ---------------------------------------------------------------------------------------------- in training
# Scores logged during training (loraqa.scoring) and what is decided from them, read from a log history alone
# (a checkpoint's trainer_state.json or a run's log_history.jsonl), so a resumed run, a search driver and a
# report reach the same decisions.

EM_KEY, F1_KEY = "eval_exact_match", "eval_f1"  # the logged names, as the Trainer logs its eval_loss
SCORE_SECONDS_KEY = "eval_score_seconds"
METRIC = F1_KEY  # what keep_best, early stopping and a search (by default) compare
PRUNED_KEY = "pruned_at"  # logged at the scoring where a search's pruner stopped the run
ZERO_SHOT = "zero-shot"  # metrics.json's method of a base model scored as it is (loraqa eval --model)
LOSS_KEY = "loss"  # the Trainer's logged training loss, which a search's trials report with their scores
# what a search may optimise, each with its direction: what a trial reports at every in-training scoring
SEARCH_METRICS = {F1_KEY: "maximize", EM_KEY: "maximize", LOSS_KEY: "minimize"}


def scorings(log_history: list[dict], metric: str = METRIC) -> list[tuple[int, float]]:
    """(step, value) of every in-training scoring, in order."""
    return [(h["step"], h[metric]) for h in log_history if metric in h and "step" in h]


def best_scoring(log_history: list[dict], metric: str = METRIC) -> tuple[int, float] | None:
    """The first scoring with the highest value (ties keep the earlier, smaller-step adapter)."""
    best = None
    for step, value in scorings(log_history, metric):
        if best is None or value > best[1]:
            best = (step, value)
    return best


def scorings_since_best(log_history: list[dict], metric: str = METRIC) -> int:
    seen = scorings(log_history, metric)
    best = best_scoring(log_history, metric)
    return 0 if best is None else sum(step > best[0] for step, _ in seen)


def patience_ran_out(log_history: list[dict], patience: int, metric: str = METRIC) -> bool:
    """Early stopping's rule (``train.early_stopping_patience``, 0: never): ``patience`` scorings since the best
    have not beaten it."""
    return bool(patience) and scorings_since_best(log_history, metric) >= patience


def pruned_at(log_history: list[dict]) -> int | None:
    """The step a search's pruner stopped the run at (logged as ``PRUNED_KEY``), None where it did not."""
    return next((h[PRUNED_KEY] for h in log_history if PRUNED_KEY in h), None)


def score_seconds(log_history: list[dict]) -> float:
    return round(sum(h.get(SCORE_SECONDS_KEY, 0.0) for h in log_history), 3)

"""SQuAD 2.0: the v2 file layout loads, and loraqa's v2 scores equal the official evaluate-v2.0.py's.

The expected numbers below are what the official script (``evaluate-v2.0.py`` from rajpurkar/SQuAD-explorer,
run outside this repository, unchanged, with no na-prob file) printed for `v2_dev()` and `PREDICTIONS`.
"""

from __future__ import annotations

import json

import pytest

from loraqa.data import DataError, load_file
from loraqa.metrics import score_predictions

NO_ANSWER = "unanswerable"
CTX1 = "The Normans were a people who in the 10th and 11th centuries gave their name to Normandy, a region in France."
CTX2 = "Rollo was the first ruler of Normandy. He agreed to defend the Seine from Viking raiders in 911."


def v2_dev() -> dict:
    """A small dev file shaped like the official dev-v2.0.json: version, is_impossible, empty answers for
    unanswerable questions, plausible_answers."""

    def ans(ctx, text, nth=0):
        start = -1
        for _ in range(nth + 1):
            start = ctx.index(text, start + 1)
        return {"text": text, "answer_start": start}

    def impossible(qid, question, ctx, plausible):
        return {"id": qid, "question": question, "answers": [], "is_impossible": True,
                "plausible_answers": [ans(ctx, plausible)]}  # fmt: skip

    return {
        "version": "v2.0",
        "data": [
            {"title": "Normans", "paragraphs": [
                {"context": CTX1, "qas": [
                    {"id": "q1", "question": "Where is Normandy?", "is_impossible": False,
                     "answers": [ans(CTX1, "France"), ans(CTX1, "a region in France"), ans(CTX1, "France")]},
                    {"id": "q2", "question": "When did the Normans name Normandy?", "is_impossible": False,
                     "answers": [ans(CTX1, "10th and 11th centuries"), ans(CTX1, "in the 10th and 11th centuries")]},
                    impossible("q3", "What did the Normans name France?", CTX1, "Normandy"),
                    impossible("q4", "Who gave France its name?", CTX1, "The Normans"),
                    {"id": "q5", "question": "Who were the Normans?", "is_impossible": False,
                     "answers": [ans(CTX1, "a people"), ans(CTX1, "a", 1)]},  # the 2nd normalizes to nothing
                ]},
                {"context": CTX2, "qas": [
                    {"id": "q6", "question": "Who was Normandy's first ruler?", "is_impossible": False,
                     "answers": [ans(CTX2, "Rollo")]},
                    {"id": "q7", "question": "In what year did Rollo defend the Seine?", "is_impossible": False,
                     "answers": [ans(CTX2, "911")]},
                    impossible("q8", "Who was Normandy's last ruler?", CTX2, "Rollo"),
                    impossible("q9", "What river did the Vikings defend?", CTX2, "the Seine"),
                ]},
            ]},
        ],
    }  # fmt: skip


# the official form: "" is the no-answer prediction
PREDICTIONS = {
    "q1": "France",  # exact
    "q2": "the 10th century",  # partial
    "q3": "",  # right: no answer
    "q4": "the Normans",  # wrong: answered an unanswerable question
    "q5": "people",  # exact after normalization
    "q6": "",  # wrong: no answer to an answerable question
    "q7": "in 911 AD",  # partial
    "q8": "",  # right
    "q9": "Seine",  # wrong
}

# printed by: python evaluate-v2.0.py dev-v2.json predictions.json
OFFICIAL = {
    "exact": 44.44444444444444, "f1": 53.7037037037037, "total": 9,
    "HasAns_exact": 40.0, "HasAns_f1": 56.666666666666664, "HasAns_total": 5,
    "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 4,
}  # fmt: skip


@pytest.fixture
def v2_file(tmp_path):
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(v2_dev()))
    return path


def test_v2_layout_loads_unanswerable_questions(v2_file):
    examples, report = load_file(v2_file, "squad_v2")
    assert [ex.id for ex in examples] == [f"q{i}" for i in range(1, 10)]
    by_id = {ex.id: ex for ex in examples}
    assert by_id["q3"].is_impossible and by_id["q3"].answers == ()
    assert not by_id["q1"].is_impossible and by_id["q1"].answers[0] == "France"
    # read as SQuAD v1.1, the unanswerable questions have no answers and are skipped, as in any v1.1 file
    v1, v1_report = load_file(v2_file, "squad")
    assert len(v1) == 5 and v1_report.skipped == {"no answers": 4}


def test_v2_scores_equal_the_official_script(v2_file):
    examples, _ = load_file(v2_file, "squad_v2")
    # the model says the no-answer text; loraqa turns it into the official "" before scoring
    generated = [PREDICTIONS[ex.id] or NO_ANSWER.capitalize() + "." for ex in examples]
    records, summary = score_predictions(examples, generated, unanswerable_answer=NO_ANSWER)
    assert {r["id"]: r["prediction"] for r in records} == PREDICTIONS
    assert summary["n_questions"] == OFFICIAL["total"]
    assert summary["exact_match"] == pytest.approx(OFFICIAL["exact"])
    assert summary["f1"] == pytest.approx(OFFICIAL["f1"])
    for part in ("HasAns", "NoAns"):
        for key in ("exact", "f1", "total"):
            assert summary[f"{part}_{key}"] == pytest.approx(OFFICIAL[f"{part}_{key}"]), f"{part}_{key}"


def test_a_bad_is_impossible_is_one_line(tmp_path):
    doc = v2_dev()
    doc["data"][0]["paragraphs"][0]["qas"][2]["is_impossible"] = "yes"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(
        DataError, match=r"bad.json: question 'q3': field 'is_impossible' should be true or false"
    ):
        load_file(path, "squad_v2")

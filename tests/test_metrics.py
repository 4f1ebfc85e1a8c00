"""EM/F1 exactly as the official SQuAD v1.1 evaluation script."""

import pytest

from loraqa.data import Example
from loraqa.metrics import exact_match_score, f1_score, normalize_answer, score_predictions, squad_scores


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Denver Broncos", "denver broncos"),
        ("  an   apple, a pear!  ", "apple pear"),
        ("Theory of the case.", "theory of case"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("Anne's 'best'", "annes best"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles():
    assert exact_match_score("the Denver Broncos!", "Denver Broncos") == 1.0
    assert exact_match_score("Denver", "Denver Broncos") == 0.0


def test_f1_known_values():
    # pred tokens {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # token multisets: common {x:1, y:1} -> P = R = 2/3
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1_score("nothing", "Denver") == 0.0
    assert f1_score("", "Denver") == 0.0


def test_best_over_gold_answers_and_missing_prediction_scores_zero():
    gold = {"q1": ["Denver Broncos", "Broncos"], "q2": ["Santa Clara"], "q3": ["1990"]}
    preds = {"q1": "Broncos", "q2": "Santa Clara, California"}  # q3 missing
    scores = squad_scores(preds, gold)
    # q1: EM 1, F1 1; q2: EM 0, F1 = 2*(2/3*1)/(2/3+1) = 0.8; q3: 0
    assert scores["n_questions"] == 3
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * 1.8 / 3)


def test_score_predictions_records():
    ex = [
        Example("a", "t", "ctx", "q?", ("Paris", "paris"), (0, 0)),
        Example("b", "t", "ctx", "q?", ("1", "one"), (0, 0)),
    ]
    records, summary = score_predictions(ex, ["Paris.", "two"])
    assert [r["exact_match"] for r in records] == [1.0, 0.0]
    assert records[0]["answers"] == ["Paris", "paris"]
    assert summary == {"exact_match": 50.0, "f1": 50.0, "n_questions": 2}
    with pytest.raises(ValueError):
        score_predictions(ex, ["only one"])


def test_f1_counts_repeated_tokens_as_a_multiset():
    """SQuAD's F1 intersects token multisets: a repeated token counts as often as it occurs in both. On token
    sets this case would score 1.0 (both sides are {cat, sat})."""
    assert f1_score("cat cat sat", "cat sat sat") == pytest.approx(2 / 3)
    assert f1_score("cat cat cat", "cat") == pytest.approx(0.5)  # precision 1/3, recall 1

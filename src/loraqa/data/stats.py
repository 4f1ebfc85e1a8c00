"""Corpus statistics (Table 1 of the reference study): `dataset_stats` and `format_stats_table`."""

from __future__ import annotations

import re
from collections import Counter

from .squad import QUESTION_TYPES, Example

_WORD = re.compile(r"[a-z]+")


def question_type(question: str) -> str:
    """The question's wh-word: who, what, when, where, why, how, which, or "other".

    Rule: lowercase the question, split it into runs of letters a-z, and return the *first word in the
    question* (reading left to right) that is one of the seven wh-words; "other" if none occurs. Only whole
    words count ("Howard" is not "how"; "What's" is "what"), so "In which year did ..." is "which" and
    "How many ..." is "how".
    """
    for word in _WORD.findall(question.lower()):
        if word in QUESTION_TYPES[:-1]:
            return word
    return "other"


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def dataset_stats(examples: list[Example]) -> dict:
    """Corpus statistics for one split.

    Returns a dict with ``questions``, ``articles`` (distinct titles), ``paragraphs`` (distinct
    (title, context) pairs), ``mean_question_words``, ``mean_answer_words`` (first gold answer),
    ``mean_context_words`` (averaged over questions, so long paragraphs with many questions weigh more),
    and ``question_types``: share (0..1) of each type in `QUESTION_TYPES`, in that order. Words are
    whitespace-separated tokens. An empty list gives zeros.
    """
    types = Counter(question_type(ex.question) for ex in examples)
    n = len(examples)
    return {
        "questions": n,
        "articles": len({ex.title for ex in examples}),
        "paragraphs": len({(ex.title, ex.context) for ex in examples}),
        "mean_question_words": _mean([len(ex.question.split()) for ex in examples]),
        "mean_answer_words": _mean([len(ex.answers[0].split()) for ex in examples if ex.answers]),
        "mean_context_words": _mean([len(ex.context.split()) for ex in examples]),
        "question_types": {t: (types[t] / n if n else 0.0) for t in QUESTION_TYPES},
    }


def format_stats_table(stats_by_split: dict[str, dict]) -> str:
    """A markdown table (aligned, so also readable as plain text) with one column per split.

    Rows: questions, articles, paragraphs, mean question/answer/context words (one decimal), then one
    row per question type as a percentage of the split's questions (one decimal).
    """
    rows: list[tuple[str, list[str]]] = []
    for key in ("questions", "articles", "paragraphs"):
        rows.append((key, [str(s[key]) for s in stats_by_split.values()]))
    for part in ("question", "answer", "context"):
        key = f"mean_{part}_words"
        rows.append((f"mean {part} words", [f"{s[key]:.1f}" for s in stats_by_split.values()]))
    for qtype in QUESTION_TYPES:
        cells = [f"{100 * s['question_types'].get(qtype, 0.0):.1f}" for s in stats_by_split.values()]
        rows.append((f"{qtype} (%)", cells))

    table = [["", *stats_by_split], *([label, *cells] for label, cells in rows)]
    widths = [max(len(row[col]) for row in table) for col in range(len(table[0]))]

    def render(row: list[str]) -> str:
        # first column (labels) left-aligned, numbers right-aligned
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "-" * (widths[0] + 2) + "".join(f"|{'-' * (w + 1)}:" for w in widths[1:]) + "|"
    return "\n".join([render(table[0]), rule, *(render(row) for row in table[1:])])

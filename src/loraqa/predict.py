"""``loraqa predict`` and ``loraqa ask``: the questions of a file, or questions typed in, answered by a trained
run (or a base model, zero-shot) and written out.

This module is the file side only: reading a question file in any data format and writing the answers as JSONL.
Loading and answering are :mod:`loraqa.answering`'s, the path evaluation takes too (the run's own prompt length
and generation settings, shared paragraphs run once, a KV cache), so a question gets the answer here that the
run's evaluation gave it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .answering import Answerer, asked, generated_text
from .data import detect_format, load_file
from .io import write_jsonl_atomic

log = logging.getLogger(__name__)


def predict_file(
    answerer: Answerer,
    source: str | Path,
    output: str | Path,
    *,
    fmt: str | None = None,
    progress: bool = True,
) -> dict:
    """Answer every question of ``source`` (any data format; detected from the name when ``fmt`` is None)
    and write ``output``: JSONL, one ``{"id", "answer"}`` a line, in input order (for a SQuAD 2.0 run the
    no-answer is ``""``, as in the official format). Returns the summary: EM/F1 over the questions with gold
    answers (``n_questions``; 0 when the input has none), ``n_answered``, and the load report's line."""
    fmt = fmt or detect_format(source)
    examples, report = load_file(source, fmt, split="dev")
    log.info(report.summary())
    records, summary = answerer.answer(examples, progress=progress)
    write_jsonl_atomic(output, [{"id": r["id"], "answer": r["prediction"]} for r in records])
    return {**summary, "n_answered": len(records), "format": fmt, "load_report": report.summary()}


def ask(answerer: Answerer, questions: list[str], context: str) -> list[str]:
    """The model's answers to ``questions`` about one ``context`` (the text it generated)."""
    records, _ = answerer.answer(asked(context, questions))
    return [generated_text(r) for r in records]

"""``loraqa predict`` and ``loraqa ask``: the questions of a file, or questions typed in, answered by a trained
run (or a base model, zero-shot) and written out.

This module is the file side only: reading a question file in any data format and writing the answers as JSONL.
Loading and answering are :mod:`loraqa.answering`'s, the path evaluation takes too (the run's own prompt length
and generation settings, shared paragraphs run once, a KV cache), so a question gets the answer here that the
run's evaluation gave it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import dist
from .answering import Answerer, asked, generated_text
from .config import ConfigError
from .data import DataError, Example, LoadReport, detect_format, load_file
from .io import write_jsonl_atomic
from .layout import prediction_journal, prediction_journals

log = logging.getLogger(__name__)


@dataclass
class Questions:
    """The questions of an input file, read before any model is loaded."""

    examples: list[Example]
    report: LoadReport
    format: str


def check_output(source: str | Path, output: str | Path, run_dir: str | Path | None = None) -> None:
    """Refuse an ``output`` that would overwrite something the user has: the ``source`` file itself (or a file
    inside a ``source`` folder), a file of the run folder ``run_dir``, or a folder. A ConfigError, raised
    before anything is loaded."""
    out = Path(output).expanduser()
    if out.is_dir():
        raise ConfigError(f"--output {output}: is a folder; give a file path")
    resolved = out.resolve()
    src = Path(source).expanduser()
    same = resolved == src.resolve()
    if not same and out.exists() and src.exists():
        with contextlib.suppress(OSError):
            same = os.path.samefile(out, src)  # a hard link to the input is the input too
    if same:
        raise ConfigError(f"--output {output} is the --input file; pick another path")
    if src.is_dir() and resolved.is_relative_to(src.resolve()):
        raise ConfigError(
            f"--output {output} lies inside the --input folder {source}; pick a path outside it"
        )
    if run_dir and resolved.is_relative_to(Path(run_dir).expanduser().resolve()):
        raise ConfigError(f"--output {output} lies inside the run folder {run_dir}; pick a path outside it")


def read_questions(source: str | Path, fmt: str | None = None) -> Questions:
    """The questions of ``source`` (any data format; detected from the name when ``fmt`` is None). A file
    without a question is a DataError, ``FILE: no questions``, whatever its format."""
    path = Path(source).expanduser()
    if (
        path.is_file()
        and path.stat().st_size < 1 << 16
        and not path.read_bytes().lstrip(b"\xef\xbb\xbf").strip()
    ):
        raise DataError(f"{source}: no questions")  # empty: before a format's own complaint about it
    fmt = fmt or detect_format(source)
    examples, report = load_file(source, fmt, split="dev", keep_unscored=True)  # one answer a question
    if not examples:
        raise DataError(f"{source}: no questions")
    log.info(report.summary())
    return Questions(examples, report, fmt)


def predict_file(
    answerer: Answerer,
    source: str | Path,
    output: str | Path,
    *,
    fmt: str | None = None,
    progress: bool = True,
    questions: Questions | None = None,
) -> dict:
    """Answer every question of ``source`` (any data format; detected from the name when ``fmt`` is None;
    ``questions``: already read by :func:`read_questions`) and write ``output``: JSONL, one ``{"id", "answer"}``
    a line, in input order (for a SQuAD 2.0 run the no-answer is ``""``, as in the official format). The answers
    are kept as they come in ``OUTPUT.partial.jsonl`` (:func:`~loraqa.layout.prediction_journal`): the same
    command, interrupted and run again, answers only the questions it had not answered. Under torchrun (the
    process group joined) each process answers its share and the main process writes. Returns the
    summary: EM/F1 over the questions with gold answers (``n_questions``; 0 when the input has none),
    ``n_answered``, and the load report's line."""
    if questions is None:
        check_output(source, output)
        questions = read_questions(source, fmt)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    records, summary = answerer.answer(
        questions.examples, progress=progress, journal=prediction_journal(output)
    )
    if dist.is_main_process():
        warn_cut(summary)
    dist.on_main(_write_answers, output, records)
    return {
        **summary,
        "n_answered": len(records),
        "format": questions.format,
        "load_report": questions.report.summary(),
    }


def _write_answers(output: Path, records: list[dict]) -> None:
    """``output`` from the main process, then every process's journal goes: its answers are in the output."""
    write_jsonl_atomic(output, [{"id": r["id"], "answer": r["prediction"]} for r in records])
    for journal in prediction_journals(output):
        journal.unlink(missing_ok=True)


def ask(answerer: Answerer, questions: list[str], context: str) -> list[str]:
    """The model's answers to ``questions`` about one ``context`` (the text it generated)."""
    records, summary = answerer.answer(asked(context, questions))
    warn_cut(summary)
    return [generated_text(r) for r in records]


def warn_cut(summary: dict) -> None:
    """A warning where contexts were longer than the model's prompt takes: each kept its beginning, and an
    answer can only come from that part (the answer is not known in advance, so no window is chosen)."""
    if cut := summary.get("eval_prompts_truncated"):
        log.warning(
            "%d question(s) had a context longer than the model's prompt takes (prompt.max_length, less room for "
            "the question and the answer): only its beginning was read",
            cut,
        )
    if cut := summary.get("eval_questions_cut"):
        log.warning(
            "%d question(s) were longer than the model's prompt takes on their own: each was answered from its "
            "last tokens, without the context",
            cut,
        )

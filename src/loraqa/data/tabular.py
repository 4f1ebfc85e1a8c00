"""Your own QA data: JSONL (one JSON object a line) and CSV (one row a question), and the records of a
Hugging Face ``datasets`` split, all with SQuAD's fields.

A record has ``id``, ``context``, ``question`` and, optionally (prediction-only input), ``answers``: a list of
answer texts, a list of ``{"text", "answer_start"}`` objects, or SQuAD's ``datasets`` column
``{"text": [...], "answer_start": [...]}``. In a CSV file the ``answers`` cell holds a JSON list (a cell that
is not a JSON list is one answer text; an empty cell means no answers given). ``title`` is optional.

Validation is `load_squad`'s: a malformed record is a `DataError` naming the file, the line (or row / id) and
the field; an answer that is empty or not in the context is dropped, and a question left with none is
skipped and counted in the `LoadReport`. A record without ``answers`` is kept with no gold answers: it can
be answered (``loraqa predict``), not trained on or scored.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .squad import DataError, Example, LoadReport, _type_name, keep_answers, read_data_file

FIELDS_HINT = "expected records with id, context, question and answers (a list; optional for prediction)"
HEADER_QUOTE = 80  # the most of a CSV header an error quotes (a JSON file read as CSV is all header)


def load_jsonl(
    source: str | os.PathLike, *, split: str = "dev", limit: int | None = None, keep_unscored: bool = False
) -> tuple[list[Example], LoadReport]:
    """Questions from a JSONL file, in file order (``limit``: the first N usable ones; ``split`` as in
    :func:`load_records`)."""
    path = Path(source).expanduser()
    records = []
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {number}: invalid JSON ({e.msg}, column {e.colno}); {FIELDS_HINT}"
            ) from None
        records.append((f"line {number}", record))
    return load_records(records, path, split=split, limit=limit, keep_unscored=keep_unscored)


def load_csv(
    source: str | os.PathLike, *, split: str = "dev", limit: int | None = None, keep_unscored: bool = False
) -> tuple[list[Example], LoadReport]:
    """Questions from a CSV file with a header row naming the columns (``limit``: the first N usable ones;
    ``split`` as in :func:`load_records`)."""
    path = Path(source).expanduser()
    lines = _read_lines(path)
    try:
        reader = csv.DictReader(lines)
        columns = reader.fieldnames or []
        missing = [c for c in ("id", "context", "question") if c not in columns]
        if missing:
            header = ", ".join(columns) or "none"
            header = header if len(header) <= HEADER_QUOTE else header[:HEADER_QUOTE].rstrip() + "..."
            raise DataError(
                f"{path}: no {', '.join(repr(c) for c in missing)} column (header: {header}); {FIELDS_HINT}"
            )
        records = []
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row:
                raise DataError(
                    f"{path}: {where}: more cells than header columns; quote cells holding commas"
                )
            record: dict[str, Any] = {k: v for k, v in row.items() if k != "answers"}
            cell = (row.get("answers") or "").strip()
            if "answers" in row and cell:
                record["answers"] = _answers_cell(
                    cell, row.get("context") or "", path, f"{where} (id {row.get('id')!r})"
                )
            records.append((where, record))
    except csv.Error as e:
        raise DataError(f"{path}: not valid CSV ({e}); {FIELDS_HINT}") from None
    return load_records(records, path, split=split, limit=limit, keep_unscored=keep_unscored)


def _answers_cell(cell: str, context: str, path: Path, where: str) -> list:
    """A CSV ``answers`` cell: a JSON list, or one answer text (one that merely begins with ``[``, such as
    ``[citation needed]``, when its context holds it as written)."""
    if not cell.startswith("["):
        return [cell]
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        if cell in context:
            return [cell]
        raise DataError(f"{path}: {where}: field 'answers' is not a valid JSON list: {cell[:60]!r}") from None
    return value


def _read_lines(path: Path) -> list[str]:
    """The file's lines, ends kept (a quoted CSV cell may span lines). Only \\n, \\r\\n and \\r end a line:
    ``str.splitlines`` would also split at U+2028 and other separators that JSON text may hold unescaped.
    A gzipped file (``.jsonl.gz``, or gzip's magic bytes) is read through gzip."""
    raw = read_data_file(path, FIELDS_HINT)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    return list(io.StringIO(text, newline=""))


def load_records(
    records: Iterable[tuple[str, Any]],
    path: Path,
    *,
    split: str = "dev",
    limit: int | None = None,
    keep_unscored: bool = False,
) -> tuple[list[Example], LoadReport]:
    """Examples from ``(where, record)`` pairs (``where`` names the line or row in errors). In the ``train``
    split an answer must occur in its context; elsewhere one that does not is kept for scoring. With
    ``keep_unscored`` a record left without an answer is kept, unscored (:func:`~.squad.keep_answers`)."""
    report = LoadReport(path=path)
    examples: list[Example] = []
    seen: set[str] = set()
    for where, record in records:
        example = _parse_record(record, path, where, report, seen, split == "train", keep_unscored)
        if example is not None:
            examples.append(example)
    if limit is not None:
        examples = examples[:limit]
    report.n_loaded = len(examples)
    return examples, report


def _field(record: dict, key: str, path: Path, where: str, *, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"{path}: {where}: missing field {key!r}; {FIELDS_HINT}")
        return None
    value = record[key]
    if key == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}: {where}: field {key!r} should be a string, got {_type_name(value)}")
    return value


def _parse_record(
    record: Any, path: Path, where: str, report: LoadReport, seen: set[str], need_spans: bool, keep_unscored: bool
) -> Example | None:
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where}: should be an object, got {_type_name(record)}; {FIELDS_HINT}")
    qid = _field(record, "id", path, where)
    if qid in seen:
        raise DataError(f"{path}: {where}: id {qid!r} appears more than once; ids must be unique")
    seen.add(qid)
    where = f"{where} (id {qid!r})"
    context = _field(record, "context", path, where)
    question = _field(record, "question", path, where)
    title = _field(record, "title", path, where, required=False) or ""
    report.n_questions_in_file += 1
    if record.get("answers") is None:  # prediction-only: no gold answers
        return Example(qid, title, context, question, (), ())
    texts, starts = keep_answers(
        context,
        list(zip(*_answers(record["answers"], path, where), strict=True)),
        qid,
        report,
        need_spans,
        keep_unscored,
    )
    return Example(qid, title, context, question, texts, starts) if texts or keep_unscored else None


def _answers(value: Any, path: Path, where: str) -> tuple[list[str], list[int | None]]:
    """(texts, starts) from any of the accepted shapes of ``answers``."""
    bad = f"{path}: {where}: field 'answers' should be a list of texts or of {{text, answer_start}} objects"
    if isinstance(value, dict):  # the datasets column: {"text": [...], "answer_start": [...]}
        texts, starts = value.get("text"), value.get("answer_start", [None] * len(value.get("text") or []))
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{bad}, or {{text: [...], answer_start: [...]}} of equal lengths")
        value = [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]
    if not isinstance(value, list):
        raise DataError(f"{bad}, got {_type_name(value)}")
    texts, starts = [], []
    for i, answer in enumerate(value):
        if isinstance(answer, str):
            texts.append(answer)
            starts.append(None)
            continue
        if not isinstance(answer, dict):
            raise DataError(f"{bad}; answer {i} is {_type_name(answer)}")
        if not isinstance(answer.get("text"), str):
            raise DataError(
                f"{path}: {where}: answer {i}: field 'text' should be a string, got {_type_name(answer.get('text'))}"
            )
        start = answer.get("answer_start")
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
            raise DataError(f"{path}: {where}: answer {i}: field 'answer_start' should be an integer")
        texts.append(answer["text"])
        starts.append(start)
    return texts, starts

"""SQuAD JSON: find, download, validate and load SQuAD v1.1 (and the v2.0 layout), and generate a small set.

Where the files come from (see `resolve_data_dir`):

1. an explicit folder (``--data-dir``), else
2. the folder in ``$LORAQA_DATA_DIR``, else
3. the cache folder (``$LORAQA_CACHE_DIR``, else `DEFAULT_CACHE_DIR`), where the official files are
   downloaded on first use and checked against their published sha256.

`load_squad` reads one file (``.json`` or ``.json.gz``) into a list of `Example`, one per question.
Malformed input raises `DataError` with a one-line message naming the file (and the question id or
field); questions that are well formed but unusable (no answers, answer text not in the context) are
skipped and counted in the returned `LoadReport` instead.

With ``unanswerable=True`` (the ``squad_v2`` format) a question marked ``is_impossible`` is kept, with no
answers and ``is_impossible`` set, instead of being skipped for having none.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..layout import (
    CACHE_SQUAD_DIR,
    CACHE_SYNTHETIC_DIR,
    DATA_DIR_ENV,
    SQUAD_DEV_FILE,
    SQUAD_TRAIN_FILE,
    cache_dir,
)

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = cache_dir() / CACHE_SQUAD_DIR

_OFFICIAL_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset"
# split -> (file name, official URL, sha256 of the official file)
SQUAD_FILES = {
    "train": (
        SQUAD_TRAIN_FILE,
        f"{_OFFICIAL_URL}/{SQUAD_TRAIN_FILE}",
        "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955",
    ),
    "dev": (
        SQUAD_DEV_FILE,
        f"{_OFFICIAL_URL}/{SQUAD_DEV_FILE}",
        "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9",
    ),
}

# Question types, in the order used by `dataset_stats` and the stats table.
QUESTION_TYPES = ("who", "what", "when", "where", "why", "how", "which", "other")

_WHERE_TO_GET = (
    f"pass --data-dir or set {DATA_DIR_ENV} to a folder holding {SQUAD_TRAIN_FILE} and {SQUAD_DEV_FILE}"
)
_FORMAT_HINT = "expected SQuAD v1.1 JSON; fix the file or re-download it"
_MAX_IDS_PER_REASON = 5


class DataError(Exception):
    """Bad input; str(e) is one clear line naming the file (and question id / field) and what to do."""


@dataclass(frozen=True)
class Example:
    """One SQuAD question with its paragraph and gold answers."""

    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]  # gold answer texts, in file order (duplicates kept, like the official file)
    answer_starts: tuple[int | None, ...]  # char offsets into `context` (None: not in it), as `answers`
    # SQuAD 2.0: the question has no answer in the context (`answers` is empty). An example that is neither
    # this nor has answers has no gold answer (prediction-only input): it is answered, not scored.
    is_impossible: bool = False


@dataclass
class LoadReport:
    """What `load_squad` read, kept and skipped.

    The counts describe the whole file; only `n_loaded` reflects a `limit`.
    `skipped` counts skipped *questions* by reason (so ``n_questions_in_file - sum(skipped.values())``
    questions were valid); `dropped_answers` counts unusable answers removed from questions that were
    kept because another answer was usable.
    """

    path: Path
    n_articles: int = 0
    n_paragraphs: int = 0
    n_questions_in_file: int = 0
    n_loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)
    fixed_offsets: int = 0
    dropped_answers: int = 0
    kept_unlocated: int = 0  # answers not found in their context, kept for scoring (dev, predict)

    def skip(self, reason: str, question_id: str) -> None:
        """Count one skipped question, remembering the first few ids per reason."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        ids = self.skipped_ids.setdefault(reason, [])
        if len(ids) < _MAX_IDS_PER_REASON:
            ids.append(question_id)

    def summary(self) -> str:
        """One line for humans, e.g. ``dev-v1.1.json: loaded 10570 of 10570 questions (...)``."""
        text = f"{self.path.name}: loaded {self.n_loaded} of {self.n_questions_in_file} questions"
        if self.n_articles or self.n_paragraphs:  # SQuAD JSON; a JSONL/CSV file has neither
            text += f" ({self.n_articles} articles, {self.n_paragraphs} paragraphs)"
        n_valid = self.n_questions_in_file - sum(self.skipped.values())
        if self.n_loaded < n_valid:
            text += f"; limited to the first {self.n_loaded} of {n_valid} valid"
        if self.skipped:
            parts = []
            for reason, count in self.skipped.items():
                ids = self.skipped_ids.get(reason, [])
                more = ", ..." if count > len(ids) else ""
                parts.append(f"{reason}: {count} [{', '.join(ids)}{more}]")
            text += f"; skipped {sum(self.skipped.values())} ({'; '.join(parts)})"
        else:
            text += "; skipped 0"
        text += f"; fixed {self.fixed_offsets} answer offsets"
        if self.dropped_answers:
            text += f"; dropped {self.dropped_answers} unusable answers"
        if self.kept_unlocated:
            text += f"; kept {self.kept_unlocated} answers not found in their context (scored as given)"
        return text


# --------------------------------------------------------------------------------------------------
# Finding and downloading the files
# --------------------------------------------------------------------------------------------------


def _split_file_name(split: str) -> str:
    """The official file name for `split`; DataError for an unknown split."""
    if split not in SQUAD_FILES:
        raise DataError(f"unknown split {split!r}; use one of: {', '.join(SQUAD_FILES)}")
    return SQUAD_FILES[split][0]


def _find_split_file(folder: Path, split: str) -> Path | None:
    """The file for `split` in `folder` (``name.json``, else ``name.json.gz``), or None."""
    name = _split_file_name(split)
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def resolve_data_dir(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    base_url: str | None = None,
    splits: Iterable[str] = tuple(SQUAD_FILES),
) -> Path:
    """The folder holding the SQuAD files for `splits` (default: train and dev).

    Order: the `data_dir` argument, else ``$LORAQA_DATA_DIR``, else the cache folder
    (``$LORAQA_CACHE_DIR`` if set, else `DEFAULT_CACHE_DIR`). An explicit folder is used as is: a
    missing folder or file is a `DataError`, nothing is downloaded. In the cache folder, missing official
    files are downloaded (`download_squad`, with `base_url`) unless ``download=False``.
    A file counts as present as ``name.json`` or ``name.json.gz``.
    """
    splits = tuple(splits)
    if str(data_dir) == SYNTHETIC:
        return synthetic_data_dir()
    env_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir is not None and str(data_dir) != "":
        folder, origin = Path(data_dir).expanduser(), "--data-dir"
    elif env_dir:
        folder, origin = Path(env_dir).expanduser(), DATA_DIR_ENV
    else:
        cache = Path(os.environ.get("LORAQA_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()
        for split in splits:
            if _find_split_file(cache, split) is not None:
                continue
            if not download:
                raise DataError(
                    f"{cache}: no {_split_file_name(split)} in the cache folder and downloading is off; "
                    f"{_WHERE_TO_GET}"
                )
            download_squad(split, cache, base_url=base_url)
        return cache

    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise DataError(f"{folder} (from {origin}): {what}; {_WHERE_TO_GET}")
    missing = [_split_file_name(s) for s in splits if _find_split_file(folder, s) is None]
    if missing:
        raise DataError(
            f"{folder} (from {origin}): missing {', '.join(missing)} (or .json.gz); {_WHERE_TO_GET}"
        )
    return folder


def squad_path(split: str, data_dir: str | os.PathLike | None = None, **kw: Any) -> Path:
    """The file for `split` ("train" or "dev") in the data folder that `resolve_data_dir` picks.

    `kw` goes to `resolve_data_dir` (``download``, ``base_url``); only this split's file is required
    (and, in the cache folder, downloaded).
    """
    folder = resolve_data_dir(data_dir, splits=(split,), **kw)
    path = _find_split_file(folder, split)
    assert path is not None  # resolve_data_dir checked it
    return path


def download_squad(split: str, dest_dir: Path, *, base_url: str | None = None, timeout: float = 60) -> Path:
    """Download the official file for `split` into `dest_dir` and return its path.

    The file is written to a temporary file in `dest_dir`, checked against the sha256 in `SQUAD_FILES`,
    then moved into place atomically, so a failed or interrupted download never leaves a partial file
    under the real name. `base_url` (else ``$LORAQA_SQUAD_URL``) replaces the directory part of the
    official URL, for mirrors and tests.
    """
    _split_file_name(split)  # DataError for an unknown split
    name, url, expected = SQUAD_FILES[split]
    base_url = base_url or os.environ.get("LORAQA_SQUAD_URL")
    if base_url:
        url = f"{base_url.rstrip('/')}/{name}"
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / name

    logger.info("downloading %s to %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise DataError(f"{dest}: download from {url} failed ({_describe(e)}); {_WHERE_TO_GET}") from e
        got = digest.hexdigest()
        if got != expected:
            raise DataError(
                f"{dest}: download from {url} has the wrong sha256 (expected {expected}, got {got}); "
                f"nothing was saved; try again or {_WHERE_TO_GET}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _describe(error: BaseException) -> str:
    """A short reason for a download error (HTTP status, socket error, ...)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


# --------------------------------------------------------------------------------------------------
# Loading and validating
# --------------------------------------------------------------------------------------------------


def load_squad(
    source: str | os.PathLike,
    *,
    split: str = "dev",
    limit: int | None = None,
    unanswerable: bool = False,
    keep_unscored: bool = False,
) -> tuple[list[Example], LoadReport]:
    """Load SQuAD v1.1 questions from `source`, in file order.

    `source` is a ``.json`` or ``.json.gz`` file (gzip is also recognised by its magic bytes), or a folder
    holding ``train-v1.1.json`` and ``dev-v1.1.json`` (or their ``.gz``), from which `split` picks the file.
    `limit` keeps the first `limit` valid questions; the report still describes the whole file.

    Malformed input (missing file, invalid or truncated JSON, corrupt gzip, missing fields, wrong types,
    duplicate question ids) raises `DataError`. Per question, answers with empty text ("empty answer")
    are dropped, and so, in the train split, are answers whose text is not in the context ("answer not in
    context"); elsewhere those are kept for scoring (:func:`keep_answers`). A question is skipped (counted
    in the report by reason, with its id) when its answers list is empty ("no answers") or no answer is
    left. An ``answer_start`` that does not point at its text, when the text does occur in the context, is
    moved to the nearest occurrence (counted in ``fixed_offsets``).
    With ``unanswerable`` (SQuAD 2.0), a question with ``"is_impossible": true`` is kept with no answers; with
    ``keep_unscored``, so is every question left without an answer (answered, not scored).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = _squad_file(Path(source).expanduser(), split)
    top = _read_json(path)
    if not isinstance(top, dict) or not isinstance(top.get("data"), list):
        raise DataError(f"{path}: top level must be an object with a 'data' list; {_FORMAT_HINT}")
    report = LoadReport(path=path)
    examples = _parse_articles(top["data"], path, report, unanswerable, split == "train", keep_unscored)
    if limit is not None:
        examples = examples[:limit]
    report.n_loaded = len(examples)
    return examples, report


def _squad_file(path: Path, split: str) -> Path:
    """``path`` itself, or the file of ``split`` in the folder ``path``."""
    if not path.is_dir():
        return path
    found = _find_split_file(path, split)
    if found is None:
        name = _split_file_name(split)
        raise DataError(f"{path}: no {name} (or {name}.gz) in this folder; {_WHERE_TO_GET}")
    return found


def _parse_articles(
    articles: list, path: Path, report: LoadReport, unanswerable: bool, need_spans: bool, keep_unscored: bool
) -> list[Example]:
    """The questions of SQuAD's ``data`` list, in file order; counted in ``report``."""
    examples: list[Example] = []
    seen_ids: set[str] = set()
    for a_index, article in enumerate(articles):
        _check_object(article, path, f"article {a_index}")
        title = _get(article, "title", str, path, f"article {a_index}") if "title" in article else ""
        where = f"article {a_index} ({title!r})"
        paragraphs = _get(article, "paragraphs", list, path, where)
        report.n_articles += 1
        for p_index, paragraph in enumerate(paragraphs):
            where = f"article {a_index} ({title!r}), paragraph {p_index}"
            _check_object(paragraph, path, where)
            context = _get(paragraph, "context", str, path, where)
            qas = _get(paragraph, "qas", list, path, where)
            report.n_paragraphs += 1
            for q_index, qa in enumerate(qas):
                qid = _question_id(qa, path, f"{where}, question {q_index}", seen_ids)
                report.n_questions_in_file += 1
                example = _parse_question(
                    qa, qid, title, context, path, report, unanswerable, need_spans, keep_unscored
                )
                if example is not None:
                    examples.append(example)
    return examples


def _question_id(qa: Any, path: Path, where: str, seen_ids: set[str]) -> str:
    """The question's id, checked to be a string not seen before in the file (``seen_ids``, which it joins)."""
    _check_object(qa, path, where)
    qid = _get(qa, "id", str, path, where)
    if qid in seen_ids:
        raise DataError(f"{path}: question {qid!r}: id appears more than once; ids must be unique")
    seen_ids.add(qid)
    return qid


def read_data_file(path: Path, hint: str) -> bytes:
    """The file's bytes, through gzip where it is gzipped (a ``.gz`` name or gzip's magic bytes); any problem
    is a one-line DataError (``hint``: what file was expected)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; {hint}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file; {hint}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b" or path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip file ({e}); re-download it") from None
    return raw


def _read_json(path: Path) -> Any:
    """Parse `path` as (optionally gzipped) JSON; any problem is a one-line DataError."""
    raw = read_data_file(path, "pass a SQuAD v1.1 .json/.json.gz file or a folder holding them")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); "
            "the file is truncated or corrupt, re-download it"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); {_FORMAT_HINT}") from None


def _check_object(value: Any, path: Path, where: str) -> None:
    """DataError unless `value` is a JSON object."""
    if not isinstance(value, dict):
        raise DataError(f"{path}: {where} should be an object, got {_type_name(value)}; {_FORMAT_HINT}")


def _get(obj: dict, key: str, kind: type, path: Path, where: str) -> Any:
    """``obj[key]``, checked to be present and of type `kind` (bool never counts as int)."""
    if key not in obj:
        raise DataError(f"{path}: {where}: missing field {key!r}; {_FORMAT_HINT}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(
            f"{path}: {where}: field {key!r} should be {_JSON_TYPES[kind]}, got {_type_name(value)}; "
            f"{_FORMAT_HINT}"
        )
    return value


_JSON_TYPES = {
    bool: "true or false",
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
}


def _type_name(value: Any) -> str:
    """The JSON name of a value's type ("a string", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _parse_question(
    qa: dict,
    qid: str,
    title: str,
    context: str,
    path: Path,
    report: LoadReport,
    unanswerable: bool = False,
    need_spans: bool = False,
    keep_unscored: bool = False,
) -> Example | None:
    """One question as an Example, or None (counted in `report`) when no usable answer is left (with
    ``keep_unscored``: an Example without answers)."""
    where = f"question {qid!r}"
    question = _get(qa, "question", str, path, where)
    if unanswerable and "is_impossible" in qa and _get(qa, "is_impossible", bool, path, where):
        return Example(qid, title, context, question, (), (), is_impossible=True)
    given = []  # keep_answers skips the question, as "no answers", when the list is empty
    for i, answer in enumerate(_get(qa, "answers", list, path, where)):
        answer_where = f"{where}, answer {i}"
        _check_object(answer, path, answer_where)
        text = _get(answer, "text", str, path, answer_where)
        given.append((text, _get(answer, "answer_start", int, path, answer_where)))
    texts, starts = keep_answers(context, given, qid, report, need_spans, keep_unscored)
    return Example(qid, title, context, question, texts, starts) if texts or keep_unscored else None


def keep_answers(
    context: str,
    given: list[tuple[str, int | None]],
    qid: str,
    report: LoadReport,
    need_spans: bool,
    keep_unscored: bool = False,
) -> tuple[tuple[str, ...], tuple[int | None, ...]]:
    """The usable answers among ``given`` (text, answer_start or None) and their starts, for both readers.
    Empty answers are dropped. A start that misses its text moves to the text's nearest occurrence
    (``fixed_offsets``). A text that does not occur in the context is dropped where training needs spans
    (``need_spans``), else kept with start None (``kept_unlocated``): the official script scores a prediction
    against every gold answer as given. No answer left: the question is skipped and counted, by reason
    (``keep_unscored``: kept, unscored, and not counted)."""
    texts, starts, problems = [], [], []
    for text, start in given:
        if not text.strip():
            problems.append("empty answer")
            continue
        # a negative start would slice from the context's end (and could even match there): never a position
        if start is None or start < 0 or context[start : start + len(text)] != text:
            nearest = _nearest_occurrence(context, text, max(start or 0, 0))
            if nearest is None and need_spans:
                problems.append("answer not in context")
                continue
            report.fixed_offsets += start is not None and nearest is not None
            report.kept_unlocated += nearest is None
            start = nearest
        texts.append(text)
        starts.append(start)
    if not texts and not keep_unscored:
        if not given:
            reason = "no answers"
        elif "answer not in context" in problems:
            reason = "answer not in context"
        else:
            reason = "empty answer"
        report.skip(reason, qid)
    else:
        report.dropped_answers += len(problems)
    return tuple(texts), tuple(starts)


def _nearest_occurrence(context: str, text: str, start: int) -> int | None:
    """The offset of the occurrence of `text` in `context` closest to `start`, or None if absent."""
    best = None
    found = context.find(text)
    while found != -1:
        if best is None or abs(found - start) < abs(best - start):
            best = found
        found = context.find(text, found + 1)
    return best


# ---------------------------------------------------------------------------------------------- synthetic data

SYNTHETIC = "synthetic"  # a data_dir value: generated SQuAD-format files (tests, tiny sweeps), no download
_OBJECTS = ("box", "car", "door", "lamp", "chair", "kite", "boat", "bell", "cup", "hat", "coat", "flag")
_PLACES = (
    "garden",
    "kitchen",
    "harbor",
    "school",
    "market",
    "tower",
    "station",
    "library",
    "forest",
    "museum",
)
_COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")


def make_synthetic_squad(
    folder: str | os.PathLike, n_train: int = 256, n_dev: int = 64, seed: int = 0
) -> Path:
    """Write ``train-v1.1.json`` and ``dev-v1.1.json`` of short generated paragraphs in the official format:
    "The box in the garden is red. ..." / "What color is the box in the garden?" / "red". Deterministic."""
    import random

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        paragraphs = []
        for i in range(n):
            pairs = rng.sample([(o, p) for o in _OBJECTS for p in _PLACES], 3)  # distinct: one answer each
            facts = [(o, p, rng.choice(_COLORS)) for o, p in pairs]
            sentences = [f"The {o} in the {p} is {c}." for o, p, c in facts]
            context = " ".join(sentences)
            k = rng.randrange(3)
            obj, place, color = facts[k]
            start = len(" ".join(sentences[:k])) + (1 if k else 0) + len(sentences[k]) - len(color) - 1
            qa = {
                "id": f"{split}-{i:05d}",
                "question": f"What color is the {obj} in the {place}?",
                "answers": [{"text": color, "answer_start": start}],
            }
            paragraphs.append({"context": context, "qas": [qa]})
        doc = {"version": "1.1", "data": [{"title": f"Synthetic_{split}", "paragraphs": paragraphs}]}
        tmp = folder / f".{split}.{os.getpid()}.tmp"  # unique: two processes may build it at once
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, folder / _split_file_name(split))
    return folder


def synthetic_data_dir() -> Path:
    """The generated data set, made once in the cache folder."""
    folder = cache_dir() / CACHE_SYNTHETIC_DIR
    if not all((folder / _split_file_name(s)).is_file() for s in SQUAD_FILES):
        make_synthetic_squad(folder)
    return folder

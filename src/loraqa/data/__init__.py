"""Data stage: read extractive-QA questions in any of the supported formats into `Example`s.

``data.format`` picks the reader (`FORMATS`):

* ``squad``: SQuAD v1.1 JSON (:mod:`.squad`; found in a folder, or downloaded and checked against its published
  sha256), the default;
* ``squad_v2``: SQuAD 2.0 JSON; unanswerable questions are kept (``is_impossible``) and the model is taught
  to answer ``data.unanswerable_answer`` for them; scored by the official v2.0 rules (:mod:`loraqa.metrics`);
* ``jsonl`` / ``csv``: one record a line or row (:mod:`.tabular`);
* ``hf``: a Hugging Face ``datasets`` folder (``save_to_disk``) or hub id with SQuAD's columns (:mod:`.hf`).

`split_source` says where a split is read from (``data.train_file`` / ``data.dev_file`` if set, else the
format's file in ``data.data_dir``), `load_split` reads it. Bad input is a one-line `DataError` naming the
file, the line or question id, and the field.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import DATA_FORMATS
from ..layout import DATA_DIR_ENV
from .squad import (
    DEFAULT_CACHE_DIR,
    QUESTION_TYPES,
    SQUAD_FILES,
    SYNTHETIC,
    DataError,
    Example,
    LoadReport,
    download_squad,
    load_squad,
    make_synthetic_squad,
    resolve_data_dir,
    squad_path,
    synthetic_data_dir,
)
from .stats import dataset_stats, format_stats_table, question_type

__all__ = [
    "DEFAULT_CACHE_DIR",
    "FORMATS",
    "QUESTION_TYPES",
    "SQUAD_FILES",
    "SYNTHETIC",
    "DataError",
    "Example",
    "LoadReport",
    "dataset_stats",
    "detect_format",
    "download_squad",
    "evaluated",
    "evaluated_read_limit",
    "format_stats_table",
    "load_file",
    "load_split",
    "load_squad",
    "make_synthetic_squad",
    "question_type",
    "resolve_data_dir",
    "split_source",
    "squad_path",
    "synthetic_data_dir",
]

FORMATS = DATA_FORMATS  # data.format's choices, defined with the field
# the file a format reads from a data folder, per split
_FILE_NAMES = {
    "squad_v2": {"train": "train-v2.0.json", "dev": "dev-v2.0.json"},
    "jsonl": {"train": "train.jsonl", "dev": "dev.jsonl"},
    "csv": {"train": "train.csv", "dev": "dev.csv"},
}


def split_source(data_cfg, split: str) -> str:
    """Where ``split`` ("train" or "dev") is read from, for a `DataConfig`."""
    explicit = data_cfg.train_file if split == "train" else data_cfg.dev_file
    if explicit:
        return str(explicit)
    fmt = data_cfg.format
    if fmt == "squad":
        return str(squad_path(split, data_cfg.data_dir))
    folder = data_cfg.data_dir or os.environ.get(DATA_DIR_ENV)
    if not folder:
        key = "train_file" if split == "train" else "dev_file"
        raise DataError(f"data.format={fmt}: give data.{key} (or --data-dir, a folder holding the data)")
    if fmt == "hf":
        return str(folder)  # the DatasetDict folder (or hub id); the split is picked inside it
    name = _FILE_NAMES[fmt][split]
    path = Path(folder).expanduser() / name
    if fmt == "squad_v2" and not path.is_file() and Path(f"{path}.gz").is_file():
        path = Path(f"{path}.gz")
    if not path.is_file():
        raise DataError(
            f"{folder}: no {name} for data.format={fmt}; add it, or name the file with data.{split}_file"
        )
    return str(path)


def detect_format(source: str | os.PathLike) -> str:
    """A file's format from its name and content: ``.jsonl``, ``.csv``, a folder (``datasets``), or SQuAD
    JSON (v2 when its version says so or a question has ``is_impossible``)."""
    path = Path(source).expanduser()
    name = path.name.lower()
    if path.is_dir():
        return "hf"
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".json", ".json.gz")):
        from .squad import _read_json

        top = _read_json(path)
        version = str(top.get("version", "")) if isinstance(top, dict) else ""
        return "squad_v2" if version.startswith(("v2", "2")) or _has_impossible(top) else "squad"
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    raise DataError(f"{path}: unknown format; name it .json (SQuAD), .jsonl or .csv, or pass --format")


def _has_impossible(top) -> bool:
    """Whether a SQuAD-shaped JSON document has a question with ``is_impossible`` (SQuAD 2.0's field; a
    malformed document is left to the reader, which names what is wrong)."""

    def items(node, key: str) -> list:
        value = node.get(key) if isinstance(node, dict) else None
        return value if isinstance(value, list) else []

    return any(
        isinstance(qa, dict) and "is_impossible" in qa
        for article in items(top, "data")
        for para in items(article, "paragraphs")
        for qa in items(para, "qas")
    )


def load_file(
    source: str | os.PathLike,
    fmt: str,
    *,
    split: str = "dev",
    limit: int | None = None,
    need_splits: bool = False,
    keep_unscored: bool = False,
):
    """(examples, LoadReport) from one file (or ``datasets`` folder) in format ``fmt``; ``need_splits``: a
    ``datasets`` folder must hold its splits (it is the data folder both splits are read from);
    ``keep_unscored``: a question without a usable gold answer is kept, to be answered and not scored
    (``loraqa predict``), not skipped."""
    kept = {"split": split, "limit": limit, "keep_unscored": keep_unscored}
    if fmt == "squad":
        return load_squad(source, **kept)
    if fmt == "squad_v2":
        return load_squad(source, **kept, unanswerable=True)
    if fmt == "jsonl":
        from .tabular import load_jsonl

        return load_jsonl(source, **kept)
    if fmt == "csv":
        from .tabular import load_csv

        return load_csv(source, **kept)
    if fmt == "hf":
        from .hf import load_hf

        return load_hf(source, **kept, need_splits=need_splits)
    raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")


def load_split(data_cfg, split: str, limit: int | None = None):
    """(examples, LoadReport, source) of ``split`` ("train" or "dev") as a `DataConfig` asks."""
    source = split_source(data_cfg, split)
    from_folder = not (data_cfg.train_file if split == "train" else data_cfg.dev_file)
    examples, report = load_file(source, data_cfg.format, split=split, limit=limit, need_splits=from_folder)
    return examples, report, source


def evaluated(data_cfg, dev: list) -> list:
    """The dev questions a final evaluation scores, from the first ones read: ``data.eval_limit`` of them after
    the first ``data.eval_skip``."""
    end = None if data_cfg.eval_limit is None else data_cfg.eval_skip + data_cfg.eval_limit
    if dev and data_cfg.eval_skip >= len(dev):  # a score of no questions would read as EM 0 / F1 0
        raise DataError(
            f"data.eval_skip {data_cfg.eval_skip} leaves no dev question to evaluate (the dev split has "
            f"{len(dev)} usable); lower data.eval_skip"
        )
    return dev[data_cfg.eval_skip : end]


def evaluated_read_limit(data_cfg) -> int | None:
    """How many dev questions to read for :func:`evaluated`."""
    return None if data_cfg.eval_limit is None else data_cfg.eval_skip + data_cfg.eval_limit

"""A Hugging Face ``datasets`` data set with SQuAD's columns (id, title, context, question, answers): a folder
written by ``save_to_disk`` (a ``DatasetDict`` with train/validation splits, or one ``Dataset``), or a hub id
when the hub can be reached.

``datasets`` (with pyarrow and pandas, ~150 MB) is an optional extra, ``pip install 'loraqa[hf]'``: only this
format needs it, and SQuAD JSON, JSONL and CSV read without it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .squad import DataError, Example, LoadReport
from .tabular import load_records

# loraqa's split name -> the names a data set may use for it, in order of preference
SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev", "test")}
_INSTALL = "the hf data format needs the datasets package: pip install 'loraqa[hf]' (or pip install datasets)"


def load_hf(
    source: str | os.PathLike,
    *,
    split: str = "dev",
    limit: int | None = None,
    need_splits: bool = False,
    keep_unscored: bool = False,
) -> tuple[list[Example], LoadReport]:
    """Questions of one split (``train``, or ``dev``: the data set's ``validation``/``dev``/``test`` split).
    One ``Dataset`` is read whole, unless ``need_splits`` (the run's data folder, read for both splits: its one
    table would be the training and the dev set alike)."""
    try:
        import datasets
    except ImportError:
        raise DataError(_INSTALL) from None
    path = Path(source).expanduser()
    try:
        if path.exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            from ..model import hub_reachable

            if not hub_reachable():
                raise DataError(
                    f"{source}: no such folder, and the Hugging Face hub cannot be reached to "
                    "download it; pass a folder written by Dataset.save_to_disk"
                )
            loaded = datasets.load_dataset(str(source))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(
            f"{source}: not a datasets folder or hub data set ({str(e).splitlines()[0][:160]})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        names = [n for n in SPLIT_NAMES.get(split, (split,)) if n in loaded]
        if not names:
            raise DataError(
                f"{source}: no {' or '.join(SPLIT_NAMES.get(split, (split,)))} split "
                f"(splits: {', '.join(loaded)})"
            )
        table = loaded[names[0]]
        where_split = f"split {names[0]!r}"
    elif need_splits:
        raise DataError(
            f"{source}: one data set, not train and validation splits: as the data folder it would be both the "
            "training and the dev questions; save a DatasetDict, or name each split's folder with "
            "data.train_file and data.dev_file"
        )
    else:
        table = loaded
        where_split = "data set"
    missing = [c for c in ("id", "context", "question") if c not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: {where_split} has no {', '.join(map(repr, missing))} column "
            f"(columns: {', '.join(table.column_names)}); expected SQuAD's columns"
        )
    records = ((f"{where_split}, row {i}", row) for i, row in enumerate(table))
    return load_records(records, Path(str(source)), split=split, limit=limit, keep_unscored=keep_unscored)

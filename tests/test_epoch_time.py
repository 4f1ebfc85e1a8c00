"""benchmarks/epoch_time.py: the pieces cut the epoch exactly, and a rerun goes on where the record stops."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import epoch_time  # noqa: E402


def _questions(data_dir: Path) -> list[str]:
    squad = json.loads((data_dir / "train-v1.1.json").read_text())
    return [q["question"] for a in squad["data"] for p in a["paragraphs"] for q in p["qas"]]


@pytest.mark.slow
def test_pieces_cover_the_epoch_once_and_a_rerun_goes_on(synthetic_dir, tmp_path, capsys):
    record = tmp_path / "pieces.jsonl"
    common = ["--model", "tiny-random-gpt2", "--data-dir", str(synthetic_dir), "--pieces", "3",
              "--record", str(record), "--work", str(tmp_path / "work"), "--device", "cpu",
              "model.precision=fp32", "train.save_steps=0"]  # fmt: skip
    assert epoch_time.main([*common, "--max-pieces", "2"]) == 0
    first = epoch_time.read_records(record)
    assert [r["piece"] for r in first] == [0, 1]
    assert "Not yet the whole epoch" in capsys.readouterr().out

    assert epoch_time.main(common) == 0  # only the piece left runs
    records = epoch_time.read_records(record)
    assert [r["piece"] for r in records] == [0, 1, 2]
    total = len(_questions(synthetic_dir))
    assert sum(r["questions"] for r in records) == total
    assert sum(r["train_questions"] for r in records) == total  # every question trained once
    assert all(r["train_steps"] > 0 and r["train_seconds"] > 0 for r in records)
    assert all(r["machine"] == epoch_time.machine() and r["overrides"] == common[-2:] for r in records)
    out = capsys.readouterr().out
    assert "3 of 3 pieces" in out and "The whole epoch, measured" in out
    assert not (tmp_path / "work" / "piece-2").exists()  # nothing of a finished piece is kept


def test_other_settings_or_machines_are_other_epochs(tmp_path):
    base = {"piece": 0, "pieces": 2, "model": "m", "overrides": [], "machine": "A", "commit": "c",
            "start_utc": "2026-12-06 13:00:00", "questions": 10, "train_steps": 2, "train_seconds": 4.0,
            "compile_seconds": 1.0}  # fmt: skip
    records = [
        base,
        {**base, "piece": 1, "compile_seconds": 0.5},
        {**base, "machine": "B", "train_seconds": 8.0},
    ]
    table = epoch_time.epoch_table(records, file_questions=20)
    assert table.count("pieces\n") == 2  # one table a machine
    assert "2 of 2 pieces: 20 questions, 4 steps" in table and "1 of 2 pieces: 10 questions" in table
    assert epoch_time.totals(records[:2]) == {
        "questions": 20,
        "steps": 4,
        "seconds": 8.0,
        "compiling_once": 7.5,
    }
    assert "20 questions would take 0.00 h (a projection)" in table  # B: half measured


def test_the_pieces_partition_the_train_file(synthetic_dir, tmp_path):
    version, paragraphs = epoch_time.train_paragraphs(synthetic_dir)
    pieces = [paragraphs[i::3] for i in range(3)]
    counts = [
        epoch_time.write_train_slice(synthetic_dir, tmp_path / str(i), version, p)
        for i, p in enumerate(pieces)
    ]
    asked = [q for i in range(3) for q in _questions(tmp_path / str(i))]
    assert sorted(asked) == sorted(_questions(synthetic_dir)) and sum(counts) == len(asked)

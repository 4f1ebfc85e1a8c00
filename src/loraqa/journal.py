"""Answers kept as they are generated, so that an interrupted evaluation resumes where it stopped.

Answering the full SQuAD dev set takes a quarter of an hour on a CPU, longer for a larger model; a stop signal,
a kill or the end of a sitting during it must not throw all of it away. :class:`AnswerJournal` appends each
batch's answers to a JSON-lines file in the run folder as the batch ends. A rerun that answers the same prompts
with the same model (its every weight) and settings reads them back and generates only the rest, in the very
batches an uninterrupted run forms (``generate.plan_batches`` plans all prompts first), so its answers are the
same. Anything else found there (another model's answers, a line cut short by a kill) is not trusted: what
follows the last whole line is dropped, and a journal with another key starts over. The file stays until the
results it feeds are written (a run's ``metrics.json``, a ``predict`` output): a kill in between loses none of
the answers.

Written by hand: an append-only log under a key is all it takes, and no library keeps generation state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)
FORMAT = 1  # the header's "journal" field: a journal of another format is started over, never misread


def fingerprint(model: torch.nn.Module, prompts: Sequence[Sequence[int]], settings: dict) -> str:
    """A key for "these answers": every tensor of ``model`` (bytes, dtype and shape), the token-id prompts and
    the generation ``settings``. About a second per 100M parameters, once an evaluation."""
    h = hashlib.sha256(json.dumps({"prompts": prompts, "settings": settings}, sort_keys=True).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return h.hexdigest()


class AnswerJournal:
    """The answers of one evaluation (one process's share) kept in ``path`` under ``key``.

    ``done`` holds the answers read back (prompt index -> answer), ``seconds_before`` the generation time they
    took; :meth:`record` appends a batch, :meth:`close` closes the file, which the writer of the results
    removes once they are written."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key
        self.done: dict[int, str] = {}
        self.seconds_before = 0.0
        kept = self._read()
        if self.done:
            log.info(
                "%s: %d answers kept from an interrupted run; answering the rest", self.path, len(self.done)
            )
        self._file = open(self.path, "r+" if kept else "w", encoding="utf-8")  # noqa: SIM115 (closed by close)
        if kept:
            self._file.seek(kept)
            self._file.truncate()  # a line cut short by a kill
        else:
            self._write({"journal": FORMAT, "key": key})
        self._last = time.perf_counter()

    def _read(self) -> int:
        """Read ``done`` back; the offset after the last whole line to keep (0: start over)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        kept = 0
        for line in data.splitlines(keepends=True):
            try:
                rec = json.loads(line) if line.endswith(b"\n") else None
                if kept == 0:
                    if rec != {"journal": FORMAT, "key": self.key}:
                        log.info(
                            "%s: not this evaluation's answers (another model, prompts or settings); "
                            "answering all again",
                            self.path,
                        )
                        return 0
                else:
                    batch = dict(zip(rec["i"], rec["a"], strict=True))
                    self.seconds_before += float(rec["s"])
                    self.done.update(batch)
            except (ValueError, TypeError, KeyError):  # a line cut short, or not one this class wrote
                break
            kept += len(line)
        return kept

    def _write(self, rec: dict) -> None:
        # flushed, not fsync-ed: a killed process's writes survive in the page cache, and a crash of the
        # machine leaves at worst a cut line, which the reader drops
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def record(self, idx: list[int], answers: list[str]) -> None:
        now = time.perf_counter()
        self._write({"i": idx, "a": answers, "s": round(now - self._last, 4)})
        self._last = now

    def close(self) -> None:
        self._file.close()

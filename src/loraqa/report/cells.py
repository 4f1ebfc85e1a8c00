"""The report's numbers: the paired difference that decides whether two trials differ beyond noise, and each
value as a table cell prints it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..sweep.trials import format_value
from .load import TrialResult

SE_MULTIPLIER = 2.0  # an EM/F1 difference counts when |mean paired difference| > 2 standard errors (~95%)


@dataclass
class Diff:
    """Paired difference a - b of a per-question score, in points (x 100)."""

    mean: float
    se: float
    n: int

    @property
    def significant(self) -> bool:
        return self.mean != 0 and abs(self.mean) > SE_MULTIPLIER * self.se

    def text(self) -> str:
        verdict = "beyond noise" if self.significant else "within noise"
        return f"{self.mean:+.2f} ± {SE_MULTIPLIER * self.se:.2f} ({verdict}, n={self.n})"


def paired_diff(a: TrialResult, b: TrialResult, metric: str = "f1") -> Diff | None:
    """a - b over the questions both trials scored (a question without gold answers has no score)."""
    qa, qb = a.per_question, b.per_question
    ids = sorted(i for i in qa.keys() & qb.keys() if qa[i].get(metric) is not None and qb[i].get(metric) is not None)
    if len(ids) < 2:
        return None
    d = [100.0 * (float(qa[i][metric]) - float(qb[i][metric])) for i in ids]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return Diff(mean, math.sqrt(var / len(d)), len(d))


def num(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def secs(v) -> str:
    if v is None:
        return "—"
    v = float(v)
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.2f} h"


def mb(v) -> str:
    return "—" if v is None else f"{float(v):,.0f} MB"


def percent(a, b) -> str:
    return "—" if not a or not b else f"{100.0 * a / b:.3f}%"


def settings_text(t: TrialResult, reference: dict) -> str:
    diff = {k: v for k, v in t.trial.values.items() if v != reference.get(k)}
    return ", ".join(f"{k}={format_value(v)}" for k, v in diff.items()) or "reference"


def md_table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(header)))
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def status_cell(t: TrialResult) -> str:
    """The trial's status; for one not finished, how far its training got (a trial that stopped resumes from its
    last checkpoint, at or before that step)."""
    progress = t.progress if t.status in ("running", "unfinished") else None
    if not progress:
        return t.status if t.status != "running" else "running (unfinished)"
    step, total = progress
    if step >= total:
        return f"{t.status}, training done, not scored yet"
    pace = t.seconds_per_step
    left = f"; ~{secs((total - step) * pace)} of training left at {pace:.1f} s a step so far" if pace else ""
    return f"{t.status}, step {step:,} of {total:,} logged{left}"

"""A sweep's report, regenerated from its folder's files: ``report.md``, ``results.csv`` and figures.

The report has the reference study's tables (one per swept axis; the best configurations by F1, Table 6; the
trainable parameters, Table 7), its loss figures (eval loss per rank, Figure 3; train and eval loss per target
preset, Figure 4, and per learning rate, Figure 5) and, beside each of the study's claims, the verdict the
sweep's numbers give: "holds", "does not hold" or "not measurable here".

Verdicts are mechanical (the rule is written into the report): an EM/F1 difference counts only where it is
more than twice its standard error, paired over the same dev questions (from ``predictions.jsonl``); a loss
difference only where it is more than 1% and a memory difference only where it is more than 2%. A difference
within that noise is never called "holds". Only finished trials are compared; missing, failed and unfinished
trials are listed as such.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import tempfile
import textwrap
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from .card import portable_command, portable_path
from .config import ConfigError, from_dict
from .io import read_json, read_jsonl, write_text_atomic
from .layout import (
    CHECKPOINTS_DIR,
    CLOCK_FILE,
    ERROR_FILE,
    LOG_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    SWEEP_CONFIG_FILE,
    SWEEP_INDEX_FILE,
    TRIAL_CONFIG_FILE,
    TRIAL_RUN_FILE,
    sweep_command,
)
from .sweep import (
    Trial,
    axis_values,
    describe_machine,
    expand_trials,
    format_value,
    machine_info,
    reference_values,
    trial_status,
)

SE_MULTIPLIER = 2.0  # an EM/F1 difference counts when |mean paired difference| > 2 standard errors (~95%)
LOSS_TOLERANCE = 0.01  # a loss difference counts when it is more than 1% (relative)
MEMORY_TOLERANCE = 0.02  # a memory difference counts when it is more than 2% (relative)

HOLDS, FAILS, NA = "holds", "does not hold", "not measurable here"

AXIS_TITLES = {
    "lora.r": "LoRA rank",
    "lora.targets": "target modules",
    "lora.alpha": "LoRA alpha",
    "lora.dropout": "LoRA dropout",
    "train.lr": "learning rate",
    "prompt.loss_on": "loss masking",
    "train.method": "fine-tuning method",
}


# ---------------------------------------------------------------------------------------------- loading


@dataclass(eq=False)
class TrialResult:
    trial: Trial
    dir: Path
    status: str
    metrics: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    error: dict = field(default_factory=dict)
    unreadable: list = field(default_factory=list)  # shared with SweepData: damaged files left out

    @property
    def name(self) -> str:
        return self.trial.name

    @property
    def done(self) -> bool:
        return self.status == "done"

    def m(self, key: str):
        return self.metrics.get(key)

    @cached_property
    def history(self) -> list[dict]:
        path = self.dir / LOG_FILE
        try:
            return read_jsonl(path) if path.exists() else []
        except (OSError, ValueError) as e:
            self.unreadable.append(_problem(path, e))
            return []

    @cached_property
    def progress(self) -> tuple[int, int] | None:
        """(the last step logged, the steps of the whole run) from the log history, where the Trainer logs the
        epochs done beside the step; None before the first log line."""
        last = next((h for h in reversed(self.history) if h.get("step") and h.get("epoch")), None)
        if last is None:
            return None
        step, train = int(last["step"]), self.trial.config.train
        total = train.max_steps if train.max_steps > 0 else round(step * train.epochs / float(last["epoch"]))
        return step, max(total, step)

    @cached_property
    def seconds_per_step(self) -> float | None:
        """Train time a step so far, from the clock in the latest checkpoint (its totals sum every segment of an
        interrupted run, and leave out steps trained again after one); None before the first checkpoint."""
        clocks = {}
        for path in (self.dir / CHECKPOINTS_DIR).glob(f"checkpoint-*/{CLOCK_FILE}"):
            step = path.parent.name.removeprefix("checkpoint-")
            if step.isdigit() and int(step) > 0:
                clocks[int(step)] = path
        if not clocks:
            return None
        step = max(clocks)
        seconds = (_read_or(clocks[step], {}) or {}).get("train_seconds")  # a half-written one: no estimate
        return seconds / step if isinstance(seconds, (int, float)) and seconds > 0 else None

    def curve(self, key: str) -> dict[int, float]:
        """step -> value of ``loss`` or ``eval_loss`` (the last logged value where a step repeats)."""
        return {int(h["step"]): float(h[key]) for h in self.history if key in h and "step" in h}

    @cached_property
    def per_question(self) -> dict[str, dict]:
        path = self.dir / PREDICTIONS_FILE
        try:
            return {r["id"]: r for r in read_jsonl(path)} if path.exists() else {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.unreadable.append(_problem(path, e))
            return {}

    @property
    def wall_seconds(self):
        return self.run.get("wall_seconds")

    @property
    def max_rss_mb(self):
        rss = [a.get("max_rss_mb") for a in self.run.get("attempts", []) if a.get("max_rss_mb")]
        return max(rss) if rss else None


@dataclass
class SweepData:
    dir: Path
    cfg: Any
    trials: list[TrialResult]
    axes: dict[str, list]
    reference: dict[str, Any]
    index: dict  # sweep.json (may be empty)
    strays: list[str]  # trial folders on disk that the config no longer makes
    unreadable: list[str] = field(default_factory=list)  # damaged files, left out (named in the report)

    def by_name(self, name: str) -> TrialResult | None:
        return next((t for t in self.trials if t.name == name), None)

    def axis_rows(self, key: str) -> list[TrialResult]:
        """Trials that differ from the reference point in ``key`` alone (the reference included), in the axis's
        value order."""
        rows = [t for t in self.trials
                if all(t.trial.values[k] == v for k, v in self.reference.items() if k != key)]  # fmt: skip
        order = {format_value(v): i for i, v in enumerate(self.axes[key])}
        return sorted(rows, key=lambda t: order.get(format_value(t.trial.values[key]), len(order)))

    @property
    def reference_trial(self) -> TrialResult | None:
        return next((t for t in self.trials if t.trial.values == self.reference), None)


def _problem(path: Path, error: BaseException) -> str:
    """``PATH: what is wrong``, the path as the user gave the folder (relative where it was absolute)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = text.removeprefix(f"{path}: ")
    return f"{portable_path(path)}: {text}"


def _read_or(path: Path, default, unreadable: list | None = None):
    try:
        return read_json(path) if path.exists() else default
    except (OSError, ValueError) as e:
        if unreadable is not None:
            unreadable.append(_problem(path, e))
        return default


def load_sweep(sweep_dir: str | os.PathLike) -> SweepData:
    sweep_dir = Path(sweep_dir)
    cfg_path = sweep_dir / SWEEP_CONFIG_FILE
    if not cfg_path.is_file():
        raise ConfigError(f"{sweep_dir}: not a sweep folder (no sweep.yaml; `loraqa sweep` writes it)")
    cfg = from_dict(yaml.safe_load(cfg_path.read_text()), where=str(cfg_path))
    trials = []
    bad: list[str] = []
    for t in expand_trials(cfg):
        tdir = sweep_dir / t.name
        status = trial_status(tdir)
        trials.append(TrialResult(
            t, tdir, status,
            metrics=_read_or(tdir / METRICS_FILE, {}, bad) if status == "done" else {},
            run=_read_or(tdir / TRIAL_RUN_FILE, {}, bad),
            error=_read_or(tdir / ERROR_FILE, {}, bad) if status == "failed" else {},
            unreadable=bad,
        ))  # fmt: skip
    names = {t.name for t in trials}
    strays = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and (p / TRIAL_CONFIG_FILE).exists()
                    and p.name not in names)  # fmt: skip
    return SweepData(sweep_dir, cfg, trials, axis_values(cfg), reference_values(cfg),
                     _read_or(sweep_dir / SWEEP_INDEX_FILE, {}, bad), strays, bad)  # fmt: skip


# ---------------------------------------------------------------------------------------------- numbers


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
    qa, qb = a.per_question, b.per_question
    ids = sorted(qa.keys() & qb.keys())
    if len(ids) < 2:
        return None
    d = [100.0 * (float(qa[i][metric]) - float(qb[i][metric])) for i in ids]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return Diff(mean, math.sqrt(var / len(d)), len(d))


def _num(v, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _secs(v) -> str:
    if v is None:
        return "—"
    v = float(v)
    if v < 120:
        return f"{v:.1f} s"
    if v < 7200:
        return f"{v / 60:.1f} min"
    return f"{v / 3600:.2f} h"


def _mb(v) -> str:
    return "—" if v is None else f"{float(v):,.0f} MB"


def _pct(a, b) -> str:
    return "—" if not a or not b else f"{100.0 * a / b:.3f}%"


def _settings(t: TrialResult, reference: dict) -> str:
    diff = {k: v for k, v in t.trial.values.items() if v != reference.get(k)}
    return ", ".join(f"{k}={format_value(v)}" for k, v in diff.items()) or "reference"


def _table(header: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(header)))
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _status_cell(t: TrialResult) -> str:
    """The trial's status; for one not finished, how far its training got (a trial that stopped resumes from its
    last checkpoint, at or before that step)."""
    progress = t.progress if t.status in ("running", "unfinished") else None
    if not progress:
        return t.status if t.status != "running" else "running (unfinished)"
    step, total = progress
    if step >= total:
        return f"{t.status}, training done, not scored yet"
    pace = t.seconds_per_step
    left = f"; ~{_secs((total - step) * pace)} of training left at {pace:.1f} s a step so far" if pace else ""
    return f"{t.status}, step {step:,} of {total:,} logged{left}"


# ---------------------------------------------------------------------------------------------- verdicts


@dataclass
class Verdict:
    label: str
    claim: str
    verdict: str
    detail: str

    def line(self) -> str:
        return f"- **({self.label}) “{self.claim}”: {self.verdict}.** {self.detail}"


def _done_rows(data: SweepData, key: str) -> list[TrialResult]:
    return [t for t in data.axis_rows(key) if t.done] if key in data.axes else []


def _missing_note(data: SweepData, key: str) -> str:
    if key not in data.axes:
        return f"the sweep has no {key} axis"
    rows = data.axis_rows(key)
    unfinished = [f"{t.name} ({t.status})" for t in rows if not t.done]
    return "not finished: " + ", ".join(unfinished) if unfinished else ""


def verdict_rank_quality(data: SweepData) -> Verdict:
    claim = "higher ranks are better, with diminishing returns after 16"
    rows = [t for t in _done_rows(data, "lora.r") if t.trial.config.train.method == "lora"]
    ranks = {t.trial.values["lora.r"]: t for t in rows}
    low = [r for r in ranks if r < 16]
    high = [r for r in ranks if r > 16]
    listing = ", ".join(f"r{r} {_num(ranks[r].m('f1'))}" for r in sorted(ranks)) or "none"
    if not low or 16 not in ranks or not high:
        extra = _missing_note(data, "lora.r")
        return Verdict("a", claim, NA, f"Needs finished trials at a rank below 16, at 16 and above 16 "
                       f"(F1 of finished ranks: {listing}){'; ' + extra if extra else ''}.")  # fmt: skip
    r_lo, r_hi = min(low), max(high)
    up = paired_diff(ranks[16], ranks[r_lo])
    beyond = paired_diff(ranks[r_hi], ranks[16])
    if up is None or beyond is None:
        return Verdict("a", claim, NA, f"F1 by rank: {listing}; no per-question predictions to compare.")
    per_doubling_up = up.mean / math.log2(16 / r_lo)
    per_doubling_beyond = beyond.mean / math.log2(r_hi / 16)
    detail = (f"F1 by rank: {listing}. r16 − r{r_lo}: {up.text()} F1, i.e. {per_doubling_up:+.2f} per doubling; "
              f"r{r_hi} − r16: {beyond.text()} F1, i.e. {per_doubling_beyond:+.2f} per doubling.")  # fmt: skip
    if not (up.significant and up.mean > 0):
        return Verdict("a", claim, FAILS, detail + f" Rank 16 is not measurably better than rank {r_lo}.")
    if beyond.significant and beyond.mean < 0:
        return Verdict("a", claim, FAILS, detail + f" Rank {r_hi} is measurably worse than rank 16.")
    if per_doubling_beyond >= per_doubling_up:
        return Verdict(
            "a", claim, FAILS, detail + " The gain per doubling above 16 is not smaller than below it."
        )
    return Verdict("a", claim, HOLDS, detail)


def verdict_lr(data: SweepData) -> Verdict:
    claim = "2e-4 gives the best metrics"
    rows = _done_rows(data, "train.lr")
    listing = ", ".join(f"{format_value(t.trial.values['train.lr'])}: F1 {_num(t.m('f1'))} EM {_num(t.m('exact_match'))}"
                        for t in rows) or "none"  # fmt: skip
    star = [t for t in rows if math.isclose(t.trial.values["train.lr"], 2e-4, rel_tol=1e-9)]
    others = [t for t in rows if t not in star]
    if not star or not others:
        extra = _missing_note(data, "train.lr")
        return Verdict("b", claim, NA, f"Needs a finished lr=2e-4 trial and another learning rate "
                       f"(finished: {listing}){'; ' + extra if extra else ''}.")  # fmt: skip
    s = star[0]
    best_f1 = max(rows, key=lambda t: t.m("f1") or -1)
    best_em = max(rows, key=lambda t: t.m("exact_match") or -1)
    diffs = {t: paired_diff(s, t) for t in others}
    detail = f"{listing}. " + "; ".join(
        f"2e-4 − {format_value(t.trial.values['train.lr'])}: {d.text() if d else 'no predictions'} F1"
        for t, d in diffs.items())  # fmt: skip
    if best_f1 is not s and (best_f1.m("f1") or 0) > (s.m("f1") or 0):
        return Verdict(
            "b",
            claim,
            FAILS,
            detail + f". The best F1 is at lr={format_value(best_f1.trial.values['train.lr'])}.",
        )
    if best_em is not s and (best_em.m("exact_match") or 0) > (s.m("exact_match") or 0):
        return Verdict(
            "b",
            claim,
            FAILS,
            detail + f". The best EM is at lr={format_value(best_em.trial.values['train.lr'])}.",
        )
    if not all(d is not None and d.significant and d.mean > 0 for d in diffs.values()):
        return Verdict("b", claim, FAILS, detail + ". 2e-4 is not ahead of every other rate beyond noise.")
    return Verdict("b", claim, HOLDS, detail + ".")


def _compare_curves(a: dict[int, float], b: dict[int, float]) -> tuple[list[int], int, int]:
    """Common steps, and at how many of them a is lower / higher than b by more than LOSS_TOLERANCE."""
    steps = sorted(a.keys() & b.keys())
    lower = sum(a[s] < b[s] * (1 - LOSS_TOLERANCE) for s in steps)
    higher = sum(a[s] > b[s] * (1 + LOSS_TOLERANCE) for s in steps)
    return steps, lower, higher


def _at_steps(a: dict[int, float], b: dict[int, float], steps: list[int]) -> str:
    """``step s: a vs b`` at the first, middle and last of the common steps."""
    pick = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    return ", ".join(f"step {s}: {a[s]:.3f} vs {b[s]:.3f}" for s in pick)


def verdict_targets(data: SweepData) -> Verdict:
    claim = "attention + projection converges faster"
    rows = {t.trial.values["lora.targets"]: t for t in _done_rows(data, "lora.targets")
            if isinstance(t.trial.values["lora.targets"], str)}  # fmt: skip
    if "attn" not in rows or "attn+proj" not in rows:
        extra = _missing_note(data, "lora.targets")
        return Verdict("c", claim, NA, "Needs finished lora.targets=attn and attn+proj trials that differ only in "
                       f"targets{'; ' + extra if extra else ''}.")  # fmt: skip
    ap, at = rows["attn+proj"], rows["attn"]
    parts = []
    used = None
    for key, what in (("eval_loss", "eval loss"), ("loss", "train loss")):
        steps, lower, higher = _compare_curves(ap.curve(key), at.curve(key))
        if not steps:
            parts.append(f"{what}: no common logged steps")
            continue
        at_steps = _at_steps(ap.curve(key), at.curve(key), steps)
        parts.append(f"{what} (attn+proj vs attn) lower at {lower} and higher at {higher} of {len(steps)} common "
                     f"steps ({at_steps})")  # fmt: skip
        if used is None:
            used = (what, steps, lower, higher)
    detail = "; ".join(parts) + "."
    if used is None:
        return Verdict("c", claim, NA, detail)
    what, steps, lower, higher = used
    rule = f"Judged on {what}: holds if lower by >{LOSS_TOLERANCE:.0%} at most common steps and never higher."
    if lower * 2 > len(steps) and higher == 0:
        return Verdict("c", claim, HOLDS, f"{detail} {rule}")
    return Verdict("c", claim, FAILS, f"{detail} {rule}")


def verdict_rank_memory(data: SweepData) -> Verdict:
    claim = "higher ranks need more memory"
    rows = [t for t in _done_rows(data, "lora.r") if t.m("peak_memory_mb") is not None]
    rows.sort(key=lambda t: t.trial.values["lora.r"])
    if len(rows) < 2:
        extra = _missing_note(data, "lora.r")
        return Verdict("d", claim, NA, f"Needs two finished ranks{'; ' + extra if extra else ''}.")
    mem = [float(t.m("peak_memory_mb")) for t in rows]
    listing = ", ".join(f"r{t.trial.values['lora.r']} {_mb(m)} ({_num(t.m('trainable_params'))} trainable)"
                        for t, m in zip(rows, mem, strict=True))  # fmt: skip
    device = rows[0].m("device") or "?"
    kind = "peak allocated GPU memory" if str(device).startswith("cuda") else "peak RSS of the trial process"
    total = mem[-1] - mem[0]
    drops = [(a, b) for a, b in zip(mem, mem[1:], strict=False) if b < a * (1 - MEMORY_TOLERANCE)]
    detail = f"{kind}: {listing}; highest − lowest rank: {total:+,.0f} MB ({100 * total / mem[0]:+.1f}%)."
    if total > mem[0] * MEMORY_TOLERANCE and not drops:
        return Verdict("d", claim, HOLDS, detail)
    return Verdict(
        "d", claim, FAILS, detail + f" Not an increase beyond {MEMORY_TOLERANCE:.0%} at every rank."
    )


def verdict_masking(data: SweepData) -> Verdict:
    claim = "without masking, convergence is slower and answers worse"
    rows = {t.trial.values["prompt.loss_on"]: t for t in _done_rows(data, "prompt.loss_on")}
    if "all" not in rows or "answer" not in rows:
        extra = _missing_note(data, "prompt.loss_on")
        return Verdict("e", claim, NA, "Needs finished prompt.loss_on=answer and =all trials that differ only in "
                       f"masking{'; ' + extra if extra else ''}.")  # fmt: skip
    masked, unmasked = rows["answer"], rows["all"]
    f1 = paired_diff(unmasked, masked)
    em = paired_diff(unmasked, masked, "exact_match")
    nums = (f"F1 {_num(unmasked.m('f1'))} without masking vs {_num(masked.m('f1'))} with, difference "
            f"{f1.text() if f1 else '— (no predictions)'}; EM {_num(unmasked.m('exact_match'))} vs "
            f"{_num(masked.m('exact_match'))}, difference {em.text() if em else '— (no predictions)'}.")  # fmt: skip
    answers = HOLDS if f1 is not None and f1.significant and f1.mean < 0 else FAILS
    # train losses are never comparable (all tokens vs the answer); eval losses are when both runs logged the
    # answer-token loss (eval_loss_on, recorded since loraqa logs it whatever prompt.loss_on trains on)
    if not all(t.m("eval_loss_on") == "answer" for t in (masked, unmasked)):
        conv = ("Slower convergence: not measurable here — these runs logged the loss on the tokens they trained "
                "on, so the loss_on=all run's losses cover every token and are not comparable with the masked "
                "run's; rerun them with this version of loraqa, which logs the answer-token eval loss for both.")
        return Verdict("e", claim, f"answers worse: {answers}; slower convergence: {NA}", f"{nums} {conv}")
    unmasked_curve, masked_curve = unmasked.curve("eval_loss"), masked.curve("eval_loss")
    steps, lower, higher = _compare_curves(unmasked_curve, masked_curve)
    if not steps:
        conv = "Slower convergence: no common logged eval steps."
        return Verdict("e", claim, f"answers worse: {answers}; slower convergence: {NA}", f"{nums} {conv}")
    at_steps = _at_steps(unmasked_curve, masked_curve, steps)
    slower = HOLDS if higher * 2 > len(steps) and lower == 0 else FAILS
    conv = (f"Answer-token eval loss without vs with masking: higher at {higher} and lower at {lower} of "
            f"{len(steps)} common steps ({at_steps}). Slower convergence holds if higher by >{LOSS_TOLERANCE:.0%} "
            "at most common steps and never lower.")  # fmt: skip
    return Verdict("e", claim, f"answers worse: {answers}; slower convergence: {slower}", f"{nums} {conv}")


SMOOTHNESS_TOLERANCE = 0.10  # a roughness or instability difference counts when it is more than 10% (relative)


def roughness(curve: dict[int, float], skip_before: int = 0) -> float | None:
    """How much a loss curve zigzags between logs: the mean of |l_i - (l_{i-1} + l_{i+1}) / 2| over the logged
    points from step ``skip_before`` on (past the warmup), relative to their mean. 0 for a straight or smoothly
    bending curve (logs are evenly spaced, so the midpoint is the straight line through the neighbours)."""
    values = [curve[s] for s in sorted(curve) if s >= skip_before]
    if len(values) < 5:
        return None
    dev = [abs(values[i] - (values[i - 1] + values[i + 1]) / 2) for i in range(1, len(values) - 1)]
    return (sum(dev) / len(dev)) / (sum(values) / len(values))


def instability(curve: dict[int, float], skip_before: int = 0) -> float | None:
    """How often and how far an eval loss goes back up: the sum of its rises between consecutive evaluations
    from step ``skip_before`` on, relative to its mean. 0 for a loss that only falls."""
    values = [curve[s] for s in sorted(curve) if s >= skip_before]
    if len(values) < 3:
        return None
    return sum(max(0.0, b - a) for a, b in zip(values, values[1:], strict=False)) / (sum(values) / len(values))


def _steadily(values: list[float], direction: int) -> bool:
    """``values`` move in ``direction`` (+1 up, -1 down) from first to last by more than SMOOTHNESS_TOLERANCE
    and never against it by more than that from one to the next."""
    tol = SMOOTHNESS_TOLERANCE
    ends = values[-1] > values[0] * (1 + tol) if direction > 0 else values[-1] < values[0] * (1 - tol)
    if direction > 0:
        against = any(b < a * (1 - tol) for a, b in zip(values, values[1:], strict=False))
    else:
        against = any(b > a * (1 + tol) for a, b in zip(values, values[1:], strict=False))
    return ends and not against


def verdict_rank_smoothness(data: SweepData) -> Verdict:
    claim = "higher ranks converge more smoothly"
    rows = [t for t in _done_rows(data, "lora.r") if t.trial.config.train.method == "lora"]
    rows.sort(key=lambda t: t.trial.values["lora.r"])
    warm = data.cfg.train.warmup_steps
    rough = {t.trial.values["lora.r"]: roughness(t.curve("loss"), warm) for t in rows}
    rough = {r: v for r, v in rough.items() if v is not None}
    rule = (f"Roughness: the mean distance of each logged train loss from the midpoint of its two neighbours, "
            f"relative to the mean loss, after the {warm} warmup steps. Holds if it falls from the lowest to the "
            f"highest rank by more than {SMOOTHNESS_TOLERANCE:.0%} and never rises by more than that from one rank "
            "to the next.")  # fmt: skip
    if len(rough) < 2:
        extra = _missing_note(data, "lora.r")
        return Verdict("f", claim, NA, f"Needs two finished ranks with at least 5 logged train losses after warmup"
                       f"{'; ' + extra if extra else ''}. {rule}")  # fmt: skip
    listing = ", ".join(f"r{r} {v:.4f}" for r, v in rough.items())
    word = HOLDS if _steadily(list(rough.values()), -1) else FAILS
    return Verdict("f", claim, word, f"Train-loss roughness by rank: {listing}. {rule}")


def _steps_to(curve: dict[int, float], level: float) -> int | None:
    return next((s for s in sorted(curve) if curve[s] <= level), None)


def verdict_lr_dynamics(data: SweepData) -> Verdict:
    claim = "higher learning rates converge faster but with a less stable eval loss"
    rows = [t for t in _done_rows(data, "train.lr") if t.curve("eval_loss")]
    rows.sort(key=lambda t: t.trial.values["train.lr"])
    if len(rows) < 2:
        extra = _missing_note(data, "train.lr")
        return Verdict("g", claim, NA, f"Needs two finished learning rates with logged eval losses"
                       f"{'; ' + extra if extra else ''}.")  # fmt: skip
    curves = {format_value(t.trial.values["train.lr"]): t.curve("eval_loss") for t in rows}
    level = max(min(c.values()) for c in curves.values()) * (1 + LOSS_TOLERANCE)
    steps = {lr: _steps_to(c, level) for lr, c in curves.items()}
    warm = data.cfg.train.warmup_steps
    unstable = {lr: instability(c, warm) for lr, c in curves.items()}
    step_list = [steps[lr] for lr in curves]
    faster = HOLDS if step_list[-1] < step_list[0] and all(b <= a for a, b in zip(step_list, step_list[1:], strict=False)) else FAILS
    ins = [unstable[lr] for lr in curves]
    if any(v is None for v in ins):
        less_stable = NA
    else:
        rising = ins[-1] > 0 and (ins[0] == 0 or _steadily(ins, +1))
        less_stable = HOLDS if rising and all(b >= a * (1 - SMOOTHNESS_TOLERANCE) for a, b in zip(ins, ins[1:], strict=False)) else FAILS
    detail = (
        "Steps to reach an eval loss of " + f"{level:.3f} (the lowest level every rate reaches, +{LOSS_TOLERANCE:.0%}): "
        + ", ".join(f"lr {lr}: {steps[lr]}" for lr in curves)
        + "; eval-loss instability (the sum of its rises between evaluations after warmup, relative to its mean): "
        + ", ".join(f"lr {lr}: {'—' if unstable[lr] is None else f'{unstable[lr]:.4f}'}" for lr in curves)
        + f". Faster holds if the step count falls as the rate rises (strictly from the lowest to the highest); "
        f"less stable holds if the instability rises with the rate by more than {SMOOTHNESS_TOLERANCE:.0%} and "
        "never falls by more than that."
    )
    return Verdict("g", claim, f"faster: {faster}; less stable: {less_stable}", detail)


def full_finetune_section(data: SweepData) -> tuple[str, str]:
    """(verdict word, markdown) for the full fine-tuning ablation."""
    rows = {t.trial.values["train.method"]: t for t in _done_rows(data, "train.method")}
    if "full" not in rows or "lora" not in rows:
        extra = _missing_note(data, "train.method")
        return NA, ("Needs finished train.method=lora and =full trials that differ only in the method"
                    f"{'; ' + extra if extra else ''}.")  # fmt: skip
    lora, full = rows["lora"], rows["full"]
    table = _table(
        ["method", "trainable params", "% of all", "peak memory", "train time", "train tokens/s", "F1", "EM"],
        [[name, _num(t.m("trainable_params")), _pct(t.m("trainable_params"), t.m("total_params")),
          _mb(t.m("peak_memory_mb")), _secs(t.m("train_seconds")), _num(t.m("train_tokens_per_second"), 1),
          _num(t.m("f1")), _num(t.m("exact_match"))] for name, t in (("LoRA", lora), ("full", full))],
    )  # fmt: skip
    f1 = paired_diff(full, lora)

    def ratio(key):
        a, b = full.m(key), lora.m(key)
        return f"{a / b:.2f}×" if a and b else "—"

    text = (f"Full fine-tuning trains {ratio('trainable_params')} the parameters of LoRA, with {ratio('peak_memory_mb')} "
            f"the peak memory and {ratio('train_seconds')} the train time; F1 full − LoRA: "
            f"{f1.text() if f1 else 'no predictions'}.")  # fmt: skip
    return "measured", f"{table}\n\n{text}"


# ---------------------------------------------------------------------------------------------- figures


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _plot(path: Path, title: str, series: list[tuple[str, TrialResult]], keys: list[tuple[str, str]],
          log_steps: bool = False) -> bool:
    """One subplot per (log key, label); one line per trial. False when there is nothing to draw.
    ``log_steps`` puts the steps on a log scale, for trials whose lengths differ by orders of magnitude."""
    curves = [[(label, t.curve(key)) for label, t in series] for key, _ in keys]
    if not any(c for panel in curves for _, c in panel):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 5.5 * len(keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(width, 4), squeeze=False)
    for ax, panel, (_, ylabel) in zip(axes[0], curves, keys, strict=True):
        for label, curve in panel:
            if curve:
                steps = sorted(curve)
                ax.plot(steps, [curve[s] for s in steps], marker="o" if len(steps) < 30 else None,
                        markersize=3, label=label)  # fmt: skip
        if log_steps:
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labels at 10^k only: minor ones run into each other
        ax.set_xlabel("optimizer step" + (" (log scale)" if log_steps else ""))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(c for _, c in panel):
            ax.legend()
    fig.suptitle(textwrap.fill(title, int(width * 10)))  # ~10 characters an inch at the default font size
    save_figure(fig, path)
    return True


def save_figure(fig, path: Path) -> None:
    """Lay out, render to PNG and write atomically (a report regenerated mid-read never shows half a figure)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _write_bytes_atomic(path, buf.getvalue())


FIGURES = (
    ("Figure 3", "lora.r", "figure3_rank_eval_loss.png", "Eval loss per LoRA rank", [("eval_loss", "eval loss")]),
    ("Figure 4", "lora.targets", "figure4_targets_loss.png", "Train and eval loss per target preset",
     [("loss", "train loss"), ("eval_loss", "eval loss")]),
    ("Figure 5", "train.lr", "figure5_lr_loss.png", "Train and eval loss per learning rate",
     [("loss", "train loss"), ("eval_loss", "eval loss")]),
    # not in the reference study, which argues masking without running it
    ("Masking figure", "prompt.loss_on", "masking_eval_loss.png", "Answer-token eval loss with and without "
     "loss masking", [("eval_loss", "eval loss (answer tokens)")]),
)  # fmt: skip


def draw_figures(data: SweepData, out_dir: Path, file_prefix: str = "") -> list[str]:
    """Markdown lines for Figures 3-5 and the masking figure (image links, or why one is not drawn); the files
    are ``figures/<file_prefix><name>.png``."""
    lines = []
    for label, key, fname, title, keys in FIGURES:
        if key not in data.axes:
            lines.append(f"- {label} ({title.lower()}): not drawn — the sweep has no {key} axis.")
            continue
        series = []
        for t in data.axis_rows(key):
            if key == "prompt.loss_on" and t.m("eval_loss_on") != "answer":
                continue  # its eval loss may cover every token (see verdict_masking): not comparable
            if t.history:
                prefix = {"lora.r": "r=", "train.lr": "lr=", "prompt.loss_on": "loss_on="}.get(key, "")
                note = "" if t.done else f" ({t.status})"
                series.append((f"{prefix}{format_value(t.trial.values[key])}{note}", t))
        fname = file_prefix + fname
        path = out_dir / "figures" / fname
        if series and _plot(path, f"{label}: {title} ({data.cfg.model.name})", series, keys):
            lines.append(f"**{label}: {title}.**\n\n![{label}: {title}](figures/{fname})\n")
        elif key == "prompt.loss_on":
            lines.append(f"- {label} ({title[0].lower() + title[1:]}): not drawn — no finished {key} trial logged "
                         "the answer-token eval loss.")  # fmt: skip
        else:
            lines.append(f"- {label} ({title.lower()}): not drawn — no logged losses for the {key} trials.")
    return lines


# ---------------------------------------------------------------------------------------------- report


CSV_METRICS = ("exact_match", "f1", "final_train_loss", "final_eval_loss", "trainable_params", "total_params",
               "train_seconds", "train_tokens_per_second", "train_questions_per_second", "peak_memory_mb",
               "eval_seconds", "train_steps", "train_examples", "n_questions", "device")  # fmt: skip


def results_csv(data: SweepData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    axes = list(data.axes)
    w.writerow(["trial", "status", *axes, *CSV_METRICS, "trainable_percent", "wall_seconds", "max_rss_mb",
                "attempts", "error", "code"])  # fmt: skip
    for t in data.trials:
        m = t.metrics
        pct = 100.0 * m["trainable_params"] / m["total_params"] if m.get("total_params") else None
        w.writerow([t.name, t.status, *(format_value(t.trial.values[k]) for k in axes),
                    *("" if m.get(k) is None else m[k] for k in CSV_METRICS),
                    "" if pct is None else round(pct, 4), "" if t.wall_seconds is None else t.wall_seconds,
                    "" if t.max_rss_mb is None else t.max_rss_mb, len(t.run.get("attempts", [])),
                    t.error.get("summary", ""), t.run.get("machine", {}).get("code", "")])  # fmt: skip
    return buf.getvalue()


def _axis_table(data: SweepData, key: str) -> str:
    rows = []
    for t in data.axis_rows(key):
        value = format_value(t.trial.values[key])
        if t.trial.values == data.reference:
            value += " (reference)"
        rows.append([value, _num(t.m("f1")), _num(t.m("exact_match")), _num(t.m("trainable_params")),
                     _secs(t.m("train_seconds")), _mb(t.m("peak_memory_mb")), f"{t.name} ({_status_cell(t)})"])  # fmt: skip
    title = AXIS_TITLES.get(key, key)
    return (f"### {title[0].upper() + title[1:]} (`{key}`)\n\n"
            + _table([title, "F1", "EM", "trainable params", "train time", "peak memory", "trial"], rows,
                     right={1, 2, 3, 4, 5}))  # fmt: skip


def _param_table(data: SweepData) -> str:
    from .model import PRESET_NAMES, parameter_table

    ranks = sorted({4, 8, 16, 32} | {t.trial.values["lora.r"] for t in data.trials if "lora.r" in data.axes}
                   | {data.cfg.lora.r})  # fmt: skip
    presets = ["attn", "attn+proj"]
    for t in data.trials:
        p = t.trial.config.lora.targets
        if isinstance(p, str) and p in PRESET_NAMES and p not in presets:
            presets.append(p)
    model = data.cfg.model.name
    try:
        table = parameter_table(model, ranks=tuple(ranks), presets=tuple(presets))
    except Exception as e:  # the model's config cannot be read here (offline, missing package, ...)
        return f"Not computed for {model}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    measured = {}
    for t in data.trials:
        c = t.trial.config
        if t.done and c.train.method == "lora" and isinstance(c.lora.targets, str):
            measured[(c.lora.targets, c.lora.r)] = t.m("trainable_params")
    rows = [[r["targets"], str(r["r"]), _num(r["trainable"]), f"{r['percent']:.3f}%",
             _num(measured.get((r["targets"], r["r"])))] for r in table]  # fmt: skip
    base_total = table[0]["base_total"] if table else None
    for t in data.trials:
        if t.done and t.trial.config.train.method == "full":
            rows.append(["full fine-tuning", "—", _num(t.m("trainable_params")),
                         _pct(t.m("trainable_params"), t.m("total_params")), _num(t.m("trainable_params"))])  # fmt: skip
            break
    return (f"{model}: {_num(base_total)} base parameters. \"% of all\" is trainable / (base + LoRA); "
            "\"measured\" is the count a finished trial reported.\n\n"
            + _table(["targets", "rank", "trainable", "% of all", "measured"], rows, right={1, 2, 3, 4}))  # fmt: skip


def _header(data: SweepData) -> list[str]:
    idx = data.index
    cfg = data.cfg
    commands = []
    for inv in idx.get("invocations", []):
        c = inv.get("command")
        c = portable_command(c) if c else c  # a report names no folder of the machine that made it
        if c and c not in commands:
            commands.append(c + (" (reconstructed: not started from the command line)"
                                 if inv.get("command_is_reconstructed") else ""))  # fmt: skip
    if not commands:
        commands = [
            f"loraqa sweep CONFIG --output-dir {portable_path(data.dir)} (no sweep.json: the command was not recorded)"
        ]
    machines = {}
    for t in data.trials:
        m = t.run.get("machine")
        if m:
            machines.setdefault(describe_machine(m), set()).add(m.get("host", "?"))
    if not machines and idx.get("machine"):
        machines[describe_machine(idx["machine"])] = {idx["machine"].get("host", "?")}
    machine_text = (
        "; ".join(f"{d} (host {', '.join(sorted(h))})" for d, h in machines.items()) or "not recorded"
    )
    starts = [
        a.get("started_at") for t in data.trials for a in t.run.get("attempts", []) if a.get("started_at")
    ]
    ends = [
        a.get("finished_at") for t in data.trials for a in t.run.get("attempts", []) if a.get("finished_at")
    ]
    devices = sorted({str(t.m("device")) for t in data.trials if t.m("device")})
    counts = {
        s: sum(t.status == s for t in data.trials)
        for s in ("done", "failed", "running", "unfinished", "pending")
    }
    codes = sorted({t.run["machine"]["code"] for t in data.trials if t.run.get("machine", {}).get("code")})
    here = machine_info()
    axes_text = "; ".join(
        f"`{k}` ∈ {{{', '.join(format_value(v) for v in vs)}}}" for k, vs in data.axes.items()
    )
    lines = [
        f"# Sweep report: {cfg.name}",
        "",
        "- Command: " + "; ".join(f"`{c}`" for c in commands),
        f"- Rerun or resume: `{sweep_command(data.dir, portable_path)}`",
        f"- Machine: {machine_text}" + (f"; trials ran on {', '.join(devices)}" if devices else ""),
        "- Code: " + ("; ".join(codes) if codes else "not recorded") + (
            " (trials ran on different versions)" if len(codes) > 1 else ""),
        f"- Date: trials ran {min(starts) if starts else '—'} to {max(ends) if ends else '—'}; "
        f"report written {datetime.now().astimezone().isoformat(timespec='seconds')} on {here['host']} "
        f"({platform.platform()})",
        f"- Sweep: {cfg.sweep.mode} over {axes_text}; "
        f"model `{cfg.model.name}`; {len(data.trials)} trials",
        "- Trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
    ]  # fmt: skip
    return lines


def all_verdicts(data: SweepData) -> list[Verdict]:
    return [verdict_rank_quality(data), verdict_lr(data), verdict_targets(data), verdict_rank_memory(data),
            verdict_masking(data), verdict_rank_smoothness(data), verdict_lr_dynamics(data)]  # fmt: skip


def render_report(data: SweepData, figure_lines: list[str]) -> str:
    ref_trial = data.reference_trial
    out = _header(data)
    out += ["", "Reference point of the comparisons: " + ", ".join(f"{k}={format_value(v)}" for k, v in data.reference.items())
            + (f" (trial `{ref_trial.name}`)" if ref_trial else " (no such trial)") + "."]  # fmt: skip

    # every trial with its status
    rows = []
    for t in data.trials:
        note = ""
        if t.status == "failed":
            note = t.error.get("summary") or "failed"
        elif t.done and t.m("resumed_from"):
            note = f"resumed from {t.m('resumed_from')}"
        attempts = len(t.run.get("attempts", []))
        if attempts > 1:
            note = (note + "; " if note else "") + f"{attempts} attempts"
        rows.append([t.name, _status_cell(t), _settings(t, data.reference), _num(t.m("f1")), _num(t.m("exact_match")),
                     _num(t.m("final_train_loss"), 3), _num(t.m("final_eval_loss"), 3), _secs(t.wall_seconds), note])  # fmt: skip
    out += ["", "## Trials", "",
            _table(["trial", "status", "settings", "F1", "EM", "final train loss", "final eval loss", "wall time",
                    "note"], rows, right={3, 4, 5, 6, 7})]  # fmt: skip
    missing = [t for t in data.trials if not t.done]
    if missing:
        out += ["", "Not finished (left out of every comparison below): "
                + ", ".join(f"`{t.name}` ({_status_cell(t)})" for t in missing) + "."]  # fmt: skip
    if data.unreadable:
        out += ["", f"Unreadable files (damaged; what they held is left out): {len(data.unreadable)}: "
                + "; ".join(f"`{p}`" for p in data.unreadable) + "."]  # fmt: skip
    if data.strays:
        out += [
            "",
            "Trial folders the config no longer makes (ignored): "
            + ", ".join(f"`{s}`" for s in data.strays)
            + ".",
        ]

    out += ["", "## One table per swept axis", "",
            "Trials that differ from the reference point only in that axis. Train time is the Trainer's; peak memory "
            "is the peak allocated GPU memory on a GPU, the trial process's peak RSS on a CPU."]  # fmt: skip
    for key in data.axes:
        out += ["", _axis_table(data, key)]

    done = sorted((t for t in data.trials if t.done), key=lambda t: -(t.m("f1") or 0))
    best = [[str(i + 1), t.name, _settings(t, data.reference), _num(t.m("f1")), _num(t.m("exact_match")),
             _num(t.m("trainable_params")), _secs(t.m("train_seconds")), _mb(t.m("peak_memory_mb"))]
            for i, t in enumerate(done[:5])]  # fmt: skip
    out += ["", "## Table 6: best configurations by F1", "",
            _table(["#", "trial", "settings", "F1", "EM", "trainable params", "train time", "peak memory"], best,
                   right={0, 3, 4, 5, 6, 7}) if best else "No finished trials."]  # fmt: skip
    out += ["", "## Table 7: trainable parameters", "", _param_table(data)]
    out += ["", "## Figures", "", *figure_lines]

    verdicts = all_verdicts(data)
    ft_word, ft_text = full_finetune_section(data)
    out += ["", "## The reference study's claims, measured", "",
            f"Rule: an EM or F1 difference counts only if it is more than {SE_MULTIPLIER:g} standard errors of the "
            "per-question difference, paired over the same dev questions (about 95% confidence; shown as "
            f"“difference ± {SE_MULTIPLIER:g}·SE”); a loss difference only if it is more than {LOSS_TOLERANCE:.0%} "
            f"and a memory difference only if it is more than {MEMORY_TOLERANCE:.0%}. A difference within that noise "
            "is not called “holds”. Only finished trials that differ in the claim's axis alone are compared; "
            "“not measurable here” means those trials are missing.", ""]  # fmt: skip
    out += [v.line() for v in verdicts]
    out += ["", "### Full fine-tuning ablation (`train.method=full` vs LoRA)", "",
            ft_text if ft_word != NA else f"**{NA}.** {ft_text}"]  # fmt: skip
    return "\n".join(out) + "\n"


def write_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 unreadable: list | None = None) -> Path:  # fmt: skip
    """Write ``report.md``, ``results.csv`` and ``figures/*.png`` for a sweep folder; returns report.md's path.
    Damaged files (metrics, logs, predictions that do not parse) are left out, named in the report and appended
    to ``unreadable`` when given."""
    data = load_sweep(sweep_dir)
    for t in data.trials:  # read now, so the report's header can name any damaged file
        _ = t.history, t.per_question
    if unreadable is not None:
        unreadable.extend(data.unreadable)
    out = Path(out_dir) if out_dir else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure_lines = draw_figures(data, out)
    write_text_atomic(out / "results.csv", results_csv(data))
    return write_text_atomic(out / "report.md", render_report(data, figure_lines))

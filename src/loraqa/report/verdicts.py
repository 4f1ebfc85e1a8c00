"""The reference study's claims, each judged by a stated, computed rule on a sweep's finished trials: "holds",
"does not hold" or "not measurable here" (the trials it needs are missing)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..sweep.trials import format_value
from .cells import mb, md_table, num, paired_diff, percent, secs
from .load import SweepData, TrialResult

LOSS_TOLERANCE = 0.01  # a loss difference counts when it is more than 1% (relative)
MEMORY_TOLERANCE = 0.02  # a memory difference counts when it is more than 2% (relative)
# What one trainable parameter costs in training: its fp32 weight, gradient and AdamW's two moments. The memory
# verdict sets this against the measured peaks, to show how much of a difference rank itself can make.
ADAPTER_STATE_BYTES = 16

HOLDS, FAILS, NA = "holds", "does not hold", "not measurable here"


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
    listing = ", ".join(f"r{r} {num(ranks[r].m('f1'))}" for r in sorted(ranks)) or "none"
    if not low or 16 not in ranks or not high:
        extra = _missing_note(data, "lora.r")
        return Verdict(
            "a",
            claim,
            NA,
            f"Needs finished trials at a rank below 16, at 16 and above 16 "
            f"(F1 of finished ranks: {listing}){'; ' + extra if extra else ''}.",
        )
    r_lo, r_hi = min(low), max(high)
    up = paired_diff(ranks[16], ranks[r_lo])
    beyond = paired_diff(ranks[r_hi], ranks[16])
    if up is None or beyond is None:
        return Verdict("a", claim, NA, f"F1 by rank: {listing}; no per-question predictions to compare.")
    per_doubling_up = up.mean / math.log2(16 / r_lo)
    per_doubling_beyond = beyond.mean / math.log2(r_hi / 16)
    detail = (
        f"F1 by rank: {listing}. r16 − r{r_lo}: {up.text()} F1, i.e. {per_doubling_up:+.2f} per doubling; "
        f"r{r_hi} − r16: {beyond.text()} F1, i.e. {per_doubling_beyond:+.2f} per doubling."
    )
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
    listing = (
        ", ".join(
            f"{format_value(t.trial.values['train.lr'])}: F1 {num(t.m('f1'))} EM {num(t.m('exact_match'))}"
            for t in rows
        )
        or "none"
    )
    star = [t for t in rows if math.isclose(t.trial.values["train.lr"], 2e-4, rel_tol=1e-9)]
    others = [t for t in rows if t not in star]
    if not star or not others:
        extra = _missing_note(data, "train.lr")
        return Verdict(
            "b",
            claim,
            NA,
            f"Needs a finished lr=2e-4 trial and another learning rate "
            f"(finished: {listing}){'; ' + extra if extra else ''}.",
        )
    s = star[0]
    diffs = {t: paired_diff(s, t) for t in others}
    detail = f"{listing}. " + "; ".join(
        f"2e-4 − {format_value(t.trial.values['train.lr'])}: {d.text() if d else 'no predictions'} F1"
        for t, d in diffs.items()
    )
    for key, name in (("f1", "F1"), ("exact_match", "EM")):
        best = max(rows, key=lambda t, key=key: t.m(key) or -1)
        if best is not s and (best.m(key) or 0) > (s.m(key) or 0):
            where = format_value(best.trial.values["train.lr"])
            return Verdict("b", claim, FAILS, detail + f". The best {name} is at lr={where}.")
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
    rows = {
        t.trial.values["lora.targets"]: t
        for t in _done_rows(data, "lora.targets")
        if isinstance(t.trial.values["lora.targets"], str)
    }
    if "attn" not in rows or "attn+proj" not in rows:
        extra = _missing_note(data, "lora.targets")
        return Verdict(
            "c",
            claim,
            NA,
            "Needs finished lora.targets=attn and attn+proj trials that differ only in "
            f"targets{'; ' + extra if extra else ''}.",
        )
    ap, at = rows["attn+proj"], rows["attn"]
    parts = []
    used = None
    for key, what in (("eval_loss", "eval loss"), ("loss", "train loss")):
        steps, lower, higher = _compare_curves(ap.curve(key), at.curve(key))
        if not steps:
            parts.append(f"{what}: no common logged steps")
            continue
        at_steps = _at_steps(ap.curve(key), at.curve(key), steps)
        parts.append(
            f"{what} (attn+proj vs attn) lower at {lower} and higher at {higher} of {len(steps)} common "
            f"steps ({at_steps})"
        )
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
    listing = ", ".join(
        f"r{t.trial.values['lora.r']} {mb(m)} ({num(t.m('trainable_params'))} trainable)"
        for t, m in zip(rows, mem, strict=True)
    )
    device = rows[0].m("device") or "?"
    kind = "peak allocated GPU memory" if str(device).startswith("cuda") else "peak RSS of the trial process"
    total = mem[-1] - mem[0]
    drops = [(a, b) for a, b in zip(mem, mem[1:], strict=False) if b < a * (1 - MEMORY_TOLERANCE)]
    detail = f"{kind}: {listing}; highest − lowest rank: {total:+,.0f} MB ({100 * total / mem[0]:+.1f}%)."
    detail += _adapter_state_note(rows[0], rows[-1], mem[0])
    if total > mem[0] * MEMORY_TOLERANCE and not drops:
        return Verdict("d", claim, HOLDS, detail)
    return Verdict(
        "d", claim, FAILS, detail + f" Not an increase beyond {MEMORY_TOLERANCE:.0%} at every rank."
    )


def _adapter_state_note(low: TrialResult, high: TrialResult, low_peak: float) -> str:
    """How much more the highest rank's adapters hold in training than the lowest's, beside the lowest's peak."""
    counts = [low.m("trainable_params"), high.m("trainable_params")]
    if None in counts:
        return ""
    grown = (int(counts[1]) - int(counts[0])) * ADAPTER_STATE_BYTES / 2**20
    low_r, high_r = low.trial.values["lora.r"], high.trial.values["lora.r"]
    return (
        f" The adapters' own training state (fp32 weights, gradients and AdamW's two moments, "
        f"{ADAPTER_STATE_BYTES} bytes a trainable parameter) grows by {grown:+,.1f} MB from r{low_r} to "
        f"r{high_r}: {100 * grown / low_peak:.2f}% of r{low_r}'s peak."
    )


def verdict_masking(data: SweepData) -> Verdict:
    claim = "without masking, convergence is slower and answers worse"
    rows = {t.trial.values["prompt.loss_on"]: t for t in _done_rows(data, "prompt.loss_on")}
    if "all" not in rows or "answer" not in rows:
        extra = _missing_note(data, "prompt.loss_on")
        return Verdict(
            "e",
            claim,
            NA,
            "Needs finished prompt.loss_on=answer and =all trials that differ only in "
            f"masking{'; ' + extra if extra else ''}.",
        )
    masked, unmasked = rows["answer"], rows["all"]
    f1 = paired_diff(unmasked, masked)
    em = paired_diff(unmasked, masked, "exact_match")
    nums = (
        f"F1 {num(unmasked.m('f1'))} without masking vs {num(masked.m('f1'))} with, difference "
        f"{f1.text() if f1 else '— (no predictions)'}; EM {num(unmasked.m('exact_match'))} vs "
        f"{num(masked.m('exact_match'))}, difference {em.text() if em else '— (no predictions)'}."
    )
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
    conv = (
        f"Answer-token eval loss without vs with masking: higher at {higher} and lower at {lower} of "
        f"{len(steps)} common steps ({at_steps}). Slower convergence holds if higher by >{LOSS_TOLERANCE:.0%} "
        "at most common steps and never lower."
    )
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
    rule = (
        f"Roughness: the mean distance of each logged train loss from the midpoint of its two neighbours, "
        f"relative to the mean loss, after the {warm} warmup steps. Holds if it falls from the lowest to the "
        f"highest rank by more than {SMOOTHNESS_TOLERANCE:.0%} and never rises by more than that from one rank "
        "to the next."
    )
    if len(rough) < 2:
        extra = _missing_note(data, "lora.r")
        return Verdict(
            "f",
            claim,
            NA,
            f"Needs two finished ranks with at least 5 logged train losses after warmup"
            f"{'; ' + extra if extra else ''}. {rule}",
        )
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
        return Verdict(
            "g",
            claim,
            NA,
            f"Needs two finished learning rates with logged eval losses{'; ' + extra if extra else ''}.",
        )
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
        return NA, (
            "Needs finished train.method=lora and =full trials that differ only in the method"
            f"{'; ' + extra if extra else ''}."
        )
    lora, full = rows["lora"], rows["full"]
    table = md_table(
        ["method", "trainable params", "% of all", "peak memory", "train time", "train tokens/s", "F1", "EM"],
        [
            [
                name,
                num(t.m("trainable_params")),
                percent(t.m("trainable_params"), t.m("total_params")),
                mb(t.m("peak_memory_mb")),
                secs(t.m("train_seconds")),
                num(t.m("train_tokens_per_second"), 1),
                num(t.m("f1")),
                num(t.m("exact_match")),
            ]
            for name, t in (("LoRA", lora), ("full", full))
        ],
    )
    f1 = paired_diff(full, lora)

    def ratio(key):
        a, b = full.m(key), lora.m(key)
        return f"{a / b:.2f}×" if a and b else "—"

    text = (
        f"Full fine-tuning trains {ratio('trainable_params')} the parameters of LoRA, with {ratio('peak_memory_mb')} "
        f"the peak memory and {ratio('train_seconds')} the train time; F1 full − LoRA: "
        f"{f1.text() if f1 else 'no predictions'}."
    )
    return "measured", f"{table}\n\n{text}"


def all_verdicts(data: SweepData) -> list[Verdict]:
    return [
        verdict_rank_quality(data),
        verdict_lr(data),
        verdict_targets(data),
        verdict_rank_memory(data),
        verdict_masking(data),
        verdict_rank_smoothness(data),
        verdict_lr_dynamics(data),
    ]

"""A study: several sweeps reported as one (``loraqa report SWEEP SWEEP ... --out DIR``).

The full-scale study is three sweeps, one config each: a data-scaling curve (``data.train_limit`` as the
axis), the reference study's claims at 1,000 optimizer steps (one-at-a-time), and the full fine-tuning
ceiling. Each keeps its own sweep folder, resumable on its own; this module reads them together and adds
what no single sweep has: every trial in one table (train and dev questions, time, questions/s, memory, the
code that ran it), the data-scaling figure, the best LoRA and full fine-tuning figures beside published
anchors, and, given the report of an earlier study (``--compare``), which verdicts changed.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from ..card import portable_model_name
from ..config import ConfigError
from ..io import write_text_atomic
from ..layout import FIGURES_DIR, REPORT_FILE, RESULTS_FILE
from .cells import mb, md_table, num, paired_diff, secs, settings_text, status_cell
from .figures import draw_figures, plot_curves, save_figure
from .load import SweepData, TrialResult, load_sweep
from .render import check_out_dir, render_report, results_csv, sweep_header
from .verdicts import NA, all_verdicts


@dataclass(frozen=True)
class Anchor:
    """A SQuAD v1.1 dev figure from elsewhere, shown beside loraqa's own and never run here; ``source`` says
    where it comes from, and whether that names its publication."""

    model: str
    method: str
    em: float
    f1: float
    source: str


ANCHORS = (
    Anchor(
        "GPT-2 small (124M)",
        "span-prediction head, fully fine-tuned",
        68.4,
        78.9,
        "not run here: the figure loraqa's full-study plan gives, which names no publication; read it as approximate",
    ),
    Anchor(
        "BERT-base (uncased, 110M)",
        "span-prediction head, fully fine-tuned",
        81.2,
        88.5,
        "published, not run here: Hugging Face transformers' question-answering example (run_qa.py) as its "
        "README reports",
    ),
)

SCALING_KEY = "data.train_limit"


def train_questions(t: TrialResult) -> int | None:
    """The number of train questions a trial trained on: what it encoded (``train_examples``: a limit past
    the data's size trains on the data), else its limit."""
    encoded = t.m("train_examples")
    return encoded if encoded is not None else t.trial.config.data.train_limit


def dev_questions(t: TrialResult) -> int | None:
    return t.m("n_questions")


def _commit(t: TrialResult) -> str:
    code = t.run.get("machine", {}).get("code") or ""
    m = re.search(r"git (\w+)", code)
    return m.group(1) if m else (code or "—")


def _questions_per_second(t: TrialResult) -> float | None:
    qps = t.m("train_questions_per_second")
    if qps is None and t.m("train_examples") and t.m("train_seconds") and t.m("epochs"):
        qps = t.m("train_examples") * t.m("epochs") / t.m("train_seconds")
    return qps


def trials_table(sweeps: list[SweepData]) -> str:
    rows = []
    for data in sweeps:
        for t in data.trials:
            rows.append(
                [
                    data.cfg.name,
                    t.name,
                    status_cell(t),
                    settings_text(t, data.reference),
                    num(train_questions(t)),
                    num(dev_questions(t)),
                    num(t.m("f1")),
                    num(t.m("exact_match")),
                    num(t.m("train_steps")),
                    secs(t.m("train_seconds")),
                    num(_questions_per_second(t), 1),
                    secs(t.m("eval_seconds")),
                    mb(t.m("peak_memory_mb")),
                    _commit(t),
                ]
            )
    header = [
        "sweep",
        "trial",
        "status",
        "settings",
        "train questions",
        "dev questions",
        "F1",
        "EM",
        "steps",
        "train time",
        "train questions/s",
        "eval time",
        "peak memory",
        "commit",
    ]
    return md_table(header, rows, right=set(range(4, 13)))


# ---------------------------------------------------------------------------------------------- data scaling


def scaling_points(sweeps: list[SweepData]) -> list[TrialResult]:
    """Finished trials of every sweep that varies the number of train questions, fewest first."""
    points = [t for d in sweeps if SCALING_KEY in d.axes for t in d.trials if t.done and train_questions(t)]
    return sorted(points, key=train_questions)


def scaling_figure(points: list[TrialResult], path: Path, model: str) -> bool:
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [train_questions(t) for t in points]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label in (("f1", "F1"), ("exact_match", "EM")):
        ax.plot(x, [t.m(key) for t in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{n:,}" for n in x])  # the measured sizes, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("train questions (1 epoch; log scale)")
    ax.set_ylabel("score on SQuAD v1.1 dev (%)")
    devs = sorted({dev_questions(t) for t in points})
    ax.set_title(f"Data scaling: {model}, LoRA ({' / '.join(f'{n:,}' for n in devs)} dev questions)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)
    return True


def _gain(t: TrialResult, previous: TrialResult | None) -> str:
    diff = paired_diff(t, previous) if previous is not None else None
    return "—" if diff is None else diff.text()


def scaling_section(sweeps: list[SweepData], out_dir: Path) -> list[str]:
    points = scaling_points(sweeps)
    if not points:
        have = any(SCALING_KEY in d.axes for d in sweeps)
        why = "no data-scaling trial has finished yet" if have else f"no sweep has a {SCALING_KEY} axis"
        return ["## Data scaling", "", f"Not drawn: {why}."]
    rows = [
        [
            num(train_questions(t)),
            num(t.m("train_steps")),
            num(dev_questions(t)),
            num(t.m("f1")),
            num(t.m("exact_match")),
            _gain(t, prev),
            num(t.m("final_eval_loss"), 3),
            secs(t.m("train_seconds")),
            t.name,
        ]
        for prev, t in zip([None, *points[:-1]], points, strict=True)
    ]
    header = [
        "train questions",
        "steps",
        "dev questions",
        "F1",
        "EM",
        "F1 over the size before",
        "final eval loss",
        "train time",
        "trial",
    ]
    lines = ["## Data scaling", "", md_table(header, rows, right=set(range(8)))]
    lines += [
        "",
        "The gain is paired over the dev questions both sizes answered, ± 2 standard errors of the "
        "per-question difference (the noise rule of the verdicts below).",
    ]
    model = portable_model_name(points[0].trial.config.model.name)
    if scaling_figure(points, out_dir / FIGURES_DIR / "data_scaling.png", model):
        lines += [
            "",
            "**Data scaling: EM and F1 against train questions.**",
            "",
            f"![Data scaling]({FIGURES_DIR}/data_scaling.png)",
        ]
    curves = [(f"{train_questions(t):,} questions", t) for t in points if t.history]
    title = f"Learning curves per data size ({model})"
    keys = [("loss", "train loss"), ("eval_loss", "eval loss (answer tokens)")]
    if curves and plot_curves(out_dir / FIGURES_DIR / "data_scaling_loss.png", title, curves, keys, log_steps=True):
        lines += ["", "**Learning curves per data size.**", "", f"![Learning curves]({FIGURES_DIR}/data_scaling_loss.png)"]
    return lines


# ---------------------------------------------------------------------------------------------- quality


def quality_section(sweeps: list[SweepData]) -> list[str]:
    done = [t for d in sweeps for t in d.trials if t.done and t.m("f1") is not None]
    rows = []
    for method, label in (("lora", "best LoRA"), ("full", "full fine-tuning")):
        pool = [t for t in done if t.trial.config.train.method == method]
        if not pool:
            rows.append([f"loraqa {label}", "—", "—", "—", "not finished yet"])
            continue
        # prefer the trial scored on the most dev questions, then the best F1 among those
        best = max(pool, key=lambda t: (dev_questions(t) or 0, t.m("f1")))
        model = portable_model_name(best.trial.config.model.name)
        rows.append(
            [
                f"{model}, loraqa {label} (`{best.name}`, {num(train_questions(best))} train questions)",
                num(best.m("exact_match")),
                num(best.m("f1")),
                num(dev_questions(best)),
                "measured here, generated answers",
            ]
        )
    for a in ANCHORS:
        rows.append([f"{a.model}, {a.method}", f"{a.em:.1f}", f"{a.f1:.1f}", "10,570", a.source])
    return [
        "## Quality beside figures from elsewhere",
        "",
        "loraqa's models answer by generating text; the rows from elsewhere extract a span with a classification "
        "head, a different and easier output format. They are anchors, not a like-for-like comparison.",
        "",
        md_table(["model", "EM", "F1", "dev questions", "source"], rows, right={1, 2, 3}),
    ]


# ---------------------------------------------------------------------------------------------- changes


VERDICT_LINE = re.compile(r"^- \*\*\((\w)\) “(.+?)”: (.+?)\.\*\* ?(.*)$")
SWEEP_HEADING = re.compile(r"^#+ Sweep report: (.+?)\s*$")


def check_earlier_report(report_md: Path) -> None:
    """A ConfigError naming ``--compare`` where ``report_md`` is not a report.md of ``loraqa report`` with
    verdicts to compare with (missing, a folder, not text, no verdict line); said before any sweep is read."""
    try:
        text = report_md.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text, reason = "", "not UTF-8 text"
    except OSError as e:
        text, reason = "", e.strerror or str(e)
    else:
        reason = "no verdict line in it (- **(a) “…”: …**)"
    if not any(VERDICT_LINE.match(line) for line in text.splitlines()):
        raise ConfigError(
            f"--compare {report_md}: {reason}; give an earlier report.md written by `loraqa report` on a sweep "
            "that varied the reference study's axes"
        )


def earlier_verdicts(report_md: Path, prefer: str | None = None) -> tuple[str | None, dict[str, tuple[str, str, str]]]:
    """(sweep, label -> (claim, verdict, detail)) from an earlier report.md written by ``loraqa report``. A study
    report has a verdict list per sweep: the one of the sweep named ``prefer`` if it is there, else the one that
    measured the most claims (the sweep that varied the reference study's axes)."""
    sections: dict[str | None, dict[str, tuple[str, str, str]]] = {}
    current = None
    for line in report_md.read_text(encoding="utf-8").splitlines():
        heading = SWEEP_HEADING.match(line)
        if heading:
            current = heading.group(1)
        elif m := VERDICT_LINE.match(line):
            sections.setdefault(current, {})[m.group(1)] = (m.group(2), m.group(3), m.group(4))
    if not sections:
        return None, {}
    if prefer in sections:
        return prefer, sections[prefer]
    name = max(sections, key=lambda n: sum(not v[1].startswith(NA) for v in sections[n].values()))
    return name, sections[name]


def _first_sentence(text: str, limit: int = 180) -> str:
    head = text.split(". ")[0].rstrip(".")
    return head if len(head) <= limit else head[: limit - 1] + "…"


def changes_section(claims: SweepData | None, compare: Path | None) -> list[str]:
    if compare is None:
        return []
    if claims is None:
        return [
            f"## Verdicts against the earlier study ({compare.as_posix()})",
            "",
            "Not compared: no sweep here varies the reference study's axes.",
        ]
    sweep, before = earlier_verdicts(compare, prefer=claims.cfg.name)
    title = f"## Verdicts against the earlier study ({compare.as_posix()}{f', sweep {sweep}' if sweep else ''})"
    rows = []
    for v in all_verdicts(claims):
        old = before.get(v.label)
        old_word = old[1] if old else "not judged"
        changed = "—" if NA in (old_word, v.verdict) or old is None else ("yes" if old_word != v.verdict else "no")
        why = (
            f"then: {_first_sentence(old[2])}; now: {_first_sentence(v.detail)}"
            if old
            else f"now: {_first_sentence(v.detail)}"
        )
        rows.append([f"({v.label}) {v.claim}", old_word, v.verdict, changed, why])
    return [title, "", md_table(["claim", "before", "now", "changed", "the numbers behind it"], rows, right=set())]


# ---------------------------------------------------------------------------------------------- the report


def write_study_report(
    sweep_dirs: list[str | Path],
    out_dir: str | Path,
    compare: str | Path | None = None,
    unreadable: list | None = None,
) -> Path:
    """``report.md``, ``results.csv`` and figures for several sweeps at once; returns report.md's path.
    Each sweep's own section is its single-sweep report (tables, figures, verdicts), one level down. Damaged
    files are left out, named in their sweep's section and appended to ``unreadable`` when given."""
    check_out_dir(out_dir)
    if compare:
        check_earlier_report(Path(compare))
    sweeps = [load_sweep(d) for d in sweep_dirs]
    for data in sweeps:
        (unreadable if unreadable is not None else []).extend(data.read_all())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [d.cfg.name for d in sweeps]
    lines = [f"# Study report: {', '.join(names)}", ""]
    for data in sweeps:  # the command that made each sweep (the rest of its header is in its own section)
        lines.append(f"- {data.cfg.name}: {sweep_header(data)[2][2:]}")
    lines += ["", "## Every trial", "", trials_table(sweeps), ""]
    lines += scaling_section(sweeps, out) + [""]
    lines += quality_section(sweeps) + [""]
    claims = next((d for d in sweeps if {"lora.r", "train.lr"} & set(d.axes)), None)
    lines += changes_section(claims, Path(compare) if compare else None) + [""]
    csv_parts = []
    for data in sweeps:
        figure_lines = draw_figures(data, out, file_prefix=f"{data.cfg.name}_")
        section = render_report(data, figure_lines)
        lines += ["#" + ln if ln.startswith("#") else ln for ln in section.splitlines()] + [""]
        csv_parts.append(results_csv(data).splitlines())
    write_text_atomic(out / RESULTS_FILE, _merge_csv(names, csv_parts))
    return write_text_atomic(out / REPORT_FILE, "\n".join(lines).rstrip() + "\n")


def _merge_csv(names: list[str], parts: list[list[str]]) -> str:
    """One CSV for every sweep: a ``sweep`` column first, the union of the sweeps' columns after it."""
    import csv

    columns: list[str] = []
    rows = []
    for name, part in zip(names, parts, strict=True):
        reader = csv.DictReader(part)
        columns += [c for c in reader.fieldnames or [] if c not in columns]
        rows += [{"sweep": name, **r} for r in reader]
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["sweep", *columns], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()

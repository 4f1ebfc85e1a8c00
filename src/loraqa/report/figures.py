"""The report's loss figures (the reference study's Figures 3-5, and one for loss masking) as PNG files; for
trials scored during training (``eval.score_steps``) a panel of their generated answers' F1 beside the losses."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from ..card import portable_model_name
from ..io import write_bytes_atomic
from ..layout import FIGURES_DIR
from ..metrics import F1_KEY
from ..sweep.trials import format_value
from .load import SweepData, TrialResult


def plot_curves(
    path: Path,
    title: str,
    series: list[tuple[str, TrialResult]],
    keys: list[tuple[str, str]],
    log_steps: bool = False,
) -> bool:
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
                ax.plot(
                    steps,
                    [curve[s] for s in steps],
                    marker="o" if len(steps) < 30 else None,
                    markersize=3,
                    label=label,
                )
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
    write_bytes_atomic(path, buf.getvalue())


FIGURES = (
    (
        "Figure 3",
        "lora.r",
        "figure3_rank_eval_loss.png",
        "Eval loss per LoRA rank",
        [("eval_loss", "eval loss")],
    ),
    (
        "Figure 4",
        "lora.targets",
        "figure4_targets_loss.png",
        "Train and eval loss per target preset",
        [("loss", "train loss"), ("eval_loss", "eval loss")],
    ),
    (
        "Figure 5",
        "train.lr",
        "figure5_lr_loss.png",
        "Train and eval loss per learning rate",
        [("loss", "train loss"), ("eval_loss", "eval loss")],
    ),
    # not in the reference study, which argues masking without running it
    (
        "Masking figure",
        "prompt.loss_on",
        "masking_eval_loss.png",
        "Answer-token eval loss with and without loss masking",
        [("eval_loss", "eval loss (answer tokens)")],
    ),
)


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
        path = out_dir / FIGURES_DIR / fname
        if any(t.curve(F1_KEY) for _, t in series):  # scored during training: the F1 beside the loss
            keys = [*keys, (F1_KEY, "F1 of generated answers (dev slice)")]
            title = f"{title}, and F1"
        if series and plot_curves(path, f"{label}: {title} ({portable_model_name(data.cfg.model.name)})", series, keys):
            lines.append(f"**{label}: {title}.**\n\n![{label}: {title}]({FIGURES_DIR}/{fname})\n")
        elif key == "prompt.loss_on":
            lines.append(
                f"- {label} ({title[0].lower() + title[1:]}): not drawn — no finished {key} trial logged "
                "the answer-token eval loss."
            )
        else:
            lines.append(f"- {label} ({title.lower()}): not drawn — no logged losses for the {key} trials.")
    return lines

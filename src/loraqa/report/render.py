"""``report.md`` and ``results.csv`` for one sweep: its header (command, machine, code, dates), a table per swept
axis, the best configurations, the trainable parameters, the figures and the verdicts."""

from __future__ import annotations

import csv
import io
import os
import platform
from datetime import datetime
from pathlib import Path

from ..card import portable_command, portable_model_name, portable_path
from ..config import ConfigError
from ..io import write_text_atomic
from ..layout import REPORT_FILE, RESULTS_FILE, sweep_command
from ..metrics import RUN_FIGURES
from ..runfolder import run_marker
from ..sweep.machine import describe_machine, machine_info
from ..sweep.trials import format_value
from .cells import SE_MULTIPLIER, mb, md_table, num, percent, secs, settings_text, status_cell
from .figures import draw_figures
from .load import SweepData, load_sweep
from .verdicts import LOSS_TOLERANCE, MEMORY_TOLERANCE, NA, all_verdicts, full_finetune_section

AXIS_TITLES = {
    "lora.r": "LoRA rank",
    "lora.targets": "target modules",
    "lora.alpha": "LoRA alpha",
    "lora.dropout": "LoRA dropout",
    "train.lr": "learning rate",
    "prompt.loss_on": "loss masking",
    "train.method": "fine-tuning method",
}


def results_csv(data: SweepData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    axes = list(data.axes)
    w.writerow(
        [
            "trial",
            "status",
            *axes,
            *RUN_FIGURES,
            "trainable_percent",
            "wall_seconds",
            "max_rss_mb",
            "attempts",
            "error",
            "code",
        ]
    )
    for t in data.trials:
        m = t.metrics
        pct = 100.0 * m["trainable_params"] / m["total_params"] if m.get("total_params") else None
        w.writerow(
            [
                t.name,
                t.status,
                *(format_value(t.trial.values[k]) for k in axes),
                *("" if m.get(k) is None else m[k] for k in RUN_FIGURES),
                "" if pct is None else round(pct, 4),
                "" if t.wall_seconds is None else t.wall_seconds,
                "" if t.max_rss_mb is None else t.max_rss_mb,
                len(t.run.get("attempts", [])),
                t.error.get("summary", ""),
                t.run.get("machine", {}).get("code", ""),
            ]
        )
    return buf.getvalue()


def _axis_table(data: SweepData, key: str) -> str:
    rows = []
    for t in data.axis_rows(key):
        value = format_value(t.trial.values[key])
        if t.trial.values == data.reference:
            value += " (reference)"
        rows.append(
            [
                value,
                num(t.m("f1")),
                num(t.m("exact_match")),
                num(t.m("trainable_params")),
                secs(t.m("train_seconds")),
                mb(t.m("peak_memory_mb")),
                f"{t.name} ({status_cell(t)})",
            ]
        )
    title = AXIS_TITLES.get(key, key)
    return f"### {title[0].upper() + title[1:]} (`{key}`)\n\n" + md_table(
        [title, "F1", "EM", "trainable params", "train time", "peak memory", "trial"],
        rows,
        right={1, 2, 3, 4, 5},
    )


def _param_table(data: SweepData) -> str:
    from ..config import PRESET_NAMES, STUDY_PRESETS, STUDY_RANKS

    ranks = sorted(
        set(STUDY_RANKS)
        | {t.trial.values["lora.r"] for t in data.trials if "lora.r" in data.axes}
        | {data.cfg.lora.r}
    )
    presets = list(STUDY_PRESETS)
    for t in data.trials:
        p = t.trial.config.lora.targets
        if isinstance(p, str) and p in PRESET_NAMES and p not in presets:
            presets.append(p)
    model = data.cfg.model.name
    try:  # loraqa.model needs torch, which a machine that only reads results may lack
        from ..model import parameter_table

        table = parameter_table(model, ranks=tuple(ranks), presets=tuple(presets))
    except Exception as e:  # the model's config cannot be read here (offline, missing package, no torch, ...)
        return f"Not computed for {portable_model_name(model)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    measured = {}
    for t in data.trials:
        c = t.trial.config
        if t.done and c.train.method == "lora" and isinstance(c.lora.targets, str):
            measured[(c.lora.targets, c.lora.r)] = t.m("trainable_params")
    rows = [
        [
            r["targets"],
            str(r["r"]),
            num(r["trainable"]),
            f"{r['percent']:.3f}%",
            num(measured.get((r["targets"], r["r"]))),
        ]
        for r in table
    ]
    base_total = table[0]["base_total"] if table else None
    for t in data.trials:
        if t.done and t.trial.config.train.method == "full":
            rows.append(
                [
                    "full fine-tuning",
                    "—",
                    num(t.m("trainable_params")),
                    percent(t.m("trainable_params"), t.m("total_params")),
                    num(t.m("trainable_params")),
                ]
            )
            break
    return (
        f'{portable_model_name(model)}: {num(base_total)} base parameters. "% of all" is trainable / (base + LoRA); '
        '"measured" is the count a finished trial reported.\n\n'
        + md_table(["targets", "rank", "trainable", "% of all", "measured"], rows, right={1, 2, 3, 4})
    )


def sweep_header(data: SweepData) -> list[str]:
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
        "- Code: "
        + ("; ".join(codes) if codes else "not recorded")
        + (" (trials ran on different versions)" if len(codes) > 1 else ""),
        f"- Date: trials ran {min(starts) if starts else '—'} to {max(ends) if ends else '—'}; "
        f"report written {datetime.now().astimezone().isoformat(timespec='seconds')} on {here['host']} "
        f"({platform.platform()})",
        f"- Sweep: {cfg.sweep.mode} over {axes_text}; "
        f"model `{portable_model_name(cfg.model.name)}`; {len(data.trials)} trials",
        "- Trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
    ]
    return lines


def _trials_section(data: SweepData) -> list[str]:
    """Every trial with its status and settings; then the unfinished ones, damaged files and stray folders."""
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
        rows.append(
            [
                t.name,
                status_cell(t),
                settings_text(t, data.reference),
                num(t.m("f1")),
                num(t.m("exact_match")),
                num(t.m("final_train_loss"), 3),
                num(t.m("final_eval_loss"), 3),
                secs(t.wall_seconds),
                note,
            ]
        )
    out = ["", "## Trials", "",
            md_table(["trial", "status", "settings", "F1", "EM", "final train loss", "final eval loss", "wall time",
                      "note"], rows, right={3, 4, 5, 6, 7})]  # fmt: skip
    missing = [t for t in data.trials if not t.done]
    if missing:
        out += [
            "",
            "Not finished (left out of every comparison below): "
            + ", ".join(f"`{t.name}` ({status_cell(t)})" for t in missing)
            + ".",
        ]
    if data.unreadable:
        out += [
            "",
            f"Unreadable files (damaged; what they held is left out): {len(data.unreadable)}: "
            + "; ".join(f"`{p}`" for p in data.unreadable)
            + ".",
        ]
    if data.strays:
        out += [
            "",
            "Trial folders the config no longer makes (ignored): "
            + ", ".join(f"`{s}`" for s in data.strays)
            + ".",
        ]
    return out


def _claims_section(data: SweepData) -> list[str]:
    """The rule, each claim's verdict, and the full fine-tuning ablation."""
    verdicts = all_verdicts(data)
    ft_word, ft_text = full_finetune_section(data)
    out = [
        "",
        "## The reference study's claims, measured",
        "",
        f"Rule: an EM or F1 difference counts only if it is more than {SE_MULTIPLIER:g} standard errors of the "
        "per-question difference, paired over the same dev questions (about 95% confidence; shown as "
        f"“difference ± {SE_MULTIPLIER:g}·SE”); a loss difference only if it is more than {LOSS_TOLERANCE:.0%} "
        f"and a memory difference only if it is more than {MEMORY_TOLERANCE:.0%}. A difference within that noise "
        "is not called “holds”. Only finished trials that differ in the claim's axis alone are compared; "
        "“not measurable here” means those trials are missing.",
        "",
    ]
    out += [v.line() for v in verdicts]
    out += [
        "",
        "### Full fine-tuning ablation (`train.method=full` vs LoRA)",
        "",
        ft_text if ft_word != NA else f"**{NA}.** {ft_text}",
    ]
    return out


def render_report(data: SweepData, figure_lines: list[str]) -> str:
    ref_trial = data.reference_trial
    out = sweep_header(data)
    out += [
        "",
        "Reference point of the comparisons: "
        + ", ".join(f"{k}={format_value(v)}" for k, v in data.reference.items())
        + (f" (trial `{ref_trial.name}`)" if ref_trial else " (no such trial)")
        + ".",
    ]

    out += _trials_section(data)
    out += [
        "",
        "## One table per swept axis",
        "",
        "Trials that differ from the reference point only in that axis. Train time is the Trainer's; peak memory "
        "is the peak allocated GPU memory on a GPU, the trial process's peak RSS on a CPU.",
    ]
    for key in data.axes:
        out += ["", _axis_table(data, key)]

    done = sorted((t for t in data.trials if t.done), key=lambda t: -(t.m("f1") or 0))
    best = [
        [
            str(i + 1),
            t.name,
            settings_text(t, data.reference),
            num(t.m("f1")),
            num(t.m("exact_match")),
            num(t.m("trainable_params")),
            secs(t.m("train_seconds")),
            mb(t.m("peak_memory_mb")),
        ]
        for i, t in enumerate(done[:5])
    ]
    out += ["", "## Table 6: best configurations by F1", "",
            md_table(["#", "trial", "settings", "F1", "EM", "trainable params", "train time", "peak memory"], best,
                     right={0, 3, 4, 5, 6, 7}) if best else "No finished trials."]  # fmt: skip
    out += ["", "## Table 7: trainable parameters", "", _param_table(data)]
    out += ["", "## Figures", "", *figure_lines]

    out += _claims_section(data)
    return "\n".join(out) + "\n"


def check_out_dir(out_dir: str | os.PathLike | None) -> None:
    """Refuse a run folder (``loraqa train -o``, or a sweep's trial) as a report's --out: the report's files
    would be written among the run's."""
    if out_dir is None:
        return
    if found := run_marker(out_dir):
        raise ConfigError(
            f"{out_dir}: holds a run ({found}), not a report; pick another --out (a new folder, or leave "
            "--out out to write into the sweep folder)"
        )


def write_report(
    sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, unreadable: list | None = None
) -> Path:
    """Write ``report.md``, ``results.csv`` and ``figures/*.png`` for a sweep folder; returns report.md's path.
    Damaged files (metrics, logs, predictions that do not parse) are left out, named in the report and appended
    to ``unreadable`` when given. A run folder is refused as ``out_dir``."""
    check_out_dir(out_dir)
    data = load_sweep(sweep_dir)
    (unreadable if unreadable is not None else []).extend(data.read_all())
    out = Path(out_dir) if out_dir else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure_lines = draw_figures(data, out)
    write_text_atomic(out / RESULTS_FILE, results_csv(data))
    return write_text_atomic(out / REPORT_FILE, render_report(data, figure_lines))

"""The report of a search (``sweep.mode: search``): ``report.md`` with the trials table, the best-so-far curve
against optimizer steps spent, every trial's in-training curve, Optuna's parameter importances, and the best
trial's config as a ready-to-run ``best.yaml``; all read back from the sweep folder (the study in
``search.db``, each trial's ``log_history.jsonl`` and ``metrics.json``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

from ..config import ExperimentConfig, apply_overrides, from_dict, search_trials
from ..io import write_text_atomic
from ..layout import (
    FIGURES_DIR,
    METRICS_FILE,
    REPORT_FILE,
    SEARCH_BEST_FILE,
    SEARCH_STUDY_FILE,
    SWEEP_CONFIG_FILE,
    search_storage,
    search_trial_name,
)
from ..metrics import F1_KEY, scorings
from ..runfolder import RunFolder
from ..sweep.trials import base_config, format_value
from .cells import num, paired_diff
from .figures import save_figure
from .load import load_sweep, read_or
from .render import check_out_dir


def is_search(sweep_dir: Path) -> bool:
    return (Path(sweep_dir) / SEARCH_STUDY_FILE).is_file()


def _metrics(run: RunFolder, unreadable: list) -> dict:
    metrics = read_or(partial(run.read_json, METRICS_FILE, default={}), run.path / METRICS_FILE, {}, unreadable)
    return metrics if isinstance(metrics, dict) else {}


def _rows(study, cfg: ExperimentConfig, sweep_dir: Path, unreadable: list) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        run = RunFolder(sweep_dir / search_trial_name(t.number))
        history = read_or(run.history, run.log_file, [], unreadable)
        metrics = _metrics(run, unreadable)
        curve = scorings(history, cfg.sweep.metric)
        f1 = scorings(history, F1_KEY)
        steps = max([h.get("step", 0) for h in history], default=0)
        rows.append({"number": t.number, "state": t.state.name.lower(), "params": t.params, "value": t.value,
                     "curve": curve, "best_f1": max((v for _, v in f1), default=None),
                     "final_f1": metrics.get("f1"), "final_em": metrics.get("exact_match"), "steps": steps})  # fmt: skip
    return rows


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}" if isinstance(v, float) else format_value(v)


def _param(v) -> str:
    """A searched value: a sampled float (a learning rate) as 1.83e-04, so one column reads in one form."""
    return f"{v:.2e}" if isinstance(v, float) and v != int(v) else format_value(v)


def _table(rows: list[dict], keys: list[str], metric: str) -> list[str]:
    head = ["trial", *keys, "state", "steps", f"value ({metric})", "best in-training F1", "final EM", "final F1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [search_trial_name(r["number"]), *(_param(r["params"].get(k)) for k in keys), r["state"], str(r["steps"]),
                 _fmt(r["value"]), _fmt(r["best_f1"]), _fmt(r["final_em"]), _fmt(r["final_f1"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _best_so_far(rows: list[dict], maximize: bool) -> list[tuple[int, float]]:
    """(optimizer steps spent so far, best value so far) after each trial, in trial order."""
    spent, best, out = 0, None, []
    for r in rows:
        spent += r["steps"]
        value = r["value"] if r["state"] == "complete" else None  # a pruned trial's value is a score mid-run
        if value is not None and (best is None or (value > best if maximize else value < best)):
            best = value
        if best is not None:
            out.append((spent, best))
    return out


def _figures(rows: list[dict], cfg: ExperimentConfig, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    metric, names = cfg.sweep.metric, []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        if r["curve"]:
            ax.plot(*zip(*r["curve"], strict=True), marker="." if r["state"] == "pruned" else None,
                    linestyle="--" if r["state"] == "pruned" else "-", label=search_trial_name(r["number"]))  # fmt: skip
    ax.set(xlabel="optimizer step", ylabel=metric, title=f"every trial's {metric} (dashed: pruned)")
    if len(rows) <= 12 and ax.get_legend_handles_labels()[0]:  # a legend of no curve warns
        ax.legend(fontsize=7)
    save_figure(fig, out / FIGURES_DIR / "search-curves.png")
    names.append("search-curves.png")
    best = _best_so_far(rows, cfg.sweep.direction == "maximize")
    if best:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.step(*zip(*best, strict=True), where="post")
        ax.set(xlabel="optimizer steps spent (all trials)", ylabel=f"best {metric} so far", title="best so far")
        save_figure(fig, out / FIGURES_DIR / "search-best-so-far.png")
        names.append("search-best-so-far.png")
    plt.close("all")
    return names


IMPORTANCE = "PED-ANOVA"  # the evaluator the report names: Optuna's PedAnovaImportanceEvaluator


def _importances(study) -> dict[str, float]:
    """Parameter importances over the finished trials, by PED-ANOVA, named explicitly: Optuna's default has
    changed across versions, and its fANOVA needs scikit-learn. Empty below 2 finished trials, where every
    parameter would read as equally important."""
    import warnings

    import optuna

    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(finished) < 2:
        return {}
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    try:
        with warnings.catch_warnings():  # its warnings on small studies name venv paths; the count is stated
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError):  # a single value everywhere
        return {}


@dataclass
class _Answers:
    """A run's per-question records, as :func:`~loraqa.report.cells.paired_diff` reads them."""

    per_question: dict[str, dict]


def _steps_saved(rows: list[dict]) -> list[str]:
    """Optimizer steps the ended trials spent against all of them run to the end (the longest trial's steps
    each: every finished trial of a search runs its planned steps unless it stops early)."""
    ended = [r for r in rows if r["state"] in ("complete", "pruned")]
    planned = max((r["steps"] for r in ended if r["state"] == "complete"), default=0)
    if not planned:
        return []
    spent, full = sum(r["steps"] for r in ended), planned * len(ended)
    return [f"Pruning saved {full - spent:,} optimizer steps ({(full - spent) / full:.0%}): the {len(ended)} ended "
            f"trials spent {spent:,}, against {full:,} run to the end ({planned} steps each).", ""]  # fmt: skip


def _finished_runs(folder: Path, unreadable: list) -> list[tuple[str, str, dict, object]]:
    """Each finished run of a sweep or a search folder: (name, setting, final metrics, per-question records for
    :func:`~loraqa.report.cells.paired_diff`); a search's finished runs are its complete trials. Damaged files
    are left out and named in ``unreadable``."""
    if not is_search(folder):
        data = load_sweep(folder)
        done = [t for t in data.trials if t.done]
        unreadable += data.read_all()
        return [(t.name, ", ".join(f"{k} {format_value(v)}" for k, v in t.trial.values.items()), t.metrics, t)
                for t in done]  # fmt: skip
    import optuna

    study, _ = _load_search(folder)
    runs = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        run = RunFolder(folder / search_trial_name(t.number))
        metrics = _metrics(run, unreadable)
        records = _Answers({q["id"]: q for q in read_or(run.predictions, run.predictions_file, [], unreadable)})
        setting = ", ".join(f"{k} {_param(v)}" for k, v in t.params.items())
        runs.append((run.path.name, setting, {k: metrics.get(k) for k in ("exact_match", "f1")}, records))
    return runs


def _held_out(best: dict, sweep_dir: Path, against: list[Path], unreadable: list) -> list[str]:
    """The best trial against every finished run of the ``against`` folders (sweeps, or other searches' complete
    trials), paired on the final evaluation's questions both answered (held out from every decision of the
    search when ``data.eval_skip`` puts them past the scoring slice); a difference is beyond noise past 2
    standard errors."""
    name = search_trial_name(best["number"])
    run = RunFolder(sweep_dir / name)
    mine = _Answers({r["id"]: r for r in read_or(run.predictions, run.predictions_file, [], unreadable)})
    lines = [f"Held-out comparison: {name} (the best) minus each run, paired on the questions both answered:", "",
             "| run | setting | final EM | final F1 | F1: best − run | EM: best − run |", "|---|---|---|---|---|---|"]  # fmt: skip
    for folder in against:
        for run, setting, metrics, records in _finished_runs(folder, unreadable):
            if folder.resolve() == sweep_dir.resolve() and run == name:
                continue  # the best against itself
            f1, em = paired_diff(mine, records, "f1"), paired_diff(mine, records, "exact_match")
            lines.append(f"| {folder.name}/{run} | {setting} | {num(metrics.get('exact_match'))} | "
                         f"{num(metrics.get('f1'))} | {f1.text() if f1 else '—'} | {em.text() if em else '—'} |")  # fmt: skip
    return [*lines, ""]


def _load_search(sweep_dir: Path):
    """The search's config (its sweep.yaml) and its Optuna study."""
    import optuna

    path = sweep_dir / SWEEP_CONFIG_FILE
    cfg = from_dict(yaml.safe_load(path.read_text()), where=str(path))
    return optuna.load_study(study_name=cfg.name, storage=search_storage(sweep_dir)), cfg


def write_search_report(sweep_dir, out_dir=None, against=(), unreadable: list | None = None) -> Path:
    """Write report.md, figures and best.yaml for the search in ``sweep_dir``; returns report.md's path.
    ``against``: sweep or search folders (such as baselines on the same data, or an earlier search) whose
    finished trials the best trial is compared with, question by question. Damaged files are left out, named
    in the report and added to ``unreadable`` when given."""
    unreadable = [] if unreadable is None else unreadable
    check_out_dir(out_dir)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    study, cfg = _load_search(sweep_dir)
    rows = _rows(study, cfg, sweep_dir, unreadable)
    keys = list(cfg.sweep.space)
    maximize = cfg.sweep.direction == "maximize"
    figures = _figures(rows, cfg, out)
    pruned = [r for r in rows if r["state"] == "pruned"]
    lines = [f"# Search {cfg.name}", "",
             f"{len(rows)} of {search_trials(cfg.sweep)} trials: {sum(r['state'] == 'complete' for r in rows)} finished, "
             f"{len(pruned)} pruned, {sum(r['state'] == 'fail' for r in rows)} failed, "
             f"{sum(r['state'] == 'running' for r in rows)} unfinished. Sampler {cfg.sweep.sampler}, pruner "
             f"{cfg.sweep.pruner}, {cfg.sweep.direction} `{cfg.sweep.metric}` (in-training scores on the first "
             f"{cfg.data.score_limit} dev questions); optimizer steps spent: {sum(r['steps'] for r in rows)}.",
             "", *_table(rows, keys, cfg.sweep.metric), ""]  # fmt: skip
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if done:
        best = (max if maximize else min)(done, key=lambda r: r["value"])
        best_cfg = apply_overrides(base_config(cfg), list(best["params"].items()), where="the best trial")
        write_text_atomic(out / SEARCH_BEST_FILE, f"# the best trial of {cfg.name}: {search_trial_name(best['number'])} "
                          f"({cfg.sweep.metric} {best['value']:.4g})\n" + best_cfg.to_yaml())  # fmt: skip
        lines += [f"Best: {search_trial_name(best['number'])} ({cfg.sweep.metric} {best['value']:.4g}): "
                  + ", ".join(f"{k} = {_param(v)}" for k, v in best["params"].items())
                  + f". Its config: [{SEARCH_BEST_FILE}]({SEARCH_BEST_FILE}) (`loraqa train {SEARCH_BEST_FILE}`).", ""]  # fmt: skip
        if against:
            lines += _held_out(best, sweep_dir, [Path(a) for a in against], unreadable)
    lines += _steps_saved(rows)
    imp = _importances(study)
    if imp:
        lines += [f"Parameter importances (Optuna's {IMPORTANCE} evaluator over the finished trials):", "",
                  "| parameter | importance |", "|---|---|",
                  *(f"| {k} | {v:.3f} |" for k, v in imp.items()), ""]  # fmt: skip
    if unreadable:
        lines += [f"Unreadable files (damaged; what they held is left out): {len(unreadable)}: "
                  + "; ".join(f"`{p}`" for p in unreadable), ""]  # fmt: skip
    lines += [f"![{name}]({FIGURES_DIR}/{name})" for name in figures]
    path = out / REPORT_FILE
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path

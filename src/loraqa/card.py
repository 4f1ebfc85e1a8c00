"""The run folder's model card (README.md): what was trained on what, how, and how well.

PEFT's ``save_pretrained`` writes an empty template card; a run folder gets this one instead, written after
evaluation so it holds the scores. Nothing in it names a path of the machine that made the run.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path

from .config import ExperimentConfig, resolve_targets
from .layout import CONFIG_FILE
from .metrics import V2_PARTS, v2_keys
from .prompt import format_example


def portable_arg(arg: str) -> str:
    """A command-line argument with an absolute path made relative to the working folder, or shortened to
    ``…/NAME`` when outside it, so the card never names this machine's folders: a path on its own, or the value
    of ``--flag=PATH`` or ``key=PATH`` (``--model=/x.gguf``, ``model.name=/x``, ``data.dev_file=/x``)."""
    prefix, value = "", arg
    if not os.path.isabs(arg) and "=" in arg:
        name, _, value = arg.partition("=")
        prefix = name + "="
    if not os.path.isabs(value):
        return arg
    try:
        rel = os.path.relpath(value)
    except ValueError:  # another drive (Windows)
        rel = os.pardir
    return prefix + (rel if not rel.startswith(os.pardir) else f"…/{Path(value).name}")


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as typed when relative; an absolute path relative to the working folder, or ``…/NAME`` when
    outside it."""
    return portable_arg(str(path))


def portable_command(command: str) -> str:
    """A recorded command line with every absolute path argument made portable (see :func:`portable_arg`)."""
    try:
        args = shlex.split(command)
    except ValueError:  # unbalanced quotes: leave it as recorded
        return command
    # quoted like shlex.join, except that the ellipsis of a shortened path needs no quotes
    out = [portable_arg(a) for a in args]
    return " ".join(
        a if shlex.quote(a.replace("…", "x")) == a.replace("…", "x") else shlex.quote(a) for a in out
    )


def portable_model_name(name: str) -> str:
    """The base model as another machine can name it: a hub id or built-in name as is, a local folder or
    ``.gguf`` file by its file name (never a path of the machine that trained it)."""
    return Path(name).name if Path(name).expanduser().is_absolute() or Path(name).exists() else name


def current_command(argv: list[str] | None = None) -> str:
    """The command line that is running, as a user would type it (``loraqa train ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    prog = Path(argv[0]).name
    if prog in ("__main__.py", "cli.py"):
        prog = "loraqa"
    return shlex.join([prog, *(portable_arg(a) for a in argv[1:])])


def _lora_lines(cfg: ExperimentConfig, model_type: str | None) -> list[str]:
    if cfg.train.method == "full":
        return ["- method: full fine-tuning (every weight trained; no adapter)"]
    targets = cfg.lora.targets
    if model_type is not None:
        with contextlib.suppress(ValueError):
            targets = resolve_targets(targets, model_type)
    targets_text = ", ".join(targets) if isinstance(targets, list) else targets
    return [
        f"- rank r = {cfg.lora.r}, alpha = {cfg.lora.alpha:g}, dropout = {cfg.lora.dropout:g}",
        f"- target modules: {targets_text} (preset or list `{cfg.lora.targets}`)",
    ]


def model_card(
    cfg: ExperimentConfig,
    metrics: dict,
    *,
    data: dict,
    command: str,
    model_type: str | None = None,
) -> str:
    """The card's Markdown. ``data`` describes the data: ``format``, ``train`` / ``dev`` (file or data set
    names), ``train_questions`` (loaded for training), ``dev_questions`` (scored)."""
    base = portable_model_name(cfg.model.name)
    parts = (
        _title_lines(cfg, base),
        _base_and_data_lines(cfg, metrics, data, base),
        _prompt_lines(cfg),
        _training_lines(cfg, model_type, metrics),
        _results_lines(metrics),
        _usage_lines(command),
    )
    return "\n".join(line for part in parts for line in part)


def _title_lines(cfg: ExperimentConfig, base: str) -> list[str]:
    from . import __version__

    library = "peft" if cfg.train.method == "lora" else "transformers"
    return [
        "---",
        f"library_name: {library}",
        "tags: [loraqa, lora, extractive-qa]",
        "---",
        "",
        f"# {cfg.name}: {base} fine-tuned for extractive QA",
        "",
        f"Made with loraqa {__version__}.",
        "",
    ]


def _base_and_data_lines(cfg: ExperimentConfig, metrics: dict, data: dict, base: str) -> list[str]:
    return [
        "## Base model",
        "",
        f"`{base}` ({cfg.model.precision} precision requested, {metrics.get('precision', '?')} used)",
        "",
        "## Data",
        "",
        f"- format: `{data.get('format', 'squad')}`",
        f"- trained on {data.get('train_questions', '?')} questions from `{data.get('train', '?')}` "
        f"({metrics.get('train_examples', '?')} training examples after encoding)",
        f"- scored on {metrics.get('n_questions', '?')} questions from `{data.get('dev', '?')}`",
        "",
    ]


def _prompt_lines(cfg: ExperimentConfig) -> list[str]:
    loss = "the answer tokens and EOS only." if cfg.prompt.loss_on == "answer" else "every token."
    return [
        "## Prompt",
        "",
        "```",
        format_example("{context}", "{question}", "{answer}") + "<eos>",
        "```",
        "",
        f"At most {cfg.prompt.max_length} tokens; the loss is on {loss}"
        " Answers are generated greedily and end at the first newline or EOS.",
        "",
    ]


def _training_lines(cfg: ExperimentConfig, model_type: str | None, metrics: dict) -> list[str]:
    """What the run did (its metrics: steps run, an early stop, the step whose adapter it kept), then how."""
    t = cfg.train
    asked = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"
    ran = asked
    if metrics.get("train_steps") is not None:
        ran = f"{metrics['train_steps']} steps ({metrics.get('epochs', 0):g} epochs) of {asked} asked"
    stops = []
    if metrics.get("stopped_early_at"):
        stops.append(f"stopped early at step {metrics['stopped_early_at']} (F1 no better in "
                     f"{t.early_stopping_patience} scorings)")  # fmt: skip
    if metrics.get("kept_step") is not None:
        stops.append(f"the adapter is step {metrics['kept_step']}'s, the best scoring (train.keep_best)")
    return [
        "## Training",
        "",
        *_lora_lines(cfg, model_type),
        f"- {ran}, batch size {t.batch_size} x {t.grad_accum} accumulation, lr {t.lr:g}, "
        f"weight decay {t.weight_decay:g}, {t.warmup_steps} warmup steps, seed {t.seed}",
        *(f"- {s}" for s in stops),
        "",
    ]


def _results_lines(metrics: dict) -> list[str]:
    lines = ["## Results", "", "| metric | value |", "|---|---|", *_score_lines(metrics)]
    for part in V2_PARTS:
        exact, f1, total = v2_keys(part)
        if total in metrics:
            lines.append(
                f"| {part} exact / F1 (questions) | {metrics[exact]:.2f} / {metrics[f1]:.2f} ({metrics[total]}) |"
            )
    return [*lines, ""]


def _usage_lines(command: str) -> list[str]:
    return [
        "## How it was made",
        "",
        "```bash",
        command or "(through the Python API: loraqa.pipeline.run_experiment)",
        "```",
        "",
        f"The resolved experiment is `{CONFIG_FILE}` beside this card; "
        f"`loraqa train {CONFIG_FILE} --output-dir DIR` remakes the run.",
        "",
        "## Use",
        "",
        "```bash",
        "loraqa ask RUN_DIR --question '...' --context @paragraph.txt",
        "loraqa predict RUN_DIR --input questions.jsonl --output answers.jsonl",
        "loraqa export RUN_DIR --out merged/   # a plain transformers model folder, the adapter merged in",
        "```",
        "",
    ]


def _score_lines(metrics: dict) -> list[str]:
    if metrics.get("pruned"):  # a search stopped it: no final evaluation
        return [
            f"| pruned at step | {metrics['pruned_at']} (best in-training F1 {metrics.get('best_eval_f1', 0):.2f}) |"
        ]
    return [
        f"| exact match | {metrics['exact_match']:.2f} |",
        f"| F1 | {metrics['f1']:.2f} |",
        f"| questions scored | {metrics['n_questions']} |",
    ]

"""The ``loraqa`` command: a thin layer over the library's functions.

loraqa train [CONFIG.yaml] [section.key=value ...] [--model M --train-limit N ...]
loraqa eval RUN_DIR | loraqa eval --model M
loraqa params --model M
loraqa data stats [--data-dir DIR]
loraqa sweep CONFIG.yaml --output-dir DIR [--shard i/n] [--parallel k]
loraqa report DIR
loraqa predict RUN_DIR --input FILE --output FILE | loraqa ask RUN_DIR --question TEXT --context TEXT|@FILE
loraqa export RUN_DIR --out DIR
loraqa serve RUN_DIR | loraqa serve --model M   [--host H --port P]
loraqa sync SRC DST | loraqa config schema

The shorthand flags of train, eval and sweep (``--lr``, ``--rank``, ...) are the config fields that declare a
``config.Flag``; their help is the field's description.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import types
import typing
import warnings
from pathlib import Path


def _add_experiment_flags(p: argparse.ArgumentParser) -> None:
    """CONFIG|KEY=VALUE items and the shorthand flags of the config fields that declare one (``config.Flag``),
    each with the field's description as its help."""
    from .config import shorthands

    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG|KEY=VALUE",
        help="an experiment YAML file and/or dotted overrides such as train.lr=5e-4",
    )
    g = p.add_argument_group("shorthands for config keys")
    for key, flags, info in shorthands():
        help_text = f"{info.description} ({key})".replace("%", "%%")
        metavar = flags[0].lstrip("-").replace("-", "_").upper()
        g.add_argument(*flags, dest=key, help=help_text, **_flag_options(info, metavar))


def _flag_options(info, metavar: str) -> dict:
    """argparse's type or choices for a config field's flag: a number, a string, one of the choices, or
    (``lora.targets``) a preset or comma-separated names."""
    from .config import value_type

    tp = value_type(info)
    options = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return {"choices": options}
    if tp in (int, float, str):
        if type(None) in typing.get_args(info.annotation):  # --train-limit null: all, as in a config file
            return {"type": lambda text: NULL if text == "null" else tp(text), "metavar": metavar}
        return {"type": tp, "metavar": metavar}
    literals = [a for a in options if typing.get_origin(a) is typing.Literal]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(literals) == 1:
        presets = typing.get_args(literals[0])
        return {"type": lambda text: _preset_or_names(text, presets), "metavar": metavar}
    raise TypeError(f"no command-line flag for a field of type {tp}")


def _preset_or_names(text: str, presets: tuple[str, ...]) -> str | list[str]:
    """``attn`` stays a preset; ``c_attn, c_fc`` is a list of names."""
    return text if text in presets else [v.strip() for v in text.split(",") if v.strip()]


NULL = object()  # a shorthand flag given as null (argparse's None means not given)


def _shorthand_overrides(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(config key, value) for each shorthand flag given."""
    from .config import shorthands

    given = [(key, getattr(args, key)) for key, _, _ in shorthands() if getattr(args, key, None) is not None]
    return [(key, None if value is NULL else value) for key, value in given]


DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda if there is a GPU)"
# a single training process runs on the first visible GPU (the Trainer's rule); torchrun gives each its own
TRAIN_DEVICE_HELP = "cpu or cuda (default: cuda if there is a GPU; CUDA_VISIBLE_DEVICES=N picks the GPU)"

# what re-scoring a trained run may change: how it answers and on what, never what was trained
RUN_EVAL_KEYS = ("eval.", "data.", "prompt.max_length", "model.precision", "model.attn_implementation")


def run_eval_overrides(args: argparse.Namespace) -> list[tuple[str, object]]:
    """The overrides ``loraqa eval RUN_DIR`` applies to the run's config: KEY=VALUE items and shorthand flags,
    each one that re-scoring may change (a ConfigError names any other)."""
    from .config import ConfigError, parse_overrides

    files = [i for i in args.items if "=" not in i]
    if files:
        raise ConfigError(
            f"{files[0]}: `loraqa eval RUN_DIR` takes the run's own config; give changes as KEY=VALUE"
        )
    overrides = parse_overrides(args.items) + _shorthand_overrides(args)
    for key, _ in overrides:
        if not key.startswith(RUN_EVAL_KEYS):
            raise ConfigError(
                f"{key}: a trained run's {key} cannot change when it is re-scored (`loraqa eval "
                f"RUN_DIR` takes {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RUN_EVAL_KEYS)})"
            )
    return overrides


def build_config(args: argparse.Namespace, allow_sweep: bool = False):
    """The experiment from CONFIG (if given), then KEY=VALUE overrides, then shorthand flags."""
    from .config import ConfigError, ExperimentConfig, apply_overrides, load_config, parse_overrides

    files = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if len(files) > 1:
        raise ConfigError(f"one config file at most, got {', '.join(files)}")
    cfg = (
        load_config(files[0], overrides)
        if files
        else apply_overrides(ExperimentConfig(), parse_overrides(overrides))
    )
    flags = _shorthand_overrides(args)
    cfg = apply_overrides(cfg, flags, where="command line") if flags else cfg
    if cfg.sweep is not None and not allow_sweep:
        raise ConfigError(
            f"{files[0]}: has a sweep section; run it with `loraqa sweep {files[0]} --output-dir DIR`"
        )
    return cfg


def _print_metrics(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "exact_match",
        "f1",
        "n_questions",
        "train_seconds",
        "train_tokens_per_second",
        "eval_seconds",
        "eval_questions_per_second",
        "trainable_params",
        "total_params",
        "peak_memory_mb",
        "final_train_loss",
        "final_eval_loss",
    ):
        if metrics.get(key) is not None:
            v = metrics[key]
            table.add_row(key, f"{v:,.2f}" if isinstance(v, float) else f"{v:,}")
    Console().print(table)


def cmd_train(args) -> int:
    from . import dist, signals
    from .card import current_command
    from .pipeline import run_experiment
    from .sweep.reporter import TrialReporter

    signals.watch_parent()  # a sweep's trial stops (resumably) when its sweep dies
    cfg = build_config(args)
    out = Path(args.output_dir or os.path.join("runs", cfg.name))
    command = current_command(["loraqa", *args.argv])
    # a search's trial reports its scores to the study
    reporter = TrialReporter.from_env(cfg.eval.score_steps)
    on_score = reporter.on_score if reporter else None
    with dist.session():
        metrics = run_experiment(
            cfg, out, overwrite=args.overwrite, device=args.device, command=command, on_score=on_score
        )
    if not dist.is_main_process():  # under torchrun: one table, from the process that wrote the folder
        return 0
    if metrics.get("pruned"):
        print(f"pruned at step {metrics['pruned_at']} by the search ({out})")
        return 0
    _print_metrics(metrics, f"{cfg.model.name} + {cfg.train.method} -> {out}")
    print(
        f"EM {metrics['exact_match']:.2f}  F1 {metrics['f1']:.2f}  on {metrics['n_questions']} dev questions  ({out})"
    )
    return 0


def split_run_dir(first: str | None, items: list[str]) -> tuple[str | None, list[str]]:
    """(RUN_DIR, the other positionals) of ``loraqa eval``. argparse gives the first positional to RUN_DIR,
    though it may be a config file or a KEY=VALUE item: RUN_DIR is the first positional that is a folder
    (``lr=5e-4`` may name one), and with none, the first unless it is an item or a file."""
    positionals = ([first] if first else []) + items
    folders = [p for p in positionals if Path(p).is_dir()]
    if folders:
        run_dir = folders[0]
    elif first and "=" not in first and not Path(first).is_file():
        run_dir = first  # not there: loading it says so
    else:
        run_dir = None
    return run_dir, [p for p in positionals if p != run_dir]


def cmd_eval(args) -> int:
    from . import dist
    from .answering import eval_run_dir, eval_zero_shot

    args.run_dir, args.items = split_run_dir(args.run_dir, args.items)
    overrides = run_eval_overrides(args) if args.run_dir else None  # bad ones stop here, before any loading
    # under torchrun each process answers its share of the questions; the main process writes
    device = str(dist.init(args.device)) if dist.world_size() > 1 else args.device
    with dist.session():
        if args.run_dir:
            metrics = eval_run_dir(args.run_dir, overrides=overrides, out_dir=args.output_dir, device=device)
            where = args.output_dir or args.run_dir
        else:
            cfg = build_config(args)
            out = Path(args.output_dir or os.path.join("runs", f"zero-shot-{Path(cfg.model.name).name}"))
            metrics = eval_zero_shot(cfg, out, device=device)
            where = str(out)
    if not dist.is_main_process():
        return 0
    _print_metrics(metrics, f"evaluation -> {where}")
    print(
        f"EM {metrics['exact_match']:.2f}  F1 {metrics['f1']:.2f}  on {metrics['n_questions']} dev questions  ({where})"
    )
    return 0


def _answerer(args, device: str | None = None):
    from .answering import load_answerer

    # `is not None`: --batch-size 0 is checked (and refused) as the config checks every batch size
    overrides = (
        [("eval.batch_size", args.batch_size)] if getattr(args, "batch_size", None) is not None else []
    )
    return load_answerer(args.run_dir, model=args.model, device=device or args.device, overrides=overrides)


def cmd_predict(args) -> int:
    from . import dist
    from .metrics import V2_PARTS, v2_keys
    from .predict import check_output, predict_file, read_questions
    from .runfolder import check_run_config

    # every check before the model loads: where the answers go, the run folder, then the questions themselves
    check_output(args.input, args.output, run_dir=args.run_dir)
    if args.run_dir:
        check_run_config(args.run_dir)
    questions = read_questions(args.input, args.format)
    # under torchrun each process answers its share of the questions; the main process writes
    device = str(dist.init(args.device)) if dist.world_size() > 1 else args.device
    with dist.session():
        summary = predict_file(_answerer(args, device), args.input, args.output, questions=questions)
    if not dist.is_main_process():
        return 0
    print(f"wrote {summary['n_answered']} answers to {args.output}", file=sys.stderr)
    if summary["n_questions"]:
        print(
            f"EM {summary['exact_match']:.2f}  F1 {summary['f1']:.2f}  on {summary['n_questions']} questions "
            f"with gold answers"
        )
        for part in V2_PARTS:
            exact, f1, total = v2_keys(part)
            if total in summary:
                print(f"{part}: EM {summary[exact]:.2f}  F1 {summary[f1]:.2f}  on {summary[total]} questions")
    else:
        print("no gold answers in the input: not scored", file=sys.stderr)
    return 0


def cmd_ask(args) -> int:
    from .config import ConfigError
    from .predict import ask

    for n, question in enumerate(args.question, 1):
        if not question.strip():
            which = "--question" if len(args.question) == 1 else f"--question {n} (of {len(args.question)})"
            raise ConfigError(f"{which} is empty; ask a question about the --context paragraph")
    context = args.context
    if context.startswith("@"):
        path = Path(context[1:]).expanduser()
        try:
            # the paragraph as written, as predict and a run read it from their files: only the line end an
            # editor adds (and a byte-order mark) go, not the spaces a data set's context may begin or end with
            context = path.read_text(encoding="utf-8-sig").removesuffix("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the context file ({type(e).__name__}: {e})") from None
    if not context.strip():
        raise ConfigError("--context is empty; give the paragraph the answer is in (or @FILE)")
    answers = ask(_answerer(args), args.question, context)
    for question, answer in zip(args.question, answers, strict=True):
        print(answer if len(answers) == 1 else f"{question}\t{answer}")
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    out = export_run(args.run_dir, args.out, overwrite=args.overwrite)
    print(
        f"exported {args.run_dir} to {out}: load it with AutoModelForCausalLM.from_pretrained and "
        "AutoTokenizer.from_pretrained"
    )
    return 0


def cmd_serve(args) -> int:
    from .answering import load_answerer
    from .serve import ServeSettings, check_address, create_app, serve_forever

    settings = ServeSettings(
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        max_questions=args.max_questions,
        gather_ms=args.gather_ms,
    )
    settings.check()  # before the model loads
    if not 1 <= args.port <= 65535:  # 0 (any free port) would leave the address it prints unknown
        raise ValueError(f"--port must be 1 to 65535, got {args.port}")
    check_address(args.host, args.port)
    # a micro-batch is one generation batch: the run's eval.batch_size unless --max-batch says otherwise
    overrides = [("eval.batch_size", args.max_batch)] if args.max_batch else []
    if args.batched:
        overrides.append(("eval.batch_invariant", False))
    answerer = load_answerer(args.run_dir, model=args.model, device=args.device, overrides=overrides)
    serve_forever(create_app(answerer, run_dir=args.run_dir, settings=settings), args.host, args.port)
    return 0


def cmd_params(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .model import parameter_table

    rows = parameter_table(args.model, ranks=tuple(args.ranks), presets=tuple(args.targets))
    base = rows[0]["base_total"]
    table = Table(title=f"LoRA trainable parameters: {args.model} ({base:,} base parameters)")
    for col in ("targets", "rank", "trainable", "% of all"):
        table.add_column(col, justify="left" if col == "targets" else "right")
    for r in rows:
        table.add_row(r["targets"], str(r["r"]), f"{r['trainable']:,}", f"{r['percent']:.3f}%")
    Console(width=100).print(table)
    return 0


def cmd_data_stats(args) -> int:
    from .data import dataset_stats, format_stats_table, load_squad, squad_path

    stats = {}
    for split in ("train", "dev"):
        examples, report = load_squad(squad_path(split, args.data_dir), split=split)
        print(report.summary(), file=sys.stderr)
        stats[split] = dataset_stats(examples)
    print(format_stats_table(stats))
    return 0


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    cfg = build_config(args, allow_sweep=True)
    runner = dict(parallel=args.parallel, device=args.device, backend=args.backend, address=args.address)
    if cfg.sweep is not None and cfg.sweep.mode == "search":
        from .sweep.search import run_search

        if args.shard != "1/1" or args.retry_failed:
            raise ValueError("--shard and --retry-failed are for grid and one-at-a-time sweeps: a search's trials "
                             "come from its Optuna study; drop them")  # fmt: skip
        return run_search(cfg, args.output_dir, **runner)
    return run_sweep(cfg, args.output_dir, shard=args.shard, retry_failed=args.retry_failed, **runner)


def cmd_report(args) -> int:
    from .report import write_report, write_study_report
    from .report.search import is_search, write_search_report

    unreadable: list[str] = []
    if args.against and not (len(args.sweep_dir) == 1 and is_search(args.sweep_dir[0])):
        raise ValueError("--against compares a search's best trial with other sweeps: name one search folder")
    if len(args.sweep_dir) == 1 and not args.compare and is_search(args.sweep_dir[0]):
        path = write_search_report(
            args.sweep_dir[0], out_dir=args.out, against=args.against or (), unreadable=unreadable
        )
    elif len(args.sweep_dir) == 1 and not args.compare:
        path = write_report(args.sweep_dir[0], out_dir=args.out, unreadable=unreadable)
    elif not args.out:
        raise ValueError("a report on several sweeps (or with --compare) needs --out DIR")
    else:
        path = write_study_report(args.sweep_dir, args.out, compare=args.compare, unreadable=unreadable)
    print(f"wrote {path}")
    if unreadable:  # stated, with the files: what they held is missing from the report
        print(
            f"loraqa: report: left out {len(unreadable)} unreadable file(s): {'; '.join(unreadable)}",
            file=sys.stderr,
        )
    return 0


def cmd_config_schema(args) -> int:
    import json

    from .config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_sync(args) -> int:
    from .sync import sync

    results = sync(args.src, args.dst, results_only=args.results_only)
    for r in results:
        print(f"{r.name}: {r.action}")
    problems = [r.name for r in results if r.problem]
    print(
        f"synced {len(results) - len(problems)} of {len(results)} run folder(s) from {args.src} to {args.dst}"
        + (f"; not synced: {', '.join(problems)}" if problems else "")
    )
    return 1 if problems else 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loraqa", description="LoRA fine-tuning for extractive QA, scored by SQuAD EM/F1"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_experiment_commands,
        _add_sweep_command,
        _add_answer_commands,
        _add_folder_commands,
        _add_info_commands,
    ):
        add(sub)
    return p


def _add_experiment_commands(sub) -> None:
    """train and eval: an experiment from a config, overrides and shorthand flags."""
    t = sub.add_parser("train", help="fine-tune, then score EM/F1 on dev questions")
    _add_experiment_flags(t)
    t.add_argument("--output-dir", "-o", help="run folder (default runs/<name>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--device", help=TRAIN_DEVICE_HELP)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser(
        "eval",
        help="score a trained run, or a base model zero-shot (--model)",
        description="With RUN_DIR, only eval.*, data.*, prompt.max_length, model.precision and "
        "model.attn_implementation may change (as KEY=VALUE or their flags); the rest is the run's.",
    )
    e.add_argument("run_dir", nargs="?", help="a run folder made by `loraqa train`")
    _add_experiment_flags(e)
    e.add_argument(
        "--output-dir",
        "-o",
        help="where predictions go (default: RUN_DIR/eval-N; zero-shot: runs/zero-shot-MODEL)",
    )
    e.add_argument("--device", help=DEVICE_HELP)
    e.set_defaults(func=cmd_eval)


def _add_sweep_command(sub) -> None:
    from .config import SWEEP_BACKENDS

    s = sub.add_parser("sweep", help="run every trial of a sweep config (resumable)")
    _add_experiment_flags(s)
    s.add_argument("--output-dir", "-o", required=True)
    s.add_argument("--shard", default="1/1", help="i/n: run the i-th of n shares of the trials (1-based)")
    s.add_argument(
        "--parallel",
        type=int,
        help="trials at once (default 1; on GPUs each worker gets its own); with --backend ray: at most this many "
        "(default: as many as the cluster's resources hold; a search: 1)",
    )
    s.add_argument("--device", help=TRAIN_DEVICE_HELP)
    s.add_argument(
        "--backend",
        choices=SWEEP_BACKENDS,
        default="local",
        help="local: child processes of this machine; ray: one Ray task per trial holding "
        "sweep.resources_per_trial (needs loraqa[ray])",
    )
    s.add_argument(
        "--address", help="with --backend ray: join this Ray cluster (default: start a local instance)"
    )
    s.add_argument(
        "--retry-failed",
        action="store_true",
        help="run failed trials (error.json) again; without it they are left as they are",
    )
    s.set_defaults(func=cmd_sweep)


def _add_answer_commands(sub) -> None:
    """predict, ask, export and serve: a finished run (or a base model) put to use."""
    from .config import DATA_FORMATS

    pr = sub.add_parser("predict", help="answer every question of a file (SQuAD JSON, JSONL, CSV, datasets)")
    pr.add_argument("run_dir", nargs="?", help="a run folder made by `loraqa train`")
    pr.add_argument(
        "--input", "-i", required=True, help=".json (SQuAD v1.1/v2.0), .jsonl, .csv, or a datasets folder"
    )
    pr.add_argument("--output", "-o", required=True, help="JSONL out: one {id, answer} a line")
    pr.add_argument("--format", choices=DATA_FORMATS, help="default: from the name")
    pr.add_argument("--model", help="no run: ask this base model zero-shot")
    pr.add_argument(
        "--batch-size",
        type=int,
        help="questions generated at once (default: the run's eval.batch_size); the answers do not depend on it "
        "under eval.batch_invariant, but a rerun resumes an interrupted one only with the same value",
    )
    pr.add_argument("--device", help=DEVICE_HELP)
    pr.set_defaults(func=cmd_predict)

    a = sub.add_parser("ask", help="answer a question about a paragraph")
    a.add_argument("run_dir", nargs="?", help="a run folder made by `loraqa train`")
    a.add_argument("--question", "-q", required=True, action="append", help="repeat to ask several at once")
    a.add_argument("--context", "-c", required=True, help="the paragraph, or @FILE to read it from a file")
    a.add_argument("--model", help="no run: ask this base model zero-shot")
    a.add_argument("--device", help=DEVICE_HELP)
    a.set_defaults(func=cmd_ask)

    x = sub.add_parser(
        "export", help="merge a run's adapter into its base: a plain transformers model folder"
    )
    x.add_argument("run_dir", help="a run folder made by `loraqa train`")
    x.add_argument("--out", required=True, help="the folder to write (safetensors, config, tokenizer)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.set_defaults(func=cmd_export)
    _add_serve_command(sub)


def _add_serve_command(sub) -> None:
    from .serve.settings import LOOPBACK, ServeSettings

    sv = sub.add_parser(
        "serve",
        help="a web page and a JSON API answering questions with a run (or --model)",
        description=f"Serves GET / (a page), POST /v1/answer, GET /health and /docs. Binds to {LOOPBACK}: only "
        "this machine can reach it. --host 0.0.0.0 lets anyone who can reach the port query the model; there "
        "is no authentication.",
    )
    sv.add_argument(
        "run_dir", nargs="?", help="a run folder made by `loraqa train` (e.g. examples/smollm2-squad)"
    )
    sv.add_argument("--model", help="no run: serve this base model zero-shot")
    sv.add_argument(
        "--host", default=LOOPBACK, help="address to listen on (default %(default)s, this machine only)"
    )
    sv.add_argument("--port", type=int, default=8000, help="default 8000")
    sv.add_argument(
        "--queue-size",
        type=int,
        default=ServeSettings.queue_size,
        help="requests that may wait; one more gets 503 with Retry-After (default %(default)s)",
    )
    sv.add_argument(
        "--max-batch",
        type=int,
        help="questions answered together, from any requests (default: the run's eval.batch_size)",
    )
    sv.add_argument(
        "--max-questions",
        type=int,
        default=ServeSettings.max_questions,
        help="questions in one request (default %(default)s)",
    )
    sv.add_argument(
        "--gather-ms",
        type=float,
        default=ServeSettings.gather_ms,
        help="the most a batch waits for the clients of the last batch to ask again (default %(default)s; it "
        "waits an eighth of the last batch's time at most)",
    )
    sv.add_argument(
        "--batched",
        action="store_true",
        help="decode a micro-batch's questions together (eval.batch_invariant=false): more answers a second "
        "under load, but in bf16 an answer can then change with the questions beside it",
    )
    sv.add_argument("--device", help=DEVICE_HELP)
    sv.set_defaults(func=cmd_serve)


def _add_folder_commands(sub) -> None:
    """report and sync: run and sweep folders read, without a model."""
    r = sub.add_parser("report", help="tables, figures and verdicts from one or more sweep folders")
    r.add_argument("sweep_dir", nargs="+", help="sweep folders; several make one study report (needs --out)")
    r.add_argument("--compare", help="an earlier report.md whose verdicts the new ones are set against")
    r.add_argument("--out", help="folder for report.md, results.csv and figures (default: the sweep folder)")
    r.add_argument("--against", action="append", metavar="SWEEP_DIR",
                   help="a search's report: compare its best trial with the finished trials of this sweep or "
                   "search on the held-out questions (repeatable)")  # fmt: skip
    r.set_defaults(func=cmd_report)

    y = sub.add_parser(
        "sync",
        help="copy a run or sweep folder elsewhere so that it resumes there (newest wins)",
        description="Copies each run's files and its newest complete checkpoint; a run that DST has further "
        "along is left as it is. Rerun the same train/sweep command on the copy to resume.",
    )
    y.add_argument("src", help="a run folder (loraqa train -o) or a sweep folder (loraqa sweep -o)")
    y.add_argument("dst", help="the copy (created if missing)")
    y.add_argument(
        "--results-only",
        action="store_true",
        help="the records alone (no checkpoint, weights, process log or TensorBoard event), for version control; "
        "unfinished runs resumed from this copy start again",
    )
    y.set_defaults(func=cmd_sync)


def _add_info_commands(sub) -> None:
    """params, data stats and config schema: facts that need no training."""
    from .config import STUDY_PRESETS, STUDY_RANKS

    pa = sub.add_parser("params", help="trainable-parameter table (no weights needed)")
    pa.add_argument("--model", default="gpt2")
    pa.add_argument("--ranks", type=int, nargs="+", default=list(STUDY_RANKS), help="default: the study's")
    pa.add_argument("--targets", nargs="+", default=list(STUDY_PRESETS), help="default: the study's")
    pa.set_defaults(func=cmd_params)

    d = sub.add_parser("data", help="dataset commands")
    dsub = d.add_subparsers(dest="data_command", required=True)
    ds = dsub.add_parser("stats", help="Table 1: questions, articles, paragraphs, lengths, question types")
    ds.add_argument("--data-dir")
    ds.set_defaults(func=cmd_data_stats)

    c = sub.add_parser("config", help="experiment-file commands")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser(
        "schema",
        help="print the JSON schema of an experiment file (every field: type, default, bounds, help)",
        description="For editors: save it (loraqa config schema > loraqa.schema.json) and start an experiment "
        "file with `# yaml-language-server: $schema=loraqa.schema.json`.",
    )
    cs.set_defaults(func=cmd_config_schema)


def main(argv: list[str] | None = None) -> int:
    # the command line: start again under tcmalloc where the system has it (loraqa.launch), before torch loads
    if argv is None:
        from .launch import restart_under_tcmalloc

        try:
            restart_under_tcmalloc(["-m", "loraqa.cli", *sys.argv[1:]])
        except ValueError as e:
            return _error(e, 2, known=True)
    from .config import ConfigError
    from .data import DataError
    from .dist import is_main_process
    from .model import ModelLoadError
    from .signals import exit_status

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills CONFIG|KEY=VALUE items from the positionals before the first option only: the ones
    # after an option (`train cfg.yaml --model gpt2 train.lr=5e-4`) come back as extras
    after = extra[extra.index("--") + 1 :] if "--" in extra else []  # after a `--` everything is an item
    before = extra[: len(extra) - len(after) - (1 if "--" in extra else 0)]
    items = [x for x in before if not x.startswith("-")] + after
    if len(items) < len(extra) - (1 if "--" in extra else 0) or (items and not hasattr(args, "items")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if items:
        args.items += items
    args.argv = argv  # the model card records the command
    level = logging.DEBUG if args.verbose else logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # raised inside transformers/peft on every LoRA model, nothing a user can act on; the second because a
    # GGUF-loaded base has no config.json beside it for PEFT to compare vocabularies with (loraqa never
    # resizes the embeddings)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, ValueError) as e:
        return _error(e, 2, known=True)
    except KeyboardInterrupt as e:  # Interrupted (a checkpoint was saved) says which signal and step
        print(
            f"loraqa: interrupted: {e}"
            if str(e)
            else "loraqa: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return exit_status(getattr(e, "signum", signal.SIGINT))
    except Exception as e:  # one line, never a traceback (-v shows it)
        if args.verbose:
            raise
        return _error(e, 1)


def _error(e: BaseException, status: int, known: bool = False) -> int:
    """Print ``e`` as the one line ``loraqa: error: ...`` (the last line a sweep records) and return ``status``;
    a ``known`` error's message is already written for the user."""
    text = " ".join(str(e).split()) if known else _describe_error(e)
    print(f"loraqa: error: {text}", file=sys.stderr)
    return status


def _describe_error(e: BaseException) -> str:
    import errno

    from .callbacks import TrainingDiverged

    text = " ".join(str(e).split())  # one line
    if isinstance(e, (TrainingDiverged, ValueError)):
        return text
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch and safetensors report a full disk as their own errors, with the OS reason inside
    full = full or any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))
    if full:
        where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        return (
            f"{where}no space left on device; free some space and rerun the same command (it resumes from "
            "the last complete checkpoint)"
        )
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or text}"
    return f"{type(e).__name__}: {text[:300]} (rerun with -v to see where)"


if __name__ == "__main__":
    sys.exit(main())

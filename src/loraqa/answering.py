"""Answer dev questions with a model and score them: prompt -> generate -> metrics, timed."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from . import dist
from .config import ConfigError, EvalConfig
from .devices import peak_memory_mb
from .generate import Decoding, generate_answers, generate_answers_invariant
from .journal import AnswerJournal, fingerprint
from .layout import CONFIG_FILE, LOG_FILE, METRICS_FILE, TRAIN_METRICS_FILE, answer_journal_file
from .metrics import score_predictions
from .prompt import PromptEncoder, PromptStats


def evaluate_model(
    model,
    tokenizer,
    examples,
    *,
    max_length: int = 512,
    eval_cfg: EvalConfig | None = None,
    progress: bool = True,
    unanswerable_answer: str | None = None,
    journal_dir: Path | None = None,
) -> tuple[list[dict], dict]:
    """Greedy answers to ``examples`` scored by SQuAD EM/F1 (the v2.0 rules with ``unanswerable_answer``);
    returns per-question records and a summary with ``exact_match``, ``f1``, ``n_questions`` (questions with
    gold answers, the ones scored), ``eval_seconds``, ``eval_questions_per_second``.

    Under several processes each answers a contiguous share of ``examples`` and every process gets all the
    answers back, in the order of ``examples``; the time is until the last share is in.

    With ``journal_dir`` (a run folder) the answers are kept there as they come (:mod:`loraqa.journal`): an
    evaluation interrupted midway resumes at its next batch when called again, its time counting both parts."""
    from .model import position_limit

    eval_cfg = eval_cfg or EvalConfig()
    limit = position_limit(model)
    if limit is not None and max_length + eval_cfg.max_new_tokens > limit:
        # the answer is generated after the prompt: a prompt filling the model's positions has no room for it
        max_length = max(limit - eval_cfg.max_new_tokens, 1)
    encoder = PromptEncoder(tokenizer, max_length=max_length)
    stats = PromptStats()
    parts = [encoder.encode_prompt_parts(ex.context, ex.question, stats) for ex in examples][dist.shard(len(examples))]
    share = [c + q for c, q in parts]
    journal = _open_journal(journal_dir, model, tokenizer, share, eval_cfg) if journal_dir else None
    # extractive: every answer a piece of its paragraph as written (a decoded context can differ from it in
    # spaces the tokenizer cleans up)
    contexts = [ex.context for ex in examples][dist.shard(len(examples))] if eval_cfg.extractive else None
    resume = {"done": journal.done, "on_batch": journal.record} if journal else {}
    decoding = Decoding(eval_cfg.max_new_tokens, contexts, progress=progress, **resume)
    start = time.perf_counter()
    if eval_cfg.batch_invariant:
        answers = generate_answers_invariant(model, tokenizer, share, [len(c) for c, _ in parts], decoding)
    else:
        answers = generate_answers(
            model, tokenizer, share, decoding, batch_size=eval_cfg.batch_size, sort_by_length=eval_cfg.sort_by_length,
            share_prefixes=eval_cfg.share_prefixes, prune_finished=eval_cfg.prune_finished,
        )  # fmt: skip
    answers = dist.gather_lists(answers)
    seconds = time.perf_counter() - start + (journal.seconds_before if journal else 0.0)
    if journal:
        journal.discard()
    records, summary = score_predictions(examples, answers, unanswerable_answer)
    summary.update(
        eval_seconds=round(seconds, 3),
        eval_questions_per_second=round(len(examples) / seconds, 3) if seconds > 0 else None,
        eval_prompts_truncated=stats.truncated,
    )
    return records, summary


def _open_journal(folder: Path, model, tokenizer, prompts: list[list[int]], eval_cfg: EvalConfig) -> AnswerJournal:
    from .generate import stop_token_ids

    settings = {**dataclasses.asdict(eval_cfg), "tokenizer": type(tokenizer).__name__, "vocab": len(tokenizer),
                "stops": stop_token_ids(tokenizer)}  # fmt: skip
    name = answer_journal_file(dist.rank(), dist.world_size())
    return AnswerJournal(Path(folder) / name, fingerprint(model, prompts, settings))


def eval_zero_shot(cfg, out_dir, *, device: str | None = None, progress: bool = True) -> dict:
    """Score the base model (no fine-tuning) with the same prompt; writes predictions.jsonl and metrics.json."""
    from .data import evaluated, evaluated_read_limit, load_split
    from .io import write_json_atomic, write_text_atomic
    from .model import count_parameters, load_model_and_tokenizer
    from .rundir import make_run_folder, write_predictions

    out_dir = Path(out_dir)
    if any((out_dir / f).exists() for f in (LOG_FILE, TRAIN_METRICS_FILE)):  # a trained run's own results
        raise ConfigError(f"{out_dir}: holds a trained run; pick another --output-dir for the zero-shot results")
    dist.on_main(make_run_folder, out_dir)  # a file or an impossible path as --output-dir: one line, before any work
    dev, _, _ = load_split(cfg.data, "dev", limit=evaluated_read_limit(cfg.data))
    dev = evaluated(cfg.data, dev)
    lm = load_model_and_tokenizer(cfg.model.name, cfg.model.precision, cfg.model.attn_implementation, device)
    records, summary = evaluate_model(
        lm.model, lm.tokenizer, dev, max_length=cfg.prompt.max_length, eval_cfg=cfg.eval, progress=progress,
        unanswerable_answer=cfg.data.no_answer_text(), journal_dir=out_dir,
    )  # fmt: skip
    _, total = count_parameters(lm.model)
    metrics = {**summary, "trainable_params": 0, "total_params": total, "model": cfg.model.name,
               "method": "zero-shot", "precision": lm.precision, "device": str(lm.device),
               "peak_memory_mb": round(peak_memory_mb(lm.device), 1)}  # fmt: skip
    dist.on_main(write_text_atomic, out_dir / CONFIG_FILE, cfg.to_yaml())
    dist.on_main(write_predictions, out_dir, records)
    dist.on_main(write_json_atomic, out_dir / METRICS_FILE, metrics)
    return metrics


def eval_run_dir(run_dir, *, overrides: list[tuple[str, object]] | None = None, out_dir=None,
                 device: str | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Re-score a trained run folder (its adapter or full model) on the dev questions, its config changed by
    ``overrides`` (``[("data.eval_limit", 100)]``); writes ``predictions.jsonl`` and
    ``metrics.json`` into ``out_dir`` (default: ``eval-<n>`` inside the run folder) and returns the metrics."""
    from .data import evaluated, evaluated_read_limit, load_split
    from .io import write_json_atomic
    from .rundir import load_run, make_run_folder, write_predictions

    run_dir = Path(run_dir)
    if out_dir is not None:  # checked before any loading; the run's own metrics.json is never replaced
        if Path(out_dir).resolve() == run_dir.resolve():
            raise ConfigError(f"{out_dir}: is the run folder itself; pick another -o (default: RUN_DIR/eval-N)")
        if (Path(out_dir) / CONFIG_FILE).is_file():  # a run's or a zero-shot evaluation's own results
            raise ConfigError(f"{out_dir}: holds a run ({CONFIG_FILE}); pick another -o (default: RUN_DIR/eval-N)")
        dist.on_main(make_run_folder, Path(out_dir))
    run = load_run(run_dir, overrides=list(overrides or []), device=device)
    cfg, lm = run.cfg, run.lm
    dev, _, _ = load_split(cfg.data, "dev", limit=evaluated_read_limit(cfg.data))
    dev = evaluated(cfg.data, dev)
    out = Path(out_dir) if out_dir else run_dir / f"eval-{len(dev)}"
    dist.on_main(make_run_folder, out)
    records, summary = evaluate_model(
        run.model, lm.tokenizer, dev, max_length=cfg.prompt.max_length, eval_cfg=cfg.eval, progress=progress,
        unanswerable_answer=cfg.data.no_answer_text(), journal_dir=out,
    )  # fmt: skip
    dist.on_main(write_predictions, out, records)
    metrics = {**summary, "model": cfg.model.name, "precision": lm.precision, "device": str(lm.device)}
    dist.on_main(write_json_atomic, out / METRICS_FILE, metrics)
    return metrics

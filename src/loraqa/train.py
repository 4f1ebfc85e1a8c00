"""Fine-tune with LoRA (or fully) on SQuAD and evaluate: the whole run, resumable.

The run folder's layout is in :mod:`loraqa.rundir`; the Trainer and what loraqa adds to it in
:mod:`loraqa.trainer`. Rerunning an interrupted run resumes from its last checkpoint; a finished run is not
redone.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from . import data as data_mod
from . import dist, signals
from .answering import Answerer
from .card import current_command, model_card
from .config import ConfigError, ExperimentConfig
from .devices import peak_memory_mb, reset_peak_memory
from .io import read_json, write_json_atomic, write_jsonl_atomic, write_text_atomic
from .layout import CHECKPOINTS_DIR, LOG_FILE, METRICS_FILE, MODEL_CARD_FILE, TRAIN_METRICS_FILE
from .model import (
    apply_lora,
    count_parameters,
    load_model_and_tokenizer,
    position_limit,
    prepare_for_generation,
)
from .packing import SharedContextCollator
from .prompt import PromptEncoder, encode_train_set
from .rundir import (
    last_checkpoint,
    load_checkpoint_weights,
    load_trained,
    lock_run_folder,
    prepare_run_dir,
    record_failure,
    save_trained,
    write_predictions,
)
from .trainer import (
    Interrupted,
    QACollator,
    log_final_scores,
    make_clock_callback,
    make_finite_loss_callback,
    make_interrupt_callback,
    make_log_callback,
    make_tensorboard_callback,
    make_trainer_class,
    per_process_batch,
    training_arguments,
)

log = logging.getLogger(__name__)


def load_examples(cfg: ExperimentConfig):
    """(train examples, dev examples, what was read for the model card) as the config asks, with one line of
    load report each."""
    train, train_report, train_source = data_mod.load_split(cfg.data, "train", limit=cfg.data.train_limit)
    dev, dev_report, dev_source = data_mod.load_split(cfg.data, "dev", limit=_dev_limit(cfg))
    log.info(train_report.summary())
    log.info(dev_report.summary())
    for source, examples, report in ((train_source, train, train_report), (dev_source, dev, dev_report)):
        if not examples and report.n_questions_in_file == sum(report.skipped.values()):
            # every question skipped (or none at all): say which file and why, before any model is loaded
            raise data_mod.DataError(f"{source}: no usable question ({report.summary()})")
    info = {"format": cfg.data.format, "train": Path(train_source).name, "dev": Path(dev_source).name,
            "train_questions": len(train)}  # fmt: skip
    return train, dev, info


def _dev_limit(cfg: ExperimentConfig) -> int | None:
    """The dev questions to read: the evaluated ones, and the in-training slice when there is one."""
    limit = data_mod.evaluated_read_limit(cfg.data)
    if not cfg.eval.score_steps or limit is None:
        return limit
    return max(limit, cfg.data.score_limit)


TOKENS_COUNTED = {  # what metrics.json's train_tokens count, by layout
    False: "non-padding tokens computed (every question with its own copy of its context)",
    True: "non-padding tokens computed (each shared context once per batch row)",
}


def _final_losses(history: list[dict]) -> dict:
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"final_train_loss": train[-1] if train else None, "final_eval_loss": evals[-1] if evals else None}


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    device: str | None = None,
    callbacks: list | None = None,
    progress: bool = True,
    command: str | None = None,
    on_score=None,
) -> dict:
    """Train (resuming if interrupted), save, evaluate on the dev questions; returns ``metrics.json``'s content.
    ``command`` (default: the running command line) goes into the run's model card. ``on_score(step, scores)``
    hears every in-training scoring (``eval.score_steps``) and returns True to stop the run there, pruned.

    Under torchrun / accelerate launch every process runs this: each trains on its share of every batch and
    answers its share of the dev questions; only the main process writes the run folder (see :mod:`loraqa.dist`).
    The main process holds the folder's lock: a second ``loraqa`` on the same folder is refused.
    """
    run_dir = Path(run_dir)
    device = dist.init(device)
    per_process_batch(cfg)  # a batch that does not split over the processes stops here, before any loading
    lock = dist.on_main(lock_run_folder, run_dir)  # refused (on every process) if another run holds it
    try:
        dist.on_main(prepare_run_dir, run_dir, cfg, overwrite)  # the others wait: none reads a half-made folder
        try:
            return _run(cfg, run_dir, device, callbacks, progress, command, on_score)
        except Exception as e:
            # a sweep that died is no failure of the trial: a write to its stderr pipe fails first, and the
            # trial stays unfinished, to be resumed by the next `loraqa sweep`
            interrupted = signals.orphaned() or isinstance(e, BrokenPipeError)
            if dist.is_main_process() and not interrupted:
                record_failure(run_dir, e)  # the reason stays in the folder (error.json)
            raise
    finally:
        if dist.is_main_process():
            os.close(lock)  # releases the lock (the kernel does the same when a process dies)


def _run(cfg, run_dir: Path, device, callbacks, progress, command, on_score=None) -> dict:
    from transformers import set_seed

    if (run_dir / METRICS_FILE).exists():
        log.info("%s: finished already (metrics.json); pass --overwrite to run it again", run_dir)
        return read_json(run_dir / METRICS_FILE)

    train_examples, dev_read, data_info = load_examples(cfg)
    dev_examples = data_mod.evaluated(cfg.data, dev_read)
    score_examples = dev_read[: cfg.data.score_limit] if cfg.eval.score_steps else []
    set_seed(cfg.train.seed)
    full = cfg.train.method == "full"
    lm = load_model_and_tokenizer(
        cfg.model.name, cfg.model.precision, cfg.model.attn_implementation, str(device), seed=cfg.train.seed,
        trainable_base=full,
    )  # fmt: skip
    model, tok = lm.model, lm.tokenizer
    limit = position_limit(model)
    if limit is not None and cfg.prompt.max_length > limit:  # a long example would index past the positions
        raise ConfigError(f"prompt.max_length: {cfg.prompt.max_length} is more than {cfg.model.name} takes "
                          f"({limit} positions); set prompt.max_length={limit} or less")  # fmt: skip
    if not full:
        model = apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    trainable, total = count_parameters(model)
    reset_peak_memory(lm.device)  # peak memory counts training and evaluation, not loading

    train_metrics_path = run_dir / TRAIN_METRICS_FILE
    if train_metrics_path.exists():  # trained and saved before an interruption during evaluation
        train_metrics = read_json(train_metrics_path)
        model = load_trained(model, run_dir, full, lm.device)
        dist.on_main(shutil.rmtree, run_dir / CHECKPOINTS_DIR, ignore_errors=True)  # a kill came while removing them
    else:
        train_metrics = _train(cfg, run_dir, model, tok, train_examples, dev_examples, lm, callbacks,
                               score_examples, on_score)  # fmt: skip
        train_metrics.update(trainable_params=trainable, total_params=total)
        dist.on_main(_save_training, cfg, model, tok, run_dir, train_metrics)

    if train_metrics.get("pruned_at"):  # a search stopped this trial: its in-training scores are its record
        pruned = {**train_metrics, "pruned": True, "exact_match": None, "f1": None, "n_questions": 0,
                  "model": cfg.model.name, "method": cfg.train.method, "precision": lm.precision}  # fmt: skip
        card = model_card(cfg, pruned, data=data_info, command=current_command() if command is None else command)
        return dist.on_main(_save_results, run_dir, [], pruned, card)
    model = prepare_for_generation(model, merge=cfg.eval.merge_adapter, precision=lm.precision)
    records, summary = Answerer(cfg, model, tok).answer(
        dev_examples, progress=progress and dist.is_main_process(), journal_dir=run_dir
    )
    metrics = {
        "exact_match": summary["exact_match"],
        "f1": summary["f1"],
        "n_questions": summary["n_questions"],
        **{k: v for k, v in summary.items() if k.startswith(("HasAns_", "NoAns_"))},  # SQuAD 2.0
        **train_metrics,
        "eval_seconds": summary["eval_seconds"],
        "eval_questions_per_second": summary["eval_questions_per_second"],
        "eval_prompts_truncated": summary["eval_prompts_truncated"],
        "peak_memory_mb": round(
            max(dist.max_across(peak_memory_mb(lm.device)), train_metrics.get("peak_memory_mb", 0)), 1
        ),  # the largest of any process
        "model": cfg.model.name,
        "method": cfg.train.method,
        "precision": lm.precision,
        "device": str(lm.device),
        "world_size": dist.world_size(),  # processes (one per GPU); batch_size is their sum, see config.py
        "torch_threads": torch.get_num_threads(),  # per process
    }
    card = model_card(cfg, metrics, data=data_info, command=current_command() if command is None else command,
                      model_type=getattr(lm.model.config, "model_type", None))  # fmt: skip
    dist.on_main(log_final_scores, run_dir, cfg.train.report_to, metrics, metrics.get("train_steps") or 0)
    return dist.on_main(_save_results, run_dir, records, metrics, card)  # the main process's figures, everywhere


def _fit(trainer, resume: str | None, clock, interrupt, full: bool) -> None:
    """Train, from the checkpoint ``resume`` if there is one. A stop signal saves a checkpoint at the step
    reached and ends in :class:`Interrupted`."""
    finished = read_json(Path(resume) / "trainer_state.json") if resume else {}
    if finished and (finished.get("max_steps", 0) > 0 and finished["global_step"] >= finished["max_steps"]
                     or _stopped_early_in(finished, trainer)):  # fmt: skip
        # killed after its last checkpoint, before the trained weights were saved: resumed there, the Trainer
        # (transformers 5.24) would run one step more than an uninterrupted run; take the checkpoint as it is
        from transformers.trainer_callback import TrainerState

        load_checkpoint_weights(dist.unwrap(trainer.model), Path(resume), full)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        clock.start_step = trainer.state.global_step
        return
    with interrupt.armed():
        trainer.train(resume_from_checkpoint=resume)
    step = interrupt.stopped_at
    if step is not None:
        raise Interrupted(interrupt.signum, step, Path(trainer.args.output_dir) / f"checkpoint-{step}")
    if interrupt.signum is not None:  # it came after the last step's end: stop as a plain Ctrl-C does
        raise KeyboardInterrupt


def _stopped_early_in(state: dict, trainer) -> bool:
    """Whether a checkpoint's trainer state is an early stop (saved at the step it stopped at)."""
    from .metrics import scorings_since_best

    patience = getattr(trainer, "early_stopping_patience", 0)
    return bool(patience) and scorings_since_best(state.get("log_history", [])) >= patience


def _save_training(cfg, model, tok, run_dir: Path, train_metrics: dict) -> None:
    save_trained(dist.unwrap(model), tok, run_dir, cfg.train.method == "full", base_name=cfg.model.name)
    write_json_atomic(run_dir / TRAIN_METRICS_FILE, train_metrics)
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)


def _save_results(run_dir: Path, records: list[dict], metrics: dict, card: str) -> dict:
    write_predictions(run_dir, records)
    write_text_atomic(run_dir / MODEL_CARD_FILE, card)
    write_json_atomic(run_dir / METRICS_FILE, metrics)  # last: its presence means the run is done
    return metrics


def _train(cfg, run_dir, model, tok, train_examples, dev_examples, lm, callbacks, score_examples=(),
           on_score=None) -> dict:
    from .scoring import ScoreCallback

    train_features, train_stats, loss_eval_features, shared = _encode(cfg, tok, train_examples, dev_examples)
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    args = training_arguments(cfg, ckpt_dir, lm.precision, lm.device, eval_loss=bool(loss_eval_features))
    clock = make_clock_callback(lm.device)
    interrupt = make_interrupt_callback()
    scorer = ScoreCallback(tok, list(score_examples), cfg, on_score=on_score)
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=loss_eval_features if cfg.train.eval_steps and loss_eval_features else None,
        data_collator=SharedContextCollator(tok.pad_token_id) if shared else QACollator(tok.pad_token_id),
        # no processing_class: the Trainer would copy the tokenizer (3.5 MB for GPT-2) into every checkpoint,
        # and the tokenizers library writes tokenizer.json without reporting a full disk (a truncated file in an
        # otherwise complete checkpoint, found by tests/test_faults.py); loraqa reloads the tokenizer by name
        # the clock last: at a step's end it sees every save asked for, the interrupt callback's included
        callbacks=[make_log_callback(run_dir / LOG_FILE), make_finite_loss_callback(), scorer, *(callbacks or []),
                   *filter(None, [make_tensorboard_callback(run_dir, cfg.train.report_to)]), interrupt, clock],  # fmt: skip
        fast_loss=cfg.train.fast_loss,
        share_contexts=shared,
        base_name=cfg.model.name,
    )
    clock.trainer = scorer.trainer = trainer
    trainer.early_stopping_patience = cfg.train.early_stopping_patience
    resume = dist.on_main(last_checkpoint, ckpt_dir)  # it removes half-written ones: one process, one answer
    if resume:
        log.info("resuming from %s", resume)
    clock.resume_from(resume)
    _fit(trainer, resume, clock, interrupt, full=cfg.train.method == "full")
    totals = clock.totals()  # read now: the clock runs on, and the final evaluation is no training
    scored = _scoring_summary(trainer, cfg, scorer)
    totals["train_seconds"] = max(totals["train_seconds"] - scored.get("score_seconds", 0.0), 0.0)
    final_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}
    dist.on_main(write_jsonl_atomic, run_dir / LOG_FILE, trainer.state.log_history)
    losses = _final_losses(trainer.state.log_history)
    if final_eval:
        losses["final_eval_loss"] = final_eval["eval_loss"]
        losses["eval_loss_on"] = "answer"  # see _encode; runs without this key logged prompt.loss_on's loss
    return {
        "train_examples": len(train_features),
        "train_prompt_stats": {
            "encoded": train_stats.encoded,
            "truncated": train_stats.truncated,
            "skipped": dict(train_stats.skipped),
        },  # fmt: skip
        "train_steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "resumed_from": os.path.basename(resume) if resume else None,
        "resumed_at_step": clock.start_step,  # the step the Trainer restored, read from the Trainer
        "fast_loss": trainer.fast_loss,  # False where the config or the model family ruled it out
        **_throughput(totals, shared),
        **losses,
        **scored,
    }


def _scoring_summary(trainer, cfg: ExperimentConfig, scorer) -> dict:
    """What the in-training scores decided, for metrics.json; with ``train.keep_best`` the model gets the best
    scoring's weights back from its checkpoint (the final evaluation and the saved adapter are that one)."""
    from .metrics import best_scoring, score_seconds, scorings

    history = trainer.state.log_history
    best = best_scoring(history)
    if best is None:
        return {}
    out = {"score_steps": cfg.eval.score_steps, "score_questions": len(scorer.examples), "scorings": len(scorings(history)),
           "score_seconds": score_seconds(history), "best_step": best[0], "best_eval_f1": best[1],
           "stopped_early_at": scorer.stopped_early_at or _stopped_early(trainer, cfg),
           "pruned_at": scorer.pruned_at}  # fmt: skip
    if cfg.train.keep_best:
        out["kept_step"] = best[0]
        if best[0] != trainer.state.global_step:
            checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{best[0]}"
            load_checkpoint_weights(dist.unwrap(trainer.model), checkpoint, cfg.train.method == "full")
            log.info("keep_best: the adapter of step %d (eval_f1 %.2f on %d questions) is the run's", best[0],
                     best[1], len(scorer.examples))  # fmt: skip
    return out


def _stopped_early(trainer, cfg: ExperimentConfig) -> int | None:
    """A run resumed after its early stop: the Trainer's state says it ended before its planned steps."""
    from .metrics import scorings_since_best

    patience, state = cfg.train.early_stopping_patience, trainer.state
    if patience and state.global_step < state.max_steps and scorings_since_best(state.log_history) >= patience:
        return state.global_step
    return None


def _encode(cfg, tok, train_examples, dev_examples):
    """The training features and their statistics, the features of the logged eval loss, and whether training
    shares contexts."""
    encoder = PromptEncoder(tok, max_length=cfg.prompt.max_length, loss_on=cfg.prompt.loss_on)
    no_answer = cfg.data.no_answer_text()
    train_features, train_stats = encode_train_set(encoder, train_examples, no_answer)
    if not train_features:
        raise ConfigError(f"no training examples left after encoding ({train_stats.summary()})")
    # The logged eval loss is always the loss on the answer tokens (+ EOS), whatever prompt.loss_on trains on:
    # it is what the generated answers depend on, and it keeps the loss_on=answer and =all runs comparable.
    answer_encoder = (
        encoder
        if encoder.loss_on == "answer"
        else PromptEncoder(tok, max_length=cfg.prompt.max_length, loss_on="answer")
    )
    loss_eval_features, _ = encode_train_set(answer_encoder, dev_examples[: cfg.data.loss_eval_limit], no_answer)
    log.info("train prompts: %s", train_stats.summary())
    shared = shares_contexts(cfg)
    if cfg.train.share_contexts and not shared:
        log.warning("train.share_contexts: %s trains on stand-alone examples",
                    "prompt.loss_on=all" if cfg.prompt.loss_on != "answer" else "flash_attention_2")  # fmt: skip
    return train_features, train_stats, loss_eval_features, shared


def shares_contexts(cfg: ExperimentConfig) -> bool:
    """Whether training computes each paragraph's context once per batch (``train.share_contexts``), except:
    prompt.loss_on=all labels the context, which shared would count once per paragraph instead of once per
    question (another objective); and flash_attention_2's kernels take a padding mask only, not the
    B x 1 x L x L mask of a shared-context row (transformers would pass it through, read as padding)."""
    return (cfg.train.share_contexts and cfg.prompt.loss_on == "answer"
            and cfg.model.attn_implementation != "flash_attention_2")  # fmt: skip


def _throughput(totals: dict, shared: bool) -> dict:
    """Train time, tokens, questions and peak memory: the sums over every segment of an interrupted run (see
    the clock callback)."""
    seconds, tokens, questions = totals["train_seconds"], totals["train_tokens"], totals["train_questions"]
    return {
        "train_seconds": round(seconds, 3),
        "train_segments": totals["segments"],
        **({"train_seconds_cover_last_segment_only": True} if totals.get("incomplete") else {}),
        "train_tokens": tokens,
        "train_tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
        "train_tokens_counted": TOKENS_COUNTED[shared],
        "train_questions": questions,
        "train_questions_per_second": round(questions / seconds, 3) if seconds > 0 else None,
        "train_share_contexts": shared,
        "peak_memory_mb": round(totals["peak_memory_mb"], 1),
    }

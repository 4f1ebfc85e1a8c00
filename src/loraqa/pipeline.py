"""The training pipeline (``loraqa train``): fine-tune with LoRA (or fully) on SQuAD and evaluate, the whole run,
resumable.

:func:`run_experiment` takes the stages in order: the questions (:mod:`loraqa.data`), the model
(:mod:`loraqa.model`), the prompts (:mod:`loraqa.prompt`), training (:mod:`loraqa.trainer` and its callbacks),
the final evaluation and the results written into the run folder (:mod:`loraqa.answering`, the answering path
every command shares), with the model card. What the config implies (full fine-tuning or not, each process's
batch, the report targets, shared contexts) is worked out once, by :func:`resolve`, before anything is loaded.
Rerunning an interrupted run resumes from its last checkpoint; a finished run is not redone.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_callback import TrainerState

from . import data as data_mod
from . import dist, signals
from .answering import Answerer, check_answer_room, write_results
from .attention import reads_segments
from .batching import QACollator
from .callbacks import ClockCallback, FiniteLossCallback, InterruptCallback, Interrupted, JsonlLogCallback
from .card import current_command, model_card
from .config import ConfigError, ExperimentConfig
from .devices import (
    check_training_device,
    peak_memory_mb,
    reset_peak_memory,
    resolve_attention,
    resolve_compile,
)
from .io import read_json, write_json_atomic, write_jsonl_atomic
from .launch import allocator
from .layout import (
    ANSWER_JOURNAL_FILE,
    CHECKPOINTS_DIR,
    LOG_FILE,
    METRICS_FILE,
    TRAIN_METRICS_FILE,
    TRAINER_STATE_FILE,
    checkpoint_name,
)
from .metrics import V2_KEYS, best_scoring, patience_ran_out, pruned_at, score_seconds, scorings
from .model import (
    apply_lora,
    count_parameters,
    load_checkpoint_weights,
    load_model,
    load_trained,
    position_limit,
    prepare_for_generation,
    save_trained,
)
from .packing import SharedContextCollator
from .prompt import PromptEncoder, encode_train_set
from .runfolder import last_checkpoint, lock_run_folder, prepare_run_dir, record_failure
from .scoring import ScoreCallback
from .tracking import TENSORBOARD, log_final_scores, report_names, reporters, tensorboard_callback
from .trainer import QATrainer, compile_seconds, per_process_batch, planned_steps, training_arguments

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class Resolved:
    """What a run derives from its config, worked out once (by :func:`resolve`) before anything is loaded."""

    full: bool  # train.method=full: every weight trained, no adapter
    per_process_batch: int  # train.batch_size split over the processes
    reporters: tuple[str, ...]  # the Trainer's report_to: train.report_to's integrations, each installed
    tensorboard: bool  # train.report_to names tensorboard: event files in RUN/tensorboard
    share_contexts: bool  # training computes each paragraph's context once per batch (see shares_contexts)


def resolve(cfg: ExperimentConfig) -> Resolved:
    """The facts :class:`Resolved` holds; a :class:`ConfigError` for a batch that does not split over the
    processes or a report target that is not installed."""
    return Resolved(
        full=cfg.train.method == "full",
        per_process_batch=per_process_batch(cfg.train),
        reporters=tuple(reporters(cfg.train.report_to)),
        tensorboard=TENSORBOARD in report_names(cfg.train.report_to),
        share_contexts=shares_contexts(cfg),
    )


def shares_contexts(cfg: ExperimentConfig) -> bool:
    """Whether training computes each paragraph's context once per batch (``train.share_contexts``), except:
    prompt.loss_on=all labels the context, which shared would count once per paragraph instead of once per
    question (another objective); and flash_attention_2's kernels take a padding mask only, not the
    B x 1 x L x L mask of a shared-context row (transformers would pass it through, read as padding)."""
    return (
        cfg.train.share_contexts
        and cfg.prompt.loss_on == "answer"
        and cfg.model.attn_implementation != "flash_attention_2"
    )


# ---------------------------------------------------------------------------------------------- the run


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
    check_training_device(device, dist.world_size())
    resolved = resolve(cfg)  # a bad batch or report target stops here, before any folder or loading
    lock = dist.on_main(lock_run_folder, run_dir)  # refused (on every process) if another run holds it
    try:
        # the others wait: none reads a half-made folder
        dist.on_main(prepare_run_dir, run_dir, cfg, overwrite)
        try:
            command = current_command() if command is None else command
            return _run(cfg, resolved, run_dir, device, callbacks, progress, command, on_score)
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


def _run(cfg, resolved: Resolved, run_dir: Path, device, callbacks, progress, command: str, on_score) -> dict:
    """The stages, in order: questions, model, training (or its saved result), evaluation, card, results."""
    if (run_dir / METRICS_FILE).exists():
        log.info("%s: finished already (metrics.json); pass --overwrite to run it again", run_dir)
        return read_json(run_dir / METRICS_FILE)
    questions = load_questions(cfg)
    set_seed(cfg.train.seed)
    lm, model = _load_model(cfg, resolved, device)
    reset_peak_memory(lm.device)  # peak memory counts training and evaluation, not loading
    model, train_metrics = _trained(cfg, resolved, run_dir, model, lm, questions, callbacks, on_score)
    if train_metrics.get("pruned_at"):  # a search stopped this trial: its in-training scores are its record
        return _save_pruned(cfg, run_dir, lm, train_metrics, questions.info, command)
    attention = resolve_attention(cfg.model.attn_implementation, lm.device)  # to answer with
    model = prepare_for_generation(
        model, merge=cfg.eval.merge_adapter, precision=lm.precision, attention=attention
    )
    records, metrics = _evaluate(cfg, run_dir, model, lm, questions.dev, train_metrics, progress)
    model_type = getattr(lm.model.config, "model_type", None)
    card = model_card(cfg, metrics, data=questions.info, command=command, model_type=model_type)
    if resolved.tensorboard:
        dist.on_main(log_final_scores, run_dir, metrics, metrics.get("train_steps") or 0)
    # the main process's figures, on every process
    return write_results(run_dir, records, metrics, card=card)


# ---------------------------------------------------------------------------------------------- questions


@dataclass
class Questions:
    """The questions of a run, by use."""

    train: list
    dev: list  # the final evaluation's: data.eval_limit of them after the first data.eval_skip
    score: list  # scored during training (eval.score_steps): the first data.score_limit read
    info: dict  # what was read, for the model card


def load_questions(cfg: ExperimentConfig) -> Questions:
    """The questions the config asks for, with one line of load report a split. A split without one usable
    question stops the run here, naming its file, before any model is loaded."""
    train, train_report, train_source = data_mod.load_split(cfg.data, "train", limit=cfg.data.train_limit)
    dev, dev_report, dev_source = data_mod.load_split(cfg.data, "dev", limit=_dev_limit(cfg))
    log.info(train_report.summary())
    log.info(dev_report.summary())
    for source, examples, report in ((train_source, train, train_report), (dev_source, dev, dev_report)):
        if not examples and report.n_questions_in_file == sum(report.skipped.values()):
            raise data_mod.DataError(f"{source}: no usable question ({report.summary()})")
    info = {
        "format": cfg.data.format,
        "train": Path(train_source).name,
        "dev": Path(dev_source).name,
        "train_questions": len(train),
    }
    score = dev[: cfg.data.score_limit] if cfg.eval.score_steps else []
    return Questions(train=train, dev=data_mod.evaluated(cfg.data, dev), score=score, info=info)


def _dev_limit(cfg: ExperimentConfig) -> int | None:
    """The dev questions to read: the evaluated ones, and the in-training slice when there is one."""
    limit = data_mod.evaluated_read_limit(cfg.data)
    if not cfg.eval.score_steps or limit is None:
        return limit
    return max(limit, cfg.data.score_limit)


# ---------------------------------------------------------------------------------------------- the model


def _load_model(cfg: ExperimentConfig, resolved: Resolved, device):
    """The loaded base (tokenizer, device, precision) and the model to train: the base itself, or wrapped in a
    LoRA adapter."""
    lm = load_model(cfg.model, device, seed=cfg.train.seed, trainable_base=resolved.full, training=True)
    limit = position_limit(lm.model)
    if limit is not None and cfg.prompt.max_length > limit:  # a long example would index past the positions
        raise ConfigError(
            f"prompt.max_length: {cfg.prompt.max_length} is more than {cfg.model.name} takes "
            f"({limit} positions); set prompt.max_length={limit} or less"
        )
    check_answer_room(limit, cfg.eval.max_new_tokens)  # here, not after the training
    if resolved.full:
        return lm, lm.model
    return lm, apply_lora(lm.model, cfg.lora)


# ---------------------------------------------------------------------------------------------- training


def _trained(cfg, resolved: Resolved, run_dir: Path, model, lm, questions: Questions, callbacks, on_score):
    """(the trained model, the training's metrics): trained now, resuming from a checkpoint if there is one, or
    the saved result of a run interrupted between training and the end of its evaluation."""
    train_metrics_path = run_dir / TRAIN_METRICS_FILE
    if train_metrics_path.exists():
        train_metrics = read_json(train_metrics_path)
        model = load_trained(model, run_dir, resolved.full, lm.device)
        # checkpoints a kill left while they were being removed
        dist.on_main(shutil.rmtree, run_dir / CHECKPOINTS_DIR, ignore_errors=True)
        return model, train_metrics
    trainable, total = count_parameters(model)
    train_metrics = _train(cfg, resolved, run_dir, model, lm, questions, callbacks, on_score)
    train_metrics.update(trainable_params=trainable, total_params=total)
    dist.on_main(
        _save_training,
        model,
        lm.tokenizer,
        run_dir,
        train_metrics,
        full=resolved.full,
        base_name=cfg.model.name,
    )
    return model, train_metrics


def _train(
    cfg, resolved: Resolved, run_dir: Path, model, lm, questions: Questions, callbacks, on_score
) -> dict:
    """Train (from the last checkpoint, if any); the training's figures for metrics.json."""
    train_features, train_stats, loss_eval_features = _encode(
        cfg, lm.tokenizer, questions, resolved.share_contexts
    )
    clock, interrupt = ClockCallback(lm.device), InterruptCallback()
    scorer = ScoreCallback(lm.tokenizer, list(questions.score), cfg, on_score=on_score)
    # the clock last: at a step's end it sees every save asked for, the interrupt callback's included
    tensorboard = [tensorboard_callback(run_dir)] if resolved.tensorboard else []
    loop = [
        JsonlLogCallback(run_dir / LOG_FILE),
        FiniteLossCallback(),
        scorer,
        *(callbacks or []),
        *tensorboard,
        interrupt,
        clock,
    ]
    trainer = _make_trainer(cfg, resolved, run_dir, model, lm, train_features, loss_eval_features, loop)
    clock.trainer = scorer.trainer = trainer
    # on the main process: it removes half-written checkpoints, and every process must resume from the same
    resume = dist.on_main(last_checkpoint, run_dir / CHECKPOINTS_DIR)
    if resume:
        log.info("resuming from %s", resume)
    clock.resume_from(resume)
    _fit(trainer, resume, clock, interrupt, full=resolved.full, patience=cfg.train.early_stopping_patience)
    totals = clock.totals()  # read now: the clock runs on, and the final evaluation is no training
    scored = _scoring_summary(trainer, cfg, resolved.full, len(scorer.examples))
    totals["train_seconds"] = max(totals["train_seconds"] - scored.get("score_seconds", 0.0), 0.0)
    final_eval = _final_eval_loss(trainer, scored.get("kept_step"))
    dist.on_main(write_jsonl_atomic, run_dir / LOG_FILE, trainer.state.log_history)
    return {
        "train_examples": len(train_features),
        "train_prompt_stats": {
            "encoded": train_stats.encoded,
            "truncated": train_stats.truncated,
            "skipped": dict(train_stats.skipped),
        },
        "train_steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "resumed_from": os.path.basename(resume) if resume else None,
        "resumed_at_step": clock.start_step,  # the step the Trainer restored, read from the Trainer
        "fast_loss": trainer.fast_loss,  # False where the config or the model family ruled it out
        "train_attn_implementation": dist.unwrap(trainer.model).config._attn_implementation,
        **_throughput(totals, resolved.share_contexts),
        "train_one_row": getattr(trainer.data_collator, "one_row", False),  # train.one_row as resolved
        "train_compile": trainer.compiled,  # train.compile as resolved: layers, norms or off
        # part of train_seconds: this process's compilation (a resumed run compiles again)
        **({"compile_seconds": compile_seconds()} if trainer.compiled != "off" else {}),
        **_final_losses(trainer.state.log_history, final_eval),
        **scored,
    }


def _encode(cfg: ExperimentConfig, tok, questions: Questions, shared: bool):
    """The training features and their statistics, and the features of the logged eval loss."""
    encoder = PromptEncoder(tok, cfg.prompt)
    no_answer = cfg.data.no_answer_text()
    train_features, train_stats = encode_train_set(encoder, questions.train, no_answer)
    if not train_features:
        raise ConfigError(f"no training examples left after encoding ({train_stats.summary()})")
    # The logged eval loss is always the loss on the answer tokens (+ EOS), whatever prompt.loss_on trains on:
    # it is what the generated answers depend on, and it keeps the loss_on=answer and =all runs comparable.
    answer_encoder = (
        encoder if encoder.loss_on == "answer" else PromptEncoder(tok, cfg.prompt, loss_on="answer")
    )
    loss_eval_features, _ = encode_train_set(
        answer_encoder, questions.dev[: cfg.data.loss_eval_limit], no_answer
    )
    log.info("train prompts: %s", train_stats.summary())
    if cfg.train.share_contexts and not shared:
        why = "prompt.loss_on=all" if cfg.prompt.loss_on != "answer" else "flash_attention_2"
        log.warning("train.share_contexts: %s trains on stand-alone examples", why)
    return train_features, train_stats, loss_eval_features


def _make_trainer(
    cfg, resolved: Resolved, run_dir: Path, model, lm, train_features, loss_eval_features, callbacks: list
) -> QATrainer:
    compiling = resolve_compile(cfg.train.compile, lm.device, planned_steps(cfg.train, len(train_features)))
    args = training_arguments(
        cfg.train,
        run_dir / CHECKPOINTS_DIR,
        per_process_batch=resolved.per_process_batch,
        reporters=list(resolved.reporters),
        precision=lm.precision,
        device=lm.device,
        eval_loss=bool(loss_eval_features),
    )
    return QATrainer(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=loss_eval_features if cfg.train.eval_steps and loss_eval_features else None,
        data_collator=train_collator(cfg, resolved, lm, compiling),
        # no processing_class: a checkpoint must not hold the tokenizer, which loraqa reloads by name. The
        # Trainer would copy it (3.5 MB for GPT-2) into every checkpoint, and the tokenizers library writes
        # tokenizer.json without reporting a full disk: a truncated file in a checkpoint that looks complete.
        callbacks=callbacks,
        fast_loss=cfg.train.fast_loss,
        share_contexts=resolved.share_contexts,
        base_name=cfg.model.name,
        compiling=compiling,
    )


def train_collator(cfg: ExperimentConfig, resolved: Resolved, lm, compiling: str):
    """The training batches' collator: shared-context rows (in one row where :func:`one_row` says) or padded
    stand-alone examples."""
    pad, multiple = lm.tokenizer.pad_token_id, cfg.train.pad_to_multiple
    if resolved.share_contexts:
        return SharedContextCollator(pad, multiple, one_row=one_row(cfg, lm.model, compiling))
    return QACollator(pad, multiple, max_width=cfg.prompt.max_length)


def one_row(cfg: ExperimentConfig, model, compiling: str) -> bool:
    """``train.one_row`` as it applies: where the training attention reads segments (eager_lean), and not with
    compiled layers, which would compile again for every new number of segments (a list's length is a guard;
    with the segments' attention run eager between the layers' compiled graphs, their steps were no faster on
    the AMD VM: docs/performance.md)."""
    return cfg.train.one_row and reads_segments(model) and compiling != "layers"


def _fit(trainer, resume: str | None, clock, interrupt, *, full: bool, patience: int) -> None:
    """Train, from the checkpoint ``resume`` if there is one. A stop signal saves a checkpoint at the step
    reached and ends in :class:`Interrupted`."""
    finished = read_json(Path(resume) / TRAINER_STATE_FILE) if resume else {}
    if finished and _training_ended(finished, patience):
        # a checkpoint at the end of training (killed before the trained weights were saved) is taken as it
        # is: resumed from, the Trainer (transformers 5.24) would run one step more than an uninterrupted run
        load_checkpoint_weights(dist.unwrap(trainer.model), Path(resume), full)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / TRAINER_STATE_FILE))
        clock.start_step = trainer.state.global_step
        return
    with interrupt.armed():
        trainer.train(resume_from_checkpoint=resume)
    step = interrupt.stopped_at
    if step is not None:
        raise Interrupted(interrupt.signum, step, Path(trainer.args.output_dir) / checkpoint_name(step))
    if interrupt.signum is not None:  # it came after the last step's end: stop as a plain Ctrl-C does
        raise KeyboardInterrupt


def _training_ended(state: dict, patience: int) -> bool:
    """Whether a checkpoint's trainer state is the end of training: its planned steps done, an early stop or
    a search's pruning (each saved at the step it stopped at)."""
    planned = state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]
    history = state.get("log_history", [])
    return planned or patience_ran_out(history, patience) or pruned_at(history) is not None


def _scoring_summary(
    trainer, cfg: ExperimentConfig, full: bool, n_questions: int
) -> dict:
    """What the in-training scores decided, for metrics.json, read from the Trainer's log history alone (so a
    resumed run reaches the same): with ``train.keep_best`` the model gets the best scoring's weights back
    from its checkpoint (the final evaluation and the saved adapter are that one)."""
    history, step = trainer.state.log_history, trainer.state.global_step
    best = best_scoring(history)
    if best is None:
        return {}
    out = {
        "score_steps": cfg.eval.score_steps,
        "score_questions": n_questions,
        "scorings": len(scorings(history)),
        "score_seconds": score_seconds(history),
        "best_step": best[0],
        "best_eval_f1": best[1],
        # an early stop ends training at the scoring that ran out of patience
        "stopped_early_at": step if patience_ran_out(history, cfg.train.early_stopping_patience) else None,
        "pruned_at": pruned_at(history),
    }
    if cfg.train.keep_best:
        out["kept_step"] = best[0]
        if best[0] != step:
            checkpoint = Path(trainer.args.output_dir) / checkpoint_name(best[0])
            load_checkpoint_weights(dist.unwrap(trainer.model), checkpoint, full)
            log.info(
                "keep_best: the adapter of step %d (eval_f1 %.2f on %d questions) is the run's",
                best[0],
                best[1],
                n_questions,
            )
    return out


TOKENS_COUNTED = {  # what metrics.json's train_tokens count, by layout
    False: "non-padding tokens computed (every question with its own copy of its context)",
    True: "non-padding tokens computed (each shared context once per batch row)",
}


def _throughput(totals: dict, shared: bool) -> dict:
    """Train time, tokens, questions and peak memory: the sums over every segment of an interrupted run (see
    :class:`~loraqa.callbacks.ClockCallback`)."""
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


def _final_eval_loss(trainer, kept_step: int | None) -> dict:
    """``{"eval_loss": ...}`` of the weights the run keeps, over the eval-loss questions ({} without them): the
    loss the Trainer logged at the last step where it evaluated there, else one pass now; for keep_best's
    earlier adapter, logged as ``kept_eval_loss`` (at the last step, but not that step's weights)."""
    if trainer.eval_dataset is None:
        return {}
    step = trainer.state.global_step
    if kept_step is not None and kept_step != step:
        return {"eval_loss": trainer.evaluate(metric_key_prefix="kept_eval")["kept_eval_loss"]}
    logged = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
    return {"eval_loss": logged[-1]} if logged else trainer.evaluate()


def _final_losses(history: list[dict], final_eval: dict) -> dict:
    """The last logged train loss, and the eval loss of the final pass (else the last logged one)."""
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    losses = {
        "final_train_loss": train[-1] if train else None,
        "final_eval_loss": evals[-1] if evals else None,
    }
    if final_eval:
        losses["final_eval_loss"] = final_eval["eval_loss"]
        losses["eval_loss_on"] = "answer"  # see _encode; runs without this key logged prompt.loss_on's loss
    return losses


def _save_training(model, tok, run_dir: Path, train_metrics: dict, *, full: bool, base_name: str) -> None:
    save_trained(dist.unwrap(model), tok, run_dir, full, base_name=base_name)
    write_json_atomic(run_dir / TRAIN_METRICS_FILE, train_metrics)
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- results


def _evaluate(
    cfg: ExperimentConfig, run_dir: Path, model, lm, dev: list, train_metrics: dict, progress: bool
):
    """The final evaluation's per-question records and metrics.json's content."""
    answerer = Answerer(cfg, model, lm.tokenizer, lm.precision, lm.device)
    records, summary = answerer.answer(
        dev, progress=progress and dist.is_main_process(), journal=run_dir / ANSWER_JOURNAL_FILE
    )
    peak = max(dist.max_across(peak_memory_mb(lm.device)), train_metrics.get("peak_memory_mb", 0))
    metrics = {
        "exact_match": summary["exact_match"],
        "f1": summary["f1"],
        "n_questions": summary["n_questions"],
        **{k: summary[k] for k in V2_KEYS if k in summary},  # SQuAD 2.0
        **train_metrics,
        "eval_seconds": summary["eval_seconds"],
        "eval_questions_per_second": summary["eval_questions_per_second"],
        "eval_prompts_truncated": summary["eval_prompts_truncated"],
        "eval_questions_cut": summary["eval_questions_cut"],
        "peak_memory_mb": round(peak, 1),  # the largest of any process
        "model": cfg.model.name,
        "method": cfg.train.method,
        "precision": lm.precision,
        "device": str(lm.device),
        "world_size": dist.world_size(),  # processes (one per GPU); batch_size is their sum, see config.py
        "torch_threads": torch.get_num_threads(),  # per process
        "allocator": allocator(),  # tcmalloc where the command found it (loraqa.launch)
    }
    return records, metrics


def _save_pruned(
    cfg: ExperimentConfig, run_dir: Path, lm, train_metrics: dict, data_info: dict, command: str
):
    """A trial a search stopped: no final evaluation; its in-training scores are its record."""
    pruned = {
        **train_metrics,
        "pruned": True,
        "exact_match": None,
        "f1": None,
        "n_questions": 0,
        "model": cfg.model.name,
        "method": cfg.train.method,
        "precision": lm.precision,
    }
    card = model_card(cfg, pruned, data=data_info, command=command)
    return write_results(run_dir, [], pruned, card=card)

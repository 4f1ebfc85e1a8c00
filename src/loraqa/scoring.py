"""Judge a run by its generated answers while it trains: EM/F1 on a fixed dev slice every ``eval.score_steps``
optimizer steps, the best adapter kept (``train.keep_best``), training stopped when F1 stops improving
(``train.early_stopping_patience``).

The loss does not track the score (in the full study F1 rose 7.4 points while the answer-token loss barely
moved), so these decisions read the generated answers' F1, computed by the same generator as the final
evaluation. Everything they need is in the Trainer's ``log_history`` (restored from a checkpoint on resume),
so they resume after a kill exactly where they were: nothing else is kept.
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

from . import dist
from .answering import Answerer
from .metrics import (
    EM_KEY,
    F1_KEY,
    LOSS_KEY,
    METRIC,
    PRUNED_KEY,
    SCORE_SECONDS_KEY,
    best_scoring,
    patience_ran_out,
)
from .model import recompile, uncompile

log = logging.getLogger(__name__)


class ScoreCallback(TrainerCallback):
    """Every ``every`` steps: answer ``examples`` greedily, log EM/F1 through the Trainer (log_history.jsonl,
    TensorBoard, the progress line), ask for a checkpoint when F1 is a new best (``keep_best``: the Trainer
    keeps that checkpoint as ``best_model_checkpoint`` past its rotation), and stop once ``patience`` scorings
    in a row have not beaten the best. ``on_score(step, scores)`` hears each scoring, with the last logged train
    ``loss`` (a search's pruner), and returns True to stop the trial there (pruned)."""

    def __init__(self, tokenizer, examples, cfg, *, on_score=None):
        self.tokenizer, self.examples, self.cfg = tokenizer, examples, cfg
        self.every, self.keep_best = cfg.eval.score_steps, cfg.train.keep_best
        self.patience = cfg.train.early_stopping_patience
        self.on_score = on_score
        self.trainer = None  # set once the trainer exists: scores are logged through it

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.every or state.global_step % self.every or not self.examples:
            return
        # Trainer.log clears control.should_log, which the Trainer reads after this callback to log the step's
        # own train loss: a scoring step must log the same losses as a run without scorings
        should_log = control.should_log
        try:
            self._scoring(state, control, model)
        finally:
            control.should_log = should_log

    def _scoring(self, state, control, model) -> None:
        scores = self.score(model)
        self.trainer.log(scores)
        best = best_scoring(state.log_history)
        if self.keep_best and best and best[0] == state.global_step:
            state.best_global_step, state.best_metric = best
            control.should_save = True
        if patience_ran_out(state.log_history, self.patience):
            control.should_training_stop = control.should_save = (
                True  # a rerun finds the stop in this checkpoint
            )
            if dist.is_main_process():
                log.info(
                    "early stopping at step %d: no better %s in %d scorings (best %.2f at step %d)",
                    state.global_step,
                    METRIC,
                    self.patience,
                    best[1],
                    best[0],
                )
        last_loss = next((h[LOSS_KEY] for h in reversed(state.log_history) if LOSS_KEY in h), None)
        heard = {**scores, **({LOSS_KEY: last_loss} if last_loss is not None else {})}
        if self.on_score is not None and self.on_score(state.global_step, heard):
            # a search's pruner: stop here, with a checkpoint, and skip the final evaluation; logged before the
            # checkpoint is saved, so a run stopped or killed now resumes as pruned (metrics.pruned_at)
            self.trainer.log({PRUNED_KEY: state.global_step})
            control.should_training_stop = control.should_save = True

    def score(self, model) -> dict:
        """EM/F1 of the model's greedy answers to the slice (in eval mode; training mode is restored)."""
        start = time.perf_counter()
        inner = dist.unwrap(model)
        was_training = inner.training
        inner.eval()
        # generation's shapes (a growing cache, one token a step) would compile compiled layers again
        compiled = uncompile(inner)
        try:
            _, summary = Answerer(self.cfg, inner, self.tokenizer).answer(self.examples)
        finally:
            recompile(compiled)
            inner.train(was_training)
        return {
            EM_KEY: summary["exact_match"],
            F1_KEY: summary["f1"],
            SCORE_SECONDS_KEY: round(time.perf_counter() - start, 3),
        }

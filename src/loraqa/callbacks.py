"""What loraqa adds to the Trainer's loop as callbacks: the log file, a stop on a non-finite loss, a checkpoint
on Ctrl-C or SIGTERM, and a train clock that survives interruptions.

The in-training scoring (keep the best, stop early) is :mod:`loraqa.scoring`'s callback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from . import dist, signals
from .devices import peak_memory_mb
from .io import read_json, write_json_atomic, write_jsonl_atomic
from .layout import CLOCK_FILE, checkpoint_name

log = logging.getLogger(__name__)


class JsonlLogCallback(TrainerCallback):
    """Rewrites ``log_history.jsonl`` (atomically) whenever the Trainer logs."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            write_jsonl_atomic(self.path, state.log_history)


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the message says at which step and what to try."""


FINITE_KEYS = ("loss", "grad_norm", "eval_loss", "kept_eval_loss", "train_loss")


class FiniteLossCallback(TrainerCallback):
    """Stops training when a logged loss or gradient norm is NaN or infinite (checked every
    ``train.logging_steps`` steps, as the Trainer logs: no extra synchronisation per step). The Trainer logs
    before it saves, so no checkpoint is saved after a non-finite logged loss."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in FINITE_KEYS:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise TrainingDiverged(
                    f"training diverged: {key} is {value} at step {state.global_step}; lower train.lr "
                    f"(now {args.learning_rate:g}) or use model.precision=fp32, then rerun with --overwrite"
                )


class Interrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint at the step it had reached."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}: saved {checkpoint.name}; rerun the same "
            "command to resume from it"
        )


# A signal this soon after the first is the same request delivered twice (a terminal's Ctrl-C reaches a whole
# process group, and launchers pass it on to their workers); a later one means "stop now", as a second Ctrl-C.
REPEAT_WINDOW_SECONDS = 2.0


class InterruptCallback(TrainerCallback):
    """Ctrl-C or SIGTERM while the Trainer trains: finish the step, save a checkpoint there, stop.

    A stop must lose no step since the last ``train.save_steps`` checkpoint (up to 250 steps, ten minutes, in
    the full study), and the Trainer has no such switch, so this adds one: while :meth:`armed` holds, the two
    signals only set a flag, and the next step end asks the Trainer to save and stop. After ``trainer.train``
    returns, :attr:`stopped_at` says whether it did. Under several processes the ranks agree on the flag at
    every step end (one small gather), so they all save and stop at the same step; a second signal later than
    :data:`REPEAT_WINDOW_SECONDS` raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum: int | None = None  # the first stop signal received
        self.received_at = 0.0
        self.stopped_at: int | None = None  # the step saved and stopped at

    def handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
            if dist.is_main_process():
                log.warning(
                    "%s: saving a checkpoint after this step, then stopping (again to stop at once)",
                    signal.Signals(signum).name,
                )
        elif time.monotonic() - self.received_at > REPEAT_WINDOW_SECONDS:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def armed(self):
        """The handlers, for the duration of training (in the main thread only: see signals.handling)."""
        with signals.handling(signals.STOP_SIGNALS, self.handle):
            yield self

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.signum or 0
        if dist.world_size() > 1:
            signum = int(dist.max_across(signum))
        if signum:
            self.signum, self.stopped_at = signum, state.global_step
            # no log forced here: the checkpoint keeps the losses since the last log (ClockCallback), so the
            # resumed run logs at the steps and values an uninterrupted one does
            control.should_save = control.should_training_stop = True


class ClockCallback(TrainerCallback):
    """Keeps train time, real tokens and peak memory across interruptions.

    The Trainer restores the model, optimizer and step from a checkpoint, but not how long the steps before it
    took, so a resumed run's own timer would count only its last segment. On every save this writes the
    totals so far into the checkpoint folder (``loraqa_clock.json``); a resumed run starts from them.

    Nor does it restore the training loss summed since its last log (``logging_steps``): resumed, its next
    log would average the resumed steps alone. The clock keeps that sum (the processes' mean, as the log
    takes it) and the step of the last log as ``loss_window``, and puts them back when training begins.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.trainer = None  # set once the trainer exists (its real-token count is read on save)
        self.prior = {
            "train_seconds": 0.0,
            "train_tokens": 0,
            "train_questions": 0,
            "peak_memory_mb": 0.0,
            "segments": 0,
        }
        self.start = None
        self.start_step = 0

    def resume_from(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = Path(checkpoint) / CLOCK_FILE
        pending = Path(checkpoint).parent / CLOCK_FILE  # written just before that checkpoint (on_step_end)
        step = int(Path(checkpoint).name.rsplit("-", 1)[-1])
        if path.is_file():
            self.prior = read_json(path)
        elif pending.is_file() and read_json(pending).get("step") == step:
            self.prior = {k: v for k, v in read_json(pending).items() if k != "step"}
        else:  # a checkpoint saved without a clock: the time before it is unknown
            log.warning(
                "%s has no %s: train time and tokens/s will cover only the resumed part",
                checkpoint,
                CLOCK_FILE,
            )
            self.prior = dict(self.prior, incomplete=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.start_step = state.global_step  # where the Trainer itself resumed (0: from the start)
        window = self.prior.get("loss_window")
        if window and self.trainer is not None and window["since"] <= state.global_step:
            self.trainer._tr_loss += window["sum"]  # the Trainer's running sum (transformers 5), zero here
            self.trainer._globalstep_last_logged = window["since"]
            # the Trainer's end-of-train mean (train_loss) is over this segment's steps alone: the restored sum
            # moves into its total at the next log, so it is taken out of that total here
            self.trainer._total_loss_scalar -= window["sum"]

    def _loss_window(self, state, logs_now: bool) -> dict | None:
        """The training loss summed since the last log, the processes' mean, and that log's step; every process
        calls it (it gathers). ``logs_now``: the Trainer logs at this step before saving, emptying the sum."""
        trainer = self.trainer
        if trainer is None or not isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor):
            return None
        if logs_now:
            return {"sum": 0.0, "since": state.global_step}
        total = dist.sum_across(float(trainer._tr_loss.detach().float().item()))
        return {"sum": total / dist.world_size(), "since": trainer._globalstep_last_logged}

    def totals(self) -> dict:
        """The run's totals so far: the main process's time, every process's tokens and questions, the
        largest peak memory of a process. Every process calls it (it gathers)."""
        seconds = time.perf_counter() - self.start if self.start is not None else 0.0
        tokens = dist.sum_across(self.trainer.real_train_tokens if self.trainer is not None else 0)
        questions = dist.sum_across(self.trainer.train_questions if self.trainer is not None else 0)
        out = {
            "train_seconds": self.prior["train_seconds"] + seconds,
            "train_tokens": self.prior["train_tokens"] + tokens,
            "train_questions": self.prior.get("train_questions", 0) + questions,
            "peak_memory_mb": max(self.prior["peak_memory_mb"], dist.max_across(peak_memory_mb(self.device))),
            "segments": self.prior["segments"] + 1,
        }
        if self.prior.get("incomplete"):
            out["incomplete"] = True
        return out

    def on_step_end(self, args, state, control, **kwargs):
        # a checkpoint is about to be saved (the Trainer's schedule, or a callback before this one, such as
        # the interrupt callback). The Trainer deletes the older checkpoint, clock and all, as soon as the
        # new one is complete, before on_save writes the new clock: these totals, beside the checkpoints,
        # bridge that moment (resume_from reads them when the checkpoint of their step has no clock).
        if control.should_save:
            last_log = getattr(self.trainer, "_globalstep_last_logged", -1)
            window = self._loss_window(state, logs_now=control.should_log and state.global_step > last_log)
            self._write(Path(args.output_dir) / CLOCK_FILE, state, window, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / checkpoint_name(state.global_step)
        self._write(folder / CLOCK_FILE, state, self._loss_window(state, False), only_into_existing=True)

    def _write(
        self,
        path: Path,
        state,
        window: dict | None,
        step: int | None = None,
        only_into_existing: bool = False,
    ) -> None:
        totals = self.totals()  # on every process: it gathers
        if window is not None:
            totals["loss_window"] = window
        if state.is_world_process_zero and (path.parent.is_dir() or not only_into_existing):
            write_json_atomic(path, totals if step is None else {**totals, "step": step})

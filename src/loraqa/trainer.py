"""The Hugging Face Trainer, fitted to extractive QA: what ``loraqa train`` adds to it and nothing else.

- :class:`QACollator` pads a batch (right padding, label -100 on padding);
- :func:`labelled_positions_loss` runs the output layer only where labels are (the ~50k-wide vocabulary
  projection is skipped at prompt positions), for the model families :func:`fast_loss_supported` allows;
- :class:`LengthGroupedBatches` batches examples of similar lengths;
- :func:`make_trainer_class` is the Trainer subclass using them (bf16 autocast, a real-token count);
- the callbacks write ``log_history.jsonl``, keep the train clock across interruptions and turn Ctrl-C or
  SIGTERM into a checkpoint at the step reached (:func:`make_interrupt_callback`);
- :func:`training_arguments` maps an experiment config onto ``TrainingArguments``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from . import dist, signals
from .config import ConfigError, ExperimentConfig
from .devices import peak_memory_mb
from .io import read_json, write_json_atomic, write_jsonl_atomic
from .layout import CLOCK_FILE, TENSORBOARD_DIR
from .packing import SharedContextBatches
from .prompt import IGNORE_INDEX
from .rundir import make_portable

log = logging.getLogger(__name__)


class QACollator:
    """Pads a batch to its longest example (right padding); padded positions get label -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def labelled_positions_loss(model, batch: dict, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM cross-entropy computed only at labelled positions.

    transformers' own loss runs the output layer (hidden x vocab) at every position and then ignores all
    but the few answer tokens; here the decoder's hidden states are gathered at the labelled positions
    first, so the output layer and the softmax see only those. Same value as the model's loss
    (sum over labelled tokens / ``num_items``, or their mean).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids")
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    denominator = num_items if num_items is not None else keep.sum()
    return loss / denominator


# Families whose causal-LM head is ``logits = lm_head(hidden)`` and whose loss is plain cross-entropy over those
# logits, so that the labelled-positions loss is theirs; each is proven by a parity test (tests/test_parity.py).
# Others may post-process the logits (Gemma 2 soft-caps them, Granite divides them by ``logits_scaling``,
# Cohere multiplies them by ``logit_scale``), which the fast path would silently skip.
FAST_LOSS_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
# config attributes that change the logits after the output layer, checked even for a listed family
LOGIT_MODIFIERS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier_scale")


def fast_loss_blocker(model) -> str | None:
    """Why the labelled-positions loss might differ from ``model``'s own loss, or None where it cannot."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAST_LOSS_FAMILIES:
        return f"model family {family!r} is not one whose loss the fast path is proven to equal"
    for name in LOGIT_MODIFIERS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"its config sets {name}={value}, which the fast path would skip"
    return None


def fast_loss_supported(model) -> bool:
    """True where the labelled-positions loss equals the model's own (see :data:`FAST_LOSS_FAMILIES`)."""
    return fast_loss_blocker(model) is None


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder's blocks (``model.layers`` for Llama, ``transformer.h`` for GPT-2), under a PEFT wrapper."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = lm.config.num_hidden_layers
    for module in lm.get_decoder().children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    return []


class LengthGroupedBatches(Sampler):
    """Batches of similar lengths in a random order (``train.group_by_length``).

    Each epoch the examples are shuffled, cut into mega-batches of 50 batches, sorted by length
    inside each and cut into batches of ``group`` (batch size x gradient accumulation); the full
    batches are shuffled, the longest first (an out-of-memory error shows at once), a short last
    batch last. On the first 240 SQuAD train examples ~98% of the computed tokens are real (random
    batches: ~64%; the Trainer's ``LengthGroupedSampler``, whose mega-batches shrink to a quarter of
    a small data set and whose batches run from longest to shortest: ~91%). Each epoch's permutation
    comes from a generator seeded with (``seed``, epoch) -- the Trainer calls :meth:`set_epoch` -- not from
    torch's global one: a run resumed in a later epoch then sees the batches an uninterrupted run saw (the
    global generator, restored from the checkpoint, is past the permutation), and under DDP every process
    draws the same permutation (``group`` is then the global batch; accelerate deals each its share).
    """

    def __init__(self, lengths: list[int], group: int, mega: int = 50, seed: int = 0):
        self.lengths, self.group, self.mega, self.seed, self.epoch = list(lengths), group, mega, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        epoch_gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        perm = torch.randperm(len(self.lengths), generator=epoch_gen).tolist()
        size = self.mega * self.group
        batches = []
        for start in range(0, len(perm), size):
            mega = sorted(perm[start : start + size], key=lambda i: -self.lengths[i])
            batches += [mega[j : j + self.group] for j in range(0, len(mega), self.group)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.group else []
        gen = torch.Generator().manual_seed(sum(i * p for i, p in enumerate(perm[:64], 1)))
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches[0], batches[longest] = batches[longest], batches[0]
        return iter([i for batch in batches + tail for i in batch])


def make_trainer_class():
    import contextlib

    from transformers import Trainer, TrainerCallback
    from transformers.trainer import TRAINING_ARGS_NAME

    class SamplerEpoch(TrainerCallback):
        """Tells the trainer's epoch-seeded sampler which epoch begins. The Trainer's own ``set_epoch`` does not
        reach it in a run resumed under DDP: accelerate's skip-batches wrapper adds a level that neither the
        Trainer nor ``DataLoaderShard.set_epoch`` looks through, so the sampler would replay epoch 0's order.
        ``state.epoch`` is the whole number ``e`` when epoch ``e`` begins, ``e`` + a fraction when resumed in it.
        """

        def __init__(self, trainer):
            self.trainer = trainer

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.trainer.epoch_sampler is not None:
                self.trainer.epoch_sampler.set_epoch(int(state.epoch or 0))

    class QATrainer(Trainer):
        """The HF Trainer with the labelled-positions loss (``fast_loss``) and a count of real tokens.

        The labelled-positions loss runs only where :func:`fast_loss_supported` says it equals the model's own;
        elsewhere the Trainer computes the model's own loss, and says so in one log line.

        With ``bf16`` the loss runs under bf16 autocast (the Trainer autocasts only ``model.forward``, which
        the labelled-positions loss does not call) and PEFT's LoRA layers skip their cast of the activations
        to the adapters' fp32: autocast runs the adapter matmuls in bf16 anyway, so the cast only cost a copy
        of the hidden state (and an fp32 dropout mask) per adapted layer. Adapters, their gradients and the
        optimizer state stay fp32.
        """

        def __init__(self, *args, fast_loss: bool = True, share_contexts: bool = False, base_name: str | None = None,
                     **kwargs):  # fmt: skip
            super().__init__(*args, **kwargs)
            self.base_name = base_name  # the config's model name, for the checkpoints' adapter_config.json
            blocker = fast_loss_blocker(self.model) if fast_loss else None
            if blocker:
                log.warning("train.fast_loss: using the model's own full-vocabulary loss instead: %s", blocker)
                fast_loss = False
            self.fast_loss = fast_loss
            self.share_contexts = share_contexts  # paragraph-ordered batches for SharedContextCollator
            self.real_train_tokens = 0  # non-padding positions computed (a shared context counts once a row)
            self.train_questions = 0
            self.epoch_sampler = None  # the sampler, where its order depends on the epoch
            self.add_callback(SamplerEpoch(self))
            if fast_loss:
                self.loss_is_scaled_for_ga = True  # divided by the tokens of the whole accumulated batch
                if self.args.torch_compile:
                    # the labelled-positions loss calls the decoder, not the (compiled) model.forward:
                    # compile the decoder layers instead (they share one compiled graph)
                    for layer in decoder_layers(self.model):
                        layer.compile(dynamic=True)
            self._lora_layers = []
            if self.args.bf16:
                from peft.tuners.tuners_utils import BaseTunerLayer

                self._lora_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

        @contextlib.contextmanager
        def _no_input_cast(self):
            """PEFT's cast of the activations to the adapters' dtype off, and back as it was after."""
            before = [layer.cast_input_dtype_enabled for layer in self._lora_layers]
            for layer in self._lora_layers:
                layer.cast_input_dtype_enabled = False
            try:
                yield
            finally:
                for layer, was in zip(self._lora_layers, before, strict=True):
                    layer.cast_input_dtype_enabled = was

        @contextlib.contextmanager
        def _low_precision(self):
            if not self.args.bf16:
                yield
                return
            with self._no_input_cast(), self.accelerator.autocast():
                yield

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            # each checkpoint's weights; written before its trainer_state.json, so a checkpoint complete enough
            # to resume from (or to sync to another machine) never holds a path of this one
            super()._save(output_dir, state_dict=state_dict)
            folder = Path(output_dir or self.args.output_dir)
            make_portable(folder, self.base_name)
            # a pickle of these TrainingArguments, output_dir included; nothing reads it back (resuming rebuilds
            # the arguments from config.yaml), and a pickle is no file to hand to another machine's torch.load
            (folder / TRAINING_ARGS_NAME).unlink(missing_ok=True)

        def training_step(self, *args, **kwargs):
            # held over the backward pass too: gradient checkpointing recomputes the forward there, and
            # torch refuses a recomputation whose tensors differ from the first forward's
            with self._no_input_cast():
                return super().training_step(*args, **kwargs)

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            by_length = self.args.train_sampling_strategy == "group_by_length"
            # the global batch: accelerate deals each process its share of it
            group = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            if self.share_contexts and isinstance(dataset, list):
                self.epoch_sampler = SharedContextBatches(dataset, group, by_length=by_length, seed=self.args.seed)
            elif by_length and isinstance(dataset, list):
                lengths = [len(f["input_ids"]) for f in dataset]
                self.epoch_sampler = LengthGroupedBatches(lengths, group, seed=self.args.seed)
            else:
                return super()._get_train_sampler(train_dataset)
            return self.epoch_sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # counts a SharedContextCollator adds (the model must not see them)
            questions, real = inputs.pop("num_questions", None), inputs.pop("real_tokens", None)
            if model.training:
                self.real_train_tokens += int(inputs["attention_mask"].sum() if real is None else real)
                self.train_questions += int(inputs["input_ids"].shape[0] if questions is None else questions)
            with self._low_precision():
                if not self.fast_loss:
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                # through the DDP wrapper's forward, so the gradients are averaged over the processes
                loss = dist.call_as_forward(model, labelled_positions_loss, inputs, num_items_in_batch)
                if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                    # num_items counts every process's tokens and DDP averages the gradients: scale back up,
                    # as the Trainer does for its own loss (the logged loss is then the global one)
                    loss = loss * self.accelerator.num_processes
            return (loss, {"loss": loss}) if return_outputs else loss

    return QATrainer


def make_log_callback(path: Path):
    from transformers import TrainerCallback

    class JsonlLogCallback(TrainerCallback):
        """Rewrites ``log_history.jsonl`` (atomically) whenever the Trainer logs."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                write_jsonl_atomic(path, state.log_history)

    return JsonlLogCallback()


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the message says at which step and what to try."""


FINITE_KEYS = ("loss", "grad_norm", "eval_loss", "train_loss")


def make_finite_loss_callback():
    """Stops training when a logged loss or gradient norm is NaN or infinite (checked every
    ``train.logging_steps`` steps, as the Trainer logs: no extra synchronisation per step). The Trainer logs
    before it saves, so no checkpoint is saved after a non-finite logged loss."""
    import math

    from transformers import TrainerCallback

    class FiniteLossCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in FINITE_KEYS:
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise TrainingDiverged(
                        f"training diverged: {key} is {value} at step {state.global_step}; lower train.lr "
                        f"(now {args.learning_rate:g}) or use model.precision=fp32, then rerun with --overwrite"
                    )

    return FiniteLossCallback()


class Interrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint at the step it had reached."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}: saved {checkpoint.name}; rerun the same "
                         "command to resume from it")  # fmt: skip


# A signal this soon after the first is the same request delivered twice (a terminal's Ctrl-C reaches a whole
# process group, and launchers pass it on to their workers); a later one means "stop now", as a second Ctrl-C.
REPEAT_WINDOW_SECONDS = 2.0


def make_interrupt_callback():
    """Ctrl-C or SIGTERM while the Trainer trains: finish the step, save a checkpoint there, stop.

    Without it a stop loses every step since the last ``train.save_steps`` checkpoint: up to 250 steps, ten
    minutes, in the full study. The Trainer has no such switch, so this adds one: while :meth:`armed` holds,
    the two signals only set a flag, and the next step end asks the Trainer to save and stop. After
    ``trainer.train`` returns, :attr:`stopped_at` says whether it did. Under several processes the ranks agree
    on the flag at every step end (one small gather), so they all save and stop at the same step; a second
    signal later than :data:`REPEAT_WINDOW_SECONDS` raises KeyboardInterrupt at once."""
    from transformers import TrainerCallback

    class InterruptCallback(TrainerCallback):
        def __init__(self):
            self.signum: int | None = None  # the first stop signal received
            self.received_at = 0.0
            self.stopped_at: int | None = None  # the step saved and stopped at

        def handle(self, signum, frame) -> None:
            if self.signum is None:
                self.signum, self.received_at = signum, time.monotonic()
                if dist.is_main_process():
                    log.warning("%s: saving a checkpoint after this step, then stopping (again to stop at once)",
                                signal.Signals(signum).name)  # fmt: skip
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
                control.should_log = control.should_save = control.should_training_stop = True

    return InterruptCallback()


def make_clock_callback(device: torch.device):
    """Keeps train time, real tokens and peak memory across interruptions.

    The Trainer restores the model, optimizer and step from a checkpoint, but not how long the steps before it
    took, so a resumed run's own timer would count only its last segment. On every save this writes the
    totals so far into the checkpoint folder (``loraqa_clock.json``); a resumed run starts from them.
    """
    from transformers import TrainerCallback

    class ClockCallback(TrainerCallback):
        def __init__(self):
            self.trainer = None  # set once the trainer exists (its real-token count is read on save)
            self.prior = {"train_seconds": 0.0, "train_tokens": 0, "train_questions": 0, "peak_memory_mb": 0.0,
                          "segments": 0}  # fmt: skip
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
            else:  # a checkpoint from an older loraqa: the time before it is unknown
                log.warning("%s has no %s: train time and tokens/s will cover only the resumed part",
                            checkpoint, CLOCK_FILE)  # fmt: skip
                self.prior = dict(self.prior, incomplete=True)

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self.start_step = state.global_step  # where the Trainer itself resumed (0: from the start)

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
                "peak_memory_mb": max(self.prior["peak_memory_mb"], dist.max_across(peak_memory_mb(device))),
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
                self._write(Path(args.output_dir) / CLOCK_FILE, state, step=state.global_step)

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._write(folder / CLOCK_FILE, state, only_into_existing=True)

        def _write(self, path: Path, state, step: int | None = None, only_into_existing: bool = False) -> None:
            totals = self.totals()  # on every process: it gathers
            if state.is_world_process_zero and (path.parent.is_dir() or not only_into_existing):
                write_json_atomic(path, totals if step is None else {**totals, "step": step})

    return ClockCallback()


def per_process_batch(cfg: ExperimentConfig) -> int:
    """``train.batch_size`` counts the questions of one forward-backward pass over all processes (with
    ``grad_accum`` 1, of one optimizer step), so a run means the same under any number of processes."""
    n, b = dist.world_size(), cfg.train.batch_size
    if b % n:
        raise ConfigError(
            f"train.batch_size={b} is the questions per step over all {n} processes and must divide by {n}; "
            f"pick a multiple of {n} (e.g. train.batch_size={max(n, b - b % n)}) or another process count"
        )
    return b // n


def reporters(report_to: str | list[str]) -> list[str]:
    """``train.report_to`` as the Trainer's ``report_to`` list. tensorboard is handled by
    :func:`make_tensorboard_callback` (the Trainer would log under ``output_dir``, the checkpoints folder, which
    is removed after training); wandb, mlflow and the other integrations pass through, checked installed."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n not in ("none", "tensorboard")]
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to: {name} is not installed; pip install {name}, or drop it")
    return names


def make_tensorboard_callback(run_dir: Path, report_to: str | list[str]):
    """The Trainer's own TensorBoardCallback, writing its event files to ``RUN/tensorboard`` (None when
    ``train.report_to`` does not name tensorboard)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "tensorboard" not in names:
        return None
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(run_dir / TENSORBOARD_DIR)
    return callback


def log_final_scores(run_dir: Path, report_to: str | list[str], metrics: dict, step: int) -> None:
    """EM and F1 (and SQuAD 2.0's HasAns/NoAns ones) as TensorBoard scalars ``eval/exact_match`` ... at the
    last training step, beside the training curves."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "tensorboard" not in names:
        return
    from torch.utils.tensorboard import SummaryWriter

    keys = ["exact_match", "f1"] + [k for k in metrics if k.startswith(("HasAns_", "NoAns_")) and "total" not in k]
    with SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR)) as writer:
        for key in keys:
            if metrics.get(key) is not None:
                writer.add_scalar(f"eval/{key}", metrics[key], step)


def checkpointing_arguments(on: bool) -> dict:
    """TrainingArguments for activation checkpointing, under the name this transformers knows (5.24 renamed
    ``gradient_checkpointing`` to ``activation_checkpointing`` and warns on the old name)."""
    from transformers import TrainingArguments

    name = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    # non-reentrant: needs no input that requires grad (the embeddings are frozen) and restores autocast
    return {f"{name}_checkpointing": on, f"{name}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


def enable_checkpointing(model) -> None:
    """What ``Trainer.train`` does first with checkpointing on, for code that calls the loss itself (the profiler,
    tests), under this transformers' name (5.24's ``activation_checkpointing_enable``; the old one warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def training_arguments(cfg: ExperimentConfig, ckpt_dir: Path, precision: str, device: torch.device,
                       eval_loss: bool = True):  # fmt: skip
    """``eval_loss``: whether there are questions to log the eval loss on (``data.loss_eval_limit=0``, or none
    left after encoding, turns the periodic eval-loss pass off whatever ``train.eval_steps`` says)."""
    from transformers import TrainingArguments

    t = cfg.train
    eval_steps = t.eval_steps if eval_loss else 0
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=per_process_batch(cfg),
        # not divided: eval-loss batches are then the same questions under any number of processes (accelerate
        # deals whole batches round-robin), and so is the eval loss, a mean over batches of their token mean
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps or None,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        # keep_best: the best scoring's checkpoint and the newest; with a limit of 1 the Trainer would delete
        # the newest at the end of train(), a stop signal's checkpoint included
        save_total_limit=2 if t.keep_best else 1,
        bf16=precision == "bf16",
        use_cpu=device.type == "cpu",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        prediction_loss_only=True,
        torch_compile=t.compile,
        **checkpointing_arguments(t.gradient_checkpointing),
        report_to=reporters(t.report_to),
        dataloader_num_workers=0,
        disable_tqdm=os.environ.get("LORAQA_NO_PROGRESS") == "1",
    )

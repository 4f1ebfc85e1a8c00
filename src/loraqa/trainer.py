"""The Hugging Face Trainer, fitted to extractive QA: what ``loraqa train`` adds to it and nothing else.

- :class:`QATrainer` is the Trainer subclass: the labelled-positions loss (:mod:`loraqa.loss`), bf16 autocast,
  the epoch-seeded batch orders (:mod:`loraqa.batching`, :mod:`loraqa.packing`), a count of real tokens;
- :func:`training_arguments` maps the ``train`` section onto ``TrainingArguments``.

The callbacks it runs with are :mod:`loraqa.callbacks`' and :mod:`loraqa.scoring`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate.data_loader import SeedableRandomSampler
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils.data import BatchSampler, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import speed_metrics
from transformers.training_args import ParallelMode

from . import dist, norms
from .batching import EvenEpoch, LengthGroupedBatches, WithFillers
from .config import ConfigError, TrainConfig
from .layout import checkpoint_name
from .loss import decoder_layers, fast_loss_blocker, labelled_positions_loss
from .packing import SharedContextBatches
from .runfolder import make_portable

log = logging.getLogger(__name__)


def compile_seconds() -> float:
    """Seconds this process has spent in ``torch.compile`` (tracing and code generation, forward and backward)
    so far: dynamo's own cumulative timer, which no public API exposes."""
    from torch._dynamo.utils import calculate_time_spent

    return round(calculate_time_spent().get("total_wall_time", 0.0), 3)


class SamplerEpoch(TrainerCallback):
    """Tells the trainer's epoch-seeded sampler which epoch begins. The Trainer's own ``set_epoch`` does not
    reach it in a run resumed under DDP: accelerate's skip-batches wrapper adds a level that neither the
    Trainer nor ``DataLoaderShard.set_epoch`` looks through, so the sampler would replay epoch 0's order.
    ``state.epoch`` is the whole number ``e`` when epoch ``e`` begins, ``e`` + a fraction when resumed in it.
    """

    def __init__(self, trainer: QATrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer.epoch_sampler is not None:
            self.trainer.epoch_sampler.set_epoch(int(state.epoch or 0))


class QATrainer(Trainer):
    """The HF Trainer with the labelled-positions loss (``fast_loss``) and a count of real tokens.

    The labelled-positions loss runs only where :func:`~loraqa.loss.fast_loss_blocker` finds nothing against
    it; elsewhere the Trainer computes the model's own loss, and says so in one log line.

    With ``bf16`` the loss runs under bf16 autocast (the Trainer autocasts only ``model.forward``, which
    the labelled-positions loss does not call) and PEFT's LoRA layers skip their cast of the activations
    to the adapters' fp32: autocast runs the adapter matmuls in bf16 anyway, so the cast only cost a copy
    of the hidden state (and an fp32 dropout mask) per adapted layer. Adapters, their gradients and the
    optimizer state stay fp32.

    ``compiling`` is ``train.compile`` resolved: ``layers`` compiles each decoder layer, ``norms`` the RMSNorms alone
    (:mod:`loraqa.norms`). ``compiled`` says which it did.
    """

    def __init__(
        self,
        *args,
        fast_loss: bool = True,
        share_contexts: bool = False,
        base_name: str | None = None,
        compiling: str = "off",
        **kwargs,
    ):
        if dist.world_size() > 1 and isinstance(kwargs.get("train_dataset"), list):
            kwargs["train_dataset"] = WithFillers(kwargs["train_dataset"])  # an epoch's end (EvenEpoch)
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
        self.compiled = "off"  # what torch.compile compiled for this training: layers, norms or off
        if compiling == "layers":
            # each decoder layer (they share one compiled graph), never the whole model as the Trainer's
            # torch_compile does: the labelled-positions loss calls the decoder, not model.forward, and under DDP
            # the Trainer's compiled wrapper around the DDP model left the processes' gradients unaveraged
            for layer in decoder_layers(self.model):
                layer.compile(dynamic=True)
            self.compiled = "layers"
        elif compiling == "norms" and norms.compile_norms(self.model):
            self.compiled = "norms"
        self._lora_layers = []
        if self.args.bf16:
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

    def _save_checkpoint(self, model, trial) -> None:
        # keep_best's checkpoint must outlive the rotation (save_total_limit): the Trainer names it in
        # state.best_model_checkpoint, which rotation spares, only under a steps or epoch save strategy, and
        # with train.save_steps=0 checkpoints are saved at keep_best's and a stop's request alone
        best = self.state.best_global_step
        path = Path(self._get_output_dir(trial=trial)) / checkpoint_name(best) if best else None
        if path is not None and path.is_dir():
            self.state.best_model_checkpoint = str(path)
        super()._save_checkpoint(model, trial)

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
            self.epoch_sampler = order = SharedContextBatches(
                dataset, group, by_length=by_length, seed=self.args.seed
            )
        elif by_length and isinstance(dataset, list):
            lengths = [len(f["input_ids"]) for f in dataset]
            self.epoch_sampler = order = LengthGroupedBatches(lengths, group, seed=self.args.seed)
        elif isinstance(dataset, WithFillers):
            # accelerate seeds a bare RandomSampler alike on every process (seed + epoch), but not one inside
            # EvenEpoch: that seeding, done here
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.epoch_sampler = order = SeedableRandomSampler(dataset, data_seed=seed)
        else:
            return super()._get_train_sampler(train_dataset)
        return EvenEpoch(order, len(dataset), group) if isinstance(dataset, WithFillers) else order

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        if dist.world_size() == 1:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        return self._eval_loss_in_shares(
            self.eval_dataset if eval_dataset is None else eval_dataset, metric_key_prefix
        )

    def _eval_loss_in_shares(self, dataset, prefix: str) -> dict:
        """The eval loss under N processes as one process computes it: the batches the Trainer forms (its eval
        sampler, ``eval_batch_size`` questions), each batch's loss weighted by its questions (the Trainer
        repeats it ``eval_batch_size`` times and trims the last batch's to the questions left), batch i on
        process i mod N, the two sums added over the processes. accelerate's sharding instead fills a short
        last round with the first questions, inside a batch's loss, where no trimming takes them out again."""
        start = time.time()
        order = self._get_eval_sampler(dataset) or SequentialSampler(dataset)
        batches = list(BatchSampler(order, self.args.eval_batch_size, drop_last=False))
        # not the DDP wrapper: processes run different numbers of batches, so no collective may hide in one
        model = self.model
        was_training = model.training
        model.eval()
        weighted, questions = 0.0, 0
        with torch.no_grad():
            for idx in batches[dist.rank() :: dist.world_size()]:
                inputs = self._prepare_inputs(self.data_collator([dataset[i] for i in idx]))
                weighted += self.compute_loss(model, inputs).item() * len(idx)
                questions += len(idx)
        model.train(was_training)
        weighted, questions = dist.sum_across(weighted), dist.sum_across(questions)
        metrics = {f"{prefix}_loss": weighted / questions if questions else float("nan")}
        metrics |= speed_metrics(prefix, start, num_samples=len(dataset), num_steps=len(batches))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

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


def per_process_batch(train: TrainConfig) -> int:
    """``train.batch_size`` counts the questions of one forward-backward pass over all processes (with
    ``grad_accum`` 1, of one optimizer step), so a run means the same under any number of processes."""
    n, b = dist.world_size(), train.batch_size
    if b % n:
        raise ConfigError(
            f"train.batch_size={b} is the questions per step over all {n} processes and must divide by {n}; "
            f"pick a multiple of {n} (e.g. train.batch_size={max(n, b - b % n)}) or another process count"
        )
    return b // n


def planned_steps(train: TrainConfig, questions: int) -> int:
    """The optimizer steps a training of ``questions`` train questions takes, an early stop aside: ``max_steps``,
    or the Trainer's ceil(epochs x steps an epoch)."""
    if train.max_steps > 0:
        return train.max_steps
    return math.ceil(train.epochs * math.ceil(questions / (train.batch_size * train.grad_accum)))


def checkpointing_arguments(on: bool) -> dict:
    """TrainingArguments for activation checkpointing, under the name this transformers knows (5.24 renamed
    ``gradient_checkpointing`` to ``activation_checkpointing`` and warns on the old name)."""
    name = (
        "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    )
    # non-reentrant: needs no input that requires grad (the embeddings are frozen) and restores autocast
    return {
        f"{name}_checkpointing": on,
        f"{name}_checkpointing_kwargs": {"use_reentrant": False} if on else None,
    }


def enable_checkpointing(model) -> None:
    """What ``Trainer.train`` does first with checkpointing on, for code that calls the loss itself (the profiler,
    tests), under this transformers' name (5.24's ``activation_checkpointing_enable``; the old one warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def training_arguments(
    t: TrainConfig,
    ckpt_dir: Path,
    *,
    per_process_batch: int,
    reporters: list[str],
    precision: str,
    device: torch.device,
    eval_loss: bool = True,
) -> TrainingArguments:
    """The ``train`` section as ``TrainingArguments``, with what the run resolved from it: the batch of one
    process and the Trainer's reporting integrations. ``eval_loss``: whether there are questions to log the eval
    loss on (``data.loss_eval_limit=0``, or none left after encoding, turns the periodic eval-loss pass off
    whatever ``train.eval_steps`` says). ``train.compile`` is the trainer's (:class:`QATrainer`), never the
    Trainer's ``torch_compile``."""
    eval_steps = t.eval_steps if eval_loss else 0
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=per_process_batch,
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
        **checkpointing_arguments(t.gradient_checkpointing),
        report_to=reporters,
        dataloader_num_workers=0,
        disable_tqdm=os.environ.get("LORAQA_NO_PROGRESS") == "1",
    )
    if args.device.type == "cuda" and args.parallel_mode != ParallelMode.DISTRIBUTED:
        # one process trains on one GPU: the Trainer would wrap the model in DataParallel over every visible
        # GPU, which loraqa's batches (segment lists, the fast loss's call of the decoder) do not survive;
        # several GPUs train under torchrun. Read after ``args.device``, which sets it.
        args._n_gpu = 1
    return args

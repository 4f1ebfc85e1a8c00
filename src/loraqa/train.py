"""Fine-tune with LoRA (or fully) on SQuAD and evaluate: the whole run, resumable.

A run folder holds::

    config.yaml                 the resolved experiment
    log_history.jsonl           the Trainer's log history (train loss, eval loss, lr), one JSON object a line
    adapter_config.json         the PEFT adapter (PeftModel.from_pretrained(base, RUN_DIR) loads it);
    adapter_model.safetensors   a full fine-tune saves model.safetensors + config.json instead
    train_metrics.json          written when training has finished (its presence means: skip training)
    predictions.jsonl           one dev question a line: id, prediction, answers, exact_match, f1
    metrics.json                EM/F1, speeds, parameters, memory; written last (its presence means: done)
    checkpoints/                Trainer checkpoints while training (removed once training is saved)

Rerunning an interrupted run resumes from its last checkpoint; a finished run is not redone.
Training is the Hugging Face Trainer; what it does not offer is added here: a loss computed only where
labels are (so the ~50k-wide output layer is not run at prompt positions), a count of real (non-padding)
tokens for throughput, and the run-folder bookkeeping above.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as data_mod
from .config import ConfigError, ExperimentConfig
from .evaluate import evaluate_model, peak_memory_mb, reset_peak_memory
from .io import read_json, write_json_atomic, write_jsonl_atomic, write_text_atomic
from .model import apply_lora, count_parameters, load_model_and_tokenizer
from .prompt import IGNORE_INDEX, PromptEncoder, encode_train_set

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- batching


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


# ---------------------------------------------------------------------------------------------- loss


def labelled_positions_loss(model, batch: dict, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM cross-entropy computed only at labelled positions.

    transformers' own loss runs the output layer (hidden x vocab) at every position and then ignores all
    but the few answer tokens; here the decoder's hidden states are gathered at the labelled positions
    first, so the output layer and the softmax see only those. Same value as the model's loss
    (sum over labelled tokens / ``num_items``, or their mean).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    denominator = num_items if num_items is not None else keep.sum()
    return loss / denominator


def make_trainer_class():
    import contextlib

    from torch.utils.data import Sampler
    from transformers import Trainer

    def _decoder_layers(model) -> list[torch.nn.Module]:
        """The decoder's blocks (``model.layers`` for Llama, ``transformer.h`` for GPT-2), under a PEFT wrapper."""
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        n = lm.config.num_hidden_layers
        for module in lm.get_decoder().children():
            if isinstance(module, torch.nn.ModuleList) and len(module) == n:
                return list(module)
        return []

    class QATrainer(Trainer):
        """The HF Trainer with the labelled-positions loss (``fast_loss``) and a count of real tokens.

        With ``bf16`` the loss runs under bf16 autocast (the Trainer autocasts only ``model.forward``, which
        the labelled-positions loss does not call) and PEFT's LoRA layers skip their cast of the activations
        to the adapters' fp32: autocast runs the adapter matmuls in bf16 anyway, so the cast only cost a copy
        of the hidden state (and an fp32 dropout mask) per adapted layer. Adapters, their gradients and the
        optimizer state stay fp32.
        """

        class LengthGroupedBatches(Sampler):
            """Batches of similar lengths in a random order (``train.group_by_length``).

            Each epoch the examples are shuffled, cut into mega-batches of 50 batches, sorted by length
            inside each and cut into batches of ``group`` (batch size x gradient accumulation); the full
            batches are shuffled, the longest first (an out-of-memory error shows at once), a short last
            batch last. On the first 240 SQuAD train examples ~98% of the computed tokens are real (random
            batches: ~64%; the Trainer's ``LengthGroupedSampler``, whose mega-batches shrink to a quarter of
            a small data set and whose batches run from longest to shortest: ~91%). Like that sampler it
            draws one permutation per epoch from torch's global generator (the Trainer seeds it, and restores
            it on resuming); the batch order is derived from that permutation.
            """

            def __init__(self, lengths: list[int], group: int, mega: int = 50):
                self.lengths, self.group, self.mega = list(lengths), group, mega

            def __len__(self) -> int:
                return len(self.lengths)

            def __iter__(self):
                perm = torch.randperm(len(self.lengths)).tolist()
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

        def __init__(self, *args, fast_loss: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.fast_loss = fast_loss
            self.real_train_tokens = 0
            if fast_loss:
                self.loss_is_scaled_for_ga = True  # divided by the tokens of the whole accumulated batch
                if self.args.torch_compile:
                    # the labelled-positions loss calls the decoder, not the (compiled) model.forward:
                    # compile the decoder layers instead (they share one compiled graph)
                    for layer in _decoder_layers(self.model):
                        layer.compile(dynamic=True)
            self._lora_layers = []
            if self.args.bf16:
                from peft.tuners.tuners_utils import BaseTunerLayer

                self._lora_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

        @contextlib.contextmanager
        def _low_precision(self):
            if not self.args.bf16:
                yield
                return
            for layer in self._lora_layers:
                layer.cast_input_dtype_enabled = False
            try:
                with self.accelerator.autocast():
                    yield
            finally:
                for layer in self._lora_layers:
                    layer.cast_input_dtype_enabled = True

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, list):
                return super()._get_train_sampler(train_dataset)
            group = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return self.LengthGroupedBatches([len(f["input_ids"]) for f in dataset], group)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.real_train_tokens += int(inputs["attention_mask"].sum())
            with self._low_precision():
                if not self.fast_loss:
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                loss = labelled_positions_loss(model, inputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

    return QATrainer


def make_log_callback(path: Path):
    from transformers import TrainerCallback

    class JsonlLogCallback(TrainerCallback):
        """Rewrites ``log_history.jsonl`` (atomically) whenever the Trainer logs."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            write_jsonl_atomic(path, state.log_history)

    return JsonlLogCallback()


CLOCK_FILE = "loraqa_clock.json"


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
            self.prior = {"train_seconds": 0.0, "train_tokens": 0, "peak_memory_mb": 0.0, "segments": 0}
            self.start = None

        def resume_from(self, checkpoint: str | None) -> None:
            if checkpoint is None:
                return
            path = Path(checkpoint) / CLOCK_FILE
            if path.is_file():
                self.prior = read_json(path)
            else:  # a checkpoint from an older loraqa: the time before it is unknown
                log.warning("%s has no %s: train time and tokens/s will cover only the resumed part",
                            checkpoint, CLOCK_FILE)  # fmt: skip
                self.prior = dict(self.prior, incomplete=True)

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def totals(self) -> dict:
            seconds = time.perf_counter() - self.start if self.start is not None else 0.0
            tokens = self.trainer.real_train_tokens if self.trainer is not None else 0
            out = {
                "train_seconds": self.prior["train_seconds"] + seconds,
                "train_tokens": self.prior["train_tokens"] + tokens,
                "peak_memory_mb": max(self.prior["peak_memory_mb"], peak_memory_mb(device)),
                "segments": self.prior["segments"] + 1,
            }
            if self.prior.get("incomplete"):
                out["incomplete"] = True
            return out

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json_atomic(folder / CLOCK_FILE, self.totals())

    return ClockCallback()


# ---------------------------------------------------------------------------------------------- the run


def load_examples(cfg: ExperimentConfig):
    """(train examples, dev examples) as the config asks, with one line of load report each."""
    train_path = data_mod.squad_path("train", cfg.data.data_dir)
    dev_path = data_mod.squad_path("dev", cfg.data.data_dir)
    train, train_report = data_mod.load_squad(train_path, split="train", limit=cfg.data.train_limit)
    dev, dev_report = data_mod.load_squad(dev_path, split="dev", limit=cfg.data.eval_limit)
    log.info(train_report.summary())
    log.info(dev_report.summary())
    return train, dev


def _prepare_run_dir(run_dir: Path, cfg: ExperimentConfig, overwrite: bool) -> None:
    cfg_path = run_dir / "config.yaml"
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if cfg_path.exists() and cfg_path.read_text() != cfg.to_yaml():
        raise ConfigError(
            f"{run_dir}: holds a run of a different config ({cfg_path}); pick another --output-dir, "
            "or pass --overwrite to replace it"
        )
    write_text_atomic(cfg_path, cfg.to_yaml())


def _last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint. The Trainer writes trainer_state.json last, so a folder without it was
    being saved when the run was killed; it is removed rather than resumed from."""
    if not ckpt_dir.is_dir():
        return None
    complete = []
    for d in ckpt_dir.glob("checkpoint-*"):
        if not d.is_dir() or not d.name.split("-")[-1].isdigit():
            continue
        if (d / "trainer_state.json").is_file():
            complete.append(d)
        else:
            log.info("removing incomplete checkpoint %s", d)
            shutil.rmtree(d, ignore_errors=True)
    return str(max(complete, key=lambda d: int(d.name.split("-")[-1]))) if complete else None


def training_arguments(cfg: ExperimentConfig, ckpt_dir: Path, precision: str, device: torch.device):
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=t.batch_size,
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
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=1,
        bf16=precision == "bf16",
        use_cpu=device.type == "cpu",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        prediction_loss_only=True,
        torch_compile=t.compile,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=os.environ.get("LORAQA_NO_PROGRESS") == "1",
    )


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
) -> dict:
    """Train (resuming if interrupted), save, evaluate on the dev questions; returns ``metrics.json``'s content."""
    from transformers import set_seed

    run_dir = Path(run_dir)
    _prepare_run_dir(run_dir, cfg, overwrite)
    if (run_dir / "metrics.json").exists():
        log.info("%s: finished already (metrics.json); pass --overwrite to run it again", run_dir)
        return read_json(run_dir / "metrics.json")

    train_examples, dev_examples = load_examples(cfg)
    set_seed(cfg.train.seed)
    full = cfg.train.method == "full"
    lm = load_model_and_tokenizer(
        cfg.model.name, cfg.model.precision, cfg.model.attn_implementation, device, seed=cfg.train.seed,
        trainable_base=full,
    )  # fmt: skip
    model, tok = lm.model, lm.tokenizer
    if not full:
        model = apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    trainable, total = count_parameters(model)
    reset_peak_memory(lm.device)  # peak memory counts training and evaluation, not loading

    train_metrics_path = run_dir / "train_metrics.json"
    if train_metrics_path.exists():  # trained and saved before an interruption during evaluation
        train_metrics = read_json(train_metrics_path)
        model = _load_trained(model, run_dir, full, lm.device)
    else:
        train_metrics = _train(cfg, run_dir, model, tok, train_examples, dev_examples, lm, callbacks)
        train_metrics.update(trainable_params=trainable, total_params=total)
        _save_trained(model, tok, run_dir, full)
        write_json_atomic(train_metrics_path, train_metrics)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    model = prepare_for_generation(model, merge=cfg.eval.merge_adapter, precision=lm.precision)
    records, summary = evaluate_model(
        model, tok, dev_examples, max_length=cfg.prompt.max_length, eval_cfg=cfg.eval, progress=progress
    )
    write_jsonl_atomic(run_dir / "predictions.jsonl", records)
    metrics = {
        "exact_match": summary["exact_match"],
        "f1": summary["f1"],
        "n_questions": summary["n_questions"],
        **train_metrics,
        "eval_seconds": summary["eval_seconds"],
        "eval_questions_per_second": summary["eval_questions_per_second"],
        "eval_prompts_truncated": summary["eval_prompts_truncated"],
        "peak_memory_mb": round(max(peak_memory_mb(lm.device), train_metrics.get("peak_memory_mb", 0)), 1),
        "model": cfg.model.name,
        "method": cfg.train.method,
        "precision": lm.precision,
        "device": str(lm.device),
        "torch_threads": torch.get_num_threads(),
    }
    write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


def _train(cfg, run_dir, model, tok, train_examples, dev_examples, lm, callbacks) -> dict:
    encoder = PromptEncoder(tok, max_length=cfg.prompt.max_length, loss_on=cfg.prompt.loss_on)
    train_features, train_stats = encode_train_set(encoder, train_examples)
    if not train_features:
        raise ConfigError(f"no training examples left after encoding ({train_stats.summary()})")
    # The logged eval loss is always the loss on the answer tokens (+ EOS), whatever prompt.loss_on trains on:
    # it is what the generated answers depend on, and it keeps the loss_on=answer and =all runs comparable.
    answer_encoder = encoder if encoder.loss_on == "answer" else PromptEncoder(
        tok, max_length=cfg.prompt.max_length, loss_on="answer"
    )
    loss_eval_features, _ = encode_train_set(answer_encoder, dev_examples[: cfg.data.loss_eval_limit])
    log.info("train prompts: %s", train_stats.summary())

    ckpt_dir = run_dir / "checkpoints"
    args = training_arguments(cfg, ckpt_dir, lm.precision, lm.device)
    clock = make_clock_callback(lm.device)
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=loss_eval_features if cfg.train.eval_steps and loss_eval_features else None,
        data_collator=QACollator(tok.pad_token_id),
        processing_class=tok,
        callbacks=[make_log_callback(run_dir / "log_history.jsonl"), clock, *(callbacks or [])],
        fast_loss=cfg.train.fast_loss,
    )
    clock.trainer = trainer
    resume = _last_checkpoint(ckpt_dir)
    if resume:
        log.info("resuming from %s", resume)
    clock.resume_from(resume)
    trainer.train(resume_from_checkpoint=resume)
    totals = clock.totals()
    seconds, tokens = totals["train_seconds"], totals["train_tokens"]
    final_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}
    history = trainer.state.log_history
    write_jsonl_atomic(run_dir / "log_history.jsonl", history)
    losses = _final_losses(history)
    if final_eval:
        losses["final_eval_loss"] = final_eval["eval_loss"]
        losses["eval_loss_on"] = "answer"  # see above; runs without this key logged prompt.loss_on's loss
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
        # train time, tokens and peak memory sum up every segment of an interrupted run (see the clock)
        "train_seconds": round(seconds, 3),
        "train_segments": totals["segments"],
        **({"train_seconds_cover_last_segment_only": True} if totals.get("incomplete") else {}),
        "train_tokens": tokens,
        "train_tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
        **losses,
        "peak_memory_mb": round(totals["peak_memory_mb"], 1),
    }


def _save_trained(model, tok, run_dir: Path, full: bool) -> None:
    # save_pretrained writes each file in place; write into a temporary folder and move the files in,
    # so an interruption never leaves a half-written adapter under the run folder's names
    tmp = run_dir / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if full:
        tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


def _load_trained(model, run_dir: Path, full: bool, device):
    if full:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32).to(device)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(run_dir / "adapter_model.safetensors")))
    return model


def prepare_for_generation(model, *, merge: bool = True, precision: str = "fp32"):
    """Merge a LoRA adapter into the weights (one matmul per layer instead of three) and, for bf16, run in bf16.
    Layers compiled for training (``train.compile``) go back to eager: generation's shapes would recompile them."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()
    return model

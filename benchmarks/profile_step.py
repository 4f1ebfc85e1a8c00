"""Where a training step spends its time: torch.profiler's top operations for loraqa's training step.

Builds the step exactly as ``loraqa train`` runs it (the model and LoRA as ``run_experiment`` loads them, the
Trainer's ``compute_loss`` under its bf16 autocast, then the backward pass) on batches of the first SQuAD train
questions, in the order the trainer's sampler gives them, with shared contexts or stand-alone examples::

    .venv/bin/python benchmarks/profile_step.py                                  # shared contexts (default)
    .venv/bin/python benchmarks/profile_step.py train.share_contexts=false       # stand-alone examples
    .venv/bin/python benchmarks/profile_step.py lora.dropout=0 --steps 3            # any config override
    .venv/bin/python benchmarks/profile_step.py train.method=full --optimizer       # full fine-tuning

Prints the warm step time (median of ``--steps`` after ``--warmup``), questions/s, and the operations by
self CPU time over the profiled steps (as a Markdown table). A step is the loss and its backward pass;
``--optimizer`` adds the optimizer's step (``torch.optim.AdamW``, what the Trainer's ``adamw_torch`` runs) over
the trainable parameters, timed apart too: negligible for LoRA's adapters, not for full fine-tuning's weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO.parent / "shared" / "squad"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides, section.field=value")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=240, help="first N train questions to draw batches from")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--optimizer", action="store_true", help="include AdamW's step over the trainable parameters")
    p.add_argument("--data-dir", default=os.environ.get("LORAQA_DATA_DIR") or str(DEFAULT_DATA_DIR))
    args = p.parse_args(argv)
    os.environ["LORAQA_NO_PROGRESS"] = "1"
    import transformers

    transformers.logging.set_verbosity_error()
    from torch.profiler import ProfilerActivity, profile
    from transformers import set_seed

    from loraqa.batching import QACollator
    from loraqa.config import ExperimentConfig, apply_overrides, parse_overrides
    from loraqa.data import load_squad, squad_path
    from loraqa.devices import resolve_compile
    from loraqa.model import apply_lora, load_model
    from loraqa.packing import SharedContextCollator
    from loraqa.pipeline import resolve
    from loraqa.prompt import PromptEncoder, encode_train_set
    from loraqa.trainer import QATrainer, enable_checkpointing, training_arguments

    base = [("model.name", args.model), ("lora.targets", ["q_proj", "v_proj"]), ("train.eval_steps", 0),
            ("train.save_steps", 0)]  # fmt: skip
    cfg = apply_overrides(ExperimentConfig(), base + parse_overrides(args.overrides))
    set_seed(cfg.train.seed)
    resolved = resolve(cfg)  # as loraqa train decides
    # as run_experiment loads it: full fine-tuning keeps fp32 master weights and has no adapters
    lm = load_model(cfg.model, "cpu", trainable_base=resolved.full, training=True)
    model = lm.model if resolved.full else apply_lora(lm.model, cfg.lora)
    examples, _ = load_squad(squad_path("train", args.data_dir), split="train", limit=args.questions)
    encoder = PromptEncoder(lm.tokenizer, cfg.prompt)
    features, _ = encode_train_set(encoder, examples)
    shared = resolved.share_contexts
    if cfg.train.gradient_checkpointing:  # what Trainer.train would do first; the steps below call the loss
        enable_checkpointing(model)
    collator = (SharedContextCollator if shared else QACollator)(lm.tokenizer.pad_token_id,
                                                                 cfg.train.pad_to_multiple)  # fmt: skip
    compiling = resolve_compile(cfg.train.compile, "cpu")
    targs = training_arguments(cfg.train, Path("/tmp/loraqa-profile"), per_process_batch=resolved.per_process_batch,
                               reporters=list(resolved.reporters), precision=lm.precision, device=lm.device,
                               compile_layers=compiling == "layers")  # fmt: skip
    trainer = QATrainer(model=model, args=targs, train_dataset=features, data_collator=collator,
                        fast_loss=cfg.train.fast_loss, share_contexts=shared,
                        compile_norms=compiling == "norms")  # fmt: skip
    torch.manual_seed(0)
    order = list(trainer._get_train_sampler())
    bs = cfg.train.batch_size
    batches = [collator([features[i] for i in order[j : j + bs]]) for j in range(0, len(order), bs)]
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr) if args.optimizer else None
    optimizer_times: list[float] = []

    def step(batch) -> None:
        n = int((batch["labels"][:, 1:] != -100).sum())
        trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n)).backward()
        if optimizer is not None:
            start = time.perf_counter()
            optimizer.step()
            optimizer_times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)

    for b in batches[: args.warmup]:
        step(b)
    times = []
    optimizer_times.clear()
    timed = batches[args.warmup : args.warmup + args.steps]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in timed:
            start = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - start)
    total = sum(times)
    positions = sum(b["input_ids"].numel() for b in timed)
    real = sum(int(b["real_tokens"]) if "real_tokens" in b else int(b["attention_mask"].sum()) for b in timed)
    width = statistics.mean(b["input_ids"].shape[1] for b in timed)
    print(f"positions computed {positions:,} ({real:,} real, {real / positions:.0%}), mean row width {width:.0f}, "
          f"mean rows a batch {statistics.mean(b['input_ids'].shape[0] for b in timed):.1f}")
    print(f"{args.model} {' '.join(args.overrides) or '(defaults)'}: {len(timed)} steps of {bs} questions, "
          f"median {statistics.median(times):.2f} s a step, {len(timed) * bs / total:.2f} questions/s, "
          f"torch threads {torch.get_num_threads()}, precision {lm.precision}, compiled {trainer.compiled}, "
          f"{sum(q.numel() for q in trainable):,} trainable parameters")  # fmt: skip
    if optimizer_times:
        print(f"of which the optimizer's step: median {statistics.median(optimizer_times):.2f} s")
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    all_self = sum(e.self_cpu_time_total for e in events)
    print("\n| op | self CPU s | share |\n|---|---:|---:|")
    for e in events[: args.top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / all_self:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step spends its time: torch.profiler's top operations for loraqa's training step.

Builds the step exactly as ``loraqa train`` runs it (the model and LoRA as ``run_experiment`` loads them, the
Trainer's ``compute_loss`` under its bf16 autocast, then the backward pass) on batches of the first SQuAD train
questions, in the order the trainer's sampler gives them, with shared contexts or stand-alone examples::

    .venv/bin/python benchmarks/profile_step.py                                  # shared contexts (default)
    .venv/bin/python benchmarks/profile_step.py train.share_contexts=false       # stand-alone examples
    .venv/bin/python benchmarks/profile_step.py lora.dropout=0 --steps 3            # any config override
    .venv/bin/python benchmarks/profile_step.py train.method=full --optimizer       # full fine-tuning
    .venv/bin/python benchmarks/profile_step.py --steps 28 --against train.compile=off   # a paired comparison

Prints the warm step time (median of ``--steps`` after ``--warmup``), questions/s, and the operations by
self CPU time over the profiled steps (as a Markdown table). A step is the loss and its backward pass;
``--optimizer`` adds the optimizer's step (``torch.optim.AdamW``, what the Trainer's ``adamw_torch`` runs) over
the trainable parameters, timed apart too: negligible for LoRA's adapters, not for full fine-tuning's weights.

``--against KEY=VALUE[,KEY=VALUE]`` builds a second step with those overrides added and runs the two on the same
batches, alternating A-B, B-A, ... in one process (no profiler): on a VM whose speed swings by the minute, the
paired ratio of each batch's two times is the figure to read, not two runs' times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO.parent / "shared" / "squad"


@dataclass
class Step:
    """One configuration's training step, ready to run on its batches."""

    label: str
    run: Callable[[dict], None]  # the loss and its backward pass (and the optimizer's step) on one batch
    batches: list[dict]
    batch_size: int
    describe: str  # precision, compiled, trainable parameters
    optimizer_times: list[float] = field(default_factory=list)


def build(args, overrides: list[str]) -> Step:
    from transformers import set_seed

    from loraqa.config import ExperimentConfig, apply_overrides, parse_overrides
    from loraqa.data import load_squad, squad_path
    from loraqa.devices import resolve_compile
    from loraqa.model import apply_lora, load_model
    from loraqa.pipeline import resolve, train_collator
    from loraqa.prompt import PromptEncoder, encode_train_set
    from loraqa.trainer import QATrainer, enable_checkpointing, planned_steps, training_arguments

    base = [("model.name", args.model), ("lora.targets", ["q_proj", "v_proj"]), ("train.eval_steps", 0),
            ("train.save_steps", 0)]  # fmt: skip
    cfg = apply_overrides(ExperimentConfig(), base + parse_overrides(overrides))
    set_seed(cfg.train.seed)
    resolved = resolve(cfg)  # as loraqa train decides
    # as run_experiment loads it: full fine-tuning keeps fp32 master weights and has no adapters
    lm = load_model(cfg.model, "cpu", trainable_base=resolved.full, training=True)
    model = lm.model if resolved.full else apply_lora(lm.model, cfg.lora)
    examples, _ = load_squad(squad_path("train", args.data_dir), split="train", limit=args.questions)
    features, _ = encode_train_set(PromptEncoder(lm.tokenizer, cfg.prompt), examples)
    shared = resolved.share_contexts
    if cfg.train.gradient_checkpointing:  # what Trainer.train would do first; the steps below call the loss
        enable_checkpointing(model)
    compiling = resolve_compile(cfg.train.compile, "cpu", planned_steps(cfg.train, len(features)))
    collator = train_collator(cfg, resolved, lm, compiling)  # as loraqa train builds it
    targs = training_arguments(cfg.train, Path("/tmp/loraqa-profile"), per_process_batch=resolved.per_process_batch,
                               reporters=list(resolved.reporters), precision=lm.precision,
                               device=lm.device)  # fmt: skip
    trainer = QATrainer(model=model, args=targs, train_dataset=features, data_collator=collator,
                        fast_loss=cfg.train.fast_loss, share_contexts=shared,
                        compiling=compiling)  # fmt: skip
    torch.manual_seed(0)
    order = list(trainer._get_train_sampler())
    bs = cfg.train.batch_size
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr) if args.optimizer else None
    step = Step(
        label=" ".join(overrides) or "(defaults)",
        run=lambda batch: None,
        batches=[collator([features[i] for i in order[j : j + bs]]) for j in range(0, len(order), bs)],
        batch_size=bs,
        describe=f"precision {lm.precision}, compiled {trainer.compiled}, one row {getattr(collator, 'one_row', False)}, "
        f"{sum(q.numel() for q in trainable):,} trainable parameters",
    )

    def run(batch) -> None:
        n = int((batch["labels"][:, 1:] != -100).sum())
        trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n)).backward()
        if optimizer is not None:
            start = time.perf_counter()
            optimizer.step()
            step.optimizer_times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)

    step.run = run
    return step


def timed(step: Step, batch: dict) -> float:
    start = time.perf_counter()
    step.run(batch)
    return time.perf_counter() - start


def profiled(args, step: Step) -> None:
    from torch.profiler import ProfilerActivity, profile

    for b in step.batches[: args.warmup]:
        step.run(b)
    step.optimizer_times.clear()
    batches = step.batches[args.warmup : args.warmup + args.steps]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = [timed(step, b) for b in batches]
    positions = sum(b["input_ids"].numel() for b in batches)
    real = sum(int(b["real_tokens"]) if "real_tokens" in b else int(b["attention_mask"].sum()) for b in batches)
    width = statistics.mean(b["input_ids"].shape[1] for b in batches)
    print(f"positions computed {positions:,} ({real:,} real, {real / positions:.0%}), mean row width {width:.0f}, "
          f"mean rows a batch {statistics.mean(b['input_ids'].shape[0] for b in batches):.1f}")
    print(f"{args.model} {step.label}: {len(batches)} steps of {step.batch_size} questions, "
          f"median {statistics.median(times):.2f} s a step, {len(batches) * step.batch_size / sum(times):.2f} "
          f"questions/s, torch threads {torch.get_num_threads()}, {step.describe}")  # fmt: skip
    if step.optimizer_times:
        print(f"of which the optimizer's step: median {statistics.median(step.optimizer_times):.2f} s")
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    all_self = sum(e.self_cpu_time_total for e in events)
    print("\n| op | self CPU s | share |\n|---|---:|---:|")
    for e in events[: args.top]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / all_self:.1%} |")


def paired(args, a: Step, b: Step) -> None:
    """A and B on the same batches, alternating which goes first; a table of both and their paired ratio."""
    if [x["input_ids"].shape for x in a.batches] != [x["input_ids"].shape for x in b.batches]:
        print("note: the two configurations batch the questions differently; pairs are by position")
    for x, y in zip(a.batches[: args.warmup], b.batches[: args.warmup], strict=False):
        a.run(x), b.run(y)
    times: dict[str, list[float]] = {"A": [], "B": []}
    pairs = list(zip(a.batches, b.batches, strict=False))[args.warmup : args.warmup + args.steps]
    for i, (x, y) in enumerate(pairs):
        first, second = (("A", a, x), ("B", b, y)) if i % 2 == 0 else (("B", b, y), ("A", a, x))
        for key, step, batch in (first, second):
            times[key].append(timed(step, batch))
    ratios = [tb / ta for ta, tb in zip(times["A"], times["B"], strict=True)]
    print(f"{args.model}, {len(pairs)} pairs of steps of {a.batch_size} questions, alternated, torch threads "
          f"{torch.get_num_threads()}\n\n| | configuration | median s a step | total s | questions/s |\n"
          f"|---|---|---:|---:|---:|")  # fmt: skip
    for key, step in (("A", a), ("B", b)):
        total = sum(times[key])
        print(f"| {key} | {step.label}; {step.describe} | {statistics.median(times[key]):.3f} | {total:.2f} | "
              f"{len(pairs) * step.batch_size / total:.2f} |")  # fmt: skip
    print(f"\nB / A: total {sum(times['B']) / sum(times['A']):.3f}, median of the paired ratios "
          f"{statistics.median(ratios):.3f} (quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}–"
          f"{statistics.quantiles(ratios, n=4)[2]:.3f})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides, section.field=value")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=240, help="first N train questions to draw batches from")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--optimizer", action="store_true", help="include AdamW's step over the trainable parameters")
    p.add_argument("--against", metavar="KEY=VALUE[,KEY=VALUE]",
                   help="a second configuration (these overrides added), alternated with the first")  # fmt: skip
    p.add_argument("--data-dir", default=os.environ.get("LORAQA_DATA_DIR") or str(DEFAULT_DATA_DIR))
    args = p.parse_args(argv)
    if argv is None:  # from the shell: under the allocator the loraqa command runs under (loraqa.launch)
        from loraqa.launch import allocator, restart_under_tcmalloc

        restart_under_tcmalloc(sys.argv)
        print(f"malloc: {allocator()}", flush=True)
    os.environ["LORAQA_NO_PROGRESS"] = "1"
    import transformers

    transformers.logging.set_verbosity_error()
    first = build(args, args.overrides)
    if args.against:
        paired(args, first, build(args, args.overrides + args.against.split(",")))
    else:
        profiled(args, first)
    return 0


if __name__ == "__main__":
    sys.exit(main())

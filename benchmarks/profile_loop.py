"""Where ``loraqa train``'s whole training loop spends its time, not only the model step.

Runs ``run_experiment`` (what ``loraqa train`` runs) on the first SQuAD train questions and times, inside the
Trainer's ``train()`` call, each part of every optimizer step by wrapping the methods that do it: fetching and
collating the batch, the forward and backward pass (``training_step``), the gradient norm and clipping, the
optimizer's step, callbacks (logging, TensorBoard, checkpoints' bookkeeping), checkpoint saving, the FLOP
count the Trainer makes per batch, and the rest of the loop. Times are exclusive (a callback run inside a save
counts once, as a callback). The first ``--skip`` steps are left out (first-time allocations).

It also counts the distinct batch shapes: oneDNN builds a kernel per shape, so a step whose (rows, width) was
seen before is cheaper than one that is new; the table gives the median forward+backward of each kind::

    .venv/bin/python benchmarks/profile_loop.py                                  # loraqa's defaults
    .venv/bin/python benchmarks/profile_loop.py train.pad_to_multiple=1          # no width buckets
    .venv/bin/python benchmarks/profile_loop.py --questions 960 lora.dropout=0  # any config override
    .venv/bin/python benchmarks/profile_loop.py --torch-dropout                 # PEFT's own nn.Dropout

Prints a Markdown table (seconds a step, share of the step) and a JSON line with the same figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO.parent / "shared" / "squad"


class Clock:
    """Exclusive wall time per part: a part that runs inside another is taken out of the outer one."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [name, start, time spent in nested parts]
        self.counting = False

    def wrap(self, owner, method: str, part: str) -> None:
        original = getattr(owner, method)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            entry = [part, time.perf_counter(), 0.0]
            self.stack.append(entry)
            try:
                return original(*args, **kwargs)
            finally:
                self.stack.pop()
                spent = time.perf_counter() - entry[1]
                if self.counting:
                    self.totals[part] += spent - entry[2]
                if self.stack:
                    self.stack[-1][2] += spent

        setattr(owner, method, timed)

    def start(self) -> None:
        """Counting begins now; parts already open count from now on."""
        now = time.perf_counter()
        for entry in self.stack:
            entry[1], entry[2] = now, 0.0
        self.totals.clear()
        self.counting = True

    def stop(self) -> None:
        """Counting ends now: parts still open count up to now, each without the part open inside it."""
        now, inner = time.perf_counter(), 0.0
        for entry in reversed(self.stack):
            spent = now - entry[1]
            self.totals[entry[0]] += spent - entry[2] - inner
            inner = spent
        self.counting = False


def instrument(clock: Clock, shapes: list) -> None:
    import torch
    from transformers import Trainer
    from transformers.trainer_callback import CallbackHandler

    from loraqa.trainer import QATrainer

    clock.wrap(Trainer, "get_batch_samples", "batch: sampler + collator")
    clock.wrap(Trainer, "_clip_grad_norm", "gradient norm + clipping")
    clock.wrap(Trainer, "floating_point_ops", "Trainer's FLOP count")
    clock.wrap(Trainer, "_save_checkpoint", "checkpoint saving")
    clock.wrap(Trainer, "_maybe_log_save_evaluate", "logging")
    clock.wrap(CallbackHandler, "call_event", "callbacks")
    clock.wrap(torch.optim.AdamW, "step", "optimizer step")
    clock.wrap(torch.optim.lr_scheduler.LRScheduler, "step", "lr scheduler")
    clock.wrap(Trainer, "_inner_training_loop", "rest of the loop")
    original = QATrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        shape = tuple(inputs["input_ids"].shape)
        start = time.perf_counter()
        try:
            return original(self, model, inputs, *args, **kwargs)
        finally:
            if clock.counting:
                shapes.append((shape, time.perf_counter() - start))

    QATrainer.training_step = training_step
    clock.wrap(QATrainer, "training_step", "forward + backward")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides, section.field=value")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=240, help="first N train questions (one epoch of them)")
    p.add_argument("--skip", type=int, default=2, help="optimizer steps left out at the start")
    p.add_argument("--ops", type=int, default=0, help="also profile the timed steps' operations: the top N")
    p.add_argument("--torch-dropout", action="store_true", help="keep PEFT's nn.Dropout (no fast CPU mask)")
    p.add_argument("--data-dir", default=os.environ.get("LORAQA_DATA_DIR") or str(DEFAULT_DATA_DIR))
    args = p.parse_args(argv)
    os.environ["LORAQA_NO_PROGRESS"] = "1"
    import torch
    import transformers
    from transformers import TrainerCallback

    transformers.logging.set_verbosity_error()
    from loraqa.config import ExperimentConfig, apply_overrides, parse_overrides
    from loraqa.pipeline import run_experiment

    base = [("model.name", args.model), ("data.data_dir", args.data_dir), ("data.train_limit", args.questions),
            ("data.eval_limit", 8), ("train.epochs", 1), ("train.eval_steps", 0)]  # fmt: skip
    cfg = apply_overrides(ExperimentConfig(), base + parse_overrides(args.overrides))
    if args.torch_dropout:
        import loraqa.lora_dropout

        loraqa.lora_dropout.use_cpu_dropout = lambda model: 0
    clock, shapes = Clock(), []
    instrument(clock, shapes)
    steps = {"n": 0, "start": None, "end": None}
    from torch.profiler import ProfilerActivity, profile

    ops = profile(activities=[ProfilerActivity.CPU]) if args.ops else None

    class StartAfterSkip(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            if state.global_step == args.skip:
                if ops is not None:
                    ops.start()
                clock.start()
                steps["start"] = time.perf_counter()
            steps["n"] = state.global_step - args.skip

        def on_train_end(self, a, state, control, **kwargs):
            steps["end"] = time.perf_counter()
            clock.stop()  # the timed steps end here: the profiler's stop is no callback's time
            if ops is not None:
                ops.stop()

    with tempfile.TemporaryDirectory() as out:
        metrics = run_experiment(cfg, Path(out) / "run", callbacks=[StartAfterSkip()], progress=False)
    report(args, cfg, clock, shapes, steps, metrics, torch.get_num_threads())
    if ops is not None:
        events = sorted(ops.key_averages(), key=lambda e: -e.self_cpu_time_total)
        every = sum(e.self_cpu_time_total for e in events)
        print(f"\n| op (profiled, {steps['n']} steps) | self CPU s a step | share |\n|---|---:|---:|")
        for e in events[: args.ops]:
            print(
                f"| {e.key} | {e.self_cpu_time_total / 1e6 / steps['n']:.3f} | {e.self_cpu_time_total / every:.1%} |"
            )
    return 0


def report(args, cfg, clock: Clock, shapes: list, steps: dict, metrics: dict, threads: int) -> None:
    n = steps["n"]
    wall = steps["end"] - steps["start"]
    per_step = {part: t / n for part, t in sorted(clock.totals.items(), key=lambda kv: -kv[1])}
    label = " ".join(args.overrides + (["--torch-dropout"] if args.torch_dropout else [])) or "(defaults)"
    print(f"{args.model} {label}: {n} optimizer steps timed (after {args.skip}), "
          f"{wall / n:.3f} s a step, {n * cfg.train.batch_size / wall:.2f} questions/s, torch threads {threads}")  # fmt: skip
    print("\n| part | s a step | share |\n|---|---:|---:|")
    for part, t in per_step.items():
        print(f"| {part} | {t:.3f} | {t * n / wall:.1%} |")
    seen, new, repeat = set(), [], []
    for shape, t in shapes:
        (repeat if shape in seen else new).append(t)
        seen.add(shape)
    outside = 1 - clock.totals["forward + backward"] / wall
    print(f"\noutside forward + backward: {outside:.1%} of the step")
    print(
        f"batch shapes: {len(seen)} distinct in {len(shapes)} batches; forward + backward median "
        f"{statistics.median(new) if new else float('nan'):.3f} s on a new shape ({len(new)}), "
        f"{statistics.median(repeat) if repeat else float('nan'):.3f} s on a repeated one ({len(repeat)})"
    )
    figures = {"model": args.model, "overrides": args.overrides, "steps": n, "seconds_per_step": wall / n,
               "questions_per_second": n * cfg.train.batch_size / wall, "parts": per_step,
               "outside_forward_backward": outside, "distinct_shapes": len(seen), "batches": len(shapes),
               "final_train_loss": metrics.get("final_train_loss")}  # fmt: skip
    if "compile_seconds" in metrics:  # train.compile: inside the steps above, the skipped ones included
        print(f"torch.compile: {metrics['compile_seconds']:.1f} s in all")
        figures["compile_seconds"] = metrics["compile_seconds"]
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of the README's main job's training in a process of its own, with the allocator variants tried.

    python benchmarks/probe_memory.py RUN_DIR [trim] [KEY=VALUE ...]

Runs ``configs/quickstart.yaml`` (its 100 training steps and 4 loss evaluations; 64 dev questions answered at
the end instead of 500, no checkpoints) through ``run_experiment`` and prints the resident memory when
training begins and ends, the run's ``peak_memory_mb`` (training and answering, loading excluded) and its
training questions/s. ``trim`` calls glibc's ``malloc_trim(0)`` after every optimizer step; allocator settings
go in the environment (e.g. ``MALLOC_MMAP_THRESHOLD_=131072``). SQuAD is read from ``../shared/squad``.
Memory does not depend on what else runs, but the speed does: compare speeds only from an idle machine.
"""

import argparse
import ctypes

from transformers import TrainerCallback

from loraqa.config import load_config
from loraqa.pipeline import run_experiment


def status(field: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Watch(TrainerCallback):
    def __init__(self, trim: bool):
        self.trim = trim

    def on_train_begin(self, args, state, control, **kw):
        print(f"train begin: rss {status('VmRSS'):.0f} hwm {status('VmHWM'):.0f}", flush=True)

    def on_step_end(self, args, state, control, **kw):
        if self.trim:  # hand the heap's free pages back to the kernel
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def on_train_end(self, args, state, control, **kw):
        print(f"train end: rss {status('VmRSS'):.0f} hwm {status('VmHWM'):.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run folder to write (overwritten)")
    parser.add_argument("rest", nargs="*", metavar="trim | KEY=VALUE",
                        help="trim: malloc_trim(0) after every optimizer step; KEY=VALUE: a config override")  # fmt: skip
    args = parser.parse_args()
    bad = [a for a in args.rest if a != "trim" and "=" not in a]
    if bad:
        parser.error(f"expected trim or KEY=VALUE, got {' '.join(bad)}")
    overrides = ["data.data_dir=../shared/squad", "data.eval_limit=64", "train.save_steps=0"]
    cfg = load_config("configs/quickstart.yaml", overrides + [a for a in args.rest if "=" in a])
    m = run_experiment(
        cfg, args.run_dir, overwrite=True, callbacks=[Watch("trim" in args.rest)], progress=False
    )
    print("peak", m["peak_memory_mb"], "train q/s", m["train_questions_per_second"])


if __name__ == "__main__":
    main()

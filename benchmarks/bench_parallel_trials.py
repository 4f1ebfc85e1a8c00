"""Two trials at once on half the cores each, or one at a time on all of them: which trains more questions an
hour on a CPU? (``loraqa sweep --parallel 2`` gives each child ``OMP_NUM_THREADS`` = cores / 2, unless the environment sets it.)

    .venv/bin/python benchmarks/bench_parallel_trials.py --data-dir ../shared/squad
    .venv/bin/python benchmarks/bench_parallel_trials.py --data-dir ../shared/squad --steps 16 --rounds 1

Each round trains one short LoRA run (a sweep config's base trial, ``configs/full-claims.yaml`` by default, cut
to ``--steps`` optimizer steps on the first steps x batch train questions) as child processes of
``loraqa train``: once alone with every core, then two at once with half the cores each. A run's training
window is read from its own files (``train_metrics.json`` is written as training ends; its ``train_seconds``
says how long training took), so loading and answering are left out. The pair's throughput is both runs'
questions over the span from the first start to the last end of their training, so a run that trained alone
for a moment while the other was still loading counts against the pair, not for it.
It prints a row per round and the median ratio pair / alone: above 1, ``--parallel 2`` finishes sooner.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(folder: Path, config: str, data_dir: str, steps: int, threads: int) -> subprocess.Popen:
    overrides = [f"train.max_steps={steps}", f"data.train_limit={steps * 8}", "train.batch_size=8",
                 "data.eval_limit=2", "data.loss_eval_limit=0", "train.eval_steps=0", "train.save_steps=100000",
                 "train.warmup_steps=0", "train.report_to=none", "eval.max_new_tokens=2"]  # fmt: skip
    cmd = [sys.executable, "-m", "loraqa.cli", "train", config, *overrides, "--data-dir", data_dir, "-o", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def window(folder: Path) -> tuple[float, float, int]:
    """(training start, training end, questions trained) of a finished run folder, by the wall clock."""
    from loraqa.io import read_json
    from loraqa.layout import TRAIN_METRICS_FILE

    path = folder / TRAIN_METRICS_FILE
    m = read_json(path)
    end = path.stat().st_mtime
    return end - m["train_seconds"], end, m["train_steps"] * 8


def finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"loraqa train failed ({p.returncode}):\n{err[-3000:]}")


def base_trial(config: str, tmp: Path) -> str:
    """The sweep config's base trial (its sweep section dropped) as a config file ``loraqa train`` takes."""
    from loraqa.config import load_config
    from loraqa.sweep import base_config

    path = tmp / "base.yaml"
    path.write_text(base_config(load_config(ROOT / config)).to_yaml())
    return str(path)


def one_round(tmp: Path, args, cores: int) -> dict:
    args = argparse.Namespace(**{**vars(args), "config": base_trial(args.config, tmp)})
    finish(train(tmp / "alone", args.config, args.data_dir, args.steps, cores))
    start, end, questions = window(tmp / "alone")
    alone = questions / (end - start)
    pair = [train(tmp / f"pair{i}", args.config, args.data_dir, args.steps, max(1, cores // 2)) for i in (0, 1)]
    finish(*pair)
    spans = [window(tmp / f"pair{i}") for i in (0, 1)]
    both = sum(s[2] for s in spans) / (max(s[1] for s in spans) - min(s[0] for s in spans))
    each = [s[2] / (s[1] - s[0]) for s in spans]
    return {"alone": alone, "each": each, "pair": both, "ratio": both / alone}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/full-claims.yaml")
    ap.add_argument("--data-dir", default=os.environ.get("LORAQA_DATA_DIR", "../shared/squad"))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())  # the children run in the project root
    cores = os.cpu_count() or 1
    print(f"{platform.processor() or platform.machine()}, {cores} cores; {args.config}, {args.steps} steps of 8")
    print(f"| round | alone, {cores} threads (q/s) | each of the pair, {max(1, cores // 2)} thread(s) (q/s) "
          "| pair together (q/s) | pair / alone |\n|---:|---:|---:|---:|---:|")  # fmt: skip
    ratios = []
    for r in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory(prefix="loraqa-parallel-") as tmp:
            row = one_round(Path(tmp), args, cores)
        ratios.append(row["ratio"])
        each = " / ".join(f"{e:.2f}" for e in row["each"])
        print(f"| {r} | {row['alone']:.2f} | {each} | {row['pair']:.2f} | {row['ratio']:.2f} |", flush=True)
    print(f"median pair / alone over {len(ratios)} round(s): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()

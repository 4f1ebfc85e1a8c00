"""Ray's overhead per trial against the local scheduler, on configs/tiny-sweep.yaml (4 trials)::

    .venv/bin/python benchmarks/bench_sweep_backends.py               # 3 rounds of each backend
    .venv/bin/python benchmarks/bench_sweep_backends.py --rounds 1

Each round runs the whole sweep from an empty folder with the real command line, alternating the backends so
a change in the machine's load hits both alike:

- local: ``loraqa sweep configs/tiny-sweep.yaml -o DIR --parallel 2`` (2 child processes at a time);
- ray:   ``loraqa sweep configs/tiny-sweep.yaml -o DIR --backend ray`` (a local Ray instance with one CPU per
  core; each trial holds 1 CPU, so on 2 cores also 2 at a time).

It prints, per backend, the median over rounds of: the command's wall time, the mean wall time of one trial's
child process (``run.json``: the same work under both, so it shows whether Ray slows the child), and the
time the sweep spends outside its trials' children per trial ((wall x trials at once - sum of the children's
wall) / trials). Ray's overhead per trial is the difference of the last figure; the cost of starting and
stopping the local Ray instance (``ray.init`` + ``ray.shutdown``, timed on its own) is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-sweep.yaml"
AT_ONCE = 2  # trials in flight on either backend (the overhead formula below assumes it)
BACKENDS = {"local": ["--parallel", str(AT_ONCE)], "ray": ["--backend", "ray", "--parallel", str(AT_ONCE)]}


def one_sweep(backend: str, folder: Path) -> dict:
    from loraqa.io import read_json

    out = folder / backend
    cmd = [sys.executable, "-m", "loraqa.cli", "sweep", str(TINY), "-o", str(out), *BACKENDS[backend]]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{backend}: exit {done.returncode}\n{done.stderr[-3000:]}")
    children = [read_json(p)["attempts"][-1]["wall_seconds"] for p in sorted(out.glob("*/run.json"))]
    shutil.rmtree(out)
    n = len(children)
    return {"wall": wall, "child": sum(children) / n, "outside": (wall * AT_ONCE - sum(children)) / n, "n": n}


def ray_start_stop() -> float:
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    ray.shutdown()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    results: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    with tempfile.TemporaryDirectory(prefix="loraqa-bench-") as tmp:
        for r in range(args.rounds):
            for backend in BACKENDS if r % 2 == 0 else reversed(BACKENDS):
                res = one_sweep(backend, Path(tmp))
                results[backend].append(res)
                print(f"round {r + 1} {backend:5s}: wall {res['wall']:.1f} s, child {res['child']:.1f} s/trial, "
                      f"outside the children {res['outside']:.1f} s/trial", flush=True)  # fmt: skip
    fixed = statistics.median(ray_start_stop() for _ in range(args.rounds))
    med = {
        b: {k: statistics.median(r[k] for r in rs) for k in ("wall", "child", "outside")}
        for b, rs in results.items()
    }
    n = results["local"][0]["n"]
    print(
        f"\n{platform.platform()}, {os.cpu_count()} CPUs; {n} trials, {AT_ONCE} at a time; median of {args.rounds}"
    )
    print("| backend | sweep wall (s) | child per trial (s) | outside the children per trial (s) |")
    print("| --- | --- | --- | --- |")
    for b, m in med.items():
        print(f"| {b} | {m['wall']:.1f} | {m['child']:.1f} | {m['outside']:.1f} |")
    extra = med["ray"]["outside"] - med["local"]["outside"]
    print(
        f"\nRay's overhead per trial: {extra:.1f} s; starting and stopping the local Ray instance alone: {fixed:.1f} s"
    )


if __name__ == "__main__":
    main()

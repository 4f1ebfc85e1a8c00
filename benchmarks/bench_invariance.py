"""Does an answer depend on the questions batched with it? And what does answering each one independently cost?

Answers the first N dev questions of a trained run (the README's main job: ``runs/quickstart``) in one process:
batched greedy decoding (``eval.batch_invariant=false``) at eval batch sizes 1, 8 and 32, the batch-invariant
path (the default: each paragraph once, each question decoded alone), and ``ask`` (each question asked on its
own, as ``loraqa ask`` does). Prints the time of each and, for every pair, how many answers differ; the run's
own ``predictions.json`` is one more column.

    python benchmarks/bench_invariance.py runs/quickstart --data-dir ../shared/squad --limit 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loraqa.answering import answer, load_answerer
from loraqa.config import apply_overrides
from loraqa.data import load_split
from loraqa.layout import OFFICIAL_PREDICTIONS_FILE
from loraqa.predict import ask


def answers_of(answerer, examples, **eval_overrides) -> tuple[dict[str, str], float]:
    cfg = apply_overrides(answerer.cfg, [(f"eval.{k}", v) for k, v in eval_overrides.items()])
    start = time.perf_counter()
    model, tok = answerer.model, answerer.tokenizer
    records, _ = answer(model, tok, examples, cfg.eval, max_length=cfg.prompt.max_length, progress=False)
    return {r["id"]: r["prediction"] for r in records}, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder (loraqa train -o)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--ask-limit", type=int, default=None, help="questions asked one at a time (default: all)")
    p.add_argument("--out", help="write the table and the answers here as JSON")
    args = p.parse_args()

    answerer = load_answerer(args.run, overrides=[("data.data_dir", args.data_dir)] if args.data_dir else [])
    dev, _, _ = load_split(answerer.cfg.data, "dev", limit=args.limit)
    columns: dict[str, dict[str, str]] = {}
    seconds: dict[str, float] = {}
    run_predictions = json.loads((Path(args.run) / OFFICIAL_PREDICTIONS_FILE).read_text())
    columns["run"] = {ex.id: run_predictions[ex.id] for ex in dev if ex.id in run_predictions}
    for bs in (32, 8, 1):
        columns[f"batched-{bs}"], seconds[f"batched-{bs}"] = answers_of(answerer, dev, batch_invariant=False,
                                                                        batch_size=bs)  # fmt: skip
    columns["invariant"], seconds["invariant"] = answers_of(answerer, dev, batch_invariant=True)
    asked = dev[: args.ask_limit] if args.ask_limit else dev
    start = time.perf_counter()
    columns["ask"] = {ex.id: ask(answerer, [ex.question], ex.context)[0] for ex in asked}
    seconds["ask"] = time.perf_counter() - start

    names = list(columns)
    print(f"{len(dev)} dev questions, {answerer.cfg.model.name}, precision {answerer.cfg.model.precision}")
    print("\nseconds (questions/s):")
    for name, s in seconds.items():
        n = len(columns[name])
        print(f"  {name:<12} {s:8.1f}  ({n / s:.2f} q/s, {s / seconds['batched-32']:.2f}x batched-32)")
    print("\nanswers that differ (of the questions both answered):")
    print(" " * 13 + "".join(f"{n:>12}" for n in names))
    table = {}
    for a in names:
        row = []
        for b in names:
            common = columns[a].keys() & columns[b].keys()
            diff = sum(columns[a][i] != columns[b][i] for i in common)
            table[f"{a}|{b}"] = [diff, len(common)]
            row.append(f"{diff}/{len(common)}")
        print(f"  {a:<11}" + "".join(f"{c:>12}" for c in row))
    if args.out:
        Path(args.out).write_text(json.dumps({"seconds": seconds, "differ": table, "answers": columns}, indent=1))


if __name__ == "__main__":
    main()

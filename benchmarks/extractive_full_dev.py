"""Extractive against free decoding on a whole dev set, paired, at the cost of one free pass.

With batch-invariant answers (``eval.batch_invariant``, the default) each answer is a function of its own
paragraph and question, and the extractive constraint never blocks a token of a free answer that already is a
non-empty piece of its paragraph (``loraqa.generate.SpanConstraint``). So the two decodings can differ only on
the questions whose free answer is empty or not in the paragraph. This script

1. ``subset``: from a free evaluation (a folder with ``predictions.jsonl``), writes a SQuAD-format dev file with
   those questions plus a check slice of every question (``--check-first`` questions from ``--check-from``);
2. (you run ``loraqa eval RUN eval.extractive=true data.dev_file=SUBSET ...`` on it);
3. ``compare``: checks that the extractive answers equal the free ones on the check slice wherever the free
   answer is a piece of its paragraph (it stops if not: then the argument above does not hold there), splices
   the extractive answers into the free ones and prints both scores and the paired difference, with the
   report's noise rule (2 standard errors of the per-question difference).

    python benchmarks/extractive_full_dev.py subset FREE_DIR --dev DEV.json -o SUBSET.json
    python benchmarks/extractive_full_dev.py compare FREE_DIR EXTRACTIVE_DIR --dev DEV.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from loraqa.data import load_squad
from loraqa.layout import PREDICTIONS_FILE
from loraqa.metrics import score_one
from loraqa.report.cells import SE_MULTIPLIER


def _records(folder: Path) -> dict[str, dict]:
    lines = (folder / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()
    return {r["id"]: r for r in map(json.loads, lines)}


def _steerable(answer: str, context: str) -> bool:
    """Whether the constraint can change this free answer: empty, or not a piece of its paragraph."""
    return not answer or answer not in context


def cmd_subset(args) -> int:
    free = _records(args.free)
    examples, _ = load_squad(args.dev, split="dev")
    check = {ex.id for ex in examples[args.check_from : args.check_from + args.check_first]}
    keep = {ex.id for ex in examples if ex.id in check or _steerable(free[ex.id]["prediction"], ex.context)}
    data = json.loads(args.dev.read_text(encoding="utf-8"))
    for article in data["data"]:
        for para in article["paragraphs"]:
            para["qas"] = [qa for qa in para["qas"] if qa["id"] in keep]
        article["paragraphs"] = [p for p in article["paragraphs"] if p["qas"]]
    data["data"] = [a for a in data["data"] if a["paragraphs"]]
    args.output.write_text(json.dumps(data), encoding="utf-8")
    print(
        f"{args.output}: {len(keep)} questions ({len(keep - check)} steerable outside the check slice of {len(check)})"
    )
    return 0


def _paired(a: list[float], b: list[float]) -> str:
    d = [100.0 * (x - y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    verdict = "beyond noise" if mean and abs(mean) > SE_MULTIPLIER * se else "within noise"
    return f"{mean:+.2f} ± {SE_MULTIPLIER * se:.2f} ({verdict})"


def cmd_compare(args) -> int:
    free, extractive = _records(args.free), _records(args.extractive)
    examples, _ = load_squad(args.dev, split="dev")
    by_id = {ex.id: ex for ex in examples}
    kept = [i for i in extractive if not _steerable(free[i]["prediction"], by_id[i].context)]
    broken = [i for i in kept if extractive[i]["prediction"] != free[i]["prediction"]]
    if broken:
        print(
            f"{len(broken)} of {len(kept)} checked answers that are pieces of the paragraph changed, e.g. "
            f"{broken[0]}: {free[broken[0]]['prediction']!r} -> {extractive[broken[0]]['prediction']!r}"
        )
        return 1
    missing = [
        ex.id
        for ex in examples
        if _steerable(free[ex.id]["prediction"], ex.context) and ex.id not in extractive
    ]
    if missing:
        print(
            f"{len(missing)} steerable questions have no extractive answer (e.g. {missing[0]}): run the subset"
        )
        return 1
    rows = {"free": [], "extractive": []}
    for ex in examples:
        answer = extractive[ex.id]["prediction"] if ex.id in extractive else free[ex.id]["prediction"]
        rows["free"].append(score_one(free[ex.id]["prediction"], ex.answers))
        rows["extractive"].append(score_one(answer, ex.answers))
    changed = sum(extractive[i]["prediction"] != free[i]["prediction"] for i in extractive)
    print(
        f"{len(examples)} questions; check slice: {len(kept)} answers that are pieces of the paragraph, all "
        f"unchanged; {changed} answers changed in all"
    )
    print("| decoding | EM | F1 | answers not in the paragraph |\n|---|---:|---:|---:|")
    for name, scores in rows.items():
        answers = [
            extractive.get(ex.id, free[ex.id]) if name == "extractive" else free[ex.id] for ex in examples
        ]
        outside = sum(
            bool(r["prediction"]) and r["prediction"] not in ex.context
            for r, ex in zip(answers, examples, strict=True)
        )
        em, f1 = (100 * sum(s[k] for s in scores) / len(scores) for k in (0, 1))
        print(f"| {name} | {em:.2f} | {f1:.2f} | {outside} |")
    for k, metric in enumerate(("EM", "F1")):
        print(
            f"paired {metric}, extractive - free: "
            f"{_paired([s[k] for s in rows['extractive']], [s[k] for s in rows['free']])}"
        )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subset")
    s.add_argument("free", type=Path)
    s.add_argument("--dev", type=Path, required=True)
    s.add_argument("-o", "--output", type=Path, required=True)
    s.add_argument("--check-from", type=int, default=2000)
    s.add_argument("--check-first", type=int, default=1000)
    c = sub.add_parser("compare")
    c.add_argument("free", type=Path)
    c.add_argument("extractive", type=Path)
    c.add_argument("--dev", type=Path, required=True)
    args = p.parse_args(argv)
    return cmd_subset(args) if args.cmd == "subset" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())

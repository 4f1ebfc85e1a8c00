"""One epoch of ``loraqa train``, measured in pieces that each survive a replaced machine.

A whole epoch of SQuAD (87,599 questions, ~10,950 optimizer steps of 8) takes longer than a working session,
and a run that goes on from its checkpoint is lost with the machine. So the epoch is cut into ``--pieces`` K
parts: piece i is every K-th paragraph of the train file from paragraph i. The pieces are disjoint, together
they are the whole file, and each has the file's mix of paragraph lengths, so any of them done so far are a
fair sample of the epoch. Each piece is one ``loraqa train`` process: one epoch of its paragraphs with loraqa's
defaults (and any ``KEY=VALUE`` overrides), from a fresh adapter (a step's speed does not depend on the
weights), no evaluation during training. After each piece, one JSON line goes to ``--record`` (commit it):
its questions, optimizer steps, ``train_seconds`` and ``compile_seconds`` from its metrics.json, the machine,
the commit, and how much of the CPU other processes and the hypervisor (steal) took meanwhile. A rerun skips
the pieces recorded for this machine and these settings; a piece interrupted midway runs again from its start,
so each recorded time is one uninterrupted run::

    .venv/bin/python benchmarks/epoch_time.py --max-pieces 4      # the next 4 pieces, then the table
    .venv/bin/python benchmarks/epoch_time.py --report            # the table of what is recorded

The table sums the recorded pieces per machine and settings: all K on one machine are a measured epoch; fewer
are the measured part, with a projection from it, labelled as one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import DEFAULT_DATA_DIR, REPO, questions_in, train_paragraphs, write_train_slice  # noqa: E402
from loraqa.data import DataError  # noqa: E402
from loraqa.layout import METRICS_FILE  # noqa: E402

DEFAULT_RECORD = REPO / "docs" / "epoch" / "pieces.jsonl"
DEFAULT_WORK = REPO / "runs" / "epoch-pieces"
# what a piece is trained as beside loraqa's defaults: one epoch, no evaluation loss or scores during training,
# one dev question at the end (a run needs one)
PIECE_ARGS = ["--epochs", "1", "--eval-limit", "1", "train.eval_steps=0", "eval.score_steps=0"]


def machine() -> str:
    """The CPU's name, family model number and bf16 instructions: a VM type, as the project's docs name them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    first_cpu = text.split("\n\n")[0].splitlines()
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu if ":" in line)}
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in fields.get("flags", "").split()] or ["no bf16"]
    return f"{fields.get('model name', '?')}, model {fields.get('model', '?')}, {'+'.join(bf16)}"


def cpu_counters() -> dict | None:
    """Seconds of busy, steal and all CPU time since boot, all cores together (Linux's /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = values
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "busy": (user + nice + system + irq + softirq) / tick,
        "steal": steal / tick,
        "all": sum(values) / tick,
    }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def commit() -> str:
    """HEAD, and ``-dirty`` when the code a piece runs (src, benchmarks) differs from it: the record itself
    changes as pieces are added, and does not count."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return "?"
    code = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "src", "benchmarks"])
    return head.stdout.strip() + ("-dirty" if code.returncode else "")


def run_piece(index: int, args, paragraphs: tuple[str, list]) -> dict:
    """Train piece ``index`` in its own ``loraqa train`` process; its record."""
    version, all_paragraphs = paragraphs
    work = Path(args.work) / f"piece-{index}"
    shutil.rmtree(work, ignore_errors=True)  # a piece interrupted before starts over
    questions = write_train_slice(
        Path(args.data_dir), work / "data", version, all_paragraphs[index :: args.pieces]
    )
    command = [sys.executable, "-m", "loraqa.cli", "train", "--model", args.model, "--data-dir", str(work / "data"),
               "-o", str(work / "run"), *PIECE_ARGS, *(["--device", args.device] if args.device else []),
               *args.overrides]  # fmt: skip
    code = commit()  # before the piece starts: the code its process imports
    start, before, cpu_before = time.time(), cpu_counters(), children_cpu()
    with open(work / "log.txt", "w") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall, after, own_cpu = time.time() - start, cpu_counters(), children_cpu() - cpu_before
    if rc != 0:
        tail = (work / "log.txt").read_text()[-3000:]
        raise SystemExit(f"piece {index}: loraqa train exited with {rc}; the end of its log:\n{tail}")
    m = json.loads((work / "run" / METRICS_FILE).read_text())
    record = {
        "piece": index, "pieces": args.pieces, "model": args.model, "overrides": list(args.overrides),
        "machine": machine(), "commit": code, "torch_threads": m.get("torch_threads"),
        "start_utc": dt.datetime.fromtimestamp(start, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "questions": questions, "train_questions": m.get("train_questions"), "train_steps": m.get("train_steps"),
        "train_seconds": m.get("train_seconds"), "compile_seconds": m.get("compile_seconds", 0.0),
        "train_compile": m.get("train_compile"), "attention": m.get("train_attn_implementation"),
        "final_train_loss": m.get("final_train_loss"), "process_seconds": round(wall, 1),
    }  # fmt: skip
    if before and after:  # CPU others used while the piece ran (its own process excluded), and steal
        cores = os.cpu_count() or 1
        record["others_cpu_share"] = round(
            max(after["busy"] - before["busy"] - own_cpu, 0.0) / (wall * cores), 3
        )
        record["steal_share"] = round(
            (after["steal"] - before["steal"]) / max(after["all"] - before["all"], 1e-9), 3
        )
    shutil.rmtree(work, ignore_errors=True)  # the adapter is not kept: only the time is wanted
    return record


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def settings(r: dict) -> tuple:
    """What makes two pieces parts of the same epoch: the machine, the model, the cut and the overrides."""
    return r["machine"], r["model"], r["pieces"], tuple(r["overrides"])


def totals(rs: list[dict]) -> dict:
    """The pieces' questions, steps and training seconds added up, and the seconds less the compilations that
    one run of them all would not repeat (each piece compiles again; one run would compile once)."""
    seconds = sum(r["train_seconds"] for r in rs)
    compiles = [r["compile_seconds"] for r in rs]
    return {"questions": sum(r["questions"] for r in rs), "steps": sum(r["train_steps"] for r in rs),
            "seconds": seconds, "compiling_once": seconds - sum(compiles) + max(compiles)}  # fmt: skip


def epoch_table(records: list[dict], file_questions: int | None) -> str:
    """Markdown: the recorded pieces of each machine and settings, and the epoch they add up to."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(settings(r), []).append(r)
    out = []
    for (where, model, pieces, overrides), rs in groups.items():
        rs = sorted({r["piece"]: r for r in rs}.values(), key=lambda r: r["piece"])  # a piece's latest record
        out += [f"**{model}** {' '.join(overrides)} on {where}, {pieces} pieces\n",
                "| piece | start (UTC) | commit | questions | steps | train s | s a step | compile s | others' CPU | steal |",
                "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rs:
            out.append(f"| {r['piece']} | {r['start_utc']} | {r['commit']} | {r['questions']:,} | {r['train_steps']:,} "
                       f"| {r['train_seconds']:,.0f} | {r['train_seconds'] / r['train_steps']:.3f} "
                       f"| {r['compile_seconds']:.1f} | {r.get('others_cpu_share', 0):.0%} | {r.get('steal_share', 0):.0%} |")  # fmt: skip
        t = totals(rs)
        out.append(f"\n{len(rs)} of {pieces} pieces: {t['questions']:,} questions, {t['steps']:,} steps, "
                   f"{t['seconds'] / 3600:.2f} h of training ({t['compiling_once'] / 3600:.2f} h compiling once), "
                   f"{t['seconds'] / t['steps']:.3f} s a step.")  # fmt: skip
        if len(rs) == pieces:
            whole, once = t["seconds"] / 3600, t["compiling_once"] / 3600
            out.append(f"**The whole epoch, measured: {whole:.2f} h** ({once:.2f} h compiling once).")
        elif file_questions:
            out.append(f"Not yet the whole epoch: at the pieces' rate, {file_questions:,} questions would take "
                       f"{t['seconds'] * file_questions / t['questions'] / 3600:.2f} h (a projection).")  # fmt: skip
        out.append("")
    return "\n".join(out) if out else "nothing recorded yet"


def run_pieces(args, record: Path, paragraphs: tuple[str, list]) -> None:
    """The pieces not yet recorded for this machine and these settings (``--max-pieces`` of them), each
    recorded as soon as it ends."""
    mine = settings(
        {"machine": machine(), "model": args.model, "pieces": args.pieces, "overrides": args.overrides}
    )
    done = {r["piece"] for r in read_records(record) if settings(r) == mine}
    todo = [i for i in range(args.pieces) if i not in done][: args.max_pieces]
    for n, index in enumerate(todo, 1):
        print(
            f"piece {index} ({n} of {len(todo)} now, {len(done)} of {args.pieces} recorded before) ...",
            flush=True,
        )
        r = run_piece(index, args, paragraphs)
        record.parent.mkdir(parents=True, exist_ok=True)
        with record.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"piece {index}: {r['train_steps']} steps in {r['train_seconds']:.0f} s, "
              f"others' CPU {r.get('others_cpu_share', 0):.0%}", flush=True)  # fmt: skip


def _stop(signum, frame):
    # as for Ctrl-C: subprocess.run then kills the piece's process, which would otherwise train on alone
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every piece")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--data-dir", default=str(DEFAULT_DATA_DIR), help="SQuAD v1.1 (train-v1.1.json, dev-v1.1.json)"
    )
    p.add_argument("--pieces", type=int, default=24, help="the epoch is cut into this many (default 24)")
    p.add_argument(
        "--max-pieces", type=int, default=None, help="run at most this many pieces now (default: all left)"
    )
    p.add_argument("--record", default=str(DEFAULT_RECORD), help="the JSON-lines file of pieces (commit it)")
    p.add_argument(
        "--work", default=str(DEFAULT_WORK), help="where a piece's data and run folder live meanwhile"
    )
    p.add_argument("--device", default=None, help="cpu, cuda (default: loraqa's)")
    p.add_argument("--report", action="store_true", help="only print the table of what is recorded")
    args = p.parse_args(argv)
    if args.pieces < 1:
        p.error("--pieces must be at least 1")
    record = Path(args.record)
    try:
        paragraphs = train_paragraphs(Path(args.data_dir))
    except DataError as e:
        p.error(str(e))
    file_questions = questions_in(paragraphs[1])
    if not args.report:
        signal.signal(signal.SIGTERM, _stop)
        try:
            run_pieces(args, record, paragraphs)
        except KeyboardInterrupt:  # the records written so far stay; the piece cut short runs again next time
            print("stopped: rerun the same command to go on", file=sys.stderr)
            return 130
    print(epoch_table(read_records(record), file_questions))
    return 0


if __name__ == "__main__":
    sys.exit(main())

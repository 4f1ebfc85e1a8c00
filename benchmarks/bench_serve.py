"""Load on `loraqa serve`: 1, 4, 16 and 64 concurrent loopback clients against one-at-a-time answering::

    .venv/bin/python benchmarks/bench_serve.py --run examples/smollm2-squad --data-dir ../shared/squad
    .venv/bin/python benchmarks/bench_serve.py                       # random-gpt2-124m, SQuAD from the usual place
    .venv/bin/python benchmarks/bench_serve.py --model tiny-random-gpt2 --data-dir synthetic --requests 2

One model is loaded, once. First it answers ``--reference`` questions one at a time, each a direct call of the
answerer (no server, no HTTP) from a thread of its own, as the server's worker is one: the one-at-a-time
reference. Then the same answerer is served by the app of
``loraqa serve`` (its queue and worker, uvicorn, in a thread of this process, on a free 127.0.0.1 port), and
for each client count every client sends ``--requests`` requests, one after another, each one SQuAD dev
paragraph and one of its questions. The questions are the dev set's, in file order, dealt round-robin: at any
moment the clients ask about neighbouring questions, which often share a paragraph (SQuAD has ~5 a
paragraph), as readers of the same page would; ``--order shuffled`` deals them at random instead.

Reported per row: answers/s (questions answered / wall time of the row), p50 and p95 latency of a request
(send to answer), answers lost (requests without exactly their answer: must be 0), the mean micro-batch, and
the answers/s as a multiple of one-at-a-time. Also: how many served answers equal the reference's, where the
same question was answered both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

CLIENTS = (1, 4, 16, 64)

# OpenMP threads that wait for work by sleeping, not spinning: on a CPU shared with other jobs a spinning
# thread whose partner is descheduled burns its core, and on the 2-core VM torch then ran 5 to 25 times slower
# in some threads than in others (which thread depended on the order they first ran torch), so neither side of
# the comparison could be trusted. Set before torch is imported; an OMP_WAIT_POLICY already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def question_pool(data_dir: str, limits, n: int, order: str, seed: int) -> list:
    """The first ``n`` dev questions whose paragraph fits the server's length limit (file order, or shuffled)."""
    from loraqa.data import load_squad, make_synthetic_squad, squad_path
    from loraqa.serve.schema import AnswerRequest

    if data_dir == "synthetic":
        import tempfile

        source = make_synthetic_squad(tempfile.mkdtemp(prefix="bench-serve-"), n_train=1, n_dev=max(n, 64))
    else:
        source = squad_path("dev", data_dir)
    examples, _ = load_squad(source, split="dev")
    pool = []
    for ex in examples:
        try:
            limits.check(AnswerRequest(context=ex.context, questions=[ex.question]))
        except Exception:  # a paragraph over the limit would be a 422, not a load
            continue
        pool.append(ex)
        if len(pool) == n:
            break
    if order == "shuffled":
        random.Random(seed).shuffle(pool)
    return pool


def in_thread(fn, *args):
    """``fn(*args)`` in a new thread: the model runs outside the main thread, as in the server's worker."""
    import threading

    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fn(*args)), name="one-at-a-time")
    thread.start()
    thread.join()
    if "result" not in out:
        raise SystemExit("the one-at-a-time reference failed (see above)")
    return out["result"]


def one_at_a_time(answerer, examples) -> dict:
    """Each question its own direct call of the answerer: answers/s, latencies, the answers by question id."""
    latencies, answers = [], {}
    start = time.perf_counter()
    for ex in examples:
        t = time.perf_counter()
        records, _ = answerer.answer([ex])
        latencies.append(time.perf_counter() - t)
        answers[ex.id] = records[0].get("generated", records[0]["prediction"])
    wall = time.perf_counter() - start
    return {"questions": len(examples), "wall": wall, "answers_per_s": len(examples) / wall,
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "answers": answers}  # fmt: skip


async def load_row(url: str, pool: list, clients: int, requests: int) -> dict:
    """``clients`` clients at once, ``requests`` requests each, one after another; the pool dealt round-robin."""
    import httpx

    latencies: list[float] = []
    lost: list[str] = []
    answers: dict[str, str] = {}

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for k in range(requests):
            ex = pool[(k * clients + c) % len(pool)]
            t = time.perf_counter()
            r = await http.post("/v1/answer", json={"context": ex.context, "questions": [ex.question]})
            latencies.append(time.perf_counter() - t)
            got = r.json().get("answers") if r.status_code == 200 else None
            if not got or len(got) != 1 or got[0]["question"] != ex.question:
                lost.append(f"{ex.id}: {r.status_code} {r.text[:200]}")
                continue
            answers[ex.id] = got[0]["answer"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - start
    n = clients * requests
    return {"clients": clients, "requests": n, "wall": wall, "answers_per_s": (n - len(lost)) / wall,
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "lost": lost,
            "answers": answers}  # fmt: skip


def serve_rows(answerer, run_dir, pool, clients: tuple[int, ...], requests: int) -> list[dict]:
    import httpx

    from loraqa.serve import BackgroundServer, ServeSettings, create_app

    settings = ServeSettings(queue_size=max(128, 2 * max(clients)))  # room for every client: nothing refused
    rows = []
    with BackgroundServer(create_app(answerer, run_dir=run_dir, settings=settings)) as live:
        asyncio.run(load_row(live.url, pool, 1, 1))  # warm-up: first request through every layer
        for n in clients:
            before = httpx.get(f"{live.url}/health").json()["queue"]
            row = asyncio.run(load_row(live.url, pool, n, requests))
            after = httpx.get(f"{live.url}/health").json()["queue"]
            batches = after["batches"] - before["batches"]
            row["mean_batch"] = (after["questions_answered"] - before["questions_answered"]) / max(batches, 1)
            rows.append(row)
            print(f"  {n:>3} clients: {row['answers_per_s']:.2f} answers/s, p50 {row['p50']:.2f} s, "
                  f"p95 {row['p95']:.2f} s, lost {len(row['lost'])}, mean batch {row['mean_batch']:.1f}",
                  file=sys.stderr)  # fmt: skip
    return rows


def table(reference: dict, rows: list[dict]) -> str:
    lines = ["| clients | requests | answers/s | p50 latency | p95 latency | lost | mean micro-batch | × one-at-a-time |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| one at a time (direct calls) | {reference['questions']} | {reference['answers_per_s']:.2f} | "
             f"{reference['p50']:.2f} s | {reference['p95']:.2f} s | – | 1 | 1.00 |"]  # fmt: skip
    for r in rows:
        ratio = r["answers_per_s"] / reference["answers_per_s"]
        lines.append(f"| {r['clients']} | {r['requests']} | {r['answers_per_s']:.2f} | {r['p50']:.2f} s | "
                     f"{r['p95']:.2f} s | {len(r['lost'])} | {r['mean_batch']:.1f} | {ratio:.2f} |")  # fmt: skip
    return "\n".join(lines)


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average": os.getloadavg()}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a run folder (e.g. examples/smollm2-squad)")
    p.add_argument("--model", help="a base model zero-shot (default random-gpt2-124m when no --run)")
    p.add_argument("--data-dir", help="SQuAD folder (default: loraqa's usual place), or 'synthetic'")
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    p.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    p.add_argument("--reference", type=int, default=32, help="questions answered one at a time (default 32)")
    p.add_argument("--order", choices=("file", "shuffled"), default="file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--batched", action="store_true", help="loraqa serve --batched (eval.batch_invariant=false)")
    args = p.parse_args()

    from loraqa.answering import load_answerer
    from loraqa.serve.limits import InputLimits

    model = None if args.run else (args.model or "random-gpt2-124m")
    overrides = [("eval.batch_invariant", False)] if args.batched else []
    answerer = load_answerer(args.run, model=model, overrides=overrides)
    n_pool = max(args.reference, max(args.clients) * args.requests)
    pool = question_pool(args.data_dir, InputLimits(answerer, 32), n_pool, args.order, args.seed)
    in_thread(one_at_a_time, answerer, pool[:1])  # warm-up
    print(f"one at a time: {args.reference} questions ...", file=sys.stderr)
    reference = in_thread(one_at_a_time, answerer, pool[: args.reference])
    rows = serve_rows(answerer, args.run, pool, tuple(args.clients), args.requests)
    print(table(reference, rows))
    same = [(qid, a) for row in rows for qid, a in row["answers"].items() if qid in reference["answers"]]
    equal = sum(reference["answers"][qid] == a for qid, a in same)
    print(f"\nserved answers equal to the one-at-a-time answer for the same question: {equal} of {len(same)}")
    at16 = [r for r in rows if r["clients"] == 16]
    if at16:
        print(f"at 16 clients: {at16[0]['answers_per_s'] / reference['answers_per_s']:.2f}x one-at-a-time answers/s")
    info = {"model": args.run or model, "order": args.order, "requests_per_client": args.requests, **machine(),
            "reference": {k: v for k, v in reference.items() if k != "answers"},
            "rows": [{k: v for k, v in r.items() if k != "answers"} for r in rows],
            "equal_answers": [equal, len(same)]}  # fmt: skip
    print(json.dumps({k: info[k] for k in ("model", "cpu", "threads", "torch", "omp_wait_policy", "load_average")}))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 1 if any(r["lost"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

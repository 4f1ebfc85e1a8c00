"""One run over two processes (torchrun, gloo, CPU): the same training as one process, one run folder, every dev
question answered once, and a run killed mid-training resumes under torchrun.

The model is the tiny random GPT-2 saved with its dropouts at 0 (and LoRA dropout 0): with dropout each process
draws its own masks, so two processes would not train exactly like one. Without dropout the two runs do the same
arithmetic but for the order of float sums (a batch split in two, gradients all-reduced), so losses agree to
rel 1e-5 and the answers are the same strings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from loraqa.config import ConfigError, ExperimentConfig, apply_overrides
from loraqa.data import load_squad
from loraqa.layout import LOCK_FILE
from loraqa.pipeline import run_experiment

pytestmark = pytest.mark.slow  # each torchrun starts two Python processes that import torch (~5 s each)

REL = 1e-5  # 1 vs 2 processes: float sums in another order, nothing else


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    from loraqa.model import load_base_model, load_gpt2_tokenizer

    folder = tmp_path_factory.mktemp("tiny-no-dropout")
    model = load_base_model("tiny-random-gpt2")
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    model.save_pretrained(folder)
    load_gpt2_tokenizer().save_pretrained(folder)
    return folder


def settings(model, data, **extra) -> dict:
    """A tiny run: 18 train questions, 4 a step (2 per process), so each epoch ends in a step of 2 (one a
    process: never padded with the epoch's first questions); 6 eval-loss questions, in batches of 4 and 2 (no
    whole round of 2 batches a process); lr high enough that unsynchronised processes would drift apart within
    a step; 9 dev questions, so the two shares differ in size (4 and 5)."""
    s = {
        "model.name": str(model), "model.precision": "fp32", "data.data_dir": str(data), "data.train_limit": 18,
        "data.eval_limit": 9, "data.loss_eval_limit": 6, "lora.dropout": 0.0, "train.max_steps": 6,
        "train.batch_size": 4, "train.lr": 1e-2, "train.warmup_steps": 0, "train.eval_steps": 3,
        "train.save_steps": 3, "train.logging_steps": 1, "eval.batch_size": 2, "eval.max_new_tokens": 4,
    }  # fmt: skip
    s.update(extra)
    return s


def one_process(settings_: dict, run_dir) -> dict:
    return run_experiment(apply_overrides(ExperimentConfig(), list(settings_.items())), run_dir, progress=False)


def torchrun_command(settings_: dict, run_dir) -> list[str]:
    # --standalone: a rendezvous on a free port, so parallel test runs never collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "loraqa.cli", "train", *(f"{k}={v}" for k, v in settings_.items()), "-o", str(run_dir)]  # fmt: skip


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LORAQA_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (torchrun starts each worker in a session of its own, so killing
    torchrun's process group alone would leave them running)."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)


def run_torchrun(settings_: dict, run_dir, timeout: float = 300, command: list[str] | None = None):
    proc = subprocess.Popen(command or torchrun_command(settings_, run_dir), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def failure(done: subprocess.CompletedProcess) -> str:
    """What a failed torchrun said: the lines that name a worker's own error (they come before the launcher's
    report, which alone fills the tail), then the tail."""
    cause = [line for line in done.stdout.splitlines() if any(w in line for w in ("terminate called", "what():",
             "Error", "Fatal"))]  # fmt: skip
    return "\n".join(cause[-20:]) + "\n...\n" + done.stdout[-3000:]


def history(run_dir, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "log_history.jsonl").read_text().splitlines()]
    return [(h["step"], h[key]) for h in rows if key in h]


def test_two_processes_train_and_score_like_one(tmp_path, synthetic_dir, no_dropout_model):
    s = settings(no_dropout_model, synthetic_dir)
    ref = one_process(s, tmp_path / "one")
    done = run_torchrun(s, tmp_path / "two")
    assert done.returncode == 0, failure(done)
    two = tmp_path / "two"
    metrics = json.loads((two / "metrics.json").read_text())

    # one complete run folder, written once
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert not (two / "checkpoints").exists() and [p.name for p in two.glob(".*")] == [LOCK_FILE]  # no temp files
    assert metrics["world_size"] == 2 and ref["world_size"] == 1
    assert done.stdout.count("EM ") == 1  # one process printed the result

    # the same training: every logged loss, the tokens, the final losses
    for key in ("loss", "eval_loss"):
        a, b = history(tmp_path / "one", key), history(two, key)
        assert [step for step, _ in a] == [step for step, _ in b] and len(a) >= 2, key
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=REL), key
    assert metrics["train_steps"] == ref["train_steps"] == 6
    assert metrics["train_tokens"] == ref["train_tokens"]
    assert metrics["train_questions"] == ref["train_questions"] == 18 + 4  # an epoch of 5 steps, then one more
    for key in ("final_train_loss", "final_eval_loss"):
        assert metrics[key] == pytest.approx(ref[key], rel=REL), key

    # every dev question answered once, in dev order, as one process answers it
    dev, _ = load_squad(synthetic_dir, split="dev", limit=9)
    preds = [json.loads(line) for line in (two / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [ex.id for ex in dev]
    assert (two / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
    assert (metrics["exact_match"], metrics["f1"], metrics["n_questions"]) == (
        ref["exact_match"], ref["f1"], ref["n_questions"])  # fmt: skip


def test_two_processes_of_plain_random_batches_train_like_one(tmp_path, synthetic_dir, no_dropout_model):
    """No length grouping, no shared contexts: the seeded random order (padded with fillers at an epoch's end)
    is the one process's, epoch after epoch (18 questions, 6 steps of 4: two epochs)."""
    s = settings(no_dropout_model, synthetic_dir, **{"train.group_by_length": False, "train.share_contexts": False})
    ref = one_process(s, tmp_path / "one")
    done = run_torchrun(s, tmp_path / "two")
    assert done.returncode == 0, failure(done)
    a, b = history(tmp_path / "one", "loss"), history(tmp_path / "two", "loss")
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=REL) and len(a) == 6
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["train_questions"] == ref["train_questions"] == 22


def test_compiled_layers_under_torchrun_train_like_one_eager_process(
    tmp_path, synthetic_dir, no_dropout_model
):
    """train.compile=layers inside DDP: each process compiles its own decoder layers, the DDP wrapper around them
    all-reduces their LoRA gradients, and the two processes train as one eager process does (inductor's kernels
    sum in another order than eager's: rel 1e-4)."""
    s = settings(no_dropout_model, synthetic_dir, **{"train.eval_steps": 0})
    ref = one_process({**s, "train.compile": "off"}, tmp_path / "one")
    done = run_torchrun({**s, "train.compile": "layers"}, tmp_path / "two", timeout=600)
    assert done.returncode == 0, failure(done)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["train_compile"], ref["train_compile"]) == (2, "layers", "off")
    assert metrics["compile_seconds"] > 0
    a, b = history(tmp_path / "one", "loss"), history(tmp_path / "two", "loss")
    assert [step for step, _ in a] == [step for step, _ in b] == list(range(1, 7))
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-4)
    assert metrics["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=1e-4)


def test_eval_under_torchrun_answers_each_question_once(tmp_path, synthetic_dir, no_dropout_model):
    """`loraqa eval RUN` under torchrun: each process answers its share, the main one writes what one process
    would (before, each process answered half and then failed: its share did not match the dev set)."""
    from loraqa.answering import eval_run_dir

    run = tmp_path / "run"
    one_process(settings(no_dropout_model, synthetic_dir), run)
    ref = eval_run_dir(run, progress=False)
    expected = (run / "eval-9" / "predictions.jsonl").read_text()
    (run / "eval-9").rename(tmp_path / "one-process-eval")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "loraqa.cli", "eval", str(run)]  # fmt: skip
    done = run_torchrun({}, run, command=command)
    assert done.returncode == 0, failure(done)
    assert (run / "eval-9" / "predictions.jsonl").read_text() == expected
    assert json.loads((run / "eval-9" / "metrics.json").read_text())["f1"] == ref["f1"]
    assert done.stdout.count("EM ") == 1  # one process printed the result


def test_predict_under_torchrun_writes_what_one_process_writes(tmp_path, synthetic_dir, no_dropout_model):
    """`loraqa predict` under torchrun: the shares answered, one output as one process writes it, no journal
    left (each process kept its share in `OUT.partial.rank<i>.jsonl`)."""
    run = tmp_path / "run"
    one_process(settings(no_dropout_model, synthetic_dir, **{"train.max_steps": 2}), run)
    questions = synthetic_dir / "dev-v1.1.json"
    single = subprocess.run([sys.executable, "-m", "loraqa.cli", "predict", str(run), "-i", str(questions), "-o",
                             str(tmp_path / "one.jsonl")], env=env(), capture_output=True, text=True)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "loraqa.cli", "predict", str(run), "-i", str(questions), "-o", str(tmp_path / "two.jsonl")]  # fmt: skip
    done = run_torchrun({}, run, command=command)
    assert done.returncode == 0, failure(done)
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "run", "two.jsonl"]  # no journal left
    assert done.stdout.count("wrote ") == 1  # one process printed the result


def test_a_run_killed_under_torchrun_resumes_from_its_checkpoint(tmp_path, synthetic_dir, no_dropout_model):
    s = settings(no_dropout_model, synthetic_dir, **{"train.max_steps": 40, "train.save_steps": 5,
                                                     "train.eval_steps": 0, "train.logging_steps": 5})  # fmt: skip
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_command(s, run), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:  # SIGKILL everything once a checkpoint is complete (its clock file is written last)
        deadline = time.monotonic() + 240
        while not list(run.glob("checkpoints/checkpoint-*/loraqa_clock.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    assert not (run / "metrics.json").exists(), "the run finished before it was killed"

    done = run_torchrun(s, run)
    assert done.returncode == 0, failure(done)
    metrics = json.loads((run / "metrics.json").read_text())
    resumed_step = int(metrics["resumed_from"].split("-")[1])
    assert 0 < resumed_step < 40 and metrics["train_steps"] == 40 and metrics["train_segments"] == 2
    assert metrics["resumed_at_step"] == resumed_step  # the global step the Trainer itself restored
    # the Trainer really continued from that step: the loss curve logs each step once, and the run ends where
    # an uninterrupted one does
    steps = [step for step, _ in history(run, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    straight = one_process(s, tmp_path / "straight")
    assert metrics["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-4)
    if "train_seconds_cover_last_segment_only" not in metrics:
        assert metrics["train_tokens"] == straight["train_tokens"]  # first segment's + the rest, no step twice
    else:  # killed between the checkpoint's trainer state and its clock: tokens of the resumed part only
        assert metrics["train_tokens"] < straight["train_tokens"]


def test_ctrl_c_under_torchrun_saves_one_checkpoint_that_every_rank_stopped_at(tmp_path, synthetic_dir,
                                                                             no_dropout_model):  # fmt: skip
    """torchrun passes a Ctrl-C on to its workers and SIGKILLs them 30 s later: the ranks must agree on the
    step to stop at (a rank a step ahead would wait for the other in the gradient all-reduce until killed)."""
    s = settings(no_dropout_model, synthetic_dir, **{"train.max_steps": 400, "train.save_steps": 1000,
                                                     "train.eval_steps": 0, "train.logging_steps": 1})  # fmt: skip
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_command(s, run), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (run / "log_history.jsonl").is_file():  # training has begun
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was signalled"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        kill_tree(proc)
    checkpoints = list(run.glob("checkpoints/checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "loraqa_clock.json").is_file(), out[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert 0 < step < 400 and not (run / "metrics.json").exists()
    assert f"SIGINT at step {step}: saved checkpoint-{step}" in out
    assert "SIGKILL" not in out, "the ranks did not stop within torchrun's grace period: it killed them"

    done = run_torchrun(s, run)
    assert done.returncode == 0, failure(done)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_at_step"] == step and metrics["train_steps"] == 400
    assert [k for k, _ in history(run, "loss")] == list(range(1, 401))  # every step logged once
    # the steps after the resume continue an uninterrupted run (further on, at lr 1e-2, the float-order
    # differences of 1 vs 2 processes grow over hundreds of steps: compare where they are still rounding)
    straight = one_process(s, tmp_path / "straight")
    near = range(max(1, step - 2), min(step + 6, 401))
    assert [dict(history(run, "loss"))[k] for k in near] == pytest.approx(
        [dict(history(tmp_path / "straight", "loss"))[k] for k in near], rel=1e-4)
    assert straight["train_steps"] == 400


def test_a_batch_that_does_not_split_over_the_processes_is_one_clear_error(monkeypatch, tmp_path, synthetic_dir):
    from loraqa.trainer import per_process_batch

    cfg = apply_overrides(ExperimentConfig(), [("train.batch_size", 8)])
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"train\.batch_size=8 .* 3 processes"):
        per_process_batch(cfg.train)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert per_process_batch(cfg.train) == 2


def test_shares_cover_every_item_once_in_order(monkeypatch):
    from loraqa import dist

    for n in (0, 1, 5, 9, 16):
        for w in (1, 2, 3, 4):
            parts = []
            for r in range(w):
                parts += list(range(n))[dist.share(n, w, r)]
            assert parts == list(range(n)), (n, w)
    # a launcher's environment without a joined group: nothing could gather the shares, so no sharding
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dist.shard(9) == slice(0, 9)


REDUCE_SCRIPT = """
import json, sys
import torch.distributed as tdist
import torch.multiprocessing as mp
from loraqa import dist

def work(rank, out):
    tdist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
    got = [dist.sum_across(rank + 1), dist.sum_across(2**40 + rank), dist.max_across(rank * 2.5 - 1),
           dist.max_across(7 - rank), dist.gather_lists([rank])]
    json.dump(got + [[type(x).__name__ for x in got]], open(f"{out}.{rank}", "w"))
    dist.close()

if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1],), nprocs=2)
"""


def test_sums_and_maxima_over_two_processes_keep_their_type(tmp_path):
    # the interrupt check and the clock meet through these: every rank must get the same, exact figure
    script = tmp_path / "reduce.py"
    script.write_text(REDUCE_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, str(script), str(tmp_path / "out"), str(port)], env=env(), check=True,
                   timeout=120)  # fmt: skip
    expected = [3, 2**41 + 1, 1.5, 7, [0, 1], ["int", "int", "float", "int", "list"]]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out.{rank}").read_text()) == expected


SESSION_SCRIPT = """
import os, sys, time
import torch.distributed as tdist
import torch.multiprocessing as mp
from loraqa import dist

def work(rank, out, port, fail):
    tdist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=rank, world_size=2)
    try:
        with dist.session():
            if rank == 1:  # the slow process: it ends its block 2 s after the main process
                time.sleep(2)
                open(out + ".slow-done", "w").close()
            if fail:
                raise RuntimeError("both fail")
    except RuntimeError:
        pass
    if rank == 0:  # had rank 1 ended its block when rank 0 left its session?
        open(out + ".seen", "w").write(str(os.path.exists(out + ".slow-done")))

if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1], sys.argv[2], sys.argv[3] == "fail"), nprocs=2)
"""


@pytest.mark.parametrize("fail", [False, True])
def test_a_session_that_ends_well_waits_for_every_process_and_one_that_fails_does_not(tmp_path, fail):
    # a finished run's main process must not leave before its peer, which would abort (SIGABRT) mid-teardown
    script = tmp_path / "session.py"
    script.write_text(SESSION_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(script), str(out), str(port), "fail" if fail else "ok"], env=env(),
                   check=True, timeout=120)  # fmt: skip
    assert (tmp_path / "out.seen").read_text() == str(not fail)


def test_kill_tree_leaves_no_process(tmp_path):
    # the helper the resume test relies on: a parent and a child in a session of its own both die
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], " \
           "start_new_session=True); time.sleep(60)"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(proc.pid).children()[0]
    kill_tree(proc)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert proc.returncode == -signal.SIGKILL


def test_accelerate_launch_runs_the_same_command(tmp_path, synthetic_dir, no_dropout_model):
    # accelerate's multi-GPU launcher is torchrun underneath; without a GPU the processes join with gloo on CPU
    s = settings(no_dropout_model, synthetic_dir, **{"train.max_steps": 2, "train.eval_steps": 0,
                                                     "train.save_steps": 0, "data.eval_limit": 4})  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "loraqa.cli", "train", *(f"{k}={v}" for k, v in s.items()), "-o", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, out[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 2 and metrics["n_questions"] == 4


def test_unwrap_finds_the_model_inside_a_wrapper_and_leaves_the_rest_unwalked(monkeypatch):
    """dist.unwrap runs at every training step: a model that is no wrapper comes back as it is without
    accelerate's walk over its submodules; a wrapper still gives its inner model, a compiled model itself."""
    import accelerate.utils
    import torch

    from loraqa import dist

    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    wrapped, compiled = torch.nn.DataParallel(inner), torch.compile(inner)
    assert dist.unwrap(wrapped) is inner and dist.unwrap(compiled) is compiled
    walked = []
    real = accelerate.utils.extract_model_from_parallel
    monkeypatch.setattr(
        accelerate.utils, "extract_model_from_parallel", lambda m: walked.append(m) or real(m)
    )
    assert dist.unwrap(inner) is inner and walked == []
    assert dist.unwrap(wrapped) is inner and walked == [wrapped]

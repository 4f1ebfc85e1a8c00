"""A sweep driver killed by SIGKILL at random moments loses no trial: its running trial stops by itself (it
outlives no driver), is never recorded as failed, and the reruns end where an uninterrupted sweep ends.

The real tiny sweep (configs/tiny-sweep.yaml: 4 trials of a 2-layer random GPT-2, 6 steps each) runs as
``loraqa sweep`` in a child process with progress bars on, so that the trial processes keep writing to the
driver's stderr pipe: the write that meets the dead pipe is the fault this guards against.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraqa.io import read_json

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-sweep.yaml"
TRIALS = ("base", "r16", "targets_attn+proj", "lr5e-4")
KILL_ROUNDS = 10
SEED = 20261205


def sweep_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "loraqa.cli", "sweep", str(TINY), "-o", str(out)]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LORAQA_NO_PROGRESS"}  # progress bars on: pipe writes
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def trial_processes(out: Path) -> list[str]:
    """Trial processes (``loraqa.cli train``) still running on this sweep folder."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "loraqa.cli train" in line and str(out) in line]


def finished(out: Path) -> dict[str, dict]:
    return {t: read_json(out / t / "metrics.json") for t in TRIALS if (out / t / "metrics.json").exists()}


@pytest.mark.slow
def test_sigkill_of_the_driver_at_random_moments_loses_no_trial(tmp_path):
    ref_dir = tmp_path / "reference"
    ref = subprocess.run(sweep_command(ref_dir), env=child_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = finished(ref_dir)

    rng = random.Random(SEED)
    kills, folders = 0, [tmp_path / "killed-0"]
    log = subprocess.DEVNULL  # the driver's stdout: the summary lines, read from the final rerun instead
    deadline = time.monotonic() + 900
    while kills < KILL_ROUNDS and time.monotonic() < deadline:
        # stderr is a pipe nobody reads after the kill, as a terminal closed with its driver
        driver = subprocess.Popen(sweep_command(folders[-1]), env=child_env(), stdout=log, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0.5, 10.0))
        if driver.poll() is None:
            driver.kill()
            kills += 1
        else:  # the sweep finished between kills: the next rounds go on in a fresh folder
            folders.append(tmp_path / f"killed-{len(folders)}")
        driver.wait()
        driver.stderr.close()
        # the next round starts at once, while the killed driver's trial may still be saving its checkpoint
    assert kills >= KILL_ROUNDS

    for out in folders:
        final = subprocess.run(sweep_command(out), env=child_env(), capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr[-3000:]
        assert "4/4 trials done" in final.stderr
        check_like_reference(out, reference)


def check_like_reference(out: Path, reference: dict) -> None:
    """Every trial done once, none failed, the same results as the uninterrupted sweep, no trial process left."""
    got = finished(out)
    assert set(got) == set(TRIALS)
    for name in TRIALS:
        assert not (out / name / "error.json").exists(), name
        statuses = [a["status"] for a in read_json(out / name / "run.json")["attempts"]]
        assert "failed" not in statuses and statuses.count("done") == 1 and statuses[-1] == "done", (name, statuses)
        m, r = got[name], reference[name]
        assert (m["exact_match"], m["f1"], m["train_steps"]) == (r["exact_match"], r["f1"], r["train_steps"]), name
        assert m["final_train_loss"] == pytest.approx(r["final_train_loss"], rel=1e-4), name
        assert m["final_eval_loss"] == pytest.approx(r["final_eval_loss"], rel=1e-4), name
    index = read_json(out / "sweep.json")
    assert index["counts"]["done"] == 4 and index["counts"].get("failed", 0) == 0
    for _ in range(50):
        if not trial_processes(out):
            break
        time.sleep(0.2)
    assert trial_processes(out) == []


def test_a_trial_whose_sweep_died_stops_at_its_next_step_and_is_not_failed(tmp_path, monkeypatch):
    """The parent watch: the parent named in LORAQA_PARENT_PID is gone, so the process stops as on SIGTERM
    with stderr sent where stdout goes."""
    script = tmp_path / "child.py"
    script.write_text(
        "import os, sys, time\n"
        "from loraqa import signals\n"
        "stopped = []\n"
        "import signal\n"
        "signal.signal(signal.SIGTERM, lambda s, f: stopped.append(s))\n"
        "signals.watch_parent(poll=0.05)\n"
        "deadline = time.monotonic() + 20\n"
        "while not stopped and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print('stderr after the parent died', file=sys.stderr, flush=True)\n"
        "print('orphaned' if signals.orphaned() else 'not orphaned', 'stopped' if stopped else 'running')\n"
    )
    # a middle process that starts the child with its own pid as the parent, then dies at once
    middle = (
        "import os, subprocess, sys\n"
        f"log = open({str(tmp_path / 'out.log')!r}, 'w')\n"
        "env = dict(os.environ, LORAQA_PARENT_PID=str(os.getpid()))\n"
        f"subprocess.Popen([sys.executable, {str(script)!r}], env=env, stdout=log, stderr=subprocess.PIPE)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", middle], check=True, timeout=60)
    for _ in range(300):
        text = (tmp_path / "out.log").read_text() if (tmp_path / "out.log").exists() else ""
        if "stopped" in text or "running" in text:
            break
        time.sleep(0.1)
    assert "stderr after the parent died" in text  # stderr went to the log, not the dead pipe
    assert "orphaned stopped" in text


def test_a_rerun_waits_for_the_trial_process_of_a_dead_sweep(tmp_path, monkeypatch):
    """A trial locked by the process of a sweep that died on this host is waited for, not skipped."""
    import socket
    import threading

    from loraqa import sweep
    from loraqa.io import write_json_atomic

    d = tmp_path / "t"
    fd = sweep.state.try_lock(d)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_json_atomic(d / "run.json", {"attempts": [{"status": "running", "host": socket.gethostname(),
                                                    "pid": dead.pid}]})  # fmt: skip
    threading.Timer(1.0, os.close, (fd,)).start()  # the orphan exits a second later
    start = time.monotonic()
    got = sweep.attempt._wait_for_orphan(d, sweep.attempt.Children())
    assert got is not None and time.monotonic() - start >= 0.9
    os.close(got)
    # a live sweep's trial is skipped at once
    fd = sweep.state.try_lock(d)
    write_json_atomic(d / "run.json", {"attempts": [{"status": "running", "host": socket.gethostname(),
                                                    "pid": os.getpid()}]})  # fmt: skip
    assert sweep.attempt._wait_for_orphan(d, sweep.attempt.Children()) is None
    os.close(fd)

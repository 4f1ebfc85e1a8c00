"""``loraqa sweep --backend ray``: trials as Ray tasks on a local Ray instance (Ray is installed by
scripts/setup.sh, so these run in CI).

One test runs fake trials (a short script instead of ``loraqa train``) through a local instance: the Ray path's
bookkeeping, a failure, a trial that fits on no node. One runs configs/tiny-sweep.yaml for real, SIGKILLs the
driver in the middle, reruns it and checks that nothing finished was redone and that no Ray process is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import wait_until
from loraqa import sweep
from loraqa.config import ConfigError, load_config
from loraqa.io import read_json
from test_sweep import FAKE_CHILD, TINY, mtimes

ROOT = Path(__file__).resolve().parents[1]


def group_members(pgid: int) -> list[str]:
    """The processes still in a process group (pid and command line)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    return [f"{r[0]} {r[2] if len(r) > 2 else ''}" for r in rows if len(r) >= 2 and r[1] == str(pgid)]


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def trial_process(trial_dir: Path) -> int | None:
    """The pid of the ``loraqa train`` child running the trial in ``trial_dir``, if one runs."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if "train" not in args or "--output-dir" not in args[:-1]:
            continue
        if Path(args[args.index("--output-dir") + 1]).resolve() == trial_dir.resolve():
            return int(proc.name)
    return None


def parent_of(pid: int) -> int | None:
    """``pid``'s parent pid, None once ``pid`` is gone."""
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_fake_trials_on_a_local_ray_instance(tmp_path, monkeypatch):
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    monkeypatch.setattr(sweep.attempt, "trial_command",
                        lambda trial_yaml, trial_dir, device: [sys.executable, str(script), str(trial_dir)])  # fmt: skip
    monkeypatch.setenv("FAKE_FAIL", "r16")  # reaches the child through the Ray instance started here
    out = tmp_path / "sweep"
    cfg = load_config(TINY)
    assert sweep.run_sweep(cfg, out, backend="ray", progress=False) == 1
    err = read_json(out / "r16" / "error.json")
    assert err["exit_code"] == 3 and "RuntimeError: boom in r16" in err["stderr_tail"]
    index = read_json(out / "sweep.json")
    assert {t["name"]: t["status"] for t in index["trials"]} == {
        "base": "done", "r16": "failed", "targets_attn+proj": "done", "lr5e-4": "done"
    }  # fmt: skip
    assert index["invocations"][-1]["backend"] == "ray"
    run = read_json(out / "base" / "run.json")
    (attempt,) = run["attempts"]
    assert attempt["status"] == "done" and attempt["where"].startswith(run["machine"]["host"])
    assert attempt["worker"] != os.getpid()  # it ran in a Ray worker, not here
    # Ray gives each task its num_cpus as OMP_NUM_THREADS, and the child inherits it
    assert (out / "base" / "starts.txt").read_text().split()[1] == "1"

    # a trial that fits on no node of a local instance is refused at once instead of waiting forever
    monkeypatch.delenv("FAKE_FAIL")
    too_big = load_config(TINY, [])
    too_big.sweep.resources_per_trial = {"cpus": 1.0, "gpus": 64.0}
    with pytest.raises(ConfigError, match=r"resources_per_trial .*64 GPUs.*no Ray node"):
        sweep.run_sweep(too_big, out, backend="ray", progress=False, retry_failed=True)
    assert not (out / "r16" / "metrics.json").exists()  # nothing ran


def test_ray_options_are_checked():
    cfg = load_config(TINY)
    with pytest.raises(ConfigError, match="--address .* --backend ray"):
        sweep.run_sweep(cfg, "unused", address="10.0.0.1:6379")
    with pytest.raises(ConfigError, match="--backend 'slurm'"):
        sweep.run_sweep(cfg, "unused", backend="slurm")


@pytest.fixture(scope="module")
def driver_killed_and_rerun(tmp_path_factory):
    """configs/tiny-sweep.yaml on a local Ray instance: the driver SIGKILL-ed once a trial has finished and
    another has its first checkpoint, then the same command rerun. The Ray worker running that other trial is
    SIGKILL-ed with the driver, as the local instance's teardown does when it comes, and its orphaned child gets
    the SIGTERM signals.watch_parent sends: that trial stops mid-training however slowly the teardown comes
    (under load it came after the trials' end), so the rerun has a trial to resume. (Not SIGSTOP to hold it: a
    stopped process in a process group orphaned by the teardown gets a SIGHUP that kills it.)"""
    out = tmp_path_factory.mktemp("ray") / "sweep"
    cmd = [sys.executable, "-m", "loraqa.cli", "sweep", str(TINY), "--output-dir", str(out), "--backend", "ray"]
    log = (out.parent / "first.log").open("wb")
    first = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, cwd=ROOT)
    second = None
    try:
        deadline = time.monotonic() + 300
        while True:  # one trial finished, another at its first checkpoint (so it is far from its end)
            finished = {p.parent.name for p in out.glob("*/metrics.json")}
            early = {p.parents[1].name for p in out.glob("*/checkpoints/checkpoint-2")} - finished
            early = [n for n in early if not list((out / n / "checkpoints").glob("checkpoint-[3-9]*"))]
            if finished and early and (child := trial_process(out / early[0])):
                break
            assert first.poll() is None, (out.parent / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.02)
        worker = parent_of(child)
        assert worker, "the trial ended before it could be stopped"
        first.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
        wait_until(lambda: parent_of(child) != worker, 10, "the trial's Ray worker to die", every=0.005)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
        first.wait()
        log.close()
        # the local instance dies with its driver, and its workers kill the trials' children when they notice
        # (within seconds); until then a child holds its trial's lock and a rerun would leave that trial alone
        deadline = time.monotonic() + 120
        while any(sweep.is_locked(d) for d in out.iterdir() if d.is_dir()):
            assert time.monotonic() < deadline, "the killed sweep's trials are still running after 2 minutes"
            time.sleep(0.1)
        before = mtimes(out)
        interrupted = {p.parents[2].name for p in out.glob("*/checkpoints/checkpoint-*/trainer_state.json")}
        interrupted = {n for n in interrupted - set(before) if not (out / n / "train_metrics.json").exists()}
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True, cwd=ROOT)  # fmt: skip
        stdout, stderr = second.communicate(timeout=400)
        leftover = []  # a clean run stops its Ray instance: nothing of it may stay behind
        for _ in range(50):
            leftover = group_members(second.pid)
            if not leftover:
                break
            time.sleep(0.2)
        yield {"out": out, "before": before, "interrupted": interrupted, "rc": second.returncode,
               "stderr": stderr, "leftover": leftover}  # fmt: skip
    finally:
        kill_group(first.pid)  # Ray's agents of the killed instance can outlive it for a minute or more
        if second is not None:
            kill_group(second.pid)


def test_a_killed_ray_driver_reruns_without_redoing_finished_trials(driver_killed_and_rerun):
    r = driver_killed_and_rerun
    out = r["out"]
    assert r["rc"] == 0, r["stderr"][-3000:]
    names = [t.name for t in sweep.expand_trials(load_config(TINY))]
    after = mtimes(out)
    assert sorted(after) == sorted(names)  # every trial finished on Ray
    assert r["before"] and {n: after[n] for n in r["before"]} == r["before"]  # none finished was redone
    for name in r["before"]:
        assert read_json(out / name / "run.json")["attempts"][-1]["status"] == "done"
    # the trial stopped at its first checkpoint resumes (the others may have run to their end)
    assert r["interrupted"]
    for name in r["interrupted"]:  # resumed from its checkpoint, the killed attempt recorded as lost
        tm = read_json(out / name / "train_metrics.json")
        assert tm["resumed_from"].startswith("checkpoint-") and tm["train_steps"] == load_config(TINY).train.max_steps
        run = read_json(out / name / "run.json")
        assert [a["status"] for a in run["attempts"]] == ["lost", "done"], run["attempts"]
        assert not (out / name / "error.json").exists()
    index = read_json(out / "sweep.json")
    assert index["counts"]["done"] == len(names) and all(t["wall_seconds"] for t in index["trials"])
    assert f"{len(r['before'])} finished already" in r["stderr"]
    assert r["leftover"] == [], r["leftover"]


def _unused_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("via", ["--address", "RAY_ADDRESS"])
def test_a_wrong_cluster_address_fails_fast_naming_it(tmp_path, via):
    """Nothing listens at the address: one line naming it and what to check, well within a minute."""
    import time

    address = f"127.0.0.1:{_unused_loopback_port()}"
    env = {**os.environ, "LORAQA_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "loraqa.cli", "sweep", str(TINY), "-o", str(tmp_path / "s"), "--backend", "ray"]
    if via == "--address":
        cmd += ["--address", address]
    else:
        env["RAY_ADDRESS"] = address
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("loraqa: error:") and via in last and address in last and "ray status" in last
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "s" / "base").exists()  # no trial started

"""Tests for loraqa.sweep: expansion, naming, sharding, failure handling, resuming after SIGKILL.

Most tests replace the trial's child process (``sweep.attempt.trial_command``) by a short Python script, so the sweep's
own machinery (subprocesses, error.json, sweep.json, retries, shards, parallel workers) is tested in
milliseconds. One test runs configs/tiny-sweep.yaml for real, kills it with SIGKILL in the middle of a trial
and reruns it; the report test reuses that folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from loraqa import locks, sweep
from loraqa.config import ConfigError, ExperimentConfig, from_dict, load_config
from loraqa.io import read_json

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-sweep.yaml"


def cfg_from(axes: dict, mode: str = "one-at-a-time", **sections) -> ExperimentConfig:
    return from_dict({**sections, "sweep": {"mode": mode, "axes": axes}}, where="test.yaml")


# ---------------------------------------------------------------------------------------------- expansion


def test_one_at_a_time_is_the_base_plus_each_axis_alone():
    trials = sweep.expand_trials(load_config(ROOT / "configs" / "cpu-study.yaml"))
    names = [t.name for t in trials]
    assert names == ["base", "r4", "r16", "r32", "targets_attn+proj", "lr1e-4", "lr5e-4", "loss_on_all",
                     "method_full"]  # fmt: skip
    assert len(trials) == 4 + 1 + 2 + 1 + 1
    base = trials[0]
    assert base.overrides == {} and base.values == {"lora.r": 8, "lora.targets": "attn", "train.lr": 2e-4,
                                                    "prompt.loss_on": "answer", "train.method": "lora"}  # fmt: skip
    for t in trials[1:]:  # every other trial differs from the base in exactly one axis
        changed = {k for k, v in t.values.items() if v != base.values[k]}
        assert len(changed) == 1 and set(t.overrides) == changed
    r16 = trials[2]
    assert r16.config.lora.r == 16 and r16.config.train.lr == 2e-4 and r16.config.sweep is None
    assert [t.index for t in trials] == list(range(9))


def test_seed_study_has_seven_trials():
    names = [t.name for t in sweep.expand_trials(load_config(ROOT / "configs" / "seed-study.yaml"))]
    assert names == ["base", "r4", "r16", "r32", "targets_attn+proj", "lr1e-4", "lr5e-4"]


def test_grid_is_every_combination():
    cfg = cfg_from({"lora.r": [8, 16], "lora.targets": ["attn", "attn+proj"], "train.lr": ["1e-4", "5e-4"]},
                   mode="grid")  # fmt: skip
    trials = sweep.expand_trials(cfg)
    assert len(trials) == 8
    combos = {(t.values["lora.r"], t.values["lora.targets"], t.values["train.lr"]) for t in trials}
    assert combos == {(r, p, lr) for r in (8, 16) for p in ("attn", "attn+proj") for lr in (1e-4, 5e-4)}
    names = [t.name for t in trials]
    assert len(set(names)) == 8
    assert "r16-targets_attn+proj-lr5e-4" in names and "lr1e-4" in names  # r8 and attn are the base's values
    # the reference point of a grid: each axis's base value where the axis has it, else its first value
    assert sweep.reference_values(cfg) == {"lora.r": 8, "lora.targets": "attn", "train.lr": 1e-4}


def test_duplicates_are_removed_and_values_are_coerced():
    cfg = cfg_from({"lora.r": [8, 16, 16], "train.lr": ["2e-4", 0.0002, "5e-4"]})
    names = [t.name for t in sweep.expand_trials(cfg)]
    assert names == ["base", "r16", "lr5e-4"]  # r8 and lr 2e-4 are the base; 16 listed twice
    grid = cfg_from({"lora.r": [8, 8], "train.lr": ["2e-4"]}, mode="grid")
    assert [t.name for t in sweep.expand_trials(grid)] == ["base"]


def test_names_are_short_safe_and_stable():
    assert sweep.format_value(5e-4) == "5e-4" and sweep.format_value(2e-4) == "2e-4"
    assert (
        sweep.format_value(0.1) == "0.1" and sweep.format_value(16.0) == "16" and sweep.format_value(3) == "3"
    )
    assert (
        sweep.format_value(["c_attn", "c_proj"]) == "c_attn+c_proj" and sweep.format_value(False) == "false"
    )
    cfg = cfg_from({"lora.targets": [["c_attn", "c_proj"]], "lora.dropout": [0.05], "train.fast_loss": [False],
                    "train.batch_size": [16], "eval.batch_size": [64], "model.name": ["some/org-model"]})  # fmt: skip
    names = [t.name for t in sweep.expand_trials(cfg)]
    assert names == ["base", "targets_c_attn+c_proj", "dropout0.05", "fast_loss_false", "train_batch_size16",
                     "eval_batch_size64", "name_some_org-model"]  # fmt: skip
    assert names == [t.name for t in sweep.expand_trials(cfg)]  # stable
    long = cfg_from({"lora.targets": [[f"module_number_{i}" for i in range(12)]]})
    name = sweep.expand_trials(long)[1].name
    assert len(name) <= 80 and name == sweep.expand_trials(long)[1].name


def test_a_config_without_a_sweep_section_is_refused():
    with pytest.raises(ConfigError, match="no sweep section"):
        sweep.expand_trials(ExperimentConfig())


# ---------------------------------------------------------------------------------------------- shards


def test_shards_partition_the_trials():
    trials = sweep.expand_trials(load_config(ROOT / "configs" / "cpu-study.yaml"))
    for n in range(1, 12):
        parts = [sweep.shard_trials(trials, i, n) for i in range(1, n + 1)]
        names = [t.name for p in parts for t in p]
        assert sorted(names) == sorted(t.name for t in trials) and len(names) == len(set(names))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
        assert parts == [sweep.shard_trials(trials, i, n) for i in range(1, n + 1)]  # deterministic
    assert sweep.parse_shard("2/3") == (2, 3) and sweep.parse_shard(None) == (1, 1)
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            sweep.parse_shard(bad)


# ---------------------------------------------------------------------------------------------- fake trials

FAKE_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    trial_dir = sys.argv[1]
    name = os.path.basename(trial_dir)
    fail = os.environ.get("FAKE_FAIL", "").split(",")
    with open(os.path.join(trial_dir, "starts.txt"), "a") as f:
        f.write(f"{time.time()} {os.environ.get('OMP_NUM_THREADS', '')}\\n")
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    if os.environ.get("FAKE_WAIT_FOR_COMPANY"):  # wait (60 s at most) until another trial has started too
        sweep_dir, deadline = os.path.dirname(trial_dir), time.time() + 60
        others = lambda: [d for d in os.listdir(sweep_dir) if d != name and
                          os.path.exists(os.path.join(sweep_dir, d, "starts.txt"))]
        while not others() and time.time() < deadline:
            time.sleep(0.02)
        with open(os.path.join(trial_dir, "company.txt"), "w") as f:
            f.write(",".join(others()))
    with open(os.path.join(trial_dir, "ends.txt"), "a") as f:
        f.write(f"{time.time()}\\n")
    print("a line on stdout")
    sys.stderr.write(" 50%|#####     | 1/2 [00:01<00:01,  1.00it/s]\\r")
    sys.stderr.write("100%|##########| 2/2 [00:02<00:00,  1.00it/s]\\n")
    if name in fail and name.startswith("targets"):
        os.kill(os.getpid(), signal.SIGKILL)  # like the kernel's OOM killer
    if name in os.environ.get("FAKE_STOPPED", "").split(","):
        sys.stderr.write("loraqa: interrupted: SIGTERM at step 1: saved checkpoint-1\\n")
        sys.exit(143)  # what `loraqa train` does after a SIGTERM sent to it alone
    if name in fail:
        sys.stderr.write("Traceback (most recent call last):\\nRuntimeError: boom in " + name + "\\n")
        sys.exit(3)
    with open(os.path.join(trial_dir, "config.yaml"), "w") as f:
        f.write(open(os.path.join(trial_dir, "trial.yaml")).read())
    with open(os.path.join(trial_dir, "metrics.json"), "w") as f:
        json.dump({"exact_match": 10.0, "f1": 20.0, "trainable_params": 1, "total_params": 2}, f)
    """
)


@pytest.fixture
def fake_trials(monkeypatch, tmp_path):
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    monkeypatch.setattr(sweep.attempt, "trial_command", lambda trial_yaml, trial_dir, device: [sys.executable, str(script),
                                                                                        str(trial_dir)])  # fmt: skip
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_STOPPED", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return tmp_path / "sweep"


def mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}


def test_a_failed_trial_is_recorded_and_the_others_go_on(fake_trials, monkeypatch, capsys):
    out = fake_trials
    cfg = load_config(TINY)
    monkeypatch.setenv("FAKE_FAIL", "r16,targets_attn+proj")
    assert sweep.run_sweep(cfg, out, progress=False) == 1

    err = read_json(out / "r16" / "error.json")
    assert err["exit_code"] == 3 and err["signal"] is None
    assert "RuntimeError: boom in r16" in err["stderr_tail"] and "boom in r16" in err["summary"]
    assert "1/2 [00:01" not in err["stderr_tail"]  # progress-bar updates are not kept as lines
    killed = read_json(out / "targets_attn+proj" / "error.json")
    assert killed["exit_code"] == -signal.SIGKILL and killed["signal"] == "SIGKILL"
    assert "out of memory" in killed["summary"]
    for name in ("base", "lr5e-4"):  # the others ran to the end
        assert (out / name / "metrics.json").exists() and not (out / name / "error.json").exists()

    index = read_json(out / "sweep.json")
    status = {t["name"]: t["status"] for t in index["trials"]}
    assert status == {"base": "done", "r16": "failed", "targets_attn+proj": "failed", "lr5e-4": "done"}
    assert index["counts"]["failed"] == 2 and index["counts"]["done"] == 2
    rec = {t["name"]: t for t in index["trials"]}
    assert rec["r16"]["exit_code"] == 3 and rec["r16"]["overrides"] == {"lora.r": 16}
    assert rec["base"]["wall_seconds"] > 0 and rec["base"]["metrics"]["f1"] == 20.0
    assert "a line on stdout" in (out / "base" / "trial.log").read_text()

    # a plain rerun leaves failed trials as they are and says how to retry them
    monkeypatch.delenv("FAKE_FAIL")
    before = mtimes(out)
    assert sweep.run_sweep(cfg, out, progress=False) == 1
    assert mtimes(out) == before
    assert "--retry-failed" in capsys.readouterr().err

    # --retry-failed reruns the failed trials only
    assert sweep.run_sweep(cfg, out, progress=False, retry_failed=True) == 0
    assert {k: v for k, v in mtimes(out).items() if k in before} == before
    assert not (out / "r16" / "error.json").exists() and (out / "r16" / "metrics.json").exists()
    run = read_json(out / "r16" / "run.json")
    assert [a["status"] for a in run["attempts"]] == ["failed", "done"] and run["attempts"][0][
        "exit_code"
    ] == 3
    assert len((out / "base" / "starts.txt").read_text().splitlines()) == 1
    assert all(t["status"] == "done" for t in read_json(out / "sweep.json")["trials"])


def test_a_trial_stopped_alone_is_interrupted_not_failed(fake_trials, monkeypatch):
    """A SIGTERM sent to one trial's process (not to the sweep): the trial saves a checkpoint and exits 143. It is
    recorded as interrupted (no error.json), the others go on, the sweep exits 1 (not all done), a rerun resumes."""
    out, cfg = fake_trials, load_config(TINY)
    monkeypatch.setenv("FAKE_STOPPED", "r16")
    assert sweep.run_sweep(cfg, out, progress=False) == 1
    assert not list(out.glob("*/error.json"))
    status = {t["name"]: t["status"] for t in read_json(out / "sweep.json")["trials"]}
    assert status == {"base": "done", "r16": "unfinished", "targets_attn+proj": "done", "lr5e-4": "done"}
    assert [a["status"] for a in read_json(out / "r16" / "run.json")["attempts"]] == ["interrupted"]
    monkeypatch.delenv("FAKE_STOPPED")
    assert sweep.run_sweep(cfg, out, progress=False) == 0
    assert [a["status"] for a in read_json(out / "r16" / "run.json")["attempts"]] == ["interrupted", "done"]


def test_cli_sweep_exits_nonzero_when_a_trial_fails(fake_trials, monkeypatch, capsys):
    from loraqa.cli import main

    monkeypatch.setenv("FAKE_FAIL", "lr5e-4")
    assert main(["sweep", str(TINY), "--output-dir", str(fake_trials)]) == 1
    assert "FAILED lr5e-4" in capsys.readouterr().err
    monkeypatch.delenv("FAKE_FAIL")
    assert main(["sweep", str(TINY), "--output-dir", str(fake_trials)]) == 1  # failed trials wait for the flag
    assert "--retry-failed" in capsys.readouterr().err
    assert main(["sweep", str(TINY), "--output-dir", str(fake_trials), "--retry-failed"]) == 0
    index = read_json(fake_trials / "sweep.json")
    # run in-process (not from the command line), the command is rebuilt from the saved sweep.yaml, and says so
    (inv,) = {i["command"]: i for i in index["invocations"]}.values()
    assert inv["command"] == f"loraqa sweep {fake_trials / 'sweep.yaml'} --output-dir {fake_trials}"
    assert inv["command_is_reconstructed"] is True
    assert index["reproduce"] == inv["command"]


def test_the_resume_command_survives_a_shell():
    from loraqa.layout import sweep_command

    folder = Path("my runs") / "it's a sweep"
    line = sweep_command(folder, lambda p: shlex.quote(str(p)))
    assert shlex.split(line) == ["loraqa", "sweep", str(folder / "sweep.yaml"), "--output-dir", str(folder)]


def test_shards_split_the_work_between_runs(fake_trials):
    out = fake_trials
    cfg = load_config(TINY)
    names = [t.name for t in sweep.expand_trials(cfg)]
    assert sweep.run_sweep(cfg, out, shard="2/2", progress=False) == 0
    assert sorted(mtimes(out)) == sorted(names[1::2])
    index = read_json(out / "sweep.json")  # lists every trial, done or not
    assert {t["name"]: t["status"] for t in index["trials"]} == {
        n: ("done" if i % 2 else "pending") for i, n in enumerate(names)
    }
    assert sweep.run_sweep(cfg, out, shard="1/2", progress=False) == 0
    assert sorted(mtimes(out)) == sorted(names)


def test_parallel_workers_overlap_and_share_the_cores(fake_trials, monkeypatch):
    # each trial waits until another has started: one at a time, the first would wait alone until its deadline
    monkeypatch.setenv("FAKE_WAIT_FOR_COMPANY", "1")
    out = fake_trials
    assert sweep.run_sweep(load_config(TINY), out, parallel=2, progress=False) == 0
    starts = {}
    for p in out.glob("*/starts.txt"):
        t, threads = p.read_text().split()
        starts[p.parent.name] = float(t)
        assert threads == str(max(1, sweep.runner.usable_cores() // 2))
    first = min(starts, key=starts.get)
    assert (out / first / "company.txt").read_text(), "the first trial ran alone"


def test_a_folder_holds_one_sweep(fake_trials):
    cfg = load_config(TINY)
    assert sweep.run_sweep(cfg, fake_trials, progress=False) == 0
    other = load_config(TINY, ["train.max_steps=7"])
    with pytest.raises(ConfigError, match=r"different config .*train.max_steps"):
        sweep.run_sweep(other, fake_trials, progress=False)
    with pytest.raises(ConfigError, match="--parallel"):
        sweep.run_sweep(cfg, fake_trials, parallel=0, progress=False)


def test_a_changed_sweep_section_says_which_trial_folders_it_no_longer_makes(fake_trials, capsys):
    assert sweep.run_sweep(load_config(TINY), fake_trials, progress=False) == 0
    capsys.readouterr()
    raw = yaml.safe_load(TINY.read_text())
    raw["sweep"]["axes"] = {"lora.r": [8, 16]}  # base and r16 still made; lr5e-4 and targets_attn+proj not
    fewer = from_dict(raw, where="fewer.yaml")
    assert sweep.run_sweep(fewer, fake_trials, progress=False) == 0
    err = capsys.readouterr().err
    assert "holds 2 trial folder(s) this config no longer makes (lr5e-4, targets_attn+proj): kept" in err
    assert (fake_trials / "lr5e-4" / "metrics.json").is_file()  # kept as it was


def test_a_run_folder_is_no_sweep_folder(tmp_path, capsys):
    from loraqa.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / "metrics.json").write_text('{"f1": 1.0}')
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ConfigError, match=r"holds a run \(config.yaml\), not a sweep; pick another --output-dir"):
        sweep.run_sweep(load_config(TINY), run, progress=False)
    assert main(["sweep", str(TINY), "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraqa: error:") and "holds a run" in err and "Traceback" not in err
    (tmp_path / "trial").mkdir()  # one trial of a sweep, as well
    (tmp_path / "trial" / "trial.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"holds a run \(trial.yaml\)"):
        sweep.run_sweep(load_config(TINY), tmp_path / "trial", progress=False)
    assert sorted(p.name for p in run.iterdir()) == before  # no sweep.yaml, sweep.json or trial folder


INTERRUPTIBLE_SWEEP = textwrap.dedent(
    """
    import signal, sys
    # a test run in the background (pytest ... &) inherits SIGINT ignored, and so would the sweep and its
    # children: Ctrl-C must work here whatever the test runner inherited
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from loraqa import sweep
    from loraqa.config import load_config
    script, tiny, out = sys.argv[1:4]
    sweep.attempt.trial_command = lambda trial_yaml, trial_dir, device: [sys.executable, script, str(trial_dir)]
    sys.exit(sweep.run_sweep(load_config(tiny), out, parallel=2, progress=False))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_sweep_records_no_failure_and_resumes(fake_trials, tmp_path, sig):
    """Ctrl-C reaches the whole process group; SIGTERM reaches the sweep alone, which passes it on. Either way
    the running trials stop, nothing is recorded as failed, the exit code says the signal (130 or 143, as
    ``loraqa train``'s) and a rerun finishes."""
    out = fake_trials
    runner = tmp_path / "runner.py"
    runner.write_text(INTERRUPTIBLE_SWEEP)
    cmd = [sys.executable, str(runner), str(tmp_path / "fake_child.py"), str(TINY), str(out)]
    env = {**os.environ, "FAKE_SLEEP": "30"}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while len(list(out.glob("*/starts.txt"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err.decode()[-2000:]
    assert not list(out.glob("*/error.json")) and not list(out.glob("*/metrics.json"))
    statuses = {t["name"]: t["status"] for t in read_json(out / "sweep.json")["trials"]}
    assert sorted(statuses.values()) == ["pending", "pending", "unfinished", "unfinished"]
    for name, status in statuses.items():
        if status == "unfinished":
            assert [a["status"] for a in read_json(out / name / "run.json")["attempts"]] == ["interrupted"]
    env["FAKE_SLEEP"] = "0"
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == 0
    assert len(mtimes(out)) == 4


def test_a_trial_finished_just_before_its_sweep_was_killed_is_recorded_on_rerun(fake_trials):
    """The child wrote metrics.json, then the sweep was killed before it recorded the attempt's end: run.json
    still says running. The rerun does not redo the trial, and records that attempt as done, with an estimated
    wall time (sweep.json and the report need one)."""
    out, cfg = fake_trials, load_config(TINY)
    assert sweep.run_sweep(cfg, out, progress=False) == 0
    path = out / "r16" / "run.json"
    run = read_json(path)
    started = run["attempts"][0]["started_at"]
    run["attempts"] = [{"started_at": started, "host": "h", "status": "running"}]
    del run["wall_seconds"]
    path.write_text(json.dumps(run))
    assert sweep.run_sweep(cfg, out, progress=False) == 0
    run = read_json(path)
    assert [a["status"] for a in run["attempts"]] == ["done"] and run["attempts"][0]["wall_seconds_estimated"]
    assert run["wall_seconds"] == run["attempts"][0]["wall_seconds"] >= 0
    rec = {t["name"]: t for t in read_json(out / "sweep.json")["trials"]}["r16"]
    assert rec["status"] == "done" and rec["wall_seconds"] == run["wall_seconds"]
    assert len((out / "r16" / "starts.txt").read_text().splitlines()) == 1


def test_trial_status_and_locks(tmp_path):
    d = tmp_path / "t"
    assert sweep.trial_status(d) == "pending"
    fd = sweep.state.try_lock(d)
    assert fd is not None and sweep.trial_status(d) == "running" and sweep.state.try_lock(d) is None
    os.close(fd)
    assert sweep.trial_status(d) == "pending"
    (d / "log_history.jsonl").write_text("")
    assert sweep.trial_status(d) == "unfinished"
    (d / "error.json").write_text("{}")
    assert sweep.trial_status(d) == "failed"
    (d / "metrics.json").write_text("{}")
    assert sweep.trial_status(d) == "done"


def test_a_status_probe_never_makes_a_trial_look_taken(tmp_path, monkeypatch):
    """is_locked takes a shared lock for a moment; an attempt that meets one waits it out instead of skipping
    the trial. A holder's exclusive lock still keeps everyone else out."""
    import fcntl
    import threading

    monkeypatch.setattr(locks, "RETRY_SECONDS", (0.02, 0.5, 2.0))  # slack for a loaded machine
    d = tmp_path / "t"
    os.close(sweep.state.try_lock(d))
    probe = os.open(d / ".lock", os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe caught mid-way
    assert not sweep.is_locked(d)  # probes do not block each other
    threading.Timer(0.03, os.close, (probe,)).start()
    fd = sweep.state.try_lock(d)
    assert fd is not None and sweep.is_locked(d)
    assert sweep.state.try_lock(d) is None
    os.close(fd)


def test_a_bookkeeping_error_fails_its_trial_and_the_sweep_goes_on(fake_trials, monkeypatch):
    out, cfg = fake_trials, load_config(TINY)
    real = sweep.attempt._attempt

    def broken(job, *args):
        if job.name == "r16":
            raise RuntimeError("bookkeeping bug")
        return real(job, *args)

    monkeypatch.setattr(sweep.attempt, "_attempt", broken)
    assert sweep.run_sweep(cfg, out, progress=False) == 1
    assert "bookkeeping bug" in read_json(out / "r16" / "error.json")["summary"]
    status = {t["name"]: t["status"] for t in read_json(out / "sweep.json")["trials"]}
    assert status == {"base": "done", "r16": "failed", "targets_attn+proj": "done", "lr5e-4": "done"}


def test_a_stop_before_the_child_starts_keeps_the_last_failure(fake_trials, monkeypatch):
    out, cfg = fake_trials, load_config(TINY)
    monkeypatch.setenv("FAKE_FAIL", "r16")
    assert sweep.run_sweep(cfg, out, progress=False) == 1
    attempts = read_json(out / "r16" / "run.json")["attempts"]
    monkeypatch.setattr(sweep.attempt.Children, "spawn", lambda self, *a, **k: None)  # stopping already
    sweep.run_sweep(cfg, out, progress=False)
    assert (out / "r16" / "error.json").exists() and sweep.trial_status(out / "r16") == "failed"
    assert read_json(out / "r16" / "run.json")["attempts"] == attempts


def test_stderr_pump_separates_progress_bars_from_lines(tmp_path):
    import io

    class View:
        def __init__(self):
            self.bars, self.lines = [], []

        def progress(self, name, text):
            self.bars.append(text)

        def line(self, name, text):
            self.lines.append(text)

    view = View()
    with open(tmp_path / "log", "wb") as log:
        pump = sweep.attempt.StderrPump("t", log, view)
        data = ("loading\n 10%|#         | 1/10 [00:01<00:09,  1.00it/s]\r 20%|##        | 2/10 [00:02<00:08,  1.0"
                "0it/s]\r{'loss': 1.0}\nTraceback\nÉrror: x\n").encode()  # fmt: skip
        pump.run(io.BufferedReader(io.BytesIO(data)))
    assert view.bars[-1].startswith("20%|") and len(view.bars) == 2
    assert view.lines == ["loading", "{'loss': 1.0}", "Traceback", "Érror: x"]
    assert pump.text().endswith("Érror: x") and (tmp_path / "log").read_bytes() == data


# ---------------------------------------------------------------------------------------------- the real thing


def resumable(out) -> set[str]:
    """The trials with a complete checkpoint: one whose trainer_state.json exists but is still being written (the
    Trainer writes it in place) is removed, not resumed from, by the rerun."""
    from loraqa.runfolder import complete_checkpoints

    return {d.name for d in (out.iterdir() if out.is_dir() else ()) if complete_checkpoints(d / "checkpoints")[0]}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """configs/tiny-sweep.yaml run for real: SIGKILL-ed (the whole process group) once a trial has finished and
    another has a checkpoint, then rerun with the same command."""
    out = tmp_path_factory.mktemp("tiny") / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "loraqa.cli",
        "sweep",
        str(TINY),
        "--output-dir",
        str(out),
        "--parallel",
        "2",
    ]
    log = (out.parent / "first.log").open("wb")
    first = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, cwd=ROOT)
    deadline = time.monotonic() + 180
    while True:
        finished = {p.parent.name for p in out.glob("*/metrics.json")}
        ckpts = {n for n in resumable(out) - finished if not (out / n / "train_metrics.json").exists()}  # training
        if finished and ckpts:
            break
        assert first.poll() is None, (
            f"the sweep ended before it could be killed: {(out.parent / 'first.log').read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, "no checkpoint within 3 minutes"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    log.close()
    before = mtimes(out)
    interrupted = {n for n in resumable(out) - set(before)
                   if not (out / n / "train_metrics.json").exists()}  # fmt: skip
    start = time.perf_counter()
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    return {"out": out, "before": before, "interrupted": interrupted, "second": second,
            "rerun_seconds": time.perf_counter() - start}  # fmt: skip


def test_a_sweep_killed_mid_trial_resumes_without_redoing_or_losing_results(killed_and_resumed):
    r = killed_and_resumed
    out, second = r["out"], r["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    names = [t.name for t in sweep.expand_trials(load_config(TINY))]
    after = mtimes(out)
    assert sorted(after) == sorted(names)  # every trial finished
    assert r["before"] and {n: after[n] for n in r["before"]} == r["before"]  # finished ones were not redone
    for name in r["before"]:  # the kill may have come between the child's end and the sweep's record of it
        assert read_json(out / name / "run.json")["attempts"][-1]["status"] == "done"
    assert r["interrupted"]
    for name in r["interrupted"]:  # an interrupted trial resumed from its checkpoint
        tm = read_json(out / name / "train_metrics.json")
        assert tm["resumed_from"] and tm["resumed_from"].startswith("checkpoint-")
        assert tm["train_steps"] == load_config(TINY).train.max_steps
        run = read_json(out / name / "run.json")
        assert [a["status"] for a in run["attempts"]] == ["lost", "done"], run["attempts"]
        assert not (out / name / "checkpoints").exists()
    index = read_json(out / "sweep.json")
    assert index["counts"]["done"] == len(names) and all(t["wall_seconds"] for t in index["trials"])
    for name in names:
        m = read_json(out / name / "metrics.json")
        for key in ("exact_match", "f1", "final_train_loss", "final_eval_loss", "train_seconds",
                    "train_tokens_per_second", "peak_memory_mb"):  # fmt: skip
            assert m.get(key) is not None, (name, key)
        # LoRA on the 2-layer, width-64 GPT-2: r x (in + out) per adapted matrix per layer
        per_rank = {"targets_attn+proj": (64 + 192) + (64 + 64) + (256 + 64)}.get(name, 64 + 192)
        assert m["trainable_params"] == 2 * (16 if name == "r16" else 8) * per_rank, name
        assert (out / name / "log_history.jsonl").exists()
        assert (out / name / "config.yaml").read_text() == (out / name / "trial.yaml").read_text()
    assert "finished already" in second.stderr


def test_report_on_the_tiny_sweep(killed_and_resumed, tmp_path):
    from loraqa.report import write_report

    out = killed_and_resumed["out"]
    path = write_report(out, out_dir=tmp_path / "report")
    text = path.read_text()
    assert path == tmp_path / "report" / "report.md"
    for fig in ("figure3_rank_eval_loss.png", "figure4_targets_loss.png", "figure5_lr_loss.png"):
        assert (tmp_path / "report" / "figures" / fig).stat().st_size > 1000
        assert f"figures/{fig}" in text
    # the report names paths relative to the working folder (the fixture's is the repository), others by name
    assert f"loraqa sweep {TINY.relative_to(ROOT)} --output-dir …/{out.name} --parallel 2" in text
    assert str(out) not in text and str(ROOT) not in text
    assert "CPUs, torch" in text and "Date:" in text
    from loraqa.sweep import code_version

    code = read_json(out / "base" / "run.json")["machine"]["code"]
    assert code == code_version() and code.startswith("loraqa ") and f"- Code: {code}" in text
    base = read_json(out / "base" / "metrics.json")
    r16 = read_json(out / "r16" / "metrics.json")
    assert f"{r16['trainable_params']:,}" in text and f"{base['f1']:.2f}" in text
    assert f"{base['final_eval_loss']:.3f}" in text
    for claim in ("(a)", "(b)", "(c)", "(d)", "(e)"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"- **{claim}"))
        # the verdict is the bold text's ending ("...”: VERDICT.**"), exactly one of the three
        verdict = re.match(r"- \*\*\(.\) “.*”: (.*?)\.\*\*", line)
        assert verdict and verdict.group(1) in ("holds", "does not hold", "not measurable here"), line
        if claim in ("(a)", "(e)"):  # no rank above 16, no prompt.loss_on axis in the tiny sweep
            assert verdict.group(1) == "not measurable here", line
    assert "Table 6" in text and "Table 7" in text and "Full fine-tuning" in text
    rows = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("trial,status,lora.r,lora.targets,train.lr,exact_match,f1")
    assert len(rows) == 5 and all(",done," in row for row in rows[1:])
    assert json.loads((out / "sweep.json").read_text())["counts"]["done"] == 4


@pytest.mark.parametrize("where, named", [("src", True), ("lib", False)])
def test_code_version_names_only_loraqas_own_checkout(tmp_path, where, named):
    """A copy under <repo>/src/loraqa is loraqa's checkout (its commit is named); a copy that merely sits in
    some other repository (say, a project's virtual environment) gets the version alone."""
    import shutil

    import loraqa

    repo = tmp_path / "repo"
    shutil.copytree(Path(loraqa.__file__).parent, repo / where / "loraqa",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = subprocess.run([sys.executable, "-c", "from loraqa.sweep import code_version; print(code_version())"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo / where)},
                         check=True).stdout.strip()  # fmt: skip
    assert out == (f"loraqa {loraqa.__version__}, git {head}" if named else f"loraqa {loraqa.__version__}")


# ---------------------------------------------------------------------------------------------- faults found by review

SWEEP_DRIVER = textwrap.dedent(
    """
    import sys
    from loraqa import sweep
    from loraqa.config import load_config
    sweep.attempt.trial_command = lambda trial_yaml, trial_dir, device: [sys.executable, sys.argv[3], str(trial_dir)]
    sys.exit(sweep.run_sweep(load_config(sys.argv[1]), sys.argv[2], progress=False))
    """
)


@pytest.mark.parametrize("closed", ["stderr's reader", "stdin"])
def test_a_sweep_whose_stderr_reader_or_stdin_is_gone_runs_every_trial(tmp_path, closed):
    """`loraqa sweep ... 2>&1 | head -2` (a reader that quits), or a driver started with stdin closed (its first
    lock is then file descriptor 0): every trial runs and is recorded done, none as failed."""
    script, driver = tmp_path / "fake_child.py", tmp_path / "driver.py"
    script.write_text(FAKE_CHILD)
    driver.write_text(SWEEP_DRIVER)
    out = tmp_path / "sweep"
    env = {**os.environ, "FAKE_SLEEP": "0.3", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(driver), str(TINY), str(out), str(script)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL if closed != "stdin" else None,
                            preexec_fn=(lambda: os.close(0)) if closed == "stdin" else None)  # fmt: skip
    if closed == "stderr's reader":
        proc.stderr.readline()
        proc.stderr.close()
        rc = proc.wait(timeout=120)
    else:
        rc = proc.wait(timeout=120)
        proc.stderr.close()
    assert rc == 0
    status = {t["name"]: t["status"] for t in read_json(out / "sweep.json")["trials"]}
    assert set(status.values()) == {"done"} and not list(out.glob("*/error.json")), status


def test_a_trial_that_failed_under_another_driver_waits_for_retry_failed(tmp_path):
    """A second driver started before the first recorded the failure takes the trial only with --retry-failed."""
    from loraqa.sweep.attempt import Children, Job, run_attempt
    from loraqa.sweep.view import QuietView

    tdir = tmp_path / "r16"
    tdir.mkdir()
    (tdir / "error.json").write_text('{"summary": "boom"}')
    marker = tmp_path / "ran"
    job = Job(name="r16", overrides={}, config_yaml="{}\n", trial_dir=str(tdir),
              command=[sys.executable, "-c", f"open({str(marker)!r}, 'w')"], shard="1/1")  # fmt: skip
    outcome = run_attempt(job, Children(), QuietView())
    assert outcome.status == "skipped" and "--retry-failed" in outcome.message and not marker.exists()


def test_waiting_for_a_dead_sweeps_trial_ends_when_the_sweep_stops(tmp_path, monkeypatch):
    from loraqa.sweep import attempt

    tdir = tmp_path / "base"
    tdir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tdir / "run.json").write_text(json.dumps({"attempts": [
        {"status": "running", "pid": dead.pid, "host": __import__("socket").gethostname()}]}))  # fmt: skip
    held = sweep.state.try_lock(tdir)  # the orphaned trial process, still saving its checkpoint
    monkeypatch.setattr(attempt, "ORPHAN_STOP_SECONDS", 20.0)
    children = attempt.Children()
    children.stop.set()
    start = time.monotonic()
    try:
        assert attempt._wait_for_orphan(tdir, children) is None
    finally:
        os.close(held)
    assert time.monotonic() - start < 5.0


def test_parallel_workers_share_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(sweep.runner, "nvidia_gpus", lambda: [])
    slots = sweep.runner.worker_slots(2, "cpu")
    assert [s["env"]["OMP_NUM_THREADS"] for s in slots] == ["4", "4"]


def test_a_sweep_folder_with_an_unreadable_config_is_refused_never_overwritten(fake_trials):
    cfg = load_config(TINY)
    assert sweep.run_sweep(cfg, fake_trials, progress=False) == 0
    path = fake_trials / "sweep.yaml"
    path.write_text(path.read_text() + "newer_section: {a: 1}\n")  # what a later loraqa might write
    before = path.read_text()
    other = load_config(TINY, ["train.max_steps=600"])
    with pytest.raises(ConfigError, match="sweep.yaml: the config the sweep in .* was begun with cannot be read"):
        sweep.run_sweep(other, fake_trials, progress=False)
    assert path.read_text() == before


def test_a_mistyped_data_dir_or_device_leaves_no_sweep_behind(fake_trials, tmp_path):
    from loraqa.data import DataError

    with pytest.raises(DataError):
        sweep.run_sweep(load_config(TINY, [f"data.data_dir={tmp_path / 'nowhere'}"]), fake_trials, progress=False)
    with pytest.raises(ConfigError, match="--device bogus: not a device torch knows"):
        sweep.run_sweep(load_config(TINY), fake_trials, device="bogus", progress=False)
    assert not (fake_trials / "sweep.yaml").exists() and not list(fake_trials.glob("*/trial.yaml"))
    assert sweep.run_sweep(load_config(TINY), fake_trials, progress=False) == 0  # the corrected command runs


def test_a_grid_is_refused_in_a_search_folder(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "tiny-search.yaml").read_text())
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    raw["sweep"] = {"mode": "grid", "axes": {"lora.r": [4, 8]}}
    with pytest.raises(ConfigError, match="holds a sweep of mode search, not grid"):
        sweep.run_sweep(from_dict(raw), tmp_path, progress=False)


def test_a_trial_folder_named_alike_but_of_another_config_is_refused(fake_trials):
    """eval.batch_size: [16], then train.batch_size: [16]: both name their trial batch_size16."""
    raw = yaml.safe_load(TINY.read_text())
    raw["sweep"]["axes"] = {"eval.batch_size": [8, 16]}
    assert sweep.run_sweep(from_dict(raw), fake_trials, progress=False) == 0
    assert (fake_trials / "batch_size16" / "metrics.json").is_file()
    raw["sweep"]["axes"] = {"train.batch_size": [4, 16]}
    with pytest.raises(ConfigError, match=r"batch_size16: holds a trial of another config \(differs in "):
        sweep.run_sweep(from_dict(raw), fake_trials, progress=False)


def test_a_lost_ray_task_marks_its_trial_failed_only_under_the_trials_lock(tmp_path):
    """The task's trial process can outlive the task and hold the trial: then nothing is written for it."""
    from loraqa.sweep.attempt import Job
    from loraqa.sweep.ray_runner import RayRunner

    class FakeRay:
        class exceptions:
            class TaskCancelledError(Exception):
                pass

            class RayError(Exception):
                pass

        def get(self, ref):
            raise self.exceptions.RayError("the worker died")

    class Seen:
        def __init__(self):
            self.ends = []

        def finish(self, name, outcome, message):
            self.ends.append(outcome)

    tdir = tmp_path / "base"
    tdir.mkdir()
    job = Job(name="base", overrides={}, config_yaml="{}\n", trial_dir=str(tdir), command=["true"], shard="1/1")
    view = Seen()
    runner = RayRunner({"cpus": 1.0, "gpus": 0.0}, None, None, view, lambda: None)
    runner.ray = FakeRay()
    held = sweep.state.try_lock(tdir)
    try:
        runner.pending["ref"] = (job, None)
        runner._collect("ref")
    finally:
        os.close(held)
    assert not (tdir / "error.json").exists() and view.ends == ["skipped"]
    runner.pending["ref"] = (job, None)
    runner._collect("ref")
    assert "Ray task lost" in read_json(tdir / "error.json")["summary"] and view.ends[-1] == "failed"


def test_a_failing_on_end_stops_the_sweep_at_once(monkeypatch):
    """A search's study failing as a trial ends (settle's study.tell): the other workers take no more trials,
    and the runner raises that error."""
    from loraqa.sweep import attempt, runner

    ran = []

    def fake_attempt(job, children, view, on_change=lambda: None):
        ran.append(job.name)
        time.sleep(0.3)
        return attempt.Outcome(job.name, "done", "")

    def on_end(job, outcome):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(runner, "run_attempt", fake_attempt)
    monkeypatch.setattr(runner.LocalRunner, "finish", lambda self, outcome: None)
    monkeypatch.setattr(runner.LocalRunner, "stop", lambda self, forward: self.children.request_stop())
    jobs = (attempt.Job(name=f"t{i}", overrides={}, config_yaml="", trial_dir="", command=[], shard="1/1")
            for i in range(8))  # fmt: skip
    with pytest.raises(RuntimeError, match="database is locked"):
        runner.LocalRunner(2, "cpu", None, lambda: None).run(jobs, on_end)
    assert len(ran) <= 3, ran  # the two first, at most one more taken as the first failed


def test_device_and_sweep_section_checks_before_any_trial(tmp_path):
    from loraqa.sweep.driver import check_device

    if not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: .* sees no CUDA GPU here"):
            check_device("cuda")  # the trials run here: each would refuse it
        check_device("cuda", "ray")  # a Ray trial runs elsewhere
    raw = yaml.safe_load(TINY.read_text())
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "sweep"}))
    with pytest.raises(ConfigError, match="sweep.yaml: holds no sweep section"):
        sweep.run_sweep(from_dict(raw), tmp_path, progress=False)


def test_a_lock_never_takes_a_standard_streams_number(tmp_path):
    """With stdin closed the lock would be fd 0, which a child given it (pass_fds) gets as its stdin instead."""
    code = "import os, sys; from loraqa import locks; from pathlib import Path; print(locks.try_hold(Path(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.lock")], capture_output=True, text=True,
                         preexec_fn=lambda: os.close(0), env={**os.environ, "PYTHONPATH": str(ROOT / "src")})  # fmt: skip
    assert int(out.stdout) >= 3, out.stderr

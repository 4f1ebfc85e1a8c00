"""loraqa sync: a run or sweep folder copied elsewhere, resumable there; newer work never overwritten."""

import json
import os
import shutil

import pytest

from loraqa import sync as sync_mod
from loraqa.cli import main
from loraqa.io import read_jsonl
from loraqa.pipeline import run_experiment
from loraqa.sweep.state import try_lock
from loraqa.sync import SyncError, progress, sync
from test_train import tiny_config


def fake_run(d, step=None, done=False, trial=False, extra_ckpts=()):
    """A run folder as `loraqa train` leaves it: config, log, and a complete checkpoint at ``step``, or the
    finished files."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text("name: x\n")
    if trial:
        (d / "trial.yaml").write_text("name: x\n")
        (d / "trial.log").write_text("/a/path/of/this/machine/python -m loraqa.cli train\n")
        (d / ".lock").write_text("")
    (d / ".loraqa.lock").write_text("123\n")
    (d / "log_history.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (d / "tensorboard").mkdir(exist_ok=True)
    (d / "tensorboard" / "events.out").write_bytes(b"ev")
    for s in (*extra_ckpts, step) if step else ():
        c = d / "checkpoints" / f"checkpoint-{s}"
        c.mkdir(parents=True, exist_ok=True)
        (c / "adapter_model.safetensors").write_bytes(b"w" * s)
        (c / "optimizer.pt").write_bytes(b"o" * s)
        (c / "trainer_state.json").write_text(json.dumps({"global_step": s}))
    if done:
        (d / "adapter_model.safetensors").write_bytes(b"weights")
        (d / "train_metrics.json").write_text("{}")
        (d / "predictions.jsonl").write_text('{"id": "q1", "f1": 1.0}\n')
        (d / "metrics.json").write_text('{"f1": 1.0}')
    return d


def files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def interrupted_run(cfg, run_dir):
    """A run killed right after its checkpoint at step 2 was saved: what a lost machine leaves."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run_dir, callbacks=[Interrupt()], progress=False)
    return run_dir


def test_a_run_interrupted_here_resumes_from_its_copy_elsewhere(tmp_path, synthetic_dir):
    """The point of sync: the first machine is gone, its copy trains on from the checkpoint and ends where an
    uninterrupted run ends."""
    cfg = tiny_config(synthetic_dir)
    first = interrupted_run(cfg, tmp_path / "machine-a" / "run")
    [r] = sync(first, tmp_path / "storage" / "run")
    assert r.action.startswith("copied") and r.action.endswith("at checkpoint 2") and not r.problem
    shutil.rmtree(tmp_path / "machine-a")
    [r] = sync(tmp_path / "storage" / "run", tmp_path / "machine-b" / "run")
    metrics = run_experiment(cfg, tmp_path / "machine-b" / "run", progress=False)
    assert metrics["resumed_from"] == "checkpoint-2" and metrics["resumed_at_step"] == 2
    straight = run_experiment(cfg, tmp_path / "straight", progress=False)
    assert metrics["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
    assert metrics["train_tokens"] == straight["train_tokens"] and metrics["train_segments"] == 2
    # the finished run synced back: results only leaves its weights out, a full copy keeps them
    [r] = sync(tmp_path / "machine-b" / "run", tmp_path / "storage" / "run", results_only=True)
    assert r.action.endswith("finished") and not (tmp_path / "storage" / "run" / "checkpoints").exists()
    sync(tmp_path / "machine-b" / "run", tmp_path / "repo" / "run", results_only=True)
    stored = files(tmp_path / "repo" / "run")
    assert "metrics.json" in stored and "predictions.jsonl" in stored and "checkpoints" not in "".join(stored)
    assert "adapter_model.safetensors" not in stored and not any("tensorboard" in f for f in stored)
    sync(tmp_path / "machine-b" / "run", tmp_path / "full-copy")
    assert "adapter_model.safetensors" in files(tmp_path / "full-copy")


def test_only_the_newest_complete_checkpoint_goes_and_no_lock(tmp_path):
    src = fake_run(tmp_path / "src", step=6, extra_ckpts=(2,), trial=True)
    (src / "checkpoints" / "checkpoint-8").mkdir()  # being saved: no trainer_state.json yet
    (src / "checkpoints" / "checkpoint-8" / "optimizer.pt").write_bytes(b"half")
    dst = fake_run(tmp_path / "dst", step=4)
    [r] = sync(src, dst)
    assert r.action == "copied 8 file(s); at checkpoint 6"  # 5 of the run's, 3 of the checkpoint's
    assert sorted(p.name for p in (dst / "checkpoints").iterdir()) == ["checkpoint-6"]
    assert (dst / "checkpoints" / "checkpoint-6" / "optimizer.pt").read_bytes() == b"o" * 6
    assert not (dst / ".lock").exists() and (dst / "trial.log").exists()
    assert (dst / ".loraqa.lock").read_text() == "123\n"  # DST's own lock file is not touched either
    assert progress(dst) == (1, 6)
    [r] = sync(src, dst)
    assert r.action == "up to date"


def test_keep_bests_checkpoint_goes_with_the_newest(tmp_path):
    """A keep_best run takes its best scoring's weights back at the end: the checkpoint the newest names goes
    too, or the run resumed from the copy could never finish."""
    src = fake_run(tmp_path / "src", step=6, extra_ckpts=(2, 4))
    (src / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_text(
        json.dumps({"global_step": 6, "best_global_step": 2})
    )
    sync(src, tmp_path / "dst")
    assert sorted(p.name for p in (tmp_path / "dst" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-6"]
    assert (tmp_path / "dst" / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == b"w" * 2
    [r] = sync(src, tmp_path / "dst")
    assert r.action == "up to date"


def test_newer_work_in_the_copy_is_never_overwritten(tmp_path):
    early = fake_run(tmp_path / "early", step=2)
    later = fake_run(tmp_path / "later", step=4)
    before = files(later)
    [r] = sync(early, later)
    assert r.action == "left as it is: at checkpoint 4 there, at checkpoint 2 here" and not r.problem
    assert files(later) == before and (later / "checkpoints" / "checkpoint-4").is_dir()
    done = fake_run(tmp_path / "done", done=True)
    [r] = sync(later, done)
    assert r.action.startswith("left as it is: finished there")
    assert progress(done) == (3, 0)


def test_a_file_the_source_no_longer_has_goes_but_left_out_ones_stay(tmp_path):
    """A failed attempt's error.json in the copy goes once the run has moved on; weights that results_only
    leaves out of a finished run are not deleted from a copy that has them."""
    dst = fake_run(tmp_path / "dst", done=True)
    (dst / "error.json").write_text("{}")
    src = fake_run(tmp_path / "src", done=True)
    (src / "predictions.jsonl").write_text('{"id": "q1", "f1": 0.5}\n')
    sync(src, dst, results_only=True)
    assert not (dst / "error.json").exists()
    assert (dst / "adapter_model.safetensors").read_bytes() == b"weights"
    assert (dst / "predictions.jsonl").read_text() == '{"id": "q1", "f1": 0.5}\n'


def test_a_copy_cut_short_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    src = fake_run(tmp_path / "src", step=6)
    dst = fake_run(tmp_path / "dst", step=4)
    real = shutil.copy2

    def copy_then_fail(a, b, **kw):
        if "checkpoint-6" in str(a) and str(a).endswith("trainer_state.json"):
            raise OSError(28, "No space left on device")
        return real(a, b, **kw)

    monkeypatch.setattr(sync_mod.shutil, "copy2", copy_then_fail)
    with pytest.raises(OSError, match="No space"):
        sync(src, dst)
    assert [p.name for p in (dst / "checkpoints").iterdir()] == ["checkpoint-4"]  # no half copy left over
    assert progress(dst) == (1, 4)
    monkeypatch.setattr(sync_mod.shutil, "copy2", real)
    [r] = sync(src, dst)
    assert progress(dst) == (1, 6) and r.action.endswith("at checkpoint 6")


def test_a_checkpoint_rotated_away_while_copied_is_reported_not_raised(tmp_path, monkeypatch):
    src = fake_run(tmp_path / "src", step=6)
    real = shutil.copy2

    def vanish(a, b, **kw):
        if "checkpoint-6" in str(a):
            raise FileNotFoundError(2, "No such file or directory", str(a))
        return real(a, b, **kw)

    monkeypatch.setattr(sync_mod.shutil, "copy2", vanish)
    [r] = sync(src, tmp_path / "dst")
    assert r.problem and "changed while it was copied; sync again" in r.action


def test_a_sweep_folder_syncs_every_trial_and_leaves_the_copys_own_alone(tmp_path):
    src = tmp_path / "sweep"
    src.mkdir()
    (src / "sweep.yaml").write_text("name: s\n")
    (src / "sweep.json").write_text("{}")
    (src / ".sweep.lock").write_text("")
    fake_run(src / "a", done=True, trial=True)
    fake_run(src / "b", step=3, trial=True)
    dst = tmp_path / "copy"
    results = sync(src, dst, results_only=True)
    assert [(r.name, r.action.split("; ")[-1].split(" (")[0]) for r in results] == [
        ("a", "finished"),
        ("b", "at checkpoint 3"),
    ]
    assert (
        (dst / "sweep.yaml").exists() and (dst / "sweep.json").exists() and not (dst / ".sweep.lock").exists()
    )
    assert not (dst / "a" / "trial.log").exists()  # process logs hold this machine's paths
    assert not (
        dst / "b" / "checkpoints"
    ).exists()  # records only: nothing of a checkpoint in version control
    assert (dst / "b" / "log_history.jsonl").exists()
    fake_run(dst / "c", step=1, trial=True)  # a trial another machine runs into the copy
    sync(src, dst, results_only=True)
    assert (dst / "c" / "checkpoints" / "checkpoint-1").is_dir()
    # a trial a process is running in the copy is skipped, and said so
    fd = try_lock(dst / "b")
    try:
        results = sync(src, dst)
    finally:
        os.close(fd)
    assert [r.name for r in results if r.problem] == ["b"] and "a process is working" in results[1].action
    # the same sweep written by another loraqa (a default spelt out, a changed sweep section): synced
    (dst / "sweep.yaml").write_text("name: s\ntrain:\n  pad_to_multiple: 64\nsweep:\n  axes: {lora.r: [4]}\n")
    sync(src, dst)
    assert (dst / "sweep.yaml").read_text() == "name: s\n"
    (dst / "sweep.yaml").write_text("name: another\n")
    with pytest.raises(SyncError, match="holds another sweep .* in name"):
        sync(src, dst)
    (dst / "sweep.yaml").write_text("name: s\ntrain: {lr: fast}\n")
    with pytest.raises(SyncError, match="cannot read"):
        sync(src, dst)


def test_another_experiments_run_in_the_copy_is_not_touched(tmp_path):
    src = fake_run(tmp_path / "src", done=True)
    dst = fake_run(tmp_path / "dst", step=2)
    (dst / "config.yaml").write_text("name: other\n")
    [r] = sync(src, dst)
    assert r.problem and "another experiment's" in r.action and progress(dst) == (1, 2)
    # the same experiment, saved by a loraqa that spells out a default the other left out
    (dst / "config.yaml").write_text("name: x\ntrain:\n  pad_to_multiple: 64\n")
    [r] = sync(src, dst)
    assert not r.problem and progress(dst) == progress(src)


def test_a_folder_of_the_users_own_is_refused_and_left_whole(tmp_path, capsys):
    src = fake_run(tmp_path / "src", done=True)
    dst = tmp_path / "mine"
    (dst / "sub").mkdir(parents=True)
    (dst / "notes.txt").write_text("mine")
    (dst / "sub" / "data.csv").write_text("a,b\n")
    before = files(dst)
    with pytest.raises(SyncError, match=r"mine: exists and is not a run or sweep folder .*notes.txt, sub/data.csv"):
        sync(src, dst)
    assert main(["sync", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraqa: error:") and "sync into a new folder" in err and "Traceback" not in err
    assert files(dst) == before and (dst / "notes.txt").read_text() == "mine"
    # a run where SRC is a sweep, and a sweep where SRC is a run: neither is emptied
    run = fake_run(tmp_path / "run", done=True)
    sweep_dir = tmp_path / "sweep"
    fake_run(sweep_dir / "t1", done=True, trial=True)
    (sweep_dir / "sweep.yaml").write_text("name: s\n")
    with pytest.raises(SyncError, match="holds a run .* is a sweep"):
        sync(sweep_dir, run)
    with pytest.raises(SyncError, match="holds a sweep .* is a run"):
        sync(run, sweep_dir)
    assert (run / "metrics.json").is_file() and (sweep_dir / "t1" / "metrics.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SyncError, match="not a folder"):
        sync(src, tmp_path / "file")


def test_a_copy_cut_short_before_its_config_arrived_is_resumed(tmp_path):
    src = fake_run(tmp_path / "src", step=4, extra_ckpts=(2,))
    dst = tmp_path / "dst"
    (dst / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # from a sync while SRC was at step 2
    (dst / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"o")
    shutil.copy2(src / "log_history.jsonl", dst / "log_history.jsonl")
    (dst / ".log_history.jsonl.x.tmp").write_text("")
    (dst / "empty").mkdir()  # nothing in it: no file of the user's
    [r] = sync(src, dst)
    assert not r.problem and progress(dst) == progress(src) == (1, 4)
    assert (dst / "config.yaml").read_text() == "name: x\n"


def test_a_file_of_the_users_own_under_a_name_the_run_has_too_is_refused(tmp_path):
    """A folder holding only a README.md of the user's is no copy of a run cut short, though runs have one."""
    src = fake_run(tmp_path / "src", done=True)
    (src / "README.md").write_text("the run's model card\n")
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "README.md").write_text("my notes\n")
    with pytest.raises(SyncError, match=r"it holds README.md, which .* has not as they are"):
        sync(src, dst)
    assert (dst / "README.md").read_text() == "my notes\n" and sorted(dst.iterdir()) == [dst / "README.md"]


def copies_failing(monkeypatch, fails, message: str) -> list[str]:
    """sync's file copy raising OSError(``message``) where ``fails(source file, names copied so far)``; returns
    the names copied, in order."""
    real, copied = sync_mod._copy_file, []

    def copy(a, b):
        if fails(a, copied):
            raise OSError(message)
        copied.append(a.name)
        real(a, b)

    monkeypatch.setattr(sync_mod, "_copy_file", copy)
    return copied


def test_a_copy_cut_short_has_its_config_first(tmp_path, monkeypatch):
    src = fake_run(tmp_path / "src", done=True)
    copied = copies_failing(monkeypatch, lambda a, copied: bool(copied), "disk gone")
    with pytest.raises(OSError, match="disk gone"):
        sync(src, tmp_path / "dst")
    assert copied == ["config.yaml"] and files(tmp_path / "dst") == ["config.yaml"]
    monkeypatch.undo()
    [r] = sync(src, tmp_path / "dst")  # known for a run folder: resumed
    assert not r.problem and files(tmp_path / "dst") == [f for f in files(src) if f != ".loraqa.lock"]


def test_a_copy_cut_short_never_says_finished_without_its_weights(tmp_path, monkeypatch):
    """metrics.json and train_metrics.json go last: a copy cut short at the weights (a full disk) is not a
    finished run without an adapter (which `loraqa train` would take as done and `ask` could not load)."""
    src = fake_run(tmp_path / "src", done=True)
    copied = copies_failing(monkeypatch, lambda a, _: a.name == "adapter_model.safetensors", "no space left on device")
    with pytest.raises(OSError, match="no space"):
        sync(src, tmp_path / "dst")
    assert copied[0] == "config.yaml"
    assert not (tmp_path / "dst" / "metrics.json").exists() and not (tmp_path / "dst" / "train_metrics.json").exists()


def test_cli_sync_prints_a_line_a_run_and_refuses_what_is_no_run(tmp_path, capsys):
    src = fake_run(tmp_path / "run", done=True)
    assert main(["sync", str(src), str(tmp_path / "copy"), "--results-only"]) == 0
    out = capsys.readouterr().out
    assert ".: copied" in out and "synced 1 of 1 run folder(s)" in out
    (tmp_path / "empty").mkdir()
    assert main(["sync", str(tmp_path / "empty"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loraqa: error:") and "not a run folder" in err and "Traceback" not in err
    assert main(["sync", str(src), str(src / "inside")]) == 2
    assert "inside it" in capsys.readouterr().err


def test_a_results_only_copy_has_no_weights_and_its_unfinished_run_starts_again(tmp_path, synthetic_dir, capsys):
    """Version control gets records, never a checkpoint; a run resumed from such a copy trains from its first
    step and ends as an uninterrupted run does, its stale log replaced."""
    cfg = tiny_config(synthetic_dir)
    first = interrupted_run(cfg, tmp_path / "machine-a" / "run")
    [r] = sync(first, tmp_path / "repo" / "run", results_only=True)
    stored = files(tmp_path / "repo" / "run")
    assert r.action.endswith("at checkpoint 2 (records only: resumed from this copy, it starts again)")
    assert "log_history.jsonl" in stored
    assert not any(f.endswith(sync_mod.WEIGHT_SUFFIXES) or "checkpoint" in f for f in stored)
    # trained but not yet scored when copied: the copy must not claim a training whose weights it lacks
    (first / "train_metrics.json").write_text("{}")
    sync(first, tmp_path / "repo" / "run", results_only=True)
    assert "train_metrics.json" not in files(tmp_path / "repo" / "run")
    sync(tmp_path / "repo" / "run", tmp_path / "machine-b" / "run")
    metrics = run_experiment(cfg, tmp_path / "machine-b" / "run", progress=False)
    straight = run_experiment(cfg, tmp_path / "straight", progress=False)
    assert metrics.get("resumed_from") is None
    assert metrics["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
    steps = [h["step"] for h in read_jsonl(tmp_path / "machine-b" / "run" / "log_history.jsonl")]
    assert steps == [h["step"] for h in read_jsonl(tmp_path / "straight" / "log_history.jsonl")]
    # a finished run's records alone: asked to answer, it says what it lacks and how to get it
    sync(tmp_path / "straight", tmp_path / "repo" / "done", results_only=True)
    assert main(["ask", str(tmp_path / "repo" / "done"), "-q", "Where?", "--context", "Here."]) == 2
    err = capsys.readouterr().err.strip()
    assert "finished, but has no adapter_model.safetensors" in err and "sync the whole run folder again" in err


def test_a_sqlite_study_is_copied_as_a_consistent_database(tmp_path):
    import sqlite3

    src = tmp_path / "a sweep #1?"  # a path that is no plain URI
    src.mkdir()
    (src / "sweep.yaml").write_text("name: s\n")
    db = sqlite3.connect(src / "search.db")
    db.execute("create table t (x)")
    db.executemany("insert into t values (?)", [(i,) for i in range(1000)])
    db.commit()
    writer = sqlite3.connect(src / "search.db")
    writer.execute("begin immediate")  # a driver in the middle of a write: the copy sees the last commit
    writer.execute("insert into t values (-1)")
    sync(src, tmp_path / "copy", results_only=True)
    writer.rollback()
    copy = sqlite3.connect(tmp_path / "copy" / "search.db")
    assert copy.execute("select count(*) from t").fetchone() == (1000,)
    assert copy.execute("pragma integrity_check").fetchone() == ("ok",)
    (src / "not-a.db").write_bytes(b"plain bytes")
    sync(src, tmp_path / "copy", results_only=True)
    assert (tmp_path / "copy" / "not-a.db").read_bytes() == b"plain bytes"

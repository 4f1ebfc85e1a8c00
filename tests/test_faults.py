"""Faults, each shown on the tiny random GPT-2: SIGKILL at any write, a full disk, a diverging loss, two
processes on one run folder. (Determinism, same seed -> same metrics: tests/test_train.py.)"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loraqa.cli import main
from loraqa.data import make_synthetic_squad
from loraqa.runfolder import RunFolder, RunFolderError, check_checkpoint, last_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic_squad(tmp_path_factory.mktemp("faults-squad"), n_train=16, n_dev=8)


def train_args(data_dir, out, *extra) -> list[str]:
    return ["train", "--model", "tiny-random-gpt2", "--precision", "fp32", "--data-dir", str(data_dir),
            "--train-limit", "16", "--eval-limit", "4", "--max-steps", "6", "--batch-size", "4",
            "--warmup-steps", "0", "--eval-steps", "0", "--save-steps", "2", "--max-new-tokens", "2",
            "--output-dir", str(out), "train.logging_steps=2", *extra]  # fmt: skip


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``loraqa ARGV`` in this process: (exit status, everything written to stderr, library logs included).
    transformers' log handler keeps the stderr it was created with (another test's, closed by now): it is
    pointed at the same buffer while the command runs."""
    import contextlib
    import io

    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # creates the handler
    handler = hf_logging._default_handler
    buf = io.StringIO()
    saved = handler.__dict__.get("stream"), handler.__dict__.get("flush")
    handler.stream, handler.flush = buf, buf.flush
    try:
        with contextlib.redirect_stderr(buf):
            rc = main(argv)
    finally:
        handler.stream = saved[0]
        if saved[1] is not None:
            handler.flush = saved[1]
    return rc, buf.getvalue()


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("loraqa: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkill_at_any_write_then_rerun_ends_as_an_uninterrupted_run(data_dir, tmp_path):
    """tests/_kill_driver.py kills a run (SIGKILL, no cleanup of any kind) once in each kind of write -- while a
    checkpoint's tensors, its torch pickles, its trainer_state.json, the adapter, train_metrics.json and
    metrics.json are written, while checkpoints are removed, mid-step -- and at two more points drawn with a
    fixed seed, then reruns the same command. Tolerance: EM, F1, the predictions, the step count and the
    adapter's tensors identical to the uninterrupted run's; the final train loss within 1e-5 relative (it is
    bit-identical here)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_kill_driver.py"), str(data_dir),
                           str(tmp_path / "runs"), "1234"], capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = result["reference"]
    kinds = {c["event"][0] for c in result["cases"]}
    assert {"step", "torch.save", "safetensors", "trainer_state", "atomic", "replace", "rmtree"} <= kinds
    assert len(result["cases"]) == 11
    for case in result["cases"]:
        what = f"killed at event {case['kill_at']} {case['event']}"
        assert case["killed_by"] == signal.SIGKILL, what
        assert case["rerun_exit"] == 0, what
        m = case["metrics"]
        assert (m["exact_match"], m["f1"], m["train_steps"]) == (ref["exact_match"], ref["f1"], 6), what
        assert m["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=1e-5), what
        assert case["same_predictions"], what
        assert case["same_adapter"], what  # the trained weights themselves, bit for bit
        assert case["bad_json_after_kill"] == [], what  # result files are whole or absent, never half
        assert case["leftovers_after_rerun"] == [], what
    by_event = {(c["event"][0], "/".join(Path(c["event"][1]).parts[-2:])): c for c in result["cases"]}
    # a checkpoint whose trainer_state.json was half-written is dropped: the rerun resumes from the one before
    assert by_event[("trainer_state", "checkpoint-4/trainer_state.json")]["metrics"]["resumed_from"] == "checkpoint-2"
    # a kill while the adapter is saved resumes from the last checkpoint rather than training again
    assert by_event[("safetensors", ".saving/adapter_model.safetensors")]["metrics"]["resumed_from"] == "checkpoint-6"


# ---------------------------------------------------------------------------------------------- disk full


class DiskFull:
    """``torch.save`` that fails like a full disk (after writing part of the file) from the n-th call on."""

    def __init__(self, fail_from: int):
        self.calls, self.fail_from, self.real = 0, fail_from, torch.save

    def __call__(self, obj, f, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.fail_from and isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return self.real(obj, f, *args, **kwargs)


def test_enospc_during_a_checkpoint_is_one_clear_line_and_the_last_good_checkpoint_stays(
    data_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    # torch.save runs 4 times per checkpoint (training args, optimizer, scheduler, RNG): the 6th is checkpoint-4's
    # optimizer state
    monkeypatch.setattr(torch, "save", DiskFull(fail_from=6))
    rc, err = run_cli(train_args(data_dir, out))
    assert rc == 1
    line = one_error_line(err)
    assert "no space left on device" in line and "checkpoint-4" in line and "rerun the same command" in line
    assert json.loads((out / "error.json").read_text())["error"] == "OSError"
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()
    # checkpoint-2 is whole and readable; the half-written checkpoint-4 is not resumed from
    good = out / "checkpoints" / "checkpoint-2"
    check_checkpoint(good)
    assert last_checkpoint(out / "checkpoints") == str(good)
    monkeypatch.undo()
    assert main(train_args(data_dir, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-2" and metrics["resumed_at_step"] == 2
    assert not (out / "error.json").exists()


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 3 MiB tmpfs (needs root and mount rights; skipped where there are none)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("no rights to mount a small tmpfs here; the injected-error test covers ENOSPC")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk_mid_run(data_dir, small_filesystem, monkeypatch):
    """On a real small filesystem, filled once checkpoint-2 is saved: the next write meets ENOSPC."""
    from transformers import TrainerCallback

    from loraqa import cli, pipeline

    out = small_filesystem / "run"
    filler = small_filesystem / "filler"

    class FillTheDisk(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with open(filler, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 4096)
                            f.flush()
                    except OSError:
                        pass

    monkeypatch.setattr(pipeline, "FiniteLossCallback", FillTheDisk)  # in its place among the callbacks
    rc, err = run_cli(train_args(data_dir.resolve(), out))
    assert rc == 1 and "no space left on device" in one_error_line(err)
    good = out / "checkpoints" / "checkpoint-2"
    check_checkpoint(good)
    assert last_checkpoint(out / "checkpoints") == str(good)
    filler.unlink()
    monkeypatch.undo()
    assert cli.main(train_args(data_dir.resolve(), out)) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_at_step"] == 2


# ---------------------------------------------------------------------------------------------- NaN / inf


def test_a_diverging_loss_stops_the_run_with_the_reason_in_the_folder(data_dir, tmp_path):
    out = tmp_path / "run"
    rc, err = run_cli(train_args(data_dir, out, "--lr", "1e30"))
    assert rc == 1
    line = one_error_line(err)
    assert "training diverged" in line and "is nan at step" in line and "train.lr" in line
    error = json.loads((out / "error.json").read_text())
    assert error["error"] == "TrainingDiverged" and error["summary"] == line.removeprefix("loraqa: error: ")
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()
    logged = [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert any(not math.isfinite(h.get("grad_norm", 0.0)) or not math.isfinite(h.get("loss", 0.0)) for h in logged)
    # no checkpoint is saved after the non-finite log: the last one (if any) predates it
    step = int(line.split("at step ")[1].split(";")[0])
    assert all(int(p.name.split("-")[1]) < step for p in (out / "checkpoints").glob("checkpoint-*"))


@pytest.mark.slow
def test_a_sweep_marks_a_diverging_trial_failed_with_the_reason(data_dir, tmp_path):
    cfg = tmp_path / "nan-sweep.yaml"
    cfg.write_text(
        "name: nan-sweep\nmodel: {name: tiny-random-gpt2, precision: fp32}\n"
        f"data: {{data_dir: {data_dir}, train_limit: 8, eval_limit: 2}}\n"
        "train: {max_steps: 4, batch_size: 4, warmup_steps: 0, eval_steps: 0, save_steps: 2, logging_steps: 1}\n"
        "eval: {max_new_tokens: 2}\n"
        "sweep: {mode: grid, axes: {train.lr: [1e30]}}\n"
    )
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "loraqa.cli", "sweep", str(cfg), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode != 0
    (trial,) = json.loads((out / "sweep.json").read_text())["trials"]
    assert trial["status"] == "failed" and trial["exit_code"] == 1
    assert "training diverged" in trial["error"] and "is nan at step" in trial["error"]
    assert "training diverged" in json.loads((out / trial["dir"] / "error.json").read_text())["summary"]


# ---------------------------------------------------------------------------------------------- locks


def test_a_second_process_on_a_run_folder_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from loraqa.runfolder import RunFolder\n"
         "with RunFolder(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = run_cli(train_args(data_dir, out))
        assert rc == 2
        line = one_error_line(err)
        assert f"{out}: another loraqa process (pid {holder.pid}) is working in this run folder" in line
        assert sorted(p.name for p in out.iterdir()) == [".loraqa.lock"]  # nothing written by the refused one
    finally:
        holder.kill()  # SIGKILL: no cleanup; the kernel drops the lock with the process
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with RunFolder(out).lock():
                break
        except RunFolderError as e:  # still held (any other error is the test's failure)
            assert "another loraqa process" in str(e) and time.monotonic() < deadline, e
            time.sleep(0.1)


def test_result_files_get_the_mode_a_plain_write_gives(tmp_path):
    """Atomic writes go through mkstemp, whose files are 0600: a teammate (or a Ray worker running as another
    user) could not read a sweep's results. They get what open(path, "w") gives under the umask."""
    import stat

    from loraqa.io import write_json_atomic

    mask = os.umask(0)
    os.umask(mask)
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    written = write_json_atomic(tmp_path / "metrics.json", {"f1": 1.0})
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask

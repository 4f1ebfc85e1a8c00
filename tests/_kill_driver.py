"""SIGKILL a tiny training run at chosen points, rerun it, and report what the reruns ended with.

Run by tests/test_faults.py as ``python tests/_kill_driver.py DATA_DIR ROOT SEED``; prints one JSON object.
Each run is a fork of this process (which imports everything but never computes), so a run costs its work, not
the imports. Every write loraqa and the Trainer make is an *event*: a training step, ``torch.save``,
safetensors' ``save_file``, the Trainer's ``trainer_state.json``, loraqa's atomic writes, ``os.replace``,
``shutil.rmtree``. An uninterrupted reference run lists the events; a run told to die at event k writes half of
that event's file (where it writes one) and SIGKILLs itself; the same command is then rerun to the end.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

os.environ.update(LORAQA_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers.trainer  # noqa: E402, F401
from transformers.trainer_callback import TrainerState  # noqa: E402

import loraqa.io  # noqa: E402
import loraqa.pipeline  # noqa: E402
from loraqa.cli import main  # noqa: E402

EVENTS: list[list[str]] = []
KILL_AT = -1


def event(kind: str, where, partial=None) -> None:
    index = len(EVENTS)
    EVENTS.append([kind, str(where)])
    if index == KILL_AT:
        if partial is not None:
            partial()
        os.kill(os.getpid(), signal.SIGKILL)


def _half(path, data: bytes):
    return lambda: Path(path).write_bytes(data[: len(data) // 2])


def _replace_everywhere(original, replacement) -> None:
    """Patch a function in every loaded module that imported it by name."""
    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if value is original:
                setattr(module, name, replacement)


def install_events() -> None:
    orig_torch_save, orig_save_file = torch.save, safetensors.torch.save_file
    orig_state_save, orig_atomic = TrainerState.save_to_json, loraqa.io.write_text_atomic
    orig_replace, orig_rmtree = os.replace, shutil.rmtree

    def torch_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            buf = io.BytesIO()
            orig_torch_save(obj, buf, *args, **kwargs)
            event("torch.save", f, _half(f, buf.getvalue()))
        return orig_torch_save(obj, f, *args, **kwargs)

    def save_file(tensors, filename, metadata=None):
        event("safetensors", filename, _half(filename, safetensors.torch.save(tensors, metadata)))
        return orig_save_file(tensors, filename, metadata)

    def save_to_json(self, json_path):
        text = json.dumps(dataclasses.asdict(self), indent=2)
        event("trainer_state", json_path, _half(json_path, text.encode()))
        return orig_state_save(self, json_path)

    def write_text_atomic(path, text):
        tmp = Path(path).parent / f".{Path(path).name}.killed.tmp"
        event("atomic", path, _half(tmp, text.encode()) if Path(path).parent.is_dir() else None)
        return orig_atomic(path, text)

    def replace(src, dst, *args, **kwargs):
        event("replace", dst)
        return orig_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        def remove_one():
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            if files:
                files[0].unlink()

        event("rmtree", path, remove_one)
        return orig_rmtree(path, *args, **kwargs)

    class Counted(loraqa.pipeline.QATrainer):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            event("step", self.state.global_step + 1)
            return loss

    _replace_everywhere(orig_torch_save, torch_save)
    _replace_everywhere(orig_save_file, save_file)
    TrainerState.save_to_json = save_to_json
    loraqa.io.write_text_atomic = write_text_atomic  # write_json(l)_atomic call it through the module
    _replace_everywhere(orig_atomic, write_text_atomic)
    os.replace = replace
    _replace_everywhere(orig_rmtree, rmtree)
    loraqa.pipeline.QATrainer = Counted


def command(data_dir: str, out: Path) -> list[str]:
    return ["train", "--model", "tiny-random-gpt2", "--precision", "fp32", "--data-dir", data_dir,
            "--train-limit", "16", "--eval-limit", "8", "--max-steps", "6", "--batch-size", "4",
            "--warmup-steps", "0", "--eval-steps", "0", "--save-steps", "2", "--max-new-tokens", "4",
            "--eval-batch-size", "8", "--output-dir", str(out), "train.logging_steps=2"]  # fmt: skip


def run(data_dir: str, out: Path, kill_at: int = -1, events_file: Path | None = None) -> int:
    """Fork a child that runs the command (dying at event ``kill_at``); the child's exit status, or -signal."""
    pid = os.fork()
    if pid == 0:
        global KILL_AT
        KILL_AT = kill_at
        code = 1
        try:
            sys.stdout = sys.stderr = open(out.parent / f"{out.name}.log", "a")  # noqa: SIM115
            install_events()
            code = main(command(data_dir, out))
            if events_file is not None:
                events_file.write_text(json.dumps(EVENTS))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def leftovers(folder: Path) -> list[str]:
    """Anything a finished run should not hold: temporary files, a half-saved adapter, checkpoints, bad JSON."""
    bad = [str(p.relative_to(folder)) for p in folder.rglob("*")
           if p.name.endswith(".tmp") or p.name in (".saving", "checkpoints")]  # fmt: skip
    for p in folder.glob("*.json"):
        try:
            json.loads(p.read_text())
        except ValueError:
            bad.append(f"{p.name} (not JSON)")
    return bad


def same_tensors(a: Path, b: Path) -> bool:
    """The two adapters hold the same tensors, bit for bit."""
    if not a.is_file():
        return False
    ta, tb = safetensors.torch.load_file(str(a)), safetensors.torch.load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def choose(events: list[list[str]], seed: int) -> list[int]:
    """One kill in each kind of write (the first while a checkpoint, the adapter, the trainer state, the
    metrics are written; while checkpoints are removed; mid-training), plus two at random (fixed seed)."""
    def first(pred):
        return next(i for i, (kind, where) in enumerate(events) if pred(kind, where))

    picks = [
        first(lambda k, w: k == "step"),
        first(lambda k, w: k == "torch.save" and "checkpoint-" in w),
        first(lambda k, w: k == "safetensors" and "checkpoint-" in w),
        first(lambda k, w: k == "trainer_state" and "checkpoint-4" in w),
        first(lambda k, w: k == "safetensors" and ".saving" in w),
        first(lambda k, w: k == "replace" and w.endswith("adapter_model.safetensors")),
        first(lambda k, w: k == "atomic" and w.endswith("train_metrics.json")),
        first(lambda k, w: k == "rmtree" and w.endswith("checkpoints")),
        first(lambda k, w: k == "atomic" and w.endswith("metrics.json") and "train_" not in w),
    ]
    rest = [i for i in range(len(events)) if i not in picks]
    return picks + sorted(random.Random(seed).sample(rest, 2))


def main_driver(data_dir: str, root: Path, seed: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    ref = root / "reference"
    assert run(data_dir, ref, events_file=root / "events.json") == 0, (root / "reference.log").read_text()
    events = json.loads((root / "events.json").read_text())
    reference = json.loads((ref / "metrics.json").read_text())
    cases = []
    for k in choose(events, seed):
        out = root / f"kill-{k}"
        killed = run(data_dir, out, kill_at=k)
        after_kill = leftovers(out) if out.is_dir() else []
        rerun = run(data_dir, out)
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
        cases.append({
            "kill_at": k, "event": events[k], "killed_by": -killed if killed < 0 else None, "rerun_exit": rerun,
            "metrics": {key: metrics.get(key) for key in ("exact_match", "f1", "final_train_loss", "train_steps",
                                                          "resumed_from", "train_segments")},
            "same_predictions": (out / "predictions.json").read_text() == (ref / "predictions.json").read_text(),
            "same_adapter": same_tensors(out / "adapter_model.safetensors", ref / "adapter_model.safetensors"),
            "bad_json_after_kill": [b for b in after_kill if "not JSON" in b],
            "leftovers_after_rerun": leftovers(out),
        })  # fmt: skip
    return {"n_events": len(events), "reference": {k: reference.get(k) for k in
            ("exact_match", "f1", "final_train_loss", "train_steps")}, "cases": cases}  # fmt: skip


if __name__ == "__main__":
    result = main_driver(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(result))

"""Tests for loraqa.report on made-up sweep folders (no training): tables, CSV, figures, and that each verdict
follows the stated rule — "holds" beyond noise, "does not hold" within it, "not measurable here" when trials are
missing. The report on a real (tiny) sweep is tested in test_sweep.py, which has that folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraqa.config import from_dict
from loraqa.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from loraqa.report import load_sweep, paired_diff, write_report
from loraqa.sweep import expand_trials

N_QUESTIONS = 400

STUDY = {
    "name": "made-up-study",
    "model": {"name": "tiny-random-gpt2"},
    "sweep": {
        "mode": "one-at-a-time",
        "axes": {
            "lora.r": [4, 8, 16, 32],
            "lora.targets": ["attn", "attn+proj"],
            "train.lr": ["1e-4", "2e-4", "5e-4"],
            "prompt.loss_on": ["answer", "all"],
            "train.method": ["lora", "full"],
        },
    },
}

# Per trial: F1 (%), peak memory (MB), eval-loss offset. Rank gains: +10 (4->8), +6 (8->16), +1 (16->32).
CLAIMS_HOLD = {
    "base": (60.0, 1010, 0.0),
    "r4": (50.0, 1000, 0.0),
    "r16": (66.0, 1030, 0.0),
    "r32": (67.0, 1070, 0.0),
    "targets_attn+proj": (61.0, 1040, -0.2),
    "lr1e-4": (55.0, 1010, 0.0),
    "lr5e-4": (52.0, 1010, 0.0),
    "loss_on_all": (45.0, 1015, 0.3),
    "method_full": (63.0, 2100, 0.0),
}
# Every difference within noise (one or two questions of 400), memory flat, curves alike.
WITHIN_NOISE = {name: (60.0 + 0.25 * (i % 2), 1000, 0.001) for i, name in enumerate(CLAIMS_HOLD)}


def make_sweep(root: Path, numbers: dict, skip: tuple[str, ...] = (), fail: tuple[str, ...] = ()) -> Path:
    """A sweep folder as `loraqa sweep` leaves it, with made-up results: question i is answered right by a
    trial with F1 p% iff i < p% of the questions, so paired differences have the intended sign and size."""
    cfg = from_dict(STUDY, where="study.yaml")
    out = root / "sweep"
    write_text_atomic(out / "sweep.yaml", cfg.to_yaml())
    machine = {"host": "box", "platform": "Linux-test", "cpu_count": 2, "torch": "2.x", "gpus": [],
               "code": "loraqa 0.1.0, git abc1234"}
    write_json_atomic(out / "sweep.json", {"invocations": [{"command": f"loraqa sweep study.yaml --output-dir {out}"}],
                                           "machine": {**machine, "host": "driver"}})  # fmt: skip
    for t in expand_trials(cfg):
        d = out / t.name
        if t.name in skip:
            continue
        write_text_atomic(d / "trial.yaml", t.config.to_yaml())
        attempt = {"started_at": "2026-01-01T10:00:00+00:00", "finished_at": "2026-01-01T10:12:00+00:00",
                   "wall_seconds": 720.0, "exit_code": 0, "status": "done", "max_rss_mb": 1100.0}  # fmt: skip
        write_json_atomic(d / "run.json", {"name": t.name, "attempts": [attempt], "wall_seconds": 720.0,
                                           "machine": machine})  # fmt: skip
        f1, memory, offset = numbers[t.name]
        steps = range(25, 126, 25)
        history = []
        for s in range(5, 126, 5):
            history.append({"loss": 3.0 - s / 100 + offset, "step": s})
            if s in steps:
                history.append({"eval_loss": 2.5 - s / 200 + offset, "step": s})
        write_jsonl_atomic(d / "log_history.jsonl", history)
        if t.name in fail:
            write_json_atomic(
                d / "error.json", {"exit_code": -9, "summary": "killed by SIGKILL (out of memory?)"}
            )
            continue
        right = round(f1 / 100 * N_QUESTIONS)
        preds = [
            {"id": f"q{i}", "exact_match": float(i < right), "f1": float(i < right)}
            for i in range(N_QUESTIONS)
        ]
        write_jsonl_atomic(d / "predictions.jsonl", preds)
        full = t.config.train.method == "full"
        trainable = (
            134_515_008 if full else t.config.lora.r * (1408 if t.config.lora.targets == "attn+proj" else 512)
        )
        write_json_atomic(d / "metrics.json", {
            "exact_match": 100 * right / N_QUESTIONS, "f1": 100 * right / N_QUESTIONS, "n_questions": N_QUESTIONS,
            "final_train_loss": history[-2]["loss"], "final_eval_loss": history[-1]["eval_loss"],
            "trainable_params": trainable, "total_params": 134_515_008 + (0 if full else trainable),
            "train_seconds": 1400.0 if full else 600.0, "train_tokens_per_second": 500.0, "peak_memory_mb": memory,
            "eval_seconds": 50.0, "train_steps": 125, "device": "cpu", "eval_loss_on": "answer",
        })  # fmt: skip
    return out


def verdict_line(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"- **({label})"))


def test_claims_hold_when_the_numbers_say_so(tmp_path):
    out = make_sweep(tmp_path, CLAIMS_HOLD)
    report = write_report(out)
    assert report == out / "report.md"
    text = report.read_text()
    for label in "abcd":
        assert ": holds.**" in verdict_line(text, label), verdict_line(text, label)
    assert "answers worse: holds; slower convergence: holds" in verdict_line(text, "e")
    assert "higher at 5 and lower at 0 of 5 common steps" in verdict_line(text, "e")
    # the numbers are beside the verdicts
    assert "r4 50.00, r8 60.00, r16 66.00, r32 67.00" in verdict_line(text, "a")
    assert "2e-4 − 5e-4: +8.00 ±" in verdict_line(text, "b")
    assert "lower at 5 and higher at 0 of 5 common steps" in verdict_line(text, "c")
    assert "r4 1,000 MB" in verdict_line(text, "d") and "+7.0%" in verdict_line(text, "d")
    # (32 - 4) * 512 trainable parameters more, at 16 bytes each: 0.22 MB, 0.02% of r4's 1,000 MB
    assert "grows by +0.2 MB from r4 to r32: 0.02% of r4's peak" in verdict_line(text, "d")
    # full fine-tuning ablation table
    ablation = text.split("### Full fine-tuning ablation")[1]
    assert "134,515,008" in ablation and "2,100 MB" in ablation and "63.00" in ablation
    assert "Rule: an EM or F1 difference counts only if it is more than 2 standard errors" in text


def test_tables_csv_and_figures(tmp_path):
    out = make_sweep(tmp_path, CLAIMS_HOLD)
    write_report(out, out_dir=tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "- Command: `loraqa sweep study.yaml --output-dir" in text
    assert "Linux-test, 2 CPUs, torch 2.x, no GPU" in text and "Date: trials ran 2026-01-01T10:00:00" in text
    assert "- Code: loraqa 0.1.0, git abc1234\n" in text
    rank_table = text.split("### LoRA rank (`lora.r`)")[1].split("###")[0]
    rows = [r for r in rank_table.splitlines() if r.startswith("| ") and r[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 4", "| 8 (reference)", "| 16", "| 32"]
    assert "| 16 | 66.00 | 66.00 | 8,192 | 10.0 min | 1,030 MB | r16 (done) |" in rank_table
    lr_table = text.split("### Learning rate (`train.lr`)")[1].split("###")[0]
    assert "| 1e-4 |" in lr_table and "| 5e-4 |" in lr_table and "r16" not in lr_table
    best = text.split("## Table 6")[1].split("##")[0]
    assert best.index("| r32 |") < best.index("| r16 |") < best.index("| method_full |")
    params = text.split("## Table 7")[1].split("##")[0]
    assert "| attn | 8 | 4,096 | 0.121% | 4,096 |" in params and "full fine-tuning" in params
    with open(tmp_path / "rep" / "results.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert len(rows) == 9 and rows["r16"]["f1"] == "66.0" and rows["r16"]["lora.r"] == "16"
    assert rows["lr5e-4"]["train.lr"] == "5e-4" and rows["base"]["wall_seconds"] == "720.0"
    for fig in ("figure3_rank_eval_loss.png", "figure4_targets_loss.png", "figure5_lr_loss.png",
                "masking_eval_loss.png"):
        assert (tmp_path / "rep" / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "report.md").exists()


def test_differences_within_noise_are_not_called_holds(tmp_path):
    out = make_sweep(tmp_path, WITHIN_NOISE)
    text = write_report(out).read_text()
    for label in "abcd":
        assert ": does not hold.**" in verdict_line(text, label), verdict_line(text, label)
    assert "within noise" in verdict_line(text, "a") and "within noise" in verdict_line(text, "b")
    assert "answers worse: does not hold; slower convergence: does not hold" in verdict_line(text, "e")


def test_masking_convergence_is_not_judged_on_losses_over_different_tokens(tmp_path):
    # runs from before loraqa logged the answer-token eval loss whatever prompt.loss_on trained on
    out = make_sweep(tmp_path, CLAIMS_HOLD)
    for name in ("base", "loss_on_all"):
        path = out / name / "metrics.json"
        metrics = json.loads(path.read_text())
        del metrics["eval_loss_on"]
        write_json_atomic(path, metrics)
    text = write_report(out).read_text()
    assert "answers worse: holds; slower convergence: not measurable here" in verdict_line(text, "e")
    assert "not comparable" in verdict_line(text, "e")
    assert "Masking figure" in text and "masking_eval_loss.png" not in text


def test_missing_failed_and_unfinished_trials_are_listed_and_not_measured(tmp_path):
    out = make_sweep(tmp_path, CLAIMS_HOLD, skip=("r32", "loss_on_all"), fail=("method_full",))
    (out / "lr5e-4" / "metrics.json").unlink()  # interrupted: logs but no metrics, half way through epoch 1 of 3
    write_jsonl_atomic(out / "lr5e-4" / "log_history.jsonl", [{"loss": 2.0, "step": s, "epoch": s / 250}
                                                              for s in (25, 50, 125)])  # fmt: skip
    write_json_atomic(out / "lr5e-4" / "checkpoints" / "checkpoint-100" / "loraqa_clock.json", {"train_seconds": 250.0})
    (out / "targets_attn+proj" / "metrics.json").unlink()  # trained to the end, killed while answering
    write_jsonl_atomic(out / "targets_attn+proj" / "log_history.jsonl", [{"loss": 2.0, "step": 750, "epoch": 3.0}])
    text = write_report(out).read_text()
    trials = text.split("## Trials")[1].split("## ")[0]
    assert "| r32 | pending |" in trials and "| loss_on_all | pending |" in trials
    assert "| method_full | failed |" in trials and "killed by SIGKILL (out of memory?)" in trials
    # 625 steps to go at the 2.5 s a step of its last checkpoint's clock
    assert "| lr5e-4 | unfinished, step 125 of 750 logged; ~26.0 min of training left at 2.5 s a step so far |" in trials
    assert "| targets_attn+proj | unfinished, training done, not scored yet |" in trials
    assert "Not finished (left out of every comparison below): `r32` (pending)" in text
    assert ": not measurable here.**" in verdict_line(text, "a") and "r32 (pending)" in verdict_line(
        text, "a"
    )
    assert ": not measurable here.**" in verdict_line(text, "e")
    assert ": holds.**" in verdict_line(text, "b")  # 2e-4 vs 1e-4 is still measured
    assert "**not measurable here.**" in text.split("### Full fine-tuning ablation")[1]
    assert "Trials: 4 done, 1 failed, 2 unfinished, 2 pending" in text


def test_paired_difference():
    out_a = {"q1": 1.0, "q2": 1.0, "q3": 0.0, "q4": 0.0}

    class T:
        def __init__(self, scores):
            self.per_question = {k: {"f1": v, "exact_match": v} for k, v in scores.items()}

    d = paired_diff(T(out_a), T({"q1": 1.0, "q2": 0.0, "q3": 0.0, "q4": 0.0}))
    assert d.mean == pytest.approx(25.0) and d.n == 4 and d.se == pytest.approx(25.0)
    assert not d.significant  # 25 < 2 * 25
    same = paired_diff(T(out_a), T(out_a))
    assert same.mean == 0 and not same.significant
    assert paired_diff(T({"q1": 1.0}), T({"q9": 1.0})) is None
    # a question without gold answers carries no score (a JSONL dev set may have some): left out, not a crash
    unscored = T(out_a)
    unscored.per_question["q4"] = {"id": "q4", "prediction": "x"}
    d = paired_diff(unscored, T({"q1": 1.0, "q2": 0.0, "q3": 0.0, "q4": 1.0}))
    assert d.n == 3 and d.mean == pytest.approx(100 / 3)


def test_not_a_sweep_folder(tmp_path):
    from loraqa.config import ConfigError

    with pytest.raises(ConfigError, match="not a sweep folder"):
        write_report(tmp_path)


def test_report_cli(tmp_path, capsys):
    from loraqa.cli import main

    out = make_sweep(tmp_path, CLAIMS_HOLD, skip=tuple(n for n in CLAIMS_HOLD if n != "base"))
    assert main(["report", str(out), "--out", str(tmp_path / "r")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "r" / "report.md").exists()
    data = load_sweep(out)
    assert [t.status for t in data.trials].count("done") == 1 and data.reference_trial.name == "base"
    # the host recorded in the trials' run.json reaches the report (not only the file this test wrote)
    text = (tmp_path / "r" / "report.md").read_text()
    assert "(host box)" in text and "driver" not in text  # sweep.json's machine is only the fallback


def test_a_run_folder_is_refused_as_the_reports_folder(tmp_path, capsys):
    from loraqa.cli import main
    from loraqa.config import ConfigError

    out = make_sweep(tmp_path, CLAIMS_HOLD, skip=tuple(n for n in CLAIMS_HOLD if n != "base"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / "metrics.json").write_text('{"f1": 1.0}')
    with pytest.raises(ConfigError, match=r"run: holds a run \(config.yaml\), not a report; pick another --out"):
        write_report(out, out_dir=run)
    for argv in ([str(out)], [str(out), str(out)]):  # one sweep's report, and a study's
        assert main(["report", *argv, "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("loraqa: error:") and "holds a run" in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.json"]  # no report.md, results.csv


def test_report_names_no_folder_of_this_machine(tmp_path, monkeypatch):
    """The recorded command holds absolute paths (as typed); the report writes them relative to the working
    folder, or as ``…/NAME`` outside it."""
    out = make_sweep(tmp_path, CLAIMS_HOLD, skip=tuple(n for n in CLAIMS_HOLD if n != "base"))
    index = json.loads((out / "sweep.json").read_text())
    index["invocations"][0]["command"] += " --data-dir /elsewhere/squad"
    write_json_atomic(out / "sweep.json", index)
    monkeypatch.chdir(tmp_path)
    text = write_report(out).read_text()
    assert str(tmp_path) not in text and "/elsewhere" not in text
    assert "- Command: `loraqa sweep study.yaml --output-dir sweep --data-dir …/squad`" in text
    assert "- Rerun or resume: `loraqa sweep sweep/sweep.yaml --output-dir sweep`" in text


def test_portable_args_shorten_every_absolute_path(tmp_path, monkeypatch):
    from loraqa.card import portable_arg, portable_command

    monkeypatch.chdir(tmp_path)
    for arg, expected in (("/data/squad", "…/squad"), ("--data-dir=/data/squad", "--data-dir=…/squad"),
                          ("--model=/models/x.gguf", "--model=…/x.gguf"), ("model.name=/models/x", "model.name=…/x"),
                          ("data.dev_file=/d/dev.jsonl", "data.dev_file=…/dev.jsonl"),
                          (f"-o={tmp_path}/runs/a", "-o=runs/a"), ("train.lr=5e-4", "train.lr=5e-4"),
                          ("relative/path", "relative/path")):  # fmt: skip
        assert portable_arg(arg) == expected, arg
    assert portable_command("loraqa train --model /m/x.gguf data.data_dir=/d/squad") == (
        "loraqa train --model …/x.gguf data.data_dir=…/squad")  # fmt: skip


def test_a_better_rate_than_2e_4_fails_claim_b_and_is_named(tmp_path):
    text = write_report(make_sweep(tmp_path, {**CLAIMS_HOLD, "lr5e-4": (64.0, 1010, 0.0)})).read_text()
    line = verdict_line(text, "b")
    assert ": does not hold.**" in line and "The best F1 is at lr=5e-4." in line


def test_trials_scored_during_training_get_an_f1_panel_beside_the_loss(tmp_path, monkeypatch):
    from loraqa.io import read_jsonl
    from loraqa.report import figures

    out = make_sweep(tmp_path, CLAIMS_HOLD)
    for d in out.iterdir():
        if (d / "log_history.jsonl").is_file():
            history = read_jsonl(d / "log_history.jsonl")
            history += [{"eval_exact_match": 10.0 * s, "eval_f1": 12.0 * s, "step": 25 * s} for s in (1, 2, 3)]
            write_jsonl_atomic(d / "log_history.jsonl", history)
    drawn = {}
    real = figures.plot_curves
    monkeypatch.setattr(figures, "plot_curves", lambda path, title, series, keys, **kw: drawn.update(
        {path.name: (title, [k for k, _ in keys])}) or real(path, title, series, keys, **kw))  # fmt: skip
    write_report(out, out_dir=tmp_path / "rep")
    title, keys = drawn["figure5_lr_loss.png"]
    assert keys == ["loss", "eval_loss", "eval_f1"] and "per learning rate, and F1 (" in title


def test_a_machine_without_torch_writes_the_whole_report(tmp_path):
    """A machine that only keeps results may lack torch: the report is written all the same, the trainable-
    parameter table (which counts on the model) saying why it is missing."""
    out = make_sweep(tmp_path, CLAIMS_HOLD)
    code = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
        "from loraqa.report import write_report\n"
        f"print(write_report({str(out)!r}))"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (out / "report.md").read_text()
    params = text.split("## Table 7")[1].split("##")[0]
    assert "Not computed for tiny-random-gpt2: ModuleNotFoundError" in params
    assert ": holds.**" in verdict_line(text, "a")  # the rest as with torch

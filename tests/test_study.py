"""Tests for the multi-sweep study report (loraqa.report.study) and the convergence verdicts (f) and (g), on made-up
sweep folders (no training)."""

from __future__ import annotations

import csv
from pathlib import Path

from loraqa.cli import main
from loraqa.config import from_dict
from loraqa.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from loraqa.report import instability, load_sweep, roughness, verdict_lr_dynamics, verdict_rank_smoothness
from loraqa.report.study import earlier_verdicts, write_study_report
from loraqa.sweep import expand_trials
from test_report import CLAIMS_HOLD, make_sweep, verdict_line

SCALING = {
    "name": "made-up-scaling",
    "model": {"name": "tiny-random-gpt2"},
    "data": {"train_limit": None, "eval_limit": None},
    "sweep": {"mode": "grid", "axes": {"data.train_limit": [100, 400, None]}},
}
# train limit -> F1 (= EM) on 200 dev questions; None is every question (1,600 here)
SCALING_F1 = {100: 20.0, 400: 35.0, None: 50.0}


def make_scaling_sweep(root: Path) -> Path:
    cfg = from_dict(SCALING, where="scaling.yaml")
    out = root / "scaling"
    write_text_atomic(out / "sweep.yaml", cfg.to_yaml())
    for t in expand_trials(cfg):
        d = out / t.name
        limit = t.values["data.train_limit"]
        write_text_atomic(d / "trial.yaml", t.config.to_yaml())
        write_json_atomic(d / "run.json", {"name": t.name, "attempts": [{"status": "done"}],
                                           "machine": {"code": "loraqa 0.1.0, git feed123"}})  # fmt: skip
        write_jsonl_atomic(d / "log_history.jsonl", [{"loss": 2.0, "step": 5}, {"eval_loss": 1.5, "step": 10}])
        right = int(SCALING_F1[limit] * 2)
        write_jsonl_atomic(d / "predictions.jsonl", [{"id": f"q{i}", "exact_match": float(i < right),
                                                      "f1": float(i < right)} for i in range(200)])  # fmt: skip
        write_json_atomic(d / "metrics.json", {
            "exact_match": SCALING_F1[limit], "f1": SCALING_F1[limit], "n_questions": 200,
            "train_examples": limit or 1600, "train_steps": (limit or 1600) // 8, "epochs": 1.0,
            "train_seconds": (limit or 1600) / 4.0, "train_questions_per_second": 4.0, "peak_memory_mb": 900.0,
        })  # fmt: skip
    return out


def test_study_report_joins_sweeps_scaling_quality_and_changes(tmp_path):
    claims = make_sweep(tmp_path, CLAIMS_HOLD)
    scaling = make_scaling_sweep(tmp_path)
    earlier = tmp_path / "earlier.md"
    earlier.write_text("# Sweep report: old\n\n"
                       "- **(a) “higher ranks are better, with diminishing returns after 16”: does not hold.** "
                       "F1 by rank: r4 55.52. More.\n"
                       "- **(b) “2e-4 gives the best metrics”: holds.** Old numbers.\n")  # fmt: skip
    assert earlier_verdicts(earlier)[0] == "old" and earlier_verdicts(earlier)[1]["a"][1] == "does not hold"
    out = tmp_path / "study"
    report = write_study_report([scaling, claims], out, compare=earlier)
    text = report.read_text()
    # every trial of both sweeps, with its train questions, questions/s and commit
    trials = text.split("## Every trial")[1].split("## Data scaling")[0]
    assert "| made-up-scaling | base | done | reference | 1,600 | 200 | 50.00 | 50.00 | 200 |" in trials
    assert "feed123" in trials and "abc1234" in trials and "| 4.0 |" in trials
    # the scaling table, fewest questions first, and its figure
    scaling_part = text.split("## Data scaling")[1].split("## Quality")[0]
    rows = [line for line in scaling_part.splitlines() if line.startswith("| ") and "train questions" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["100", "400", "1,600"]
    # each size against the one before, paired over the same 200 questions: 30 more right answers = +15 points
    assert [r.split("|")[6].strip()[:6] for r in rows] == ["—", "+15.00", "+15.00"]
    assert "beyond noise, n=200" in rows[1]
    assert (out / "figures" / "data_scaling.png").read_bytes()[:4] == b"\x89PNG"
    # quality: the best LoRA on the most dev questions (the claims sweep scored 400), full FT, the anchors
    quality = text.split("## Quality beside figures from elsewhere")[1].split("## Verdicts")[0]
    assert "loraqa best LoRA (`r32`" in quality and "| 67.00 | 67.00 | 400 |" in quality
    assert "loraqa full fine-tuning (`method_full`" in quality and "| 63.00 | 63.00 | 400 |" in quality
    assert "| 68.4 | 78.9 | 10,570 | not run here: the figure loraqa's full-study plan gives, which names no" in quality
    assert "| 81.2 | 88.5 | 10,570 | published, not run here" in quality
    # changes: (a) flipped to holds, (b) flipped to does not hold (5e-4 vs 2e-4 is -8 here), (c) not judged
    row = changes_rows(text)
    assert row["(a)"][1:4] == ["does not hold", "holds", "yes"]
    assert row["(b)"][1:4] == ["holds", "holds", "no"]
    assert row["(c)"][1:4] == ["not judged", "holds", "—"]
    assert "then: F1 by rank: r4 55.52; now: F1 by rank: r4 50.00" in row["(a)"][4]
    # each sweep's own section, one level down, with figures that do not overwrite each other
    assert "## Sweep report: made-up-study" in text and "## Sweep report: made-up-scaling" in text
    assert (out / "figures" / "made-up-study_figure3_rank_eval_loss.png").exists()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["sweep"] for r in rows} == {"made-up-scaling", "made-up-study"} and len(rows) == 3 + 9
    assert {r["data.train_limit"] for r in rows if r["sweep"] == "made-up-scaling"} == {"100", "400", "None"}


def changes_rows(report_text: str) -> dict[str, list[str]]:
    """The study report's table of changed verdicts: "(a)" -> its cells."""
    changes = report_text.split("## Verdicts against the earlier study")[1].split("\n## ")[0]
    return {line.split("|")[1].strip()[:3]: [c.strip() for c in line.split("|")[1:-1]]
            for line in changes.splitlines() if line.startswith("| (")}  # fmt: skip


def test_a_study_compared_with_an_earlier_study_reads_that_studys_claims_sweep(tmp_path):
    # the earlier study's report lists verdicts for every sweep; the scaling sweep's, last here, are all
    # "not measurable here" and must not stand for the earlier claims
    claims, scaling = make_sweep(tmp_path, CLAIMS_HOLD), make_scaling_sweep(tmp_path)
    first = write_study_report([claims, scaling], tmp_path / "first")
    assert earlier_verdicts(first)[0] == "made-up-study"
    again = write_study_report([claims, scaling], tmp_path / "again", compare=first).read_text()
    assert "(first/report.md, sweep made-up-study)" in again.replace(tmp_path.as_posix() + "/", "")
    assert changes_rows(again)["(a)"][1:4] == ["holds", "holds", "no"]


def test_compare_needs_an_earlier_report_and_says_so_before_reading_the_sweeps(tmp_path, capsys):
    """A file that is not a loraqa report.md (text without verdicts, bytes, a folder, nothing) is one line
    naming --compare, not a table of "not judged" rows or a bare decoding error."""
    claims = make_sweep(tmp_path, CLAIMS_HOLD)
    (tmp_path / "notes.md").write_text("some notes\n")
    (tmp_path / "weights.bin").write_bytes(b"\xff\xfe\x00\x01")
    cases = {"notes.md": "no verdict line in it", "weights.bin": "not UTF-8 text", "nothing.md": "No such file",
             ".": "Is a directory"}  # fmt: skip
    for name, reason in cases.items():
        earlier = tmp_path / name
        rc = main(["report", str(claims), "--compare", str(earlier), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(f"loraqa: error: --compare {earlier}: {reason}"), err
        assert "give an earlier report.md written by `loraqa report`" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_report_cli_takes_several_sweeps_and_needs_out(tmp_path, capsys):
    claims, scaling = make_sweep(tmp_path, CLAIMS_HOLD), make_scaling_sweep(tmp_path)
    assert main(["report", str(claims), str(scaling)]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["report", str(claims), str(scaling), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "report.md").exists()


def test_a_study_report_names_damaged_files(tmp_path, capsys):
    claims, scaling = make_sweep(tmp_path, CLAIMS_HOLD), make_scaling_sweep(tmp_path)
    (claims / "r16" / "predictions.jsonl").write_bytes(b"{\n")
    assert main(["report", str(claims), str(scaling), "--out", str(tmp_path / "o")]) == 0
    assert "left out 1 unreadable file(s)" in capsys.readouterr().err
    section = (tmp_path / "o" / "report.md").read_text().split("## Sweep report: made-up-study")[1]
    assert "Unreadable files" in section.split("### One table per swept axis")[0] and "predictions.jsonl" in section


def _set_curves(sweep: Path, curves: dict[str, list[tuple[int, str, float]]]) -> None:
    for name, points in curves.items():
        write_jsonl_atomic(sweep / name / "log_history.jsonl", [{key: v, "step": s} for s, key, v in points])


def _zigzag(amplitude: float, n: int = 40, every: int = 5) -> list[tuple[int, str, float]]:
    return [(every * i, "loss", 3.0 - 0.05 * i + amplitude * (-1) ** i) for i in range(1, n + 1)]


def test_roughness_and_instability():
    straight = {5 * i: 3.0 - 0.1 * i for i in range(1, 12)}
    assert roughness(straight) == 0.0 and instability(straight) == 0.0
    zig = {5 * i: 3.0 + 0.1 * (-1) ** i for i in range(1, 12)}
    assert abs(roughness(zig) - 0.2 / 3.0) < 0.01  # every point 0.2 from its neighbours' midpoint
    assert abs(instability(zig) - 5 * 0.2 / 3.0) < 0.02  # five rises of 0.2
    assert roughness(dict(list(straight.items())[:4])) is None  # too few points to say
    assert roughness(zig, skip_before=10_000) is None


def test_smoother_with_rank_holds_only_when_roughness_falls_steadily(tmp_path):
    sweep = make_sweep(tmp_path, CLAIMS_HOLD)
    _set_curves(sweep, {"r4": _zigzag(0.08), "base": _zigzag(0.04), "r16": _zigzag(0.02), "r32": _zigzag(0.01)})
    v = verdict_rank_smoothness(load_sweep(sweep))
    assert v.verdict == "holds", v.detail
    assert "r4 0.1064, r8 0.0533, r16 0.0266, r32 0.0133" in v.detail  # 2 x amplitude / mean loss (~1.5)
    _set_curves(sweep, {"r16": _zigzag(0.08)})  # r16 rougher than r8: not steady
    assert verdict_rank_smoothness(load_sweep(sweep)).verdict == "does not hold"
    _set_curves(sweep, {n: _zigzag(0.02) for n in ("r4", "base", "r16", "r32")})  # all alike
    assert verdict_rank_smoothness(load_sweep(sweep)).verdict == "does not hold"


def _eval_curve(drop_per_eval: float, bump: float, floor: float = 1.0) -> list[tuple[int, str, float]]:
    """An eval loss falling by ``drop_per_eval`` to ``floor``, with a rise of ``bump`` at every other eval."""
    points, value = [], 2.0
    for i in range(1, 21):
        value = max(floor, value - drop_per_eval)
        points.append((25 * i + 100, "eval_loss", value + (bump if i % 2 else 0.0)))
    return points


def test_higher_rates_faster_and_less_stable(tmp_path):
    sweep = make_sweep(tmp_path, CLAIMS_HOLD)
    _set_curves(sweep, {"lr1e-4": _eval_curve(0.05, 0.0), "base": _eval_curve(0.1, 0.01),
                        "lr5e-4": _eval_curve(0.2, 0.05)})  # fmt: skip
    v = verdict_lr_dynamics(load_sweep(sweep))
    assert v.verdict == "faster: holds; less stable: holds", v.detail
    assert "lr 1e-4: 0.0000" in v.detail
    # the same speed at every rate, and the fast rate steadier: neither half holds
    _set_curves(sweep, {"lr1e-4": _eval_curve(0.1, 0.05), "base": _eval_curve(0.1, 0.01),
                        "lr5e-4": _eval_curve(0.1, 0.0)})  # fmt: skip
    assert verdict_lr_dynamics(load_sweep(sweep)).verdict == "faster: does not hold; less stable: does not hold"


def test_single_sweep_report_has_the_convergence_verdicts(tmp_path):
    sweep = make_sweep(tmp_path, CLAIMS_HOLD)
    assert main(["report", str(sweep)]) == 0
    report = (sweep / "report.md").read_text()
    # the made-up curves are straight lines: no roughness to fall, every rate as fast; and only two evaluations
    # come after the 100 warmup steps, too few to judge stability
    assert "does not hold.** Train-loss roughness by rank: r4 0.0000" in verdict_line(report, "f")
    assert "faster: does not hold; less stable: not measurable here" in verdict_line(report, "g")

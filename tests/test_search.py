"""sweep.mode search: an Optuna study in the sweep folder, trials pruned on their in-training scores, and a driver
killed at any moment continuing the same study (configs/tiny-search.yaml: the tiny random GPT-2, synthetic data)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from loraqa.config import ConfigError, from_dict
from loraqa.io import read_json
from loraqa.layout import search_trial_name

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-search.yaml"


def tiny(tmp_path: Path, **sweep) -> Path:
    """configs/tiny-search.yaml with its sweep section changed."""
    raw = yaml.safe_load(TINY.read_text())
    raw["sweep"].update(sweep)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loraqa.cli", "sweep", str(config), "-o", str(out), *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LORAQA_NO_PROGRESS": "1"}


def study_trials(out: Path, name: str = "tiny-search") -> list:
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'search.db'}")
    return study.get_trials(deepcopy=False)


def check_intact(out: Path, n_trials: int) -> None:
    """Exactly n_trials trials, each ended (done or pruned) once, its folder finished, none failed."""
    trials = study_trials(out)
    assert len(trials) == n_trials
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}, [t.state.name for t in trials]
    folders = sorted(p.name for p in out.glob("trial-*"))
    assert folders == [search_trial_name(t.number) for t in sorted(trials, key=lambda t: t.number)]
    for t in trials:
        tdir = out / search_trial_name(t.number)
        metrics = read_json(tdir / "metrics.json")
        assert bool(metrics.get("pruned")) == (t.state.name == "PRUNED"), tdir.name
        statuses = [a["status"] for a in read_json(tdir / "run.json")["attempts"]]
        assert statuses.count("done") == 1 and "failed" not in statuses, (tdir.name, statuses)
        assert not (tdir / "error.json").exists()
        rows = [json.loads(x) for x in (tdir / "log_history.jsonl").read_text().splitlines()]
        assert any("eval_f1" in r and "eval_exact_match" in r for r in rows), tdir.name


def first_asked(cfg, sweep_dir: Path) -> dict:
    from loraqa.sweep.search import open_study, suggest

    sweep_dir.mkdir(exist_ok=True)
    study = open_study(cfg, sweep_dir)
    trial = study.ask()
    params = suggest(trial, cfg.sweep.space)
    study.tell(trial, 1.0)
    return params


def test_a_seeded_study_repeats_for_a_fresh_start_but_a_resumed_one_asks_anew(tmp_path):
    """sweep.seed: two fresh studies suggest the same; a driver resuming a study must not replay the first
    driver's draws (it would run the study's first trial again)."""
    from loraqa.config import load_config

    cfg = load_config(TINY)
    first = first_asked(cfg, tmp_path / "a")
    assert first_asked(cfg, tmp_path / "b") == first  # reproducible from the seed
    resumed = first_asked(cfg, tmp_path / "a")  # a new driver on the same study
    assert resumed != first
    assert first_asked(cfg, tmp_path / "b") == resumed  # and still reproducible


def scored_search(tmp_path: Path, pruner: str):
    """A search on eval_f1 scored every 50 steps, its study opened as the driver opens it."""
    from loraqa.sweep.search import open_study

    raw = yaml.safe_load(TINY.read_text())
    raw["sweep"].update(pruner=pruner, metric="eval_f1", direction="maximize")
    raw["eval"]["score_steps"] = 50
    raw["train"]["max_steps"] = 250  # the steps the trials below report at
    cfg = from_dict(raw, where="search.yaml")
    return cfg, open_study(cfg, tmp_path)


def run_trial(cfg, study, sweep_dir: Path, f1_at: dict[int, float], monkeypatch) -> int | None:
    """A trial asked by the driver, its process reporting ``f1_at`` (step -> F1) through the environment the
    driver gives it, as ``loraqa train`` does; returns the step it was pruned at, or None (then told done)."""
    import optuna

    from loraqa.sweep.reporter import TrialReporter
    from loraqa.sweep.search import _search_job, as_trial, suggest

    trial = study.ask()
    asked = as_trial(cfg, trial.number, suggest(trial, cfg.sweep.space))
    job = _search_job(asked, sweep_dir, cfg, None, {}, False)
    for key, value in job.env.items():
        monkeypatch.setenv(key, value)
    reporter = TrialReporter.from_env(cfg.eval.score_steps)
    for step, f1 in f1_at.items():
        if reporter.on_score(step, {"eval_f1": f1}):
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
            return step
    study.tell(trial.number, max(f1_at.values()))
    return None


def curve(first: float) -> dict[int, float]:
    return {step: first + step / 50 for step in (50, 100, 150, 200, 250)}


@pytest.mark.parametrize(
    ("pruner", "before", "last", "pruned_at"),
    [
        ("none", [60, 61, 62, 63, 64, 65], 0.0, None),  # never, however poor
        ("median", [60, 70], 50.0, 50),  # below the median of 2 finished trials (Optuna's default waits for 5)
        ("asha", [60], 50.0, 50),  # not the best while fewer than 4 compete at the first rung
    ],
)
def test_each_trial_prunes_by_the_searchs_own_pruner(tmp_path, monkeypatch, pruner, before, last, pruned_at):
    """Optuna keeps no pruner in the study's storage: a trial process that loaded the study without the search's
    own pruner would judge by Optuna's default median rule, whatever sweep.pruner says."""
    cfg, study = scored_search(tmp_path, pruner)
    for first in before:
        assert run_trial(cfg, study, tmp_path, curve(first), monkeypatch) is None
    assert run_trial(cfg, study, tmp_path, {50: last, 100: last}, monkeypatch) == pruned_at


def test_asha_judges_a_trial_at_its_rungs_only(tmp_path, monkeypatch):
    """Scored every 50 steps, successive halving's rungs fall at the scorings 1, 4, 16 (steps 50, 200, 800): a
    trial best at step 50 is not judged again before step 200, however poor it scores in between (Optuna's
    automatic first rung, for a report at every step, would stack rungs at step 50 and judge again at 150)."""
    cfg, study = scored_search(tmp_path, "asha")
    assert run_trial(cfg, study, tmp_path, curve(60), monkeypatch) is None
    assert run_trial(cfg, study, tmp_path, {50: 70.0, 100: 10.0, 150: 10.0, 200: 10.0}, monkeypatch) == 200


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.lrr": [1e-4]}, "sweep.space: unknown key 'train.lrr'"),
        ({"train.lr": {"low": 1e-3, "high": 1e-4}}, "sweep.space.train.lr: low 0.001 is above high 0.0001"),
        ({"train.lr": {"low": 0, "high": 1e-3, "log": True}}, "sweep.space.train.lr: log: true needs low > 0"),
        ({"lora.r": []}, "sweep.space.lora.r: expected a non-empty list"),
        ({"lora.targets": ["attn", "everything"]}, "lora.targets: 'everything' is not a preset"),
        ({}, "sweep.space: a search needs at least one key"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_key(space, message):
    raw = yaml.safe_load(TINY.read_text())
    raw["sweep"]["space"] = space
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        from_dict(raw, where="search.yaml")


def test_a_search_without_in_training_scores_is_refused():
    raw = yaml.safe_load(TINY.read_text())
    raw["eval"]["score_steps"] = 0
    with pytest.raises(ConfigError, match="sweep.mode: search judges trials by their in-training"):
        from_dict(raw, where="search.yaml")


@pytest.mark.slow
def test_the_tiny_search_prunes_keeps_its_study_and_reports(tmp_path):
    out = tmp_path / "search"
    done = subprocess.run(sweep_cmd(TINY, out), env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    check_intact(out, 6)
    assert sum(t.state.name == "PRUNED" for t in study_trials(out)) >= 1
    assert "pruned trial-" in done.stderr
    report = subprocess.run([sys.executable, "-m", "loraqa.cli", "report", str(out)], env=env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr
    text = (out / "report.md").read_text()
    assert "| trial-000 |" in text and "pruned" in text and "(best.yaml)" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| trial-")]
    assert len(rows) == 6 and all(re.fullmatch(r"\d\.\d\de-0\d", row[1]) for row in rows)  # train.lr, one form
    assert (out / "figures" / "search-curves.png").is_file()
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "sweep" not in best and best["model"]["name"] == "tiny-random-gpt2"
    # a rerun of a finished search does nothing more
    again = subprocess.run(sweep_cmd(TINY, out), env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and len(study_trials(out)) == 6


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_driver_killed_mid_search_then_rerun_continues_the_same_study(tmp_path, backend):
    config = tiny(tmp_path, n_trials=3)
    out = tmp_path / "search"
    extra = ("--backend", "ray") if backend == "ray" else ()
    rng = random.Random(7 if backend == "local" else 8)
    kills = 0
    for _ in range(3 if backend == "local" else 1):
        driver = subprocess.Popen(sweep_cmd(config, out, *extra), env=env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=backend == "ray")  # fmt: skip
        # mid-trial: after the first trial has started (its folder holds its config)
        deadline = time.monotonic() + 120
        while not list(out.glob("trial-*/trial.yaml")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(rng.uniform(1.0, 12.0))
        if driver.poll() is None:
            driver.kill()
            kills += 1
        driver.wait()
    assert kills >= 1
    done = subprocess.run(sweep_cmd(config, out, *extra), env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    check_intact(out, 3)


@pytest.mark.parametrize("flag", [["--shard", "1/2"], ["--retry-failed"]])
def test_grid_only_flags_are_refused_for_a_search_in_one_line(tmp_path, capsys, flag):
    from loraqa.cli import main

    assert main(["sweep", str(TINY), "-o", str(tmp_path / "search"), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--shard and --retry-failed are for grid" in err
    assert not (tmp_path / "search").exists()  # refused before anything was written


def _write_run(d: Path, config, right: int, steps: int, n: int = 100) -> None:
    """A finished run's records: question i answered right iff i < ``right``; scored at every 10th step."""
    from loraqa.io import write_json_atomic, write_jsonl_atomic, write_text_atomic

    write_text_atomic(d / "trial.yaml", config.to_yaml())
    write_jsonl_atomic(d / "log_history.jsonl", [{"step": s, "eval_f1": float(right)} for s in range(10, steps + 1, 10)])
    write_jsonl_atomic(d / "predictions.jsonl", [{"id": f"q{i}", "exact_match": float(i < right),
                                                  "f1": float(i < right)} for i in range(n)])  # fmt: skip
    write_json_atomic(d / "metrics.json", {"exact_match": float(right), "f1": float(right), "n_questions": n})


def _write_search(out: Path, search, trials) -> None:
    """A search folder: its sweep.yaml, its study, and each trial's records; ``trials``: (lora.r, right answers,
    steps, Optuna state) in trial order."""
    import optuna

    from loraqa.io import write_text_atomic
    from loraqa.layout import search_storage
    from loraqa.sweep.search import as_trial

    write_text_atomic(out / "sweep.yaml", search.to_yaml())
    study = optuna.create_study(study_name=search.name, storage=search_storage(out), direction="maximize")
    dist = {"lora.r": optuna.distributions.CategoricalDistribution([4, 8, 16])}
    for number, (r, right, steps, state) in enumerate(trials):
        study.add_trial(optuna.trial.create_trial(params={"lora.r": r}, distributions=dist, value=right,
                                                  state=optuna.trial.TrialState[state]))  # fmt: skip
        _write_run(out / search_trial_name(number), as_trial(search, number, {"lora.r": r}).config, right, steps)


def _search_and_baselines(tmp_path: Path):
    """A search on eval_f1 over lora.r (trials 0 and 1 ran their 40 steps; trial 2 was pruned at step 10) and a
    grid of baselines on the same questions; returns (search config, search folder, grid config, grid folder)."""
    from loraqa.io import write_text_atomic
    from loraqa.sweep import expand_trials

    raw = yaml.safe_load(TINY.read_text())
    raw["sweep"].update(metric="eval_f1", direction="maximize", space={"lora.r": [4, 8, 16]})
    search = from_dict(raw, where="tiny-search.yaml")
    out = tmp_path / "search"
    _write_search(out, search, [(4, 70, 40, "COMPLETE"), (8, 60, 40, "COMPLETE"), (16, 20, 10, "PRUNED")])
    grid = from_dict({"name": "baselines", "model": {"name": "tiny-random-gpt2"},
                      "sweep": {"mode": "grid", "axes": {"lora.r": [4, 8]}}}, where="baselines.yaml")  # fmt: skip
    base = tmp_path / "baselines"
    write_text_atomic(base / "sweep.yaml", grid.to_yaml())
    for t, right in zip(expand_trials(grid), (69, 40), strict=True):
        _write_run(base / t.name, t.config, right, 40)
    return search, out, grid, base


def test_the_search_report_sets_its_best_against_baselines_and_counts_the_steps_pruning_saved(tmp_path):
    from loraqa.cli import main

    search, out, _, base = _search_and_baselines(tmp_path)
    # an earlier search: its complete trial is set against the best, its pruned one is not
    earlier = tmp_path / "earlier"
    _write_search(earlier, search, [(16, 10, 10, "PRUNED"), (8, 50, 40, "COMPLETE")])
    assert main(["report", str(out), "--against", str(base), "--against", str(earlier)]) == 0
    text = (out / "report.md").read_text()
    # 2 x 40 + 10 spent against 3 x 40
    assert "Pruning saved 30 optimizer steps (25%): the 3 ended trials spent 90, against 120" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| baselines/")}
    assert len(rows) == 2
    # 70 against 69 right answers of 100: +1 point, within noise; 70 against 40: +30, beyond it
    [near] = [v for k, v in rows.items() if "lora.r 4" in v]
    [far] = [v for k, v in rows.items() if "lora.r 8" in v]
    assert "+1.00 ±" in near and "within noise, n=100" in near
    assert "+30.00 ±" in far and "beyond noise, n=100" in far
    [other] = [line for line in text.splitlines() if line.startswith("| earlier/")]
    assert other.startswith("| earlier/trial-001 | lora.r 8 | 50.00 | 50.00 | +20.00 ±") and "beyond noise" in other
    assert main(["report", str(base), "--against", str(out)]) == 2  # --against is for a search's report


def grid_search(tmp_path: Path, **sweep):
    """The tiny search with a grid over lora.r (4 points), its config as the driver's."""
    raw = yaml.safe_load(TINY.read_text())
    raw["sweep"].update(sampler="grid", space={"lora.r": [4, 8, 16, 32]}, **sweep)
    return from_dict(raw, where="search.yaml")


def finish(sweep_dir: Path, name: str, loss: float) -> None:
    """A trial folder as a finished trial leaves it: its metrics and its logged losses."""
    tdir = sweep_dir / name
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "metrics.json").write_text(json.dumps({"f1": 0.0}))
    (tdir / "log_history.jsonl").write_text(json.dumps({"step": 2, "loss": loss}) + "\n")


def drive(cfg, sweep_dir: Path, restart_after: int | None = None) -> list[dict]:
    """The driver's loop (trials_to_run, the trial finished, settle) until the study holds all it should; with
    ``restart_after``, a new driver opens the study after that many trials. Returns each trial's params."""
    from loraqa.sweep.search import open_study, settle, trials_to_run

    sweep_dir.mkdir()
    study = open_study(cfg, sweep_dir)
    trials = trials_to_run(study, cfg, sweep_dir)
    while (t := next(trials, None)) is not None:
        finish(sweep_dir, t.name, loss=1.0 / (1 + t.index))
        assert settle(study, cfg, sweep_dir, t.index) == "done"
        if restart_after is not None and len(study.get_trials(deepcopy=False)) == restart_after:
            study = open_study(cfg, sweep_dir)
            trials = trials_to_run(study, cfg, sweep_dir)
    return [t.params for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]


def test_a_grid_search_runs_each_point_once_even_resumed(tmp_path):
    """n_trials (24) past the grid's 4 points: 4 trials, each point once, and no error at the grid's end
    (Optuna's GridSampler calls Study.stop there, which raises outside study.optimize); a resumed driver of a
    seeded grid takes the points the first left (the grid's order is the seed's shuffle)."""
    cfg = grid_search(tmp_path, seed=3)
    for name, restart in (("straight", None), ("resumed", 1), ("resumed-late", 3)):
        params = drive(cfg, tmp_path / name, restart_after=restart)
        assert sorted(p["lora.r"] for p in params) == [4, 8, 16, 32], name


def test_a_trial_its_driver_left_half_suggested_resumes_with_every_key(tmp_path):
    """A driver killed between asking a trial and suggesting all its keys: the next driver completes the trial's
    params (Optuna keeps the ones stored) rather than training the rest at the base config's values."""
    from loraqa.config import load_config
    from loraqa.sweep.search import open_study, trials_to_run

    cfg = load_config(TINY)
    study = open_study(cfg, tmp_path)
    trial = study.ask()
    r = trial.suggest_categorical("lora.r", cfg.sweep.space["lora.r"])  # and then the driver died
    batch = next(trials_to_run(open_study(cfg, tmp_path), cfg, tmp_path))
    assert batch.index == trial.number and set(batch.values) == set(cfg.sweep.space)
    assert batch.values["lora.r"] == r and batch.config.lora.r == r
    assert study_trials(tmp_path)[0].params == batch.values  # stored in the study too


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"space": {"train.lr": {"low": 1.0e-4, "high": 5.0e-2, "log": True}, "lora.r": [4, 8, 16, 32],
                    "lora.targets": ["attn", "attn+proj"]}}, "space"),  # fmt: skip
        ({"metric": "eval_f1", "direction": "maximize"}, "metric"),
        ({"sampler": "random"}, "sampler"),
    ],
)
def test_a_search_folder_refuses_a_changed_study_in_one_line(tmp_path, capsys, change, field):
    """A rerun that changes what the folder's study was built on is refused before anything runs (a changed
    choice list failed mid-search in Optuna, leaving a half-asked trial; a changed metric mixed two scales)."""
    from loraqa.cli import main
    from loraqa.config import load_config
    from loraqa.sweep.search import check_study_fields, open_study

    out = tmp_path / "search"
    out.mkdir()
    cfg = load_config(TINY)
    (out / "sweep.yaml").write_text(cfg.to_yaml())
    open_study(cfg, out)
    check_study_fields(out, load_config(tiny(tmp_path, n_trials=12)))  # a study may grow
    assert main(["sweep", str(tiny(tmp_path, **change)), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"sweep.{field}: the search in" in err, err
    assert study_trials(out) == [] and not list(out.glob("trial-*"))


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"metric": "f1"}, "sweep.metric: 'f1' is not reported at the in-training scorings; give one of eval_f1"),
        ({"metric": "eval_loss", "direction": "minimize"}, "sweep.metric: 'eval_loss' is not reported"),
        ({"metric": "loss", "direction": "maximize"}, "sweep.direction: loss is to minimize, not maximize"),
        ({"metric": "eval_f1", "direction": "minimize"}, "sweep.direction: eval_f1 is to maximize, not minimize"),
    ],
)
def test_a_search_metric_its_trials_do_not_report_is_refused(sweep, message):
    """A metric no scoring reports would fail every trial after training it whole (or never prune)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["sweep"].update(sweep)
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(raw, where="search.yaml")


def test_a_search_report_leaves_damaged_files_out_and_names_them(tmp_path, capsys, monkeypatch):
    """A damaged trial log, metrics or a baseline's answers: the report is still written (exit 0), what they held
    is left out, and each file is named in report.md and on stderr, as a grid's report does."""
    from loraqa.cli import main
    from loraqa.sweep import expand_trials

    _, out, grid, base = _search_and_baselines(tmp_path)
    with open(out / "trial-002" / "log_history.jsonl", "a") as f:
        f.write("{not json\n")
    (out / "trial-001" / "metrics.json").write_text("[1, 2")
    with open(base / expand_trials(grid)[1].name / "predictions.jsonl", "a") as f:
        f.write("{broken\n")
    monkeypatch.chdir(tmp_path)  # the files are named as the folders were given
    assert main(["report", "search", "--against", "baselines"]) == 0
    err, text = capsys.readouterr().err, (out / "report.md").read_text()
    for damaged in ("search/trial-002/log_history.jsonl", "search/trial-001/metrics.json",
                    f"baselines/{expand_trials(grid)[1].name}/predictions.jsonl"):  # fmt: skip
        assert damaged in err and damaged in text, damaged
    assert "left out 3 unreadable file(s)" in err and "Best: trial-000" in text


def test_best_so_far_moves_on_finished_trials_only():
    """A pruned trial's value is its score mid-run: the best-so-far curve ends at the best finished trial, the
    one the report names."""
    from loraqa.report.search import _best_so_far

    rows = [{"state": "complete", "value": 60.0, "steps": 40}, {"state": "pruned", "value": 75.0, "steps": 20},
            {"state": "complete", "value": 65.0, "steps": 40}]  # fmt: skip
    assert _best_so_far(rows, maximize=True) == [(40, 60.0), (60, 60.0), (100, 65.0)]


def test_importances_are_named_and_need_two_finished_trials(tmp_path):
    import optuna

    from loraqa.report.search import IMPORTANCE, _importances

    study = optuna.create_study(direction="maximize")
    dist = {"lora.r": optuna.distributions.CategoricalDistribution([4, 8, 16])}
    study.add_trial(optuna.trial.create_trial(params={"lora.r": 4}, distributions=dist, value=1.0))
    assert _importances(study) == {}  # one finished trial measures nothing
    for r, v in ((8, 2.0), (16, 3.0), (4, 1.5)):
        study.add_trial(optuna.trial.create_trial(params={"lora.r": r}, distributions=dist, value=v))
    assert set(_importances(study)) == {"lora.r"} and IMPORTANCE == "PED-ANOVA"


def test_a_search_folder_whose_config_cannot_be_read_is_refused(tmp_path):
    """Its study's settings could not be checked against the new ones: refused, never overwritten."""
    from loraqa.config import load_config
    from loraqa.sweep.search import check_study_fields, open_study

    cfg = load_config(TINY)
    open_study(cfg, tmp_path)
    (tmp_path / "sweep.yaml").write_text("sweep: [broken\n")
    with pytest.raises(ConfigError, match="sweep.yaml: the config the sweep in .* was begun with cannot be read"):
        check_study_fields(tmp_path, cfg)
    assert (tmp_path / "sweep.yaml").read_text() == "sweep: [broken\n"


def test_a_free_worker_starts_the_next_trial_asked_after_the_last_ended(tmp_path, monkeypatch):
    """--parallel 2 with one slow trial: the others run one after another beside it (no batch waits for its
    slowest), and each new trial is asked only once a worker is free, after the study was told how the last
    ended, so no more than 2 trials are ever unfinished in the study."""
    import optuna

    from loraqa.config import load_config
    from loraqa.layout import ERROR_FILE
    from loraqa.sweep import attempt, runner
    from loraqa.sweep.search import run_search

    out = tmp_path / "search"
    storage = f"sqlite:///{out / 'search.db'}"
    spans, lock = {}, threading.Lock()

    def fake_attempt(job, children, view, on_change=lambda: None):
        study = optuna.load_study(study_name="tiny-search", storage=storage)
        unfinished = [t.number for t in study.get_trials(deepcopy=False) if not t.state.is_finished()]
        start = time.monotonic()
        time.sleep(2.0 if job.name == search_trial_name(0) else 0.1)
        Path(job.trial_dir, ERROR_FILE).write_text("{}")  # told FAIL: what it ended as does not matter here
        with lock:
            spans[job.name] = (start, time.monotonic(), unfinished)
        return attempt.Outcome(job.name, "failed", "")

    monkeypatch.setattr(runner, "run_attempt", fake_attempt)
    cfg = load_config(tiny(tmp_path, n_trials=5))
    assert run_search(cfg, out, parallel=2, progress=False) == 0
    assert sorted(spans) == [search_trial_name(n) for n in range(5)]
    slow_end = spans[search_trial_name(0)][1]
    assert all(spans[search_trial_name(n)][1] < slow_end for n in range(1, 5)), spans
    assert all(len(unfinished) <= 2 for _, _, unfinished in spans.values()), spans
    assert {t.state.name for t in study_trials(out)} == {"FAIL"}


def test_a_seed_at_its_bound_still_seeds_a_resumed_studys_sampler(tmp_path):
    from loraqa.config import SEED_MAX, load_config
    from loraqa.sweep.search import make_sampler

    cfg = load_config(tiny(tmp_path, seed=SEED_MAX))
    assert make_sampler(cfg.sweep, asked=3)._rng.rng.randint(0, 10**9) == make_sampler(
        cfg.sweep, asked=3
    )._rng.rng.randint(0, 10**9)  # seeded (with 2, the sum wrapped), not refused past numpy's bound

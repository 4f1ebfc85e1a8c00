"""The command line: a thin layer whose commands print what a user needs and fail with one clear line."""

import re

import pytest

from loraqa.cli import main
from loraqa.data.squad import QUESTION_TYPES


def test_params_prints_the_reference_table_offline(capsys, monkeypatch):
    from loraqa import model as model_mod

    monkeypatch.setattr(model_mod, "_HUB_REACHABLE", False)
    assert main(["params", "--model", "gpt2"]) == 0
    out = capsys.readouterr().out
    for figure in (
        "405,504",
        "811,008",
        "1,622,016",
        "3,244,032",
        "147,456",
        "294,912",
        "589,824",
        "1,179,648",
    ):
        assert figure in out
    assert "124,439,808" in out


def test_data_stats_prints_table_one(capsys, synthetic_dir):
    assert main(["data", "stats", "--data-dir", str(synthetic_dir)]) == 0
    out = capsys.readouterr().out
    rows = {cells[0]: cells[1:] for line in out.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]}  # fmt: skip
    assert rows[""] == ["train", "dev"] and rows["questions"] == ["64", "16"]
    types = [[float(v) for v in rows[f"{t} (%)"]] for t in QUESTION_TYPES]
    assert all(abs(sum(split) - 100) < 0.5 for split in zip(*types, strict=True))  # every question has one type


def test_missing_data_dir_is_one_clear_line(capsys, tmp_path):
    assert main(["data", "stats", "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "LORAQA_DATA_DIR" in err


def test_truncated_json_is_one_clear_line(capsys, tmp_path):
    (tmp_path / "train-v1.1.json").write_text('{"data": [{"title": "x", "paragr')
    (tmp_path / "dev-v1.1.json").write_text('{"data": []}')
    assert main(["data", "stats", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train-v1.1.json" in err and "invalid JSON" in err


def test_unknown_config_key_names_key_and_file(capsys, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("train:\n  learning_rate: 1e-4\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and str(cfg) in err


def test_bad_override_value(capsys):
    assert main(["train", "lora.r=many"]) == 2
    assert "lora.r" in capsys.readouterr().err


def test_train_and_eval_commands(capsys, tmp_path, synthetic_dir):
    args = ["--model", "tiny-random-gpt2", "--data-dir", str(synthetic_dir), "--eval-limit", "4",
            "--precision", "fp32", "--max-new-tokens", "4"]  # fmt: skip
    rc = main(["train", *args, "--train-limit", "8", "--max-steps", "2", "--batch-size", "4", "--eval-steps", "0",
               "--save-steps", "0", "--targets", "c_attn,c_fc", "-o", str(tmp_path / "run")])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "EM " in out and "F1 " in out
    assert "c_fc" in (tmp_path / "run" / "adapter_config.json").read_text()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "--train-limit 8" in card and str(tmp_path) not in card  # the command, with no absolute path
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert main(["eval", *args, "-o", str(tmp_path / "zs")]) == 0
    assert (tmp_path / "zs" / "metrics.json").is_file() and (tmp_path / "zs" / "predictions.json").is_file()


def test_help_lists_the_pipeline_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    commands = set(re.search(r"\{([a-z,]+)\}", out).group(1).split(","))  # argparse's {train,eval,...} line
    assert commands == {"train", "eval", "sweep", "predict", "ask", "export", "serve", "report", "sync", "params",
                        "data", "config"}  # fmt: skip


# Every shorthand flag, a value unlike the default, and the config key it must set (and nothing else).
SHORTHAND_CASES = [
    (["--model", "tiny-random-gpt2"], "model.name", "tiny-random-gpt2"),
    (["--precision", "bf16"], "model.precision", "bf16"),
    (["--data-dir", "somewhere"], "data.data_dir", "somewhere"),
    (["--train-limit", "7"], "data.train_limit", 7),
    (["--eval-limit", "9"], "data.eval_limit", 9),
    (["--max-length", "333"], "prompt.max_length", 333),
    (["--loss-on", "all"], "prompt.loss_on", "all"),
    (["--rank", "13"], "lora.r", 13),
    (["-r", "14"], "lora.r", 14),
    (["--alpha", "3.5"], "lora.alpha", 3.5),
    (["--dropout", "0.25"], "lora.dropout", 0.25),
    (["--targets", "attn+proj"], "lora.targets", "attn+proj"),
    (["--targets", "c_attn, c_fc"], "lora.targets", ["c_attn", "c_fc"]),
    (["--method", "full"], "train.method", "full"),
    (["--epochs", "1.5"], "train.epochs", 1.5),
    (["--max-steps", "77"], "train.max_steps", 77),
    (["--batch-size", "6"], "train.batch_size", 6),
    (["--lr", "0.0031"], "train.lr", 0.0031),
    (["--weight-decay", "0.07"], "train.weight_decay", 0.07),
    (["--warmup-steps", "11"], "train.warmup_steps", 11),
    (["--seed", "1234"], "train.seed", 1234),
    (["--eval-steps", "17"], "train.eval_steps", 17),
    (["--save-steps", "19"], "train.save_steps", 19),
    (["--eval-batch-size", "5"], "eval.batch_size", 5),
    (["--max-new-tokens", "21"], "eval.max_new_tokens", 21),
]


@pytest.mark.parametrize(
    "flags, key, value", SHORTHAND_CASES, ids=[c[0][0] + "=" + c[0][1] for c in SHORTHAND_CASES]
)
def test_each_shorthand_sets_exactly_the_key_it_names(flags, key, value):
    from loraqa.cli import build_config, make_parser
    from loraqa.config import ExperimentConfig

    cfg = build_config(make_parser().parse_args(["train", *flags]))
    default = ExperimentConfig().to_dict()
    got = cfg.to_dict()
    section, name = key.split(".")
    assert got[section][name] == value and default[section][name] != value
    got[section][name] = default[section][name]
    assert got == default, "the flag changed another key too"


@pytest.mark.parametrize("command", ["train", "eval", "sweep"])
def test_the_shorthand_flags_come_from_the_config_fields_with_their_help(command):
    """Every field that declares a Flag is a flag of train, eval and sweep, with the field's description and key
    as its help; SHORTHAND_CASES tries each of them."""
    import argparse

    from loraqa.cli import make_parser
    from loraqa.config import FIELDS, shorthands

    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices[command]._actions}
    declared = {key: flags for key, flags, _ in shorthands()}
    assert set(declared) == {key for _, key, _ in SHORTHAND_CASES}
    assert {flag for flags, _, _ in SHORTHAND_CASES for flag in flags[:1]} == {
        f for fl in declared.values() for f in fl
    }
    for key, flags in declared.items():
        action = actions[key]
        assert tuple(action.option_strings) == flags
        assert FIELDS[key].description in action.help and f"({key})" in action.help


def test_help_shows_each_shorthand_with_its_field_description(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--lr LR peak learning rate (AdamW) (train.lr)" in out
    assert "--precision {auto,bf16,fp32}" in out and "--rank RANK, -r RANK the adapter's rank (lora.r)" in out


def test_config_items_after_an_option_are_not_lost(monkeypatch):
    # argparse alone took KEY=VALUE items only before the first option and refused the rest
    from loraqa import cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.setdefault("cfg", cli.build_config(args)) and 0)
    assert main(["train", "--model", "tiny-random-gpt2", "train.lr=0.5", "--rank", "4", "lora.alpha=3"]) == 0
    cfg = seen["cfg"]
    assert (cfg.model.name, cfg.train.lr, cfg.lora.r, cfg.lora.alpha) == ("tiny-random-gpt2", 0.5, 4, 3)
    seen.clear()
    assert main(["train", "--model", "tiny-random-gpt2", "--", "train.lr=0.25"]) == 0  # items after `--`
    assert seen["cfg"].train.lr == 0.25


def test_eval_of_a_run_takes_what_re_scoring_may_change_and_refuses_the_rest(monkeypatch, tmp_path, capsys):
    import loraqa.answering

    calls = []
    monkeypatch.setattr(loraqa.answering, "eval_run_dir", lambda run, **kw: calls.append((run, kw)) or
                        {"exact_match": 1.0, "f1": 2.0, "n_questions": 3})  # fmt: skip
    monkeypatch.setattr(loraqa.answering, "eval_zero_shot", lambda cfg, out, **kw: calls.append((cfg, out)) or
                        {"exact_match": 1.0, "f1": 2.0, "n_questions": 3})  # fmt: skip
    out = str(tmp_path / "rescored")
    assert main(["eval", "runs/r16", "--max-new-tokens", "8", "eval.batch_size=2", "--precision", "fp32",
                 "--eval-limit", "5", "-o", out]) == 0  # fmt: skip
    run, kw = calls.pop()
    assert run == "runs/r16" and kw["out_dir"] == out
    assert sorted(kw["overrides"]) == [("data.eval_limit", 5), ("eval.batch_size", 2), ("eval.max_new_tokens", 8),
                                       ("model.precision", "fp32")]  # fmt: skip
    for refused, key in ((["--model", "gpt2"], "model.name"), (["train.lr=1e-3"], "train.lr"),
                         (["--rank", "4"], "lora.r")):  # fmt: skip
        assert main(["eval", "runs/r16", *refused]) == 2
        assert f"{key}: a trained run's {key} cannot change" in capsys.readouterr().err
    assert calls == []
    # RUN_DIR is the first positional that is a folder, wherever it stands and whatever its name holds
    odd = tmp_path / "runs" / "lr=5e-4"
    odd.mkdir(parents=True)
    assert main(["eval", "--device", "cpu", "data.eval_limit=3", str(odd)]) == 0
    run, kw = calls.pop()
    assert run == str(odd) and kw["overrides"] == [("data.eval_limit", 3)]
    # zero-shot: a first KEY=VALUE item is not taken for a run folder
    assert main(["eval", "eval.max_new_tokens=8", "--model", "tiny-random-gpt2"]) == 0
    cfg, _ = calls.pop()
    assert cfg.eval.max_new_tokens == 8 and cfg.model.name == "tiny-random-gpt2"


def test_eval_finds_its_run_folder_among_the_positionals(tmp_path, monkeypatch):
    from loraqa.cli import split_run_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=5e-4").mkdir()  # a run folder whose name looks like an override
    (tmp_path / "extra.yaml").write_text("eval:\n  batch_size: 2\n")
    assert split_run_dir("eval.batch_size=2", ["lr=5e-4"]) == ("lr=5e-4", ["eval.batch_size=2"])
    assert split_run_dir("lr=5e-4", ["data.eval_limit=3"]) == ("lr=5e-4", ["data.eval_limit=3"])
    assert split_run_dir("extra.yaml", ["data.eval_limit=3"]) == (None, ["extra.yaml", "data.eval_limit=3"])
    assert split_run_dir("runs/missing", ["data.eval_limit=3"]) == ("runs/missing", ["data.eval_limit=3"])
    assert split_run_dir("data.eval_limit=3", []) == (None, ["data.eval_limit=3"])
    assert split_run_dir(None, []) == (None, [])


def test_an_optional_limit_flag_takes_null_as_a_config_file_does():
    from loraqa.cli import _shorthand_overrides, make_parser

    args = make_parser().parse_args(["train", "--train-limit", "null", "--eval-limit", "5"])
    assert dict(_shorthand_overrides(args)) == {"data.train_limit": None, "data.eval_limit": 5}
    with pytest.raises(SystemExit):
        make_parser().parse_args(["train", "--rank", "null"])  # lora.r is never null

"""Tests for loraqa.config: YAML loading, validation messages, type coercion, overrides, sweep sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraqa.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    get_value,
    load_config,
    parse_overrides,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_empty_file_is_the_reference_experiment(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg == ExperimentConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (8, 16, 0.1, "attn")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.weight_decay) == (
        2e-4,
        8,
        3,
        0.01,
    )
    assert cfg.sweep is None


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "lora.rank" in str(e.value) and str(path) in str(e.value)
    assert "known:" in str(e.value) and " r" in str(e.value)  # lists what is allowed


def test_unknown_section_names_it(tmp_path):
    path = write(tmp_path, "optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown section 'optimizer'") as e:
        load_config(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("lora:\n  r: eight\n", "lora.r"),
        ("lora:\n  r: 0\n", "lora.r"),
        ("train:\n  lr: -1e-4\n", "train.lr"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("prompt:\n  loss_on: everything\n", "prompt.loss_on"),
        ("train:\n  method: qlora\n", "train.method"),
        ("lora:\n  dropout: 1.5\n", "lora.dropout"),
        ("train:\n  group_by_length: maybe\n", "train.group_by_length"),
        ("lora:\n  r: true\n", "lora.r"),
        ("model: gpt2\n", "model"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert key in str(e.value) and str(path) in str(e.value)


def test_not_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "lora: [unclosed\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_scientific_notation_strings_become_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 2e-4 (no dot) as the string "2e-4"
    import yaml

    assert yaml.safe_load("lr: 2e-4")["lr"] == "2e-4"
    cfg = load_config(
        write(tmp_path, "train:\n  lr: 2e-4\n  epochs: '1'\n  warmup_steps: '10'\nlora:\n  alpha: 32\n")
    )
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 1.0 and isinstance(cfg.train.epochs, float)
    assert cfg.train.warmup_steps == 10 and isinstance(cfg.train.warmup_steps, int)
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)


def test_optional_and_union_fields(tmp_path):
    cfg = load_config(
        write(tmp_path, "data:\n  train_limit: null\n  eval_limit: '50'\nlora:\n  targets: [c_attn]\n")
    )
    assert cfg.data.train_limit is None and cfg.data.eval_limit == 50
    assert cfg.lora.targets == ["c_attn"]
    with pytest.raises(ConfigError, match=r"lora.targets"):
        from_dict({"lora": {"targets": [1, 2]}}, where="x.yaml")


def test_parse_overrides_reads_values_as_yaml():
    got = parse_overrides(["train.lr=5e-4", "lora.r=16", "lora.targets=[c_attn, c_proj]", "data.train_limit=",
                           "train.fast_loss=false", "model.name=tiny-random-gpt2"])  # fmt: skip
    assert got == [("train.lr", "5e-4"), ("lora.r", 16), ("lora.targets", ["c_attn", "c_proj"]),
                   ("data.train_limit", None), ("train.fast_loss", False), ("model.name", "tiny-random-gpt2")]  # fmt: skip


@pytest.mark.parametrize("item", ["lr=5e-4", "train.lr", "noequals"])
def test_parse_overrides_rejects_malformed(item):
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides([item])


def test_overrides_apply_on_top_of_the_file_and_are_validated(tmp_path):
    path = write(tmp_path, "lora:\n  r: 4\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(path, ["lora.r=32", "train.lr=5e-4"])
    assert cfg.lora.r == 32 and cfg.train.lr == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(path, ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(path, ["lora.r=-3"])
    with pytest.raises(ConfigError, match="'sweep.mode': the sweep section is set in the experiment file only"):
        apply_overrides(cfg, [("sweep.mode", "grid")])
    with pytest.raises(ConfigError, match="unknown key 'optim.lr'"):
        apply_overrides(cfg, [("optim.lr", 1)])


def test_apply_overrides_returns_a_copy():
    base = ExperimentConfig()
    new = apply_overrides(base, [("lora.r", 16)])
    assert base.lora.r == 8 and new.lora.r == 16 and get_value(new, "lora.r") == 16


def test_sweep_section_is_validated(tmp_path):
    ok = load_config(write(tmp_path, "sweep:\n  mode: one-at-a-time\n  axes:\n    train.lr: [1e-4, 5e-4]\n"))
    assert ok.sweep.mode == "one-at-a-time" and ok.sweep.axes == {"train.lr": ["1e-4", "5e-4"]}
    cases = [
        ("sweep:\n  mode: random\n", "sweep.mode"),
        ("sweep:\n  axes:\n    lora.rank: [4]\n", "lora.rank"),
        ("sweep:\n  axes:\n    lora.r: [4, -1]\n", "lora.r"),
        ("sweep:\n  axes:\n    lora.r: []\n", "sweep.axes.lora.r"),
        ("sweep:\n  axes:\n    lora.r: 4\n", "sweep.axes.lora.r"),
        ("sweep:\n  axes:\n    train.method: [lora, partial]\n", "train.method"),
        ("sweep:\n  budget: 3\n", "sweep.budget"),
    ]
    for i, (text, key) in enumerate(cases):
        path = write(tmp_path, text, f"bad{i}.yaml")
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert key in str(e.value) and str(path) in str(e.value), (text, str(e.value))


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora:\n  r: 1.5\n", "lora.r: expected an integer, got 1.5"),
        ("lora:\n  r: true\n", "lora.r: expected an integer, got True"),
        ("lora:\n  r: eight\n", "lora.r: expected an integer, got 'eight'"),
        ("train:\n  lr: fast\n", "train.lr: expected a number, got 'fast'"),
        ("train:\n  lr: false\n", "train.lr: expected a number, got False"),
    ],
)
def test_a_number_field_names_the_field_and_the_type_it_wants(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert load_config(write(tmp_path, "lora:\n  r: '16'\ntrain:\n  lr: '5e-4'\n", "ok.yaml")).lora.r == 16


def test_resources_per_trial_default_merge_and_validation(tmp_path):
    assert load_config(write(tmp_path, "sweep:\n  mode: grid\n")).sweep.resources_per_trial == {
        "cpus": 1,
        "gpus": 0,
    }
    gpu = load_config(write(tmp_path, "sweep:\n  resources_per_trial: {gpus: 1, cpus: '4'}\n", "gpu.yaml"))
    assert gpu.sweep.resources_per_trial == {"cpus": 4.0, "gpus": 1.0}
    half = load_config(write(tmp_path, "sweep:\n  resources_per_trial: {gpus: 0.5}\n", "half.yaml"))
    assert half.sweep.resources_per_trial == {"cpus": 1.0, "gpus": 0.5}  # the missing key keeps its default
    cases = [
        ("{tpus: 1}", "unknown resource 'tpus'"),
        ("{cpus: -1}", "sweep.resources_per_trial.cpus: must be >= 0"),
        ("{cpus: 0}", "must hold some CPUs or GPUs"),
        ("{gpus: many}", "sweep.resources_per_trial.gpus: expected a number"),
        ("[1, 0]", "sweep.resources_per_trial: expected a mapping"),
    ]
    for i, (value, message) in enumerate(cases):
        path = write(tmp_path, f"sweep:\n  resources_per_trial: {value}\n", f"bad{i}.yaml")
        with pytest.raises(ConfigError, match=message) as e:
            load_config(path)
        assert str(path) in str(e.value)


def test_round_trip_through_yaml_is_exact(tmp_path):
    cfg = load_config(CONFIGS / "cpu-study.yaml")
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg and again.to_yaml() == cfg.to_yaml()


@pytest.mark.parametrize("name", ["tiny-sweep.yaml", "cpu-study.yaml", "seed-study.yaml"])
def test_shipped_sweep_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.sweep is not None and cfg.sweep.axes


def test_study_configs_match_the_brief():
    seed = load_config(CONFIGS / "seed-study.yaml")
    assert seed.model.name == "gpt2"
    assert (seed.data.train_limit, seed.data.eval_limit, seed.data.data_dir) == (None, None, None)
    t, lo = seed.train, seed.lora
    assert (t.epochs, t.batch_size, t.lr, t.weight_decay, t.warmup_steps) == (3, 8, 2e-4, 0.01, 100)
    assert (lo.r, lo.alpha, lo.dropout) == (8, 16, 0.1)
    assert seed.sweep.mode == "one-at-a-time"
    assert list(seed.sweep.axes) == ["lora.r", "lora.targets", "train.lr"]

    cpu = load_config(CONFIGS / "cpu-study.yaml")
    assert cpu.model.name == "smollm2-135m" and cpu.data.data_dir is None
    assert list(cpu.sweep.axes) == ["lora.r", "lora.targets", "train.lr", "prompt.loss_on", "train.method"]

    tiny = load_config(CONFIGS / "tiny-sweep.yaml")
    assert tiny.model.name == "tiny-random-gpt2" and tiny.data.data_dir == "synthetic"
    assert (
        0 < tiny.train.save_steps < tiny.train.max_steps and 0 < tiny.train.eval_steps < tiny.train.max_steps
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {precision: fp8}\n", "model.precision: 'fp8' is not one of auto, bf16, fp32"),
        ("data: {format: parquet}\n", "data.format: 'parquet' is not one of squad, squad_v2, jsonl, csv, hf"),
        ("lora: {r: 0}\n", "lora.r: must be > 0, got 0"),
        ("lora: {dropout: 1.5}\n", "lora.dropout: must be < 1, got 1.5"),
        ("data: {train_limit: -5}\n", "data.train_limit: must be >= 1, got -5"),
        ("data: {eval_limit: 0}\n", "data.eval_limit: must be >= 1, got 0"),  # a score of no questions
        ("train: {lr: .inf}\n", "train.lr: expected a finite number, got inf"),
        ("train: {lr: .nan}\n", "train.lr: expected a finite number, got nan"),
        ("lora: {r: 4}\nlora: {r: 8}\n", "not valid YAML: line 2: the key 'lora' is given twice; keep one"),
        ("lora: {r: 4, r: 8}\n", "not valid YAML: line 1: the key 'r' is given twice; keep one"),
        (
            "lora: {targets: []}\n",
            "lora.targets: no module named; give a preset (attn, attn+proj, all-linear) or module names",
        ),
        (
            "name: ../escape\n",
            "name: '../escape' is not a plain folder name (the run's default folder is runs/<name>): give a "
            "non-empty name without '/' or '\\' (--output-dir puts the run folder anywhere)",
        ),
        (
            "name: ''\n",
            "name: '' is not a plain folder name (the run's default folder is runs/<name>): give a non-empty name "
            "without '/' or '\\' (--output-dir puts the run folder anywhere)",
        ),
        ("train: {fast_loss: maybe}\n", "train.fast_loss: expected true or false, got 'maybe'"),
        ("model: {name: 3}\n", "model.name: expected a string, got 3"),
        ("lora: 8\n", "section 'lora' must be a mapping, got 8"),
        ("train: {report_to: 3}\n", "train.report_to: expected a name or a list of names (none empty), got 3"),
        (
            "lora: {targets: [c_attn, 1]}\n",
            "lora.targets: expected a name or a list of names (none empty), got ['c_attn', 1]",
        ),
        ("train: {report_to: ['']}\n", "train.report_to: expected a name or a list of names (none empty), got ['']"),
        ("model: {name: ' '}\n", "model.name: expected a non-empty name, got ' '"),
        ("train: {seed: -1}\n", "train.seed: must be >= 0, got -1"),
        ("sweep: {seed: 4294967296, axes: {lora.r: [4]}}\n", "sweep.seed: must be <= 4.29497e+09, got 4294967296"),
        ("train: {lr: 1" + "0" * 400 + "}\n", "train.lr: expected a number, got 1" + "0" * 400),
        (
            "data: {format: squad_v2, unanswerable_answer: 'The'}\n",
            "data.unanswerable_answer: 'The' is empty once normalized as SQuAD scores answers; give a word, e.g. "
            "unanswerable",
        ),
        (
            "lora: {targets: c_attn}\n",
            "lora.targets: 'c_attn' is not a preset (attn, attn+proj, all-linear); give module names as a "
            "list, e.g. lora.targets=[c_attn]",
        ),
    ],
)
def test_a_message_states_the_key_the_value_and_what_is_allowed(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: {message}"


def test_a_merged_key_may_be_overridden_though_no_key_is_given_twice(tmp_path):
    """YAML's merge key (<<) brings keys in that the mapping's own then override: that is no key given twice."""
    cfg = load_config(write(tmp_path, "lora:\n  <<: {r: 4, alpha: 8}\n  r: 16\n"))
    assert (cfg.lora.r, cfg.lora.alpha) == (16, 8)


def test_every_bad_value_of_a_file_is_named_on_one_line(tmp_path):
    path = write(tmp_path, "lora:\n  r: 0\ntrain:\n  lr: fast\n  speed: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    for part in (
        "lora.r: must be > 0",
        "train.lr: expected a number, got 'fast'",
        "unknown key 'train.speed'",
    ):
        assert part in text


def test_no_bad_value_escapes_as_anything_but_a_config_error():
    """Whatever a field is given, loading either takes it or says which key is wrong, on one line."""
    from loraqa.config import FIELDS

    for key in FIELDS:
        section, name = key.split(".")
        for value in (None, [], {}, "x", -1, 1.5, True, [1], {"a": 1}, "1e400"):
            try:
                from_dict({section: {name: value}}, where="x.yaml")
            except ConfigError as e:
                assert key in str(e) and "\n" not in str(e), (key, value, str(e))


def test_an_empty_section_is_the_section_defaults(tmp_path):
    from loraqa.config import ModelConfig, SweepConfig

    cfg = load_config(write(tmp_path, "model:\nsweep:\n"))
    assert cfg.model == ModelConfig() and cfg.sweep == SweepConfig()


def test_values_are_validated_on_construction_too():
    from loraqa.config import EvalConfig, LoraConfig

    assert EvalConfig(batch_size="4").batch_size == 4
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets="c_attn")

"""Experiment configuration: typed dataclasses, loaded from YAML, overridden with dotted keys.

An experiment file has the sections ``model``, ``data``, ``prompt``, ``lora``, ``train``, ``eval`` and, for a
study, ``sweep``; every field has the reference study's default, so an empty file is a valid experiment.
Any field can be overridden from the command line as ``section.field=value`` (``train.lr=5e-4``).
Unknown keys and bad values raise :class:`ConfigError`, which names the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad experiment file or override; the message names the file and the key."""


@dataclass
class ModelConfig:
    name: str = (
        "gpt2"  # hub id, local folder, .gguf file, or a built-in name (smollm2-135m, tiny-random-gpt2, ...)
    )
    precision: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | bf16 | fp32
    attn_implementation: str = "sdpa"  # sdpa | eager (| flash_attention_2 on GPUs that have it)


@dataclass
class DataConfig:
    data_dir: str | None = (
        None  # folder with train-v1.1.json / dev-v1.1.json; else $LORAQA_DATA_DIR, else download
    )
    train_limit: int | None = None  # first N train questions (None: all 87,599)
    eval_limit: int | None = None  # first K dev questions scored by EM/F1 (None: all 10,570)
    # dev questions passed over before those K: a final evaluation held out from what data.score_limit scores
    # during training (e.g. eval_skip 2000, eval_limit 2000: questions 2,001-4,000)
    eval_skip: int = 0
    loss_eval_limit: int = 200  # dev questions whose answer-token loss is logged as eval_loss during training
    format: str = "squad"  # squad (v1.1) | squad_v2 | jsonl | csv | hf (a datasets folder or hub id); see loraqa.data
    train_file: str | None = None  # the train split's file (or datasets folder); else the format's file in data_dir
    dev_file: str | None = None  # the dev split's file (or datasets folder); else the format's file in data_dir
    unanswerable_answer: str = "unanswerable"  # squad_v2: the answer taught and expected for unanswerable questions
    score_limit: int = 200  # the first N dev questions whose generated answers are scored during training

    def no_answer_text(self) -> str | None:
        """What the model answers an unanswerable question with, for formats that have them (else None)."""
        return self.unanswerable_answer if self.format == "squad_v2" else None


@dataclass
class PromptConfig:
    max_length: int = 512  # tokens, EOS included
    loss_on: str = "answer"  # answer (labels on answer + EOS only) | all (every real token; the ablation)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    targets: str | list[str] = "attn"  # attn | attn+proj | all-linear | explicit list of module names


@dataclass
class TrainConfig:
    method: str = "lora"  # lora | full (full fine-tuning, the ablation)
    epochs: float = 3
    max_steps: int = -1  # > 0 overrides epochs
    # questions per forward-backward pass summed over all processes (torchrun/accelerate: each of N processes
    # takes batch_size / N; it must divide); with grad_accum 1, the questions per optimizer step under any N
    batch_size: int = 8
    grad_accum: int = 1  # passes per optimizer step: batch_size x grad_accum questions per step
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    seed: int = 42
    eval_steps: int = 50  # eval loss every N optimizer steps (0: never during training)
    logging_steps: int = 10
    save_steps: int = 50  # checkpoint every N steps so an interrupted run resumes (0: no checkpoints)
    fast_loss: bool = True  # logits and cross-entropy only at labelled positions (False: full-vocab loss)
    group_by_length: bool = True  # batches of similar lengths, so little compute goes to padding
    report_to: str | list[str] = "tensorboard"  # tensorboard (event files in RUN/tensorboard) | wandb | mlflow | none | a list
    share_contexts: bool = True  # a paragraph's context computed once per batch for all its questions
    # (loraqa.packing; same loss per question; prompt.loss_on=all falls back to stand-alone examples)
    compile: bool = False  # torch.compile the model
    # recompute each decoder layer's activations in the backward pass instead of keeping them: less memory,
    # one more forward's worth of compute per step (docs/performance.md has the measured cost)
    gradient_checkpointing: bool = False
    keep_best: bool = False  # keep the adapter of the best in-training F1 (eval.score_steps) and evaluate that one
    early_stopping_patience: int = 0  # stop after this many scorings without a better F1 (0: never)


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_new_tokens: int = 32
    sort_by_length: bool = True
    share_prefixes: bool = True  # run a paragraph's shared context once and reuse its KV cache per question
    prune_finished: bool = True  # drop answered sequences from the decoding batch
    merge_adapter: bool = True  # merge LoRA into the weights before generating
    # each answer computed from its own question alone (paragraph once, then the question and its decoding
    # unbatched), so it is the same asked alone, in a file or in an evaluation; false: batched decoding,
    # faster, but in bf16 an answer can change with the questions batched beside it
    batch_invariant: bool = True
    # extractive decoding: each greedy step may only pick a token that continues the answer as a token span of
    # the paragraph (or, after one token, a stop token), so every answer is a piece of the context
    extractive: bool = False
    # every N optimizer steps: generate answers to data.score_limit dev questions and log eval_exact_match and
    # eval_f1 (0: only the final evaluation)
    score_steps: int = 0


SWEEP_MODES = ("grid", "one-at-a-time", "search")
SEARCH_SAMPLERS = ("tpe", "random", "grid")  # sweep.sampler (Optuna's TPESampler, RandomSampler, GridSampler)
SEARCH_PRUNERS = ("asha", "median", "none")  # sweep.pruner (successive halving, the median rule, never)


TRIAL_RESOURCES = {"cpus": 1.0, "gpus": 0.0}  # what one trial holds on Ray (--backend ray), by default


@dataclass
class SweepConfig:
    mode: str = "grid"
    axes: dict[str, list] = field(default_factory=dict)  # dotted key -> values
    # CPUs and GPUs a trial holds under --backend ray (fractions allowed, as Ray allows); missing keys default
    # to TRIAL_RESOURCES. The local runner shares the machine by --parallel instead.
    resources_per_trial: dict[str, float] = field(default_factory=lambda: dict(TRIAL_RESOURCES))
    # mode: search (an Optuna study in the sweep folder; see loraqa.sweep.search)
    metric: str = "eval_f1"  # what the search optimises: a score the trials log (eval.score_steps), or "loss"
    direction: str = "maximize"  # maximize (scores) | minimize (a loss)
    n_trials: int = 24  # trials in the study, finished, pruned and failed ones included
    sampler: str = "tpe"
    pruner: str = "asha"
    # dotted key -> a list of choices, or {low, high, log} for a number range (an int range if both are ints)
    space: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # the sampler's seed: a fresh study suggests the same parameters again


@dataclass
class ExperimentConfig:
    name: str = "loraqa"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["sweep"] is None:
            del d["sweep"]
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "prompt": PromptConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "sweep": SweepConfig,
}

CHOICES = {
    "model.precision": ("auto", "bf16", "fp32"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "prompt.loss_on": ("answer", "all"),
    "data.format": ("squad", "squad_v2", "jsonl", "csv", "hf"),  # loraqa.data.FORMATS
    "train.method": ("lora", "full"),
    "sweep.mode": SWEEP_MODES,
    "sweep.sampler": SEARCH_SAMPLERS,
    "sweep.pruner": SEARCH_PRUNERS,
    "sweep.direction": ("maximize", "minimize"),
}
PRESET_NAMES = ("attn", "attn+proj", "all-linear")  # lora.targets presets (loraqa.model maps them per family)
# lora.alpha 0 scales the adapter to nothing (no gradient, nothing learned); logging_steps 0 the Trainer refuses
POSITIVE = {"prompt.max_length", "lora.r", "lora.alpha", "train.batch_size", "train.grad_accum",
            "eval.batch_size", "eval.max_new_tokens", "train.epochs", "train.logging_steps",
            "sweep.n_trials"}  # fmt: skip
# None where allowed (the limits: every question) is not checked
NON_NEGATIVE = {"lora.dropout", "train.lr", "train.weight_decay", "train.warmup_steps", "train.eval_steps",
                "train.save_steps", "data.loss_eval_limit", "data.train_limit", "data.eval_limit",
                "data.score_limit", "eval.score_steps", "train.early_stopping_patience", "data.eval_skip"}  # fmt: skip


# A number field: how an error names it, and the YAML/CLI types it may be given as (bools are ints to Python
# but never a number here).
_NUMBERS = {int: ("an integer", (int, str)), float: ("a number", (int, float, str))}


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; numbers written as strings (``5e-4``, which YAML 1.1
    reads as a string) become numbers."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{where}: {key}: {value!r} fits none of {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        _, item_tp = typing.get_args(tp) or (str, Any)
        item_tp = {list: list[Any], dict: dict[str, Any]}.get(item_tp, item_tp)
        return {str(k): _coerce(v, item_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: {key}: expected true or false, got {value!r}")
    if tp in _NUMBERS:
        what, accepted = _NUMBERS[tp]
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{where}: {key}: expected {what}, got {value!r}")
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}: expected {what}, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {tp}")


def _build_section(cls, raw: Any, section: str, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: section '{section}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{section}.{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{dotted}' (known: {', '.join(sorted(names))})")
        value = _coerce(value, hints[key], dotted, where)
        if dotted in CHOICES and value not in CHOICES[dotted]:
            raise ConfigError(f"{where}: {dotted}: {value!r} is not one of {', '.join(CHOICES[dotted])}")
        if dotted in POSITIVE and value is not None and value <= 0:
            raise ConfigError(f"{where}: {dotted}: must be > 0, got {value!r}")
        if dotted in NON_NEGATIVE and value is not None and value < 0:
            raise ConfigError(f"{where}: {dotted}: must be >= 0, got {value!r}")
        if dotted == "lora.targets" and isinstance(value, str) and value not in PRESET_NAMES:
            raise ConfigError(f"{where}: lora.targets: {value!r} is not a preset ({', '.join(PRESET_NAMES)}); "
                              f"give module names as a list, e.g. lora.targets=[{value}]")  # fmt: skip
        kwargs[key] = value
    return cls(**kwargs)


def from_dict(raw: dict, where: str = "<config>") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig`; ``where`` names the source in errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: an experiment must be a mapping of sections, got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "name":
            kwargs["name"] = _coerce(value, str, "name", where)
        elif key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], value, key, where)
        else:
            raise ConfigError(f"{where}: unknown section '{key}' (known: name, {', '.join(SECTIONS)})")
    cfg = ExperimentConfig(**kwargs)
    if cfg.sweep is not None:
        cfg.sweep.resources_per_trial = _trial_resources(cfg.sweep.resources_per_trial, where)
        for axis, values in cfg.sweep.axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: sweep.axes.{axis}: expected a non-empty list of values")
            for v in values:  # every value must be valid where it lands
                apply_overrides(cfg, [(axis, v)], where=f"{where}: sweep.axes")
        if cfg.sweep.mode == "search":
            _check_search(cfg, where)
    _check_consistency(cfg, where)
    return cfg


def search_range(value: Any) -> tuple[float, float, bool] | None:
    """A search space entry's (low, high, log) when it is a range, None when it is a list of choices."""
    if isinstance(value, dict):
        return value.get("low"), value.get("high"), bool(value.get("log", False))
    return None


def _check_search(cfg: ExperimentConfig, where: str) -> None:
    """One line naming the key for a space no sampler can use: an unknown key, an empty choice list, low > high,
    a log range with a bound <= 0, a value the key does not take; what the trials must log to be judged."""
    sweep = cfg.sweep
    if not sweep.space:
        raise ConfigError(f"{where}: sweep.space: a search needs at least one key to search, e.g. "
                          "train.lr: {low: 1.0e-5, high: 2.0e-3, log: true}")  # fmt: skip
    if not (cfg.eval.score_steps and cfg.data.score_limit):
        raise ConfigError(f"{where}: sweep.mode: search judges trials by their in-training {sweep.metric}; "
                          "set eval.score_steps=N")  # fmt: skip
    for key, value in sweep.space.items():
        at = f"{where}: sweep.space.{key}"
        rng = search_range(value)
        if rng is None:
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{at}: expected a non-empty list of choices or {{low, high, log}}")
            samples = value
        else:
            low, high, log = rng
            extra = sorted(set(value) - {"low", "high", "log"})
            if extra or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (low, high)):
                raise ConfigError(f"{at}: a range is {{low: NUMBER, high: NUMBER, log: true|false}}, got {value!r}")
            if low > high:
                raise ConfigError(f"{at}: low {low} is above high {high}")
            if log and low <= 0:
                raise ConfigError(f"{at}: log: true needs low > 0, got low {low}")
            if sweep.sampler == "grid":
                raise ConfigError(f"{at}: sweep.sampler grid takes lists of choices, not ranges")
            samples = [low, high]
        for v in samples:  # every value must be valid where it lands (an unknown key fails here too)
            apply_overrides(cfg, [(key, v)], where=f"{where}: sweep.space")


def _trial_resources(given: dict[str, float], where: str) -> dict[str, float]:
    key = "sweep.resources_per_trial"
    unknown = sorted(set(given) - set(TRIAL_RESOURCES))
    if unknown:
        raise ConfigError(
            f"{where}: {key}: unknown resource '{unknown[0]}' (known: {', '.join(TRIAL_RESOURCES)})"
        )
    out = {**TRIAL_RESOURCES, **given}
    for name, amount in out.items():
        if amount < 0:
            raise ConfigError(f"{where}: {key}.{name}: must be >= 0, got {amount!r}")
    if not any(out.values()):
        raise ConfigError(f"{where}: {key}: a trial must hold some CPUs or GPUs, got {given!r}")
    return out


def _check_consistency(cfg: ExperimentConfig, where: str) -> None:
    if cfg.lora.dropout >= 1:
        raise ConfigError(f"{where}: lora.dropout: must be < 1, got {cfg.lora.dropout}")
    for key, on in (("train.keep_best", cfg.train.keep_best),
                    ("train.early_stopping_patience", cfg.train.early_stopping_patience)):  # fmt: skip
        if on and not (cfg.eval.score_steps and cfg.data.score_limit):
            raise ConfigError(f"{where}: {key}: needs scores during training; set eval.score_steps=N (and "
                              "data.score_limit > 0)")  # fmt: skip


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML file and apply ``section.field=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    cfg = from_dict(raw, where=str(path))
    return apply_overrides(cfg, parse_overrides(overrides or []), where=str(path))


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=5e-4", "lora.targets=[c_attn]"]`` -> ``[("train.lr", 0.0005), ...]`` (values read as YAML)."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. train.lr=5e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def apply_overrides(
    cfg: ExperimentConfig, overrides: list[tuple[str, Any]], where: str = "override"
) -> ExperimentConfig:
    """Return a copy of ``cfg`` with dotted keys set (validated like the file)."""
    raw = cfg.to_dict()
    for key, value in overrides:
        section, _, name = key.partition(".")
        if section not in SECTIONS or section == "sweep":
            raise ConfigError(
                f"{where}: unknown key '{key}' (sections: {', '.join(s for s in SECTIONS if s != 'sweep')})"
            )
        raw.setdefault(section, {})[name] = value
    sweep = raw.pop("sweep", None)
    new = from_dict(raw, where=where)
    if sweep is not None:
        new.sweep = SweepConfig(**sweep)
    return new


def get_value(cfg: ExperimentConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)

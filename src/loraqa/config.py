"""Experiment configuration: validated dataclasses, loaded from YAML, overridden with dotted keys.

An experiment file has the sections ``model``, ``data``, ``prompt``, ``lora``, ``train``, ``eval`` and, for a
study, ``sweep``; every field has the reference study's default, so an empty file is a valid experiment.
Any field can be overridden from the command line as ``section.field=value`` (``train.lr=5e-4``).

Each field is declared once, below: its type, default, choices (``Literal``), bounds (``gt``/``ge``/``lt``), help
text (``description``) and, for the common ones, its command-line shorthand (``Flag``). pydantic checks the
values, :func:`json_schema` describes them for editors, and ``loraqa.cli`` builds its shorthand flags from them.
A bad file or override raises :class:`ConfigError`: one line naming the file, the key, the bad value and what
is allowed.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from .layout import DATA_DIR_ENV, SQUAD_DEV_FILE, SQUAD_TRAIN_FILE
from .metrics import METRIC, SEARCH_METRICS, normalize_answer


class ConfigError(ValueError):
    """A bad experiment file or override; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------- choices
# Each set of choices is defined here once; the tuples are for code that lists or checks them.

Precision = Literal["auto", "bf16", "fp32"]
AttnImplementation = Literal["auto", "sdpa", "eager", "eager_lean", "flash_attention_2"]
CompileMode = Literal["auto", "off", "norms", "layers"]  # what torch.compile compiles to train
DataFormat = Literal["squad", "squad_v2", "jsonl", "csv", "hf"]  # the readers of loraqa.data
LossOn = Literal["answer", "all"]
TargetPreset = Literal[
    "attn", "attn+proj", "all-linear"
]  # resolve_targets maps each to modules per model family
Method = Literal["lora", "full"]
SweepMode = Literal["grid", "one-at-a-time", "search"]
SearchSampler = Literal["tpe", "random", "grid"]  # Optuna's TPESampler, RandomSampler, GridSampler
SearchPruner = Literal["asha", "median", "none"]  # successive halving, the median rule, never
Direction = Literal["maximize", "minimize"]

DATA_FORMATS: tuple[str, ...] = typing.get_args(DataFormat)
PRESET_NAMES: tuple[str, ...] = typing.get_args(TargetPreset)
# the reference study's grid: the ranks and target presets whose trainable parameters `loraqa params` and every
# study report count
STUDY_RANKS: tuple[int, ...] = (4, 8, 16, 32)
STUDY_PRESETS: tuple[str, ...] = ("attn", "attn+proj")
SWEEP_MODES: tuple[str, ...] = typing.get_args(SweepMode)
SEARCH_SAMPLERS: tuple[str, ...] = typing.get_args(SearchSampler)
SEARCH_PRUNERS: tuple[str, ...] = typing.get_args(SearchPruner)
SWEEP_BACKENDS: tuple[str, ...] = ("local", "ray")  # where `loraqa sweep --backend` runs the trials

# Module-name presets per architecture (a model config's model_type); all-linear is PEFT's own.
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    # GPT-2 fuses q, k, v into c_attn; "c_proj" names both the attention output and the MLP down
    # projection, and the reference study's PEFT run adapted every c_proj.
    "gpt2": {"attn": ["c_attn"], "attn+proj": ["c_attn", "c_proj"]},
    "llama": {
        "attn": ["q_proj", "k_proj", "v_proj"],
        "attn+proj": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    },
}
TARGET_PRESETS["mistral"] = TARGET_PRESETS["qwen2"] = TARGET_PRESETS["llama"]

# train.compile=auto on a CPU compiles the norms for a training of NORMS_PAY_FROM_STEPS optimizer steps or more,
# and whole decoder layers for one of LAYERS_PAY_FROM_STEPS or more: from there on, the time its faster steps
# save outweighs the compiling, paid once a process (the measurements: docs/performance.md)
NORMS_PAY_FROM_STEPS = 200
LAYERS_PAY_FROM_STEPS = 1000

TRIAL_RESOURCES = {"cpus": 1.0, "gpus": 0.0}  # what one trial holds on Ray (--backend ray), by default


def resolve_targets(targets: str | list[str], model_type: str) -> str | list[str]:
    """Map a preset (attn, attn+proj, all-linear) or an explicit module list to PEFT's ``target_modules``."""
    if isinstance(targets, list):
        return targets
    if targets == "all-linear":
        return "all-linear"
    if targets in ("attn", "attn+proj"):
        presets = TARGET_PRESETS.get(model_type)
        if presets is None:
            raise ValueError(
                f"no '{targets}' preset for model type '{model_type}'; give lora.targets as a list of module names"
            )
        return list(presets[targets])
    raise ValueError(
        f"lora.targets: unknown preset {targets!r}; use one of {', '.join(PRESET_NAMES)} or a list"
    )


# ---------------------------------------------------------------------------------------------- value types
# YAML and the command line give numbers as strings at times (PyYAML reads 5e-4 as "5e-4"): those become
# numbers. A bool is never a number here, though Python counts it as an int; a float is never an integer.


def _invalid(what: str, value: Any) -> PydanticCustomError:
    """The error of a value that is not ``what``; its message is the one ConfigError prints after the key."""
    return PydanticCustomError("loraqa", "expected {what}, got {value}", {"what": what, "value": repr(value)})


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _invalid("an integer", value)
    try:
        return int(value)
    except ValueError:
        raise _invalid("an integer", value) from None


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _invalid("a number", value)
    try:
        number = float(value)
    except (ValueError, OverflowError):  # an integer past float's range: 1 and 400 zeros
        raise _invalid("a number", value) from None
    if not math.isfinite(number):  # no setting means anything at inf or nan (train.lr=inf trains to nan)
        raise _invalid("a finite number", value)
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise _invalid("true or false", value)
    return value


def _compile_mode(value: Any) -> Any:
    """train.compile's choices; true and false are its older spellings of layers and off."""
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return "layers" if _to_bool(value) else "off"
    return value


def _names(value: Any) -> str | list[str]:
    names = [value] if isinstance(value, str) else value
    if isinstance(names, list) and all(isinstance(v, str) and v.strip() for v in names):
        return value
    raise _invalid("a name or a list of names (none empty)", value)


def _non_empty(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("loraqa", "expected a non-empty name, got {value}", {"value": repr(value)})
    return value


def _no_answer_text(value: str) -> str:
    """squad_v2's no-answer: scored as the official "" only where it normalizes to something, else every empty
    or article-only answer would count as one (and "" itself is never taught: an empty answer trains nothing)."""
    if not normalize_answer(value):
        raise PydanticCustomError(
            "loraqa",
            "{value} is empty once normalized as SQuAD scores answers; give a word, e.g. unanswerable",
            {"value": repr(value)},
        )
    return value


def _plain_name(value: str) -> str:
    """A run's name: its default folder is runs/<name>, so a name that is empty or a path would put the run in
    runs/ itself or outside it."""
    if not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise PydanticCustomError(
            "loraqa",
            "{value} is not a plain folder name (the run's default folder is runs/<name>): give a non-empty name "
            "without '/' or '\\' (--output-dir puts the run folder anywhere)",
            {"value": repr(value)},
        )
    return value


def _targets(value: Any) -> str | list[str]:
    value = _names(value)
    if isinstance(value, list) and not value:
        raise PydanticCustomError(
            "loraqa", "no module named; give a preset ({presets}) or module names", {"presets": ", ".join(PRESET_NAMES)}
        )
    if isinstance(value, str) and value not in PRESET_NAMES:
        raise PydanticCustomError(
            "loraqa",
            "{value} is not a preset ({presets}); give module names as a list, e.g. lora.targets=[{name}]",
            {"value": repr(value), "presets": ", ".join(PRESET_NAMES), "name": value},
        )
    return value


def _trial_resources(given: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(given) - set(TRIAL_RESOURCES))
    if unknown:
        raise PydanticCustomError(
            "loraqa",
            "unknown resource '{name}' (known: {known})",
            {"name": unknown[0], "known": ", ".join(TRIAL_RESOURCES)},
        )
    if not any(given.get(name, default) for name, default in TRIAL_RESOURCES.items()):
        raise PydanticCustomError(
            "loraqa", "a trial must hold some CPUs or GPUs, got {value}", {"value": repr(given)}
        )
    return {**TRIAL_RESOURCES, **given}


Int = Annotated[int, BeforeValidator(_to_int)]
Float = Annotated[float, BeforeValidator(_to_float)]
Bool = Annotated[bool, BeforeValidator(_to_bool)]
Compile = Annotated[CompileMode, BeforeValidator(_compile_mode)]
Str = Annotated[str, Strict()]
Names = Annotated[str | list[str], BeforeValidator(_names)]
Targets = Annotated[TargetPreset | list[str], BeforeValidator(_targets)]
# A bound that must sit inside an Optional or a dict comes before the conversion, so that the JSON schema
# states it as a bound (after it, the schema would show pydantic's own "ge").
Count = Annotated[int, Field(ge=0), BeforeValidator(_to_int)]
Positive = Annotated[int, Field(ge=1), BeforeValidator(_to_int)]
RunName = Annotated[str, Strict(), AfterValidator(_plain_name)]
ModelName = Annotated[str, Strict(), AfterValidator(_non_empty)]
NoAnswer = Annotated[str, Strict(), AfterValidator(_no_answer_text)]
# what torch's and Optuna's generators take (numpy's rule: 0 to 2**32 - 1)
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX), BeforeValidator(_to_int)]
Resources = Annotated[
    dict[str, Annotated[float, Field(ge=0), BeforeValidator(_to_float)]], AfterValidator(_trial_resources)
]


class Flag:
    """A field's command-line shorthand(s), e.g. ``lr: Annotated[Float, Flag("--lr")]``: ``loraqa train``,
    ``eval`` and ``sweep`` take ``--lr X`` for ``train.lr=X``, with the field's description as its help."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def __repr__(self) -> str:
        return f"Flag{self.names!r}"


# a section takes its own fields only
_SECTION = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- sections


@dataclass(config=_SECTION)
class ModelConfig:
    """The base model."""

    name: Annotated[ModelName, Flag("--model")] = Field(
        "gpt2",
        description="hub id, local folder, .gguf file, or a built-in name (smollm2-135m, tiny-random-gpt2, "
        "random-gpt2-124m)",
    )
    precision: Annotated[Precision, Flag("--precision")] = Field(
        "auto", description="auto: bf16 where the hardware has it, else fp32"
    )
    attn_implementation: AttnImplementation = Field(
        "auto",
        description="the attention kernel: auto is eager_lean (loraqa's math path: faster, more memory) to train "
        "on a CPU and sdpa to answer and on a GPU; eager is transformers' math path; flash_attention_2 on GPUs "
        "that have it",
    )


@dataclass(config=_SECTION)
class DataConfig:
    """The questions: where they are read from and how many are used."""

    data_dir: Annotated[Str | None, Flag("--data-dir")] = Field(
        None,
        description=f"folder with {SQUAD_TRAIN_FILE} and {SQUAD_DEV_FILE} (or the format's files); "
        f"else ${DATA_DIR_ENV}, else SQuAD is downloaded",
    )
    train_limit: Annotated[Positive | None, Flag("--train-limit")] = Field(
        None, description="the first N train questions (null: all 87,599)"
    )
    eval_limit: Annotated[Positive | None, Flag("--eval-limit")] = Field(
        None, description="the first K dev questions scored by EM/F1 (null: all 10,570)"
    )
    eval_skip: Int = Field(
        0,
        ge=0,
        description="dev questions passed over before the data.eval_limit ones: a final evaluation held out from what "
        "data.score_limit scores during training (eval_skip 2000, eval_limit 2000: questions 2,001-4,000)",
    )
    loss_eval_limit: Int = Field(
        200, ge=0, description="dev questions whose answer-token loss is logged as eval_loss during training"
    )
    format: DataFormat = Field(
        "squad",
        description="squad (v1.1) | squad_v2 | jsonl | csv | hf (a datasets folder or hub id); see loraqa.data",
    )
    train_file: Str | None = Field(
        None, description="the train split's file (or datasets folder); else the format's file in data_dir"
    )
    dev_file: Str | None = Field(
        None, description="the dev split's file (or datasets folder); else the format's file in data_dir"
    )
    unanswerable_answer: NoAnswer = Field(
        "unanswerable", description="squad_v2: the answer taught and expected for unanswerable questions"
    )
    score_limit: Int = Field(
        200, ge=0, description="the first N dev questions whose generated answers are scored during training"
    )

    def no_answer_text(self) -> str | None:
        """What the model answers an unanswerable question with, for formats that have them (else None)."""
        return self.unanswerable_answer if self.format == "squad_v2" else None


@dataclass(config=_SECTION)
class PromptConfig:
    """The prompt and which of its tokens the loss sees."""

    max_length: Annotated[Int, Flag("--max-length")] = Field(
        512, gt=0, description="tokens per example, EOS included"
    )
    loss_on: Annotated[LossOn, Flag("--loss-on")] = Field(
        "answer", description="answer: labels on the answer + EOS only; all: every real token (the ablation)"
    )


@dataclass(config=_SECTION)
class LoraConfig:
    """The LoRA adapter (loraqa's settings; peft's own class is peft.LoraConfig)."""

    r: Annotated[Int, Flag("--rank", "-r")] = Field(8, gt=0, description="the adapter's rank")
    # alpha 0 scales the adapter to nothing: no gradient, nothing learned
    alpha: Annotated[Float, Flag("--alpha")] = Field(
        16, gt=0, description="scaling: the update is alpha / r x BA"
    )
    dropout: Annotated[Float, Flag("--dropout")] = Field(
        0.1, ge=0, lt=1, description="dropout on the adapter's input"
    )
    targets: Annotated[Targets, Flag("--targets")] = Field(
        "attn",
        description="attn | attn+proj | all-linear (presets, mapped per model family), or a list of module "
        "names (comma-separated on the command line)",
    )


@dataclass(config=_SECTION)
class TrainConfig:
    """The optimisation."""

    method: Annotated[Method, Flag("--method")] = Field(
        "lora", description="lora, or full (full fine-tuning, the ablation)"
    )
    epochs: Annotated[Float, Flag("--epochs")] = Field(3, gt=0, description="passes over the train questions")
    max_steps: Annotated[Int, Flag("--max-steps")] = Field(
        -1, description="optimizer steps; > 0 overrides epochs"
    )
    batch_size: Annotated[Int, Flag("--batch-size")] = Field(
        8,
        gt=0,
        description="questions per forward-backward pass summed over all processes (under torchrun each of "
        "N processes takes batch_size / N; it must divide)",
    )
    grad_accum: Int = Field(
        1, gt=0, description="passes per optimizer step: batch_size x grad_accum questions a step"
    )
    lr: Annotated[Float, Flag("--lr")] = Field(2e-4, ge=0, description="peak learning rate (AdamW)")
    weight_decay: Annotated[Float, Flag("--weight-decay")] = Field(
        0.01, ge=0, description="AdamW weight decay"
    )
    warmup_steps: Annotated[Int, Flag("--warmup-steps")] = Field(
        100, ge=0, description="steps of linear warm-up"
    )
    seed: Annotated[Seed, Flag("--seed")] = Field(
        42, description="the seed of the adapter's initialisation and of the data order"
    )
    eval_steps: Annotated[Int, Flag("--eval-steps")] = Field(
        50, ge=0, description="eval loss every N optimizer steps (0: never during training)"
    )
    # the Trainer refuses 0
    logging_steps: Int = Field(10, gt=0, description="train loss logged every N optimizer steps")
    save_steps: Annotated[Int, Flag("--save-steps")] = Field(
        50, ge=0, description="checkpoint every N steps, so an interrupted run resumes (0: no checkpoints)"
    )
    fast_loss: Bool = Field(
        True, description="logits and cross-entropy only at labelled positions (false: full-vocabulary loss)"
    )
    group_by_length: Bool = Field(
        True, description="batches of similar lengths, so little compute goes to padding"
    )
    report_to: Names = Field(
        "tensorboard",
        description="tensorboard (event files in RUN/tensorboard) | wandb | mlflow | none | a list of them",
    )
    share_contexts: Bool = Field(
        True,
        description="a paragraph's context computed once per batch for all its questions (same loss per "
        "question; prompt.loss_on=all trains on stand-alone examples)",
    )
    one_row: Bool = Field(
        True,
        description="a shared-context batch laid out as one row of segments, padded once at its end, where the "
        "training attention is eager_lean (which computes it segment by segment) and train.compile is not layers: "
        "the matmuls skip the padding between rows; false: a padded row each; metrics.json: train_one_row",
    )
    pad_to_multiple: Int = Field(
        64,
        gt=0,
        description="batch widths padded up to a multiple of this, so batches share a few shapes and the "
        "kernels built for a shape are reused (1: the longest row's width)",
    )
    compile: Compile = Field(
        "auto",
        description="what torch.compile compiles: norms (the RMSNorms, a few seconds to compile), layers (the "
        "decoder layers, about a minute) or off; auto, to train on a CPU, is layers for "
        f"{LAYERS_PAY_FROM_STEPS} optimizer steps or more, norms for {NORMS_PAY_FROM_STEPS} or more, off for "
        "fewer; off on a GPU (not measured there); "
        "metrics.json: train_compile, compile_seconds (within train_seconds)",
    )
    gradient_checkpointing: Bool = Field(
        False,
        description="recompute each decoder layer's activations in the backward pass instead of keeping them: "
        "less memory, one more forward's worth of compute a step",
    )
    keep_best: Bool = Field(
        False,
        description="keep the adapter of the best in-training F1 and evaluate that one (needs eval.score_steps)",
    )
    early_stopping_patience: Int = Field(
        0, ge=0, description="stop after this many scorings without a better F1 (0: never)"
    )


@dataclass(config=_SECTION)
class EvalConfig:
    """How answers are generated."""

    batch_size: Annotated[Int, Flag("--eval-batch-size")] = Field(
        32, gt=0, description="questions generated at once"
    )
    max_new_tokens: Annotated[Int, Flag("--max-new-tokens")] = Field(
        32, gt=0, description="the longest answer, in tokens"
    )
    sort_by_length: Bool = Field(True, description="batch questions of similar lengths together")
    share_prefixes: Bool = Field(
        True, description="run a paragraph's shared context once and reuse its KV cache per question"
    )
    prune_finished: Bool = Field(True, description="drop answered sequences from the decoding batch")
    merge_adapter: Bool = Field(True, description="merge LoRA into the weights before generating")
    batch_invariant: Bool = Field(
        True,
        description="each answer computed from its own question alone (paragraph once, then the question and "
        "its decoding unbatched), so it is the same asked alone, in a file or in an evaluation; false: "
        "batched decoding, faster, but in bf16 an answer can change with the questions batched beside it",
    )
    extractive: Bool = Field(
        False,
        description="each greedy step picks the best token that keeps the answer's text a substring of the "
        "paragraph (a stop token once it has text), so every answer is a piece of the context",
    )
    score_steps: Int = Field(
        0,
        ge=0,
        description="every N optimizer steps, answer data.score_limit dev questions and log eval_exact_match "
        "and eval_f1 (0: only the final evaluation)",
    )


@dataclass(config=_SECTION)
class SweepConfig:
    """A study: many trials of the experiment above (loraqa sweep)."""

    mode: SweepMode = Field(
        "grid",
        description="grid: every combination of the axes; one-at-a-time: each axis value changed alone from "
        "the base; search: an Optuna study over sweep.space",
    )
    axes: dict[str, list[Any]] = Field(
        default_factory=dict, description="grid and one-at-a-time: dotted key -> its values"
    )
    resources_per_trial: Resources = Field(
        default_factory=lambda: dict(TRIAL_RESOURCES),
        description="CPUs and GPUs a trial holds under --backend ray (fractions allowed); a missing key keeps "
        "its default. The local runner shares the machine by --parallel instead",
    )
    metric: Str = Field(
        METRIC,
        description="what a search optimises, from every in-training scoring (eval.score_steps): eval_f1 | "
        "eval_exact_match | loss (the last logged training loss)",
    )
    direction: Direction = Field(
        "maximize", description="maximize (eval_f1, eval_exact_match) | minimize (loss)"
    )
    n_trials: Int = Field(
        24,
        gt=0,
        description="trials in the study, finished, pruned and failed ones included (the grid sampler: at "
        "most the grid's size, each point once)",
    )
    sampler: SearchSampler = Field("tpe", description="tpe | random | grid (grid: lists of choices only)")
    pruner: SearchPruner = Field(
        "asha",
        description="asha (successive halving: the best quarter goes on, at the scorings 1, 4, 16, ...) | "
        "median (below the finished trials' median at the same step, from the third trial on) | none",
    )
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="search: dotted key -> a list of choices, or {low, high, log} for a number range (an "
        "integer range if both bounds are integers)",
    )
    seed: Seed | None = Field(
        None, description="the sampler's seed: a fresh study suggests the same parameters"
    )


@dataclass(config=_SECTION)
class ExperimentConfig:
    """A loraqa experiment: a YAML file for loraqa train (or loraqa sweep with a sweep section)."""

    name: RunName = Field("loraqa", description="the run's name (its folder is runs/<name> by default)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sweep: SweepConfig | None = Field(None, description="a study's trials (loraqa sweep only)")

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

# dotted key -> the field's declaration, in file order
FIELDS: dict[str, FieldInfo] = {
    f"{section}.{name}": info
    for section, cls in SECTIONS.items()
    for name, info in cls.__pydantic_fields__.items()
}

_EXPERIMENT = TypeAdapter(ExperimentConfig)


def value_type(info: FieldInfo) -> Any:
    """A field's type without ``None`` and annotations: ``int``, ``float``, ``str``, ``bool``, a ``Literal``, a
    union (``lora.targets``), a ``dict``."""
    tp = info.annotation
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp  # X | None is X
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def choices(key: str) -> tuple[str, ...]:
    """The values a dotted key may take, if it is a choice (else ())."""
    tp = value_type(FIELDS[key]) if key in FIELDS else None
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def shorthands() -> list[tuple[str, tuple[str, ...], FieldInfo]]:
    """(dotted key, flags, field) of every field that has a command-line shorthand, in file order."""
    out = []
    for key, info in FIELDS.items():
        out += [(key, m.names, info) for m in info.metadata if isinstance(m, Flag)]
    return out


def json_schema() -> dict:
    """The JSON schema of an experiment file, for editors (yaml-language-server) and other tools."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_EXPERIMENT.json_schema()}


# ---------------------------------------------------------------------------------------------- errors


def _key(loc: tuple) -> str:
    """``("lora", "targets", 0)`` -> ``lora.targets[0]``."""
    out = ""
    for part in loc:
        if part != "[key]":  # pydantic's mark of a mapping's bad key, which the part before names
            out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _describe(err: dict) -> str:
    """One pydantic error as loraqa states it: the key, the bad value and what is allowed."""
    loc, kind, value, ctx = err["loc"], err["type"], err.get("input"), err.get("ctx") or {}
    key = _key(loc)
    if kind == "unexpected_keyword_argument" and len(loc) == 1:
        return f"unknown section '{key}' (known: name, {', '.join(SECTIONS)})"
    if kind == "unexpected_keyword_argument":
        known = sorted(SECTIONS[loc[0]].__pydantic_fields__)
        return f"unknown key '{key}' (known: {', '.join(known)})"
    if kind == "dataclass_type":
        return f"section '{key}' must be a mapping, got {value!r}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        return f"{key}: must be {bounds[kind]} {bound:g}, got {value!r}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {', '.join(choices(key)) or ctx.get('expected')}"
    wanted = {"string_type": "a string", "list_type": "a list", "dict_type": "a mapping"}
    if kind in wanted:
        return f"{key}: expected {wanted[kind]}, got {value!r}"
    return f"{key}: {err['msg']}" if kind == "loraqa" else f"{key}: {err['msg']}, got {value!r}"


# ---------------------------------------------------------------------------------------------- loading


def from_dict(raw: dict, where: str = "<config>") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig`; ``where`` names the source in errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: an experiment must be a mapping of sections, got {type(raw).__name__}")
    # an empty section (`sweep:`) is the section's defaults
    raw = {k: {} if v is None and k in SECTIONS else v for k, v in raw.items()}
    try:
        cfg = _EXPERIMENT.validate_python(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: " + "; ".join(_describe(err) for err in e.errors())) from None
    if cfg.sweep is not None:
        for axis, values in cfg.sweep.axes.items():
            if not values:
                raise ConfigError(f"{where}: sweep.axes.{axis}: expected a non-empty list of values")
            for v in values:  # every value must be valid where it lands
                apply_overrides(cfg, [(axis, v)], where=f"{where}: sweep.axes")
        if cfg.sweep.mode == "search":
            _check_search(cfg, where)
    _check_consistency(cfg, where)
    return cfg


def search_trials(sweep: SweepConfig) -> int:
    """How many trials a search holds: ``sweep.n_trials``, and for the grid sampler at most the grid's size
    (each point once; Optuna's grid would repeat points past it)."""
    if sweep.sampler != "grid":
        return sweep.n_trials
    return min(sweep.n_trials, math.prod(len(v) for v in sweep.space.values()))


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
        raise ConfigError(
            f"{where}: sweep.space: a search needs at least one key to search, e.g. "
            "train.lr: {low: 1.0e-5, high: 2.0e-3, log: true}"
        )
    if not (cfg.eval.score_steps and cfg.data.score_limit):
        raise ConfigError(
            f"{where}: sweep.mode: search judges trials by their in-training {sweep.metric}; "
            "set eval.score_steps=N"
        )
    _check_a_scoring_happens(cfg, where, "sweep.mode: search")
    if sweep.metric not in SEARCH_METRICS:
        raise ConfigError(
            f"{where}: sweep.metric: {sweep.metric!r} is not reported at the in-training scorings; give one of "
            f"{', '.join(SEARCH_METRICS)}"
        )
    if sweep.direction != SEARCH_METRICS[sweep.metric]:
        raise ConfigError(
            f"{where}: sweep.direction: {sweep.metric} is to {SEARCH_METRICS[sweep.metric]}, not {sweep.direction}"
        )
    for key, value in sweep.space.items():
        at = f"{where}: sweep.space.{key}"
        samples = _space_samples(value, sweep.sampler, at)
        for v in samples:  # every value must be valid where it lands (an unknown key fails here too)
            apply_overrides(cfg, [(key, v)], where=f"{where}: sweep.space")


def _space_samples(value: Any, sampler: str, at: str) -> list:
    """The values of a search space entry to check where they land: its choices, or its range's bounds."""
    rng = search_range(value)
    if rng is None:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{at}: expected a non-empty list of choices or {{low, high, log}}")
        return value
    low, high, log = rng
    extra = sorted(set(value) - {"low", "high", "log"})
    if extra or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (low, high)):
        raise ConfigError(f"{at}: a range is {{low: NUMBER, high: NUMBER, log: true|false}}, got {value!r}")
    if low > high:
        raise ConfigError(f"{at}: low {low} is above high {high}")
    if log and low <= 0:
        raise ConfigError(f"{at}: log: true needs low > 0, got low {low}")
    if sampler == "grid":
        raise ConfigError(f"{at}: sweep.sampler grid takes lists of choices, not ranges")
    return [low, high]


def _check_consistency(cfg: ExperimentConfig, where: str) -> None:
    """What holds across sections: judging a run by its F1 needs scores during training."""
    for key, on in (
        ("train.keep_best", cfg.train.keep_best),
        ("train.early_stopping_patience", cfg.train.early_stopping_patience),
    ):
        if on and not (cfg.eval.score_steps and cfg.data.score_limit):
            raise ConfigError(
                f"{where}: {key}: needs scores during training; set eval.score_steps=N (and "
                "data.score_limit > 0)"
            )
        if on:
            _check_a_scoring_happens(cfg, where, key)


def _check_a_scoring_happens(cfg: ExperimentConfig, where: str, needs: str) -> None:
    """A decision from in-training scores (``needs``) with a first scoring past the last step would never be
    made, without a word: refused where the config fixes the steps (train.max_steps)."""
    steps, every = cfg.train.max_steps, cfg.eval.score_steps
    if steps > 0 and every > steps:
        raise ConfigError(
            f"{where}: {needs}: eval.score_steps {every} is past train.max_steps {steps}, so no scoring would "
            "happen; lower eval.score_steps"
        )


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives one key twice: PyYAML keeps the last without a word,
    so a config that sets a section or a field twice would silently lose the first."""


def _mapping_once(loader: _UniqueKeys, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # << merges keys in, which the mapping's own may override
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable):
            if key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: the key {key!r} is given twice; keep one")
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_once)


def read_yaml(text: str) -> Any:
    """A config file's YAML (``yaml.safe_load``), a key given twice in one mapping refused (yaml.YAMLError)."""
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML file and apply ``section.field=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    cfg = from_dict(raw, where=str(path))
    return apply_overrides(cfg, parse_overrides(overrides or []), where=str(path))


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=5e-4", "lora.targets=[c_attn]"]`` -> ``[("train.lr", "5e-4"), ...]`` (values read as YAML;
    validation makes "5e-4" a number)."""
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
    """Return a copy of ``cfg`` with dotted keys set (validated like the file); the sweep section is kept as it
    is and cannot be overridden."""
    raw = cfg.to_dict()
    for key, value in overrides:
        section, _, name = key.partition(".")
        if section == "sweep":  # the study's trials come from this section: only its file sets it
            raise ConfigError(f"{where}: '{key}': the sweep section is set in the experiment file only")
        if section not in SECTIONS:
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

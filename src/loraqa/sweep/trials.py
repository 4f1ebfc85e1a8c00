"""Trial expansion and naming: a config's ``sweep:`` section -> the ordered list of trials, and shards of it.

Modes: ``grid`` is every combination of the axes' values; ``one-at-a-time`` is the base config plus each
axis varied alone (the other axes at their base values), duplicates removed so the base appears once.
A trial's folder name comes from the values where it differs from the base (``r16-lr5e-4``; ``base``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, ExperimentConfig, apply_overrides, get_value


@dataclass
class Trial:
    name: str  # folder name under the sweep folder
    overrides: dict[str, Any]  # the axis values applied to the base config (resolved)
    values: dict[str, Any]  # every axis key -> this trial's value
    config: ExperimentConfig  # resolved, without a sweep section
    index: int  # position in the sweep's trial list (sharding is by this)


def base_config(cfg: ExperimentConfig) -> ExperimentConfig:
    return dataclasses.replace(cfg, sweep=None)


def base_differences(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """The dotted keys where two sweeps' base configs differ. Two configs that differ only in their sweep
    section, or in how they were written (a default spelt out or left out), are one sweep."""
    return config_differences(base_config(a), base_config(b))


def config_differences(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """The dotted keys where two configs differ."""
    flat_a, flat_b = _flat(a.to_dict()), _flat(b.to_dict())
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "axes":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def axis_values(cfg: ExperimentConfig) -> dict[str, list]:
    """Each axis's values as they land in a config (``"5e-4"`` -> ``0.0005``)."""
    if cfg.sweep is None:
        raise ConfigError("the config has no sweep section")
    base = base_config(cfg)
    out = {}
    for key, values in cfg.sweep.axes.items():
        out[key] = [get_value(apply_overrides(base, [(key, v)], where="sweep.axes"), key) for v in values]
    return out


def reference_values(cfg: ExperimentConfig) -> dict[str, Any]:
    """The point the per-axis comparisons are made around: the base config's values (one-at-a-time), or in a
    grid each axis's base value if it is one of the axis's values, else the axis's first value."""
    base = base_config(cfg)
    ref = {}
    for key, values in axis_values(cfg).items():
        b = get_value(base, key)
        ref[key] = b if cfg.sweep.mode == "one-at-a-time" or b in values else values[0]
    return ref


def format_value(v: Any) -> str:
    """A short, stable text for a value: ``5e-4``, ``16``, ``0.1``, ``attn+proj``, ``c_attn+c_proj``."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
            return str(int(v))
        plain = f"{v:.6g}"
        mantissa, _, exponent = f"{v:.6e}".partition("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        sci = f"{mantissa}e{int(exponent)}"
        return sci if len(sci) < len(plain) else plain
    if isinstance(v, (list, tuple)):
        return "+".join(format_value(x) for x in v)
    return str(v)


def _labels(keys: list[str]) -> dict[str, str]:
    """``lora.r`` -> ``r``; the full dotted key (dots as underscores) where two axes share a field name."""
    last = collections.Counter(k.rpartition(".")[2] for k in keys)
    return {
        k: (k.rpartition(".")[2] if last[k.rpartition(".")[2]] == 1 else k.replace(".", "_")) for k in keys
    }


def trial_name(diff: dict[str, Any], labels: dict[str, str]) -> str:
    """``{"lora.r": 16, "train.lr": 5e-4}`` -> ``r16-lr5e-4``; ``{}`` -> ``base``. Numbers follow their label
    directly, other values after an underscore (``targets_attn+proj``)."""
    if not diff:
        return "base"
    parts = []
    for key, v in diff.items():
        text = format_value(v)
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        parts.append(f"{labels[key]}{text}" if numeric else f"{labels[key]}_{text}")
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(parts))
    if len(name) > 80:
        name = f"{name[:70]}-{_digest(diff)}"
    return name


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def expand_trials(cfg: ExperimentConfig) -> list[Trial]:
    """The sweep's trials, in a fixed order: ``grid`` = every combination (axes in file order, the last
    varying fastest); ``one-at-a-time`` = the base, then each axis's values in order. A trial whose resolved
    config equals an earlier one's is dropped."""
    if cfg.sweep is None:
        raise ConfigError("the config has no sweep section; use `loraqa train` for a single run")
    if cfg.sweep.mode == "search":
        raise ConfigError("sweep.mode search: its trials come from its study (loraqa.sweep.search.run_search)")
    base = base_config(cfg)
    values = axis_values(cfg)
    keys = list(values)
    if cfg.sweep.mode == "grid":
        assignments = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values.values())]
    else:
        assignments = [{}] + [{k: v} for k in keys for v in values[k]]
    labels = _labels(keys)
    trials: list[Trial] = []
    seen = set()
    for overrides in assignments:
        tcfg = apply_overrides(base, list(overrides.items()), where=f"sweep trial {overrides}")
        fingerprint = tcfg.to_yaml()
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        tvalues = {k: get_value(tcfg, k) for k in keys}
        diff = {k: v for k, v in tvalues.items() if v != get_value(base, k)}
        trials.append(Trial(trial_name(diff, labels), overrides, tvalues, tcfg, len(trials)))
    names = collections.Counter(t.name for t in trials)
    for t in trials:  # two configs that format alike (rare): tell them apart by a digest of the values
        if names[t.name] > 1:
            t.name = f"{t.name}-{_digest(t.values)}"
    return trials


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"2/3"`` -> ``(2, 3)``; 1-based."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard or "1/1")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ConfigError(f"--shard {shard!r}: expected i/n with 1 <= i <= n, e.g. 1/2")
    return int(m.group(1)), int(m.group(2))


def shard_trials(trials: list[Trial], index: int, count: int) -> list[Trial]:
    """The trials of shard ``index`` of ``count`` (1-based): every ``count``-th trial of the fixed list."""
    return [t for t in trials if t.index % count == index - 1]

"""``loraqa config schema``: the JSON schema of an experiment file, which editors use to complete and check one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from loraqa.cli import main
from loraqa.config import FIELDS, SECTIONS, ExperimentConfig, json_schema, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def schema() -> dict:
    return json_schema()


def section(schema: dict, name: str) -> dict:
    ref = schema["properties"][name]
    ref = ref["anyOf"][0] if "anyOf" in ref else ref  # sweep may be null
    return schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]


def test_the_command_prints_the_schema_as_json(capsys, schema):
    assert main(["config", "schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(schema))
    assert printed["$schema"].startswith("https://json-schema.org/")


def test_every_field_has_its_type_default_bounds_and_description(schema):
    lr = section(schema, "train")["properties"]["lr"]
    assert lr["type"] == "number" and lr["minimum"] == 0 and lr["default"] == 2e-4
    assert lr["description"] == FIELDS["train.lr"].description
    r = section(schema, "lora")["properties"]["r"]
    assert r["type"] == "integer" and r["exclusiveMinimum"] == 0
    dropout = section(schema, "lora")["properties"]["dropout"]
    assert (dropout["minimum"], dropout["exclusiveMaximum"]) == (0, 1)
    assert section(schema, "model")["properties"]["precision"]["enum"] == ["auto", "bf16", "fp32"]
    limit = section(schema, "data")["properties"]["train_limit"]  # a bound inside an Optional is kept
    assert {"type": "integer", "minimum": 1} in limit["anyOf"]
    for name in SECTIONS:
        fields = section(schema, name)
        assert fields["additionalProperties"] is False  # an editor flags unknown keys, as loraqa does
        for field, spec in fields["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_the_schema_has_only_json_schema_bounds(schema):
    """pydantic writes its own "ge"/"gt" where it cannot state a bound; editors would ignore those."""
    text = json.dumps(schema)
    assert not re.search(r'"(ge|gt|le|lt)":', text)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_the_shipped_configs_load_and_fit_the_schema(path, schema):
    assert isinstance(load_config(path), ExperimentConfig)
    import jsonschema  # the dev extra: a test that skipped without it would check nothing
    # an editor reads YAML 1.2, where 2e-4 is a number (PyYAML, YAML 1.1, reads a string; loraqa converts it)
    raw = yaml.safe_load(path.read_text())
    for part in raw.values():
        for key, value in part.items() if isinstance(part, dict) else ():
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?e[-+]?\d+", value):
                part[key] = float(value)
    jsonschema.validate(raw, schema)


def test_the_schema_rejects_what_loraqa_rejects(schema):
    import jsonschema  # the dev extra: a test that skipped without it would check nothing
    for bad in (
        {"lora": {"r": 0}},
        {"lora": {"rank": 8}},
        {"model": {"precision": "fp8"}},
        {"optimizer": {}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)

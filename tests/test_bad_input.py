"""The bad-input corpus: every kind of bad input loraqa is known to meet, run through the real command line.

Each case builds its input under a fresh folder, runs ``loraqa ARGS`` in this process (``cli.main``), and checks:

* the exit status is not 0 -- or, for inputs whose bad records are skipped, it is 0 and the load report states
  the count of skipped records with their ids;
* stderr holds exactly one ``loraqa: error:`` line, naming the file (or flag) and the field, id or key;
* no traceback;
* nothing half-written: files that were there are unchanged (but the run folder's lock and error.json), no
  new result file (adapter, metrics, predictions, model card) appears, no temporary file is left, and every
  JSON file in the folder parses.

The figures docs/reliability.md quotes (kinds tried, by group and by how they end) are printed by
``test_corpus_size``, which checks that the page quotes them; the kinds handled are the cases that pass.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraqa.cli import main
from loraqa.data import make_synthetic_squad

RESULT_FILES = {"adapter_model.safetensors", "adapter_config.json", "model.safetensors", "metrics.json",
                "predictions.json", "predictions.jsonl", "README.md", "train_metrics.json"}  # fmt: skip
MAY_CHANGE = {".loraqa.lock", "error.json"}
MAY_APPEAR = {".loraqa.lock", "error.json", "config.yaml"}


@dataclass
class Case:
    name: str
    build: Callable[[Path, dict], list[str]]  # (case folder, shared inputs) -> argv; cwd is the case folder
    names: tuple[str, ...]  # fragments the error line must hold: the file (or flag) and the field/id/key
    skipped: bool = False  # records skipped and counted, exit status 0
    kept: bool = False  # records kept for scoring and counted, exit status 0
    file: str = "dev-v1.1.json"  # whose load report states what was skipped or kept
    stated: str = ""  # a report that leaves damaged files out: exit status 0, this count stated on stderr


# ---------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Valid SQuAD files and a finished tiny run, copied into each case that needs them."""
    root = tmp_path_factory.mktemp("corpus-inputs")
    data = make_synthetic_squad(root / "data", n_train=8, n_dev=4)
    run = root / "run"
    rc, err = run_cli(["train", "--model", "tiny-random-gpt2", "--precision", "fp32", "--data-dir", str(data),
                       "--train-limit", "8", "--eval-limit", "2", "--max-steps", "2", "--batch-size", "4",
                       "--warmup-steps", "0", "--eval-steps", "0", "--save-steps", "1", "--max-new-tokens", "2",
                       "-o", str(run)])  # fmt: skip
    assert rc == 0, err
    return {"data": data, "run": run}


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``loraqa ARGV`` in this process: (exit status, all of stderr). transformers' log handler keeps the stderr
    it was created with, so it is pointed at the same buffer while the command runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")
    handler = hf_logging._default_handler
    buf = io.StringIO()
    saved = handler.__dict__.get("stream"), handler.__dict__.get("flush")
    handler.stream, handler.flush = buf, buf.flush
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse's own errors
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        handler.stream = saved[0]
        if saved[1] is not None:
            handler.flush = saved[1]
    return rc, buf.getvalue()


def data_copy(case: Path, shared: dict) -> Path:
    return Path(shutil.copytree(shared["data"], case / "data"))


def edit_dev(edit: Callable[[dict], None], raw: Callable[[bytes], bytes] | None = None, file="dev-v1.1.json"):
    """A case whose dev file (or ``file``) is the valid one with ``edit`` applied to its JSON (or ``raw`` to its
    bytes)."""

    def build(case: Path, shared: dict) -> list[str]:
        data = data_copy(case, shared)
        path = data / file
        obj = json.loads(path.read_text())
        edit(obj)
        blob = json.dumps(obj, ensure_ascii=False).encode()
        path.write_bytes(raw(blob) if raw else blob)
        return ["data", "stats", "--data-dir", "data"]

    return build


def first_qa(obj: dict) -> dict:
    return obj["data"][0]["paragraphs"][0]["qas"][0]


def qid(obj: dict) -> str:
    return first_qa(obj)["id"]


def set_in(path: str, value):
    """An edit setting (or, with value DELETE, removing) a field of the first article/paragraph/question."""

    def edit(obj):
        target = {"article": obj["data"][0], "paragraph": obj["data"][0]["paragraphs"][0], "qa": first_qa(obj),
                  "answer": first_qa(obj)["answers"][0] if first_qa(obj).get("answers") else {}}[path.split(".")[0]]  # fmt: skip
        key = path.split(".")[1]
        if value is DELETE:
            del target[key]
        else:
            target[key] = value

    return edit


DELETE = object()


def write(rel: str, content: str | bytes):
    def build(case: Path, shared: dict) -> Path:
        path = case / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return build


def train_with_config(text: str | bytes, *extra: str):
    def build(case: Path, shared: dict) -> list[str]:
        data_copy(case, shared)
        write("exp.yaml", text)(case, shared)
        return ["train", "exp.yaml", "--data-dir", "data", "-o", "run", *extra]

    return build


def train_args(*extra: str, out: str = "run"):
    def build(case: Path, shared: dict) -> list[str]:
        data_copy(case, shared)
        return ["train", "--model", "tiny-random-gpt2", "--data-dir", "data", "--max-steps", "1", "-o", out, *extra]

    return build


def sweep_with(text: str, *extra: str):
    def build(case: Path, shared: dict) -> list[str]:
        write("sweep.yaml", "name: s\nmodel: {name: tiny-random-gpt2}\n" + text)(case, shared)
        return ["sweep", "sweep.yaml", "-o", "out", *extra]

    return build


def fmt_case(fmt: str, dev: str | bytes | None):
    """``loraqa train`` on data.format=FMT: a valid train file and the given (bad) dev file."""
    valid = {"id": "t1", "context": "The kite is red.", "question": "What color is the kite?", "answers": ["red"]}

    def build(case: Path, shared: dict) -> list[str]:
        if fmt == "jsonl":
            write("train.jsonl", json.dumps(valid) + "\n")(case, shared)
            write("dev.jsonl", dev)(case, shared)
            files = ["data.train_file=train.jsonl", "data.dev_file=dev.jsonl"]
        elif fmt == "csv":
            write("train.csv", 'id,context,question,answers\nt1,The kite is red.,What color is it?,"[""red""]"\n')(
                case, shared)
            write("dev.csv", dev)(case, shared)
            files = ["data.train_file=train.csv", "data.dev_file=dev.csv"]
        elif fmt == "squad_v2":
            data = case / "data"
            data.mkdir()
            obj = json.loads((shared["data"] / "dev-v1.1.json").read_text())
            (data / "train-v2.0.json").write_text(json.dumps(obj))
            del first_qa(obj)["id"]
            (data / "dev-v2.0.json").write_text(json.dumps(obj))
            files = ["data.data_dir=data"]
        else:  # hf: a folder that is not a datasets folder
            write("dev/readme.txt", "not a dataset")(case, shared)
            write("train/readme.txt", "not a dataset")(case, shared)
            files = ["data.train_file=train", "data.dev_file=dev"]
        return ["train", "--model", "tiny-random-gpt2", f"data.format={fmt}", *files, "-o", "run"]

    return build


def run_copy(edit: Callable[[Path], None], command: str = "eval"):
    """A copy of the finished tiny run with ``edit`` applied; ``eval RUN``, ``export RUN --out merged`` or
    ``train RUN/config.yaml -o RUN``."""

    def build(case: Path, shared: dict) -> list[str]:
        data_copy(case, shared)
        run = Path(shutil.copytree(shared["run"], case / "run"))
        edit(run)
        if command == "eval":
            return ["eval", "run", "--data-dir", "data"]
        if command == "export":
            return ["export", "run", "--out", "merged"]
        return ["train", "run/config.yaml", "-o", "run"]

    return build


def corrupt(name: str, blob: bytes = b"\x00garbage{"):
    return lambda run: (run / name).write_bytes(blob)


def unfinished_with_checkpoint(bad_file: str):
    """The run as a kill mid-training leaves it (a complete checkpoint, nothing trained yet), one file corrupt."""

    def edit(run: Path):
        for name in RESULT_FILES:
            (run / name).unlink(missing_ok=True)
        ckpt = run / "checkpoints" / "checkpoint-1"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text('{"global_step": 1}')
        (ckpt / bad_file).write_bytes(b"PK\x03\x04 not a zip")

    return edit


def sweep_folder(edit: Callable[[Path], None]):
    """A sweep folder with one finished trial (the tiny run), ``edit`` applied; then ``loraqa report``."""

    def build(case: Path, shared: dict) -> list[str]:
        out = case / "sweep"
        cfg = "name: s\nmodel: {name: tiny-random-gpt2}\nsweep: {mode: grid, axes: {lora.r: [8]}}\n"
        write("sweep/sweep.yaml", cfg)(case, shared)
        from loraqa.config import load_config
        from loraqa.sweep import expand_trials

        (trial,) = expand_trials(load_config(out / "sweep.yaml"))
        shutil.copytree(shared["run"], out / trial.name)
        edit(out / trial.name)
        return ["report", "sweep", "--out", "report"]

    return build


# ---------------------------------------------------------------------------------------------- the corpus


def _gz_cut(blob: bytes) -> bytes:
    z = gzip.compress(blob)
    return z[: len(z) // 2]


CASES = [
    # -- data files (SQuAD v1.1 JSON, plain or gzipped): the file, then every field, wrong types, values
    Case("data: no data folder", lambda c, s: ["data", "stats", "--data-dir", "missing"], ("missing",)),
    Case("data: folder without dev file", lambda c, s: [(data_copy(c, s) / "dev-v1.1.json").unlink(), "data",
         "stats", "--data-dir", "data"][1:], ("data", "dev-v1.1.json")),  # fmt: skip
    Case("data: empty file", edit_dev(lambda o: None, raw=lambda b: b""), ("dev-v1.1.json", "line 1")),
    Case("data: truncated JSON", edit_dev(lambda o: None, raw=lambda b: b[: len(b) // 2]),
         ("dev-v1.1.json", "invalid JSON")),  # fmt: skip
    Case("data: Latin-1, not UTF-8", edit_dev(set_in("paragraph.context", "Café crème."),
         raw=lambda b: b.decode().encode("latin-1")), ("dev-v1.1.json", "not UTF-8")),  # fmt: skip
    Case("data: corrupt gzip", lambda c, s: [write("data/dev-v1.1.json.gz", b"\x1f\x8bnot gzip")(c, s),
         shutil.copy(s["data"] / "train-v1.1.json", c / "data"), "data", "stats", "--data-dir", "data"][2:],
         ("dev-v1.1.json.gz", "gzip")),  # fmt: skip
    Case("data: truncated gzip", edit_dev(lambda o: None, raw=_gz_cut),
         ("dev-v1.1.json", "gzip")),  # fmt: skip
    Case("data: top level a list", edit_dev(lambda o: None, raw=lambda b: b"[1, 2]"), ("dev-v1.1.json", "'data'")),
    Case("data: 'data' not a list", edit_dev(lambda o: o.update(data={"a": 1})), ("dev-v1.1.json", "'data'")),
    Case("data: article not an object", edit_dev(lambda o: o["data"].insert(0, "text")),
         ("dev-v1.1.json", "article 0")),  # fmt: skip
    Case("data: title a number", edit_dev(set_in("article.title", 7)), ("dev-v1.1.json", "'title'")),
    Case("data: paragraphs missing", edit_dev(set_in("article.paragraphs", DELETE)),
         ("dev-v1.1.json", "'paragraphs'")),  # fmt: skip
    Case("data: paragraphs a string", edit_dev(set_in("article.paragraphs", "p")),
         ("dev-v1.1.json", "'paragraphs'")),  # fmt: skip
    Case("data: context missing", edit_dev(set_in("paragraph.context", DELETE)), ("dev-v1.1.json", "'context'")),
    Case("data: context null", edit_dev(set_in("paragraph.context", None)), ("dev-v1.1.json", "'context'")),
    Case("data: qas missing", edit_dev(set_in("paragraph.qas", DELETE)), ("dev-v1.1.json", "'qas'")),
    Case("data: qas a number", edit_dev(set_in("paragraph.qas", 3)), ("dev-v1.1.json", "'qas'")),
    Case("data: question id missing", edit_dev(set_in("qa.id", DELETE)), ("dev-v1.1.json", "'id'")),
    Case("data: question id a number", edit_dev(set_in("qa.id", 12)), ("dev-v1.1.json", "'id'")),
    Case("data: question missing", edit_dev(set_in("qa.question", DELETE)), ("dev-v1.1.json", "'question'")),
    Case("data: question a list", edit_dev(set_in("qa.question", ["?"])), ("dev-v1.1.json", "'question'")),
    Case("data: answers a string", edit_dev(set_in("qa.answers", "x")), ("dev-v1.1.json", "'answers'")),
    Case("data: answer not an object", edit_dev(set_in("qa.answers", ["x"])), ("dev-v1.1.json", "answer 0")),
    Case("data: answer text missing", edit_dev(set_in("answer.text", DELETE)), ("dev-v1.1.json", "'text'")),
    Case("data: answer_start missing", edit_dev(set_in("answer.answer_start", DELETE)),
         ("dev-v1.1.json", "'answer_start'")),  # fmt: skip
    Case("data: answer_start a string", edit_dev(set_in("answer.answer_start", "3")),
         ("dev-v1.1.json", "'answer_start'")),  # fmt: skip
    Case("data: answer_start NaN", edit_dev(set_in("answer.answer_start", float("nan"))),
         ("dev-v1.1.json", "'answer_start'")),  # fmt: skip
    Case("data: answer_start a boolean", edit_dev(set_in("answer.answer_start", True)),
         ("dev-v1.1.json", "'answer_start'")),  # fmt: skip
    Case("data: duplicate question id", edit_dev(lambda o: o["data"][0]["paragraphs"][0]["qas"].append(
         dict(first_qa(o)))), ("dev-v1.1.json", "appears more than once")),  # fmt: skip
    Case("data: no answers (skipped, counted)", edit_dev(set_in("qa.answers", [])), ("no answers",), skipped=True),
    Case("data: empty answer text (skipped, counted)", edit_dev(set_in("qa.answers", [{"text": "  ", "answer_start": 0}])), ("empty answer",),
         skipped=True),  # fmt: skip
    Case("data: answer not in context, training (skipped, counted)", edit_dev(set_in("qa.answers", [{"text": "zebra crossing", "answer_start": 0}]),
         file="train-v1.1.json"), ("answer not in context",), skipped=True, file="train-v1.1.json"),  # fmt: skip
    Case("data: huge context without the answer, training (skipped, counted)",
         edit_dev(set_in("paragraph.context", "word " * 200_000), file="train-v1.1.json"), ("answer not in context",),
         skipped=True, file="train-v1.1.json"),  # fmt: skip
    Case("data: answer not in context, dev (kept for scoring, counted)", edit_dev(set_in("qa.answers", [{"text": "zebra crossing", "answer_start": 0}])),
         ("kept 1 answers not found in their context",), kept=True),  # fmt: skip
    Case("data: every question unusable, for training", lambda c, s: [
         edit_dev(lambda o: [q.update(answers=[]) for a in o["data"] for p in a["paragraphs"] for q in p["qas"]])(
             c, s), "train", "--model", "tiny-random-gpt2", "--data-dir", "data", "-o", "run"][1:],
         ("dev-v1.1.json", "no usable question")),  # fmt: skip
    Case("data: bad dev file seen by train", lambda c, s: [edit_dev(set_in("qa.id", DELETE))(c, s),
         "train", "--model", "tiny-random-gpt2", "--data-dir", "data", "-o", "run"][1:], ("dev-v1.1.json", "'id'")),
    # -- the other data formats (data.format=jsonl | csv | squad_v2 | hf), read through `loraqa train`
    Case("jsonl: invalid JSON line", fmt_case("jsonl", '{"id": "a"'), ("dev.jsonl", "line 1")),
    Case("jsonl: record not an object", fmt_case("jsonl", "[1, 2]"), ("dev.jsonl", "line 1")),
    Case("jsonl: context missing", fmt_case("jsonl", json.dumps({"id": "a", "question": "q?", "answers": []})),
         ("dev.jsonl", "'context'")),  # fmt: skip
    Case("jsonl: question a number", fmt_case("jsonl", json.dumps(
         {"id": "a", "context": "c", "question": 3, "answers": ["c"]})), ("dev.jsonl", "'question'")),
    Case("jsonl: answers a number", fmt_case("jsonl", json.dumps(
         {"id": "a", "context": "c", "question": "q?", "answers": 5})), ("dev.jsonl", "answers")),
    Case("jsonl: duplicate id", fmt_case("jsonl", "\n".join([json.dumps(
         {"id": "a", "context": "c d", "question": "q?", "answers": ["c"]})] * 2)), ("dev.jsonl", "'a'")),
    Case("jsonl: not UTF-8", fmt_case("jsonl", json.dumps({"id": "a", "context": "caf\u00e9", "question": "q?",
         "answers": ["caf\u00e9"]}, ensure_ascii=False).encode("latin-1")), ("dev.jsonl", "not UTF-8")),
    Case("csv: context column missing", fmt_case("csv", "id,question,answers\na,q?,[]\n"), ("dev.csv", "'context'")),
    Case("csv: answers cell a broken JSON list", fmt_case("csv", 'id,context,question,answers\na,c d,q?,"[1,"\n'),
         ("dev.csv", "'answers'")),  # fmt: skip
    Case("squad_v2: question id missing", fmt_case("squad_v2", None), ("dev-v2.0.json", "'id'")),
    Case("hf: not a datasets folder", fmt_case("hf", None), ("train", "not a datasets folder")),
    # -- experiment configs and overrides
    Case("config: no such file", train_args("nope.yaml"), ("nope.yaml", "no such config file")),
    Case("config: not YAML", train_with_config("model: [unclosed\n"), ("exp.yaml", "not valid YAML")),
    Case("config: not UTF-8", train_with_config("name: caf\xe9\n".encode("latin-1")), ("exp.yaml", "not UTF-8")),
    Case("config: a list, not a mapping", train_with_config("- 1\n- 2\n"), ("exp.yaml", "mapping")),
    Case("config: unknown section", train_with_config("trainer: {lr: 1}\n"), ("exp.yaml", "'trainer'")),
    Case("config: unknown key", train_with_config("train: {learning_rate: 1}\n"),
         ("exp.yaml", "'train.learning_rate'")),  # fmt: skip
    Case("config: section not a mapping", train_with_config("lora: 8\n"), ("exp.yaml", "'lora'")),
    Case("config: wrong type", train_with_config("train: {lr: fast}\n"), ("exp.yaml", "train.lr")),
    Case("config: not one of the choices", train_with_config("model: {precision: fp8}\n"),
         ("exp.yaml", "model.precision")),  # fmt: skip
    Case("config: zero rank", train_with_config("lora: {r: 0}\n"), ("exp.yaml", "lora.r")),
    Case("config: zero alpha", train_with_config("lora: {alpha: 0}\n"), ("exp.yaml", "lora.alpha")),
    Case("config: zero logging steps", train_with_config("train: {logging_steps: 0}\n"),
         ("exp.yaml", "train.logging_steps")),  # fmt: skip
    Case("config: negative train limit", train_with_config("data: {train_limit: -5}\n"),
         ("exp.yaml", "data.train_limit")),  # fmt: skip
    Case("config: targets a string, not a preset", train_with_config("lora: {targets: c_attn}\n"),
         ("exp.yaml", "lora.targets", "[c_attn]")),  # fmt: skip
    Case("config: max_length past the model's positions",
         train_with_config("model: {name: tiny-random-gpt2}\nprompt: {max_length: 2048}\n"),
         ("prompt.max_length", "1024 positions")),  # fmt: skip
    Case("config: negative learning rate", train_with_config("train: {lr: -1}\n"), ("exp.yaml", "train.lr")),
    Case("config: dropout 1 or more", train_with_config("lora: {dropout: 1.5}\n"), ("exp.yaml", "lora.dropout")),
    Case("config: a sweep file given to train", train_with_config("sweep: {axes: {lora.r: [4]}}\n"),
         ("exp.yaml", "sweep")),  # fmt: skip
    Case("config: two config files", lambda c, s: [write("a.yaml", "")(c, s), write("b.yaml", "")(c, s),
         "train", "a.yaml", "b.yaml"][2:], ("a.yaml", "b.yaml")),  # fmt: skip
    Case("override: no section", train_args("lr=1"), ("'lr=1'", "section.field=value")),
    Case("override: unknown key", train_args("train.speed=1"), ("train.speed",)),
    Case("override: bad value", train_args("train.batch_size=many"), ("train.batch_size",)),
    Case("override: unknown section", train_args("sweep.mode=grid"), ("sweep.mode",)),
    # -- sweep files
    Case("sweep: axis with no values", sweep_with("sweep: {axes: {lora.r: []}}\n"), ("sweep.yaml", "lora.r")),
    Case("sweep: axis value invalid", sweep_with("sweep: {axes: {lora.r: [4, -1]}}\n"), ("sweep.yaml", "lora.r")),
    Case("sweep: unknown axis key", sweep_with("sweep: {axes: {lora.rank: [4]}}\n"), ("sweep.yaml", "lora.rank")),
    Case("sweep: unknown mode", sweep_with("sweep: {mode: random, axes: {lora.r: [4]}}\n"),
         ("sweep.yaml", "sweep.mode")),  # fmt: skip
    Case("sweep: axes not a mapping", sweep_with("sweep: {axes: [lora.r]}\n"), ("sweep.yaml", "sweep.axes")),
    Case("sweep: no sweep section", sweep_with("train: {lr: 1e-4}\n"), ("sweep",)),
    Case("sweep: bad --shard", sweep_with("sweep: {axes: {lora.r: [4]}}\n", "--shard", "3/2"), ("--shard", "3/2")),
    Case("sweep: output folder is a file", lambda c, s: [write("out", "x")(c, s), *sweep_with(
         "sweep: {axes: {lora.r: [4]}}\n")(c, s)][1:], ("out",)),  # fmt: skip
    Case("report: not a sweep folder", lambda c, s: ["report", str(c)], ("not a sweep folder",)),
    Case("report: corrupt metrics.json in a trial", sweep_folder(corrupt("metrics.json")), ("metrics.json",),
         stated="left out 1 unreadable file(s)"),  # fmt: skip
    Case("report: corrupt predictions.jsonl in a trial", sweep_folder(corrupt("predictions.jsonl", b"{\n")),
         ("predictions.jsonl",), stated="left out 1 unreadable file(s)"),  # fmt: skip
    # -- run folders
    Case("run: not a run folder", lambda c, s: ["eval", str(c)], ("not a run folder",)),
    Case("run: corrupt config.yaml", run_copy(corrupt("config.yaml", b"model: [")), ("config.yaml",)),
    Case("run: missing adapter", run_copy(lambda r: (r / "adapter_model.safetensors").unlink()),
         ("run", "has no adapter_model.safetensors", "sync the whole run folder again")),  # fmt: skip
    Case("run: empty config.yaml", run_copy(corrupt("config.yaml", b"")), ("config.yaml", "empty")),
    Case("run: adapter_config.json without peft_type", run_copy(corrupt("adapter_config.json", b"{}")),
         ("adapter_config.json", "peft_type")),  # fmt: skip
    Case("run: metrics.json not an object, export", run_copy(corrupt("metrics.json", b"[]"), "export"),
         ("metrics.json", "not a JSON object")),  # fmt: skip
    Case("run: corrupt adapter", run_copy(corrupt("adapter_model.safetensors")), ("adapter_model.safetensors",)),
    Case("run: truncated adapter", run_copy(lambda r: (r / "adapter_model.safetensors").write_bytes(
         (r / "adapter_model.safetensors").read_bytes()[:300])), ("adapter_model.safetensors",)),  # fmt: skip
    Case("run: corrupt adapter_config.json", run_copy(corrupt("adapter_config.json")), ("adapter_config.json",)),
    Case("run: corrupt metrics.json, train again", run_copy(corrupt("metrics.json"), "train"), ("metrics.json",)),
    Case("run: corrupt train_metrics.json", run_copy(lambda r: [(r / "metrics.json").unlink(),
         corrupt("train_metrics.json")(r)], "train"), ("train_metrics.json",)),  # fmt: skip
    Case("run: corrupt adapter before evaluation", run_copy(lambda r: [(r / "metrics.json").unlink(),
         corrupt("adapter_model.safetensors")(r)], "train"), ("adapter_model.safetensors",)),  # fmt: skip
    Case("run: corrupt checkpoint optimizer", run_copy(unfinished_with_checkpoint("optimizer.pt"), "train"),
         ("checkpoint-1", "optimizer.pt")),  # fmt: skip
    Case("run: corrupt checkpoint adapter", run_copy(unfinished_with_checkpoint("adapter_model.safetensors"),
         "train"), ("checkpoint-1", "adapter_model.safetensors")),  # fmt: skip
    Case("run: another config in the folder", lambda c, s: [run_copy(lambda r: None)(c, s), "train",
         "--model", "tiny-random-gpt2", "--data-dir", "data", "-o", "run"][1:], ("run", "different config")),
    # -- output paths
    Case("output: an existing file", lambda c, s: [write("taken", "x")(c, s), *train_args(out="taken")(c, s)][1:],
         ("taken", "not a folder")),  # fmt: skip
    Case("output: --overwrite on a folder that is not a run", lambda c, s: [write("runs/keep.txt", "x")(c, s),
         *train_args("--overwrite", out="runs")(c, s)][1:], ("runs", "not a run folder")),  # fmt: skip
    Case("output: eval of a run into the run folder itself", lambda c, s: [*run_copy(lambda r: None)(c, s),
         "-o", "run"], ("run", "the run folder itself")),  # fmt: skip
    Case("output: eval of a run into another run", lambda c, s: [write("other/config.yaml", "name: other\n")(c, s),
         *run_copy(lambda r: None)(c, s), "-o", "other"][1:], ("other", "holds a run")),  # fmt: skip
    Case("output: zero-shot results into a trained run", lambda c, s: [*run_copy(lambda r: None)(c, s)[:0],
         "eval", "--model", "tiny-random-gpt2", "--data-dir", "data", "-o", "run"], ("run", "holds a trained run")),  # fmt: skip
    Case("output: eval of a run into a file", lambda c, s: [write("taken", "x")(c, s), *run_copy(lambda r: None)(
         c, s), "-o", "taken"][1:], ("taken", "not a folder")),  # fmt: skip
    Case("output: under a file", lambda c, s: [write("taken", "x")(c, s), *train_args(out="taken/run")(c, s)][1:],
         ("taken/run", "cannot create")),  # fmt: skip
    Case("output: unwritable (/proc)", train_args(out="/proc/loraqa-run"), ("/proc/loraqa-run",)),
    Case("output: zero-shot eval into a file", lambda c, s: [write("taken", "x")(c, s), data_copy(c, s), "eval",
         "--model", "tiny-random-gpt2", "--data-dir", "data", "-o", "taken"][2:], ("taken", "not a folder")),
    Case("output: report into a file", lambda c, s: [write("taken", "x")(c, s), *sweep_folder(lambda t: None)(
         c, s)[:-1], "taken"][1:], ("taken",)),  # fmt: skip
    # -- command-line arguments
    Case("cli: unknown command", lambda c, s: ["fly"], ("invalid choice", "'fly'")),
    Case("cli: unknown flag", lambda c, s: ["train", "--rnak", "4"], ("--rnak",)),
    Case("cli: flag value of the wrong type", lambda c, s: ["train", "--lr", "fast"], ("--lr", "'fast'")),
    Case("cli: flag value not a choice", lambda c, s: ["train", "--precision", "fp8"], ("--precision", "'fp8'")),
    Case("cli: flag value out of range", lambda c, s: ["train", "--rank", "-4"], ("lora.r",)),
    Case("cli: sweep without --output-dir", lambda c, s: ["sweep", "x.yaml"], ("--output-dir",)),
    Case("cli: no such model file", train_args("--model", "missing.gguf"), ("missing.gguf",)),
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def check_nothing_half_written(root: Path, before: dict[str, bytes]) -> None:
    after = snapshot(root)
    for rel, blob in before.items():
        if Path(rel).name not in MAY_CHANGE:
            assert after.get(rel) == blob, f"{rel} changed or vanished"
    for rel in set(after) - set(before):
        name = Path(rel).name
        assert name in MAY_APPEAR, f"{rel} was written"
    for rel, blob in after.items():
        assert not rel.endswith(".tmp") and ".saving" not in rel, f"{rel} left behind"
        if rel.endswith(".json") and before.get(rel) != blob:  # what loraqa wrote (inputs may be corrupt)
            json.loads(blob)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_nothing_half_written(case, shared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAQA_DATA_DIR", raising=False)
    argv = case.build(tmp_path, shared)
    before = snapshot(tmp_path)
    rc, err = run_cli(argv)
    assert "Traceback" not in err, err
    if case.stated:
        assert rc == 0, err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("loraqa: report:")]
        assert case.stated in line and all(n in line for n in case.names), line
        report = (tmp_path / "report" / "report.md").read_text()
        assert "Unreadable files" in report and case.names[0] in report
        before = {k: v for k, v in before.items()}  # the report's own files are its output, not half-written
        for name in ("report/report.md", "report/results.csv"):
            before[name] = (tmp_path / name).read_bytes()
    elif case.skipped or case.kept:
        assert rc == 0, err
        (report,) = [ln for ln in err.splitlines() if f"{case.file}: loaded" in ln]
        first_id = qid(json.loads((shared["data"] / case.file).read_text()))
        skipped = int(re.search(r"; skipped (\d+)", report).group(1))
        if case.skipped:
            assert skipped >= 1 and first_id in report, report  # the stated count, with the skipped id
        else:
            assert skipped == 0, report
        assert all(n in report for n in case.names), report
        assert not [ln for ln in err.splitlines() if ln.startswith("loraqa: error:")], err
    else:
        assert rc != 0, err
        # argparse's own errors print the usage first, then the one line (as "loraqa COMMAND: error: ...")
        lines = [ln for ln in err.splitlines() if re.match(r"loraqa( \w+)?: error: ", ln)]
        assert len(lines) == 1, err
        for fragment in case.names:
            assert fragment in lines[0], (fragment, lines[0])
        assert "rerun with -v" not in lines[0], lines[0]  # an anticipated error, not an unexpected one
    check_nothing_half_written(tmp_path, before)


def test_a_full_disk_is_one_clear_line(shared, tmp_path, monkeypatch):
    """The output path on a full disk (injected: every new file fails with ENOSPC)."""
    import errno

    import loraqa.io

    monkeypatch.chdir(tmp_path)
    data_copy(tmp_path, shared)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loraqa.io.tempfile, "mkstemp", no_space)
    before = snapshot(tmp_path)
    rc, err = run_cli(["train", "--model", "tiny-random-gpt2", "--data-dir", "data", "-o", "run"])
    assert rc == 1 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("loraqa: error:")]
    assert "no space left on device" in line
    check_nothing_half_written(tmp_path, before)


# the groups docs/reliability.md counts, by the prefixes of the cases' names
GROUPS = {"SQuAD v1.1 data files": ("data",), "the other data formats": ("jsonl", "csv", "squad_v2", "hf"),
          "configs": ("config",), "overrides": ("override",), "sweep files": ("sweep",), "reports": ("report",),
          "run folders": ("run",), "output paths": ("output",), "flags": ("cli",)}  # fmt: skip


def test_corpus_size():
    """docs/reliability.md quotes the corpus as it is: the kinds tried (the table's cases and the full disk),
    each group's count and how many end each way."""
    groups = {g: sum(c.name.split(":")[0] in prefixes for c in CASES) for g, prefixes in GROUPS.items()}
    assert sum(groups.values()) == len(CASES)  # every case in a group
    ends = {
        "end with exit status ≠ 0": sum(not (c.skipped or c.kept or c.stated) for c in CASES),
        "(skippable questions)": sum(c.skipped for c in CASES),
        "(a dev answer not in its context": sum(c.kept for c in CASES),
        "(damaged files under `loraqa report`)": sum(bool(c.stated) for c in CASES),
    }
    quoted = [f"{len(CASES) + 1} kinds of bad input tried", f"{len(CASES)} are table-driven"]
    quoted += [f"{g} {n}" for g, n in groups.items()] + [f"{n} {how}" for how, n in ends.items()]
    print("bad-input corpus:", *quoted, sep="\n  ")
    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text().split())
    assert [q for q in quoted if q not in doc] == []

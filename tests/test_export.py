"""loraqa export: a merged, plain transformers folder that loads and answers like the run without loraqa."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraqa.cli import main

# Runs in a fresh interpreter that never imports loraqa: plain transformers, greedy generate(), one prompt at
# a time, the answer is the first line of the continuation.
PLAIN_TRANSFORMERS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.load(open(sys.argv[1]))
model = AutoModelForCausalLM.from_pretrained(job["dir"]).eval()
tok = AutoTokenizer.from_pretrained(job["dir"])
answers, same_ids = [], []
for text, ids in zip(job["texts"], job["ids"]):
    same_ids.append(tok(text, add_special_tokens=False)["input_ids"] == ids)
    with torch.no_grad():
        # None: the exported generation config's own length and greedy decoding, as a user calls it
        kwargs = {} if job["max_new_tokens"] is None else {"max_new_tokens": job["max_new_tokens"], "do_sample": False}
        out = model.generate(torch.tensor([ids]), **kwargs)
    answers.append(tok.decode(out[0, len(ids):], skip_special_tokens=True).split("\n", 1)[0].strip())
print(json.dumps({"answers": answers, "same_ids": same_ids, "loraqa_imported": "loraqa" in sys.modules,
                  "dtype": str(model.dtype)}))
"""


def plain_answers(folder, examples, tokenizer, max_new_tokens, tmp_path) -> dict:
    from loraqa.prompt import PromptEncoder, format_prompt

    enc = PromptEncoder(tokenizer, max_length=512)
    job = {"dir": str(folder), "max_new_tokens": max_new_tokens,
           "texts": [format_prompt(e.context, e.question) for e in examples],
           "ids": [enc.encode_prompt(e.context, e.question) for e in examples]}  # fmt: skip
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "plain.py").write_text(PLAIN_TRANSFORMERS)
    done = subprocess.run([sys.executable, str(tmp_path / "plain.py"), str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_merged_weights_differ_from_the_base(run, merged, tmp_path) -> None:
    """The control for "answers like the run": the same run with LoRA B zeroed exports the base model's weights,
    and the trained export's adapted weights differ from those (an export that dropped the adapter would not)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare-run"
    shutil.copytree(run, bare)
    adapter = load_file(bare / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in adapter.items()},
              bare / "adapter_model.safetensors")  # fmt: skip
    assert main(["export", str(bare), "--out", str(tmp_path / "bare-merged")]) == 0
    a, b = load_file(merged / "model.safetensors"), load_file(tmp_path / "bare-merged" / "model.safetensors")
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all("attn" in k or "mlp" in k for k in changed), changed
    assert max(float((a[k] - b[k]).abs().max()) for k in changed) > 1e-3


def test_export_loads_with_plain_transformers_and_answers_like_the_run(tmp_path, synthetic_dir, capsys):
    from loraqa.data import load_squad
    from loraqa.model import load_tokenizer

    run, out = tmp_path / "run", tmp_path / "merged"
    rc = main(["train", "--model", "tiny-random-gpt2", "--data-dir", str(synthetic_dir), "--eval-limit", "6",
               "--precision", "fp32", "--max-new-tokens", "6", "--train-limit", "8", "--max-steps", "3",
               "--lr", "0.05", "--warmup-steps", "0", "--batch-size", "4", "--eval-steps", "0", "--save-steps", "0",
               "-o", str(run)])  # fmt: skip
    assert rc == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert_merged_weights_differ_from_the_base(run, out, tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "README.md"} <= names
    assert not any(n.startswith("adapter_") for n in names)  # merged: no adapter left
    assert "tiny-random-gpt2" in (out / "README.md").read_text()
    # a second export into the same folder needs --overwrite
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    assert (out / "loraqa-config.yaml").read_text() == (run / "config.yaml").read_text()
    assert "`loraqa-config.yaml` beside this card" in (out / "README.md").read_text()
    from loraqa.io import FILE_MODE

    assert (out / "model.safetensors").stat().st_mode & 0o777 == FILE_MODE  # not safetensors' 0600
    assert (run / "adapter_model.safetensors").stat().st_mode & 0o777 == FILE_MODE

    dev, _ = load_squad(synthetic_dir, split="dev", limit=6)
    got = plain_answers(out, dev, load_tokenizer("tiny-random-gpt2"), None, tmp_path)  # generate()'s defaults
    assert not got["loraqa_imported"] and all(got["same_ids"])
    expected = json.loads((run / "predictions.json").read_text())
    assert got["answers"] == [expected[e.id] for e in dev]
    assert any(expected.values())  # the run answered something, so the comparison compares


@pytest.mark.slow
def test_export_of_a_smollm2_run_keeps_its_gguf_tokenizer(tmp_path, synthetic_dir):
    """SmolLM2's tokenizer comes from the GGUF file; the export saves it as a standard HF tokenizer that encodes
    each prompt to the run's token ids, and plain transformers answers as the run did. Base weights only (lr 0,
    1 step): the check is the folder and tokenizer, not the training."""
    from loraqa.config import ExperimentConfig, apply_overrides
    from loraqa.data import load_squad
    from loraqa.export import export_run
    from loraqa.model import load_tokenizer
    from loraqa.pipeline import run_experiment

    cfg = apply_overrides(ExperimentConfig(), [
        ("model.name", "smollm2-135m"), ("model.precision", "fp32"), ("data.data_dir", str(synthetic_dir)),
        ("data.train_limit", 2), ("data.eval_limit", 3), ("train.max_steps", 1), ("train.lr", 0.0),
        ("train.batch_size", 2), ("train.warmup_steps", 0), ("train.eval_steps", 0), ("train.save_steps", 0),
        ("eval.max_new_tokens", 6),
    ])  # fmt: skip
    run_experiment(cfg, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "merged")
    dev, _ = load_squad(synthetic_dir, split="dev", limit=3)
    got = plain_answers(tmp_path / "merged", dev, load_tokenizer("smollm2-135m"), 6, tmp_path)
    expected = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert not got["loraqa_imported"] and all(got["same_ids"])
    assert got["answers"] == [expected[e.id] for e in dev]
    assert any(got["answers"])  # an answer to compare, not only empty ones


def test_export_never_deletes_a_run_or_a_folder_that_is_not_a_model(tmp_path):
    from loraqa.config import ConfigError
    from loraqa.export import export_run

    runs = tmp_path / "runs"
    run = runs / "r16"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: r16\n")
    for out in (run, runs):  # the run itself, or a folder holding it
        with pytest.raises(ConfigError, match="holds the run"):
            export_run(run, out, overwrite=True)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an exported model folder"):
        export_run(run, notes, overwrite=True)
    full = runs / "full"  # a fully fine-tuned run holds a config.json too
    full.mkdir()
    (full / "config.json").write_text("{}")
    (full / "config.yaml").write_text("name: full\n")
    with pytest.raises(ConfigError, match="not an exported model folder"):
        export_run(run, full, overwrite=True)
    assert (run / "config.yaml").exists() and (notes / "todo.txt").exists() and (full / "config.json").exists()
    with pytest.raises(ConfigError, match="todo.txt: is a file, not a folder; give --out a folder"):
        export_run(run, notes / "todo.txt", overwrite=True)
    assert (notes / "todo.txt").read_text() == "x"


def test_an_overwrite_cut_short_keeps_the_old_export_and_stale_temporaries_go(tmp_path, synthetic_dir, monkeypatch):
    from loraqa.config import ConfigError
    from loraqa.export import export_run

    run, out = tmp_path / "run", tmp_path / "merged"
    assert main(["train", "--model", "tiny-random-gpt2", "--data-dir", str(synthetic_dir), "--eval-limit", "2",
                 "--train-limit", "4", "--max-steps", "1", "--batch-size", "4", "--eval-steps", "0",
                 "--save-steps", "0", "-o", str(run)]) == 0  # fmt: skip
    export_run(run, out)
    before = (out / "model.safetensors").read_bytes()
    stale = tmp_path / ".merged.exporting-999999999"  # a pid no process has: an export killed long ago
    (stale / "x").parent.mkdir()
    (stale / "x").write_text("half")
    real, stopped = os.replace, []

    def stop_at_the_swap(a, b):
        if Path(b) == out and not stopped:
            stopped.append(a)
            raise KeyboardInterrupt  # Ctrl-C as the new folder moves in
        real(a, b)

    monkeypatch.setattr(os, "replace", stop_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        export_run(run, out, overwrite=True)
    monkeypatch.undo()
    assert stopped and not stale.exists()
    assert (out / "model.safetensors").read_bytes() == before  # the old export, back in place
    assert not list(tmp_path.glob(".merged.exporting-*"))
    export_run(run, out, overwrite=True)  # and the next export cleans up and succeeds
    assert (out / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".merged.exporting-*"))
    # killed between the two moves (no exception ran): the old export waits aside, and the next export of the
    # folder puts it back before anything else (refused here without --overwrite, the old model in place)
    os.replace(out, tmp_path / ".merged.exporting-999999999-replaced")
    with pytest.raises(ConfigError, match="--overwrite"):
        export_run(run, out)
    assert (out / "model.safetensors").read_bytes() == before and not list(tmp_path.glob(".merged.exporting-*"))


def test_export_keeps_the_precision_the_run_generated_with(tmp_path, synthetic_dir):
    """precision auto is worked out per machine: an export elsewhere must not pick again (a bf16 GPU run
    exported on a CPU without bf16 came out fp32, an fp32 run on an AMX CPU came out bf16)."""
    from safetensors import safe_open

    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-random-gpt2", "--data-dir", str(synthetic_dir), "--eval-limit", "2",
                 "--max-new-tokens", "2", "--train-limit", "4", "--max-steps", "1", "--batch-size", "4",
                 "--eval-steps", "0", "--save-steps", "0", "-o", str(run)]) == 0  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    for used, dtype in (("fp32", "F32"), ("bf16", "BF16")):  # as if the run had been made on either machine
        (run / "metrics.json").write_text(json.dumps({**metrics, "precision": used}))
        assert main(["export", str(run), "--out", str(tmp_path / used)]) == 0
        with safe_open(str(tmp_path / used / "model.safetensors"), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        assert dtypes == {dtype}, (used, dtypes)


def test_a_damaged_run_card_still_exports_its_intro(tmp_path):
    """The run's README.md with its front matter never closed, or not UTF-8: the card is taken as text."""
    from loraqa.config import ExperimentConfig
    from loraqa.export import _model_card

    (tmp_path / "README.md").write_bytes(b"---\nlibrary_name: peft\nno end \xff here\n")
    card = _model_card(tmp_path, ExperimentConfig())
    assert "Exported with `loraqa export`" in card and "no end" in card

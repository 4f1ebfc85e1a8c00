"""Export a trained run as a plain transformers model folder: the adapter merged into the base weights.

The folder holds ``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer files
(``tokenizer.json`` and friends, whatever tokenizer the run used: the GPT-2 BPE files of the built-ins or the
one read from SmolLM2's GGUF file), so ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load it without loraqa. The weights are in the precision the run
generated with (bf16 or fp32), its generation config greedy and as long as the run's answers could be. The
run's model card goes along as README.md, its config as ``loraqa-config.yaml``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .config import ConfigError
from .io import FILE_MODE, read_json, write_text_atomic
from .layout import (
    CONFIG_FILE,
    EXPORT_CONFIG_FILE,
    METRICS_FILE,
    MODEL_CARD_FILE,
    MODEL_CONFIG_FILE,
    export_temporaries,
)
from .locks import process_alive
from .prompt import format_prompt
from .runfolder import RunFolderError


def export_run(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Merge ``run_dir``'s adapter (or take its fully fine-tuned model) and save it to ``out_dir``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _recover_stale_exports(out_dir)
    _check_out_dir(run_dir, out_dir, overwrite)
    run = _merged_run(run_dir)
    # save_pretrained writes file by file: save into a sibling folder, then swap it in
    tmp, old = (out_dir.with_name(n) for n in export_temporaries(out_dir, os.getpid()))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        run.model.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / MODEL_CARD_FILE, _model_card(run_dir, run.cfg))
        shutil.copyfile(run_dir / CONFIG_FILE, tmp / EXPORT_CONFIG_FILE)
        # safetensors writes 0600: as readable as any file loraqa writes (umask), where the filesystem allows
        for f in tmp.iterdir():
            with contextlib.suppress(OSError):
                os.chmod(f, FILE_MODE)
        # the old export moves aside, then the new one in; an exception between puts the old one back, a kill
        # between leaves it aside, where the next export of out_dir puts it back first
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # stopped between the two moves: the old export goes back
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _recover_stale_exports(out_dir: Path) -> None:
    """What exports of ``out_dir`` killed midway left beside it (named by their process, gone now): a previous
    export moved aside while ``out_dir`` is missing goes back in place; the rest is removed."""
    new_pattern, aside_pattern = export_temporaries(out_dir)
    for aside in sorted(out_dir.parent.glob(aside_pattern)):
        pid = aside.name.removesuffix("-replaced").rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)) and not out_dir.exists():
            os.replace(aside, out_dir)
    for stale in out_dir.parent.glob(new_pattern):
        pid = stale.name.removesuffix("-replaced").rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _merged_run(run_dir: Path):
    """The run loaded as it answers (:func:`loraqa.answering.load_answerer`) on the CPU, in the precision it
    generated with, its adapter merged, its generation config made for plain ``generate()``."""
    from .answering import load_answerer
    from .card import portable_model_name

    overrides: list[tuple[str, object]] = [("eval.merge_adapter", True)]
    metrics = read_json(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else {}
    if not isinstance(metrics, dict):
        raise RunFolderError(
            f"{run_dir / METRICS_FILE}: not a JSON object; retrain the run (`loraqa train ... --overwrite`)"
        )
    used = metrics.get("precision")
    if used in ("bf16", "fp32"):  # the precision the run generated with, not what this machine picks
        overrides.append(("model.precision", used))
    run = load_answerer(run_dir, overrides=overrides, device="cpu")
    if hasattr(run.model, "merge_and_unload"):  # eval.merge_adapter merged it already: this guards wrappers
        run.model = run.model.merge_and_unload()
    run.model.config.name_or_path = portable_model_name(run.cfg.model.name)
    # the answer ends at EOS (loraqa also stops at a newline, which plain generate() does not know)
    generation = run.model.generation_config
    generation.eos_token_id, generation.pad_token_id = run.tokenizer.eos_token_id, run.tokenizer.pad_token_id
    # greedy, and as long as the run's answers could be (generate()'s default is 20 new tokens)
    generation.do_sample, generation.max_new_tokens = False, run.cfg.eval.max_new_tokens
    return run


def _model_card(run_dir: Path, cfg) -> str:
    """The exported folder's README.md: the run's model card, its YAML front matter first and naming a
    transformers model, after a paragraph on what was exported and the prompt it answers."""
    from .card import portable_model_name
    from .layout import MODEL_CARD_FILE

    what = "the LoRA adapter merged into" if cfg.train.method == "lora" else "fully fine-tuned weights of"
    intro = (
        f"Exported with `loraqa export` from the run `{run_dir.name}`: {what} "
        f"`{portable_model_name(cfg.model.name)}`. The prompt is\n\n```\n"
        f"{format_prompt('{context}', '{question}')}\n```\n\nand the answer is the first line "
        "of the greedy continuation.\n\n"
    )
    if cfg.eval.extractive:
        intro += (
            "The run's own answers were held to pieces of the context as written (`eval.extractive`); plain "
            "`generate()` is not, so its answers can differ from the run's.\n\n"
        )
    card = run_dir / MODEL_CARD_FILE
    text = card.read_text(errors="replace") if card.is_file() else ""  # a damaged card is still a card
    text = text.replace(f"`{CONFIG_FILE}` beside", f"`{EXPORT_CONFIG_FILE}` beside")
    text = text.replace(f"loraqa train {CONFIG_FILE}", f"loraqa train {EXPORT_CONFIG_FILE}")
    front = ""
    end = text.find("---\n", 4) if text.startswith("---\n") else -1
    if end != -1:
        front, text = (
            text[: end + 4].replace("library_name: peft", "library_name: transformers"),
            text[end + 4 :],
        )
    return front + "\n" + intro + text.lstrip("\n")


def _check_out_dir(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """--out must not hold the run, and --overwrite replaces only a model folder (one with config.json): a
    mistyped --out must not delete a run or a folder of runs."""
    if run_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ConfigError(f"{out_dir}: holds the run {run_dir}; pick another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: is a file, not a folder; give --out a folder for the model")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{out_dir}: exists and is not empty; pick another --out, or pass --overwrite")
    # a full fine-tuning run holds a model config too, and its own config beside it
    if not (out_dir / MODEL_CONFIG_FILE).is_file() or (out_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{out_dir}: not an exported model folder (a run, or no config.json), so --overwrite "
            "will not replace it; pick another --out"
        )

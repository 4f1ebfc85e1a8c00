"""Export a trained run as a plain transformers model folder: the adapter merged into the base weights.

The folder holds ``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer files
(``tokenizer.json`` and friends, whatever tokenizer the run used: the GPT-2 BPE files of the built-ins or the
one read from SmolLM2's GGUF file), so ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load it without loraqa. The weights are in the precision the run
generated with (bf16 or fp32). The run's model card goes along as README.md.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import ConfigError
from .io import write_text_atomic
from .prompt import format_prompt


def export_run(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Merge ``run_dir``'s adapter (or take its fully fine-tuned model) and save it to ``out_dir``."""
    from .layout import MODEL_CARD_FILE
    from .rundir import load_run, portable_model_name

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir}: exists and is not empty; pick another --out, or pass --overwrite")
    run = load_run(run_dir, overrides=[("eval.merge_adapter", True)], device="cpu")
    model, tok = run.model, run.lm.tokenizer
    if hasattr(model, "merge_and_unload"):  # eval.merge_adapter was set, so this only guards odd wrappers
        model = model.merge_and_unload()
    model.config.name_or_path = portable_model_name(run.cfg.model.name)
    # the answer ends at EOS (loraqa also stops at a newline, which plain generate() does not know)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    # save_pretrained writes file by file: save into a sibling folder, then swap it in
    tmp = out_dir.with_name(f".{out_dir.name}.exporting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        card = run_dir / MODEL_CARD_FILE
        intro = (f"Exported with `loraqa export` from the run `{run_dir.name}`: the LoRA adapter merged into "
                 f"`{portable_model_name(run.cfg.model.name)}`. The prompt is\n\n```\n"
                 f"{format_prompt('{context}', '{question}')}\n```\n\nand the answer is the first line "
                 "of the greedy continuation.\n\n")  # fmt: skip
        text = card.read_text() if card.is_file() else ""
        if text.startswith("---\n"):  # keep the YAML front matter first; the folder is a transformers model
            end = text.index("---\n", 4) + 4
            front, text = text[:end].replace("library_name: peft", "library_name: transformers"), text[end:]
        else:
            front = ""
        write_text_atomic(tmp / "README.md", front + "\n" + intro + text.lstrip("\n"))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir

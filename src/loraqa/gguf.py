"""A GGUF file as an ordinary model folder: converted once a machine, then loaded like any ``save_pretrained``
folder.

transformers reads a GGUF file field by field in Python, its tokenizer's vocabulary and merges included, and reads
it again for the config, the tokenizer and the weights: about 24 s of every process that loads SmolLM2-135M
(docs/performance.md). :func:`float_folder` converts a file once, with transformers' own GGUF loading, into a
folder in loraqa's cache (``config.json``, ``model.safetensors`` in fp32, the tokenizer's files), which
``from_pretrained`` then loads like any other. What must hold:

* the folder's name says what decides its content: the file's bytes (its size and a digest of samples of it,
  :func:`content_key`, so the same file in another checkout, venv or reinstall finds the same folder) and
  transformers' version (whose conversion made it); a changed file or an upgraded transformers gets a new one;
* a folder appears whole or not at all: it is written beside its place and renamed into it, under a lock, so
  processes that start together (torchrun, a sweep's trials) convert once and none reads a half-written one;
* where the cache cannot be written, the conversion goes into a temporary folder that the process removes when
  it ends.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import locks
from .layout import CACHE_GGUF_DIR, FULL_WEIGHTS_FILE, MODEL_CONFIG_FILE, cache_dir

log = logging.getLogger(__name__)

SAMPLES, SAMPLE_BYTES = 16, 1 << 20  # what content_key reads of a file


def float_folder(path: str | os.PathLike) -> Path:
    """The folder of the GGUF file ``path`` converted to a float model (fp32 weights, config, tokenizer),
    converting it first if no process has yet. ``ValueError`` for a file transformers cannot convert."""
    path = Path(path).resolve()
    import transformers

    made_of = f"{content_key(path)}|transformers {transformers.__version__}"
    return _float_folder(path, f"{path.stem}-{hashlib.sha256(made_of.encode()).hexdigest()[:16]}")


def content_key(path: Path) -> str:
    """The file's size and a sha256 of :data:`SAMPLES` pieces of :data:`SAMPLE_BYTES` spread over it, its first
    and last included (a GGUF file's header and its last tensor): ~16 MiB read, not the whole file, at every
    load. Two model files alike in all those bytes and in size but not elsewhere would share a folder."""
    samples, size, total = SAMPLES, SAMPLE_BYTES, path.stat().st_size
    digest = hashlib.sha256(str(total).encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek(max(0, (total - size) * i // max(1, samples - 1)))
            digest.update(f.read(size))
    return f"{total}-{digest.hexdigest()}"


@functools.cache  # config, tokenizer and weights are loaded one after the other: look the folder up once
def _float_folder(path: Path, name: str) -> Path:
    root = cache_dir() / CACHE_GGUF_DIR
    folder = root / name
    if _complete(folder):
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    except OSError as e:
        log.warning(
            "%s: the cache %s cannot be written (%s); converting it for this process only", path, root, e
        )
        return _converted_for_this_process(path)
    try:
        with locks.exclusive(root / f".{name}.lock"):
            if not _complete(folder):  # another process may have converted it while this one waited
                log.info("%s: converting it once into %s; later loads read that folder", path.name, folder)
                convert(path, staging)
                shutil.rmtree(folder, ignore_errors=True)  # an incomplete one, left by hand
                os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _complete(folder: Path) -> bool:
    return (folder / MODEL_CONFIG_FILE).is_file() and (folder / FULL_WEIGHTS_FILE).is_file()


def _converted_for_this_process(path: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="loraqa-gguf-"))
    atexit.register(shutil.rmtree, folder, True)
    convert(path, folder)
    return folder


def convert(path: Path, out: Path) -> None:
    """Write the GGUF file ``path`` into the folder ``out`` as a plain float model and its tokenizer.

    transformers de-quantizes GGUF tensors into a float model but marks it quantized (the Trainer refuses to
    fine-tune a quantized model, and the mark would be saved): the weights go into a model built from the config
    without its quantization, and the tokenizer is transformers' own conversion of the file's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    cfg = loaded.config
    cfg.quantization_config = None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"GGUF tensors do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)

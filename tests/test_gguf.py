"""A GGUF file converted once into a float model folder in the cache (loraqa.gguf), and loaded from it."""

import logging
import os
import threading
import time

import pytest
import torch

from loraqa import gguf
from loraqa.layout import MODEL_CONFIG_FILE
from loraqa.model import ModelLoadError, load_base_model, load_hf_config, load_tokenizer, smollm2_gguf_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """loraqa's cache in tmp_path, a fresh lookup memo, and a conversion that records its calls."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    gguf._float_folder.cache_clear()
    calls = []

    def fake_convert(path, out):
        calls.append((path, out))
        time.sleep(0.2)  # long enough for a second thread to arrive meanwhile
        (out / MODEL_CONFIG_FILE).write_text("{}")
        (out / gguf.FULL_WEIGHTS_FILE).write_bytes(b"weights")

    monkeypatch.setattr(gguf, "convert", fake_convert)
    yield tmp_path, calls
    gguf._float_folder.cache_clear()


def make_file(tmp_path, name="model.gguf", content=b"GGUF one"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_a_file_is_converted_once_into_the_cache_and_then_read_from_there(cache):
    tmp_path, calls = cache
    path = make_file(tmp_path)
    folder = gguf.float_folder(path)
    assert folder.parent == tmp_path / "xdg" / "loraqa" / "gguf" and folder.name.startswith("model-")
    assert (folder / gguf.FULL_WEIGHTS_FILE).read_bytes() == b"weights"
    gguf._float_folder.cache_clear()  # as a new process would
    assert gguf.float_folder(path) == folder
    assert len(calls) == 1
    # the staging folder became the folder: nothing else is left beside it but the lock file
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, f".{folder.name}.lock"])


def test_a_changed_file_is_converted_again_into_a_new_folder(cache):
    tmp_path, calls = cache
    path = make_file(tmp_path)
    first = gguf.float_folder(path)
    path.write_bytes(b"GGUF two, longer")
    os.utime(path, ns=(1, 1))
    gguf._float_folder.cache_clear()
    second = gguf.float_folder(path)
    assert second != first and len(calls) == 2


def test_the_same_file_elsewhere_or_reinstalled_finds_its_folder_and_a_changed_middle_does_not(cache, monkeypatch):
    """The key is the bytes, not the path: a fresh clone's venv (a new path, a new mtime) converts nothing."""
    tmp_path, calls = cache
    monkeypatch.setattr(gguf, "SAMPLE_BYTES", 4)
    content = bytes(range(256)) * 8
    first = gguf.float_folder(make_file(tmp_path, content=content))
    (tmp_path / "clone").mkdir()
    gguf._float_folder.cache_clear()
    assert gguf.float_folder(make_file(tmp_path / "clone", content=content)) == first and len(calls) == 1
    changed = bytearray(content)
    changed[(len(content) - 4) * 8 // (gguf.SAMPLES - 1)] ^= 1  # the first byte of a sample mid-file
    gguf._float_folder.cache_clear()
    assert gguf.float_folder(make_file(tmp_path / "clone", content=bytes(changed))) != first and len(calls) == 2


def test_processes_that_start_together_convert_once(cache):
    tmp_path, calls = cache
    path = make_file(tmp_path)
    folders = []

    def load():
        # each thread opens the lock file itself, as a process would; the memo is bypassed
        folders.append(gguf._float_folder.__wrapped__(path.resolve(), "model-x"))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(folders) == 3 and len(set(folders)) == 1
    assert len(calls) == 1


def test_a_cache_that_cannot_be_written_converts_for_the_process_only(cache, caplog):
    tmp_path, calls = cache
    path = make_file(tmp_path)
    (tmp_path / "xdg").write_text("a file, so the cache folder cannot be made")
    with caplog.at_level(logging.WARNING, logger="loraqa.gguf"):
        folder = gguf.float_folder(path)
    assert (folder / MODEL_CONFIG_FILE).is_file() and tmp_path not in folder.parents
    assert "cannot be written" in caplog.text and len(calls) == 1


def test_a_file_that_cannot_be_converted_is_a_clear_error_and_leaves_no_folder(cache, monkeypatch):
    tmp_path, _ = cache
    path = make_file(tmp_path, "broken.gguf")

    def refuse(path, out):
        (out / MODEL_CONFIG_FILE).write_text("{}")  # half-written
        raise ValueError("GGUF model with architecture foo is not supported yet")

    monkeypatch.setattr(gguf, "convert", refuse)
    with pytest.raises(ModelLoadError, match="broken.gguf: could not convert the GGUF file.*foo"):
        load_hf_config(str(path))
    assert [
        p.name for p in (tmp_path / "xdg" / "loraqa" / "gguf").iterdir() if not p.name.endswith(".lock")
    ] == []


@pytest.mark.slow
def test_the_converted_smollm2_equals_transformers_own_gguf_loading():
    """The folder loads the very weights and tokenizer transformers makes of the GGUF file itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    cached = load_base_model("smollm2-135m", dtype=torch.float32)
    theirs, ours = direct.state_dict(), cached.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # tied
    assert cached.generation_config.eos_token_id == direct.generation_config.eos_token_id
    assert torch.equal(
        load_base_model("smollm2-135m", dtype=torch.bfloat16).model.embed_tokens.weight,
        theirs["model.embed_tokens.weight"].to(torch.bfloat16),
    )

    tok_theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok_ours = load_tokenizer("smollm2-135m")
    texts = [
        "Context: The Normans (Norman: Nourmands; French: Normands) gave their name to Normandy.\nQuestion: "
        "In what country is Normandy located?\nAnswer: France",
        "  leading spaces, tabs\tand a newline\n, digits 1234567 and ünïcödé — “quotes” 日本語 🙂",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    for text in texts:
        for special in (False, True):
            assert (
                tok_ours(text, add_special_tokens=special)["input_ids"]
                == tok_theirs(text, add_special_tokens=special)["input_ids"]
            )
    assert (tok_ours.eos_token_id, tok_ours.bos_token_id) == (
        tok_theirs.eos_token_id,
        tok_theirs.bos_token_id,
    )
    assert load_hf_config("smollm2-135m").to_dict()["hidden_size"] == direct.config.hidden_size

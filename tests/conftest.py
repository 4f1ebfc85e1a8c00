"""Shared fixtures: the real GPT-2 tokenizer, a tiny random GPT-2, and small generated SQuAD files."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("LORAQA_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from loraqa.model import load_gpt2_tokenizer

    return load_gpt2_tokenizer()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from loraqa.data import make_synthetic_squad

    return make_synthetic_squad(tmp_path_factory.mktemp("squad"), n_train=64, n_dev=16)

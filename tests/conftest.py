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


@pytest.fixture(scope="session")
def answering_run(tmp_path_factory):
    """A tiny trained run that answers like a reader of the synthetic data: 60 steps of the tiny random GPT-2
    on its paragraphs teach it to answer a colour word (one that the paragraph may or may not hold) in ~6 s.
    Its metrics.json holds EM/F1 on 8 dev questions. The serve tests' model."""
    from loraqa.config import ExperimentConfig, apply_overrides
    from loraqa.data import make_synthetic_squad
    from loraqa.pipeline import run_experiment

    root = tmp_path_factory.mktemp("answering")
    data = make_synthetic_squad(root / "data", n_train=64, n_dev=8)
    overrides = {
        "model.name": "tiny-random-gpt2", "model.precision": "fp32", "data.data_dir": str(data),
        "data.eval_limit": 8, "data.loss_eval_limit": 4, "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0,
        "lora.targets": "all-linear", "train.lr": 1e-2, "train.max_steps": 60, "train.batch_size": 8,
        "train.warmup_steps": 0, "train.eval_steps": 0, "train.save_steps": 0, "train.report_to": "none",
        "eval.batch_size": 8, "eval.max_new_tokens": 8,
        # what 60 steps teach so small a model hangs on GPT-2's own dropout draws, which the batches' shapes
        # decide: with these widths, in rows, it answers one colour word (with widths of 64, or in one row, it
        # answers strings such as "purple yellow" or "purple purple really", no span of any paragraph)
        "train.pad_to_multiple": 1, "train.one_row": False,
    }  # fmt: skip
    run = root / "tiny-reader"
    run_experiment(apply_overrides(ExperimentConfig(), list(overrides.items())), run, progress=False)
    return run

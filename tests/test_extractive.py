"""Extractive decoding (eval.extractive): every answer is a token span of its paragraph, in both generation
paths, the same as a plain one-question greedy loop with the allowed tokens found by brute force; with it off
the answers are the plain greedy ones, unchanged; and ask, predict and a run's evaluation still agree."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from loraqa.cli import main
from loraqa.data import load_squad
from loraqa.evaluate import evaluate_model
from loraqa.generate import SpanConstraint, first_line, stop_token_ids
from loraqa.predict import ask, load_answerer
from loraqa.prompt import PromptEncoder

MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny(synthetic_dir):
    """The tiny random GPT-2 in fp32 (zero-shot: its free answers are rarely spans) and 16 dev questions."""
    answerer = load_answerer(model="tiny-random-gpt2", overrides=[("model.precision", "fp32"),
                                                                  ("eval.max_new_tokens", MAX_NEW)])  # fmt: skip
    examples, _ = load_squad(synthetic_dir / "dev-v1.1.json", split="dev")
    return answerer, examples[:16]


def _answers(answerer, examples, **eval_changes) -> list[str]:
    cfg = dataclasses.replace(answerer.cfg.eval, **eval_changes)
    records, _ = evaluate_model(answerer.model, answerer.tokenizer, examples, eval_cfg=cfg, progress=False,
                                max_length=answerer.cfg.prompt.max_length)  # fmt: skip
    return [r.get("generated", r["prediction"]) for r in records]


def _occurs(seq: list[int], ctx: list[int]) -> bool:
    return any(ctx[j : j + len(seq)] == seq for j in range(len(ctx) - len(seq) + 1))


@torch.inference_mode()
def _reference(answerer, examples, extractive: bool) -> list[str]:
    """One question at a time, the whole sequence through the model at every step; with ``extractive`` the
    allowed tokens by brute force: those that keep the answer a token span of the context (stops after one)."""
    model, tok = answerer.model, answerer.tokenizer
    encoder = PromptEncoder(tok, max_length=answerer.cfg.prompt.max_length)
    stops = set(stop_token_ids(tok))
    out = []
    for ex in examples:
        context_part, question_part = encoder.encode_prompt_parts(ex.context, ex.question)
        ctx, ids, new = encoder.context_tokens(context_part), context_part + question_part, []
        for _ in range(MAX_NEW):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            if extractive:
                allowed = [t for t in set(ctx) | stops if (t in stops and new) or _occurs(new + [t], ctx)]
                blocked = torch.ones_like(logits, dtype=torch.bool)
                blocked[allowed] = False
                logits = logits.masked_fill(blocked, float("-inf"))
            new.append(int(logits.argmax()))
            if new[-1] in stops:
                break
        out.append(first_line(tok.decode(new, skip_special_tokens=True)))
    return out


def test_extractive_answers_are_spans_of_the_context_in_both_paths(tiny):
    answerer, examples = tiny
    invariant = _answers(answerer, examples, extractive=True, batch_invariant=True)
    batched = _answers(answerer, examples, extractive=True, batch_invariant=False, batch_size=5)
    assert invariant == batched  # fp32: the two paths agree
    assert all(answer in ex.context for ex, answer in zip(examples, invariant, strict=True))
    assert all(invariant)  # at least one token, and no stop token inside the context
    assert invariant == _reference(answerer, examples, extractive=True)
    free = _answers(answerer, examples)
    assert any(a not in ex.context for ex, a in zip(examples, free, strict=True))  # the constraint bites


def test_without_extractive_the_answers_are_the_plain_greedy_ones(tiny):
    answerer, examples = tiny
    reference = _reference(answerer, examples, extractive=False)
    assert _answers(answerer, examples, extractive=False) == reference
    assert _answers(answerer, examples, extractive=False, batch_invariant=False, batch_size=5) == reference


def test_span_constraint_follows_pruned_rows():
    """Rows dropped from the batch take their state with them; a span at the context's end may only stop."""
    span = SpanConstraint([[5, 6, 7, 5, 6], [1, 2, 3]], stop_ids=[0])
    logits = torch.zeros(2, 10)
    first = [[0, 5], [0, 6], [0, 7], [1, 1], [1, 2], [1, 3]]  # (row, token): any context token, no stop yet
    assert torch.isfinite(span.mask(logits)).nonzero().tolist() == first
    span.advance([5, 3])
    span.keep([1])  # row 0 stopped and left the batch
    assert torch.isfinite(span.mask(logits[:1])).nonzero().tolist() == [[0, 0]]
    span = SpanConstraint([[5, 6, 7, 5, 6]], stop_ids=[0])
    span.advance([5])
    assert torch.isfinite(span.mask(logits[:1])).nonzero()[:, 1].tolist() == [0, 6]


def test_extractive_ask_predict_and_the_run_agree(answering_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(answering_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["eval"]["extractive"] = True  # what ask and predict read
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["eval", str(run), "data.eval_limit=8", "-o", str(tmp_path / "ev")]) == 0
    scored = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    dev = Path(cfg["data"]["data_dir"]) / "dev-v1.1.json"
    out = tmp_path / "answers.jsonl"
    assert main(["predict", str(run), "-i", str(dev), "-o", str(out), "--batch-size", "3"]) == 0
    predicted = {json.loads(x)["id"]: json.loads(x)["answer"] for x in out.read_text().splitlines()}
    assert {i: predicted[i] for i in scored} == scored
    answerer = load_answerer(str(run))
    assert answerer.cfg.eval.extractive
    by_id = {ex.id: ex for ex in load_squad(dev, split="dev")[0]}
    alone = {i: ask(answerer, [by_id[i].question], by_id[i].context)[0] for i in scored}
    assert alone == scored
    assert all(a in by_id[i].context for i, a in alone.items())

"""Extractive decoding (eval.extractive): every answer is a piece of its paragraph's text, in both generation
paths, the same as a plain one-question greedy loop that checks every token in score order; a free answer that
is already a piece of the paragraph is kept as it is; with it off the answers are the plain greedy ones,
unchanged; and ask, predict and a run's evaluation still agree."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from loraqa.answering import answer, load_answerer
from loraqa.cli import main
from loraqa.data import load_squad
from loraqa.generate import SpanConstraint, first_line, span_text, stop_token_ids
from loraqa.predict import ask
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
    max_length = answerer.cfg.prompt.max_length
    records, _ = answer(answerer.model, answerer.tokenizer, examples, cfg, max_length=max_length, progress=False)
    return [r.get("generated", r["prediction"]) for r in records]


@torch.inference_mode()
def _reference(answerer, examples, extractive: bool) -> list[str]:
    """One question at a time, the whole sequence through the model at every step; with ``extractive`` the
    best-scoring token whose text keeps the answer in the context (a stop token once the answer has text)."""
    model, tok = answerer.model, answerer.tokenizer
    encoder = PromptEncoder(tok, max_length=answerer.cfg.prompt.max_length)
    stops = set(stop_token_ids(tok))
    out = []
    for ex in examples:
        context_part, question_part = encoder.encode_prompt_parts(ex.context, ex.question)
        ctx, ids, new = ex.context, context_part + question_part, []
        for _ in range(MAX_NEW):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            if extractive:
                answer = (span_text(first_line(tok.decode(new, skip_special_tokens=True))) or "").strip()
                for t in logits.argsort(descending=True, stable=True).tolist():
                    text = span_text(first_line(tok.decode(new + [t], skip_special_tokens=True)))
                    if (t in stops and answer) or (t not in stops and text is not None and text in ctx):
                        break
                new.append(t)
            else:
                new.append(int(logits.argmax()))
            if new[-1] in stops:
                break
        text = first_line(tok.decode(new, skip_special_tokens=True))
        out.append((span_text(text) or "").strip() if extractive else text)
    return out


def test_extractive_answers_are_spans_of_the_context_in_both_paths(tiny):
    answerer, examples = tiny
    invariant = _answers(answerer, examples, extractive=True, batch_invariant=True)
    batched = _answers(answerer, examples, extractive=True, batch_invariant=False, batch_size=5)
    assert invariant == batched  # fp32: the two paths agree
    assert all(answer in ex.context for ex, answer in zip(examples, invariant, strict=True))
    assert any(invariant)  # (an answer can be empty only when max_new_tokens ends it before it has text)
    assert invariant == _reference(answerer, examples, extractive=True)
    free = _answers(answerer, examples)
    assert any(a not in ex.context for ex, a in zip(examples, free, strict=True))  # the constraint bites


def test_without_extractive_the_answers_are_the_plain_greedy_ones(tiny):
    answerer, examples = tiny
    reference = _reference(answerer, examples, extractive=False)
    assert _answers(answerer, examples, extractive=False) == reference
    assert _answers(answerer, examples, extractive=False, batch_invariant=False, batch_size=5) == reference


class _CharTokenizer:
    """One character a token (id = code point; "#" for the ids of spaces and control characters), id 0 the
    stop: enough to drive SpanConstraint by hand."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) if chr(i).isprintable() and not chr(i).isspace() else "#" for i in ids if i)


def _scores(*best_first: str) -> torch.Tensor:
    scores = torch.zeros(128)
    for rank, ch in enumerate(best_first):
        scores[0 if ch == "<stop>" else ord(ch)] = 100.0 - rank
    return scores


def test_span_constraint_picks_the_best_token_that_keeps_a_piece_of_the_context():
    span = SpanConstraint(_CharTokenizer(), ["Levi's Stadium", "in 1990"], stop_ids=[0])
    # row 0: "x" is not in its context, "<stop>" has no answer to end yet; row 1: "1" is best and allowed
    assert span.pick(torch.stack([_scores("x", "<stop>", "S"), _scores("1", "x")])).tolist() == [ord("S"), ord("1")]
    span.keep([1])  # row 0 stopped and left the batch: row 1 keeps its own answer
    assert span.pick(_scores("x", "9")[None]).tolist() == [ord("9")]
    assert span.pick(_scores("<stop>", "9")[None]).tolist() == [0]  # an answer may end once it has text
    tied = torch.zeros(128)
    tied[[ord("s"), ord("S")]] = 1.0  # a tie (frequent in bf16): the lower id, as argmax picks it
    assert SpanConstraint(_CharTokenizer(), ["Stress, stress"], stop_ids=[0]).pick(tied[None]).tolist() == [ord("S")]
    span = SpanConstraint(_CharTokenizer(), ["ab"], stop_ids=[0])
    span.pick(_scores("a")[None]), span.pick(_scores("b")[None])
    assert span.pick(_scores("c", "d")[None]).tolist() == [0]  # no continuation left: stop


def test_span_text_keeps_one_incomplete_last_character():
    assert span_text("Zürich") == "Zürich"
    assert span_text("Z\ufffd") == "Z"  # the first byte of "ü": the next token may complete it
    assert span_text("Z\ufffd\ufffd") is None  # two undecodable pieces are never one character


def test_a_free_answer_that_is_a_piece_of_the_context_is_kept(answering_run, synthetic_dir):
    # the trained run answers a colour word, which some paragraphs hold and some do not: both kinds are checked
    answerer = load_answerer(str(answering_run))
    examples, _ = load_squad(synthetic_dir / "dev-v1.1.json", split="dev")
    free = _answers(answerer, examples)
    extractive = _answers(answerer, examples, extractive=True)
    kept = [i for i, (ex, a) in enumerate(zip(examples, free, strict=True)) if a and a in ex.context]
    assert 0 < len(kept) < len(examples)
    assert all(extractive[i] == free[i] for i in kept)
    assert all(extractive[i] in examples[i].context for i in range(len(examples)))


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


def test_a_squad_v2_runs_no_answer_stays_allowed_in_extractive_decoding():
    """No paragraph holds the no-answer text: it is allowed beside the context's pieces, as it is or begun,
    and nothing else that merely starts like it."""
    span = SpanConstraint(_CharTokenizer(), ["in 1990"], stop_ids=[0], also=["void"])
    for ch in "void":
        assert span.pick(_scores(ch, "i")[None]).tolist() == [ord(ch)]
    assert span.pick(_scores("s", "<stop>")[None]).tolist() == [0]  # "voids" is neither: the answer ends
    begun = SpanConstraint(_CharTokenizer(), ["in 1990"], stop_ids=[0], also=["void"])
    begun.pick(_scores("v")[None]), begun.pick(_scores("o")[None])
    assert begun.pick(_scores("<stop>", "i")[None]).tolist() == [ord("i")]  # "vo" is no answer to end at
    plain = SpanConstraint(_CharTokenizer(), ["in 1990"], stop_ids=[0])
    assert plain.pick(_scores("v", "i")[None]).tolist() == [ord("i")]


def test_an_extractive_squad_v2_evaluation_can_answer_its_no_answer():
    """A model whose greedy answer is the no-answer (second choice: a word of the paragraph) keeps it under
    eval.extractive, as without: the official "" it scores as."""
    import types

    from transformers import GPT2Config

    from loraqa.config import EvalConfig
    from loraqa.data import Example
    from loraqa.model import load_gpt2_tokenizer

    tok = load_gpt2_tokenizer()
    script = tok(" unanswerable", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    example = Example("q1", "", "The kite in the harbor is green.", "What color is the boat?", (), (),
                      is_impossible=True)  # fmt: skip
    prompt_length = len(PromptEncoder(tok).encode_prompt(example.context, example.question))

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = GPT2Config(vocab_size=len(tok))

        def forward(self, input_ids, position_ids=None, **kwargs):
            step = int(position_ids[0, -1]) + 1 - prompt_length
            logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(tok))
            logits[..., tok(" green")["input_ids"][0]] = 1.0
            logits[..., script[min(max(step, 0), len(script) - 1)]] = 5.0
            return types.SimpleNamespace(logits=logits)

    for extractive in (False, True):
        records, summary = answer(Scripted(), tok, [example], EvalConfig(extractive=extractive, max_new_tokens=6),
                                  progress=False, unanswerable_answer="unanswerable")  # fmt: skip
        assert (records[0]["generated"], records[0]["prediction"]) == ("unanswerable", ""), extractive
        assert summary["NoAns_exact"] == 100.0

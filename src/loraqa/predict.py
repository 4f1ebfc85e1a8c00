"""Use a trained run (or a base model, zero-shot): answer the questions of a file, or questions typed in.

Both go through :func:`loraqa.answering.evaluate_model`, the batched generation path evaluation uses (shared
paragraphs run once, KV cache, sorted batches), with the run's own prompt length and evaluation settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .answering import evaluate_model
from .config import ConfigError, ExperimentConfig, apply_overrides
from .data import Example, detect_format, load_file
from .io import write_jsonl_atomic

log = logging.getLogger(__name__)


@dataclass
class Answerer:
    cfg: ExperimentConfig  # the run's config (or the defaults with model.name, zero-shot)
    model: object
    tokenizer: object

    def answer(self, examples: list[Example], progress: bool = False) -> tuple[list[dict], dict]:
        """Per-question records and the EM/F1 summary over the questions that have gold answers."""
        return evaluate_model(
            self.model, self.tokenizer, examples, max_length=self.cfg.prompt.max_length, eval_cfg=self.cfg.eval,
            progress=progress, unanswerable_answer=self.cfg.data.no_answer_text(),
        )  # fmt: skip


def load_answerer(run_dir: str | None = None, *, model: str | None = None, device: str | None = None,
                  overrides: list[tuple[str, object]] = ()) -> Answerer:  # fmt: skip
    """A trained run folder (through `load_run`), or with ``model`` and no run the base model zero-shot."""
    if run_dir:
        if model:
            raise ConfigError("give a run folder or --model (zero-shot), not both")
        from .rundir import load_run

        run = load_run(run_dir, overrides=list(overrides), device=device)
        return Answerer(run.cfg, run.model, run.lm.tokenizer)
    if not model:
        raise ConfigError(
            "give a run folder made by `loraqa train`, or --model NAME to ask a base model zero-shot"
        )
    from .model import load_model_and_tokenizer, prepare_for_generation

    cfg = apply_overrides(ExperimentConfig(), [("model.name", model), *overrides])
    lm = load_model_and_tokenizer(cfg.model.name, cfg.model.precision, cfg.model.attn_implementation, device)
    return Answerer(cfg, prepare_for_generation(lm.model, precision=lm.precision), lm.tokenizer)


def predict_file(answerer: Answerer, source: str | Path, output: str | Path, *, fmt: str | None = None,
                 progress: bool = True) -> dict:  # fmt: skip
    """Answer every question of ``source`` (any data format; detected from the name when ``fmt`` is None)
    and write ``output``: JSONL, one ``{"id", "answer"}`` a line, in input order (for a SQuAD 2.0 run the
    no-answer is ``""``, as in the official format). Returns the summary: EM/F1 over the questions with gold
    answers (``n_questions``; 0 when the input has none), ``n_answered``, and the load report's line."""
    fmt = fmt or detect_format(source)
    examples, report = load_file(source, fmt, split="dev")
    log.info(report.summary())
    records, summary = answerer.answer(examples, progress=progress)
    write_jsonl_atomic(output, [{"id": r["id"], "answer": r["prediction"]} for r in records])
    return {**summary, "n_answered": len(records), "format": fmt, "load_report": report.summary()}


def ask(answerer: Answerer, questions: list[str], context: str) -> list[str]:
    """The model's answers to ``questions`` about one ``context`` (the text it generated)."""
    examples = [Example(f"q{i}", "", context, q, (), ()) for i, q in enumerate(questions)]
    records, _ = answerer.answer(examples)
    return [r.get("generated", r["prediction"]) for r in records]

"""Turn SQuAD examples into prompt text, token ids and answer-only labels.

The format is the reference study's::

    Context: {context}
    Question: {question}
    Answer: {answer}<eos>

Tokens are built piece by piece (prefix, context, question part, answer, EOS) rather than by tokenizing
the whole string. Two things follow, and both are the point:

* the evaluation prompt (everything up to ``Answer:``) is by construction a prefix of the training tokens
  of the same example: a BPE tokenizer given the whole string could merge the last prompt character with
  the first answer character and the model would be trained on a boundary it never sees at test time;
* a too-long context can be cut to a window of its own tokens that still holds the answer span, without
  re-tokenizing and re-measuring.

Labels are the input ids with every position that is not part of the answer (the prompt, the padding)
set to -100, so the loss sees only the answer tokens and the EOS (``loss_on="all"`` trains on every real
token instead, the ablation of the reference study's section 8.2).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .config import PromptConfig

IGNORE_INDEX = -100
CONTEXT_PREFIX = "Context:"
QUESTION_PART = "\nQuestion: {question}\nAnswer:"


def format_prompt(context: str, question: str) -> str:
    """The evaluation prompt as text (ends right after ``Answer:``)."""
    return f"{CONTEXT_PREFIX} {context}{QUESTION_PART.format(question=question)}"


def format_example(context: str, question: str, answer: str) -> str:
    """The training text without the EOS token."""
    return f"{format_prompt(context, question)} {answer}"


@dataclass
class PromptStats:
    """What happened while encoding a set of examples (reported after every run)."""

    encoded: int = 0
    truncated: int = 0
    questions_cut: int = 0  # evaluation prompts whose question alone was over the prompt length
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        cut = f", {self.questions_cut} with the question cut to fit" if self.questions_cut else ""
        return (
            f"{self.encoded} encoded, {self.truncated} with the context cut to fit{cut}, skipped: {skipped}"
        )


class PromptEncoder:
    """Encodes examples for one tokenizer as the ``prompt`` section asks: ``max_length`` (tokens, EOS included)
    and ``loss_on``. Either can be given as a keyword instead, over the section's (or, without one, the default
    section's) value: ``PromptEncoder(tok, max_length=96)``."""

    def __init__(
        self,
        tokenizer,
        prompt: PromptConfig | None = None,
        *,
        max_length: int | None = None,
        loss_on: str | None = None,
    ):
        prompt = prompt if prompt is not None else PromptConfig()
        max_length = prompt.max_length if max_length is None else max_length
        loss_on = prompt.loss_on if loss_on is None else loss_on
        if loss_on not in ("answer", "all"):
            raise ValueError(f"prompt.loss_on must be 'answer' or 'all', got {loss_on!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the answer needs one to end")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.loss_on = loss_on
        self.eos_id = tokenizer.eos_token_id
        self._prefix_ids = self._ids(CONTEXT_PREFIX)

    def _ids(self, text: str) -> list[int]:
        # BOS is never added: whether a tokenizer adds one depends on its version, and the prompt
        # must encode the same everywhere (training, evaluation, benchmarks).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _context(self, context: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(" " + context, add_special_tokens=False, return_offsets_mapping=True)
        # offsets are into " " + context; shift them back onto the context itself
        return enc["input_ids"], [(max(s - 1, 0), max(e - 1, 0)) for s, e in enc["offset_mapping"]]

    def _question(self, question: str) -> list[int]:
        return self._ids(QUESTION_PART.format(question=question))

    def encode_prompt(self, context: str, question: str, stats: PromptStats | None = None) -> list[int]:
        """Token ids of the evaluation prompt. A context too long for ``max_length`` keeps its beginning
        (the answer is unknown at test time) and is counted in ``stats.truncated``."""
        context_part, question_part = self.encode_prompt_parts(context, question, stats)
        return context_part + question_part

    def encode_prompt_parts(
        self, context: str, question: str, stats: PromptStats | None = None
    ) -> tuple[list[int], list[int]]:
        """The evaluation prompt as (its ``Context: ...`` tokens, its ``\nQuestion: ...\nAnswer:`` tokens):
        questions on one paragraph have the same first part."""
        ctx_ids, _ = self._context(context)
        q_ids = self._question(question)
        budget = self.max_length - len(self._prefix_ids) - len(q_ids)
        if budget < 0:  # the question alone is too long: no context, and its last tokens (``...\nAnswer:``)
            if stats is not None:
                stats.questions_cut += 1
            return self._prefix_ids, q_ids[len(q_ids) - (self.max_length - len(self._prefix_ids)) :]
        if budget < len(ctx_ids):
            ctx_ids = ctx_ids[: max(budget, 0)]
            if stats is not None:
                stats.truncated += 1
        return self._prefix_ids + ctx_ids, q_ids

    def context_tokens(self, context_part: list[int]) -> list[int]:
        """The context's own tokens in a prompt's context part (from :meth:`encode_prompt_parts`): without the
        ``Context:`` prefix, so each word keeps the leading space it has after ``Answer:``."""
        return context_part[len(self._prefix_ids) :]

    def encode_train(
        self,
        context: str,
        question: str,
        answer: str,
        answer_start: int | None = None,
        stats: PromptStats | None = None,
        answer_in_context: bool = True,
    ) -> dict | None:
        """``{"input_ids", "labels", "prompt_length", "context_length"}`` for one training example, or None when
        it is skipped. ``context_length`` is where the ``Context: ...`` tokens end and the question segment
        (``\nQuestion: ...\nAnswer: ...<eos>``) starts: questions whose ids agree up to there share their
        context in shared-context training (:mod:`loraqa.packing`).

        An example longer than ``max_length`` keeps a window of its context that still contains the answer
        span (located with ``answer_start``, else by searching the text); it is skipped only when the
        question and answer alone do not fit, or the answer cannot be located in the context.
        ``answer_in_context=False`` (the no-answer text of an unanswerable question) keeps the context's
        beginning instead, as at test time.
        """
        stats = stats if stats is not None else PromptStats()
        if answer_start is not None:  # it points at the text as given: past any whitespace stripped here
            answer_start += len(answer) - len(answer.lstrip())
        answer = answer.strip()
        if not answer:
            stats.skipped["empty answer"] += 1
            return None
        ctx_ids, offsets = self._context(context)
        q_ids = self._question(question)
        a_ids = self._ids(" " + answer) + [self.eos_id]
        budget = self.max_length - len(self._prefix_ids) - len(q_ids) - len(a_ids)
        if budget <= 0:
            stats.skipped["question and answer longer than max_length"] += 1
            return None
        if len(ctx_ids) > budget and not answer_in_context:
            ctx_ids = ctx_ids[:budget]
            stats.truncated += 1
        elif len(ctx_ids) > budget:
            window = _answer_window(context, answer, answer_start, offsets, budget)
            if window is None:
                stats.skipped["answer does not fit in a context window"] += 1
                return None
            ctx_ids = ctx_ids[window[0] : window[1]]
            stats.truncated += 1
        prompt = self._prefix_ids + ctx_ids + q_ids
        input_ids = prompt + a_ids
        if self.loss_on == "answer":
            labels = [IGNORE_INDEX] * len(prompt) + a_ids
        else:
            labels = list(input_ids)
        stats.encoded += 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "prompt_length": len(prompt),
            "context_length": len(self._prefix_ids) + len(ctx_ids),
        }


def _answer_window(
    context: str, answer: str, answer_start: int | None, offsets: list[tuple[int, int]], budget: int
) -> tuple[int, int] | None:
    """[first, last) context-token window of ``budget`` tokens, centred on the answer span."""
    if answer_start is None or context[answer_start : answer_start + len(answer)] != answer:
        answer_start = context.find(answer)
        if answer_start < 0:
            return None
    answer_end = answer_start + len(answer)
    covering = [i for i, (s, e) in enumerate(offsets) if s < answer_end and e > answer_start]
    if not covering:
        return None
    first, last = covering[0], covering[-1] + 1
    if last - first > budget:
        return None
    spare = budget - (last - first)
    start = max(0, min(first - spare // 2, len(offsets) - budget))
    return start, start + budget


def encode_train_set(
    encoder: PromptEncoder, examples, unanswerable_answer: str | None = None
) -> tuple[list[dict], PromptStats]:
    """Encode the first gold answer of every example (``unanswerable_answer`` for an unanswerable one);
    returns the features and what was cut or skipped."""
    stats = PromptStats()
    features = []
    for ex in examples:
        if getattr(ex, "is_impossible", False) and unanswerable_answer is not None:
            feat = encoder.encode_train(
                ex.context, ex.question, unanswerable_answer, None, stats, answer_in_context=False
            )
        elif not ex.answers:
            stats.skipped["no gold answer"] += 1
            continue
        else:
            feat = encoder.encode_train(ex.context, ex.question, ex.answers[0], ex.answer_starts[0], stats)
        if feat is not None:
            features.append(feat)
    return features, stats

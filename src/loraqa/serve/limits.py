"""What one request may hold, checked before it is queued, and where an answer lies in its paragraph."""

from __future__ import annotations

import copy
import re

from ..prompt import CONTEXT_PREFIX, QUESTION_PART
from .schema import AnswerRequest

QUESTION_TOKENS = 64  # room kept in the prompt for "\nQuestion: {question}\nAnswer:"
# a context or question with more characters than this per allowed token is refused untokenized (tokenizing a
# megabyte would hold up every other client: the check runs on the server's event loop)
CHARS_PER_TOKEN_CAP = 50


class InputError(Exception):
    """A request the server refuses: ``status``, the ``field`` at fault and a message for a person."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with a 413 (an HTTPException for the
    app's JSON error handler) before it is read: at once by its Content-Length, or, sent in chunks, once that
    many bytes have come. Written here: Starlette's own limit (FastAPI's ``max_body_size``) answers a body
    announced too long in plain text, whatever the app's error handlers say."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        seen = int(length) if length.isdigit() else 0

        async def counted():
            nonlocal seen
            if seen > self.limit:
                raise HTTPException(413)
            message = await receive()
            if message["type"] == "http.request" and not length.isdigit():
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413)
            return message

        return await self.app(scope, counted, send)


def prompt_length_limit(answerer) -> int:
    """The prompt tokens the answerer generates from (:func:`loraqa.answering.prompt_length`): the run's
    ``prompt.max_length``, less the room for the answer where the model's positions would not hold both."""
    from ..answering import prompt_length

    return prompt_length(answerer.model, answerer.cfg.prompt.max_length, answerer.cfg.eval.max_new_tokens)


class InputLimits:
    """Checks a request against the model's length and the server's limits.

    Counts tokens with its own copy of the tokenizer: the worker thread uses the answerer's, and a fast
    tokenizer is not safe to share between threads."""

    def __init__(self, answerer, max_questions: int, question_tokens: int = QUESTION_TOKENS):
        self.tokenizer = copy.deepcopy(answerer.tokenizer)
        self.max_questions = max_questions
        self.question_tokens = question_tokens
        prefix = self._count(CONTEXT_PREFIX)
        # what encode_prompt keeps of a context: the rest of max_length after "Context:" and the question part
        self.context_tokens = prompt_length_limit(answerer) - prefix - question_tokens
        if self.context_tokens < 1:
            raise ValueError(
                f"prompt.max_length {answerer.cfg.prompt.max_length} leaves no room for a context "
                f"after {question_tokens} tokens for the question"
            )

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check(self, request: AnswerRequest) -> None:
        """Raise :class:`InputError` (422) naming the first field over a limit."""
        if len(request.questions) > self.max_questions:
            raise InputError(
                422,
                "questions",
                f"{len(request.questions)} questions; at most {self.max_questions} in one request",
            )
        for i, question in enumerate(request.questions):
            if len(question) > CHARS_PER_TOKEN_CAP * self.question_tokens:
                raise InputError(
                    422,
                    f"questions[{i}]",
                    f"is over {self.question_tokens} tokens with its prompt ({len(question):,} characters)",
                )
            n = self._count(QUESTION_PART.format(question=question))
            if n > self.question_tokens:
                raise InputError(
                    422, f"questions[{i}]", f"is {n} tokens with its prompt; at most {self.question_tokens}"
                )
        too_long = f"is over the model's length: at most {self.context_tokens} tokens"
        if len(request.context) > CHARS_PER_TOKEN_CAP * self.context_tokens:
            raise InputError(422, "context", f"{too_long} ({len(request.context):,} characters)")
        n = self._count(" " + request.context)  # as the prompt encodes it: after "Context:" and a space
        if n > self.context_tokens:
            raise InputError(422, "context", f"{too_long}, got {n}")

    def max_body_bytes(self) -> int:
        """The largest request body worth reading: every field at its character cap, each character a 6-byte JSON
        escape (``\\uXXXX``), and room for the JSON around them; a longer body is refused unread (413)."""
        chars = CHARS_PER_TOKEN_CAP * (self.context_tokens + self.max_questions * self.question_tokens)
        return 6 * chars + 4096

    def describe(self) -> dict:
        return {
            "max_body_bytes": self.max_body_bytes(),
            "max_questions": self.max_questions,
            "context_tokens": self.context_tokens,
            "question_tokens": self.question_tokens,
        }


def find_span(context: str, answer: str) -> tuple[int, int] | None:
    """``[start, end)`` of ``answer`` in ``context``: the first occurrence that is whole words ("gold" in
    "gold-themed", not in "golden"), else the first anywhere; exact first, then ignoring case. None for an
    empty answer or one that does not occur."""
    if not answer:
        return None
    # a boundary is asked for only at an edge of the answer that is a word character
    before = r"(?<!\w)" if re.match(r"\w", answer[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", answer[-1]) else ""
    text = re.escape(answer)
    for pattern, flags in (
        (before + text + after, 0),
        (text, 0),
        (before + text + after, re.IGNORECASE),
        (text, re.IGNORECASE),
    ):
        match = re.search(pattern, context, flags)
        if match:
            return match.span()
    return None

"""The JSON the API takes and gives (pydantic models: FastAPI validates requests and documents both in /docs)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty")
    try:
        text.encode("utf-8")  # JSON lets a lone surrogate (\ud800) through; the tokenizer cannot take it
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text (a lone surrogate escape)") from None
    return text


class AnswerRequest(BaseModel):
    """One paragraph and the questions asked about it."""

    model_config = ConfigDict(
        extra="forbid",  # a misspelt field ("question") is an error naming it, not silently ignored
        json_schema_extra={
            "examples": [
                {
                    "context": "The Denver Broncos defeated the Carolina Panthers 24-10 at Levi's Stadium in Santa Clara.",
                    "questions": ["Who won?", "Where was the game played?"],
                }
            ]
        },
    )

    context: Annotated[str, AfterValidator(_not_blank)] = Field(
        description="the paragraph the answers are in (its length is limited in tokens: see GET /health)"
    )
    questions: list[Annotated[str, AfterValidator(_not_blank)]] = Field(
        min_length=1,
        description="questions about the paragraph, answered in order (at most: see GET /health)",
    )


class Answer(BaseModel):
    question: str
    answer: str = Field(description="the model's answer: the first line of its greedy continuation")
    span: tuple[int, int] | None = Field(
        description="[start, end): character offsets of the answer in the context where it occurs "
        "(the first occurrence; case-insensitive when no exact one), else null"
    )
    seconds: float = Field(description="from the request's arrival to its answers: queue wait and generation")


class AnswerResponse(BaseModel):
    answers: list[Answer] = Field(description="one per question, in the order asked")
    batch_questions: int = Field(
        description="questions answered together with these (this request's included)"
    )


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong, for a person to read")
    field: str | None = Field(
        description="the request field at fault (questions[2], context, body), if one is"
    )

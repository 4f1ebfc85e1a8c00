"""The FastAPI app: POST /v1/answer, GET /health, GET / (the page), and FastAPI's own /docs.

Every error is JSON ``{"error", "field"}`` with a 4xx status for the client's mistakes (the field at fault
named), 503 when the queue is full (with Retry-After) and 500 when the model fails; never a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..layout import METRICS_FILE
from ..metrics import ZERO_SHOT
from .batcher import Batcher, QueueFull, WorkerFailed
from .limits import BodyLimit, InputError, InputLimits, find_span
from .schema import Answer, AnswerRequest, AnswerResponse, ErrorResponse
from .settings import ServeSettings

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
CLIENT_GONE = 499  # nginx's "client closed request": logged, never seen by the client that left


def describe_run(answerer, run_dir: str | Path | None) -> dict:
    """What the page and /health say about the model: base, adapter (the run folder's name; None zero-shot),
    EM/F1 from the run's metrics.json when it has one."""
    import torch

    from ..card import portable_model_name

    param = next(answerer.model.parameters(), torch.zeros(()))
    # a local base model by its file name: the page is for others, and this machine's paths are not theirs
    info = {
        "base_model": portable_model_name(answerer.cfg.model.name),
        "adapter": Path(run_dir).resolve().name if run_dir else None,
        "method": ZERO_SHOT if not run_dir else answerer.cfg.train.method,
        "precision": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
        "metrics": None,
    }
    metrics_file = Path(run_dir) / METRICS_FILE if run_dir else None
    if metrics_file and metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
            info["metrics"] = {k: metrics.get(k) for k in ("exact_match", "f1", "n_questions")}
        except (OSError, ValueError) as e:  # the page says so; serving does not depend on it
            log.warning("%s: unreadable (%s); the page shows no EM/F1", metrics_file, e)
    return info


def create_app(
    answerer, *, run_dir: str | Path | None = None, settings: ServeSettings | None = None
) -> FastAPI:
    """The app serving ``answerer`` (:func:`loraqa.answering.load_answerer`): one worker thread holds the model
    from the app's start to its end (run it with uvicorn, or :class:`loraqa.serve.BackgroundServer`)."""
    settings = settings or ServeSettings()
    settings.check()
    limits = InputLimits(answerer, settings.max_questions, settings.question_tokens)
    batcher = Batcher(
        answerer,
        queue_size=settings.queue_size,
        gather=settings.gather_ms / 1000,
        max_batch=settings.max_batch or answerer.cfg.eval.batch_size,
    )
    info = {
        **describe_run(answerer, run_dir),
        **limits.describe(),
        "max_batch": batcher.max_batch,
        "queue_size": settings.queue_size,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(
        title="loraqa serve",
        version="1",
        lifespan=lifespan,
        description="Extractive question answering with a LoRA-tuned causal LM (loraqa).",
    )
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes())
    app.state.batcher, app.state.limits, app.state.info = batcher, limits, info
    _add_error_handlers(app)
    _add_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=f"{field}: {message}" if field else message, field=field)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


BODY_NOT_READ = "There was an error parsing the body"  # FastAPI's 400 for a body it cannot decode, not JSON's

# what a person reads for pydantic's error types (the rest keep pydantic's own message)
_MESSAGES = {
    "missing": "is missing",
    "extra_forbidden": "is not a field of the request (it takes context and questions)",
    "string_type": "must be a string",
    "list_type": "must be a list of strings",
    "too_short": "needs at least one question",
}


def _field_name(loc) -> str:
    """``('body', 'questions', 2)`` -> ``questions[2]``; the body itself -> ``body``."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _problem(error: dict) -> tuple[str, str]:
    """(field, message) of one pydantic error."""
    kind, field = error.get("type", ""), _field_name(error.get("loc", ()))
    if field == "body":  # the body is missing, or is not an object, or was not sent as JSON
        return (
            field,
            'must be a JSON object {"context": "...", "questions": ["..."]} sent as application/json',
        )
    return field, _MESSAGES.get(kind) or str(error.get("msg", "is invalid")).removeprefix("Value error, ")


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors as ``{"error", "field"}``: 400 for a body that is not JSON, else 422 naming
    the first field at fault (the message lists every problem)."""
    errors = exc.errors() or [{"type": "", "loc": ("body",), "msg": "is invalid"}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        where = first["loc"][1] if len(first.get("loc", ())) > 1 else "?"
        reason = (first.get("ctx") or {}).get("error", "not JSON")
        return _error(400, f"malformed JSON ({reason} at character {where})", "body")
    problems = [_problem(e) for e in errors]
    text = "; ".join([problems[0][1]] + [f"{field}: {message}" for field, message in problems[1:]])
    return _error(422, text, problems[0][0])


def _add_error_handlers(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    async def on_input(request: Request, exc: InputError):
        return _error(exc.status, exc.message, exc.field)

    async def on_queue_full(request: Request, exc: QueueFull):
        return _error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})

    async def on_worker(request: Request, exc: WorkerFailed):
        return _error(exc.status, str(exc))

    async def on_http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == BODY_NOT_READ:  # FastAPI's words for a body not UTF-8
            return _error(400, "is not UTF-8 encoded JSON", "body")
        if exc.status_code == 413:
            limit = request.app.state.limits.max_body_bytes()
            return _error(413, f"is over {limit:,} bytes, more than any request within the limits", "body")
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def on_anything(request: Request, exc: Exception):
        # logged with its traceback; the client gets none
        log.error("loraqa serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    for kind, handler in (
        (RequestValidationError, on_validation),
        (InputError, on_input),
        (QueueFull, on_queue_full),
        (WorkerFailed, on_worker),
        (StarletteHTTPException, on_http),
        (Exception, on_anything),
    ):
        app.add_exception_handler(kind, handler)


_ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "malformed JSON"),
        (413, "a body longer than any request within the limits (GET /health: max_body_bytes)"),
        (422, "a field is missing, empty or over a limit (named in `field`)"),
        (500, "the model failed"),
        (503, "the queue is full (see Retry-After) or the server is stopping"),
    )
}


def _add_routes(app: FastAPI) -> None:
    from ..answering import generated_text  # imported with the model, not with the app

    batcher: Batcher = app.state.batcher

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health", summary="whether the server answers, and the model it serves")
    async def health():
        ok = batcher.alive()
        return JSONResponse(
            {"ok": ok, **app.state.info, "queue": batcher.snapshot()}, status_code=200 if ok else 503
        )

    @app.post(
        "/v1/answer",
        response_model=AnswerResponse,
        responses=_ERRORS,
        summary="answer questions about a paragraph",
    )
    async def answer(body: AnswerRequest, request: Request):
        app.state.limits.check(body)
        job = batcher.submit(body.context, body.questions)
        result = await _wait_unless_gone(batcher, job, request)
        if result is None:
            return Response(status_code=CLIENT_GONE)
        seconds = round(result["seconds"], 3)
        answers = []
        for record in result["records"]:
            text = generated_text(record)  # a SQuAD 2.0 run's own text, as `ask` gives
            answers.append(
                Answer(
                    question=record["question"],
                    answer=text,
                    span=find_span(body.context, text),
                    seconds=seconds,
                )
            )
        return AnswerResponse(answers=answers, batch_questions=result["batch_questions"])


async def _wait_unless_gone(batcher: Batcher, job, request: Request) -> dict | None:
    """The job's result, or None when the client disconnects first (the job is then cancelled)."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # uvicorn cancels the handler: the server stops before the answers came
        batcher.cancel(job)
        task = asyncio.current_task()
        if task is not None and hasattr(task, "uncancel"):  # Python 3.11+: the cancellation is answered here
            task.uncancel()
        # a JSON 503 for the client, where the cancellation itself would reach it as a plain-text 500
        raise WorkerFailed("the server is stopping", status=503) from None
    finally:
        gone.cancel()
    if job.future in done:
        return job.future.result()  # WorkerFailed propagates to its handler
    batcher.cancel(job)
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the next ASGI message is the
    disconnect (or, after the response, nothing that matters: this is cancelled by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # another message (none is expected): never a busy loop

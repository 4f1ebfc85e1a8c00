"""loraqa serve against a live uvicorn server on a free loopback port: answers and spans, every bad input,
many clients at once, a full queue, a client that hangs up, a batch that fails, and the command itself.

Every wait is bounded in time; every server is stopped when its test or module ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from helpers import ALL_COLOURS, COLOUR_QUESTIONS, wait_until
from loraqa.answering import load_answerer
from loraqa.cli import main
from loraqa.predict import ask
from loraqa.serve import BackgroundServer, ServeSettings, create_app
from loraqa.serve.limits import find_span

TIMEOUT = 60  # seconds for any one HTTP call


@pytest.fixture(scope="module")
def answerer(answering_run):
    return load_answerer(str(answering_run))


@pytest.fixture(scope="module")
def reference(answering_run):
    """A second copy of the run, answering one question at a time outside the server."""
    return load_answerer(str(answering_run))


@pytest.fixture(scope="module")
def server(answerer, answering_run):
    with BackgroundServer(create_app(answerer, run_dir=answering_run)) as live:
        yield live


def post(url: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/answer", json=body, timeout=TIMEOUT, **kw)


def queue_stats(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=TIMEOUT).json()["queue"]


def one_at_a_time(reference, context: str, questions: list[str]) -> list[str]:
    """The answers of the run called directly, one question a call."""
    return [ask(reference, [q], context)[0] for q in questions]


# ---------------------------------------------------------------------------------------------- answers


def test_health_names_the_run_its_scores_and_limits(server, answering_run):
    info = httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()
    metrics = json.loads((answering_run / "metrics.json").read_text())
    assert info["ok"] is True and info["base_model"] == "tiny-random-gpt2"
    assert info["adapter"] == answering_run.name and info["method"] == "lora"
    assert info["metrics"] == {k: metrics[k] for k in ("exact_match", "f1", "n_questions")}
    # 512 prompt tokens less "Context:" (2 GPT-2 tokens) and the 64 kept for the question
    assert info["context_tokens"] == 512 - 2 - 64 and info["max_questions"] == 32
    page = httpx.get(f"{server.url}/", timeout=TIMEOUT)
    assert page.status_code == 200 and "<textarea" in page.text
    for name in ("", "static/page.css", "static/page.js"):  # the page fetches nothing from elsewhere
        text = httpx.get(f"{server.url}/{name}", timeout=TIMEOUT).text
        assert "://" not in text and "@import" not in text, name
    assert httpx.get(f"{server.url}/openapi.json", timeout=TIMEOUT).json()["paths"]["/v1/answer"]["post"]


def test_answers_are_the_models_with_their_spans(server, reference):
    questions = ["What color is the box in the garden?", "What color is the lamp in the museum?",
                 "What color is the hat in the tower?"]  # fmt: skip
    for context in (ALL_COLOURS, "Nothing here has a colour: 1, 2, 3."):
        r = post(server.url, {"context": context, "questions": questions})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [a["question"] for a in body["answers"]] == questions and body["batch_questions"] == 3
        assert [a["answer"] for a in body["answers"]] == one_at_a_time(reference, context, questions)
        for a in body["answers"]:
            assert a["seconds"] > 0
            # a span is where the answer's text is in the paragraph, as written or ignoring case
            if a["span"] is None:
                assert not a["answer"] or a["answer"].lower() not in context.lower(), a
            else:
                start, end = a["span"]
                assert a["answer"] and context[start:end].lower() == a["answer"].lower(), a
    # the tiny reader answers colour words, and this paragraph holds every colour: an answer that is one of its
    # words is a span at the characters the answer reads (which words the reader learnt is not tested here)
    answers = post(server.url, {"context": ALL_COLOURS, "questions": COLOUR_QUESTIONS}).json()["answers"]
    spans = [a for a in answers if a["span"] is not None]
    assert spans, f"the tiny reader answered no word of its paragraph: {[a['answer'] for a in answers]}"
    for a in spans:
        start, end = a["span"]
        assert ALL_COLOURS[start:end] == a["answer"]


def test_find_span():
    assert find_span("The box is red.", "red") == (11, 14)
    assert find_span('the "golden anniversary" with gold-themed', "gold") == (30, 34)  # whole words first
    assert find_span("golden", "gold") == (0, 4)  # else anywhere
    assert find_span("(24–10) won", "(24–10)") == (0, 7)  # punctuation at the edges: no boundary asked
    assert find_span("Red, then red.", "red") == (10, 13)  # the exact occurrence before a case-blind one
    assert find_span("The Box is red.", "the box") == (0, 7)  # case-blind when there is no exact one
    assert find_span("The box is red.", "blue") is None and find_span("The box", "") is None
    assert find_span("café → Köln", "Köln") == (7, 11)  # offsets in characters (code points), not bytes


# ---------------------------------------------------------------------------------------------- bad input

LONG_CONTEXT = " ".join(["word"] * 600)  # 600 GPT-2 tokens: over 446
BAD_INPUTS = [
    # (what, body as sent, status, field)
    ("questions missing", {"context": "The box is red."}, 422, "questions"),
    ("no questions", {"context": "The box is red.", "questions": []}, 422, "questions"),
    ("an empty question", {"context": "The box is red.", "questions": ["What?", "  "]}, 422, "questions[1]"),
    ("a question not a string", {"context": "The box is red.", "questions": [7]}, 422, "questions[0]"),
    ("a question too long", {"context": "x", "questions": ["why " * 100]}, 422, "questions[0]"),
    ("context missing", {"questions": ["What?"]}, 422, "context"),
    ("an empty context", {"context": " \n", "questions": ["What?"]}, 422, "context"),
    ("a context over the model's length", {"context": LONG_CONTEXT, "questions": ["What?"]}, 422, "context"),
    ("too many questions", {"context": "The box is red.", "questions": ["What?"] * 33}, 422, "questions"),
    ("a misspelt field", {"context": "The box is red.", "question": ["What?"]}, 422, "questions"),
    ("not an object", ["The box is red.", "What?"], 422, "body"),
    ("malformed JSON", b'{"context": "The box is red.", "questions": ["What?"', 400, "body"),
    ("an empty body", b"", 422, "body"),
    ("a lone surrogate in the context", b'{"context": "The box \\ud800 is red.", "questions": ["What?"]}', 422,
     "context"),  # fmt: skip
    ("a lone surrogate in a question", b'{"context": "The box is red.", "questions": ["What \\udfff?"]}', 422,
     "questions[0]"),  # fmt: skip
    ("a body not UTF-8", b'{"context": "The box is \xff.", "questions": ["What?"]}', 400, "body"),
]


@pytest.mark.parametrize("what, body, status, field", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_json_error_naming_the_field(server, what, body, status, field):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/answer", content=content, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)  # fmt: skip
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()
    assert error["field"] == field and error["error"].startswith(f"{field}: ")
    assert "Traceback" not in r.text and 'File "' not in r.text
    if what == "a context over the model's length":
        assert "at most 446 tokens, got 600" in error["error"]
    if what == "too many questions":
        assert "at most 32" in error["error"]
    if what == "malformed JSON":
        assert "malformed JSON" in error["error"]
    if what.startswith("a lone surrogate"):
        assert "not valid Unicode text" in error["error"]
    if what == "a body not UTF-8":
        assert error["error"] == "body: is not UTF-8 encoded JSON"


def test_a_body_longer_than_any_valid_request_is_refused_unread(server):
    limit = httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()["max_body_bytes"]
    assert 100_000 < limit < 2_000_000
    r = post(server.url, {"context": "x" * limit, "questions": ["What?"]})
    assert r.status_code == 413 and r.headers["content-type"] == "application/json", r.text
    assert r.json() == {"error": f"body: is over {limit:,} bytes, more than any request within the limits",
                        "field": "body"}  # fmt: skip
    chunks = (b'{"context": "' + b"x" * 50_000 for _ in range(limit // 50_000 + 2))  # no Content-Length
    r = httpx.post(f"{server.url}/v1/answer", content=chunks, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)  # fmt: skip
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_a_huge_question_is_refused_by_its_length(server):
    """A question of 100,000 characters is refused from its length (the message counts characters, not tokens),
    not tokenized on the event loop, which would hold up every other client meanwhile."""
    with ThreadPoolExecutor(1) as pool:
        huge = pool.submit(post, server.url, {"context": "x", "questions": ["why " * 25_000] * 2})
        health = httpx.get(f"{server.url}/health", timeout=TIMEOUT)
        r = huge.result(TIMEOUT)
    assert health.status_code == 200
    assert r.status_code == 422 and r.json()["field"] == "questions[0]"
    assert "100,000 characters" in r.json()["error"]


def test_errors_beyond_the_answer_route_are_json_too(server):
    r = httpx.get(f"{server.url}/no-such-page", timeout=TIMEOUT)
    assert r.status_code == 404 and r.json() == {"error": "Not Found", "field": None}
    r = httpx.get(f"{server.url}/v1/answer", timeout=TIMEOUT)
    assert r.status_code == 405 and "error" in r.json()


# ---------------------------------------------------------------------------------------------- many clients


def concurrent_requests(n: int) -> list[dict]:
    """``n`` different requests: paragraphs of three facts, one to three questions each, some paragraphs shared."""
    colours = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
    objects = ("box", "car", "door", "lamp", "chair", "kite", "boat", "bell")
    requests = []
    for i in range(n):
        para = i // 2  # two requests a paragraph: the batch shares its prefix across requests
        facts = [(objects[(para + k) % 8], colours[(para * 3 + k) % 8]) for k in range(3)]
        context = " ".join(f"The {o} in room {para} is {c}." for o, c in facts)
        questions = [f"What color is the {o} in room {para}?" for o, _ in facts][: 1 + i % 3]
        requests.append({"context": context, "questions": questions})
    return requests


def test_32_concurrent_requests_each_answered_once_like_one_at_a_time(server, reference):
    requests = concurrent_requests(32)
    expected = [one_at_a_time(reference, r["context"], r["questions"]) for r in requests]
    before = queue_stats(server.url)
    start = threading.Barrier(len(requests), timeout=TIMEOUT)

    def client(body):
        start.wait()  # all at once
        return post(server.url, body)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(client, requests, timeout=3 * TIMEOUT))
    assert [r.status_code for r in responses] == [200] * len(requests)
    for body, response, want in zip(requests, responses, expected, strict=True):
        got = response.json()["answers"]
        assert [a["question"] for a in got] == body["questions"]  # the questions came back from the worker
        assert [a["answer"] for a in got] == want
    after = queue_stats(server.url)
    n_questions = sum(len(r["questions"]) for r in requests)
    assert after["requests"] - before["requests"] == len(requests)  # none lost, none twice
    assert after["questions_answered"] - before["questions_answered"] == n_questions
    assert after["waiting"] == 0 and after["failed_batches"] == before["failed_batches"]


class GatedAnswerer:
    """The run's answerer behind a gate: each micro-batch waits until the test opens it; every batch's
    questions are recorded; a question with "boom" in it makes its batch fail."""

    def __init__(self, inner):
        self.inner, self.cfg, self.model, self.tokenizer = inner, inner.cfg, inner.model, inner.tokenizer
        self.gate, self.entered = threading.Event(), threading.Event()
        self.batches: list[list[str]] = []

    def answer(self, examples, progress: bool = False):
        self.batches.append([ex.question for ex in examples])
        self.entered.set()
        if not self.gate.wait(timeout=TIMEOUT):
            raise TimeoutError("the test never opened the gate")
        if any("boom" in ex.question for ex in examples):
            raise RuntimeError("boom")
        return self.inner.answer(examples)


@contextmanager
def gated_server(answerer, run, queue_size: int = 8):
    """A server of its own on a :class:`GatedAnswerer` of ``answerer``: yields (server, gate)."""
    gate = GatedAnswerer(answerer)
    settings = ServeSettings(queue_size=queue_size, max_batch=8)
    with BackgroundServer(create_app(gate, run_dir=run, settings=settings)) as live:
        try:
            yield live, gate
        finally:
            gate.gate.set()  # whatever the test did, nothing stays blocked


def send_in_background(pool, url, body):
    return pool.submit(post, url, body)


def test_the_worker_takes_what_is_queued_as_one_batch(answerer, answering_run):
    with gated_server(answerer, answering_run) as (live, gate), ThreadPoolExecutor(6) as pool:
        first = send_in_background(pool, live.url, {"context": ALL_COLOURS, "questions": ["What color is the box?"]})
        assert gate.entered.wait(TIMEOUT)  # the worker holds the first request
        bodies = concurrent_requests(4)  # 1+2+3+1 = 7 questions, two paragraphs
        waiting = []
        for i, b in enumerate(bodies, 1):  # one after another, so that the queue's order is known
            waiting.append(send_in_background(pool, live.url, b))
            wait_until(lambda i=i: queue_stats(live.url)["waiting"] == i, TIMEOUT, f"{i} queued requests")
        gate.gate.set()
        assert first.result(TIMEOUT).status_code == 200
        results = [f.result(TIMEOUT) for f in waiting]
    assert [r.status_code for r in results] == [200] * 4
    assert [len(b) for b in gate.batches] == [1, 7]  # the four queued requests were answered together
    assert gate.batches[1] == [q for b in bodies for q in b["questions"]]  # in arrival order
    assert {r.json()["batch_questions"] for r in results} == {7}


def test_a_full_queue_gets_503_with_retry_after(answerer, answering_run):
    body = {"context": ALL_COLOURS, "questions": ["What color is the cup?"]}
    with gated_server(answerer, answering_run, queue_size=2) as (live, gate), ThreadPoolExecutor(3) as pool:
        held = send_in_background(pool, live.url, body)
        assert gate.entered.wait(TIMEOUT)
        queued = [send_in_background(pool, live.url, body) for _ in range(2)]
        wait_until(lambda: queue_stats(live.url)["waiting"] == 2, TIMEOUT, "a full queue")
        refused = post(live.url, body)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "busy" in refused.json()["error"] and "Traceback" not in refused.text
        gate.gate.set()
        assert [f.result(TIMEOUT).status_code for f in [held, *queued]] == [200] * 3
        stats = queue_stats(live.url)
    assert stats["rejected"] == 1 and stats["requests"] == 3 and stats["questions_answered"] == 3


class SlowAnswerer:
    """Answers every question "ok" after ``seconds`` a batch, recording the batch sizes (no model)."""

    def __init__(self, seconds: float):
        self.seconds, self.sizes = seconds, []

    def answer(self, examples, progress: bool = False):
        import time

        self.sizes.append(len(examples))
        time.sleep(self.seconds)
        return [{"id": ex.id, "question": ex.question, "prediction": "ok"} for ex in examples], {}


def test_clients_that_ask_again_at_once_stay_in_one_batch():
    """8 clients, each asking again a round trip after it is answered (0 to 21 ms): after the first batches,
    every batch holds all 8, never a part of them while the others come back."""
    import asyncio

    from loraqa.serve.batcher import Batcher

    answerer = SlowAnswerer(0.6)  # the worker waits up to 0.6 / 8 = 75 ms for the clients to come back
    batcher = Batcher(answerer, queue_size=16, max_batch=32, gather=0.2)

    async def client(i: int) -> list[str]:
        got = []
        for k in range(4):
            await asyncio.sleep(0.003 * i)  # a round trip
            job = batcher.submit("A paragraph.", [f"q{i}-{k}"])
            got.append((await asyncio.wait_for(job.future, TIMEOUT))["records"][0]["question"])
        return got

    async def clients():
        return await asyncio.gather(*(client(i) for i in range(8)))

    batcher.start()
    try:
        answered = asyncio.run(clients())
    finally:
        batcher.stop()
    assert answered == [[f"q{i}-{k}" for k in range(4)] for i in range(8)]  # each its own, in order
    # the first batch is the first client alone, the last the clients left; every one between holds all 8
    # (without the wait: 1, 7, 1, 7, ...)
    sizes = answerer.sizes
    assert sum(sizes) == 32 and len(sizes) >= 3 and sizes[1:-1] == [8] * (len(sizes) - 2), sizes


def hang_up_later(url: str, body: dict) -> socket.socket:
    """Send a request on a raw connection and return the socket, unread: closing it is the client leaving."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    sock.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
    return sock


def test_a_client_that_hangs_up_disturbs_no_one(answerer, answering_run, reference):
    hat = {"context": ALL_COLOURS, "questions": ["What color is the hat?"]}
    with gated_server(answerer, answering_run) as (live, gate), ThreadPoolExecutor(1) as pool:
        taken = hang_up_later(live.url, {"context": ALL_COLOURS, "questions": ["What color is the bell?"]})
        assert gate.entered.wait(TIMEOUT)  # its batch is being answered when it leaves
        queued = hang_up_later(live.url, {"context": ALL_COLOURS, "questions": ["Who left the queue?"]})
        wait_until(lambda: queue_stats(live.url)["waiting"] == 1, TIMEOUT, "the second request queued")
        other = send_in_background(pool, live.url, hat)
        wait_until(lambda: queue_stats(live.url)["waiting"] == 2, TIMEOUT, "the third request queued")
        taken.close()
        queued.close()
        wait_until(lambda: queue_stats(live.url)["cancelled"] == 2, TIMEOUT, "both hang-ups noticed")
        gate.gate.set()
        response = other.result(TIMEOUT)
        stats = queue_stats(live.url)
    assert response.status_code == 200
    assert [a["answer"] for a in response.json()["answers"]] == one_at_a_time(reference, **hat)
    # the batch under way was answered into the void; the queued request that left was never answered
    assert gate.batches == [["What color is the bell?"], ["What color is the hat?"]]
    assert stats["failed_batches"] == 0 and stats["questions_answered"] == 2


def test_requests_still_waiting_when_the_server_stops_get_a_json_503(answerer, answering_run):
    """Stopped (Ctrl-C) while a batch is held and a request queued: once uvicorn's grace period is over, both
    clients get the documented JSON 503, not a plain-text 500 from the cancelled handlers."""
    gate = GatedAnswerer(answerer)
    app = create_app(gate, run_dir=answering_run, settings=ServeSettings(queue_size=4, max_batch=8))
    body = {"context": ALL_COLOURS, "questions": ["What color is the cup?"]}
    with BackgroundServer(app, graceful_seconds=1) as live, ThreadPoolExecutor(2) as pool:
        try:
            held = send_in_background(pool, live.url, body)
            assert gate.entered.wait(TIMEOUT)
            queued = send_in_background(pool, live.url, body)
            wait_until(lambda: queue_stats(live.url)["waiting"] == 1, TIMEOUT, "a queued request")
            live.server.should_exit = True
            results = [held.result(TIMEOUT), queued.result(TIMEOUT)]
        finally:
            gate.gate.set()
    for r in results:
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
        assert r.json() == {"error": "the server is stopping", "field": None}


def test_a_failing_batch_fails_its_requests_only(answerer, answering_run):
    with gated_server(answerer, answering_run) as (live, gate):
        gate.gate.set()
        r = post(live.url, {"context": ALL_COLOURS, "questions": ["boom?"]})
        assert r.status_code == 500 and "Traceback" not in r.text
        assert r.json() == {"error": "the model failed on this batch (RuntimeError)", "field": None}
        r = post(live.url, {"context": ALL_COLOURS, "questions": ["What color is the coat?"]})
        assert r.status_code == 200 and queue_stats(live.url)["failed_batches"] == 1


# ---------------------------------------------------------------------------------------------- the command


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_serves_until_interrupted(answering_run, tmp_path):
    port = free_loopback_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "loraqa.cli", "serve", str(answering_run), "--port", str(port),
           "--max-questions", "4"]  # fmt: skip
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(f"{url}/health", timeout=5).json()["ok"]
            except httpx.HTTPError:
                assert proc.poll() is None, "the server exited"
                return False

        wait_until(up, 120, "loraqa serve to start", every=0.2)
        r = post(url, {"context": ALL_COLOURS, "questions": ["What color is the box?"] * 5})
        assert r.status_code == 422 and "at most 4" in r.json()["error"]
        assert post(url, {"context": ALL_COLOURS, "questions": ["What color is the box?"]}).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    log.seek(0)
    assert f"http://127.0.0.1:{port}/" in log.read()


def test_serve_command_refuses_bad_settings_before_loading(capsys):
    assert main(["serve"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny-random-gpt2", "--queue-size", "0"]) == 2
    assert "--queue-size must be at least 1" in capsys.readouterr().err


def test_an_address_that_cannot_be_listened_on_is_refused_before_loading(monkeypatch, capsys):
    """A port in use or a host that does not resolve is one clear line, said before the model loads."""
    from loraqa import answering

    monkeypatch.setattr(answering, "load_answerer", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "tiny-random-gpt2", "--port", str(port)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"loraqa: error: --port {port}: in use on 127.0.0.1; pick another --port or stop what holds it"
        )
    assert main(["serve", "--model", "tiny-random-gpt2", "--host", "no such host!"]) == 2
    assert "--host no such host!: not an address or a name this machine can resolve" in capsys.readouterr().err
    # port 0 (any free port) would serve where the address it prints does not say
    assert main(["serve", "--model", "tiny-random-gpt2", "--port", "0"]) == 2
    assert "--port must be 1 to 65535, got 0" in capsys.readouterr().err


def test_serving_beyond_loopback_says_what_that_exposes(monkeypatch, capsys):
    import uvicorn

    from loraqa.serve import is_loopback, serve_forever

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # nothing is bound
    serve_forever(object(), "0.0.0.0", 8123)
    err = capsys.readouterr().err
    assert "anyone who can reach port 8123 can query the model" in err and "no authentication" in err
    serve_forever(object(), "127.0.0.1", 8123)
    assert "anyone" not in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")

"""``loraqa serve``: a web page and a JSON API answering questions about a paragraph with one model.

* :mod:`.schema`: the request and response JSON (pydantic);
* :mod:`.limits`: what a request may hold (questions, the context's length in tokens) and where an answer lies
  in its paragraph;
* :mod:`.batcher`: the bounded queue and the one worker thread that answers it in micro-batches;
* :mod:`.settings`: the queue, batch and request limits (``ServeSettings``);
* :mod:`.app`: the FastAPI app (``create_app``): routes, JSON errors, the page in ``static/``;
* :mod:`.server`: running it, in the foreground (the command) or in a background thread.

From Python::

    from loraqa.answering import load_answerer
    from loraqa.serve import BackgroundServer, create_app

    app = create_app(load_answerer("examples/smollm2-squad"), run_dir="examples/smollm2-squad")
    with BackgroundServer(app) as server:
        print(server.url)  # POST {server.url}/v1/answer {"context": ..., "questions": [...]}
"""

import lazy_loader

from .settings import ServeSettings

# the app and the server import FastAPI and uvicorn: loaded on first use, so that the command line reads the
# settings without them
__getattr__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "app": ["create_app", "describe_run"],
        "server": ["BackgroundServer", "check_address", "is_loopback", "serve_forever"],
    },
)[0]

__all__ = [
    "BackgroundServer",
    "ServeSettings",
    "check_address",
    "create_app",
    "describe_run",
    "is_loopback",
    "serve_forever",
]

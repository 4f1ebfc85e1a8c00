"""Running the app: in the foreground for ``loraqa serve``, or in a thread of this process on a loopback port
(tests, benchmarks, a notebook)."""

from __future__ import annotations

import ipaddress
import sys
import threading
import time

from .settings import LOOPBACK


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread: ``with BackgroundServer(app) as server: server.url``.

    ``port=0`` takes a free port; the server is up (its lifespan started) when ``__enter__`` returns, and has
    stopped, its worker too, when ``__exit__`` returns."""

    def __init__(
        self,
        app,
        host: str = LOOPBACK,
        port: int = 0,
        start_timeout: float = 60.0,
        graceful_seconds: float = 10,
    ):
        import uvicorn

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=graceful_seconds,
        )
        self.server = uvicorn.Server(config)
        # requests get graceful_seconds to end, then the worker its batch (Batcher.stop's 30 s)
        self.stop_timeout = graceful_seconds + 30 + 10
        self.start_timeout = start_timeout
        self.thread = threading.Thread(target=self.server.run, name="loraqa-serve-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the server did not start (port taken?)")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.stop_timeout)


def check_address(host: str, port: int) -> None:
    """A ValueError naming ``--host`` or ``--port`` where ``host:port`` cannot be listened on (a name that does not
    resolve, an address not this machine's, a port in use or not allowed): said before the model loads, rather
    than by uvicorn once it has. A bound test socket is closed at once; uvicorn binds the address again."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        raise ValueError(f"--host {host}: not an address or a name this machine can resolve") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own socket
        try:
            probe.bind(address)
        except OSError as e:
            why = {
                errno.EADDRINUSE: f"--port {port}: in use on {host}; pick another --port or stop what holds it",
                errno.EACCES: f"--port {port}: not allowed to this user (ports below 1024 need root); pick another",
                errno.EADDRNOTAVAIL: f"--host {host}: not an address of this machine",
            }
            raise ValueError(
                why.get(e.errno, f"--host {host} --port {port}: cannot listen there ({e.strerror})")
            ) from None


def serve_forever(app, host: str, port: int) -> None:
    """Serve ``app`` until Ctrl-C or SIGTERM, saying where and, off loopback, who can reach it."""
    import uvicorn

    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
    print(
        f"loraqa serve: the page at {where}, the API at {where}v1/answer, its docs at {where}docs",
        file=sys.stderr,
    )
    if not is_loopback(host):
        print(
            f"loraqa serve: listening on {host}, not only this machine: anyone who can reach port {port} can "
            "query the model (there is no authentication)",
            file=sys.stderr,
        )
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)

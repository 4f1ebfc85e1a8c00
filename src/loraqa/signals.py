"""Stop signals in one place: which signals ask loraqa to stop, the exit status that reports each, and a handler
for the length of a block.

``loraqa train`` and ``loraqa sweep`` both turn Ctrl-C (SIGINT) and SIGTERM into a clean stop that a rerun resumes,
and both report it the way a shell reports a process ended by that signal: 130 and 143.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The exit status that says "stopped by ``signum``" (128 + its number, as a shell reports it)."""
    return 128 + signum


def stopped_by_request(returncode: int | None) -> bool:
    """Whether a child's ``returncode`` says a stop signal ended it: killed by one (negative, Python's
    convention), or exited with :func:`exit_status` of one after stopping cleanly (what ``loraqa train`` does)."""
    return returncode is not None and any(returncode in (-s, exit_status(s)) for s in STOP_SIGNALS)


@contextlib.contextmanager
def handling(signals, handler):
    """``handler`` for ``signals`` while the block runs, the previous handlers after it. Python lets only the main
    thread set handlers; in any other thread the block runs with the signals' behaviour unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)

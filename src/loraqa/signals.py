"""Stop signals in one place: which signals ask loraqa to stop, the exit status that reports each, and a handler
for the length of a block.

``loraqa train`` and ``loraqa sweep`` both turn Ctrl-C (SIGINT) and SIGTERM into a clean stop that a rerun resumes,
and both report it the way a shell reports a process ended by that signal: 130 and 143.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# set by a sweep for each trial process it starts: the pid of the process waiting on it
PARENT_ENV = "LORAQA_PARENT_PID"
PARENT_POLL_SECONDS = 0.5


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


def orphaned() -> bool:
    """Whether the process named in ``$LORAQA_PARENT_PID`` (the sweep waiting on this trial) is gone: this
    process now belongs to init or a subreaper, and nothing reads its stderr pipe any more."""
    parent = os.environ.get(PARENT_ENV)
    return bool(parent) and os.getppid() != int(parent)


def watch_parent(poll: float = PARENT_POLL_SECONDS) -> threading.Thread | None:
    """When the sweep that started this process dies (even by SIGKILL), stop as on SIGTERM: training saves a
    checkpoint at the step reached and exits, and the next ``loraqa sweep`` resumes the trial from it. A trial
    must not outlive its sweep: it would hold the trial's lock, and its writes to the dead sweep's stderr pipe
    would fail. Stderr is first pointed where stdout goes (the trial log), so that saving and stopping can still
    report. Polling the parent pid works on every POSIX system and under Ray, where the parent is a Ray worker;
    ``PR_SET_PDEATHSIG`` would fire on the death of the spawning *thread*, not the process. No-op unless
    ``$LORAQA_PARENT_PID`` is set."""
    if not os.environ.get(PARENT_ENV):
        return None

    def watch() -> None:
        while not orphaned():
            time.sleep(poll)
        with contextlib.suppress(OSError):
            os.dup2(1, 2)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="parent watch", daemon=True)
    thread.start()
    return thread

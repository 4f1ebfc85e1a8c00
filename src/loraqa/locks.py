"""The advisory locks that keep two processes out of one run folder, one trial or one sweep index: every lock in
loraqa is a ``flock`` on a file, taken here.

A plain ``flock`` rather than the ``filelock`` library, because these must hold and it does not promise them:
the holder's pid stays in a run folder's lock file, for the refusal to name (filelock truncates the file when
it opens it, holder or not); a status probe (:func:`held`) tests a lock with a shared ``flock`` that never
blocks a holder or another probe; and a lock taken by a sweep is inherited by the trial process it starts
(``pass_fds``). The kernel drops a lock when its process dies, however it dies, so a killed process never leaves
anything locked. Lock files stay when released: unlinking one would let two processes lock two files.
Where ``fcntl`` is missing (Windows), nothing is locked.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SUPPORTED = fcntl is not None
# A probe holds a shared lock for a moment; an exclusive try that meets one tries again after these pauses
RETRY_SECONDS = (0.02, 0.05, 0.1)


def try_hold(path: Path) -> int | None:
    """An open file descriptor holding ``path``'s exclusive lock (closing it releases the lock), or None if
    another process holds it. Creates the file; ``OSError`` if it cannot."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    if fd < 3:  # a closed stdin/stdout/stderr's number: a child given it (pass_fds) gets its own stream there
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(fd)
        fd = moved
    for pause in (*RETRY_SECONDS, None):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if pause is None:
                os.close(fd)
                return None
            time.sleep(pause)
    raise AssertionError("unreachable")


def held(path: Path) -> bool:
    """Whether a process holds ``path``'s lock. A missing or unreadable file is not held; a read-only one (another
    user's) can still be probed."""
    if fcntl is None or not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # unreadable: nobody can tell
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock for the block, waiting for it. Without a lock (a read-only folder, no ``fcntl``, a
    filesystem without locks) the block runs unguarded."""
    fd = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # read-only: another user's lock file still locks
        with contextlib.suppress(OSError):
            fd = os.open(path, flags, 0o666)
            break
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):  # ENOLCK: unguarded
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def write_holder(fd: int) -> None:
    """Record this process's pid in the lock file ``fd`` holds, for a refused process to name."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def holder(path: Path) -> str:
    """The pid recorded in a held lock file, or "?"."""
    try:
        return path.read_text(errors="replace").strip() or "?"
    except OSError:
        return "?"


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (another user's counts: it cannot be signalled, but is)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""The sweep's progress on screen: a live rich display on a terminal, plain lines otherwise."""

from __future__ import annotations

import collections
import os
import sys
import threading
import time


class View:
    """The sweep's progress: a live rich display on a terminal (counts, running trials with their Trainer
    progress bar), plain lines otherwise."""

    def __init__(self, title: str, total: int, live: bool, plain_interval: float = 60.0):
        from rich.console import Console

        self.title, self.total = title, total
        self.console = Console(stderr=True, highlight=False)
        self.live_enabled = live
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.running: dict[str, dict] = {}
        self.plain_interval = plain_interval
        self._live = None
        self._last_plain = time.monotonic()

    # -- lifecycle
    def __enter__(self):
        if self.live_enabled:
            from rich.live import Live

            self._live = Live(get_renderable=self._render, console=self.console, refresh_per_second=4,
                              transient=True, redirect_stdout=False, redirect_stderr=False)  # fmt: skip
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
        return False

    def _print(self, text: str, style: str | None = None) -> None:
        from rich.text import Text

        try:
            if self._live is not None:
                self._live.console.print(Text(text, style=style))
            else:
                print(text, file=sys.stderr, flush=True)
        except OSError:  # nobody reads stderr any more (a closed pipe or terminal): the sweep goes on unseen
            mute_stderr()

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        with self.lock:
            c = self.counts
            left = self.total - c["done"] - c["failed"] - len(self.running) - c["skipped"]
            head = Text.assemble(
                (f"{self.title}  ", "bold"),
                (f"{c['done']} done", "green"), "  ",
                (f"{c['failed']} failed", "red" if c["failed"] else ""), "  ",
                f"{len(self.running)} running  {left} left  (of {self.total})",
            )  # fmt: skip
            rows = [head]
            for name, r in self.running.items():
                elapsed = time.monotonic() - r["start"]
                where = f" [{r['where']}]" if r.get("where") else ""
                row = Text.assemble(("▶ ", "cyan"), (name, "bold cyan"), f"{where}  {hms(elapsed)}  ")
                row.append(r.get("progress") or "starting…", style="dim")
                rows.append(row)
        return Group(*rows)

    # -- events
    def start(self, name: str, where: str, attempt: int) -> None:
        with self.lock:
            self.running[name] = {"start": time.monotonic(), "where": where}
        again = f" (attempt {attempt})" if attempt > 1 else ""
        self._print(f"[{self._done_str()}] start {name}{again}{f' on {where}' if where else ''}")

    def progress(self, name: str, text: str) -> None:
        with self.lock:
            if name in self.running:
                self.running[name]["progress"] = text
        if self._live is None and time.monotonic() - self._last_plain >= self.plain_interval:
            self._last_plain = time.monotonic()
            self._print(f"  [{name}] {text}")

    def line(self, name: str, text: str) -> None:
        if self._live is not None:
            self._print(f"  [{name}] {text}", style="dim")
        else:
            self._print(f"  [{name}] {text}")

    def finish(self, name: str, outcome: str, message: str) -> None:
        with self.lock:
            self.running.pop(name, None)
            self.counts[outcome] += 1
        style = {"done": "green", "failed": "red"}.get(outcome)
        self._print(f"[{self._done_str()}] {message}", style=style)

    def note(self, message: str, style: str | None = None) -> None:
        self._print(message, style=style)

    def _done_str(self) -> str:
        with self.lock:
            return f"{self.counts['done'] + self.counts['failed']}/{self.total}"


def mute_stderr() -> None:
    """Point this process's stderr at /dev/null, so later writes (the live display's refreshes, logging) succeed
    instead of raising into the trials' bookkeeping; children keep the pipes they were given."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stderr.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def hms(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_score(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "?"


class QuietView:
    """For an attempt run where nobody watches (a Ray worker): its driver reports starts and ends."""

    def start(self, name: str, where: str, attempt: int) -> None:
        pass

    def progress(self, name: str, text: str) -> None:
        pass

    def line(self, name: str, text: str) -> None:
        pass

"""Sweeps: expand a config's ``sweep:`` section into trials and run each in its own process, resumably.

A sweep folder holds::

    sweep.yaml              the resolved sweep config (``loraqa sweep DIR/sweep.yaml -o DIR`` reruns it)
    sweep.json              the trials, their overrides and status, rewritten atomically as trials finish
    <trial>/                one run folder per trial (see loraqa.train), named from the trial's values:
        trial.yaml          the trial's resolved config (the child process trains from it)
        config.yaml ...     what run_experiment writes; metrics.json present means the trial is finished
        run.json            sweep bookkeeping: every attempt's exit code, wall time, peak RSS, machine
        error.json          the last attempt failed: exit code and the tail of its stderr
        trial.log           the trial's stdout and stderr, all attempts

Modes: ``grid`` is every combination of the axes' values; ``one-at-a-time`` is the base config plus each
axis varied alone (the other axes at their base values), duplicates removed so the base appears once.

Each trial runs as ``python -m loraqa.cli train <trial>/trial.yaml -o <trial>``, so a crash or an
out-of-memory kill ends that trial only and peak memory is the trial's own. Rerunning the same command skips
finished trials, resumes interrupted ones from their last checkpoint and retries failed ones. ``shard="i/n"``
takes every n-th trial (starting at the i-th), so n machines sharing the folder split the work; a trial being
run by another process on this machine is locked (flock) and skipped.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, ExperimentConfig, apply_overrides, from_dict, get_value
from .io import read_json, write_json_atomic, write_text_atomic

try:  # advisory locks so two processes on one machine never run the same trial at once
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

STATUSES = ("done", "failed", "running", "unfinished", "pending")
STDERR_TAIL_LINES = 40
STDERR_TAIL_CHARS = 6000
METRIC_KEYS = ("exact_match", "f1", "final_train_loss", "final_eval_loss", "trainable_params", "total_params",
               "train_seconds", "train_tokens_per_second", "peak_memory_mb", "eval_seconds", "train_steps",
               "n_questions")  # fmt: skip


# ---------------------------------------------------------------------------------------------- expansion


@dataclass
class Trial:
    name: str  # folder name under the sweep folder
    overrides: dict[str, Any]  # the axis values applied to the base config (resolved)
    values: dict[str, Any]  # every axis key -> this trial's value
    config: ExperimentConfig  # resolved, without a sweep section
    index: int  # position in the sweep's trial list (sharding is by this)


def base_config(cfg: ExperimentConfig) -> ExperimentConfig:
    return dataclasses.replace(cfg, sweep=None)


def axis_values(cfg: ExperimentConfig) -> dict[str, list]:
    """Each axis's values as they land in a config (``"5e-4"`` -> ``0.0005``)."""
    if cfg.sweep is None:
        raise ConfigError("the config has no sweep section")
    base = base_config(cfg)
    out = {}
    for key, values in cfg.sweep.axes.items():
        out[key] = [get_value(apply_overrides(base, [(key, v)], where="sweep.axes"), key) for v in values]
    return out


def reference_values(cfg: ExperimentConfig) -> dict[str, Any]:
    """The point the per-axis comparisons are made around: the base config's values (one-at-a-time), or in a
    grid each axis's base value if it is one of the axis's values, else the axis's first value."""
    base = base_config(cfg)
    ref = {}
    for key, values in axis_values(cfg).items():
        b = get_value(base, key)
        ref[key] = b if cfg.sweep.mode == "one-at-a-time" or b in values else values[0]
    return ref


def format_value(v: Any) -> str:
    """A short, stable text for a value: ``5e-4``, ``16``, ``0.1``, ``attn+proj``, ``c_attn+c_proj``."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
            return str(int(v))
        plain = f"{v:.6g}"
        mantissa, _, exponent = f"{v:.6e}".partition("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        sci = f"{mantissa}e{int(exponent)}"
        return sci if len(sci) < len(plain) else plain
    if isinstance(v, (list, tuple)):
        return "+".join(format_value(x) for x in v)
    return str(v)


def _labels(keys: list[str]) -> dict[str, str]:
    """``lora.r`` -> ``r``; the full dotted key (dots as underscores) where two axes share a field name."""
    last = collections.Counter(k.rpartition(".")[2] for k in keys)
    return {
        k: (k.rpartition(".")[2] if last[k.rpartition(".")[2]] == 1 else k.replace(".", "_")) for k in keys
    }


def trial_name(diff: dict[str, Any], labels: dict[str, str]) -> str:
    """``{"lora.r": 16, "train.lr": 5e-4}`` -> ``r16-lr5e-4``; ``{}`` -> ``base``. Numbers follow their label
    directly, other values after an underscore (``targets_attn+proj``)."""
    if not diff:
        return "base"
    parts = []
    for key, v in diff.items():
        text = format_value(v)
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        parts.append(f"{labels[key]}{text}" if numeric else f"{labels[key]}_{text}")
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(parts))
    if len(name) > 80:
        name = f"{name[:70]}-{_digest(diff)}"
    return name


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def expand_trials(cfg: ExperimentConfig) -> list[Trial]:
    """The sweep's trials, in a fixed order: ``grid`` = every combination (axes in file order, the last
    varying fastest); ``one-at-a-time`` = the base, then each axis's values in order. A trial whose resolved
    config equals an earlier one's is dropped."""
    if cfg.sweep is None:
        raise ConfigError("the config has no sweep section; use `loraqa train` for a single run")
    base = base_config(cfg)
    values = axis_values(cfg)
    keys = list(values)
    if cfg.sweep.mode == "grid":
        assignments = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values.values())]
    else:
        assignments = [{}] + [{k: v} for k in keys for v in values[k]]
    labels = _labels(keys)
    trials: list[Trial] = []
    seen = set()
    for overrides in assignments:
        tcfg = apply_overrides(base, list(overrides.items()), where=f"sweep trial {overrides}")
        fingerprint = tcfg.to_yaml()
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        tvalues = {k: get_value(tcfg, k) for k in keys}
        diff = {k: v for k, v in tvalues.items() if v != get_value(base, k)}
        trials.append(Trial(trial_name(diff, labels), overrides, tvalues, tcfg, len(trials)))
    names = collections.Counter(t.name for t in trials)
    for t in trials:  # two configs that format alike (rare): tell them apart by a digest of the values
        if names[t.name] > 1:
            t.name = f"{t.name}-{_digest(t.values)}"
    return trials


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"2/3"`` -> ``(2, 3)``; 1-based."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard or "1/1")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ConfigError(f"--shard {shard!r}: expected i/n with 1 <= i <= n, e.g. 1/2")
    return int(m.group(1)), int(m.group(2))


def shard_trials(trials: list[Trial], index: int, count: int) -> list[Trial]:
    """The trials of shard ``index`` of ``count`` (1-based): every ``count``-th trial of the fixed list."""
    return [t for t in trials if t.index % count == index - 1]


# ---------------------------------------------------------------------------------------------- trial state


def _lock_path(trial_dir: Path) -> Path:
    return trial_dir / ".lock"


def _try_lock(trial_dir: Path) -> int | None:
    """An open, exclusively flock-ed file descriptor, or None if another process holds the trial."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(trial_dir), os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def is_locked(trial_dir: Path) -> bool:
    path = _lock_path(trial_dir)
    if fcntl is None or not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # a read-only copy of the folder: nobody runs trials there
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def trial_status(trial_dir: Path) -> str:
    """From the files: done (metrics.json), running (locked by a process), failed (error.json), unfinished
    (started, interrupted), or pending."""
    trial_dir = Path(trial_dir)
    if (trial_dir / "metrics.json").exists():
        return "done"
    if is_locked(trial_dir):
        return "running"
    if (trial_dir / "error.json").exists():
        return "failed"
    if any((trial_dir / f).exists() for f in ("log_history.jsonl", "checkpoints", "train_metrics.json",
                                              "run.json")):  # fmt: skip
        return "unfinished"
    return "pending"


def _read_json_or(path: Path, default=None):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return default


def trial_record(trial: Trial, sweep_dir: Path) -> dict:
    """One trial's entry in sweep.json: overrides, status, wall time, key metrics or the error."""
    tdir = sweep_dir / trial.name
    status = trial_status(tdir)
    run = _read_json_or(tdir / "run.json", {}) or {}
    rec: dict[str, Any] = {
        "name": trial.name,
        "dir": trial.name,
        "overrides": trial.overrides,
        "values": trial.values,
        "status": status,
        "attempts": len(run.get("attempts", [])),
        "wall_seconds": run.get("wall_seconds"),
    }
    if status == "done":
        metrics = _read_json_or(tdir / "metrics.json", {}) or {}
        rec["metrics"] = {k: metrics.get(k) for k in METRIC_KEYS if k in metrics}
    elif status == "failed":
        err = _read_json_or(tdir / "error.json", {}) or {}
        rec["exit_code"] = err.get("exit_code")
        rec["error"] = err.get("summary")
    return rec


# ---------------------------------------------------------------------------------------------- machine


def _nvidia_gpus() -> list[tuple[str, str]]:
    """(index, name) of the GPUs nvidia-smi lists, limited to CUDA_VISIBLE_DEVICES where that is set."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append((parts[0], parts[1], parts[2]))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(i, n) for i, n, _ in gpus]
    chosen = []
    for entry in [v.strip() for v in visible.split(",") if v.strip()]:
        for i, n, uuid in gpus:
            if entry in (i, uuid) or (entry.startswith("GPU-") and uuid.startswith(entry)):
                chosen.append((entry, n))
    return chosen


def code_version() -> str:
    """``loraqa 0.1.0``, plus the git commit when it runs from a checkout (``, git 1a2b3c4`` and ``+ changes``
    when the working tree differs from it): which code produced a sweep's numbers."""
    from . import __version__

    text = f"loraqa {__version__}"
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
        lines = commit.stdout.split()
        # only loraqa's own checkout counts, not some repository an installed copy happens to sit in
        if commit.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() / "src" / "loraqa" != src:
            return text
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return text
    return f"{text}, git {lines[1]}" + (" + changes" if dirty.stdout.strip() else "")


def machine_info() -> dict:
    """Where trials run: host, platform, CPUs, torch version, GPUs (without importing torch), and the code."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = None
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch_version,
        "gpus": [name for _, name in _nvidia_gpus()],
        "code": code_version(),
    }


def describe_machine(m: dict) -> str:
    gpus = m.get("gpus") or []
    gpu = ", ".join(f"{n}x {g}" for g, n in collections.Counter(gpus).items()) if gpus else "no GPU"
    return f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}, {gpu}"


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- running


def trial_command(trial_yaml: Path, trial_dir: Path, device: str | None) -> list[str]:
    """The child process that runs one trial (tests replace this)."""
    cmd = [sys.executable, "-m", "loraqa.cli", "train", str(trial_yaml), "--output-dir", str(trial_dir)]
    return cmd + (["--device", device] if device else [])


_TQDM = re.compile(r"\|\s*[\d.]+[kMG]?/[\d.?]+[kMG]?\s*\[")


class _StderrPump:
    """Reads a child's stderr: copies it to the trial log, keeps the last lines for error.json, hands tqdm
    progress updates (``\\r``-separated) and ordinary lines to the view."""

    def __init__(self, trial: str, log_file, view: _View):
        self.trial, self.log_file, self.view = trial, log_file, view
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    def run(self, pipe) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        buf = ""
        while True:
            chunk = pipe.read1(65536)
            if not chunk:
                break
            self.log_file.write(chunk)
            self.log_file.flush()
            buf += decoder.decode(chunk)
            while True:
                m = re.search(r"[\r\n]", buf)
                if not m:
                    break
                segment, sep, buf = buf[: m.start()], buf[m.start()], buf[m.end() :]
                self._segment(segment, sep)
        buf += decoder.decode(b"", final=True)
        if buf:
            self._segment(buf, "\n")

    def _segment(self, segment: str, sep: str) -> None:
        text = segment.rstrip()
        if not text:
            return
        if _TQDM.search(text):
            self.view.progress(self.trial, text.strip())
        elif sep == "\n":
            self.tail.append(text)
            self.view.line(self.trial, text)

    def text(self) -> str:
        out = "\n".join(self.tail)
        return out[-STDERR_TAIL_CHARS:]


class _View:
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

        if self._live is not None:
            self._live.console.print(Text(text, style=style))
        else:
            print(text, file=sys.stderr, flush=True)

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
                row = Text.assemble(("▶ ", "cyan"), (name, "bold cyan"), f"{where}  {_hms(elapsed)}  ")
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


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _command_line(output_dir: Path, shard: str, parallel: int) -> tuple[str, bool]:
    """The command that started this sweep: the real one when run from the ``loraqa`` command line, else a
    reconstruction from the saved sweep.yaml (second value False)."""
    argv = sys.argv
    if argv and Path(argv[0]).name in ("loraqa", "cli.py", "__main__.py") and "sweep" in argv[1:]:
        return "loraqa " + shlex.join(argv[1:]), True
    cmd = f"loraqa sweep {shlex.quote(str(output_dir / 'sweep.yaml'))} --output-dir {shlex.quote(str(output_dir))}"
    if shard != "1/1":
        cmd += f" --shard {shard}"
    if parallel != 1:
        cmd += f" --parallel {parallel}"
    return cmd, False


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "axes":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_sweep_yaml(output_dir: Path, cfg: ExperimentConfig) -> None:
    """A folder holds one sweep: refuse one whose base config differs; a changed sweep section is allowed
    (trials are named by their values, so old trials are reused where they still belong)."""
    path = output_dir / "sweep.yaml"
    if path.exists():
        try:
            old = from_dict(yaml.safe_load(path.read_text()), where=str(path))
        except (ConfigError, yaml.YAMLError):
            old = None
        if old is not None:
            a, b = _flat(base_config(old).to_dict()), _flat(base_config(cfg).to_dict())
            differs = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            if differs:
                raise ConfigError(
                    f"{output_dir}: holds a sweep of a different config (differs in {', '.join(differs)}); "
                    "pick another --output-dir"
                )
    write_text_atomic(path, cfg.to_yaml())


def _worker_slots(parallel: int, device: str | None) -> list[dict]:
    """One slot per parallel worker: on GPUs its own CUDA_VISIBLE_DEVICES (round robin when there are more
    workers than GPUs); on CPUs its share of the cores as OMP_NUM_THREADS."""
    slots = [{"id": i, "env": {}, "where": ""} for i in range(parallel)]
    if parallel == 1:
        return slots
    gpus = [] if (device or "").startswith("cpu") or (device or "").startswith("cuda:") else _nvidia_gpus()
    if gpus:
        if parallel > len(gpus):
            log.warning("--parallel %d with %d GPUs: workers share GPUs", parallel, len(gpus))
        for s in slots:
            idx, _name = gpus[s["id"] % len(gpus)]
            s["env"]["CUDA_VISIBLE_DEVICES"] = idx
            s["where"] = f"GPU {idx}"
    elif "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // parallel)
        for s in slots:
            s["env"]["OMP_NUM_THREADS"] = str(threads)
    return slots


def _prefetch_data(trials: list[Trial]) -> None:
    """Find (and where needed download or generate) the data once here, so parallel trials do not race and a
    missing data set is reported once instead of by every trial."""
    from .data import resolve_data_dir

    for data_dir in dict.fromkeys(t.config.data.data_dir for t in trials):
        resolve_data_dir(data_dir)


class _Sweep:
    def __init__(self, cfg, output_dir: Path, trials, mine, shard, parallel, device, view, machine):
        self.cfg, self.dir, self.trials, self.mine = cfg, output_dir, trials, mine
        self.shard, self.parallel, self.device = shard, parallel, device
        self.view, self.machine = view, machine
        self.stop = threading.Event()
        self.terminated = False
        self.json_lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.procs_lock = threading.Lock()
        self.invocation: dict = {}

    # -- sweep.json
    def write_index(self) -> None:
        with self.json_lock:
            path = self.dir / "sweep.json"
            old = _read_json_or(path, {}) or {}
            invocations = [i for i in old.get("invocations", []) if i.get("id") != self.invocation["id"]]
            invocations.append(self.invocation)
            records = [trial_record(t, self.dir) for t in self.trials]
            counts = collections.Counter(r["status"] for r in records)
            assert self.cfg.sweep is not None
            index = {
                "name": self.cfg.name,
                "mode": self.cfg.sweep.mode,
                "axes": axis_values(self.cfg),
                "reference": reference_values(self.cfg),
                "config": "sweep.yaml",
                "command": old.get("command") or self.invocation["command"],
                "reproduce": f"loraqa sweep {self.dir / 'sweep.yaml'} --output-dir {self.dir}",
                "created_at": old.get("created_at") or self.invocation["started_at"],
                "updated_at": _now(),
                "machine": self.machine,
                "counts": {s: counts.get(s, 0) for s in STATUSES},
                "invocations": invocations[-50:],
                "trials": records,
            }
            write_json_atomic(path, index)

    # -- one trial
    def run_trial(self, trial: Trial, slots) -> str:
        if self.stop.is_set():
            return "skipped"
        slot = slots.get()
        try:
            return self._run_trial(trial, slot)
        finally:
            slots.put(slot)

    def _run_trial(self, trial: Trial, slot: dict) -> str:
        tdir = self.dir / trial.name
        if self.stop.is_set():
            return "skipped"
        fd = _try_lock(tdir)
        if fd is None:
            self.view.finish(trial.name, "skipped", f"skip {trial.name}: another process is running it")
            return "skipped"
        try:
            if (tdir / "metrics.json").exists():  # finished by another process meanwhile
                self.view.finish(trial.name, "done", f"done {trial.name} (finished elsewhere)")
                return "done"
            return self._attempt(trial, tdir, slot, fd)
        finally:
            os.close(fd)

    def _attempt(self, trial: Trial, tdir: Path, slot: dict, lock_fd: int) -> str:
        trial_yaml = tdir / "trial.yaml"
        write_text_atomic(trial_yaml, trial.config.to_yaml())
        run_path = tdir / "run.json"
        run = _read_json_or(run_path, {}) or {}
        attempts = run.get("attempts", [])
        for a in attempts:  # we hold the lock, so an attempt still marked running died with its sweep
            if a.get("status") == "running":
                a.update(status="lost", wall_seconds=_lost_wall_seconds(tdir, a), wall_seconds_estimated=True)
        attempt = {"started_at": _now(), "host": self.machine["host"], "shard": self.shard,
                   "worker": slot["id"], "where": slot["where"] or None, "status": "running"}  # fmt: skip
        attempts.append(attempt)
        run.update(name=trial.name, overrides=trial.overrides, machine=self.machine, attempts=attempts)
        write_json_atomic(run_path, run)
        (tdir / "error.json").unlink(missing_ok=True)
        self.write_index()

        cmd = trial_command(trial_yaml, tdir, self.device)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **slot["env"]}
        self.view.start(trial.name, slot["where"], len(attempts))
        start = time.perf_counter()
        with open(tdir / "trial.log", "ab") as log_file:
            log_file.write(
                f"\n===== attempt {len(attempts)} {attempt['started_at']}: {shlex.join(cmd)}\n".encode()
            )
            log_file.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.PIPE,
                                    env=env, pass_fds=(lock_fd,) if fcntl else ())  # fmt: skip
            with self.procs_lock:
                self.procs[trial.name] = proc
            pump = _StderrPump(trial.name, log_file, self.view)
            reader = threading.Thread(target=pump.run, args=(proc.stderr,), daemon=True)
            reader.start()
            rc, max_rss_mb = _wait(proc)
            reader.join()
            proc.stderr.close()
            with self.procs_lock:
                self.procs.pop(trial.name, None)
        wall = time.perf_counter() - start

        finished = (tdir / "metrics.json").exists()
        if finished:
            status = "done"
        elif self.stop.is_set():
            status = "interrupted"
        else:
            status = "failed"
        attempt.update(finished_at=_now(), wall_seconds=round(wall, 3), exit_code=rc, status=status,
                       max_rss_mb=max_rss_mb)  # fmt: skip
        run["wall_seconds"] = round(sum(a.get("wall_seconds") or 0 for a in attempts), 3)
        if status == "failed":
            summary = _failure_summary(rc, pump.tail)
            attempt["error"] = summary
            write_json_atomic(tdir / "error.json", {
                "trial": trial.name, "exit_code": rc, "signal": _signal_name(rc), "summary": summary,
                "stderr_tail": pump.text(), "wall_seconds": round(wall, 3), "max_rss_mb": max_rss_mb,
                "command": shlex.join(cmd), "host": self.machine["host"], "finished_at": attempt["finished_at"],
                "log": "trial.log",
            })  # fmt: skip
        write_json_atomic(run_path, run)
        self.write_index()

        if status == "done":
            m = _read_json_or(tdir / "metrics.json", {}) or {}
            msg = (
                f"done {trial.name}: F1 {_fmt(m.get('f1'))}  EM {_fmt(m.get('exact_match'))}  ({_hms(wall)})"
            )
        elif status == "failed":
            msg = f"FAILED {trial.name}: {attempt['error']} — see {tdir / 'error.json'}"
        else:
            msg = f"interrupted {trial.name} (rerun the command to resume it)"
        self.view.finish(trial.name, "skipped" if status == "interrupted" else status, msg)
        return status

    # -- stopping
    def signal_children(self, sig: int) -> None:
        with self.procs_lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def any_running(self) -> bool:
        with self.procs_lock:
            return any(p.returncode is None for p in self.procs.values())


def _lost_wall_seconds(tdir: Path, attempt: dict) -> float | None:
    """For an attempt whose sweep was killed: from its start to the last file its child wrote."""
    try:
        started = datetime.fromisoformat(attempt["started_at"]).timestamp()
    except (KeyError, ValueError):
        return None
    skip = {".lock", "run.json", "trial.yaml", "error.json"}
    mtimes = [p.stat().st_mtime for p in tdir.rglob("*") if p.is_file() and p.name not in skip]
    last = max((m for m in mtimes if m >= started), default=None)
    return round(last - started, 3) if last is not None else 0.0


def _wait(proc: subprocess.Popen) -> tuple[int, float | None]:
    """Wait for the child; its exit code (negative: killed by that signal) and peak RSS in MiB."""
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere
        return (proc.returncode if proc.returncode is not None else proc.wait()), None
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return proc.returncode, round(rss, 1)


def _signal_name(rc: int | None) -> str | None:
    if rc is None or rc >= 0:
        return None
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _failure_summary(rc: int, tail) -> str:
    sig = _signal_name(rc)
    if sig:
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if sig == "SIGKILL" else ""
        return f"killed by {sig}{hint}"
    last = next((line for line in reversed(tail) if line.strip()), "")
    return f"exit code {rc}: {last.strip()[:300]}" if last else f"exit code {rc}"


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "?"


def run_sweep(
    cfg: ExperimentConfig,
    output_dir: str | os.PathLike,
    shard: str = "1/1",
    parallel: int = 1,
    device: str | None = None,
    *,
    progress: bool | None = None,
) -> int:
    """Run this shard's unfinished trials, ``parallel`` at a time, each in a child process. Returns 0 when all
    of them finished, 1 if any failed (error.json in its folder), 130 if interrupted. ``progress``: a live
    display (default: when stderr is a terminal)."""
    index, count = parse_shard(shard)
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: must be >= 1")
    trials = expand_trials(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_sweep_yaml(output_dir, cfg)
    mine = shard_trials(trials, index, count)
    todo = [t for t in mine if trial_status(output_dir / t.name) != "done"]
    already = len(mine) - len(todo)
    if todo:
        _prefetch_data(todo)
    machine = machine_info()
    live = sys.stderr.isatty() if progress is None else progress
    command, real = _command_line(output_dir, f"{index}/{count}", parallel)
    title = f"sweep {cfg.name} -> {output_dir}" + (f" (shard {index}/{count})" if count > 1 else "")
    view = _View(title, len(mine), live)
    view.counts["done"] = already
    sweep = _Sweep(cfg, output_dir, trials, mine, f"{index}/{count}", parallel, device, view, machine)
    sweep.invocation = {
        "id": f"{machine['host']}-{os.getpid()}-{time.time():.0f}", "command": command,
        "command_is_reconstructed": not real, "shard": f"{index}/{count}", "parallel": parallel,
        "device": device, "host": machine["host"], "started_at": _now(),
    }  # fmt: skip
    sweep.write_index()
    view.note(
        f"{cfg.sweep.mode} sweep: {len(trials)} trials"
        + (f", {len(mine)} in shard {index}/{count}" if count > 1 else "")
        + f"; {already} finished already, {len(todo)} to run, {parallel} at a time"
    )

    slots: queue.Queue = queue.Queue()
    for s in _worker_slots(parallel, device):
        slots.put(s)
    old_term = None
    if threading.current_thread() is threading.main_thread():

        def on_term(signum, frame):
            sweep.terminated = True
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    try:
        with view, ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="trial") as pool:
            futures = {pool.submit(sweep.run_trial, t, slots): t for t in todo}
            try:
                while any(not f.done() for f in futures):
                    time.sleep(0.2)
            except KeyboardInterrupt:
                interrupted = True
                sweep.stop.set()
                _stop_children(sweep, view)
            for f, t in futures.items():
                try:
                    f.result()
                except Exception as e:  # a bug in the bookkeeping: record it like a failed trial
                    log.exception("trial %s", t.name)
                    write_json_atomic(output_dir / t.name / "error.json", {
                        "trial": t.name, "exit_code": None, "summary": f"sweep error: {e!r}", "stderr_tail": "",
                    })  # fmt: skip
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        sweep.write_index()

    final = {t.name: trial_status(output_dir / t.name) for t in mine}
    failed = [n for n, s in final.items() if s == "failed"]
    others = [f"{n} ({s})" for n, s in final.items() if s not in ("done", "failed")]
    done = sum(s == "done" for s in final.values())
    view.note(f"{done}/{len(mine)} trials done" + (f", failed: {', '.join(failed)}" if failed else "")
              + (f", not finished: {', '.join(others)}" if others else "") + f"; index: {output_dir / 'sweep.json'}; tables and verdicts: loraqa report {output_dir}")  # fmt: skip
    if interrupted:
        view.note("interrupted; rerun the same command to resume", style="yellow")
        return 130
    return 1 if failed else 0


def _stop_children(sweep: _Sweep, view: _View) -> None:
    """After Ctrl-C (the children got SIGINT too) or SIGTERM (forwarded): give the children time to stop,
    then SIGTERM, then SIGKILL. A second Ctrl-C kills them at once."""
    view.note("stopping: waiting for the running trials to exit…", style="yellow")
    if sweep.terminated:
        sweep.signal_children(signal.SIGTERM)
    try:
        for sig, grace in ((None, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                sweep.signal_children(sig)
            deadline = time.monotonic() + grace
            while sweep.any_running() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not sweep.any_running():
                return
    except KeyboardInterrupt:
        sweep.signal_children(signal.SIGKILL)

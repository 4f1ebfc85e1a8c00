"""Where and with what code trials run: host, platform, CPUs, GPUs, torch version and ``code_version``.

Recorded in every attempt (run.json) and in sweep.json, and printed by the report, so a sweep's numbers say
which machine and which code produced them.
"""

from __future__ import annotations

import collections
import os
import platform
import shutil
import socket
import subprocess
from datetime import datetime
from pathlib import Path


def nvidia_gpus() -> list[tuple[str, str]]:
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
    from .. import __version__

    text = f"loraqa {__version__}"
    src = Path(__file__).resolve().parents[1]  # the loraqa package
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)  # fmt: skip
        lines = commit.stdout.splitlines()
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
        "gpus": [name for _, name in nvidia_gpus()],
        "code": code_version(),
    }


def describe_machine(m: dict) -> str:
    gpus = m.get("gpus") or []
    gpu = ", ".join(f"{n}x {g}" for g, n in collections.Counter(gpus).items()) if gpus else "no GPU"
    return f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, torch {m.get('torch', '?')}, {gpu}"


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")

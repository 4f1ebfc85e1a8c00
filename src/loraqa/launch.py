"""The ``loraqa`` command starts under tcmalloc where the system has it: training on a CPU is ~5-8% faster and
peaks ~12% lower than under glibc's malloc (docs/performance.md, "The C allocator").

A training step allocates and frees the same activation-sized blocks again and again; glibc hands large ones
back to the kernel and faults them in anew, where tcmalloc keeps them. The allocator is chosen when a process
starts (``LD_PRELOAD``), so the command, run from a shell, replaces itself once (``os.execve``: the same pid,
arguments and streams) with the library preloaded. Child processes (sweep trials, torchrun's workers) inherit
the variable and start under it at once. ``LORAQA_ALLOCATOR=system`` keeps the C library's malloc; a process
that already preloads an allocator (``LD_PRELOAD`` names one) is left as it is.

Written here: torch's launcher (``python -m torch.backends.xeon.run_cpu --enable-tcmalloc``) does the same
preload, but as a separate launcher that also pins cores and NUMA nodes, where a ``loraqa`` command should
stay one command that behaves the same on any machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

ALLOCATOR_ENV = "LORAQA_ALLOCATOR"  # "system": glibc's malloc; unset or "tcmalloc": tcmalloc where found
ALLOCATORS = ("tcmalloc", "system")
# gperftools' library, from Debian/Ubuntu's libtcmalloc-minimal4 (or the full libgoogle-perftools4)
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
PRELOADED = ("tcmalloc", "jemalloc", "mimalloc")  # an allocator the user already chose, in LD_PRELOAD
# tcmalloc prints a line for every allocation over this many bytes (default 1 GiB; a model's weights are one)
REPORT_THRESHOLD = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"


def library_dirs() -> list[Path]:
    """Where the library is looked for: the environment's own lib folder (a conda env), then the system's."""
    return [Path(sys.prefix) / "lib", Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"),
            Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]  # fmt: skip


def find_tcmalloc(dirs: list[Path]) -> Path | None:
    return next((d / name for d in dirs for name in LIBRARIES if (d / name).is_file()), None)


def preloaded_env(environ: Mapping[str, str], library: Path | None) -> dict[str, str] | None:
    """The environment to start again with, ``library`` preloaded; None where this process should go on as it
    is (not Linux, no library, ``LORAQA_ALLOCATOR=system``, an allocator already preloaded). A ValueError for an
    ``LORAQA_ALLOCATOR`` that is neither choice."""
    choice = environ.get(ALLOCATOR_ENV, "tcmalloc") or "tcmalloc"
    if choice not in ALLOCATORS:
        raise ValueError(f"{ALLOCATOR_ENV}={choice}: give one of {', '.join(ALLOCATORS)}")
    preload = environ.get("LD_PRELOAD", "")
    if choice == "system" or library is None or not sys.platform.startswith("linux"):
        return None
    if any(name in preload for name in PRELOADED):
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else str(library)
    env.setdefault(REPORT_THRESHOLD, str(1 << 40))
    return env


def restart_under_tcmalloc(command: list[str]) -> None:
    """Replace this process by ``python COMMAND`` (``-m loraqa.cli ARGS``, or a script's ``sys.argv``) with
    tcmalloc preloaded, where :func:`preloaded_env` says so; otherwise return. Called first thing by the command
    line (never when ``loraqa.cli.main`` is called with arguments, as from Python) and by the benchmarks that
    time training, so that they measure what the command runs."""
    env = preloaded_env(os.environ, find_tcmalloc(library_dirs()))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *command], env)


def allocator() -> str:
    """The allocator this process runs under, for ``metrics.json``: a preloaded library's name (as mapped into
    the process: a library the loader could not preload does not count), else ``system``."""
    try:
        mapped = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: no preloading either
        return "system"
    return next((name for name in PRELOADED if f"lib{name}" in mapped), "system")

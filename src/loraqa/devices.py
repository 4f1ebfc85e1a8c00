"""The device a process computes on and the memory it uses: the one home of loraqa's device and memory calls.

``peak_memory_mb`` reads the same window on every device: from the last :func:`reset_peak_memory` (or the
start of the process) to now. On a GPU that is torch's peak allocation; on a CPU the process's peak resident set
(VmHWM), which Linux lets a process reset and other systems do not (there it is the process's lifetime peak).
"""

from __future__ import annotations

import gc
import resource
import sys

import torch


def default_device() -> torch.device:
    """A GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory since the last :func:`reset_peak_memory`: max allocated on a GPU, peak resident set size
    (VmHWM) on a CPU (the process-lifetime peak where the kernel cannot reset it)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start a new peak-memory window (so loading a model, e.g. de-quantizing a GGUF file, is not counted)."""
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

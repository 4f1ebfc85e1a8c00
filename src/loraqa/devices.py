"""The device a process computes on, what it computes in, and the memory it uses: the one home of loraqa's
device, precision, attention-kernel and memory decisions.

``peak_memory_mb`` reads the same window on every device: from the last :func:`reset_peak_memory` (or the
start of the process) to now. On a GPU that is torch's peak allocation; on a CPU the process's peak resident set
(VmHWM), which Linux lets a process reset and other systems do not (there it is the process's lifetime peak).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import resource
import sys
from functools import lru_cache
from pathlib import Path

import torch

from .config import LAYERS_PAY_FROM_STEPS, NORMS_PAY_FROM_STEPS

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """A GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``--device`` as a torch device (None or "": :func:`default_device`); a ValueError that says what to give
    where torch knows no such device or this machine has none."""
    if device is None or device == "":
        return default_device()
    dev = parse_device(device)
    if dev.type not in ("cpu", "cuda") and not _available(dev.type):
        raise ValueError(
            f"--device {device}: this torch ({torch.__version__}) has no {dev.type} device here; give cpu, cuda or "
            "cuda:N"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU here; give cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def _available(kind: str) -> bool:
    """Whether torch has a ``kind`` device (mps, xpu, ...) here: ``torch.<kind>.is_available()`` where torch has
    that module (mps answers in torch.backends), never for kinds with none (meta, lazy: no place to train)."""
    backend = getattr(torch.backends, kind, None) if kind == "mps" else getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available and is_available())


def parse_device(device: str) -> torch.device:
    """``--device`` as torch reads it, whatever this machine has; a ValueError that says what to give."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device}: not a device torch knows; give cpu, cuda or cuda:N") from None


def check_training_device(device: torch.device, world_size: int) -> None:
    """A single training process on a GPU other than the first: refused (a ValueError that says what to do).
    The Trainer runs one process on ``cuda:0`` whatever the model was loaded on; under torchrun each process
    has the GPU of its rank."""
    if device.type == "cuda" and (device.index or 0) != 0 and world_size == 1:
        raise ValueError(
            f"--device {device}: a single training process runs on the first visible GPU; to train on GPU "
            f"{device.index}, run CUDA_VISIBLE_DEVICES={device.index} loraqa train ... --device cuda"
        )


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on GPUs that support it and CPUs with native bf16, else ``fp32``. Asking for bf16 on
    a CPU without it still gives bf16, with a warning: it is correct there, only very slow."""
    device = torch.device(device)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        # there a run in bf16 trains many times slower than one in fp32: on a 2-core AVX2-only EPYC a
        # 616x576 @ 576x1536 matmul takes 1,175 ms in bf16 and 26.5 ms in fp32
        log.warning(
            "model.precision=bf16 on a CPU without native bf16 (no AMX or AVX512-BF16 in its flags): "
            "its matmuls are emulated, far slower than fp32; use model.precision=auto or fp32"
        )
    if precision != "auto":
        return precision
    if device.type == "cuda":  # native bf16 from Ampere on; before it (V100, T4) torch emulates it, slowly
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def resolve_attention(attn_implementation: str, device: torch.device | str, *, training: bool = False) -> str:
    """``auto`` -> ``eager_lean`` to train on a CPU, ``sdpa`` to answer and on a GPU; any other value as asked.

    Training on a CPU, SDPA runs its flash kernel for loraqa's masked shared-context rows, and that kernel is
    slower there than the plain matmul-softmax-matmul path; ``eager_lean`` (:mod:`loraqa.attention`) is that
    path without transformers' eager full-size fp32 copies (``benchmarks/bench_attention.py``,
    docs/performance.md). Answering shows no such gap, so it keeps SDPA. The math path keeps the attention
    weights for the backward pass, so training takes more memory; ``model.attn_implementation=sdpa`` is the
    switch where memory is short. On a GPU, SDPA's fused kernels are the fast and lean path."""
    if attn_implementation != "auto":
        return attn_implementation
    return "eager_lean" if training and torch.device(device).type == "cpu" else "sdpa"


def resolve_compile(compile_mode: str, device: torch.device | str, steps: int) -> str:
    """``train.compile``: ``auto`` -> ``layers`` to train for :data:`LAYERS_PAY_FROM_STEPS` optimizer steps or
    more on a CPU, ``norms`` for :data:`NORMS_PAY_FROM_STEPS` or more, ``off`` otherwise and on a GPU; any other
    value as asked.

    On a CPU the RMSNorms compile in seconds and make a bf16 step ~7-11% faster (:mod:`loraqa.norms`); whole
    decoder layers compile for about a minute (LoRA dropout's mask inside them, :mod:`loraqa.lora_dropout`) and
    make a step ~20-30% faster still (docs/performance.md): each pays where a run is long enough to earn its
    compiling back. On a GPU neither has been measured."""
    if compile_mode != "auto":
        return compile_mode
    if torch.device(device).type != "cpu":
        return "off"
    return "layers" if steps >= LAYERS_PAY_FROM_STEPS else "norms" if steps >= NORMS_PAY_FROM_STEPS else "off"


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
    _return_free_memory()
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _return_free_memory() -> None:
    """Give the C allocator's free memory back to the system (glibc's ``malloc_trim``; tcmalloc's
    ``MallocExtension_ReleaseFreeMemory`` where it is preloaded, loraqa.launch), so the new window's resident
    set starts from what is in use: the allocator keeps freed memory (a de-quantized GGUF file, an earlier model
    in the process) resident, and the peak would count it. No-op where there is no such call."""
    for call, args in (("malloc_trim", (0,)), ("MallocExtension_ReleaseFreeMemory", ())):
        with contextlib.suppress(OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) on Windows
            getattr(ctypes.CDLL(None), call)(*args)

"""LoRA's dropout on a CPU, at the cost of a few elementwise operations instead of a serial random generator.

PEFT applies ``nn.Dropout(p)`` to each adapted layer's input before ``lora_A``. On a CPU, torch draws that
Bernoulli mask element by element from its Mersenne Twister, slowest of all for the bf16 activations loraqa
trains with: on SmolLM2 with LoRA on the attention projections ``aten::bernoulli_`` was 12% of the whole
training step (``benchmarks/profile_loop.py --ops 14 --torch-dropout``, docs/performance.md).

:class:`CpuLoraDropout` keeps dropout's semantics, each module its own independent mask drawn afresh at every
call, elements kept with probability ``1 - p`` and scaled by the inverse of that probability, but draws the
mask as 16 random bits an element from NumPy's PCG64 (64 bits in about a nanosecond). Its seed is drawn from
torch's default generator at each call, so ``torch.manual_seed`` (the Trainer's ``seed``) reproduces the masks
and a checkpoint's saved RNG state resumes them. ``p`` is used to 1/65536 (``p=0.05`` keeps with probability
62259/65536 = 0.94999695), and the scale is the inverse of that probability, rounded to the activations'
dtype as ``nn.Dropout``'s is.

Written here because torch offers no faster CPU Bernoulli draw; on other devices (CUDA's Philox is fast) and in
eval mode it is ``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

LEVELS = 1 << 16  # a 16-bit draw per element: p to 1/65536


class CpuLoraDropout(torch.nn.Module):
    """``nn.Dropout(p)`` with a fast mask on CPU tensors (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"lora.dropout must lie in (0, 1) here, got {p}")
        self.p = p
        self.drop_levels = round(p * LEVELS)  # a 16-bit draw below this is dropped
        self.scale = LEVELS / (LEVELS - self.drop_levels)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, self.training)
        return x * self.mask(x.shape, x.dtype)

    def mask(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """0 where dropped, ``scale`` where kept, drawn from a seed taken from torch's default generator."""
        return dropout_mask(_MASKS_DRAWN, list(shape), dtype, self.drop_levels)


# A custom op, so that torch.compile (train.compile=layers) calls it as it is instead of breaking its graph at
# NumPy, and inductor's own per-element random draws (slower on a CPU than this) are not used. Every call
# mutates one shared counter, which keeps compiled calls in the order eager calls them: each draws its seed from
# torch's generator, so compiled or eager a layer draws the same masks from the same seed.
_MASKS_DRAWN = torch.zeros((), dtype=torch.int64)


@torch.library.custom_op("loraqa::lora_dropout_mask", mutates_args=("drawn",), device_types="cpu")
def dropout_mask(drawn: torch.Tensor, shape: list[int], dtype: torch.dtype, drop_levels: int) -> torch.Tensor:
    """The mask of :meth:`CpuLoraDropout.mask`: a 16-bit draw below ``drop_levels`` drops its element."""
    drawn.add_(1)
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, ()))
    # uniform over [-32768, 32767]
    draws = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]
    # the compare in NumPy and the cast from uint8: torch's int16 compare and its cast from bool run 3-5x
    # slower on a CPU (half of the mask's time between them)
    keep = np.greater_equal(draws, drop_levels - LEVELS // 2)
    scale = LEVELS / (LEVELS - drop_levels)
    return torch.from_numpy(keep).view(torch.uint8).view(shape).to(dtype).mul_(scale)


@dropout_mask.register_fake
def _(drawn: torch.Tensor, shape: list[int], dtype: torch.dtype, drop_levels: int) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def use_cpu_dropout(model) -> int:
    """Replace every LoRA layer's ``nn.Dropout`` by a :class:`CpuLoraDropout` of the same ``p``; returns how many.
    Dropout has no weights, so saved adapters and checkpoints are unchanged."""
    replaced = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in module.lora_dropout.items():
            if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                module.lora_dropout[name] = CpuLoraDropout(dropout.p)
                replaced += 1
    return replaced

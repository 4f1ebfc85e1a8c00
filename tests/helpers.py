"""Helpers several test modules share (pytest puts this folder on sys.path: ``from helpers import ...``)."""

from __future__ import annotations

import torch


def nonzero_lora_b(model, seed: int, scale: float = 0.2):
    """Random LoRA B matrices (PEFT starts them at zero, where the adapters would change nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model

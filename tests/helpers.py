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


def wait_until(predicate, timeout: float, what: str, every: float = 0.02):
    """Poll ``predicate`` until it returns something true (returned), at most ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(every)


# a paragraph holding every colour word of the synthetic data: whichever colour the tiny reader answers is in it
ALL_COLOURS = ("The box in the garden is red. The cup in the kitchen is blue. The kite in the harbor is green. "
               "The hat in the tower is yellow. The coat in the market is black. The bell in the school is white. "
               "The boat in the forest is orange. The lamp in the museum is purple.")  # fmt: skip

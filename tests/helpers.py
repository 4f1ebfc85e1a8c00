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
# a question on each thing of ALL_COLOURS ("What color is the box in the garden?", ...)
COLOUR_QUESTIONS = [
    f"What color is the {s.split(' is ')[0].removeprefix('The ')}?" for s in ALL_COLOURS.split(". ")
]


def train_tiny_run(run, data_dir, *, precision: str = "fp32", eval_limit: int = 6):
    """``loraqa train`` of the tiny random GPT-2 for 2 steps at lr 0.05 without warmup: the adapter moves far
    enough to change the answers, so a run loaded without its adapter could not answer like the run."""
    from loraqa.cli import main

    rc = main(["train", "--model", "tiny-random-gpt2", "--data-dir", str(data_dir), "--eval-limit", str(eval_limit),
               "--precision", precision, "--max-new-tokens", "6", "--train-limit", "8", "--max-steps", "2",
               "--batch-size", "4", "--eval-steps", "0", "--save-steps", "0", "--warmup-steps", "0",
               "--lr", "0.05", "-o", str(run)])  # fmt: skip
    assert rc == 0
    return run

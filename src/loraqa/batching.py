"""Batches of stand-alone examples: :class:`QACollator` pads them, :class:`LengthGroupedBatches` orders them.

Shared-context batches (a paragraph's context once for all its questions) are :mod:`loraqa.packing`'s.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from .prompt import IGNORE_INDEX


def padded_width(longest: int, multiple: int) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (``train.pad_to_multiple``). A CPU backend (oneDNN)
    builds a kernel for each new matmul shape, and shape-specialised kernels (torch.compile) recompile for
    each: with a width per batch every batch is a new shape; rounded up, batches share a few."""
    return -(-longest // multiple) * multiple


FILLER = "filler"  # a feature key: a labelless copy of a question that pads an epoch (EvenEpoch)


class WithFillers(list):
    """The training features, and past their end their fillers: index ``len + q`` is question q's copy with
    every label IGNORE_INDEX and :data:`FILLER` set. It adds no loss and no gradient (the loss is summed over
    labelled tokens and divided by their count over all processes) and the collators count it nowhere."""

    def __getitem__(self, i):
        if isinstance(i, int) and i >= len(self):
            f = super().__getitem__(i - len(self))
            return {**f, "labels": [IGNORE_INDEX] * len(f["labels"]), FILLER: True}
        return super().__getitem__(i)


class EvenEpoch(Sampler):
    """An epoch's order (``order``, over ``n`` features) padded with fillers (:class:`WithFillers`) to a whole
    number of global batches (``group``). Under DDP accelerate deals each process its share of every global
    batch, and fills a short last one with the epoch's first questions, which then train twice and count twice;
    with fillers every process gets its full share and each step is the one a single process takes."""

    def __init__(self, order, n: int, group: int):
        self.order, self.n, self.group = order, n, group

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.order) // self.group) * self.group

    def __iter__(self):
        out = list(self.order)
        pad = -len(out) % self.group
        return iter(out + [self.n + out[-1]] * pad if out else out)


def real_features(features: list[dict]) -> list[dict]:
    """The batch's questions, its fillers (:class:`WithFillers`) left out."""
    return [f for f in features if not f.get(FILLER)]


class QACollator:
    """Pads a batch to its longest example rounded up to ``pad_to_multiple`` (right padding), but not past
    ``max_width`` (``prompt.max_length``: a padded position past the model's positions would index past its
    position embeddings); padded positions get label -100 and attention mask 0."""

    def __init__(self, pad_token_id: int, pad_to_multiple: int = 1, max_width: int | None = None):
        self.pad_token_id, self.pad_to_multiple, self.max_width = pad_token_id, pad_to_multiple, max_width

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        width = padded_width(longest, self.pad_to_multiple)
        if self.max_width is not None:
            width = max(longest, min(width, self.max_width))
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        real = real_features(features)
        if len(real) < len(features):  # the trainer counts these, not the rows and their mask
            batch |= {"num_questions": len(real), "real_tokens": sum(len(f["input_ids"]) for f in real)}
        return batch


class LengthGroupedBatches(Sampler):
    """Batches of similar lengths in a random order (``train.group_by_length``).

    Each epoch the examples are shuffled, cut into mega-batches of 50 batches, sorted by length
    inside each and cut into batches of ``group`` (batch size x gradient accumulation); the full
    batches are shuffled, the longest first (an out-of-memory error shows at once), a short last
    batch last. On the first 240 SQuAD train examples ~98% of the computed tokens are real (random
    batches: ~64%; the Trainer's ``LengthGroupedSampler``, whose mega-batches shrink to a quarter of
    a small data set and whose batches run from longest to shortest: ~91%). Each epoch's permutation
    comes from a generator seeded with (``seed``, epoch) -- the Trainer calls :meth:`set_epoch` -- not from
    torch's global one: a run resumed in a later epoch then sees the batches an uninterrupted run saw (the
    global generator, restored from the checkpoint, is past the permutation), and under DDP every process
    draws the same permutation (``group`` is then the global batch; accelerate deals each its share).
    """

    def __init__(self, lengths: list[int], group: int, mega: int = 50, seed: int = 0):
        self.lengths, self.group, self.mega, self.seed, self.epoch = list(lengths), group, mega, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        epoch_gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        perm = torch.randperm(len(self.lengths), generator=epoch_gen).tolist()
        size = self.mega * self.group
        batches = []
        for start in range(0, len(perm), size):
            mega = sorted(perm[start : start + size], key=lambda i: -self.lengths[i])
            batches += [mega[j : j + self.group] for j in range(0, len(mega), self.group)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.group else []
        gen = torch.Generator().manual_seed(sum(i * p for i, p in enumerate(perm[:64], 1)))
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches[0], batches[longest] = batches[longest], batches[0]
        return iter([i for batch in batches + tail for i in batch])

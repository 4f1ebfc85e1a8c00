"""Shared-context training (``train.share_contexts``): a paragraph's context is computed once per batch.

SQuAD's 87,599 training questions sit on 18,896 paragraphs. Stand-alone, every question carries its own copy
of its paragraph, and ~3/4 of the tokens computed are repeated contexts. Here the dataset items stay one
question each (one optimizer step still covers ``train.batch_size`` questions), but:

- :class:`SharedContextBatches` (the sampler) shuffles paragraphs every epoch and lists each paragraph's
  questions consecutively, so the ``batch_size`` consecutive questions of a batch cover a few paragraphs (a
  paragraph is split across two batches when it must be);
- :class:`SharedContextCollator` lays each paragraph of a batch out as one *block*: the ``Context: ...``
  tokens once, then one segment ``\\nQuestion: ...\\nAnswer: ...<eos>`` per question. An additive 4D float mask
  lets every segment see the context and its own earlier tokens only; every segment's position ids continue
  from the end of the context. Blocks are packed into rows (several short blocks can share a row, each
  seeing only itself) to cut padding.

With that mask and those positions each question's logits, and so its loss and gradients, are those of its
stand-alone prompt (``tests/test_shared_contexts.py`` checks it on GPT-2 and Llama). The labels are the
stand-alone labels (answer + EOS), so the loss is still averaged over answer tokens.

Questions share a block only when their context *tokens* are the same. A context cut to fit
``prompt.max_length`` keeps a window around each question's own answer, so questions on one long paragraph
may get different windows; they then form separate blocks (the group is split), and every answer stays inside
its own window, as it does stand-alone.

Not for ``prompt.loss_on=all``: the context's tokens would be counted once per paragraph instead of once per
question, which is a different objective; the trainer falls back to stand-alone examples there (the collator
refuses labelled context tokens).

Written here rather than taken from a library: transformers' padding-free collator
(``DataCollatorWithFlattening``) packs whole independent sequences, it cannot let several sequences share a
prefix; the tree mask and position ids below are what the models accept instead (a float mask, not a boolean
one: eager attention would add a boolean mask as a number).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.utils.data import Sampler

from .attention import SEGMENTS
from .batching import padded_width, real_features
from .prompt import IGNORE_INDEX


def context_key(feature: dict) -> tuple[int, ...]:
    """The context tokens of a training feature: questions with equal keys share one block."""
    return tuple(feature["input_ids"][: feature["context_length"]])


@dataclass
class Block:
    """One context and the question segments that follow it, laid out consecutively."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    context: int  # number of context tokens (the block's first tokens)
    segments: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each question's segment


def build_blocks(features: list[dict]) -> list[Block]:
    """Group features by context (first appearance order) into blocks."""
    groups: dict[tuple[int, ...], list[dict]] = {}
    for f in features:
        groups.setdefault(context_key(f), []).append(f)
    blocks = []
    for key, members in groups.items():
        c = len(key)
        block = Block(list(key), [IGNORE_INDEX] * c, list(range(c)), c)
        for f in members:
            labels = f["labels"]
            if any(x != IGNORE_INDEX for x in labels[: c + 1]):
                # the segment's first token follows another segment in the block, not the context: it must
                # not be predicted, and context tokens must not be labelled (prompt.loss_on=all)
                raise ValueError("shared-context batches need answer-only labels (prompt.loss_on=answer)")
            start = len(block.input_ids)
            n = len(f["input_ids"]) - c
            block.input_ids += f["input_ids"][c:]
            block.labels += labels[c:]
            block.position_ids += range(c, c + n)
            block.segments.append((start, start + n))
        blocks.append(block)
    return blocks


def pack_rows(lengths: list[int], multiple: int = 1) -> list[list[int]]:
    """First-fit decreasing: block indices per row, no row longer than the longest block rounded up to
    ``multiple`` (the batch's padded width, whose room short blocks may as well fill)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    capacity = padded_width(lengths[order[0]], multiple) if order else 0
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


class SharedContextCollator:
    """Collates questions into shared-context rows (see the module docstring).

    Returns ``input_ids``, ``labels`` (-100 off the answers), ``position_ids``, ``attention_mask`` (B x 1 x L x L,
    float32, 0 where a position may attend and the dtype's minimum where not; padding attends to itself only)
    and two counts the trainer reads and removes before the model sees the batch: ``num_questions`` and
    ``real_tokens`` (non-padding positions computed). The width is the longest row's rounded up to
    ``pad_to_multiple`` (see :func:`~loraqa.batching.padded_width`).

    With ``one_row`` the rows are laid end to end in a single row (B = 1) as its *segments*, padded once at the
    end, and ``attention_segments`` lists their lengths (the padding counted in the last): the layers' matmuls
    then compute no padding between rows (a fifth of the positions of SQuAD's batches of 8), and a kernel that
    reads the segments (:func:`~loraqa.attention.eager_lean_attention`, the only kind ``train.one_row`` runs
    with) computes attention segment by segment, as it would row by row. The mask then holds each segment's own
    block only: 1 x 1 x L x S, S the longest segment, column j of a position's mask row being its segment's j-th
    position. A square L x L mask would grow with the square of the batch size (240 MB for the widest of 20
    batches of 64 SQuAD questions) while all but the blocks on its diagonal went unread.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple: int = 1, one_row: bool = False):
        self.pad_token_id, self.pad_to_multiple, self.one_row = pad_token_id, pad_to_multiple, one_row

    def __call__(self, features: list[dict]) -> dict:
        blocks = build_blocks(features)
        rows = pack_rows([len(b.input_ids) for b in blocks], self.pad_to_multiple)
        lengths = [sum(len(blocks[i].input_ids) for i in row) for row in rows]
        if self.one_row:  # (output row, first position) of each packed row, and the positions it spans
            width = padded_width(sum(lengths), self.pad_to_multiple)
            starts = [(0, sum(lengths[:r])) for r in range(len(rows))]
            spans = lengths[:-1] + [width - sum(lengths[:-1])]
        else:
            width = padded_width(max(lengths), self.pad_to_multiple)
            starts = [(r, 0) for r in range(len(rows))]
            spans = [width] * len(rows)
        n = 1 if self.one_row else len(rows)
        batch = {
            "input_ids": torch.full((n, width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((n, width), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((n, width), dtype=torch.long),
        }
        # allowed[r, start + x, y]: may the row's x-th position attend to its y-th (positions counted in the
        # packed row, which starts at ``start`` of output row r)
        allowed = torch.zeros((n, width, max(spans)), dtype=torch.bool)
        longest = max(len(b.input_ids) for b in blocks)
        causal = torch.ones((longest, longest), dtype=torch.bool).tril()
        for (r, start), row, length, span in zip(starts, rows, lengths, spans, strict=True):
            self._lay_out(batch, allowed, causal, r, start, [blocks[i] for i in row])
            pad = torch.arange(length, span)
            allowed[r, start + pad, pad] = True  # padding attends to itself only
        mask = torch.zeros((n, 1, *allowed.shape[1:]), dtype=torch.float32)
        batch["attention_mask"] = mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        real = real_features(features)
        if len(real) < len(features):  # fillers (an epoch's end under DDP) compute tokens no question needs
            counted = sum(len(b.input_ids) for b in build_blocks(real)) if real else 0
        else:
            counted = sum(lengths)
        batch |= {"num_questions": len(real), "real_tokens": counted}
        if self.one_row:
            batch[SEGMENTS] = spans
        return batch

    @staticmethod
    def _lay_out(
        batch: dict, allowed: torch.Tensor, causal: torch.Tensor, r: int, start: int, blocks: list[Block]
    ) -> None:
        """Write one packed row's blocks into output row ``r`` from position ``start``, and their mask: each
        context causal, each question segment seeing its context and its own earlier tokens (``causal``: the
        lower triangle, as large as the batch's longest block)."""
        x = 0  # the block's first position in the packed row
        for b in blocks:
            end, c = x + len(b.input_ids), x + b.context
            for key in ("input_ids", "labels", "position_ids"):  # the Block's fields of those names
                batch[key][r, start + x : start + end] = torch.tensor(getattr(b, key))
            allowed[r, start + x : start + c, x:c] = causal[: b.context, : b.context]
            for s, e in b.segments:
                allowed[r, start + x + s : start + x + e, x:c] = True
                allowed[r, start + x + s : start + x + e, x + s : x + e] = causal[: e - s, : e - s]
            x = end


class SharedContextBatches(Sampler):
    """Question order for shared-context training: each paragraph's questions consecutively.

    Each epoch the paragraphs (questions with the same context tokens) are shuffled with one permutation drawn
    from a generator seeded with (``seed``, epoch), as for :class:`~loraqa.batching.LengthGroupedBatches` (a
    resume in a later epoch sees the same order; under DDP every process draws the same). With ``by_length`` they are cut into mega-groups of about
    ``mega`` batches' worth of questions and sorted by block length (context + segments) inside each, so the
    blocks of one batch have similar lengths. The question list is cut into batches of ``group`` (batch size x
    gradient accumulation); the full batches are shuffled, the one computing the most tokens first (an
    out-of-memory error shows at once), a short last batch last. Batches are filled with whole paragraphs where
    the question counts allow (:func:`fill_batches`), so few paragraphs are split across two batches.
    """

    def __init__(
        self,
        features: list[dict],
        group: int,
        by_length: bool = True,
        mega: int = 50,
        window: int = 64,
        seed: int = 0,
    ):
        paragraphs: dict[tuple[int, ...], list[int]] = {}
        for i, f in enumerate(features):
            paragraphs.setdefault(context_key(f), []).append(i)
        self.paragraphs = list(paragraphs.values())
        self.context = [features[p[0]]["context_length"] for p in self.paragraphs]
        self.segment = [len(f["input_ids"]) - f["context_length"] for f in features]
        self.n, self.group, self.by_length = len(features), group, by_length
        self.mega, self.window = mega, window
        self._paragraph_of = {q: p for p, qs in enumerate(self.paragraphs) for q in qs}
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def _cost(self, questions: list[int]) -> int:
        """Tokens a batch computes (before padding): each context once per paragraph, each segment."""
        contexts = {self._paragraph_of[q] for q in questions}
        return sum(self.context[p] for p in contexts) + sum(self.segment[q] for q in questions)

    def __iter__(self):
        epoch_gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        perm = torch.randperm(len(self.paragraphs), generator=epoch_gen).tolist()
        if self.by_length:
            per_mega = max(1, round(self.mega * self.group * len(self.paragraphs) / max(self.n, 1)))
            block = [
                self.context[p] + sum(self.segment[q] for q in self.paragraphs[p]) for p in range(len(perm))
            ]
            perm = [
                p
                for s in range(0, len(perm), per_mega)
                for p in sorted(perm[s : s + per_mega], key=lambda p: -block[p])
            ]
        batches = fill_batches([self.paragraphs[p] for p in perm], self.group, self.window)
        tail = [batches.pop()] if batches and len(batches[-1]) < self.group else []
        gen = torch.Generator().manual_seed(sum(i * p for i, p in enumerate(perm[:64], 1)))
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        if batches:
            costliest = max(range(len(batches)), key=lambda b: self._cost(batches[b]))
            batches[0], batches[costliest] = batches[costliest], batches[0]
        return iter([q for batch in batches + tail for q in batch])


def fill_batches(paragraphs: list[list[int]], group: int, window: int = 64) -> list[list[int]]:
    """Cut paragraphs (lists of question indices, in order) into batches of ``group`` questions, splitting as
    few paragraphs as possible: a paragraph of more than ``group`` questions first gives full batches of its
    own; each batch starts with the earliest pending paragraph and is topped up best-fit (the largest pending
    paragraph that fits, among the next ``window``, the earliest of equal size); only when none fits is the
    earliest one split. All batches are full but the last; every question appears once, order kept inside
    a paragraph.
    """
    # a batch past all the questions is all of them: the buckets below are one a possible size
    group = max(1, min(group, sum(len(qs) for qs in paragraphs)))
    batches: list[list[int]] = []
    pieces: list[list[int]] = []
    for qs in paragraphs:
        whole = len(qs) - len(qs) % group
        batches += [qs[j : j + group] for j in range(0, whole, group)]
        if whole < len(qs):
            pieces.append(qs[whole:])
    # buckets[size]: positions (into pieces) of pending pieces of that size, in order
    buckets: list[deque[int]] = [deque() for _ in range(group + 1)]
    for pos, piece in enumerate(pieces):
        buckets[len(piece)].append(pos)

    def earliest() -> int | None:
        heads = [b[0] for b in buckets if b]
        return min(heads) if heads else None

    batch: list[int] = []
    while (head := earliest()) is not None:
        if not batch:
            buckets[len(pieces[head])].popleft()
            batch = list(pieces[head])
        room = group - len(batch)
        fit = next((s for s in range(room, 0, -1) if buckets[s] and buckets[s][0] < head + window), None)
        if fit is not None:
            batch += pieces[buckets[fit].popleft()]
        elif room and (pos := earliest()) is not None:  # nothing fits: split the earliest pending piece
            buckets[len(pieces[pos])].popleft()
            batch += pieces[pos][:room]
            pieces[pos] = pieces[pos][room:]
            if pieces[pos]:
                bisect.insort(buckets[len(pieces[pos])], pos)
        if len(batch) == group:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    return batches

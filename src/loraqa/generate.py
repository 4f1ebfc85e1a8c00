"""Generate answers: batched greedy decoding with a KV cache.

The fast path (every part has a switch in :func:`generate_answers`):

* prompts that begin with the same tokens (the questions on one SQuAD paragraph share the whole
  ``Context: ...`` part) are grouped; the shared prefix runs through the model once and its KV cache is
  copied to each question, so only the question part is computed per question (``share_prefixes``);
* batches are sorted by length so little compute goes to padding (``sort_by_length``); a row is
  ``[left padding][prefix][padding][question]``, with position ids that skip the padding;
* the prompt's forward pass computes the output layer at the last position only;
* decoding is a plain greedy loop over the model's forward pass with a ``DynamicCache``; a sequence stops at
  its first newline or EOS (the answer is one line), stopped sequences leave the batch (their rows of the KV
  cache too) once they are a quarter of it, so later steps run on the live sequences (``prune_finished``),
  and the batch ends as soon as every sequence has stopped.

The answer is the first line of the decoded continuation, stripped: the same text ``model.generate`` gives
one question at a time with the same stop tokens (``engine="hf"`` runs ``model.generate`` instead, batched
with left padding, for comparison).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from tqdm.auto import tqdm

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
MIN_SHARED_PREFIX = 16  # tokens; shorter common beginnings are not worth a second forward pass


@lru_cache(maxsize=8)
def _stop_token_ids(tokenizer_key: int, tokenizer) -> tuple[int, ...]:
    vocab_ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in vocab_ids])
    stops = {i for i, t in zip(vocab_ids, texts, strict=True) if "\n" in t}
    stops.add(tokenizer.eos_token_id)
    return tuple(sorted(stops))


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus every token whose text contains a newline: the answer ends at the first of them."""
    return list(_stop_token_ids(id(tokenizer), tokenizer))


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _accepts(model, name: str) -> bool:
    """Whether the model's forward takes ``name`` (a PEFT wrapper passes it on to the model it wraps)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class PromptGroup:
    """Prompts (indices) that start with the same ``shared`` tokens (0: a prompt on its own)."""

    shared: int
    members: list[int]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_batches(
    prompts: list[list[int]],
    batch_size: int,
    *,
    sort_by_length: bool = True,
    share_prefixes: bool = True,
    min_shared: int = MIN_SHARED_PREFIX,
) -> list[list[PromptGroup]]:
    """Batches of at most ``batch_size`` prompts, as groups sharing a prefix; every prompt once."""
    groups: list[PromptGroup] = []
    if share_prefixes:
        by_start: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            key = tuple(p[:min_shared]) if len(p) > min_shared else ("alone", i)
            by_start.setdefault(key, []).append(i)
        for members in by_start.values():
            first = prompts[members[0]]
            shared = min((_common_prefix(first, prompts[m]) for m in members[1:]), default=0)
            shared = min(shared, min(len(prompts[m]) for m in members) - 1)  # every member keeps a token
            if len(members) < 2 or shared < min_shared:
                groups.extend(PromptGroup(0, [m]) for m in members)
            else:
                groups.extend(
                    PromptGroup(shared, members[s : s + batch_size])
                    for s in range(0, len(members), batch_size)
                )
    else:
        groups = [PromptGroup(0, [i]) for i in range(len(prompts))]
    if sort_by_length:  # longest first (stable: ties keep their order)
        groups.sort(key=lambda g: -max(len(prompts[m]) for m in g.members))
    elif share_prefixes:  # in the order of each group's first prompt
        groups.sort(key=lambda g: g.members[0])
    batches: list[list[PromptGroup]] = [[]]
    rows = 0
    for g in groups:
        if rows + len(g.members) > batch_size and batches[-1]:
            batches.append([])
            rows = 0
        batches[-1].append(g)
        rows += len(g.members)
    return [b for b in batches if b]


def _left_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, ids in enumerate(seqs):  # left padding: every sequence ends at the last column
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


def _positions(attention: torch.Tensor) -> torch.Tensor:
    return (attention.cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------- decoding


class _Forward:
    """The model's forward pass with a KV cache, passed under the name its forward takes (``cache`` or
    ``past_key_values``, by transformers version)."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"
        self.last_only = _accepts(model, "logits_to_keep")

    def __call__(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """Logits at the last position of each row."""
        extra = {}
        if self.last_only:
            # an index, not the count 1: the count slices a strided view of the hidden states, and with
            # frozen weights torch's matmul then runs the output layer as a batched matmul against a copy
            # of its weight for every row (seconds for a 49k vocabulary); indexing gives a contiguous input
            last = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
            extra["logits_to_keep"] = last
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_arg: self.cache},
            **extra,
        )
        return out.logits[:, -1]


def _prefill(fwd: _Forward, prompts, batch: list[PromptGroup], pad_id: int, device):
    """Run a batch's prompts into the cache; returns (prompt indices by row, last logits, attention mask,
    next position)."""
    idx = [m for g in batch for m in g.members]
    if all(g.shared == 0 for g in batch):  # one pass over left-padded prompts
        ids, mask = _left_padded([prompts[i] for i in idx], pad_id, device)
        pos = _positions(mask)
        return idx, fwd(ids, mask, pos), mask, pos[:, -1:] + 1
    # two passes: each group's prefix once (a prompt on its own: all but its last token), then every
    # prompt's remaining tokens on a copy of its group's cache rows
    prefixes = [prompts[g.members[0]][: g.shared or len(prompts[g.members[0]]) - 1] for g in batch]
    row_group = torch.tensor([gi for gi, g in enumerate(batch) for _ in g.members], device=device)
    ids, prefix_mask = _left_padded(prefixes, pad_id, device)
    fwd(ids, prefix_mask, _positions(prefix_mask))
    fwd.cache.batch_select_indices(row_group)
    rests = [prompts[m][len(prefixes[gi]) :] for gi, g in enumerate(batch) for m in g.members]
    ids, rest_mask = _left_padded(rests, pad_id, device)
    mask = torch.cat([prefix_mask[row_group], rest_mask], -1)
    pos = prefix_mask.sum(-1)[row_group, None] + _positions(rest_mask)
    return idx, fwd(ids, mask, pos), mask, pos[:, -1:] + 1


def span_text(text: str) -> str | None:
    """An extractive answer's text as the context must hold it: ``text`` without one trailing incomplete
    character (a token can end inside a multi-byte character, which decodes to one U+FFFD until the next
    token completes it); None when more than that does not decode."""
    body = text[:-1] if text.endswith(REPLACEMENT) else text
    return None if body.endswith(REPLACEMENT) else body


class SpanConstraint:
    """Extractive decoding (``eval.extractive``): each row's greedy pick is its highest-scoring token that keeps
    the row's answer a substring of its context's text.

    A row's answer is what the evaluation reads, :func:`first_line` of its generated tokens decoded; a token is
    allowed when the answer with it appended still occurs in the context, character for character, up to one
    incomplete last character (:func:`span_text`); a stop token is allowed once the answer has text. So every
    answer is a piece of the paragraph, and wherever the free greedy answer already is one, each of its tokens
    is allowed and the constrained answer is the same. The check is on characters, not on the context's
    tokens: the same words tokenize differently after a quote, a bracket or the ``Answer:`` cue. Candidates
    are tried in score order, ``chunk`` at a time; a row with no candidate left stops. Rows follow the
    decoding batch: :meth:`keep` must see every pruning of it. ``also`` are answers allowed beside the pieces
    of the context, each as it is or begun (a SQuAD 2.0 run's no-answer text, which no paragraph holds)."""

    def __init__(self, tokenizer, contexts: list[str], stop_ids: list[int], chunk: int = 64,
                 also: Sequence[str] = ()):  # fmt: skip
        self.decode = tokenizer.decode
        self.contexts = list(contexts)
        self.also = tuple(a for a in also if a)
        self.generated: list[list[int]] = [[] for _ in self.contexts]
        self.stop_ids = set(stop_ids)
        self.stop = min(stop_ids)
        self.chunk = chunk

    def _text(self, ids: list[int]) -> str | None:
        return span_text(first_line(self.decode(ids, skip_special_tokens=True)))

    def _pick(self, row: int, scores: torch.Tensor) -> int:
        ids, context = self.generated[row], self.contexts[row]
        has_answer = bool((self._text(ids) or "").strip())
        # stable: among tied scores (frequent in bf16) the lowest id first, the one argmax picks in free decoding
        order = scores.argsort(descending=True, stable=True)
        for start in range(0, order.numel(), self.chunk):
            for t in order[start : start + self.chunk].tolist():
                if t in self.stop_ids:
                    if has_answer and self._complete(self._text(ids) or "", context):
                        return t
                elif (text := self._text(ids + [t])) is not None and self._allowed(text, context):
                    return t
        return self.stop

    def _allowed(self, text: str, context: str) -> bool:
        """Whether ``text`` may be continued: a piece of the context, or a no-answer text begun."""
        return text in context or any(a.startswith(text.lstrip()) for a in self.also)

    def _complete(self, text: str, context: str) -> bool:
        """Whether an answer may end at ``text``: a piece of the context, or a no-answer text whole."""
        return text in context or text.strip() in self.also

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's allowed token with the highest score (one row of ``logits`` a live row)."""
        picks = [self._pick(row, logits[row]) for row in range(len(self.contexts))]
        for row, t in enumerate(picks):
            self.generated[row].append(t)
        return torch.tensor(picks, device=logits.device)

    def keep(self, rows: list[int]) -> None:
        """The decoding batch kept only ``rows`` (in this order)."""
        self.contexts = [self.contexts[r] for r in rows]
        self.generated = [self.generated[r] for r in rows]


def _answer_texts(tokenizer, new: list[list[int]], extractive: bool) -> list[str]:
    texts = [first_line(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    # an extractive answer cut by max_new_tokens inside a character ends before it
    return [(span_text(t) or "").strip() for t in texts] if extractive else texts


def greedy_continue(
    fwd: _Forward,
    logits: torch.Tensor,
    attention_mask: torch.Tensor,
    next_position: torch.Tensor,
    stop_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    prune_finished: bool = True,
    constraint: SpanConstraint | None = None,
) -> list[list[int]]:
    """Greedy continuation from a filled cache: one list of new token ids a row, each ending at its first
    stop token (included) or after ``max_new_tokens``. ``constraint`` (rows as the batch's) restricts each
    row's pick to the tokens it allows (extractive decoding)."""
    batch = logits.shape[0]
    live = torch.arange(batch, device=logits.device)  # batch row of each sequence still decoding
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)  # stopped, still in the batch
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        token = logits.argmax(-1) if constraint is None else constraint.pick(logits)
        stopped = torch.isin(token, stop_ids) | finished
        for row, t, done in zip(live.tolist(), token.tolist(), finished.tolist(), strict=True):
            if not done:
                new_tokens[row].append(t)
        if step == max_new_tokens - 1 or bool(stopped.all()):
            break
        n_stopped = int(stopped.sum())
        if prune_finished and n_stopped and 4 * n_stopped >= stopped.numel():
            # dropping rows copies the whole cache: wait until a quarter of the rows have stopped
            keep = (~stopped).nonzero().squeeze(1)
            fwd.cache.batch_select_indices(keep)
            if constraint is not None:
                constraint.keep(keep.tolist())
            live, token, stopped = live[keep], token[keep], stopped[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        finished = stopped
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], -1)
        logits = fwd(token[:, None], attention_mask, next_position)
        next_position = next_position + 1
    return new_tokens


# ---------------------------------------------------------------------------------------------- generators


@dataclass(frozen=True)
class Decoding:
    """What both generators take besides the prompts: the longest answer, the extractive constraint's texts,
    the answers already kept and who hears each new batch, and the progress bar.

    ``contexts`` (one text a prompt) makes every answer a piece of its prompt's context
    (:class:`SpanConstraint`). ``done`` (prompt index -> answer) skips the batches it answers whole, and
    ``on_batch(indices, answers)`` hears each batch generated: together, an interrupted evaluation resumed in
    the same batches (:mod:`loraqa.journal`)."""

    max_new_tokens: int = 32
    contexts: Sequence[str] | None = None
    # with contexts: answers allowed beside their pieces (SpanConstraint.also)
    also_allowed: Sequence[str] = ()
    done: Mapping[int, str] | None = None
    on_batch: Callable[[list[int], list[str]], None] | None = None
    progress: bool = True
    desc: str = "generate"


class _Generation:
    """One call of a generator: the model's device and stop tokens, the answers so far, the progress bar."""

    def __init__(self, model, tokenizer, n_prompts: int, decoding: Decoding):
        model.eval()
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stops = stop_token_ids(tokenizer)
        self.stop_ids = torch.tensor(self.stops, device=self.device)
        self.answers: list[str] = [""] * n_prompts
        self.bar = tqdm(
            total=n_prompts, desc=decoding.desc, unit="q", disable=not decoding.progress, dynamic_ncols=True
        )

    def resumed(self, members: list[int]) -> bool:
        """Whether ``done`` answers every one of ``members``: then those answers are theirs, none generated."""
        done = self.decoding.done
        if not done or not all(m in done for m in members):
            return False
        for m in members:
            self.answers[m] = done[m]
        self.bar.update(len(members))
        return True

    def decode(self, fwd: _Forward, logits, mask, next_position, idx: list[int], *, prune_finished=True):
        """The greedy continuation of the rows (prompts ``idx``) whose cache ``fwd`` holds: their new tokens."""
        contexts, span = self.decoding.contexts, None
        if contexts is not None:
            span = SpanConstraint(self.tokenizer, [contexts[i] for i in idx], self.stops,
                                  also=self.decoding.also_allowed)  # fmt: skip
        return greedy_continue(
            fwd,
            logits,
            mask,
            next_position,
            self.stop_ids,
            self.decoding.max_new_tokens,
            prune_finished=prune_finished,
            constraint=span,
        )

    def generated(self, idx: list[int], new: list[list[int]]) -> None:
        """Prompts ``idx`` got the new tokens ``new``: their answers, which ``on_batch`` hears."""
        texts = _answer_texts(self.tokenizer, new, extractive=self.decoding.contexts is not None)
        for i, text in zip(idx, texts, strict=True):
            self.answers[i] = text
        if self.decoding.on_batch is not None:
            self.decoding.on_batch(idx, texts)
        self.bar.update(len(idx))

    def finish(self) -> list[str]:
        self.bar.close()
        return self.answers


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    decoding: Decoding = Decoding(),
    *,
    batch_size: int = 32,
    sort_by_length: bool = True,
    share_prefixes: bool = True,
    prune_finished: bool = True,
    engine: str = "loop",
) -> list[str]:
    """Greedy answers for token-id prompts, in the order given, in batches of ``batch_size``.

    ``sort_by_length=False`` batches the prompts in the order given; ``share_prefixes=False`` runs every
    prompt through the model whole; ``prune_finished=False`` keeps stopped sequences in the batch until the
    last one stops; ``engine="hf"`` decodes left-padded batches with ``model.generate`` (no prefix sharing, no
    ``decoding.contexts``). ``done`` and ``on_batch`` (:class:`Decoding`) work per batch.
    """
    if engine not in ("loop", "hf"):
        raise ValueError(f"engine must be 'loop' or 'hf', got {engine!r}")
    if decoding.contexts is not None and engine != "loop":
        raise ValueError("extractive decoding (contexts) needs engine='loop'")
    run = _Generation(model, tokenizer, len(prompts), decoding)
    share = share_prefixes and engine == "loop"
    for batch in plan_batches(prompts, batch_size, sort_by_length=sort_by_length, share_prefixes=share):
        members = [m for g in batch for m in g.members]
        if run.resumed(members):
            continue
        if engine == "loop":
            idx, new = _decode_batch(run, prompts, batch, prune_finished)
        else:
            idx = members
            new = _hf_generate(
                model, [prompts[i] for i in idx], run.pad_id, run.stops, decoding.max_new_tokens, run.device
            )
        run.generated(idx, new)
    return run.finish()


def _decode_batch(run: _Generation, prompts, batch: list[PromptGroup], prune_finished: bool):
    """One planned batch through a fresh cache: (prompt indices by row, their new tokens)."""
    fwd = _Forward(run.model)
    idx, logits, mask, next_position = _prefill(fwd, prompts, batch, run.pad_id, run.device)
    return idx, run.decode(fwd, logits, mask, next_position, idx, prune_finished=prune_finished)


@torch.inference_mode()
def generate_answers_invariant(
    model, tokenizer, prompts: list[list[int]], context_ends: list[int], decoding: Decoding = Decoding()
) -> list[str]:
    """Greedy answers whose every computation depends on the question's own prompt alone, never on the other
    questions asked with it: the same answer alone (``ask``), in a file (``predict``) or in an evaluation.

    Low-precision matmuls round differently for different batch shapes, so a batched answer can flip against
    the same question asked alone. Here each paragraph's ``Context: ...`` part (``prompt[:context_ends[i]]``)
    runs through the model once, alone, and each question then runs its own part and decodes alone on a copy
    of that cache: every shape is a function of the paragraph and the question. Prompts that share their
    context part form one group; ``done`` and ``on_batch`` (:class:`Decoding`) work per group."""
    run = _Generation(model, tokenizer, len(prompts), decoding)
    for prefix, members in _context_groups(prompts, context_ends).items():
        if not run.resumed(members):
            run.generated(members, _decode_group(run, prompts, prefix, members))
    return run.finish()


def _context_groups(prompts: list[list[int]], context_ends: list[int]) -> dict[tuple, list[int]]:
    """Prompt indices by their context part, in the order of each part's first prompt."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, end) in enumerate(zip(prompts, context_ends, strict=True)):
        end = min(end, len(p) - 1)  # every question keeps at least one token of its own
        groups.setdefault(tuple(p[:end]), []).append(i)
    return groups


def _decode_group(run: _Generation, prompts, prefix: tuple, members: list[int]) -> list[list[int]]:
    """The context part through the model once, alone; then each member's question alone on a copy of that
    cache: the members' new tokens."""
    device = run.device
    prefix_fwd = _Forward(run.model)
    if prefix:
        ids = torch.tensor([list(prefix)], device=device)
        prefix_fwd(ids, torch.ones_like(ids), torch.arange(len(prefix), device=device)[None])
    new = []
    for m in members:
        fwd = _Forward(run.model)
        fwd.cache = copy.deepcopy(prefix_fwd.cache)
        rest = torch.tensor([prompts[m][len(prefix) :]], device=device)
        mask = torch.ones((1, len(prompts[m])), dtype=torch.long, device=device)
        pos = torch.arange(len(prefix), len(prompts[m]), device=device)[None]
        new += run.decode(fwd, fwd(rest, mask, pos), mask, pos[:, -1:] + 1, [m])
    return new


def _hf_generate(model, seqs, pad_id, stops, max_new_tokens, device) -> list[list[int]]:
    from transformers import GenerationConfig

    input_ids, attention = _left_padded(seqs, pad_id, device)
    gen_cfg = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id
    )
    out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg)
    return out[:, input_ids.shape[1] :].tolist()

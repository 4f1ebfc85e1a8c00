"""Generate answers: batched greedy decoding with a KV cache and left padding.

Prompts are sorted by length so a batch wastes little compute on padding, decoding stops for a sequence
at its first newline or EOS (the answer is one line) and for the batch as soon as every sequence has
stopped (``transformers`` ``generate`` does both when every newline-bearing token is an EOS id), and the
answer is the first line of the decoded continuation, stripped.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from tqdm.auto import tqdm


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


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    sort_by_length: bool = True,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers for token-id prompts, in the order given."""
    from transformers import GenerationConfig

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=pad_id,
    )
    order = (
        sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        if sort_by_length
        else list(range(len(prompts)))
    )
    answers: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends at the last column
            ids = prompts[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_cfg
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            answers[i] = first_line(text)
        bar.update(len(idx))
    bar.close()
    return answers

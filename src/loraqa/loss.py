"""The training loss at the labelled positions only, and the model families where it is the model's own loss.

transformers' causal-LM loss runs the output layer (hidden x vocab, ~50k wide) at every position and then
ignores all but the few answer tokens; :func:`labelled_positions_loss` gathers the decoder's hidden states at
the labelled positions first, so the output layer and the softmax see only those (``train.fast_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import SEGMENTS
from .prompt import IGNORE_INDEX

# Families whose causal-LM head is ``logits = lm_head(hidden)`` and whose loss is plain cross-entropy over those
# logits, so that the labelled-positions loss is theirs; each is proven by a parity test (tests/test_parity.py).
# Others may post-process the logits (Gemma 2 soft-caps them, Granite divides them by ``logits_scaling``,
# Cohere multiplies them by ``logit_scale``), which the fast path would silently skip.
FAST_LOSS_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
# config attributes that change the logits after the output layer, checked even for a listed family
LOGIT_MODIFIERS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier_scale")


def _base(model):
    """The transformers model under a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def labelled_positions_loss(model, batch: dict, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Causal-LM cross-entropy computed only at labelled positions: the model's own loss (sum over labelled
    tokens / ``num_items``, or their mean) where :func:`fast_loss_blocker` finds nothing against it."""
    lm = _base(model)
    # a one-row batch's segment lengths, for the attention kernel (loraqa.attention)
    segments = {SEGMENTS: batch[SEGMENTS]} if SEGMENTS in batch else {}
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        use_cache=False,  # nothing is generated after a training step: no KV cache (a copy of every K and V)
        **segments,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    denominator = num_items if num_items is not None else keep.sum()
    return loss / denominator


def fast_loss_blocker(model) -> str | None:
    """Why the labelled-positions loss might differ from ``model``'s own loss, or None where it cannot."""
    config = getattr(_base(model), "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAST_LOSS_FAMILIES:
        return f"model family {family!r} is not one whose loss the fast path is proven to equal"
    for name in LOGIT_MODIFIERS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"its config sets {name}={value}, which the fast path would skip"
    return None


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder's blocks (``model.layers`` for Llama, ``transformer.h`` for GPT-2), under a PEFT wrapper."""
    lm = _base(model)
    n = lm.config.num_hidden_layers
    for module in lm.get_decoder().children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    return []

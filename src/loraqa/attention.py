"""``eager_lean``: the math path of attention (matmul, add the mask, softmax, matmul) without its full-size copies.

transformers' ``eager`` path scales the L x L scores, adds loraqa's fp32 mask (which promotes the bf16 scores
to an fp32 copy), runs the softmax in fp32 and casts its result back to bf16; the backward pass does each of
those again. On a CPU those passes over B x heads x L x L tensors cost more than the two matmuls around them.
This function computes the same attention with:

- the scale applied to the query (L x head_dim) instead of the scores (L x L);
- the mask converted to the activations' dtype and added in place, so the scores keep that dtype (``torch.matmul``
  saves its inputs, not its output, for the backward pass, so the in-place add is safe for autograd);
- the softmax in the activations' dtype: torch's CPU softmax accumulates bf16 in fp32 and rounds once, the
  same rounding as eager's cast of its fp32 result.

A batch laid out as one row of segments (``SharedContextCollator(one_row=True)``) passes their lengths as
``attention_segments``; attention is then computed segment by segment, so the rows' positions need no padding
between them and no segment attends across the others' scores. Its mask holds each segment's block only
(L x S, S the longest segment: a position's mask row covers its own segment's positions, from column 0).

It is the math path still, so it keeps the attention weights (now bf16, not fp32) for the backward pass. It is
registered with transformers' ``AttentionInterface`` (with eager's mask builder in ``AttentionMaskInterface``)
under :data:`EAGER_LEAN`, so any model that dispatches through the interface (GPT-2, Llama, ...) takes
``attn_implementation="eager_lean"``; ``model.attn_implementation=auto`` picks it to train on a CPU
(:func:`loraqa.devices.resolve_attention`). Measured in ``benchmarks/bench_attention.py`` and
docs/performance.md. Written here because transformers has no such kernel and torch's SDPA on a CPU runs its
flash kernel for a float mask, slower still for these rows.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

EAGER_LEAN = "eager_lean"
SEGMENTS = "attention_segments"  # the batch key, and keyword, of a one-row batch's segment lengths


def eager_lean_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, attention_segments=None, **kwargs
):
    """One attention call in transformers' interface: (batch, heads, L, head_dim) query, key and value ->
    ((batch, L, heads, head_dim) output, (batch, heads, L, S) weights; None for weights with
    ``attention_segments``, the lengths of the segments the L positions are cut into)."""
    if attention_segments is not None and len(attention_segments) > 1:
        return _by_segment(
            module, query, key, value, attention_mask, scaling, dropout, attention_segments
        ), None
    groups = getattr(module, "num_key_value_groups", 1)  # grouped-query attention: the key/value heads shared
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        weights.add_(in_dtype(attention_mask, weights.dtype))
    weights = torch.softmax(weights, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _by_segment(module, query, key, value, mask, scaling, dropout, lengths: list[int]) -> torch.Tensor:
    """Attention within each segment of the positions: ``split`` and ``cat``, whose backward passes are a
    ``cat`` and views (slicing each segment would add a zero-filled full-size gradient per segment). Rows
    ``start : start + n`` of ``mask`` are the segment's, columns ``0 : n`` its positions."""
    outputs, start = [], 0
    parts = zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), lengths, strict=True)
    for q, k, v, n in parts:
        block = None if mask is None else mask[:, :, start : start + n, :n]
        outputs.append(eager_lean_attention(module, q, k, v, block, scaling, dropout)[0])
        start += n
    return torch.cat(outputs, dim=1)


def in_dtype(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask in the scores' dtype: an in-place add of an fp32 mask to bf16 scores goes through an
    fp32 copy of the scores, a conversion of the (heads-times smaller) mask does not. Masked entries stay
    finite (the dtype's minimum, not -inf), so a row with no allowed position is uniform, as in eager, not NaN."""
    if mask.dtype == dtype or mask.dtype == torch.bool:
        return mask
    return mask.to(dtype).clamp_(min=torch.finfo(dtype).min)


def reads_segments(model) -> bool:
    """Whether ``model`` attends segment by segment in a one-row batch: it runs :func:`eager_lean_attention`."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == EAGER_LEAN


def register() -> None:
    """Make ``attn_implementation="eager_lean"`` known to transformers (idempotent)."""
    AttentionInterface.register(EAGER_LEAN, eager_lean_attention)
    AttentionMaskInterface.register(EAGER_LEAN, eager_mask)

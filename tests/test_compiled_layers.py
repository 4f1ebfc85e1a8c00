"""``train.compile=layers``: each decoder layer compiled (dynamic shapes), LoRA dropout's mask included.

The mask is a custom op (:mod:`loraqa.lora_dropout`), so a compiled layer draws the masks eager dropout draws
from the same seed: the training loss and the LoRA gradients of one step equal eager's (fp32).
"""

from __future__ import annotations

import torch

from helpers import nonzero_lora_b
from loraqa.config import LoraConfig
from loraqa.lora_dropout import CpuLoraDropout
from loraqa.loss import decoder_layers, labelled_positions_loss
from loraqa.model import apply_lora
from loraqa.packing import SharedContextCollator
from loraqa.prompt import PromptEncoder
from test_shared_contexts import make_features, tiny_llama


def loss_and_grads(model, batch: dict, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)
    loss = labelled_positions_loss(model, {k: v for k, v in batch.items() if k != "num_questions"})
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_layers_with_dropout_compute_the_eager_step(gpt2_tokenizer):
    """fp32, a 2-layer Llama with LoRA (dropout 0.2) on every linear layer; inductor's kernels round otherwise
    than eager's (~1e-5 of a gradient)."""
    model = apply_lora(
        tiny_llama(attn="eager_lean"), LoraConfig(r=4, alpha=8, dropout=0.2, targets="all-linear")
    )
    model = nonzero_lora_b(model, 1)
    assert any(isinstance(m, CpuLoraDropout) for m in model.modules())  # as apply_lora installs it
    model.train()
    batch = SharedContextCollator(gpt2_tokenizer.pad_token_id, 64)(
        make_features(PromptEncoder(gpt2_tokenizer))
    )
    eager_loss, eager = loss_and_grads(model, batch)
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)
    compiled_loss, compiled = loss_and_grads(model, batch)
    assert abs(compiled_loss - eager_loss) <= 1e-5 * eager_loss
    for name in eager:
        assert float((compiled[name] - eager[name]).norm() / eager[name].norm()) < 1e-4, name
    # another seed, other masks: they are drawn at each call, not fixed when the layer was compiled
    assert abs(loss_and_grads(model, batch, seed=6)[0] - eager_loss) > 1e-4 * eager_loss


def test_scoring_answers_with_the_layers_eager_and_training_resumes_compiled(monkeypatch):
    """In-training scoring generates (a growing cache, one token a step): compiled layers would compile again
    for it, so they run eager while it answers and their compiled code is back afterwards."""
    from loraqa import scoring
    from loraqa.config import ExperimentConfig

    model = tiny_llama()
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)  # compiles at its first call: none here
    calls = [layer._compiled_call_impl for layer in layers]
    seen = []

    class Answerer:  # records what generation would run
        def __init__(self, cfg, model, tokenizer):
            pass

        def answer(self, examples):
            seen.append([layer._compiled_call_impl for layer in layers])
            return [], {"exact_match": 50.0, "f1": 60.0}

    monkeypatch.setattr(scoring, "Answerer", Answerer)
    model.train()
    scores = scoring.ScoreCallback(None, ["a question"], ExperimentConfig()).score(model)
    assert scores[scoring.F1_KEY] == 60.0
    assert seen == [[None] * len(layers)] and all(calls)
    assert [layer._compiled_call_impl for layer in layers] == calls and model.training

"""The fast loss runs only where it equals the model's own, and Llama-style models take every fast path.

* tiny random GPT-2, Llama, Mistral and Qwen2 (the allow-list): the labelled-positions loss and its gradients
  equal the model's own full-vocabulary loss;
* tiny random Gemma 2 (final-logit soft-capping) and Granite (logit scaling): the labelled-positions loss
  differs from the model's, so the Trainer falls back to the model's own loss, says so in one log line, and
  its loss is then the model's;
* a Llama-style model (SmolLM2's family, the model of every CPU study) through the Trainer's fast loss, the
  batched generation path (shared prefixes, pruning) and the decoder-layer lookup.
"""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import nonzero_lora_b
from loraqa.config import LoraConfig
from loraqa.generate import Decoding, first_line, generate_answers, stop_token_ids
from loraqa.loss import decoder_layers, fast_loss_blocker, labelled_positions_loss
from loraqa.model import apply_lora
from loraqa.prompt import IGNORE_INDEX
from loraqa.trainer import QATrainer, checkpointing_arguments, enable_checkpointing

VOCAB = 50257  # the GPT-2 tokenizer's, so the generation test can use the real tokenizer


def tiny_config(family: str, **extra):
    from transformers import (
        Gemma2Config,
        GPT2Config,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.3, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)  # fmt: skip
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                          initializer_range=0.3, **extra)  # fmt: skip
    if family == "gemma2":
        # a small cap, so that capping changes the loss of so small a model visibly
        return Gemma2Config(**common, head_dim=8, sliding_window=64, **{"final_logit_softcapping": 0.5, **extra})
    if family == "granite":
        return GraniteConfig(**common, **{"logits_scaling": 4.0, **extra})
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(**common, **extra)


def tiny_model(family: str, seed: int = 0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **extra)).float()


TARGETS = {"gpt2": ["c_attn", "c_proj"]}


def lora(model, seed: int = 1, dropout: float = 0.0):
    """A LoRA adapter whose B matrices are non-zero (PEFT starts them at zero), so adapters matter."""
    targets = TARGETS.get(model.config.model_type, ["q_proj", "v_proj", "o_proj", "down_proj"])
    return nonzero_lora_b(apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, targets=targets)), seed)


def make_batch(seed: int = 0) -> dict:
    """Three rows of different lengths, right-padded; labels only on each row's last few real tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, n in enumerate((20, 14, 9)):
        mask[row, n:] = 0
        ids[row, n:] = 50256
        labels[row, n - 4 : n] = ids[row, n - 4 : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rel(a, b) -> float:
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) / abs(b)


def trainer_for(model, tmp_path, fast_loss: bool = True):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=3,
                             remove_unused_columns=False)  # fmt: skip
    return QATrainer(model=model, args=args, fast_loss=fast_loss)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_allowed_families_fast_loss_and_gradients_equal_the_models_own(family, tmp_path):
    model = lora(tiny_model(family))
    model.eval()
    batch = make_batch()
    assert fast_loss_blocker(model) is None, fast_loss_blocker(model)
    reference = model(**batch).loss
    reference.backward()
    ref_grads = grads(model)
    model.zero_grad()
    fast = labelled_positions_loss(model, batch)
    fast.backward()
    assert rel(fast, reference) < 1e-5
    for name, g in grads(model).items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name
    trainer = trainer_for(model, tmp_path)
    assert trainer.fast_loss is True
    assert rel(trainer.compute_loss(model, dict(batch)), reference) < 1e-5


@pytest.mark.parametrize(
    "family, setting", [("gemma2", "final_logit_softcapping=0.5"), ("granite", "logits_scaling=4.0")]
)
def test_logit_processing_families_fall_back_to_the_models_own_loss(family, setting, tmp_path, caplog):
    model = lora(tiny_model(family))
    model.eval()
    batch = make_batch()
    reference = model(**batch).loss
    # the danger: the fast path skips the family's logit processing and computes another loss
    assert rel(labelled_positions_loss(model, batch), reference) > 1e-2
    assert fast_loss_blocker(model) is not None
    assert repr(family) in fast_loss_blocker(model)
    with caplog.at_level(logging.WARNING, logger="loraqa.trainer"):
        trainer = trainer_for(model, tmp_path, fast_loss=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "loraqa.trainer"]
    assert len(lines) == 1 and "model's own full-vocabulary loss" in lines[0] and family in lines[0]
    assert trainer.fast_loss is False
    assert rel(trainer.compute_loss(model, dict(batch)), reference) < 1e-6


def test_a_listed_family_with_a_logit_modifier_in_its_config_falls_back():
    """The allow-list is by family, but a config that adds logit processing still blocks the fast path."""
    model = tiny_model("llama")
    model.config.logits_scaling = 2.0
    assert "logits_scaling=2.0" in fast_loss_blocker(model)
    model.config.logits_scaling = 1.0
    assert fast_loss_blocker(model) is None


def test_fast_loss_off_in_the_config_is_not_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="loraqa.trainer"):
        trainer = trainer_for(lora(tiny_model("granite")), tmp_path, fast_loss=False)
    assert trainer.fast_loss is False
    assert not [r for r in caplog.records if r.name == "loraqa.trainer"]


# ---------------------------------------------------------------------------------------------- Llama-style


def test_decoder_layers_finds_llamas_blocks_under_a_peft_wrapper():
    model = lora(tiny_model("llama"))
    layers = decoder_layers(model)
    assert layers == list(model.get_base_model().model.layers)
    assert len(layers) == 2 and all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)


def test_llama_style_batched_generation_gives_one_at_a_time_answers(gpt2_tokenizer):
    """Shared prefixes (three questions on one context), sequences stopping at different steps, pruning."""
    from loraqa.model import prepare_for_generation

    model = prepare_for_generation(lora(tiny_model("llama", seed=3)), merge=True)
    tok = gpt2_tokenizer
    context = tok("Context: The red kite flew over the old harbor while the boats came in.\n")["input_ids"]
    prompts = [context + tok(f"Question: {q}\nAnswer:")["input_ids"]
               for q in ("What flew?", "Where did it fly?", "What came in?")]  # fmt: skip
    prompts += [tok("Context: Snow.\nQuestion: What fell?\nAnswer:")["input_ids"], context[:9]]
    stops = stop_token_ids(tok)
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)  # fmt: skip
            expected.append(first_line(tok.decode(out[0, len(p) :], skip_special_tokens=True)))
    assert len(set(expected)) > 1, "a degenerate model answering the same to everything proves little"
    for kwargs in ({}, {"share_prefixes": False}, {"prune_finished": False}, {"batch_size": 2}):
        got = generate_answers(model, tok, prompts, Decoding(6, progress=False), **{"batch_size": 5, **kwargs})
        assert got == expected, kwargs


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_loss_and_gradients_in_bf16(family, tmp_path):
    """``train.gradient_checkpointing`` with bf16 LoRA: every decoder layer runs twice a step (the forward, then its
    recomputation in the backward), and the loss and adapter gradients equal the run without it. With LoRA dropout
    (the default 0.1), so that a recomputation with PEFT's input cast back on would save different tensors."""
    from transformers import TrainingArguments

    results = {}
    for checkpointing in (False, True):
        model = lora(tiny_model(family), dropout=0.1).to(torch.bfloat16)
        for p in model.parameters():
            if p.requires_grad:  # adapters stay fp32, as loraqa keeps them
                p.data = p.data.float()
        calls = []
        count = calls.append
        for layer in decoder_layers(model):  # (hooks on the layer itself stay outside transformers' checkpoint)
            layer.mlp.register_forward_pre_hook(lambda *a, count=count: count(1))  # pre: recomputing stops early
        args = TrainingArguments(output_dir=str(tmp_path / str(checkpointing)), use_cpu=True, bf16=True,
                                 report_to=[], per_device_train_batch_size=3, remove_unused_columns=False,
                                 **checkpointing_arguments(checkpointing))  # fmt: skip
        trainer = QATrainer(model=model, args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        if checkpointing:  # what Trainer.train does first
            enable_checkpointing(trainer.model)
        trainer.model.train()
        torch.manual_seed(0)  # the same dropout masks in both runs
        loss = trainer.training_step(trainer.model, make_batch())
        results[checkpointing] = (float(loss), grads(model), len(calls))
    (loss_off, grads_off, calls_off), (loss_on, grads_on, calls_on) = results[False], results[True]
    n_layers = len(decoder_layers(model))
    assert (calls_off, calls_on) == (n_layers, 2 * n_layers)
    assert rel(loss_on, loss_off) < 1e-3
    for name, g in grads_on.items():
        assert torch.allclose(g, grads_off[name], rtol=2e-2, atol=1e-4), name

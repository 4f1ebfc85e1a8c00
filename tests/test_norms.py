"""``train.compile=norms`` (:mod:`loraqa.norms`): the RMSNorms compiled for training compute what each
family's own norm computes, forward and backward, in fp32 and bf16; answering keeps the class's forward; a
failing compiler leaves the norms eager with a warning; and ``train.compile`` resolves and validates."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from loraqa import norms
from loraqa.config import (
    LAYERS_PAY_FROM_STEPS,
    NORMS_PAY_FROM_STEPS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
)
from loraqa.devices import resolve_compile
from loraqa.trainer import enable_checkpointing, planned_steps

FAMILIES = ["llama", "mistral", "qwen2"]


def tiny_model(family: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    config = cls(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    for module in model.modules():  # weights away from 1, so a norm that skips its weight shows
        if type(module).__name__ in norms.NORM_CLASSES:
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def count_compiled_calls(monkeypatch) -> list:
    """A list that grows by one at every call of the compiled norm function from now on."""
    calls = []
    compiled = norms.rms_norm
    monkeypatch.setattr(norms, "rms_norm", lambda *a: calls.append(1) or compiled(*a))
    return calls


def norm_and_grad(norm, x, upstream):
    x = x.detach().requires_grad_()
    out = norm(x)
    out.backward(upstream)
    return out.detach().float(), x.grad.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_norms_compute_what_each_familys_norm_computes(family):
    """Each norm of each family, fp32: the compiled forward and its input gradient equal the class's own to
    rounding. bf16: no further from an fp32 reference than the class's own bf16 forward is (+5%)."""
    model = tiny_model(family)
    found = [m for m in model.modules() if type(m).__name__ in norms.NORM_CLASSES]
    assert len(found) == 2 * 2 + 1  # two per decoder layer and the final one
    norm = found[0]
    torch.manual_seed(1)
    x = torch.randn(3, 5, 48) * 3 + 1
    x[1] *= 1e-3  # a row as small as the norm's eps, so that a norm that drops eps shows
    upstream = torch.randn(3, 5, 48)
    reference = norm_and_grad(norm, x, upstream)
    eager16 = norm_and_grad(copy.deepcopy(norm).to(torch.bfloat16), x.bfloat16(), upstream.bfloat16())
    assert norms.compile_norms(model) == len(found)
    assert "forward" in vars(norm)
    compiled = norm_and_grad(norm, x, upstream)
    for got, want in zip(compiled, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    compiled16 = norm_and_grad(norm.to(torch.bfloat16), x.bfloat16(), upstream.bfloat16())
    assert norm(x.bfloat16().requires_grad_()).dtype == torch.bfloat16  # the activations' dtype, as eager's
    for got, eager, want in zip(compiled16, eager16, reference, strict=True):
        assert (got - want).norm() <= 1.05 * (eager - want).norm() + 1e-6


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_whole_loss_and_gradients_are_the_same_with_compiled_norms(checkpointing):
    """A Llama's loss and every gradient, in fp32, with and without the compiled norms; with gradient
    checkpointing too, whose backward pass runs each layer's forward (and its norms) again."""
    model = tiny_model("llama")
    if checkpointing:
        enable_checkpointing(model)
        model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads()
    assert norms.compile_norms(model) == 5
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_answering_runs_the_norms_own_forward(monkeypatch):
    """Without gradients (generation, the eval loss) the compiled function is not called at all."""
    model = tiny_model("llama")
    assert norms.compile_norms(model) == 5
    calls = count_compiled_calls(monkeypatch)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        model(input_ids=ids)
    assert calls == []
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 5


def test_compiled_norms_outlast_train_and_eval_switches_of_a_loaded_model(tmp_path, monkeypatch):
    """A model loaded from a folder (as the GGUF models and hub models are) keeps its compiled norms through
    the Trainer's and the scorer's ``train()`` / ``eval()`` switches: transformers' hub kernels, left on,
    put the class's forward back at each switch."""
    from loraqa.model import load_base_model

    tiny_model("llama").save_pretrained(tmp_path / "llama")
    model = load_base_model(str(tmp_path / "llama"), attn_implementation="eager")
    assert norms.compile_norms(model) == 5
    model.train()
    model.eval()
    model.train()
    calls = count_compiled_calls(monkeypatch)
    model(input_ids=torch.randint(0, 128, (1, 6))).logits.sum().backward()
    assert len(calls) == 5


def test_a_failing_compiler_leaves_the_norms_eager_with_a_warning(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(norms, "rms_norm", broken)
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="loraqa.norms"):
        assert norms.compile_norms(model) == 0
    assert "RMSNorms stay eager" in caplog.text and "No working C++ compiler" in caplog.text
    assert not any("forward" in vars(m) for m in model.modules())


def test_models_without_listed_norms_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert norms.compile_norms(model) == 0


@pytest.mark.parametrize(
    "given, resolved",
    [("auto", "norms"), ("true", "layers"), ("false", "off"), (True, "layers"), ("norms", "norms")],
)
def test_train_compile_choices_and_their_older_spellings(given, resolved):
    cfg = apply_overrides(ExperimentConfig(), [("train.compile", given)])
    long_run = NORMS_PAY_FROM_STEPS
    assert resolve_compile(cfg.train.compile, "cpu", long_run) == resolved
    assert resolve_compile(cfg.train.compile, "cuda", long_run) == ("off" if given == "auto" else resolved)
    # auto compiles only where the compiling pays back: not for a short run
    assert resolve_compile(cfg.train.compile, "cpu", long_run - 1) == ("off" if given == "auto" else resolved)
    # and whole layers for a long one (the same compiled graph serves all its steps)
    longer = ("layers" if given == "auto" else resolved, "norms" if given == "auto" else resolved)
    assert resolve_compile(cfg.train.compile, "cpu", LAYERS_PAY_FROM_STEPS) == longer[0]
    assert resolve_compile(cfg.train.compile, "cpu", LAYERS_PAY_FROM_STEPS - 1) == longer[1]
    assert resolve_compile(cfg.train.compile, "cuda", LAYERS_PAY_FROM_STEPS) == (
        "off" if given == "auto" else resolved
    )


def test_planned_steps_are_the_trainers():
    train = ExperimentConfig().train  # batches of 8, 3 epochs
    assert planned_steps(train, 87_599) == 3 * 10_950  # three epochs of all SQuAD
    assert planned_steps(apply_overrides(ExperimentConfig(), [("train.epochs", 0.5)]).train, 20) == 2
    assert planned_steps(apply_overrides(ExperimentConfig(), [("train.max_steps", 7)]).train, 10**6) == 7


def test_a_bad_train_compile_names_its_choices():
    with pytest.raises(ConfigError, match=r"train\.compile.*'fast'.*auto.*off.*norms.*layers"):
        apply_overrides(ExperimentConfig(), [("train.compile", "fast")])


@pytest.mark.slow
@pytest.mark.parametrize("given, compiled", [("norms", "norms"), ("auto", "off")])
def test_a_smollm2_run_records_what_it_compiled(given, compiled, tmp_path, synthetic_dir, monkeypatch):
    """Through ``run_experiment``: ``norms`` compiles SmolLM2's 61 norms and says how long it took; ``auto`` leaves
    a 2-step run eager (too short to earn the compiling back)."""
    from loraqa.io import read_json
    from loraqa.pipeline import run_experiment

    cfg = apply_overrides(ExperimentConfig(), [
        ("model.name", "smollm2-135m"), ("data.data_dir", str(synthetic_dir)), ("data.train_limit", 4),
        ("data.eval_limit", 1), ("train.max_steps", 2), ("train.batch_size", 2), ("train.eval_steps", 0),
        ("train.save_steps", 0), ("eval.max_new_tokens", 4), ("train.compile", given),
    ])  # fmt: skip
    calls = count_compiled_calls(monkeypatch)
    run_experiment(cfg, tmp_path / "run", progress=False)
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["train_compile"] == compiled
    assert (metrics.get("compile_seconds", 0) > 0) == (compiled == "norms")
    # the training steps ran the compiled norms (61 a step), not only the probe before them
    if compiled == "norms":
        assert len(calls) >= 2 * 61
    else:
        assert calls == []

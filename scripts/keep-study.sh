#!/usr/bin/env bash
# Keep the running full study in version control while it runs: every EVERY seconds (default 2700, 45 min),
# `loraqa sync --results-only` of each sweep folder under RUNS into docs/study-full/sweeps, then one commit of
# docs/study-full/sweeps alone. The study's machine can be replaced between sittings with its folders on it, so
# what is committed is what must outlive it: every finished trial's results, at most EVERY seconds late, and the
# logs of the running ones. Checkpoints are synced beside them but not committed (.gitignore; tests/test_repo.py
# refuses them): a trial that was running when its machine went resumes only from that machine's own copy.
# Run it from the checkout that holds docs/, beside the study:
#   nohup bash scripts/keep-study.sh ../study/runs > keep-study.log 2>&1 &
# Arguments: RUNS (the folder of the full-* sweep folders) and EVERY. LORAQA names the loraqa to sync with.
# The synced checkpoints are cleaned as loraqa saves them (runfolder.make_portable, no pickled
# training_args.bin), whichever loraqa wrote them, and nothing is committed that holds a machine path.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:?pass RUNS, the folder of the full-* sweep folders (e.g. ../study/runs)}
every=${2:-2700}
loraqa=${LORAQA:-.venv/bin/loraqa}
python=$(dirname "$loraqa")/python
keep=docs/study-full/sweeps
while sleep "$every"; do
  for src in "$runs"/full-*/; do
    src=${src%/}
    "$loraqa" sync "$src" "$keep/$(basename "$src")" --results-only || echo "keep: sync of $src failed; next time"
  done
  "$python" - "$keep"/*/*/checkpoints/checkpoint-* <<'PY' || { echo "keep: cleaning the kept checkpoints failed; not committed"; continue; }
import sys, yaml
from pathlib import Path
from loraqa.layout import CONFIG_FILE
from loraqa.runfolder import make_portable
for c in map(Path, sys.argv[1:]):
    if c.is_dir():  # the model name is the run's (its config, two folders up)
        make_portable(c, yaml.safe_load((c.parent.parent / CONFIG_FILE).read_text())["model"]["name"])
        (c / "training_args.bin").unlink(missing_ok=True)
PY
  if leaks=$(grep -rlF -e "$(cd "$runs/.." && pwd)" -e "$(pwd)" -e /tmp/ "$keep"); then
    echo "keep: $(date -u +%T) not committed, a machine path in: $leaks"
    continue
  fi
  git add "$keep" || { echo "keep: $(date -u +%T) git add failed (git busy?); next time"; continue; }
  if git diff --cached --quiet -- "$keep"; then continue; fi
  git commit -q -m "docs/study-full/sweeps: the running study kept at $(date -u +%H:%M) UTC, so a lost machine loses at most $((every / 60)) minutes of it" -- "$keep" \
    && echo "keep: $(date -u +%T) committed" || echo "keep: $(date -u +%T) commit failed (git busy?); next time"
done

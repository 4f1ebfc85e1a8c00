#!/usr/bin/env bash
# The full-scale study as one resumable command: the five sweeps of configs/full-*.yaml, one after another,
# then the study report. Every sweep resumes where it stopped, so after an interruption (SIGTERM, a reboot,
# the end of a sitting) run the same command again. Hours of work on a CPU: start it in the background, e.g.
#   nohup bash scripts/full-study.sh ../shared/squad runs > full-study.log 2>&1 &
# Arguments: the SQuAD folder (default $LORAQA_DATA_DIR) and the folder for the sweep folders (default runs).
# LORAQA_STUDY_SWEEPS picks and orders the sweeps (default: scaling claims ceiling-16k ceiling lora-3epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-${LORAQA_DATA_DIR:?pass the SQuAD folder or set LORAQA_DATA_DIR}}
runs=${2:-runs}
loraqa=${LORAQA:-.venv/bin/loraqa}
sweeps=${LORAQA_STUDY_SWEEPS:-scaling claims ceiling-16k ceiling lora-3epochs}
child=
trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 143' TERM INT
for s in $sweeps; do
  echo "== $(date -u +%FT%TZ) sweep full-$s"
  "$loraqa" sweep "configs/full-$s.yaml" --data-dir "$data" --output-dir "$runs/full-$s" & child=$!
  wait "$child" || echo "== sweep full-$s ended with exit code $? (failed trials are recorded in its folder)"
done
dirs=()
for s in $sweeps; do dirs+=("$runs/full-$s"); done
"$loraqa" report "${dirs[@]}" --out docs/study-full --compare docs/study/report.md

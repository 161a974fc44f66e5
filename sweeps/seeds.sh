#!/usr/bin/env bash
# One recipe at seeds 1..N, a table of every run with mean and standard deviation, then their ensemble.
#   sweeps/seeds.sh N [FLAGS...]          e.g. sweeps/seeds.sh 5            (the default recipe)
#                                              sweeps/seeds.sh 3 --smart
# Settings through the environment: OUT (folder, default runs/seeds-<time>), METHOD (the ensemble's
# --ensemble_method, default greedy), PYTHON (default .venv/bin/python), LAUNCH (how a run starts,
# default $PYTHON; e.g. LAUNCH="torchrun --nproc_per_node 4").
# Run it again with the same OUT after a stop: finished seeds are kept, an interrupted one resumes.
# Writes OUT/seed<i>/ (the runs), OUT/ensemble/ (predictions, summary.json, scores.png: per-seed and
# ensemble scores) and OUT/table.md (printed too).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: sweeps/seeds.sh N [FLAGS...]   (N >= 1 runs, at seeds 1..N)" >&2; exit 2
fi
N=$1; shift
PYTHON=${PYTHON:-.venv/bin/python}
LAUNCH=${LAUNCH:-$PYTHON}
METHOD=${METHOD:-greedy}
OUT=${OUT:-runs/seeds-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

dirs=()
for seed in $(seq 1 "$N"); do
  dir="$OUT/seed$seed"
  dirs+=("$dir")
  if [ -f "$dir/summary.json" ]; then
    echo "== seed $seed: finished earlier ($dir)"
  elif [ -f "$dir/last.pt" ]; then
    echo "== seed $seed: resuming $dir"
    $LAUNCH multitask_classifier.py --resume "$dir"
  else
    echo "== seed $seed: $*"
    $LAUNCH multitask_classifier.py "$@" --seed "$seed" --save_path "$dir"
  fi
done
ensemble=()
if [ "$N" -ge 2 ]; then
  if [ ! -f "$OUT/ensemble/summary.json" ]; then
    "$PYTHON" multitask_classifier.py --option ensemble --ensemble "${dirs[@]}" --ensemble_method "$METHOD" \
      --save_path "$OUT/ensemble"
  fi
  ensemble=(--ensemble "$OUT/ensemble")
fi
"$PYTHON" sweeps/summarize.py --seeds "${dirs[@]}" "${ensemble[@]}" | tee "$OUT/table.md"

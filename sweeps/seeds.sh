#!/usr/bin/env bash
# One recipe at seeds 1..N, a table of every run with mean and standard deviation, then their ensemble.
#   sweeps/seeds.sh N [FLAGS...]          e.g. sweeps/seeds.sh 5            (the default recipe)
#                                              sweeps/seeds.sh 3 --smart
# Settings through the environment: OUT (folder, default runs/seeds-<time>), METHOD (the ensemble's
# --ensemble_method, default greedy), PYTHON (default .venv/bin/python), LAUNCH (how a run starts,
# default $PYTHON; e.g. LAUNCH="torchrun --nproc_per_node 4").
# Run it again with the same OUT after a stop: finished seeds are kept, an interrupted one resumes.
# Writes OUT/seed<i>/ (the runs), OUT/ensemble-N-METHOD/ (predictions, summary.json, scores.png: per-seed
# and ensemble scores), OUT/flags.txt (the recipe: a rerun with other flags is refused) and OUT/table.md.
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
# The recipe's flags are kept, so that a rerun with other flags cannot mix two recipes in one table.
if [ -f "$OUT/flags.txt" ]; then
  if [ "$(cat "$OUT/flags.txt")" != "$*" ]; then
    echo "sweeps/seeds.sh: $OUT holds runs of the flags '$(cat "$OUT/flags.txt")', not '$*': use another OUT" >&2
    exit 2
  fi
else
  printf '%s' "$*" > "$OUT/flags.txt"
fi

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
  ens="$OUT/ensemble-$N-$METHOD"  # of these N seeds by this method: a rerun with more seeds makes its own
  if [ ! -f "$ens/summary.json" ]; then
    "$PYTHON" multitask_classifier.py --option ensemble --ensemble "${dirs[@]}" --ensemble_method "$METHOD" \
      --save_path "$ens"
  fi
  ensemble=(--ensemble "$ens")
fi
"$PYTHON" sweeps/summarize.py --seeds "${dirs[@]}" "${ensemble[@]}" | tee "$OUT/table.md"

#!/usr/bin/env bash
# An Optuna study on every GPU of this node: one hpo.py process per GPU, all in one study (Optuna's
# pattern for parallel search: processes share the storage), then its report.
#   sweeps/study.sh NAME SPACE TRIALS_PER_PROCESS [FLAGS...]
#   e.g. sweeps/study.sh lr spaces/default.json 10 --bert_path ~/models/bert-base-uncased
# Settings through the environment: STORAGE (default sqlite:///runs/study-NAME.db), GPUS (processes;
# default: the GPUs nvidia-smi lists, or 1 without a GPU), PRUNER (median|hyperband|none), PYTHON.
# Run it again to add trials to the same study. Logs: runs/hpo-NAME/process<i>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ] || ! [[ "$3" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: sweeps/study.sh NAME SPACE TRIALS_PER_PROCESS [FLAGS...]" >&2; exit 2
fi
NAME=$1; SPACE=$2; TRIALS=$3; shift 3
PYTHON=${PYTHON:-.venv/bin/python}
STORAGE=${STORAGE:-sqlite:///runs/study-$NAME.db}
PRUNER=${PRUNER:-median}
if [ -z "${GPUS:-}" ]; then
  GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)
  [ "$GPUS" -ge 1 ] || GPUS=1
fi
OUT=runs/hpo-$NAME
mkdir -p "$OUT"
pids=()
for i in $(seq 0 $(( GPUS - 1 ))); do
  # each process its own GPU and its own sampler seed (the same seed would propose the same trials)
  CUDA_VISIBLE_DEVICES=$i "$PYTHON" hpo.py --storage "$STORAGE" --study_name "$NAME" --space "$SPACE" \
    --n_trials "$TRIALS" --pruner "$PRUNER" --sampler_seed "$i" --out "$OUT" "$@" > "$OUT/process$i.log" 2>&1 &
  pids+=($!)
  sleep 2  # the first process creates the study; the others then load it
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ $status -eq 0 ] || echo "study.sh: a process failed; see $OUT/process*.log" >&2
"$PYTHON" hpo.py --report --storage "$STORAGE" --study_name "$NAME" --out "$OUT" | tee "$OUT/report.md"
exit $status

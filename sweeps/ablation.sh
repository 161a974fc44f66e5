#!/usr/bin/env bash
# Ablation: every row is the baseline with one switch, same seed, same data budget.
#   sweeps/ablation.sh                 all rows (about 4 minutes a row at STEPS=270 on a 2-core CPU; the default STEPS=120 is shorter)
#   sweeps/ablation.sh baseline smart  only the rows named
# Settings through the environment: STEPS (optimiser steps, default 120), DEV (dev rows per task for
# model selection, default 2000), OUT (folder, default runs/ablation-<time>), PYTHON.
# A surgery row draws one batch of every task per step, so it runs STEPS/3 steps: the same examples.
# The unfreezing, freeze_last and scheduler_pal rows split the same STEPS into 3 epochs (all three
# act per epoch); the learning-rate schedule is the same, and the best of the 3 epochs is reported.
# Prints a markdown table (sweeps/summarize.py) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-120}
DEV=${DEV:-2000}
OUT=${OUT:-runs/ablation-$(date +%Y%m%d-%H%M%S)}
BASE=(--epochs 1 --num_batches_per_epoch "$STEPS" --max_dev_examples "$DEV" --seed 11711)
SURGERY_STEPS=$(( STEPS / 3 ))

declare -A ROWS=(
  [baseline]=""
  [round_robin]="--task_scheduler round_robin"
  [train_embeddings]="--no-freeze_embeddings"
  [head_lr_same]="--head_lr none"
  [smart]="--smart"
  [pcgrad]="--projection pcgrad --num_batches_per_epoch $SURGERY_STEPS"
  [gradvac]="--projection gradvac --num_batches_per_epoch $SURGERY_STEPS"
  [pal]="--use_pal --pal_size 96"
  [adapters]="--adapter_size 64"
  [class_weights]="--class_weights"
  [sst_ordinal]="--sst_loss ordinal"
  [label_smoothing]="--label_smoothing 0.1"
  [rdrop]="--rdrop 1"
  [ema]="--ema_decay 0.998"
  [layer_lr_decay]="--layer_lr_decay 0.9"
  [scheduler_pal]="--task_scheduler pal --epochs 3 --num_batches_per_epoch $(( STEPS / 3 ))"
  [unfreezing]="--epochs 3 --num_batches_per_epoch $(( STEPS / 3 )) --unfreeze_interval 1"
  [freeze_last]="--epochs 3 --num_batches_per_epoch $(( STEPS / 3 )) --freeze_bert_last_epochs 1"
  [sophiag]="--optimizer sophiag"
  [sophiah]="--optimizer sophiah"
  [sophiag_one_lr]="--optimizer sophiag --head_lr none"
)
ORDER=(baseline round_robin train_embeddings head_lr_same smart pcgrad gradvac pal adapters unfreezing freeze_last class_weights sst_ordinal
       label_smoothing rdrop ema layer_lr_decay scheduler_pal sophiag sophiah sophiag_one_lr)
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${ORDER[@]}")

mkdir -p "$OUT"
dirs=()
for name in "${selected[@]}"; do
  if [ -z "${ROWS[$name]+set}" ]; then
    echo "ablation.sh: unknown row $name (known: ${ORDER[*]})" >&2; exit 2
  fi
  echo "== $name: ${ROWS[$name]}"
  # shellcheck disable=SC2086  # the row's flags are meant to split
  "$PYTHON" multitask_classifier.py "${BASE[@]}" ${ROWS[$name]} --save_path "$OUT/$name" --name "$name" \
    || echo "ablation.sh: row $name failed" >&2
  dirs+=("$OUT/$name")
done
"$PYTHON" sweeps/summarize.py "${dirs[@]}" | tee "$OUT/table.md"

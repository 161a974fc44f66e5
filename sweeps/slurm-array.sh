#!/usr/bin/env bash
#SBATCH --job-name=minbert
#SBATCH --array=0-5
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --output=runs/slurm-%A_%a.log
# Presets x seeds as a SLURM array job, one task per GPU:  mkdir -p runs && sbatch sweeps/slurm-array.sh
# (SLURM does not create the folder of --output: without runs/ the tasks fail before they start)
# Task i runs preset PRESETS[i / #SEEDS] at seed SEEDS[i % #SEEDS] into runs/array-<preset>-seed<seed>/;
# set --array=0-(#PRESETS x #SEEDS - 1). Near the time limit SLURM sends SIGUSR1: the run saves and
# exits (status 75); submitting again resumes unfinished runs and skips finished ones. Then tabulate:
#   .venv/bin/python sweeps/summarize.py --seeds runs/array-cpu-default-seed*
# Settings through the environment: PRESETS, SEEDS (space-separated), FLAGS (added to every run),
# OUT (default runs), PYTHON.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
read -r -a presets <<< "${PRESETS:-presets/cpu-default.json presets/gpu-bert-base.json}"
read -r -a seeds <<< "${SEEDS:-1 2 3}"
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs}
i=${SLURM_ARRAY_TASK_ID:?run under sbatch, or set SLURM_ARRAY_TASK_ID}
if [ "$i" -ge $(( ${#presets[@]} * ${#seeds[@]} )) ]; then
  echo "slurm-array.sh: task $i, but only ${#presets[@]} presets x ${#seeds[@]} seeds" >&2; exit 2
fi
preset=${presets[$(( i / ${#seeds[@]} ))]}
seed=${seeds[$(( i % ${#seeds[@]} ))]}
dir="$OUT/array-$(basename "$preset" .json)-seed$seed"
if [ -f "$dir/summary.json" ]; then
  echo "finished earlier: $dir"
elif [ -f "$dir/last.pt" ]; then
  exec "$PYTHON" multitask_classifier.py --resume "$dir"
else
  # shellcheck disable=SC2086  # FLAGS is meant to split
  exec "$PYTHON" multitask_classifier.py --config "$preset" ${FLAGS:-} --seed "$seed" --save_path "$dir"
fi

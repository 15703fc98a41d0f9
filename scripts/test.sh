#!/usr/bin/env bash
# The README's test command: set up the venv and what the tests need (models in .cache/models, chromium,
# faketime), start Redis/PostgreSQL if needed, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/services.sh
export HF_HUB_OFFLINE=1
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"

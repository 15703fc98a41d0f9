#!/usr/bin/env bash
# Run the fault suite (tests/test_faults.py, tests/test_faults_services.py, tests/test_partition.py) and render docs/reliability.md from what
# its tests asserted and measured. The normal test run never writes tracked files; this is the explicit way.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/services.sh
export HF_HUB_OFFLINE=1 BATCHLLM_RELIABILITY_DOC="$PWD/docs/reliability.md"
exec .venv/bin/python -m pytest -p no:cacheprovider -q tests/test_faults.py tests/test_faults_services.py tests/test_partition.py "$@"

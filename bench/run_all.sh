#!/usr/bin/env bash
# Every benchmark of issue 14 in one go, then one table of every target (bench/report.py --summary).
#
#   bench/run_all.sh                 # the full run (~20-30 min on 2 CPU cores; run it on a quiet machine)
#   SMOKE=1 bench/run_all.sh         # tiny sizes, ~3 min: checks that everything runs, numbers mean nothing
#
# Outputs: /tmp/bl_compare.json, /tmp/bl_control_plane.json, /tmp/bl_scale.json (override with OUT_DIR=...).
# Render docs/performance.md from them afterwards with: .venv/bin/python bench/report.py --write
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-/tmp}
NICE=${NICE:-}   # e.g. NICE="nice -n 19" on a shared machine
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
echo "load average (1, 5, 15 min): $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"
if [[ -n "${SMOKE:-}" ]]; then
  $NICE $PY bench/compare.py --n 16 --chunk-sizes 16 --json-out "$OUT/bl_compare.json"
  $NICE $PY bench/control_plane.py --lines 20000 --json-out "$OUT/bl_control_plane.json"
  $NICE $PY bench/scale.py --workers 4,8 --batches 30 --json-out "$OUT/bl_scale.json"
else
  $NICE $PY bench/compare.py --json-out "$OUT/bl_compare.json"                 # 256 requests; chunks 16, 64, 256
  $NICE $PY bench/control_plane.py --json-out "$OUT/bl_control_plane.json"     # 1M lines; without and with a scheduler
  $NICE $PY bench/scale.py --json-out "$OUT/bl_scale.json"                     # 10 and 100 workers, 1,000 batches
fi
echo
$PY bench/report.py --summary --compare "$OUT/bl_compare.json" --control-plane "$OUT/bl_control_plane.json" \
  --scale "$OUT/bl_scale.json"

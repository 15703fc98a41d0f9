"""Pytest plugin behind ``docs/reliability.md``: one table row per fault (or input) a fault test tried.

Loaded by ``pytest_plugins = ["tests.reliability_report"]`` in the fault modules. A test asks for
the ``reliability`` fixture and calls :meth:`Recorder.row` for each fault it injected: what was done, what
happened, how long recovery took, how many requests went in and how many results came out. Whether the
row passed is the test's own outcome (a failure's first line is appended to the row).

The test suite never rewrites tracked files: the table is written only when ``BATCHLLM_RELIABILITY_DOC``
names a file (``bash scripts/reliability-report.sh`` sets it to ``docs/reliability.md``), every fault test
was selected (no ``-k``/``-m`` subset) and at least one of them ran its body.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = Path(os.environ["BATCHLLM_RELIABILITY_DOC"]) if os.environ.get("BATCHLLM_RELIABILITY_DOC") else None
FAULTS_FILES = ("test_faults.py", "test_faults_services.py", "test_partition.py")


@dataclass
class Row:
    """One line of the table."""

    nodeid: str
    fault: str
    happened: str
    recovery_s: float | None = None
    requests: int | None = None
    results: int | None = None
    extra: str = ""  # e.g. "3 chunks re-run"


@dataclass
class _State:
    rows: list[Row] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # nodeid → passed / failed / skipped / error
    failures: dict[str, str] = field(default_factory=dict)  # nodeid → first line of the failure
    durations: dict[str, float] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)
    deselected: int = 0
    started: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)


_STATE = _State()


class Recorder:
    """What a fault test hands the report (the ``reliability`` fixture)."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid

    def row(
        self,
        fault: str,
        happened: str,
        *,
        recovery_s: float | None = None,
        requests: int | None = None,
        results: int | None = None,
        extra: str = "",
    ) -> None:
        """Add a row: ``fault`` is what was done (or the input tried), ``happened`` what the system did."""
        _STATE.rows.append(Row(self.nodeid, fault, happened, recovery_s, requests, results, extra))
        bits = [f"[reliability] {fault}: {happened}"]
        if recovery_s is not None:
            bits.append(f"recovered in {recovery_s:.1f} s")
        if requests is not None:
            bits.append(f"{requests} requests → {results} results")
        print("; ".join(bits), flush=True)

    def note(self, text: str) -> None:
        """A line for the notes under the table (e.g. a measured setting)."""
        if text not in _STATE.notes:
            _STATE.notes.append(text)


def add_context(text: str) -> None:
    """A line for the bullet list above the table (e.g. the test cluster's timing settings)."""
    if text not in _STATE.context:
        _STATE.context.append(text)


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Recorder:
    """Record rows for ``docs/reliability.md`` (see the module docstring)."""
    return Recorder(request.node.nodeid)


def _is_fault_item(item: pytest.Item) -> bool:
    return item.nodeid.split("::", 1)[0].endswith(FAULTS_FILES) and item.get_closest_marker("faults") is not None


def pytest_deselected(items: list[pytest.Item]) -> None:
    _STATE.deselected += sum(1 for it in items if _is_fault_item(it))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    _STATE.selected = [it.nodeid for it in items if _is_fault_item(it)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]):  # type: ignore[no-untyped-def]
    outcome = yield
    if not _is_fault_item(item):
        return
    rep = outcome.get_result()
    nid = item.nodeid
    if rep.when == "call":
        _STATE.durations[nid] = rep.duration
    if rep.skipped and nid not in _STATE.outcomes:
        _STATE.outcomes[nid] = "skipped"
    elif rep.failed:
        _STATE.outcomes[nid] = "failed" if rep.when == "call" else "error"
        _STATE.failures.setdefault(nid, _first_line(rep))
    elif rep.when == "call" and rep.passed:
        _STATE.outcomes.setdefault(nid, "passed")


def _first_line(rep: pytest.TestReport) -> str:
    crash = getattr(rep.longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or str(rep.longrepr)
    return " ".join(text.strip().splitlines()[0].split())[:240] if text.strip() else "failed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    ran = [n for n in _STATE.selected if _STATE.outcomes.get(n) in ("passed", "failed", "error")]
    if not ran or DOC is None:
        return
    if _STATE.deselected:
        print(f"\n[reliability] {_STATE.deselected} fault test(s) deselected: {DOC} not rewritten", flush=True)
        return
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(), encoding="utf-8")
    print(f"\n[reliability] wrote {DOC}", flush=True)


# ----------------------------------------------------------------------------- rendering


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _test_name(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def render() -> str:
    """The markdown document for the rows collected in this session."""
    verdict = {"passed": "pass", "failed": "**FAIL**", "error": "**ERROR**", "skipped": "skipped"}
    now = dt.datetime.now().astimezone()
    n_pass = sum(1 for n in _STATE.selected if _STATE.outcomes.get(n) == "passed")
    lines = [
        "# batchllm reliability report",
        "",
        "Generated by the fault suite on real processes (no mocks): PostgreSQL, Redis and Celery workers",
        "running real vLLM on the CPU with SmolLM2-135M. Every kill and restart below really happened in the",
        "run that wrote this page, and each row names the test that asserted it. Regenerate it with:",
        "",
        "```",
        "bash scripts/reliability-report.sh",
        "```",
        "",
        f"- Run: {now:%Y-%m-%d %H:%M %Z}, {platform.node() or 'host'}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}; {n_pass} of {len(_STATE.selected)} fault tests passed in "
        f"{time.time() - _STATE.started:.0f} s.",
        *[f"- {c}" for c in _STATE.context],
        "- *Recovery* is measured from the moment the fault was injected (or the service came back, where",
        "  stated) until the affected work was finished again.",
        "",
        "| # | Fault or input tried | What happened | Recovery | Requests → results | Test | Result |",
        "|---|---|---|---|---|---|---|",
    ]
    i = 0
    for nid in _STATE.selected:
        rows = [r for r in _STATE.rows if r.nodeid == nid]
        outcome = _STATE.outcomes.get(nid, "not run")
        mark = verdict.get(outcome, outcome)
        fail = _STATE.failures.get(nid)
        if not rows:
            i += 1
            what = f"did not run ({outcome})" if outcome in ("not run", "skipped") else f"test failed before recording: {fail}"
            lines.append(f"| {i} | — | {_cell(what)} | | | `{_cell(_test_name(nid))}` | {mark} |")
            continue
        for r in rows:
            i += 1
            happened = r.happened + (f" ({r.extra})" if r.extra else "")
            if fail and outcome != "passed":
                happened += f" — failure: {fail}"
            rec = f"{r.recovery_s:.1f} s" if r.recovery_s is not None else "—"
            counts = f"{r.requests} → {r.results}" if r.requests is not None else "—"
            test = _cell(_test_name(nid))
            lines.append(f"| {i} | {_cell(r.fault)} | {_cell(happened)} | {rec} | {counts} | `{test}` | {mark} |")
    if _STATE.notes:
        lines += ["", "## Notes", ""] + [f"- {_cell(n)}" for n in _STATE.notes]
    return "\n".join(lines) + "\n"

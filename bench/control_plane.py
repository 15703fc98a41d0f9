"""Control-plane benchmark (no inference): ``batchllm submit`` and ``batchllm results`` on a million lines.

    .venv/bin/python bench/control_plane.py                       # PostgreSQL, 1,000,000 lines, +/- scheduler
    .venv/bin/python bench/control_plane.py --lines 100000 --backend both

For each backend (PostgreSQL via COPY, SQLite via executemany; Redis is the broker for both) and for each
scheduler mode (``--scheduler``: ``off`` = no scheduler, submit sends every chunk's message itself; ``on`` = a
``batchllm scheduler`` process runs and holds the leader lease, so submit sends only its first chunks and the
scheduler meters out the rest):

1. a fresh database (PostgreSQL: ``--pg-db`` is dropped and re-created; SQLite: a file under /tmp) and a
   flushed Redis database (``--redis``, default db 9);
2. ``batchllm submit FILE --model smollm2-135m-instruct`` as a subprocess, timed from start to exit; its peak
   RSS is its own ``ru_maxrss``, taken by ``/usr/bin/time`` (see ``run_child``). Checked: every line stored, one
   Celery message per chunk in Redis;
3. one synthetic result per request inserted directly (COPY on PostgreSQL; not timed), then
   ``batchllm results BATCH -o OUT`` as a subprocess, timed; peak RSS as above. Checked: one output line per
   request. "Flat memory" is shown by running the export on a tenth of the lines too and comparing peak RSS.

Input: ``bench/make_input.py control`` (short-form lines with ~100-byte prompts, every 10th line in the
OpenAI Batch form), generated under /tmp if missing. Results go to stdout and ``--json-out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.procs import fresh_pg  # noqa: E402

MODEL = "smollm2-135m-instruct"
TARGET_SUBMIT = 150_000
TARGET_EXPORT = 300_000
TARGET_RSS_MB = 300


GNU_TIME = Path("/usr/bin/time")


def run_child(argv: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Run a command; return (wall seconds, peak RSS MB of that command, exit code, stderr tail).

    The peak RSS is the command's own ``ru_maxrss``, taken by GNU time (``/usr/bin/time -v``), whose fork
    is small. (Read straight from ``os.wait4`` here it would include this benchmark process's own RSS at
    fork time: Linux carries the pre-exec high-water mark over ``exec``.) The wall time includes GNU
    time's own start, a millisecond.
    """
    use_time = GNU_TIME.exists()
    cmd = [str(GNU_TIME), "-f", "MAXRSS_KB=%M", *argv] if use_time else argv
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    rss_mb = usage.ru_maxrss / 1024
    if use_time:
        marks = [ln for ln in err.splitlines() if ln.startswith("MAXRSS_KB=")]
        if marks:
            rss_mb = int(marks[-1].split("=", 1)[1]) / 1024
        err = "\n".join(ln for ln in err.splitlines() if not ln.startswith(("MAXRSS_KB=", "Command exited with")))
    return wall, rss_mb, rc, err[-2000:]


def fresh_sqlite(path: Path) -> str:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    from batchllm.store.db import upgrade

    upgrade(url)
    return url


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def queued_messages(url: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    return sum(int(r.llen(k)) for k in r.scan_iter("batchllm.*") if r.type(k) == b"list")


def _query(db_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one read-only query, through the driver (the bench keeps SQLAlchemy out of its own code)."""
    if db_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
            return list(conn.execute(sql.replace("%s", "?"), params).fetchall())
    import psycopg

    with psycopg.connect(_libpq(db_url), autocommit=True) as conn:
        return list(conn.execute(sql, params).fetchall())  # type: ignore[arg-type]


def _libpq(db_url: str) -> str:
    return db_url.replace("postgresql+psycopg://", "postgresql://")


def last_batch(db_url: str) -> tuple[str, int, int]:
    """(id, request rows, chunk rows) of the newest batch."""
    ((bid,),) = _query(db_url, "SELECT id FROM batches ORDER BY created_at DESC LIMIT 1")
    ((n_req,),) = _query(db_url, "SELECT COUNT(*) FROM requests WHERE batch_id = %s", (bid,))
    ((n_ck,),) = _query(db_url, "SELECT COUNT(*) FROM chunks WHERE batch_id = %s", (bid,))
    return str(bid), int(n_req), int(n_ck)


TEXT = ("Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar and oxygen. "
        "The leaves catch light with chlorophyll, and the sugar feeds the plant as it grows.")
#: The current ``results`` columns (store/models.py ``Result``) that a worker's write fills.
RESULT_COLUMNS = ("request_id", "batch_id", "ok", "status_code", "body", "prompt_tokens", "completion_tokens",
                  "latency_ms", "model", "worker", "device", "attempt", "created_at")


def _body(rid: int) -> str:
    """A chat.completion response body as vLLM's serving code writes it (no tab, newline or backslash)."""
    return json.dumps({
        "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"{TEXT} ({rid})"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 24, "completion_tokens": 64, "total_tokens": 88}}, separators=(",", ":"))


def insert_results(db_url: str, batch_id: str, limit: int | None = None) -> int:
    """One synthetic ok result per valid request of the batch (as a worker would write it), in bulk: COPY on
    PostgreSQL, executemany on SQLite, with the current ``results`` columns."""
    from batchllm.status import ChunkStatus

    now = time.time()
    lim = f" LIMIT {int(limit)}" if limit else ""
    ids = [int(r[0]) for r in _query(
        db_url, f"SELECT id FROM requests WHERE batch_id = %s AND error_code IS NULL ORDER BY line_no{lim}", (batch_id,))]
    ref = f"{MODEL}@bf16"
    cols = ", ".join(RESULT_COLUMNS)
    if db_url.startswith("sqlite"):
        import sqlite3

        rows = [(rid, batch_id, 1, 200, _body(rid), 24, 64, 812.5, ref, "bench-worker", "cpu", 1, now) for rid in ids]
        with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
            conn.executemany(f"INSERT INTO results ({cols}) VALUES ({','.join('?' * len(RESULT_COLUMNS))})", rows)
            conn.execute("UPDATE chunks SET status = ?, finished_at = ? WHERE batch_id = ?",
                         (ChunkStatus.DONE.value, now, batch_id))
    else:
        import psycopg

        with psycopg.connect(_libpq(db_url)) as conn:
            with conn.cursor() as cur, cur.copy(f"COPY results ({cols}) FROM STDIN") as cp:
                for start in range(0, len(ids), 50_000):
                    cp.write("".join(f"{rid}\t{batch_id}\tt\t200\t{_body(rid)}\t24\t64\t812.5\t{ref}\tbench-worker\tcpu\t1\t"
                                     f"{now}\n" for rid in ids[start:start + 50_000]))
            conn.execute("UPDATE chunks SET status = %s, finished_at = %s WHERE batch_id = %s",
                         (ChunkStatus.DONE.value, now, batch_id))
    from batchllm.store.batches import finalize_open

    finalize_open(db_url, None)  # the store's own finalization, as the last worker write or a scheduler tick does it
    return len(ids)


def count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def start_scheduler(exe: list[str], env: dict[str, str], db_url: str, log: Path) -> subprocess.Popen[bytes]:
    """A ``batchllm scheduler`` process; returns once it holds the leader lease (so submit sees it)."""
    fh = log.open("wb")
    proc = subprocess.Popen([*exe, "scheduler"], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"scheduler exited ({proc.returncode}); see {log}")
        rows = _query(db_url, "SELECT owner FROM scheduler_lease WHERE owner IS NOT NULL")
        if rows:
            return proc
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"scheduler did not take the leader lease in 60 s; see {log}")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_backend(backend: str, scheduler: bool, args: argparse.Namespace, input_path: Path, small_path: Path) -> dict[str, Any]:
    """One fresh database: submit (timed), synthetic results (not timed), export (timed)."""
    env = dict(os.environ)
    env.update({"BATCHLLM_BROKER_URL": args.redis, "BATCHLLM_DATA_DIR": "/tmp/bl_bench_data", "HF_HUB_OFFLINE": "1"})
    if backend == "pg":
        db_url = fresh_pg(args.pg_admin, args.pg_db)
        if args.diagnose_fk:
            import psycopg

            with psycopg.connect(_libpq(db_url), autocommit=True) as conn:
                conn.execute("ALTER TABLE requests DROP CONSTRAINT requests_batch_id_fkey")
            print("[pg] DIAGNOSTIC RUN: requests.batch_id foreign key dropped in the scratch database", flush=True)
    else:
        db_url = fresh_sqlite(Path("/tmp/bl_bench_cp.sqlite"))
    env["BATCHLLM_DATABASE_URL"] = db_url
    flush_redis(args.redis)
    exe = [sys.executable, "-m", "batchllm"]
    label = f"{backend}, scheduler {'on' if scheduler else 'off'}"
    out: dict[str, Any] = {"backend": backend, "scheduler": scheduler, "lines": args.lines}
    sched = start_scheduler(exe, env, db_url, Path(f"/tmp/bl_bench_scheduler_{backend}.log")) if scheduler else None
    try:
        wall, rss, rc, err = run_child([*exe, "submit", str(input_path), "--model", MODEL], env)
        if rc != 0:
            raise SystemExit(f"submit failed ({rc}):\n{err}")
        batch_id, n_req, n_ck = last_batch(db_url)
        msgs = queued_messages(args.redis)
        assert n_req == args.lines, f"{n_req} request rows for {args.lines} lines"
        if scheduler:  # submit sent its head; the scheduler meters out the rest (a few per queue, no workers here)
            assert 0 < msgs <= n_ck, f"{msgs} messages in Redis for {n_ck} chunks"
        else:
            assert msgs == n_ck, f"{msgs} messages in Redis for {n_ck} chunks"
        out["submit"] = {"wall_s": round(wall, 2), "lines_per_s": round(args.lines / wall), "peak_rss_mb": round(rss, 1),
                         "chunks": n_ck, "messages": msgs}
        print(f"[{label}] submit {args.lines:,} lines: {wall:.1f} s = {args.lines / wall:,.0f} lines/s, peak RSS "
              f"{rss:.0f} MB, {n_ck:,} chunks / {msgs:,} messages", flush=True)

        # the small batch first (for the flat-memory comparison), then results for both
        _, _, rc, err = run_child([*exe, "submit", str(small_path), "--model", MODEL], env)
        if rc != 0:
            raise SystemExit(f"small submit failed ({rc}):\n{err}")
        small_id, small_n, _ = last_batch(db_url)
        t0 = time.perf_counter()
        n_res = insert_results(db_url, batch_id)
        insert_results(db_url, small_id)
        print(f"[{label}] inserted {n_res:,} synthetic results in {time.perf_counter() - t0:.1f} s (not timed)", flush=True)
        outs = {}
        for size, bid, n in (("small", small_id, small_n), ("full", batch_id, args.lines)):
            path = Path(f"/tmp/bl_bench_out_{backend}_{size}.jsonl")
            wall, rss, rc, err = run_child([*exe, "results", bid, "-o", str(path)], env)
            if rc != 0:
                raise SystemExit(f"results failed ({rc}):\n{err}")
            got = count_lines(path)
            assert got == n, f"{got} output lines for {n} requests"
            outs[size] = {"lines": n, "wall_s": round(wall, 2), "lines_per_s": round(n / wall), "peak_rss_mb": round(rss, 1)}
            print(f"[{label}] results {n:,} lines: {wall:.1f} s = {n / wall:,.0f} lines/s, peak RSS {rss:.0f} MB", flush=True)
            path.unlink()
    finally:
        stop_process(sched)
    out["export"] = outs["full"]
    out["export_small"] = outs["small"]
    return out


def targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pass/fail of each control-plane target, per PostgreSQL run (the targets are about PostgreSQL + Redis)."""
    out = []
    for r in runs:
        if r["backend"] != "pg":
            continue
        mode = f"scheduler {'on' if r['scheduler'] else 'off'}"
        s, e = r["submit"], r["export"]
        out += [
            {"target": f"submit lines/s >= {TARGET_SUBMIT:,} ({mode})", "value": s["lines_per_s"],
             "met": s["lines_per_s"] >= TARGET_SUBMIT},
            {"target": f"submit peak RSS <= {TARGET_RSS_MB} MB ({mode})", "value": s["peak_rss_mb"],
             "met": s["peak_rss_mb"] <= TARGET_RSS_MB},
            {"target": f"results lines/s >= {TARGET_EXPORT:,} ({mode})", "value": e["lines_per_s"],
             "met": e["lines_per_s"] >= TARGET_EXPORT},
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--input", type=Path, default=None, help="default /tmp/bl_control_<lines>.jsonl (generated)")
    ap.add_argument("--backend", choices=("pg", "sqlite", "both"), default="pg")
    ap.add_argument("--scheduler", choices=("off", "on", "both"), default="both",
                    help="run with no scheduler, with a `batchllm scheduler` process, or both (default)")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--pg-db", default="bl_bench_cp")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    ap.add_argument("--json-out", type=Path, default=Path("/tmp/bl_control_plane.json"))
    ap.add_argument("--diagnose-fk", action="store_true",
                    help="diagnostic only: drop the requests -> batches foreign key in the scratch database, to measure "
                         "what its per-row check costs the COPY (not a supported configuration)")
    args = ap.parse_args()

    from bench.make_input import control_lines, write

    input_path = args.input or Path(f"/tmp/bl_control_{args.lines}.jsonl")
    if not input_path.exists():
        write(input_path, control_lines(args.lines))
    small = max(1, args.lines // 10)
    small_path = Path(f"/tmp/bl_control_{small}_small.jsonl")
    if not small_path.exists():
        write(small_path, control_lines(small, seed=3))
    print(f"input {input_path} ({input_path.stat().st_size / 1e6:.0f} MB, {args.lines:,} lines); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, Any] = {"load_before": os.getloadavg(), "runs": [], "diagnose_fk": args.diagnose_fk,
                               "lines": args.lines}
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.scheduler]
    for backend in (("pg", "sqlite") if args.backend == "both" else (args.backend,)):
        for sched in modes:
            results["runs"].append(bench_backend(backend, sched, args, input_path, small_path))
    results["load_after"] = os.getloadavg()
    results["targets"] = targets(results["runs"])
    print()
    print("| backend | scheduler | submit lines/s | submit peak RSS | results lines/s | results peak RSS (1/10 of the lines) |")
    print("|---|---|---|---|---|---|")
    for r in results["runs"]:
        s, e, es = r["submit"], r["export"], r["export_small"]
        print(f"| {r['backend']} | {'on' if r['scheduler'] else 'off'} | {s['lines_per_s']:,} ({s['wall_s']} s) | "
              f"{s['peak_rss_mb']:.0f} MB | {e['lines_per_s']:,} ({e['wall_s']} s) | {e['peak_rss_mb']:.0f} MB "
              f"({es['peak_rss_mb']:.0f} MB) |")
    print()
    for t in results["targets"]:
        print(f"target {t['target']}: {t['value']:,} -> {'met' if t['met'] else 'NOT met'}")
    print(f"load average before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f}")
    args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Control-plane benchmark (no inference): ``batchllm submit`` and ``batchllm results`` on a million lines.

    .venv/bin/python bench/control_plane.py                       # PostgreSQL + SQLite, 1,000,000 lines
    .venv/bin/python bench/control_plane.py --lines 100000 --backend pg

For each backend (PostgreSQL via COPY, SQLite via executemany; Redis is the broker for both):

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
MODEL = "smollm2-135m-instruct"
TARGET_SUBMIT = 50_000
TARGET_EXPORT = 100_000
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


def fresh_pg(admin_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    from batchllm.store.db import upgrade

    upgrade(url)
    return url


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


def last_batch(db_url: str) -> tuple[str, int, int]:
    from sqlalchemy import func, select

    from batchllm.store.db import session_scope
    from batchllm.store.models import Batch, Chunk, Request

    with session_scope(db_url) as s:
        b = s.scalars(select(Batch).order_by(Batch.created_at.desc()).limit(1)).one()
        n_req = s.scalar(select(func.count()).select_from(Request).where(Request.batch_id == b.id)) or 0
        n_ck = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.batch_id == b.id)) or 0
        return b.id, int(n_req), int(n_ck)


TEXT = ("Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar and oxygen. "
        "The leaves catch light with chlorophyll, and the sugar feeds the plant as it grows.")


def insert_results(db_url: str, batch_id: str, limit: int | None = None) -> int:
    """One synthetic ok result per request of the batch (as a worker would write it), inserted in bulk."""
    from batchllm.store.db import get_engine, is_sqlite

    now = time.time()
    engine = get_engine(db_url)
    n = 0
    with engine.begin() as conn:
        raw: Any = conn.connection.dbapi_connection
        lim = f" LIMIT {int(limit)}" if limit else ""
        ids = [r[0] for r in conn.exec_driver_sql(
            f"SELECT id FROM requests WHERE batch_id = '{batch_id}' AND error_code IS NULL ORDER BY line_no{lim}").all()]
        if is_sqlite(db_url):
            rows = [(rid, batch_id, 1, 200, f"{TEXT} ({rid})", "length", 24, 64, None, None, 812.5, f"{MODEL}@bf16",
                     "bench-worker", "cpu", 1, now) for rid in ids]
            raw.executemany("INSERT INTO results (request_id, batch_id, ok, status_code, text, finish_reason, "
                            "prompt_tokens, completion_tokens, error_code, error_message, latency_ms, model, worker, device, "
                            "attempt, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            return len(rows)
        cols = ("request_id, batch_id, ok, status_code, text, finish_reason, prompt_tokens, completion_tokens, latency_ms, "
                "model, worker, device, attempt, created_at")
        with raw.cursor() as cur, cur.copy(f"COPY results ({cols}) FROM STDIN") as cp:
            for start in range(0, len(ids), 50_000):
                cp.write("".join(f"{rid}\t{batch_id}\tt\t200\t{TEXT} ({rid})\tlength\t24\t64\t812.5\t{MODEL}@bf16\t"
                                 f"bench-worker\tcpu\t1\t{now}\n" for rid in ids[start:start + 50_000]))
                n = min(len(ids), start + 50_000)
    return n


def count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def bench_backend(backend: str, args: argparse.Namespace, input_path: Path, small_path: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env.update({"BATCHLLM_BROKER_URL": args.redis, "BATCHLLM_DATA_DIR": "/tmp/bl_bench_data", "HF_HUB_OFFLINE": "1"})
    if backend == "pg":
        db_url = fresh_pg(args.pg_admin, args.pg_db)
        if args.diagnose_fk:
            import psycopg

            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("ALTER TABLE requests DROP CONSTRAINT requests_batch_id_fkey")
            print("[pg] DIAGNOSTIC RUN: requests.batch_id foreign key dropped in the scratch database", flush=True)
    else:
        db_url = fresh_sqlite(Path("/tmp/bl_bench_cp.sqlite"))
    env["BATCHLLM_DATABASE_URL"] = db_url
    flush_redis(args.redis)
    exe = [sys.executable, "-m", "batchllm"]
    out: dict[str, Any] = {"backend": backend, "lines": args.lines}

    wall, rss, rc, err = run_child([*exe, "submit", str(input_path), "--model", MODEL], env)
    if rc != 0:
        raise SystemExit(f"submit failed ({rc}):\n{err}")
    batch_id, n_req, n_ck = last_batch(db_url)
    msgs = queued_messages(args.redis)
    assert n_req == args.lines, f"{n_req} request rows for {args.lines} lines"
    assert msgs == n_ck, f"{msgs} messages in Redis for {n_ck} chunks"
    out["submit"] = {"wall_s": round(wall, 2), "lines_per_s": round(args.lines / wall), "peak_rss_mb": round(rss, 1),
                     "chunks": n_ck, "messages": msgs}
    print(f"[{backend}] submit {args.lines:,} lines: {wall:.1f} s = {args.lines / wall:,.0f} lines/s, peak RSS {rss:.0f} MB, "
          f"{n_ck:,} chunks / {msgs:,} messages", flush=True)

    # the small batch first (for the flat-memory comparison), then results for both
    _, _, rc, err = run_child([*exe, "submit", str(small_path), "--model", MODEL], env)
    if rc != 0:
        raise SystemExit(f"small submit failed ({rc}):\n{err}")
    small_id, small_n, _ = last_batch(db_url)
    t0 = time.perf_counter()
    n_res = insert_results(db_url, batch_id)
    insert_results(db_url, small_id)
    print(f"[{backend}] inserted {n_res:,} synthetic results in {time.perf_counter() - t0:.1f} s (not timed)", flush=True)
    outs = {}
    for label, bid, n in (("small", small_id, small_n), ("full", batch_id, args.lines)):
        path = Path(f"/tmp/bl_bench_out_{backend}_{label}.jsonl")
        wall, rss, rc, err = run_child([*exe, "results", bid, "-o", str(path)], env)
        if rc != 0:
            raise SystemExit(f"results failed ({rc}):\n{err}")
        got = count_lines(path)
        assert got == n, f"{got} output lines for {n} requests"
        outs[label] = {"lines": n, "wall_s": round(wall, 2), "lines_per_s": round(n / wall), "peak_rss_mb": round(rss, 1)}
        print(f"[{backend}] results {n:,} lines: {wall:.1f} s = {n / wall:,.0f} lines/s, peak RSS {rss:.0f} MB", flush=True)
        path.unlink()
    out["export"] = outs["full"]
    out["export_small"] = outs["small"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--input", type=Path, default=None, help="default /tmp/bl_control_<lines>.jsonl (generated)")
    ap.add_argument("--backend", choices=("pg", "sqlite", "both"), default="both")
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
    results: dict[str, Any] = {"load_before": os.getloadavg(), "runs": [], "diagnose_fk": args.diagnose_fk}
    for backend in (("pg", "sqlite") if args.backend == "both" else (args.backend,)):
        results["runs"].append(bench_backend(backend, args, input_path, small_path))
    results["load_after"] = os.getloadavg()
    print()
    print("| backend | submit lines/s | submit peak RSS | results lines/s | results peak RSS (1/10 of the lines) |")
    print("|---|---|---|---|---|")
    for r in results["runs"]:
        s, e, es = r["submit"], r["export"], r["export_small"]
        print(f"| {r['backend']} | {s['lines_per_s']:,} ({s['wall_s']} s) | {s['peak_rss_mb']:.0f} MB | "
              f"{e['lines_per_s']:,} ({e['wall_s']} s) | {e['peak_rss_mb']:.0f} MB ({es['peak_rss_mb']:.0f} MB) |")
    for r in results["runs"]:
        if r["backend"] != "pg":
            continue
        s, e = r["submit"], r["export"]
        met_submit = "met" if s["lines_per_s"] >= TARGET_SUBMIT else "NOT met"
        print(f"targets (PostgreSQL): submit >= {TARGET_SUBMIT:,} lines/s: {met_submit}; "
              f"submit RSS <= {TARGET_RSS_MB} MB: {'met' if s['peak_rss_mb'] <= TARGET_RSS_MB else 'NOT met'}; "
              f"results >= {TARGET_EXPORT:,} lines/s: {'met' if e['lines_per_s'] >= TARGET_EXPORT else 'NOT met'}")
    print(f"load average before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f}")
    args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

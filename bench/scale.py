"""Control plane at scale (no model): a real scheduler, many stub workers, a thousand queued batches.

    .venv/bin/python bench/scale.py                                # 10 and 100 workers, 1,000 batches each
    .venv/bin/python bench/scale.py --workers 4 --batches 20       # a smoke run

Per configuration (``--workers``, comma-separated): a fresh PostgreSQL database and Redis database; ``--batches``
batches stored through ``store.batches.create`` (mixed priorities 0-9, ``--models`` models, ``--requests``
requests in chunks of ``--chunk-size``); then a real ``Scheduler`` process and the workers (``bench/scale_procs.py``:
real ``WorkerRuntime``s on ``tests.stub_engine.StubEngine``, spread over ``--procs`` processes) run until every
chunk is done. ``--late-after`` seconds in, one more priority-9 batch is submitted the way ``batchllm submit``
does it (stored, then its first chunks sent by ``services.submit.dispatch_new``).

Reported: scheduler tick time p50/p99 (target p99 <= 100 ms; the first tick, which opens connections and reads
the catalog, is left out) and SQL statements per tick (p50/max; they must
not grow with workers x batches), chunk claims/s from the first to the last claim (target >= 2,000/s), time
from creation to the first chunk running (the backlog, and the late batch), and priority order: a chunk of a
queue claimed more than one tick after a higher-priority chunk of the same queue that was already waiting is
an inversion (target: none).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.procs import fresh_pg  # noqa: E402
from bench.scale_procs import bench_settings  # noqa: E402

TARGET_TICK_P99_S = 0.100
TARGET_CLAIMS_PER_S = 2_000
MODELS_TOML = "".join(f'[models.scale-{i}]\nbase = "smollm2-135m-instruct"\nfloor_gb = 1\n\n' for i in range(16))


def store_batch(url: str, ref: str, n: int, chunk_size: int, priority: int) -> str:
    """A batch of ``n`` chat requests of ``ref``, stored as submit stores it (in progress, no message sent)."""
    from batchllm.queue import queue_name
    from batchllm.status import BatchStatus, Endpoint
    from batchllm.store import batches

    name = ref.split("@")[0]
    spec = batches.NewBatch(name="scale", model=name, priority=priority, idempotency_key=None, input_name="scale.jsonl",
                            completion_window="24h", window_s=86400)
    with batches.create(url, spec) as ing:
        chunks: list[batches.NewChunk] = []
        for i in range(n):
            if i % chunk_size == 0:
                chunks.append(batches.NewChunk(batches.new_chunk_id(), ref, queue_name(ref), len(chunks) + 1,
                                               min(chunk_size, n - i)))
            body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'
            ing.add((ing.batch_id, i + 1, f"r{i}", name, Endpoint.CHAT.value, chunks[-1].id, body, None, None, None))
        ing.finish(chunks, total=n, invalid=0, blank=0, models={name: ref}, input_sha256=None, status=BatchStatus.IN_PROGRESS)
    return ing.batch_id


def _q(url: str, sql: str, tries: int = 20) -> list[tuple[Any, ...]]:
    """One read through the driver; retried while the server is out of connection slots (a shared machine)."""
    import psycopg

    for attempt in range(tries):
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                return list(conn.execute(sql).fetchall())  # type: ignore[arg-type]
        except psycopg.OperationalError:
            if attempt == tries - 1:
                raise
            time.sleep(0.5)
    return []


def pct(vals: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank)."""
    if not vals:
        return None
    s = sorted(vals)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def inversions(claims: list[dict[str, Any]], prio: dict[str, int], tol: float) -> int:
    """Claims that came more than ``tol`` seconds after a later-claimed, higher-priority chunk of their queue."""
    bad = 0
    for q in {c["queue"] for c in claims}:
        cs = sorted((c for c in claims if c["queue"] == q), key=lambda c: c["t"])
        suffix, best = [0] * (len(cs) + 1), -1
        for i in range(len(cs) - 1, -1, -1):
            best = max(best, prio[cs[i]["batch"]])
            suffix[i] = best
        j = 0
        for c in cs:
            while j < len(cs) and cs[j]["t"] <= c["t"] + tol:
                j += 1
            if j < len(cs) and suffix[j] > prio[c["batch"]]:
                bad += 1
    return bad


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child (they flush their logs), SIGKILL what is left after 30 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_config(args: argparse.Namespace, n_workers: int) -> dict[str, Any]:
    import redis

    from batchllm.queue import make_celery
    from batchllm.services.submit import dispatch_new

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob(f"claims_{n_workers}_*.jsonl"):
        old.unlink()
    url = fresh_pg(args.pg_admin, args.pg_db)
    redis.Redis.from_url(args.redis).flushdb()
    models = work / "models.toml"
    models.write_text(MODELS_TOML)
    refs = [f"scale-{i}@bf16" for i in range(args.models)]
    rng = random.Random(7)
    t0 = time.time()
    prio: dict[str, int] = {}
    for _ in range(args.batches):
        p = rng.randint(0, 9)
        prio[store_batch(url, rng.choice(refs), args.requests, args.chunk_size, p)] = p
    print(f"[{n_workers} workers] stored {args.batches} batches in {time.time() - t0:.1f} s", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = [sys.executable, str(ROOT / "bench" / "scale_procs.py")]
    common = [url, args.redis, str(models)]
    ticks_f, procs = work / f"ticks_{n_workers}.jsonl", []
    start = time.time()
    procs.append(subprocess.Popen([*py, "scheduler", *common, str(args.interval), str(ticks_f)], env=env))
    per = -(-n_workers // args.procs)
    for k in range(0, n_workers, per):
        mine = [refs[i % len(refs)] for i in range(k, min(n_workers, k + per))]
        procs.append(subprocess.Popen([*py, "workers", *common, str(k), str(work / f"claims_{n_workers}_{k}.jsonl"),
                                       ",".join(mine)], env=env))
    try:
        late_id, late_t = None, None
        total = int(_q(url, "SELECT COUNT(*) FROM chunks")[0][0])
        while True:
            time.sleep(0.25)
            if late_id is None and time.time() - start >= args.late_after:
                late_t = time.time()
                late_id = store_batch(url, refs[0], args.requests, args.chunk_size, 9)
                prio[late_id] = 9
                st = bench_settings(url, args.redis, models, args.interval)
                dispatch_new(st, make_celery(st), late_id)
                total = int(_q(url, "SELECT COUNT(*) FROM chunks")[0][0])
            done = int(_q(url, "SELECT COUNT(*) FROM chunks WHERE status = 'done'")[0][0])
            if (done >= total and late_id is not None) or time.time() - start > args.timeout:
                break
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a bench child exited early")
        finished = time.time()
    finally:
        stop_all(procs)
    ticks = [json.loads(x) for x in ticks_f.read_text().splitlines() if x.strip()][1:]  # the first one connects
    claims = [json.loads(x) for f in work.glob(f"claims_{n_workers}_*.jsonl") for x in f.read_text().splitlines() if x.strip()]
    claimed = sorted((c for c in claims if c["outcome"] == "fed"), key=lambda c: c["claimed"])
    secs = [t["s"] for t in ticks]
    stm = [t["statements"] for t in ticks]
    late = [c["claimed"] for c in claimed if c["batch"] == late_id]
    span = claimed[-1]["claimed"] - claimed[0]["claimed"] if len(claimed) > 1 else 0.0
    res = {"workers": n_workers, "batches": args.batches, "chunks": total, "done": done, "wall_s": finished - start,
           "ticks": len(ticks), "tick_p50_ms": 1000 * (pct(secs, 50) or 0), "tick_p99_ms": 1000 * (pct(secs, 99) or 0),
           "tick_max_ms": 1000 * max(secs, default=0), "statements_p50": pct([float(x) for x in stm], 50),
           "statements_max": max(stm, default=0), "claims": len(claimed),
           "claims_per_s": len(claimed) / span if span else None,
           "first_chunk_s": claimed[0]["claimed"] - start if claimed else None,
           "late_first_chunk_s": (min(late) - late_t) if late and late_t else None,
           "inversions": inversions([c for c in claimed if c["batch"] != late_id], prio, args.interval),
           "tick_errors": sum(1 for t in ticks if t["errors"]),
           "worker_errors": sum(1 for c in claims if str(c["outcome"]).startswith("error"))}
    print(f"[{n_workers} workers] {json.dumps(res)}", flush=True)
    return res


def store_claims(args: argparse.Namespace, n_chunks: int = 4000, threads: int = 8) -> dict[str, Any]:
    """Claim throughput of the store alone: ``threads`` claimers race over ``n_chunks`` one-request chunks with the
    store's own ``leases.claim`` (what a worker's task does), no broker and no scheduler in the way."""
    from concurrent.futures import ThreadPoolExecutor

    from batchllm.store import leases

    url = fresh_pg(args.pg_admin, args.pg_db)
    bid = store_batch(url, "scale-0@bf16", n_chunks, 1, 0)
    ids = [r[0] for r in _q(url, f"SELECT id FROM chunks WHERE batch_id = '{bid}' ORDER BY seq")]

    def claim_all(k: int) -> int:
        won = 0
        for cid in ids[k::threads]:
            won += leases.claim(url, cid, f"bench-{k}", 60).outcome == leases.ClaimOutcome.CLAIMED
        return won

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        won = sum(pool.map(claim_all, range(threads)))
    span = time.perf_counter() - t0
    res = {"chunks": n_chunks, "threads": threads, "claimed": won, "seconds": span, "claims_per_s": won / span}
    print(f"[store claims] {json.dumps(res)}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="10,100", help="worker counts to run, comma-separated")
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=8, help="requests per batch")
    ap.add_argument("--chunk-size", type=int, default=2)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--procs", type=int, default=2,
                    help="processes the workers are spread over (each pools up to 10 PostgreSQL connections)")
    ap.add_argument("--interval", type=float, default=0.5, help="scheduler tick interval, seconds")
    ap.add_argument("--late-after", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--pg-db", default="bl_bench_scale")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    ap.add_argument("--workdir", default="/tmp/bl_scale")
    ap.add_argument("--json-out", type=Path, default=Path("/tmp/bl_scale.json"))
    args = ap.parse_args()
    load0 = os.getloadavg()
    runs = [run_config(args, int(w)) for w in args.workers.split(",") if w.strip()]
    store = store_claims(args)
    goals = [*targets(runs), {"target": f"store alone: chunk claims/s >= {TARGET_CLAIMS_PER_S:,} (8 claimers)",
                              "value": store["claims_per_s"], "met": store["claims_per_s"] >= TARGET_CLAIMS_PER_S}]
    out = {"settings": vars(args) | {"json_out": str(args.json_out)}, "load_before": load0, "load_after": os.getloadavg(),
           "runs": runs, "store_claims": store, "targets": goals}
    print_table(out)
    args.json_out.write_text(json.dumps(out, indent=2))


def targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pass/fail per target and configuration."""
    out = []
    for r in runs:
        w = f"{r['workers']} workers"
        out += [{"target": f"tick p99 <= {TARGET_TICK_P99_S * 1000:.0f} ms ({w})", "value": r["tick_p99_ms"],
                 "met": r["tick_p99_ms"] <= TARGET_TICK_P99_S * 1000},
                {"target": f"chunk claims/s >= {TARGET_CLAIMS_PER_S:,} ({w})", "value": r["claims_per_s"],
                 "met": (r["claims_per_s"] or 0) >= TARGET_CLAIMS_PER_S},
                {"target": f"priority order holds ({w})", "value": r["inversions"], "met": r["inversions"] == 0}]
    if len(runs) > 1:
        lo = min(r["statements_p50"] or 0 for r in runs)
        hi = max(r["statements_p50"] or 0 for r in runs)
        # 10x the workers must not mean more statements per tick: allow the noise of what a tick happens to do
        # (a tick that finalizes batches or sends messages runs a few more), not growth with the cluster.
        out.append({"target": "statements per tick do not grow with workers (p50, fewest vs most workers; <= 1.5x)",
                    "value": f"{lo:g} / {hi:g}", "met": hi <= 1.5 * lo})
    return out


def print_table(out: dict[str, Any]) -> None:
    """One Markdown table of every figure, then the targets."""
    print("\n| workers | batches | chunks | ticks | tick p50 ms | tick p99 ms | tick max ms | statements/tick p50 (max) | "
          "claims/s | first chunk s | late p9 batch: first chunk s | priority inversions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda x, s=".1f": "-" if x is None else format(x, s)  # noqa: E731
    for r in out["runs"]:
        print(f"| {r['workers']} | {r['batches']} | {r['chunks']} | {r['ticks']} | {f(r['tick_p50_ms'])} | "
              f"{f(r['tick_p99_ms'])} | {f(r['tick_max_ms'])} | {f(r['statements_p50'], 'g')} ({r['statements_max']}) | "
              f"{f(r['claims_per_s'], ',.0f')} | {f(r['first_chunk_s'], '.2f')} | {f(r['late_first_chunk_s'], '.2f')} | "
              f"{r['inversions']} |")
    sc = out.get("store_claims")
    if sc:
        print(f"store alone: {sc['claimed']} claims by {sc['threads']} claimers in {sc['seconds']:.2f} s = "
              f"{sc['claims_per_s']:,.0f} claims/s")
    for t in out["targets"]:
        print(f"target {t['target']}: {t['value'] if isinstance(t['value'], str) else f(t['value'])} -> "
              f"{'met' if t['met'] else 'NOT met'}")
    print(f"load average before {out['load_before'][0]:.2f}, after {out['load_after'][0]:.2f}")


if __name__ == "__main__":
    main()

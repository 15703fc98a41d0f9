"""Inference benchmark: raw vLLM vs `vllm run_batch` vs `batchllm run` vs a distributed batchllm worker.

    .venv/bin/python bench/compare.py                          # everything (~15-25 min on 2 CPU cores)
    .venv/bin/python bench/compare.py --modes raw,embedded --chunk-sizes 64 --n 64

One file of ``--n`` chat requests (OpenAI Batch form, ``max_tokens`` 64, ``temperature`` 0; bench/make_input.py
``chat``) runs through:

1. ``raw``: ``LLM.chat`` on all requests in one process (a subprocess of this script) — the floor;
2. ``peer``: ``python -m vllm.entrypoints.openai.run_batch -i FILE -o OUT --model DIR ...`` (subprocess);
3. ``embedded``: ``batchllm run FILE`` (subprocess; SQLite + memory:// broker + in-process worker), once per
   ``BATCHLLM_CHUNK_SIZE`` in ``--chunk-sizes``;
4. ``distributed``: a warm ``batchllm worker --cpu --model smollm2-135m-instruct`` on Redis + PostgreSQL, timed
   from the start of ``batchllm submit`` until every result is in SQL, once per chunk size (the worker is
   restarted per chunk size, since its feed depth follows BATCHLLM_CHUNK_SIZE; its load is not timed).

Same engine settings for all four: bfloat16, enforce_eager, ``--max-model-len``, a KV cache of ``--kv-gib``,
seed 0, max_num_seqs 256 and max_num_batched_tokens 4096 (vLLM's CPU defaults for the ``LLM`` class, which
batchllm's engine loop uses; run_batch's own defaults differ, so they are passed explicitly), and the vLLM
engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as batchllm's engine loop runs it;
``--raw-multiprocessing`` also runs the raw baseline with vLLM's default separate engine-core process).

Numbers per run:
- wall: process start to exit (distributed: submit start to the last result row);
- load: process start until the engine is ready to take requests (distributed: not timed, the worker is warm);
- gen tok/s: generated tokens / generation window, "after the model is loaded". The window is
  raw: the ``LLM.chat`` call; peer: run_batch's "Reading batch" log line to its final "100% Completed" line;
  batchllm: the first request handed to the engine (``results.created_at - latency_ms``, the moment its chunk
  was submitted to the engine loop) to the last result written to SQL.
Ratios are to raw (1) and to the peer (2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = "smollm2-135m-instruct"
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 4096


def model_dir(args: argparse.Namespace) -> Path:
    return Path(args.model_root) / MODEL


def base_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override the explicit KV cache size
    env.update({
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "BATCHLLM_MODEL_DIR": str(args.model_root), "BATCHLLM_ENGINE_MAX_MODEL_LEN": str(args.max_model_len),
        "BATCHLLM_CPU_KVCACHE_GB": str(args.kv_gib), "BATCHLLM_ENFORCE_EAGER": "true",
        "VLLM_LOGGING_LEVEL": "INFO",
    })
    return env


class Proc:
    """A subprocess whose combined output lines are timestamped as they arrive."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.t0 = time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        self.log = log
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("w") as f:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append((time.perf_counter(), line))
                f.write(line + "\n")

    def wait(self, timeout: float) -> tuple[int, float]:
        rc = self.proc.wait(timeout)
        end = time.perf_counter()
        self._reader.join(10)
        return rc, end - self.t0

    def first(self, pattern: str) -> float | None:
        rx = re.compile(pattern)
        for t, line in self.lines:
            if rx.search(line):
                return t
        return None

    def last(self, pattern: str) -> float | None:
        rx = re.compile(pattern)
        for t, line in reversed(self.lines):
            if rx.search(line):
                return t
        return None

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def output_tokens(path: Path) -> tuple[int, int]:
    """(lines with a 200 response, completion tokens) of an OpenAI Batch output file."""
    ok = tokens = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        resp = rec.get("response") or {}
        if resp.get("status_code") == 200:
            ok += 1
            tokens += resp["body"]["usage"]["completion_tokens"]
    return ok, tokens


# ------------------------------------------------------------------------------------------- 1. raw vLLM


def raw_child(args: argparse.Namespace) -> None:
    """Runs inside the raw subprocess: LLM.chat on every request; prints one JSON line of timings."""
    t_start = time.perf_counter()
    from vllm import LLM, SamplingParams

    lines = [json.loads(x) for x in Path(args.file).read_text().splitlines() if x.strip()]
    llm = LLM(model=str(model_dir(args)), served_model_name=MODEL, dtype="bfloat16", max_model_len=args.max_model_len,
              enforce_eager=True, kv_cache_memory_bytes=int(args.kv_gib * 2**30), seed=0, disable_log_stats=True,
              max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS)
    t_loaded = time.perf_counter()
    convs = [ln["body"]["messages"] for ln in lines]
    params = [SamplingParams(max_tokens=ln["body"]["max_tokens"], temperature=ln["body"]["temperature"]) for ln in lines]
    outs = llm.chat(convs, params, use_tqdm=False)
    t_done = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RAW_RESULT " + json.dumps({"load_s": t_loaded - t_start, "gen_s": t_done - t_loaded, "tokens": tokens,
                                      "ok": len(outs)}), flush=True)


def run_raw(args: argparse.Namespace, multiprocessing: bool = False) -> dict[str, Any]:
    env = base_env(args)
    if multiprocessing:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    p = Proc([sys.executable, __file__, "--_raw-child", *sys.argv[1:]], env, Path(args.workdir) / "raw.log")
    rc, wall = p.wait(args.timeout)
    res = next((json.loads(line.split(" ", 1)[1]) for _, line in p.lines if line.startswith("RAW_RESULT ")), None)
    if rc != 0 or res is None:
        raise SystemExit(f"raw vLLM failed ({rc}):\n{p.tail()}")
    # load: interpreter start (imports included) to LLM() returning
    return {"mode": "raw vLLM" + (" (engine-core process)" if multiprocessing else ""), "wall_s": wall, "load_s": res["load_s"],
            "gen_s": res["gen_s"], "tokens": res["tokens"], "ok": res["ok"]}


# ------------------------------------------------------------------------------------------ 2. run_batch


def run_peer(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.workdir) / "peer_out.jsonl"
    out.unlink(missing_ok=True)
    env = base_env(args)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", args.file, "-o", str(out),
            "--model", str(model_dir(args)), "--served-model-name", MODEL, "--dtype", "bfloat16", "--enforce-eager",
            "--max-model-len", str(args.max_model_len), "--kv-cache-memory-bytes", str(int(args.kv_gib * 2**30)),
            "--seed", "0", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS)]
    p = Proc(argv, env, Path(args.workdir) / "peer.log")
    rc, wall = p.wait(args.timeout)
    if rc != 0 or not out.exists():
        raise SystemExit(f"run_batch failed ({rc}):\n{p.tail()}")
    ready = p.first(r"Reading batch from")
    done = p.last(r"100% Completed")
    if ready is None:
        raise SystemExit(f"run_batch log has no 'Reading batch from' line (VLLM_LOGGING_LEVEL=INFO?):\n{p.tail()}")
    ok, tokens = output_tokens(out)
    end = done if done is not None else p.t0 + wall
    return {"mode": "vllm run_batch", "wall_s": wall, "load_s": ready - p.t0, "gen_s": end - ready, "tokens": tokens, "ok": ok}


# ----------------------------------------------------------------------------------- 3. batchllm run


def sqlite_window(db: Path) -> tuple[float, float, int, int]:
    """(first request handed to the engine, last result written, completion tokens, ok results), epoch seconds."""
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT MIN(created_at - latency_ms / 1000.0), MAX(created_at), SUM(completion_tokens), "
                           "SUM(CASE WHEN ok THEN 1 ELSE 0 END) FROM results").fetchone()
    return float(row[0]), float(row[1]), int(row[2] or 0), int(row[3] or 0)


def run_embedded(args: argparse.Namespace, chunk: int) -> dict[str, Any]:
    work = Path(args.workdir)
    db, out = work / f"embedded_{chunk}.db", work / f"embedded_{chunk}_out.jsonl"
    for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), out):
        f.unlink(missing_ok=True)
    env = base_env(args)
    env.update({"BATCHLLM_CHUNK_SIZE": str(chunk), "BATCHLLM_DATA_DIR": str(work / "data")})
    argv = [sys.executable, "-m", "batchllm", "run", args.file, "-o", str(out), "--db", str(db), "--model", MODEL]
    t_epoch = time.time()
    p = Proc(argv, env, work / f"embedded_{chunk}.log")
    loaded_at: list[float] = []

    def watch() -> None:  # the in-process worker's first heartbeat row is written right after the engine loads
        while p.proc.poll() is None and not loaded_at:
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                    if conn.execute("SELECT 1 FROM workers LIMIT 1").fetchone():
                        loaded_at.append(time.perf_counter())
                        return
            except sqlite3.Error:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rc, wall = p.wait(args.timeout)
    watcher.join(5)
    if rc != 0:
        raise SystemExit(f"batchllm run failed ({rc}):\n{p.tail()}")
    loaded = loaded_at[0] if loaded_at else None
    first, last, tokens, ok = sqlite_window(db)
    ok_file, tokens_file = output_tokens(out)
    assert (ok_file, tokens_file) == (ok, tokens), ((ok_file, tokens_file), (ok, tokens))
    return {"mode": f"batchllm run (chunk {chunk})", "chunk": chunk, "wall_s": wall,
            "load_s": (loaded - p.t0) if loaded is not None else float("nan"), "gen_s": last - first, "tokens": tokens,
            "ok": ok, "start_to_first_request_s": first - t_epoch}


# ------------------------------------------------------------------------------------- 4. distributed


def fresh_pg(admin_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    from batchllm.store.db import upgrade

    upgrade(url)
    return url


def run_distributed(args: argparse.Namespace, chunk: int) -> dict[str, Any]:
    import psycopg
    import redis

    work = Path(args.workdir)
    db_url = fresh_pg(args.pg_admin, args.pg_db)
    redis.Redis.from_url(args.redis).flushdb()
    env = base_env(args)
    env.update({"BATCHLLM_CHUNK_SIZE": str(chunk), "BATCHLLM_DATABASE_URL": db_url, "BATCHLLM_BROKER_URL": args.redis,
                "BATCHLLM_DATA_DIR": str(work / "data")})
    worker = Proc([sys.executable, "-m", "batchllm", "worker", "--cpu", "--model", MODEL, "--name", "bench-cpu-1",
                   "--loglevel", "WARNING"], env, work / f"worker_{chunk}.log")
    try:
        deadline = time.time() + args.timeout
        with psycopg.connect(db_url, autocommit=True) as conn:
            while True:  # warm: wait for the model to be loaded (not timed)
                if worker.proc.poll() is not None:
                    raise SystemExit(f"worker exited:\n{worker.tail()}")
                row = conn.execute("SELECT state FROM workers WHERE name = 'bench-cpu-1'").fetchone()
                if row and row[0] in ("ready", "busy"):
                    break
                if time.time() > deadline:
                    raise SystemExit(f"worker not ready:\n{worker.tail()}")
                time.sleep(0.5)
            time.sleep(2)  # let the start-up settle
            t0 = time.perf_counter()
            sub = subprocess.run([sys.executable, "-m", "batchllm", "submit", args.file, "--model", MODEL],
                                 env=env, capture_output=True, text=True, timeout=args.timeout)
            t_submitted = time.perf_counter() - t0
            if sub.returncode != 0:
                raise SystemExit(f"submit failed:\n{sub.stderr}")
            batch_id = sub.stdout.strip().splitlines()[-1]
            total = args.n
            while True:
                n = conn.execute("SELECT COUNT(*) FROM results WHERE batch_id = %s", (batch_id,)).fetchone()[0]
                if n >= total:
                    break
                if worker.proc.poll() is not None or time.perf_counter() - t0 > args.timeout:
                    raise SystemExit(f"distributed run stalled at {n}/{total}:\n{worker.tail()}")
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            first, last, tokens, ok = conn.execute(
                "SELECT MIN(created_at - latency_ms / 1000.0), MAX(created_at), SUM(completion_tokens), "
                "SUM(CASE WHEN ok THEN 1 ELSE 0 END) FROM results WHERE batch_id = %s", (batch_id,)).fetchone()
    finally:
        worker.stop()
    return {"mode": f"distributed (chunk {chunk})", "chunk": chunk, "wall_s": wall, "load_s": None,
            "gen_s": float(last) - float(first), "tokens": int(tokens), "ok": int(ok), "submit_s": t_submitted}


# ------------------------------------------------------------------------------------------------ main


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode (in first-seen order): the median of each number over its repeats."""
    import statistics

    out: list[dict[str, Any]] = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        rs = [r for r in runs if r["mode"] == mode]
        row: dict[str, Any] = {"mode": mode, "repeats": len(rs)}
        for key in ("wall_s", "load_s", "gen_s", "tokens", "tok_per_s", "ok"):
            vals = [r[key] for r in rs if r.get(key) is not None and r[key] == r[key]]
            row[key] = statistics.median(vals) if vals else None
        out.append(row)
    return out


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=None, help="chat requests (default: generated /tmp/bl_chat_<n>.jsonl)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", default="raw,peer,embedded,distributed")
    ap.add_argument("--chunk-sizes", default="16,64,256")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-gib", type=float, default=2.0)
    ap.add_argument("--model-root", default=str(ROOT / ".cache" / "models"))
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--pg-db", default="bl_bench_cmp")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    ap.add_argument("--workdir", default="/tmp/bl_compare")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--raw-multiprocessing", action="store_true", help="also run raw vLLM with its engine-core process")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all modes, interleaved; the table shows medians")
    ap.add_argument("--json-out", type=Path, default=Path("/tmp/bl_compare.json"))
    ap.add_argument("--_raw-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.file is None:
        args.file = f"/tmp/bl_chat_{args.n}_{args.max_tokens}.jsonl"
    if args._raw_child:
        raw_child(args)
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if not Path(args.file).exists():
        from bench.make_input import chat_lines, write

        write(Path(args.file), chat_lines(args.n, args.max_tokens, MODEL))
    args.n = sum(1 for line in Path(args.file).read_text().splitlines() if line.strip())
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    chunks = [int(c) for c in args.chunk_sizes.split(",") if c.strip()]
    print(f"{args.n} requests from {args.file}; max_model_len {args.max_model_len}, KV cache {args.kv_gib} GiB, "
          f"max_num_seqs {MAX_NUM_SEQS}, max_num_batched_tokens {MAX_NUM_BATCHED_TOKENS}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    runs: list[dict[str, Any]] = []

    def record(r: dict[str, Any]) -> None:
        r["tok_per_s"] = r["tokens"] / r["gen_s"] if r["gen_s"] else float("nan")
        r["load_avg_1m"] = os.getloadavg()[0]
        runs.append(r)
        print(f"  {r['mode']}: wall {r['wall_s']:.1f} s, load {fmt(r['load_s'])} s, {r['tokens']} tokens in "
              f"{r['gen_s']:.1f} s = {r['tok_per_s']:.1f} tok/s ({r['ok']}/{args.n} ok; load avg {r['load_avg_1m']:.2f})",
              flush=True)
        args.json_out.write_text(json.dumps({"runs": runs}, indent=2))

    for rep in range(args.repeat):  # interleaved, so drifting background load hits every mode alike
        if args.repeat > 1:
            print(f"round {rep + 1}/{args.repeat}", flush=True)
        if "raw" in modes:
            record(run_raw(args))
            if args.raw_multiprocessing:
                record(run_raw(args, multiprocessing=True))
        if "peer" in modes:
            record(run_peer(args))
        for chunk in chunks:
            if "embedded" in modes:
                record(run_embedded(args, chunk))
            if "distributed" in modes:
                record(run_distributed(args, chunk))

    summary = summarize(runs)
    raw = next((r for r in summary if r["mode"] == "raw vLLM"), None)
    peer = next((r for r in summary if r["mode"] == "vllm run_batch"), None)
    print()
    if args.repeat > 1:
        print(f"medians of {args.repeat} interleaved rounds:")
    print("| run | wall s | load s | gen tok/s | tok/s ÷ raw | tok/s ÷ run_batch | wall ÷ run_batch |")
    print("|---|---|---|---|---|---|---|")
    for r in summary:
        vs_raw = r["tok_per_s"] / raw["tok_per_s"] if raw else None
        vs_peer = r["tok_per_s"] / peer["tok_per_s"] if peer else None
        wall_peer = r["wall_s"] / peer["wall_s"] if peer else None
        print(f"| {r['mode']} | {r['wall_s']:.1f} | {fmt(r['load_s'])} | {r['tok_per_s']:.1f} | {fmt(vs_raw, '.3f')} | "
              f"{fmt(vs_peer, '.3f')} | {fmt(wall_peer, '.2f')} |")
    if raw and peer:
        print()
        for r in summary:
            if r["mode"].startswith(("batchllm run", "distributed")):
                ok = r["tok_per_s"] >= 0.95 * raw["tok_per_s"]
                ratio = r["tok_per_s"] / raw["tok_per_s"]
                line = f"{r['mode']}: throughput {ratio:.3f} x raw (target >= 0.95: {'met' if ok else 'NOT met'})"
                if r["mode"].startswith("batchllm run"):
                    okw = r["wall_s"] <= 0.7 * peer["wall_s"]
                    wr = r["wall_s"] / peer["wall_s"]
                    line += f"; wall {wr:.2f} x run_batch (target <= 0.70: {'met' if okw else 'NOT met'})"
                print(line)
    args.json_out.write_text(json.dumps({"runs": runs, "medians": summary, "settings": {
        "n": args.n, "max_tokens": args.max_tokens, "max_model_len": args.max_model_len, "kv_gib": args.kv_gib,
        "max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS}}, indent=2))


if __name__ == "__main__":
    main()

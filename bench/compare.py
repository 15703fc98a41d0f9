"""Inference benchmark: raw vLLM vs `vllm run_batch` vs `batchllm run` vs a distributed batchllm worker.

    .venv/bin/python bench/compare.py                          # everything (~10-15 min on 2 CPU cores)
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
seed 0, max_num_seqs 256 and max_num_batched_tokens 4096 (vLLM's CPU defaults for the ``LLM`` class), and
vLLM's default process layout (engine core in its own process, ``VLLM_ENABLE_V1_MULTIPROCESSING=1``, as
batchllm's ``AsyncLLM`` engine runs it; ``--raw-inprocess`` adds a raw run with the engine core in-process).

Numbers per run:
- wall: the whole process, interpreter start to exit (distributed: submit start to the last result row);
- load: process start until the engine is ready to take requests (distributed: not timed, the worker is warm);
- gen tok/s: generated tokens / generation window. The window is raw: the ``LLM.chat`` call; peer: run_batch's
  "Reading batch" log line to its final "100% Completed" line; batchllm: the first request handed to the engine
  (``results.created_at - latency_ms``) to the last result written to SQL;
- CPU: CPU seconds per wall second during the generation window, summed over every process and thread of the
  run (engine-core children included), sampled once a second from ``/proc/PID/task/*/stat``;
- tail (``batchllm run``): last result written to process exit.
Targets (issue 14): CPU of run and worker >= 0.95 x raw's; gen tok/s >= 0.97 x raw; run wall <= raw wall + 2 s;
run wall <= 0.7 x run_batch wall; tail <= 1 s. ``bench/compare_report.py`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.compare_report import print_table, summarize, targets  # noqa: E402
from bench.procs import CpuSampler, Proc, fresh_pg  # noqa: E402

MODEL = "smollm2-135m-instruct"
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 4096


def model_dir(args: argparse.Namespace) -> Path:
    return Path(args.model_root) / MODEL


def base_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override the explicit KV cache size
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default (1), as batchllm's engine sets it
    env.update({
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "BATCHLLM_MODEL_DIR": str(args.model_root), "BATCHLLM_ENGINE_MAX_MODEL_LEN": str(args.max_model_len),
        "BATCHLLM_CPU_KVCACHE_GB": str(args.kv_gib), "BATCHLLM_ENFORCE_EAGER": "true",
        "BATCHLLM_ENGINE_MAX_NUM_SEQS": str(MAX_NUM_SEQS), "VLLM_LOGGING_LEVEL": "INFO",
    })
    return env


def sampled(p: Proc, extra: list[int] | None = None) -> CpuSampler:
    """A CPU sampler over ``p``'s process tree (and ``extra`` pids), started."""
    return CpuSampler(lambda: [p.proc.pid, *(extra or [])]).start()


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
    """Runs inside the raw subprocess: LLM.chat on every request; prints one JSON line of timings (epoch)."""
    from vllm import LLM, SamplingParams

    lines = [json.loads(x) for x in Path(args.file).read_text().splitlines() if x.strip()]
    llm = LLM(model=str(model_dir(args)), served_model_name=MODEL, dtype="bfloat16", max_model_len=args.max_model_len,
              enforce_eager=True, kv_cache_memory_bytes=int(args.kv_gib * 2**30), seed=0, disable_log_stats=True,
              max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS)
    convs = [ln["body"]["messages"] for ln in lines]
    params = [SamplingParams(max_tokens=ln["body"]["max_tokens"], temperature=ln["body"]["temperature"]) for ln in lines]
    t_loaded = time.time()
    outs = llm.chat(convs, params, use_tqdm=False)
    t_done = time.time()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RAW_RESULT " + json.dumps({"gen_start": t_loaded, "gen_end": t_done, "tokens": tokens, "ok": len(outs)}), flush=True)


def run_raw(args: argparse.Namespace, inprocess: bool = False) -> dict[str, Any]:
    env = base_env(args)
    if inprocess:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    p = Proc([sys.executable, __file__, "--_raw-child", *sys.argv[1:]], env, Path(args.workdir) / "raw.log", ROOT)
    cpu = sampled(p)
    rc, wall, _ = p.wait(args.timeout)
    cpu.stop()
    res = next((json.loads(line.split(" ", 1)[1]) for _, line in p.lines if line.startswith("RAW_RESULT ")), None)
    if rc != 0 or res is None:
        raise SystemExit(f"raw vLLM failed ({rc}):\n{p.tail()}")
    return {"mode": "raw vLLM" + (" (engine core in-process)" if inprocess else ""), "wall_s": wall,
            "load_s": res["gen_start"] - p.t0, "gen_s": res["gen_end"] - res["gen_start"], "tokens": res["tokens"],
            "ok": res["ok"], "cpu": cpu.utilisation(res["gen_start"], res["gen_end"])}


# ------------------------------------------------------------------------------------------ 2. run_batch


def run_peer(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.workdir) / "peer_out.jsonl"
    out.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", args.file, "-o", str(out),
            "--model", str(model_dir(args)), "--served-model-name", MODEL, "--dtype", "bfloat16", "--enforce-eager",
            "--max-model-len", str(args.max_model_len), "--kv-cache-memory-bytes", str(int(args.kv_gib * 2**30)),
            "--seed", "0", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS)]
    p = Proc(argv, base_env(args), Path(args.workdir) / "peer.log", ROOT)
    cpu = sampled(p)
    rc, wall, t_exit = p.wait(args.timeout)
    cpu.stop()
    if rc != 0 or not out.exists():
        raise SystemExit(f"run_batch failed ({rc}):\n{p.tail()}")
    ready = p.first(r"Reading batch from")
    done = p.last(r"100% Completed")
    if ready is None:
        raise SystemExit(f"run_batch log has no 'Reading batch from' line (VLLM_LOGGING_LEVEL=INFO?):\n{p.tail()}")
    ok, tokens = output_tokens(out)
    end = done if done is not None else t_exit
    return {"mode": "vllm run_batch", "wall_s": wall, "load_s": ready - p.t0, "gen_s": end - ready, "tokens": tokens,
            "ok": ok, "cpu": cpu.utilisation(ready, end)}


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
    p = Proc(argv, env, work / f"embedded_{chunk}.log", ROOT)
    cpu = sampled(p)
    rc, wall, t_exit = p.wait(args.timeout)
    cpu.stop()
    if rc != 0:
        raise SystemExit(f"batchllm run failed ({rc}):\n{p.tail()}")
    first, last, tokens, ok = sqlite_window(db)
    ok_file, tokens_file = output_tokens(out)
    assert (ok_file, tokens_file) == (ok, tokens), ((ok_file, tokens_file), (ok, tokens))
    return {"mode": f"batchllm run (chunk {chunk})", "chunk": chunk, "wall_s": wall,
            # load: process start until the engine took its first request (model loaded, file submitted)
            "load_s": first - p.t0, "gen_s": last - first, "tokens": tokens, "ok": ok,
            "cpu": cpu.utilisation(first, last), "tail_s": t_exit - last}


# ------------------------------------------------------------------------------------- 4. distributed


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
                   "--loglevel", "WARNING"], env, work / f"worker_{chunk}.log", ROOT)
    extra: list[int] = []
    cpu: CpuSampler | None = None
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
            cpu = sampled(worker, extra)
            t0 = time.time()
            sub = subprocess.Popen([sys.executable, "-m", "batchllm", "submit", args.file, "--model", MODEL], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            extra.append(sub.pid)
            stdout, stderr = sub.communicate(timeout=args.timeout)
            t_submitted = time.time() - t0
            if sub.returncode != 0:
                raise SystemExit(f"submit failed:\n{stderr}")
            batch_id = stdout.strip().splitlines()[-1]
            while True:
                n = conn.execute("SELECT COUNT(*) FROM results WHERE batch_id = %s", (batch_id,)).fetchone()[0]
                if n >= args.n:
                    break
                if worker.proc.poll() is not None or time.time() - t0 > args.timeout:
                    raise SystemExit(f"distributed run stalled at {n}/{args.n}:\n{worker.tail()}")
                time.sleep(0.05)
            wall = time.time() - t0
            cpu.sample()
            first, last, tokens, ok = conn.execute(
                "SELECT MIN(created_at - latency_ms / 1000.0), MAX(created_at), SUM(completion_tokens), "
                "SUM(CASE WHEN ok THEN 1 ELSE 0 END) FROM results WHERE batch_id = %s", (batch_id,)).fetchone()
    finally:
        if cpu is not None:
            cpu.stop()
        worker.stop()
    return {"mode": f"distributed (chunk {chunk})", "chunk": chunk, "wall_s": wall, "load_s": None,
            "gen_s": float(last) - float(first), "tokens": int(tokens), "ok": int(ok), "submit_s": t_submitted,
            "cpu": cpu.utilisation(float(first), float(last)) if cpu else None}


# ------------------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
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
    ap.add_argument("--raw-inprocess", action="store_true", help="also run raw vLLM with its engine core in-process")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all modes, interleaved; the table shows medians")
    ap.add_argument("--json-out", type=Path, default=Path("/tmp/bl_compare.json"))
    ap.add_argument("--_raw-child", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
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
    settings = {"n": args.n, "max_tokens": args.max_tokens, "max_model_len": args.max_model_len, "kv_gib": args.kv_gib,
                "max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "chunk_sizes": chunks,
                "cores": os.cpu_count(), "load_avg_start": os.getloadavg()}
    print(f"{args.n} requests from {args.file}; max_model_len {args.max_model_len}, KV cache {args.kv_gib} GiB, "
          f"max_num_seqs {MAX_NUM_SEQS}, max_num_batched_tokens {MAX_NUM_BATCHED_TOKENS}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    runs: list[dict[str, Any]] = []

    def record(r: dict[str, Any]) -> None:
        r["tok_per_s"] = r["tokens"] / r["gen_s"] if r["gen_s"] else float("nan")
        r["load_avg_1m"] = os.getloadavg()[0]
        runs.append(r)
        cpu = f"{r['cpu']:.2f} cores" if r.get("cpu") is not None else "-"
        tail = f", tail {r['tail_s']:.2f} s" if r.get("tail_s") is not None else ""
        print(f"  {r['mode']}: wall {r['wall_s']:.1f} s, {r['tokens']} tokens in {r['gen_s']:.1f} s = "
              f"{r['tok_per_s']:.1f} tok/s, CPU {cpu}{tail} ({r['ok']}/{args.n} ok; load avg {r['load_avg_1m']:.2f})",
              flush=True)
        args.json_out.write_text(json.dumps({"runs": runs, "settings": settings}, indent=2))

    for rep in range(args.repeat):  # interleaved, so drifting background load hits every mode alike
        if args.repeat > 1:
            print(f"round {rep + 1}/{args.repeat}", flush=True)
        if "raw" in modes:
            record(run_raw(args))
            if args.raw_inprocess:
                record(run_raw(args, inprocess=True))
        if "peer" in modes:
            record(run_peer(args))
        for chunk in chunks:
            if "embedded" in modes:
                record(run_embedded(args, chunk))
            if "distributed" in modes:
                record(run_distributed(args, chunk))

    summary = summarize(runs)
    checks = targets(summary)
    settings["load_avg_end"] = os.getloadavg()
    print()
    print_table(summary, checks, args.repeat, settings)
    args.json_out.write_text(json.dumps({"runs": runs, "medians": summary, "targets": checks, "settings": settings},
                                        indent=2))


if __name__ == "__main__":
    main()

"""OpenAI Batch fidelity through the distributed path (issue 12): real workers for SmolLM2 and all-MiniLM-L6-v2.

A file that mixes /v1/chat/completions, /v1/completions and /v1/embeddings and the OpenAI fields vLLM serves
runs with zero per-line rejections; every output line validates with the ``openai`` SDK's types; failures go to
the error file only, in OpenAI's error shape; ``status --json`` validates as the SDK's ``Batch`` for completed,
failed, cancelled and expired batches; ``results --embeddings-to`` writes a matrix numpy reads; OpenAI's and vLLM's
documentation example files run unchanged, their model names mapped onto the local models by aliases. The same
fidelity file through ``batchllm run`` is in tests/test_embedded.py.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import WorkerProc, run_cli
from tests.openai_shapes import (
    MINILM,
    MINILM_DIM,
    SMOLLM2,
    check_batch_object,
    check_error_line,
    check_fidelity,
    check_output_line,
    fidelity_lines,
    read_jsonl,
    write_jsonl,
)

pytestmark = [pytest.mark.slow, pytest.mark.services]

UNSERVED_TOML = """
# A model no worker of this module serves: its batches stay in progress until cancelled or expired.
[models.test-unserved]
base = "smollm2-135m-instruct"
"""


@dataclass
class Fidelity:
    rows: list[dict[str, Any]]
    proc: Any
    batch_id: str
    out: list[dict[str, Any]]
    errors: list[dict[str, Any]]


@pytest.fixture(scope="module")
def fidelity(cpu_worker: WorkerProc, embed_worker: WorkerProc, cluster_env: dict[str, str],
             tmp_path_factory: pytest.TempPathFactory) -> Fidelity:
    """The fidelity file submitted once (one worker per model), waited for, its results written."""
    tmp = tmp_path_factory.mktemp("fidelity")
    rows = fidelity_lines()
    src = write_jsonl(tmp / "fidelity.jsonl", rows)
    out = tmp / "out.jsonl"
    proc = run_cli(["submit", str(src), "--wait", "-o", str(out), "--name", "fidelity", "--metadata", "team=nlp",
                    "--metadata", "run=nightly-7"], cluster_env, timeout=600)
    batch_id = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    return Fidelity(rows, proc, batch_id, read_jsonl(out), read_jsonl(tmp / "out.errors.jsonl"))


def test_fidelity_file_runs_with_zero_rejections(fidelity: Fidelity) -> None:
    proc = fidelity.proc
    assert proc.returncode == 3, proc.stderr  # finished; the two lines vLLM refuses failed alone
    said = " ".join(proc.stderr.split())  # rich wraps the summary to the terminal's width
    assert f"{len(fidelity.rows)} requests (0 invalid" in said, said  # no line was refused at submit
    assert f"{SMOLLM2} → {SMOLLM2}@bf16" in said and f"{MINILM} → {MINILM}@bf16" in said, said
    got = check_fidelity(fidelity.rows, fidelity.out, fidelity.errors)
    assert got["schema-1"].model == SMOLLM2 and got["embed-one"].model == MINILM


def test_completed_batch_object(fidelity: Fidelity, cluster_env: dict[str, str]) -> None:
    proc = run_cli(["status", fidelity.batch_id, "--json"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    batch = check_batch_object(view)
    assert batch.status == "completed" and batch.id == fidelity.batch_id
    assert view["metadata"] == {"team": "nlp", "run": "nightly-7"}
    n = len(fidelity.rows)
    assert view["request_counts"] == {"total": n, "completed": n - 2, "failed": 2}
    # usage adds up: the batch's tokens are the sum of its answers' usage
    usage = [o["response"]["body"]["usage"] for o in fidelity.out]
    assert view["usage"]["input_tokens"] == sum(u["prompt_tokens"] for u in usage)
    assert view["usage"]["output_tokens"] == sum(u.get("completion_tokens") or 0 for u in usage)
    assert view["usage"]["output_tokens"] > 0
    # finalizing is entered (and stamped) on the way to completed; the window is the default 24 h
    assert view["created_at"] <= view["in_progress_at"] <= view["finalizing_at"] <= view["completed_at"]
    assert view["expires_at"] - view["created_at"] in (86399, 86400) and view["completion_window"] == "24h"
    for key in ("failed_at", "expired_at", "cancelling_at", "cancelled_at"):
        assert view[key] is None, key
    assert view["output_file_id"] and view["error_file_id"] and view["errors"] is None
    assert view["model"] is None  # two models in one batch: OpenAI's one-model field stays empty
    human = run_cli(["status", fidelity.batch_id], dict(cluster_env, COLUMNS="200"))  # without --json: a table
    assert human.returncode == 0 and fidelity.batch_id in human.stdout and "completed" in human.stdout
    assert "fidelity" in human.stdout and "{" not in human.stdout


def test_embeddings_to_npy(fidelity: Fidelity, cluster_env: dict[str, str], tmp_path: Path) -> None:
    npy = tmp_path / "vectors.npy"
    proc = run_cli(["results", fidelity.batch_id, "-o", str(tmp_path / "out.jsonl"), "--embeddings-to", str(npy)],
                   cluster_env)
    assert proc.returncode == 0, proc.stderr
    matrix = np.load(npy)
    ids = (tmp_path / "vectors.ids.txt").read_text(encoding="utf-8").splitlines()
    assert ids == ["embed-one", "embed-list-base64#0", "embed-list-base64#1", "embed-list-float#0", "embed-list-float#1"]
    assert matrix.shape == (len(ids), MINILM_DIM) and matrix.dtype == np.float32
    # each row is the vector of the output line it names (base64 lines decoded as OpenAI encodes them)
    by_id = {o["custom_id"]: o["response"]["body"]["data"] for o in fidelity.out if o["custom_id"].startswith("embed")}
    for row, name in zip(matrix, ids, strict=True):
        cid, _, index = name.partition("#")
        emb = by_id[cid][int(index or 0)]["embedding"]
        vec = np.frombuffer(base64.b64decode(emb), dtype="<f4") if isinstance(emb, str) else np.array(emb, np.float32)
        assert np.array_equal(row, vec), name
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    cat, kitten, stocks = unit[0], unit[1], unit[2]
    assert cat @ kitten > 0.5 > cat @ stocks  # real embeddings: the two sentences about a cat are close


def _submit(args: list[str], env: dict[str, str]) -> str:
    proc = run_cli(["submit", *args], env)
    assert proc.returncode == 0, proc.stderr
    return str(proc.stdout.strip().splitlines()[0])


def _status(batch_id: str, env: dict[str, str]) -> dict[str, Any]:
    proc = run_cli(["status", batch_id, "--json"], env)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_failed_batch_object(cluster_env: dict[str, str], tmp_path: Path) -> None:
    rows: list[Any] = [
        "{not json",
        {"custom_id": "s1", "method": "POST", "url": "/v1/score", "body": {"model": SMOLLM2}},
        {"custom_id": "nm", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}},
    ]
    src = write_jsonl(tmp_path / "all-bad.jsonl", rows)
    too_many = [x for i in range(17) for x in ("--metadata", f"k{i}=v")]
    proc = run_cli(["submit", str(src), *too_many], cluster_env)
    assert proc.returncode == 2 and "at most 16" in proc.stderr, proc.stderr  # OpenAI's metadata limit
    proc = run_cli(["submit", str(src), "--wait", "--metadata", "why=all-invalid"], cluster_env)
    assert proc.returncode == 4, proc.stderr  # the batch failed
    assert "no valid line" in proc.stderr
    batch_id = proc.stdout.strip().splitlines()[0]
    view = _status(batch_id, cluster_env)
    batch = check_batch_object(view)
    assert batch.status == "failed" and type(view["failed_at"]) is int and view["in_progress_at"] is None
    assert view["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert view["metadata"] == {"why": "all-invalid"}
    assert batch.errors is not None and view["errors"]["object"] == "list"
    data = view["errors"]["data"]
    assert [e["line"] for e in data] == [1, 2, 3]
    assert [e["code"] for e in data] == ["invalid_json", "unsupported_url", "model_not_found"]
    assert data[1]["param"] == "url" and data[2]["param"] == "body.model" and all(e["message"] for e in data)
    assert view["output_file_id"] is None and view["error_file_id"]
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    proc = run_cli(["results", batch_id, "-o", str(out), "--errors", str(err)], cluster_env)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(out) == []
    lines = read_jsonl(err)
    assert [e["custom_id"] for e in lines] == ["line-1", "s1", "nm"]
    for e in lines:
        assert check_error_line(e)[0] == 400


@pytest.fixture
def unserved_env(cluster_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    models = tmp_path / "models.toml"
    models.write_text(UNSERVED_TOML)
    return dict(cluster_env, BATCHLLM_MODELS_FILE=str(models))


def test_unfinished_results_then_cancelled_batch_object(unserved_env: dict[str, str], tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "wait.jsonl", [{"id": f"w{i}", "prompt": "hi", "max_tokens": 2} for i in range(3)])
    batch_id = _submit([str(src), "-m", "test-unserved", "--queue-anyway", "--metadata", "k=v"], unserved_env)
    out = tmp_path / "out.jsonl"
    proc = run_cli(["results", batch_id, "-o", str(out)], unserved_env)
    assert proc.returncode != 0 and "in_progress" in proc.stderr and "--partial" in proc.stderr, proc.stderr
    assert not out.exists()  # nothing written that could pass for the whole result
    proc = run_cli(["results", batch_id, "--partial", "-o", str(out)], unserved_env)
    assert proc.returncode == 0 and "3 still pending" in proc.stderr, proc.stderr
    assert read_jsonl(out) == []
    running = _status(batch_id, unserved_env)
    check_batch_object(running)
    assert running["status"] == "in_progress" and running["output_file_id"] is None and running["completed_at"] is None

    proc = run_cli(["cancel", batch_id, "--json"], unserved_env)
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    batch = check_batch_object(view)
    assert batch.status == "cancelled" and view["metadata"] == {"k": "v"}  # nothing was leased: cancelled at once
    assert view["cancelling_at"] <= view["cancelled_at"] and view["completed_at"] is None
    assert view["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    assert _status(batch_id, unserved_env) == view
    proc = run_cli(["results", batch_id, "-o", str(out)], unserved_env)
    assert proc.returncode == 0, proc.stderr
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["w0", "w1", "w2"]
    for e in errors:  # no HTTP response at all: OpenAI's batch-level error
        assert check_error_line(e) == (None, {"code": "batch_cancelled", "message": e["error"]["message"]})
    assert run_cli(["cancel", batch_id], unserved_env).returncode == 2  # already ended: refused, clearly


def test_expired_batch_object(unserved_env: dict[str, str], tmp_path: Path) -> None:
    from batchllm.store import batches

    src = write_jsonl(tmp_path / "late.jsonl", [{"id": f"e{i}", "prompt": "hi", "max_tokens": 2} for i in range(2)])
    batch_id = _submit([str(src), "-m", "test-unserved", "--queue-anyway", "--completion-window", "1s"], unserved_env)
    time.sleep(1.5)
    # The scheduler's lifecycle step (this module runs no scheduler process).
    assert batch_id in batches.expire_due(unserved_env["BATCHLLM_DATABASE_URL"], None)
    view = _status(batch_id, unserved_env)
    batch = check_batch_object(view)
    assert batch.status == "expired" and view["completion_window"] == "1s"
    assert view["expires_at"] - view["created_at"] in (0, 1, 2) and view["expired_at"] >= view["expires_at"]
    assert view["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    assert view["output_file_id"] is None and view["error_file_id"]
    out = tmp_path / "out.jsonl"
    assert run_cli(["results", batch_id, "-o", str(out)], unserved_env).returncode == 0
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [check_error_line(e)[1]["code"] for e in errors] == ["batch_expired", "batch_expired"]
    assert all(e["response"] is None for e in errors)


# --------------------------------------------------------------------------------- documentation examples

DOCS = Path(__file__).resolve().parent / "data" / "bad"
# OpenAI's and vLLM's example files name models this cluster does not have. A user maps those names onto local
# models with aliases in a models file; answers then name the model that really ran.
DOC_ALIASES = """
[models.smollm2-135m-instruct]
aliases = ["smollm2", "smollm2-135m", "gpt-3.5-turbo-0125", "meta-llama/Meta-Llama-3-8B-Instruct"]

[models.all-minilm-l6-v2]
aliases = ["all-minilm", "minilm", "sentence-transformers/all-MiniLM-L6-v2", "intfloat/e5-mistral-7b-instruct"]
"""


@pytest.mark.parametrize(("name", "url", "model"), [
    ("openai_guide_batchinput.jsonl", "/v1/chat/completions", SMOLLM2),
    ("vllm_openai_example_batch.jsonl", "/v1/chat/completions", SMOLLM2),
    ("vllm_docs_embeddings.jsonl", "/v1/embeddings", MINILM),
])
def test_documentation_examples_run_unchanged(cpu_worker: WorkerProc, embed_worker: WorkerProc, cluster_env: dict[str, str],
                                              tmp_path: Path, name: str, url: str, model: str) -> None:
    models = tmp_path / "models.toml"
    models.write_text(DOC_ALIASES, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    env = dict(cluster_env, BATCHLLM_MODELS_FILE=str(models))
    proc = run_cli(["submit", str(DOCS / name), "--wait", "-o", str(out), "--json"], env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    batch = check_batch_object(json.loads(proc.stdout))  # `submit --wait --json` prints OpenAI's Batch object
    assert (batch.status, batch.endpoint, batch.model) == ("completed", url, model)
    assert batch.request_counts is not None and (batch.request_counts.total, batch.request_counts.completed) == (2, 2)
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == ["request-1", "request-2"]
    for line in lines:
        obj = check_output_line(line, url)
        assert obj.model == model  # answered by the local model the name maps to
    assert read_jsonl(tmp_path / "out.errors.jsonl") == []

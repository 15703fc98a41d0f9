"""The model catalog: which models exist, their variants, and the VRAM floor of each variant.

Bottom layer (scheduler, worker and CLI all read it); imports neither vllm nor torch. A model has
several variants (bf16, 4-bit AWQ/GPTQ, tensor parallel, CPU offload) because the seed comparison's
floors only hold for quantized checkpoints; each variant's ``note`` says which floor it is. Entries
come from the built-ins below, then ``settings.models_file`` (TOML or YAML), then the user's
``data_dir/models.toml`` written by ``register_model``.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from batchllm.catalog_spec import (  # noqa: F401  (re-exported: the catalog's public names)
    CPU_OK_MAX_PARAMS_B,
    USER_MODELS_FILE,
    ModelSpec,
    Variant,
    check_model_name,
    spec_from_dir,
    suggest_floor_gb,
)
from batchllm.errors import InputError, ModelNotFound

if TYPE_CHECKING:
    from batchllm.settings import Settings


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

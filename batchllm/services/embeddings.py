"""``batchllm results BATCH --embeddings-to FILE.npy``: an embeddings batch as one matrix, for a vector store.

Rows follow input order; ``FILE.ids.txt`` beside it names each row by its ``custom_id`` (``custom_id#i`` for
the i-th input of a request that embedded a list). The matrix is float32, written as a standard ``.npy``
file (``numpy.load`` reads it; so do most vector-store loaders) by streaming, with flat memory and no numpy.
"""

from __future__ import annotations

import ast
import base64
import json
import struct
import sys
from array import array
from pathlib import Path
from typing import Any

from batchllm.errors import InputError
from batchllm.settings import Settings
from batchllm.status import Endpoint
from batchllm.store.results import iter_export

_HEADER_LEN = 128  # fixed, so it can be rewritten with the final row count once the rows are out


def export_embeddings(settings: Settings, batch_id: str, path: Path) -> tuple[int, int]:
    """Write the batch's embeddings to ``path`` (.npy) and their ids to ``path`` with ``.ids.txt``.

    Returns:
        (rows, dimensions).

    Raises:
        InputError: the batch has no successful embeddings, or their dimensions differ.
    """
    ids_path = path.with_suffix(".ids.txt")
    tmp, tmp_ids = path.with_name(f".{path.name}.part"), ids_path.with_name(f".{ids_path.name}.part")
    rows, dims = 0, 0
    try:
        with tmp.open("wb") as out, tmp_ids.open("w", encoding="utf-8") as ids:
            out.write(b"\0" * _HEADER_LEN)
            for page in iter_export(settings.database_url, batch_id):
                for t in page:
                    if t[3] != Endpoint.EMBEDDINGS or not t[9] or not t[11]:
                        continue
                    for i, vec in _vectors(t[11]):
                        if dims and len(vec) != dims:
                            raise InputError(f"{t[2]}: embedding has {len(vec)} dimensions, earlier ones {dims}")
                        dims = len(vec)
                        if sys.byteorder != "little":  # .npy says little-endian ("<f4")
                            vec.byteswap()
                        vec.tofile(out)
                        ids.write((t[2] if i is None else f"{t[2]}#{i}") + "\n")
                        rows += 1
            if not rows:
                raise InputError(f"batch {batch_id} has no successful /v1/embeddings results to write")
            out.seek(0)
            out.write(_npy_header(rows, dims))
        tmp.replace(path)
        tmp_ids.replace(ids_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_ids.unlink(missing_ok=True)
    return rows, dims


def _vectors(body: str) -> list[tuple[int | None, array[float]]]:
    """The float32 vectors of an OpenAI embedding list body (``float`` or ``base64`` encoded)."""
    data: list[dict[str, Any]] = json.loads(body).get("data") or []
    out = []
    for item in sorted(data, key=lambda d: d.get("index", 0)):
        emb = item.get("embedding")
        vec = array("f")
        if isinstance(emb, str):  # base64 of little-endian float32, as OpenAI sends it
            vec.frombytes(base64.b64decode(emb))
        else:
            vec.extend(float(x) for x in emb or [])
        out.append((item.get("index", 0) if len(data) > 1 else None, vec))
    return out


def _npy_header(rows: int, dims: int) -> bytes:
    """A .npy v1.0 header for a C-order little-endian float32 matrix, padded to ``_HEADER_LEN`` bytes."""
    desc = {"descr": "<f4", "fortran_order": False, "shape": (rows, dims)}
    text = repr(desc).encode("latin1")
    pad = _HEADER_LEN - 10 - len(text) - 1
    if pad < 0:
        raise InputError("matrix too large for the .npy header")
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_LEN - 10) + text + b" " * pad + b"\n"
    assert len(header) == _HEADER_LEN and ast.literal_eval(text.decode()) == desc
    return header

"""Wire formats, one definition each (msgspec Structs): input lines, output lines, the Batch object.

- Input (``request``): both JSONL forms, checked lightly and fast by ``parse_line`` into ``Parsed`` or
  ``LineError``; ``iter_raw_lines`` (``reader``) streams a file's lines.
- Output (``output``): ``output_line`` for the output and error files, ``error_body`` for 4xx/5xx bodies.
- ``batch``: OpenAI's Batch object for ``status --json``.
"""

from batchllm.formats.batch import (
    Batch,
    BatchErrors,
    BatchFileError,
    BatchRequestCounts,
    BatchUsage,
    encode_batch,
    unix,
    usage,
)
from batchllm.formats.output import (
    BatchError,
    ErrorBody,
    ErrorDetail,
    OutputLine,
    Response,
    error_body,
    output_line,
    request_id_for,
)
from batchllm.formats.reader import iter_raw_lines
from batchllm.formats.request import MAX_ID, MAX_MODEL_NAME, LineError, Parsed, parse_line

__all__ = [
    "MAX_ID",
    "MAX_MODEL_NAME",
    "Batch",
    "BatchError",
    "BatchErrors",
    "BatchFileError",
    "BatchRequestCounts",
    "BatchUsage",
    "ErrorBody",
    "ErrorDetail",
    "LineError",
    "OutputLine",
    "Parsed",
    "Response",
    "encode_batch",
    "error_body",
    "iter_raw_lines",
    "output_line",
    "parse_line",
    "request_id_for",
    "unix",
    "usage",
]

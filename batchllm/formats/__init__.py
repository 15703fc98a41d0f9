"""JSONL in and out: both input forms (OpenAI Batch and short), validation, and OpenAI Batch output lines.

Input is streamed line by line with line numbers; every line becomes either a ``ParsedRequest`` or a
``LineError`` so that nothing is silently dropped. Output lines follow the OpenAI Batch API file format.
"""

from batchllm.formats.models import (
    BODY_UNSUPPORTED,
    CHAT_URL,
    COMPLETIONS_URL,
    MAX_TOKENS_LIMIT,
    ROLES,
    SAMPLING_FIELDS,
    ChatBody,
    CompletionBody,
    InputLine,
    LineError,
    Message,
    OpenAILine,
    ParsedRequest,
    Sampling,
    ShortLine,
    dump_body,
)
from batchllm.formats.output import ErrorBody, OutputLine, ResponseEnvelope, completion_body, output_line, request_id_for
from batchllm.formats.reader import iter_lines, iter_raw_lines
from batchllm.formats.validate import (
    CHAT_BODY_FIELDS,
    COMPLETION_BODY_FIELDS,
    IGNORED_BODY_FIELDS,
    MAX_MODEL_NAME,
    OPENAI_FIELDS,
    SHORT_FIELDS,
    UNSUPPORTED_BODY_FIELDS,
    parse_line,
    parse_line_record,
)

__all__ = [
    "BODY_UNSUPPORTED",
    "CHAT_BODY_FIELDS",
    "CHAT_URL",
    "COMPLETIONS_URL",
    "COMPLETION_BODY_FIELDS",
    "IGNORED_BODY_FIELDS",
    "MAX_MODEL_NAME",
    "MAX_TOKENS_LIMIT",
    "OPENAI_FIELDS",
    "ROLES",
    "SAMPLING_FIELDS",
    "SHORT_FIELDS",
    "UNSUPPORTED_BODY_FIELDS",
    "ChatBody",
    "CompletionBody",
    "ErrorBody",
    "InputLine",
    "LineError",
    "Message",
    "OpenAILine",
    "OutputLine",
    "ParsedRequest",
    "ResponseEnvelope",
    "Sampling",
    "ShortLine",
    "completion_body",
    "dump_body",
    "iter_lines",
    "iter_raw_lines",
    "output_line",
    "parse_line",
    "parse_line_record",
    "request_id_for",
]

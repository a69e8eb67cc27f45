"""Local corpus files: their kind, the cheap checks made before any work, and reading them as documents.

A .jsonl (or .json, one object per line) file holds one document per row, a .parquet file one per row, both
in the `data.text_field` column; any other file is UTF-8 text, cut into documents at blank lines. Reading
streams: a document at a time, never a whole file.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import Iterator, Sequence

from framework.errors import ConfigError

KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}  # anything else is text
SNIFF_BYTES = 1 << 16  # what the checks read of a file: enough to tell text from binary, and the first row
# A text with no blank line for this long is cut at the next line end, so that one document (and the
# memory it takes) stays bounded whatever the file.
MAX_DOCUMENT_CHARS = 1 << 20


def file_kind(path: str) -> str:
    return KINDS.get(os.path.splitext(path)[1].lower(), "text")


# --- checks: a few KB of each file, before anything is tokenized ----------------------------------------------


def check_files(key: str, paths: Sequence[str], text_field: str) -> None:
    """Each file exists, is a readable non-empty file of the kind its name says; one kind per list."""
    if isinstance(paths, str):
        raise ConfigError(key, f"give a list of files: {key}=[{paths}]")
    for path in paths:
        _check_readable(key, path)
    kinds = sorted({file_kind(p) for p in paths})
    if len(kinds) > 1:
        raise ConfigError(key, f"files of mixed kinds ({', '.join(kinds)}): give files of one kind (.txt, .jsonl or .parquet)")
    for path in paths:
        {"text": _check_text, "jsonl": _check_jsonl, "parquet": _check_parquet}[file_kind(path)](key, path, text_field)


def _check_readable(key: str, path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(key, f"'{path}' does not exist")
    if os.path.isdir(path):
        raise ConfigError(key, f"'{path}' is a directory; name its files ({key}=[{path}/a.txt,...])")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise ConfigError(key, f"'{path}' cannot be read ({err.strerror or err})") from None
    if os.path.getsize(path) == 0:
        raise ConfigError(key, f"'{path}' is empty")


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(SNIFF_BYTES)


def _check_utf8(key: str, path: str, head: bytes, whole: bool) -> str:
    if b"\x00" in head:
        raise ConfigError(key, f"'{path}' is binary, not text (it holds NUL bytes); give UTF-8 text files")
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError as err:
        raise ConfigError(key, f"'{path}' is not UTF-8 text (byte {err.start} cannot be decoded); give UTF-8 text files") from None


def _check_text(key: str, path: str, text_field: str) -> None:
    head = _head(path)
    whole = len(head) == os.path.getsize(path)
    text = _check_utf8(key, path, head, whole)
    if whole and not text.strip():
        raise ConfigError(key, f"'{path}' holds no text (only whitespace)")


def _check_jsonl(key: str, path: str, text_field: str) -> None:
    head = _head(path)
    _check_utf8(key, path, head, whole=len(head) == os.path.getsize(path))
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise ConfigError(key, f"'{path}' holds no rows (only whitespace)")
    row = _json_row(key, path, first, 1)
    if text_field not in row:
        raise ConfigError("data.text_field", f"'{text_field}' is not a field of the rows of '{path}' (fields: {', '.join(row) or 'none'})")


def _json_row(key: str, path: str, line: str, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(key, f"'{path}' is not JSON Lines: line {number}: {err.msg}") from None
    if not isinstance(row, dict):
        raise ConfigError(key, f"'{path}' is not JSON Lines of objects: line {number} is a {type(row).__name__}")
    return row


def _check_parquet(key: str, path: str, text_field: str) -> None:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise ConfigError(key, f"'{path}' is not a Parquet file ({str(err).splitlines()[0]})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ConfigError("data.text_field", f"'{text_field}' is not a column of '{path}' (columns: {', '.join(names)})")
    if parquet.metadata.num_rows == 0:
        raise ConfigError(key, f"'{path}' holds no rows")


# --- reading ----------------------------------------------------------------------------------------------------


def file_documents(key: str, path: str, text_field: str) -> Iterator[str]:
    """The documents of one checked file, in order."""
    kind = file_kind(path)
    if kind == "jsonl":
        return _jsonl_documents(key, path, text_field)
    if kind == "parquet":
        return _parquet_documents(path, text_field)
    return _text_documents(path)


def _text_documents(path: str) -> Iterator[str]:
    """Paragraphs: runs of lines between blank lines (a run longer than MAX_DOCUMENT_CHARS is cut at a line end)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines, size = [], 0
        # readline with a limit: a file without line ends is still read a bounded piece at a time.
        for line in iter(lambda: f.readline(MAX_DOCUMENT_CHARS), ""):
            if line.isspace():
                if lines:
                    yield "".join(lines)
                    lines, size = [], 0
                continue
            lines.append(line)
            size += len(line)
            if size >= MAX_DOCUMENT_CHARS:
                yield "".join(lines)
                lines, size = [], 0
        if lines:
            yield "".join(lines)


def _jsonl_documents(key: str, path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = _json_row(key, path, line, number)
            if text_field not in row:
                raise ConfigError("data.text_field", f"line {number} of '{path}' has no '{text_field}' field (fields: {', '.join(row)})")
            text = row[text_field]
            if isinstance(text, str) and text.strip():
                yield text


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[text_field]):
        yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str) and text.strip())

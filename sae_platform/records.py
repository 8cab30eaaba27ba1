"""Records in, pieces out, memory bounded: the JSONL and parquet readers and how a long text is cut.

A record (a JSONL line, a parquet row) may hold at most ``max_record_chars`` characters
(``MAX_RECORD_CHARS`` by default, ``resources.caching.config.max_record_chars``): a JSONL line is
read at most that many characters at a time and a parquet value is measured in Arrow before it
becomes a Python string, so one huge record fails its file instead of taking gigabytes. Long text
is handed on in pieces of about ``PIECE_CHARS`` characters, so the tokenizer never sees more at
once. Every way a record can be unreadable (invalid JSON, an integer of 5,000 digits, nesting too
deep for the JSON reader, a lone surrogate, a corrupt parquet page) is a ``SourceError`` naming the
file and the line or row. ``corpus.iter_pieces`` opens the files and decodes text.
"""

import io
import json
import re
from collections.abc import Iterator

from sae_platform.errors import SourceError

PIECE_CHARS = 1 << 18  # text is decoded and tokenized this many characters at a time
# Characters of one JSONL line or parquet text value (War and Peace is 3.2 M); a longer record
# fails its file instead of taking gigabytes while it is parsed and tokenized.
MAX_RECORD_CHARS = 1 << 22
PARQUET_BATCH_ROWS = 32  # rows decoded at once: at most this many records' text in Arrow's buffers
_SURROGATE = re.compile("[\ud800-\udfff]")  # what a JSON \\uD800 escape without its pair decodes to


def cut_pieces(stream) -> Iterator[tuple[int, str]]:
    """(0, piece) of a text stream, pieces of about ``PIECE_CHARS`` characters cut at a line end
    (else a space; else anywhere past ``2 * PIECE_CHARS``)."""
    carry = ""
    while chunk := stream.read(PIECE_CHARS):
        text = carry + chunk
        cut = text.rfind("\n") + 1 or text.rfind(" ") + 1
        if cut <= 0 or cut < len(text) // 2:
            cut = len(text) if len(text) >= 2 * PIECE_CHARS else cut
        if cut <= 0:
            carry = text
            continue
        yield 0, text[:cut]
        carry = text[cut:]
    if carry:
        yield 0, carry


def record_pieces(text: str) -> Iterator[str]:
    """One record's text in pieces of about ``PIECE_CHARS`` (cut as a text file is): the tokenizer
    never sees more at once."""
    if len(text) <= 2 * PIECE_CHARS:
        yield text
        return
    for _, piece in cut_pieces(io.StringIO(text)):
        yield piece


def _too_long(url: str, what: str, limit: int) -> SourceError:
    return SourceError(f"{url} {what} is longer than max_record_chars ({limit:,} characters), the most one "
                       "record may hold", "split that record into several documents (lines or rows), or raise "
                       "resources.caching.config.max_record_chars if the machine has the memory for it")


def jsonl_pieces(stream, url: str, field_name: str,
                 max_record_chars: int = MAX_RECORD_CHARS) -> Iterator[tuple[int, str]]:
    """(document id, text piece) of each line of a text stream opened with ``newline="\\n"``, text in
    ``field_name``. A line is read at most ``max_record_chars`` characters at a time, so a longer one
    is refused without being read whole. Raises ``SourceError`` naming ``url`` and the line: over
    the limit, not JSON (invalid, numbers Python refuses, nesting too deep), no string field, a
    lone surrogate."""
    doc_id, line_no = 0, 0
    # newline="\n": U+2028 and friends stay in the string; readline(limit): a huge line is never read whole
    while line := stream.readline(max_record_chars + 1):
        line_no += 1
        if len(line) > max_record_chars and not line.endswith("\n"):
            raise _too_long(url, f"line {line_no}", max_record_chars)
        if not line.strip():
            continue
        record = _parse_record(line, url, line_no)
        if not isinstance(record, dict) or not isinstance(record.get(field_name), str):
            raise SourceError(f"{url} line {line_no} has no string field {field_name!r}",
                              "set the text source's text_field to the field that holds the text")
        text = record[field_name]
        if surrogate := _SURROGATE.search(text):
            raise SourceError(f"{url} line {line_no}: its {field_name!r} holds a lone surrogate "
                              f"\\u{ord(surrogate.group()):04x} at character {surrogate.start()}, which is not text",
                              "fix the program that wrote the file (an escape \\uD800-\\uDFFF must be one half "
                              "of a pair), or remove that line")
        for piece in record_pieces(text):
            yield doc_id, piece
        doc_id += 1


def _parse_record(line: str, url: str, line_no: int):
    """One JSONL line parsed; every way the JSON reader can refuse it named with the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise SourceError(f"{url} line {line_no} is not valid JSON: {error.msg}",
                          "fix or remove that line; every line must be one JSON object") from error
    except RecursionError as error:
        raise SourceError(f"{url} line {line_no} nests arrays or objects too deeply for the JSON reader",
                          "write one flat {\"text\": …} object per line (only the text field is read)") from error
    except ValueError as error:  # an integer of more than sys.get_int_max_str_digits() digits
        raise SourceError(f"{url} line {line_no} cannot be read as JSON: {error}",
                          "write such numbers as strings, or leave the field out (only the text field is "
                          "read)") from error


def parquet_pieces(binary, url: str, column: str, max_record_chars: int = MAX_RECORD_CHARS,
                   buffer_bytes: int = 1 << 20) -> Iterator[tuple[int, str]]:
    """(document id, text piece) of each row of an open parquet file's string ``column``, read
    ``PARQUET_BATCH_ROWS`` rows of one row group at a time (column chunks through a ``buffer_bytes``
    buffer, not whole). Raises ``SourceError`` naming ``url``: not parquet, no such string column,
    a corrupt page (with its row group), a value over ``max_record_chars`` (before it becomes a
    Python string)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(binary, buffer_size=buffer_bytes)
        schema = parquet.schema_arrow
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise SourceError(f"{url} is not a readable parquet file: {error}", "re-export the file as parquet") from error
    names = schema.names
    kind = schema.field(column).type if column in names else None
    if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise SourceError(f"{url} has no string column {column!r} (columns: {', '.join(names)})",
                          "set the text source's text_field to the column that holds the text")
    doc_id, row = 0, 0
    for group in range(parquet.num_row_groups):
        try:
            for batch in parquet.iter_batches(columns=[column], batch_size=PARQUET_BATCH_ROWS, row_groups=[group]):
                texts = batch.column(0)
                _check_lengths(texts, url, row, max_record_chars)
                for i in range(len(texts)):  # one Python string at a time
                    text = texts[i].as_py()
                    if text is not None:
                        for piece in record_pieces(text):
                            yield doc_id, piece
                        doc_id += 1
                row += len(texts)
        except SourceError:
            raise
        except Exception as error:  # a corrupt or truncated page: pyarrow raises OSError, ArrowInvalid, …
            raise SourceError(f"{url} is not a readable parquet file: row group {group} (rows from {row}) "
                              f"is corrupt: {error}", "re-export the file as parquet") from error


def _check_lengths(texts, url: str, first_row: int, max_record_chars: int) -> None:
    """Refuse a batch holding a text value over ``max_record_chars`` before it becomes a Python string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = texts.cast(pa.large_string())  # string_view: utf8_length has no kernel for it
    lengths = pc.utf8_length(texts).fill_null(0).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.max() > max_record_chars:
        at = int(lengths.argmax())
        raise _too_long(url, f"row {first_row + at} ({int(lengths[at]):,} characters of text)", max_record_chars)

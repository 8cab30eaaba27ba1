"""Text in: a pluggable source of documents, and their packing into fixed-length contexts.

A source is an fsspec glob (local path, ``file://``, ``s3://…``) over ``.txt`` (one document per
file), ``.jsonl`` (one document per line, text in a named field) or ``.parquet`` (one document per
row, text in a named column). Each matched file is one *batch*: one partition of the cached
activations, keyed by its name, so a new file dropped into an inbox is a new partition.

Documents are packed back to back into contexts of ``ctx_len`` tokens, each starting with the
start token; a start token also separates consecutive documents inside a context, as in
pre-training. Every token keeps its document id, so later stages (context windows) can stop at
document boundaries.
"""

import io
import json
import re
from dataclasses import dataclass

import fsspec
import numpy as np
import polars as pl

from sae_platform.errors import SourceError

FORMATS = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class TextFile:
    url: str
    key: str  # the activation partition this file becomes


@dataclass(frozen=True)
class Document:
    doc_id: int
    source: str
    text: str


@dataclass
class Contexts:
    """Token ids [n_contexts, ctx_len] and the document each token came from."""

    tokens: np.ndarray
    doc_ids: np.ndarray
    dropped_tokens: int  # the tail that did not fill a last context

    @property
    def n_contexts(self) -> int:
        return int(self.tokens.shape[0])


def partition_key(path: str) -> str:
    """A Dagster-safe partition key from a file name: 'hamlet_gut.txt' -> 'hamlet_gut'."""
    stem = path.rstrip("/").rsplit("/", 1)[-1]
    for ext in FORMATS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "batch"


def list_source(pattern: str, storage_options: dict | None = None) -> list[TextFile]:
    """All text files matching ``pattern``, sorted, each with its partition key."""
    fs, path = fsspec.core.url_to_fs(pattern, **(storage_options or {}))
    matches = sorted(p for p in fs.glob(path) if p.endswith(FORMATS) and fs.isfile(p))
    if not matches:
        raise SourceError(f"text source {pattern!r} matches no {'/'.join(FORMATS)} files",
                          "check the path or glob (e.g. 'data/inbox/*.txt' or 's3://bucket/inbox/*.jsonl'); "
                          "for the demo corpus run `make setup`")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    files = [TextFile(m if protocol in ("file", "local") else f"{protocol}://{m}", partition_key(m)) for m in matches]
    seen: dict[str, str] = {}
    for f in files:
        if f.key in seen:
            raise SourceError(f"two files map to the same partition key {f.key!r}: {seen[f.key]} and {f.url}",
                              "rename one of them: partition keys come from file names")
        seen[f.key] = f.url
    return files


def source_stamp(text_file: TextFile, storage_options: dict | None = None) -> str:
    """Size and modification time (the ETag on S3) of a text file: it changes when the file is
    replaced under the same name, which is how a re-uploaded batch gets cached again."""
    fs, path = fsspec.core.url_to_fs(text_file.url, **(storage_options or {}))
    info = fs.info(path)
    changed = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"{info.get('size')}:{changed}"


def find_file(pattern: str, key: str, storage_options: dict | None = None) -> TextFile:
    for f in list_source(pattern, storage_options):
        if f.key == key:
            return f
    raise SourceError(f"no file in text source {pattern!r} has partition key {key!r}",
                      "the file may have been removed from the inbox; restore it, or delete the stale partition")


def _decode(data: bytes, url: str, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise SourceError(f"{url} is not valid {encoding}: byte {error.start} is 0x{data[error.start]:02x}",
                          f"convert the file to UTF-8 (iconv -f latin1 -t utf-8), or set the text source's "
                          f"encoding (e.g. encoding: latin-1) if the whole source uses another one") from error


def read_documents(text_file: TextFile, text_field: str = "text", encoding: str = "utf-8",
                   storage_options: dict | None = None) -> list[Document]:
    url = text_file.url
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        data = f.read()
    if url.endswith(".txt"):
        texts = [_decode(data, url, encoding)]
    elif url.endswith(".jsonl"):
        texts = _jsonl_texts(_decode(data, url, encoding), url, text_field)
    else:
        texts = _parquet_texts(data, url, text_field)
    docs = [Document(i, url, t) for i, t in enumerate(texts) if t.strip()]
    if not docs:
        raise SourceError(f"{url} holds no text (empty file or only whitespace)",
                          "remove the file from the text source, or fill it")
    return docs


def _jsonl_texts(content: str, url: str, field: str) -> list[str]:
    texts = []
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SourceError(f"{url} line {line_no} is not valid JSON: {error.msg}",
                              "fix or remove that line; every line must be one JSON object") from error
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise SourceError(f"{url} line {line_no} has no string field {field!r}",
                              f"set the text source's text_field to the field that holds the text")
        texts.append(record[field])
    return texts


def _parquet_texts(data: bytes, url: str, column: str) -> list[str]:
    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except Exception as error:  # polars raises several types for corrupt files
        raise SourceError(f"{url} is not a readable parquet file: {error}", "re-export the file as parquet") from error
    if column not in frame.columns or frame.schema[column] != pl.String:
        raise SourceError(f"{url} has no string column {column!r} (columns: {', '.join(frame.columns)})",
                          "set the text source's text_field to the column that holds the text")
    return [t for t in frame[column].to_list() if t is not None]


def tokenize(tokenizer, docs: list[Document]) -> list[list[int]]:
    # model_max_length is the model's window, not a limit on how long a document may be.
    return [tokenizer(d.text, add_special_tokens=False, verbose=False)["input_ids"] for d in docs]


def pack_contexts(token_lists: list[list[int]], doc_ids: list[int], ctx_len: int, start_token_id: int,
                  max_contexts: int | None = None) -> Contexts:
    """Pack documents into [start, t1, …] contexts; a start token separates documents."""
    if ctx_len < 2:
        raise SourceError(f"ctx_len {ctx_len} is too short", "use ctx_len >= 2 (default 128)")
    stream, stream_docs = [], []
    for tokens, doc_id in zip(token_lists, doc_ids, strict=True):
        if stream:  # separator between documents; belongs to the next document
            stream.append(start_token_id)
            stream_docs.append(doc_id)
        stream.extend(tokens)
        stream_docs.extend([doc_id] * len(tokens))
    body = ctx_len - 1
    n_contexts = len(stream) // body
    if max_contexts is not None:
        n_contexts = min(n_contexts, max_contexts)
    if n_contexts == 0:
        raise SourceError(f"the batch has {len(stream)} tokens, fewer than one context of {ctx_len}",
                          "add more text to the file, or lower ctx_len")
    used = n_contexts * body
    tokens = np.asarray(stream[:used], dtype=np.int32).reshape(n_contexts, body)
    docs = np.asarray(stream_docs[:used], dtype=np.int32).reshape(n_contexts, body)
    tokens = np.concatenate([np.full((n_contexts, 1), start_token_id, np.int32), tokens], axis=1)
    docs = np.concatenate([docs[:, :1], docs], axis=1)  # the start token belongs to the first doc
    return Contexts(tokens, docs, dropped_tokens=len(stream) - used)

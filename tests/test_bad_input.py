"""Issue 31 item 2: one bad input never stops the others, and memory stays bounded whatever the input.

Each hostile file is that file's ``SourceError`` (recorded as its ``FAILED.json``) while a good file
beside it is cached; reading a 200 MB record, a 200 MB parquet row or 200 MB of leading whitespace
costs a bounded amount of memory (peak RSS of a fresh process)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance

from jobs.definitions import build_definitions
from jobs.settings import Settings
from sae_platform.activations import CacheSettings, cache_text_file
from sae_platform.catalog import list_partitions
from sae_platform.corpus import MAX_RECORD_CHARS, list_source
from sae_platform.errors import SourceError
from sae_platform.inbox import failed_attempts
from conftest import TRAINING_TEXT

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def _jsonl(path: Path, *records: str) -> None:
    """A blank line, the records as given (raw JSON text), then a good record."""
    path.write_text("\n" + "\n".join(records) + "\n" + json.dumps({"text": TRAINING_TEXT}) + "\n", encoding="utf-8")


def _corrupt_parquet(path: Path) -> None:
    """A parquet file whose footer is intact but whose data page is not: the middle half of its
    snappy-compressed bytes overwritten."""
    pq.write_table(pa.table({"text": [f"{i} {TRAINING_TEXT}" for i in range(200)]}), path, compression="snappy",
                   use_dictionary=False)
    raw = bytearray(path.read_bytes())
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start, length = chunk.data_page_offset + chunk.total_compressed_size // 4, chunk.total_compressed_size // 2
    raw[start:start + length] = b"\xff" * length
    path.write_bytes(bytes(raw))


# name → (writer, what the error says)
HOSTILE = {
    "surrogate.jsonl": (lambda p: _jsonl(p, '{"text": "caf\\ud800 au lait"}'), "line 2: its 'text' holds a lone surrogate"),
    "bignum.jsonl": (lambda p: _jsonl(p, '{"text": "x", "n": ' + "9" * 5000 + "}"), "line 2 cannot be read as JSON"),
    "deep.jsonl": (lambda p: _jsonl(p, '{"text": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                   "line 2 nests arrays or objects too deeply"),
    "corrupt.parquet": (_corrupt_parquet, "is not a readable parquet file: row group 0 (rows from 0) is corrupt"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_file_fails_alone_with_its_own_error(name, tmp_path, store, tiny_hooked):
    """Each of these raised TypeError/ValueError/RecursionError/OSError on main: not the inbox's error,
    so no FAILED.json and, in full_pipeline, a failed step instead of one left-out batch."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write, says = HOSTILE[name]
    write(inbox / name)
    (inbox / "good.txt").write_text(TRAINING_TEXT * 4, encoding="utf-8")
    files = {f.key: f for f in list_source(str(inbox / "*"))}
    settings = CacheSettings(ctx_len=16, batch_size=4, max_contexts=8)
    bad_key = name.split(".")[0]
    with pytest.raises(SourceError) as raised:
        cache_text_file(store, files[bad_key], tiny_hooked, "tiny", settings)
    message = str(raised.value)
    assert str(inbox / name) in message and says in message and "How to fix" in message, message
    assert failed_attempts(store)[bad_key]["reason"] == message
    assert cache_text_file(store, files["good"], tiny_hooked, "tiny", settings)["n_rows"] > 0
    assert list_partitions(store) == ["good"]


def test_a_record_over_max_record_chars_fails_its_file_and_one_at_the_limit_is_read(tmp_path):
    """The limit counts characters: of the JSONL line as written, of the parquet text value."""
    from sae_platform.corpus import read_documents

    texts = ["short", "é" * 1000]
    line = json.dumps({"text": texts[1]}, ensure_ascii=False)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet")
    jsonl, parquet = list_source(str(tmp_path / "*"))
    for text_file, limit in ((jsonl, len(line)), (parquet, 1000)):
        assert [d.text for d in read_documents(text_file, max_record_chars=limit)] == texts
        with pytest.raises(SourceError, match=f"(?s){text_file.url} (line|row) . .*longer than max_record_chars "
                                              f"[(]{limit - 1:,} characters[)].*How to fix"):
            read_documents(text_file, max_record_chars=limit - 1)
    assert CacheSettings().max_record_chars == MAX_RECORD_CHARS

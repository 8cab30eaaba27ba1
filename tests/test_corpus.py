"""Text sources (txt/jsonl/parquet), their errors, and packing into contexts."""

import json

import numpy as np
import polars as pl
import pytest

from sae_platform.corpus import find_file, list_source, pack_contexts, partition_key, read_documents
from sae_platform.errors import SourceError


def test_partition_keys_are_dagster_safe():
    assert partition_key("/x/hamlet_gut.txt") == "hamlet_gut"
    assert partition_key("s3://b/in/part 1,2[x].jsonl") == "part_1_2_x"


def test_list_source_sorted_with_keys(text_dir):
    files = list_source(str(text_dir / "*"))
    assert [f.key for f in files] == ["alpha", "beta", "gamma"]
    assert find_file(str(text_dir / "*"), "beta").url.endswith("beta.txt")
    with pytest.raises(SourceError, match="no file .* has partition key 'delta'"):
        find_file(str(text_dir / "*"), "delta")


def test_source_matching_nothing_names_pattern_and_fix(tmp_path):
    with pytest.raises(SourceError) as error:
        list_source(str(tmp_path / "nothing" / "*.txt"))
    assert "matches no" in str(error.value) and "How to fix" in str(error.value)


def test_two_files_with_one_key_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "doc.txt").write_text("x")
    (tmp_path / "b" / "doc.jsonl").write_text('{"text": "y"}')
    with pytest.raises(SourceError, match="same partition key 'doc'"):
        list_source(str(tmp_path / "*" / "doc*"))


def test_reads_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["one", "  ", "two"]) + "\n")
    pl.DataFrame({"body": ["p", None, "q"]}).write_parquet(tmp_path / "c.parquet")
    files = {f.key: f for f in list_source(str(tmp_path / "*"))}
    assert [d.text for d in read_documents(files["a"])] == ["héllo wörld"]
    assert [(d.doc_id, d.text) for d in read_documents(files["b"], text_field="body")] == [(0, "one"), (2, "two")]
    assert [d.text for d in read_documents(files["c"], text_field="body")] == ["p", "q"]


def test_empty_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(SourceError, match="holds no text"):
        read_documents(list_source(str(tmp_path / "*"))[0])


def test_non_utf8_names_the_byte_and_the_fix(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    text_file = list_source(str(tmp_path / "*"))[0]
    with pytest.raises(SourceError) as error:
        read_documents(text_file)
    assert "byte 3 is 0xe9" in str(error.value) and "iconv" in str(error.value)
    assert read_documents(text_file, encoding="latin-1")[0].text == "café"


def test_jsonl_errors_name_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(SourceError, match="line 2 has no string field 'text'"):
        read_documents(list_source(str(tmp_path / "*"))[0])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(SourceError, match="line 2 is not valid JSON"):
        read_documents(list_source(str(tmp_path / "*"))[0])


def test_parquet_without_the_column(tmp_path):
    pl.DataFrame({"content": ["a"]}).write_parquet(tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="no string column 'text' \\(columns: content\\)"):
        read_documents(list_source(str(tmp_path / "*"))[0])


def test_pack_contexts_layout():
    docs = [list(range(10, 20)), list(range(30, 33)), list(range(50, 60))]
    contexts = pack_contexts(docs, [0, 1, 2], ctx_len=5, start_token_id=0)
    stream = list(range(10, 20)) + [0] + [30, 31, 32] + [0] + list(range(50, 60))  # 25 tokens
    assert contexts.n_contexts == 6 and contexts.dropped_tokens == 1
    assert (contexts.tokens[:, 0] == 0).all()
    np.testing.assert_array_equal(contexts.tokens[:, 1:].ravel(), stream[:24])
    # separators belong to the next document; start tokens to the first token's document
    assert contexts.doc_ids[2].tolist() == [0, 0, 0, 1, 1]
    assert contexts.doc_ids[3].tolist() == [1, 1, 1, 2, 2]
    assert pack_contexts(docs, [0, 1, 2], 5, 0, max_contexts=2).n_contexts == 2


def test_pack_contexts_too_little_text():
    with pytest.raises(SourceError, match="fewer than one context of 128"):
        pack_contexts([[1, 2, 3]], [0], ctx_len=128, start_token_id=0)

"""Text sources (txt/jsonl/parquet), their errors, and packing into contexts."""

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sae_platform.corpus import (
    assign_keys,
    check_key,
    find_file,
    list_source,
    pack_contexts,
    partition_key,
    read_documents,
    scan_source,
)
from sae_platform.errors import SourceError


def test_partition_keys_are_dagster_safe():
    assert partition_key("/x/hamlet_gut.txt") == "hamlet_gut"
    assert partition_key("/x/数据集一.txt") == "数据集一"  # Unicode letters are kept
    assert partition_key("/x/report.v2.md") == "report.v2"
    replaced = partition_key("s3://b/in/part 1,2[x].jsonl")
    assert replaced.startswith("part_1_2_x~") and len(replaced) == len("part_1_2_x~") + 10
    assert partition_key("s3://b/in/part 1,2[x].jsonl") == replaced  # stable


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


def test_files_in_two_folders_with_one_name_get_two_keys(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "doc.txt").write_text("x")
        (tmp_path / folder / "my doc.txt").write_text("x")
    (tmp_path / "b" / "doc.jsonl").write_text('{"text": "y"}')
    keys = [f.key for f in list_source(str(tmp_path / "*" / "*doc*"))]
    assert len(set(keys)) == len(keys) == 5 and "doc" in keys


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


# -- issue 12: an inbox that cannot be fooled -------------------------------------------------------

SAFE = "abcdefghijklmnopqrstuvwxyz0123456789_-.~"


def _assert_safe(key: str):
    from dagster import DynamicPartitionsDefinition

    assert key not in (".", "..") and not key.startswith((".", "-")) and "/" not in key and "\\" not in key
    assert "..." not in key and not set(key) & {"|", ",", "[", "]", "\0", "\n"}  # Dagster's forbidden substrings
    assert len(key.encode()) <= 96
    assert all(c.isalnum() or c in "_-.~" for c in key)
    DynamicPartitionsDefinition(name="x")  # keys of this shape are accepted by add_dynamic_partitions (tested below)


@pytest.mark.parametrize("name", ["...txt", "..txt", ".txt.txt", "-.txt", "a..b.txt", "x\u202eevil.txt",
                                  "tab\there.txt", "new\nline.txt", "pipe|comma,[x].txt", "back\\slash.txt",
                                  "e\u0301.txt", "\u200b.txt", "数据集一.txt", "a b.txt", "ü" * 120 + ".txt",
                                  "x" * 250 + ".txt", "txt", ".jsonl", "CON.txt", "~x.txt"])
def test_every_key_is_one_safe_segment(name):
    _assert_safe(partition_key(name))


def test_keys_are_injective_across_names_that_used_to_collide():
    names = ["数据集一.txt", "数据集二.txt", "a b.txt", "a_b.txt", "a,b.txt", "x.txt", "x.jsonl", "X.TXT",
             "x.txt.gz", "x.md", "...txt", "..txt", "-.txt", "é.txt", "e\u0301.txt",
             "y" * 250 + ".txt", "y" * 249 + "z.txt", "y" * 249 + "w.txt"]
    keys = assign_keys(names)
    assert len(set(keys.values())) == len(names), keys
    assert keys["数据集一.txt"] == "数据集一" and keys["数据集二.txt"] == "数据集二"
    assert keys["x.txt"] == "x" and keys["a_b.txt"] == "a_b"  # the plain name keeps its plain key
    assert keys["x.jsonl"].startswith("x~") and keys["X.TXT"].startswith("X~")
    for key in keys.values():
        _assert_safe(key)
    assert assign_keys(list(reversed(names))) == keys  # independent of listing order


def test_long_names_are_truncated_in_bytes_with_a_hash():
    name = "数" * 80 + ".txt"  # 240 bytes, legal on ext4
    key = partition_key(name)
    assert len(key.encode()) <= 96 and key.startswith("数" * 28) and "~" in key


def test_key_guard_refuses_unsafe_keys():
    for bad in ("", ".", "..", ".hidden", "a/b", "../x", "a\\b"):
        with pytest.raises(SourceError, match="not a safe path segment"):
            check_key(bad)


def test_real_inbox_with_hostile_and_odd_files(tmp_path):
    """Every file the inbox holds is either read (with a safe, distinct key) or skipped with a reason."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("AWS_SECRET_ACCESS_KEY=hunter2")
    (inbox / "passwd.txt").symlink_to("/etc/passwd")
    (inbox / "environ.txt").symlink_to("/proc/self/environ")
    (inbox / "secret.txt").symlink_to(outside)
    (inbox / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    (inbox / "good.txt").write_text("good text")
    (inbox / "alias.txt").symlink_to(inbox / "good.txt")  # a link that stays inside: read
    (inbox / "sub").mkdir()
    (inbox / "sub.txt").symlink_to(inbox / "sub")
    os.mkfifo(inbox / "pipe.txt")
    (inbox / "._good.txt").write_bytes(b"\x00\x05\x16\x07")
    (inbox / ".upload.txt.part").write_text("half")
    (inbox / "zz_empty.txt").write_bytes(b"")
    for name in ("notes.csv", "data.json", "archive.zip", "README", "x.txt.zst"):
        (inbox / name).write_text("a,b")
    for name in ("...txt", "..txt", "UPPER.TXT", "doc.md", "x.txt", "x.jsonl", "x.txt.gz", "a b.txt", "a_b.txt"):
        (inbox / name).write_text('{"text": "t"}' if ".jsonl" in name else "text")
    listing = scan_source(str(inbox / "*"))
    read = {Path(f.url).name: f.key for f in listing.files}
    skipped = {Path(s.url).name: s.reason for s in listing.skipped}
    assert sorted(read) == sorted(["good.txt", "alias.txt", "UPPER.TXT", "doc.md", "x.txt", "x.jsonl", "x.txt.gz",
                                   "a b.txt", "a_b.txt"])
    assert "hidden" in skipped["...txt"] and "hidden" in skipped["..txt"]  # dotfiles: never a key '..' or '.'
    assert read["x.txt"] == "x" and read["a_b.txt"] == "a_b" and read["UPPER.TXT"] == "UPPER"
    assert len(set(read.values())) == len(read)
    for key in read.values():
        _assert_safe(key)
    assert sorted(read) + sorted(skipped) == sorted(read) + sorted(set(os.listdir(inbox)) - set(read))
    for name in ("passwd.txt", "environ.txt", "secret.txt"):
        assert "outside the inbox" in skipped[name]
    assert "broken link" in skipped["dangling.txt"]
    assert "named pipe" in skipped["pipe.txt"] and "folder" in skipped["sub"] and "folder" in skipped["sub.txt"]
    assert "hidden" in skipped["._good.txt"] and "hidden" in skipped[".upload.txt.part"]
    assert "empty (0 bytes)" in skipped["zz_empty.txt"]
    assert ".jsonl" in skipped["notes.csv"] and ".jsonl" in skipped["data.json"] and "unpack" in skipped["archive.zip"]
    assert "(no extension)" in skipped["README"] and "zstd" in skipped["x.txt.zst"]
    with pytest.raises(SourceError, match="matches no readable"):
        list_source(str(tmp_path / "nothing" / "*"))


def test_a_link_swapped_in_after_the_scan_is_refused_at_read(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_text("fine")
    (text_file,) = list_source(str(inbox / "*"))
    (inbox / "a.txt").unlink()
    (inbox / "a.txt").symlink_to("/etc/passwd")
    with pytest.raises(SourceError, match="outside the text source"):
        read_documents(text_file)


def test_jsonl_splits_records_on_newline_only(tmp_path):
    records = [{"text": "one\u2028two\u2029three\x85four\x0bfive\x0cdone"}, {"text": "second\rrecord"}]
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n",
                                      encoding="utf-8")
    docs = read_documents(list_source(str(tmp_path / "*"))[0])
    assert [d.text for d in docs] == [r["text"] for r in records]


@pytest.mark.parametrize("codec,bom", [("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"),
                                       ("utf-16-be", b"\xfe\xff"), ("utf-32-le", b"\xff\xfe\x00\x00"),
                                       ("utf-32-be", b"\x00\x00\xfe\xff")])
def test_byte_order_marks_are_decoded_and_dropped(tmp_path, codec, bom):
    (tmp_path / "t.txt").write_bytes(bom + "héllo wörld\n".encode(codec))
    (tmp_path / "j.jsonl").write_bytes(bom + ('{"text": "ünï"}\n{"text": "b\u2028c"}\n').encode(codec))
    files = {f.key: f for f in list_source(str(tmp_path / "*"))}
    assert [d.text for d in read_documents(files["t"])] == ["héllo wörld\n"]
    assert [d.text for d in read_documents(files["j"])] == ["ünï", "b\u2028c"]


def test_utf16_without_bom_and_latin1_get_the_right_advice(tmp_path):
    (tmp_path / "w.txt").write_bytes("plain words here".encode("utf-16-le"))
    with pytest.raises(SourceError) as error:
        read_documents(list_source(str(tmp_path / "*"))[0])
    assert "UTF-16" in str(error.value) and "iconv -f UTF-16LE" in str(error.value) and "latin1" not in str(error.value)
    (tmp_path / "w.txt").unlink()
    (tmp_path / "l.txt").write_bytes(b"x" * 3_000_000 + "caf\xe9".encode("latin-1"))
    with pytest.raises(SourceError, match="(?s)byte 3000003 is 0xe9.*cp1252"):
        read_documents(list_source(str(tmp_path / "*"))[0])


def test_compressed_files_are_read(tmp_path):
    import bz2
    import gzip
    import lzma

    text = "compressed words " * 50
    (tmp_path / "g.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "b.jsonl.bz2").write_bytes(bz2.compress(json.dumps({"text": text}).encode() + b"\n"))
    (tmp_path / "x.TXT.XZ").write_bytes(lzma.compress(b"\xef\xbb\xbf" + text.encode()))
    (tmp_path / "bad.txt.gz").write_bytes(gzip.compress(text.encode())[:20])
    files = {Path(f.url).name: f for f in list_source(str(tmp_path / "*"))}
    for name in ("g.txt.gz", "b.jsonl.bz2", "x.TXT.XZ"):
        assert [d.text for d in read_documents(files[name])] == [text], name
    with pytest.raises(SourceError, match="(?s)cannot be read.*truncated"):
        read_documents(files["bad.txt.gz"])


def test_streaming_matches_whole_file_packing_and_stops_early(tmp_path, tiny_hooked):
    from sae_platform.corpus import stream_contexts, tokenize

    text = ("To be, or not to be, that is the question.\n" * 20000)  # ~860 KB: several pieces
    (tmp_path / "big.txt").write_text(text)
    (text_file,) = list_source(str(tmp_path / "*"))
    tokenizer, start = tiny_hooked.tokenizer, tiny_hooked.start_token_id
    docs, contexts = stream_contexts(text_file, tokenizer, 32, start, max_contexts=5)
    assert contexts.n_contexts == 5 and [d.doc_id for d in docs] == [0]
    whole = pack_contexts(tokenize(tokenizer, read_documents(text_file)), [0], 32, start)
    np.testing.assert_array_equal(contexts.tokens, whole.tokens[:5])
    _, streamed = stream_contexts(text_file, tokenizer, 32, start)
    assert abs(streamed.n_contexts - whole.n_contexts) <= 2  # pieces are cut at line ends


def test_memory_stays_flat_in_file_size(tmp_path, tiny_hooked):
    """Issue 12 case 10: with max_contexts, a 40 MB file costs what a 1 MB one costs (Python and numpy
    allocations traced; benchmarks/cache_memory.py measures the whole process's peak RSS)."""
    import tracemalloc

    from sae_platform.corpus import stream_contexts

    line = TRAINING_LINE.encode()
    peaks = {}
    for megabytes in (1, 40):
        path = tmp_path / f"t{megabytes}.txt"
        path.write_bytes((line * (1_000_000 // len(line) + 1))[:1_000_000] * megabytes)
        (text_file,) = list_source(str(path))
        tracemalloc.start()
        _, contexts = stream_contexts(text_file, tiny_hooked.tokenizer, 32, tiny_hooked.start_token_id, 64)
        peaks[megabytes] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert contexts.n_contexts == 64
    assert peaks[40] < 1.2 * peaks[1] and peaks[40] < 8_000_000, peaks


TRAINING_LINE = "It is a truth universally acknowledged, that a single man in possession of a good fortune.\n"


def test_a_file_too_short_for_one_context_is_named(tmp_path, tiny_hooked):
    """Of many inbox files, the error says which one is too short (it said only "the batch")."""
    from sae_platform.corpus import stream_contexts

    (tmp_path / "tiny note.txt").write_text("Three words only.")
    (text_file,) = list_source(str(tmp_path / "*"))
    with pytest.raises(SourceError, match=r"tiny note\.txt has \d+ tokens, fewer than one context of 128"):
        stream_contexts(text_file, tiny_hooked.tokenizer, 128, tiny_hooked.start_token_id)

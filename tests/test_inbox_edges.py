"""The inbox's edges (issue 31 item 8): reads that cannot be steered outside the inbox by a racing
link, renames that are not cached twice, unreadable files, corrupt failure records, bounded sensor
ticks, advice that names what non-text bytes look like, and file names printed safely."""

import codecs
import os
import threading
from pathlib import Path

import pytest

from sae_platform.corpus import list_source, read_documents
from sae_platform.errors import SourceError


def test_a_folder_flipped_to_a_link_while_opening_never_reads_outside(tmp_path):
    """A thread swaps a folder on the file's path for a link to a folder outside the inbox, and back,
    while the reader opens the file over and over: no read may return the outside file."""
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "sub").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    (inbox / "sub" / "a.txt").write_text("inside text")
    (outside / "sub" / "a.txt").write_text("SECRET outside")
    (text_file,) = list_source(str(inbox / "**" / "*.txt"))
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            os.rename(inbox / "sub", inbox / "sub.real")
            os.symlink(outside / "sub", inbox / "sub")
            os.unlink(inbox / "sub")
            os.rename(inbox / "sub.real", inbox / "sub")

    flipper = threading.Thread(target=flip)
    flipper.start()
    texts = []
    try:
        for _ in range(3000):
            try:
                texts.append(read_documents(text_file)[0].text)
            except SourceError:
                texts.append(None)  # refused or vanished meanwhile: never a read outside
    finally:
        stop.set()
        flipper.join()
    assert texts.count("SECRET outside") == 0
    assert texts.count("inside text") > 0


def _sensor_tick(instance, pattern: str, store):
    from dagster import build_sensor_context

    from assets import inbox_sensor
    from resources import AutomationResource, StorageResource, TextSourceResource

    resources = {"text_source": TextSourceResource(pattern=pattern),
                 "storage": StorageResource(root_url=store.root_url), "automation": AutomationResource()}
    return inbox_sensor(build_sensor_context(instance=instance, resources=resources))


def _keys(result) -> list[str]:
    requests = getattr(result, "run_requests", [])
    return [k for r in requests for k in r.run_config["ops"]["activation_batches"]["config"]["keys"]]


@pytest.mark.parametrize("content", [b'{"key": "bad", "stamp": "12:3', b"", b"\xff\xfe", b"[1, 2]",
                                     b'{"stamp": "1:2"}'])
def test_a_corrupt_failure_record_is_ignored_with_a_warning_and_the_file_retried(tmp_path, store, content, caplog):
    from dagster import DagsterInstance

    from sae_platform.catalog import failed_attempt_path
    from sae_platform.inbox import failed_attempts, record_failed_attempt

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "bad.txt").write_text("some text " * 20)
    (inbox / "good.txt").write_text("other text " * 20)
    record_failed_attempt(store, "good", "1:2", "an old failure")
    Path(failed_attempt_path(store, "bad")).parent.mkdir(parents=True, exist_ok=True)
    Path(failed_attempt_path(store, "bad")).write_bytes(content)  # a truncated or hand-edited record
    assert set(failed_attempts(store)) == {"good"}
    assert "ignoring the unreadable failure record" in caplog.text and "bad/FAILED.json" in caplog.text
    assert _keys(_sensor_tick(DagsterInstance.ephemeral(), str(inbox / "*"), store)) == ["bad", "good"]


def test_status_escapes_control_characters_in_file_names(tmp_path):
    import subprocess
    import sys

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "red\x1b[31m.txt").write_text("Some text to cache. " * 20)
    (inbox / "fake\n  skipped x.txt").write_bytes(b"")
    (inbox / "bidi\u202etxt.exe.txt").write_text("Other text. " * 20)
    env = {**os.environ, "SAE_PLATFORM_ROOT": str(tmp_path / "artifacts"), "SAE_PLATFORM_INBOX": str(inbox / "*")}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "status"], cwd=Path(__file__).resolve().parents[1],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "\x1b" not in out and "\u202e" not in out and "\n  skipped x.txt" not in out
    assert "to cache red\\x1b[31m.txt as partition" in out and "bidi\\u202etxt.exe.txt" in out
    assert "skipped fake\\n  skipped x.txt: empty (0 bytes)" in out


def test_printable_escapes_controls_and_keeps_text():
    from sae_platform.errors import printable

    assert printable("数据 é\x1b[0m\r\t\x7f\x85\udce9") == "数据 é\\x1b[0m\\r\\t\\x7f\\x85\\udce9"
    assert printable(printable("a\x1bb")) == "a\\x1bb"


def _png() -> bytes:
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + zlib.compress(b"\x00" * 64))


@pytest.mark.parametrize("name,content,looks_like,fix", [
    ("report.txt", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << >>\n", "a PDF document", "pdftotext"),
    ("book.txt", b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xdf\xa4\xd2lZ\x01", "a ZIP archive", "unpack"),
    ("log.txt", None, "gzip-compressed data", "NAME.txt.gz"),
    ("image.txt", _png(), "a PNG image", "only text is read"),
    ("blob.txt", bytes(range(256)) * 4, "binary data", "not text"),
    ("odd.txt", b"plain words \x81\x8d\x8f\x90 more", "neither UTF-8 nor Windows-1252", "file -bi"),
    ("latin.txt", "Caf\u00e9 cr\u00e8me, na\u00efve \u2013 d\u00e9j\u00e0 vu. ".encode("cp1252") * 20,
     "Western European text", "iconv -f cp1252"),
])
def test_non_text_bytes_are_named_and_cp1252_advice_only_for_text(tmp_path, name, content, looks_like, fix):
    import gzip

    (tmp_path / name).write_bytes(gzip.compress(b"hello " * 50) if content is None else content)
    with pytest.raises(SourceError) as error:
        read_documents(list_source(str(tmp_path / "*"))[0])
    message = str(error.value)
    assert looks_like in message and fix in message and "UTF-16" not in message
    assert ("cp1252" in message) == (looks_like == "Western European text")


def test_a_utf16_file_read_under_another_encoding_is_named(tmp_path):
    (tmp_path / "w.txt").write_bytes(codecs.BOM_UTF16_LE + "plain words here".encode("utf-16-le"))
    (text_file,) = list_source(str(tmp_path / "*"))
    from sae_platform.sniff import what_bytes_look_like

    what, fix = what_bytes_look_like((tmp_path / "w.txt").read_bytes(), b"")
    assert what.startswith("UTF-16 text") and "iconv -f UTF-16" in fix
    assert read_documents(text_file)[0].text == "plain words here"  # with the default utf-8, the BOM is read


@pytest.fixture
def deny_unreadable(monkeypatch):
    """As root, chmod 000 does not deny a read: make os.open deny it as the kernel does for a user."""
    if os.geteuid() != 0:
        return
    import errno
    import stat

    real_open = os.open

    def open_as_a_user(path, flags, mode=0o777, *, dir_fd=None):
        info = os.stat(path, dir_fd=dir_fd)
        if stat.S_ISREG(info.st_mode) and not info.st_mode & 0o444:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_as_a_user)


def test_an_unreadable_file_gets_permission_advice_and_is_retried_once_readable(
        tmp_path, store, tiny_hooked, tiny_model_dir, deny_unreadable):
    from dagster import DagsterInstance, SkipReason

    from sae_platform.activations import CacheSettings, cache_text_file
    from sae_platform.inbox import failed_attempts, inbox_report, scan_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "locked.txt").write_text("Some text that is locked away for a while. " * 30)
    pattern, instance = str(inbox / "*"), DagsterInstance.ephemeral()
    first = _sensor_tick(instance, pattern, store).run_requests[0]
    instance.add_dynamic_partitions("activation_batches", ["locked"])
    os.chmod(inbox / "locked.txt", 0)
    (text_file,) = scan_inbox(pattern, store=store).files
    with pytest.raises(SourceError) as error:
        cache_text_file(store, text_file, tiny_hooked, str(tiny_model_dir), CacheSettings(ctx_len=16, batch_size=4))
    message = str(error.value)
    assert "permission denied" in message and "chmod a+r" in message and "complete copy" not in message
    assert "access" in failed_attempts(store)["locked"]
    assert isinstance(_sensor_tick(instance, pattern, store), SkipReason)  # unchanged: not tried over and over
    assert "or its permissions" in "\n".join(inbox_report(scan_inbox(pattern, store=store), store))

    os.chmod(inbox / "locked.txt", 0o644)
    (again,) = _sensor_tick(instance, pattern, store).run_requests
    assert again.run_key != first.run_key  # a new run, not deduplicated against the failed one
    assert again.run_config["ops"]["activation_batches"]["config"]["keys"] == ["locked"]
    cache_text_file(store, text_file, tiny_hooked, str(tiny_model_dir), CacheSettings(ctx_len=16, batch_size=4))
    assert "locked" not in failed_attempts(store)


def test_a_cached_file_renamed_is_not_cached_again(tmp_path, store, tiny_hooked, tiny_model_dir):
    from dagster import DagsterInstance, SkipReason

    from sae_platform.activations import CacheSettings, cache_text_file
    from sae_platform.inbox import inbox_report, scan_inbox

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "hamlet.txt").write_text("To be, or not to be, that is the question. " * 30)
    (inbox / "other.txt").write_text("Something else entirely, of another length. " * 30)
    pattern, instance = str(inbox / "*"), DagsterInstance.ephemeral()
    for text_file in scan_inbox(pattern, store=store).files:
        cache_text_file(store, text_file, tiny_hooked, str(tiny_model_dir), CacheSettings(ctx_len=16, batch_size=4))
    instance.add_dynamic_partitions("activation_batches", ["hamlet", "other"])
    assert isinstance(_sensor_tick(instance, pattern, store), SkipReason)

    (inbox / "hamlet.txt").rename(inbox / "hamlet_v2.txt")  # and a copy that keeps no mtime: still the same bytes
    (inbox / "other_copy.txt").write_bytes((inbox / "other.txt").read_bytes())
    (inbox / "other.txt").unlink()
    result = _sensor_tick(instance, pattern, store)
    assert isinstance(result, SkipReason), _keys(result)
    state = scan_inbox(pattern, store=store)
    assert state.renamed == {"hamlet": "hamlet_v2", "other": "other_copy"}
    report = "\n".join(inbox_report(state, store))
    assert "skipped hamlet_v2.txt: identical content to partition hamlet" in report
    assert "no inbox file has this key now" not in report

    (inbox / "hamlet_v2.txt").write_text("A new text now. " * 40)  # changed after the rename: a new batch
    assert _keys(_sensor_tick(instance, pattern, store)) == ["hamlet_v2"]


def test_a_tick_with_two_large_equal_size_files_stays_within_its_budget(tmp_path, store, monkeypatch):
    """Two identical 4 GiB files (sparse: no disk used) used to be hashed whole inside the tick."""
    import time

    from dagster import DagsterInstance

    from assets import sensors

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("big_a.txt", "big_b.txt"):
        with open(inbox / name, "wb") as f:
            f.truncate(4 << 30)
    (inbox / "small.txt").write_text("a small file that is cached meanwhile " * 10)
    monkeypatch.setattr(sensors, "HASH_BUDGET_S", 0.3, raising=False)
    _sensor_tick(DagsterInstance.ephemeral(), str(tmp_path / "nothing" / "*"), store)  # Dagster's own first-call cost
    started = time.monotonic()
    result = _sensor_tick(DagsterInstance.ephemeral(), str(inbox / "*"), store)
    elapsed = time.monotonic() - started
    assert _keys(result) == ["small"]  # the others wait for their comparison, the rest goes on
    assert elapsed < 3, f"the tick took {elapsed:.1f} s"


def test_a_comparison_cut_short_goes_on_at_the_next_look(tmp_path, monkeypatch):
    from sae_platform import inbox as inbox_module
    from sae_platform.inbox import scan_inbox

    monkeypatch.setattr(inbox_module, "BLOCK_BYTES", 1024)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    content = os.urandom(10 * 1024)
    (inbox / "a.txt").write_bytes(content)
    (inbox / "b.txt").write_bytes(content)
    (inbox / "c.txt").write_bytes(content[:-1] + b"x")  # differs in its last block only
    looks = [scan_inbox(str(inbox / "*"), hash_budget_s=0) for _ in range(40)]
    first, last = ({s.url.rsplit("/", 1)[-1]: s.reason for s in look.skipped} for look in (looks[0], looks[-1]))
    assert all("still comparing" in first[name] for name in ("a.txt", "b.txt", "c.txt"))
    assert [f.key for f in looks[-1].files] == ["a", "c"] and "identical content to a.txt" in last["b.txt"]


def test_an_s3_inbox_is_compared_and_read_through_the_same_paths(s3, s3_endpoint, tmp_path):
    from sae_platform.corpus import resolve_source
    from sae_platform.inbox import scan_inbox

    client, bucket = s3
    for name in ("a.txt", "b.txt"):
        client.put_object(Bucket=bucket, Key=f"inbox/{name}", Body=b"the same words " * 50)
    client.put_object(Bucket=bucket, Key="inbox/c.txt", Body=b"%PDF-1.4\n\xe2\xe3\xcf\xd3 " * 10)
    state = scan_inbox(*resolve_source(f"s3://{bucket}/inbox/*", s3_endpoint), hash_budget_s=5)
    assert [f.key for f in state.files] == ["a", "c"] and "identical content to a.txt" in state.skipped[0].reason
    assert read_documents(state.files[0], storage_options={"endpoint_url": s3_endpoint})[0].text.startswith("the same")
    with pytest.raises(SourceError, match="a PDF document"):
        read_documents(state.files[1], storage_options={"endpoint_url": s3_endpoint})


def test_an_error_naming_a_hostile_file_name_carries_no_terminal_escape():
    """A SourceError (and every PlatformError) reaches run logs and tracebacks, not only `status`:
    the name's control characters are escaped in the error itself, its own line breaks kept."""
    from sae_platform.errors import SourceError

    error = SourceError("/inbox/x\x1b[31mRED\x1b]0;PWNED\x07.txt is a PNG image\nsecond line", "convert it\x1b[2J")
    assert "\x1b" not in str(error) and "\x07" not in str(error)
    assert error.problem == "/inbox/x\\x1b[31mRED\\x1b]0;PWNED\\x07.txt is a PNG image\nsecond line"
    assert error.fix == "convert it\\x1b[2J"

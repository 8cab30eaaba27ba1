"""The commit protocol: a version is visible only when complete, and replaced cleanly."""

import json
import subprocess
import sys
import textwrap

import polars as pl
import pytest

from sae_platform.errors import StorageError
from sae_platform.storage import POINTER, ArtifactStore


def _write(store, name, payload):
    with store.writing(name) as version:
        store.fs.pipe_file(f"{version}/payload.txt", payload.encode())


def _read(store, name):
    return store.fs.cat_file(f"{store.resolve(name)}/payload.txt").decode()


def test_committed_version_is_visible_and_replaced(store):
    assert store.resolve("things/a") is None
    _write(store, "things/a", "one")
    first = store.resolve("things/a")
    assert _read(store, "things/a") == "one"
    _write(store, "things/a", "two")
    assert _read(store, "things/a") == "two"
    assert store.resolve("things/a") != first
    assert not store.fs.exists(first), "the replaced version must be swept"
    assert store.committed_names("things") == ["things/a"]


def test_failed_write_leaves_previous_version_and_no_debris(store):
    _write(store, "things/a", "good")
    with pytest.raises(RuntimeError):
        with store.writing("things/a") as version:
            store.fs.pipe_file(f"{version}/payload.txt", b"half")
            raise RuntimeError("killed mid-write")
    assert _read(store, "things/a") == "good"
    entries = [e.rsplit("/", 1)[-1] for e in store.fs.ls(store.path("things/a"), detail=False)]
    assert sorted(entries) == sorted([POINTER, store.pointer("things/a")["version"]])


def test_never_committed_name_is_invisible(store):
    with pytest.raises(ValueError):
        with store.writing("things/b"):
            raise ValueError
    assert store.resolve("things/b") is None
    assert store.committed_names("things") == []
    with pytest.raises(StorageError, match="missing"):
        store.require("things/b", "thing b", "make it")


def test_newer_in_flight_version_survives_an_older_commit(store):
    _write(store, "things/a", "one")
    newer = store.path("things/a", "v-99999999999999999999-inflight")
    store.fs.makedirs(newer, exist_ok=True)
    _write(store, "things/a", "two")
    assert store.fs.exists(newer), "a concurrent writer's newer version must not be deleted"


def test_delete_uncommits_first(store):
    _write(store, "things/a", "one")
    store.delete("things/a")
    assert store.resolve("things/a") is None
    assert not store.fs.exists(store.path("things/a"))


def test_json_and_parquet_round_trip(store):
    store.write_json(store.path("x/meta.json"), {"b": 1, "a": [1, 2]})
    assert store.read_json(store.path("x/meta.json")) == {"a": [1, 2], "b": 1}
    frame = pl.DataFrame({"id": [1, 2, 3], "text": ["a", "b", "c"]})
    store.write_parquet(store.path("x/t.parquet"), frame)
    assert store.read_parquet(store.path("x/t.parquet")).equals(frame)
    assert not [p for p in store.fs.ls(store.path("x"), detail=False) if ".tmp-" in p]


def test_process_killed_mid_write_keeps_old_version(store, tmp_path):
    """A real SIGKILL while a new version is half written: readers still see the old one."""
    _write(store, "things/a", "old")
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from sae_platform.storage import ArtifactStore
        store = ArtifactStore({store.root_url!r})
        with store.writing("things/a") as version:
            store.fs.pipe_file(version + "/payload.txt", b"new but incomplete")
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    result = subprocess.run([sys.executable, str(script)])
    assert result.returncode == -9
    fresh = ArtifactStore(store.root_url)
    assert _read(fresh, "things/a") == "old"
    assert json.loads(fresh.fs.cat_file(fresh.path("things/a", POINTER)))["version"] == store.pointer("things/a")["version"]
    _write(fresh, "things/a", "new")  # the next successful write sweeps the orphan
    assert len([e for e in fresh.fs.ls(fresh.path("things/a"), detail=False) if "/v-" in e]) == 1


def test_a_commit_leaves_an_older_writer_in_flight_alone(store):
    """Two caching runs both converting the base model: the later one's commit must not delete the
    earlier one's half-written version (it used to, and the earlier run died with an I/O error)."""
    with store.writing("models/m") as slow:
        store.fs.pipe_file(f"{slow}/weights", b"slow")
        with store.writing("models/m") as fast:
            store.fs.pipe_file(f"{fast}/weights", b"fast")
        assert store.fs.cat_file(f"{store.resolve('models/m')}/weights") == b"fast"
        assert store.fs.cat_file(f"{slow}/weights") == b"slow", "the in-flight version was swept"
        store.fs.pipe_file(f"{slow}/config", b"{}")
    assert store.fs.cat_file(f"{store.resolve('models/m')}/weights") == b"slow"  # the last commit wins
    assert sorted(store.fs.ls(store.resolve("models/m"), detail=False)) == sorted(
        [f"{store.resolve('models/m')}/weights", f"{store.resolve('models/m')}/config"]), "no writer mark left"

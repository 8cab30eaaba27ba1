"""The commit protocol: a version is visible only when complete, and replaced cleanly."""

import hashlib
import json
import subprocess
import sys
import textwrap

import polars as pl
import pytest

from sae_platform import catalog
from sae_platform.errors import StorageError
from sae_platform.settings import SettingsError
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
    assert store.fs.exists(first), "the replaced version stays readable for the grace period"
    assert store.committed_names("things") == ["things/a"]
    quick = ArtifactStore(store.root_url, grace_s=0)
    _write(quick, "things/a", "three")
    assert _read(quick, "things/a") == "three" and not store.fs.exists(first), "grace 0: swept at the commit"
    assert len([e for e in store.fs.ls(store.path("things/a"), detail=False) if "/v-" in e]) == 1


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
    written = json.loads(fresh.fs.cat_file(fresh.path("things/a", POINTER)))
    assert written["version"] == store.pointer("things/a")["version"]
    old = fresh.resolve("things/a")
    _write(fresh, "things/a", "new")  # the next successful write sweeps the orphan at once ...
    versions = [e for e in fresh.fs.ls(fresh.path("things/a"), detail=False) if "/v-" in e]
    assert sorted(versions) == sorted([old, fresh.resolve("things/a")]), "... and keeps the superseded one"


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
        [f"{store.resolve('models/m')}/{f}" for f in ("weights", "config", catalog.CHECKSUMS)]), "no writer mark left"


# -- superseded versions stay readable for a grace period (issue 13.3) -------------------------

def test_superseded_version_is_readable_for_the_grace_period_then_swept(tmp_path, monkeypatch):
    import time

    from sae_platform import storage

    monkeypatch.delenv(storage.GRACE_ENV, raising=False)
    assert ArtifactStore(str(tmp_path / "a")).grace_s == storage.DEFAULT_GRACE_S == 3600
    monkeypatch.setenv(storage.GRACE_ENV, "0.5")
    store = ArtifactStore(str(tmp_path / "a"))
    assert store.grace_s == 0.5
    _write(store, "things/a", "one")
    reader = store.resolve("things/a")                 # a run resolves the version it will read ...
    _write(store, "things/a", "two")                    # ... another run commits a new one
    assert store.fs.cat_file(f"{reader}/payload.txt") == b"one", "still readable right after the commit"
    mark = json.loads(store.fs.cat_file(f"{reader}/.superseded.json"))
    assert mark["by"] == store.pointer("things/a")["version"]
    _write(store, "things/a", "three")                  # within the grace period: kept
    assert store.fs.exists(reader)
    time.sleep(0.6)
    _write(store, "things/a", "four")                   # the first commit after the grace period sweeps
    assert not store.fs.exists(reader)
    versions = [e.rsplit("/", 1)[-1] for e in store.fs.ls(store.path("things/a"), detail=False) if "/v-" in e]
    assert len(versions) == 2, "the ones superseded within the grace period are kept"
    assert _read(store, "things/a") == "four"
    with pytest.raises(StorageError, match=r"version v-.* which this run was reading, has been removed"):
        store.check_version("things/a", reader.rsplit("/", 1)[-1])
    for bad in ("-1", "soon", "inf"):
        monkeypatch.setenv(storage.GRACE_ENV, bad)
        with pytest.raises(SettingsError, match="SAE_PLATFORM_GRACE_S"):
            ArtifactStore(str(tmp_path / "a"))


def test_training_reader_survives_a_reshuffle_and_a_vanished_version_says_so(tmp_path):
    """A run streaming the shuffled store while the store is re-shuffled: within the grace period
    it reads the old plan to the end; once the old pieces are gone it gets an error naming them."""
    import numpy as np

    from sae_platform import shuffle
    from sae_platform.shuffled import open_shuffled

    store = ArtifactStore(str(tmp_path / "s"), grace_s=3600)
    rng = np.random.default_rng(0)

    def cache(key, rows):
        with store.writing(f"activations/{key}") as version:
            group = store.open_group(f"{version}/data.zarr", "w")
            group.create_array("acts", data=rng.standard_normal((rows, 64)).astype(np.float32), chunks=(64, 64))
            group.attrs.update({"d_model": 64, "dtype": "float32", "n_rows": rows})

    budget = 1 << 18          # several final pieces, read one after the other
    cache("a", 2000)
    shuffle.run_shuffle(store, "main", n_buckets=2, memory_budget_bytes=budget, n_jobs=1, seed=0)
    reading = open_shuffled(store, "main")
    expected = np.concatenate([b for _, b in reading.blocks()])
    blocks = reading.blocks()
    first = next(blocks)
    cache("b", 300)                                                   # new data arrives ...
    shuffle.run_shuffle(store, "main", n_buckets=2, memory_budget_bytes=budget, n_jobs=1, seed=0)  # re-shuffle
    assert open_shuffled(store, "main").n_rows == 2300 and len(reading.pieces) > 1
    rest = [b for _, b in blocks]                                     # the old plan, read to the end
    assert np.array_equal(np.concatenate([first[1], *rest]), expected)
    # the same with no grace: the reader's pieces go at the re-shuffle's commit
    quick = ArtifactStore(store.root_url, grace_s=0)
    reading = open_shuffled(quick, "main")
    blocks = reading.blocks()
    next(blocks)
    cache("c", 300)
    shuffle.run_shuffle(quick, "main", n_buckets=2, memory_budget_bytes=budget, n_jobs=1, seed=0)
    with pytest.raises(StorageError) as error:
        list(blocks)
    message = str(error.value)
    assert "which this run was reading, has been removed" in message and "grace period of 0 s" in message
    assert reading.index["plan_id"] in message and "re-run this step" in message
    assert "SAE_PLATFORM_GRACE_S" in message


def test_a_partition_re_cached_under_a_reader(tmp_path):
    import numpy as np

    from sae_platform.activations import open_partition

    store = ArtifactStore(str(tmp_path / "p"), grace_s=0)
    for value in (1.0, 2.0):
        with store.writing("activations/k") as version:
            group = store.open_group(f"{version}/data.zarr", "w")
            group.create_array("acts", data=np.full((128, 4), value, np.float32), chunks=(32, 4))
        if value == 1.0:
            part = open_partition(store, "k")
            assert float(part.acts[0:32].mean()) == 1.0
    with pytest.raises(StorageError, match="activation partition 'k'.*has been removed"):
        part.acts[32:64]       # would read zeros (the fill value) from the removed version


def test_base_model_converted_again_under_a_loader(tmp_path, tiny_model_dir):
    """Two runs converting the base model: the one loading the version the other superseded still
    loads it within the grace period; after it, the error says the version was removed."""
    from sae_platform.model import (
        load_hooked_model,
        load_stored_model,
        store_base_model,
    )

    source = str(tiny_model_dir)
    name = catalog.model_name(source)
    store = ArtifactStore(str(tmp_path / "m"))
    hooked, converted = load_stored_model(store, source, layer=1, device="cpu", autocast="none")
    assert converted and hooked.d_model == 32
    old = store.resolve(name)
    store_base_model(store, source)                              # another run converts it again
    assert store.resolve(name) != old
    assert load_hooked_model(old, layer=1, device="cpu", autocast="none").d_model == 32     # still readable
    quick = ArtifactStore(store.root_url, grace_s=0)
    store_base_model(quick, source)                              # grace over: the old versions go
    assert not store.fs.exists(old)
    with pytest.raises(StorageError, match=r"base model .* which this run was reading, has been removed"), \
            store.reading(name, old.rsplit("/", 1)[-1], f"base model {source!r}"):
        load_hooked_model(old, layer=1, device="cpu", autocast="none")
    (tmp_path / "planted").mkdir()
    import shutil

    shutil.copytree(store.resolve(name), tmp_path / "planted" / "m")
    for f in (tmp_path / "planted" / "m").glob("*.safetensors"):
        f.unlink()                                               # only a pickled checkpoint beside the config
    (tmp_path / "planted" / "m" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(OSError, match="safetensors"):
        load_hooked_model(str(tmp_path / "planted" / "m"), layer=1, device="cpu", autocast="none")


def test_a_zombie_process_is_not_alive():
    """A killed step worker left as a zombie (its parent died, PID 1 does not reap) must count as
    dead, or `sae-platform recover` never frees its run's pool slot."""
    import os
    import subprocess
    import sys
    import time

    from sae_platform.storage import process_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while process_alive(child.pid) and time.monotonic() < deadline:  # exited, not yet reaped: a zombie
        time.sleep(0.05)
    assert not process_alive(child.pid)
    assert child.poll() == 0  # reap it
    assert process_alive(os.getpid())


# -- damaged artifacts are errors naming the file and the fix ----------------------------------

def test_a_damaged_json_or_parquet_names_the_file_and_the_fix(store, caplog):
    """A truncated JSON file and a truncated parquet table: each read raises StorageError naming
    the file and the fix, not a raw JSONDecodeError / ComputeError. A pointer naming a folder outside
    its artifact counts as nothing committed, like an unreadable one (below): it is never followed."""
    with store.writing("things/t") as version:
        store.write_json(f"{version}/meta.json", {"a": 1})
        store.write_parquet(f"{version}/stats.parquet", pl.DataFrame({"x": list(range(1000))}))
    path = store.resolve("things/t")
    pointer = store.path("things/t", POINTER)
    good = store.fs.cat_file(pointer)
    store.fs.pipe_file(pointer, b'{"version": "../../etc"}')
    with caplog.at_level("WARNING", logger="sae_platform.storage"):
        assert store.resolve("things/t") is None
    assert "names no version folder of things/t" in caplog.text
    store.fs.pipe_file(pointer, good)
    for file, what in (("meta.json", "JSON file"), ("stats.parquet", "parquet table")):
        data = store.fs.cat_file(f"{path}/{file}")
        store.fs.pipe_file(f"{path}/{file}", data[: len(data) // 2])
        reader = store.read_json if file.endswith(".json") else store.read_parquet
        with pytest.raises(StorageError, match=rf"{what} .*{path.rsplit('/', 1)[-1]}/{file} is damaged") as error:
            reader(f"{path}/{file}")
        assert f"delete {store.url(store.path('things/t'))} and re-run the stage" in error.value.fix
    with pytest.raises(FileNotFoundError):
        store.read_json(f"{path}/missing.json")  # missing is not damaged


def test_a_damaged_stored_base_model_names_it_and_the_fix(tmp_path, tiny_model_dir):
    from sae_platform.model import load_stored_model, load_stored_tokenizer

    source = str(tiny_model_dir)
    store = ArtifactStore(str(tmp_path / "m"))
    load_stored_model(store, source, layer=1, device="cpu", autocast="none")
    path = store.resolve(catalog.model_name(source))
    weights = f"{path}/model.safetensors"
    store.fs.pipe_file(weights, store.fs.cat_file(weights)[:1000])
    with pytest.raises(StorageError, match="base model .* is damaged") as error:
        load_stored_model(store, source, layer=1, device="cpu", autocast="none")
    assert f"delete {store.url(store.path(catalog.model_name(source)))}" in error.value.fix
    assert "converts it again" in error.value.fix
    store.fs.pipe_file(f"{path}/tokenizer.json", b'{"version": ')
    with pytest.raises(StorageError, match="base model .* is damaged"):
        load_stored_tokenizer(store, source)


# -- nothing missing is read as zeros; content checksums (issue 31.3) --------------------------

def _partition(store, key="k", rows=4096):
    import numpy as np

    with store.writing(catalog.partition_name(key)) as version:
        group = store.open_group(f"{version}/{catalog.FIRST_STORE}", "w")
        group.create_array("acts", data=np.arange(rows * 8, dtype=np.float32).reshape(rows, 8) + 1, chunks=(512, 8),
                           compressors=None)
    return store.resolve(catalog.partition_name(key))


def _check_reads(store, key="k"):
    from sae_platform.activations import open_partition

    return open_partition(store, key).acts[:]


def test_a_commit_records_every_file_and_a_missing_added_or_changed_one_is_refused_on_read(store):
    path = _partition(store)
    pointer = store.pointer("activations/k")
    recorded = json.loads(store.fs.cat_file(f"{path}/{catalog.CHECKSUMS}"))["files"]
    assert pointer["checksums"]["files"] == len(recorded) == 8 + 2        # 8 chunks, 2 zarr.json
    chunk = f"{path}/data.zarr/acts/c/3/0"
    assert recorded["data.zarr/acts/c/3/0"] == {"size": 512 * 8 * 4,
                                               "sha256": hashlib.sha256(store.fs.cat_file(chunk)).hexdigest()}
    assert _check_reads(store).shape == (4096, 8)

    saved = store.fs.cat_file(chunk)
    store.fs.rm_file(chunk)
    with pytest.raises(StorageError, match=r"activation partition 'k' \(.*\) is damaged: data.zarr/acts/c/3/0 is "
                                           r"missing \(the writer wrote 16,384 bytes\)"):
        _check_reads(store)
    store.fs.pipe_file(chunk, saved[:-4])
    with pytest.raises(StorageError, match="data.zarr/acts/c/3/0 is 16,380 bytes, the writer wrote 16,384"):
        _check_reads(store)
    store.fs.pipe_file(chunk, saved)
    store.fs.pipe_file(f"{path}/data.zarr/acts/c/9/0", saved)             # a chunk beyond the written ones
    with pytest.raises(StorageError, match="data.zarr/acts/c/9/0 .* was not written by the artifact's writer"):
        _check_reads(store)
    store.fs.rm_file(f"{path}/data.zarr/acts/c/9/0")
    meta = f"{path}/data.zarr/acts/zarr.json"
    body = store.fs.cat_file(meta)
    store.fs.pipe_file(meta, body.replace(b"4096", b"5096"))               # same size, one more chunk of rows
    with pytest.raises(StorageError, match="data.zarr/acts/zarr.json has changed: its sha256 is"):
        _check_reads(store)
    store.fs.pipe_file(meta, body)
    store.fs.pipe_file(f"{path}/{catalog.CHECKSUMS}", b"{}")
    with pytest.raises(StorageError, match="CHECKSUMS.json has changed since the commit"):
        _check_reads(store)


def test_an_artifact_committed_before_checksums_still_reads_and_says_so(store, caplog):
    import numpy as np

    path = _partition(store, "old")
    store.fs.rm_file(f"{path}/{catalog.CHECKSUMS}")                       # as committed by an earlier version
    pointer = store.pointer("activations/old")
    del pointer["checksums"]
    store.write_json(store.path("activations/old", POINTER), pointer)
    with caplog.at_level("WARNING", logger="sae_platform.storage"):
        rows = _check_reads(store, "old")
    assert rows.shape == (4096, 8) and np.all(rows > 0)
    assert "activation partition 'old'" in caplog.text and "before content checksums were recorded" in caplog.text
    assert store.verify("activations/old")["status"] == "unrecorded"


def test_checksums_on_s3(s3, s3_endpoint):
    _, bucket = s3
    store = ArtifactStore(f"s3://{bucket}/root", {"endpoint_url": s3_endpoint})
    path = _partition(store)
    assert _check_reads(store).shape == (4096, 8)
    assert store.verify("activations/k")["status"] == "ok"
    store.fs.rm_file(f"{path}/data.zarr/acts/c/1/0")
    store.fs.invalidate_cache()
    with pytest.raises(StorageError, match=r"activation partition 'k' .*data.zarr/acts/c/1/0 is missing"):
        _check_reads(store)
    assert store.verify("activations/k")["status"] == "damaged"


# -- damaged protocol files are recovered from, never a JSONDecodeError (issue 31.4) -------------

DAMAGED = {"empty": b"", "truncated": b'{"host": "h", "pid": 12', "not an object": b"[1, 2]"}


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "artifacts"))
    _, bucket = request.getfixturevalue("s3")
    return ArtifactStore(f"s3://{bucket}/root", {"endpoint_url": request.getfixturevalue("s3_endpoint")})


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_writer_mark_left_empty_by_a_full_disk_is_swept_at_the_next_commit(any_store, damage, caplog):
    """A commit started on a full disk left its version with an empty (or truncated) .writer.json;
    it used to break every later commit of the artifact with JSONDecodeError."""
    from sae_platform.storage import WRITER_MARK

    store = any_store
    _write(store, "things/a", "one")
    debris = store.path("things/a", "v-00000000000000000001-fulldisk")
    store.fs.pipe_file(f"{debris}/{WRITER_MARK}", DAMAGED[damage])
    with caplog.at_level("WARNING", logger="sae_platform.storage"):
        _write(store, "things/a", "two")
    assert _read(store, "things/a") == "two"
    assert not store.fs.exists(debris), "the dead writer's version is swept"
    assert any(WRITER_MARK in r.message and "unreadable" in r.message and "taken for dead" in r.message
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("damage", DAMAGED)
def test_an_empty_pointer_counts_as_nothing_committed_and_the_next_commit_replaces_it(any_store, damage, caplog):
    store = any_store
    _write(store, "things/a", "one")
    old = store.resolve("things/a")
    store.fs.pipe_file(store.path("things/a", POINTER), DAMAGED[damage])
    with caplog.at_level("WARNING", logger="sae_platform.storage"):
        assert store.pointer("things/a") is None and store.resolve("things/a") is None
        assert store.committed_names("things") == []
        with pytest.raises(StorageError, match="missing"):
            store.require("things/a", "thing a", "make it")
    assert any(POINTER in r.message and "nothing committed" in r.message for r in caplog.records), caplog.text
    _write(store, "things/a", "two")
    assert _read(store, "things/a") == "two" and store.committed_names("things") == ["things/a"]
    assert store.fs.cat_file(f"{old}/payload.txt") == b"one", "the version it named is kept for the grace period"


def test_an_empty_superseded_mark_ends_the_grace_period(store, caplog):
    from sae_platform.storage import SUPERSEDED_MARK

    _write(store, "things/a", "one")
    old = store.resolve("things/a")
    _write(store, "things/a", "two")
    store.fs.pipe_file(f"{old}/{SUPERSEDED_MARK}", b"")
    with caplog.at_level("WARNING", logger="sae_platform.storage"):
        _write(store, "things/a", "three")
    assert not store.fs.exists(old) and _read(store, "things/a") == "three"
    assert any(SUPERSEDED_MARK in r.message for r in caplog.records), caplog.text


def test_a_commit_that_cannot_write_its_writer_mark_leaves_nothing(store, monkeypatch):
    """The full disk itself: writing the mark fails, so the commit fails at once and leaves no
    version directory (it used to leave one with an empty mark)."""
    import errno

    from sae_platform import storage

    _write(store, "things/a", "one")

    def full_disk(path, data):
        open(path, "wb").close()  # the file is created, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(storage, "write_local_atomic", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _write(store, "things/a", "two")
    monkeypatch.undo()
    versions = [e for e in store.fs.ls(store.path("things/a"), detail=False) if "/v-" in e]
    assert versions == [store.resolve("things/a")] and _read(store, "things/a") == "one"
    _write(store, "things/a", "three")
    assert _read(store, "things/a") == "three"


def test_a_missing_activation_file_or_version_says_which_batch_and_the_fix_only(store):
    """The errors for a deleted chunk file, or a deleted version, of an activation batch name the batch,
    the file and how to write it again, nothing else (they used to explain zarr's fill values, or a
    grace period that had nothing to do with a deletion)."""
    path = _partition(store)
    version = store.version_of(path)
    store.fs.rm_file(f"{path}/data.zarr/acts/c/3/0")
    with pytest.raises(StorageError) as error:
        _check_reads(store)
    assert error.value.problem == (f"activation partition 'k' ({store.url(path)}) is damaged: data.zarr/acts/c/3/0 is "
                                   "missing (the writer wrote 16,384 bytes)")
    assert error.value.fix.startswith(f"delete {store.url(store.path('activations/k'))} and re-run") \
        and "sae-platform backfill k" in error.value.fix

    store.fs.rm(store.path(catalog.partition_name("k")), recursive=True)  # the batch deleted under a reader
    with pytest.raises(StorageError) as error:
        store.check_version(catalog.partition_name("k"), version, "activation partition 'k'")
    message = str(error.value)
    assert f"activation partition 'k' ({store.url(store.path('activations/k'))}) version {version}" in message
    assert "has been deleted" in message and "grace" not in message and "superseded" not in message
    assert error.value.fix == "write it again: sae-platform backfill k, then sae-platform shuffle"

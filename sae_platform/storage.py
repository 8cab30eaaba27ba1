"""Where artifacts live, and how they become visible only when complete.

Every artifact (an activation partition, a shuffle bucket, a checkpoint) is a *named* directory
under one fsspec root URL: a local folder by default, ``s3://bucket/prefix`` in production.
Writers never touch the visible copy. They write a fresh *version* directory next to it and, once
every byte is down, atomically replace a one-line pointer file ``COMMITTED.json`` that names the
version. Readers resolve the pointer. The scheme needs nothing but an atomic single-object write,
which both POSIX (``os.replace``) and S3 (a PUT) give, so one code path serves both:

    <root>/<name>/COMMITTED.json           {"version": "v-000…-ab12cd34", ...}
    <root>/<name>/v-000…-ab12cd34/…        the committed data
    <root>/<name>/v-000…-ff00ee11/…        a crashed or in-flight writer: never read, swept later

A crash at any point leaves either the old version or the new one visible, never a mix, and
re-materializing a partition replaces it cleanly.

Two writers of the same name may overlap (two caching runs both converting the base model, a
re-launched step beside a slow one): each version directory carries a ``.writer.json`` (host,
pid, start) until it is committed, and a commit sweeps an older version only when it is not
another writer's work in flight: committed before (no marker), or its writer is a dead process
of this host, or it started more than ``STALE_WRITER_S`` ago. The last commit wins.

Superseded versions stay readable for a grace period. A run may still read the version a commit
has just replaced (training while the store is re-shuffled, two runs converting the base model):
a committed version that a newer commit supersedes gets a ``.superseded.json`` marker (when it was
superseded) and is removed only by a commit of the same name at least ``grace_s`` seconds later.
``grace_s`` is an ``ArtifactStore`` argument; its default comes from the environment variable
``SAE_PLATFORM_GRACE_S`` (seconds, default 3600; 0 removes superseded versions at once). A
version that never committed (a killed writer) is removed at the next commit as before. A reader
whose version was removed after all gets a :class:`StorageError` that says so (which artifact,
which version, the grace period) instead of an unrelated ``OSError`` or silently missing data:
see :meth:`ArtifactStore.check_version`.

Nothing missing is read as zeros. Before the pointer switches, the commit records every file of the
version in ``CHECKSUMS.json`` (relative path, size, sha256; ``sae_platform/checksums.py``) and the
pointer records that file's own sha256. Readers of zarr stores, checkpoints and the base model call
:meth:`ArtifactStore.check_intact` (every recorded file present with its size, none added, the
JSON metadata hashing as recorded: a deleted chunk or an edited shape is a StorageError naming the
artifact, the file and the fix); :meth:`ArtifactStore.verify` (``sae-platform verify``) re-hashes
every byte. A version committed before checksums were recorded reads as before, with one log line.

The protocol's own small JSON files (the pointer, the writer mark, the superseded mark) may be
found empty or truncated: a writer on a full disk, a kill mid-write, a filesystem that lost the
data of a rename. None of them is ever a ``JSONDecodeError``: each is read by
:meth:`ArtifactStore._protocol_json`, which logs the file and takes it for absent or stale
(an unreadable pointer: nothing committed, so the step runs again and its commit replaces it; an
unreadable writer mark: a writer that died before it wrote its mark, swept at the next commit;
an unreadable superseded mark: its grace period is over). The writer mark is written atomically
and a commit whose mark cannot be written (a full disk) removes its version directory at once.
"""

from __future__ import annotations  # pl / zarr in signatures only: both are imported where used

import contextlib
import io
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_platform import checksums
from sae_platform.catalog import CHECKSUMS, rebuild_fix, writing_stage
from sae_platform.errors import PlatformError, StorageError
from sae_platform.filesystems import fs_options, open_fs
from sae_platform.settings import env_value

if TYPE_CHECKING:
    import polars as pl
    import zarr

POINTER = "COMMITTED.json"
VERSION_PREFIX = "v-"
WRITER_MARK = ".writer.json"
STALE_WRITER_S = 24 * 3600  # a writer on another host silent this long is taken for dead
SUPERSEDED_MARK = ".superseded.json"
CHECKSUMS_FIELD = "checksums"  # of the pointer: sha256 of the version's CHECKSUMS.json, files, bytes
GRACE_ENV = "SAE_PLATFORM_GRACE_S"
CREATE_BUCKET_ENV = "SAE_PLATFORM_CREATE_BUCKET"
DEFAULT_GRACE_S = 3600.0
log = logging.getLogger(__name__)


def grace_from_env() -> float:
    """Seconds a superseded version stays readable: ``$SAE_PLATFORM_GRACE_S``, default 3600."""
    return env_value(GRACE_ENV, DEFAULT_GRACE_S, float, ge=0)
_BUCKETS_SEEN: set[tuple[str, str, str]] = set()  # buckets checked once per process
_UNRECORDED_SEEN: set[str] = set()  # versions without checksums already logged in this process
log = logging.getLogger(__name__)


def write_local_atomic(path: str, data: bytes) -> None:
    """Write a local file under a temporary name, fsync, then rename: readers never see half of it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def process_alive(pid: int) -> bool:
    """Whether a process of this host still runs (signal 0 checks without signalling). A zombie is
    dead: a killed step worker whose parent died too is reparented to PID 1, and where PID 1 does
    not reap (a container's init), it stays in the process table and answers signal 0."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): signal 0 is all we know
    return state not in ("Z", "X")


def _new_version_name() -> str:
    # Sortable by creation time, so cleanup can tell older versions from newer in-flight ones.
    return f"{VERSION_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


@dataclass
class ArtifactStore:
    """An fsspec root plus the commit protocol described in the module docstring."""

    root_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    grace_s: float | None = None  # None: $SAE_PLATFORM_GRACE_S, default 3600 (see the module docstring)
    # An S3 root's bucket must exist; create it only when asked (True, or SAE_PLATFORM_CREATE_BUCKET=1),
    # so that a misspelt bucket name fails instead of filling a new bucket.
    create_bucket: bool | None = None

    def __post_init__(self):
        if self.grace_s is None:
            self.grace_s = grace_from_env()
        elif not self.grace_s >= 0:
            raise StorageError(f"grace_s={self.grace_s!r} is not a number of seconds >= 0",
                               "pass grace_s >= 0 (0 removes superseded versions at the next commit)")
        options = dict(self.storage_options)
        if "://" not in self.root_url or self.root_url.startswith("file://"):
            options.setdefault("auto_mkdir", True)
        self.fs, self.root = open_fs(self.root_url, options)  # listings always fresh
        self.root = self.root.rstrip("/")
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if self.protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
            self._check_bucket()

    def _check_bucket(self) -> None:
        bucket = self.root.split("/", 1)[0]
        seen = (self.protocol, str(self.storage_options.get("endpoint_url")), bucket)
        if seen in _BUCKETS_SEEN:
            return
        create = self.create_bucket
        if create is None:
            create = env_value(CREATE_BUCKET_ENV, False, bool)
        try:
            exists = self.fs.exists(bucket)
        except PermissionError:
            exists = True  # listing buckets may be forbidden while the bucket itself is usable
        if not exists:
            if not create:
                raise StorageError(
                    f"bucket {bucket!r} does not exist (artifact root {self.root_url})",
                    f"check the bucket name in SAE_PLATFORM_ROOT (and the endpoint/region); to have the "
                    f"platform create it, set SAE_PLATFORM_CREATE_BUCKET=1 (or storage create_bucket: true), "
                    f"or create it yourself (aws s3 mb {self.protocol}://{bucket})")
            self.fs.mkdir(bucket)
        _BUCKETS_SEEN.add(seen)

    @property
    def is_local(self) -> bool:
        return self.protocol in ("file", "local")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def url(self, path: str) -> str:
        return path if self.is_local else f"{self.protocol}://{path}"

    # -- the commit protocol -------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, name: str, **pointer_info: Any) -> Iterator[str]:
        """Yield a fresh version directory for ``name``; commit it only if the block succeeds."""
        version = _new_version_name()
        version_path = self.path(name, version)
        mark = self.path(name, version, WRITER_MARK)
        try:  # atomic, so a concurrent commit never reads a live writer's mark half written
            self.fs.makedirs(version_path, exist_ok=True)
            self.write_bytes_atomic(mark, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                      "started": time.time()}).encode())
        except BaseException:  # e.g. a full disk: leave no version directory behind
            with contextlib.suppress(OSError):
                self._remove(version_path)
            raise
        try:
            yield version_path
            recorded = self._record_checksums(version_path)
        except BaseException:
            self._remove(version_path)
            raise
        pointer = {"version": version, "committed_at": time.time(), **pointer_info, CHECKSUMS_FIELD: recorded}
        self.write_bytes_atomic(self.path(name, POINTER), json.dumps(pointer).encode())
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(mark)
        self._sweep_older_versions(name, keep=version)

    def resolve(self, name: str) -> str | None:
        """Path of the committed version of ``name``, or None if nothing was ever committed."""
        pointer = self.pointer(name)
        return None if pointer is None else self.path(name, pointer["version"])

    @staticmethod
    def version_of(path: str) -> str:
        """The version folder's name in the path ``resolve`` or ``require`` returned."""
        return path.rstrip("/").rsplit("/", 1)[-1]

    def require(self, name: str, what: str, fix: str) -> str:
        path = self.resolve(name)
        if path is None:
            raise StorageError(f"{what} is missing: no committed artifact at {self.url(self.path(name))}", fix)
        return path

    def pointer(self, name: str) -> dict | None:
        """The ``COMMITTED.json`` of ``name`` (``version`` plus what the writer recorded), or None
        when nothing is committed. An empty, truncated or tampered pointer (one naming no version
        folder of ``name``) counts as nothing committed (logged): the step that makes ``name`` runs
        again and its commit replaces the pointer; the version it named is kept for the grace period
        like any superseded one."""
        path = self.path(name, POINTER)
        taken_as = "taken as nothing committed; the next commit of it replaces the pointer"
        pointer = self._protocol_json(path, ("version",), taken_as)
        if not isinstance(pointer, dict):
            return None
        version = pointer["version"]
        if not (isinstance(version, str) and version.startswith(VERSION_PREFIX) and "/" not in version):
            log.warning("%s names no version folder of %s (%r): %s", self.url(path), name, version, taken_as)
            return None
        return pointer

    def committed_names(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` that have a committed version (a readable pointer), sorted."""
        try:
            entries = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        names = [f"{prefix.strip('/')}/{e.rstrip('/').rsplit('/', 1)[-1]}" for e in entries]
        return sorted(n for n in names if self.fs.exists(self.path(n, POINTER)) and self.pointer(n) is not None)

    def _protocol_json(self, path: str, keys: tuple[str, ...], taken_as: str) -> dict | bool | None:
        """One of the commit protocol's small JSON files: the dict, None when it does not exist, or
        False when it is unreadable (empty, truncated, not an object with ``keys``: a full disk or a
        kill mid-write). An unreadable file is logged with ``taken_as`` (what the caller does instead),
        never raised: one damaged mark must not break every later commit of the artifact."""
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            value = None
        if isinstance(value, dict) and all(key in value for key in keys):
            return value
        log.warning("%s is unreadable (%d bytes%s; left by a full disk or a killed writer): %s",
                    self.url(path), len(data), "" if data else ", empty", taken_as)
        return False

    def delete(self, name: str) -> None:
        """Uncommit first (readers stop seeing it at once), then remove the data."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name, POINTER))
        self._remove(self.path(name))

    def _sweep_older_versions(self, name: str, keep: str) -> None:
        # Only versions *older* than the one just committed (a newer one may be a writer still in
        # flight), and of those only the ones no live writer is still filling; a version that was
        # committed once is retired (kept for the grace period), one that never was goes at once.
        for entry in self.fs.ls(self.path(name), detail=False):
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if not base.startswith(VERSION_PREFIX) or base >= keep:
                continue
            writer = self._writer(entry)
            if writer is None:
                self.retire(entry, superseded_by=keep)
            elif not self._writer_alive(writer):
                self._remove(entry)

    def retire(self, path: str, superseded_by: str | None = None) -> bool:
        """A superseded directory: mark it the first time (from now on its grace period runs),
        remove it once the grace period is over. True when it was removed."""
        mark = f"{path.rstrip('/')}/{SUPERSEDED_MARK}"
        if self.grace_s <= 0:
            self._remove(path)
            return True
        superseded = self._protocol_json(mark, ("superseded_at",), "its grace period is taken as over")
        if superseded is None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.pipe_file(mark, json.dumps({"superseded_at": time.time(), "by": superseded_by}).encode())
            return False
        try:
            since = float(superseded["superseded_at"]) if superseded else 0.0
        except (TypeError, ValueError):
            since = 0.0  # an unreadable time: the grace period counts from the epoch
        if time.time() - since >= self.grace_s:
            self._remove(path)
            return True
        return False

    def check_version(self, name: str, version: str, what: str | None = None) -> None:
        """Raise a StorageError saying so when version ``version`` of ``name`` is gone (removed
        after a newer commit and the grace period). Readers call it after reading from a version:
        a removed zarr chunk reads back as its fill value, not as an error."""
        if self.fs.exists(self.path(name, version)):
            return
        raise self.vanished(name, version, what)

    def vanished(self, name: str, version: str, what: str | None = None) -> StorageError:
        """The error for a version of ``name`` found gone: superseded by a newer commit and swept after
        the grace period (re-run, or raise the grace period), or deleted (re-create it)."""
        current = self.pointer(name)
        if current is None:  # a pointer naming a missing version folder reads as None too
            return StorageError(f"{what or name} ({self.url(self.path(name))}) version {version}, which this run was "
                                "reading, has been deleted: nothing is committed under that name now",
                                f"write it again: {writing_stage(name)}")
        now = f"the committed version is now {current['version']}"
        return StorageError(
            f"{what or name} ({self.url(self.path(name))}) version {version}, which this run was reading, has been "
            f"removed: a newer commit superseded it and its grace period of {self.grace_s:g} s ran out "
            f"({now})",
            f"re-run this step: it reads the current version. So that long reads finish, raise {GRACE_ENV} "
            f"(seconds a superseded version stays readable; now {self.grace_s:g}) in the environment of every "
            "run that commits")

    @contextlib.contextmanager
    def reading(self, name: str, version: str, what: str | None = None) -> Iterator[None]:
        """Turn an error from reading a removed version into the StorageError that says so."""
        try:
            yield
        except (OSError, KeyError) as error:
            if not self.fs.exists(self.path(name, version)):
                raise self.vanished(name, version, what) from error
            raise

    # -- what the writer wrote ---------------------------------------------------------------

    def _record_checksums(self, version_path: str) -> dict:
        """Write the version's CHECKSUMS.json (every file's size and sha256); return what the
        pointer records of it: its own sha256, the number of files and their bytes."""
        recorded = checksums.record(self.fs, version_path, skip=(WRITER_MARK,))
        body = json.dumps(recorded, sort_keys=True, separators=(",", ":")).encode()
        self.write_bytes_atomic(f"{version_path}/{CHECKSUMS}", body)
        return {checksums.HASH: checksums.digest_bytes(body), "files": len(recorded["files"]),
                "bytes": sum(f["size"] for f in recorded["files"].values())}

    def recorded_files(self, name: str, version: str, what: str | None = None) -> dict | None:
        """``{relative path: {"size", "sha256"}}`` the writer of ``name``'s ``version`` recorded;
        None for a version committed before checksums were (logged once). A StorageError when the
        record is missing or was changed (against the sha256 the pointer holds of it)."""
        pointer = self.pointer(name)
        expected = ((pointer or {}).get(CHECKSUMS_FIELD) or {}).get(checksums.HASH) \
            if (pointer or {}).get("version") == version else None
        try:
            body = self.fs.cat_file(self.path(name, version, CHECKSUMS))
        except FileNotFoundError:
            if not self.fs.exists(self.path(name, version)):
                raise self.vanished(name, version, what) from None
            if expected:
                raise self.damaged_version(name, version, [f"{CHECKSUMS} is missing"], what) from None
            self._log_unrecorded(name, version, what)
            return None
        if expected and checksums.digest_bytes(body) != expected:
            raise self.damaged_version(name, version, [f"{CHECKSUMS} has changed since the commit"], what)
        return json.loads(body)["files"]

    def check_intact(self, name: str, version: str | None = None, under: str = "", what: str | None = None) -> None:
        """The cheap check every reader makes before reading ``under`` (a sub-folder; '' the whole
        version) of ``name``'s ``version`` (default: the committed one): each file the writer
        recorded is there with its size, none was added, and the small JSON files (zarr's shapes,
        cfg.json, config.json) hash as recorded. Costs one listing and the JSON reads.
        Raises StorageError naming the artifact, each damaged file and the fix (``damaged``)."""
        if version is None:
            version = self.version_of(self.require(name, what or name, rebuild_fix(self, name)))
        recorded = self.recorded_files(name, version, what)
        if recorded is None:
            return
        recorded, found = checksums.under(recorded, under), self._found(name, version, under)
        problems = checksums.presence_problems(recorded, found)
        small = [rel for rel in checksums.checked_on_read(recorded) if found.get(rel) == recorded[rel]["size"]]
        if small:
            paths = {self.path(name, version, rel): rel for rel in small}
            data = self.fs.cat(list(paths), on_error="return")
            digests = {paths[p]: checksums.digest_bytes(d) for p, d in data.items() if isinstance(d, bytes)}
            problems += checksums.content_problems(recorded, digests)
        if problems:
            raise self.damaged_version(name, version, problems, what)

    def verify(self, name: str, progress=None) -> dict:
        """Every byte of ``name``'s committed version re-hashed against what its writer recorded:
        ``{"name", "version", "status": "ok" | "damaged" | "unrecorded" (committed before
        checksums), "problems": [one line per file], "bytes"}``. ``progress(n_bytes)`` as it reads."""
        version = self.version_of(self.require(name, name, rebuild_fix(self, name)))
        result = {"name": name, "version": version, "problems": [], "bytes": 0}
        try:
            recorded = self.recorded_files(name, version)
        except StorageError as error:
            return {**result, "status": "damaged", "problems": [error.problem]}
        if recorded is None:
            return {**result, "status": "unrecorded"}
        found = self._found(name, version, "")
        problems = checksums.presence_problems(recorded, found)
        whole = [rel for rel in recorded if found.get(rel) == recorded[rel]["size"]]
        with ThreadPoolExecutor(max_workers=checksums.HASH_THREADS) as pool:
            hashed = pool.map(lambda r: checksums.digest_file(self.fs, self.path(name, version, r), progress), whole)
            problems += checksums.content_problems(recorded, dict(zip(whole, hashed)))
        return {**result, "status": "damaged" if problems else "ok", "problems": problems,
                "bytes": sum(found[rel] for rel in whole)}

    def committed_artifacts(self, prefix: str = "") -> list[str]:
        """Every committed artifact name under ``prefix`` ('' the whole root), sorted: folders
        holding a pointer, searched without descending into version folders."""
        names, folders = [], [prefix.strip("/")]
        while folders:
            folder = folders.pop()
            try:
                entries = self.fs.ls(self.path(folder), detail=True)
            except FileNotFoundError:
                continue
            bases = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] for e in entries}
            if bases.get(POINTER) == "file" and folder:
                names.append(folder)
            folders += [f"{folder}/{b}".strip("/") for b, kind in bases.items()
                        if kind == "directory" and not b.startswith((VERSION_PREFIX, "."))]
        return sorted(names)

    def damaged_version(self, name: str, version: str, problems: list[str], what: str | None = None) -> StorageError:
        """The error for a version whose files differ from what its writer recorded."""
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        return StorageError(
            f"{what or name} ({self.url(self.path(name, version))}) is damaged: {shown}",
            f"{rebuild_fix(self, name)} (sae-platform verify {name} lists every damaged file)")

    def _found(self, name: str, version: str, under: str) -> dict[str, int]:
        """{path relative to the version: size} of the files under ``under``, without the protocol's marks."""
        if not self.fs.exists(self.path(name, version)):
            raise self.vanished(name, version)
        prefix = f"{under.strip('/')}/" if under.strip("/") else ""
        marks = (WRITER_MARK, SUPERSEDED_MARK, CHECKSUMS)
        found = checksums.listing(self.fs, self.path(name, version, under), skip=marks)
        return {f"{prefix}{rel}": size for rel, size in found.items()}

    def _log_unrecorded(self, name: str, version: str, what: str | None) -> None:
        if self.path(name, version) in _UNRECORDED_SEEN:
            return
        _UNRECORDED_SEEN.add(self.path(name, version))
        log.warning("%s (%s) was committed before content checksums were recorded: it is read as before, but a "
                    "missing or changed file in it cannot be detected. Re-run the stage that writes it to record "
                    "them (%s)", what or name, self.url(self.path(name, version)), rebuild_fix(self, name))

    def _writer(self, version_path: str) -> dict | bool | None:
        """The writer mark of a version: None when it has none (committed once, since superseded),
        False when it is unreadable (a writer that died writing it: taken for dead)."""
        return self._protocol_json(f"{version_path.rstrip('/')}/{WRITER_MARK}", ("host", "pid", "started"),
                                   "its writer is taken for dead and the version is swept")

    def _writer_alive(self, writer: dict | bool) -> bool:
        if not writer:
            return False
        try:
            started, pid = float(writer["started"]), int(writer["pid"])
        except (TypeError, ValueError):
            return False
        if time.time() - started > STALE_WRITER_S:
            return False
        return writer["host"] != socket.gethostname() or process_alive(pid)

    def _in_flight(self, version_path: str) -> bool:
        writer = self._writer(version_path)
        return writer is not None and self._writer_alive(writer)

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    # -- file formats ----------------------------------------------------------------------

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        if self.is_local:
            write_local_atomic(path, data)
        else:
            self.fs.pipe_file(path, data)  # a single PUT: atomic on S3

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, path: str) -> Any:
        """A JSON file of an artifact; StorageError naming it when it is damaged (``damaged``)."""
        data = self.fs.cat_file(path)
        with self.damaged(path, "JSON file"):
            return json.loads(data)

    def write_parquet(self, path: str, frame: pl.DataFrame) -> None:
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="zstd")
        self.write_bytes_atomic(path, buffer.getvalue())

    def read_parquet(self, path: str) -> pl.DataFrame:
        """A parquet table of an artifact; StorageError naming it when it is damaged (``damaged``)."""
        import polars as pl  # here, not at the top: GPU machines without polars still train (gpu_check.py)

        data = self.fs.cat_file(path)
        with self.damaged(path, "parquet table"):
            return pl.read_parquet(io.BytesIO(data))

    @contextlib.contextmanager
    def damaged(self, path: str, what: str, fix: str | None = None) -> Iterator[None]:
        """Turn an error from decoding the artifact file (or folder) ``path`` into a StorageError
        naming it, the error and ``fix`` (default: re-run the stage that writes the artifact,
        after deleting it). Errors that already explain themselves (PlatformError), a missing
        file (or ``path`` gone meanwhile) and network faults pass unchanged: they are not damage."""
        try:
            yield
        except (PlatformError, FileNotFoundError, ConnectionError, TimeoutError, MemoryError):
            raise
        except Exception as error:
            if not self.fs.exists(path):
                raise  # gone, not damaged: ``reading`` says a version vanished
            detail = (str(error).strip().splitlines() or [""])[0][:300]
            raise StorageError(f"{what} {self.url(path)} is damaged and cannot be read ({type(error).__name__}: "
                               f"{detail})", fix or self._rewrite_fix(path)) from error

    def _rewrite_fix(self, path: str) -> str:
        """How to replace a damaged file of a committed version: delete the artifact (the folder
        holding its ``COMMITTED.json``) and re-run the stage that writes it (``catalog.rebuild_fix``)."""
        parts = path.rstrip("/").split("/")
        versions = [i for i, part in enumerate(parts) if part.startswith(VERSION_PREFIX)]
        artifact = "/".join(parts[:versions[-1]]) if versions else "/".join(parts[:-1])
        name = artifact[len(self.root):].strip("/") if artifact.startswith(self.root) else artifact
        return f"the file was damaged after it was committed (disk, copy or edit): {rebuild_fix(self, name)}"

    def zarr_store(self, path: str, read_only: bool = False) -> zarr.abc.store.Store:
        import zarr  # here, not at the top: GPU machines without zarr still train (gpu_check.py)

        if self.is_local:
            return zarr.storage.LocalStore(path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url(path), storage_options=fs_options(self.storage_options), read_only=read_only
        )

    def open_group(self, path: str, mode: str = "r") -> zarr.Group:
        import zarr

        return zarr.open_group(self.zarr_store(path, read_only=(mode == "r")), mode=mode, zarr_format=3)

    def open_checked_group(self, name: str, version: str, group: str, what: str | None = None) -> zarr.Group:
        """The zarr group ``group`` (a sub-folder) of ``name``'s ``version``, read-only, after
        ``check_intact`` found its chunks, sizes and shapes as the writer recorded them."""
        self.check_intact(name, version, group, what)
        return self.open_group(self.path(name, version, group), mode="r")

    def size_bytes(self, path: str) -> int:
        return int(self.fs.du(path, total=True))


def open_store(root_url: str, endpoint_url: str | None = None, create_bucket: bool | None = None) -> ArtifactStore:
    """The artifact store at ``root_url`` (a local folder, made absolute, or ``s3://bucket/prefix``;
    ``endpoint_url``: an S3-compatible endpoint; credentials come from the usual AWS chain;
    ``create_bucket``: see ``ArtifactStore``)."""
    url = root_url if "://" in root_url else os.path.abspath(root_url)
    return ArtifactStore(url, {"endpoint_url": endpoint_url} if endpoint_url and url.startswith("s3://") else {},
                         create_bucket=create_bucket)

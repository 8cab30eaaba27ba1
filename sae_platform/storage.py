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

The protocol's own small JSON files (the pointer, the writer mark, the superseded mark) may be
found empty or truncated: a writer on a full disk, a kill mid-write, a filesystem that lost the
data of a rename. None of them is ever a ``JSONDecodeError``: each is read by
:meth:`ArtifactStore._protocol_json`, which logs the file and takes it for absent or stale
(an unreadable pointer: nothing committed, so the step runs again and its commit replaces it; an
unreadable writer mark: a writer that died before it wrote its mark, swept at the next commit;
an unreadable superseded mark: its grace period is over). The writer mark is written atomically
and a commit whose mark cannot be written (a full disk) removes its version directory at once.
"""

import contextlib
import io
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
import zarr

from sae_platform.errors import StorageError

POINTER = "COMMITTED.json"
VERSION_PREFIX = "v-"
WRITER_MARK = ".writer.json"
STALE_WRITER_S = 24 * 3600  # a writer on another host silent this long is taken for dead
SUPERSEDED_MARK = ".superseded.json"
GRACE_ENV = "SAE_PLATFORM_GRACE_S"
DEFAULT_GRACE_S = 3600.0
log = logging.getLogger(__name__)


def grace_from_env() -> float:
    """Seconds a superseded version stays readable: ``$SAE_PLATFORM_GRACE_S``, default 3600."""
    raw = os.environ.get(GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise StorageError(f"{GRACE_ENV}={raw!r} is not a number of seconds >= 0",
                           f"set {GRACE_ENV} to the seconds a superseded artifact version stays readable "
                           f"(default {DEFAULT_GRACE_S:g}; 0 removes it at the next commit), or unset it")
    return value
_BUCKETS_SEEN: set[tuple[str, str, str]] = set()  # buckets checked once per process


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
        self.fs, self.root = fsspec.core.url_to_fs(self.root_url, **options)
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
            create = os.environ.get("SAE_PLATFORM_CREATE_BUCKET", "").strip().lower() in ("1", "true", "yes")
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
        except BaseException:
            self._remove(version_path)
            raise
        pointer = {"version": version, "committed_at": time.time(), **pointer_info}
        self.write_bytes_atomic(self.path(name, POINTER), json.dumps(pointer).encode())
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(mark)
        self._sweep_older_versions(name, keep=version)

    def resolve(self, name: str) -> str | None:
        """Path of the committed version of ``name``, or None if nothing was ever committed."""
        pointer = self.pointer(name)
        return None if pointer is None else self.path(name, pointer["version"])

    def require(self, name: str, what: str, fix: str) -> str:
        path = self.resolve(name)
        if path is None:
            raise StorageError(f"{what} is missing: no committed artifact at {self.url(self.path(name))}", fix)
        return path

    def pointer(self, name: str) -> dict | None:
        """The ``COMMITTED.json`` of ``name`` (``version`` plus what the writer recorded), or None
        when nothing is committed. An empty or truncated pointer counts as nothing committed (logged):
        the step that makes ``name`` runs again and its commit replaces the pointer; the version it
        named is kept for the grace period like any superseded one."""
        pointer = self._protocol_json(self.path(name, POINTER), ("version",),
                                      "taken as nothing committed; the next commit of it replaces the pointer")
        return pointer if isinstance(pointer, dict) else None

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
        current = self.pointer(name)
        now = (f"the committed version is now {current['version']}" if current is not None
               else "nothing is committed under that name now")
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
        return json.loads(self.fs.cat_file(path))

    def write_parquet(self, path: str, frame: pl.DataFrame) -> None:
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="zstd")
        self.write_bytes_atomic(path, buffer.getvalue())

    def read_parquet(self, path: str) -> pl.DataFrame:
        with self.fs.open(path, "rb") as f:
            return pl.read_parquet(f)

    def zarr_store(self, path: str, read_only: bool = False) -> zarr.abc.store.Store:
        if self.is_local:
            return zarr.storage.LocalStore(path, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(
            self.url(path), storage_options=self.storage_options, read_only=read_only
        )

    def open_group(self, path: str, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.zarr_store(path, read_only=(mode == "r")), mode=mode, zarr_format=3)

    def size_bytes(self, path: str) -> int:
        return int(self.fs.du(path, total=True))


def open_store(root_url: str, endpoint_url: str | None = None, create_bucket: bool | None = None) -> ArtifactStore:
    """The artifact store at ``root_url`` (a local folder, made absolute, or ``s3://bucket/prefix``;
    ``endpoint_url``: an S3-compatible endpoint; credentials come from the usual AWS chain;
    ``create_bucket``: see ``ArtifactStore``)."""
    url = root_url if "://" in root_url else os.path.abspath(root_url)
    return ArtifactStore(url, {"endpoint_url": endpoint_url} if endpoint_url and url.startswith("s3://") else {},
                         create_bucket=create_bucket)

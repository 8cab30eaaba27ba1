"""How every fsspec filesystem is opened: its listings are never served from a cache.

fsspec keeps one filesystem instance per protocol and options for the life of the process, and by
default each instance caches every directory listing it makes, for good; s3fs also answers
``info`` and ``exists`` from the cached listing of the parent folder. A process that lives long
(Dagster's code server evaluates the sensors every 30 s for weeks) would then never see a file
uploaded to an ``s3://`` inbox, a file replaced under its name (its size and ETag stay the cached
ones, so it is not re-cached, and a read of it fails s3fs's ETag check), nor a partition, pointer
or failed-attempt record that another run committed.

So every filesystem the platform opens, the artifact store's, the text source's, zarr's and the
browser's, has listing caching off: ``use_listings_cache=False``, the switch fsspec and s3fs
document for it. Every ``ls``, ``glob``, ``find``, ``exists`` and ``info`` then asks the store
itself. The instance is still shared (its connections are reused); only listings are not kept.
"""

from typing import Any

import fsspec
from fsspec.core import OpenFile
from fsspec.spec import AbstractFileSystem

FRESH_LISTINGS = {"use_listings_cache": False}


def fs_options(storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``storage_options`` (e.g. ``{"endpoint_url": ...}``) with listing caching off: the options
    for anything that builds an fsspec filesystem itself (zarr's ``FsspecStore``). A caller's
    ``use_listings_cache`` is overridden: no listing that decides what exists may be stale."""
    return {**(storage_options or {}), **FRESH_LISTINGS}


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem of ``url`` (a local path, ``file://``, ``s3://bucket/...``) and the path on it,
    its listings always fresh. Raises what fsspec raises for an unknown protocol (ValueError) or a
    missing implementation (ImportError)."""
    return fsspec.core.url_to_fs(url, **fs_options(storage_options))


def open_file(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None,
              compression: str | None = None) -> OpenFile:
    """``fsspec.open`` of ``url`` (``compression``: an fsspec codec name or None), on a filesystem
    whose listings are fresh: a file replaced under its name is opened with its new size and ETag."""
    return fsspec.open(url, mode, compression=compression, **fs_options(storage_options))

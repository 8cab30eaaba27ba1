"""The inbox's bookkeeping: which files are read, which are not and why, which failed, which are copies.

* ``scan_inbox``: the text source's listing (``corpus.scan_source``: keys, and files skipped with
  their reason), with byte-identical copies moved to the skipped list (``duplicates``).
* ``record_failed_attempt`` / ``failed_attempts``: a caching attempt that failed on a file's content
  writes ``activations/<key>/FAILED.json`` (the file's stamp, the reason, when) next to the
  partition's commit pointer, never inside a committed version; a successful commit removes it.
  ``needs_caching`` is then the one rule the sensor, ``full_pipeline`` and the nightly check share:
  a file needs a caching run when its current stamp is neither cached nor already tried.
* ``inbox_report``: what ``sae-platform status`` prints: skipped files, failed files, and cached
  partitions that no inbox file maps to any more.

Identical content under another name (``hamlet (1).txt`` beside ``hamlet.txt``) is reported and not
cached again, so it neither doubles that text's weight in training nor fills top-K lists with twin
windows. Which one is the original: the one already cached, else the older file, else the first
name. ``skip_duplicates=False`` (the text source's setting) caches copies too.
"""

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec

from sae_platform.catalog import failed_attempt_path, failed_attempts_glob, list_partitions, partition_name
from sae_platform.corpus import Listing, Skipped, TextFile, access_stamp, display_name, scan_source, source_stamp
from sae_platform.errors import printable
from sae_platform.storage import ArtifactStore

log = logging.getLogger(__name__)
# A file that could not be read for its permissions is tried again at least this often (seconds).
UNAVAILABLE_RETRY_S = 3600
_HASHES: dict[tuple[str, str], str] = {}  # (url, stamp) → sha256: a file is hashed once per version


@dataclass
class Inbox:
    files: list[TextFile]
    skipped: list[Skipped]
    stamps: dict[str, str]  # key → corpus.source_stamp
    access: dict[str, str] = field(default_factory=dict)  # key → corpus.access_stamp (local files)


def content_hash(text_file: TextFile, stamp: str, storage_options: dict | None = None) -> str:
    cached = _HASHES.get((text_file.url, stamp))
    if cached:
        return cached
    digest = hashlib.sha256()
    with fsspec.open(text_file.url, "rb", **(storage_options or {})) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    _HASHES[(text_file.url, stamp)] = digest.hexdigest()
    return _HASHES[(text_file.url, stamp)]


def duplicates(files: list[TextFile], stamps: dict[str, str], cached: Iterable[str] = (),
               storage_options: dict | None = None) -> dict[str, TextFile]:
    """Key of each file whose bytes equal another file's → that other file (the original). Only files
    of equal size are hashed."""
    cached = set(cached)
    by_size: dict[str, list[TextFile]] = {}
    for f in files:
        by_size.setdefault(stamps[f.key].split(":", 1)[0], []).append(f)
    copies: dict[str, TextFile] = {}
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_hash: dict[str, list[TextFile]] = {}
        for f in same_size:
            try:
                by_hash.setdefault(content_hash(f, stamps[f.key], storage_options), []).append(f)
            except OSError:  # removed meanwhile: caching it will say so
                continue
        for twins in by_hash.values():
            if len(twins) > 1:
                def rank(f: TextFile):
                    return (f.key not in cached, _mtime(stamps[f.key]), f.url)
                original, *others = sorted(twins, key=rank)
                copies.update({f.key: original for f in others})
    return copies


def _mtime(stamp: str) -> float:
    try:
        return float(stamp.split(":", 1)[1])
    except (IndexError, ValueError):
        return float("inf")  # an ETag: no order, the name decides


def scan_inbox(pattern: str, storage_options: dict | None = None, store: ArtifactStore | None = None,
               skip_duplicates: bool = True) -> Inbox:
    """The inbox as every automation sees it: files to cache (keys, stamps) and files skipped with why."""
    listing: Listing = scan_source(pattern, storage_options)
    files, skipped, stamps, access = [], list(listing.skipped), {}, {}
    for f in listing.files:  # a file removed since the listing is skipped, not an error for the others
        try:
            stamps[f.key] = source_stamp(f, storage_options)
            access[f.key] = access_stamp(f)
            files.append(f)
        except OSError as error:
            skipped.append(Skipped(f.url, f"cannot be inspected ({error}): removed meanwhile?"))
    if skip_duplicates and len(files) > 1:
        copies = duplicates(files, stamps, list_partitions(store) if store is not None else (), storage_options)
        skipped += [Skipped(f.url, f"identical content to {display_name(copies[f.key].url)} (partition "
                                   f"{copies[f.key].key}): not cached again (text source setting "
                                   "skip_duplicates: false caches copies)") for f in files if f.key in copies]
        files = [f for f in files if f.key not in copies]
        stamps = {f.key: stamps[f.key] for f in files}
    return Inbox(files, sorted(skipped, key=lambda s: s.url), stamps, {k: access[k] for k in stamps})


# -- failed caching attempts -----------------------------------------------------------------------

def record_failed_attempt(store: ArtifactStore, key: str, stamp: str | None, reason: str,
                          access: str | None = None) -> None:
    """Remember that caching ``key`` failed for the file version ``stamp`` (next to the pointer).
    ``access`` (``corpus.access_stamp``) marks a failure of the file's permissions, not of its
    text: that version is tried again once they change, or after ``UNAVAILABLE_RETRY_S``."""
    record = {"key": key, "stamp": stamp, "reason": reason, "failed_at": time.time()}
    store.write_json(failed_attempt_path(store, key), record if access is None else {**record, "access": access})


def clear_failed_attempt(store: ArtifactStore, key: str) -> None:
    path = failed_attempt_path(store, key)
    if store.fs.exists(path):
        store.fs.rm_file(path)


def failed_attempts(store: ArtifactStore) -> dict[str, dict]:
    """key → {stamp, reason, failed_at} for every recorded failure. A record that cannot be read
    (truncated, not JSON, fields missing: a full disk, a hand edit) is left out with a warning: its
    file is then tried again, and that attempt writes a whole record over it."""
    try:
        paths = store.fs.glob(failed_attempts_glob(store))
    except FileNotFoundError:
        return {}
    failed = {}
    for path in paths:
        try:
            record = _failure_record(store.fs.cat_file(path))
        except FileNotFoundError:  # cleared meanwhile
            continue
        except ValueError as error:
            log.warning("ignoring the unreadable failure record %s (%s): its file is tried again and the "
                        "record rewritten", printable(store.url(path)), error)
            continue
        failed[record["key"]] = record
    return failed


def _failure_record(data: bytes) -> dict:
    """A failure record's fields; ``ValueError`` when it is not a JSON object with a string key."""
    record = json.loads(data)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        raise ValueError("not a JSON object with a string 'key'")
    return record


def needs_caching(store: ArtifactStore, stamps: dict[str, str], access: dict[str, str] | None = None) -> list[str]:
    """Keys whose current file version is neither cached nor already tried (and failed); a file that
    could not be read for its permissions is tried again when ``access`` (key → current
    ``corpus.access_stamp``) differs from the one it failed with, or after ``UNAVAILABLE_RETRY_S``."""
    failed = failed_attempts(store)
    todo = []
    for key, stamp in sorted(stamps.items()):
        pointer = store.pointer(partition_name(key))
        if pointer is not None and pointer.get("source_stamp") in (None, stamp):
            continue  # cached (partitions cached before stamps were recorded count as current)
        if key in failed and _still_failing(failed[key], stamp, (access or {}).get(key)):
            continue  # this very version failed: wait for a new one (or new permissions)
        todo.append(key)
    return todo


def _still_failing(record: dict, stamp: str, access: str | None) -> bool:
    """Whether a failure record still holds for the file's current version (``stamp``) and permissions."""
    if record.get("stamp") != stamp:
        return False
    if "access" not in record:
        return True  # the text itself failed: only a new version is tried
    if access and access != record["access"]:
        return False  # chmod/chown since
    return time.time() < float(record.get("failed_at") or 0) + UNAVAILABLE_RETRY_S


def failed_current(store: ArtifactStore, stamps: dict[str, str], access: dict[str, str] | None = None
                   ) -> dict[str, dict]:
    """key → failure record, for files whose current version failed caching, is not cached and
    is not due to be tried again (``needs_caching``'s rule)."""
    failed = failed_attempts(store)
    return {k: r for k, r in failed.items() if k in stamps and _still_failing(r, stamps[k], (access or {}).get(k))}


def inbox_report(inbox: Inbox, store: ArtifactStore) -> list[str]:
    """Lines for `sae-platform status`: skipped files with their reason, failed files with theirs;
    control characters of file names (and of anything else) escaped (``errors.printable``)."""
    lines = [f"  skipped {display_name(s.url)}: {s.reason}" for s in inbox.skipped]
    lines += [f"  failed {k}: {record['reason']} (retried when the file changes"
              + (", or its permissions, or within the hour)" if "access" in record else ")")
              for k, record in sorted(failed_current(store, inbox.stamps, inbox.access).items())]
    listed = {f.key for f in inbox.files}
    lines += [f"  cached {k}: no inbox file has this key now (removed, renamed, a copy of another file, or named "
              f"under the older key rule); it is still shuffled and trained on: delete "
              f"{store.url(store.path(partition_name(k)))} to drop it"
              for k in list_partitions(store) if k not in listed]
    return [printable(line) for line in lines]

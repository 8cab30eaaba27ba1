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

from sae_platform.catalog import failed_attempt_path, failed_attempts_glob, list_partitions, partition_name
from sae_platform.corpus import (
    Listing,
    Skipped,
    TextFile,
    access_stamp,
    display_name,
    open_raw,
    scan_source,
    source_stamp,
)
from sae_platform.errors import SourceError, printable
from sae_platform.storage import ArtifactStore

log = logging.getLogger(__name__)
# A file that could not be read for its permissions is tried again at least this often (seconds).
UNAVAILABLE_RETRY_S = 3600
# Files are compared a block at a time; a sensor tick stops comparing when its Budget is spent.
BLOCK_BYTES = 64 << 20
_BLOCKS: dict[tuple[str, str], list[str]] = {}  # (url, stamp) → its blocks' digests read so far ('' = end)


@dataclass
class Inbox:
    files: list[TextFile]
    skipped: list[Skipped]
    stamps: dict[str, str]  # key → corpus.source_stamp
    access: dict[str, str] = field(default_factory=dict)  # key → corpus.access_stamp (local files)
    renamed: dict[str, str] = field(default_factory=dict)  # cached partition → key of the renamed file holding it


class OutOfTime(Exception):
    """The time given to compare files ran out (a sensor tick's budget); the rest waits for the next look."""


@dataclass
class Budget:
    """Until when one look may read files to compare them (``time.monotonic()``; None: no limit). A
    look reads at least one block, so comparisons cut short still end after enough looks."""

    deadline: float | None = None
    read_any: bool = False

    @classmethod
    def of(cls, seconds: float | None) -> "Budget":
        return cls(None if seconds is None else time.monotonic() + seconds)

    def spent(self) -> bool:
        return self.deadline is not None and self.read_any and time.monotonic() > self.deadline


def _block_digest(text_file: TextFile, stamp: str, index: int, budget: Budget,
                  storage_options: dict | None) -> str:
    """SHA-256 (hex) of block ``index`` (``BLOCK_BYTES`` each) of one file version, '' past its end.
    Blocks are read in order and kept per (url, stamp) for the life of the process, so a comparison
    cut short when ``budget`` is spent (``OutOfTime``) goes on where it stopped at the next look."""
    blocks = _BLOCKS.setdefault((text_file.url, stamp), [])
    if index < len(blocks):
        return blocks[index]
    if blocks and blocks[-1] == "":
        return ""
    with open_raw(text_file, storage_options) as f:
        f.seek(len(blocks) * BLOCK_BYTES)
        while len(blocks) <= index:
            if budget.spent():
                raise OutOfTime
            budget.read_any = True
            digest, remaining = hashlib.sha256(), BLOCK_BYTES
            while remaining and (chunk := f.read(min(remaining, 1 << 20))):
                digest.update(chunk)
                remaining -= len(chunk)
            blocks.append(digest.hexdigest() if remaining < BLOCK_BYTES else "")
            if blocks[-1] == "":
                break
    return blocks[index] if index < len(blocks) else ""


def content_digest(text_file: TextFile, stamp: str, storage_options: dict | None = None,
                   budget: Budget | None = None) -> str:
    """The identity of a file's bytes: SHA-256 (hex) of its blocks' SHA-256 digests in order (so it
    can be computed a block at a time, across sensor ticks). Raises ``OutOfTime`` once ``budget``
    is spent and ``OSError``/``SourceError`` when the file cannot be read."""
    digests, index, budget = [], 0, budget or Budget()
    while digest := _block_digest(text_file, stamp, index, budget, storage_options):
        digests.append(digest)
        index += 1
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _identical_groups(same_size: list[TextFile], stamps: dict[str, str], budget: Budget,
                      storage_options: dict | None) -> tuple[list[list[TextFile]], list[TextFile]]:
    """Groups of byte-identical files among files of one size, and the files not told apart before
    ``budget`` was spent. Compared a block at a time: files that differ early cost one block each."""
    groups, identical, undecided, index = [same_size], [], [], 0
    while groups:
        split = []
        for group in groups:
            by_digest: dict[str, list[TextFile]] = {}
            try:
                for f in group:
                    try:
                        by_digest.setdefault(_block_digest(f, stamps[f.key], index, budget, storage_options),
                                             []).append(f)
                    except (OSError, SourceError):  # unreadable or removed meanwhile: caching it will say so
                        continue
            except OutOfTime:
                undecided += group
                continue
            for digest, members in by_digest.items():
                if len(members) > 1:
                    (split if digest else identical).append(members)
        groups, index = split, index + 1
    return identical, undecided


def duplicates(files: list[TextFile], stamps: dict[str, str], cached: Iterable[str] = (),
               storage_options: dict | None = None, budget: Budget | None = None
               ) -> tuple[dict[str, TextFile], list[TextFile]]:
    """(key of each file whose bytes equal another file's → that other file (the original), files of
    equal size not yet compared when ``budget`` was spent). Only files of equal size are read."""
    cached, budget = set(cached), budget or Budget()
    by_size: dict[str, list[TextFile]] = {}
    for f in files:
        by_size.setdefault(stamps[f.key].split(":", 1)[0], []).append(f)
    copies: dict[str, TextFile] = {}
    undecided: list[TextFile] = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        identical, not_yet = _identical_groups(same_size, stamps, budget, storage_options)
        undecided += not_yet
        for twins in identical:
            def rank(f: TextFile):
                return (f.key not in cached, _mtime(stamps[f.key]), f.url)
            original, *others = sorted(twins, key=rank)
            copies.update({f.key: original for f in others})
    return copies, undecided


def renamed(files: list[TextFile], stamps: dict[str, str], store: ArtifactStore, storage_options: dict | None = None,
            budget: Budget | None = None) -> tuple[dict[str, str], list[TextFile]]:
    """(key of each new file whose bytes are those of a cached partition no inbox file maps to any
    more (a renamed or moved file) → that partition, files not yet compared when ``budget``
    was spent). The partitions' digests are read from their commit pointers (``source_digest``);
    only files of a size some such partition was cached from are read."""
    listed, budget = {f.key for f in files}, budget or Budget()
    orphans: dict[str, dict[str, str]] = {}  # size → digest → partition key
    for key in list_partitions(store):
        pointer = store.pointer(partition_name(key)) or {}
        if key not in listed and pointer.get("source_digest") and pointer.get("source_stamp"):
            orphans.setdefault(pointer["source_stamp"].split(":", 1)[0], {})[pointer["source_digest"]] = key
    moved, undecided = {}, []
    for f in files:
        same_size = orphans.get(stamps[f.key].split(":", 1)[0])
        if not same_size or store.pointer(partition_name(f.key)) is not None:
            continue
        try:
            digest = content_digest(f, stamps[f.key], storage_options, budget)
        except OutOfTime:
            undecided.append(f)
            continue
        except (OSError, SourceError):
            continue
        if digest in same_size:
            moved[f.key] = same_size[digest]
    return moved, undecided


def _mtime(stamp: str) -> float:
    try:
        return float(stamp.split(":", 1)[1])
    except (IndexError, ValueError):
        return float("inf")  # an ETag: no order, the name decides


def scan_inbox(pattern: str, storage_options: dict | None = None, store: ArtifactStore | None = None,
               skip_duplicates: bool = True, hash_budget_s: float | None = None) -> Inbox:
    """The inbox as every automation sees it: files to cache (keys, stamps) and files skipped with why.
    With ``skip_duplicates``, copies of another file and renamed cached files are skipped; files that
    need comparing are read for at most ``hash_budget_s`` seconds (None: until done), and the ones
    not compared by then are skipped this time ("still comparing"), to be decided at a later look."""
    listing: Listing = scan_source(pattern, storage_options)
    files, skipped, stamps, access = [], list(listing.skipped), {}, {}
    for f in listing.files:  # a file removed since the listing is skipped, not an error for the others
        try:
            stamps[f.key] = listing.stamps.get(f.url) or source_stamp(f, storage_options)
            access[f.key] = access_stamp(f)
            files.append(f)
        except OSError as error:
            skipped.append(Skipped(f.url, f"cannot be inspected ({error}): removed meanwhile?"))
    moved: dict[str, str] = {}
    if skip_duplicates:
        budget = Budget.of(hash_budget_s)
        copies, undecided = duplicates(files, stamps, list_partitions(store) if store is not None else (),
                                       storage_options, budget)
        skipped += [Skipped(f.url, f"identical content to {display_name(copies[f.key].url)} (partition "
                                   f"{copies[f.key].key}): not cached again (text source setting "
                                   "skip_duplicates: false caches copies)") for f in files if f.key in copies]
        if store is not None:
            moved, not_yet = renamed([f for f in files if f.key not in copies], stamps, store, storage_options,
                                     budget)
            undecided += not_yet
            skipped += [Skipped(f.url, f"identical content to partition {moved[f.key]}, cached from this file "
                                       "under an earlier name: not cached again (renamed or moved)")
                        for f in files if f.key in moved]
        skipped += [Skipped(f.url, f"still comparing its content with another file of its size ({BLOCK_BYTES >> 20}"
                                   " MiB at a time): decided at a later look") for f in undecided]
        left_out = set(copies) | set(moved) | {f.key for f in undecided}
        files = [f for f in files if f.key not in left_out]
        stamps = {f.key: stamps[f.key] for f in files}
    return Inbox(files, sorted(skipped, key=lambda s: s.url), stamps, {k: access[k] for k in stamps},
                 {partition: key for key, partition in moved.items()})


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
              for k in list_partitions(store) if k not in listed and k not in inbox.renamed]
    return [printable(line) for line in lines]

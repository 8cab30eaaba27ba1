"""What a writer wrote, recorded at commit, and the comparisons that find anything missing or changed.

A zarr array reads a chunk file that is not there as its fill value (zeros), and an edited
``zarr.json`` shape adds or hides rows, so a damaged store reads back as plausible numbers. The
commit protocol (``storage.ArtifactStore.writing``) therefore records every file of a version
(``catalog.CHECKSUMS``: relative path, size in bytes, sha256) before it switches the pointer, and
readers compare against that record:

- on every read (``storage.ArtifactStore.check_intact``, cheap): each recorded file is present
  with its size, no file was added, and the small JSON files (zarr metadata with the shapes,
  ``cfg.json``, the base model's ``config.json``) hash as recorded;
- on demand (``storage.ArtifactStore.verify``, ``sae-platform verify``): every byte re-hashed.

sha256 because it is what ``sha256sum`` checks by hand and, with the SHA extensions of current
x86 and ARM CPUs, among the fastest of hashlib's digests (1.5 GB/s a core measured here against
0.8 GB/s for blake2b). Files are hashed on a few threads (hashlib releases the GIL).

Pure functions over an fsspec file system and paths: no artifact names here (catalog.py), no
commit protocol (storage.py).
"""

import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

HASH = "sha256"
FORMAT = 1
# Hashing at commit runs inside jobs with a memory budget (a shuffle worker may have 4 MiB): one
# thread (each further thread got its own malloc arena: 4 threads × 8 MiB reads held 19.7 MiB more
# in tests/test_shuffle.py's budget test, 2 × 1 MiB still 9.5), one 1 MiB block at a time; sha256
# streams at ~1.5 GB/s per core either way.
READ_BLOCK = 1 << 20  # bytes per read while hashing one file
HASH_THREADS = 1
CHECKED_ON_READ = ".json"  # files of this suffix are hashed on every read: metadata, small
CHECKED_ON_READ_MAX_BYTES = 4 << 20  # ... up to this size (a tokenizer.json is ~2 MB)


def digest_bytes(data: bytes) -> str:
    return hashlib.new(HASH, data).hexdigest()


def digest_file(fs, path: str, progress: Callable[[int], None] | None = None,
                consume: Callable[[int, bytes], None] | None = None) -> str:
    """sha256 (hex) of one file, streamed in ``READ_BLOCK`` reads; ``progress(n_bytes)`` after each,
    ``consume(offset, block)`` given each (a reader that wants the bytes too: one pass, not two)."""
    h, offset = hashlib.new(HASH), 0
    with fs.open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
            if consume:
                consume(offset, block)
            offset += len(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def listing(fs, folder: str, skip: Iterable[str] = ()) -> dict[str, int]:
    """{path relative to ``folder``: size in bytes} of every file under ``folder`` ({} if none),
    leaving out the relative paths in ``skip`` (the commit protocol's own marks)."""
    folder = folder.rstrip("/")
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
    skip = set(skip)
    files = {}
    for path, info in found.items():
        relative = path[len(folder) + 1:] if path.startswith(folder + "/") else path.rsplit("/", 1)[-1]
        if info.get("type", "file") == "file" and relative not in skip:
            files[relative] = int(info["size"])
    return files


def record(fs, folder: str, skip: Iterable[str] = ()) -> dict:
    """The record of every file under ``folder``: ``{"format", "hash", "files": {relative path:
    {"size": bytes, "sha256": hex}}}`` (JSON-ready), each file hashed once, on ``HASH_THREADS`` threads."""
    sizes = listing(fs, folder, skip)
    folder = folder.rstrip("/")
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        digests = dict(zip(sizes, pool.map(lambda rel: digest_file(fs, f"{folder}/{rel}"), sizes)))
    return {"format": FORMAT, "hash": HASH,
            "files": {rel: {"size": sizes[rel], HASH: digests[rel]} for rel in sorted(sizes)}}


def under(files: dict, prefix: str) -> dict:
    """The entries of ``files`` (relative path -> anything) inside the sub-folder ``prefix`` ('' all)."""
    prefix = prefix.strip("/")
    if not prefix:
        return files
    return {rel: v for rel, v in files.items() if rel == prefix or rel.startswith(prefix + "/")}


def presence_problems(recorded: dict, found: dict[str, int]) -> list[str]:
    """What differs between the recorded files (``record()["files"]``, restricted to one sub-folder)
    and those found (``listing``): missing files, sizes, files the writer did not write."""
    problems = []
    for rel, entry in recorded.items():
        if rel not in found:
            problems.append(f"{rel} is missing (the writer wrote {entry['size']:,} bytes)")
        elif found[rel] != entry["size"]:
            problems.append(f"{rel} is {found[rel]:,} bytes, the writer wrote {entry['size']:,}")
    problems += [f"{rel} ({found[rel]:,} bytes) was not written by the artifact's writer"
                 for rel in sorted(set(found) - set(recorded))]
    return problems


def content_problems(recorded: dict, digests: dict[str, str]) -> list[str]:
    """Files whose sha256 (``digests``: relative path -> hex, for the files hashed) differs from the record."""
    return [f"{rel} has changed: its sha256 is {digests[rel][:16]}…, the writer recorded {recorded[rel][HASH][:16]}…"
            for rel in sorted(digests) if digests[rel] != recorded[rel][HASH]]


def checked_on_read(recorded: dict) -> list[str]:
    """The recorded files that every read hashes (small JSON: shapes, configs)."""
    return [rel for rel, entry in recorded.items()
            if rel.endswith(CHECKED_ON_READ) and entry["size"] <= CHECKED_ON_READ_MAX_BYTES]

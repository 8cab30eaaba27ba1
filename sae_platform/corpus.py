"""Text in: a pluggable source of documents, and their packing into fixed-length contexts.

A source is an fsspec glob (local path, ``file://``, ``s3://…``) over text files: ``.txt``,
``.text``, ``.md``, ``.markdown`` (one document per file), ``.jsonl``, ``.ndjson`` (one document
per line, text in a named field) or ``.parquet`` (one document per row, text in a named column);
extensions are matched case-insensitively, and the text formats may be compressed (``.gz``,
``.bz2``, ``.xz``; ``.zst`` when the ``zstandard`` package is installed). Each file read is one
*batch*: one partition of the cached activations, keyed by its name (``partition_key``), so a new
file dropped into an inbox is a new partition.

What is read (``scan_source``): only regular files whose real path lies inside the source's
folder (the part of the glob before its first wildcard). Everything else the glob matches is
*skipped with a reason*, never read: hidden files (``.name``, macOS ``._name``, uploads in
progress), symbolic links leading outside the folder (``/etc/passwd``, ``/proc/self/environ``),
named pipes, devices, folders, empty files, unsupported formats, names that are not UTF-8.

Reading streams: text is decoded and tokenized a piece at a time and packing stops once
``max_contexts`` contexts are full, so memory does not grow with the file (``stream_contexts``).
A UTF-8 byte-order mark is dropped; UTF-16/32 files with a byte-order mark are decoded; JSONL
records are split on ``\\n`` only (a raw U+2028 inside a JSON string is valid JSON).

Whatever the input, memory stays bounded: a JSONL line is read at most ``max_record_chars``
characters at a time and a longer one is refused; a parquet file is read a few rows of one row
group at a time and a text value longer than ``max_record_chars`` is refused before it becomes a
Python string; a long record is tokenized in pieces like a text file; and leading whitespace is
kept only up to ``PIECE_CHARS`` characters. Anything that goes wrong while reading one file (a
corrupt page, a lone surrogate, a 5,000-digit number, nesting too deep for the JSON reader, …) is
a ``SourceError`` naming that file: the file fails alone (``iter_pieces``).

Documents are packed back to back into contexts of ``ctx_len`` tokens, each starting with the
start token; a start token also separates consecutive documents inside a context, as in
pre-training. Every token keeps its document id, so later stages (context windows) can stop at
document boundaries.
"""

import codecs
import errno
import hashlib
import io
import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import fsspec.compression
import numpy as np

from sae_platform.errors import SourceError, SourceUnavailable, printable
from sae_platform.filesystems import open_file, open_fs
from sae_platform.records import MAX_RECORD_CHARS, PIECE_CHARS, cut_pieces, jsonl_pieces, parquet_pieces
from sae_platform.sniff import magic, what_bytes_look_like

# Format of each extension (lower case): how a file's text is read.
TEXT_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".markdown": "text",
                ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
FORMATS = tuple(TEXT_FORMATS)
# Compression suffixes and fsspec's name for them (read when fsspec can, refused by name otherwise).
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".lz4": "lz4", ".sz": "snappy"}
# Common formats that are not read, and what to do about them.
REFUSED_FORMATS = {
    ".csv": "convert it to .jsonl (one {\"text\": …} object per line) or .parquet with a text column",
    ".tsv": "convert it to .jsonl (one {\"text\": …} object per line) or .parquet with a text column",
    ".json": "a single JSON document is not read: write one JSON object per line as .jsonl",
    ".zip": "unpack the archive into the inbox (or compress single files with gzip: NAME.txt.gz)",
    ".tar": "unpack the archive into the inbox", ".tgz": "unpack the archive into the inbox",
    ".pdf": "extract its text into a .txt file", ".docx": "export its text as .txt",
    ".html": "extract its text into a .txt file", ".htm": "extract its text into a .txt file",
}
# A text's label sidecar: ``<text file name>`` + this (``hamlet.txt.labels.json``), read by sparse
# probing (``text_labels``), never cached as text; docs/inbox.md, "Labels".
LABELS_SUFFIX = ".labels.json"
LABELS_SIDECAR = "a label sidecar (the labels of the text it is named after, read by sparse probing): not cached"
SUPPORTED = ".txt/.text/.md/.markdown, .jsonl/.ndjson, .parquet (text formats also as .gz/.bz2/.xz)"

KEY_MAX_BYTES = 96  # UTF-8 bytes of a partition key: well under any file-name limit once paths are built on it
HASH_SEP = "~"  # never part of a plain key, so a hashed key cannot equal a plain one
HASH_CHARS = 10
READ_BYTES = 1 << 20
SNIFF_BYTES = 4096  # bytes looked at to say what an undecodable file looks like
OPEN_ATTEMPTS = 3  # a local path changed while it was opened is resolved and checked again this often


@dataclass(frozen=True)
class TextFile:
    url: str
    key: str  # the activation partition this file becomes
    root: str = ""  # local sources: the real path of the source folder; reads must stay inside it
    name: str = field(default="", compare=False)  # path relative to the source folder


@dataclass(frozen=True)
class Skipped:
    """A file the source's glob matched but that is not read, and why."""

    url: str
    reason: str


@dataclass
class Listing:
    files: list[TextFile]
    skipped: list[Skipped]
    # url → source_stamp of a remote file, from the listing itself (one request per 1000 files, no
    # request per file); local files are stamped with os.stat by source_stamp
    stamps: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Document:
    doc_id: int
    source: str
    text: str


@dataclass
class Contexts:
    """Token ids [n_contexts, ctx_len] and the document each token came from."""

    tokens: np.ndarray
    doc_ids: np.ndarray
    dropped_tokens: int  # the tail that did not fill a last context (or that max_contexts left out)

    @property
    def n_contexts(self) -> int:
        return int(self.tokens.shape[0])


# -- names → partition keys ------------------------------------------------------------------------

def split_name(name: str) -> tuple[str, str, str | None]:
    """(stem, format extension, compression suffix) of a file name, extensions matched case-insensitively.
    An unknown format gives the whole last extension as ``ext``."""
    lower = name.lower()
    compression = next((c for c in COMPRESSIONS if lower.endswith(c) and len(lower) > len(c)), None)
    if compression:
        name, lower = name[: -len(compression)], lower[: -len(compression)]
    ext = next((e for e in TEXT_FORMATS if lower.endswith(e) and len(lower) > len(e)), None)
    if ext is None:
        dot = name.rfind(".")
        ext = lower[dot:] if dot > 0 else ""
    return name[: len(name) - len(ext)], ext, compression


def _is_plain(stem: str) -> bool:
    """Kept as it is: NFC letters/digits (any script), '_', '-', and '.' inside (no '..', no leading
    or trailing dot or dash)."""
    return (bool(stem) and unicodedata.normalize("NFC", stem) == stem
            and all(c.isalnum() or c in "_-." for c in stem) and stem[0] not in ".-" and stem[-1] != "."
            and ".." not in stem and len(stem.encode("utf-8")) <= KEY_MAX_BYTES)


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_CHARS]


def hashed_key(name: str) -> str:
    """The stem cleaned (other characters → '_'), cut to fit ``KEY_MAX_BYTES``, plus a hash of the whole name."""
    stem = unicodedata.normalize("NFC", split_name(name.rsplit("/", 1)[-1])[0])
    cleaned = re.sub(r"_+", "_", "".join(c if c.isalnum() or c in "_-" else "_" for c in stem)).strip("_-")
    budget = KEY_MAX_BYTES - len(HASH_SEP) - HASH_CHARS
    while len(cleaned.encode("utf-8")) > budget:
        cleaned = cleaned[:-1]
    return f"{cleaned.rstrip('_-') or 'file'}{HASH_SEP}{_digest(name)}"


def partition_key(path: str) -> str:
    """The partition key of one file name, alone: the name without its extension when that is a
    plain, short name ('hamlet_gut.txt' → 'hamlet_gut', '数据集一.txt' → '数据集一'); otherwise the
    cleaned name plus a short stable hash of the whole name ('a b.txt' → 'a_b~1f2e…', '...txt' →
    'file~…'). Always one safe path segment of at most ``KEY_MAX_BYTES`` bytes, valid as a Dagster
    partition key. ``assign_keys`` resolves the names whose plain keys would collide."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    stem = split_name(name)[0]
    return stem if _is_plain(stem) else hashed_key(name)


def _format_rank(name: str) -> tuple:
    stem, ext, compression = split_name(name)
    order = list(TEXT_FORMATS)
    as_written = name[len(stem):len(stem) + len(ext)]
    return (compression is not None, order.index(ext) if ext in order else len(order), as_written != ext,
            stem != stem.lower(), name)


def assign_keys(names: list[str]) -> dict[str, str]:
    """Keys for the files of one source (``names``: paths relative to the source folder). Injective:
    when several names share a plain key ('x.txt', 'x.jsonl', 'X.TXT'), the first by format (.txt,
    .text, .md, …, .jsonl, .parquet; uncompressed before compressed) keeps it and the others get the
    hashed form. A hashed key contains '~', which a plain key never does. Keys differing only in
    case count as colliding (one folder on a case-insensitive file system)."""
    keys = {n: partition_key(n) for n in names}
    groups: dict[str, list[str]] = {}
    for name, key in keys.items():  # case-folded: 'X' and 'x' would be one folder on macOS
        groups.setdefault(key.casefold(), []).append(name)
    for key, members in groups.items():
        if len(members) > 1:
            for name in sorted(members, key=lambda n: _format_rank(n.rsplit("/", 1)[-1]))[1:]:
                keys[name] = hashed_key(name)
    return keys


def check_key(key: str) -> str:
    """Refuse a partition key that is not one safe path segment (a last guard before any write)."""
    if (not key or key in (".", "..") or key.startswith(".") or any(c in key for c in "/\\\0")
            or len(key.encode("utf-8", "surrogateescape")) > KEY_MAX_BYTES + 32):
        raise SourceError(f"partition key {key!r} is not a safe path segment",
                          "partition keys come from corpus.partition_key/assign_keys; register the file "
                          "again (sae-platform register) and delete the partition with this key")
    return key


# -- which files are read --------------------------------------------------------------------------

def format_problem(name: str) -> str | None:
    """Why a file name is not read, or None when its format is supported."""
    _, ext, compression = split_name(name)
    if compression:
        codec = COMPRESSIONS[compression]
        if codec not in fsspec.available_compressions():
            return (f"compressed with {codec}, which this installation cannot read: decompress it "
                    f"(e.g. `{codec} -d`), or install the Python package for {codec}")
        if TEXT_FORMATS.get(ext) == "parquet":
            return "a compressed parquet file: parquet compresses internally; drop the plain .parquet file"
    if ext in TEXT_FORMATS:
        return None
    if ext in REFUSED_FORMATS:
        return f"unsupported format {ext}: {REFUSED_FORMATS[ext]}"
    return f"unsupported format {ext or '(no extension)'}: the inbox reads {SUPPORTED}"


def _glob_root(path: str) -> str:
    """The folder part of a glob before its first wildcard."""
    head = re.split(r"[*?\[]", path, maxsplit=1)[0]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _kind(mode: int) -> str:
    folder = "a folder: the source is not searched recursively (use a ** glob, e.g. inbox/**/*.txt)"
    for test, what in ((stat.S_ISDIR, folder),
                       (stat.S_ISFIFO, "a named pipe, not a regular file"), (stat.S_ISSOCK, "a socket, not a file"),
                       (stat.S_ISCHR, "a device, not a regular file"), (stat.S_ISBLK, "a device, not a regular file")):
        if test(mode):
            return what
    return "not a regular file"


def scan_source(pattern: str, storage_options: dict | None = None) -> Listing:
    """Every file ``pattern`` matches, either to read (with its key) or skipped with its reason."""
    fs, path = open_fs(pattern, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    root = _glob_root(path)
    real_root = os.path.realpath(root) if local else root
    try:
        matches = fs.glob(path, detail=True)  # name → info (type, size, ETag): one fresh listing
    except FileNotFoundError:
        matches = {}
    accepted, skipped = [], []
    for match, info in sorted(matches.items()):
        url = match if local else f"{protocol}://{match}"
        rel = match[len(root):].lstrip("/") if _inside(match, root) else match.rsplit("/", 1)[-1]
        reason = _skip_reason(info, match, rel, local, real_root)
        if reason:
            skipped.append(Skipped(url, reason))
        else:
            accepted.append((url, rel, info))
    keys = assign_keys([rel for _, rel, _ in accepted])
    files = [TextFile(url, keys[rel], real_root if local else "", rel) for url, rel, _ in accepted]
    return Listing(files, skipped, {} if local else {url: stamp_of(info) for url, _, info in accepted})


def _skip_reason(info: dict, match: str, rel: str, local: bool, real_root: str) -> str | None:
    """Why the file ``match`` (``info``: its listing entry, used for remote files) is not read, or None."""
    if any(part.startswith(".") for part in rel.split("/")):
        return "hidden (its name starts with '.': an upload in progress, macOS metadata, …): ignored"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8: rename the file"
    if local:
        try:
            link = os.lstat(match)
            real = os.path.realpath(match)
            info = os.stat(real)
        except OSError as error:
            return f"cannot be inspected ({error.strerror}): a broken link, or removed meanwhile"
        if not _inside(real, real_root):
            what = "a symbolic link" if stat.S_ISLNK(link.st_mode) else "reached through a link"
            return f"{what} to {real}, outside the inbox: not read (copy the file into the inbox instead)"
        if not stat.S_ISREG(info.st_mode):
            return _kind(info.st_mode)
        size = info.st_size
    else:
        if info.get("type") != "file":
            return "a folder: the source is not searched recursively (use a ** glob)"
        size = info.get("size")
    if rel.lower().endswith(LABELS_SUFFIX):
        return LABELS_SIDECAR
    problem = format_problem(rel.rsplit("/", 1)[-1])
    if problem:
        return problem
    if size == 0:
        return "empty (0 bytes): nothing to cache yet; it is picked up once it holds text"
    return None


def display_name(url: str) -> str:
    """A file's name (the last part of its URL) as it may be printed: control characters escaped."""
    return printable(url.rsplit("/", 1)[-1])


def list_source(pattern: str, storage_options: dict | None = None) -> list[TextFile]:
    """The readable files matching ``pattern``, sorted, each with its partition key; an error when
    there is none (the skipped files and their reasons are named)."""
    listing = scan_source(pattern, storage_options)
    if not listing.files:
        skipped = "; ".join(f"{display_name(s.url)}: {s.reason}" for s in listing.skipped[:5])
        raise SourceError(f"text source {pattern!r} matches no readable {'/'.join(FORMATS)} files"
                          + (f" ({len(listing.skipped)} skipped: {skipped})" if skipped else ""),
                          "check the path or glob (e.g. 'data/inbox/*.txt' or 's3://bucket/inbox/*.jsonl'); "
                          "for the demo corpus run `make setup`")
    return listing.files


def source_stamp(text_file: TextFile, storage_options: dict | None = None) -> str:
    """Size and modification time (the ETag on S3) of a text file: it changes when the file is
    replaced under the same name, which is how a re-uploaded batch gets cached again."""
    if text_file.root:  # local: the file the link leads to, never the link
        info = os.stat(os.path.realpath(text_file.url))
        return f"{info.st_size}:{info.st_mtime}"
    fs, path = open_fs(text_file.url, storage_options)
    return stamp_of(fs.info(path))


def stamp_of(info: dict) -> str:
    """The source stamp of a remote file from its fsspec info (``info()`` or a listing entry: the
    same fields): size, and the ETag (else a modification time)."""
    changed = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"{info.get('size')}:{changed}"


def resolve_source(pattern: str, endpoint_url: str | None = None) -> tuple[str, dict]:
    """A text source as fsspec needs it: the glob (a local one made absolute) and its storage
    options (an S3-compatible ``endpoint_url`` for ``s3://`` globs; credentials come from the
    usual AWS chain)."""
    if "://" not in pattern:
        return os.path.abspath(pattern), {}
    return pattern, ({"endpoint_url": endpoint_url} if endpoint_url and pattern.startswith("s3://") else {})


def find_file(pattern: str, key: str, storage_options: dict | None = None,
              files: list[TextFile] | None = None) -> TextFile:
    """The file of partition ``key`` among ``files`` (default: the source's listing)."""
    for f in scan_source(pattern, storage_options).files if files is None else files:
        if f.key == key:
            return f
    raise SourceError(f"no file in text source {pattern!r} has partition key {key!r}",
                      "the file may have been removed from the inbox (or skipped: `sae-platform status` lists "
                      "why); restore it, or delete the stale partition")


# -- reading ---------------------------------------------------------------------------------------

def open_raw(text_file: TextFile, storage_options: dict | None = None):
    """The file's stored bytes (still compressed), as a binary stream. A local file of a source is
    opened one folder at a time from ``/`` with ``O_NOFOLLOW`` (``_open_beneath``) along its real
    path, which must lie inside the source folder: a folder on the path flipped to a link between
    the check and the open makes the open fail instead of reading outside, and the path is then
    resolved and checked again. Raises ``SourceError`` (outside the source, not a regular file,
    vanished), ``SourceUnavailable`` (permission denied: ``permission_error``) and ``OSError``."""
    try:
        return _open_raw(text_file, storage_options)
    except PermissionError as error:
        raise permission_error(text_file, error) from error


def _open_raw(text_file: TextFile, storage_options: dict | None):
    if "://" in text_file.url and not text_file.url.startswith("file://"):
        return open_file(text_file.url, "rb", storage_options).open()
    path = text_file.url.removeprefix("file://")
    for attempt in range(OPEN_ATTEMPTS):
        real = os.path.realpath(path)
        if text_file.root and not _inside(real, text_file.root):
            raise SourceError(f"{text_file.url} leads to {real}, outside the text source {text_file.root}",
                              "copy the file into the inbox instead of linking to it")
        try:
            fd = _open_beneath(real)
            break
        except OSError as error:  # a link or a rename on the path since realpath: resolve again
            if error.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT) or attempt == OPEN_ATTEMPTS - 1:
                if isinstance(error, FileNotFoundError):
                    raise SourceError(f"{text_file.url} vanished before it could be read",
                                      "restore the file, or delete its partition") from error
                if error.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SourceUnavailable(f"{text_file.url}: a folder on its path kept being replaced (by "
                                            "a link or a file) while it was opened",
                                            "leave the inbox's folders in place; the file is tried again at "
                                            "the next look") from error
                raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"{text_file.url} is not a regular file", "only regular files are read; remove it")
    return os.fdopen(fd, "rb")


def permission_error(text_file: TextFile, error: OSError) -> SourceUnavailable:
    """The file may not be read by this process: a problem of its permissions, not of its text, so
    its caching is tried again once they change (``access_stamp``)."""
    if "://" in text_file.url and not text_file.url.startswith("file://"):
        return SourceUnavailable(f"{text_file.url} cannot be read: permission denied by the storage ({error})",
                                 "grant the platform's credentials read access to it (s3:GetObject); it is tried "
                                 "again within the hour")
    try:
        info = os.stat(os.path.realpath(text_file.url.removeprefix("file://")))
        owner = f"owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}"
    except OSError:
        owner = "a folder on its path may not be entered"
    return SourceUnavailable(f"{text_file.url} cannot be read: permission denied ({owner}; the platform runs as "
                             f"uid {os.geteuid()})",
                             "make it readable to the platform's user: chmod a+r FILE, or chown it to that user; "
                             "it is tried again as soon as its permissions change")


def access_stamp(text_file: TextFile) -> str:
    """Mode, owner and group of a local file ('' for remote ones, and when it cannot be inspected):
    it changes with chmod/chown, which is when a file that could not be read is tried again."""
    if not text_file.root:
        return ""
    try:
        info = os.stat(os.path.realpath(text_file.url.removeprefix("file://")))
    except OSError:
        return ""
    return f"{info.st_mode:o}:{info.st_uid}:{info.st_gid}"


def _open_beneath(real: str) -> int:
    """A read-only descriptor of the file at the absolute, link-free path ``real``, walking each
    folder with ``O_NOFOLLOW`` relative to the one before: no link on the path is followed, so what
    is opened is what was checked. Raises ``OSError`` (``ELOOP``/``ENOTDIR`` when a component is now
    a link or not a folder)."""
    *folders, name = real.strip("/").split("/")
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)


def _open_binary(text_file: TextFile, storage_options: dict | None):
    """The file's bytes, decompressed (``open_raw``, then the codec its name says)."""
    compression = COMPRESSIONS.get(split_name(text_file.url.rsplit("/", 1)[-1])[2] or "")
    raw = open_raw(text_file, storage_options)
    return fsspec.compression.compr[compression](raw, mode="rb") if compression else raw


def check_encoding(encoding: str, field: str = "resources.{text_source,holdout_text}.config.encoding") -> str:
    """``encoding`` when Python can decode text with it (``codecs.lookup``; not a bytes-to-bytes
    codec such as ``zlib`` or ``base64``). Checked when the text source is configured, so a typo
    stops the run before any file is read. SourceError naming ``field``, the value and the fix."""
    try:
        text_codec = codecs.lookup(encoding)._is_text_encoding
    except (LookupError, TypeError):
        text_codec = False
    if not text_codec:
        raise SourceError(f"{field} = {encoding!r} is not a text encoding Python knows",
                          f"set {field} to a text encoding such as utf-8 (the default), latin-1, utf-16 or cp1252 "
                          "(the names Python's codecs module accepts)")
    return encoding


def _codec(head: bytes, url: str, encoding: str) -> str:
    """The codec to decode with: byte-order marks win over the UTF-8 default."""
    if codecs.lookup(check_encoding(encoding)).name != "utf-8":
        return encoding
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    sample = head[:4096]
    known = magic(sample)  # a PNG or a ZIP holds many NUL bytes too: name what it is
    if known and b"\x00" in sample:
        raise SourceError(f"{url} is {known[0]}, not text", known[1])
    if sample and sample.count(0) * 4 >= len(sample):
        little = sample[1::2].count(0) >= sample[0::2].count(0)
        raise SourceError(f"{url} looks like UTF-16 or UTF-32 text without a byte-order mark "
                          f"({sample.count(0)} NUL bytes in its first {len(sample)})",
                          f"convert it: iconv -f UTF-16{'LE' if little else 'BE'} -t UTF-8 (or UTF-32…), or "
                          f"set the text source's encoding (encoding: utf-16-{'le' if little else 'be'})")
    return "utf-8"


def _decode_error(error: UnicodeDecodeError, text_file: TextFile, codec: str, storage_options) -> SourceError:
    """Name the first undecodable byte (its offset in the whole file) and the right fix."""
    offset, bad, head, sample = 0, None, b"", b""
    decoder = codecs.getincrementaldecoder(codec)()
    with _open_binary(text_file, storage_options) as f:
        while chunk := f.read(READ_BYTES):
            head = head or chunk[:SNIFF_BYTES]
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as found:
                bad = offset - pending + found.start
                byte = found.object[found.start]
                sample = found.object[max(found.start - SNIFF_BYTES // 2, 0):found.start + SNIFF_BYTES // 2]
                break
            offset += len(chunk)
        else:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as found:
                bad = offset - len(found.object) + found.start
                byte = found.object[found.start]
                sample = found.object
    where = f"byte {bad} is 0x{byte:02x}" if bad is not None else error.reason
    if codec.startswith("utf-8"):
        what, fix = what_bytes_look_like(head, sample)
        where += f"; it looks like {what}"
    else:
        fix = f"check the text source's encoding ({codec}); `file -bi FILE` names the file's encoding"
    return SourceError(f"{text_file.url} is not valid {codec.replace('-sig', '')}: {where}", fix)


def _text_stream(binary, text_file: TextFile, encoding: str, newline: str):
    head = binary.read(4096)  # for the byte-order mark; then chained back in front of the rest
    binary = io.BufferedReader(_Prefixed(head, binary), buffer_size=READ_BYTES)
    codec = _codec(head, text_file.url, encoding)
    return io.TextIOWrapper(binary, encoding=codec, errors="strict", newline=newline), codec


class _Prefixed(io.RawIOBase):
    """A raw stream: ``head`` then the rest of ``rest``."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self):
        self.rest.close()
        super().close()


def iter_pieces(text_file: TextFile, text_field: str = "text", encoding: str = "utf-8",
                storage_options: dict | None = None,
                max_record_chars: int = MAX_RECORD_CHARS) -> Iterator[tuple[int, str]]:
    """(document id, text) pieces in order; a document's pieces are consecutive. A .txt file is one
    document cut into pieces of about ``PIECE_CHARS`` at line ends; a JSONL line or parquet row is one
    document, cut the same way when it is long. Nothing but the current record is held in memory,
    and a record over ``max_record_chars`` characters is refused before it is read whole.

    Raises ``SourceError`` naming the file for *anything* that goes wrong reading it (undecodable
    bytes, invalid JSON, a corrupt parquet page, a record over the limit, an exception of the
    decoders such as RecursionError or MemoryError): the file's own failure, never the run's."""
    kind = TEXT_FORMATS.get(split_name(text_file.url.rsplit("/", 1)[-1])[1], "text")
    try:
        if kind == "parquet":
            with _open_binary(text_file, storage_options) as binary:
                yield from parquet_pieces(binary, text_file.url, text_field, max_record_chars, READ_BYTES)
        else:
            yield from _text_pieces(text_file, kind, text_field, encoding, storage_options, max_record_chars)
    except SourceError:
        raise
    except Exception as error:  # whatever else reading this one file raised is this file's failure
        raise _unreadable(text_file, error) from error


def _unreadable(text_file: TextFile, error: Exception) -> SourceError:
    url = text_file.url
    if isinstance(error, PermissionError):  # e.g. S3 denies a parquet file's GET after the open
        return permission_error(text_file, error)
    if isinstance(error, FileNotFoundError):
        return SourceError(f"{url} vanished before it could be read", "restore the file, or delete its partition")
    if isinstance(error, MemoryError):
        return SourceError(f"{url} ran out of memory while being read",
                           "split the file into smaller files, or lower resources.caching.config.max_record_chars")
    return SourceError(f"{url} cannot be read: {type(error).__name__}: {error}",
                       "replace it with a complete, valid copy (the other files are cached without it)")


def _text_pieces(text_file: TextFile, kind: str, text_field: str, encoding: str, storage_options,
                 max_record_chars: int) -> Iterator[tuple[int, str]]:
    codec = "utf-8"
    try:
        with _open_binary(text_file, storage_options) as binary:
            stream, codec = _text_stream(binary, text_file, encoding, newline="" if kind == "text" else "\n")
            if kind == "text":
                yield from cut_pieces(stream)
            else:
                yield from jsonl_pieces(stream, text_file.url, text_field, max_record_chars)
    except UnicodeDecodeError as error:
        raise _decode_error(error, text_file, codec, storage_options) from error
    except (EOFError, OSError) as error:  # truncated or corrupt compressed data, unreadable file
        if isinstance(error, FileNotFoundError):
            raise SourceError(f"{text_file.url} vanished before it could be read",
                              "restore the file, or delete its partition") from error
        if isinstance(error, PermissionError):  # e.g. S3 denies the GET after the open
            raise permission_error(text_file, error) from error
        raise SourceError(f"{text_file.url} cannot be read: {error}",
                          "replace it with a complete copy (a compressed file may be truncated)") from error


def read_documents(text_file: TextFile, text_field: str = "text", encoding: str = "utf-8",
                   storage_options: dict | None = None, max_record_chars: int = MAX_RECORD_CHARS) -> list[Document]:
    """Every document of a file, whole (small files: the held-out text, tests). Caching streams instead."""
    texts: dict[int, list[str]] = {}
    for doc_id, piece in iter_pieces(text_file, text_field, encoding, storage_options, max_record_chars):
        texts.setdefault(doc_id, []).append(piece)
    docs = [Document(i, text_file.url, "".join(t)) for i, t in texts.items()]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise SourceError(f"{text_file.url} holds no text (empty file or only whitespace)",
                          "remove the file from the text source, or fill it")
    return docs


def tokenize(tokenizer, docs: list[Document]) -> list[list[int]]:
    # model_max_length is the model's window, not a limit on how long a document may be.
    return [tokenizer(d.text, add_special_tokens=False, verbose=False)["input_ids"] for d in docs]


# -- packing ---------------------------------------------------------------------------------------

class ContextPacker:
    """Packs documents' tokens into [start, t1, …] contexts as they arrive; a start token separates
    documents. Tokens are kept as int32 arrays; ``full`` says when ``max_contexts`` contexts are filled
    (the caller stops reading there)."""

    def __init__(self, ctx_len: int, start_token_id: int, max_contexts: int | None = None, source: str = "the batch"):
        """``source`` names the text in errors (a file's URL: which of many inbox files is too short)."""
        if ctx_len < 2:
            raise SourceError(f"ctx_len {ctx_len} is too short", "use ctx_len >= 2 (default 128)")
        self.ctx_len, self.start, self.max_contexts, self.source = ctx_len, start_token_id, max_contexts, source
        self.tokens: list[np.ndarray] = []
        self.docs: list[np.ndarray] = []
        self.length = 0
        self.last_doc: int | None = None
        self.doc_ids: list[int] = []  # documents that contributed tokens, in order

    @property
    def full(self) -> bool:
        return self.max_contexts is not None and self.length >= self.max_contexts * (self.ctx_len - 1)

    def add(self, doc_id: int, tokens) -> None:
        tokens = np.asarray(tokens, dtype=np.int32)
        if doc_id != self.last_doc:
            if self.length:  # separator between documents; belongs to the next document
                tokens = np.concatenate([np.array([self.start], np.int32), tokens])
            self.doc_ids.append(doc_id)
            self.last_doc = doc_id
        self.tokens.append(tokens)
        self.docs.append(np.full(len(tokens), doc_id, np.int32))
        self.length += len(tokens)

    def finish(self) -> Contexts:
        body = self.ctx_len - 1
        n_contexts = self.length // body
        if self.max_contexts is not None:
            n_contexts = min(n_contexts, self.max_contexts)
        if n_contexts == 0:
            raise SourceError(f"{self.source} has {self.length} tokens, fewer than one context of {self.ctx_len}",
                              "add more text to the file, or lower resources.caching.config.ctx_len")
        used = n_contexts * body
        stream = np.concatenate(self.tokens)[:used]
        stream_docs = np.concatenate(self.docs)[:used]
        tokens = stream.reshape(n_contexts, body)
        docs = stream_docs.reshape(n_contexts, body)
        tokens = np.concatenate([np.full((n_contexts, 1), self.start, np.int32), tokens], axis=1)
        docs = np.concatenate([docs[:, :1], docs], axis=1)  # the start token belongs to the first doc
        return Contexts(tokens, docs, dropped_tokens=self.length - used)


def pack_contexts(token_lists: list[list[int]], doc_ids: list[int], ctx_len: int, start_token_id: int,
                  max_contexts: int | None = None) -> Contexts:
    """Pack documents into [start, t1, …] contexts; a start token separates documents."""
    packer = ContextPacker(ctx_len, start_token_id, max_contexts)
    for tokens, doc_id in zip(token_lists, doc_ids, strict=True):
        packer.add(doc_id, tokens)
    return packer.finish()


def stream_contexts(text_file: TextFile, tokenizer, ctx_len: int, start_token_id: int,
                    max_contexts: int | None = None, text_field: str = "text", encoding: str = "utf-8",
                    storage_options: dict | None = None,
                    max_record_chars: int = MAX_RECORD_CHARS) -> tuple[list[Document], Contexts]:
    """Read, tokenize and pack one file a piece at a time, stopping once ``max_contexts`` contexts are
    full: memory stays flat in the file's size. Returns the documents that contributed (without their
    text) and the contexts. Blank documents are left out, as ``read_documents`` does; of a document's
    leading whitespace only the last ``PIECE_CHARS`` characters are kept (a file of gigabytes of
    blanks costs no more than one piece). Raises ``SourceError`` naming the file (``iter_pieces``)."""
    packer = ContextPacker(ctx_len, start_token_id, max_contexts, source=text_file.url)
    pending_doc, pending = None, ""  # whitespace seen at the start of a document, not yet kept
    for doc_id, piece in iter_pieces(text_file, text_field, encoding, storage_options, max_record_chars):
        if doc_id != pending_doc:
            pending_doc, pending = doc_id, ""
        if doc_id != packer.last_doc and not piece.strip():
            pending = (pending + piece)[-PIECE_CHARS:]
            continue
        text, pending = pending + piece, ""
        packer.add(doc_id, tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if packer.full:
            break
    if not packer.doc_ids:
        raise SourceError(f"{text_file.url} holds no text (empty file or only whitespace)",
                          "remove the file from the text source, or fill it")
    return [Document(i, text_file.url, "") for i in packer.doc_ids], packer.finish()

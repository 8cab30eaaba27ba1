"""Document-level labels the user declares for the texts of the inbox: one sidecar file per text.

A text's labels live beside it as ``<text file name>.labels.json`` (``corpus.LABELS_SUFFIX``):
``hamlet.txt`` → ``hamlet.txt.labels.json``, holding one JSON object of label name → value::

    {"genre": "tragedy", "verse": true, "acts": 5}

Values are strings, booleans or integers (one value per label: the label holds for every document
and every context of the text). Sparse probing (``sparse_probing``) turns each label into binary
tasks over the texts that declare it. The inbox lists sidecars as "a label sidecar" and never
caches them as text (``corpus.scan_source``); a sidecar passes the same link and hidden-file checks
as a text and is opened the same way (``corpus.open_raw``).

A bad sidecar (not JSON, not an object, a value of another type, too large, naming no text) is
reported with its file name and the fix, and only its own text goes without labels: the other
sidecars and every source-text task still run.
"""

import hashlib
import json
from dataclasses import dataclass, field

from sae_platform.corpus import LABELS_SIDECAR, LABELS_SUFFIX, TextFile, display_name, open_raw
from sae_platform.errors import SourceError

MAX_SIDECAR_BYTES = 1 << 16  # a label file is a handful of names; anything larger is not one
LabelValue = str | bool | int
EXAMPLE = '{"genre": "tragedy", "verse": true}'


@dataclass
class TextLabels:
    """The labels read from an inbox's sidecars.

    ``labels``: partition key → {label name: value}; ``problems``: one line per sidecar refused
    (its file name, what is wrong, the fix); ``digests``: partition key → SHA-256 of its sidecar's
    bytes (what a result computed from them records, to notice an edited sidecar)."""

    labels: dict[str, dict[str, LabelValue]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)


def sidecar_url(text_file: TextFile) -> str:
    """Where the labels of ``text_file`` are declared: its URL plus ``.labels.json``."""
    return text_file.url + LABELS_SUFFIX


def parse_labels(data: bytes, name: str) -> dict[str, LabelValue]:
    """The labels in one sidecar's bytes (``name``: its file name, for the error).

    Raises SourceError naming the file, the problem and the fix when the bytes are not one JSON
    object of non-empty label names to strings, booleans or integers."""
    fix = f"write one JSON object of label name to a string, true/false or an integer, e.g. {EXAMPLE}"
    if len(data) > MAX_SIDECAR_BYTES:
        raise SourceError(f"label sidecar {name} is {len(data):,} bytes (at most {MAX_SIDECAR_BYTES:,})", fix)
    try:
        labels = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise SourceError(f"label sidecar {name} is not UTF-8 (byte {error.start})", fix) from error
    except json.JSONDecodeError as error:
        raise SourceError(f"label sidecar {name} is not valid JSON: {error.msg} at line {error.lineno} "
                          f"column {error.colno}", fix) from error
    if not isinstance(labels, dict):
        raise SourceError(f"label sidecar {name} holds a JSON {type(labels).__name__}, not an object", fix)
    for label, value in labels.items():
        if not label.strip():
            raise SourceError(f"label sidecar {name} has an empty label name", fix)
        if isinstance(value, float) or not isinstance(value, LabelValue):
            kind = "null" if value is None else type(value).__name__
            raise SourceError(f"label sidecar {name}: label {label!r} has a {kind} value ({json.dumps(value)[:40]})",
                              fix + " (a number with a fraction: write it as a string, or bin it)")
    return labels


def read_text_labels(files: list[TextFile], skipped_urls: list[tuple[str, str]],
                     storage_options: dict | None = None) -> TextLabels:
    """The labels of ``files`` (the inbox's texts) from the sidecars among ``skipped_urls`` (the
    inbox listing's skipped entries, (url, reason): sidecars are listed there as
    ``corpus.LABELS_SIDECAR``, after the hidden-file and link checks). Every sidecar is read on
    its own: one that is bad, or that names no text of the inbox, adds a line to ``problems`` and
    nothing else."""
    sidecars = {url for url, reason in skipped_urls if reason == LABELS_SIDECAR}
    by_text_url = {url[:-len(LABELS_SUFFIX)]: url for url in sidecars}
    found = TextLabels()
    for text_file in files:
        url = by_text_url.pop(text_file.url, None)
        if url is None:
            continue
        name = display_name(url)
        try:
            with open_raw(TextFile(url, text_file.key, text_file.root, text_file.name), storage_options) as raw:
                data = raw.read(MAX_SIDECAR_BYTES + 1)
            found.labels[text_file.key] = parse_labels(data, name)
            found.digests[text_file.key] = hashlib.sha256(data).hexdigest()
        except (SourceError, OSError) as error:
            found.problems.append(str(error) if isinstance(error, SourceError) else
                                  f"label sidecar {name} could not be read ({error})\n  How to fix: check the "
                                  "file's permissions, or remove it")
    for url in sorted(by_text_url.values()):
        found.problems.append(f"label sidecar {display_name(url)} names no text of the inbox (no file "
                              f"{display_name(url[:-len(LABELS_SUFFIX)])} is cached from it)\n  How to fix: name "
                              f"it after its text file plus {LABELS_SUFFIX} (hamlet.txt -> hamlet.txt{LABELS_SUFFIX})")
    return found

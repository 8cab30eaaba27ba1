"""What a text file's undecodable bytes look like, so its error gives the right advice.

A ``.txt`` that is not UTF-8 may be a PDF, an archive, compressed data, an image, UTF-16 text with
a byte-order mark read under another encoding, or Western European (Windows-1252) text. Only the
last is fixed by ``iconv -f cp1252``; ``what_bytes_look_like`` tells them apart from the file's
first bytes (magic numbers) and a sample around the bad byte (NUL bytes, control characters).
"""

import codecs

# Magic numbers at the start of a file: what it is, and what to do with it instead.
MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"%PDF-", "a PDF document", "extract its text into a .txt file (e.g. `pdftotext FILE`)"),
    (b"PK\x03\x04", "a ZIP archive (also .docx, .xlsx, .odt, .epub)", "unpack it, or export its text as .txt"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Microsoft Office document (.doc, .xls)", "export its text as .txt"),
    (b"\x1f\x8b", "gzip-compressed data", "add .gz to its name (NAME.txt.gz is decompressed while read), or gunzip it"),
    (b"BZh", "bzip2-compressed data", "add .bz2 to its name, or bunzip2 it"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "add .xz to its name, or unxz it"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "decompress it (`zstd -d`)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", "remove it: only text is read"),
    (b"\xff\xd8\xff", "a JPEG image", "remove it: only text is read"),
    (b"GIF8", "a GIF image", "remove it: only text is read"),
    (b"\x7fELF", "an ELF executable", "remove it: only text is read"),
    (b"SQLite format 3\x00", "an SQLite database", "export the text as .jsonl (one {\"text\": …} object per line)"),
    (b"PAR1", "a parquet file", "name it NAME.parquet (with a string column named by text_field)"),
)
BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"))
# A sample with more than this share of C0 control bytes (other than tab, newline, CR, form feed) is not text.
MAX_CONTROL_SHARE = 0.01
CP1252_FIX = ("if it is Western European text (Latin-1/Windows-1252), convert it: iconv -f cp1252 -t utf-8; "
              "`file -bi FILE` names other encodings; or set the text source's encoding (e.g. encoding: "
              "cp1252) if the whole source uses another one")


def magic(head: bytes) -> tuple[str, str] | None:
    """(what the file is, what to do) when ``head`` starts with a known magic number (``MAGIC``)."""
    return next(((what, fix) for number, what, fix in MAGIC if head.startswith(number)), None)


def what_bytes_look_like(head: bytes, sample: bytes) -> tuple[str, str]:
    """(what the bytes look like, what to do) for a file that failed to decode as UTF-8. ``head``:
    the file's first bytes (up to a few KiB); ``sample``: bytes around the first undecodable one.
    Windows-1252 advice only when the sample decodes as cp1252 into text without control bytes."""
    known = magic(head)
    if known:
        return known
    for bom, name in BOMS:
        if head.startswith(bom):
            return (f"{name} text (it starts with the byte-order mark {bom.hex(' ')})",
                    "set the text source's encoding to utf-8 (the default reads byte-order marks), or convert it: "
                    f"iconv -f {name} -t UTF-8")
    data = head + sample
    if b"\x00" in data:
        return (f"binary data ({data.count(0)} NUL bytes in {len(data)} sampled), not text",
                "remove it, or convert it to text; `file FILE` names what it is")
    try:
        text = sample.decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are no cp1252 character
        return ("bytes that are neither UTF-8 nor Windows-1252 text",
                "`file -bi FILE` names its encoding: convert it with iconv -f THAT -t UTF-8, or set the text "
                "source's encoding")
    controls = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r\f")
    if controls > MAX_CONTROL_SHARE * max(len(text), 1):
        return (f"binary data ({controls} control bytes in {len(text)} sampled), not text",
                "remove it, or convert it to text; `file FILE` names what it is")
    return "Western European text (Windows-1252/Latin-1), it seems", CP1252_FIX

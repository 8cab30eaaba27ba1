"""The site-wide index files of the feature browser: what lets the list sort, filter and search a
million features without fetching every feature's row.

All of it is static (any HTTP server or bucket serves it; no endpoint), written once per build
under ``data/<version>/`` and fetched only when the list needs it:

    order/<key>.<asc|desc>.i32   the row positions of every feature in that sort order (Int32,
                                 little-endian; missing values last either way, ties by feature id);
                                 fetched on the first sort by that column
    columns/density.f64          every feature's density (Float64, NaN = none): the filters and
                                 the overview's histogram; fetched on first use
    search/tokens/<n>.i32        token postings: for each token code of the file, the row positions
                                 of the features whose strongest tokens hold it (``row * 8 + j``, j
                                 its rank among them); a query fetches only the files of the tokens
                                 it matches (``index.json``'s ``token_files``: the first code of each)
    search/words/<hex>.json      the explanation words that start with those two characters (hex of
                                 their UTF-8): ``{"words": [...], "files": [...]}``, the words sorted,
                                 ``files`` the index of the first word of each postings file
    search/words/<hex>/<n>.i32   their postings, in the token files' layout, each a pair ``row, at``
                                 (``at`` the word's character offset in the listed explanation); a
                                 query fetches the small word list, then only the files of the words
                                 it matches (``index.json``'s ``word_files`` names the prefixes)

A row position is a feature's place in the list by id (``index.json``'s shard ranges, in order).
Binary layouts are documented at :func:`postings_files`. Units: bytes per feature (measured,
``docs/results.md``): 4 per order file, 8 for the density column, ~4 x tokens for the token postings
and ~8 x words of the explanation for the word postings.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import polars as pl

from sae_platform.tables import DENSITY, FEATURE, MAX

ORDERS = "order"
COLUMNS = "columns"
SEARCH = "search"
DENSITY_FILE = f"{COLUMNS}/density.f64"
POSTINGS_PER_FILE = 1 << 16   # Int32 entries per postings file at most, unless one token or word alone holds more
WORD_PREFIX = 2               # characters of a word that name its postings file
WORD_RE = re.compile(r"\w+")  # the words of an explanation (the page splits a query the same way)
TOKEN_RANK_BITS = 3           # a token posting is row << 3 | rank: at most 8 tokens per feature
N2G_F1, N2G_SUPPORT = "n2g_f1", "n2g_support"


def _order(values: np.ndarray, rows: np.ndarray, descending: bool, tier: np.ndarray | None = None) -> np.ndarray:
    """Row positions sorted by ``values`` (NaN last), ties by row, within ``tier`` (lower first)."""
    missing = np.isnan(values)
    key = np.where(missing, 0.0, -values if descending else values)
    tiers = missing.astype(np.int8) if tier is None else np.where(missing, 3, tier).astype(np.int8)
    return np.lexsort((rows, key, tiers)).astype("<i4")


def sort_orders(frame: pl.DataFrame, min_support: int) -> dict[str, bytes]:
    """The precomputed orders of the list, by file name: density and max, and the N2G F1 when
    ``frame`` has it (an F1 on fewer than ``min_support`` firings ranks after those with evidence,
    as the page did when it sorted in memory). ``frame``: one row per feature in row order."""
    rows = np.arange(frame.height)
    files = {}
    for key in (DENSITY, MAX, N2G_F1):
        if key not in frame.columns:
            continue
        values = frame[key].cast(pl.Float64).fill_null(np.nan).to_numpy()
        tier = None
        if key == N2G_F1:
            tier = (frame[N2G_SUPPORT].fill_null(0).to_numpy() < min_support).astype(np.int8)
        for direction, descending in (("asc", False), ("desc", True)):
            files[f"{ORDERS}/{key}.{direction}.i32"] = _order(values, rows, descending, tier).tobytes()
    return files


def density_column(frame: pl.DataFrame) -> bytes:
    """Every feature's density as little-endian Float64 (NaN: not measured), in row order."""
    return frame[DENSITY].cast(pl.Float64).fill_null(np.nan).to_numpy().astype("<f8").tobytes()


def postings_files(folder: str, lists: list[np.ndarray]) -> tuple[list[int], dict[str, bytes]]:
    """Postings lists, one per code (a token's or a word's place in its table), packed into files
    ``<folder>/<n>.i32``: (firsts, files), ``firsts[n]`` the first code of file ``n``.

    A file is little-endian Int32 ``[n_codes, offsets[0..n_codes], entries...]``, the entries of
    code ``firsts[n] + i`` being ``entries[offsets[i]:offsets[i + 1]]``. A file holds consecutive
    codes whose entries together stay within POSTINGS_PER_FILE, and a code with more gets a file of
    its own: a query for a rare code then fetches a small file, never a common neighbour's entries."""
    firsts, files = [], {}
    start = 0
    while start < len(lists):
        stop, size = start + 1, len(lists[start])
        while stop < len(lists) and size + len(lists[stop]) <= POSTINGS_PER_FILE:
            size += len(lists[stop])
            stop += 1
        chunk = lists[start:stop]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in chunk])])
        body = np.concatenate([[len(chunk)], offsets, *chunk]).astype("<i4")
        files[f"{folder}/{len(firsts)}.i32"] = body.tobytes()
        firsts.append(start)
        start = stop
    return firsts, files


def token_postings(tokens: list[list[str] | None]) -> tuple[list[str], list[int], dict[str, bytes]]:
    """The token search index: (token_table, token_files, files).

    ``tokens``: per row, the feature's strongest activating tokens, strongest first (at most 8).
    ``token_table``: every distinct token once (its code: its place). ``token_files`` and the files
    as :func:`postings_files` writes them below ``search/tokens``; an entry is ``row << 3 | rank``."""
    exploded = (pl.DataFrame({"tokens": tokens}, schema={"tokens": pl.List(pl.String)}).with_row_index("row")
                .with_columns(pl.col("tokens").fill_null([]))
                .with_columns(pl.int_ranges(pl.col("tokens").list.len()).alias("rank"))
                .explode(["tokens", "rank"]).drop_nulls("tokens"))
    if exploded.height and exploded["rank"].max() >= 1 << TOKEN_RANK_BITS:
        raise ValueError(f"more than {1 << TOKEN_RANK_BITS} search tokens for a feature")
    table = exploded["tokens"].unique(maintain_order=True)
    coded = exploded.join(pl.DataFrame({"tokens": table, "code": np.arange(table.len(), dtype=np.int64)}),
                          on="tokens", how="left").sort("code", "row")
    entries = (coded["row"].cast(pl.Int64).to_numpy() << TOKEN_RANK_BITS) | coded["rank"].cast(pl.Int64).to_numpy()
    counts = np.bincount(coded["code"].to_numpy(), minlength=table.len())
    bounds = np.concatenate([[0], np.cumsum(counts)])
    firsts, files = postings_files(f"{SEARCH}/tokens", [entries[bounds[c]:bounds[c + 1]] for c in range(table.len())])
    return table.to_list(), firsts, files


def word_file(prefix: str) -> str:
    """The word list of the words that start with ``prefix`` (their first WORD_PREFIX characters);
    their postings files are in the folder of the same name without ``.json``."""
    return f"{SEARCH}/words/{prefix.encode().hex()}.json"


def word_postings(explanations: list[str | None]) -> dict[str, bytes]:
    """The explanation search index: per prefix, its word list (``word_file``: ``{"words": [...],
    "files": [...]}``) and its postings files (:func:`postings_files`, entries ``row, at`` pairs)
    for every lower-cased word of at least WORD_PREFIX characters of each row's listed explanation
    (``at``: the word's first character offset there)."""
    buckets: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for row, text in enumerate(explanations):
        seen = set()
        for match in WORD_RE.finditer((text or "").lower()):
            word = match.group()
            if len(word) < WORD_PREFIX or word in seen:
                continue
            seen.add(word)
            buckets[word[:WORD_PREFIX]][word] += [row, match.start()]
    files = {}
    for prefix, postings in buckets.items():
        words = sorted(postings)
        listing = word_file(prefix)
        firsts, packed = postings_files(listing.removesuffix(".json"), [np.asarray(postings[w]) for w in words])
        files[listing] = json.dumps({"words": words, "files": firsts}, ensure_ascii=False,
                                    separators=(",", ":")).encode()
        files.update(packed)
    return files


def index_files(frame: pl.DataFrame, min_support: int) -> tuple[dict, dict[str, bytes]]:
    """Every site-wide index file (by path below ``data/<version>/``) and the fields ``index.json``
    gets to find them. ``frame``: one row per feature in row order, with ``feature``, ``density``,
    ``max``, ``tokens`` and, when explained, ``explanation``, ``n2g_f1``, ``n2g_support``."""
    files = {**sort_orders(frame, min_support), DENSITY_FILE: density_column(frame)}
    table, firsts, postings = token_postings(frame["tokens"].to_list())
    files.update(postings)
    fields = {"n_rows": frame.height, "sort_keys": sorted({name.split("/")[1].split(".")[0]
                                                          for name in files if name.startswith(ORDERS)}),
              "token_table": table, "token_files": firsts, "word_prefix": WORD_PREFIX}
    if "explanation" in frame.columns:
        words = word_postings(frame["explanation"].to_list())
        files.update(words)
        fields["word_files"] = sorted(name.split("/")[-1].removesuffix(".json") for name in words
                                      if name.endswith(".json"))
    assert frame[FEATURE].is_sorted()
    return fields, files

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
    search/words/<hex>.json      explanation word postings by the word's first two characters (hex
                                 of their UTF-8): ``{word: [row, at, row, at, ...]}``, ``at`` the
                                 word's character offset in the listed explanation; ``index.json``'s
                                 ``word_files`` names the files there are

A row position is a feature's place in the list by id (``index.json``'s shard ranges, in order).
Binary layouts are documented at :func:`token_postings`. Units: bytes per feature (measured,
``docs/results.md``): 4 per order file, 8 for the density column, ~4 x tokens for the postings.
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
POSTINGS_PER_FILE = 1 << 16   # token postings per file (a file holds whole tokens, so it may hold more)
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


def token_postings(tokens: list[list[str] | None]) -> tuple[list[str], list[int], dict[str, bytes]]:
    """The token search index: (token_table, token_files, files).

    ``tokens``: per row, the feature's strongest activating tokens, strongest first (at most 8).
    ``token_table``: every distinct token once (its code: its place). File ``n`` covers the codes
    from ``token_files[n]`` up to the next file's first; it is little-endian Int32:
    ``[n_codes, offsets[0..n_codes], postings...]``, the postings of code ``token_files[n] + i``
    being ``postings[offsets[i]:offsets[i + 1]]``, each ``row << 3 | rank``."""
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
    per_code = [entries[bounds[c]:bounds[c + 1]] for c in range(table.len())]
    firsts, files = [], {}
    start = 0
    while start < len(per_code):
        stop, size = start, 0
        while stop < len(per_code) and (size < POSTINGS_PER_FILE or stop == start):
            size += len(per_code[stop])
            stop += 1
        lists = per_code[start:stop]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in lists])])
        body = np.concatenate([[len(lists)], offsets, *lists]).astype("<i4")
        files[f"{SEARCH}/tokens/{len(firsts)}.i32"] = body.tobytes()
        firsts.append(start)
        start = stop
    return table.to_list(), firsts, files


def word_file(prefix: str) -> str:
    """The postings file of the words that start with ``prefix`` (their first WORD_PREFIX characters)."""
    return f"{SEARCH}/words/{prefix.encode().hex()}.json"


def word_postings(explanations: list[str | None]) -> dict[str, bytes]:
    """The explanation search index: per file (``word_file``), ``{word: [row, at, ...]}`` for every
    lower-cased word of at least WORD_PREFIX characters of each row's listed explanation."""
    buckets: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for row, text in enumerate(explanations):
        seen = set()
        for match in WORD_RE.finditer((text or "").lower()):
            word = match.group()
            if len(word) < WORD_PREFIX or word in seen:
                continue
            seen.add(word)
            buckets[word[:WORD_PREFIX]][word] += [row, match.start()]
    return {word_file(prefix): json.dumps(words, ensure_ascii=False, separators=(",", ":")).encode()
            for prefix, words in buckets.items()}


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
        fields["word_files"] = sorted(name.split("/")[-1].removesuffix(".json") for name in words)
    assert frame[FEATURE].is_sorted()
    return fields, files

"""The feature browser: a static single-page site generated from the feature tables.

In the spirit of Anthropic's feature browser and Neuronpedia. One page lists every latent of one
SAE run (density, max activation, its strongest tokens), sortable and searchable by feature id
and by token; a hash route ``#/feature/<id>`` shows one feature: its top activations with
per-token highlighting, examples per activation interval, random activating tokens, the
activation histogram, the top and bottom logit effects and the lineage (checkpoint, Dagster run,
shuffle, activation partitions).

Site layout (everything static; any plain HTTP server can serve it — ``fetch`` needs http, not
``file://``)::

    index.html                      the page shell: no inline script, a strict CSP
    static/app.js, static/app.css   the app (copied from ``browser_static/``)
    site.json                       {"version", "data"}: points at the data of the current build;
                                    written last, so a rebuild switches over in one write
    data/<version>/index.json       compact, loaded up front: per feature id, density, max and
                                    count (columnar), the strongest activating tokens of its top
                                    examples (indices into one token table; the token search and
                                    the list's token column), plus run, the SAE's hook point
                                    (shown in the header), lineage, histogram edges
    data/<version>/features/<k>.json   the full data of features [k*64, (k+1)*64): fetched only
                                    when one of them is opened

Per feature in a chunk file, examples are columnar (one list per field, the same order for all):
``kind``, ``rank``, ``interval``, ``activation``, ``center``, ``tokens`` (display strings),
``acts`` (the feature on every window token, 3 significant digits), ``noact`` (indices of
window tokens with no stored activation; null when all have one), ``partition``, ``row``,
``doc_id``.

Security: token strings are untrusted corpus text. The page inserts them only as text nodes
(``textContent``), never as markup; no JSON is embedded in HTML (all data is fetched JSON); the
page sets ``Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; …``
in a meta tag (and the bundled server sends it as a header too), so even an injected element
could not run script.

Writing is atomic. Locally, ``out`` is a symbolic link to a complete build in the sibling folder
``.<out>.versions/<version>/``: a build writes a new version folder there (marked in flight by
``.building.json`` with its process id) and switches by one ``rename`` of a new link over ``out``
(atomic on POSIX), so a reader sees the old site or the new one, never a half; a kill at any
point leaves the previous site served. Every build sweeps what earlier ones left (killed builds'
folders, the ``.tmp-*`` / ``.old-*`` folders of the earlier layout) and keeps the current version
and the one before it (a page opened before the switch still loads its feature files until the
next build). A site of the earlier layout (a real folder) is swapped for the link atomically too
(``renameat2(RENAME_EXCHANGE)`` on Linux). On an fsspec filesystem (``fs=``, or a URL) the
versioned data is written first and ``site.json`` last (the switch), and data versions older than
the previous one are removed after it.

Per feature, identical windows (same tokens, same centre, same kind and interval: the same text
at two places of the corpus) are shown once with their count (``twins``); the stored tables keep
every example. Byte-level tokens that are only part of a UTF-8 character are stored as ``""``
with the character on the token that completes it (see ``sae_platform.contexts``); the site
merges each such run into one span per character (``ntok``: tokens per span) carrying the
maximum activation of its tokens, so the activating token is always visible and marked.

Lineage: each shard may carry its own ``lineage`` (the record its ``feature_topk`` run wrote);
a feature page shows the one of its shard, with links into the Dagster UI at ``dagster_url``
(default ``$SAE_PLATFORM_DAGSTER_URL``, else http://127.0.0.1:3000).

``python -m sae_platform.browser serve DIR [--port N]`` serves a built site;
``python -m sae_platform.browser demo DIR [--features N]`` builds one from synthetic tables.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import http.server
import json
import math
import os
import re
import shutil
import socket
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from sae_platform.errors import PlatformError
from sae_platform.tables import (
    ACTIVATION,
    ACTS,
    BOTTOM_SCORES,
    BOTTOM_TOKEN_IDS,
    BOTTOM_TOKEN_STRS,
    CENTER,
    COOCCURRING,
    COOCCURRING_SHARES,
    COUNT,
    DENSITY,
    DOC_ID,
    EXAMPLE_COLUMNS,
    EXPLANATION,
    EXPLANATION_SCHEMA,
    FEATURE,
    HAS_ACT,
    HISTOGRAM,
    INTERVAL,
    KIND,
    KIND_ORDER,
    KIND_TOP,
    LOGIT_SCHEMA,
    MAX,
    MEAN,
    N_FIRINGS,
    N_MATCHES,
    N_TOKENS_TOTAL,
    NEIGHBOR_COSINES,
    NEIGHBORS,
    PARTITION,
    PATTERNS,
    PRECISION,
    RANK,
    RECALL,
    ROW,
    STATS_SCHEMA,
    SUM,
    TOKEN_IDS,
    TOKEN_STRS,
    TOP_SCORES,
    TOP_TOKEN_IDS,
    TOP_TOKEN_STRS,
)

# -- input tables (their schemas: sae_platform.tables, free of torch so that building and serving
#    a site never loads it) --------------------------------------------------------------------
STATS_FRAME = "feature_stats"
EXAMPLES_FRAME = "feature_examples"
CONTEXTS_FRAME = "feature_contexts"
LOGITS_FRAME = "logit_effects"
EXPLANATIONS_FRAME = "explanations"   # optional: sae_platform.metrics.explain_shard's table
INDEX_EXPLANATION_CHARS = 160         # explanation text kept in index.json for the search
SHARD_START, SHARD_STOP = "start", "stop"

# the columns a site reads from each table
STATS_COLUMNS = tuple(c for c in STATS_SCHEMA if c != SUM)
CONTEXT_COLUMNS = (*EXAMPLE_COLUMNS, CENTER, TOKEN_STRS, ACTS, HAS_ACT, DOC_ID)
LOGIT_COLUMNS = tuple(LOGIT_SCHEMA)
EXPLANATION_COLUMNS = tuple(c for c in EXPLANATION_SCHEMA if c != PATTERNS)

# -- the site ----------------------------------------------------------------------------------
CHUNK_FEATURES = 64        # features per lazily fetched data file
SEARCH_TOKENS = 6          # strongest distinct activating tokens per feature kept for search
ACT_SIG_FIGS = 3           # window activations in the chunk files
STAT_SIG_FIGS = 4          # densities, maxima, scores
SITE_POINTER = "site.json"
VERSION_RE = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")   # data/<version>: the only folders a rebuild removes
STATIC_FILES = ("app.js", "app.css")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'")

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SAE feature browser</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="static/app.css?v={css_hash}">
<script src="static/app.js?v={js_hash}" defer></script>
</head>
<body>
<header id="top"><a class="brand" href="#/">SAE feature browser</a><span id="run"></span></header>
<main id="app"><p class="status">Loading…</p></main>
<noscript>This feature browser needs JavaScript.</noscript>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------
# Input normalisation
# ---------------------------------------------------------------------------------------------

def _need(frame: pl.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PlatformError(f"{what} lacks columns {missing} (has {frame.columns})",
                            f"pass the {what} table as written by the feature pipeline")


def _finite(expr: pl.Expr) -> pl.Expr:
    """Non-finite floats become null (JSON has no NaN/inf)."""
    return pl.when(expr.is_finite()).then(expr).otherwise(None)


def _round(expr: pl.Expr, digits: int) -> pl.Expr:
    return _finite(expr.cast(pl.Float64)).round_sig_figs(digits)


def _round_list(expr: pl.Expr, digits: int) -> pl.Expr:
    return expr.list.eval(_finite(pl.element().cast(pl.Float64)).round_sig_figs(digits).cast(pl.Float32))


def _gather(shards: list[dict], key: str) -> list[pl.DataFrame]:
    return [s[key] for s in shards if s.get(key) is not None and s[key].height]


def _stats_frame(shards: list[dict]) -> pl.DataFrame:
    frames = []
    for frame in _gather(shards, STATS_FRAME):
        _need(frame, STATS_COLUMNS, STATS_FRAME)
        frames.append(frame.select(
            pl.col(FEATURE).cast(pl.Int64), pl.col(N_TOKENS_TOTAL).cast(pl.Int64), pl.col(COUNT).cast(pl.Int64),
            _round(pl.col(DENSITY), STAT_SIG_FIGS), _round(pl.col(MAX), STAT_SIG_FIGS),
            _round(pl.col(MEAN), STAT_SIG_FIGS), pl.col(HISTOGRAM).cast(pl.List(pl.Int64))))
    if not frames:
        return pl.DataFrame(schema={FEATURE: pl.Int64, N_TOKENS_TOTAL: pl.Int64, COUNT: pl.Int64,
                                    DENSITY: pl.Float64, MAX: pl.Float64, MEAN: pl.Float64,
                                    HISTOGRAM: pl.List(pl.Int64)})
    stats = pl.concat(frames)
    _unique_features(stats, STATS_FRAME)
    return stats


def _bin_edges(edges: list[float], stats: pl.DataFrame) -> list[float | None]:
    """The edges of every histogram bin (len = bins + 1). Histograms have either len(edges) - 1
    bins, or len(edges) + 1: an underflow bin below edges[0] (from 0 when edges[0] > 0, as
    activations are positive) and an overflow bin from edges[-1] up (None: unbounded)."""
    lengths = set(stats[HISTOGRAM].list.len().unique().drop_nulls().to_list())
    if not lengths or lengths == {len(edges) - 1}:
        return list(edges)
    if lengths == {len(edges) + 1}:
        return [0.0 if edges[0] > 0 else None, *edges, None]
    raise PlatformError(f"{STATS_FRAME}.{HISTOGRAM} has {sorted(lengths)} bins, which {len(edges)} hist_bin_edges "
                        "do not describe",
                        "pass the bin edges the histograms were computed with: len(edges) - 1 bins, or "
                        "len(edges) + 1 with underflow and overflow bins")


def _examples_frame(shards: list[dict]) -> pl.DataFrame:
    """One row per example, window included: the contexts table, plus any example that has no
    window (shown with its activation only)."""
    windows = []
    for frame in _gather(shards, CONTEXTS_FRAME):
        _need(frame, CONTEXT_COLUMNS, CONTEXTS_FRAME)
        windows.append(frame.select(
            pl.col(FEATURE).cast(pl.Int64), pl.col(KIND).cast(pl.String), pl.col(RANK).cast(pl.Int64),
            pl.col(INTERVAL).cast(pl.Int64), pl.col(ACTIVATION).cast(pl.Float32), pl.col(PARTITION).cast(pl.String),
            pl.col(ROW).cast(pl.Int64), pl.col(CENTER).cast(pl.Int32), pl.col(TOKEN_STRS).cast(pl.List(pl.String)),
            pl.col(ACTS).cast(pl.List(pl.Float32)), pl.col(HAS_ACT).cast(pl.List(pl.Boolean)),
            pl.col(DOC_ID).cast(pl.Int64)))
    schema = {FEATURE: pl.Int64, KIND: pl.String, RANK: pl.Int64, INTERVAL: pl.Int64, ACTIVATION: pl.Float32,
              PARTITION: pl.String, ROW: pl.Int64, CENTER: pl.Int32, TOKEN_STRS: pl.List(pl.String),
              ACTS: pl.List(pl.Float32), HAS_ACT: pl.List(pl.Boolean), DOC_ID: pl.Int64}
    ctx = pl.concat(windows) if windows else pl.DataFrame(schema=schema)
    bare = []
    for frame in _gather(shards, EXAMPLES_FRAME):
        _need(frame, EXAMPLE_COLUMNS, EXAMPLES_FRAME)
        bare.append(frame.select(
            pl.col(FEATURE).cast(pl.Int64), pl.col(KIND).cast(pl.String), pl.col(RANK).cast(pl.Int64),
            pl.col(INTERVAL).cast(pl.Int64), pl.col(ACTIVATION).cast(pl.Float32), pl.col(PARTITION).cast(pl.String),
            pl.col(ROW).cast(pl.Int64)))
    if bare:
        key = [FEATURE, KIND, RANK, PARTITION, ROW]
        missing = pl.concat(bare).join(ctx.select(key), on=key, how="anti", nulls_equal=True)
        if missing.height:
            ctx = pl.concat([ctx, missing], how="diagonal_relaxed")
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return ctx.with_columns(
        _kind_order=pl.col(KIND).replace_strict(order, default=len(order), return_dtype=pl.Int32),
    ).sort([FEATURE, "_kind_order", KIND, INTERVAL, RANK], nulls_last=True).drop("_kind_order")


def _logits_frame(shards: list[dict]) -> pl.DataFrame | None:
    frames = []
    for frame in _gather(shards, LOGITS_FRAME):
        _need(frame, LOGIT_COLUMNS, LOGITS_FRAME)
        frames.append(frame.select(
            pl.col(FEATURE).cast(pl.Int64),
            pl.col(TOP_TOKEN_IDS).cast(pl.List(pl.Int64)), pl.col(TOP_TOKEN_STRS).cast(pl.List(pl.String)),
            _round_list(pl.col(TOP_SCORES), STAT_SIG_FIGS),
            pl.col(BOTTOM_TOKEN_IDS).cast(pl.List(pl.Int64)), pl.col(BOTTOM_TOKEN_STRS).cast(pl.List(pl.String)),
            _round_list(pl.col(BOTTOM_SCORES), STAT_SIG_FIGS)))
    if not frames:
        return None
    logits = pl.concat(frames)
    _unique_features(logits, LOGITS_FRAME)
    return logits


def _explanations_frame(shards: list[dict]) -> pl.DataFrame | None:
    """Per feature: its N2G explanation and scores, nearest and co-occurring features (or None)."""
    frames = []
    for frame in _gather(shards, EXPLANATIONS_FRAME):
        _need(frame, EXPLANATION_COLUMNS, EXPLANATIONS_FRAME)
        frames.append(frame.select(
            pl.col(FEATURE).cast(pl.Int64), pl.col(EXPLANATION).cast(pl.String),
            _round(pl.col(PRECISION), 3).alias("n2g_precision"), _round(pl.col(RECALL), 3).alias("n2g_recall"),
            pl.col(N_MATCHES).alias("n2g_matches"), pl.col(N_FIRINGS).alias("n2g_firings"),
            pl.col(NEIGHBORS).cast(pl.List(pl.Int64)), _round_list(pl.col(NEIGHBOR_COSINES), 3),
            pl.col(COOCCURRING).cast(pl.List(pl.Int64)), _round_list(pl.col(COOCCURRING_SHARES), 3)))
    if not frames:
        return None
    frame = pl.concat(frames)
    _unique_features(frame, EXPLANATIONS_FRAME)
    p, r = pl.col("n2g_precision"), pl.col("n2g_recall")
    return frame.with_columns(pl.when(p + r > 0).then((2 * p * r / (p + r)).round_sig_figs(3))
                              .otherwise(pl.when(p.is_not_null() & r.is_not_null()).then(0.0)).alias("n2g_f1"))


def _unique_features(frame: pl.DataFrame, what: str) -> None:
    dup = frame.filter(pl.col(FEATURE).is_duplicated())[FEATURE].unique().sort().head(5).to_list()
    if dup:
        raise PlatformError(f"{what} has more than one row for features {dup}",
                            f"pass one {what} row per feature (each shard once)")


def _merge_byte_tokens(examples: pl.DataFrame) -> pl.DataFrame:
    """One span per character: a run of ``""`` tokens (bytes of a character completed by the next
    token) joins that token's span, which carries the maximum activation of the run, is the centre
    when any of its tokens is, and has a stored activation when any of them has. Adds ``ntok``
    (tokens per span; null for windows without such tokens)."""
    examples = examples.with_columns(pl.lit(None, pl.List(pl.Int32)).alias("ntok"))
    if examples.height == 0:
        return examples
    partial = examples[TOKEN_STRS].list.contains("").fill_null(False)
    if not partial.any():
        return examples
    indexed = examples.with_row_index("_i")
    dirty = indexed.filter(partial)
    tokens_out, acts_out, has_out, center_out, ntok_out = [], [], [], [], []
    for tokens, acts, has, center in dirty.select(TOKEN_STRS, ACTS, HAS_ACT, CENTER).iter_rows():
        acts = acts or [None] * len(tokens)
        has = has or [True] * len(tokens)
        st, sa, sh, sn, sc, run = [], [], [], [], None, []
        for j, token in enumerate(tokens):
            run.append(j)
            if token == "" and j < len(tokens) - 1:
                continue
            values = [acts[i] for i in run if has[i] and acts[i] is not None]
            if center is not None and center in run:
                sc = len(st)
            st.append(token if token != "" else "\ufffd")    # a character cut off by the window's end
            sa.append(max(values) if values else None)
            sh.append(any(has[i] for i in run))
            sn.append(len(run))
            run = []
        tokens_out.append(st)
        acts_out.append(sa)
        has_out.append(sh)
        center_out.append(sc)
        ntok_out.append(sn)
    merged = dirty.with_columns(
        pl.Series(TOKEN_STRS, tokens_out, dtype=pl.List(pl.String)),
        pl.Series(ACTS, acts_out, dtype=pl.List(pl.Float32)),
        pl.Series(HAS_ACT, has_out, dtype=pl.List(pl.Boolean)),
        pl.Series(CENTER, center_out, dtype=pl.Int32),
        pl.Series("ntok", ntok_out, dtype=pl.List(pl.Int32)))
    return pl.concat([indexed.filter(~partial), merged]).sort("_i").drop("_i")


def _fold_twins(examples: pl.DataFrame) -> pl.DataFrame:
    """Identical windows of a feature (same kind, interval, tokens and centre) kept once, the first
    (strongest) of them, with ``twins``: how many there were. Examples without a window are all kept."""
    if examples.height == 0:
        return examples.with_columns(pl.lit(1, pl.Int32).alias("twins"))
    indexed = examples.with_row_index("_i")
    bare = pl.when(pl.col(TOKEN_STRS).is_null()).then(pl.col("_i")).otherwise(None).alias("_bare")  # no window: own
    group = [FEATURE, KIND, INTERVAL, TOKEN_STRS, CENTER, "_bare"]
    return (indexed.with_columns(bare)
            .with_columns(pl.len().over(group).cast(pl.Int32).alias("twins"),
                          pl.col("_i").min().over(group).alias("_first"))
            .filter(pl.col("_i") == pl.col("_first")).drop("_i", "_bare", "_first"))


def _feature_ids(shards: list[dict]) -> np.ndarray:
    ranges = []
    for s in shards:
        if SHARD_START not in s or SHARD_STOP not in s:
            raise PlatformError("a shard lacks start/stop", "pass each shard as a dict with 'start' and 'stop' "
                                "(its latents [start, stop)) and its tables")
        start, stop = int(s[SHARD_START]), int(s[SHARD_STOP])
        if not 0 <= start <= stop:
            raise PlatformError(f"bad shard range [{start}, {stop})", "use 0 <= start <= stop")
        ranges.append(np.arange(start, stop, dtype=np.int64))
    ids = np.unique(np.concatenate(ranges)) if ranges else np.zeros(0, np.int64)
    if ids.size != sum(r.size for r in ranges):
        raise PlatformError("shard feature ranges overlap", "pass each feature shard once")
    return ids


# ---------------------------------------------------------------------------------------------
# Site data
# ---------------------------------------------------------------------------------------------

def _search_tokens(examples: pl.DataFrame) -> pl.DataFrame:
    """Per feature, its strongest distinct activating tokens in the top examples: (feature, tokens)."""
    top = examples.filter((pl.col(KIND) == KIND_TOP) & pl.col(TOKEN_STRS).is_not_null()).select(
        FEATURE, TOKEN_STRS, ACTS, HAS_ACT)
    exploded = top.explode([TOKEN_STRS, ACTS, HAS_ACT]).filter(
        (pl.col(ACTS) > 0) & pl.col(HAS_ACT).fill_null(True) & (pl.col(TOKEN_STRS).str.strip_chars() != ""))
    best = exploded.group_by([FEATURE, TOKEN_STRS]).agg(pl.col(ACTS).max())
    return best.group_by(FEATURE).agg(pl.col(TOKEN_STRS).sort_by(ACTS, descending=True).head(SEARCH_TOKENS))


def _index_json(ids: np.ndarray, stats: pl.DataFrame, examples: pl.DataFrame, meta: dict,
                explanations: pl.DataFrame | None = None) -> bytes:
    frame = pl.DataFrame({FEATURE: ids}).join(stats.select(FEATURE, DENSITY, MAX, COUNT), on=FEATURE, how="left",
                                              maintain_order="left")
    tokens = _search_tokens(examples)
    frame = frame.join(tokens, on=FEATURE, how="left", maintain_order="left")
    exploded = frame.select(FEATURE, TOKEN_STRS).explode(TOKEN_STRS).drop_nulls(TOKEN_STRS)
    table = exploded[TOKEN_STRS].unique(maintain_order=True)
    codes = exploded.join(pl.DataFrame({TOKEN_STRS: table, "_code": np.arange(table.len(), dtype=np.int32)}),
                          on=TOKEN_STRS, how="left", maintain_order="left").select(
        FEATURE, pl.col("_code").alias(TOKEN_STRS))
    per_feature = pl.DataFrame({FEATURE: ids}).join(
        codes.group_by(FEATURE, maintain_order=True).agg(pl.col(TOKEN_STRS)), on=FEATURE, how="left",
        maintain_order="left")
    index = {
        **meta,
        "columns": {
            FEATURE: frame[FEATURE].to_list(),
            DENSITY: frame[DENSITY].to_list(),
            MAX: frame[MAX].to_list(),
            COUNT: frame[COUNT].to_list(),
        },
        "token_table": table.to_list(),
        "top_tokens": [t if t is not None else [] for t in per_feature[TOKEN_STRS].to_list()],
    }
    if explanations is not None:  # searchable and sortable in the list: text and N2G F1
        ex = pl.DataFrame({FEATURE: ids}).join(explanations.select(FEATURE, "explanation", "n2g_f1"), on=FEATURE,
                                               how="left", maintain_order="left")
        index["columns"]["explanation"] = ex["explanation"].str.slice(0, INDEX_EXPLANATION_CHARS).to_list()
        index["columns"]["n2g_f1"] = ex["n2g_f1"].to_list()
    return _dumps(index)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _feature_frame(ids: np.ndarray, stats: pl.DataFrame, examples: pl.DataFrame,
                   logits: pl.DataFrame | None, explanations: pl.DataFrame | None = None) -> pl.DataFrame:
    ex = examples.select(
        FEATURE, KIND, RANK, INTERVAL, _round(pl.col(ACTIVATION), STAT_SIG_FIGS).alias(ACTIVATION), CENTER,
        pl.col(TOKEN_STRS).alias("tokens"),
        _round_list(pl.col(ACTS), ACT_SIG_FIGS).alias("acts"),
        pl.col(HAS_ACT).list.eval(pl.arg_where(pl.element().not_())).alias("noact"),
        PARTITION, ROW, DOC_ID, "twins", "ntok",
    ).with_columns(pl.when(pl.col("noact").list.len() > 0).then(pl.col("noact")).otherwise(None))
    grouped = ex.group_by(FEATURE, maintain_order=True).agg(pl.all())
    # ids are sorted and unique: left joins that keep the left order need no sort of nested data
    frame = pl.DataFrame({FEATURE: ids}).join(stats, on=FEATURE, how="left", maintain_order="left")
    if logits is not None:
        frame = frame.join(logits, on=FEATURE, how="left", maintain_order="left")
    if explanations is not None:
        frame = frame.join(explanations, on=FEATURE, how="left", maintain_order="left")
    examples_struct = pl.struct([c for c in grouped.columns if c != FEATURE]).alias("examples")
    frame = frame.join(grouped.select(FEATURE, examples_struct), on=FEATURE, how="left", maintain_order="left")
    return frame.with_columns((pl.col(FEATURE) // CHUNK_FEATURES).alias("_chunk"))


def _chunk_files(frame: pl.DataFrame) -> dict[str, bytes]:
    files = {}
    for (chunk,), part in frame.partition_by("_chunk", as_dict=True, maintain_order=True).items():
        files[f"features/{int(chunk)}.json"] = part.drop("_chunk").write_json().encode()
    return files


def _static_bytes() -> dict[str, bytes]:
    root = resources.files("sae_platform") / "browser_static"
    return {name: (root / name).read_bytes() for name in STATIC_FILES}


DAGSTER_URL_ENV = "SAE_PLATFORM_DAGSTER_URL"
DEFAULT_DAGSTER_URL = "http://127.0.0.1:3000"


def dagster_ui_url(url: str | None = None) -> str:
    """The Dagster UI the feature pages link to: ``url``, else $SAE_PLATFORM_DAGSTER_URL, else
    http://127.0.0.1:3000 (what ``make ui`` serves)."""
    url = (url or os.environ.get(DAGSTER_URL_ENV) or DEFAULT_DAGSTER_URL).strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s\"'<>]+", url):
        raise PlatformError(f"the Dagster UI URL {url!r} is not an http(s) URL",
                            f"set {DAGSTER_URL_ENV} to the UI's base URL, e.g. {DEFAULT_DAGSTER_URL}")
    return url


def _shard_lineage(shards: list[dict]) -> list[dict]:
    return [{"start": int(s[SHARD_START]), "stop": int(s[SHARD_STOP]),
             "lineage": json.loads(json.dumps(s["lineage"], default=str))}
            for s in shards if s.get("lineage") is not None]


def _evaluation_figures(report: dict | None) -> dict | None:
    """The finite numbers of an evaluation report (JSON has no NaN), rounded to 4 significant digits."""
    if not report:
        return None
    out = {}
    for key, value in report.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[str(key)] = value if isinstance(value, int) else float(f"{value:.4g}")
    return out


def site_files(*, run: str, shards: list[dict], hist_bin_edges: list[float], lineage: dict,
               n_intervals: int | None = None, version: str | None = None,
               dagster_url: str | None = None, evaluation: dict | None = None,
               hook_point: str | None = None) -> dict[str, bytes]:
    """Every file of the site, by relative path (what :func:`build_site` writes). ``evaluation``:
    the SAE's evaluation figures (``sae_eval``'s report), shown on the overview page."""
    edges = [float(e) for e in hist_bin_edges]
    if len(edges) < 2 or any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise PlatformError(f"bad hist_bin_edges {edges[:8]}…", "pass at least 2 finite, increasing bin edges")
    ids = _feature_ids(shards)
    stats = _stats_frame(shards)
    bin_edges = _bin_edges(edges, stats)
    examples = _fold_twins(_merge_byte_tokens(_examples_frame(shards)))
    logits = _logits_frame(shards)
    explanations = _explanations_frame(shards)
    version = version or time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    if not VERSION_RE.fullmatch(version):
        raise PlatformError(f"bad site version {version!r}", "use the form YYYYmmddTHHMMSS-<8 hex digits>")
    data = f"data/{version}"
    meta = {
        "run": str(run), "version": version, "n_features": int(ids.size),
        "hook_point": None if hook_point is None else str(hook_point),
        "chunk_features": CHUNK_FEATURES, "hist_bin_edges": bin_edges, "kind_order": list(KIND_ORDER),
        "n_intervals": None if n_intervals is None else int(n_intervals),
        "lineage": json.loads(json.dumps(lineage, default=str)),
        "shard_lineage": _shard_lineage(shards),
        "dagster_url": dagster_ui_url(dagster_url),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "evaluation": _evaluation_figures(evaluation),
    }
    files = {f"{data}/index.json": _index_json(ids, stats, examples, meta, explanations)}
    for name, body in _chunk_files(_feature_frame(ids, stats, examples, logits, explanations)).items():
        files[f"{data}/{name}"] = body
    static = _static_bytes()
    for name, body in static.items():
        files[f"static/{name}"] = body
    digest = {name: hashlib.sha256(body).hexdigest()[:12] for name, body in static.items()}
    files["index.html"] = INDEX_HTML.format(csp=CSP, css_hash=digest["app.css"], js_hash=digest["app.js"]).encode()
    files[SITE_POINTER] = _dumps({"version": version, "data": data, "run": str(run)})  # last: the switch
    return files


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def build_site(out, *, run: str, shards: list[dict], hist_bin_edges: list[float], lineage: dict,
               n_intervals: int | None = None, fs=None, dagster_url: str | None = None,
               evaluation: dict | None = None, hook_point: str | None = None) -> dict:
    """Generate the browser site for SAE ``run`` into ``out`` (a local directory, or a path on the
    fsspec filesystem ``fs``, or a URL). ``shards``: one dict per feature shard with ``start``,
    ``stop`` and the polars frames ``feature_stats``, ``feature_examples``, ``feature_contexts``,
    ``logit_effects`` (any may be None). ``hist_bin_edges``: the histogram bin edges (histograms
    with len(edges) + 1 counts have underflow and overflow bins). ``n_intervals``: when given, the
    interval examples are labelled with their range (interval j: [j, j+1) * max / n_intervals).
    A shard may carry ``lineage`` (its own record, shown on its features' pages); ``dagster_url``:
    the Dagster UI those pages link to (default: :func:`dagster_ui_url`). A shard may carry
    ``explanations`` (N2G explanation, scores, nearest and co-occurring features per feature) and
    ``evaluation`` is the SAE's evaluation report (the overview page shows its figures).
    ``hook_point``: where the SAE reads (e.g. ``blocks.4.hook_mlp_out``; a transcoder ``IN -> OUT``),
    shown in every page's header.
    Returns a summary: n_features, bytes, files, seconds, path, version, index_bytes."""
    t0 = time.perf_counter()
    files = site_files(run=run, shards=shards, hist_bin_edges=hist_bin_edges, lineage=lineage,
                       n_intervals=n_intervals, dagster_url=dagster_url, evaluation=evaluation,
                       hook_point=hook_point)
    pointer = json.loads(files[SITE_POINTER])
    if fs is None and "://" in str(out):
        import fsspec
        fs, out = fsspec.core.url_to_fs(str(out))
    if fs is None:
        path = _write_local(Path(out), files)
    else:
        path = _write_fs(fs, str(out).rstrip("/"), files, pointer["data"])
    index_bytes = len(files[f"{pointer['data']}/index.json"])
    return {"n_features": json.loads(files[f"{pointer['data']}/index.json"])["n_features"],
            "bytes": sum(len(b) for b in files.values()), "files": len(files),
            "seconds": round(time.perf_counter() - t0, 3), "path": str(path), "version": pointer["version"],
            "index_bytes": index_bytes}


_STEP_HOOK = None   # tests: called with the name of each step of a local build ("writing", "written", "switched")


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


BUILDING_MARK = ".building.json"
STALE_BUILD_S = 24 * 3600


def versions_dir(out: Path) -> Path:
    """Where the local builds of the site ``out`` live (``out`` is a link to one of them)."""
    return out.parent / f".{out.name}.versions"


def _check_target(out: Path, versions: Path) -> None:
    if out.is_symlink():
        target = Path(os.path.normpath(out.parent / os.readlink(out)))
        if target.parent == versions:
            return
        raise PlatformError(f"{out} is a link to {target}, not to a feature-browser build; not replacing it",
                            "pass a new directory, or the directory of an earlier site build")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SITE_POINTER).is_file())):
        raise PlatformError(f"{out} exists and is not a feature-browser site (no {SITE_POINTER}); not replacing it",
                            "pass a new directory, or the directory of an earlier site build")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _switch(out: Path, versions: Path, version: str) -> None:
    """Point ``out`` at ``versions/version`` in one atomic rename."""
    link = out.parent / f".{out.name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.join(versions.name, version), link)
    try:
        if out.is_dir() and not out.is_symlink():        # a site of the earlier layout: a real folder
            if _exchange(link, out):                      # now `link` is the old folder
                shutil.rmtree(link, ignore_errors=True)
                return
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)                               # no renameat2: two renames, old folder swept later
        os.replace(link, out)
    finally:
        if link.is_symlink():
            link.unlink()


def _build_alive(folder: Path) -> bool:
    try:
        mark = json.loads((folder / BUILDING_MARK).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    if time.time() - mark.get("started", 0) > STALE_BUILD_S:
        return False
    if mark.get("host") != socket.gethostname():
        return True
    from sae_platform.storage import process_alive

    return process_alive(int(mark.get("pid", -1)))


def sweep_site(out) -> list[str]:
    """Remove what earlier builds of ``out`` left: killed builds, leftovers of the earlier layout,
    and versions older than the one before the current. Returns the removed paths."""
    out = Path(os.path.abspath(out))
    versions = versions_dir(out)
    current = None
    if out.is_symlink():
        current = Path(os.readlink(out)).name
    removed = []
    for entry in out.parent.glob(f".{out.name}.*"):
        if entry == versions:
            continue
        if entry.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-", f".{out.name}.link-")):
            if entry.name.startswith(f".{out.name}.link-") and entry.is_symlink():
                entry.unlink()
            else:
                shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    if not versions.is_dir():
        return removed
    # complete builds, oldest first (by when their site.json was written: names may share a second)
    complete = sorted((p for p in versions.iterdir() if p.is_dir() and not (p / BUILDING_MARK).exists()
                       and (p / SITE_POINTER).is_file()), key=lambda p: (p / SITE_POINTER).stat().st_mtime_ns)
    names = [p.name for p in complete]
    before = names[:names.index(current)] if current in names else names
    previous = before[-1:]
    keep = {current, *previous}
    for entry in versions.iterdir():
        if entry.name in keep or _build_alive(entry):   # current, previous, another build in flight
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        removed.append(str(entry))
    return removed


def _write_local(out: Path, files: dict[str, bytes]) -> Path:
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = versions_dir(out)
    _check_target(out, versions)
    sweep_site(out)
    version = json.loads(files[SITE_POINTER])["version"]
    folder = versions / version
    folder.mkdir(parents=True)
    (folder / BUILDING_MARK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                    "started": time.time()}))
    try:
        for d in sorted({(folder / rel).parent for rel in files}):
            d.mkdir(parents=True, exist_ok=True)
        for i, (rel, body) in enumerate(files.items()):
            (folder / rel).write_bytes(body)
            if i == len(files) // 2:
                _step("writing")
        folder.chmod(0o755)
        (folder / BUILDING_MARK).unlink()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _step("written")
    _switch(out, versions, version)
    _step("switched")
    sweep_site(out)
    return out


def _write_fs(fs, out: str, files: dict[str, bytes], data: str) -> str:
    # Versioned data first, then the shell, then the pointer that switches readers over. The data
    # version the pointer named before stays (pages opened before the switch still load it) until
    # the next build; older ones are removed.
    try:
        previous = json.loads(fs.cat_file(f"{out}/{SITE_POINTER}")).get("data", "").split("/")[-1]
    except (FileNotFoundError, ValueError):
        previous = None
    order = sorted(files, key=lambda rel: (rel == SITE_POINTER, not rel.startswith("data/"), rel))
    for rel in order:
        fs.pipe_file(f"{out}/{rel}", files[rel])
    try:
        for old in fs.ls(f"{out}/data", detail=False):
            name = old.rstrip("/").split("/")[-1]
            if name not in (data.split("/")[-1], previous) and VERSION_RE.fullmatch(name):
                fs.rm(old, recursive=True)
    except FileNotFoundError:
        pass
    return out


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    quiet = False

    def end_headers(self):
        self.send_header("Content-Security-Policy", CSP + "; frame-ancestors 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        if self.path.split("?")[0].endswith(("/" + SITE_POINTER, "/index.html", "/")):
            self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)


def make_server(site_dir, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False,
                handler_methods: dict | None = None):
    """A threaded HTTP server for the site in ``site_dir`` (not started; port 0 picks a free one).
    ``handler_methods``: further request-handler methods (the live server's ``do_POST``)."""
    site_dir = Path(site_dir)
    if not (site_dir / SITE_POINTER).is_file():
        raise PlatformError(f"{site_dir} is not a built feature-browser site (no {SITE_POINTER})",
                            "build it first with sae_platform.browser.build_site, or point at its directory")
    handler = type("Handler", (_Handler,), {"quiet": quiet, **(handler_methods or {})})
    server = http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(site_dir)))
    server.daemon_threads = True
    return server


def serve(site_dir, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve a built site until interrupted."""
    serve_until_interrupted(make_server(site_dir, host, port),
                            f"Feature browser: http://{{host}}:{{port}}/  (serving {Path(site_dir).resolve()}; "
                            "Ctrl-C stops)")


def serve_until_interrupted(server, banner: str) -> None:
    """Print ``banner`` (``{host}``/``{port}`` filled in) and serve until Ctrl-C; close the socket."""
    h, p = server.server_address[:2]
    print(banner.format(host=h, port=p), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(site_dir, host: str = "127.0.0.1", port: int = 0, server=None):
    """Start a quiet server (``server``, or one for ``site_dir``) on a thread; returns (server, url).
    Stop with ``server.shutdown()``."""
    server = server or make_server(site_dir, host, port, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/"


# ---------------------------------------------------------------------------------------------
# Synthetic tables (demo and benchmark; the real ones come from the feature pipeline)
# ---------------------------------------------------------------------------------------------

WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
         "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they",
         "you", "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more",
         "when", "will", "would", "who", "so", "no", "data", "model", "token", "layer", "feature", "Paris",
         "river", "music", "code", "def", "return", "{", "}", "(", ")", ".", ",", ";", ":", "\n", "\n\n", "'s")


def synthetic_shards(n_features: int = 16384, shard_size: int = 4096, *, n_top: int = 10, n_intervals: int = 5,
                     per_interval: int = 3, n_random: int = 5, before: int = 16, after: int = 8, n_bins: int = 64,
                     n_logits: int = 10, vocab: list[str] | None = None, seed: int = 0) -> tuple[list[dict], list[float]]:
    """Random feature tables with the pipeline's schemas: (shards, hist_bin_edges)."""
    rng = np.random.default_rng(seed)
    words = list(vocab) if vocab is not None else [w if w.startswith(("\n", "'")) or not w[0].isalnum() else " " + w
                                                   for w in WORDS]
    vocab_size = len(words)
    width = before + after + 1
    edges_np = np.logspace(-4, 4, n_bins + 1)
    edges = edges_np.tolist()
    shards = []
    for start in range(0, n_features, shard_size):
        stop = min(start + shard_size, n_features)
        feats = np.arange(start, stop)
        nf = feats.size
        fmax = rng.gamma(2.0, 2.0, nf).astype(np.float32) + 0.1
        density = 10 ** rng.uniform(-6, -1, nf)
        n_tok = 10_000_000
        count = (density * n_tok).astype(np.int64)
        dead = rng.random(nf) < 0.02
        count[dead], fmax[dead], density[dead] = 0, 0, 0
        # as sae_platform.features: log-spaced edges, underflow and overflow bins (len(edges) + 1)
        log_mid = np.log10(np.sqrt(edges_np[:-1] * edges_np[1:]))
        log_max = np.log10(np.maximum(fmax, 1e-6))[:, None]
        mu = log_max - rng.uniform(0.3, 1.2, (nf, 1))
        weight = np.exp(-0.5 * ((log_mid[None, :] - mu) / 0.35) ** 2) * (log_mid[None, :] <= log_max)
        weight /= np.maximum(weight.sum(1, keepdims=True), 1e-12)
        hist = np.zeros((nf, n_bins + 2), np.int64)
        hist[:, 1:-1] = np.round(weight * count[:, None])
        hist[dead] = 0
        stats = pl.DataFrame({
            FEATURE: feats, N_TOKENS_TOTAL: np.full(nf, n_tok), COUNT: count, DENSITY: density,
            MAX: fmax, MEAN: np.where(dead, np.nan, fmax / 3), HISTOGRAM: hist.tolist(),
        }).with_columns(pl.col(MEAN).fill_nan(None))
        # examples: top, interval, random per live feature
        kinds, ranks, intervals = [], [], []
        for kind, n, ivals in (("top", n_top, [None]), ("interval", per_interval, list(range(n_intervals))),
                               ("random", n_random, [None])):
            for iv in ivals:
                kinds += [kind] * n
                ranks += list(range(n))
                intervals += [iv] * n
        per = len(kinds)
        live = feats[~dead]
        n_ex = live.size * per
        ex_feat = np.repeat(live, per)
        lmax = np.repeat(fmax[~dead], per)
        top = np.array([k == "top" for k in kinds] * live.size)
        ivl = np.array([-1 if iv is None else iv for iv in intervals] * live.size)
        frac = rng.uniform(0.02, 1.0, n_ex)                                              # random
        frac = np.where(ivl >= 0, (np.maximum(ivl, 0) + rng.uniform(0, 1, n_ex)) / n_intervals, frac)
        frac = np.where(top, np.tile([1.0 - 0.04 * r for r in ranks], live.size), frac)
        act = (lmax * np.clip(frac, 0.02, 1.0)).astype(np.float32)
        toks = rng.integers(0, vocab_size, (n_ex, width))
        acts = np.where(rng.random((n_ex, width)) < 0.15, rng.random((n_ex, width)) * act[:, None], 0.0)
        acts[:, before] = act
        has = rng.random((n_ex, width)) > 0.01
        has[:, before] = True
        acts = np.where(has, acts, 0.0).astype(np.float32)
        examples = pl.DataFrame({
            FEATURE: ex_feat, KIND: np.tile(kinds, live.size), RANK: np.tile(ranks, live.size),
            INTERVAL: pl.Series(intervals * live.size, dtype=pl.Int64), ACTIVATION: act,
            PARTITION: np.char.add("p00", (np.arange(n_ex) % 8).astype(str)),
            ROW: rng.integers(0, 1 << 30, n_ex)})
        tok_strs = pl.Series(TOKEN_STRS, np.asarray(words, dtype=object)[toks].tolist(), dtype=pl.List(pl.String))
        contexts = examples.with_columns(
            pl.lit(before, pl.Int32).alias(CENTER),
            pl.Series(TOKEN_IDS, toks.astype(np.int32)),
            tok_strs,
            pl.Series(ACTS, acts),
            pl.Series(HAS_ACT, has),
            pl.Series(DOC_ID, rng.integers(0, 100_000, n_ex)),
        ).with_columns(pl.col(TOKEN_IDS).arr.to_list(), pl.col(ACTS).arr.to_list(), pl.col(HAS_ACT).arr.to_list())
        lt = rng.integers(0, vocab_size, (nf, 2 * n_logits))
        scores = np.sort(rng.normal(0, 1, (nf, 2 * n_logits)), axis=1)[:, ::-1]
        wa = np.asarray(words, dtype=object)
        logits = pl.DataFrame({
            FEATURE: feats,
            TOP_TOKEN_IDS: lt[:, :n_logits].tolist(), TOP_TOKEN_STRS: wa[lt[:, :n_logits]].tolist(),
            TOP_SCORES: scores[:, :n_logits].astype(np.float32).tolist(),
            BOTTOM_TOKEN_IDS: lt[:, n_logits:].tolist(), BOTTOM_TOKEN_STRS: wa[lt[:, n_logits:]].tolist(),
            BOTTOM_SCORES: scores[:, ::-1][:, :n_logits].astype(np.float32).tolist()})
        shards.append({SHARD_START: start, SHARD_STOP: stop, STATS_FRAME: stats, EXAMPLES_FRAME: examples,
                       CONTEXTS_FRAME: contexts, LOGITS_FRAME: logits})
    return shards, edges


def synthetic_lineage(run: str = "demo") -> dict:
    return {"sae": run, "checkpoint": f"checkpoints/{run}/v1/sae.safetensors", "run_id": "00000000-demo",
            "shuffle": "shuffle-demo", "activation_partitions": [f"p{i:03d}" for i in range(8)],
            "model": "synthetic", "hook_name": "blocks.6.hook_resid_post"}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_platform.browser", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="serve a built site")
    p_serve.add_argument("site_dir")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_demo = sub.add_parser("demo", help="build a site from synthetic tables (and print size and time)")
    p_demo.add_argument("site_dir")
    p_demo.add_argument("--features", type=int, default=16384)
    p_demo.add_argument("--serve", action="store_true")
    p_demo.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.site_dir, args.host, args.port)
        return 0
    t0 = time.perf_counter()
    shards, edges = synthetic_shards(args.features)
    made = time.perf_counter() - t0
    summary = build_site(args.site_dir, run="demo", shards=shards, hist_bin_edges=edges, lineage=synthetic_lineage())
    print(json.dumps({**summary, "tables_seconds": round(made, 2)}))
    if args.serve:
        serve(args.site_dir, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

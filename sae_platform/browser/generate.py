"""The feature browser's files: a static single-page site generated from the feature tables.

In the spirit of Anthropic's feature browser and Neuronpedia. One page lists every latent of one
SAE run (density, max activation, its strongest tokens), sortable and searchable by feature id
and by token; a hash route ``#/feature/<id>`` shows one feature: its top activations with
per-token highlighting, examples per activation interval, random activating tokens, the
activation histogram, the top and bottom logit effects and the lineage (checkpoint, Dagster run,
shuffle, activation partitions).

Site layout (everything static; any plain HTTP server or bucket can serve it — ``fetch`` needs
http, not ``file://``). Built for a million features: the list loads, pages, sorts and searches
without fetching every feature's row, and a feature page fetches its own chunk only::

    index.html                      the page shell: no inline script, a strict CSP
    static/app.js, static/app.css   the app (copied from ``browser_static/``)
    static/steer.js                 the feature page's steer panel (shown with the live server)
    site.json                       {"version", "data", "checkpoint", "batches"}: points at the data of
                                    the current build, and pins what it shows;
                                    written last, so a rebuild switches over in one write
    data/<version>/index.json       loaded up front, no per-feature data: run, hook point (shown in the
                                    header), lineage, histogram edges, the feature shards (ranges
                                    and folders), the token table (distinct search tokens) and where
                                    the search postings are
    data/<version>/order/, columns/, search/
                                    sort orders, the density column, token and explanation postings:
                                    fetched when a sort, a filter or a search first needs them
                                    (:mod:`sae_platform.browser.index_files`)
    shards/<folder>/rows/<k>.json   the list's rows of features [start + k*64, start + (k+1)*64) of
                                    one shard (id, density, max, strongest tokens, explanation, N2G
                                    F1 and support), columnar: a page of 200 fetches the chunks it shows
    shards/<folder>/features/<k>.json   the full data of the shard's features in [k*64, (k+1)*64):
                                    fetched only when one of them is opened

A shard's folder is named by its range and the digest of its files (:func:`shard_folder`): a
rebuild that finds a folder keeps it (a hard link, or left in place on a bucket) instead of
rewriting it, so a run that changes one shard writes that shard's files and the small site-wide
index only. Bytes per feature (measured): ``docs/results.md``.

Per feature in a chunk file, examples are columnar (one list per field, the same order for all):
``kind``, ``rank``, ``interval``, ``activation``, ``center``, ``tokens`` (display strings),
``acts`` (the feature on every window token, 3 significant digits), ``noact`` (indices of
window tokens with no stored activation; null when all have one), ``partition``, ``row``,
``doc_id``.

Security: token strings are untrusted corpus text. The page inserts them only as text nodes
(``textContent``), never as markup; no JSON is embedded in HTML (all data is fetched JSON); the
page sets ``Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; …``
in a meta tag (and the bundled server, :mod:`sae_platform.browser.server`, sends it as a header
too), so even an injected element could not run script.

Per feature, identical windows (same tokens, same centre, same kind and interval: the same text
at two places of the corpus) are shown once with their count (``twins``); the stored tables keep
every example. Byte-level tokens that are only part of a UTF-8 character are stored as ``""``
with the character on the token that completes it (see ``sae_platform.tokens``); the site
merges each such run into one span per character (``ntok``: tokens per span) carrying the
maximum activation of its tokens, so the activating token is always visible and marked.

Lineage: each shard may carry its own ``lineage`` (the record its ``feature_topk`` run wrote);
a feature page shows the one of its shard, with links into the Dagster UI at ``dagster_url``
(default ``$SAE_PLATFORM_DAGSTER_URL``, else http://127.0.0.1:3000).

Writing the files (atomically, locally or to a filesystem) is :mod:`sae_platform.browser.publish`;
serving them, :mod:`sae_platform.browser.server`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any

import numpy as np
import polars as pl

from sae_platform.browser.index_files import index_files
from sae_platform.catalog import (
    ABSORPTION_CHART,
    SHARDS_PIN,
    batches_pin,
    checkpoint_pin,
    pinned_checkpoint,
    reports_url_path,
)
from sae_platform.errors import PlatformError
from sae_platform.metric_info import metric_info_json
from sae_platform.plots import absorption_png
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
# Sorting by N2G F1 ranks a feature by it only when its F1 rests on at least this many firings on
# the held-out text (its support); below, it ranks after them: an F1 of 1.0 from 2 firings is no evidence.
N2G_MIN_SUPPORT = 20
SHARD_START, SHARD_STOP = "start", "stop"
SHARD_LOAD = "load"  # a shard may give its tables lazily: a callable returning them, read when its turn comes

# the columns a site reads from each table
STATS_COLUMNS = tuple(c for c in STATS_SCHEMA if c != SUM)
CONTEXT_COLUMNS = (*EXAMPLE_COLUMNS, CENTER, TOKEN_STRS, ACTS, HAS_ACT, DOC_ID)
LOGIT_COLUMNS = tuple(LOGIT_SCHEMA)
EXPLANATION_COLUMNS = tuple(c for c in EXPLANATION_SCHEMA if c != PATTERNS)

# -- the site ----------------------------------------------------------------------------------
CHUNK_FEATURES = 64        # features per lazily fetched data file (a feature page's)
ROW_CHUNK = 64             # features per file of the list's compact rows (a sorted page reads up to app.js's PAGE, 50)
SHARDS = "shards"          # shards/<folder>/: one feature shard's files, kept by a rebuild that finds them
ROWS = "rows"
SEARCH_TOKENS = 6          # strongest distinct activating tokens per feature kept for search
ACT_SIG_FIGS = 3           # window activations in the chunk files
STAT_SIG_FIGS = 4          # densities, maxima, scores
SITE_POINTER = "site.json"
FEATURE_CHUNKS = "features"  # shards/<folder>/features/<chunk>.json: the site's per-feature files
VERSION_RE = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")   # data/<version>: the only folders a rebuild removes
STATIC_FILES = ("app.js", "app.css", "steer.js")
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
<script src="static/steer.js?v={steer_hash}" defer></script>
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


def histogram_bin_edges(edges: list[float], stats: pl.DataFrame) -> list[float | None]:
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
    schema = {FEATURE: pl.Int64, KIND: pl.String, RANK: pl.Int64, INTERVAL: pl.Int64, ACTIVATION: pl.Float32,
              PARTITION: pl.String, ROW: pl.Int64, CENTER: pl.Int32, TOKEN_STRS: pl.List(pl.String),
              ACTS: pl.List(pl.Float32), HAS_ACT: pl.List(pl.Boolean), DOC_ID: pl.Int64}
    bare_columns = (FEATURE, KIND, RANK, INTERVAL, ACTIVATION, PARTITION, ROW)  # an example without a window
    windows = []
    for frame in _gather(shards, CONTEXTS_FRAME):
        _need(frame, CONTEXT_COLUMNS, CONTEXTS_FRAME)
        windows.append(frame.select([pl.col(c).cast(t) for c, t in schema.items()]))
    ctx = pl.concat(windows) if windows else pl.DataFrame(schema=schema)
    bare = []
    for frame in _gather(shards, EXAMPLES_FRAME):
        _need(frame, EXAMPLE_COLUMNS, EXAMPLES_FRAME)
        bare.append(frame.select([pl.col(c).cast(schema[c]) for c in bare_columns]))
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


def _list_rows(ids: np.ndarray, stats: pl.DataFrame, examples: pl.DataFrame,
               explanations: pl.DataFrame | None) -> pl.DataFrame:
    """One compact row per feature of ``ids`` (in order): what the list shows and sorts, searches
    and filters by: feature, density, max, tokens (its strongest activating tokens), and when
    explained the listed explanation text, N2G F1 and its support."""
    frame = (pl.DataFrame({FEATURE: ids})
             .join(stats.select(FEATURE, DENSITY, MAX), on=FEATURE, how="left", maintain_order="left")
             .join(_search_tokens(examples).rename({TOKEN_STRS: "tokens"}), on=FEATURE, how="left",
                   maintain_order="left"))
    if explanations is None:
        return frame
    listed = explanations.select(FEATURE, pl.col(EXPLANATION).str.slice(0, INDEX_EXPLANATION_CHARS),
                                 "n2g_f1", pl.col("n2g_firings").alias("n2g_support"))
    return frame.join(listed, on=FEATURE, how="left", maintain_order="left")


EMPTY_ROWS = {FEATURE: pl.Int64, DENSITY: pl.Float64, MAX: pl.Float64, "tokens": pl.List(pl.String)}


def _row_files(rows: pl.DataFrame, start: int) -> dict[str, bytes]:
    """The list's rows of one shard as columnar JSON, ROW_CHUNK features a file: ``rows/<k>.json``
    holds the features ``[start + k * ROW_CHUNK, start + (k + 1) * ROW_CHUNK)``."""
    files = {}
    keyed = rows.with_columns(((pl.col(FEATURE) - start) // ROW_CHUNK).alias("_chunk"))
    for (chunk,), part in keyed.partition_by("_chunk", as_dict=True, maintain_order=True).items():
        files[f"{ROWS}/{int(chunk)}.json"] = _dumps(part.drop("_chunk").to_dict(as_series=False))
    return files


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
        files[f"{FEATURE_CHUNKS}/{int(chunk)}.json"] = part.drop("_chunk").write_json().encode()
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


def _absorption_overview(absorption: dict | None) -> tuple[dict | None, bytes | None]:
    """What the overview shows of an absorption result (``absorption.absorb_checkpoint``): scored
    or the refusal's text, the letters counted out of 26, the means and standard deviations over
    letters, and the per-letter chart (``plots.absorption_png``) as PNG bytes; (None, None) when
    absorption was not measured."""
    if not absorption:
        return None, None
    shown = {"scored": bool(absorption.get("scored")), "refusal": absorption.get("refusal"),
             "letters_counted": len(absorption.get("letters_counted") or []),
             "metrics": _evaluation_figures(absorption.get("metrics")) or {}, "chart": None}
    png = absorption_png(absorption)
    if png is not None:
        shown["chart"] = ABSORPTION_CHART
    return shown, png


def _check_edges(hist_bin_edges: list[float]) -> list[float]:
    edges = [float(e) for e in hist_bin_edges]
    if len(edges) < 2 or any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise PlatformError(f"bad hist_bin_edges {edges[:8]}…", "pass at least 2 finite, increasing bin edges")
    return edges


def _shard_files(shard: dict) -> tuple[dict[str, bytes], pl.DataFrame, pl.DataFrame]:
    """One feature shard's files (below its folder: ``rows/<k>.json``, ``features/<k>.json``),
    its list rows and its stats. Each depends on this shard's tables only."""
    ids = np.arange(int(shard[SHARD_START]), int(shard[SHARD_STOP]), dtype=np.int64)
    stats = _stats_frame([shard]).filter(pl.col(FEATURE).is_in(ids))
    examples = _fold_twins(_merge_byte_tokens(_examples_frame([shard])))
    explanations = _explanations_frame([shard])
    rows = _list_rows(ids, stats, examples, explanations)
    files = _row_files(rows, int(shard[SHARD_START]))
    files.update(_chunk_files(_feature_frame(ids, stats, examples, _logits_frame([shard]), explanations)))
    return files, rows, stats


def _loaded(shard: dict) -> dict:
    """The shard with its tables: read now, by its ``load``, when it gives them lazily (the writer
    then holds one shard's tables at a time), else as given."""
    load = shard.get(SHARD_LOAD)
    if load is None:
        return shard
    tables = load()
    if not isinstance(tables, dict):
        raise PlatformError(f"the load of feature shard [{shard[SHARD_START]}, {shard[SHARD_STOP]}) returned "
                            f"{type(tables).__name__}, not its tables", "return a dict of the shard's frames "
                            f"({STATS_FRAME}, {EXAMPLES_FRAME}, {CONTEXTS_FRAME}, {LOGITS_FRAME}, …) from load")
    return {**shard, **tables}


def shard_folder(start: int, stop: int, files: dict[str, bytes]) -> str:
    """Where a shard's files live: ``shards/f<start>-<stop>-<digest of its files>``. The name
    changes exactly when a byte does, so a rebuild keeps (does not rewrite) every folder it finds."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return f"{SHARDS}/f{start}-{stop}-{digest.hexdigest()[:16]}"


class SiteSummary:
    """What the site-wide pieces (index.json, sort orders, density column, search postings) are
    built from, gathered shard by shard while each shard's files are written and its tables
    dropped: per shard its range, folder, lineage and histogram bin edges, and per feature its list
    row (feature, density, max, strongest tokens; when explained the listed explanation, its N2G F1
    and support). Nothing else of a shard's tables stays, so a build holds one shard's tables plus
    ``nbytes`` of summaries: ~150 B a feature, ~320 B with explanations of INDEX_EXPLANATION_CHARS
    (measured: tests/test_browser_index.py; ~0.3 GiB at 2^20 features)."""

    def __init__(self):
        self.placed, self.lineage, self.rows = [], [], []
        self.edges: list[float] = []          # the checked hist_bin_edges: set by site_parts
        self.bin_edges: tuple | None = None

    def add(self, shard: dict, folder: str, rows: pl.DataFrame, stats: pl.DataFrame) -> None:
        """Keep what the index needs of one written shard (``shard``: its range and lineage)."""
        start, stop = int(shard[SHARD_START]), int(shard[SHARD_STOP])
        self.placed.append({"start": start, "stop": stop, "path": folder})
        if shard.get("lineage") is not None:
            self.lineage.append({"start": start, "stop": stop,
                                 "lineage": json.loads(json.dumps(shard["lineage"], default=str))})
        if stats.height:
            self._agree_on_bins(tuple(histogram_bin_edges(self.edges, stats)))
        self.rows.append(rows)

    def _agree_on_bins(self, found: tuple) -> None:
        if self.bin_edges is not None and found != self.bin_edges:
            raise PlatformError(f"the shards' {STATS_FRAME}.{HISTOGRAM} have different numbers of bins",
                                "pass the tables of one feature pipeline run (one set of bin edges)")
        self.bin_edges = found

    def histogram_edges(self) -> list[float | None]:
        """The histogram bin edges every shard agrees on (``histogram_bin_edges``)."""
        return list(self.bin_edges) if self.bin_edges is not None else list(self.edges)

    def list_rows(self) -> pl.DataFrame:
        """Every feature's list row, in feature order."""
        return pl.concat(self.rows, how="diagonal_relaxed") if self.rows else pl.DataFrame(schema=EMPTY_ROWS)

    @property
    def nbytes(self) -> int:
        """Bytes of the list rows held (polars' estimate; the per-shard records are a few hundred bytes)."""
        return sum(rows.estimated_size() for rows in self.rows)


def site_parts(*, sae_name: str, shards: list[dict], hist_bin_edges: list[float], lineage: dict,
               n_intervals: int | None = None, version: str | None = None,
               dagster_url: str | None = None, evaluation: dict | None = None,
               hook_point: str | None = None, absorption: dict | None = None,
               figures_version: str | None = None,
               summary: SiteSummary | None = None) -> Iterator[tuple[str | None, dict[str, bytes]]]:
    """The site's files in the order a writer commits them: per feature shard (in feature order),
    ``(its folder, its files by site path)``; then ``(None, the site-wide files)``: the index and
    its sort orders and search postings under ``data/<version>/``, the app, the page shell, and
    ``site.json`` last. A shard given lazily (``load``: :func:`site_files`) is read when its turn
    comes and dropped once its files are yielded: one shard's tables are in memory at a time, plus
    the :class:`SiteSummary` of those before (``summary``: pass one to read its ``nbytes``).
    Arguments: :func:`site_files`."""
    edges = _check_edges(hist_bin_edges)
    _feature_ids(shards)                                   # ranges valid and disjoint
    version = version or time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    if not VERSION_RE.fullmatch(version):
        raise PlatformError(f"bad site version {version!r}", "use the form YYYYmmddTHHMMSS-<8 hex digits>")
    summary = summary if summary is not None else SiteSummary()
    summary.edges = edges
    for shard in sorted(shards, key=lambda s: int(s[SHARD_START])):
        yield _shard_part(_loaded(shard), summary)
    yield None, _site_wide_files(
        summary, data=f"data/{version}", sae_name=sae_name, version=version, lineage=lineage,
        n_intervals=n_intervals, dagster_url=dagster_url, evaluation=evaluation, hook_point=hook_point,
        absorption=absorption, figures_version=figures_version)


def _shard_part(shard: dict, summary: SiteSummary) -> tuple[str, dict[str, bytes]]:
    """One shard's folder and files by site path, its summary added to ``summary``. The shard's
    tables are referenced by ``shard`` only: they go when the caller drops it."""
    files, rows, stats = _shard_files(shard)
    folder = shard_folder(int(shard[SHARD_START]), int(shard[SHARD_STOP]), files)
    summary.add(shard, folder, rows, stats)
    return folder, {f"{folder}/{name}": body for name, body in files.items()}


def _site_wide_files(summary: SiteSummary, *, data: str, sae_name: str, version: str, lineage: dict,
                     n_intervals: int | None, dagster_url: str | None, evaluation: dict | None,
                     hook_point: str | None, absorption: dict | None,
                     figures_version: str | None) -> dict[str, bytes]:
    """index.json with its sort orders and search postings (from ``summary`` only), the app, the
    page shell and ``site.json`` (last: the switch)."""
    placed = summary.placed
    absorption_shown, absorption_chart = _absorption_overview(absorption)
    meta = {
        "run": str(sae_name), "version": version, "n_features": sum(s["stop"] - s["start"] for s in placed),
        "hook_point": None if hook_point is None else str(hook_point),
        "chunk_features": CHUNK_FEATURES, "row_chunk": ROW_CHUNK, "shards": placed,
        "hist_bin_edges": summary.histogram_edges(), "kind_order": list(KIND_ORDER),
        "n_intervals": None if n_intervals is None else int(n_intervals),
        "lineage": json.loads(json.dumps(lineage, default=str)),
        "shard_lineage": summary.lineage,
        "dagster_url": dagster_ui_url(dagster_url),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "evaluation": _evaluation_figures(evaluation),
        "metric_info": metric_info_json(),  # what each evaluation figure means (the overview's groups)
        "absorption": absorption_shown,  # chart: a file of this data folder
        "comparison_url": reports_url_path(),  # the sweep comparison page, when the server serves reports/
    }
    all_rows = summary.list_rows()
    explained = "explanation" in all_rows.columns
    if explained:
        meta["n2g_min_support"] = N2G_MIN_SUPPORT
    fields, index_data = index_files(all_rows, N2G_MIN_SUPPORT)
    files = {f"{data}/{name}": body for name, body in index_data.items()}
    files[f"{data}/index.json"] = _dumps({**meta, **fields, "explained": explained})
    if absorption_chart is not None:
        files[f"{data}/{ABSORPTION_CHART}"] = absorption_chart
    static = _static_bytes()
    for name, body in static.items():
        files[f"static/{name}"] = body
    digest = {name: hashlib.sha256(body).hexdigest()[:12] for name, body in static.items()}
    files["index.html"] = INDEX_HTML.format(csp=CSP, css_hash=digest["app.css"], js_hash=digest["app.js"],
                                            steer_hash=digest["steer.js"]).encode()
    # the checkpoint, batches and feature-shard layout the site shows (freshness reads them)
    pin = {**checkpoint_pin(pinned_checkpoint(lineage)), **batches_pin(lineage), SHARDS_PIN: len(placed),
           "figures_version": figures_version}
    files[SITE_POINTER] = _dumps({"version": version, "data": data, "run": str(sae_name), **pin})  # last: the switch
    return files


def site_files(*, sae_name: str, shards: list[dict], hist_bin_edges: list[float], lineage: dict,
               n_intervals: int | None = None, version: str | None = None,
               dagster_url: str | None = None, evaluation: dict | None = None,
               hook_point: str | None = None, absorption: dict | None = None,
               figures_version: str | None = None) -> dict[str, bytes]:
    """Every file of the site, by relative path (:func:`site_parts`, gathered; what
    :func:`sae_platform.browser.publish.build_site` writes, part by part). ``shards``: one dict
    per feature shard with ``start``, ``stop`` (its latents [start, stop)), optionally its
    ``lineage``, and its tables: the polars frames ``feature_stats``, ``feature_examples``,
    ``feature_contexts``, ``logit_effects``, ``explanations`` (any may be None), given either in
    the dict or lazily by ``load`` (a callable returning that dict of frames, called when the
    shard's turn comes; the frames are dropped once its files are made). ``evaluation``:
    the SAE's evaluation figures (``sae_eval``'s report, with sparse probing's accuracies and the
    absorption means when measured), shown on the overview page; ``absorption``: its absorption
    result (``absorption.json``), shown there as figures or its refusal, with the per-letter chart;
    ``figures_version``: what those figures were read from (``compare.figures_version``), pinned in
    ``site.json`` so a later measurement makes the site stale."""
    return {name: body for _, files in site_parts(
        sae_name=sae_name, shards=shards, hist_bin_edges=hist_bin_edges, lineage=lineage, n_intervals=n_intervals,
        version=version, dagster_url=dagster_url, evaluation=evaluation, hook_point=hook_point,
        absorption=absorption, figures_version=figures_version)
        for name, body in files.items()}

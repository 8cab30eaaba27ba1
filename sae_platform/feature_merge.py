"""Feature tables, pass 2: fold the pass-1 partials of every partition of one feature shard into
the shard's tables, and commit them (docs/design.md, "Feature tables, context windows, browser").
``merge_shard_tables`` merges one shard and samples its interval examples,
``build_feature_tables`` runs both passes in one process. The merge is exact: top-k by (activation
desc, partition asc, row asc), the random sample as the bottom R sample keys of the union
(``feature_select``), counts, sums, maxima and histograms added. A partial holds only the latents
that fired in its batch (``features.Partial``): the merge keeps one state with a row per latent of
the shard and folds each partial's rows into it in place (``_fold``), so the work and temporaries
per partial grow with its fired latents; a latent a partial leaves out folds as nothing.

Interval examples. A feature's range (0, max] is split into ``n_intervals`` (default 5) equal-width
intervals, each with up to ``per_interval`` (default 4) examples sampled uniformly from ALL the
feature's activating tokens in it, not from the random sample: ``feature_intervals``, which needs
the merged max and so reads the partitions again after the merge (``merge_shard_tables`` runs both;
``merge_partials`` alone gives the top and random examples only).

Tables (polars), one pair per feature shard, committed together under
``features/<sae_name>/tables/f<shard_index>/`` as ``stats.parquet``, ``examples.parquet`` and
``meta.json`` (the schemas: ``tables.STATS_SCHEMA`` and ``tables.EXAMPLE_SCHEMA``):

``feature_stats`` (one row per feature of the shard, sorted by feature)
    feature         Int64    global latent id
    n_tokens_total  Int64    tokens seen (all partitions)
    count           Int64    tokens with activation > 0
    density         Float64  count / n_tokens_total
    max             Float32  largest activation (0.0 when count == 0)
    mean            Float64  sum / count over activating tokens (null when count == 0)
    sum             Float64  sum of activations (float64 accumulation; equal up to rounding
                             across shardings, as is mean)
    histogram       List[Int64]  66 counts on ``features.HIST_EDGES``' bins; sums to count

``feature_examples`` (sorted by feature, kind [top, interval, random], interval, rank)
    feature     Int64
    kind        Utf8     "top" | "interval" | "random"
    rank        Int32    0-based within (feature, kind[, interval]): top by activation order,
                         random and interval by sample key (any prefix of "random" is itself a
                         uniform sample)
    interval    Int32    interval index for kind "interval", null otherwise
    activation  Float32
    partition   Utf8     activation partition key
    row         Int64    row in that partition's hook-point store ``meta["group"]``
                         (``open_partition(store, partition, group).acts[row]``)

``meta.json`` holds ``hist_bin_edges`` (the 65 edges), the shard range, top_k, reservoir size,
seed, n_intervals, per_interval, the SAE's config and weight fingerprint, ``group`` (the hook-point
store inside each partition whose rows were read: ``data.zarr`` for the first entry of
``caching.config.hook_points``, ``hooks/<i>.zarr`` for entry i) and every partition's key,
pinned version, token count and pass-1 batch size.
"""

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from sae_platform.catalog import FIRST_STORE, list_partitions, partial_name, pinned_checkpoint, tables_name
from sae_platform.feature_intervals import add_interval_examples
from sae_platform.features import (
    FeatureError,
    FeatureSettings,
    Partial,
    StoredSAE,
    check_positive,
    compute_partials,
    feature_shards,
    hist_bin_edges,
    sparse_variant,
)
from sae_platform.partial_store import read_partials, write_partial
from sae_platform.storage import ArtifactStore
from sae_platform.tables import (
    ACTIVATION,
    COUNT,
    DENSITY,
    EXAMPLE_COLUMNS,
    EXAMPLE_SCHEMA,
    FEATURE,
    HISTOGRAM,
    INTERVAL,
    KIND,
    KIND_ORDER,
    KIND_RANDOM,
    KIND_TOP,
    MAX,
    MEAN,
    N_TOKENS_TOTAL,
    PARTITION,
    RANK,
    ROW,
    STATS_SCHEMA,
    SUM,
)


@dataclass
class FeatureTables:
    """One feature shard's tables: ``feature_stats``, ``feature_examples`` and their meta.json (above)."""

    stats: pl.DataFrame
    examples: pl.DataFrame
    meta: dict


@dataclass
class _Merged:
    """Running merge state: partitions sorted by key; *_part index into that list."""

    partitions: list[dict]
    top_act: np.ndarray
    top_part: np.ndarray
    top_row: np.ndarray
    res_key: np.ndarray
    res_part: np.ndarray
    res_row: np.ndarray
    res_act: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    max: np.ndarray
    hist: np.ndarray
    n_tokens: int


def _partition_info(p: Partial) -> dict:
    return {"key": p.partition, "version": p.partition_version, "n_tokens": p.n_tokens, "batch_rows": p.batch_rows}


def _parts(rows: np.ndarray, index: int) -> np.ndarray:
    """Partition index ``index`` for every filled slot (row >= 0), -1 for the empty ones."""
    return np.where(rows >= 0, index, -1).astype(np.int32)


def _as_merged(p: Partial) -> _Merged:
    """The merge state of one partition's partial: a row for every latent of the shard
    (``Partial.dense``), arrays of its own (``_fold`` updates them in place)."""
    own = (lambda a: a) if p.fired is not None else np.copy  # dense() of a sparse partial builds new arrays
    d = p.dense()
    return _Merged([_partition_info(p)], own(d.top_act), _parts(d.top_row, 0), own(d.top_row), own(d.res_key),
                   _parts(d.res_row, 0), own(d.res_row), own(d.res_act), own(d.count), own(d.sum), own(d.max),
                   own(d.hist), p.n_tokens)


def _fold(a: _Merged, p: Partial) -> _Merged:
    """Fold partition ``p``'s partial into the merge state ``a``, in place, and return it. Only the
    rows of p's latents change (``Partial.latents``: those that fired in its batch): folding a
    latent's empty state (``features.EMPTY_LATENT``: no example, zero count, sum, max and histogram)
    leaves its row as it was, bit for bit, so the others are skipped and the work and temporaries
    grow with the latents that fired, not with the shard's width."""
    keys = sorted([q["key"] for q in a.partitions] + [p.partition])
    where = {k: i for i, k in enumerate(keys)}
    remap = np.array([where[q["key"]] for q in a.partitions], dtype=np.int32)
    if not np.array_equal(remap, np.arange(len(remap))):  # p's key sorts before some: renumber every row
        a.top_part, a.res_part = (np.where(parts >= 0, remap[np.maximum(parts, 0)], -1).astype(np.int32)
                                  for parts in (a.top_part, a.res_part))
    rows = slice(None) if p.fired is None else p.fired
    b_index = where[p.partition]

    # top: activation desc, partition asc, row asc; empty slots (row -1) last
    act = np.concatenate([a.top_act[rows], p.top_act], 1)
    part = np.concatenate([a.top_part[rows], _parts(p.top_row, b_index)], 1)
    row = np.concatenate([a.top_row[rows], p.top_row], 1)
    n, width = act.shape
    k = a.top_act.shape[1]
    feature = np.repeat(np.arange(n), width)
    order = np.lexsort((row.ravel(), part.ravel(), -act.ravel().astype(np.float64), (row < 0).ravel(), feature))
    order = order.reshape(n, width)[:, :k] - (np.arange(n) * width)[:, None]
    take = lambda x: np.take_along_axis(x, order, 1)  # noqa: E731
    a.top_act[rows], a.top_part[rows], a.top_row[rows] = take(act), take(part), take(row)

    # reservoir: bottom R of the union by key
    rkey = np.concatenate([a.res_key[rows], p.res_key], 1)
    pick = np.argsort(rkey, axis=1, kind="stable")[:, :a.res_key.shape[1]]
    takes = lambda x, y: np.take_along_axis(np.concatenate([x, y], 1), pick, 1)  # noqa: E731
    a.res_part[rows] = takes(a.res_part[rows], _parts(p.res_row, b_index))
    a.res_row[rows], a.res_act[rows] = takes(a.res_row[rows], p.res_row), takes(a.res_act[rows], p.res_act)
    a.res_key[rows] = np.take_along_axis(rkey, pick, 1)

    a.count[rows] += p.count
    a.sum[rows] += p.sum
    a.max[rows] = np.maximum(a.max[rows], p.max)
    a.hist[rows] += p.hist
    a.partitions = sorted(a.partitions + [_partition_info(p)], key=lambda q: q["key"])
    a.n_tokens += p.n_tokens
    return a


def _check_compatible(first: Partial, p: Partial) -> None:
    for name in ("start", "stop", "top_k", "reservoir_size", "seed", "group"):
        if getattr(first, name) != getattr(p, name):
            raise FeatureError(f"partials disagree on {name}: partition {first.partition!r} has "
                               f"{getattr(first, name)!r}, partition {p.partition!r} has {getattr(p, name)!r}",
                               "recompute the partials of one feature shard with the same settings")
    if first.sae.get("fingerprint") != p.sae.get("fingerprint"):
        raise FeatureError(f"partials of partitions {first.partition!r} and {p.partition!r} were computed "
                           "with different SAE weights",
                           "recompute every partial of this SAE with the current checkpoint")


def merge_partials(partials: Iterable[Partial], settings: FeatureSettings) -> FeatureTables:
    """Pass 2's merge: fold the partials of one feature shard (one per partition, any order) into
    tables with the stats, top and random examples (no interval examples: ``merge_shard_tables`` adds
    them). Of ``settings`` it reads n_intervals and per_interval, recorded in the meta for the
    interval pass (top_k, the reservoir size and the seed are the partials' own)."""
    n_intervals, per_interval = settings.n_intervals, settings.per_interval
    check_positive("n_intervals", n_intervals)
    check_positive("per_interval", per_interval)
    state, first, seen = None, None, set()
    n_entries, entries_sum = 0, 0.0
    for p in partials:
        if first is None:  # its settings only: the big arrays are not kept alive
            first = dataclasses.replace(p, **{name: None for name in Partial.ARRAYS + Partial.WITNESS[1:]})
        _check_compatible(first, p)
        if not np.array_equal(first.witness, p.witness):
            raise FeatureError(f"partials of partitions {first.partition!r} and {p.partition!r} recorded different "
                               "witness features for the exactness check",
                               "recompute every partial of this SAE with the same check_features and seed")
        n_entries = None if n_entries is None or p.n_entries is None else n_entries + p.n_entries
        entries_sum = None if entries_sum is None or p.entries_sum is None else entries_sum + p.entries_sum
        if p.partition in seen:
            raise FeatureError(f"partition {p.partition!r} appears twice among the partials",
                               "pass one partial per partition (its counts would be doubled)")
        seen.add(p.partition)
        state = _as_merged(p) if state is None else _fold(state, p)
    if state is None:
        raise FeatureError("no partials to merge", "run pass 1 (compute_partial) for at least one partition")
    meta = {"start": first.start, "stop": first.stop, "top_k": first.top_k, "reservoir_size": first.reservoir_size,
            "seed": first.seed, "n_intervals": n_intervals, "per_interval": per_interval,
            "n_tokens_total": state.n_tokens, "partitions": state.partitions, "sae": first.sae,
            "witness": first.witness.tolist(), "n_entries": n_entries, "entries_sum": entries_sum, "group": first.group,
            "hist_bin_edges": hist_bin_edges(),
            "hist_bins": "histogram[0]: 0 < a < edges[0]; histogram[i]: edges[i-1] <= a < edges[i]; "
                         "histogram[65]: a >= edges[64]"}
    return FeatureTables(_stats_frame(state, first.start), _examples_frame(state, first.start), meta)


def _stats_frame(s: _Merged, start: int) -> pl.DataFrame:
    n = len(s.count)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(s.count > 0, s.sum / np.maximum(s.count, 1), np.nan)
    return pl.DataFrame({
        FEATURE: pl.Series(np.arange(start, start + n, dtype=np.int64)),
        N_TOKENS_TOTAL: pl.Series(np.full(n, s.n_tokens, dtype=np.int64)),
        COUNT: pl.Series(s.count.astype(np.int64)),
        DENSITY: pl.Series(s.count / max(s.n_tokens, 1)).cast(pl.Float64),
        MAX: pl.Series(s.max.astype(np.float32)),
        MEAN: pl.Series(mean, nan_to_null=True).cast(pl.Float64),
        SUM: pl.Series(s.sum.astype(np.float64)),
        HISTOGRAM: pl.Series(s.hist.astype(np.int64)).cast(pl.List(pl.Int64)),
    }, schema=STATS_SCHEMA)


def _examples_frame(s: _Merged, start: int) -> pl.DataFrame:
    """Pieces are laid out kind by kind (top, random), each in (feature, rank) order, so one
    stable sort by feature gives (feature, kind, rank) order."""
    n, k = s.top_act.shape
    r = s.res_key.shape[1]
    cols: dict[str, list[np.ndarray]] = {c: [] for c in EXAMPLE_COLUMNS}

    def piece(kind, mask, rank, act, part, row, interval=-1):
        f, c = np.nonzero(mask)
        for name, values in ((FEATURE, f.astype(np.int64) + start),
                             (KIND, np.full(len(f), KIND_ORDER.index(kind), dtype=np.int8)),
                             (RANK, rank[f, c].astype(np.int32)), (INTERVAL, np.full(len(f), interval, np.int32)),
                             (ACTIVATION, act[f, c].astype(np.float32)), (PARTITION, part[f, c].astype(np.int32)),
                             (ROW, row[f, c].astype(np.int64))):
            cols[name].append(values)

    piece(KIND_TOP, s.top_row >= 0, np.broadcast_to(np.arange(k), (n, k)), s.top_act, s.top_part, s.top_row)
    filled = s.res_row >= 0
    piece(KIND_RANDOM, filled, np.broadcast_to(np.arange(r), (n, r)), s.res_act, s.res_part, s.res_row)
    order = np.argsort(np.concatenate(cols[FEATURE]), kind="stable")
    names = [p["key"] for p in s.partitions]
    frame = {}
    for name in list(cols):  # one column at a time: bounded temporaries
        values = np.concatenate(cols.pop(name))[order]
        if name == KIND:
            frame[name] = pl.Series(values.astype(np.int64)).replace_strict(list(range(len(KIND_ORDER))),
                                                                            list(KIND_ORDER), return_dtype=pl.Utf8)
        elif name == PARTITION:
            frame[name] = pl.Series(values.astype(np.int64)).replace_strict(list(range(len(names))), names,
                                                                            return_dtype=pl.Utf8)
        elif name == INTERVAL:
            frame[name] = pl.Series(values).set(pl.Series(values < 0), None)
        else:
            frame[name] = pl.Series(values)
    return pl.DataFrame(frame, schema=EXAMPLE_SCHEMA)


def write_tables(store: ArtifactStore, sae_name: str, shard_index: int, tables: FeatureTables) -> str:
    """Commit stats.parquet, examples.parquet and meta.json of one feature shard together."""
    name = tables_name(sae_name, shard_index)
    with store.writing(name, start=tables.meta["start"], stop=tables.meta["stop"],
                       n_tokens_total=tables.meta["n_tokens_total"]) as version:
        store.write_parquet(f"{version}/stats.parquet", tables.stats)
        store.write_parquet(f"{version}/examples.parquet", tables.examples)
        store.write_json(f"{version}/meta.json", {**tables.meta, "run": sae_name, "shard_index": int(shard_index)})
    return store.resolve(name)


def read_tables(store: ArtifactStore, sae_name: str, shard_index: int) -> FeatureTables:
    path = store.require(tables_name(sae_name, shard_index), f"feature tables of SAE {sae_name!r}, shard {shard_index}",
                         "run pass 2 (merge_partials + write_tables) for that feature shard")
    return FeatureTables(store.read_parquet(f"{path}/stats.parquet"), store.read_parquet(f"{path}/examples.parquet"),
                         store.read_json(f"{path}/meta.json"))


def merge_shard_tables(store: ArtifactStore, sae, sae_name: str, shard_index: int, partitions: list[str],
                settings: FeatureSettings) -> FeatureTables:
    """Pass 2 of one feature shard as the pipeline runs it: merge the committed partials of
    ``partitions`` (``merge_partials``), then sample the interval examples from all activating
    tokens with the merged max (``feature_intervals.add_interval_examples``: reads each partition
    again, with pass 1's values). Raises FeatureError for mismatched partials or a partition whose
    version changed since pass 1."""
    tables = merge_partials(read_partials(store, sae_name, shard_index, partitions), settings)
    return add_interval_examples(store, sae, sae_name, tables)


def merge_stored_shard(store: ArtifactStore, sae_name: str, shard_index: int, partitions: list[str],
                       settings: FeatureSettings, device, checkpoint: str | None = None) -> FeatureTables:
    """``merge_shard_tables`` of a TopK-style SAE (``features.sparse_variant``) without its
    weights: the SAE is the ``StoredSAE`` its partials recorded (config, fingerprint) on ``device``,
    the interval examples come from the shard's stored codes. Why: a wide SAE's weights are more
    than one feature shard's job needs (docs/design.md, "Feature tables"). ``checkpoint``: the
    checkpoint version every partial must pin (``catalog.checkpoint_pin``), so the tables and the
    decoder rows read beside them describe one checkpoint. Raises FeatureError for partials of
    another checkpoint or SAE variant, mismatched partials, or a partition without its codes."""
    if checkpoint is not None:
        stale = [key for key in partitions
                 if pinned_checkpoint(store.pointer(partial_name(sae_name, key, shard_index))) != checkpoint]
        if stale:
            raise FeatureError(f"the partials of feature shard {shard_index} of {sae_name!r} for partition(s) "
                               f"{', '.join(stale[:5])} were not computed with checkpoint {checkpoint}",
                               "run pass 1 again for those partitions (feature_pass_1), then pass 2")
    tables = merge_partials(read_partials(store, sae_name, shard_index, partitions), settings)
    sae = StoredSAE(tables.meta["sae"]["config"], tables.meta["sae"]["fingerprint"], torch.device(device))
    if not sparse_variant(sae.config["variant"]):
        raise FeatureError(f"SAE {sae_name!r} is a {sae.config['variant']} SAE: pass 2 encodes its rows again, "
                           "which needs its weights", "use merge_shard_tables with the loaded SAE")
    return add_interval_examples(store, sae, sae_name, tables)


def build_feature_tables(store: ArtifactStore, sae, sae_name: str, settings: FeatureSettings, *,
                         n_feature_shards: int = 1, partitions: list[str] | None = None, batch_rows: int = 4096,
                         device=None, group: str = FIRST_STORE) -> list[dict]:
    """Both passes, in this process: every partition's partials (all feature shards from one
    encode), then every shard's tables. The Dagster layer runs the same functions as separate
    partitioned steps."""
    keys = list_partitions(store) if partitions is None else sorted(partitions)
    if not keys:
        raise FeatureError("there are no activation partitions to build feature tables from",
                           "materialize the activations asset first")
    shards = feature_shards(sae.n_latents, n_feature_shards)
    for key in keys:
        partials = compute_partials(store, sae, key, shards, settings, batch_rows=batch_rows, device=device,
                                    group=group)
        for index, partial in enumerate(partials):
            write_partial(store, sae_name, key, index, partial)
    summaries = []
    for index, (start, stop) in enumerate(shards):
        tables = merge_shard_tables(store, sae, sae_name, index, keys, settings)
        path = write_tables(store, sae_name, index, tables)
        summaries.append({"shard_index": index, "start": start, "stop": stop, "path": path,
                          "n_tokens_total": tables.meta["n_tokens_total"],
                          "n_examples": tables.examples.height,
                          "dead_features": int((tables.stats["count"] == 0).sum())})
    return summaries


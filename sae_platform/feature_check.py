"""The exactness check of the feature tables (docs/design.md, "Feature tables, context windows,
browser"): ``brute_force_check`` verifies one feature shard's committed tables exactly, without a
second pass over the data by default.

It has two halves. ``recompute_checked_features`` gathers, from the data as it is now, every
activating token of the checked features: the *witness* features whose every activating token
pass 1 recorded apart from the selection (``features.witness_features``), or with ``reencode`` a
sample of features encoded again from the activations, with pass 1's batch boundaries so the
floating-point results are bit-identical. ``compare_tables`` then checks the tables against it:
invariants over every feature (counts and sums that must agree across the passes), and for each
checked feature its stats and examples against what those tokens give when numpy sorts them
(top-k, the numpy twin of the sample keys for the random sample and, on the interval stream, for
the interval examples: each interval's smallest priorities among all its activating tokens).
"""

import io
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from sae_platform.catalog import FIRST_STORE, list_partitions, partial_name, partition_name
from sae_platform.feature_intervals import interval_of, interval_salt
from sae_platform.feature_merge import FeatureTables, read_tables
from sae_platform.feature_select import partition_salt, sample_keys_numpy
from sae_platform.features import (
    N_HIST_BINS,
    FeatureError,
    Partial,
    check_range,
    device_of,
    hist_bins,
    open_checked,
    sae_fingerprint,
)
from sae_platform.storage import ArtifactStore


@dataclass
class Recomputed:
    """What ``recompute_checked_features`` found in the data as it is now."""

    features: np.ndarray        # the checked features, local ids (feature - start), sorted
    entries: dict[int, list]    # local id -> (activations, partition index, rows) per partition
    n_tokens: int               # rows of the tables' partitions now
    extra_partitions: list[str]  # committed partitions the tables were not built from
    mismatches: list[dict]      # partitions or partials that no longer match the tables


def _mismatch(feature, what, expected, got) -> dict:
    return {"feature": feature, "what": what, "expected": expected, "got": got}


def _shard_stats(tables: FeatureTables) -> tuple[pl.DataFrame, bool]:
    """The stats rows of the shard's features, sorted by feature, and whether they were exactly one
    row per feature (tampered tables are narrowed to the shard's features, first row of each)."""
    start, stop = tables.meta["start"], tables.meta["stop"]
    stats = tables.stats.sort("feature")
    if stats["feature"].to_list() == list(range(start, stop)):
        return stats, True
    return stats.filter(pl.col("feature").is_between(start, stop - 1)).unique("feature", keep="first").sort(
        "feature"), False


def _read_witness(store: ArtifactStore, sae_name: str, key: str, shard_index: int) -> tuple[dict, dict]:
    """A partial's meta and its witness arrays only (not the selection state)."""
    path = store.require(partial_name(sae_name, key, shard_index),
                         f"feature partial of SAE {sae_name!r}, partition {key!r}, shard {shard_index}",
                         "run pass 1 (compute_partials + write_partial) for that partition")
    meta = store.read_json(f"{path}/meta.json")
    with np.load(io.BytesIO(store.fs.cat_file(f"{path}/partial.npz")), allow_pickle=False) as arrays:
        if "witness" not in arrays.files:
            raise FeatureError(f"the partial of partition {key!r}, shard {shard_index} has no exactness witness "
                               "(it was computed by an older version)",
                               "rebuild the feature tables (resources.features.config.rebuild: true)")
        return meta, {name: arrays[name] for name in Partial.WITNESS}


@torch.no_grad()
def brute_force_check(store: ArtifactStore, sae, sae_name: str, shard_index: int, start: int, stop: int,
                      sample_features: int = 8, seed: int = 0, reencode: bool = False) -> dict:
    """Check the committed tables of one feature shard, exactly, without a second pass by default.

    Every feature: invariants that must agree across the passes: the feature ids, token totals
    against the partitions' current row counts, histogram sums against counts, the number of top
    and random examples against min(count, top_k / R), max against the first top example, and
    the shard's total count and sum against what pass 1 counted apart (``n_entries``,
    ``entries_sum``).

    Witness features (``witness_features``: ``check_features`` per shard, every feature when it
    is at least the shard's width): every activating token pass 1 recorded for them, sorted by
    numpy, must give exactly the tables' top-k (activations and (partition, row), same tie order),
    count, max, sum, histogram, random sample (numpy twin of the sample keys, bottom R) and
    interval examples.

    ``reencode=True`` instead recomputes ``sample_features`` features by brute force from the
    activations: every row of every partition densely encoded (``encode_slice`` with pass 1's batch
    boundaries, so floating-point results are bit-identical): one more full encode per shard for
    TopK-style variants, for tests and audits.

    ``sae``: in witness mode only its config, range and fingerprint are read, so a weightless
    ``features.StoredSAE`` of the checkpoint as it is stored now (``latent_slice.stored_sae``: its
    fingerprint taken block by block, never the SAE in memory) checks as the loaded SAE does, a
    changed checkpoint included (its fingerprint is not the tables'); ``reencode`` needs the weights
    (``trainer.load_sae``): FeatureError for an SAE without them.

    The two halves: ``recompute_checked_features`` (the checked features' activating tokens, from
    the data as it is now), then ``compare_tables`` (the tables against them and the invariants)."""
    check_range(sae, start, stop)
    if reencode and not hasattr(sae, "encode_slice"):
        raise FeatureError(f"re-encoding feature shard {shard_index} of SAE {sae_name!r} needs its weights, and this "
                           "SAE has none (a StoredSAE: config and fingerprint only)",
                           "pass the loaded SAE (trainer.load_sae), or check in witness mode (reencode=False)")
    tables = read_tables(store, sae_name, shard_index)
    meta = tables.meta
    if (meta["start"], meta["stop"]) != (start, stop):
        raise FeatureError(f"feature tables of SAE {sae_name!r} shard {shard_index} cover [{meta['start']}, "
                           f"{meta['stop']}), not [{start}, {stop})",
                           "pass the shard's own range (feature_shard(n_latents, n_shards, index))")
    recomputed = recompute_checked_features(store, sae, sae_name, shard_index, tables, sample_features=sample_features,
                                            seed=seed, reencode=reencode)
    mismatches = compare_tables(tables, sae_fingerprint(sae), recomputed)
    return {"ok": not mismatches, "mismatches": mismatches, "features_checked": (recomputed.features + start).tolist(),
            "mode": "reencode" if reencode else "witness", "n_tokens": recomputed.n_tokens,
            "partitions": [p["key"] for p in meta["partitions"]],
            "partitions_not_in_tables": recomputed.extra_partitions}


@torch.no_grad()
def recompute_checked_features(store: ArtifactStore, sae, sae_name: str, shard_index: int, tables: FeatureTables, *,
                               sample_features: int = 8, seed: int = 0, reencode: bool = False) -> Recomputed:
    """The recompute half of ``brute_force_check``: from the data as it is now, every activating
    token (activation, partition index in the tables' partition list, row) of the checked features,
    and the current row counts of the partitions the tables were built from (a partition whose
    version or row count changed since is a mismatch).

    Checked are the witness features pass 1 recorded (their tokens read from each partition's
    partial; a partial of another partition version or witness list is a mismatch), or with
    ``reencode`` ``sample_features`` features drawn with ``seed`` (mostly features the tables say
    fire, plus one that never does), encoded again from every row of every partition with pass 1's
    batch boundaries."""
    meta = tables.meta
    start, stop = meta["start"], meta["stop"]
    mismatches = []

    def bad(feature, what, expected, got):
        mismatches.append(_mismatch(feature, what, expected, got))

    # -- the partitions the tables were built from, as they are now --
    keys = [p["key"] for p in meta["partitions"]]
    n_tokens = 0
    parts = []
    for info in meta["partitions"]:
        pointer = store.pointer(partition_name(info["key"])) or {}
        if pointer.get("version") != info["version"]:
            bad(None, f"partition {info['key']} version", info["version"], pointer.get("version"))
        part = open_checked(store, sae, info["key"], meta.get("group", FIRST_STORE))
        if part.n_rows != info["n_tokens"]:
            bad(None, f"partition {info['key']} n_rows", info["n_tokens"], part.n_rows)
        n_tokens += part.n_rows
        parts.append(part)
    extra_partitions = sorted(set(list_partitions(store)) - set(keys))

    # -- the checked features' activating tokens: (activation, partition index, row) each --
    entries: dict[int, list] = {}
    if reencode:
        stats, _ = _shard_stats(tables)
        counts = np.zeros(stop - start, dtype=np.int64)
        counts[stats["feature"].to_numpy() - start] = stats["count"].to_numpy()
        # mostly features that fire (where there is something to get wrong), plus one that never does
        rng = np.random.default_rng(seed)
        active, inactive = np.nonzero(counts > 0)[0], np.nonzero(counts == 0)[0]
        n_pick = min(sample_features, stop - start)
        n_inactive = min(len(inactive), max(n_pick - len(active), 1 if n_pick > 1 else 0))
        n_active = min(len(active), n_pick - n_inactive)
        local = np.sort(np.concatenate([rng.choice(active, n_active, replace=False),
                                        rng.choice(inactive, n_inactive, replace=False)]).astype(np.int64))
        device = device_of(sae)
        for index, (info, part) in enumerate(zip(meta["partitions"], parts)):
            values = []
            for lo in range(0, part.n_rows, info["batch_rows"]):
                x = torch.from_numpy(np.ascontiguousarray(part.acts[lo:lo + info["batch_rows"]])).to(device)
                dense = sae.encode_slice(x, start, stop)[:, torch.as_tensor(local, device=device)]
                values.append(dense.float().cpu().numpy())
            values = np.concatenate(values) if values else np.zeros((0, len(local)), np.float32)
            for col, f in enumerate(local.tolist()):
                on = np.nonzero(values[:, col] > 0)[0]
                entries.setdefault(f, []).append((values[on, col], np.full(len(on), index), on.astype(np.int64)))
    else:
        local = np.asarray(meta.get("witness") or [], dtype=np.int64)
        for index, info in enumerate(meta["partitions"]):
            pmeta, w = _read_witness(store, sae_name, info["key"], shard_index)
            if pmeta.get("partition_version") != info["version"] or not np.array_equal(w["witness"], local):
                bad(None, f"partition {info['key']} partial", {"version": info["version"], "witness": local.tolist()},
                    {"version": pmeta.get("partition_version"), "witness": w["witness"].tolist()})
                continue
            order = np.argsort(w["witness_feature"], kind="stable")
            wf, wr, wa = w["witness_feature"][order], w["witness_row"][order], w["witness_act"][order]
            cuts = np.searchsorted(wf, local, side="left"), np.searchsorted(wf, local, side="right")
            for f, lo, hi in zip(local.tolist(), *cuts):
                entries.setdefault(f, []).append((wa[lo:hi], np.full(hi - lo, index), wr[lo:hi]))
    return Recomputed(local, entries, n_tokens, extra_partitions, mismatches)


def compare_tables(tables: FeatureTables, fingerprint: str, recomputed: Recomputed) -> list[dict]:
    """The compare half of ``brute_force_check``: the mismatches between one feature shard's tables
    and what must hold, as {"feature", "what", "expected", "got"} records (none: the tables are
    exact). In order: the SAE's weight ``fingerprint`` and the stats' feature ids; the invariants
    over every feature (histogram totals, number of top and random examples, max against the first
    top example, the shard's total count and sum against pass 1's own tally); ``recomputed``'s
    findings about the partitions and partials; then per checked feature its stats and examples
    against its recomputed activating tokens, exactly."""
    meta = tables.meta
    start, stop = meta["start"], meta["stop"]
    mismatches = []

    def bad(feature, what, expected, got):
        mismatches.append(_mismatch(feature, what, expected, got))

    if meta["sae"].get("fingerprint") != fingerprint:
        bad(None, "sae_fingerprint", fingerprint, meta["sae"].get("fingerprint"))
    stats, exact_ids = _shard_stats(tables)
    if not exact_ids:
        bad(None, "stats features", f"[{start}, {stop})",
            f"{tables.stats.height} rows, {tables.stats['feature'].n_unique()} ids")
    examples = tables.examples
    k, r = meta["top_k"], meta["reservoir_size"]
    keys = [p["key"] for p in meta["partitions"]]

    # -- invariants over every feature (no pass over the data) --
    count_all = stats["count"].to_numpy()
    feats_all = stats["feature"].to_numpy()
    hist_sum = np.array([sum(h) for h in stats["histogram"].to_list()], dtype=np.int64)
    for f in feats_all[hist_sum != count_all].tolist():
        bad(f, "histogram total", int(count_all[feats_all == f][0]), int(hist_sum[feats_all == f][0]))
    per_kind = examples.group_by("feature", "kind").len()
    for kind, cap in (("top", k), ("random", r)):
        n_have = dict(zip(*per_kind.filter(pl.col("kind") == kind).select("feature", "len").to_numpy().T.tolist())) \
            if per_kind.height else {}
        for f, c in zip(feats_all.tolist(), count_all.tolist()):
            if n_have.get(f, 0) != min(c, cap):
                bad(f, f"{kind} examples", min(c, cap), n_have.get(f, 0))
    inter = examples.filter(pl.col("kind") == "interval").join(stats.select("feature", "max"), on="feature")
    outside = inter.filter(pl.col("interval") != pl.Series(interval_of(inter["activation"].to_numpy(),
                                                                       inter["max"].to_numpy(), meta["n_intervals"])))
    for f in outside["feature"].unique().sort().to_list():
        bad(f, "interval examples outside their interval", 0, outside.filter(pl.col("feature") == f).height)
    first_top = examples.filter((pl.col("kind") == "top") & (pl.col("rank") == 0))
    top_max = dict(zip(first_top["feature"].to_list(), first_top["activation"].to_list()))
    for f, m, c in zip(feats_all.tolist(), stats["max"].to_list(), count_all.tolist()):
        if c > 0 and f in top_max and np.float32(top_max[f]) != np.float32(m):
            bad(f, "max vs top", top_max[f], m)
    if meta.get("n_entries") is not None and int(count_all.sum()) != meta["n_entries"]:
        bad(None, "total count", meta["n_entries"], int(count_all.sum()))
    if meta.get("entries_sum") is not None and not math.isclose(float(stats["sum"].sum()), meta["entries_sum"],
                                                                 rel_tol=1e-9, abs_tol=1e-9):
        bad(None, "total sum", meta["entries_sum"], float(stats["sum"].sum()))

    # -- the partitions and partials the recompute found changed --
    mismatches.extend(recomputed.mismatches)

    # -- each checked feature against its activating tokens --
    local, entries, n_tokens = recomputed.features, recomputed.entries, recomputed.n_tokens
    features = (local + start).tolist()
    salts = np.array([partition_salt(meta["seed"], key) for key in keys], dtype=object)
    for f_local, feature in zip(local.tolist(), features):
        found = stats.filter(pl.col("feature") == feature)
        if found.height == 0:
            continue  # already reported as a stats mismatch
        srow = found.row(0, named=True)
        pieces = entries.get(f_local, [])
        aa = np.concatenate([p[0] for p in pieces]).astype(np.float32) if pieces else np.zeros(0, np.float32)
        pp = np.concatenate([p[1] for p in pieces]).astype(np.int64) if pieces else np.zeros(0, np.int64)
        rr = np.concatenate([p[2] for p in pieces]).astype(np.int64) if pieces else np.zeros(0, np.int64)
        if srow["n_tokens_total"] != n_tokens:
            bad(feature, "n_tokens_total", n_tokens, srow["n_tokens_total"])
        if srow["count"] != len(aa):
            bad(feature, "count", int(len(aa)), srow["count"])
        vmax = np.float32(aa.max()) if len(aa) else np.float32(0)
        if np.float32(srow["max"]) != vmax:
            bad(feature, "max", float(vmax), srow["max"])
        total = float(np.sum(aa, dtype=np.float64))
        if not math.isclose(srow["sum"], total, rel_tol=1e-9, abs_tol=1e-12):
            bad(feature, "sum", total, srow["sum"])
        mean = total / len(aa) if len(aa) else None
        if (mean is None) != (srow["mean"] is None) or (mean is not None and not math.isclose(srow["mean"], mean,
                                                                                              rel_tol=1e-9)):
            bad(feature, "mean", mean, srow["mean"])
        if not math.isclose(srow["density"], len(aa) / max(n_tokens, 1), rel_tol=1e-12):
            bad(feature, "density", len(aa) / max(n_tokens, 1), srow["density"])
        hist = np.bincount(hist_bins(aa), minlength=N_HIST_BINS)
        if srow["histogram"] != hist.tolist():
            bad(feature, "histogram", hist.tolist(), srow["histogram"])
        ex = examples.filter(pl.col("feature") == feature)
        # top-k: activation desc, partition asc, row asc
        order = np.lexsort((rr, pp, -aa.astype(np.float64)))[:k]
        expect = list(zip(aa[order].tolist(), [keys[i] for i in pp[order]], rr[order].tolist()))
        top = ex.filter(pl.col("kind") == "top").sort("rank")
        got = list(zip(top["activation"].to_list(), top["partition"].to_list(), top["row"].to_list()))
        if got != expect or top["rank"].to_list() != list(range(len(got))):
            bad(feature, "top", expect, got)
        # random sample: the R smallest sample keys among activating tokens
        skeys = np.empty(len(aa), dtype=np.int64)
        for i in np.unique(pp):
            m = pp == i
            skeys[m] = sample_keys_numpy(int(salts[i]), rr[m], np.full(m.sum(), feature))
        order = np.argsort(skeys, kind="stable")[:r]
        expect = list(zip(aa[order].tolist(), [keys[i] for i in pp[order]], rr[order].tolist()))
        rand = ex.filter(pl.col("kind") == "random").sort("rank")
        got = list(zip(rand["activation"].to_list(), rand["partition"].to_list(), rand["row"].to_list()))
        if got != expect:
            bad(feature, "random", expect, got)
        # interval examples: per interval, the per_interval smallest priorities among all its tokens
        want = _interval_examples(aa, pp, rr, feature, vmax, meta, keys)
        inter = ex.filter(pl.col("kind") == "interval").sort(["interval", "rank"])
        got = list(zip(inter["interval"].to_list(), inter["rank"].to_list(), inter["activation"].to_list(),
                       inter["partition"].to_list(), inter["row"].to_list()))
        if got != want:
            bad(feature, "interval", want, got)
    return mismatches


def _interval_examples(aa: np.ndarray, pp: np.ndarray, rr: np.ndarray, feature: int, vmax, meta: dict,
                       keys: list[str]) -> list[tuple]:
    """Brute force of ``feature_intervals``: every activating token (activation, partition
    index, row) of ``feature`` gets its interval under ``vmax`` and its priority on the interval
    stream (numpy twin); per interval the ``per_interval`` smallest, as (interval, rank,
    activation, partition, row)."""
    n_int, k = meta["n_intervals"], meta["per_interval"]
    priority = np.empty(len(aa), dtype=np.int64)
    for i in np.unique(pp):
        m = pp == i
        priority[m] = sample_keys_numpy(interval_salt(meta["seed"], keys[i]), rr[m], np.full(m.sum(), feature))
    ivals = interval_of(aa, np.float64(vmax), n_int)
    want = []
    for j in range(n_int):
        inside = np.flatnonzero(ivals == j)
        chosen = inside[np.argsort(priority[inside], kind="stable")[:k]]
        want += [(j, rank, float(aa[c]), keys[pp[c]], int(rr[c])) for rank, c in enumerate(chosen)]
    return want

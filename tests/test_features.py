"""Feature tables (pass 1 streaming partials, pass 2 merge): exact against brute force whatever the
dataset / feature sharding and batch size, a reservoir that is uniform and sharding-independent,
additive counts and histograms, interval examples inside their intervals, the exactness check
catching tampered tables, memory flat in the partition's length, clear errors, atomic commits."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest
import torch

from sae_platform import feature_select, partial_store
from sae_platform import features as F
from sae_platform.catalog import partial_name, tables_name
from sae_platform.errors import PlatformError, StorageError
from sae_platform.feature_check import brute_force_check
from sae_platform.feature_intervals import interval_of
from sae_platform.feature_merge import (
    FeatureTables,
    build_feature_tables,
    merge_partials,
    merge_shard_tables,
    read_tables,
    write_tables,
)
from sae_platform.feature_plan import stored_partials_bytes
from sae_platform.feature_select import KEY_PAD, decode_top, partition_salt, sample_keys, sample_keys_numpy
from sae_platform.sae import build_sae
from sae_platform.settings import SettingsError
from sae_platform.storage import ArtifactStore

D, N_LATENTS = 16, 64
SETTINGS = F.FeatureSettings()  # the pipeline's defaults


def write_partition(store, key, acts, chunk_rows=512):
    with store.writing(f"activations/{key}") as version:
        group = store.open_group(f"{version}/data.zarr", "w")
        group.create_array("acts", data=acts, chunks=(min(chunk_rows, max(len(acts), 1)), acts.shape[1]),
                           compressors=None)
        group.attrs.update({"d_model": acts.shape[1], "dtype": str(acts.dtype), "n_rows": len(acts)})


def synthetic_rows(n, d=D, seed=0):
    """Sparse combinations of a hidden dictionary plus noise, float16 (as cached)."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((48, d))
    codes = rng.exponential(1.0, (n, 48)) * (rng.random((n, 48)) < 0.1)
    return (codes @ dictionary + 0.2 * rng.standard_normal((n, d))).astype(np.float16)


def make_dataset(store, splits, seed=0, prefix="p", exact=False):
    """One dataset of sum(splits) rows, cut into partitions p0, p1, ...; returns all rows."""
    rows = (exact_rows if exact else synthetic_rows)(sum(splits), seed=seed)
    bounds = np.cumsum([0, *splits])
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_partition(store, f"{prefix}{i}", rows[lo:hi])
    return rows


def make_sae(variant="relu", seed=0, d=D, exact=False):
    """A small SAE with a spread of densities (rare and common features) and one dead feature.

    exact: weights and biases on a coarse dyadic grid, so that with ``exact_rows`` every
    activation is computed exactly whatever the matmul's blocking (any batch size gives the same
    bits) and many activations tie, which exercises the tie order."""
    torch.manual_seed(seed)
    kwargs = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "switch": {"k": 4, "n_experts": 4}}.get(variant, {})
    sae = build_sae(variant, d, N_LATENTS, **kwargs).eval()
    with torch.no_grad():
        sae.b_enc.copy_(-torch.rand(N_LATENTS) * 2.5)
        if exact:
            sae.W_enc.copy_(torch.randint(-4, 5, sae.W_enc.shape) / 4)
            sae.b_enc.copy_(-torch.randint(0, 40, (N_LATENTS,)) / 4)
        sae.b_enc[5] = -1e4
    return sae


def exact_rows(n, d=D, seed=0):
    """float16 rows on a grid of 1/4 in [-4, 4]: with an exact SAE every dot product is exact."""
    return (np.random.default_rng(seed).integers(-16, 17, (n, d)) / 4).astype(np.float16)


def global_examples(tables, offsets):
    """examples with a global row id (partition offset + row)."""
    off = pl.DataFrame({"partition": list(offsets), "offset": list(offsets.values())})
    return tables.examples.join(off, on="partition").with_columns(global_row=pl.col("row") + pl.col("offset"))


def all_tables(store, run, n_shards):
    tables = [read_tables(store, run, i) for i in range(n_shards)]
    return (pl.concat([t.stats for t in tables]).sort("feature"),
            pl.concat([t.examples for t in tables]).sort(["feature", "kind", "interval", "rank"], nulls_last=False))


# ---------------------------------------------------------------------------------------------


def test_feature_shards_cover_the_dictionary_and_reject_bad_ranges():
    assert F.feature_shards(64, 4) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    shards = F.feature_shards(10, 3)
    assert shards[0][0] == 0 and shards[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    assert F.feature_shard(10, 3, 2) == shards[2]
    # more shards than latents (a vector's one-latent dictionary in the pipeline's 4 shards): empty ranges
    assert F.feature_shards(1, 4) == [(0, 0), (0, 0), (0, 0), (0, 1)]
    assert F.feature_shards(8, 9)[0] == (0, 0) and sum(b - a for a, b in F.feature_shards(8, 9)) == 8
    with pytest.raises(F.FeatureError, match="positive integer"):
        F.feature_shards(8, 0)
    with pytest.raises(F.FeatureError, match=r"outside \[0, 3\)"):
        F.feature_shard(10, 3, 3)


def test_sample_keys_on_torch_match_the_numpy_twin():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 2**31 - 1, 5000)
    feats = rng.integers(0, 2**24, 5000)
    for salt in (0, -1, partition_salt(7, "batch_0001"), 2**63 - 1):
        got = sample_keys(salt, torch.from_numpy(rows), torch.from_numpy(feats)).numpy()
        assert np.array_equal(got, sample_keys_numpy(salt, rows, feats))
        assert got.min() >= 0 and got.max() < KEY_PAD
    # counter-based: a key depends on (seed, partition, row, feature) only
    assert partition_salt(0, "a") != partition_salt(1, "a") != partition_salt(0, "b")


@pytest.mark.parametrize("variant", ["relu", "topk"])
def test_merged_tables_equal_brute_force_whatever_the_sharding(store, variant):
    from sae_platform.storage import ArtifactStore

    sae = make_sae(variant, exact=True)
    runs = {}
    for splits in ([1500], [500, 650, 350]):
        for n_shards in (1, 4):
            root = ArtifactStore(f"{store.root}/{len(splits)}x{n_shards}")
            make_dataset(root, splits, exact=True)
            build_feature_tables(root, sae, "run", F.FeatureSettings(top_k=6, reservoir_factor=3),
                                 n_feature_shards=n_shards, batch_rows=256)
            for i, (start, stop) in enumerate(F.feature_shards(N_LATENTS, n_shards)):
                check = brute_force_check(root, sae, "run", i, start, stop, sample_features=stop - start)
                assert check["ok"], check["mismatches"][:3]
                assert len(check["features_checked"]) == stop - start
            offsets = dict(zip([f"p{i}" for i in range(len(splits))], np.cumsum([0, *splits[:-1]]).tolist()))
            stats, _ = all_tables(root, "run", n_shards)
            examples = pl.concat([global_examples(read_tables(root, "run", i), offsets) for i in range(n_shards)])
            runs[(len(splits), n_shards)] = (stats, examples)

    # feature sharding changes nothing at all (same data layout): identical tables
    for n_parts in (1, 3):
        (s1, e1), (s4, e4) = runs[(n_parts, 1)], runs[(n_parts, 4)]
        assert s1.equals(s4)
        assert e1.sort(["feature", "kind", "interval", "rank"], nulls_last=False).equals(
            e4.sort(["feature", "kind", "interval", "rank"], nulls_last=False))
    # dataset sharding: same top-K (values and global rows, ties by global row), counts, max, histograms
    (s1, e1), (s3, e3) = runs[(1, 1)], runs[(3, 1)]
    for col in ("feature", "n_tokens_total", "count", "density", "max", "histogram"):
        assert s1[col].equals(s3[col]), col
    np.testing.assert_allclose(s1["mean"].fill_null(0).to_numpy(), s3["mean"].fill_null(0).to_numpy(), rtol=1e-12)
    top = lambda e: e.filter(pl.col("kind") == "top").sort(["feature", "rank"]).select(  # noqa: E731
        "feature", "rank", "activation", "global_row")
    assert top(e1).equals(top(e3))
    assert (top(e1).group_by("feature", "activation").len()["len"] > 1).any()  # ties were there to order
    assert top(e1).height > 0 and s1.filter(pl.col("feature") == 5)["count"].item() == 0


@pytest.mark.parametrize("variant", ["topk", "relu"])
def test_one_pass_over_every_shard_equals_one_pass_per_shard_and_encodes_each_row_once(store, variant,
                                                                                        monkeypatch):
    make_dataset(store, [700])
    sae = make_sae(variant)
    shards = F.feature_shards(N_LATENTS, 3)
    calls = []
    for name in ("encode", "encode_slice"):
        original = getattr(sae, name)
        monkeypatch.setattr(sae, name, lambda x, *a, _f=original, _n=name: calls.append((_n, len(x))) or _f(x, *a))
    settings = F.FeatureSettings(top_k=5, reservoir_factor=2, check_features=3)
    together = F.compute_partials(store, sae, "p0", shards, settings, batch_rows=128)
    if variant == "topk":  # the selection runs once per row, whatever the number of shards
        assert [n for n, _ in calls] == ["encode"] * 6 and sum(r for _, r in calls) == 700
    else:  # one slice per shard and batch: W_enc multiplied once in all
        assert {n for n, _ in calls} == {"encode_slice"} and sum(r for _, r in calls) == 700 * len(shards)
    for (start, stop), got in zip(shards, together):
        alone = F.compute_partial(store, sae, "p0", start, stop, settings, batch_rows=128)
        for name in F.Partial.ARRAYS + F.Partial.WITNESS:
            assert np.array_equal(getattr(got, name), getattr(alone, name)), name
        assert (got.n_entries, got.entries_sum) == (alone.n_entries, alone.entries_sum)
        assert got.n_entries == int(got.count.sum()) and len(got.witness) == 3


@pytest.mark.parametrize("variant", ["jumprelu", "batchtopk", "switch"])
def test_other_variants_pass_the_exactness_check(store, variant):
    make_dataset(store, [500, 300])
    sae = make_sae(variant)
    build_feature_tables(store, sae, "run", F.FeatureSettings(top_k=5, reservoir_factor=2), n_feature_shards=2,
                         batch_rows=128)
    for i, (start, stop) in enumerate(F.feature_shards(N_LATENTS, 2)):
        check = brute_force_check(store, sae, "run", i, start, stop, sample_features=stop - start)
        assert check["ok"], check["mismatches"][:3]


def test_reservoir_is_the_same_whatever_the_batch_size_feature_range_and_merge_order(store, monkeypatch):
    make_dataset(store, [900, 1300, 400], exact=True)
    sae = make_sae("relu", exact=True)
    settings = F.FeatureSettings(top_k=4, reservoir_factor=5)
    by_batch = [F.compute_partial(store, sae, "p1", 0, N_LATENTS, settings, batch_rows=b) for b in (13, 100, 4096)]
    # tiny update groups and one-feature compaction blocks: every path of the streaming selection
    monkeypatch.setattr(F, "UPDATE_ENTRIES", 37)
    monkeypatch.setattr(feature_select, "COMPACT_BLOCK_ENTRIES", 1)
    by_batch.append(F.compute_partial(store, sae, "p1", 0, N_LATENTS, settings, batch_rows=50))
    assert by_batch[-1].diagnostics["res_compactions"] > by_batch[0].diagnostics["res_compactions"] + 10
    monkeypatch.undo()
    for other in by_batch[1:]:
        for name in F.Partial.ARRAYS:
            a, b = getattr(by_batch[0], name), getattr(other, name)
            if name == "sum":
                np.testing.assert_allclose(a, b, rtol=1e-12)
            else:
                assert np.array_equal(a, b), name
    sliced = F.compute_partial(store, sae, "p1", 16, 40, settings, batch_rows=64).dense()
    for name in ("top_act", "top_row", "res_key", "res_row", "res_act", "count", "max", "hist"):
        assert np.array_equal(getattr(sliced, name), getattr(by_batch[0].dense(), name)[16:40]), name
    # the reservoir really is kept partially: more activating tokens than slots
    assert (by_batch[0].count > by_batch[0].reservoir_size).sum() > 10

    partials = [F.compute_partial(store, sae, key, 0, N_LATENTS, settings, batch_rows=256)
                for key in ("p0", "p1", "p2")]
    merged = [merge_partials(order, settings)
              for order in (partials, partials[::-1], [partials[1], partials[2], partials[0]])]
    for other in merged[1:]:
        assert other.examples.equals(merged[0].examples)
        assert other.stats.drop("mean", "sum").equals(merged[0].stats.drop("mean", "sum"))
    # a different seed draws a different sample
    reseeded = F.compute_partial(store, sae, "p1", 0, N_LATENTS, F.FeatureSettings(top_k=4, reservoir_factor=5, seed=1),
                                 batch_rows=256)
    assert not np.array_equal(reseeded.res_row, by_batch[0].res_row)
    assert np.array_equal(reseeded.top_row, by_batch[0].top_row)


def test_reservoir_is_statistically_uniform_over_all_activating_tokens(store):
    """Pooled over features and seeds, the position of each sampled token among the feature's
    activating tokens (in dataset order, across 3 partitions) is uniform: chi-square on 10 bins.
    Keeping the first / last / largest tokens, or one partition's tokens, would fail it."""
    splits = [1500, 500, 1000]
    rows = make_dataset(store, splits, seed=3)
    sae = make_sae("relu", seed=3)
    dense = sae.encode_dense(torch.from_numpy(rows)).numpy()
    offsets = {"p0": 0, "p1": splits[0], "p2": splits[0] + splits[1]}
    positions, per_partition, expected_partition = [], np.zeros(3), np.zeros(3)
    for seed in range(6):
        settings = F.FeatureSettings(top_k=2, reservoir_factor=10, seed=seed)
        tables = merge_partials((F.compute_partial(store, sae, k, 0, N_LATENTS, settings, batch_rows=512)
                                 for k in offsets), settings)
        rand = tables.examples.filter(pl.col("kind") == "random")
        for feature, group in rand.group_by("feature"):
            active = np.nonzero(dense[:, feature[0]] > 0)[0]
            if len(active) < 100:  # sample must be a small part of the population
                continue
            got = np.array([offsets[p] + r for p, r in zip(group["partition"], group["row"])])
            assert len(got) == 20 and len(set(got)) == 20 and np.isin(got, active).all()
            positions += (np.searchsorted(active, got) / len(active)).tolist()
            per_partition += np.bincount(np.searchsorted(np.cumsum(splits), got, side="right"), minlength=3)
            expected_partition += 20 * np.bincount(np.searchsorted(np.cumsum(splits), active, side="right"),
                                                   minlength=3) / len(active)
    observed = np.bincount(np.minimum((np.array(positions) * 10).astype(int), 9), minlength=10)
    expected = len(positions) / 10
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert len(positions) > 3000
    assert chi2 < 40, (chi2, observed)  # df 9: p ~ 1e-5
    chi2_partition = ((per_partition - expected_partition) ** 2 / expected_partition).sum()
    assert chi2_partition < 25, (per_partition, expected_partition)  # df 2


def test_densities_and_histograms_add_up(store):
    splits = [800, 1200, 300]
    make_dataset(store, splits)
    sae = make_sae("topk")
    settings = F.FeatureSettings(top_k=3)
    partials = [F.compute_partial(store, sae, f"p{i}", 0, N_LATENTS, settings, batch_rows=200) for i in range(3)]
    stats = merge_partials(partials, settings).stats
    partials = [p.dense() for p in partials]  # a row for every latent, so that they add
    counts = np.stack(stats["count"].to_numpy())
    hist = np.stack(stats["histogram"].to_list())
    assert hist.shape == (N_LATENTS, F.N_HIST_BINS) and len(F.HIST_EDGES) == F.N_HIST_BINS - 1
    assert np.array_equal(hist.sum(1), counts)
    assert np.array_equal(counts, sum(p.count for p in partials))
    assert np.array_equal(hist, sum(p.hist for p in partials))
    assert (stats["n_tokens_total"] == sum(splits)).all()
    np.testing.assert_allclose(stats["density"].to_numpy(), counts / sum(splits))
    assert stats["density"].sum() == pytest.approx(4 * sum(splits) / sum(splits), rel=0.02)  # TopK k=4: L0 <= 4
    assert np.array_equal(stats["max"].to_numpy(), np.maximum.reduce([p.max for p in partials]))
    active = counts > 0
    np.testing.assert_allclose(stats["mean"].to_numpy()[active],
                               sum(p.sum for p in partials)[active] / counts[active], rtol=1e-12)
    assert stats["mean"].null_count() == (~active).sum()


@pytest.mark.parametrize("variant", ["relu", "topk"])
def test_interval_examples_cover_every_interval_of_a_dense_feature_and_equal_brute_force(store, variant):
    """Interval examples are sampled from ALL activating tokens of each interval (SAEDashboard's
    quantile examples), not from the random sample: a feature firing on most tokens gets
    per_interval examples in each of its n_intervals intervals (a 10-token random sample could
    not hold 5 x 3 of them), the examples equal a brute force over every token, and they are not
    the random sample again."""
    splits = [1700, 1300]
    rows = make_dataset(store, splits)
    sae = make_sae(variant)
    dense = 7
    with torch.no_grad():
        sae.b_enc[dense] = 4.0  # fires on most tokens, activations spread over (0, max]
    settings = F.FeatureSettings(top_k=5, reservoir_factor=2, n_intervals=5, per_interval=3)
    build_feature_tables(store, sae, "run", settings, n_feature_shards=2, batch_rows=256)
    tables = read_tables(store, "run", 0)
    stats = tables.stats.filter(pl.col("feature") == dense).row(0, named=True)
    assert stats["count"] > 0.5 * sum(splits)  # fires on most tokens
    # every token's activation of the dense feature: every interval holds enough tokens to fill
    acts = sae.encode_slice(torch.from_numpy(rows.astype(np.float32)), dense, dense + 1)[:, 0].detach().numpy()
    np.testing.assert_allclose(acts.max(), stats["max"], rtol=1e-5)
    per_interval = np.bincount(interval_of(acts[acts > 0], stats["max"], 5), minlength=5)
    assert (per_interval >= 3).all(), per_interval
    inter = tables.examples.filter((pl.col("feature") == dense) & (pl.col("kind") == "interval"))
    assert inter.group_by("interval").len().sort("interval")["len"].to_list() == [3] * 5
    assert (interval_of(inter["activation"].to_numpy(), stats["max"], 5) == inter["interval"].to_numpy()).all()
    rand = tables.examples.filter((pl.col("feature") == dense) & (pl.col("kind") == "random"))
    assert inter.join(rand, on=["partition", "row"], how="semi").height <= 1  # an independent draw
    # exactly the brute force over every activating token (witness: every feature here), every feature
    check = brute_force_check(store, sae, "run", 0, 0, 32, sample_features=32)
    assert check["ok"] and dense in check["features_checked"], check["mismatches"][:3]
    # the same samples whatever the batch size and feature sharding: exact and mergeable
    again = ArtifactStore(f"{store.root}/again")
    make_dataset(again, splits)
    build_feature_tables(again, sae, "run", settings, n_feature_shards=1, batch_rows=999)
    other = read_tables(again, "run", 0).examples.filter(pl.col("feature") < 32)
    assert other.filter(pl.col("kind") == "interval").equals(tables.examples.filter(pl.col("kind") == "interval"))


def test_brute_force_check_passes_on_good_tables_and_catches_tampering(store):
    make_dataset(store, [600, 500])
    sae = make_sae("relu")
    build_feature_tables(store, sae, "run", F.FeatureSettings(top_k=4, reservoir_factor=2))
    good = read_tables(store, "run", 0)
    for reencode in (False, True):  # the witness pass 1 recorded (every feature here), and a dense re-encode
        check = brute_force_check(store, sae, "run", 0, 0, N_LATENTS, sample_features=N_LATENTS, reencode=reencode)
        assert check["ok"] and check["features_checked"] == list(range(N_LATENTS)), check["mismatches"][:3]
    feature = int(good.stats.filter(pl.col("count") > 50)["feature"][0])

    def tampered(what, stats=None, examples=None):
        write_tables(store, "run", 0, FeatureTables(stats if stats is not None else good.stats,
                                                    examples if examples is not None else good.examples,
                                                    good.meta))
        for reencode in (False, True):
            result = brute_force_check(store, sae, "run", 0, 0, N_LATENTS, sample_features=N_LATENTS,
                                       reencode=reencode)
            found = {(m["feature"], m["what"]) for m in result["mismatches"]}
            # the exact comparison names the tampered figure; invariants may add shard-wide totals
            assert not result["ok"] and (feature, what) in found and {f for f, _ in found} <= {feature, None}, found

    is_f = pl.col("feature") == feature
    bump = lambda kind, col, expr: good.examples.with_columns(  # noqa: E731
        pl.when(is_f & (pl.col("kind") == kind) & (pl.col("rank") == 1)).then(expr).otherwise(pl.col(col)).alias(col))
    tampered("top", examples=bump("top", "activation", pl.col("activation") * 1.0001))
    tampered("top", examples=bump("top", "row", pl.col("row") + 1))
    tampered("random", examples=bump("random", "row", pl.col("row") + 1))
    tampered("count", stats=good.stats.with_columns(pl.when(is_f).then(pl.col("count") + 1).otherwise(pl.col("count"))
                                                    .alias("count")))
    tampered("histogram", stats=good.stats.with_columns(
        pl.when(is_f).then(pl.col("histogram").list.reverse()).otherwise(pl.col("histogram")).alias("histogram")))
    # features outside a small witness sample: the invariants still catch a changed count or histogram
    build_feature_tables(store, sae, "small", F.FeatureSettings(top_k=4, reservoir_factor=2, check_features=4))
    small = read_tables(store, "small", 0)
    assert len(small.meta["witness"]) == 4
    assert brute_force_check(store, sae, "small", 0, 0, N_LATENTS)["ok"]
    other_f = int(small.stats.filter((pl.col("count") > 10) & ~pl.col("feature").is_in(small.meta["witness"]))
                  ["feature"][0])
    is_o = pl.col("feature") == other_f
    for stats in (small.stats.with_columns(pl.when(is_o).then(pl.col("count") + 1).otherwise(pl.col("count"))),
                  small.stats.with_columns(pl.when(is_o).then(pl.col("sum") * 1.01).otherwise(pl.col("sum"))),
                  small.stats.with_columns(pl.when(is_o).then(pl.col("max") * 2).otherwise(pl.col("max")))):
        write_tables(store, "small", 0, FeatureTables(stats, small.examples, small.meta))
        assert not brute_force_check(store, sae, "small", 0, 0, N_LATENTS)["ok"]
    dropped = small.examples.filter(~(is_o & (pl.col("kind") == "random") & (pl.col("rank") == 0)))
    write_tables(store, "small", 0, FeatureTables(small.stats, dropped, small.meta))
    assert ("random examples" in {m["what"] for m in brute_force_check(store, sae, "small", 0, 0,
                                                                       N_LATENTS)["mismatches"]})
    # a different SAE is noticed too
    other = make_sae("relu", seed=9)
    write_tables(store, "run", 0, good)
    result = brute_force_check(store, other, "run", 0, 0, N_LATENTS)
    assert not result["ok"] and "sae_fingerprint" in {m["what"] for m in result["mismatches"]}


def test_tables_of_a_later_hook_point_and_of_a_transcoder_read_their_own_store(store):
    """Each partition holds one store per hook point (data.zarr, hooks/<i>.zarr) with its own rows;
    the tables read the named one (``group``), and a transcoder's paired rows [input | output]
    are encoded by their input half, exactly (the re-encoding check)."""
    rng = np.random.default_rng(4)
    first, second = synthetic_rows(700, seed=1), synthetic_rows(650, seed=2)
    paired = np.concatenate([second, rng.standard_normal((650, D)).astype(np.float16)], 1)
    with store.writing("activations/p0") as version:
        for group, acts in (("data.zarr", first), ("hooks/1.zarr", second), ("hooks/2.zarr", paired)):
            store.open_group(f"{version}/{group}", "w").create_array("acts", data=acts, chunks=(256, acts.shape[1]),
                                                                    compressors=None)
    transcoder = build_sae("relu", D, N_LATENTS, d_out=D).eval()
    transcoder.load_state_dict({**make_sae("relu").state_dict(), "b_dec": transcoder.b_dec,
                                "output_scale": transcoder.output_scale})
    for run, sae, group, rows in (("h1", make_sae("relu"), "hooks/1.zarr", second),
                                  ("tc", transcoder, "hooks/2.zarr", second)):
        build_feature_tables(store, sae, run, F.FeatureSettings(top_k=4, reservoir_factor=2), n_feature_shards=2,
                             group=group)
        for i, (start, stop) in enumerate(F.feature_shards(N_LATENTS, 2)):
            tables = read_tables(store, run, i)
            assert tables.meta["group"] == group and tables.stats["n_tokens_total"][0] == len(rows)
            check = brute_force_check(store, sae, run, i, start, stop, sample_features=stop - start, reencode=True)
            assert check["ok"], check["mismatches"][:3]
            top = tables.examples.filter(pl.col("kind") == "top")
            dense = sae.encode_dense(torch.from_numpy(rows[top["row"].to_numpy()]).float()).detach().numpy()
            np.testing.assert_allclose(top["activation"].to_numpy(), dense[np.arange(top.height), top["feature"]],
                                       rtol=1e-5, atol=1e-6)
    with pytest.raises(StorageError, match="no hook-point store 'hooks/3.zarr'"):
        F.compute_partials(store, make_sae("relu"), "p0", [(0, N_LATENTS)], SETTINGS, group="hooks/3.zarr")
    with pytest.raises(F.FeatureError, match=r"\(hook-point store hooks/2.zarr\) has rows of width 32"):
        F.compute_partials(store, make_sae("relu"), "p0", [(0, N_LATENTS)], SETTINGS, group="hooks/2.zarr")


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from sae_platform import features as F
    from sae_platform.sae import build_sae
    from sae_platform.storage import ArtifactStore

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    sae = build_sae("topk", 512, 64, k=4).eval()
    store = ArtifactStore(sys.argv[1])
    out = {}
    for key in ("short", "short", "long"):  # the first run warms up (lazy initialisation)
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        partial = F.compute_partial(store, sae, key, 0, 64, F.FeatureSettings(), batch_rows=4096)
        out[key] = status("VmHWM") - before
        del partial
    print(json.dumps(out))
""")


def test_peak_memory_does_not_grow_with_the_partition_length(store, tmp_path):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs to reset the peak-RSS counter")
    rng = np.random.default_rng(0)
    for key, n in (("short", 15_000), ("long", 60_000)):  # 15 MB and 61 MB of float16 rows
        write_partition(store, key, rng.standard_normal((n, 512), dtype=np.float32).astype(np.float16),
                        chunk_rows=4096)
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    # glibc keeps freed medium-sized blocks in its heap, so RSS would follow fragmentation rather
    # than what the code holds; with a low mmap threshold every large block is returned on free
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(script), store.root], capture_output=True, text=True, check=True,
                         env=env)
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    # holding the long partition (61 MB as stored, 123 MB as float32) would add tens of MB;
    # streaming adds nothing measurable
    assert peak["long"] - peak["short"] < 16 * 2**20, peak
    assert peak["long"] < 64 * 2**20, peak


def test_bad_inputs_raise_errors_that_name_the_problem_and_the_fix(store):
    make_dataset(store, [300, 200])
    sae = make_sae("relu")
    with pytest.raises(F.FeatureError, match="width 16 but the SAE expects d_model 24") as err:
        F.compute_partial(store, make_sae("relu", d=24), "p0", 0, 8, SETTINGS)
    assert "How to fix" in str(err.value)
    with pytest.raises(StorageError, match="activation partition 'nope' is missing"):
        F.compute_partial(store, sae, "nope", 0, 8, SETTINGS)
    with pytest.raises(F.FeatureError, match=r"feature range \[60, 70\) is outside the SAE's latents \[0, 64\)"):
        F.compute_partial(store, sae, "p0", 60, 70, SETTINGS)
    with pytest.raises(SettingsError, match="top_k = 0 is too small"):
        F.compute_partial(store, sae, "p0", 0, 8, F.FeatureSettings(top_k=0))
    a = F.compute_partial(store, sae, "p0", 0, 8, SETTINGS)
    with pytest.raises(F.FeatureError, match="disagree on stop"):
        merge_partials([a, F.compute_partial(store, sae, "p1", 0, 16, SETTINGS)], SETTINGS)
    with pytest.raises(F.FeatureError, match="appears twice"):
        merge_partials([a, a], SETTINGS)
    with pytest.raises(F.FeatureError, match="different SAE weights"):
        merge_partials([a, F.compute_partial(store, make_sae("relu", seed=4), "p1", 0, 8, SETTINGS)], SETTINGS)
    with pytest.raises(F.FeatureError, match="no partials"):
        merge_partials([], SETTINGS)
    with pytest.raises(StorageError, match="feature tables of SAE 'run', shard 0 is missing"):
        read_tables(store, "run", 0)
    with pytest.raises(StorageError, match="feature partial"):
        partial_store.read_partial(store, "run", "p0", 0)
    write_tables(store, "run", 0, merge_partials([a], SETTINGS))
    with pytest.raises(F.FeatureError, match=r"cover \[0, 8\), not \[0, 16\)"):
        brute_force_check(store, sae, "run", 0, 0, 16)
    bad = synthetic_rows(100)
    bad[37, 3] = np.nan
    write_partition(store, "broken", bad)
    with pytest.raises(F.FeatureError, match="NaN/inf values .first at row 37"):
        F.compute_partial(store, sae, "broken", 0, 8, SETTINGS, batch_rows=16)
    with pytest.raises(PlatformError, match="no activation partitions"):
        from sae_platform.storage import ArtifactStore
        build_feature_tables(ArtifactStore(f"{store.root}/empty"), sae, "run", SETTINGS)


def test_partials_and_tables_commit_atomically(store, monkeypatch):
    make_dataset(store, [400])
    sae = make_sae("relu")
    partial = F.compute_partial(store, sae, "p0", 0, N_LATENTS, F.FeatureSettings(top_k=3))
    partial_store.write_partial(store, "run", "p0", 0, partial)
    back = partial_store.read_partial(store, "run", "p0", 0)
    for name in F.Partial.ARRAYS:
        assert np.array_equal(getattr(back, name), getattr(partial, name)), name
    assert back.partition_version == store.pointer("activations/p0")["version"]
    assert partial_store.list_partials(store, "run", 0) == ["p0"] and partial_store.list_partials(store, "run", 1) == []
    tables = merge_partials([back], SETTINGS)
    write_tables(store, "run", 0, tables)
    first = store.resolve(tables_name("run", 0))

    real = store.write_parquet

    def failing(path, frame):
        if path.endswith("examples.parquet"):
            raise OSError("disk full")
        return real(path, frame)

    monkeypatch.setattr(store, "write_parquet", failing)
    with pytest.raises(OSError):
        write_tables(store, "run", 0, tables)
    monkeypatch.undo()
    assert store.resolve(tables_name("run", 0)) == first  # the old version stays, whole
    again = read_tables(store, "run", 0)
    assert again.stats.equals(tables.stats) and again.examples.equals(tables.examples)
    assert again.meta["hist_bin_edges"] == F.hist_bin_edges() and again.meta["partitions"][0]["key"] == "p0"
    leftovers = [p for p in store.fs.ls(store.path(tables_name("run", 0)), detail=False) if "/v-" in p]
    assert len(leftovers) == 1  # the failed version directory was removed


def _stored_arrays(store, run, key, index) -> dict:
    """The arrays of a committed partial.npz, as stored."""
    with np.load(io.BytesIO(store.fs.cat_file(f"{store.resolve(partial_name(run, key, index))}/partial.npz"))) as npz:
        return {name: npz[name] for name in npz.files}


def _commit_partial_arrays(store, run, key, index, partial, arrays: dict, **meta) -> None:
    """Commit ``arrays`` as the partial.npz of ``partial`` (with its meta.json and ``meta``), as the
    writers before partials stored only their filled slots did: for a partial in an old layout
    (dense, or a full row per fired latent), or a damaged one."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with store.writing(partial_name(run, key, index), partition=key, partition_version=partial.partition_version,
                       start=partial.start, stop=partial.stop, top_k=partial.top_k) as version:
        store.write_bytes_atomic(f"{version}/partial.npz", buffer.getvalue())
        store.write_json(f"{version}/meta.json", {**partial.meta(), "run": run, "shard_index": index, **meta})


def _old_layouts(partial) -> dict:
    """A partial's partial.npz arrays in the two layouts written before this one: ``dense`` (a row
    per latent of the shard, no ``fired``) and ``full-rows`` (a full row per fired latent)."""
    dense = partial.dense()
    return {"dense": {name: getattr(dense, name) for name in F.Partial.ARRAYS + F.Partial.WITNESS},
            "full-rows": {name: getattr(partial.sparse(), name) for name in F.Partial.STORED}}


def test_a_partial_stores_only_the_latents_that_fired_in_its_batch(store):
    """A batch of 6 tokens fires at most 6 x k = 24 of the SAE's 64 latents: its committed partial
    holds ``fired`` (those latents, exactly the ones with an activating token), one count, sum and
    max per fired latent, and of their top-k and reservoir rows the filled slots only (min(count,
    width) each, ``features.filled_slots``), so its bytes grow with the latents that fired and their
    examples, not with the shard's width."""
    make_dataset(store, [6, 300])
    sae = make_sae("topk")
    settings = F.FeatureSettings(top_k=3, reservoir_factor=2)  # every latent a witness: all its tokens recorded
    n_fired = {}
    for key in ("p0", "p1"):
        partial = F.compute_partial(store, sae, key, 0, N_LATENTS, settings, batch_rows=4)
        partial_store.write_partial(store, "run", key, 0, partial)
        stored = _stored_arrays(store, "run", key, 0)
        fired, count = stored["fired"], stored["count"]
        assert np.array_equal(fired, np.unique(stored["witness_feature"]))  # the latents with an activating token
        assert np.array_equal(count, np.bincount(stored["witness_feature"])[fired]) and (count > 0).all()
        for name in ("sum", "max"):
            assert len(stored[name]) == len(fired), name
        for name, width in (("top_act", 3), ("top_row", 3), ("res_key", 6), ("res_row", 6), ("res_act", 6)):
            assert stored[name].shape == (np.minimum(count, width).sum(),), name
            assert stored[name].dtype == F.EMPTY_LATENT[name][0], name
        assert (stored["hist"] > 0).all() and stored["hist"].sum() == count.sum()
        n_fired[key] = len(fired)
    assert n_fired["p0"] <= 24 < n_fired["p1"]
    # the partial read back, filled in, is the full state: the other latents empty
    back = partial_store.read_partial(store, "run", "p0", 0)
    dense = back.dense()
    never = np.setdiff1d(np.arange(N_LATENTS), back.fired)
    assert dense.top_act.shape == (N_LATENTS, 3) and len(never) >= N_LATENTS - 24
    for name, (dtype, value) in F.EMPTY_LATENT.items():
        assert getattr(dense, name).dtype == dtype and (getattr(dense, name)[never] == value).all(), name
        assert np.array_equal(getattr(dense, name)[back.fired], getattr(back, name)), name


def test_a_partials_bytes_grow_with_its_filled_slots_not_with_the_reservoir_size(store):
    """The same batch's partial at reservoir_factor 10 and 40 (R = 200 and 800 slots a latent):
    when no latent fires R times, the same examples fill the same slots, so the stored partial.npz
    is the same size within a few hundred bytes (the npz headers), where full rows would be ~4x
    larger, and within ``feature_plan.stored_partials_bytes`` (docs/scale.md's bound). It reads
    back as exactly the partial pass 1 returned."""
    make_dataset(store, [600])
    sae = make_sae("topk")
    sizes = {}
    for factor in (10, 40):
        settings = F.FeatureSettings(top_k=20, reservoir_factor=factor)
        partial = F.compute_partial(store, sae, "p0", 0, N_LATENTS, settings, batch_rows=128)
        assert 0 < partial.count.max() < 200  # every latent fires fewer than R times
        path = partial_store.write_partial(store, f"r{factor}", "p0", 0, partial)
        sizes[factor] = store.fs.size(f"{path}/partial.npz")
        back = partial_store.read_partial(store, f"r{factor}", "p0", 0)
        for name in F.Partial.STORED:
            assert np.array_equal(getattr(back, name), getattr(partial, name)), name
            assert getattr(back, name).dtype == getattr(partial, name).dtype, name
        full_rows = sum(getattr(partial, name).nbytes for name in F.Partial.ARRAYS)
        witness = sum(getattr(partial, name).nbytes for name in F.Partial.WITNESS)
        bound = stored_partials_bytes(N_LATENTS, partial.n_entries, 20, 20 * factor, F.N_HIST_BINS)
        assert sizes[factor] - witness <= bound + 4096, (sizes, witness, bound)  # the planner's bound + npz headers
    assert abs(sizes[40] - sizes[10]) < 512 and sizes[40] < full_rows / 4, (sizes, full_rows)


def test_the_filled_slots_are_what_pass_1_keeps_and_nothing_past_them_is_stored():
    """``features.filled_slots`` (the first min(count, width) slots) is exactly where pass 1's
    selectors leave examples, for latents below, at and above the width; a partial with an example
    past them is refused by the writer, not stored without it."""
    width, counts = 3, [1, 2, 3, 5, 9]
    state = F._ShardState(0, len(counts), width, width, 7, np.zeros(0, np.int64), torch.device("cpu"))
    feat = torch.tensor([f for f, c in enumerate(counts) for _ in range(c)])
    state.add(torch.arange(len(feat)), feat, torch.rand(len(feat)) + 0.5)
    arrays = state.finish()
    for name in F.Partial.SLOTS:
        filled = F.filled_slots(arrays["count"], width)
        assert filled.sum(1).tolist() == [min(c, width) for c in counts]
        assert (arrays[name][~filled] == F.EMPTY_LATENT[name][1]).all(), name
        assert (arrays["top_row" if name.startswith("top") else "res_row"][filled] >= 0).all(), name
    make = dict(partition="p0", partition_version="v", start=0, stop=len(counts), top_k=width,
                reservoir_size=width, seed=0, batch_rows=4, n_tokens=len(feat))
    partial = F.Partial(**make, **{k: v for k, v in arrays.items() if k not in ("n_entries", "entries_sum",
                                                                              "diagnostics")})
    partial.res_row[0, 2] = 4  # an example in latent 0's third slot, past its one filled slot
    with pytest.raises(F.FeatureError, match="res_row entries past the first min.count, width. slots"):
        partial_store.filled_slot_arrays(partial)


def test_the_empty_latent_is_pass_1s_state_of_a_latent_that_never_fired():
    """``EMPTY_LATENT`` (what a partial leaves out and ``Partial.dense`` fills in) is exactly what
    pass 1's state holds for a latent without an entry: its selectors' slots, decoded as
    ``_ShardState.finish`` decodes them, and zero count, sum, max and histogram."""
    state = F._ShardState(0, 4, 3, 6, 1, np.zeros(0, np.int64), torch.device("cpu"))
    state.add(torch.tensor([7, 9]), torch.tensor([2, 2]), torch.tensor([0.5, 1.5]))
    state.flush()
    never = [0, 1, 3]
    top_act, top_row = decode_top(state.top.finish()[0])  # every latent's rows, as before partials were sparse
    res_slots, res_key = state.res.finish()
    assert (res_slots[never] == feature_select.Selector.EMPTY).all()  # finish: row -1, activation 0
    held = {"top_act": top_act, "top_row": top_row, "res_key": res_key, "res_row": torch.full_like(res_key, -1),
            "res_act": torch.zeros(res_key.shape), "count": state.count, "sum": state.total, "max": state.vmax,
            "hist": state.hist.view(4, F.N_HIST_BINS)}
    for name, (dtype, value) in F.EMPTY_LATENT.items():
        assert (held[name][never].numpy() == value).all(), name
        assert held[name].numpy().dtype == dtype, name
    assert int(state.count[2]) == 2 and float(top_act[2, 0]) == 1.5


@pytest.mark.parametrize("variant", ["topk", "relu"])
def test_tables_from_sparse_partials_equal_those_from_dense_ones_bit_for_bit(store, variant):
    """Small batches fire few of a shard's latents. The tables merged from the partials pass 1
    commits (filled slots of the fired latents) equal, bit for bit (top-K, random samples, interval
    examples, counts, sums, maxima, histograms), those merged from the same partials in the layouts
    written before: dense (a row for every latent, no ``fired``; still read, and folded row by row
    as then) and full rows of the fired latents, or from a mix of the three; and they pass the
    exactness check."""
    splits = [5, 9, 1, 12, 7, 40]
    make_dataset(store, splits, exact=True)
    sae = make_sae(variant, exact=True)
    settings = F.FeatureSettings(top_k=3, reservoir_factor=2)
    build_feature_tables(store, sae, "run", settings, n_feature_shards=2, batch_rows=4)
    keys = [f"p{i}" for i in range(len(splits))]
    for index, (start, stop) in enumerate(F.feature_shards(N_LATENTS, 2)):
        stored = [partial_store.read_partial(store, "run", key, index) for key in keys]
        assert all(p.fired is not None for p in stored) and min(len(p.fired) for p in stored) < (stop - start) / 2
        runs = {"old": {key: "dense" for key in keys}, "old-full-rows": {key: "full-rows" for key in keys},
                "mixed": {key: layout for key, layout in zip(keys, ["full-rows", "dense", "new"] * 2)},
                "mixed-first": {key: layout for key, layout in zip(keys, ["dense", "new", "full-rows"] * 2)}}
        for run, layouts in runs.items():
            for key, partial in zip(keys, stored):
                if layouts[key] == "new":
                    partial_store.write_partial(store, run, key, index, partial)
                else:
                    _commit_partial_arrays(store, run, key, index, partial, _old_layouts(partial)[layouts[key]])
        assert partial_store.read_partial(store, "old", "p0", index).fired is None  # the old layout reads as it is
        old_rows = partial_store.read_partial(store, "old-full-rows", "p0", index)
        assert old_rows.fired is not None and old_rows.top_act.shape[1] == 3
        new = read_tables(store, "run", index)
        for run in runs:
            tables = merge_shard_tables(store, sae, run, index, keys, settings)
            assert tables.stats.equals(new.stats) and tables.examples.equals(new.examples), run
        assert set(new.examples["kind"]) == {"top", "random", "interval"}
        check = brute_force_check(store, sae, "run", index, start, stop, sample_features=stop - start)
        assert check["ok"] and len(check["features_checked"]) == stop - start, check["mismatches"][:3]


def test_a_partial_whose_arrays_disagree_on_its_latents_is_refused_by_name(store):
    make_dataset(store, [6])
    partial = F.compute_partial(store, make_sae("topk"), "p0", 0, N_LATENTS, F.FeatureSettings(top_k=3))
    old, new = _old_layouts(partial)["full-rows"], partial_store.filled_slot_arrays(partial)
    layout = {"layout": partial_store.FILLED_SLOTS}
    for arrays, meta, damage, match in (
            (old, {}, {"fired": partial.fired[:-1]}, "has top_act of shape"),
            (old, {}, {"fired": partial.fired[::-1]}, "not ascending ids"),
            (old, {}, {"fired": partial.fired + N_LATENTS}, r"not ascending ids in \[0, 64\)"),
            (new, layout, {"fired": partial.fired[:-1]}, "has top_act of shape"),
            (new, layout, {"fired": partial.fired[::-1]}, "not ascending ids"),
            (new, layout, {"res_row": new["res_row"][:-1]}, r"res_row of shape \(\d+,\), not \(\d+,\)"),
            (new, layout, {"hist_nonzero": new["hist_nonzero"][:-1]}, r"hist_nonzero of uint8 \(\d+, 9\), not"),
            (new, layout, {"hist": new["hist"][:-1]}, "one count per bit of hist_nonzero"),
            ({k: v for k, v in new.items() if k != "hist_nonzero"}, layout, {}, r"lacks the arrays \['hist_nonz")):
        _commit_partial_arrays(store, "run", "p0", 0, partial, {**arrays, **damage}, **meta)
        with pytest.raises(F.FeatureError, match=match) as err:
            partial_store.read_partial(store, "run", "p0", 0)
        assert "partial.npz" in str(err.value) and "run pass 1 again" in str(err.value)


def test_written_tables_have_the_schemas_tables_declares(store):
    """stats.parquet and examples.parquet as written: the columns, order and dtypes of
    ``tables.STATS_SCHEMA`` and ``tables.EXAMPLE_SCHEMA`` (the browser and pass 3 read them by those)."""
    from sae_platform.tables import EXAMPLE_SCHEMA, STATS_SCHEMA

    make_dataset(store, [300, 200])
    build_feature_tables(store, make_sae("relu"), "run", F.FeatureSettings(top_k=3, reservoir_factor=2),
                         n_feature_shards=2)
    for index in range(2):
        path = store.resolve(tables_name("run", index))
        for name, schema in (("stats.parquet", STATS_SCHEMA), ("examples.parquet", EXAMPLE_SCHEMA)):
            assert list(pl.read_parquet_schema(f"{path}/{name}").items()) == list(schema.items()), name

"""Feature tables: pass 1 (dataset shard x feature shard) → pass 2 (per feature shard) → pass 3 windows
(per dataset shard) → contexts regrouped per feature shard. All four describe one SAE checkpoint."""

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    asset,
)

from assets.activations import activations
from assets.partitions import ACTIVATION_BATCHES, FEATURE_JOBS, FEATURE_SHARDS, N_FEATURE_SHARDS
from assets.training import sae_checkpoint
from resources import BaseModelResource, FeatureTablesResource, StorageResource
from sae_platform import contexts as ctx
from sae_platform import features as ft
from sae_platform.activations import list_partitions
from sae_platform.lineage import feature_table_lineage, recorded_lineage
from sae_platform.model import pick_device
from sae_platform.trainer import load_sae


def logits_name(run: str, shard_index: int) -> str:
    return f"features/{run}/logits/f{shard_index}"


def _shard(key: str) -> int:
    return int(key.removeprefix("f"))


def shown_examples(examples: pl.DataFrame, random_examples: int) -> pl.DataFrame:
    """The examples that get context windows: all top and interval ones, and the first
    ``random_examples`` of the random sample (ranked by sample key, so still a uniform sample).
    The whole sample stays in the tables for interval picking and statistics."""
    return examples.filter((pl.col("kind") != "random") | (pl.col("rank") < random_examples))


def _load(storage: StorageResource, features: FeatureTablesResource):
    store = storage.store()
    sae, _ = load_sae(store, features.sae_name, pick_device(features.device))
    return store, sae


@asset(partitions_def=FEATURE_JOBS, group_name="features", kinds={"pytorch"},
       deps=[AssetDep(activations, partition_mapping=MultiToSingleDimensionPartitionMapping("batch")),
             AssetDep(sae_checkpoint, partition_mapping=AllPartitionMapping())])
def feature_stats_partial(context: AssetExecutionContext, storage: StorageResource,
                          features: FeatureTablesResource) -> MaterializeResult:
    """Pass 1: stream one activation batch through the SAE for one slice of features; keep per feature
    the top-K, a uniform random sample, counts, sum, max and a histogram."""
    keys = context.partition_key.keys_by_dimension
    return MaterializeResult(metadata=stats_partial(storage, features, keys["batch"], keys["features"]))


def stats_partial(storage: StorageResource, features: FeatureTablesResource, batch: str, shard_key: str) -> dict:
    store, sae = _load(storage, features)
    index = _shard(shard_key)
    start, stop = ft.feature_shard(sae.n_latents, N_FEATURE_SHARDS, index)
    partial = ft.compute_partial(store, sae, batch, start, stop, top_k=features.top_k,
                                 reservoir_factor=features.reservoir_factor, seed=features.seed)
    path = ft.write_partial(store, features.sae_name, batch, index, partial)
    return {"sae": features.sae_name, "features": f"[{start}, {stop})", "n_tokens": int(partial.n_tokens),
            "path": MetadataValue.path(store.url(path))}


@asset(partitions_def=FEATURE_SHARDS, group_name="features", kinds={"parquet"},
       deps=[AssetDep(feature_stats_partial, partition_mapping=MultiToSingleDimensionPartitionMapping("features"))],
       check_specs=[AssetCheckSpec("matches_brute_force", asset="feature_topk", blocking=True,
                                   description="a sample of features recomputed densely over every batch: exact")])
def feature_topk(context: AssetExecutionContext, storage: StorageResource, features: FeatureTablesResource,
                 language_model: BaseModelResource) -> MaterializeResult:
    """Pass 2: merge the partials of every batch: exact top-K, uniform random and interval examples,
    density, histogram; plus the logit effects (W_dec · W_U) of each feature."""
    metadata, check = merge_shard(storage, features, language_model, context.partition_key, context.run.run_id)
    return MaterializeResult(metadata=metadata, check_results=[AssetCheckResult(**check)])


def merge_shard(storage: StorageResource, features: FeatureTablesResource, language_model: BaseModelResource,
                shard_key: str, run_id: str, batches: list[str] | None = None) -> tuple[dict, dict]:
    """Pass 2 of one feature shard over ``batches`` (default: every cached one); returns its metadata
    and the brute-force check's verdict."""
    store, sae = _load(storage, features)
    index = _shard(shard_key)
    start, stop = ft.feature_shard(sae.n_latents, N_FEATURE_SHARDS, index)
    batches = list_partitions(store) if batches is None else batches
    tables = ft.merge_partials(ft.read_partials(store, features.sae_name, index, batches),
                               n_intervals=features.n_intervals, per_interval=features.per_interval)
    hooked, _ = language_model.load(store, device=str(next(sae.parameters()).device))
    logits = ctx.logit_effects(sae, ctx.unembedding_matrix(hooked.model), hooked.tokenizer, start, stop)
    path = ft.write_tables(store, features.sae_name, index, tables)
    with store.writing(logits_name(features.sae_name, index)) as version:
        store.write_parquet(f"{version}/logit_effects.parquet", logits)
    check = ft.brute_force_check(store, sae, features.sae_name, index, start, stop)
    lineage = feature_table_lineage(store, features.sae_name, index, run_id=run_id)
    store.write_json(store.path("features", features.sae_name, "lineage", f"f{index}.json"), lineage)
    dead = int((tables.stats["count"] == 0).sum())
    metadata = {"sae": features.sae_name, "features": f"[{start}, {stop})", "n_batches": len(batches),
                "n_tokens": int(tables.meta["n_tokens_total"]), "n_examples": tables.examples.height,
                "never_active_features": dead, "path": MetadataValue.path(store.url(path)),
                "lineage": MetadataValue.json(lineage)}
    verdict = {"check_name": "matches_brute_force", "passed": bool(check["ok"]),
               "metadata": {"features_checked": str(check["features_checked"]),
                            "mismatches": str(check["mismatches"][:5])}}
    return metadata, verdict


@asset(partitions_def=ACTIVATION_BATCHES, group_name="features", kinds={"parquet"},
       deps=[AssetDep(feature_topk, partition_mapping=AllPartitionMapping()), activations])
def feature_context_windows(context: AssetExecutionContext, storage: StorageResource,
                            features: FeatureTablesResource, language_model: BaseModelResource) -> MaterializeResult:
    """Pass 3, sharded over the dataset: the windows around every chosen example in this batch, with the
    feature's activation on each token and the decoded token strings."""
    return MaterializeResult(metadata=context_windows(storage, features, language_model, context.partition_key))


def context_windows(storage: StorageResource, features: FeatureTablesResource, language_model: BaseModelResource,
                    batch: str) -> dict:
    store, sae = _load(storage, features)
    examples = [shown_examples(ft.read_tables(store, features.sae_name, i).examples, features.random_examples)
                for i in range(N_FEATURE_SHARDS)]
    hooked, _ = language_model.load(store, device="cpu")
    info = ctx.build_partition_windows(store, features.sae_name, sae, batch, pl.concat(examples),
                                       hooked.tokenizer, before=features.before, after=features.after)
    return {"n_windows": info["n_windows"], "n_features": info["n_features"], "path": MetadataValue.path(info["path"])}


@asset(partitions_def=FEATURE_SHARDS, group_name="features", kinds={"parquet"},
       deps=[AssetDep(feature_context_windows, partition_mapping=AllPartitionMapping())])
def feature_contexts(context: AssetExecutionContext, storage: StorageResource,
                     features: FeatureTablesResource) -> MaterializeResult:
    """Pass 3, regrouped: the context windows of this feature shard's examples, sorted by feature."""
    return MaterializeResult(metadata=regroup(storage, features, context.partition_key))


def regroup(storage: StorageResource, features: FeatureTablesResource, shard_key: str,
            batches: list[str] | None = None) -> dict:
    store, sae = _load(storage, features)
    index = _shard(shard_key)
    start, stop = ft.feature_shard(sae.n_latents, N_FEATURE_SHARDS, index)
    batches = list_partitions(store) if batches is None else batches
    frame = ctx.regroup_by_feature(store, features.sae_name, batches, start, stop)
    info = ctx.write_feature_contexts(store, features.sae_name, index, frame)
    return {"features": f"[{start}, {stop})", "n_windows": frame.height, "path": MetadataValue.path(info["path"])}


BROWSER_URL = "http://127.0.0.1:8000/"


def browser_dir(store, run: str) -> str:
    return store.path("browser", run)


@asset(group_name="features", kinds={"html"},
       deps=[AssetDep(feature_topk, partition_mapping=AllPartitionMapping()),
             AssetDep(feature_contexts, partition_mapping=AllPartitionMapping())])
def feature_browser(context: AssetExecutionContext, storage: StorageResource,
                    features: FeatureTablesResource) -> MaterializeResult:
    """A static feature browser: index with search, a page per feature (highlighted examples,
    histogram, logit effects, lineage). Serve it with `make browse`."""
    return MaterializeResult(metadata=build_browser(context.log, storage, features, context.run.run_id))


def build_browser(log, storage: StorageResource, features: FeatureTablesResource, run_id: str) -> dict:
    from sae_platform.browser import build_site

    store = storage.store()
    shards = []
    for index in range(N_FEATURE_SHARDS):
        tables = ft.read_tables(store, features.sae_name, index)
        logits_path = store.require(logits_name(features.sae_name, index), "logit effects", "materialize feature_topk")
        shards.append({"start": tables.meta["start"], "stop": tables.meta["stop"], "feature_stats": tables.stats,
                       "feature_examples": shown_examples(tables.examples, features.random_examples),
                       "feature_contexts": ctx.read_feature_contexts(store, features.sae_name, index),
                       "logit_effects": store.read_parquet(f"{logits_path}/logit_effects.parquet"),
                       "lineage": recorded_lineage(store, features.sae_name, index)})  # each page: its shard's
    # site-wide: what every shard shares (checkpoint, shuffle, partitions, model) and the browser's run
    lineage = {k: v for k, v in shards[0]["lineage"].items() if k != "feature_table"}
    lineage["browser_dagster_run_id"] = run_id
    out = browser_dir(store, features.sae_name)
    summary = build_site(out if store.is_local else store.url(out), run=features.sae_name, shards=shards,
                         hist_bin_edges=ft.hist_bin_edges(), lineage=lineage, n_intervals=features.n_intervals,
                         fs=None if store.is_local else store.fs)
    log.info(f"{summary['n_features']:,} features, {summary['bytes'] / 1e6:.1f} MB in {summary['seconds']} s")
    return {
        "n_features": summary["n_features"], "bytes": summary["bytes"], "files": summary["files"],
        "seconds": summary["seconds"], "path": MetadataValue.path(store.url(out)),
        "url": MetadataValue.url(BROWSER_URL), "serve_with": "make browse  (or: sae-platform browse)",
    }


FEATURE_ASSETS = [feature_stats_partial, feature_topk, feature_context_windows, feature_contexts, feature_browser]

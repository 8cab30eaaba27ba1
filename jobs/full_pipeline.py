"""`full_pipeline`: the whole chain in one run, text → activations → shuffle → SAEs → evaluation →
feature tables → context windows → browser.

    dagster job execute -m jobs.definitions -j full_pipeline -c config/demo.yaml

The assets are cut four different ways (activation batches, shuffle workers, sweep entries, feature
shards), and an asset job can only cover one partitioning, so this is an op job with dynamic
fan-out. Each op runs the *same stage function* as its asset (``assets/``) and logs that asset's
materialization for the partition it covered, so the asset catalog, its lineage and checks look
the same whichever way a stage ran. (Op names must differ from the assets' own ops: cache_batch
logs `activations`, train_sae logs `sae_checkpoint`, and so on; each op's description says which.)
With the multiprocess executor (the default) the fanned-out steps run side by side;
Celery/Kubernetes executors (SAE_PLATFORM_EXECUTOR) spread them over machines.

It is safe to re-run: cached batches are skipped, a shuffle whose plan already matches the committed
store is skipped, training resumes from (or finds) its last checkpoint, and the feature stages are
skipped when the tables and browser already describe that checkpoint. Evaluation always runs.
"""

import re

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    Config,
    DynamicOut,
    DynamicOutput,
    Failure,
    In,
    MultiPartitionKey,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    in_process_executor,
    job,
    multi_or_in_process_executor,
    op,
)
from pydantic import Field

from assets import features as feature_stages
from assets import shuffle as shuffle_stages
from assets import training as training_stages
from assets.activations import ActivationsConfig, cache_batch, convert_base_model
from assets.partitions import ACTIVATION_BATCHES, N_FEATURE_SHARDS, N_SHUFFLE_WORKERS, SAE_SWEEP_SPECS
from assets.training import EvalConfig, TrainConfig
from resources import (
    BaseModelResource,
    FeatureTablesResource,
    ShuffleResource,
    StorageResource,
    TextSourceResource,
)
from sae_platform import shuffle as sh
from sae_platform.activations import partition_name
from sae_platform.errors import PlatformError, SourceError
from sae_platform.corpus import source_stamp
from sae_platform.freshness import changed_sources, stale_reasons
from jobs.settings import Settings
from sae_platform.model import model_artifact_name

FEATURE_SHARD_KEYS = [f"f{i}" for i in range(N_FEATURE_SHARDS)]


def _materialized(context: OpExecutionContext, asset: str, metadata: dict, partition: str | None = None) -> None:
    context.log_event(AssetMaterialization(asset_key=asset, partition=partition, metadata=metadata))


def _mapping_key(index: int, label: str) -> str:
    """Dynamic mapping keys allow only [A-Za-z0-9_]; the index keeps them unique."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', label)}_{index}"


def _check(context: OpExecutionContext, asset: str, verdict: dict, partition: str | None = None,
           blocking: bool = False) -> None:
    """Log a check's verdict on the asset; a failed blocking check stops everything downstream."""
    context.log_event(AssetCheckEvaluation(
        asset_key=AssetKey(asset), check_name=verdict["check_name"], passed=verdict["passed"],
        metadata=verdict.get("metadata", {}), severity=verdict.get("severity", AssetCheckSeverity.ERROR),
        blocking=blocking, partition=partition))
    if blocking and not verdict["passed"]:
        raise Failure(f"check {verdict['check_name']} failed on {asset}{f' [{partition}]' if partition else ''}",
                      metadata=verdict.get("metadata", {}))


# -- activations ----------------------------------------------------------------------------------

@op(name="convert_base_model", out=Out(Nothing),
    description="Logs base_model: converts the base model once (skipped when stored).")
def store_base_model_op(context: OpExecutionContext, storage: StorageResource,
                        language_model: BaseModelResource) -> None:
    store = storage.store()
    if store.resolve(model_artifact_name(language_model.source)) is not None:
        context.log.info(f"base model {language_model.source} already stored")
        return
    _materialized(context, "base_model", convert_base_model(context.log, storage, language_model))


class BatchesConfig(Config):
    recache: bool = Field(default=False, description="re-cache batches that are already stored")
    max_batches: int | None = Field(default=None, description="only the first N inbox files (sorted); default all")
    keys: list[str] | None = Field(default=None, description="only these partitions (the inbox sensor's "
                                                             "cache_inbox runs); default: every inbox file")


@op(ins={"model": In(Nothing)}, out=DynamicOut(tuple),
    description="One activation partition per inbox file (registered in the instance), fanned out.")
def activation_batches(context: OpExecutionContext, config: BatchesConfig, text_source: TextSourceResource,
                       storage: StorageResource):
    inbox = text_source.scan(storage.store())
    for skipped in inbox.skipped:  # every file is either cached or named here with its reason
        context.log.warning(f"skipped {skipped.url}: {skipped.reason}")
    keys = sorted(f.key for f in inbox.files)[: config.max_batches]
    if not keys:
        text_source.files()  # raises the error naming the empty source
    if config.keys is not None:
        gone = sorted(set(config.keys) - set(keys))
        if gone:
            context.log.warning(f"no longer in the inbox (or skipped): {', '.join(gone)}")
        keys = [k for k in keys if k in set(config.keys)]
    registered = set(context.instance.get_dynamic_partitions(ACTIVATION_BATCHES.name))
    new = [k for k in keys if k not in registered]
    if new:
        context.instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, new)
    context.log.info(f"{len(keys)} batch(es), {len(new)} newly registered")
    for index, key in enumerate(keys):
        yield DynamicOutput((key, config.recache), mapping_key=_mapping_key(index, key))


@op(name="cache_batch", description="Logs activations[batch]: caches one batch (skipped when stored and its file "
                                    "unchanged, unless recache). A file that cannot be read is reported "
                                    "(log, output metadata, `sae-platform status`) and the other batches go on.")
def cache_batch_op(context: OpExecutionContext, config: ActivationsConfig, storage: StorageResource,
                   language_model: BaseModelResource, text_source: TextSourceResource, batch: tuple) -> dict:
    key, recache = batch
    store = storage.store()
    try:
        if not recache and store.pointer(partition_name(key)) is not None:
            text_file = text_source.file(key, store)
            if not changed_sources(store, {key: source_stamp(text_file, text_source.storage_options)}):
                context.log.info(f"activations/{key} already cached")
                return {"key": key, "failed": None}
            context.log.info(f"{text_file.url} was replaced since it was cached: caching it again")
        metadata = cache_batch(context.log, config, storage, language_model, text_source, key)
    except SourceError as error:  # this file's fault: report it, let the other batches go on
        context.log.error(f"batch {key} was not cached, the pipeline goes on without it: {error}")
        context.add_output_metadata({"failed": str(error)})
        return {"key": key, "failed": str(error)}
    _materialized(context, "activations", metadata, partition=key)
    return {"key": key, "failed": None}


# -- shuffle --------------------------------------------------------------------------------------

@op(name="plan_shuffle", description="Logs shuffle_plan: pins every cached partition and plans the passes; "
                                     "done=True when the committed store already has this plan.")
def plan_shuffle_op(context: OpExecutionContext, storage: StorageResource, shuffle: ShuffleResource,
                    batches: list[dict]) -> dict:
    failed = {b["key"]: b["failed"] for b in batches if b["failed"]}
    if failed:
        context.log.error(f"{len(failed)} batch(es) failed to cache and are left out: "
                          + "; ".join(f"{k}: {r.splitlines()[0]}" for k, r in sorted(failed.items())))
        context.add_output_metadata({"failed_batches": sorted(failed), "failed_reasons": failed})
    metadata = shuffle_stages.plan_shuffle(context.log, storage, shuffle)
    index = storage.store().pointer(f"{sh.SHUFFLED}/{shuffle.name}")
    done = index is not None and index.get("plan_id") == metadata["plan_id"]
    if done:
        context.log.info(f"shuffled/{shuffle.name} already holds plan {metadata['plan_id']}: nothing to shuffle")
    else:
        _materialized(context, "shuffle_plan", metadata)
    return {"plan_id": metadata["plan_id"], "done": done}


@op(out=DynamicOut(dict), description="The shuffle's workers, fanned out (worker w runs jobs j % N == w).")
def shuffle_workers(after):
    """``after``: the plan, or every worker's result of the pass before (a pass waits for all of them:
    a bucket gathers rows from every job)."""
    plan = {k: v for k, v in (after[0] if isinstance(after, list) else after).items() if k != "worker"}
    for worker in range(N_SHUFFLE_WORKERS):
        yield DynamicOutput({**plan, "worker": worker}, mapping_key=f"w{worker}")


def _shuffle_step(name: str, asset: str, run_stage):
    @op(name=name, description=f"Logs {asset}[worker]: the same code as that asset's partition.")
    def step(context: OpExecutionContext, storage: StorageResource, shuffle: ShuffleResource, work: dict) -> dict:
        if not work["done"]:
            metadata = run_stage(context.log, storage, shuffle, {work["worker"]})
            _materialized(context, asset, metadata, partition=str(work["worker"]))
        return work

    return step


def _scatter_pass(pass_index: int):
    return lambda log, storage, shuffle, workers: shuffle_stages.scatter(log, storage, shuffle, pass_index, workers)


shuffle_pass_1 = _shuffle_step("scatter_pass_1", "shuffle_pass_1", _scatter_pass(1))
shuffle_pass_2 = _shuffle_step("scatter_pass_2", "shuffle_pass_2", _scatter_pass(2))
shuffle_final = _shuffle_step("shuffle_buckets", "shuffle_final", shuffle_stages.finalize)


@op(name="commit_shuffle", out=Out(Nothing),
    description="Logs shuffled_activations: commits the store and runs its checks (the permutation "
                "check blocks).")
def commit_shuffle_op(context: OpExecutionContext, storage: StorageResource, shuffle: ShuffleResource,
                      workers: list[dict]) -> None:
    if workers[0]["done"]:
        return
    _materialized(context, "shuffled_activations", shuffle_stages.commit(storage, shuffle))
    verdict = {"check_name": "shuffle_is_a_permutation", **shuffle_stages.check_permutation(storage, shuffle)}
    if not verdict["passed"]:  # uncommit, so that no SAE trains on it and the next run shuffles again
        storage.store().delete(f"{sh.SHUFFLED}/{shuffle.name}")
    _check(context, "shuffled_activations", verdict, blocking=True)
    _check(context, "shuffled_activations", {"check_name": "shuffle_is_uniform",
                                             **shuffle_stages.check_uniformity(storage, shuffle)})


# -- training -------------------------------------------------------------------------------------

class SweepConfig(Config):
    sae_names: list[str] = Field(default=[], description="sweep entries to train; default: the one the feature "
                                                         "tables describe (resources.features.config.sae_name)")


@op(ins={"shuffled": In(Nothing)}, out=DynamicOut(str), description="The sweep entries to train, fanned out.")
def sae_sweep(context: OpExecutionContext, config: SweepConfig, features: FeatureTablesResource):
    names = config.sae_names or [features.sae_name]
    unknown = [n for n in names if n not in SAE_SWEEP_SPECS]
    if unknown:
        raise PlatformError(f"no SAE named {', '.join(unknown)} in the sweep",
                            f"use one of {', '.join(SAE_SWEEP_SPECS)} (or point SAE_PLATFORM_SWEEP at your sweep)")
    if features.sae_name not in names:
        raise PlatformError(f"the feature tables describe {features.sae_name!r}, which this run does not train",
                            "add it to ops.sae_sweep.config.sae_names or set resources.features.config.sae_name")
    for index, name in enumerate(names):
        yield DynamicOutput(name, mapping_key=_mapping_key(index, name))


@op(name="train_sae", pool="gpu",
    description="Logs sae_checkpoint[name]: trains one SAE (resumes from its last checkpoint).")
def train_op(context: OpExecutionContext, config: TrainConfig, storage: StorageResource, shuffle: ShuffleResource,
             name: str) -> str:
    metadata = training_stages.train_and_export(context.log, config, storage, shuffle, name)
    _materialized(context, "sae_checkpoint", metadata, partition=name)
    return name


@op(name="evaluate_sae", description="Logs sae_eval[name]: held-out quality of one SAE.")
def eval_op(context: OpExecutionContext, config: EvalConfig, storage: StorageResource, shuffle: ShuffleResource,
            language_model: BaseModelResource, holdout_text: TextSourceResource, name: str) -> str:
    metadata = training_stages.evaluate(context.log, config, storage, shuffle, language_model, holdout_text, name)
    _materialized(context, "sae_eval", metadata, partition=name)
    return name


# -- feature tables -------------------------------------------------------------------------------

def _pinned_batches(storage: StorageResource, shuffle: ShuffleResource) -> list[str]:
    """The batches the shuffled store (so the SAE) was built from. The feature stages describe exactly
    these, even when another batch gets cached while this run goes on (the next refresh adds it)."""
    store = storage.store()
    path = store.require(f"{sh.SHUFFLED}/{shuffle.name}", "the shuffled store", "run the shuffle stage first")
    return sorted(i["key"] for i in store.read_json(f"{path}/index.json")["inputs"])


class FeaturesStaleConfig(Config):
    rebuild: bool = Field(default=False, description="rebuild the tables and browser even when they already "
                                                     "describe the current checkpoint")


@op(ins={"trained": In(Nothing)}, out=Out(Nothing, is_required=False),
    description="Goes on to the feature stages unless the tables and browser already describe the current "
                "checkpoint (then every feature step is skipped).")
def features_stale(context: OpExecutionContext, config: FeaturesStaleConfig, storage: StorageResource,
                   shuffle: ShuffleResource, features: FeatureTablesResource):
    reasons = stale_reasons(storage.store(), shuffle_name=shuffle.name, sae_name=features.sae_name,
                            n_feature_shards=N_FEATURE_SHARDS)
    if not reasons and not config.rebuild:
        context.log.info(f"the feature tables and browser of {features.sae_name} already describe its current "
                         "checkpoint: nothing to rebuild (ops.features_stale.config.rebuild forces it)")
        return
    context.log.info("; ".join(reasons) or "rebuild requested")
    yield Output(None)


@op(ins={"stale": In(Nothing)}, out=DynamicOut(tuple),
    description="Pass 1 work: every (activation batch, feature shard), fanned out.")
def feature_jobs(storage: StorageResource, shuffle: ShuffleResource):
    for index, batch in enumerate(_pinned_batches(storage, shuffle)):
        for shard in FEATURE_SHARD_KEYS:
            yield DynamicOutput((batch, shard), mapping_key=_mapping_key(index, f"{batch}_{shard}"))


@op(name="partial_stats", description="Logs feature_stats_partial[batch|shard]: pass 1.")
def stats_partial_op(context: OpExecutionContext, storage: StorageResource, features: FeatureTablesResource,
                     work: tuple) -> str:
    batch, shard = work
    metadata = feature_stages.stats_partial(storage, features, batch, shard)
    _materialized(context, "feature_stats_partial", metadata,
                  partition=MultiPartitionKey({"batch": batch, "features": shard}))
    return batch


@op(ins={"after": In(Nothing)}, out=DynamicOut(tuple), description="The feature shards, fanned out.")
def feature_shards(storage: StorageResource, shuffle: ShuffleResource):
    batches = _pinned_batches(storage, shuffle)
    for shard in FEATURE_SHARD_KEYS:
        yield DynamicOutput((shard, batches), mapping_key=shard)


@op(ins={"after": In(Nothing)}, out=DynamicOut(str), description="The shuffled activation batches, fanned out.")
def cached_batches(storage: StorageResource, shuffle: ShuffleResource):
    for index, batch in enumerate(_pinned_batches(storage, shuffle)):
        yield DynamicOutput(batch, mapping_key=_mapping_key(index, batch))


@op(name="merge_shard", description="Logs feature_topk[shard]: pass 2, with its blocking brute-force check.")
def merge_shard_op(context: OpExecutionContext, storage: StorageResource, features: FeatureTablesResource,
                   language_model: BaseModelResource, work: tuple) -> str:
    shard, batches = work
    metadata, verdict = feature_stages.merge_shard(storage, features, language_model, shard, context.run_id, batches)
    _materialized(context, "feature_topk", metadata, partition=shard)
    _check(context, "feature_topk", verdict, partition=shard, blocking=True)
    return shard


@op(name="context_windows", description="Logs feature_context_windows[batch]: pass 3.")
def context_windows_op(context: OpExecutionContext, storage: StorageResource, features: FeatureTablesResource,
                       language_model: BaseModelResource, batch: str) -> str:
    metadata = feature_stages.context_windows(storage, features, language_model, batch)
    _materialized(context, "feature_context_windows", metadata, partition=batch)
    return batch


@op(name="regroup_contexts", description="Logs feature_contexts[shard]: pass 3 regrouped.")
def regroup_op(context: OpExecutionContext, storage: StorageResource, features: FeatureTablesResource,
               work: tuple) -> str:
    shard, batches = work
    _materialized(context, "feature_contexts", feature_stages.regroup(storage, features, shard, batches),
                  partition=shard)
    return shard


@op(name="write_browser", ins={"after": In(Nothing)}, description="Logs feature_browser: the static site.")
def browser_op(context: OpExecutionContext, storage: StorageResource, features: FeatureTablesResource) -> None:
    _materialized(context, "feature_browser",
                  feature_stages.build_browser(context.log, storage, features, context.run_id))


@job(executor_def=in_process_executor, tags={"sae_platform/pipeline": "cache_inbox"},
     description="Cache the activations of several inbox files in one run (what inbox_sensor launches: "
                 "ops.activation_batches.config.keys); a file that fails is reported and the others go on.")
def cache_inbox():
    activation_batches(store_base_model_op()).map(cache_batch_op)


def pipeline_executor(kind: str):
    """Where the steps run, chosen by the deployment (SAE_PLATFORM_EXECUTOR), since an op job's
    executor is fixed when the code loads; its settings still come from `execution: config:`."""
    if kind == "multiprocess":  # one machine; `execution: {config: {in_process: {}}}` also works
        return multi_or_in_process_executor
    engines = {"celery": ("dagster_celery", "celery_executor", "dagster-celery"),
               "k8s": ("dagster_k8s", "k8s_job_executor", "dagster-k8s")}
    if kind not in engines:
        raise PlatformError(f"unknown SAE_PLATFORM_EXECUTOR={kind!r}", "use multiprocess (default), celery or k8s")
    module, name, package = engines[kind]
    try:
        return getattr(__import__(module), name)
    except ImportError as error:
        raise PlatformError(f"SAE_PLATFORM_EXECUTOR={kind} needs the {package} package ({error})",
                            f"pip install '{package}>=0.29,<0.30' on every machine that loads this code") from error


@job(executor_def=pipeline_executor(Settings.from_env().executor),
     description="The whole chain in one run: text → activations → shuffle → SAE training → evaluation → "
                 "feature tables → context windows → browser. Safe to re-run (skips what is up to date).",
     tags={"sae_platform/pipeline": "full"})
def full_pipeline():
    batches = activation_batches(store_base_model_op())
    plan = plan_shuffle_op(batches.map(cache_batch_op).collect())
    scattered = shuffle_workers.alias("pass_1_workers")(plan).map(shuffle_pass_1).collect()
    scattered = shuffle_workers.alias("pass_2_workers")(scattered).map(shuffle_pass_2).collect()
    finals = shuffle_workers.alias("final_workers")(scattered).map(shuffle_final).collect()
    shuffled = commit_shuffle_op(finals)
    evaluated = sae_sweep(shuffled).map(train_op).map(eval_op).collect()
    partials = feature_jobs(features_stale(evaluated)).map(stats_partial_op).collect()
    merged = feature_shards.alias("pass_2_shards")(partials).map(merge_shard_op).collect()
    windows = cached_batches(merged).map(context_windows_op).collect()
    regrouped = feature_shards.alias("regroup_shards")(windows).map(regroup_op).collect()
    browser_op(regrouped)

"""Automation: new data flows in on its own.

* ``inbox_sensor``: a new file in the text source becomes a new activation partition; the files
  to cache (new, replaced under the same name, or failed before and replaced since: the rule of
  ``sae_platform.inbox.needs_caching``) go into few ``cache_inbox`` runs of up to
  ``SAE_PLATFORM_FILES_PER_RUN`` files each. Files not read are named with their reason.
* ``downstream_freshness_sensor``: the declared policy for everything downstream. Once no caching
  run is in flight, if any hook point's shuffled store, the SAE, its feature tables or the browser
  do not pin the currently cached activations (``sae_platform.freshness``), one ``full_pipeline`` run brings
  them up to date. Its run key is the set of cached versions: one run per state of the data. At
  every tick, runs in flight or not, it records feature_browser's check describes_every_cached_batch
  (a runless evaluation) when the answer changed, so the UI shows the browser behind the data. It logs,
  and tags the run with (``sae_platform/plan``), what the refresh will rebuild and about how long
  that takes (``freshness.refresh_plan``: a kept SAE, by ``retrain_above_fraction``, costs pass 1 of
  the new batches, not a training; above it the SAE resumes where its settings allow).
* ``nightly_refresh``: the periodic backfill. Every night, the same check (uncached and replaced
  inbox files included); it launches ``full_pipeline`` when anything is behind, e.g. after a
  failed run, a sensor that was off, or files that arrived while the daemon was down.

All three launch runs with the run config in ``SAE_PLATFORM_RUN_CONFIG`` (``AutomationResource``).
"""

import hashlib
import json

from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetRecordsFilter,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    schedule,
    sensor,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,  # not exported by dagster; what a run's evaluation records
)

from assets.activations import ACTIVATIONS
from assets.features import (
    DESCRIBES_EVERY_CACHED_BATCH,
    FEATURE_BROWSER,
    chain_behind,
    freshness_verdict,
    planned_refresh,
)
from assets.metadata import readable
from assets.partitions import ACTIVATION_BATCHES
from resources import AutomationResource, StorageResource, TextSourceResource
from sae_platform.corpus import display_name
from sae_platform.errors import SourceError, printable
from sae_platform.freshness import cached_versions
from sae_platform.inbox import failed_attempts, needs_caching
from sae_platform.settings import env_value

# How often the sensors look (seconds); tests and busy deployments change it.
SENSOR_INTERVAL_S = env_value("SAE_PLATFORM_SENSOR_INTERVAL_S", 30, int, ge=1, le=24 * 3600)
NIGHTLY_CRON = env_value("SAE_PLATFORM_REFRESH_CRON", "0 3 * * *")
# Seconds a tick may spend reading files to compare their contents (Dagster stops a sensor at 60 s);
# a comparison not finished goes on at the next tick.
HASH_BUDGET_S = env_value("SAE_PLATFORM_SENSOR_HASH_BUDGET_S", 20.0, float, ge=0.1, le=50)
# Inbox files cached per cache_inbox run: 200 files dropped at once are 8 runs, not 200.
FILES_PER_RUN = env_value("SAE_PLATFORM_FILES_PER_RUN", 25, int, ge=1, le=10_000)
CACHING_JOBS = ["cache_inbox", ACTIVATIONS.job.name]  # the inbox sensor's op job; the activations asset job
IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED]


@sensor(job_name="cache_inbox", minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING)
def inbox_sensor(context: SensorEvaluationContext, text_source: TextSourceResource, storage: StorageResource,
                 automation: AutomationResource):
    """Watch the text source: new files get partitions; every file whose current version is neither
    cached nor tried yet (new, replaced, or replaced after a failure) is cached, up to
    FILES_PER_RUN files per cache_inbox run. One bad file never holds back the others."""
    store = storage.store()
    try:
        inbox = text_source.scan(store, HASH_BUDGET_S)
    except (SourceError, OSError) as error:
        return SkipReason(printable(str(error)))
    skipped = (f"; {len(inbox.skipped)} file(s) skipped: "
               + "; ".join(f"{display_name(s.url)}: {printable(s.reason)}" for s in inbox.skipped[:5])
               + (" …" if len(inbox.skipped) > 5 else "")) if inbox.skipped else ""
    if not inbox.files:
        return SkipReason(f"text source {text_source.pattern!r} holds no readable file{skipped}")
    existing = set(context.instance.get_dynamic_partitions(ACTIVATION_BATCHES.name))
    new = [f.key for f in inbox.files if f.key not in existing]
    busy = _keys_in_flight(context.instance)
    todo = [k for k in needs_caching(store, inbox.stamps, inbox.access) if k not in busy]
    if not new and not todo:
        return SkipReason(f"no new or changed files in the inbox{skipped}")
    context.log.info(f"new: {', '.join(new[:10]) or 'none'}; to cache: {', '.join(todo[:10]) or 'none'}"
                     + (f" ({len(todo)} in all)" if len(todo) > 10 else "") + skipped)
    requests, failed = [], failed_attempts(store)
    for first in range(0, len(todo), FILES_PER_RUN):
        chunk = todo[first:first + FILES_PER_RUN]
        # a version tried again after a failure (its permissions changed) is a new run, not the old one's key
        versions = json.dumps([[k, inbox.stamps[k], *([failed[k].get("failed_at")] if k in failed else [])]
                               for k in chunk])
        requests.append(RunRequest(run_key=f"cache:{hashlib.sha256(versions.encode()).hexdigest()[:16]}",
                                   run_config=automation.inbox_run_config(chunk),
                                   tags={"sae_platform/files": ", ".join(chunk)[:200]}))
    return SensorResult(run_requests=requests,
                        dynamic_partitions_requests=[ACTIVATION_BATCHES.build_add_request(new)] if new else [])


def _keys_in_flight(instance) -> set[str]:
    """Partitions that a queued or running caching run already covers."""
    keys = set()
    for run in instance.get_runs(filters=RunsFilter(statuses=IN_FLIGHT)):
        if run.job_name == "cache_inbox":
            keys |= set(run.run_config.get("ops", {}).get("activation_batches", {}).get("config", {})
                        .get("keys") or [])
        elif run.job_name == ACTIVATIONS.job.name and "dagster/partition" in run.tags:
            keys.add(run.tags["dagster/partition"])
    return keys


def _in_flight(instance, job_names: list[str]) -> list[str]:
    runs = instance.get_runs(filters=RunsFilter(statuses=IN_FLIGHT))
    return [f"{r.job_name} {r.run_id[:8]}" for r in runs if r.job_name in job_names]


def _behind(storage: StorageResource, resources, text_source: TextSourceResource | None) -> list[str]:
    """What is out of date, as the runs we would launch see it (their resource overrides applied)."""
    store = storage.store()
    reasons = []
    if text_source is not None:  # files whose current version failed wait for a new one: not behind
        inbox = text_source.scan(store, HASH_BUDGET_S)
        todo = needs_caching(store, inbox.stamps, inbox.access)
        cached = cached_versions(store)
        uncached = [k for k in todo if k not in cached]
        if uncached:
            reasons.append(f"{len(uncached)} inbox file(s) not cached: {', '.join(uncached[:5])}")
        changed = [k for k in todo if k in cached]
        if changed:
            reasons.append(f"{len(changed)} inbox file(s) replaced since cached: {', '.join(changed[:5])}")
    # The stage resources are configured from the same run config file the launched runs use.
    return reasons + chain_behind(store, resources)


@sensor(job_name="full_pipeline", minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING,
        required_resource_keys={"storage", "shuffle", "features", "training", "automation"})
def downstream_freshness_sensor(context: SensorEvaluationContext):
    """Bring shuffle, SAE, evaluation, feature tables and browser up to date with the cached activations;
    show at every tick, runs in flight or not, whether the browser describes every cached batch."""
    storage, automation = context.resources.storage, context.resources.automation
    reasons = _behind(storage, context.resources, text_source=None)
    report_browser_freshness(context, reasons)
    busy = _in_flight(context.instance, [*CACHING_JOBS, "full_pipeline"])
    if busy:
        return SkipReason(f"waiting for runs in flight: {', '.join(busy[:5])}")
    if not reasons:
        return SkipReason("downstream of the cached activations is up to date")
    state = json.dumps(sorted(cached_versions(storage.store()).items()))
    plan = planned_refresh(storage.store(), context.resources)
    context.log.info("; ".join(reasons))
    context.log.info(plan)
    return RunRequest(run_key=f"refresh:{hashlib.sha256(state.encode()).hexdigest()[:16]}",
                      run_config=automation.run_config(),
                      tags={"sae_platform/why": reasons[0][:200], "sae_platform/plan": plan[:1000]})


def report_browser_freshness(context: SensorEvaluationContext, reasons: list[str]) -> None:
    """Record ``describes_every_cached_batch`` of feature_browser as a runless check evaluation when its
    verdict differs from the last one this sensor recorded (its cursor), so the asset's page turns to a
    warning when a batch is cached, not 25 minutes later when a refresh rebuilds the browser. It targets
    the browser's latest materialization, so the UI shows it as the check of the browser it sees."""
    said = hashlib.sha256(json.dumps(reasons).encode()).hexdigest()[:16]
    if context.cursor == said:
        return
    verdict = freshness_verdict(reasons)
    key = AssetKey(FEATURE_BROWSER.asset)
    latest = context.instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=1).records
    target = AssetCheckEvaluationTargetMaterializationData(
        storage_id=latest[0].storage_id, run_id=latest[0].run_id, timestamp=latest[0].timestamp) if latest else None
    context.instance.report_runless_asset_event(AssetCheckEvaluation(
        asset_key=key, check_name=DESCRIBES_EVERY_CACHED_BATCH.name, passed=verdict["passed"],
        severity=verdict["severity"], metadata=readable(verdict["metadata"]), blocking=False,
        target_materialization_data=target))
    context.update_cursor(said)


@schedule(job_name="full_pipeline", cron_schedule=NIGHTLY_CRON, default_status=DefaultScheduleStatus.RUNNING,
          required_resource_keys={"storage", "shuffle", "features", "training", "text_source", "automation"})
def nightly_refresh(context: ScheduleEvaluationContext):
    """Periodic backfill: uncached inbox files and anything downstream that is behind, in one run."""
    busy = _in_flight(context.instance, ["full_pipeline"])
    if busy:
        return SkipReason(f"a full_pipeline run is in flight: {', '.join(busy)}")
    resources = context.resources
    reasons = _behind(resources.storage, resources, resources.text_source)
    if not reasons:
        return SkipReason("everything is up to date")
    plan = planned_refresh(resources.storage.store(), resources)
    context.log.info(plan)
    return RunRequest(run_config=resources.automation.run_config(),
                      tags={"sae_platform/why": reasons[0][:200], "sae_platform/plan": plan[:1000]})

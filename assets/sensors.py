"""Automation: new data flows in on its own.

* ``inbox_sensor``: a new file in the text source becomes a new activation partition, with a
  caching run (``cache_activations``); a file replaced under the same name is cached again.
* ``downstream_freshness_sensor``: the declared policy for everything downstream. Once no caching
  run is in flight, if the shuffled store, the SAE, its feature tables or the browser do not pin
  the currently cached activations (``sae_platform.freshness``), one ``full_pipeline`` run brings
  them up to date. Its run key is the set of cached versions: one run per state of the data.
* ``nightly_refresh``: the periodic backfill. Every night, the same check (uncached and replaced
  inbox files included); it launches ``full_pipeline`` when anything is behind, e.g. after a
  failed run, a sensor that was off, or files that arrived while the daemon was down.

All three launch runs with the run config in ``SAE_PLATFORM_RUN_CONFIG`` (``AutomationResource``).
"""

import hashlib
import json
import os

from dagster import (
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

from assets.partitions import ACTIVATION_BATCHES, N_FEATURE_SHARDS
from resources import AutomationResource, StorageResource, TextSourceResource
from sae_platform.errors import SourceError
from sae_platform.freshness import cached_versions, changed_sources, stale_reasons

# How often the sensors look (seconds); tests and busy deployments change it.
SENSOR_INTERVAL_S = int(os.environ.get("SAE_PLATFORM_SENSOR_INTERVAL_S", "30"))
NIGHTLY_CRON = os.environ.get("SAE_PLATFORM_REFRESH_CRON", "0 3 * * *")
IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED]


@sensor(job_name="cache_activations", minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING)
def inbox_sensor(context: SensorEvaluationContext, text_source: TextSourceResource, storage: StorageResource,
                 automation: AutomationResource):
    """Watch the text source: a new file gets a partition and a caching run; a file replaced under
    the same name (new size or modification stamp) gets a caching run again."""
    try:
        files = text_source.files()
        stamps = text_source.stamps(files)
    except SourceError as error:
        return SkipReason(str(error))
    existing = set(context.instance.get_dynamic_partitions(ACTIVATION_BATCHES.name))
    new = [f.key for f in files if f.key not in existing]
    changed = [k for k in changed_sources(storage.store(), stamps) if k in existing]
    if not new and not changed:
        return SkipReason("no new or changed files in the inbox")
    context.log.info(f"new: {', '.join(new[:10]) or 'none'}; replaced: {', '.join(changed[:10]) or 'none'}")
    run_config = automation.caching_run_config()
    return SensorResult(
        run_requests=[RunRequest(partition_key=key, run_key=f"activations:{key}", run_config=run_config)
                      for key in new]
        + [RunRequest(partition_key=key, run_key=f"activations:{key}:{stamps[key]}", run_config=run_config)
           for key in changed],
        dynamic_partitions_requests=[ACTIVATION_BATCHES.build_add_request(new)] if new else [],
    )


def _in_flight(instance, job_names: list[str]) -> list[str]:
    runs = instance.get_runs(filters=RunsFilter(statuses=IN_FLIGHT))
    return [f"{r.job_name} {r.run_id[:8]}" for r in runs if r.job_name in job_names]


def _behind(storage: StorageResource, resources, text_source: TextSourceResource | None) -> list[str]:
    """What is out of date, as the runs we would launch see it (their resource overrides applied)."""
    store = storage.store()
    reasons = []
    if text_source is not None:
        stamps = text_source.stamps()
        uncached = sorted(set(stamps) - set(cached_versions(store)))
        if uncached:
            reasons.append(f"{len(uncached)} inbox file(s) not cached: {', '.join(uncached[:5])}")
        changed = changed_sources(store, stamps)
        if changed:
            reasons.append(f"{len(changed)} inbox file(s) replaced since cached: {', '.join(changed[:5])}")
    # The stage resources are configured from the same run config file the launched runs use.
    return reasons + stale_reasons(store, shuffle_name=resources.shuffle.settings().name,
                                   sae_name=resources.features.settings().sae_name, n_feature_shards=N_FEATURE_SHARDS)


@sensor(job_name="full_pipeline", minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING,
        required_resource_keys={"storage", "shuffle", "features", "automation"})
def downstream_freshness_sensor(context: SensorEvaluationContext):
    """Bring shuffle, SAE, evaluation, feature tables and browser up to date with the cached activations."""
    busy = _in_flight(context.instance, ["cache_activations", "full_pipeline"])
    if busy:
        return SkipReason(f"waiting for runs in flight: {', '.join(busy[:5])}")
    storage, automation = context.resources.storage, context.resources.automation
    reasons = _behind(storage, context.resources, text_source=None)
    if not reasons:
        return SkipReason("downstream of the cached activations is up to date")
    state = json.dumps(sorted(cached_versions(storage.store()).items()))
    context.log.info("; ".join(reasons))
    return RunRequest(run_key=f"refresh:{hashlib.sha256(state.encode()).hexdigest()[:16]}",
                      run_config=automation.run_config(), tags={"sae_platform/why": reasons[0][:200]})


@schedule(job_name="full_pipeline", cron_schedule=NIGHTLY_CRON, default_status=DefaultScheduleStatus.RUNNING,
          required_resource_keys={"storage", "shuffle", "features", "text_source", "automation"})
def nightly_refresh(context: ScheduleEvaluationContext):
    """Periodic backfill: uncached inbox files and anything downstream that is behind, in one run."""
    busy = _in_flight(context.instance, ["full_pipeline"])
    if busy:
        return SkipReason(f"a full_pipeline run is in flight: {', '.join(busy)}")
    resources = context.resources
    reasons = _behind(resources.storage, resources, resources.text_source)
    if not reasons:
        return SkipReason("everything is up to date")
    return RunRequest(run_config=resources.automation.run_config(), tags={"sae_platform/why": reasons[0][:200]})

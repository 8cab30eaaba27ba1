"""Automation: new data flows in on its own.

* ``inbox_sensor``: a new file in the text source becomes a new activation partition; the files
  to cache (new, replaced under the same name, or failed before and replaced since: the rule of
  ``sae_platform.inbox.needs_caching``) go into few ``cache_inbox`` runs of up to
  ``SAE_PLATFORM_FILES_PER_RUN`` files each. Files not read are named with their reason.
* ``downstream_freshness_sensor``: the declared policy for everything downstream. Once no caching
  run is in flight, if any hook point's shuffled store, the SAE, its feature tables or the browser
  do not pin the currently cached activations (``sae_platform.freshness``), one ``full_pipeline`` run brings
  them up to date. Its run key is the set of cached versions: one run per state of the data. It logs,
  and tags the run with (``sae_platform/plan``), what the refresh will rebuild and about how long
  that takes (``freshness.refresh_plan``: a kept SAE, by ``retrain_above_fraction``, costs pass 1 of
  the new batches, not a training).
* ``nightly_refresh``: the periodic backfill. Every night, the same check (uncached and replaced
  inbox files included); it launches ``full_pipeline`` when anything is behind, e.g. after a
  failed run, a sensor that was off, or files that arrived while the daemon was down.

All three launch runs with the run config in ``SAE_PLATFORM_RUN_CONFIG`` (``AutomationResource``).
"""

import hashlib
import json

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

from assets.activations import ACTIVATIONS
from assets.partitions import ACTIVATION_BATCHES, N_FEATURE_SHARDS
from assets.training import settings_for
from resources import AutomationResource, StorageResource, TextSourceResource
from sae_platform.errors import SourceError
from sae_platform.freshness import cached_versions, refresh_plan, stale_reasons
from sae_platform.inbox import needs_caching
from sae_platform.settings import env_value

# How often the sensors look (seconds); tests and busy deployments change it.
SENSOR_INTERVAL_S = env_value("SAE_PLATFORM_SENSOR_INTERVAL_S", 30, int, ge=1, le=24 * 3600)
NIGHTLY_CRON = env_value("SAE_PLATFORM_REFRESH_CRON", "0 3 * * *")
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
        inbox = text_source.scan(store)
    except (SourceError, OSError) as error:
        return SkipReason(str(error))
    skipped = (f"; {len(inbox.skipped)} file(s) skipped: "
               + "; ".join(f"{s.url.rsplit('/', 1)[-1]}: {s.reason}" for s in inbox.skipped[:5])
               + (" …" if len(inbox.skipped) > 5 else "")) if inbox.skipped else ""
    if not inbox.files:
        return SkipReason(f"text source {text_source.pattern!r} holds no readable file{skipped}")
    existing = set(context.instance.get_dynamic_partitions(ACTIVATION_BATCHES.name))
    new = [f.key for f in inbox.files if f.key not in existing]
    busy = _keys_in_flight(context.instance)
    todo = [k for k in needs_caching(store, inbox.stamps) if k not in busy]
    if not new and not todo:
        return SkipReason(f"no new or changed files in the inbox{skipped}")
    context.log.info(f"new: {', '.join(new[:10]) or 'none'}; to cache: {', '.join(todo[:10]) or 'none'}"
                     + (f" ({len(todo)} in all)" if len(todo) > 10 else "") + skipped)
    requests = []
    for first in range(0, len(todo), FILES_PER_RUN):
        chunk = todo[first:first + FILES_PER_RUN]
        versions = json.dumps([[k, inbox.stamps[k]] for k in chunk])
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
        todo = needs_caching(store, text_source.scan(store).stamps)
        cached = cached_versions(store)
        uncached = [k for k in todo if k not in cached]
        if uncached:
            reasons.append(f"{len(uncached)} inbox file(s) not cached: {', '.join(uncached[:5])}")
        changed = [k for k in todo if k in cached]
        if changed:
            reasons.append(f"{len(changed)} inbox file(s) replaced since cached: {', '.join(changed[:5])}")
    # The stage resources are configured from the same run config file the launched runs use.
    return reasons + stale_reasons(store, **_described(resources))


def _described(resources) -> dict:
    """The SAE the feature tables describe, its shuffled store and its refresh policy, as the
    launched runs' resources configure them."""
    sae_name = resources.features.settings().sae_name
    return {"shuffle_name": resources.shuffle.settings().name, "sae_name": sae_name,
            "n_feature_shards": N_FEATURE_SHARDS,
            "retrain_above_fraction": settings_for(sae_name, resources.training).retrain_above_fraction}


@sensor(job_name="full_pipeline", minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING,
        required_resource_keys={"storage", "shuffle", "features", "training", "automation"})
def downstream_freshness_sensor(context: SensorEvaluationContext):
    """Bring shuffle, SAE, evaluation, feature tables and browser up to date with the cached activations."""
    busy = _in_flight(context.instance, [*CACHING_JOBS, "full_pipeline"])
    if busy:
        return SkipReason(f"waiting for runs in flight: {', '.join(busy[:5])}")
    storage, automation = context.resources.storage, context.resources.automation
    reasons = _behind(storage, context.resources, text_source=None)
    if not reasons:
        return SkipReason("downstream of the cached activations is up to date")
    state = json.dumps(sorted(cached_versions(storage.store()).items()))
    plan = refresh_plan(storage.store(), **_described(context.resources))
    context.log.info("; ".join(reasons))
    context.log.info(plan)
    return RunRequest(run_key=f"refresh:{hashlib.sha256(state.encode()).hexdigest()[:16]}",
                      run_config=automation.run_config(),
                      tags={"sae_platform/why": reasons[0][:200], "sae_platform/plan": plan[:1000]})


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
    plan = refresh_plan(resources.storage.store(), **_described(resources))
    context.log.info(plan)
    return RunRequest(run_config=resources.automation.run_config(),
                      tags={"sae_platform/why": reasons[0][:200], "sae_platform/plan": plan[:1000]})

"""One declaration per pipeline stage, and the two ways Dagster runs it.

A :class:`Stage` holds everything about a stage: its asset key, partitioning, upstream assets,
the resources whose settings it reads (each a settings dataclass of ``sae_platform``, so one
vocabulary and one default everywhere), its body, its up-to-date rule, its checks, what a failed
blocking check does and the asset job that materializes it. A stage has two names: its asset key
(what users see and select) and its body's function name, which is also its step in
``full_pipeline`` (``Stage.op_name``). These turn it into Dagster definitions:

* :func:`stage_asset`: the software-defined asset (what *Materialize* in the UI runs);
* :func:`asset_jobs`: the asset jobs of ``jobs/definitions.py`` (what the Launchpad, the sensors
  and ``sae-platform`` launch), from the :class:`AssetJob` each stage names;
* :func:`run_as_step`: the step of the ``full_pipeline`` op job (``jobs/full_pipeline.py``), which
  logs the same materialization and check evaluations.

The asset and the step both call :func:`execute`, so a stage skips, versions, checks and fails the
same way whichever job runs it. A skipped stage still reports a materialization, with the data
version of what is stored (unchanged, so nothing downstream turns stale: Dagster's own meaning of
an unchanged data version), ``up_to_date`` saying why and ``built_by_run``/``built_at`` naming the
build, and the metadata that build showed (its curves, tables and paths), so the asset's page keeps
showing the artifact it has; its checks report the verdicts recorded for that version. (An
observation instead would leave downstream assets of the same run unmaterialized, so skipped.)
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetSelection,
    DataVersion,
    Failure,
    Field,
    MaterializeResult,
    MultiPartitionsDefinition,
    OpExecutionContext,
    PartitionsDefinition,
    Permissive,
    asset,
    define_asset_job,
    deserialize_value,
    serialize_value,
)
from dagster._core.definitions.metadata import normalize_metadata

from assets.metadata import readable
from resources import SETTINGS_FIELDS
from sae_platform.catalog import stage_record_path
from sae_platform.errors import PlatformError, StorageError
from sae_platform.settings import SettingsError

# Stages take no op config: their settings are resources (one vocabulary in every job). The schema
# accepts anything so that an old-style `ops.<step>.config` reaches `refuse_op_config`, which says
# where each setting lives now, instead of Dagster's bare "unexpected config entry".
NO_OP_CONFIG = Field(Permissive({}), is_required=False)


def refuse_op_config(stage: "Stage", step: str, op_config) -> None:
    """Fail before anything runs when a run config sets op config on a stage (the old vocabulary)."""
    if not op_config:
        return
    homes = {}
    for key in op_config:
        owners = [name for name in stage.resources if key in SETTINGS_FIELDS.get(name, ())]
        homes[key] = f"resources.{owners[0]}.config.{key}" if owners else None
    moved = "; ".join(f"ops.{step}.config.{k} -> {h}" for k, h in homes.items() if h)
    unknown = sorted(k for k, h in homes.items() if not h)
    raise SettingsError(
        f"ops.{step}.config sets {', '.join(sorted(op_config))}, but stages take no op config: their settings "
        "are resources, with the same keys in every job" + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
        (f"move them: {moved}" if moved else "remove them")
        + " (docs/operator.md, \"Configuration reference\")")


@dataclass
class StageRun:
    """What a stage's functions see: the log, the resources (by key), the partitions this run covers."""

    log: object
    resources: object
    partition_keys: list = field(default_factory=list)
    run_id: str = ""

    @property
    def partition_key(self):
        if len(self.partition_keys) != 1:
            raise PlatformError(f"this stage runs one partition at a time, got {len(self.partition_keys)}",
                                "launch one run per partition (a backfill does)")
        return self.partition_keys[0]

    @cached_property
    def store(self):
        return self.resources.storage.store()


@dataclass(frozen=True)
class Check:
    """An asset check of a stage: ``evaluate`` returns {"passed": bool, "metadata": {...}} and
    optionally "severity"; a blocking check that fails stops everything downstream, after
    ``on_failure`` (if any) has undone what must not be used (it returns what it did, in words)."""

    name: str
    description: str
    evaluate: Callable[[StageRun], dict]
    blocking: bool = False
    on_failure: Callable[[StageRun], str] | None = None
    # Evaluated again when the stage is skipped, instead of reporting the recorded verdict: for a
    # cheap check whose outcome depends on settings besides the artifact (a threshold).
    recheck_when_skipped: bool = False


@dataclass(frozen=True)
class AssetJob:
    """An asset job: what the UI's Launchpad, the sensors and the CLI launch to materialize the stages
    that name it (declared on the stages, so a new stage brings its job with it; see :func:`asset_jobs`)."""

    name: str
    description: str


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared once (see the module docstring)."""

    asset: str                                       # asset key
    description: str
    group: str
    body: Callable[[StageRun], dict]                 # does the work; returns metadata. Its name is the
                                                     # stage's step in full_pipeline (op_name)
    version: Callable[[StageRun], str | None]        # data version of what is stored now
    resources: tuple[str, ...] = ("storage",)
    partitions: PartitionsDefinition | None = None
    deps: tuple = ()                                 # upstream assets (AssetDep or asset)
    up_to_date: Callable[[StageRun], str | None] | None = None   # why nothing needs doing, or None
    checks: tuple[Check, ...] = ()
    kinds: frozenset[str] = frozenset()
    pool: str | None = None                          # concurrency pool (training: "gpu")
    # Errors that are one partition's own fault (a bad file): the asset run of that partition fails,
    # while full_pipeline reports it and goes on with the other partitions.
    partition_errors: tuple[type[Exception], ...] = ()
    # An optional stage (the LLM explanations) adds to the result and no stage depends on it: when it
    # fails, its run is red, and every other stage still runs (full_pipeline, `sae-platform features`).
    optional: bool = False
    job: AssetJob | None = None                      # its asset job (stages of one job name the same AssetJob)

    def __post_init__(self):
        if not getattr(self.body, "__name__", "<lambda>").isidentifier():
            raise TypeError(f"stage {self.asset}: its body must be a named function (its name is the stage's step "
                            f"in full_pipeline), got {self.body!r}")

    @property
    def op_name(self) -> str:
        """The stage's one name besides its asset key: its body's, and its step's in full_pipeline."""
        return self.body.__name__


@dataclass
class Outcome:
    metadata: dict
    data_version: str | None
    verdicts: list[dict]


def pointer_version(name_of: Callable[[StageRun], str]):
    """The data version of a stage whose artifact is one committed name: its committed version
    (None before the first commit)."""
    def version(run: StageRun) -> str | None:
        pointer = run.store.pointer(name_of(run))
        return pointer["version"] if pointer else None

    return version


def execute(stage: Stage, run: StageRun) -> Outcome:
    """Run one stage for ``run``'s partitions: skip when up to date, else the body and the checks;
    a failed blocking check's consequence is applied here, in both jobs."""
    reason = stage.up_to_date(run) if stage.up_to_date else None
    if reason:
        run.log.info(f"{stage.asset}{_label(run)} is up to date: {reason}")
        version = stage.version(run)
        record = _read_record(stage, run, version)
        return Outcome({**_shown_again(record), "up_to_date": reason}, version, _skipped_verdicts(stage, run, record))
    started = time.perf_counter()
    metadata = stage.body(run)
    seconds = time.perf_counter() - started
    version = stage.version(run)
    verdicts = _verdicts(stage, run)
    _write_record(stage, run, version, metadata, verdicts, seconds)
    return Outcome(metadata, version, verdicts)


def _verdicts(stage: Stage, run: StageRun) -> list[dict]:
    """Every check in order; after a blocking one fails (and its consequence is applied) the rest
    are reported as not evaluated, since what they would check may be gone."""
    verdicts, failed = [], None
    for check in stage.checks:
        if failed:
            verdicts.append({"check_name": check.name, "passed": False, "severity": AssetCheckSeverity.WARN,
                             "metadata": {"not_evaluated": f"blocking check {failed} failed first"}})
            continue
        verdicts.append(_verdict(check, run))
        if check.blocking and not verdicts[-1]["passed"]:
            failed = check.name
    return verdicts


def _verdict(check: Check, run: StageRun) -> dict:
    verdict = {"check_name": check.name, "severity": AssetCheckSeverity.ERROR, **check.evaluate(run)}
    verdict["passed"] = bool(verdict["passed"])
    if check.blocking and not verdict["passed"] and check.on_failure:
        consequence = check.on_failure(run)
        run.log.error(f"blocking check {check.name} failed: {consequence}")
        verdict["metadata"] = {**verdict.get("metadata", {}), "consequence": consequence}
    return verdict


def _record_path(stage: Stage, run: StageRun) -> str:
    partition = "-".join(str(k) for k in run.partition_keys) or "all"
    return stage_record_path(run.store, stage.asset, partition)


def _write_record(stage: Stage, run: StageRun, version: str | None, metadata: dict, verdicts: list[dict],
                  seconds: float) -> None:
    """What this build showed, for the skips that follow: metadata in Dagster's own serialization
    (JSON of whitelisted types: reading it back runs no code), verdicts as plain JSON; and how long
    its body took (``seconds``, wall clock: what a refresh plan estimates from)."""
    run.store.write_json(_record_path(stage, run), {
        "version": version, "built_by_run": run.run_id, "built_at": time.time(), "seconds": round(seconds, 3),
        "metadata": serialize_value(normalize_metadata(readable(metadata))), "verdicts": _plain(verdicts)})


def _plain(verdicts: list[dict]) -> list[dict]:
    return [{**v, "severity": v["severity"].value, "metadata": {k: str(m) for k, m in v.get("metadata", {}).items()}}
            for v in verdicts]


def _read_record(stage: Stage, run: StageRun, version: str | None) -> dict | None:
    """The record of the build of ``version``; None when there is none (built before records were
    kept, or the record is unreadable: the skip then shows only why it skipped)."""
    path = _record_path(stage, run)
    try:
        record = run.store.read_json(path) if run.store.fs.exists(path) else None
    except (ValueError, StorageError):  # a truncated record: as if none were kept
        run.log.warning(f"the stage record {path} is unreadable; it is rewritten at the next build")
        return None
    return record if isinstance(record, dict) and record.get("version") == version else None


def _shown_again(record: dict | None) -> dict:
    """The metadata the build showed, and which build it was."""
    if record is None:
        return {}
    try:
        metadata = deserialize_value(record["metadata"]) if record.get("metadata") else {}
    except Exception:  # a record from another Dagster version it cannot read: show only the build
        metadata = {}
    if not record.get("built_at"):
        return metadata
    built_at = datetime.fromtimestamp(record["built_at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {**metadata, "built_by_run": record.get("built_by_run") or "", "built_at": built_at}


def _skipped_verdicts(stage: Stage, run: StageRun, record: dict | None) -> list[dict]:
    """The verdicts recorded for the stored version (re-checked where a check asks for it); every
    check evaluated again when there are none."""
    if not stage.checks:
        return []
    recorded = {v["check_name"]: v for v in (record or {}).get("verdicts", [])}
    if not all(c.name in recorded for c in stage.checks):
        verdicts = _verdicts(stage, run)  # a version built before records were kept: its verdicts only
        kept = record or {"version": stage.version(run), "built_by_run": None, "built_at": None, "metadata": None}
        run.store.write_json(_record_path(stage, run), {**kept, "verdicts": _plain(verdicts)})
        return verdicts
    verdicts = []
    for check in stage.checks:
        if check.recheck_when_skipped:
            verdicts.append(_verdict(check, run))
            continue
        v = recorded[check.name]
        verdicts.append({**v, "severity": AssetCheckSeverity(v["severity"]),
                         "metadata": {**v["metadata"], "recorded_for_version": str(record["version"])}})
    return verdicts


def _label(run: StageRun) -> str:
    return f"[{', '.join(str(k) for k in run.partition_keys)}]" if run.partition_keys else ""


def failed_blocking(stage: Stage, outcome: Outcome) -> list[str]:
    blocking = {c.name for c in stage.checks if c.blocking}
    return [v["check_name"] for v in outcome.verdicts if v["check_name"] in blocking and not v["passed"]]


# -- as an asset -----------------------------------------------------------------------------------

def stage_asset(stage: Stage, guard: Callable[[AssetExecutionContext], str | None] | None = None):
    """The stage as a software-defined asset. ``guard`` may refuse a run before anything happens: it
    returns why (else None), and the run logs that at error level and ends without materializing and
    without failing, so a refusal turns nothing red (the output is optional for this reason only:
    every run the guard lets through materializes the asset or fails)."""

    @asset(name=stage.asset, partitions_def=stage.partitions, deps=list(stage.deps), group_name=stage.group,
           kinds=set(stage.kinds), description=stage.description, required_resource_keys=set(stage.resources),
           pool=stage.pool, config_schema=NO_OP_CONFIG, output_required=guard is None,
           check_specs=[AssetCheckSpec(c.name, asset=stage.asset, blocking=c.blocking, description=c.description)
                        for c in stage.checks])
    def compute(context: AssetExecutionContext):
        refusal = guard(context) if guard else None
        if refusal:
            context.log.error(refusal)
            return
        refuse_op_config(stage, stage.asset, context.op_config)
        keys = list(context.partition_keys) if context.has_partition_key_range or context.has_partition_key else []
        outcome = execute(stage, StageRun(context.log, context.resources, keys, context.run.run_id))
        yield MaterializeResult(
            metadata=readable(outcome.metadata),
            data_version=DataVersion(outcome.data_version) if outcome.data_version else None,
            check_results=[AssetCheckResult(check_name=v["check_name"], passed=v["passed"], severity=v["severity"],
                                            metadata=readable(v.get("metadata", {}))) for v in outcome.verdicts])

    return compute


# -- as asset jobs ---------------------------------------------------------------------------------

def asset_jobs(stages) -> list:
    """The asset jobs the stages declare, in the order of their first stage: each selects the assets of
    every stage naming it, with their partitions (left to Dagster where they differ: the shuffle's
    job is an unpartitioned plan and commit around per-worker passes)."""
    members: dict[str, list[Stage]] = {}
    for stage in stages:
        if stage.job:
            members.setdefault(stage.job.name, []).append(stage)
    jobs = []
    for name, of_job in members.items():
        declared = {stage.job for stage in of_job}
        if len(declared) > 1:
            raise ValueError(f"asset job {name} is declared differently by {', '.join(s.asset for s in of_job)}")
        partitions = {id(stage.partitions): stage.partitions for stage in of_job}
        jobs.append(define_asset_job(name, selection=AssetSelection.assets(*(stage.asset for stage in of_job)),
                                     partitions_def=next(iter(partitions.values())) if len(partitions) == 1 else None,
                                     description=of_job[0].job.description))
    return jobs


# -- as a step of full_pipeline --------------------------------------------------------------------

def run_as_step(stage: Stage, context: OpExecutionContext, partition=None) -> Outcome:
    """Run the stage inside an op and log what its asset would: the materialization (with the data
    version and the inputs' versions, as Dagster records them for an asset run) and the checks."""
    refuse_op_config(stage, stage.op_name, context.op_config)
    keys = [partition] if partition is not None else []
    outcome = execute(stage, StageRun(context.log, context.resources, keys, context.run_id))
    context.log_event(AssetMaterialization(
        asset_key=stage.asset, partition=partition, metadata=readable(outcome.metadata),
        tags={**provenance_tags(context.instance, stage, outcome.data_version, context.run_id),
              **dimension_tags(stage, partition)}))
    for verdict in outcome.verdicts:
        blocking = verdict["check_name"] in {c.name for c in stage.checks if c.blocking}
        context.log_event(AssetCheckEvaluation(
            asset_key=AssetKey(stage.asset), check_name=verdict["check_name"], passed=verdict["passed"],
            metadata=readable(verdict.get("metadata", {})), severity=verdict["severity"], blocking=blocking,
            partition=partition))
    failed = failed_blocking(stage, outcome)
    if failed:
        raise Failure(f"blocking check {', '.join(failed)} failed on {stage.asset}"
                      f"{f' [{partition}]' if partition is not None else ''}")
    return outcome


def dimension_tags(stage: Stage, partition: str | None) -> dict:
    """The tags an asset run writes on a multi-partitioned asset's materialization, one per
    dimension (``dagster/partition/batch``: ``alpha``, …), which the UI filters by: the step
    writes them too, so its materialization looks the same."""
    if partition is None or not isinstance(stage.partitions, MultiPartitionsDefinition):
        return {}
    from dagster._core.definitions.partitions.utils.multi import get_tags_from_multi_partition_key

    return dict(get_tags_from_multi_partition_key(stage.partitions.get_partition_key_from_str(partition)))


def provenance_tags(instance, stage: Stage, data_version: str | None, run_id: str) -> dict:
    """The data-version tags Dagster writes on an asset run's materialization: this asset's data
    version and the latest version/event of each upstream asset. With them, the UI judges
    staleness the same way whichever job built the asset."""
    from dagster._core.definitions.data_version import (
        CODE_VERSION_TAG,
        DATA_VERSION_IS_USER_PROVIDED_TAG,
        DATA_VERSION_TAG,
        DEFAULT_DATA_VERSION,
        extract_data_version_from_entry,
        get_input_data_version_tag,
        get_input_event_pointer_tag,
    )

    if data_version is None:
        return {}
    tags = {CODE_VERSION_TAG: run_id, DATA_VERSION_TAG: data_version, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}
    for parent in upstream_keys(stage):
        record = instance.get_latest_data_version_record(parent)
        version = (extract_data_version_from_entry(record.event_log_entry) if record else None) or DEFAULT_DATA_VERSION
        tags[get_input_data_version_tag(parent)] = version.value
        tags[get_input_event_pointer_tag(parent)] = str(record.storage_id) if record else "NULL"
    return tags


def upstream_keys(stage: Stage) -> list[AssetKey]:
    """Stage deps are asset names or AssetDeps (those with a partition mapping)."""
    return [dep.asset_key if isinstance(dep, AssetDep) else AssetKey(dep) for dep in stage.deps]


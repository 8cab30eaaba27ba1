"""`full_pipeline`: the whole chain in one run, text → activations → shuffle → SAEs → evaluation →
feature tables → context windows → explanations → browser.

    dagster job execute -m jobs.definitions -j full_pipeline -c config/demo.yaml

The assets are cut five different ways (activation batches, shuffle workers, sweep entries, feature
shard groups, and (batch × shard group) for feature pass 1), and an asset job can only cover one
partitioning, so this is an op job with dynamic fan-out (feature pass 1: each pinned batch's encode,
then every (batch, group) job, since Dagster fans out one level at a time).
Each step is made from the *same stage declaration* as its asset (``assets.stage``): the
same settings (resources, so the same run-config keys in every job), body, up-to-date rule and
checks, and it logs that asset's materialization and check evaluations for the partition it
covered, so the asset catalog, its lineage and checks look the same whichever way a stage ran.
(A step is named after its stage's body, ``Stage.op_name``, since op names must differ from the
assets' own ops: ``cache_batch`` logs `activations`, ``train_sae`` logs `sae_checkpoint`, and so on.)
The ops below that are not stages only fan the work out.

It is safe to re-run: every stage is skipped while what it would build is current (cached batches,
a shuffle that holds the current plan, a finished checkpoint, an evaluation of it from the same
inputs, tables that describe it), and a skipped stage shows again what its build showed.
"""

import re

from dagster import (
    Config,
    DynamicOut,
    DynamicOutput,
    In,
    Nothing,
    OpExecutionContext,
    Out,
    in_process_executor,
    job,
    multi_or_in_process_executor,
    op,
)
from pydantic import Field

from assets import STAGES
from assets.features import pinned_batches
from assets.partitions import ACTIVATION_BATCHES, N_FEATURE_SHARDS, N_SHUFFLE_WORKERS, SAE_SWEEP_SPECS, pass_1_job_key
from assets.stage import NO_OP_CONFIG, Stage, StageRun, run_as_step
from jobs.settings import EXECUTORS
from sae_platform.errors import PlatformError

FEATURE_SHARD_KEYS = [f"f{i}" for i in range(N_FEATURE_SHARDS)]


def _mapping_key(index: int, label: str) -> str:
    """Dynamic mapping keys allow only [A-Za-z0-9_]; the index keeps them unique."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', label)}_{index}"


def partition_step(stage: Stage):
    """The step of a partitioned stage: one partition, received from a fan-out."""

    @op(name=stage.op_name, required_resource_keys=set(stage.resources), pool=stage.pool, config_schema=NO_OP_CONFIG,
        description=f"Logs {stage.asset}[partition]: {stage.description}")
    def step(context: OpExecutionContext, partition):
        try:
            run_as_step(stage, context, partition)
        except stage.partition_errors as error:  # this partition's own fault: the others go on
            context.log.error(f"{stage.asset}[{partition}] failed, the pipeline goes on without it: {error}")
            context.add_output_metadata({"failed": str(error)})
        return partition

    return step


def single_step(stage: Stage):
    """The step of an unpartitioned stage, after everything upstream of it."""

    @op(name=stage.op_name, ins={"after": In(Nothing)}, out=Out(Nothing), required_resource_keys=set(stage.resources),
        pool=stage.pool, config_schema=NO_OP_CONFIG, description=f"Logs {stage.asset}: {stage.description}")
    def step(context: OpExecutionContext) -> None:
        run_as_step(stage, context)

    return step


def _run(context: OpExecutionContext) -> StageRun:
    return StageRun(context.log, context.resources, [], context.run_id)


# -- fan-out --------------------------------------------------------------------------------------

class BatchesConfig(Config):
    max_batches: int | None = Field(default=None, description="only the first N inbox files (sorted); default all",
                                    ge=1)
    keys: list[str] | None = Field(default=None, description="only these partitions (the inbox sensor's "
                                                             "cache_inbox runs); default: every inbox file")


@op(ins={"model": In(Nothing)}, out=DynamicOut(str), required_resource_keys={"text_source", "storage", "synthetic"},
    description="One activation partition per inbox file (registered in the instance), fanned out; every "
                "file the inbox holds is either here or logged as skipped with its reason. With synthetic "
                "data (resources.synthetic.config.n_features), its partitions synthetic-000, … instead.")
def activation_batches(context: OpExecutionContext, config: BatchesConfig):
    synthetic = context.resources.synthetic.settings()
    keys = (synthetic.partition_keys() if synthetic.enabled else _inbox_keys(context))[: config.max_batches]
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
        yield DynamicOutput(key, mapping_key=_mapping_key(index, key))


def _inbox_keys(context: OpExecutionContext) -> list[str]:
    """The partition keys of the inbox's files, sorted; the skipped files logged with their reason."""
    text_source = context.resources.text_source
    inbox = text_source.scan(context.resources.storage.store())
    for skipped in inbox.skipped:
        context.log.warning(f"skipped {skipped.url}: {skipped.reason}")
    keys = sorted(f.key for f in inbox.files)
    if not keys:
        text_source.files()  # raises the error naming the empty source
    return keys


@op(ins={"after": In(Nothing)}, out=DynamicOut(str),
    description="The shuffle's workers, fanned out (worker w runs jobs j % N == w); a pass waits for every "
                "worker of the pass before (a bucket gathers rows from every job).")
def shuffle_workers():
    for worker in range(N_SHUFFLE_WORKERS):
        yield DynamicOutput(str(worker), mapping_key=f"w{worker}")


class SweepConfig(Config):
    sae_names: list[str] = Field(default=[], description="sweep entries to train; default: the one the feature "
                                                         "tables describe (resources.features.config.sae_name)")
    every_entry: bool = Field(default=False, description="train every entry of the sweep (SAE_PLATFORM_SWEEP), "
                                                         "e.g. the grid of config/sweep-scaling.yaml; sae_names is "
                                                         "then left unset")


@op(ins={"shuffled": In(Nothing)}, out=DynamicOut(str), required_resource_keys={"features"},
    description="The sweep entries to train, fanned out.")
def sae_sweep(context: OpExecutionContext, config: SweepConfig):
    described = context.resources.features.settings().sae_name
    if config.every_entry and config.sae_names:
        raise PlatformError("ops.sae_sweep.config sets both every_entry and sae_names",
                            "keep one: every_entry trains the whole sweep, sae_names the entries it lists")
    names = list(SAE_SWEEP_SPECS) if config.every_entry else config.sae_names or [described]
    unknown = [n for n in names if n not in SAE_SWEEP_SPECS]
    if unknown:
        raise PlatformError(f"no SAE named {', '.join(unknown)} in the sweep",
                            f"use one of {', '.join(SAE_SWEEP_SPECS)} (or point SAE_PLATFORM_SWEEP at your sweep)")
    if described not in names:
        raise PlatformError(f"the feature tables describe {described!r}, which this run does not train",
                            "add it to ops.sae_sweep.config.sae_names or set resources.features.config.sae_name")
    for index, name in enumerate(names):
        yield DynamicOutput(name, mapping_key=_mapping_key(index, name))


@op(ins={"after": In(Nothing)}, out=DynamicOut(str), description="The feature shards, fanned out.")
def feature_shards():
    for shard in FEATURE_SHARD_KEYS:
        yield DynamicOutput(shard, mapping_key=shard)


@op(ins={"after": In(Nothing)}, out=DynamicOut(str), required_resource_keys={"storage", "shuffle", "features"},
    description="The batches the described SAE's shuffled store (its hook point's) pinned, fanned out.")
def pinned_batch_keys(context: OpExecutionContext):
    for index, batch in enumerate(pinned_batches(_run(context))):
        yield DynamicOutput(batch, mapping_key=_mapping_key(index, batch))


@op(ins={"after": In(Nothing)}, out=DynamicOut(str), required_resource_keys={"storage", "shuffle", "features"},
    description="Pass 1's jobs, fanned out: every (pinned batch, feature-shard group), once every pinned batch is "
                "encoded (each job reads only its group's shards' codes).")
def pass_1_jobs(context: OpExecutionContext):
    for index, batch in enumerate(pinned_batches(_run(context))):
        for group in FEATURE_SHARD_KEYS:
            yield DynamicOutput(pass_1_job_key(batch, group), mapping_key=_mapping_key(index, f"{batch}_{group}"))


@op(ins={"first": In(Nothing), "second": In(Nothing)}, out=Out(Nothing),
    description="Done when both branches are: joins two collected fan-outs, which Dagster cannot list as one input.")
def both():
    pass


# -- the steps, made from the stage declarations -------------------------------------------------

def stage_step(stage: Stage):
    """A partitioned stage's step runs one partition it gets from a fan-out; another one runs once."""
    return partition_step(stage) if stage.partitions is not None else single_step(stage)


# Every stage's step, by asset key (each op is named Stage.op_name, its body's name); the jobs below
# wire them, and tests/test_definitions.py checks that full_pipeline runs every one.
STEPS = {asset: stage_step(stage) for asset, stage in STAGES.items()}


@job(executor_def=in_process_executor, tags={"sae_platform/pipeline": "cache_inbox"},
     description="Cache the activations of several inbox files in one run (what inbox_sensor launches: "
                 "ops.activation_batches.config.keys); a file that fails is reported and the others go on.")
def cache_inbox():
    activation_batches(STEPS["base_model"]()).map(STEPS["activations"])


def pipeline_executor(kind: str):
    """Where the steps run, chosen by the deployment (SAE_PLATFORM_EXECUTOR), since an op job's
    executor is fixed when the code loads; its settings still come from `execution: config:`."""
    if kind == "multiprocess":  # one machine; `execution: {config: {in_process: {}}}` also works
        return multi_or_in_process_executor
    engines = {"celery": ("dagster_celery", "celery_executor", "dagster-celery"),
               "k8s": ("dagster_k8s", "k8s_job_executor", "dagster-k8s")}
    if kind not in engines:
        raise PlatformError(f"unknown SAE_PLATFORM_EXECUTOR={kind!r}", f"use one of {', '.join(EXECUTORS)}")
    module, name, package = engines[kind]
    try:
        return getattr(__import__(module), name)
    except ImportError as error:
        raise PlatformError(f"SAE_PLATFORM_EXECUTOR={kind} needs the {package} package ({error})",
                            f"pip install '{package}>=0.29,<0.30' on every machine that loads this code") from error


def build_full_pipeline(executor: str, default_run_config: dict):
    """The job, with the deployment's executor and its run config file as the Launchpad's default."""

    @job(name="full_pipeline", executor_def=pipeline_executor(executor), config=default_run_config or None,
         description="The whole chain in one run: text → activations → shuffle → SAE training → evaluation → "
                     "feature tables → context windows → browser. Safe to re-run (skips what is up to date).",
         tags={"sae_platform/pipeline": "full"})
    def full_pipeline():
        step = STEPS
        cached = activation_batches(step["base_model"]()).map(step["activations"]).collect()
        planned = step["shuffle_plan"](cached)
        scattered = shuffle_workers.alias("pass_1_workers")(planned).map(step["shuffle_pass_1"]).collect()
        scattered = shuffle_workers.alias("pass_2_workers")(scattered).map(step["shuffle_pass_2"]).collect()
        finals = shuffle_workers.alias("final_workers")(scattered).map(step["shuffle_final"]).collect()
        trained = sae_sweep(step["shuffled_activations"](finals)).map(step["sae_checkpoint"])
        evaluated_each = trained.map(step["sae_eval"])
        evaluated = evaluated_each.collect()
        # each SAE's probing after its evaluation; the comparison and the browser's overview show every
        # figure, so they come after the probing and the absorption (a partition's failure is logged and
        # its step ends, so neither blocks them)
        probed = evaluated_each.map(step["sae_sparse_probing"]).collect()
        absorbed = trained.map(step["sae_absorption"]).collect()
        figures = both.alias("figures_measured")(first=probed, second=absorbed)
        step["sae_comparison"](figures)
        step["scaling_laws"](evaluated)  # refused without a grid of >= 4 widths at one k: logged, not failed
        step["circuit_tracer_export"](evaluated)  # every transcoder set whose layers are all trained
        encoded = pinned_batch_keys.alias("encode_batches")(evaluated).map(step["feature_codes"]).collect()
        partials = pass_1_jobs(encoded).map(step["feature_stats_partial"]).collect()
        merged = feature_shards.alias("pass_2_shards")(partials).map(step["feature_topk"]).collect()
        windows = pinned_batch_keys.alias("pass_3_batches")(merged).map(step["feature_context_windows"]).collect()
        regrouped = feature_shards.alias("regroup_shards")(windows).map(step["feature_contexts"]).collect()
        explained = feature_shards.alias("explain_shards")(regrouped).map(step["feature_explanations"]).collect()
        # optional (Stage.optional; skipped unless enabled): nothing waits for it, so its failure
        # never keeps the browser from being written
        feature_shards.alias("llm_shards")(regrouped).map(step["feature_llm_explanations"])
        step["feature_browser"](both.alias("tables_and_figures")(first=explained, second=figures))
        step["neuronpedia_export"](explained)  # optional too: beside the browser, neither waits for the other

    return full_pipeline

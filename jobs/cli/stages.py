"""Commands that launch the stages' asset jobs, the same jobs the UI launches: `register`, `backfill`,
`shuffle`, `train`, `features`."""

import sys

from jobs.cli.common import _definitions, _described_sae, _instance, _quiet, stage_settings
from jobs.cli.demo import fill_holdout_from_demo
from jobs.cli.status import describe_eval
from jobs.settings import Settings
from sae_platform.errors import PlatformError


def register(instance, defs) -> list[str]:
    from assets.partitions import ACTIVATION_BATCHES

    text_source = defs.resources["text_source"]
    keys = [f.key for f in text_source.files(defs.resources["storage"].store())]
    existing = set(instance.get_dynamic_partitions(ACTIVATION_BATCHES.name))
    new = [k for k in keys if k not in existing]
    if new:
        instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, new)
    return keys


def _stored_keys(defs) -> set[str]:
    from sae_platform.catalog import list_partitions

    return set(list_partitions(defs.resources["storage"].store()))


def run_partitions(instance, defs, keys: list[str], run_config: dict) -> list[str]:
    from tqdm import tqdm

    job = defs.resolve_job_def("cache_activations")
    failed = []
    for key in tqdm(keys, desc="activation batches", unit="batch"):
        result = job.execute_in_process(instance=instance, partition_key=key, run_config=_quiet(run_config),
                                        raise_on_error=False)
        if not result.success:
            failed.append(key)
    return failed


def run_shuffle(instance, defs, memory_budget_mb: int | None) -> bool:
    """The whole shuffle as one run over every worker partition; prints the checks' verdicts."""
    from assets.partitions import ALL_SHUFFLE_WORKERS_TAGS

    run_config = stage_settings(shuffle={"memory_budget_bytes": memory_budget_mb << 20 if memory_budget_mb else None})
    result = defs.resolve_job_def("shuffle_activations").execute_in_process(
        instance=instance, tags=ALL_SHUFFLE_WORKERS_TAGS, run_config=_quiet(run_config), raise_on_error=False)
    for check in result.get_asset_check_evaluations():
        print(f"  check {check.check_name}: {'passed' if check.passed else 'FAILED'}")
    return result.success and all(c.passed for c in result.get_asset_check_evaluations())


def train(instance, defs, names: list[str], train_config: dict, eval_config: dict) -> list[str]:
    """Train and evaluate sweep entries, one Dagster run (partition) each; returns the failures."""
    job = defs.resolve_job_def("train_saes")
    run_config = stage_settings(training=train_config, evaluation=eval_config)
    failed = []
    for name in names:
        result = job.execute_in_process(instance=instance, partition_key=name, run_config=_quiet(run_config),
                                        raise_on_error=False)
        if not result.success:
            failed.append(name)
            continue
        for event in result.get_asset_materialization_events():
            meta = event.event_specific_data.materialization.metadata
            if event.asset_key.to_user_string() == "sae_eval":
                print(f"  {name}: {describe_eval({k: v.value for k, v in meta.items()})}")
    return failed


def _train_config(args) -> dict:
    return {"token_budget": args.token_budget, "batch_size": args.batch_size, "lr": args.lr,
            "checkpoint_every_tokens": args.checkpoint_every_tokens, "dead_after_tokens": args.dead_after_tokens}


def cmd_train(args) -> int:
    from assets.partitions import SAE_SWEEP_SPECS

    names = args.names or list(SAE_SWEEP_SPECS)
    unknown = sorted(set(names) - set(SAE_SWEEP_SPECS))
    if unknown:
        sys.exit(f"unknown sweep entr(y/ies) {', '.join(unknown)}; the sweep has: {', '.join(SAE_SWEEP_SPECS)}")
    fill_holdout_from_demo(Settings.from_env())
    failed = train(_instance(), _definitions(), names, _train_config(args), {"ce_contexts": args.ce_contexts})
    return 1 if failed else 0


def feature_runs(batches: list[str]) -> list[tuple[str, list[str | None]]]:
    """The runs that build one SAE's feature tables, explanations and browser, in pipeline order: the
    asset job of every stage of the `features` group, as the stage declarations name them (the jobs
    the UI launches), with one run per partition: each batch of ``batches`` (the SAE's pinned ones),
    each feature shard group, each (batch, shard group) of pass 1, or one run for an unpartitioned stage."""
    from assets import STAGES
    from assets.partitions import ACTIVATION_BATCHES, FEATURE_PASS_1_JOBS, FEATURE_SHARDS, pass_1_job_key

    runs: dict[str, list[str | None]] = {}
    for stage in STAGES.values():  # declared in dependency order (tests/test_definitions.py)
        if stage.group != "features" or stage.job.name in runs:
            continue
        if stage.partitions is None:
            runs[stage.job.name] = [None]
        elif stage.partitions is ACTIVATION_BATCHES:
            runs[stage.job.name] = list(batches)
        elif stage.partitions is FEATURE_SHARDS:
            runs[stage.job.name] = FEATURE_SHARDS.get_partition_keys()
        elif stage.partitions is FEATURE_PASS_1_JOBS:
            runs[stage.job.name] = [pass_1_job_key(batch, group) for batch in batches
                                    for group in FEATURE_SHARDS.get_partition_keys()]
        else:
            raise PlatformError(f"`sae-platform features` does not know which partitions of {stage.asset} to run "
                                f"({type(stage.partitions).__name__})",
                                "teach feature_runs (jobs/cli/stages.py) its partitions")
    return list(runs.items())


def run_failure(result) -> str | None:
    """Why a run failed (its failed checks, else the error its first failed step raised), or None."""
    failed_checks = [f"{c.asset_key.to_user_string()}: check {c.check_name} failed"
                     for c in result.get_asset_check_evaluations() if not c.passed]
    if failed_checks:
        return "; ".join(failed_checks)
    if result.success:
        return None
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        while error.cause is not None:  # the error the stage raised, not Dagster's wrapper
            error = error.cause
        return f"{event.step_key}: {error.message.strip()}"
    return "the run failed (its events are in the UI)"


def build_features(instance, defs, sae_name: str) -> bool:
    """Feature tables, context windows, explanations and browser of one SAE: each stage's asset job
    (:func:`feature_runs`), one Dagster run per partition, as a backfill would launch them. A failed
    run stops the build, but for an optional stage's (the LLM explanations): reported, and the
    other stages go on. True when every run succeeded."""
    from tqdm import tqdm

    from assets import STAGES
    from sae_platform.catalog import trained_on
    from sae_platform.shuffle import pinned_keys

    store = defs.resources["storage"].store()
    batches = pinned_keys(store, trained_on(store, sae_name))  # the store of the SAE's own hook point
    run_config = _quiet(stage_settings(features={"sae_name": sae_name}))
    runs = feature_runs(batches)
    optional = {stage.job.name for stage in STAGES.values() if stage.optional}
    print(f"{sae_name}: {len(batches)} pinned batch(es); " + ", then ".join(
        f"{job_name} ({len(keys)} run{'s' if len(keys) > 1 else ''})" for job_name, keys in runs), flush=True)
    succeeded = True
    for job_name, keys in runs:
        job = defs.resolve_job_def(job_name)
        for key in tqdm(keys, desc=job_name, unit="run"):
            result = job.execute_in_process(instance=instance, partition_key=key, run_config=run_config,
                                            raise_on_error=False)
            failure = run_failure(result)
            if failure:
                goes_on = " (optional: the other stages go on)" if job_name in optional else ""
                print(f"{job_name}{f' [{key}]' if key is not None else ''} failed (run {result.run_id}){goes_on}: "
                      f"{failure}", file=sys.stderr)
                if not goes_on:
                    return False
                succeeded = False
    return succeeded


def cmd_features(args) -> int:
    from sae_platform.catalog import trained_saes

    defs = _definitions()
    store = defs.resources["storage"].store()
    args.sae = args.sae or _described_sae(defs)
    trained = trained_saes(store)
    if args.sae not in trained:
        sys.exit(f"error: no trained SAE named {args.sae!r} in the artifact root {store.url(store.root)}; trained: "
                 f"{', '.join(trained) if trained else 'none'} (train it first: `sae-platform train NAME`)")
    return 0 if build_features(_instance(), defs, args.sae) else 1


def cmd_shuffle(args) -> int:
    return 0 if run_shuffle(_instance(), _definitions(), args.memory_budget_mb) else 1


def cmd_register(args) -> int:
    keys = register(_instance(), _definitions())
    print(f"{len(keys)} partitions registered: {', '.join(keys)}")
    return 0


def cmd_backfill(args) -> int:
    instance, defs = _instance(), _definitions()
    keys = register(instance, defs)
    if not args.all:
        unknown = sorted(set(args.keys) - set(keys))
        if unknown:
            sys.exit(f"unknown partition(s) {', '.join(unknown)}: not in the text source; known: {', '.join(keys)}")
        keys = args.keys
    todo = [k for k in keys if k not in _stored_keys(defs)] if not args.force else keys
    print(f"{len(todo)} partition(s) to cache")
    run_config = stage_settings(caching={"max_contexts": args.max_contexts})
    return 1 if run_partitions(instance, defs, todo, run_config) else 0

"""``sae-platform``: the platform's operator commands (each run is a real Dagster run).

    sae-platform demo [--config config/demo.yaml]         demo corpus -> full_pipeline (the whole chain)
    sae-platform register                                  add a partition per inbox file (no runs)
    sae-platform backfill [--all | KEY ...]                run cache_activations for missing partitions
    sae-platform shuffle [--memory-budget-mb 1024]         shuffle every cached partition (one ranged run)
    sae-platform train [NAME ...] [--token-budget N]       train + evaluate sweep entries (config/sweep.yaml)
    sae-platform features [--sae NAME]                     feature tables, contexts, explanations, browser
    sae-platform lineage [--sae NAME] [--shard N]          upstream lineage of a feature table
    sae-platform browse [--port 8000]                      serve the feature browser on localhost
    sae-platform serve [--port 8000]                       the browser + live "text in, features out"
    sae-platform status                                    partitions and what is stored
    sae-platform timings [RUN_ID]                          where a run spent its time (default: the latest run)
    sae-platform recover                                   fail runs whose process died, free their pool slots

Runs go to the instance in $DAGSTER_HOME, so the UI (`make ui`) shows them afterwards.
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from jobs.settings import Settings
from sae_platform.errors import PlatformError

# Everything heavy (dagster, torch, the definitions) is imported inside the commands that need it,
# so `--help` and argument errors answer at once.


def _instance():
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        sys.exit("DAGSTER_HOME is not set: runs would be lost. Set it to an absolute, existing folder "
                 "(the Makefile uses .dagster_home), or run through `make`.")
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
    return DagsterInstance.get()


def runs_are_local(instance) -> bool:
    """A SQLite instance lives in one machine's DAGSTER_HOME, so all its runs ran there."""
    return type(instance.run_storage).__name__.startswith("Sqlite")


def recover_dead_runs(instance, all_runs_on_this_host: bool = False) -> list[str]:
    """Mark runs whose process died (SIGKILL, OOM, a lost machine) as failed and free their pool slots.

    Dagster only learns that a run ended from the run itself; a killed run stays STARTED and keeps
    its `gpu` pool slot, so a re-launch would wait for it forever. Only runs of this machine are
    judged: their process id is the one on their events (on Kubernetes, use Dagster's run monitoring).
    """
    from dagster import DagsterRunStatus, RunsFilter

    from sae_platform.storage import process_alive

    if not runs_are_local(instance) and not all_runs_on_this_host:
        raise PlatformError(f"the instance's run storage ({type(instance.run_storage).__name__}) may be shared by "
                            "several machines, and a process id means nothing on another one",
                            "run `sae-platform recover --all-runs-on-this-host` only if every run of this "
                            "instance ran here; otherwise use Dagster's run monitoring or `dagster run delete`")
    recovered = []
    in_flight = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    for run in instance.get_runs(filters=RunsFilter(statuses=in_flight)):
        pids = {e.dagster_event.pid for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.pid}
        if not pids or any(process_alive(pid) for pid in pids):
            continue
        instance.report_run_failed(run, message=f"the run's process(es) {sorted(pids)} died; marked failed by "
                                                "`sae-platform recover` so its pool slots are freed")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


def _definitions():
    from jobs.definitions import defs

    return defs


QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}  # step events stay in the UI


def _quiet(run_config: dict) -> dict:
    return {**run_config, **QUIET}


def stage_settings(**sections: dict) -> dict:
    """Run config overriding some stage settings (``resources.<stage>.config``); every setting not
    given keeps the deployment's value (SAE_PLATFORM_RUN_CONFIG) or the default declared in sae_platform."""
    resources = {stage: {"config": {k: v for k, v in values.items() if v is not None}}
                 for stage, values in sections.items()}
    return {"resources": {stage: section for stage, section in resources.items() if section["config"]}}


def fill_inbox_from_demo(settings: Settings, n_batches: int) -> list[Path]:
    """Copy the first demo texts into a local inbox, unless it already holds files."""
    from sae_platform.demo_data import fetch_demo_corpus

    inbox = Path(settings.inbox).parent
    if settings.inbox.startswith("s3://"):
        return []
    inbox.mkdir(parents=True, exist_ok=True)
    if any(inbox.iterdir()):
        return []
    corpus = fetch_demo_corpus(Path(settings.data_dir))
    copied = []
    for source in corpus[:n_batches]:
        shutil.copy(source, inbox / f".{source.name}.part")
        os.replace(inbox / f".{source.name}.part", inbox / source.name)  # the sensor never sees half a file
        copied.append(inbox / source.name)
    return copied


def fill_holdout_from_demo(settings: Settings) -> Path | None:
    """Held-out text for the downstream CE: a demo text that is not in the inbox."""
    holdout = Path(settings.holdout_pattern).parent
    if settings.holdout_pattern.startswith("s3://"):
        return None
    holdout.mkdir(parents=True, exist_ok=True)
    if any(holdout.iterdir()):
        return None
    from sae_platform.demo_data import fetch_demo_corpus

    inbox = {p.name for p in Path(settings.inbox).parent.glob("*")}
    candidates = [p for p in fetch_demo_corpus(Path(settings.data_dir)) if p.name not in inbox]
    shutil.copy(candidates[-1], holdout / candidates[-1].name)
    return holdout / candidates[-1].name


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
    from sae_platform.activations import list_partitions

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
    each feature shard, or one run for an unpartitioned stage."""
    from assets import STAGES
    from assets.partitions import ACTIVATION_BATCHES, FEATURE_SHARDS

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
        else:
            raise PlatformError(f"`sae-platform features` does not know which partitions of {stage.asset} to run "
                                f"({type(stage.partitions).__name__})", "teach feature_runs in jobs/cli its partitions")
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
    (:func:`feature_runs`), one Dagster run per partition, as a backfill would launch them."""
    from tqdm import tqdm

    from sae_platform.shuffle import pinned_keys
    from sae_platform.trainer import trained_on

    store = defs.resources["storage"].store()
    batches = pinned_keys(store, trained_on(store, sae_name))  # the store of the SAE's own hook point
    run_config = _quiet(stage_settings(features={"sae_name": sae_name}))
    runs = feature_runs(batches)
    print(f"{sae_name}: {len(batches)} pinned batch(es); " + ", then ".join(
        f"{job_name} ({len(keys)} run{'s' if len(keys) > 1 else ''})" for job_name, keys in runs), flush=True)
    for job_name, keys in runs:
        job = defs.resolve_job_def(job_name)
        for key in tqdm(keys, desc=job_name, unit="run"):
            result = job.execute_in_process(instance=instance, partition_key=key, run_config=run_config,
                                            raise_on_error=False)
            failure = run_failure(result)
            if failure:
                print(f"{job_name}{f' [{key}]' if key is not None else ''} failed (run {result.run_id}): {failure}",
                      file=sys.stderr)
                return False
    return True


def cmd_features(args) -> int:
    defs = _definitions()
    store = defs.resources["storage"].store()
    args.sae = args.sae or _described_sae(defs)
    trained = [n.split("/", 1)[1] for n in store.committed_names("sae")]
    if args.sae not in trained:
        sys.exit(f"error: no trained SAE named {args.sae!r} in the artifact root {store.url(store.root)}; trained: "
                 f"{', '.join(trained) if trained else 'none'} (train it first: `sae-platform train NAME`)")
    return 0 if build_features(_instance(), defs, args.sae) else 1


def cmd_lineage(args) -> int:
    from dagster import AssetKey

    from assets.partitions import N_FEATURE_SHARDS
    from sae_platform.lineage import feature_table_lineage, format_lineage

    if not 0 <= args.shard < N_FEATURE_SHARDS:
        sys.exit(f"error: there is no feature shard {args.shard}: shards are 0–{N_FEATURE_SHARDS - 1} "
                 f"(--shard N, one per quarter of the SAE's latents)")
    instance, defs = _instance(), _definitions()
    store = defs.resources["storage"].store()
    args.sae = args.sae or _described_sae(defs)
    _require_sae_with_tables(store, args.sae)
    records = instance.fetch_materializations(AssetKey("feature_topk"), limit=100).records
    run_ids = [r.run_id for r in records if r.partition_key == f"f{args.shard}"
               and _metadata_value(r, "sae") == args.sae]  # the newest run that described this SAE
    lineage = feature_table_lineage(store, args.sae, args.shard, run_id=run_ids[0] if run_ids else None)
    print(format_lineage(lineage))
    graph = defs.resolve_asset_graph()
    print("\nasset graph upstream of feature_topk: " + " ← ".join(_upstream_chain(graph, AssetKey("feature_topk"))))
    return 0


def _saes_with_tables(store) -> list[str]:
    try:
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in store.fs.ls(store.path("features"), detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if store.committed_names(f"features/{n}/tables"))


def _require_sae_with_tables(store, sae: str) -> None:
    """Exit naming the SAEs that do have feature tables when ``sae`` has none."""
    known = _saes_with_tables(store)
    if sae in known:
        return
    trained = [n.split("/", 1)[1] for n in store.committed_names("sae")]
    root = store.url(store.root)
    if sae in trained:
        sys.exit(f"error: SAE {sae!r} is trained but has no feature tables under {root}: build them with "
                 f"`sae-platform features --sae {sae}` (or materialize feature_topk)")
    sys.exit(f"error: no SAE named {sae!r} in the artifact root {root}; known: "
             + (", ".join(known) if known else "none with feature tables")
             + (f" (trained without tables: {', '.join(t for t in trained if t not in known)})"
                if any(t not in known for t in trained) else ""))


def _described_sae(defs) -> str:
    """The SAE the deployment's feature tables describe (resources.features.config.sae_name)."""
    return defs.resources["features"].settings().sae_name


def _metadata_value(record, key: str):
    entry = record.asset_materialization.metadata.get(key) if record.asset_materialization else None
    return getattr(entry, "value", entry)


def _upstream_chain(graph, key) -> list[str]:
    seen, order, frontier = set(), [], [key]
    while frontier:
        current = frontier.pop(0)
        if current in seen:
            continue
        seen.add(current)
        order.append(current.to_user_string())
        frontier.extend(sorted(graph.get(current).parent_keys, key=lambda k: k.to_user_string()))
    return order


def cmd_serve(args) -> int:
    """The browser plus the live endpoint: the base model and the SAE answer typed text."""
    from sae_platform.activations import sae_hook_entry
    from sae_platform.live import LiveEncoder, serve_live
    from sae_platform.model import pick_device
    from sae_platform.trainer import load_sae

    site, defs, store = _site(args)
    device = pick_device(args.device)
    sae, _ = load_sae(store, args.sae, device)
    entry = sae_hook_entry(store, args.sae)  # where the SAE's training rows were read
    hooked, _ = defs.resources["language_model"].load(store, device=str(device))
    encoder = LiveEncoder(hooked, sae, entry.hook_name, entry.hook_name_in, max_tokens=args.max_tokens)
    serve_live(site, encoder, host=args.host, port=args.port)
    return 0


def cmd_browse(args) -> int:
    from sae_platform.browser import serve

    site, _, _ = _site(args)
    serve(site, port=args.port)
    return 0


def _site(args):
    """(local site folder, definitions, store) of the browser of ``args.sae``; exits saying why not."""
    from assets.features import browser_dir

    defs = _definitions()
    store = defs.resources["storage"].store()
    args.sae = args.sae or _described_sae(defs)
    site = browser_dir(store, args.sae)
    if not store.is_local:
        sys.exit(f"the feature browser is at {store.url(site)}: serve it from any static web host, or copy it "
                 "to a local folder (e.g. `aws s3 sync`) and run `python -m sae_platform.browser serve DIR`")
    if not os.path.exists(os.path.join(site, "index.html")):
        root, env = store.url(store.root), os.environ.get("SAE_PLATFORM_ROOT")
        where = (f"SAE_PLATFORM_ROOT={env}" if env else
                 f"SAE_PLATFORM_ROOT is unset, so the root is ./artifacts of the current folder {os.getcwd()}")
        built = [e.name for e in Path(store.path("browser")).glob("*")
                 if (e / "index.html").exists()] if os.path.isdir(store.path("browser")) else []
        if built:
            sys.exit(f"error: no feature browser of SAE {args.sae!r} in the artifact root {root} ({where}); it has "
                     f"browsers of: {', '.join(sorted(built))} (pass --sae NAME)")
        if not os.path.isdir(root) or not os.listdir(root):
            sys.exit(f"error: the artifact root {root} is {'empty' if os.path.isdir(root) else 'missing'} "
                     f"({where}): run from the folder the pipeline ran in (the repository, with `make browse`), "
                     "or set SAE_PLATFORM_ROOT to its artifacts folder")
        sys.exit(f"error: no feature browser in the artifact root {root} ({where}): build it with `make demo` or "
                 f"`sae-platform features --sae {args.sae}`, or point SAE_PLATFORM_ROOT at the root it was built in")
    return site, defs, store


def cmd_shuffle(args) -> int:
    return 0 if run_shuffle(_instance(), _definitions(), args.memory_budget_mb) else 1


def cmd_demo(args) -> int:
    """Fill the inbox and holdout from the demo corpus, then run full_pipeline through Dagster's CLI."""
    if not os.path.isfile(args.config):
        sys.exit(f"error: the run config {args.config} does not exist ({os.path.abspath(args.config)}); nothing ran. "
                 "Pass an existing file with --config (the demo's is config/demo.yaml)")
    settings = Settings.from_env()
    copied = fill_inbox_from_demo(settings, args.batches)
    if copied:
        print(f"inbox: copied {len(copied)} demo texts into {Path(settings.inbox).parent}")
    fill_holdout_from_demo(settings)
    instance = _instance()
    if runs_are_local(instance):
        for run_id in recover_dead_runs(instance):  # a demo killed before: free what it held
            print(f"recovered run {run_id} (its process had died)")
    command = [str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "jobs.definitions",
               "-j", "full_pipeline", "-c", args.config]
    print("running the whole pipeline:\n  " + " ".join(command), flush=True)
    # The code location reads its settings from the same file, so every step runs exactly these settings.
    env = {**os.environ, "SAE_PLATFORM_RUN_CONFIG": os.path.abspath(args.config)}
    succeeded = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env).returncode == 0
    _print_status()
    latest = instance.get_run_records(limit=1)
    if latest:  # where the time went (`sae-platform timings` prints it again)
        print_timings(instance, latest[0].dagster_run.run_id)
    print(f"\nDagster runs are in {os.environ['DAGSTER_HOME']}: see the run, the asset graph and the lineage "
          "with `make ui` (http://127.0.0.1:3000), or `sae-platform lineage`.")
    if succeeded:
        print("feature browser: `make browse` serves it at http://127.0.0.1:8000/")
    else:
        print("full_pipeline failed (see the log above); what it committed is kept (cached batches, the "
              "shuffled store, the last checkpoint), so running `sae-platform demo` again continues from there.",
              file=sys.stderr)
    return 0 if succeeded else 1


def step_times(instance, run_id: str) -> tuple[list[tuple[str, int, float]], float]:
    """Step wall time summed per op of one run, slowest first, from its event log: [(op, steps,
    seconds)], and the run's wall time (first step start to last step end), in seconds."""
    stats = [s for s in instance.get_run_step_stats(run_id) if s.start_time and s.end_time]
    per_op: dict[str, list[float]] = {}
    for stat in stats:
        op = stat.step_key.split("[", 1)[0]  # a mapped step "op[key]" counts for its op
        per_op.setdefault(op, []).append(stat.end_time - stat.start_time)
    rows = sorted(((op, len(times), sum(times)) for op, times in per_op.items()), key=lambda row: -row[2])
    wall = max(s.end_time for s in stats) - min(s.start_time for s in stats) if stats else 0.0
    return rows, wall


def print_timings(instance, run_id: str) -> None:
    rows, wall = step_times(instance, run_id)
    total = sum(seconds for _, _, seconds in rows)
    print(f"\nrun {run_id}: {sum(n for _, n, _ in rows)} steps, {wall:.0f} s from the first step's start to the "
          f"last step's end; step time per op ({total:.0f} s in all):")
    for op, n, seconds in rows:
        print(f"  {op:<32} {n:>4} step(s) {seconds:>8.1f} s {100 * seconds / max(total, 1e-9):>5.1f}%")


def cmd_timings(args) -> int:
    instance = _instance()
    run_id = args.run_id
    if run_id is None:
        records = instance.get_run_records(limit=1)
        if not records:
            print("error: no runs in this instance ($DAGSTER_HOME) yet", file=sys.stderr)
            return 2
        run_id = records[0].dagster_run.run_id
    elif instance.get_run_by_id(run_id) is None:  # a prefix, as the UI shows (d422c996)?
        matches = [r.dagster_run.run_id for r in instance.get_run_records(limit=1000)
                   if r.dagster_run.run_id.startswith(run_id)]
        if len(matches) != 1:
            print(f"error: {'no' if not matches else len(matches)} run(s) {run_id}… in this instance ($DAGSTER_HOME); "
                  "give a whole run id or a unique prefix (`dagster run list` shows them)", file=sys.stderr)
            return 2
        run_id = matches[0]
    print_timings(instance, run_id)
    return 0


def cmd_recover(args) -> int:
    recovered = recover_dead_runs(_instance(), args.all_runs_on_this_host)
    print(f"{len(recovered)} dead run(s) marked failed, their pool slots freed" +
          (": " + ", ".join(recovered) if recovered else ""))
    return 0


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


def describe_eval(report: dict) -> str:
    """The evaluation's headline figures, each dead-latent figure with the window it was measured on."""
    parts = [f"{k} {report[k]:.4g}" for k in ("fvu", "l0") if report.get(k) is not None]
    if report.get("dead_fraction") is not None:
        window = report.get("dead_window_tokens")
        parts.append(f"dead {report['dead_fraction']:.1%}" + (f" (never fired in {window:,} tokens)" if window else ""))
    if report.get("loss_recovered") is not None:
        parts.append(f"loss recovered {report['loss_recovered']:.4g}")
    return ", ".join(parts)


def _print_status() -> None:
    """What is stored, read from the artifact store alone (no Dagster, no torch: it answers at once)."""
    from sae_platform.storage import open_store

    settings = Settings.from_env()
    store = open_store(settings.root_url, settings.s3_endpoint_url)
    print(f"\nartifact root: {store.url(store.root)}")
    for name in store.committed_names("activations"):
        pointer = store.pointer(name)
        print(f"  {name}: committed {pointer['version']}")
    _print_inbox(settings, store)
    for name in store.committed_names("shuffled"):
        pointer = store.pointer(name)
        print(f"  {name}: {pointer.get('n_rows', '?'):,} rows, plan {pointer.get('plan_id')}")
    for name in store.committed_names("sae"):
        pointer = store.pointer(name)
        print(f"  {name}: step {pointer['step']}, {pointer['tokens']:,} tokens{' (final)' if pointer['final'] else ''}")
    for name in store.committed_names("eval"):
        print(f"  {name}: {describe_eval(store.read_json(f'{store.resolve(name)}/report.json'))}")


def _print_inbox(settings: Settings, store) -> None:
    """Every inbox file: readable ones that wait for caching (with the key they get), and those not
    cached with why: skipped (never read) or failed (their last attempt)."""
    from sae_platform.corpus import resolve_source
    from sae_platform.inbox import inbox_report, needs_caching, scan_inbox

    try:
        inbox = scan_inbox(*resolve_source(settings.inbox, settings.s3_endpoint_url), store)
    except (PlatformError, OSError) as error:
        print(f"\ninbox {settings.inbox}: cannot be listed ({error})")
        return
    waiting = needs_caching(store, inbox.stamps)
    lines = inbox_report(inbox, store)
    print(f"\ninbox {settings.inbox}: {len(inbox.files)} readable file(s), {len(waiting)} waiting to be cached"
          + (f"; {len(lines)} other line(s):" if lines else ""))
    names = {f.key: f.url.rsplit("/", 1)[-1] for f in inbox.files}
    for key in waiting:
        print(f"  to cache {names[key]} as partition {key}")
    for line in lines:
        print(line)


def cmd_status(args) -> int:
    _print_status()
    return 0


DEPLOYED = "default: the deployment's resources.{}.config.{} (SAE_PLATFORM_RUN_CONFIG, else sae_platform's default)"


def _training_arguments(parser) -> None:
    """Optional overrides; what is not given keeps the deployment's value, so the CLI, the UI and
    full_pipeline train with the same settings unless asked otherwise."""
    for flag, kind in (("token-budget", int), ("batch-size", int), ("lr", float), ("checkpoint-every-tokens", int),
                       ("dead-after-tokens", int)):
        parser.add_argument(f"--{flag}", type=kind, default=None, help=DEPLOYED.format("training", flag.replace("-", "_")))
    parser.add_argument("--ce-contexts", type=int, default=None, help=DEPLOYED.format("evaluation", "ce_contexts"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sae-platform", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole pipeline on the demo corpus (full_pipeline job)")
    demo.add_argument("--batches", type=int, default=6, help="demo texts copied into an empty inbox")
    demo.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config" / "demo.yaml"),
                      help="run config of full_pipeline")
    demo.set_defaults(func=cmd_demo)
    shuffle = commands.add_parser("shuffle", help="shuffle every cached partition")
    shuffle.add_argument("--memory-budget-mb", type=int, default=None, help="default: the shuffle resource's")
    shuffle.set_defaults(func=cmd_shuffle)
    commands.add_parser("register", help="add a partition per inbox file").set_defaults(func=cmd_register)
    backfill = commands.add_parser("backfill", help="cache partitions that are not stored yet")
    backfill.add_argument("keys", nargs="*")
    backfill.add_argument("--all", action="store_true")
    backfill.add_argument("--force", action="store_true", help="re-cache stored partitions too")
    backfill.add_argument("--max-contexts", type=int, default=None, help=DEPLOYED.format("caching", "max_contexts"))
    backfill.set_defaults(func=cmd_backfill)
    train_cmd = commands.add_parser("train", help="train + evaluate sweep entries (default: all)")
    train_cmd.add_argument("names", nargs="*")
    _training_arguments(train_cmd)
    train_cmd.set_defaults(func=cmd_train)
    features = commands.add_parser("features", help="feature tables, contexts, explanations and the browser of one SAE")
    features.add_argument("--sae", default=None, help=DEPLOYED.format("features", "sae_name"))
    features.set_defaults(func=cmd_features)
    lineage = commands.add_parser("lineage", help="upstream lineage of a feature table")
    lineage.add_argument("--sae", default=None, help=DEPLOYED.format("features", "sae_name"))
    lineage.add_argument("--shard", type=int, default=0)
    lineage.set_defaults(func=cmd_lineage)
    browse = commands.add_parser("browse", help="serve the feature browser on localhost")
    browse.add_argument("--sae", default=None, help=DEPLOYED.format("features", "sae_name"))
    browse.add_argument("--port", type=int, default=8000)
    browse.set_defaults(func=cmd_browse)
    serve = commands.add_parser("serve", help="the feature browser plus live text -> features (base model + SAE)")
    serve.add_argument("--sae", default=None, help=DEPLOYED.format("features", "sae_name"))
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--device", default="auto", help="auto, cpu or cuda")
    serve.add_argument("--max-tokens", type=int, default=256, help="longest text answered, in tokens")
    serve.set_defaults(func=cmd_serve)
    commands.add_parser("status", help="what is stored").set_defaults(func=cmd_status)
    timings = commands.add_parser("timings", help="step time per op of a run, from its event log")
    timings.add_argument("run_id", nargs="?", default=None, help="default: the latest run")
    timings.set_defaults(func=cmd_timings)
    recover = commands.add_parser("recover", help="mark runs whose process died as failed, freeing their pool slots")
    recover.add_argument("--all-runs-on-this-host", action="store_true",
                         help="needed with a shared (e.g. PostgreSQL) instance: assert every run ran here")
    recover.set_defaults(func=cmd_recover)
    args = parser.parse_args(argv)
    if args.command == "backfill" and not args.all and not args.keys:
        parser.error("backfill needs partition keys or --all")
    try:
        return args.func(args)
    except PlatformError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``sae-platform``: the platform's operator commands (each run is a real Dagster run).

    sae-platform demo [--batches 6] [--max-contexts 160]   fill the inbox from the demo corpus, cache it
    sae-platform register                                  add a partition per inbox file (no runs)
    sae-platform backfill [--all | KEY ...]                run cache_activations for missing partitions
    sae-platform shuffle [--memory-budget-mb 1024]         shuffle every cached partition (one ranged run)
    sae-platform status                                    partitions and what is stored

Runs go to the instance in $DAGSTER_HOME, so the UI (`make ui`) shows them afterwards.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from assets.partitions import ACTIVATION_BATCHES, ALL_SHUFFLE_WORKERS_TAGS
from jobs.settings import Settings
from sae_platform.activations import list_partitions
from sae_platform.demo_data import fetch_demo_corpus
from sae_platform.errors import PlatformError


def _instance():
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        sys.exit("DAGSTER_HOME is not set: runs would be lost. Set it to an absolute, existing folder "
                 "(the Makefile uses .dagster_home), or run through `make`.")
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
    return DagsterInstance.get()


def _definitions():
    from jobs.definitions import defs

    return defs


def fill_inbox_from_demo(settings: Settings, n_batches: int) -> list[Path]:
    """Copy the first demo texts into a local inbox, unless it already holds files."""
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


def register(instance, defs) -> list[str]:
    text_source = defs.resources["text_source"]
    keys = [f.key for f in text_source.files()]
    existing = set(instance.get_dynamic_partitions(ACTIVATION_BATCHES.name))
    new = [k for k in keys if k not in existing]
    if new:
        instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, new)
    return keys


def _stored_keys(defs) -> set[str]:
    return set(list_partitions(defs.resources["storage"].store()))


def run_partitions(instance, defs, keys: list[str], run_config: dict) -> list[str]:
    job = defs.resolve_job_def("cache_activations")
    failed = []
    for key in tqdm(keys, desc="activation batches", unit="batch"):
        result = job.execute_in_process(instance=instance, partition_key=key, run_config=run_config,
                                        raise_on_error=False)
        if not result.success:
            failed.append(key)
    return failed


def run_shuffle(instance, defs, memory_budget_mb: int | None) -> bool:
    """The whole shuffle as one run over every worker partition; prints the checks' verdicts."""
    run_config = {}
    if memory_budget_mb:
        run_config = {"resources": {"shuffle": {"config": {"memory_budget_bytes": memory_budget_mb << 20}}}}
    result = defs.resolve_job_def("shuffle_activations").execute_in_process(
        instance=instance, tags=ALL_SHUFFLE_WORKERS_TAGS, run_config=run_config, raise_on_error=False)
    for check in result.get_asset_check_evaluations():
        print(f"  check {check.check_name}: {'passed' if check.passed else 'FAILED'}")
    return result.success and all(c.passed for c in result.get_asset_check_evaluations())


def cmd_shuffle(args) -> int:
    return 0 if run_shuffle(_instance(), _definitions(), args.memory_budget_mb) else 1


def cmd_demo(args) -> int:
    settings = Settings.from_env()
    copied = fill_inbox_from_demo(settings, args.batches)
    if copied:
        print(f"inbox: copied {len(copied)} demo texts into {Path(settings.inbox).parent}")
    instance, defs = _instance(), _definitions()
    store = defs.resources["storage"].store()
    from sae_platform.model import model_artifact_name

    if store.resolve(model_artifact_name(defs.resources["language_model"].source)) is None:
        print("materializing base_model (one-time GGUF -> safetensors conversion, ~20 s)")
        defs.resolve_job_def("prepare_base_model").execute_in_process(instance=instance)
    keys = register(instance, defs)[: args.batches]
    todo = [k for k in keys if k not in _stored_keys(defs)]
    run_config = {"ops": {"activations": {"config": {"max_contexts": args.max_contexts}}}}
    failed = run_partitions(instance, defs, todo, run_config)
    print(f"shuffling every cached batch (memory budget {args.memory_budget_mb} MiB per job)")
    shuffled = run_shuffle(instance, defs, args.memory_budget_mb)
    _print_status(defs)
    print(f"\nDagster runs are in {os.environ['DAGSTER_HOME']}; see them and the lineage with `make ui` "
          "(http://127.0.0.1:3000), or `dagster asset list -m jobs.definitions`.")
    return 1 if failed or not shuffled else 0


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
    run_config = {"ops": {"activations": {"config": {"max_contexts": args.max_contexts}}}}
    return 1 if run_partitions(instance, defs, todo, run_config) else 0


def _print_status(defs) -> None:
    store = defs.resources["storage"].store()
    print(f"\nartifact root: {store.url(store.root)}")
    for key in list_partitions(store):
        pointer = store.pointer(f"activations/{key}")
        print(f"  activations/{key}: committed {pointer['version']}")
    for name in store.committed_names("shuffled"):
        pointer = store.pointer(name)
        print(f"  {name}: {pointer.get('n_rows', '?'):,} rows, plan {pointer.get('plan_id')}")


def cmd_status(args) -> int:
    _print_status(_definitions())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sae-platform", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="fill the inbox from the demo corpus and cache it")
    demo.add_argument("--batches", type=int, default=6)
    demo.add_argument("--max-contexts", type=int, default=160, help="contexts of 128 tokens per batch")
    demo.add_argument("--memory-budget-mb", type=int, default=48,
                      help="per-job shuffle budget; the demo's 48 MiB makes the ~140 MB of activations take 2 passes")
    demo.set_defaults(func=cmd_demo)
    shuffle = commands.add_parser("shuffle", help="shuffle every cached partition")
    shuffle.add_argument("--memory-budget-mb", type=int, default=None, help="default: the shuffle resource's")
    shuffle.set_defaults(func=cmd_shuffle)
    commands.add_parser("register", help="add a partition per inbox file").set_defaults(func=cmd_register)
    backfill = commands.add_parser("backfill", help="cache partitions that are not stored yet")
    backfill.add_argument("keys", nargs="*")
    backfill.add_argument("--all", action="store_true")
    backfill.add_argument("--force", action="store_true", help="re-cache stored partitions too")
    backfill.add_argument("--max-contexts", type=int, default=None)
    backfill.set_defaults(func=cmd_backfill)
    commands.add_parser("status", help="what is stored").set_defaults(func=cmd_status)
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

"""``sae-platform``: the platform's operator commands (each run is a real Dagster run).

    sae-platform demo [--config config/demo.yaml]         demo corpus -> full_pipeline (the whole chain)
    sae-platform register                                  add a partition per inbox file (no runs)
    sae-platform backfill [--all | KEY ...]                run cache_activations for missing partitions
    sae-platform shuffle [--memory-budget-mb 1024]         shuffle every cached partition (one ranged run)
    sae-platform train [NAME ...] [--token-budget N]       train + evaluate sweep entries (config/sweep.yaml)
    sae-platform features [--sae NAME]                     feature tables, contexts, explanations, browser
    sae-platform vector add NAME FILE [--hook-point H]     a direction (.npy/.safetensors) as a one-latent SAE
    sae-platform lineage [--sae NAME] [--shard N]          upstream lineage of a feature table
    sae-platform browse [--port 8000]                      serve the feature browser on localhost
    sae-platform serve [--port 8000]                       the browser + live "text in, features out"
    sae-platform steer --feature F --strength S "prompt"   greedy continuation without / with the feature added
    sae-platform status                                    partitions and what is stored
    sae-platform timings [RUN_ID]                          where a run spent its time (default: the latest run)
    sae-platform recover                                   fail runs whose process died, free their pool slots
    sae-platform verify [ARTIFACT ...]                     re-hash stored artifacts against their checksums

Runs go to the instance in $DAGSTER_HOME, so the UI (`make ui`) shows them afterwards.
"""

import argparse
import sys

from jobs.cli.browse import cmd_browse, cmd_lineage, cmd_serve
from jobs.cli.common import REPO, stage_settings
from jobs.cli.demo import cmd_demo
from jobs.cli.runs import cmd_recover, cmd_timings, recover_dead_runs, step_times
from jobs.cli.stages import (
    build_features,
    cmd_backfill,
    cmd_features,
    cmd_register,
    cmd_shuffle,
    cmd_train,
    feature_runs,
    run_failure,
)
from jobs.cli.status import cmd_status
from jobs.cli.steer import add_parser as add_steer_parser
from jobs.cli.vector import add_parser as add_vector_parser
from jobs.cli.verify import cmd_verify
from sae_platform.browser.address import DEFAULT_HOST, DEFAULT_PORT
from sae_platform.errors import PlatformError, printable

# The commands live in the modules of this package, one per kind of work; everything heavy (dagster,
# torch, the definitions) is imported inside the commands that need it, so `--help` and argument
# errors answer at once.

__all__ = ["build_features", "feature_runs", "main", "recover_dead_runs", "run_failure", "stage_settings", "step_times"]


DEPLOYED = "default: the deployment's resources.{}.config.{} (SAE_PLATFORM_RUN_CONFIG, else sae_platform's default)"


def _training_arguments(parser) -> None:
    """Optional overrides; what is not given keeps the deployment's value, so the CLI, the UI and
    full_pipeline train with the same settings unless asked otherwise."""
    for flag, kind in (("token-budget", int), ("batch-size", int), ("lr", float), ("checkpoint-every-tokens", int),
                       ("dead-after-tokens", int)):
        parser.add_argument(f"--{flag}", type=kind, default=None,
                            help=DEPLOYED.format("training", flag.replace("-", "_")))
    parser.add_argument("--ce-contexts", type=int, default=None, help=DEPLOYED.format("evaluation", "ce_contexts"))


class _ShowsDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends each option with its default, except the options whose help already says
    where their default comes from (``DEPLOYED``), those without one and on/off flags."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0 or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _CommandParser(argparse.ArgumentParser):
    """The parser of every subcommand (``add_subparsers(parser_class=...)``, inherited by nested
    ones such as ``vector add``): its ``--help`` shows each option's default, so a command added
    later cannot forget to."""

    def __init__(self, *args, formatter_class=_ShowsDefaults, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _address_arguments(parser) -> None:
    """--host and --port of a command that serves the browser."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 127.0.0.1 answers this machine only")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sae-platform", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    demo = commands.add_parser("demo", help="the whole pipeline on the demo corpus (full_pipeline job)")
    demo.add_argument("--batches", type=int, default=6, help="demo texts copied into an empty inbox")
    demo.add_argument("--config", default=str(REPO / "config" / "demo.yaml"),
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
    add_vector_parser(commands)
    lineage = commands.add_parser("lineage", help="upstream lineage of a feature table")
    lineage.add_argument("--sae", default=None, help=DEPLOYED.format("features", "sae_name"))
    lineage.add_argument("--shard", type=int, default=0,
                         help="feature shard: 0 … n-1, n as the tables were cut (`sae-platform status`)")
    lineage.set_defaults(func=cmd_lineage)
    browse = commands.add_parser("browse", help="serve the feature browser on localhost")
    browse.add_argument("--sae", default=None, help=DEPLOYED.format("features", "sae_name"))
    _address_arguments(browse)
    browse.set_defaults(func=cmd_browse)
    serve = commands.add_parser("serve", help="the feature browser plus live text -> features (base model + SAE)")
    serve.add_argument("--sae", default=None, help=DEPLOYED.format("features", "sae_name"))
    _address_arguments(serve)
    serve.add_argument("--device", default="auto", help="auto, cpu or cuda")
    serve.add_argument("--max-tokens", type=int, default=256, help="longest text answered, in tokens")
    serve.set_defaults(func=cmd_serve)
    add_steer_parser(commands)
    commands.add_parser("status", help="what is stored").set_defaults(func=cmd_status)
    timings = commands.add_parser("timings", help="step time per op of a run, from its event log")
    timings.add_argument("run_id", nargs="?", default=None, help="default: the latest run")
    timings.set_defaults(func=cmd_timings)
    recover = commands.add_parser("recover", help="mark runs whose process died as failed, freeing their pool slots")
    recover.add_argument("--all-runs-on-this-host", action="store_true",
                         help="needed with a shared (e.g. PostgreSQL) instance: assert every run ran here")
    recover.set_defaults(func=cmd_recover)
    verify = commands.add_parser("verify", help="re-hash committed artifacts against what their writers recorded")
    verify.add_argument("artifacts", nargs="*", help="artifact names or prefixes (activations/<key>, sae, models); "
                                                     "default: every committed artifact")
    verify.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    if args.command == "backfill" and not args.all and not args.keys:
        parser.error("backfill needs partition keys or --all")
    try:
        return args.func(args)
    except PlatformError as error:
        print(f"error: {printable(error.problem)}\n  How to fix: {printable(error.fix)}", file=sys.stderr)
        return 2

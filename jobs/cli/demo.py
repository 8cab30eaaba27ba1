"""`sae-platform demo`: the demo corpus into the inbox and holdout, then full_pipeline through Dagster's CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from jobs.cli.common import REPO, _instance
from jobs.cli.runs import print_timings, recover_dead_runs, runs_are_local
from jobs.cli.status import _print_status
from jobs.settings import Settings


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
    succeeded = subprocess.run(command, cwd=REPO, env=env).returncode == 0
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

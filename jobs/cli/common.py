"""What the commands share: the Dagster instance, the definitions, the run config of a launch."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository: config/, and where `dagster` runs the code location


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


QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}  # step events stay in the UI


def _quiet(run_config: dict) -> dict:
    return {**run_config, **QUIET}


def stage_settings(**sections: dict) -> dict:
    """Run config overriding some stage settings (``resources.<stage>.config``); every setting not
    given keeps the deployment's value (SAE_PLATFORM_RUN_CONFIG) or the default declared in sae_platform."""
    resources = {stage: {"config": {k: v for k, v in values.items() if v is not None}}
                 for stage, values in sections.items()}
    return {"resources": {stage: section for stage, section in resources.items() if section["config"]}}


def _described_sae(defs) -> str:
    """The SAE the deployment's feature tables describe (resources.features.config.sae_name)."""
    return defs.resources["features"].settings().sae_name

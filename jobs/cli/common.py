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


def deployed_store_and_sae():
    """(artifact store, SAE the feature tables describe) of this deployment, from the environment
    and the run config file (``SAE_PLATFORM_RUN_CONFIG``) alone: for commands that only read the
    store and must answer at once, without Dagster, torch or the definitions. The same values the
    definitions' storage and features resources hold (``Settings.storage_config``,
    ``catalog.DEFAULT_SAE_NAME``). SettingsError naming a bad run config file."""
    from jobs.settings import Settings
    from sae_platform.catalog import DEFAULT_SAE_NAME
    from sae_platform.settings import read_run_config
    from sae_platform.storage import open_store

    settings = Settings.from_env()
    resources = read_run_config(settings.run_config).get("resources") or {}
    configured = {key: (value or {}).get("config") or {} for key, value in resources.items()}
    storage = settings.storage_config(configured.get("storage"))
    store = open_store(storage["root_url"], storage.get("endpoint_url"))
    return store, configured.get("features", {}).get("sae_name") or DEFAULT_SAE_NAME


def _described_sae(defs) -> str:
    """The SAE the deployment's feature tables describe (resources.features.config.sae_name)."""
    return defs.resources["features"].settings().sae_name

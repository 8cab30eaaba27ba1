"""The code location: every asset, job, sensor and resource of the platform.

    dagster dev -w workspace.yaml                       # UI with the asset graph
    dagster job execute -m jobs.definitions -j full_pipeline -c config/demo.yaml   # the whole chain
    dagster job execute -m jobs.definitions -j cache_activations --tags '{"dagster/partition": "KEY"}'

The run config file in ``SAE_PLATFORM_RUN_CONFIG`` (the Makefile: config/demo.yaml) is the
deployment's settings: its ``resources`` section configures the resources of *every* job and asset
(so *Materialize* in the UI, the asset jobs, the sensors and ``full_pipeline`` all run the demo's
settings), and the whole file is ``full_pipeline``'s default run config (the Launchpad opens with it).
"""

from dagster import Definitions

from assets import ASSETS, SCHEDULES, SENSORS, STAGES
from assets.stage import asset_jobs
from jobs.full_pipeline import build_full_pipeline, cache_inbox
from jobs.settings import Settings
from resources import (
    STAGE_SETTINGS,
    AutomationResource,
    BaseModelResource,
    LLMExplainerResource,
    StorageResource,
    TextSourceResource,
    stage_resource,
)
from sae_platform.settings import SettingsError, read_run_config

# One asset job per AssetJob the stage declarations name (assets/*.py), in pipeline order.
ASSET_JOBS = asset_jobs(STAGES.values())


def build_resources(settings: Settings, run_config: dict | None = None) -> dict:
    """Every resource, with the run config file's ``resources`` section as the deployment's values."""
    run_config = read_run_config(settings.run_config) if run_config is None else run_config
    configured = {key: (value or {}).get("config", {}) for key, value in (run_config.get("resources") or {}).items()}
    unknown = set(configured) - set(STAGE_SETTINGS) - {"storage", "language_model", "text_source", "holdout_text",
                                                       "llm_explainer"}
    if unknown:
        raise SettingsError(f"{settings.run_config}: unknown resource(s) {', '.join(sorted(unknown))}",
                            f"use {', '.join(sorted(STAGE_SETTINGS))}, language_model, text_source, holdout_text, "
                            "llm_explainer")
    text = {"endpoint_url": settings.s3_endpoint_url}
    return {
        "storage": StorageResource(**settings.storage_config(configured.get("storage"))),
        "language_model": BaseModelResource(**configured.get("language_model", {})),
        "text_source": TextSourceResource(**{"pattern": settings.inbox, **text, **configured.get("text_source", {})}),
        "holdout_text": TextSourceResource(**{"pattern": settings.holdout_pattern, **text,
                                              **configured.get("holdout_text", {})}),
        **{key: stage_resource(key, configured.get(key)) for key in STAGE_SETTINGS},
        "automation": AutomationResource(run_config_path=settings.run_config),
        "llm_explainer": LLMExplainerResource(**configured.get("llm_explainer", {})),
    }


def build_definitions(settings: Settings | None = None) -> Definitions:
    settings = settings or Settings.from_env()
    run_config = read_run_config(settings.run_config)
    return Definitions(
        assets=ASSETS,
        jobs=[build_full_pipeline(settings.executor, run_config), cache_inbox, *ASSET_JOBS],
        sensors=SENSORS,
        schedules=SCHEDULES,
        resources=build_resources(settings, run_config),
    )


defs = build_definitions()

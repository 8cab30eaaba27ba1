"""The code location: every asset, job, sensor and resource of the platform.

    dagster dev -w workspace.yaml                       # UI with the asset graph
    dagster job execute -m jobs.definitions -j full_pipeline -c config/demo.yaml   # the whole chain
    dagster job execute -m jobs.definitions -j cache_activations --tags '{"dagster/partition": "KEY"}'

The run config file in ``SAE_PLATFORM_RUN_CONFIG`` (the Makefile: config/demo.yaml) is the
deployment's settings: its ``resources`` section configures the resources of *every* job and asset
(so *Materialize* in the UI, the asset jobs, the sensors and ``full_pipeline`` all run the demo's
settings), and the whole file is ``full_pipeline``'s default run config (the Launchpad opens with it).
"""

from dagster import AssetSelection, Definitions, define_asset_job

from assets import ASSETS, SCHEDULES, SENSORS
from assets.partitions import ACTIVATION_BATCHES, FEATURE_SHARDS, SAE_SWEEP
from jobs.full_pipeline import build_full_pipeline, cache_inbox
from jobs.settings import Settings
from resources import (
    STAGE_SETTINGS,
    AutomationResource,
    BaseModelResource,
    LLMExplainerResource,
    StorageResource,
    TextSourceResource,
    read_run_config,
    stage_resource,
)
from sae_platform.settings import SettingsError

ASSET_JOBS = [
    define_asset_job("prepare_base_model", selection=AssetSelection.assets("base_model"),
                     description="Convert the base model once to safetensors and store it as an artifact."),
    define_asset_job("cache_activations", selection=AssetSelection.assets("activations"),
                     partitions_def=ACTIVATION_BATCHES,
                     description="Cache the hook-layer activations of one batch of text (one partition)."),
    define_asset_job("shuffle_activations", selection=AssetSelection.groups("shuffle"),
                     description="Plan, scatter, finalize and commit the global shuffle of every cached activation "
                                 "partition (one ranged run over the shuffle workers)."),
    define_asset_job("train_saes", selection=AssetSelection.assets("sae_checkpoint", "sae_eval"),
                     partitions_def=SAE_SWEEP,
                     description="Train and evaluate one SAE of the sweep (partition = sweep entry)."),
    define_asset_job("compare_sweep", selection=AssetSelection.assets("sae_comparison"),
                     description="Every evaluated SAE of the sweep side by side on every evaluation figure."),
    define_asset_job("feature_pass_1", selection=AssetSelection.assets("feature_stats_partial"),
                     partitions_def=ACTIVATION_BATCHES,
                     description="Pass 1 of the feature tables for one activation batch (every feature shard)."),
    define_asset_job("feature_pass_2", selection=AssetSelection.assets("feature_topk"), partitions_def=FEATURE_SHARDS,
                     description="Pass 2: merge one feature shard's partials, check against brute force, logit "
                                 "effects."),
    define_asset_job("feature_pass_3", selection=AssetSelection.assets("feature_context_windows"),
                     partitions_def=ACTIVATION_BATCHES,
                     description="Pass 3: context windows of the examples that fall in one activation batch."),
    define_asset_job("feature_regroup", selection=AssetSelection.assets("feature_contexts"),
                     partitions_def=FEATURE_SHARDS, description="Pass 3 regrouped by feature shard."),
    define_asset_job("explain_features", selection=AssetSelection.assets("feature_explanations"),
                     partitions_def=FEATURE_SHARDS, description="N2G explanations of one feature shard, scored on "
                                                                "held-out text; similar and co-occurring features."),
    define_asset_job("explain_with_llm", selection=AssetSelection.assets("feature_llm_explanations"),
                     partitions_def=FEATURE_SHARDS, description="Optional: LLM explanations of a few features of one "
                                                                "shard, scored by detection (balanced accuracy)."),
    define_asset_job("build_browser", selection=AssetSelection.assets("feature_browser"),
                     description="Generate the static feature browser."),
]


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
        "storage": StorageResource(**{"root_url": settings.root_url, "endpoint_url": settings.s3_endpoint_url,
                                      **configured.get("storage", {})}),
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

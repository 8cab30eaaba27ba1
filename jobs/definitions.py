"""The code location: every asset, job, sensor and resource of the platform.

    dagster dev -w workspace.yaml                       # UI with the asset graph
    dagster job execute -m jobs.definitions -j full_pipeline -c config/demo.yaml   # the whole chain
    dagster job execute -m jobs.definitions -j cache_activations --tags '{"dagster/partition": "KEY"}'
"""

from dagster import AssetSelection, Definitions, define_asset_job

from assets import ASSET_CHECKS, ASSETS, SCHEDULES, SENSORS
from assets.partitions import ACTIVATION_BATCHES, FEATURE_JOBS, FEATURE_SHARDS, SAE_SWEEP
from assets.training import train_sae_job
from jobs.full_pipeline import cache_inbox, full_pipeline
from jobs.settings import Settings
from resources import (
    AutomationResource,
    BaseModelResource,
    FeatureTablesResource,
    ShuffleResource,
    StorageResource,
    TextSourceResource,
)

prepare_base_model = define_asset_job(
    "prepare_base_model", selection=AssetSelection.assets("base_model"),
    description="Convert the base model once to safetensors and store it as an artifact.",
)
cache_activations = define_asset_job(
    "cache_activations", selection=AssetSelection.assets("activations"), partitions_def=ACTIVATION_BATCHES,
    description="Cache the hook-layer activations of one batch of text (one partition).",
)
shuffle_activations = define_asset_job(
    "shuffle_activations", selection=AssetSelection.groups("shuffle"),
    description="Plan, scatter, finalize and commit the global shuffle of every cached activation partition.",
)
train_saes = define_asset_job(
    "train_saes", selection=AssetSelection.groups("training"), partitions_def=SAE_SWEEP,
    description="Train and evaluate one SAE of the sweep (partition = sweep entry).",
)
feature_pass_1 = define_asset_job(
    "feature_pass_1", selection=AssetSelection.assets("feature_stats_partial"), partitions_def=FEATURE_JOBS,
    description="Pass 1 of the feature tables for one (activation batch, feature shard).")
feature_pass_2 = define_asset_job(
    "feature_pass_2", selection=AssetSelection.assets("feature_topk"), partitions_def=FEATURE_SHARDS,
    description="Pass 2: merge one feature shard's partials, check against brute force, logit effects.")
feature_pass_3 = define_asset_job(
    "feature_pass_3", selection=AssetSelection.assets("feature_context_windows"), partitions_def=ACTIVATION_BATCHES,
    description="Pass 3: context windows of the examples that fall in one activation batch.")
feature_regroup = define_asset_job(
    "feature_regroup", selection=AssetSelection.assets("feature_contexts"), partitions_def=FEATURE_SHARDS,
    description="Pass 3 regrouped by feature shard.")
build_browser = define_asset_job("build_browser", selection=AssetSelection.assets("feature_browser"),
                                 description="Generate the static feature browser.")
JOBS = [full_pipeline, cache_inbox, prepare_base_model, cache_activations, shuffle_activations, train_saes,
        train_sae_job, feature_pass_1, feature_pass_2, feature_pass_3, feature_regroup, build_browser]


def build_resources(settings: Settings) -> dict:
    return {
        "storage": StorageResource(root_url=settings.root_url, endpoint_url=settings.s3_endpoint_url),
        "language_model": BaseModelResource(),
        "text_source": TextSourceResource(pattern=settings.inbox, endpoint_url=settings.s3_endpoint_url),
        "shuffle": ShuffleResource(),
        "features": FeatureTablesResource(),
        "holdout_text": TextSourceResource(pattern=settings.holdout_pattern, endpoint_url=settings.s3_endpoint_url),
        "automation": AutomationResource(run_config_path=settings.run_config),
    }


def build_definitions(settings: Settings | None = None) -> Definitions:
    return Definitions(
        assets=ASSETS,
        asset_checks=ASSET_CHECKS,
        jobs=JOBS,
        sensors=SENSORS,
        schedules=SCHEDULES,
        resources=build_resources(settings or Settings.from_env()),
    )


defs = build_definitions()

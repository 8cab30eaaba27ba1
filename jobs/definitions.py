"""The code location: every asset, job, sensor and resource of the platform.

    dagster dev -w workspace.yaml                       # UI with the asset graph
    dagster job execute -m jobs.definitions -j cache_activations --tags '{"dagster/partition": "KEY"}'
"""

from dagster import AssetSelection, Definitions, define_asset_job

from assets import ASSET_CHECKS, ASSETS, SENSORS
from assets.partitions import ACTIVATION_BATCHES, SAE_SWEEP
from assets.training import train_sae_job
from jobs.settings import Settings
from resources import BaseModelResource, ShuffleResource, StorageResource, TextSourceResource

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
JOBS = [prepare_base_model, cache_activations, shuffle_activations, train_saes, train_sae_job]


def build_resources(settings: Settings) -> dict:
    return {
        "storage": StorageResource(root_url=settings.root_url, endpoint_url=settings.s3_endpoint_url),
        "language_model": BaseModelResource(),
        "text_source": TextSourceResource(pattern=settings.inbox, endpoint_url=settings.s3_endpoint_url),
        "shuffle": ShuffleResource(),
        "holdout_text": TextSourceResource(pattern=settings.holdout_pattern, endpoint_url=settings.s3_endpoint_url),
    }


def build_definitions(settings: Settings | None = None) -> Definitions:
    return Definitions(
        assets=ASSETS,
        asset_checks=ASSET_CHECKS,
        jobs=JOBS,
        sensors=SENSORS,
        resources=build_resources(settings or Settings.from_env()),
    )


defs = build_definitions()

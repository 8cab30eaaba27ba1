"""Dagster software-defined assets: a map of the pipeline, calling into ``sae_platform``."""

from assets.activations import activations, base_model
from assets.features import FEATURE_ASSETS
from assets.sensors import downstream_freshness_sensor, inbox_sensor, nightly_refresh
from assets.shuffle import SHUFFLE_ASSETS, SHUFFLE_CHECKS
from assets.training import sae_checkpoint, sae_eval

ACTIVATION_ASSETS = [base_model, activations]
TRAINING_ASSETS = [sae_checkpoint, sae_eval]
ASSETS = [*ACTIVATION_ASSETS, *SHUFFLE_ASSETS, *TRAINING_ASSETS, *FEATURE_ASSETS]
ASSET_CHECKS = [*SHUFFLE_CHECKS]
SENSORS = [inbox_sensor, downstream_freshness_sensor]
SCHEDULES = [nightly_refresh]

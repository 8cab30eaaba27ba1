"""Dagster software-defined assets: a map of the pipeline, calling into ``sae_platform``."""

from assets.activations import activations, base_model
from assets.sensors import inbox_sensor
from assets.shuffle import SHUFFLE_ASSETS, SHUFFLE_CHECKS

ACTIVATION_ASSETS = [base_model, activations]
ASSETS = [*ACTIVATION_ASSETS, *SHUFFLE_ASSETS]
ASSET_CHECKS = [*SHUFFLE_CHECKS]
SENSORS = [inbox_sensor]

"""Dagster software-defined assets: a map of the pipeline, calling into ``sae_platform``."""

from assets.activations import activations, base_model
from assets.sensors import inbox_sensor

ACTIVATION_ASSETS = [base_model, activations]
SENSORS = [inbox_sensor]

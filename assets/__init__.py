"""Dagster software-defined assets: a map of the pipeline, calling into ``sae_platform``.

Every stage is declared once (``assets.stage.Stage``) in the module of its group; the assets here
and the steps of ``full_pipeline`` (``jobs/full_pipeline.py``) are both made from those declarations.
"""

import warnings

from dagster import BetaWarning, PreviewWarning

# The beta/preview APIs the graph relies on (multi-dimension partition mappings, pools) would warn
# on every code load and in every step's log; the pipeline's console stays about the pipeline.
warnings.filterwarnings("ignore", category=BetaWarning)
warnings.filterwarnings("ignore", category=PreviewWarning)

from assets import absorption, activations, circuit_tracer, feature_pass_1, features, shuffle, training  # noqa: E402
from assets.backfills import refuse_cross_stage_backfill  # noqa: E402
from assets.sensors import downstream_freshness_sensor, inbox_sensor, nightly_refresh  # noqa: E402
from assets.stage import stage_asset  # noqa: E402

STAGES = {stage.asset: stage for stage in
          [*activations.STAGES, *shuffle.STAGES, *training.STAGES, *absorption.STAGES, *training.SWEEP_STAGES,
           *circuit_tracer.STAGES, *feature_pass_1.STAGES, *features.STAGES]}
GROUPS = {name: stage.group for name, stage in STAGES.items()}
ASSETS = [stage_asset(stage, guard=refuse_cross_stage_backfill(GROUPS)) for stage in STAGES.values()]
SENSORS = [inbox_sensor, downstream_freshness_sensor]
SCHEDULES = [nightly_refresh]
ASSET_BY_NAME = {asset_def.key.to_user_string(): asset_def for asset_def in ASSETS}

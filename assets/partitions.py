"""Partitions of the pipeline, as module constants (one place to see how the data is cut)."""

import os
from pathlib import Path

from dagster import (
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    StaticPartitionsDefinition,
)

from sae_platform.catalog import N_FEATURE_SHARDS, load_reseed_groups, load_sweep

SWEEP_FILE = Path(os.environ.get("SAE_PLATFORM_SWEEP", Path(__file__).resolve().parents[1] / "config" / "sweep.yaml"))

# One partition per batch of text: a file in the text source (inbox). The sensor adds new ones.
ACTIVATION_BATCHES = DynamicPartitionsDefinition(name="activation_batches")

# Workers of each shuffle pass: worker w runs the pass's jobs j with j % N == w.
N_SHUFFLE_WORKERS = 4
SHUFFLE_WORKERS = StaticPartitionsDefinition([str(w) for w in range(N_SHUFFLE_WORKERS)])
# Tags for one run covering every worker (the whole shuffle in one process).
ALL_SHUFFLE_WORKERS_TAGS = {"dagster/asset_partition_range_start": "0",
                            "dagster/asset_partition_range_end": str(N_SHUFFLE_WORKERS - 1)}

# One partition per SAE of the sweep (config/sweep.yaml): sae_checkpoint and sae_eval.
SAE_SWEEP_SPECS: dict[str, dict] = load_sweep(SWEEP_FILE)
SAE_SWEEP = StaticPartitionsDefinition(list(SAE_SWEEP_SPECS))
# Entries with `seeds: S` (catalog.ReseedGroup): entry name -> its member partitions, one per seed.
SAE_RESEED_GROUPS: dict[str, list[str]] = {name: group.members
                                           for name, group in load_reseed_groups(SWEEP_FILE).items()}

# Feature tables: catalog.N_FEATURE_SHARDS shard GROUPS; group fg runs feature shards g, g + N, …
# of the layout planned from resources.features.config.memory_budget_bytes
# (sae_platform.feature_layout), one after the other.
FEATURE_SHARDS = StaticPartitionsDefinition([f"f{i}" for i in range(N_FEATURE_SHARDS)])
# Feature pass 1 is cut by data AND features: one job per (activation batch, shard group), reading
# only the codes of its group's shards, which the batch's one encode (feature_codes, per activation
# batch) committed. Keys are Dagster's "<batch>|<group>" (dimensions in name order).
FEATURE_PASS_1_JOBS = MultiPartitionsDefinition({"batch": ACTIVATION_BATCHES, "group": FEATURE_SHARDS})


def pass_1_job_key(batch: str, group: str) -> str:
    """The FEATURE_PASS_1_JOBS key of (activation batch, shard group ``f<g>``)."""
    return str(MultiPartitionKey({"batch": batch, "group": group}))


def pass_1_job(key: str) -> tuple[str, str]:
    """(activation batch, shard group ``f<g>``) of a FEATURE_PASS_1_JOBS key, as the asset job
    (a MultiPartitionKey) or a full_pipeline step (its string) gives it."""
    dimensions = FEATURE_PASS_1_JOBS.get_partition_key_from_str(str(key)).keys_by_dimension
    return dimensions["batch"], dimensions["group"]

"""The feature-shard layout of one SAE: how its latents are cut into feature shards and which shard
group runs which shard (docs/design.md, "Feature tables, context windows, browser").

One rule for every feature stage and every reader of the tables: ``plan_layout`` sizes the shards
from ``FeatureSettings.memory_budget_bytes`` (``feature_plan.plan_feature_shards``, pure
arithmetic) for the SAE's width and code width and the largest activation batch its tables
describe; ``planned_layout`` reads those from the store. The pipeline's ``catalog.N_FEATURE_SHARDS``
static partitions are shard GROUPS: group g runs shards g, g + N, g + 2N, … one after the other
(``FeatureShardPlan.group_shards``). Pass 2 records the layout with every shard's lineage
(``lineage.recorded_shard_count`` reads it back), so tables of another layout show as stale
(``freshness.FeatureState.shard_behind``) and are never mixed with the current one's.
"""

from sae_platform.catalog import N_FEATURE_SHARDS, SHUFFLED_INDEX, checkpoint_name, shuffled_name, trained_on
from sae_platform.feature_plan import FeatureShardPlan, plan_feature_shards
from sae_platform.features import N_HIST_BINS, FeatureSettings, feature_shard, feature_shards, sparse_variant
from sae_platform.sharded_checkpoint import checkpoint_config
from sae_platform.storage import ArtifactStore


def plan_layout(sae_config: dict, settings: FeatureSettings, batch_tokens: int) -> FeatureShardPlan:
    """The feature-shard layout of one SAE: the fewest shards (a multiple of ``N_FEATURE_SHARDS``)
    whose jobs fit ``settings.memory_budget_bytes``, and what one shard's job holds.

    ``sae_config``: cfg.json's ``"sae"`` (variant, n_latents, d_model, d_out, k); ``batch_tokens``:
    rows of the largest activation batch the tables describe. A TopK-style SAE's jobs hold their
    share of a batch's codes (k per row) and read only their shard's decoder rows (d_out x 4 B per
    latent); a dense variant stores no codes, and its jobs read their shard's encoder rows too
    (``latent_slice``: W_enc's d_model, b_enc and a threshold per latent). Raises FeaturePlanError
    naming ``memory_budget_bytes`` when one latent per shard does not fit."""
    n_latents, d_model = int(sae_config["n_latents"]), int(sae_config["d_model"])
    d_out = int(sae_config.get("d_out") or d_model)
    sparse = sparse_variant(sae_config["variant"])
    weights = {"weight_bytes_per_latent": (d_out if sparse else d_out + d_model + 2) * 4}
    return plan_feature_shards(n_latents, top_k=settings.top_k,
                               reservoir_size=settings.reservoir_factor * settings.top_k, n_hist_bins=N_HIST_BINS,
                               batch_tokens=int(batch_tokens), k=int(sae_config.get("k") or 0) if sparse else 0,
                               memory_budget_bytes=settings.memory_budget_bytes, n_groups=N_FEATURE_SHARDS,
                               interval_examples=settings.n_intervals * settings.per_interval, **weights)


def planned_layout(store: ArtifactStore, settings: FeatureSettings) -> FeatureShardPlan | None:
    """``plan_layout`` of ``settings.sae_name``'s current checkpoint over the largest batch its
    shuffled store pinned; None while the SAE is untrained or that store is gone (no tables to lay
    out yet)."""
    if store.pointer(checkpoint_name(settings.sae_name)) is None:
        return None
    shuffled = store.resolve(shuffled_name(trained_on(store, settings.sae_name)))
    if shuffled is None:
        return None
    inputs = store.read_json(f"{shuffled}/{SHUFFLED_INDEX}")["inputs"]
    config = checkpoint_config(store, settings.sae_name)["sae"]
    return plan_layout(config, settings, max((int(i["n_rows"]) for i in inputs), default=0))


def planned_shards(store: ArtifactStore, settings: FeatureSettings) -> int:
    """How many feature shards the tables of ``settings.sae_name`` must have now (``planned_layout``;
    ``N_FEATURE_SHARDS`` before there is a layout)."""
    plan = planned_layout(store, settings)
    return N_FEATURE_SHARDS if plan is None else plan.n_shards


def shard_range(plan: FeatureShardPlan, index: int) -> tuple[int, int]:
    """The latents [start, stop) of feature shard ``index`` of the layout ``plan``."""
    return feature_shard(plan.n_latents, plan.n_shards, index)


def layout_ranges(plan: FeatureShardPlan) -> list[tuple[int, int]]:
    """Every shard's latents [start, stop), in shard order."""
    return feature_shards(plan.n_latents, plan.n_shards)


def layout_metadata(plan: FeatureShardPlan) -> dict:
    """The layout as a stage's asset page shows it: shards, shards per group, latents per shard,
    planned job bytes and the budget they were sized from."""
    return {"feature_shards": plan.n_shards, "shards_per_group": plan.shards_per_group,
            "latents_per_shard": plan.latents_per_shard, "planned_job_bytes": plan.job_bytes,
            "memory_budget_bytes": plan.memory_budget_bytes}

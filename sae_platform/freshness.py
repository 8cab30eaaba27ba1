"""Is everything downstream of the cached activations up to date? Read from the artifacts' own pins.

Each artifact records what it was built from (the shuffle index pins activation versions, a
checkpoint records the shuffle plan, feature-table lineage and the browser record the checkpoint
version), so staleness is a comparison of pins, not of timestamps: a clock skew, a re-run that
rebuilt the same thing, or a materialization made outside Dagster cannot fool it. The sensor and
the schedule that keep the pipeline up to date both ask this module.
"""

from dataclasses import dataclass

from sae_platform.browser.publish import site_record
from sae_platform.catalog import (
    N_FEATURE_SHARDS,
    SHUFFLED_INDEX,
    browser_dir,
    cached_hook_points,
    checkpoint_name,
    checkpoint_version,
    hook_shuffle_names,
    hook_store_base,
    lineage_record_path,
    list_partitions,
    partition_name,
    pinned_checkpoint,
    shuffled_name,
    trained_on,
)
from sae_platform.storage import ArtifactStore


def cached_versions(store: ArtifactStore) -> dict[str, str]:
    """Committed activation partitions and their versions."""
    return {key: store.pointer(partition_name(key))["version"] for key in list_partitions(store)}


def changed_sources(store: ArtifactStore, stamps: dict[str, str]) -> list[str]:
    """Cached partitions whose text file (``stamps``: key → ``corpus.source_stamp``) was replaced
    since it was cached. Partitions cached before stamps were recorded count as unchanged."""
    changed = []
    for key, stamp in sorted(stamps.items()):
        pointer = store.pointer(partition_name(key))
        if pointer is not None and pointer.get("source_stamp") not in (None, stamp):
            changed.append(key)
    return changed


def stale_reasons(store: ArtifactStore, *, shuffle_name: str, sae_name: str, n_feature_shards: int) -> list[str]:
    """Why the downstream of the cached activations is out of date; empty when it is current (or
    when nothing is cached yet: there is nothing to build from).

    Every hook point's shuffled store (``catalog.hook_shuffle_names``: ``shuffle_name`` for the
    first entry of ``caching.config.hook_points``, ``<shuffle_name>.h<i>`` for entry i) must pin
    the cached versions; one reason per store that does not. The SAE ``sae_name`` must be a
    finished training on the current plan of the store it was trained on (its own hook point's)."""
    cached = cached_versions(store)
    if not cached:
        return []
    names = hook_shuffle_names(store, shuffle_name)
    hooks = cached_hook_points(store)
    reasons, indexes = [], {}
    for i, name in enumerate(names):
        label = f"{name!r}" + (f" ({hooks[i]})" if len(names) > 1 and i < len(hooks) else "")
        shuffled = store.resolve(shuffled_name(name))
        if shuffled is None:
            reasons.append(f"no shuffled store {label} yet ({len(cached)} cached partition(s))")
            continue
        indexes[name] = index = store.read_json(f"{shuffled}/{SHUFFLED_INDEX}")
        pinned = {entry["key"]: entry["version"] for entry in index["inputs"]}
        if pinned != cached:
            reasons.append(_describe_change(pinned, cached, label))
    if reasons:
        return reasons
    checkpoint = store.pointer(checkpoint_name(sae_name))
    if checkpoint is None:
        return [f"SAE {sae_name!r} was never trained"]
    trained = trained_on(store, sae_name)
    index = indexes.get(trained)
    if index is None:
        return [f"SAE {sae_name!r} was trained on shuffled store {trained!r}, which is not one of the cached hook "
                f"points' stores ({', '.join(names)})"]
    if checkpoint.get("data", {}).get("plan_id") != index["plan_id"] or not checkpoint.get("final"):
        return [f"SAE {sae_name!r} is not a finished training on shuffle plan {index['plan_id']} "
                f"(shuffled store {trained!r})"]
    return features_behind(store, sae_name=sae_name, n_feature_shards=n_feature_shards)


@dataclass(frozen=True)
class FeatureState:
    """Which checkpoint of one SAE its feature tables and browser describe (versions as committed;
    None where there is none)."""

    sae_name: str
    checkpoint: str | None          # the SAE's current checkpoint
    shards: tuple[str | None, ...]  # per feature shard f0, f1, …: the checkpoint its tables describe
    browser: str | None             # the checkpoint the feature browser shows

    def behind(self) -> list[str]:
        """Why the tables or the browser do not describe the current checkpoint; empty when they do."""
        if self.checkpoint is None:
            return [f"SAE {self.sae_name!r} was never trained"]
        reasons = []
        for i, recorded in enumerate(self.shards):
            if recorded is None:
                reasons.append(f"feature tables f{i} of {self.sae_name!r} were never built")
            elif recorded != self.checkpoint:
                reasons.append(f"feature tables f{i} of {self.sae_name!r} describe checkpoint {recorded}, not the "
                               f"current {self.checkpoint}")
        if reasons:
            return reasons
        if self.browser is None:
            return [f"the feature browser of {self.sae_name!r} was never built"]
        if self.browser != self.checkpoint:
            return [f"the feature browser of {self.sae_name!r} shows checkpoint {self.browser}, "
                    f"not the current {self.checkpoint}"]
        return []


def feature_state(store: ArtifactStore, sae_name: str, n_feature_shards: int = N_FEATURE_SHARDS) -> FeatureState:
    """What the feature tables (their lineage records) and the browser (its site record) of
    ``sae_name`` pin, beside its current checkpoint."""
    return FeatureState(sae_name, checkpoint_version(store, sae_name),
                        tuple(_recorded_checkpoint(store, lineage_record_path(store, sae_name, i))
                              for i in range(n_feature_shards)),
                        browser_checkpoint(store, sae_name))


def features_behind(store: ArtifactStore, *, sae_name: str, n_feature_shards: int) -> list[str]:
    """Why the feature tables, context windows or browser of ``sae_name`` do not describe its current
    checkpoint; empty when they all do."""
    return feature_state(store, sae_name, n_feature_shards).behind()


def sae_stale_reasons(store: ArtifactStore, sae_name: str, n_feature_shards: int = N_FEATURE_SHARDS) -> list[str]:
    """``stale_reasons`` for a trained SAE, with the shuffle it was trained on as ``shuffle_name``
    (the base name of its hook point's store): what ``sae-platform status`` shows per SAE."""
    return stale_reasons(store, shuffle_name=hook_store_base(trained_on(store, sae_name)), sae_name=sae_name,
                         n_feature_shards=n_feature_shards)


def _describe_change(pinned: dict[str, str], cached: dict[str, str], label: str = "") -> str:
    new = sorted(set(cached) - set(pinned))
    gone = sorted(set(pinned) - set(cached))
    changed = sorted(k for k in set(pinned) & set(cached) if pinned[k] != cached[k])
    parts = [f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
             for label, keys in (("new", new), ("re-cached", changed), ("removed", gone)) if keys]
    store = f"the shuffled store {label}" if label else "the shuffled store"
    return f"{store} is older than the cached activations (" + "; ".join(parts) + ")"


def _recorded_checkpoint(store: ArtifactStore, lineage_path: str) -> str | None:
    if not store.fs.exists(lineage_path):
        return None
    return pinned_checkpoint(store.read_json(lineage_path))


def browser_checkpoint(store: ArtifactStore, sae_name: str) -> str | None:
    """The checkpoint version the feature browser of ``sae_name`` shows (None: no browser)."""
    return pinned_checkpoint(site_record(store, browser_dir(store, sae_name)))

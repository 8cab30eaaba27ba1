"""Where a feature table came from, read back from the artifacts themselves.

Every link is pinned at write time (the shuffle plan pins activation partition versions, a
checkpoint records the shuffle plan id, feature tables record the checkpoint they describe), so
the lineage printed here is what the table was built from, not what happens to be newest now.
"""

from sae_platform import catalog
from sae_platform.errors import StorageError
from sae_platform.storage import ArtifactStore


def feature_table_lineage(store: ArtifactStore, sae_name: str, shard_index: int, run_id: str | None = None,
                          layout: dict | None = None) -> dict:
    """SAE checkpoint → shuffled store → activation partitions → base model, for one feature shard;
    ``layout``: the feature-shard layout the shard was built in (``FeatureShardPlan.describe``),
    recorded as ``feature_layout`` so that every reader of the tables finds the shard count there
    (``recorded_shard_count``) and a changed layout shows as stale tables."""
    tables = store.pointer(catalog.tables_name(sae_name, shard_index))
    if tables is None:
        raise StorageError(f"feature tables of {sae_name!r} shard {shard_index} do not exist",
                           "materialize feature_topk for that shard first")
    checkpoint = store.pointer(catalog.checkpoint_name(sae_name))
    if checkpoint is None:
        raise StorageError(f"the SAE checkpoint {sae_name!r} behind the feature tables is gone",
                           "re-train it (materialize sae_checkpoint) and rebuild the tables")
    data = checkpoint.get("data", {})
    index = _shuffled_index(store, catalog.trained_on(store, sae_name))
    inputs = index.get("inputs", [])
    first = inputs[0] if inputs else None
    attrs = {}
    if first:
        group = store.open_group(catalog.partition_store_path(  # the store of the SAE's own hook point
            store, first["key"], first["version"], catalog.store_group_of(index)), mode="r")
        attrs = dict(group.attrs)
    return {
        **catalog.checkpoint_pin(checkpoint["version"]),
        "feature_table": {"sae": sae_name, "shard": shard_index, "version": tables["version"],
                          "features": [tables.get("start"), tables.get("stop")], "dagster_run_id": run_id},
        "sae_checkpoint": {"name": sae_name, "version": checkpoint["version"], "step": checkpoint.get("step"),
                           "tokens": checkpoint.get("tokens"),
                           "variant": checkpoint.get("settings", {}).get("variant")},
        "shuffle": {"name": data.get("shuffle"), "plan_id": data.get("plan_id"),
                    "current_plan_id": index.get("plan_id"), "n_rows": data.get("n_rows")},
        "activation_partitions": [{"key": i["key"], "version": i["version"], "n_rows": i["n_rows"]} for i in inputs],
        "base_model": {"model": attrs.get("model"), "hook_name": attrs.get("hook_name"),
                       "d_model": attrs.get("d_model"),
                       **({"hook_name_in": attrs["hook_name_in"]} if attrs.get("hook_name_in") else {})},
        **({"feature_layout": dict(layout)} if layout else {}),
    }


def recorded_layout_shards(lineage: dict | None) -> int | None:
    """The shard count a lineage record says its tables were built in; None for no record, or one
    written before layouts were recorded (those were built in the fixed ``catalog.N_FEATURE_SHARDS``
    layout)."""
    shards = ((lineage or {}).get("feature_layout") or {}).get("n_shards")
    return int(shards) if isinstance(shards, int) and shards >= 1 else None


def recorded_shard_count(store: ArtifactStore, sae_name: str) -> int:
    """How many feature shards the stored tables of ``sae_name`` are cut into, as shard 0's lineage
    record says (every layout has a shard 0, built by group 0); ``catalog.N_FEATURE_SHARDS`` when
    no record names one (none built yet, or built before layouts were recorded). Why: readers of
    the tables (``sae-platform status``, ``browse``, ``lineage --shard``) have no feature settings to
    plan with, and must see the layout the tables were built in."""
    path = catalog.lineage_record_path(store, sae_name, 0)
    recorded = recorded_layout_shards(store.read_json(path)) if store.fs.exists(path) else None
    return recorded or catalog.N_FEATURE_SHARDS


def _shuffled_index(store: ArtifactStore, shuffle_name: str | None) -> dict:
    """The committed index of shuffled store ``shuffle_name`` ({} when none is committed)."""
    path = store.resolve(catalog.shuffled_name(shuffle_name)) if shuffle_name else None
    return store.read_json(f"{path}/{catalog.SHUFFLED_INDEX}") if path else {}


def recorded_lineage(store: ArtifactStore, sae_name: str, shard_index: int) -> dict:
    """The lineage recorded with shard ``shard_index``'s tables, else read back from the artifacts."""
    path = catalog.lineage_record_path(store, sae_name, shard_index)
    if store.fs.exists(path):
        return store.read_json(path)
    return feature_table_lineage(store, sae_name, shard_index)


def lineage_with_current_shuffle(store: ArtifactStore, sae_name: str, shard_index: int) -> dict:
    """What ``sae-platform lineage`` prints: the lineage recorded with the shard's tables (what they
    were built from and the Dagster run that built them, all read from the store), with the plan
    the shuffled store holds *now* as ``shuffle.current_plan_id``, so a re-shuffle since shows.
    StorageError when the shard has no tables (and no record)."""
    lineage = recorded_lineage(store, sae_name, shard_index)
    shuffle = lineage.get("shuffle") or {}
    current = _shuffled_index(store, shuffle.get("name")).get("plan_id")
    return {**lineage, "shuffle": {**shuffle, "current_plan_id": current}}


def latent_range(features) -> str:
    """``latents [start, stop)``: a shard's latents in the half-open interval notation the feature
    browser uses (``features`` is the record's ``[start, stop]`` pair)."""
    start, stop = (list(features) + [None, None])[:2] if features else (None, None)
    return f"latents [{'?' if start is None else start}, {'?' if stop is None else stop})"


def format_asset_edges(parents: dict[str, list[str]], root: str) -> str:
    """The asset graph upstream of ``root`` as its edges: one line per asset, ``root`` first then
    breadth-first, each with every asset it reads (``asset ← a, b``; ``(no upstream)`` for a
    source). ``parents``: asset → the assets it reads (its direct upstreams), e.g. from Dagster's
    asset graph; an asset missing from it counts as having none. A DAG, so shared upstreams
    (read by two assets) are listed once, under their own line, not drawn as a chain."""
    order, seen, frontier = [], {root}, [root]
    while frontier:
        asset = frontier.pop(0)
        order.append(asset)
        for parent in sorted(parents.get(asset, ())):
            if parent not in seen:
                seen.add(parent)
                frontier.append(parent)
    width = max(len(a) for a in order)
    return "\n".join(f"  {a:<{width}} ← {', '.join(sorted(parents[a]))}" if parents.get(a)
                     else f"  {a:<{width}}   (no upstream)" for a in order)


def format_lineage(lineage: dict) -> str:
    """The lineage as an indented tree, newest artifact first."""
    t, c, s = lineage["feature_table"], lineage["sae_checkpoint"], lineage["shuffle"]
    stale = ("" if s["plan_id"] == s["current_plan_id"]
             else "  (the shuffled store is no longer stored)" if s["current_plan_id"] is None
             else f"  (the store has since been re-shuffled: {s['current_plan_id']})")
    lines = [
        f"feature tables {t['sae']} shard f{t['shard']} {latent_range(t['features'])}  version {t['version']}"
        + (f"  dagster run {t['dagster_run_id']}" if t.get("dagster_run_id") else ""),
        f"└─ sae_checkpoint {c['name']} ({c['variant']})  version {c['version']}  "
        f"step {c['step']}, {c['tokens']:,} tokens",
        f"   └─ shuffled_activations {s['name']}  plan {s['plan_id']}  {s['n_rows']:,} rows{stale}",
    ]
    parts = lineage["activation_partitions"]
    for i, p in enumerate(parts):
        branch = "└─" if i == len(parts) - 1 else "├─"
        lines.append(f"      {branch} activations/{p['key']}  version {p['version']}  {p['n_rows']:,} rows")
    m = lineage["base_model"]
    hook = catalog.HookEntry.spec_of(m)
    lines.append(f"         base_model {m['model']}  {hook}  d_model {m['d_model']}")
    return "\n".join(lines)

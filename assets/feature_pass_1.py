"""Feature pass 1, sharded over data and features (docs/design.md, "Feature tables"): the encode,
one step per activation batch (``feature_codes``: the batch streamed through the SAE once, its
sparse codes committed split by the planned feature shards), then pass 1 proper, one step per
(activation batch, feature-shard group) (``feature_stats_partial``, partitions
``FEATURE_PASS_1_JOBS``), which reads only the codes of its group's shards and commits each
shard's partial on its own. So the encode runs once per batch, the groups of one batch fan out over
workers, a failed group re-runs alone, and a pass-1 job's memory grows with the latents per shard,
not with ``n_latents``. Pass 2 of group f<g> reads what the jobs (every batch, f<g>) committed
(``MultiToSingleDimensionPartitionMapping``). The helpers every feature stage shares are
``assets.features``'s."""

from dagster import AllPartitionMapping, AssetDep, MetadataValue, MultiToSingleDimensionPartitionMapping

from assets.features import (
    RESOURCES,
    _group,
    _load,
    _settings,
    _stage,
    feature_layout,
    sae_shuffle,
    tables_current,
)
from assets.partitions import ACTIVATION_BATCHES, FEATURE_PASS_1_JOBS, pass_1_job
from assets.stage import AssetJob, StageRun, pointer_version
from sae_platform import catalog
from sae_platform import feature_codes as fc
from sae_platform import features as ft
from sae_platform.feature_layout import layout_metadata, layout_ranges, planned_layout
from sae_platform.feature_plan import FeatureShardPlan
from sae_platform.latent_slice import sliced_partials
from sae_platform.model import pick_device
from sae_platform.partial_store import partial_current
from sae_platform.sharded_checkpoint import checkpoint_config

BY_BATCH = MultiToSingleDimensionPartitionMapping("batch")  # a pass-1 job reads its batch's codes and rows


def _variant(run: StageRun, checkpoint: str) -> str:
    """The described SAE's variant at checkpoint version ``checkpoint``, from its config alone."""
    return checkpoint_config(run.store, _settings(run).sae_name, checkpoint)["sae"]["variant"]


def _no_codes(variant: str) -> str:
    return (f"a {variant} SAE stores no sparse codes: each feature shard's pass 1 encodes only its own latents "
            "(encode_slice)")


def encode_batch(run: StageRun) -> dict:
    """The batch's one encode (docs/design.md, "Feature tables"; ``feature_codes.ensure_codes``):
    stream the activation batch through the SAE once and commit its sparse codes split by the
    planned feature shards, pinning the checkpoint; pass 1 of every shard group, pass 2's interval
    examples and pass 3 read them. For TopK-style SAEs the selection, the expensive part, runs
    once per row whatever the number of feature shards or shard groups."""
    settings, store = _settings(run), run.store
    checkpoint = catalog.checkpoint_version(store, settings.sae_name)  # read before loading (checkpoint_pin)
    plan, batch = feature_layout(run), run.partition_key
    variant = _variant(run, checkpoint)
    if not ft.sparse_variant(variant):  # codes_done skips it; here only when the checkpoint changed meanwhile
        run.log.info(f"encode [{batch}]: {_no_codes(variant)}")
        return {"sae": settings.sae_name, "codes": _no_codes(variant)}
    sae, group = _load(run)
    shards = layout_ranges(plan)
    path, meta = fc.ensure_codes(store, sae, settings.sae_name, batch, shards, checkpoint=checkpoint, group=group)
    stored = fc.codes_bytes(store, path, list(range(plan.n_shards)))
    run.log.info(f"encode [{batch}]: {meta['n_rows']:,} rows of {group} encoded once, {stored / 1e6:.1f} MB of codes "
                 f"split into {plan.n_shards} feature shards")
    return {"sae": settings.sae_name, "store": group, "n_rows": meta["n_rows"], "codes_per_row": meta["k"],
            "codes_bytes": stored, **layout_metadata(plan), "path": MetadataValue.path(store.url(path))}


def codes_done(run: StageRun) -> str | None:
    """The encode of a batch is up to date while its codes were encoded by the current checkpoint
    from the batch's current version in the layout planned now (``feature_codes.pinned_codes``:
    no weights loaded to tell), or while the tables are current; a dense variant has none to store."""
    settings, store = _settings(run), run.store
    plan, checkpoint = planned_layout(store, settings), catalog.checkpoint_version(store, settings.sae_name)
    if plan is None:
        return None  # the body names what is missing
    variant = _variant(run, checkpoint)
    if not ft.sparse_variant(variant):
        return _no_codes(variant)
    if settings.rebuild:
        return None
    if fc.pinned_codes(store, settings.sae_name, run.partition_key, layout_ranges(plan), checkpoint=checkpoint,
                       group=catalog.shuffled_input_group(store, sae_shuffle(run))) is not None:
        return (f"the sparse codes of {run.partition_key} were encoded by the current checkpoint of "
                f"{settings.sae_name} from this version of the batch, in the {plan.n_shards}-shard layout "
                "(resources.features.config.rebuild forces a rebuild)")
    return tables_current(run)


FEATURE_CODES = _stage(
    asset="feature_codes", kinds=frozenset({"pytorch"}),
    job=AssetJob("feature_encode", "Encode one activation batch once: its sparse codes, split by feature shard "
                 "(pass 1's, pass 2's intervals' and pass 3's input)."),
    description="The activation batch encoded once by the SAE: its sparse codes (TopK-style SAEs), split by the "
                "planned feature shards, which pass 1 of each shard group, pass 2's interval examples and pass 3 "
                "read. A dense SAE (ReLU, JumpReLU, BatchTopK) stores none.",
    partitions=ACTIVATION_BATCHES, resources=RESOURCES,
    deps=("activations", AssetDep("sae_checkpoint", partition_mapping=AllPartitionMapping())),
    body=encode_batch, version=pointer_version(lambda run: catalog.codes_name(_settings(run).sae_name,
                                                                              run.partition_key)),
    up_to_date=codes_done)


def _pass_1_shards(run: StageRun, plan: FeatureShardPlan) -> tuple[str, list[int]]:
    """(activation batch, the feature shards of its shard group) of this pass-1 job."""
    batch, shard_group = pass_1_job(run.partition_key)
    return batch, plan.group_shards(_group(shard_group))


def partial_stats(run: StageRun) -> dict:
    """Pass 1 of one (activation batch, feature-shard group): each shard of the group in turn, from
    only that shard's stored codes (``feature_codes.partials_from_codes``: no SAE weights, no other
    shard's codes), each partial committed on its own, so a re-run resumes at the next shard and
    memory grows with the latents per shard, not with ``n_latents``. A dense variant (no codes)
    loads only each shard's latents' encoder weights in turn and encodes them
    (``latent_slice.sliced_partials``). A shard whose partial is already current
    (a crashed run's) is kept. FeatureError when the batch's codes are not stored for the current
    checkpoint and layout (materialize ``feature_codes[batch]`` first)."""
    settings, store = _settings(run), run.store
    checkpoint = catalog.checkpoint_version(store, settings.sae_name)  # read before reading (checkpoint_pin)
    plan = feature_layout(run)
    shards = layout_ranges(plan)
    batch, indices = _pass_1_shards(run, plan)
    group = catalog.shuffled_input_group(store, sae_shuffle(run))
    todo = [i for i in indices
            if settings.rebuild or not partial_current(store, settings.sae_name, batch, i, shards[i], settings)]
    for index in sorted(set(indices) - set(todo)):
        run.log.info(f"pass 1 [{batch}]: shard f{index} {_latents(shards[index])} is current, kept")
    committed, read = [], None
    if todo and ft.sparse_variant(_variant(run, checkpoint)):
        codes = fc.pinned_codes(store, settings.sae_name, batch, shards, checkpoint=checkpoint, group=group)
        if codes is None:
            raise ft.FeatureError(f"the sparse codes of batch {batch!r} are not stored for the current checkpoint of "
                                  f"{settings.sae_name!r} in the {plan.n_shards}-shard layout",
                                  f"materialize feature_codes[{batch}] (the batch's encode) first; full_pipeline "
                                  "encodes every batch before its pass 1")
        read = fc.codes_bytes(store, codes[0], todo)
        committed = list(fc.partials_from_codes(store, settings.sae_name, batch, codes, todo, settings,
                                                checkpoint=checkpoint))
    elif todo:  # a dense SAE stores no codes: each shard is encoded from its own latents' encoder rows alone
        committed = sliced_partials(store, settings.sae_name, batch, shards, settings, todo, checkpoint=checkpoint,
                                    device=pick_device(run.resources.features.device), group=group)
    for summary in committed:
        run.log.info(f"pass 1 [{batch}]: shard f{summary['shard_index']} of {plan.n_shards} "
                     f"{_latents(shards[summary['shard_index']])} committed")
    run.log.info(f"pass 1 [{run.partition_key}]: {len(committed)} of {len(indices)} shard(s) of the group computed"
                 + ("" if read is None else f", {read / 1e6:.1f} MB of their codes read, no SAE weights"))
    return {"sae": settings.sae_name, "store": group, "batch": batch,
            "shards": ", ".join(f"f{i} {_latents(shards[i])}" for i in indices), **layout_metadata(plan),
            **({"n_tokens": committed[0]["n_tokens"]} if committed else {}),
            **({"codes_bytes_read": read} if read is not None else {}),
            "path": MetadataValue.path(store.url(catalog.partials_folder(store, settings.sae_name, batch)))}


def _latents(shard: tuple[int, int]) -> str:
    return f"[{shard[0]:,}, {shard[1]:,})"


def partials_done(run: StageRun) -> str | None:
    """Pass 1 of a (batch, shard group) is up to date while the tables are, or when its shards'
    partials were computed with the current checkpoint from the batch's current version: a kept
    SAE's refresh runs pass 1 of new batches only."""
    settings = _settings(run)
    if settings.rebuild:
        return None
    plan = planned_layout(run.store, settings)
    if plan is not None:
        batch, indices = _pass_1_shards(run, plan)
        shards = layout_ranges(plan)
        if all(partial_current(run.store, settings.sae_name, batch, i, shards[i], settings) for i in indices):
            return (f"the partials of {batch}, shard group {pass_1_job(run.partition_key)[1]}, were computed with "
                    f"the current checkpoint of {settings.sae_name} from this version of the batch "
                    "(resources.features.config.rebuild forces a rebuild)")
    return tables_current(run)


def partials_version(run: StageRun) -> str | None:
    """The committed versions of this job's partials, one per shard of its group (None until all exist)."""
    name = _settings(run).sae_name
    batch, indices = _pass_1_shards(run, feature_layout(run))
    versions = [run.store.pointer(catalog.partial_name(name, batch, i)) for i in indices]
    return None if None in versions else "+".join(v["version"] for v in versions)


FEATURE_STATS_PARTIAL = _stage(
    asset="feature_stats_partial", kinds=frozenset({"pytorch"}),
    job=AssetJob("feature_pass_1", "Pass 1 of the feature tables for one (activation batch, feature-shard group)."),
    description="Pass 1, sharded over data and features: one (activation batch, feature-shard group) job reads only "
                "its shards' codes; per feature the top-K, a uniform random sample, counts, sum, max and a histogram.",
    partitions=FEATURE_PASS_1_JOBS, resources=RESOURCES,
    deps=(AssetDep("feature_codes", partition_mapping=BY_BATCH),
          AssetDep("activations", partition_mapping=BY_BATCH),  # a dense SAE's pass 1 reads the rows
          AssetDep("sae_checkpoint", partition_mapping=AllPartitionMapping())),
    body=partial_stats, version=partials_version, up_to_date=partials_done)

STAGES = [FEATURE_CODES, FEATURE_STATS_PARTIAL]

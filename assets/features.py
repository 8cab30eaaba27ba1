"""Feature tables: the encode (per dataset shard) and pass 1 (dataset shard x feature-shard group), both
in ``assets/feature_pass_1.py`` → pass 2 (per feature-shard group) → pass 3 windows (per dataset
shard) → contexts regrouped per feature-shard group → browser. All describe one SAE checkpoint
(``resources.features.config.sae_name``) over exactly the batches its shuffled store pinned, reading
the rows of the SAE's own hook point (the store inside each activation partition that its shuffled
store was built from: ``catalog.shuffled_input_group``); every one of them is up to date (skipped) while the
tables and the browser describe the current checkpoint.

Feature shards and groups: the latents are cut into ``feature_layout(run).n_shards`` shards, sized by
the planner from ``resources.features.config.memory_budget_bytes`` (``feature_layout.plan_layout``,
one rule for every stage). The feature-shard partitions f0 … f3 are shard GROUPS: group g runs shards
g, g + 4, g + 8, … one after the other, each committed on its own (a crash resumes at the next
shard); with one shard per group (up to ~250k latents at the default 2 GiB budget) shard i is
group i. The layout is recorded with every shard's lineage (``lineage.recorded_shard_count``)."""

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckSeverity,
    AssetDep,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
)

from assets.metadata import table_metadata, table_preview
from assets.partitions import ACTIVATION_BATCHES, FEATURE_SHARDS, SAE_SWEEP_SPECS
from assets.stage import AssetJob, Check, Stage, StageRun, pointer_version
from assets.training import heldout_contexts, settings_for
from sae_platform import catalog, neuronpedia
from sae_platform import contexts as ctx
from sae_platform import feature_codes as fc
from sae_platform import features as ft
from sae_platform import metrics as fm
from sae_platform.activations import activation_attrs, activation_hook_entry, open_partition
from sae_platform.browser.address import BROWSER_URL
from sae_platform.browser.publish import build_site, site_record
from sae_platform.catalog import eval_name, trained_on
from sae_platform.compare import absorption_result, figures_version, saebench_figures
from sae_platform.contexts import shown_examples
from sae_platform.errors import PlatformError
from sae_platform.feature_check import brute_force_check
from sae_platform.feature_layout import layout_metadata, planned_layout, planned_shards, shard_range
from sae_platform.feature_merge import (
    FeatureTables,
    merge_shard_tables,
    merge_stored_shard,
    read_tables,
    write_tables,
)
from sae_platform.feature_plan import FeatureShardPlan
from sae_platform.freshness import browser_figures_behind, feature_state, features_behind, refresh_plan, stale_reasons
from sae_platform.ground_truth import synthetic_heldout_codes
from sae_platform.latent_slice import load_latent_slice, stored_sae
from sae_platform.lineage import feature_table_lineage, recorded_lineage
from sae_platform.llm_explain import llm_explain_shard
from sae_platform.logits import decoder_logit_effects, logit_effect_meaning, unembedding_matrix
from sae_platform.model import pick_device
from sae_platform.sharded_checkpoint import checkpoint_config, decoder_rows
from sae_platform.shuffle import pinned_keys
from sae_platform.synthetic import SyntheticTokenizer, read_truth, synthetic_provenance, token_unembedding
from sae_platform.tables import LLM_EXPLANATION_SCHEMA
from sae_platform.trainer import identity, load_sae

RESOURCES = ("storage", "features", "shuffle")
PREVIEW_FEATURES = 10  # top features by density in feature_topk's metadata table


def _group(key: str) -> int:
    """The shard group of a feature-shard partition key (``f2`` → 2)."""
    return int(key.removeprefix("f"))


def _settings(run: StageRun) -> ft.FeatureSettings:
    return run.resources.features.settings()


def sae_shuffle(run: StageRun) -> str:
    """The shuffled store the described SAE was trained on (``main``, ``main.h1``, …: its hook point)."""
    return trained_on(run.store, _settings(run).sae_name)


def pinned_batches(run: StageRun) -> list[str]:
    """The batches the SAE's shuffled store (so the SAE) was built from. The feature stages describe
    exactly these, even when another batch gets cached meanwhile (the next refresh adds it)."""
    return pinned_keys(run.store, sae_shuffle(run))


def hook_point(attrs: dict) -> str:
    """The hook point as caching.config.hook_points spells it (a transcoder: 'IN -> OUT'), from an
    activation store's attributes (or a lineage's ``base_model``: hook_name, hook_name_in)."""
    return str(catalog.HookEntry.spec_of(attrs))


def feature_layout(run: StageRun) -> FeatureShardPlan:
    """The feature-shard layout every feature stage of this run follows (``planned_layout``).
    PlatformError when the SAE is not trained or its shuffled store is gone."""
    plan = planned_layout(run.store, _settings(run))
    if plan is None:
        name = _settings(run).sae_name
        raise PlatformError(f"SAE {name!r} has no checkpoint on a committed shuffled store to describe",
                            f"materialize sae_checkpoint[{name}] (and shuffled_activations) first")
    return plan


def layout_tables(run: StageRun, plan: FeatureShardPlan, index: int) -> FeatureTables:
    """Shard ``index``'s stored tables, refused (FeatureError naming the shard and the fix) when they
    cover other latents than the layout gives it: tables of two layouts are never mixed."""
    tables = read_tables(run.store, _settings(run).sae_name, index)
    wanted = shard_range(plan, index)
    if (tables.meta["start"], tables.meta["stop"]) != wanted:
        raise ft.FeatureError(f"the feature tables f{index} of {_settings(run).sae_name!r} cover latents "
                              f"[{tables.meta['start']}, {tables.meta['stop']}), not [{wanted[0]}, {wanted[1]}) "
                              f"of the {plan.n_shards}-shard layout planned now", "materialize feature_topk "
                              "(every shard group) with the current resources.features.config")
    return tables


def tables_current(run: StageRun) -> str | None:
    """Every feature stage is up to date while the tables, in the layout planned now, and the browser
    describe the current checkpoint."""
    settings = _settings(run)
    if settings.rebuild:
        return None
    if features_behind(run.store, sae_name=settings.sae_name, n_feature_shards=planned_shards(run.store, settings)):
        return None
    return (f"the feature tables and browser of {settings.sae_name} describe its current checkpoint "
            "(resources.features.config.rebuild forces a rebuild)")


def _synthetic_truth(run: StageRun):
    """The truth of the synthetic activations the described SAE read (``synthetic.Truth``), or
    None when they were cached from a language model."""
    provenance = synthetic_provenance(activation_attrs(run.store, sae_shuffle(run)))
    return None if provenance is None else read_truth(run.store, provenance["truth_id"])


def _tokenizer(run: StageRun):
    """What turns the described SAE's token ids into strings: the language model's tokenizer, or
    ``synthetic.SyntheticTokenizer`` on synthetic activations."""
    truth = _synthetic_truth(run)
    return run.resources.language_model.tokenizer(run.store) if truth is None else SyntheticTokenizer(truth.n_features)


def _load(run: StageRun):
    """The SAE and the store inside each activation partition holding its hook point's rows."""
    sae, _ = load_sae(run.store, _settings(run).sae_name, pick_device(run.resources.features.device))
    return sae, catalog.shuffled_input_group(run.store, sae_shuffle(run))


def _stored(run: StageRun):
    """The SAE of the committed checkpoint without its weights, for a step that reads only its config,
    range and fingerprint (``latent_slice.stored_sae``: the fingerprint of the weights stored now, taken
    64 MiB at a time, so a changed checkpoint still shows). Why: at 2^20 latents x d_model 576 the whole
    SAE is ~4.5 GiB, above a feature job's memory budget. The whole SAE (``load_sae``) only for a
    checkpoint of an earlier version whose tensors are named otherwise."""
    name, device = _settings(run).sae_name, pick_device(run.resources.features.device)
    return stored_sae(run.store, name, device=device) or load_sae(run.store, name, device)[0]


def _stage(**declared) -> Stage:
    return Stage(group="features", **{"up_to_date": tables_current, **declared})


# -- pass 2 ---------------------------------------------------------------------------------------

def merge_shard(run: StageRun) -> dict:
    """Pass 2 of every feature shard of this shard group, one after the other, each committed on its
    own (tables, logit effects, lineage record: ``merge_one_shard``); a shard whose tables already
    describe the current checkpoint, batches and layout (a crashed run's) is kept, so a re-run
    resumes at the next shard. The metadata sums the group's shards."""
    settings, store = _settings(run), run.store
    checkpoint = catalog.checkpoint_version(store, settings.sae_name)  # read before reading it (checkpoint_pin)
    plan = feature_layout(run)
    group = catalog.shuffled_input_group(store, sae_shuffle(run))
    device = pick_device(run.resources.features.device)
    batches = pinned_batches(run)
    truth = _synthetic_truth(run)
    if truth is None:
        hooked, _ = run.resources.language_model.load(store, device=str(device))
        unembedding, tokenizer = unembedding_matrix(hooked.model), hooked.tokenizer
    else:  # no model: the true directions stand in for W_U (synthetic.token_unembedding)
        unembedding, tokenizer = token_unembedding(truth), SyntheticTokenizer(truth.n_features)
    state = feature_state(store, settings.sae_name, plan.n_shards)  # before this run writes: what is current
    summaries = []
    for index in plan.group_shards(_group(run.partition_key)):
        start, stop = shard_range(plan, index)
        if not settings.rebuild and state.shard_behind(index) is None:
            run.log.info(f"pass 2, shard f{index} of {plan.n_shards} [{start:,}, {stop:,}): current, kept")
            tables, path = layout_tables(run, plan, index), store.resolve(catalog.tables_name(settings.sae_name, index))
            lineage = store.read_json(catalog.lineage_record_path(store, settings.sae_name, index))
        else:
            run.log.info(f"pass 2, shard f{index} of {plan.n_shards} [{start:,}, {stop:,}): merging {len(batches)} "
                         "partial(s)")
            tables, path, lineage = merge_one_shard(run, plan, index, batches, checkpoint, device,
                                                    unembedding.to(device), tokenizer)
        summaries.append({"features": f"[{start}, {stop})", "n_tokens": int(tables.meta["n_tokens_total"]),
                          "n_examples": tables.examples.height, "dead": int((tables.stats["count"] == 0).sum()),
                          "path": path, "stats": tables.stats.head(0), "rows": tables.stats.height,
                          "preview": _preview_rows(run, tables, tokenizer, group), "lineage": lineage})
        del tables
    attrs = activation_attrs(store, sae_shuffle(run))
    first = summaries[0]
    return {"sae": settings.sae_name, "hook_point": hook_point(attrs),
            "logit_effects": logit_effect_meaning(attrs.get("hook_name"), attrs.get("hook_name_in")) if truth is None
            else "decoder cosine with the true feature directions (token fN: true feature N)",
            "features": ", ".join(s["features"] for s in summaries), "n_batches": len(batches),
            "n_tokens": first["n_tokens"], "n_examples": sum(s["n_examples"] for s in summaries),
            "never_active_features": sum(s["dead"] for s in summaries),
            "path": MetadataValue.path(store.url(first["path"])),
            **table_metadata(first["stats"]), "dagster/row_count": sum(s["rows"] for s in summaries),
            **layout_metadata(plan),
            "top_features": _preview_table(sorted((row for s in summaries for row in s["preview"]),
                                                  key=lambda row: -row["density"])[:PREVIEW_FEATURES]),
            "lineage": MetadataValue.json(summaries[-1]["lineage"])}


def merge_one_shard(run: StageRun, plan: FeatureShardPlan, index: int, batches: list[str], checkpoint: str, device,
                    unembedding, tokenizer) -> tuple[FeatureTables, str, dict]:
    """Pass 2 of feature shard ``index``: merge the partials of every pinned batch (exact top-K,
    uniform random examples, density, histogram), then the interval examples, sampled from all
    activating tokens of each interval with the merged max (each batch's codes read again); plus
    the logit effects (W_dec · W_U). Reads only what the shard needs: a TopK-style SAE's stored
    codes, a dense one's encoder rows of the shard, and the shard's decoder rows: never the whole SAE
    (``_shard_tables``). Commits the
    tables, the logit effects and then the lineage record (with the layout): (tables, path, lineage)."""
    settings, store = _settings(run), run.store
    start, stop = shard_range(plan, index)
    config = checkpoint_config(store, settings.sae_name, checkpoint)["sae"]
    tables = _shard_tables(run, config["variant"], index, (start, stop), batches, checkpoint, device)
    rows = decoder_rows(store, settings.sae_name, start, stop, version=checkpoint, device=device).float()  # as load_sae
    logits = decoder_logit_effects(rows, unembedding, tokenizer, start)
    path = write_tables(store, settings.sae_name, index, tables)
    with store.writing(catalog.logits_name(settings.sae_name, index)) as version:
        store.write_parquet(f"{version}/{catalog.LOGIT_EFFECTS}", logits)
    lineage = feature_table_lineage(store, settings.sae_name, index, run_id=run.run_id, layout=plan.describe())
    store.write_json(catalog.lineage_record_path(store, settings.sae_name, index), lineage)  # last: marks it done
    return tables, path, lineage


def _shard_tables(run: StageRun, variant: str, index: int, latents: tuple[int, int], batches: list[str],
                  checkpoint: str, device) -> FeatureTables:
    """Pass 2's tables of feature shard ``index`` (``latents``: its [start, stop)): a TopK-style
    SAE's from the shard's stored codes without its weights (``feature_merge.merge_stored_shard``:
    one shard's job memory, not the SAE's); another ``variant`` encodes its rows again for the
    interval examples with the shard's encoder rows alone (``latent_slice.load_latent_slice``, as
    its pass 1; the whole SAE only for a checkpoint that has no such slice)."""
    settings, store = _settings(run), run.store
    if ft.sparse_variant(variant):
        return merge_stored_shard(store, settings.sae_name, index, batches, settings, device, checkpoint)
    sae = load_latent_slice(store, settings.sae_name, *latents, version=checkpoint, device=device) \
        or load_sae(store, settings.sae_name, device, version=checkpoint)[0]
    return merge_shard_tables(store, sae, settings.sae_name, index, batches, settings)


def _preview_rows(run: StageRun, tables: FeatureTables, tokenizer, group: str) -> list[dict]:
    """The shard's densest features, each with its top token and a link into the browser."""
    top = tables.examples.filter((pl.col("kind") == "top") & (pl.col("rank") == 0))
    top_example = {f: (p, r) for f, p, r in zip(top["feature"], top["partition"], top["row"], strict=True)}
    token_ids = {}
    rows = []
    for stat in tables.stats.sort("density", descending=True).head(PREVIEW_FEATURES).iter_rows(named=True):
        feature, token = stat["feature"], ""
        if feature in top_example:
            partition, row = top_example[feature]
            if partition not in token_ids:
                token_ids[partition] = open_partition(run.store, partition, group).group["token_id"]
            token = tokenizer.decode([int(token_ids[partition][row])])
        rows.append({"feature": feature, "density": round(stat["density"], 5), "max_activation": round(stat["max"], 3),
                     "top_token": repr(token), "browser": f"{BROWSER_URL}#/feature/{feature}"})
    return rows


def _preview_table(rows: list[dict]) -> MetadataValue:
    """The densest features as a table on the asset page."""
    return table_preview(rows, {"feature": "int", "density": "float", "max_activation": "float",
                                "top_token": "string", "browser": "string"})


def check_brute_force(run: StageRun) -> dict:
    """The exactness check of every shard of this group (``feature_check.brute_force_check``, witness
    mode): passed when every shard's is. It reads the SAE's config and fingerprint, never its weights
    (``_stored``); the tables' meta names the store they read."""
    settings, sae = _settings(run), _stored(run)
    plan = feature_layout(run)
    checks = []
    for index in plan.group_shards(_group(run.partition_key)):
        start, stop = shard_range(plan, index)
        checks.append(brute_force_check(run.store, sae, settings.sae_name, index, start, stop))
        run.log.info(f"matches_brute_force, shard f{index} [{start:,}, {stop:,}): "
                     + ("passed" if checks[-1]["ok"] else f"{len(checks[-1]['mismatches'])} mismatch(es)"))
    mismatches = [m for check in checks for m in check["mismatches"]]
    checked = [check["features_checked"] for check in checks]
    return {"passed": all(check["ok"] for check in checks),
            "metadata": {"features_checked": str(checked[0] if len(checked) == 1 else checked),
                         "mode": ", ".join(sorted({check["mode"] for check in checks})),
                         "mismatches": str(mismatches[:5])}}


def group_version(name_of):
    """The data version of a shard-group stage whose artifact is one committed name per shard
    (``name_of(sae_name, shard_index)``): its shards' committed versions joined (None until all exist)."""
    def version(run: StageRun) -> str | None:
        plan, name = planned_layout(run.store, _settings(run)), _settings(run).sae_name
        if plan is None:
            return None
        pointers = [run.store.pointer(name_of(name, i)) for i in plan.group_shards(_group(run.partition_key))]
        return None if None in pointers else "+".join(p["version"] for p in pointers)

    return version


FEATURE_TOPK = _stage(
    asset="feature_topk", kinds=frozenset({"parquet"}),
    job=AssetJob("feature_pass_2", "Pass 2: merge one feature shard's partials, check against brute force, logit "
                 "effects."),
    description="Pass 2: merge one feature shard's partials: exact top-K, uniform random and interval examples, "
                "density, histogram, logit effects (W_dec · W_U).",
    partitions=FEATURE_SHARDS, resources=(*RESOURCES, "language_model"),
    # group f<g>'s pass 2 merges what pass 1's jobs (every batch, group f<g>) committed
    deps=(AssetDep("feature_stats_partial", partition_mapping=MultiToSingleDimensionPartitionMapping("group")),),
    body=merge_shard,
    version=group_version(catalog.tables_name),
    checks=(Check("matches_brute_force", "every activating token pass 1 recorded for a fixed random sample of "
                  "features (resources.features.config.check_features per shard), sorted apart: exact; every "
                  "feature: counts, sums and example counts that must agree across the passes",
                  check_brute_force, blocking=True),))


# -- pass 3 ---------------------------------------------------------------------------------------

def context_windows(run: StageRun) -> dict:
    """The windows around every chosen example in this batch, with the feature's activation on each
    token and the decoded token strings; the batch's stored windows are reused for the examples still
    shown when they were built from this checkpoint and batch version (a kept SAE's refresh)."""
    settings = _settings(run)
    checkpoint = catalog.checkpoint_version(run.store, settings.sae_name)  # read before loading (checkpoint_pin)
    plan = feature_layout(run)
    group = catalog.shuffled_input_group(run.store, sae_shuffle(run))
    examples = [shown_examples(layout_tables(run, plan, i).examples, settings.random_examples)
                for i in range(plan.n_shards)]
    tokenizer = _tokenizer(run)  # the weights are not needed here
    run.log.info(f"pass 3 [{run.partition_key}]: context windows of the shown examples that fall in this batch "
                 f"({sum(e.height for e in examples):,} shown examples over all batches)")
    sae, codes = _window_activations(run)
    info = ctx.build_partition_windows(run.store, settings.sae_name, sae, run.partition_key, pl.concat(examples),
                                       tokenizer, before=settings.before, after=settings.after, codes=codes,
                                       group=group, checkpoint=checkpoint)
    run.log.info(f"pass 3 [{run.partition_key}]: {info['n_reused']:,} windows reused, {info['n_computed']:,} "
                 "computed" + (f" (rebuilt: {info['rebuilt_because']})" if info["rebuilt_because"] else ""))
    return {"n_windows": info["n_windows"], "n_features": info["n_features"], "dagster/row_count": info["n_windows"],
            "n_reused": info["n_reused"], "n_computed": info["n_computed"],
            **({"rebuilt_because": info["rebuilt_because"]} if info["rebuilt_because"] else {}),
            "path": MetadataValue.path(info["path"])}


def _window_activations(run: StageRun):
    """(SAE, this batch's codes or None) for pass 3. A TopK-style SAE's window activations are looked
    up in the codes pass 1 stored for this batch and these weights (``feature_codes.read_codes``, found
    by the fingerprint): no weight is read, so the SAE is the weightless one (``_stored``). A dense SAE
    (no codes), or one whose codes are gone, encodes the window rows of every shard's features: the
    whole SAE (``load_sae``)."""
    settings = _settings(run)
    variant = checkpoint_config(run.store, settings.sae_name)["sae"]["variant"]
    if ft.sparse_variant(variant):
        sae = _stored(run)
        codes = fc.read_codes(run.store, settings.sae_name, run.partition_key, sae)  # pass 1's: no encode again
        if codes is not None or not isinstance(sae, ft.StoredSAE):
            return sae, codes
    return _load(run)[0], None


FEATURE_CONTEXT_WINDOWS = _stage(
    asset="feature_context_windows", kinds=frozenset({"parquet"}),
    job=AssetJob("feature_pass_3", "Pass 3: context windows of the examples that fall in one activation batch."),
    description="Pass 3, sharded over the dataset: the context windows of the chosen examples in one batch.",
    partitions=ACTIVATION_BATCHES, resources=(*RESOURCES, "language_model"),
    deps=(AssetDep("feature_topk", partition_mapping=AllPartitionMapping()), "activations", "feature_codes"),
    body=context_windows,
    version=pointer_version(lambda run: catalog.contexts_partial_name(_settings(run).sae_name, run.partition_key)))


def regroup_contexts(run: StageRun) -> dict:
    """The context windows of each feature shard of this group, sorted by feature, one shard after
    the other, each committed on its own."""
    settings, plan = _settings(run), feature_layout(run)
    batches, written = pinned_batches(run), []
    for index in plan.group_shards(_group(run.partition_key)):
        start, stop = shard_range(plan, index)
        frame = ctx.regroup_by_feature(run.store, settings.sae_name, batches, start, stop)
        info = ctx.write_feature_contexts(run.store, settings.sae_name, index, frame)
        run.log.info(f"regroup, shard f{index} of {plan.n_shards} [{start:,}, {stop:,}): {frame.height:,} windows "
                     "committed")
        written.append({"features": f"[{start}, {stop})", "n_windows": frame.height, "schema": frame.head(0),
                        "path": info["path"]})
        del frame
    n_windows = sum(w["n_windows"] for w in written)
    return {"features": ", ".join(w["features"] for w in written), "n_windows": n_windows,
            **table_metadata(written[0]["schema"]), "dagster/row_count": n_windows,
            "path": MetadataValue.path(written[0]["path"])}


FEATURE_CONTEXTS = _stage(
    asset="feature_contexts", kinds=frozenset({"parquet"}),
    job=AssetJob("feature_regroup", "Pass 3 regrouped by feature shard."),
    description="Pass 3, regrouped: the context windows of one feature shard's examples, sorted by feature.",
    partitions=FEATURE_SHARDS, resources=RESOURCES,
    deps=(AssetDep("feature_context_windows", partition_mapping=AllPartitionMapping()),),
    body=regroup_contexts,
    version=group_version(catalog.contexts_name))


# -- explanations ---------------------------------------------------------------------------------

def explanations_current(run: StageRun) -> str | None:
    """Up to date while the explanations of every shard of this group describe the current
    checkpoint and the shard's current context windows (``metrics.explanations_current``)."""
    settings = _settings(run)
    plan = planned_layout(run.store, settings)
    shards = [] if plan is None else plan.group_shards(_group(run.partition_key))
    if settings.rebuild or not shards or not all(fm.explanations_current(run.store, settings.sae_name, i)
                                                 for i in shards):
        return None
    return (f"the explanations of {settings.sae_name} [{run.partition_key}] describe its current checkpoint "
            "(resources.features.config.rebuild forces a rebuild)")


def heldout_codes(run: StageRun, what: str, sae=None):
    """(held-out codes of the configured SAE, its tokenizer): the codes sae_eval stored for this very
    checkpoint when there are some (no base model, no SAE weights needed), else encoded here from the
    held-out text. ``sae``: the loaded SAE; None loads it (``_load``) only when the codes are encoded
    here."""
    settings, store = _settings(run), run.store
    truth = _synthetic_truth(run)
    if truth is not None:  # no held-out text: fresh contexts of the same generator
        sae = _load(run)[0] if sae is None else sae
        codes = synthetic_heldout_codes(sae, truth, run.resources.evaluation.settings().ctx_len)
        run.log.info(f"{what}: {len(codes.tokens)} fresh synthetic contexts")
        return codes, SyntheticTokenizer(truth.n_features)
    codes = fm.read_heldout_codes(store, settings.sae_name)
    if codes is not None:
        run.log.info(f"{what}: the {len(codes.tokens)} held-out contexts sae_eval encoded with this checkpoint")
        return codes, run.resources.language_model.tokenizer(store)
    evaluation = run.resources.evaluation.settings()
    sae = _load(run)[0] if sae is None else sae
    hooked, _ = run.resources.language_model.load(store, device=str(next(sae.parameters()).device))
    tokens = heldout_contexts(run.resources.holdout_text, hooked, evaluation.ctx_len,
                              max(evaluation.metric_contexts, 2), run.log, setting_name="metric_contexts", what=what)
    run.log.info(f"{what}: {len(tokens)} held-out contexts encoded here (sae_eval stored none for this checkpoint)")
    return fm.sae_heldout_codes(hooked, sae, store, settings.sae_name, tokens), hooked.tokenizer


def explain_shard(run: StageRun) -> dict:
    """N2G explanations of the features of each shard of this group from their top and interval
    windows, scored on held-out text; nearest features by decoder cosine; co-occurring features. One
    shard after the other, each committed on its own."""
    settings, (sae, _), store = _settings(run), _load(run), run.store
    plan = feature_layout(run)
    codes, tokenizer = heldout_codes(run, "the explanation scores", sae)
    summaries, best, paths, schema = [], [], [], None
    for index in plan.group_shards(_group(run.partition_key)):
        start, stop = shard_range(plan, index)
        run.log.info(f"explaining shard f{index} of {plan.n_shards}, features [{start:,}, {stop:,}), from their "
                     f"windows, scored on {len(codes.tokens)} held-out contexts")
        summary, frame = fm.explain_shard(store, settings.sae_name, sae, tokenizer, codes, index, start, stop,
                                          ctx.read_feature_contexts(store, settings.sae_name, index))
        summaries.append(summary)
        best.append(frame.filter(pl.col("n_firings") >= 3).with_columns(
            f1=2 * pl.col("precision") * pl.col("recall") / (pl.col("precision") + pl.col("recall")))
            .sort(["f1", "n_firings"], descending=True, nulls_last=True).head(PREVIEW_FEATURES))
        paths.append(store.resolve(catalog.explanations_name(settings.sae_name, index)))
        schema = frame.head(0)
    top = pl.concat(best).sort(["f1", "n_firings"], descending=True, nulls_last=True).head(PREVIEW_FEATURES)
    rows = [{"feature": r["feature"], "explanation": r["explanation"][:120], "precision": round(r["precision"] or 0, 3),
             "recall": round(r["recall"] or 0, 3), "browser": f"{BROWSER_URL}#/feature/{r['feature']}"}
            for r in top.iter_rows(named=True)]
    ranges = [shard_range(plan, i) for i in plan.group_shards(_group(run.partition_key))]
    return {"sae": settings.sae_name, "features": ", ".join(f"[{a}, {b})" for a, b in ranges),
            "heldout_contexts": len(codes.tokens),
            **{k: v for k, v in _group_summary(summaries).items() if v is not None}, **table_metadata(schema),
            "dagster/row_count": sum(b - a for a, b in ranges),
            "best_explained": table_preview(rows, {"feature": "int", "explanation": "string", "precision": "float",
                                                   "recall": "float", "browser": "string"}),
            "path": MetadataValue.path(store.url(paths[0]))}


def _group_summary(summaries: list[dict]) -> dict:
    """One shard's N2G summary as it is; several shards': the means weighted by the features each
    scored (medians do not combine, so they are left out)."""
    if len(summaries) == 1:
        return summaries[0]
    scored = sum(s["n2g_features_scored"] for s in summaries)

    def mean(key: str) -> float | None:
        parts = [(s[key], s["n2g_features_scored"]) for s in summaries if s[key] is not None]
        weight = sum(w for _, w in parts)
        return sum(v * w for v, w in parts) / weight if weight else None

    return {**{key: mean(key) for key in ("n2g_precision", "n2g_recall", "n2g_f1")}, "n2g_features_scored": scored}


FEATURE_EXPLANATIONS = Stage(
    asset="feature_explanations", group="features", kinds=frozenset({"parquet"}),
    job=AssetJob("explain_features", "N2G explanations of one feature shard, scored on held-out text; similar and "
                 "co-occurring features."),
    description="N2G explanations (Gao et al. 2024, section 4.4) of one feature shard from its top and interval "
                "windows, scored by precision and recall on held-out text; nearest features by decoder cosine; "
                "co-occurring features.",
    partitions=FEATURE_SHARDS, resources=(*RESOURCES, "language_model", "holdout_text", "evaluation"),
    deps=("feature_contexts",), up_to_date=explanations_current, body=explain_shard,
    version=group_version(catalog.explanations_name))


def explain_with_llm_step(run: StageRun) -> dict:
    """LLM explanations of the most active latents of each shard of this group (one shard after the
    other, each committed on its own), scored by detection on held-out text. The budget is per
    feature shard, as ``features_per_shard`` says: a group of n shards asks for up to n times it
    (``n_requested``). A feature whose answer
    was unusable is stored with its error and counted in ``n_failed``; an endpoint that cannot serve
    fails this asset only (no stage depends on it: ``Stage.optional``)."""
    settings, store = _settings(run), run.store
    plan = feature_layout(run)
    llm = run.resources.llm_explainer
    codes, tokenizer = heldout_codes(run, "the LLM explanation scores")  # the SAE's weights: only to encode them
    frames, paths, shards = [], [], plan.group_shards(_group(run.partition_key))
    for index in shards:
        start, stop = shard_range(plan, index)
        run.log.info(f"LLM explanations of up to {llm.features_per_shard} features of shard f{index} "
                     f"[{start:,}, {stop:,}) by {llm.describe()}")
        rows = llm_explain_shard(llm.backend(store), ctx.read_feature_contexts(store, settings.sae_name, index),
                                 codes, tokenizer, start, stop,
                                 n_features=llm.features_per_shard, n_examples=llm.examples)
        frames.append(pl.DataFrame(rows, schema=LLM_EXPLANATION_SCHEMA))
        name = catalog.llm_explanations_name(settings.sae_name, index)
        with store.writing(name, explainer=llm.describe()) as version:
            store.write_parquet(f"{version}/{catalog.LLM_EXPLANATIONS_FILE}", frames[-1])
        paths.append(store.resolve(name))
    frame = pl.concat(frames)
    explained, failed = frame.filter(pl.col("error").is_null()), frame.filter(pl.col("error").is_not_null())
    for row in failed.iter_rows(named=True):
        run.log.warning(f"feature {row['feature']}: no LLM explanation: {row['error']}")
    preview = [{"feature": r["feature"], "explanation": r["explanation"][:120],
                "balanced_accuracy": round(r["balanced_accuracy"], 3)} for r in explained.iter_rows(named=True)]
    return {"explainer": llm.describe(), "features_per_shard": llm.features_per_shard, "feature_shards": len(shards),
            "n_requested": llm.features_per_shard * len(shards),
            "n_explained": explained.height, "n_failed": failed.height,
            **({"balanced_accuracy": float(explained["balanced_accuracy"].mean())} if explained.height else {}),
            "explanations": table_preview(preview, {"feature": "int", "explanation": "string",
                                                    "balanced_accuracy": "float"}),
            **({"failures": table_preview(failed.select("feature", "error").to_dicts(),
                                          {"feature": "int", "error": "string"})} if failed.height else {}),
            "path": MetadataValue.path(store.url(paths[0]))}


def llm_version(run: StageRun) -> str | None:
    """The stored explanations' version; "off" while none were ever written and the stage is off (a
    stable data version for a skipped optional stage, so re-runs change nothing)."""
    stored = group_version(catalog.llm_explanations_name)(run)
    return stored or (None if run.resources.llm_explainer.enabled else "off")


def llm_disabled(run: StageRun) -> str | None:
    if run.resources.llm_explainer.enabled:
        return None
    return "LLM explanations are off (resources.llm_explainer.config.enabled: true turns them on)"


FEATURE_LLM_EXPLANATIONS = Stage(
    asset="feature_llm_explanations", group="features", kinds=frozenset({"parquet"}),
    job=AssetJob("explain_with_llm", "Optional: LLM explanations of a few features of one shard, scored by detection "
                 "(balanced accuracy)."),
    description="Optional: LLM explanations of a few latents of one feature shard (an OpenAI-compatible endpoint, "
                "or the embedded SmolLM2-135M-Instruct offline), scored by detection: balanced accuracy on held-out "
                "activating and non-activating text (delphi).",
    partitions=FEATURE_SHARDS, resources=(*RESOURCES, "language_model", "holdout_text", "evaluation", "llm_explainer"),
    deps=("feature_contexts",), body=explain_with_llm_step, up_to_date=llm_disabled, version=llm_version,
    optional=True)


# -- browser --------------------------------------------------------------------------------------

def write_browser(run: StageRun) -> dict:
    """A static feature browser: index with search, a page per feature. Serve it with `make browse`.
    The shards' tables are read one shard at a time, as the writer reaches each (``browser_shard``)."""
    settings, store = _settings(run), run.store
    plan = feature_layout(run)
    shards = [browser_shard(run, plan, index) for index in range(plan.n_shards)]
    # site-wide: what every shard shares (checkpoint, shuffle, partitions, model) and the browser's run
    lineage = {k: v for k, v in recorded_lineage(store, settings.sae_name, 0).items() if k != "feature_table"}
    lineage["browser_dagster_run_id"] = run.run_id
    hook = hook_point(lineage.get("base_model") or {})  # read from the SAE's own hook-point store (lineage.py)
    out = catalog.browser_dir(store, settings.sae_name)
    evaluated = store.resolve(eval_name(settings.sae_name))  # the overview page's figures, when evaluated
    evaluation = ({**store.read_json(f"{evaluated}/{catalog.EVAL_REPORT}"),
                   **saebench_figures(store, settings.sae_name)} if evaluated else None)
    summary = build_site(out if store.is_local else store.url(out), sae_name=settings.sae_name, shards=shards,
                         hist_bin_edges=ft.hist_bin_edges(), lineage=lineage, n_intervals=settings.n_intervals,
                         fs=None if store.is_local else store.fs, evaluation=evaluation, hook_point=hook,
                         absorption=absorption_result(store, settings.sae_name),
                         figures_version=figures_version(store, [settings.sae_name]))
    run.log.info(f"{summary['n_features']:,} features, {summary['bytes'] / 1e6:.1f} MB in {summary['seconds']} s; "
                 f"{summary['shards_written']} shard(s) written, {summary['shards_kept']} kept")
    return {
        "hook_point": hook, "n_features": summary["n_features"], "bytes": summary["bytes"],
        "files": summary["files"], "shards_written": summary["shards_written"], "shards_kept": summary["shards_kept"],
        "summary_bytes": summary["summary_bytes"],
        "seconds": summary["seconds"], "path": MetadataValue.path(store.url(out)),
        "url": MetadataValue.url(BROWSER_URL), "serve_with": "make browse  (or: sae-platform browse)",
    }


def browser_shard(run: StageRun, plan: FeatureShardPlan, index: int) -> dict:
    """Feature shard ``index`` as the site writer takes it: its range now, its tables (stats, shown
    examples, windows, logit effects, explanations) and lineage read only when the writer reaches
    it (``load``), so the browser stage holds one shard's tables at a time."""
    settings, store = _settings(run), run.store
    start, stop = shard_range(plan, index)

    def load() -> dict:
        tables = layout_tables(run, plan, index)
        logits_path = store.require(catalog.logits_name(settings.sae_name, index), "logit effects",
                                    "materialize feature_topk")
        return {"feature_stats": tables.stats,
                "feature_examples": shown_examples(tables.examples, settings.random_examples),
                "feature_contexts": ctx.read_feature_contexts(store, settings.sae_name, index),
                "logit_effects": store.read_parquet(f"{logits_path}/{catalog.LOGIT_EFFECTS}"),
                "explanations": fm.read_explanations(store, settings.sae_name, index),
                "lineage": recorded_lineage(store, settings.sae_name, index)}  # each page: its shard's

    return {"start": start, "stop": stop, "load": load}


def browser_current(run: StageRun) -> str | None:
    """The browser is up to date while the feature tables describe the current checkpoint
    (``tables_current``) and its overview shows the SAE's current figures: an evaluation, sparse
    probing or absorption committed after the site was built makes it stale
    (``freshness.browser_figures_behind``, the rule `sae-platform status` shows too)."""
    tables = tables_current(run)
    if tables is None:
        return None
    if browser_figures_behind(run.store, _settings(run).sae_name):
        return None
    return f"{tables}, and its overview shows the current evaluation, sparse probing and absorption"


def browser_version(run: StageRun) -> str | None:
    """The published site's build version (a refresh that adds batches to a kept SAE's tables builds a
    new one); None before the first build."""
    return (site_record(run.store, catalog.browser_dir(run.store, _settings(run).sae_name)) or {}).get("version")


def described_chain(store, resources) -> dict:
    """The chain the feature tables describe, as the deployment's resources configure it: the
    shuffled store (``resources.shuffle``), the SAE (``resources.features``), its feature-shard
    layout (``planned_shards``) and its refresh policy (``retrain_above_fraction`` of its sweep
    entry): the arguments of ``freshness.stale_reasons`` and ``freshness.refresh_plan``."""
    settings = resources.features.settings()
    return {"shuffle_name": resources.shuffle.settings().name, "sae_name": settings.sae_name,
            "n_feature_shards": planned_shards(store, settings),
            "retrain_above_fraction": _described_training(resources).retrain_above_fraction}


def _described_training(resources):
    """The training settings of the described SAE: its sweep entry's; an SAE from outside the sweep
    (a vector's dictionary) the shared ones."""
    sae_name = resources.features.settings().sae_name
    return settings_for(sae_name, resources.training) if sae_name in SAE_SWEEP_SPECS \
        else resources.training.settings()


def planned_refresh(store, resources) -> str:
    """``freshness.refresh_plan`` of the described chain, told the current training settings so it
    says whether the SAE resumes or trains from scratch (the trainer's own rule)."""
    return refresh_plan(store, **described_chain(store, resources),
                        training=identity(_described_training(resources)))


def chain_behind(store, resources) -> list[str]:
    """Why the chain downstream of the cached activations does not describe every cached batch:
    ``freshness.stale_reasons``, the one rule. The freshness sensor launches a refresh on it and the
    browser's check shows it."""
    return stale_reasons(store, **described_chain(store, resources))


def freshness_verdict(reasons: list[str]) -> dict:
    """The ``describes_every_cached_batch`` verdict for ``chain_behind``'s reasons: a warning (the
    browser still works, it is only behind the data) naming each reason."""
    return {"passed": not reasons, "severity": AssetCheckSeverity.WARN,
            "metadata": {"behind": "\n".join(reasons) if reasons else "nothing: every cached batch is described",
                         "n_reasons": len(reasons)}}


def check_describes_every_cached_batch(run: StageRun) -> dict:
    return freshness_verdict(chain_behind(run.store, run.resources))


DESCRIBES_EVERY_CACHED_BATCH = Check(
    "describes_every_cached_batch",
    "Warns while the chain is behind the data: a batch cached (or re-cached) but not yet in the shuffled store, "
    "the SAE, the feature tables or this browser (sae_platform.freshness.stale_reasons, the rule the freshness "
    "sensor refreshes on). The sensor re-reports it at every tick where the answer changes, so it turns to a "
    "warning when a batch is cached, without a run.",
    check_describes_every_cached_batch, recheck_when_skipped=True)

FEATURE_BROWSER = _stage(
    asset="feature_browser", kinds=frozenset({"html"}),
    job=AssetJob("build_browser", "Generate the static feature browser."),
    description="A static feature browser: index with search, a page per feature (highlighted examples, "
                "histogram, logit effects, lineage). Serve it with `make browse`.",
    resources=("storage", "features", "shuffle", "training"),  # training: the refresh policy of its check
    deps=(AssetDep("feature_topk", partition_mapping=AllPartitionMapping()),
          AssetDep("feature_contexts", partition_mapping=AllPartitionMapping()),
          AssetDep("feature_explanations", partition_mapping=AllPartitionMapping()),
          *(AssetDep(shown, partition_mapping=AllPartitionMapping())  # the overview's figures
            for shown in ("sae_eval", "sae_sparse_probing", "sae_absorption"))),
    up_to_date=browser_current, body=write_browser, version=browser_version, checks=(DESCRIBES_EVERY_CACHED_BATCH,))


# -- Neuronpedia export ---------------------------------------------------------------------------

def export_to_neuronpedia(run: StageRun) -> dict:
    """Every feature of the SAE in Neuronpedia's import layout, with its SAELens weights
    (sae_platform.neuronpedia): one committed folder to import or upload."""
    settings, store = _settings(run), run.store
    shuffle = sae_shuffle(run)
    attrs, entry = activation_attrs(store, shuffle), activation_hook_entry(store, shuffle)
    result = neuronpedia.export_sae(store, settings.sae_name, feature_layout(run).n_shards, attrs=attrs, entry=entry,
                                    log=run.log.info)
    run.log.info(f"Neuronpedia export of {settings.sae_name}: {result['features']:,} features, "
                 f"{result['activations']:,} example windows, {result['explanations']:,} explanations, "
                 f"{result['bytes'] / 1e6:.1f} MB in {result['seconds']} s")
    return {"source": result["source"], "features": result["features"], "activations": result["activations"],
            "explanations": result["explanations"], "batches": result["batches"], "bytes": result["bytes"],
            "seconds": result["seconds"],
            "saelens_weights": result["saelens_weights"], "path": MetadataValue.path(store.url(result["path"]))}


def neuronpedia_current(run: StageRun) -> str | None:
    settings = _settings(run)
    if settings.rebuild or not neuronpedia.export_current(run.store, settings.sae_name,
                                                          planned_shards(run.store, settings)):
        return None
    return (f"the Neuronpedia export of {settings.sae_name} was written from the tables, windows and explanations "
            "stored now (resources.features.config.rebuild forces a rebuild)")


NEURONPEDIA_EXPORT = Stage(
    asset="neuronpedia_export", group="features", kinds=frozenset({"json"}),
    job=AssetJob("export_neuronpedia", "Write one SAE's features in Neuronpedia's import layout."),
    description="The SAE's features in Neuronpedia's import layout (model, source, source set and release records; "
                "features, example windows and explanations in batch-<n>.jsonl.gz) with its SAELens weights, every "
                "record checked against Neuronpedia's record definitions.",
    resources=("storage", "features", "shuffle"),
    deps=(AssetDep("feature_topk", partition_mapping=AllPartitionMapping()),
          AssetDep("feature_contexts", partition_mapping=AllPartitionMapping()),
          AssetDep("feature_explanations", partition_mapping=AllPartitionMapping())),
    body=export_to_neuronpedia, up_to_date=neuronpedia_current, optional=True,
    version=pointer_version(lambda run: catalog.neuronpedia_name(_settings(run).sae_name)))

STAGES = [FEATURE_TOPK, FEATURE_CONTEXT_WINDOWS, FEATURE_CONTEXTS, FEATURE_EXPLANATIONS,
          FEATURE_LLM_EXPLANATIONS, FEATURE_BROWSER, NEURONPEDIA_EXPORT]

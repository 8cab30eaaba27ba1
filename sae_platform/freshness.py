"""Is everything downstream of the cached activations up to date? Read from the artifacts' own pins.

Each artifact records what it was built from (the shuffle index pins activation versions, a
checkpoint records the shuffle plan, feature-table lineage and the browser record the checkpoint
version), so staleness is a comparison of pins, not of timestamps: a clock skew, a re-run that
rebuilt the same thing, or a materialization made outside Dagster cannot fool it. The sensor and
the schedule that keep the pipeline up to date both ask this module.
"""

from dataclasses import dataclass

from sae_platform.activations import open_partition
from sae_platform.browser.publish import site_record
from sae_platform.catalog import (
    N_FEATURE_SHARDS,
    SHUFFLED_INDEX,
    browser_dir,
    cached_hook_points,
    checkpoint_name,
    checkpoint_version,
    described_batches,
    hook_shuffle_names,
    hook_store_base,
    lineage_record_path,
    list_partitions,
    partial_name,
    partition_name,
    pinned_checkpoint,
    shown_shards,
    shuffled_name,
    stage_records,
    trained_on,
)
from sae_platform.compare import figures_version
from sae_platform.lineage import recorded_layout_shards, recorded_shard_count
from sae_platform.refresh import RETRAIN_ABOVE_FRACTION, Continuation, continuation, kept_unseen
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


def stale_reasons(store: ArtifactStore, *, shuffle_name: str, sae_name: str, n_feature_shards: int | None,
                  retrain_above_fraction: float = RETRAIN_ABOVE_FRACTION) -> list[str]:
    """Why the downstream of the cached activations is out of date; empty when it is current (or
    when nothing is cached yet: there is nothing to build from).

    Every hook point's shuffled store (``catalog.hook_shuffle_names``: ``shuffle_name`` for the
    first entry of ``caching.config.hook_points``, ``<shuffle_name>.h<i>`` for entry i) must pin
    the cached versions; one reason per store that does not. The SAE ``sae_name`` must be a
    finished training on the current plan of the store it was trained on (its own hook point's),
    or one the refresh policy keeps on it (``sae_platform.refresh``: only new batches, holding less
    than ``retrain_above_fraction`` of its training tokens); its feature tables and browser must
    then describe every batch of that store."""
    return chain_state(store, shuffle_name=shuffle_name, sae_name=sae_name, n_feature_shards=n_feature_shards,
                       retrain_above_fraction=retrain_above_fraction).behind()


@dataclass(frozen=True)
class ChainState:
    """Where the chain downstream of the cached activations stands, per link: ``upstream`` (why the
    shuffled stores or the SAE are behind the cached batches), then the feature tables and the
    browser (``FeatureState``, None when upstream is behind: they are judged only against a current
    SAE). One rule for every reader: ``stale_reasons`` is ``behind()``, and `sae-platform status`
    prints ``tables_behind()`` and ``browser_behind()``, so its lines cannot contradict it."""

    upstream: list[str]
    features: "FeatureState | None" = None

    def tables_behind(self) -> list[str]:
        """Why the feature tables do not describe every cached batch (the upstream reasons first)."""
        return self.upstream or (self.features.tables_behind() if self.features else [])

    def browser_behind(self) -> list[str]:
        """Why the browser does not describe every cached batch: whatever keeps the tables behind, or its own."""
        return self.tables_behind() or (self.features.browser_behind() if self.features else [])

    def behind(self) -> list[str]:
        return self.browser_behind()


def chain_state(store: ArtifactStore, *, shuffle_name: str, sae_name: str, n_feature_shards: int | None,
                retrain_above_fraction: float = RETRAIN_ABOVE_FRACTION) -> ChainState:
    """The ``ChainState`` of ``sae_name``'s chain (the arguments of ``stale_reasons``)."""
    cached = cached_versions(store)
    if not cached:
        return ChainState([])
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
        return ChainState(reasons)
    checkpoint = store.pointer(checkpoint_name(sae_name))
    if checkpoint is None:
        return ChainState([f"SAE {sae_name!r} was never trained"])
    trained = trained_on(store, sae_name)
    index = indexes.get(trained)
    if index is None:
        return ChainState([f"SAE {sae_name!r} was trained on shuffled store {trained!r}, which is not one of the "
                           f"cached hook points' stores ({', '.join(names)})"])
    if kept_unseen(checkpoint, index, retrain_above_fraction) is None:
        return ChainState([f"SAE {sae_name!r} is not a finished training on shuffle plan {index['plan_id']} "
                           f"(shuffled store {trained!r}), nor one the refresh policy keeps (only new batches "
                           f"holding less than {retrain_above_fraction:.0%} of its training tokens)"])
    return ChainState([], feature_state(store, sae_name, n_feature_shards))


@dataclass(frozen=True)
class FeatureState:
    """Which checkpoint, and which batches of its shuffled store, one SAE's feature tables and
    browser describe (versions as committed; None where there is none, or for batches where the
    record predates batch records)."""

    sae_name: str
    checkpoint: str | None          # the SAE's current checkpoint
    shards: tuple[str | None, ...]  # per feature shard f0, f1, …: the checkpoint its tables describe
    browser: str | None             # the checkpoint the feature browser shows
    batches: dict | None = None     # key → version of every batch of the shuffled store it was trained on
    shard_batches: tuple = ()       # per feature shard: the batches its tables describe
    browser_batches: dict | None = None
    shard_layouts: tuple = ()       # per feature shard: the shard count its tables were built in (None: not recorded)
    browser_shards: int = N_FEATURE_SHARDS  # how many feature shards the browser shows

    def behind(self) -> list[str]:
        """Why the tables or the browser do not describe the current checkpoint over every batch of
        its shuffled store (a kept SAE's tables add new batches); empty when they do."""
        return self.tables_behind() or self.browser_behind()

    def tables_behind(self) -> list[str]:
        """Why the feature tables (one reason per shard) do not describe the current checkpoint over
        every batch of its shuffled store, in the layout of ``len(shards)`` feature shards."""
        if self.checkpoint is None:
            return [f"SAE {self.sae_name!r} was never trained"]
        return [reason for i in range(len(self.shards)) if (reason := self.shard_behind(i))]

    def shard_behind(self, i: int) -> str | None:
        """Why feature shard ``i``'s tables are behind (None: current). Tables built in another
        shard layout (a changed ``memory_budget_bytes``) are behind: the shards of two layouts cover
        different latents and are never mixed."""
        if self.checkpoint is None:
            return f"SAE {self.sae_name!r} was never trained"
        recorded = self.shards[i]
        described = self.shard_batches[i] if i < len(self.shard_batches) else None
        # a record from before layouts were recorded: built in the fixed layout of one shard per group
        layout = (self.shard_layouts[i] if i < len(self.shard_layouts) else None) or N_FEATURE_SHARDS
        if recorded is None:
            return f"feature tables f{i} of {self.sae_name!r} were never built"
        if recorded != self.checkpoint:
            return (f"feature tables f{i} of {self.sae_name!r} describe checkpoint {recorded}, not the "
                    f"current {self.checkpoint}")
        if layout != len(self.shards):
            return (f"feature tables f{i} of {self.sae_name!r} were built as one of {layout} feature shards, not "
                    f"of the {len(self.shards)} planned now (resources.features.config.memory_budget_bytes)")
        if self.batches is not None and described != self.batches:
            return f"feature tables f{i} of {self.sae_name!r} " + _batch_change(described, self.batches)
        return None

    def browser_behind(self) -> list[str]:
        """Why the browser, by its own record, does not show the current checkpoint over every batch
        (whatever the tables describe)."""
        if self.checkpoint is None:
            return [f"SAE {self.sae_name!r} was never trained"]
        if self.browser is None:
            return [f"the feature browser of {self.sae_name!r} was never built"]
        if self.browser != self.checkpoint:
            return [f"the feature browser of {self.sae_name!r} shows checkpoint {self.browser}, "
                    f"not the current {self.checkpoint}"]
        if self.batches is not None and self.browser_batches != self.batches:
            return [f"the feature browser of {self.sae_name!r} " + _batch_change(self.browser_batches, self.batches)]
        if self.browser_shards != len(self.shards):  # its pages, windows and lineage are another layout's
            return [f"the feature browser of {self.sae_name!r} shows {self.browser_shards} feature shards, not the "
                    f"{len(self.shards)} planned now (resources.features.config.memory_budget_bytes)"]
        return []


def feature_state(store: ArtifactStore, sae_name: str, n_feature_shards: int | None = None) -> FeatureState:
    """What the feature tables (their lineage records) and the browser (its site record) of
    ``sae_name`` pin, beside its current checkpoint and the batches of its shuffled store.
    ``n_feature_shards``: the layout the tables must have (the feature stages pass the one they
    plan, ``feature_layout.plan_layout``); None: the layout the stored tables record
    (``lineage.recorded_shard_count``), for readers without feature settings."""
    checkpoint = checkpoint_version(store, sae_name)
    n_shards = recorded_shard_count(store, sae_name) if n_feature_shards is None else n_feature_shards
    lineages = [_lineage(store, lineage_record_path(store, sae_name, i)) for i in range(n_shards)]
    site = site_record(store, browser_dir(store, sae_name))
    return FeatureState(sae_name, checkpoint, tuple(pinned_checkpoint(lineage) for lineage in lineages),
                        pinned_checkpoint(site), store_batches(store, sae_name) if checkpoint else None,
                        tuple(described_batches(lineage) for lineage in lineages), described_batches(site),
                        tuple(recorded_layout_shards(lineage) for lineage in lineages), shown_shards(site))


def features_behind(store: ArtifactStore, *, sae_name: str, n_feature_shards: int | None) -> list[str]:
    """Why the feature tables, context windows or browser of ``sae_name`` do not describe its current
    checkpoint; empty when they all do."""
    return feature_state(store, sae_name, n_feature_shards).behind()


def browser_figures_behind(store: ArtifactStore, sae_name: str) -> list[str]:
    """Why the feature browser of ``sae_name`` does not show its current figures: an evaluation,
    sparse probing or absorption committed after the site was built (the site pins what its
    overview was read from, ``compare.figures_version``); empty when it shows them, or when no
    site was built (``FeatureState.browser_behind`` says that). The one rule: ``feature_browser``
    rebuilds on it (``assets.features.browser_current``) and `sae-platform status` shows it. Not part
    of ``stale_reasons``: a figure measured again changes no feature table and is no new data."""
    site = site_record(store, browser_dir(store, sae_name))
    if site is None or site.get("figures_version") == figures_version(store, [sae_name]):
        return []
    return [f"the feature browser of {sae_name!r} shows figures older than the committed ones (an evaluation, "
            "sparse probing or absorption measured since it was built)"]


def sae_chain_state(store: ArtifactStore, sae_name: str, n_feature_shards: int | None = None) -> ChainState:
    """``chain_state`` for a trained SAE, with the shuffle it was trained on as ``shuffle_name``
    (the base name of its hook point's store): what ``sae-platform status`` shows per SAE
    (``n_feature_shards`` None: the layout its stored tables record, ``feature_state``)."""
    return chain_state(store, shuffle_name=hook_store_base(trained_on(store, sae_name)), sae_name=sae_name,
                       n_feature_shards=n_feature_shards)


def sae_stale_reasons(store: ArtifactStore, sae_name: str, n_feature_shards: int | None = None) -> list[str]:
    """``stale_reasons`` for a trained SAE (``sae_chain_state``)."""
    return sae_chain_state(store, sae_name, n_feature_shards).behind()


def store_batches(store: ArtifactStore, sae_name: str) -> dict[str, str] | None:
    """key → version of every batch of the shuffled store ``sae_name`` was trained on (its hook
    point's): what its feature tables describe. None when that store is gone."""
    path = store.resolve(shuffled_name(trained_on(store, sae_name)))
    if path is None:
        return None
    return {i["key"]: i["version"] for i in store.read_json(f"{path}/{SHUFFLED_INDEX}")["inputs"]}


def _batch_change(described: dict[str, str] | None, batches: dict[str, str]) -> str:
    if described is None:
        return "record no batches (built before batches were recorded)"
    new = sorted(set(batches) - set(described))
    other = sorted(k for k in described if batches.get(k) != described[k])
    return ("describe other batches than the SAE's shuffled store ("
            + "; ".join(f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
                        for label, keys in (("new", new), ("re-cached or removed", other)) if keys) + ")")


def _describe_change(pinned: dict[str, str], cached: dict[str, str], label: str = "") -> str:
    new = sorted(set(cached) - set(pinned))
    gone = sorted(set(pinned) - set(cached))
    changed = sorted(k for k in set(pinned) & set(cached) if pinned[k] != cached[k])
    parts = [f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
             for label, keys in (("new", new), ("re-cached", changed), ("removed", gone)) if keys]
    store = f"the shuffled store {label}" if label else "the shuffled store"
    return f"{store} is older than the cached activations (" + "; ".join(parts) + ")"


def _lineage(store: ArtifactStore, lineage_path: str) -> dict | None:
    return store.read_json(lineage_path) if store.fs.exists(lineage_path) else None


# -- what a refresh will rebuild, and roughly how long ---------------------------------------------

SHUFFLE_STAGES = ("shuffle_plan", "shuffle_pass_1", "shuffle_pass_2", "shuffle_final", "shuffled_activations")
TABLE_STAGES = ("feature_topk", "feature_contexts", "feature_explanations")  # once per feature shard
BATCH_STAGES = ("feature_context_windows",)  # pass 3: once per batch
# the encode, once per new batch; counted once it has run (a dense SAE stores no codes: never timed)
ENCODE_STAGES = ("feature_codes",)
# full_pipeline runs these in every refresh: the comparison and the circuit-tracer export have no skip
# rule, the Neuronpedia export follows the tables (a refresh always changes them)
EXPORT_STAGES = ("sae_comparison", "circuit_tracer_export", "neuronpedia_export")
OPTIONAL_SHARD_STAGES = ("feature_llm_explanations",)  # counted once it has run: off by default, then ~0 s


def refresh_plan(store: ArtifactStore, *, shuffle_name: str, sae_name: str, n_feature_shards: int,
                 retrain_above_fraction: float = RETRAIN_ABOVE_FRACTION, training: dict | None = None) -> str:
    """One line: what a ``full_pipeline`` refresh of the cached activations will rebuild (reshuffle;
    keep, resume or retrain ``sae_name`` by the refresh policy, its SAELens export with it; evaluate;
    pass 1 for the batches without a current partial, pass 2, 3, contexts, explanations, the browser
    and the exports) and roughly how long it will take, from the seconds the last builds of those
    stages recorded in their stage records (``catalog.stage_record_path``; a resumed training from
    its checkpoint's last training speed). Stages never timed are named as unknown, not counted.
    ``training``: the current training settings' ``trainer.identity`` (None: taken as unchanged),
    which decide between resuming and training from scratch (``refresh.continuation``)."""
    cached = cached_versions(store)
    names = hook_shuffle_names(store, shuffle_name)
    behind = [n for n in names if _pinned(store, n) != cached]
    steps, timed = [], []  # timed: (stage, seconds; NaN when never timed)
    if behind:
        steps.append(f"reshuffle {len(behind)} store(s) ({sum(_rows(store, k) for k in cached):,} rows)")
        timed += [(stage, _last_seconds(store, stage)) for stage in SHUFFLE_STAGES]
    checkpoint = store.pointer(checkpoint_name(sae_name))
    unseen = index = None
    if checkpoint is not None:
        trained = trained_on(store, sae_name)
        index = {"name": trained, "d_model": (checkpoint.get("data") or {}).get("d_model"),
                 "plan_id": None if trained in behind else _plan_id(store, trained),
                 "inputs": [{"key": k, "version": v, "n_rows": _rows(store, k)} for k, v in cached.items()]}
        unseen = kept_unseen(checkpoint, index, retrain_above_fraction)
    if unseen is None:
        steps.append(_training_step(store, sae_name, checkpoint, index, training, timed))
        timed.append(("sae_eval", _last_seconds(store, "sae_eval")))
        new = list(cached)
    else:
        steps.append(f"keep {sae_name} ({unseen.describe() or 'current'})")
        new = [k for k in cached if not _partials_pinned(store, sae_name, k, checkpoint)]  # no current partial
        if behind:
            timed.append(("sae_eval", _last_seconds(store, "sae_eval")))
    llm = [stage for stage in OPTIONAL_SHARD_STAGES if _record_seconds(store, stage)]
    steps.append(f"feature pass 1 for {len(new)} of {len(cached)} batch(es), pass 2, contexts and explanations "
                 f"for {n_feature_shards} shard(s) in {min(n_feature_shards, N_FEATURE_SHARDS)} group job(s)"
                 f"{''.join(f', {s}' for s in llm)}, pass 3 for {len(cached)} batch(es), the browser")
    steps.append("the exports (" + ", ".join(EXPORT_STAGES) + ")")
    # a record times one job: a pass-1 job is one (batch, shard group), a table stage's one group; each ran
    # the shards of its group in the recorded layout in turn, so a shard costs the record / those shards
    recorded_per_group = _shards_per_group(recorded_shard_count(store, sae_name))

    def every_shard(stage: str) -> float:
        return _mean_seconds(store, stage) / recorded_per_group * n_feature_shards

    encoded = [stage for stage in ENCODE_STAGES if _record_seconds(store, stage)]
    timed += [*((s, _mean_seconds(store, s) * len(new) if new else 0.0) for s in encoded),
              ("feature_stats_partial", every_shard("feature_stats_partial") * len(new) if new else 0.0),
              *((s, every_shard(s)) for s in (*TABLE_STAGES, *llm)),
              *((s, _mean_seconds(store, s) * len(cached)) for s in BATCH_STAGES),
              ("feature_browser", _last_seconds(store, "feature_browser")),
              *((s, _last_seconds(store, s)) for s in EXPORT_STAGES)]
    unknown = [stage for stage, seconds in timed if seconds != seconds]  # NaN: never timed
    estimate = f"~{_duration(sum(seconds for _, seconds in timed if seconds == seconds))}"
    if unknown:
        estimate += f" + unknown for {', '.join(unknown)} (never timed)"
    return "refresh will " + "; ".join(steps) + f": {estimate} by the last recorded stage timings"


def _shards_per_group(n_feature_shards: int) -> int:
    """Shards the fullest group job runs, one after the other, in a layout of ``n_feature_shards``
    (group g runs shards g, g + N, g + 2N, … of the ``N_FEATURE_SHARDS`` groups). A table stage's
    record times one group job, so its seconds per shard are the record's over this, taken for the
    layout the tables were last built (and the stages last timed) in."""
    return -(-n_feature_shards // N_FEATURE_SHARDS)


def _training_step(store: ArtifactStore, sae_name: str, checkpoint: dict | None, index: dict | None,
                   training: dict | None, timed: list) -> str:
    """The plan's words for (re)training ``sae_name`` (resumed where ``refresh.continuation``
    allows, else from scratch with the reason), appending its stage's estimate to ``timed``."""
    batch_size = (training or (checkpoint or {}).get("settings") or {}).get("batch_size") or 1
    resume = continuation(checkpoint, index, training, batch_size) if checkpoint else "never trained"
    if isinstance(resume, Continuation):
        timed.append(("sae_checkpoint", _resume_seconds(store, sae_name, resume, batch_size)))
        return f"{resume.describe()} of {sae_name}, export and evaluate it"
    timed.append(("sae_checkpoint", _last_seconds(store, "sae_checkpoint")))
    return f"train {sae_name} from scratch ({resume}), export and evaluate it"


def _resume_seconds(store: ArtifactStore, sae_name: str, resume: Continuation, batch_size: int) -> float:
    """The added steps at the training speed the checkpoint's last metrics row recorded; NaN when none."""
    path = store.resolve(checkpoint_name(sae_name))
    try:
        history = store.read_json(f"{path}/trainer_state.json").get("history") or []
    except (OSError, ValueError):  # an earlier version's checkpoint (trainer_state.pt), or unreadable
        return float("nan")
    speed = history[-1].get("tokens_per_second") if history else None
    if not isinstance(speed, int | float) or speed <= 0:
        return float("nan")
    return resume.added_steps * batch_size / speed


def _pinned(store: ArtifactStore, name: str) -> dict[str, str] | None:
    path = store.resolve(shuffled_name(name))
    if path is None:
        return None
    return {i["key"]: i["version"] for i in store.read_json(f"{path}/{SHUFFLED_INDEX}")["inputs"]}


def _plan_id(store: ArtifactStore, name: str) -> str | None:
    path = store.resolve(shuffled_name(name))
    return store.read_json(f"{path}/{SHUFFLED_INDEX}")["plan_id"] if path else None


def _rows(store: ArtifactStore, key: str) -> int:
    return int(open_partition(store, key).acts.shape[0])


def _partials_pinned(store: ArtifactStore, sae_name: str, key: str, checkpoint: dict) -> bool:
    pointer = store.pointer(partial_name(sae_name, key, 0))
    return pointer is not None and pinned_checkpoint(pointer) == checkpoint["version"]


def _record_seconds(store: ArtifactStore, stage: str) -> list[float]:
    seconds = []
    for path in stage_records(store, stage):
        try:
            value = store.read_json(path).get("seconds")
        except ValueError:  # a truncated record: as if never timed
            continue
        if isinstance(value, int | float):
            seconds.append(float(value))
    return seconds


def _mean_seconds(store: ArtifactStore, stage: str) -> float:
    """Mean recorded seconds per partition of ``stage``; NaN when never timed."""
    seconds = _record_seconds(store, stage)
    return sum(seconds) / len(seconds) if seconds else float("nan")


def _last_seconds(store: ArtifactStore, stage: str) -> float:
    """Total recorded seconds of ``stage`` over its partitions (an unpartitioned or per-worker stage
    runs all of them again); NaN when never timed."""
    seconds = _record_seconds(store, stage)
    return sum(seconds) if seconds else float("nan")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"

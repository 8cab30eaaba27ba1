"""Where every artifact lives and what it pins: the one owner of artifact names.

Every artifact of the pipeline is a name under the artifact root (``storage.ArtifactStore``), most
of them committed versions behind a ``COMMITTED.json`` pointer. This module is the only place
that spells those names (``tests/test_catalog.py`` greps the rest of the code for path
literals), answers *which store does SAE Y read* and *which checkpoint did artifact Z pin*, and
holds the hook-point entries (``HookEntry``) a caching pass writes. The layout it produces is
drawn in docs/design.md ("Storage layout").

Torch-free and Dagster-free: shuffle workers, the browser and the sensors import it.

====================  ==========================================================================  ==================
kind                  name                                                                        written by
====================  ==========================================================================  ==================
base model            ``models/<source>``                                                         model
activation partition  ``activations/<key>`` (``data.zarr``, ``hooks/<i>.zarr``, ``FAILED.json``)  activations, inbox
shuffle scratch       ``shuffle/<name>/plan``, ``shuffle/<name>/<plan>/pass<p>/job<j>``           shuffle
shuffled store        ``shuffled/<name>`` (+ ``pieces-<plan>/b<bucket>``), ``<name>.h<i>``        shuffle
SAE checkpoint        ``sae/<sae_name>``                                                          trainer
evaluation            ``eval/<sae_name>`` (report, density, held-out codes)                       evaluate
feature absorption    ``absorption/<sae_name>`` (result, SAEBench's result file)                  absorption
SAELens export        ``saelens/<sae_name>``                                                      export
circuit-tracer set    ``circuit_tracer/<set_name>`` (``config.yaml``, ``layer_<i>.safetensors``)   circuit_tracer
training reports      ``reports/<sae_name>/<file>``, ``reports/<file>``                           assets.training
sparse codes          ``features/<sae_name>/codes/<key>``                                         features
pass-1 partials       ``features/<sae_name>/partial/<key>/f<shard>``                              features
feature tables        ``features/<sae_name>/tables/f<shard>``                                     feature_merge
logit effects         ``features/<sae_name>/logits/f<shard>``                                     assets.features
lineage records       ``features/<sae_name>/lineage/f<shard>.json``                               assets.features
context windows       ``features/<sae_name>/contexts_partial/<key>``, ``…/contexts/f<shard>``     contexts
explanations          ``features/<sae_name>/explanations/f<shard>``, ``…/llm_explanations/…``     metrics, assets
feature browser       ``browser/<sae_name>``                                                      browser.publish
Neuronpedia export    ``neuronpedia/<sae_name>`` (``<modelId>/<sourceId>/…``)                      neuronpedia
stage records         ``stages/<asset>/<partition>.json``                                         assets.stage
synthetic truth       ``synthetic/<truth_id>`` (``settings.json``, ``truth.npz``)                  synthetic
====================  ==========================================================================  ==================
"""

import re
from dataclasses import dataclass

from sae_platform.corpus import check_key
from sae_platform.errors import ModelError, StorageError
from sae_platform.settings import SettingsError, load_yaml

# -- top-level prefixes under the artifact root ------------------------------------------------
MODELS = "models"
ACTIVATIONS = "activations"
SHUFFLE_SCRATCH = "shuffle"
SHUFFLED = "shuffled"
CHECKPOINTS = "sae"
EVALUATIONS = "eval"
SPARSE_PROBING = "sparse_probing"
ABSORPTION = "absorption"
EXPORTS = "saelens"
CIRCUIT_TRACER_EXPORTS = "circuit_tracer"
REPORTS = "reports"
FEATURES = "features"
BROWSER = "browser"
NEURONPEDIA = "neuronpedia"
STAGE_RECORDS = "stages"
SYNTHETIC = "synthetic"

# Files inside an artifact's version that more than one module reads.
EVAL_REPORT = "report.json"  # eval/<sae_name>: every evaluation figure
EVAL_PROBES = "probes.json"  # eval/<sae_name>: the per-property probe table
SPARSE_PROBING_RESULT = "result.json"  # sparse_probing/<sae_name>: every task's accuracies, skips, averages
SAEBENCH_SPARSE_PROBING = "saebench_sparse_probing.json"  # sparse_probing/<sae_name>: SAEBench's output schema
ABSORPTION_REPORT = "absorption.json"  # absorption/<sae_name>: the result (or the refusal), per letter
ABSORPTION_CHART = "absorption_by_letter.png"  # reports/<sae_name>: the per-letter bar chart (and the browser's copy)
# absorption/<sae_name>: the result in SAEBench's AbsorptionEvalOutput schema (only when scored)
SAEBENCH_ABSORPTION = "absorption_first_letter_eval_results.json"
HELDOUT_ROWS_FILE = "heldout_rows.json"  # sae/<sae_name>: which rows the checkpoint never trained on (heldout.py)
SHUFFLED_INDEX = "index.json"  # shuffled/<name>: pinned inputs, plan, pieces, store_index
LOGIT_EFFECTS = "logit_effects.parquet"  # features/<sae_name>/logits/f<shard>
LLM_EXPLANATIONS_FILE = "llm_explanations.parquet"  # features/<sae_name>/llm_explanations/f<shard>
CHECKSUMS = "CHECKSUMS.json"  # in every committed version: each file's size and sha256 (checksums.py)

FIRST_STORE = "data.zarr"  # a partition's first hook-point store: what the demo trains on
FAILED_ATTEMPT = "FAILED.json"  # beside a partition's pointer, never inside a version (inbox.py)
PIECE_STORE = FIRST_STORE  # a shuffled piece holds one zarr group of the same name
HOOK_STORE_SUFFIX = ".h"  # shuffled/<name>.h<i>: the shuffled store of hook-point entry i >= 1


# -- names that become paths -------------------------------------------------------------------

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")
NAME_MAX_CHARS = 128
SAFE_NAME_RULE = (f"a letter or digit, then letters, digits, '.', '_', '-' or '='; no '..'; at most "
                  f"{NAME_MAX_CHARS} characters")


def check_name(value, field: str) -> str:
    """``value`` when it may become one segment of an artifact path (a sweep entry, an SAE, a
    shuffled store): ``SAFE_NAME_RULE``, so no name can reach outside its folder (``..``, ``/``, an
    absolute path, NUL) or hide as a dot-file. Every user-supplied name passes here, when its
    configuration is loaded and again when a path is built from it. SettingsError naming
    ``field`` (where the name was set), the value and the rule otherwise."""
    text = value if isinstance(value, str) else None
    if text is None or len(text) > NAME_MAX_CHARS or ".." in text or not SAFE_NAME.fullmatch(text):
        raise SettingsError(f"{field} = {value!r} is not a safe name for a storage path",
                            f"rename it: {SAFE_NAME_RULE} (e.g. topk-16k-k32)")
    return text


# -- synthetic data -----------------------------------------------------------------------------

def synthetic_truth_name(truth_id: str) -> str:
    """``synthetic/<truth_id>``: the known dictionary synthetic partitions were drawn from."""
    return f"{SYNTHETIC}/{check_name(truth_id, 'truth_id')}"


# -- base model ---------------------------------------------------------------------------------

def model_name(source: str) -> str:
    """``models/<source>`` with every character but letters, digits and ``-_.`` replaced by ``_``."""
    return f"{MODELS}/" + "".join(c if c.isalnum() or c in "-_." else "_" for c in source.strip("/"))


# -- activation partitions and their hook-point stores -------------------------------------------

def partition_name(key: str) -> str:
    """``activations/<key>``; refuses a key that is not one safe path segment (SourceError), so
    nothing is ever written outside ``activations/<key>/``."""
    return f"{ACTIVATIONS}/{check_key(key)}"


def partition_key(name: str) -> str:
    """The key of partition artifact ``name`` (``activations/<key>`` → ``<key>``)."""
    return name.split("/", 1)[1]


def list_partitions(store) -> list[str]:
    """Keys of the committed activation partitions."""
    return [partition_key(name) for name in store.committed_names(ACTIVATIONS)]


def failed_attempt_path(store, key: str) -> str:
    """Where a failed caching attempt of partition ``key`` is recorded (inbox.record_failed_attempt)."""
    return store.path(partition_name(key), FAILED_ATTEMPT)


def failed_attempts_glob(store) -> str:
    return store.path(ACTIVATIONS, "*", FAILED_ATTEMPT)


def store_group(index: int) -> str:
    """Where entry ``index`` of a caching pass lives inside a partition version: the first in
    ``data.zarr`` (what the shuffle of the default hook point reads), the others in
    ``hooks/<index>.zarr``."""
    if not isinstance(index, int) or index < 0:
        raise StorageError(f"hook-point store index {index!r} is not a non-negative integer",
                           "use the entry's position in resources.caching.config.hook_points")
    return FIRST_STORE if index == 0 else f"hooks/{index}.zarr"


def partition_store_path(store, key: str, version: str, group: str = FIRST_STORE, *array: str) -> str:
    """The hook-point store ``group`` (``store_group``) of partition ``key`` at ``version``, or
    one of its arrays (``acts``, ``token_id``, …)."""
    return store.path(ACTIVATIONS, key, version, group, *array)


@dataclass(frozen=True)
class HookEntry:
    """One activation store of a caching pass: the hook point read (``hook_name``, TransformerLens
    name) and, for a transcoder's paired rows, the input read beside it (``hook_name_in``; rows are
    ``[input | output]``). ``spec`` is its one spelling in settings, metadata and stored
    fingerprints: ``"blocks.4.hook_mlp_out"`` or ``"blocks.4.ln2.hook_normalized -> blocks.4.hook_mlp_out"``."""

    hook_name: str
    hook_name_in: str | None = None

    ARROW = " -> "

    @property
    def spec(self) -> str:
        return self.hook_name if self.hook_name_in is None else f"{self.hook_name_in}{self.ARROW}{self.hook_name}"

    @classmethod
    def parse(cls, spec: str) -> "HookEntry":
        """The entry ``spec`` names (whitespace around ``->`` does not matter). ModelError when it
        is neither a hook point nor an ``IN -> OUT`` pair."""
        parts = [p.strip() for p in str(spec).split("->")]
        if len(parts) > 2 or not all(parts):
            raise ModelError(f"hook point entry {spec!r} is neither a hook point nor an 'IN -> OUT' pair",
                             "write e.g. blocks.4.hook_mlp_out, or "
                             "blocks.4.ln2.hook_normalized -> blocks.4.hook_mlp_out")
        return cls(parts[-1], parts[0] if len(parts) == 2 else None)

    @classmethod
    def from_attrs(cls, attrs: dict) -> "HookEntry | None":
        """The entry a store's attributes (or an evaluation report, or a lineage record's
        ``base_model``: ``hook_name``, ``hook_name_in``) describe; None when they name no hook point."""
        return cls(attrs["hook_name"], attrs.get("hook_name_in")) if attrs.get("hook_name") else None

    @classmethod
    def spec_of(cls, attrs: dict) -> str | None:
        """``from_attrs(attrs).spec``, or None when the attributes name no hook point."""
        entry = cls.from_attrs(attrs)
        return None if entry is None else entry.spec

    @property
    def names(self) -> tuple[str, ...]:
        return (self.hook_name,) if self.hook_name_in is None else (self.hook_name_in, self.hook_name)

    @property
    def reads(self) -> str:
        """What an SAE of this store encodes: the hook point itself, or a transcoder's input."""
        return self.hook_name_in or self.hook_name


def cached_hook_points(store) -> list[str]:
    """The hook-point entries (``HookEntry.spec``) the committed activation partitions hold, in
    store order; [] when nothing is cached. All partitions agree (``activations.check_compatible``)."""
    for name in store.committed_names(ACTIVATIONS):
        stored = store.pointer(name).get("fingerprint", {})
        return list(stored.get("hook_points") or [stored.get("hook_name")])
    return []


# -- the shuffle --------------------------------------------------------------------------------

def shuffled_name(name: str) -> str:
    """``shuffled/<name>``: the committed shuffled store ``name``."""
    return f"{SHUFFLED}/{check_name(name, 'shuffled store name')}"


def shuffled_folder(store, name: str) -> str:
    return store.path(SHUFFLED, check_name(name, "shuffled store name"))


def hook_store_name(name: str, index: int) -> str:
    """The shuffled store of a caching pass's hook-point entry ``index``: ``name`` for the first
    entry, ``<name>.h<index>`` for the others."""
    return name if index == 0 else f"{name}{HOOK_STORE_SUFFIX}{index}"


def hook_shuffle_names(store, name: str) -> list[str]:
    """Shuffled store names of every hook-point entry the cached activations hold (``name`` alone
    when nothing is cached yet), in store order: entry i's is ``hook_store_name(name, i)``."""
    return [hook_store_name(name, i) for i in range(max(1, len(cached_hook_points(store))))]


def shuffle_for_hook_point(store, name: str, hook_point: str | None) -> str:
    """The shuffled store holding ``hook_point`` (an entry of ``caching.config.hook_points``; for a
    transcoder pair its 'IN -> OUT' spec); ``name`` itself for None. StorageError listing the
    cached entries when it was not cached."""
    if hook_point is None:
        return name
    cached = cached_hook_points(store)
    wanted = HookEntry.parse(hook_point).spec
    if wanted not in cached:
        raise StorageError(f"hook point {hook_point!r} was not cached (the activations hold: "
                           f"{', '.join(cached) or 'nothing yet'})",
                           "add it to resources.caching.config.hook_points and cache again, or name a cached one "
                           "in the sweep entry's hook_point")
    return hook_store_name(name, cached.index(wanted))


def is_hook_store_name(name: str) -> bool:
    """Whether ``name`` has the form ``hook_store_name`` gives entries i >= 1 (``<base>.h<i>``)."""
    base, _, suffix = str(name).rpartition(HOOK_STORE_SUFFIX)
    return bool(base) and suffix.isdigit() and not suffix.startswith("0")


def hook_store_base(name: str) -> str:
    """The ``name`` a hook-point store was made from by ``hook_store_name`` (``main`` for ``main.h1``
    and for ``main``)."""
    return str(name).rpartition(HOOK_STORE_SUFFIX)[0] if is_hook_store_name(name) else name


def shuffled_store_index(index: dict) -> int:
    """Which hook-point entry a shuffled store holds, from its committed ``index.json`` or its
    plan, where it is recorded as ``store_index``. Only a store shuffled before the index was
    recorded lacks it; such a store was named by ``hook_store_name``, so its name says."""
    if "store_index" in index:
        return int(index["store_index"])
    name = str(index.get("name", ""))
    return int(name.rpartition(HOOK_STORE_SUFFIX)[2]) if is_hook_store_name(name) else 0


def store_group_of(index: dict) -> str:
    """The partition store (``store_group``) a shuffled store's ``index.json`` says it was built from."""
    return store_group(shuffled_store_index(index))


def shuffled_input_group(store, name: str) -> str:
    """The hook-point store inside each activation partition that shuffled store ``name`` was
    built from (``store_group`` of its recorded ``store_index``)."""
    path = store.require(shuffled_name(name), f"shuffled store {name!r}", "materialize shuffled_activations first")
    return store_group_of(store.read_json(f"{path}/{SHUFFLED_INDEX}"))


def shuffle_plan_name(name: str) -> str:
    return f"{shuffle_scratch_name(name)}/plan"


def shuffle_scratch_folder(store, name: str) -> str:
    return store.path(shuffle_scratch_name(name))


def shuffle_scratch_name(name: str) -> str:
    return f"{SHUFFLE_SCRATCH}/{check_name(name, 'shuffle name')}"


def shuffle_job_name(name: str, plan_id: str, pass_index: int, job_index: int) -> str:
    return f"{shuffle_scratch_name(name)}/{plan_id}/pass{pass_index}/job{job_index:06d}"


PIECES_PREFIX = "pieces-"  # shuffled/<name>/pieces-<plan_id>/: one plan's final pieces


def shuffle_pieces_folder(plan_id: str) -> str:
    """The folder (inside ``shuffled/<name>/``) of plan ``plan_id``'s final pieces."""
    return f"{PIECES_PREFIX}{plan_id}"


def shuffle_piece_name(name: str, plan_id: str, bucket: int) -> str:
    return f"{shuffled_name(name)}/{shuffle_pieces_folder(plan_id)}/b{bucket:06d}"


# -- SAE checkpoints and what derived artifacts pin ----------------------------------------------

# The SAE the feature tables and the browser describe unless resources.features.config.sae_name
# says otherwise (FeatureSettings.sae_name); here, so the CLI reads it without importing torch.
DEFAULT_SAE_NAME = "topk-16k-k32"


def check_sae_name(sae_name: str) -> str:
    """``sae_name`` (a sweep entry: the SAE's name) when it is a safe name (``check_name``)."""
    return check_name(sae_name, "SAE name (sweep entry)")


def load_sweep(path) -> dict[str, dict]:
    """The SAE sweep file ``path`` (config/sweep.yaml): entry name → its spec (a mapping: variant,
    n_latents, …). Read with ``settings.load_yaml`` (no aliases, bounded size); every entry name is
    checked by ``check_name`` here, when the code location loads, since it becomes the SAE's path.
    An entry with a ``transcoder_set`` block stands for one transcoder per MLP layer
    (``TranscoderSet``): it is expanded here into its members, ``<name>-L<i>``, each a plain entry
    with its own ``hook_point``; an entry with ``seeds: S`` stands for S reseeds of one SAE
    (``ReseedGroup``): members ``<name>-s<seed>``, each with its own ``seed``. SettingsError naming
    the file, the entry and the fix otherwise."""
    specs = load_yaml(path, "sweep file")
    if not isinstance(specs, dict) or not specs:
        raise SettingsError(f"sweep file {path} holds no entries (it must be a mapping of SAE name to its settings)",
                            "write one entry per SAE, e.g. topk-16k-k32: {variant: topk, n_latents: 16384, k: 32}")
    expanded: dict[str, dict] = {}
    for name, spec in specs.items():
        check_name(name, f"sweep entry name in {path}")
        if not isinstance(spec, dict):
            raise SettingsError(f"sweep entry {name!r} in {path} is {spec!r}, not a mapping of settings",
                                "write it as e.g. {variant: topk, n_latents: 16384, k: 32}")
        members = (ReseedGroup.from_spec(name, spec, path).member_specs(spec) if RESEEDS in spec
                   else {name: spec} if TRANSCODER_SET not in spec
                   else TranscoderSet.from_spec(name, spec, path).member_specs(spec))
        clash = sorted(set(members) & set(expanded))
        if clash:
            raise SettingsError(f"sweep file {path}: entry {name!r} gives SAE name(s) {', '.join(clash)} that another "
                                "entry already has", f"rename {name!r} (a transcoder set names its members <set>-L<i>, "
                                "a reseeded entry <entry>-s<seed>)")
        for member in members:
            check_name(member, f"SAE name {member!r} expanded from sweep entry {name!r} in {path}")
        expanded.update(members)
    return expanded


TRANSCODER_SET = "transcoder_set"  # the sweep-entry key of a set of per-layer transcoders
# What a set's transcoders may read (TransformerLens names, the ones circuit-tracer accepts as
# feature_input_hook) and where they write.
TRANSCODER_SET_INPUTS = ("hook_resid_mid", "ln2.hook_normalized")
TRANSCODER_SET_OUTPUT = "hook_mlp_out"


@dataclass(frozen=True)
class TranscoderSet:
    """One transcoder per MLP layer of a model, declared as one sweep entry (circuit-tracer's
    per-layer transcoder set, "PLT")::

        smollm2-plt: {variant: topk, n_latents: 4096, k: 32,
                      transcoder_set: {n_layers: 30, input: ln2.hook_normalized}}

    trains ``smollm2-plt-L0`` … ``smollm2-plt-L29``, member i reading ``blocks.i.<input>`` and
    writing ``blocks.i.hook_mlp_out`` (the other settings are every member's). ``n_layers`` is the
    model's block count: circuit-tracer needs a transcoder on every layer. Caching all of them in one
    pass takes one ``hook_points`` entry, ``'blocks.*.<input> -> blocks.*.hook_mlp_out'``
    (``activations.hook_entries`` expands ``*`` to every block)."""

    name: str
    n_layers: int
    input: str

    @classmethod
    def from_spec(cls, name: str, spec: dict, path) -> "TranscoderSet":
        """The set sweep entry ``name`` declares; SettingsError naming the file, entry and fix."""
        block = spec[TRANSCODER_SET]
        example = "transcoder_set: {n_layers: 30, input: ln2.hook_normalized}"
        if not isinstance(block, dict) or set(block) - {"n_layers", "input"}:
            raise SettingsError(f"sweep entry {name!r} in {path}: transcoder_set is {block!r}, not a mapping of "
                                "n_layers and input", f"write e.g. {example}")
        n_layers, hook_in = block.get("n_layers"), block.get("input", TRANSCODER_SET_INPUTS[1])
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise SettingsError(f"sweep entry {name!r} in {path}: transcoder_set.n_layers is {n_layers!r}, not the "
                                "model's (positive) number of blocks", f"write e.g. {example}")
        if hook_in not in TRANSCODER_SET_INPUTS:
            raise SettingsError(f"sweep entry {name!r} in {path}: transcoder_set.input is {hook_in!r}",
                                f"use one of {', '.join(TRANSCODER_SET_INPUTS)}")
        if "hook_point" in spec:
            raise SettingsError(f"sweep entry {name!r} in {path} has both transcoder_set and hook_point",
                                "drop hook_point: each member's is blocks.<i>.<input> -> blocks.<i>.hook_mlp_out")
        return cls(name, n_layers, hook_in)

    def member(self, layer: int) -> str:
        """The sweep entry (SAE name) of layer ``layer``'s transcoder."""
        return f"{self.name}-L{layer}"

    @property
    def members(self) -> list[str]:
        """Member SAE names, in layer order."""
        return [self.member(i) for i in range(self.n_layers)]

    def hook_point(self, layer: int) -> str:
        """Layer ``layer``'s transcoder pair (``HookEntry.spec``)."""
        return HookEntry(f"blocks.{layer}.{TRANSCODER_SET_OUTPUT}", f"blocks.{layer}.{self.input}").spec

    def member_specs(self, spec: dict) -> dict[str, dict]:
        """Each member's sweep entry: ``spec`` without the block, plus its own hook point."""
        shared = {k: v for k, v in spec.items() if k != TRANSCODER_SET}
        return {self.member(i): {**shared, "hook_point": self.hook_point(i)} for i in range(self.n_layers)}


def load_transcoder_sets(path) -> dict[str, TranscoderSet]:
    """The transcoder sets sweep file ``path`` declares (``TranscoderSet``), by set name."""
    load_sweep(path)  # every entry checked, as when the code location loads
    specs = load_yaml(path, "sweep file")
    return {name: TranscoderSet.from_spec(name, spec, path) for name, spec in specs.items()
            if TRANSCODER_SET in spec}


RESEEDS = "seeds"  # the sweep-entry key asking for S reseeds of one SAE
RESEED_SUFFIX = "-s"  # a reseed member is <entry>-s<seed>


@dataclass(frozen=True)
class ReseedGroup:
    """S trainings of one SAE that differ only in their init seed, declared as one sweep entry::

        topk-16k-k32: {variant: topk, n_latents: 16384, k: 32, seeds: 3}

    trains ``topk-16k-k32-s0``, ``-s1``, ``-s2`` (seeds ``seed`` … ``seed + S - 1``; ``seed``, the
    entry's own, defaults to 0), each its own partition of sae_checkpoint and sae_eval; the
    comparison reports their metrics as mean ± sd (``sae_platform.reseeds``)."""

    name: str
    seeds: tuple[int, ...]

    @classmethod
    def from_spec(cls, name: str, spec: dict, path) -> "ReseedGroup":
        """The reseed group sweep entry ``name`` declares; SettingsError naming the file, entry and fix."""
        count, first = spec[RESEEDS], spec.get("seed", 0)
        for key, value, low in ((RESEEDS, count, 1), ("seed", first, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SettingsError(f"sweep entry {name!r} in {path}: {key} is {value!r}, not an integer >= {low}",
                                    "write e.g. {variant: topk, n_latents: 4096, k: 32, seeds: 3}")
        if TRANSCODER_SET in spec:
            raise SettingsError(f"sweep entry {name!r} in {path} has both seeds and transcoder_set",
                                "reseed one SAE per entry: drop seeds, or declare the set without it")
        return cls(name, tuple(range(first, first + count)))

    def member(self, seed: int) -> str:
        """The sweep entry (SAE name) of the reseed with init seed ``seed``."""
        return f"{self.name}{RESEED_SUFFIX}{seed}"

    @property
    def members(self) -> list[str]:
        """Member SAE names, in seed order."""
        return [self.member(seed) for seed in self.seeds]

    def member_specs(self, spec: dict) -> dict[str, dict]:
        """Each member's sweep entry: ``spec`` without ``seeds``, with its own ``seed``."""
        shared = {k: v for k, v in spec.items() if k != RESEEDS}
        return {self.member(seed): {**shared, "seed": seed} for seed in self.seeds}


def load_reseed_groups(path) -> dict[str, ReseedGroup]:
    """The reseed groups sweep file ``path`` declares (``ReseedGroup``), by entry name."""
    load_sweep(path)  # every entry checked, as when the code location loads
    specs = load_yaml(path, "sweep file")
    return {name: ReseedGroup.from_spec(name, spec, path) for name, spec in specs.items() if RESEEDS in spec}


def checkpoint_name(sae_name: str) -> str:
    """``sae/<sae_name>``: the committed checkpoint of SAE ``sae_name``."""
    return f"{CHECKPOINTS}/{check_sae_name(sae_name)}"


def trained_saes(store) -> list[str]:
    """Names of the SAEs with a committed checkpoint."""
    return [name.split("/", 1)[1] for name in store.committed_names(CHECKPOINTS)]


def checkpoint_version(store, sae_name: str) -> str | None:
    """The version of ``sae_name``'s committed checkpoint (None before any): what every derived
    artifact pins (``pinned_checkpoint``)."""
    pointer = store.pointer(checkpoint_name(sae_name))
    return None if pointer is None else pointer["version"]


def trained_on(store, sae_name: str, cfg: dict | None = None) -> str:
    """The shuffled store (so the hook point) the last committed checkpoint of ``sae_name`` was
    trained on; with ``cfg`` (a loaded checkpoint's cfg.json, whose ``data`` is what its commit
    pointer recorded), the store that checkpoint version was trained on. StorageError when there
    is no checkpoint."""
    if cfg is not None:
        return cfg["data"]["shuffle"]
    store.require(checkpoint_name(sae_name), f"SAE checkpoint {sae_name!r}", "materialize sae_checkpoint first")
    return store.pointer(checkpoint_name(sae_name))["data"]["shuffle"]


PIN = "checkpoint"  # the field every artifact derived from a checkpoint records its version in


def checkpoint_pin(version: str | None) -> dict:
    """``{"checkpoint": version}``: what a writer of an artifact derived from checkpoint ``version``
    records (as pointer info, or a top-level field of its record), read back by ``pinned_checkpoint``.
    Read the version (``checkpoint_version``) before loading the checkpoint, so a commit in between
    makes the artifact look stale rather than current."""
    return {PIN: version}


def pinned_checkpoint(record: dict | None) -> str | None:
    """The checkpoint version a derived artifact was built from: the ``checkpoint`` field of its
    record (a commit pointer, a lineage record, a site pointer); None when it has none. A lineage
    record written before the field existed names it as ``sae_checkpoint.version`` (read here, so
    that upgrading does not make every feature table look stale)."""
    if record is None:
        return None
    return record.get(PIN) or (record.get("sae_checkpoint") or {}).get("version")


BATCHES_PIN = "batches"  # the field a site pointer records the described batches in: {key: version}


SHARDS_PIN = "feature_shards"  # the field a site pointer records how many feature shards it shows in


def shown_shards(record: dict | None) -> int:
    """How many feature shards a site pointer says its site shows: ``N_FEATURE_SHARDS`` for a site
    built before the count was recorded (the fixed one-shard-per-group layout of then)."""
    return int((record or {}).get(SHARDS_PIN) or N_FEATURE_SHARDS)


def batches_pin(lineage: dict) -> dict:
    """``{"batches": {key: version}}`` of the activation batches a lineage record describes: what a
    site pointer records beside its checkpoint (``described_batches`` reads it back)."""
    return {BATCHES_PIN: described_batches(lineage)}


def described_batches(record: dict | None) -> dict[str, str] | None:
    """key → version of the activation batches a derived artifact describes: a site pointer's
    ``batches``, or a lineage record's ``activation_partitions``; None when it records neither
    (a site built before batches were recorded: it counts as behind)."""
    if record is None:
        return None
    if BATCHES_PIN in record:
        return record[BATCHES_PIN]
    parts = record.get("activation_partitions")
    return None if parts is None else {p["key"]: p["version"] for p in parts}


def is_current(store, sae_name: str, record: dict | None) -> bool:
    """Whether a derived artifact's ``record`` pins ``sae_name``'s current checkpoint."""
    current = checkpoint_version(store, sae_name)
    return current is not None and pinned_checkpoint(record) == current


# -- evaluation, exports and reports ------------------------------------------------------------

def export_name(sae_name: str) -> str:
    """``saelens/<sae_name>``: the checkpoint in SAELens's on-disk layout (export.export_run)."""
    return f"{EXPORTS}/{check_sae_name(sae_name)}"


def circuit_tracer_name(set_name: str) -> str:
    """``circuit_tracer/<set_name>``: transcoder set ``set_name`` (``TranscoderSet``) in
    circuit-tracer's layout (circuit_tracer.export_transcoder_set)."""
    return f"{CIRCUIT_TRACER_EXPORTS}/{check_name(set_name, 'transcoder set name')}"


def eval_name(sae_name: str) -> str:
    """The artifact holding SAE ``sae_name``'s evaluation (report.json, density.npy, held-out codes,
    the SAEBench result files of ``saebench_result_file``)."""
    return f"{EVALUATIONS}/{check_sae_name(sae_name)}"


def sparse_probing_name(sae_name: str) -> str:
    """The artifact holding SAE ``sae_name``'s k-sparse probing (``sparse_probing``): the result and
    the same figures in SAEBench's output schema."""
    return f"{SPARSE_PROBING}/{check_sae_name(sae_name)}"


def absorption_name(sae_name: str) -> str:
    """``absorption/<sae_name>``: SAE ``sae_name``'s feature-absorption result (absorption.py)."""
    return f"{ABSORPTION}/{check_sae_name(sae_name)}"


def saebench_result_file(eval_type_id: str) -> str:
    """``saebench_<eval_type_id>.json``: one SAEBench result file (``saebench_results``), inside
    the version of the evaluation artifact that computed it (``eval/<sae_name>`` for ``core``)."""
    return f"saebench_{check_name(eval_type_id, 'SAEBench eval type id')}.json"


SWEEP_COMPARISON = "sweep_comparison.html"  # reports/<file>: every evaluated SAE of the sweep side by side
SCALING_LAWS = "scaling_laws.json"  # reports/<file>: the sweep's scaling-law fits (sae_platform.scaling)
SCALING_LAWS_PLOT = "scaling_laws.png"  # reports/<file>: their log-log plot


def report_path(store, sae_name: str | None, file: str) -> str:
    """A training report picture or page: ``reports/<sae_name>/<file>``, or ``reports/<file>`` for
    the whole sweep (``sae_name`` None)."""
    return store.path(REPORTS, file) if sae_name is None else store.path(REPORTS, check_sae_name(sae_name), file)


def reports_folder(store) -> str:
    """``reports/``: the folder the feature browser's server also serves, under its URL path
    ``reports_url_path``."""
    return store.path(REPORTS)


def reports_url_path(file: str = SWEEP_COMPARISON) -> str:
    """The path, relative to a feature browser's address, at which its server serves
    ``reports/<file>`` (``sae_platform.browser.server``): ``reports/sweep_comparison.html``."""
    return f"{REPORTS}/{file}"


# -- feature tables -----------------------------------------------------------------------------

# Feature shard GROUPS: the feature assets' static partitions f0 … f<N-1> (assets/partitions.py).
# An SAE's latents are cut into a multiple of N feature shards (tables f0, f1, …), as many as its
# jobs' memory budget needs (``feature_layout.plan_layout``; each shard's range from the SAE's
# width: ``features.feature_shards``); group g runs shards g, g + N, … one after the other. Up to
# ~250k latents at the default 2 GiB budget that is one shard per group: shard i = group i.
N_FEATURE_SHARDS = 4


def features_folder(store, sae_name: str | None = None) -> str:
    """``features/`` (every SAE's tables), or ``features/<sae_name>/``."""
    return store.path(FEATURES) if sae_name is None else store.path(FEATURES, check_sae_name(sae_name))


def described_saes(store) -> list[str]:
    """Names of the SAEs with at least one committed feature-table shard."""
    folder = features_folder(store)
    if not store.fs.exists(folder):
        return []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in store.fs.ls(folder, detail=False)]
    return sorted(n for n in names if store.committed_names(f"{FEATURES}/{n}/tables"))


def codes_name(sae_name: str, partition: str) -> str:
    return f"{FEATURES}/{check_sae_name(sae_name)}/codes/{check_key(partition)}"


def partials_folder(store, sae_name: str, partition: str | None = None) -> str:
    """``features/<sae_name>/partial`` (every batch's pass-1 partials), or one batch's."""
    base = store.path(FEATURES, check_sae_name(sae_name), "partial")
    return base if partition is None else f"{base}/{check_key(partition)}"


def partial_name(sae_name: str, partition: str, shard_index: int) -> str:
    return f"{FEATURES}/{check_sae_name(sae_name)}/partial/{check_key(partition)}/f{int(shard_index)}"


def tables_name(sae_name: str, shard_index: int) -> str:
    return f"{FEATURES}/{check_sae_name(sae_name)}/tables/f{int(shard_index)}"


def logits_name(sae_name: str, shard_index: int) -> str:
    return f"{FEATURES}/{check_sae_name(sae_name)}/logits/f{int(shard_index)}"


def lineage_record_path(store, sae_name: str, shard_index: int) -> str:
    """Where ``feature_topk`` records the lineage of shard ``shard_index`` (with its Dagster run)."""
    return store.path(FEATURES, check_sae_name(sae_name), "lineage", f"f{int(shard_index)}.json")


def contexts_partial_name(sae_name: str, partition: str) -> str:
    return f"{FEATURES}/{check_sae_name(sae_name)}/contexts_partial/{check_key(partition)}"


def contexts_name(sae_name: str, shard_index: int) -> str:
    return f"{FEATURES}/{check_sae_name(sae_name)}/contexts/f{int(shard_index)}"


def explanations_name(sae_name: str, shard_index: int) -> str:
    """N2G explanations, nearest and co-occurring features of one feature shard."""
    return f"{FEATURES}/{check_sae_name(sae_name)}/explanations/f{int(shard_index)}"


def llm_explanations_name(sae_name: str, shard_index: int) -> str:
    return f"{FEATURES}/{check_sae_name(sae_name)}/llm_explanations/f{int(shard_index)}"


# -- what to do when an artifact is damaged ------------------------------------------------------

_WRITING_STAGE = {  # the CLI command that writes each kind ({first}: the name's segment after the prefix)
    MODELS: "any stage that loads the base model (e.g. sae-platform backfill --all), which converts it again",
    ACTIVATIONS: "sae-platform backfill {first}, then sae-platform shuffle",
    SHUFFLE_SCRATCH: "sae-platform shuffle",
    SHUFFLED: "sae-platform shuffle",
    CHECKPOINTS: "sae-platform train {first}",
    EVALUATIONS: "sae-platform train {first}",
    SPARSE_PROBING: "sae-platform train {first}",
    EXPORTS: "sae-platform train {first}",
    REPORTS: "sae-platform train {first}",
    FEATURES: "sae-platform features --sae {first}",
    BROWSER: "sae-platform features --sae {first}",
}


def rebuild_fix(store, name: str) -> str:
    """The fix for a damaged or incomplete artifact ``name``: delete it (a stage skips an artifact
    that is committed and current) and re-run the stage that writes it, by its CLI command."""
    prefix, _, rest = name.partition("/")
    return f"delete {store.url(store.path(name))} and re-run the stage that writes it: {writing_stage(name)}"


def writing_stage(name: str) -> str:
    """The CLI command that writes artifact ``name`` again (e.g. ``sae-platform backfill alpha``)."""
    prefix, _, rest = name.partition("/")
    command = _WRITING_STAGE.get(prefix, "re-materialize the asset that writes it (Dagster UI)")
    return command.format(first=rest.split("/", 1)[0])


# -- the feature browser and stage records ----------------------------------------------------

def browser_dir(store, sae_name: str | None = None) -> str:
    """``browser/`` (every SAE's site), or the site of ``sae_name``."""
    return store.path(BROWSER) if sae_name is None else store.path(BROWSER, check_sae_name(sae_name))


def neuronpedia_name(sae_name: str) -> str:
    """``neuronpedia/<sae_name>``: SAE ``sae_name``'s features in Neuronpedia's import layout (neuronpedia.py)."""
    return f"{NEURONPEDIA}/{check_sae_name(sae_name)}"


NEURONPEDIA_RECORD_KINDS = ("features", "activations", "explanations")  # batched, one record a line
NEURONPEDIA_SAELENS = "saelens"  # beside the records: the SAELens weights the source record points to


def neuronpedia_source_dir(model_id: str, source_id: str) -> str:
    """``<modelId>/<sourceId>`` inside an export version: where Neuronpedia's importer looks for one source."""
    return f"{model_id}/{source_id}"


def neuronpedia_batch_file(kind: str, batch: int) -> str:
    """``<kind>/batch-<n>.jsonl.gz`` inside a source folder (kind: ``NEURONPEDIA_RECORD_KINDS``)."""
    if kind not in NEURONPEDIA_RECORD_KINDS:
        raise StorageError(f"{kind!r} is not a batched Neuronpedia record kind",
                           f"use one of {', '.join(NEURONPEDIA_RECORD_KINDS)}")
    return f"{kind}/batch-{int(batch)}.jsonl.gz"


def stage_records(store, asset: str) -> list[str]:
    """The paths of every stage record of ``asset`` (one per partition built; ``stage_record_path``)."""
    folder = store.path(STAGE_RECORDS, check_key(asset))
    return sorted(p for p in store.fs.ls(folder, detail=False) if p.endswith(".json")) \
        if store.fs.exists(folder) else []


def stage_record_path(store, asset: str, partition: str) -> str:
    """What the last build of an asset's partition (or ``all``) recorded: its data version, the
    metadata it showed and its checks' verdicts (a skipped stage shows them again)."""
    return store.path(STAGE_RECORDS, check_key(asset), f"{check_key(partition)}.json")

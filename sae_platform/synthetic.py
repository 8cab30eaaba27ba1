"""Synthetic activations with known ground truth: a data source whose true features are known.

An SAE trained on a language model's activations cannot be scored against the features it should
have found, because nobody knows them. This generator draws activations from a dictionary it
knows (in the manner of SAELens's SynthSAEBench, ``sae_lens.synthetic``), so
``sae_platform.ground_truth`` can say how many of the true features an SAE recovered.

The model of the data, every draw seeded (``SyntheticSettings.seed``):

* **Directions**: ``n_features`` unit vectors in ``d_model`` dimensions, each a normalised
  standard Gaussian draw. With ``n_features > d_model`` they cannot be orthogonal: superposition.
* **Firing probabilities**: Zipfian, p_i ∝ (i + 1)^-``zipf_exponent`` for feature i in rank order,
  scaled so the expected number of active features per row is ``mean_l0`` (each p_i capped at 1).
* **Hierarchy**: the ``n_parents`` most frequent features are parents; the next
  ``n_parents × children_per_parent`` are their children (round-robin). A child fires only when
  its parent fires, and at most one child of a parent fires (mutual exclusion): given its parent,
  child c fires with probability ``child_given_parent`` × p_c / Σ_siblings p (one categorical draw
  per parent and row). A child's own Zipf weight only sets its share among its siblings.
* **Correlation**: a **Gaussian copula with low-rank-plus-diagonal correlation**. For each row,
  z = √ρ · F u + √(1 − ρ) · ε with F [n_features, r] unit-norm loadings, u ~ N(0, I_r), ε ~ N(0, I),
  ρ = ``correlation_strength``, r = ``correlation_rank``; a feature that is not a child fires iff
  z_i < Φ⁻¹(p_i). Every z_i is standard normal, so the marginal firing rates are exactly p_i while
  features sharing loadings fire together.
* **Magnitudes**: a firing feature's coefficient is |N(1, ``magnitude_std``²)| (folded normal),
  drawn independently per firing.
* **Noise**: optional isotropic Gaussian noise N(0, ``noise_std``² I_d) added to every row.

A row is x = Σ_i c_i · direction_i (+ noise), c the row's true codes [n_features].

The data enters the pipeline as ordinary activation partitions (``write_partition``, through
``activations.cache_partition``), so the shuffle, training, evaluation and feature tables read it
unchanged; the truth (directions, probabilities, hierarchy, loadings) is committed once as
``synthetic/<truth_id>`` (``commit_truth``) and read back by ``read_truth``. Rows are never stored
with their codes: partition ``i``'s rows, and the held-out rows ground-truth metrics are measured
on, are regenerated from the seed and the truth (``partition_stream``, ``heldout_stream``).
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import scipy.sparse
import torch

from sae_platform.activations import CacheSettings, cache_partition
from sae_platform.catalog import HookEntry, synthetic_truth_name
from sae_platform.corpus import Contexts, Document
from sae_platform.errors import StorageError
from sae_platform.settings import SettingsError, setting, validate

# The hook point synthetic partitions record: nominal (no model is read; their ``model`` is
# ``synthetic:<truth_id>``), a residual stream's name so every consumer of a hook name (the SAELens
# export, the browser's lineage) reads it as one.
HOOK_NAME = "blocks.0.hook_resid_post"
START_TOKEN = 0  # position 0 of every synthetic context: a start token, never a training row
TRUTH_FILE = "truth.npz"
SETTINGS_FILE = "settings.json"
GENERATOR_VERSION = 1  # bump when the same settings would draw other data


@dataclass(frozen=True)
class SyntheticSettings:
    """Settings of the synthetic data source (``resources.synthetic.config``). With ``n_features``
    unset the activations are cached from text as usual; set, every activation partition is drawn
    by this generator instead and no base model is read."""

    n_features: int | None = setting(None, "true features (directions); null: cache activations from text", ge=2)
    d_model: int = setting(256, "dimensions of a row", ge=2)
    n_partitions: int = setting(4, "activation partitions drawn (synthetic-000, synthetic-001, …)", ge=1)
    contexts_per_partition: int = setting(64, "contexts of ctx_len tokens per partition (position 0 is a start "
                                              "token, not a row)", ge=1)
    mean_l0: float = setting(24.0, "expected number of firing features per row", gt=0)
    zipf_exponent: float = setting(0.5, "firing probability ∝ (rank + 1)^-exponent", ge=0)
    n_parents: int = setting(64, "parent features (the most frequent ones)", ge=0)
    children_per_parent: int = setting(4, "children of each parent; at most one fires, only with its parent", ge=0)
    child_given_parent: float = setting(0.8, "probability that one of a firing parent's children fires", ge=0, le=1)
    correlation_rank: int = setting(8, "rank r of the copula's shared factors (0: independent firing)", ge=0)
    correlation_strength: float = setting(0.3, "ρ: share of each copula variable's variance from the shared "
                                               "factors", ge=0, le=0.99)
    magnitude_std: float = setting(0.5, "σ of a firing's magnitude |N(1, σ²)|", ge=0)
    noise_std: float = setting(0.0, "σ of isotropic Gaussian noise added to each coordinate", ge=0)
    seed: int = setting(0, "seed of every draw (truth, partitions, held-out rows)", ge=0)
    heldout_rows: int = setting(8192, "fresh rows the ground-truth metrics are measured on", ge=1)

    def __post_init__(self):
        validate(self, "resources.synthetic.config")
        if self.n_features is not None and self.n_parents * (1 + self.children_per_parent) > self.n_features:
            raise SettingsError(
                f"resources.synthetic.config: {self.n_parents} parents with {self.children_per_parent} children "
                f"each need {self.n_parents * (1 + self.children_per_parent)} features, but n_features is "
                f"{self.n_features}", "lower n_parents or children_per_parent, or raise n_features")

    @property
    def enabled(self) -> bool:
        return self.n_features is not None

    def partition_keys(self) -> list[str]:
        """The activation partitions this source draws, in order."""
        return [partition_key(i) for i in range(self.n_partitions)]

    def truth_fields(self) -> dict:
        """The settings the truth and the rows depend on (not how many are drawn), with the
        generator's version: equal fields draw equal data."""
        drawn = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in ("n_partitions", "contexts_per_partition", "heldout_rows")}
        return {**drawn, "generator_version": GENERATOR_VERSION}

    def truth_id(self) -> str:
        """Content address of the truth: a digest of ``truth_fields``."""
        text = json.dumps(self.truth_fields(), sort_keys=True)
        return "t" + hashlib.sha256(text.encode()).hexdigest()[:16]


PARTITION_PREFIX = "synthetic-"


def partition_key(index: int) -> str:
    return f"{PARTITION_PREFIX}{index:03d}"


def partition_index(key: str) -> int:
    """The draw index of partition ``key`` (``synthetic-007`` → 7); SettingsError otherwise."""
    digits = key.removeprefix(PARTITION_PREFIX)
    if not key.startswith(PARTITION_PREFIX) or not digits.isdigit():
        raise SettingsError(f"{key!r} is not a synthetic partition key", "synthetic partitions are named "
                                                                          f"{partition_key(0)}, {partition_key(1)}, …")
    return int(digits)


# -- the truth --------------------------------------------------------------------------------------

@dataclass
class Truth:
    """The known dictionary and how it fires. N = n_features, d = d_model, r = correlation_rank.

    directions [N, d] float32 unit rows; firing_prob [N] marginal probability of each feature;
    root_prob [N] the copula's firing probability of a feature that is not a child (0 for
    children); parent [N] int64 the parent of a child, -1 otherwise; child_prob [N] a child's
    probability given its parent (0 otherwise); loadings [N, r] the copula's unit-norm factor
    loadings."""

    settings: SyntheticSettings
    directions: np.ndarray
    firing_prob: np.ndarray
    root_prob: np.ndarray
    parent: np.ndarray
    child_prob: np.ndarray
    loadings: np.ndarray

    ARRAYS = ("directions", "firing_prob", "root_prob", "parent", "child_prob", "loadings")

    @property
    def n_features(self) -> int:
        return int(self.directions.shape[0])

    def children_of(self) -> dict[int, np.ndarray]:
        """Parent → its children, in feature order."""
        return {int(p): np.flatnonzero(self.parent == p) for p in np.unique(self.parent[self.parent >= 0])}


def make_truth(settings: SyntheticSettings) -> Truth:
    """The truth ``settings`` describe (deterministic in ``settings.truth_fields()``)."""
    if not settings.enabled:
        raise SettingsError("resources.synthetic.config.n_features is not set", "set it to draw synthetic data")
    n, d, r = settings.n_features, settings.d_model, settings.correlation_rank
    rng = np.random.default_rng([settings.seed, 0])
    directions = rng.standard_normal((n, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    loadings = rng.standard_normal((n, r))
    loadings /= np.maximum(np.linalg.norm(loadings, axis=1, keepdims=True), 1e-12)
    weight = (np.arange(n) + 1.0) ** -settings.zipf_exponent
    parent = np.full(n, -1, dtype=np.int64)
    n_children = settings.n_parents * settings.children_per_parent
    children = np.arange(settings.n_parents, settings.n_parents + n_children)
    parent[children] = children % settings.n_parents if settings.n_parents else []
    child_prob = np.zeros(n)
    for p in range(settings.n_parents):
        siblings = children[parent[children] == p]
        child_prob[siblings] = settings.child_given_parent * weight[siblings] / weight[siblings].sum()
    is_root = parent < 0
    scale = _zipf_scale(weight, is_root, settings)
    root_prob = np.where(is_root, np.minimum(1.0, scale * weight), 0.0)
    firing_prob = np.where(is_root, root_prob, root_prob[np.maximum(parent, 0)] * child_prob)
    return Truth(settings, directions.astype(np.float32), firing_prob, root_prob, parent, child_prob,
                 loadings.astype(np.float32))


def _zipf_scale(weight: np.ndarray, is_root: np.ndarray, settings: SyntheticSettings) -> float:
    """s with E[L0] = Σ_roots min(1, s·w) + Σ_parents min(1, s·w)·child_given_parent = mean_l0
    (bisection: E[L0] grows with s). SettingsError when mean_l0 exceeds what every root firing
    always would give."""
    parents = np.zeros_like(is_root)
    parents[:settings.n_parents] = settings.children_per_parent > 0

    def expected_l0(s: float) -> float:
        p = np.minimum(1.0, s * weight)
        return float(p[is_root].sum() + settings.child_given_parent * p[parents].sum())

    ceiling = expected_l0(1.0 / weight[is_root].min())
    if settings.mean_l0 >= ceiling:
        raise SettingsError(f"resources.synthetic.config.mean_l0 = {settings.mean_l0} needs more firing than "
                            f"{int(is_root.sum())} root features can give (at most {ceiling:.1f})",
                            "lower mean_l0 or raise n_features")
    low, high = 0.0, 1.0 / weight[is_root].min()
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if expected_l0(middle) < settings.mean_l0 else (low, middle)
    return (low + high) / 2


# -- drawing rows -----------------------------------------------------------------------------------

@dataclass
class Draw:
    """Rows and the truth behind them: acts [n, d] float32, codes [n, N] float32 (the true
    coefficients; 0 where a feature is off)."""

    acts: np.ndarray
    codes: np.ndarray


def sample(truth: Truth, rng: np.random.Generator, n_rows: int) -> Draw:
    """``n_rows`` rows drawn by the model in the module docstring. Memory: ~3 × n_rows × N floats."""
    s = truth.settings
    n = truth.n_features
    rho = s.correlation_strength if s.correlation_rank else 0.0
    z = rng.standard_normal((n_rows, n), dtype=np.float32)
    z *= math.sqrt(1 - rho)
    if rho:
        z += math.sqrt(rho) * rng.standard_normal((n_rows, s.correlation_rank), dtype=np.float32) @ truth.loadings.T
    fires = z < _normal_quantile(truth.root_prob).astype(np.float32)
    parents = truth.children_of()
    pick = rng.random((n_rows, len(parents)))
    for column, (p, kids) in enumerate(parents.items()):
        upper = np.cumsum(truth.child_prob[kids])
        chosen = np.searchsorted(upper, pick[:, column], side="right")  # len(kids): no child
        for j, kid in enumerate(kids):
            fires[:, kid] = fires[:, p] & (chosen == j)
    codes = np.zeros((n_rows, n), dtype=np.float32)
    codes[fires] = np.abs(1.0 + s.magnitude_std * rng.standard_normal(int(fires.sum()), dtype=np.float32))
    acts = scipy.sparse.csr_matrix(codes) @ truth.directions  # ~mean_l0 of N per row: sparse is ~100x faster
    if s.noise_std:
        acts += (s.noise_std * rng.standard_normal(acts.shape)).astype(np.float32)
    return Draw(acts.astype(np.float32), codes)


def _normal_quantile(p: np.ndarray) -> np.ndarray:
    """Φ⁻¹(p) elementwise (−inf at 0, +inf at 1)."""
    return torch.special.ndtri(torch.as_tensor(p, dtype=torch.float64)).numpy()


def partition_stream(settings: SyntheticSettings, index: int) -> np.random.Generator:
    """The draws of partition ``index``: independent of every other partition's."""
    return np.random.default_rng([settings.seed, 1, index])


def heldout_stream(settings: SyntheticSettings) -> np.random.Generator:
    """The draws of the held-out rows the ground-truth metrics read: no partition shares them."""
    return np.random.default_rng([settings.seed, 2])


def chance_stream(settings: SyntheticSettings) -> np.random.Generator:
    """The draws of the random decoder ``ground_truth.chance_mcc`` scores: no truth, partition or
    held-out stream shares them (a seed sequence [seed] equals [seed, 0], the truth's)."""
    return np.random.default_rng([settings.seed, 3])


def heldout_draws(truth: Truth, batch_rows: int = 1024):
    """``settings.heldout_rows`` fresh rows in batches of ``batch_rows``: Draw each."""
    rng = heldout_stream(truth.settings)
    for start in range(0, truth.settings.heldout_rows, batch_rows):
        yield sample(truth, rng, min(batch_rows, truth.settings.heldout_rows - start))


# -- the truth as an artifact -----------------------------------------------------------------------

def commit_truth(store, truth: Truth) -> str:
    """Commit ``synthetic/<truth_id>`` (settings.json, truth.npz of plain arrays) unless it is
    committed already (same id, same content); returns the artifact name."""
    name = synthetic_truth_name(truth.settings.truth_id())
    if store.resolve(name) is not None:
        return name
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **{a: getattr(truth, a) for a in Truth.ARRAYS})
    with store.writing(name, truth_id=truth.settings.truth_id()) as version:
        store.write_json(f"{version}/{SETTINGS_FILE}", asdict(truth.settings))
        store.fs.pipe_file(f"{version}/{TRUTH_FILE}", buffer.getvalue())
    return name


def read_truth(store, truth_id: str) -> Truth:
    """The committed truth ``synthetic/<truth_id>``; arrays read without pickle. StorageError
    naming the artifact and the fix when it is missing or damaged."""
    import io

    name = synthetic_truth_name(truth_id)
    fix = "re-materialize the activations (they commit the truth of the synthetic data they draw)"
    version = store.require(name, "the ground truth of the synthetic activations", fix)
    stored = store.read_json(f"{version}/{SETTINGS_FILE}")
    try:
        settings = SyntheticSettings(**stored)
        with np.load(io.BytesIO(store.fs.cat_file(f"{version}/{TRUTH_FILE}")),
                     allow_pickle=False) as arrays:
            values = {a: arrays[a] for a in Truth.ARRAYS}
    except (TypeError, ValueError, KeyError, OSError) as error:
        raise StorageError(f"the ground truth {version} is damaged ({error})", fix) from error
    return Truth(settings, **values)


# -- the source that activations.cache_partition reads ----------------------------------------------

class SyntheticSource:
    """Stands where ``cache_partition`` expects a model: it hands out partition ``index``'s rows
    context batch by context batch, in order (``residual``), and describes them (d_model,
    hook_name, start_token_id). Token ids name the strongest true feature of each row (1 + its
    index; N + 1 when none fires), so feature tables' top tokens read as true feature ids."""

    layer = 0
    n_layers = 1
    hook_name = HOOK_NAME
    start_token_id = START_TOKEN

    def __init__(self, truth: Truth, index: int, ctx_len: int):
        s = truth.settings
        draw = sample(truth, partition_stream(s, index), s.contexts_per_partition * ctx_len)
        self.d_model = s.d_model
        self.rows = torch.from_numpy(draw.acts).reshape(s.contexts_per_partition, ctx_len, s.d_model)
        tokens = _strongest_tokens(draw.codes, truth.n_features).reshape(s.contexts_per_partition, ctx_len)
        tokens[:, 0] = START_TOKEN
        self.tokens, self._next = tokens, 0

    @property
    def entries(self) -> list[HookEntry]:
        return [HookEntry(HOOK_NAME)]

    def residual(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of the next ``len(ids)`` contexts [b, ctx_len, d_model] (``ids`` must be them)."""
        batch = slice(self._next, self._next + len(ids))
        if not torch.equal(ids, torch.from_numpy(self.tokens[batch]).long()):
            raise RuntimeError("synthetic contexts were read out of order")
        self._next += len(ids)
        return self.rows[batch]


def write_partition(store, key: str, settings: SyntheticSettings, cache: CacheSettings, progress=None) -> dict:
    """Draw partition ``key`` (``synthetic-<i>``) and commit it as an ordinary activation partition
    (``activations.cache_partition``: the same arrays, attributes, row rule and commit), after
    committing the truth it is drawn from. Each context is one document. The store's attributes
    and the partition's fingerprint record ``synthetic`` = {truth_id, partition_index} (what
    ``ground_truth`` reads back) and ``model`` = ``synthetic:<truth_id>``, so partitions of other
    settings or of a language model are refused beside them. Returns cache_partition's summary."""
    truth = make_truth(settings)
    commit_truth(store, truth)
    index = partition_index(key)
    source = SyntheticSource(truth, index, cache.ctx_len)
    n_contexts = settings.contexts_per_partition
    doc_ids = np.repeat(np.arange(n_contexts, dtype=np.int32)[:, None], cache.ctx_len, axis=1)
    docs = [Document(c, f"{key}/context-{c}", "") for c in range(n_contexts)]
    provenance = {"synthetic": {"truth_id": settings.truth_id(), "partition_index": index}}
    return cache_partition(store, key, source, model_source(settings), docs, Contexts(source.tokens, doc_ids, 0),
                           cache, progress, entries=source.entries, provenance=provenance)


def model_source(settings: SyntheticSettings) -> str:
    """What synthetic partitions record as their model."""
    return f"synthetic:{settings.truth_id()}"


def synthetic_provenance(attrs: dict) -> dict | None:
    """{truth_id, partition_index} when a store's attributes describe synthetic rows, else None."""
    return attrs.get("synthetic")


# -- what the feature stages read in place of a language model ---------------------------------------

class SyntheticTokenizer:
    """The token strings of synthetic contexts (``SyntheticSource``): token 0 is the start token
    ``<s>``, token t in 1..N the row whose strongest true feature is t − 1 (shown ``f<t-1>``),
    N + 1 a row where none fires (``∅``). Has what the feature stages call on a Hugging Face
    tokenizer: ``decode``, ``batch_decode``, ``convert_ids_to_tokens``, ``len``."""

    def __init__(self, n_features: int):
        self.n_features = n_features

    def __len__(self) -> int:
        return self.n_features + 2

    def token(self, token_id: int) -> str:
        if token_id == START_TOKEN:
            return "<s>"
        return "∅" if token_id == self.n_features + 1 else f"f{token_id - 1}"

    def convert_ids_to_tokens(self, ids):
        return self.token(int(ids)) if isinstance(ids, int | np.integer) else [self.token(int(i)) for i in ids]

    def decode(self, ids, **_) -> str:
        return "".join(f"{self.token(int(i))} " for i in ids)

    def batch_decode(self, sequences, **_) -> list[str]:
        return [self.decode(ids) for ids in sequences]


def token_unembedding(truth: Truth) -> torch.Tensor:
    """[N + 2, d]: the true direction of each token's feature (zeros for ``<s>`` and ``∅``), so
    ``logits.logit_effects`` of a latent lists the true features its decoder row points along
    (W_dec[f] · direction): on synthetic data the browser's "logit effects" name true features."""
    matrix = torch.zeros(truth.n_features + 2, truth.settings.d_model)
    matrix[1:-1] = torch.from_numpy(truth.directions)
    return matrix


def heldout_contexts(truth: Truth, ctx_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Fresh held-out contexts as the feature explanations read them: (tokens [n, ctx_len] int32,
    rows [n, ctx_len, d] float32), n = ceil(heldout_rows / ctx_len), from the held-out stream."""
    n_contexts = -(-truth.settings.heldout_rows // ctx_len)
    rng = np.random.default_rng([truth.settings.seed, 3])  # not the stream the ground-truth figures read
    draw = sample(truth, rng, n_contexts * ctx_len)
    tokens = _strongest_tokens(draw.codes, truth.n_features).reshape(n_contexts, ctx_len)
    tokens[:, 0] = START_TOKEN
    return tokens, draw.acts.reshape(n_contexts, ctx_len, -1)


def _strongest_tokens(codes: np.ndarray, n_features: int) -> np.ndarray:
    """Token id of each row [n]: 1 + its strongest true feature, n_features + 1 when none fires."""
    return np.where(codes.max(1) > 0, 1 + codes.argmax(1), n_features + 1).astype(np.int32)

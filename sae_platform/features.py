"""Feature tables, pass 1: per-feature top activations, a uniform random sample, count, sum, max
and a histogram, computed streaming and sharded (docs/design.md, "Feature tables, context windows,
browser"); the settings and feature shards of every pass. Pass 2 (the merge into tables) is
``feature_merge``, the exactness check ``feature_check``, the selection's keys and buffers
``feature_select``.

Sharding. Pass 1 reads one *dataset shard* (one activation partition) and computes the partials
of *feature shards* (latents [start, stop), see ``feature_shards``): ``compute_partials`` feeds
every shard it is given from one encode; the pipeline (``feature_codes``) encodes a batch once,
commits its codes split by shard, and computes each shard's partial from its own codes, one shard
at a time, with the same results. Per feature it keeps a fixed amount of state, whatever the
partition's length:

- the ``top_k`` largest activations with their row;
- a uniform random sample of ``R = reservoir_factor * top_k`` activating tokens (activation > 0);
- the count, sum and max of the activations, and a histogram on fixed bins;
- and, per shard, the number of tokens (for density).

Pass 2 (``feature_merge.merge_partials``) folds the partials of every partition of one feature
shard into the final tables. Both passes are exact: the merged tables equal what one job reading
the whole dataset would produce (``feature_check.brute_force_check`` verifies it without a second
pass: pass 1 records every activating token of a fixed sample of *witness* features apart from the
selection, and counts and sums that must agree across the passes), whatever the feature sharding,
the grouping of partitions and the merge order. The activation values themselves are the SAE's: a
matmul's rounding can depend on its shape (on CPU a one-row batch takes another kernel; CUDA picks
kernels by shape), so the brute-force check replays pass 1's batch boundaries and then compares
bit for bit.

Selection (``feature_select``): the top-k by one int64 key per (activation, row), the random
sample by the smallest counter-based sample keys, each in a fixed per-feature buffer. Memory:
O(n_features * (top_k + R + bins)) plus one token batch, never the partition's length. Pass 1
runs on the SAE's device (CPU or CUDA; there ``sum`` is accumulated with atomics, so its last bits
may vary from run to run; everything else is deterministic).

Activations come from ``sae.encode_slice(x, start, stop)`` per shard (ReLU / JumpReLU / BatchTopK
multiply only the slice's encoder rows: all shards together multiply W_enc once). For variants
whose activations are a slice of the full sparse selection (TopK, Switch: ``encode_slice`` not
overridden) each token batch is encoded once with ``sae.encode`` and its sparse codes are split
among the shards: the same values, without a dense [batch, n_features] matrix, and the selection
runs once per row whatever the number of shards (``on_codes`` receives them:
``feature_codes.encode_codes`` commits them split by shard, for pass 1 per shard, the interval
examples and pass 3).

Histogram. 64 log-spaced bins over [1e-4, 1e4] (``HIST_EDGES``: 65 float32 edges,
``np.logspace(-4, 4, 65)``) plus underflow and overflow, 66 counts per feature:
``histogram[0]`` counts 0 < a < 1e-4, ``histogram[i]`` (1 <= i <= 64) counts
HIST_EDGES[i-1] <= a < HIST_EDGES[i], ``histogram[65]`` counts a >= 1e4. The same bins for every
shard, so histograms add.

Partials (pass-1 output) are committed under ``features/<sae_name>/partial/<partition>/f<shard_index>``
as ``partial.npz`` (arrays) plus ``meta.json``. A partial keeps only the latents that fired in its
batch (count > 0): ``fired`` (their local ids, ascending) and one row of each per-latent array per
fired latent, so its bytes grow with the latents that fired, not with the shard's width (a 2,535-token
batch fires at most 2,535 x k of 2^20 latents); stored, of those rows only the filled slots
(``filled_slots``) and nonzero histogram bins (the layout: ``partial_store``). Every other latent has
the empty state (``EMPTY_LATENT``), which ``Partial.dense`` fills in; a partial written before
partials were sparse has no ``fired`` and a row for every latent, and reads as it is.
"""

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sae_platform.activations import open_partition
from sae_platform.catalog import (
    DEFAULT_SAE_NAME,
    FIRST_STORE,
    check_name,
)
from sae_platform.errors import PlatformError, require_counts
from sae_platform.feature_plan import FIXED_JOB_BYTES
from sae_platform.feature_select import KEY_PAD, Selector, decode_top, partition_salt, sample_keys, top_keys
from sae_platform.sae import SparseAutoencoder, variant_class
from sae_platform.settings import setting, validate
from sae_platform.storage import ArtifactStore

HIST_EDGES = np.logspace(-4, 4, 65).astype(np.float32)
N_HIST_BINS = len(HIST_EDGES) + 1  # + underflow and overflow
MAX_ROWS = 2**31 - 1                # rows per partition (the top-k key packs 32 bits of row)
# Dense route (ReLU-like variants): bound the [batch, n_features] activation block.
DENSE_BATCH_ELEMENTS = 1 << 22
# Pass 1 folds the active entries of several token batches at once, up to about this many (and
# no more than a quarter of the feature slice's slots, so memory stays O(n_features * (top_k + R))).
UPDATE_ENTRIES = 1 << 18
MIN_UPDATE_ENTRIES = 1 << 14
# A latent with no activating token in a partial's batch: (dtype, value of every slot) of each
# per-latent array. Exactly what pass 1's state holds for it (its selectors' slots stay EMPTY, which
# decode to activation 0 / row -1 and sample key KEY_PAD; count, sum, max and histogram stay zero),
# and what folds into a merge as nothing (feature_merge); so a partial stores only the latents that
# fired and ``Partial.dense`` fills the others in with this.
EMPTY_LATENT = {"top_act": (np.float32, 0.0), "top_row": (np.int64, -1), "res_key": (np.int64, KEY_PAD),
                "res_row": (np.int64, -1), "res_act": (np.float32, 0.0), "count": (np.int64, 0),
                "sum": (np.float64, 0.0), "max": (np.float32, 0.0), "hist": (np.int64, 0)}


@dataclass(frozen=True)
class FeatureSettings:
    """Settings of the feature tables, context windows and browser (``resources.features.config``):
    which SAE they describe and how many examples they keep."""

    sae_name: str = setting(DEFAULT_SAE_NAME, "sweep entry whose checkpoint the tables describe")
    top_k: int = setting(20, "top activating examples per feature", ge=1)
    reservoir_factor: int = setting(10, "random examples kept per feature = reservoir_factor x top_k", ge=1)
    random_examples: int = setting(20, "random examples per feature shown with context (a prefix of the "
                                       "uniform sample is itself uniform)", ge=0)
    n_intervals: int = setting(5, "activation intervals for interval examples", ge=1)
    per_interval: int = setting(4, "examples per interval", ge=1)
    before: int = setting(16, "context tokens before an example", ge=0)
    after: int = setting(8, "context tokens after an example", ge=0)
    seed: int = setting(0, "seed of the random-example sample", ge=0)
    check_features: int = setting(64, "features per feature shard whose every activating token pass 1 records for "
                                      "the exactness check (matches_brute_force); the others are checked by "
                                      "counts and sums that must agree across the passes", ge=0)
    # 2 GiB: the demo's 16,384 latents stay one shard per group (today's layout), 2^20 latents at
    # d_model 64 get 16 shards of 65,536 (docs/scale.md, "Feature tables")
    memory_budget_bytes: int = setting(2 << 30, "bytes one feature-shard job may hold in memory: the planner "
                                                "(feature_layout.plan_layout) cuts the latents into the fewest "
                                                "feature shards, a multiple of the shard groups f0-f3, whose jobs "
                                                "fit it; a change that changes the shard count makes the tables "
                                                "stale", ge=FIXED_JOB_BYTES)
    rebuild: bool = setting(False, "rebuild the tables and browser even when they describe the current checkpoint")

    def __post_init__(self):
        validate(self, "resources.features.config")
        check_name(self.sae_name, "resources.features.config.sae_name")


class FeatureError(PlatformError):
    """Bad input to the feature-table passes (ranges, shapes, mismatched partials)."""



# ---------------------------------------------------------------------------------------------
# Feature shards
# ---------------------------------------------------------------------------------------------

def feature_shards(n_latents: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous latent ranges [start, stop) covering [0, n_latents), sizes differing by at most 1.
    With more shards than latents (a vector's one-latent dictionary, ``sae.vector``) some ranges are
    empty (start == stop): every stage still commits those shards, with no feature in them, so the
    pipeline's shard groups (``catalog.N_FEATURE_SHARDS``, at least one shard each) fit every SAE."""
    require_counts({"n_latents": n_latents, "n_shards": n_shards}, FeatureError)
    bounds = [n_latents * i // n_shards for i in range(n_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def feature_shard(n_latents: int, n_shards: int, index: int) -> tuple[int, int]:
    """The latent range of feature shard ``index`` of ``n_shards``."""
    shards = feature_shards(n_latents, n_shards)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_shards:
        raise FeatureError(f"feature shard index {index!r} is outside [0, {n_shards})",
                           f"use a shard index between 0 and {n_shards - 1}")
    return shards[index]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_range(sae, start: int, stop: int) -> None:
    if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= sae.n_latents):
        raise FeatureError(f"feature range [{start}, {stop}) is outside the SAE's latents [0, {sae.n_latents})",
                           f"pass 0 <= start < stop <= {sae.n_latents} (feature_shards(n_latents, n_shards) "
                           "gives valid ranges)")


def check_positive(name: str, value) -> None:
    """FeatureError unless ``value`` (the setting ``name``) is a positive integer."""
    require_counts({name: value}, FeatureError)


# ---------------------------------------------------------------------------------------------
# Histogram
# ---------------------------------------------------------------------------------------------

def hist_bins(vals: np.ndarray) -> np.ndarray:
    """Histogram bin of each activation (float32), as documented in the module docstring."""
    return np.searchsorted(HIST_EDGES, np.asarray(vals, dtype=np.float32), side="right")


def hist_bin_edges() -> list[float]:
    return [float(e) for e in HIST_EDGES]


# ---------------------------------------------------------------------------------------------
# Pass 1
# ---------------------------------------------------------------------------------------------

def filled_slots(count: np.ndarray, width: int) -> np.ndarray:
    """[F, width] bool: the filled slots of F latents' top-k or reservoir rows (``width`` = top_k or
    R), given their ``count`` [F] of activating tokens: the first min(count, width) of each row. Why
    this follows from the count: every activating token is offered to both selectors and enters
    while a row has fewer than ``width`` entries (its threshold is KEY_PAD until then, and every
    key is below it), so a row keeps min(count, width) entries, which ``Selector.finish`` sorts
    before the empty slots (an empty slot's key is KEY_PAD). A partial stores only these
    (``partial_store``); ``feature_check`` checks the tables' example counts by the same rule."""
    return np.arange(width) < np.minimum(np.asarray(count), width)[:, None]


@dataclass
class Partial:
    """Pass-1 state of one (partition, feature shard), as numpy arrays. The per-latent arrays
    (``ARRAYS``, shapes below with F = rows) hold one row per latent of ``latents``: the latents that
    fired in the batch (``fired``, what pass 1 returns and stores), or every latent of the shard
    (``fired`` None: a partial stored before partials were sparse, or ``dense()``)."""

    partition: str
    partition_version: str | None
    start: int
    stop: int
    top_k: int
    reservoir_size: int
    seed: int
    batch_rows: int
    n_tokens: int
    top_act: np.ndarray   # [F, top_k] float32, descending; 0 where empty
    top_row: np.ndarray   # [F, top_k] int64; -1 where empty
    res_key: np.ndarray   # [F, R] int64 ascending; KEY_PAD where empty
    res_row: np.ndarray   # [F, R] int64; -1 where empty
    res_act: np.ndarray   # [F, R] float32; 0 where empty
    count: np.ndarray     # [F] int64
    sum: np.ndarray       # [F] float64
    max: np.ndarray       # [F] float32
    hist: np.ndarray      # [F, N_HIST_BINS] int64
    # the exactness check's witness: every activating token of a fixed sample of features
    witness: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))          # [W] local ids, sorted
    witness_feature: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [E] local id
    witness_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))      # [E]
    witness_act: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))    # [E] > 0
    n_entries: int | None = None      # activating (row, feature) entries of the shard, counted apart
    entries_sum: float | None = None  # their activations' sum (float64), accumulated apart
    sae: dict = field(default_factory=dict)  # {"config": ..., "fingerprint": ...}
    diagnostics: dict = field(default_factory=dict)
    group: str = FIRST_STORE  # the partition's hook-point store the rows were read from (catalog.store_group)
    fired: np.ndarray | None = None  # [F] int64 local ids, ascending, of the latents with a row; None: all

    SLOTS = ("top_act", "top_row", "res_key", "res_row", "res_act")  # a row of top_k or R slots per latent
    ARRAYS = (*SLOTS, "count", "sum", "max", "hist")
    WITNESS = ("witness", "witness_feature", "witness_row", "witness_act")
    STORED = ("fired", *ARRAYS, *WITNESS)  # partial.npz's arrays by name (layouts: partial_store)

    @property
    def n_features(self) -> int:
        return self.stop - self.start

    @property
    def latents(self) -> np.ndarray:
        """Local ids (feature - start) of the per-latent arrays' rows, ascending."""
        return np.arange(self.n_features, dtype=np.int64) if self.fired is None else self.fired

    def row_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one latent's row of the per-latent array ``name`` (top_*, res_*, hist, or a scalar)."""
        width = {"top": self.top_k, "res": self.reservoir_size, "hist": N_HIST_BINS}.get(name.split("_")[0])
        return () if width is None else (width,)

    def filled(self, name: str) -> np.ndarray:
        """[F, width] bool: which slots of the slot array ``name`` (``SLOTS``) hold an example
        (``filled_slots`` of ``count``); the others hold ``EMPTY_LATENT``'s value."""
        return filled_slots(self.count, self.row_shape(name)[0])

    def dense(self) -> "Partial":
        """This partial with a row for every latent of [start, stop), those that did not fire in
        ``EMPTY_LATENT``'s state (new arrays; itself when already dense). Memory: O(F x (top_k + R))."""
        if self.fired is None:
            return self
        arrays = {}
        for name in self.ARRAYS:
            dtype, value = EMPTY_LATENT[name]
            arrays[name] = np.full((self.n_features, *self.row_shape(name)), value, dtype)
            arrays[name][self.fired] = getattr(self, name)
        return replace(self, fired=None, **arrays)

    def sparse(self) -> "Partial":
        """This partial with rows for the latents that fired only (count > 0): what is stored."""
        keep = self.count > 0
        if self.fired is not None and keep.all():
            return self
        return replace(self, fired=self.latents[keep], **{name: getattr(self, name)[keep] for name in self.ARRAYS})

    def meta(self) -> dict:
        return {"partition": self.partition, "partition_version": self.partition_version, "start": self.start,
                "stop": self.stop, "top_k": self.top_k, "reservoir_size": self.reservoir_size, "seed": self.seed,
                "batch_rows": self.batch_rows, "n_tokens": self.n_tokens, "sae": self.sae,
                "n_entries": self.n_entries, "entries_sum": self.entries_sum, "hist_bin_edges": hist_bin_edges(),
                "group": self.group}


@dataclass(frozen=True)
class StoredSAE:
    """An SAE as pass 2 of one feature shard sees it, without its weights: ``config`` (cfg.json's
    ``"sae"``: variant, d_model, n_latents, d_out …), the ``fingerprint`` of the weights that its
    pass-1 partials and sparse codes recorded (``sae_fingerprint``), and the ``device`` to compute
    on. Why: pass 2 of a TopK-style SAE (``sparse_variant``) reads only the shard's stored codes,
    never the weights, and a wide SAE's weights (512 MiB at 2^20 latents, d_model 64) would be
    most of its job's memory; the logit effects read the shard's decoder rows by slice
    (``sharded_checkpoint.decoder_rows``). Accepted where pass 2 takes an SAE (``merge_shard_tables``,
    ``feature_intervals``); its stored codes must be there (a FeatureError names the partition).
    ``dtype``: the weights' (cfg.json records none: the trainer's float32). A dense SAE's pass 1 takes
    its subclass ``latent_slice.LatentSlice``, which holds the weights of one feature shard's latents."""

    config: dict
    fingerprint: str
    device: torch.device
    dtype: torch.dtype = torch.float32

    @property
    def n_latents(self) -> int:
        return int(self.config["n_latents"])

    @property
    def d_model(self) -> int:
        return int(self.config["d_model"])

    @property
    def d_out(self) -> int | None:
        return self.config.get("d_out")

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None


def sparse_variant(variant: str) -> bool:
    """Whether ``variant``'s ``encode_slice`` is the slice of the full sparse selection (TopK,
    Switch): pass 1 stores its codes, and pass 2 reads them instead of encoding again."""
    return variant_class(variant).encode_slice is SparseAutoencoder.encode_slice


def sae_fingerprint(sae) -> str:
    """A digest of the SAE's config and weights: partials of different SAEs must never merge. A
    ``StoredSAE`` gives the fingerprint its partials recorded."""
    if isinstance(sae, StoredSAE):
        return sae.fingerprint
    return fingerprint_of(sae.config, sorted(sae.state_dict().items()))


def fingerprint_of(config: dict, blocks: Iterable[tuple[str, torch.Tensor]]) -> str:
    """``sae_fingerprint`` of an SAE of ``config`` whose state_dict, in name order, is ``blocks``:
    (name, a block of consecutive rows of that tensor), at least one block per tensor (an empty one for
    an empty tensor), so the digest can be taken of a checkpoint read block by block without ever
    holding a whole tensor (``sharded_checkpoint.weight_blocks``: a dense SAE's pass 1)."""
    digest = hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=16)
    last = None
    for name, block in blocks:
        if name != last:
            digest.update(name.encode())
            last = name
        digest.update(block.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def device_of(sae) -> torch.device:
    """The device of the SAE's weights: pass 1, and the check's re-encode, compute there."""
    return sae.device if isinstance(sae, StoredSAE) else sae.W_dec.device


def weights_dtype(sae) -> torch.dtype:
    """The dtype of the SAE's weights, which pass 1 casts its rows to."""
    return sae.dtype if isinstance(sae, StoredSAE) else sae.W_dec.dtype


def _resolve_device(sae, device) -> torch.device:
    sae_device = device_of(sae)
    if device is not None and torch.empty(0, device=device).device != sae_device:
        raise FeatureError(f"the SAE is on {sae_device} but pass 1 was asked to run on {device}",
                           f"move the SAE first (sae.to('{device}')), or leave device unset")
    return sae_device


@contextlib.contextmanager
def _bookkeeping_threads(dev: torch.device):
    """One intra-op thread for pass 1's bookkeeping on CPU (the encode keeps torch's setting):
    it is many small, memory-bound ops, for which a second thread buys nothing and each parallel
    op's synchronisation costs more than the op (measured on 2 loaded cores: 1-2 CPU s of waiting
    per 12.5k tokens, against 0.3 s of work). On other devices, nothing changes."""
    threads = torch.get_num_threads()
    if dev.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sparse_route(sae) -> bool:
    """True when encode_slice is the slice of the full sparse selection (TopK, Switch)."""
    if isinstance(sae, StoredSAE):
        return sparse_variant(sae.config["variant"])
    return type(sae).encode_slice is SparseAutoencoder.encode_slice


def _effective_batch_rows(sae, batch_rows: int, n_features: int) -> int:
    if _sparse_route(sae):
        return batch_rows
    return max(1, min(batch_rows, DENSE_BATCH_ELEMENTS // max(n_features, 1)))  # an empty shard: any


def row_widths(sae) -> tuple[int, ...]:
    """The stored row widths ``sae`` reads: d_model; for a transcoder also its paired rows
    [input | output] (d_model + d_out), of which it encodes the input half."""
    return (sae.d_model, sae.d_model + sae.d_out) if sae.is_transcoder else (sae.d_model,)


def open_checked(store: ArtifactStore, sae, key: str, group: str = FIRST_STORE):
    part = open_partition(store, key, group)  # StorageError naming the partition and the fix if missing
    width = part.acts.shape[1] if len(part.acts.shape) == 2 else None
    if width not in row_widths(sae):
        where = "" if group == FIRST_STORE else f" (hook-point store {group})"
        raise FeatureError(f"activation partition {key!r}{where} has rows of width {width} but the SAE expects "
                           f"d_model {sae.d_model}",
                           "use an SAE trained on the model and hook point these activations were cached from")
    if part.n_rows > MAX_ROWS:
        raise FeatureError(f"activation partition {key!r} has {part.n_rows} rows, more than {MAX_ROWS}",
                           "cache smaller partitions (fewer contexts per batch file)")
    return part


def _batches(acts, n_rows: int, batch_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, rows) blocks, the next one read on a background thread while this one computes."""
    result: dict = {}

    def read(lo):
        try:
            result[lo] = acts[lo:min(lo + batch_rows, n_rows)]
        except BaseException as error:  # surfaced on the caller's thread
            result[lo] = error

    starts = list(range(0, n_rows, batch_rows))
    thread = None
    if starts:
        thread = threading.Thread(target=read, args=(starts[0],), daemon=True)
        thread.start()
    for i, lo in enumerate(starts):
        thread.join()
        block = result.pop(lo)
        if isinstance(block, BaseException):
            raise block
        if i + 1 < len(starts):
            thread = threading.Thread(target=read, args=(starts[i + 1],), daemon=True)
            thread.start()
        yield lo, block


def token_batches(sae, acts, n_rows: int, rows_per_batch: int, partition_key: str,
                  dev: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, rows as a tensor on ``dev`` in the SAE's dtype) blocks of ``rows_per_batch`` rows:
    the token batches every encode of pass 1 runs on. Raises FeatureError naming the partition and
    the first bad row when a block has NaN/inf values."""
    for offset, block in _batches(acts, n_rows, rows_per_batch):
        finite = np.isfinite(block).all(1)  # on the host block: one cheap numpy pass, on any device
        if not finite.all():
            bad = offset + int(np.flatnonzero(~finite)[0])
            raise FeatureError(f"activation partition {partition_key!r} has NaN/inf values (first at row {bad})",
                               "re-cache that partition (materialize its activations again)")
        yield offset, torch.from_numpy(np.ascontiguousarray(block)).to(dev, non_blocking=True).to(weights_dtype(sae))


def witness_features(start: int, stop: int, n: int, seed: int) -> np.ndarray:
    """The features of [start, stop) whose every activating token pass 1 records for the
    exactness check (``brute_force_check``): ``n`` of them (all when n >= stop - start), drawn
    uniformly without replacement by a generator seeded with (seed, start, stop), so every
    partition's partial of one shard records the same ones. Local ids (feature - start), sorted."""
    width = stop - start
    if n >= width:
        return np.arange(width, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(start), int(stop)])
    return np.sort(rng.choice(width, n, replace=False)).astype(np.int64)


class _ShardState:
    """Pass-1 state of one feature shard [start, stop): both selectors, count / sum / max /
    histogram, the pending entries of the last token batches and the witness entries."""

    def __init__(self, start: int, stop: int, top_k: int, res_size: int, salt: int, witness: np.ndarray, dev):
        self.start, self.stop, self.n = start, stop, stop - start
        self.top_k, self.res_size, self.salt, self.dev = top_k, res_size, salt, dev
        self.edges = torch.from_numpy(HIST_EDGES).to(dev)
        self.top = Selector(self.n, top_k, lambda slots, features: -slots, dev)
        # reservoir slot = row << 32 | activation bits; its key = the row's sample key
        self.res = Selector(self.n, res_size,
                             lambda slots, features: sample_keys(salt, slots >> 32, features + start), dev)
        self.count = torch.zeros(self.n, dtype=torch.long, device=dev)
        self.total = torch.zeros(self.n, dtype=torch.float64, device=dev)
        self.vmax = torch.zeros(self.n, dtype=torch.float32, device=dev)
        self.hist = torch.zeros(self.n * N_HIST_BINS, dtype=torch.long, device=dev)
        # Entries of several token batches are folded together (up to `group` entries): the
        # bookkeeping is ~40 small tensor ops whatever its size, so fewer, larger groups cost less.
        self.group = max(min(UPDATE_ENTRIES, self.n * (top_k + res_size) // 4),
                         min(MIN_UPDATE_ENTRIES, UPDATE_ENTRIES))
        self.pending, self.n_pending = [], 0
        self.witness = witness
        self.is_witness = torch.zeros(self.n, dtype=torch.bool, device=dev)
        self.is_witness[torch.from_numpy(witness).to(dev)] = True
        self.witness_entries = []
        # invariants recorded apart from the per-feature state (brute_force_check compares them)
        self.n_entries = 0
        self.entries_sum = torch.zeros((), dtype=torch.float64, device=dev)

    def add(self, rows: torch.Tensor, feat: torch.Tensor, vals: torch.Tensor) -> None:
        """(global row, feature - start, activation > 0) entries of one or more token batches."""
        if vals.numel() == 0:
            return
        self.pending.append((rows, feat, vals))
        self.n_pending += vals.numel()
        if self.n_pending >= self.group:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        entries = self.pending
        rows, feat, vals = (torch.cat(e) for e in zip(*entries)) if len(entries) > 1 else entries[0]
        self.pending, self.n_pending = [], 0
        # one stable sort by feature for both selectors (each feature's entries keep their order,
        # so the per-feature sums add in the same order as unsorted)
        order = torch.argsort(feat, stable=True)
        rows, feat, vals = rows[order], feat[order], vals[order]
        del order
        self.n_entries += vals.numel()
        self.entries_sum += vals.sum(dtype=torch.float64)
        w = self.is_witness[feat]
        if bool(w.any()):
            self.witness_entries.append((feat[w].cpu(), rows[w].cpu(), vals[w].cpu()))
        self.count.add_(torch.bincount(feat, minlength=self.n))
        self.total.index_add_(0, feat, vals.double())
        self.vmax.scatter_reduce_(0, feat, vals, "amax")
        bins = feat * N_HIST_BINS + torch.bucketize(vals, self.edges, right=True)
        self.hist.index_add_(0, bins, torch.ones_like(bins))
        top_slot = top_keys(vals, rows)
        self.top.add(feat, -top_slot, top_slot, feat_sorted=True)
        bits = vals.contiguous().view(torch.int32).long()
        self.res.add(feat, sample_keys(self.salt, rows, feat + self.start), (rows << 32) | bits, feat_sorted=True)

    def finish(self) -> dict:
        """The state of the latents that fired (count > 0) as numpy arrays, one row each, and
        their local ids (``fired``); frees the device buffers. Every other latent is in the empty
        state (``EMPTY_LATENT``), so none of its rows is built: the time and bytes grow with the
        latents that fired, not with the shard's width."""
        self.flush()
        fired = torch.nonzero(self.count > 0).squeeze(1)
        n_fired, res_size = fired.numel(), self.res_size
        top_act, top_row = (t.cpu().numpy() for t in decode_top(self.top.finish(fired)[0]))
        top_compactions = self.top.compactions
        self.top = None
        res = self.res
        res_slots, res_key = res.finish(fired)  # frees the [n, 2R] buffer
        res_compactions = res.compactions
        res_keys = res_key.cpu().numpy()
        del res_key
        res_row = np.empty((n_fired, res_size), dtype=np.int64)
        res_act = np.empty((n_fired, res_size), dtype=np.float32)
        for f0 in range(0, n_fired, res.block):  # blockwise: no [n_fired, R] temporaries beyond the outputs
            f1 = min(f0 + res.block, n_fired)
            slots = res_slots[f0:f1]
            empty = slots < 0
            res_row[f0:f1] = torch.where(empty, -1, slots >> 32).cpu().numpy()
            res_act[f0:f1] = torch.where(empty, 0.0,
                                         (slots & 0xFFFFFFFF).to(torch.int32).view(torch.float32)).cpu().numpy()
        self.res = None
        del res, res_slots
        if self.witness_entries:
            wf, wr, wa = (torch.cat(e).numpy() for e in zip(*self.witness_entries))
        else:
            wf, wr, wa = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        cpu = lambda t: t[fired].cpu().numpy()  # noqa: E731
        return dict(top_act=top_act, top_row=top_row, res_key=res_keys, res_row=res_row, res_act=res_act,
                    count=cpu(self.count), sum=cpu(self.total), max=cpu(self.vmax),
                    hist=cpu(self.hist.view(self.n, N_HIST_BINS)), fired=fired.cpu().numpy(),
                    witness=self.witness.copy(), witness_feature=wf.astype(np.int64),
                    witness_row=wr.astype(np.int64), witness_act=wa.astype(np.float32),
                    n_entries=int(self.n_entries), entries_sum=float(self.entries_sum),
                    diagnostics={"top_compactions": top_compactions, "res_compactions": res_compactions})


def _check_pass1_arguments(sae, shards: list[tuple[int, int]], settings: FeatureSettings, batch_rows: int) -> None:
    """FeatureError naming the first bad argument of pass 1 (before any partition is read)."""
    if not shards:
        raise FeatureError("compute_partials needs at least one feature shard", "pass feature_shards(n_latents, n)")
    for start, stop in shards:
        check_range(sae, start, stop)
    for name, value in (("top_k", settings.top_k), ("reservoir_factor", settings.reservoir_factor),
                        ("batch_rows", batch_rows)):
        check_positive(name, value)
    check_features = settings.check_features
    if isinstance(check_features, bool) or not isinstance(check_features, int) or check_features < 0:
        raise FeatureError(f"check_features must be an integer >= 0, got {check_features!r}",
                           "set check_features to the number of features per shard the exactness check recomputes")


@torch.no_grad()
def compute_partials(store: ArtifactStore, sae, partition_key: str, shards: list[tuple[int, int]],
                     settings: FeatureSettings, *, batch_rows: int = 4096, device=None, on_codes=None,
                     group: str = FIRST_STORE) -> list[Partial]:
    """Pass 1 for one activation partition and every feature shard in ``shards`` (latent ranges
    [start, stop)), reading and encoding each row once: stream the partition in batches and keep
    per feature the top_k activations, a bottom-R random sample (R = reservoir_factor * top_k),
    count / sum / max and the histogram, plus every activating token of ``check_features``
    witness features per shard (``witness_features``). Returns one Partial per shard (numpy).
    Of ``settings`` it reads top_k, reservoir_factor, seed and check_features.

    For TopK-style variants (sparse route) each token batch is encoded once with ``sae.encode``
    and its sparse codes are split among the shards: the selection, the expensive part, runs once
    per row whatever the number of shards. Variants with per-latent activations run
    ``encode_slice`` once per shard and batch, which together multiply W_enc once. Memory: the
    state of every listed shard at once (pass fewer shards per call to bound it).

    ``on_codes(offset, values, indices, n_rows)``, if given, receives each token batch's sparse
    codes and the partition's row count (sparse route only).

    ``group``: the partition's hook-point store to read (``catalog.store_group``; the SAE's
    own: ``catalog.shuffled_input_group`` of the shuffled store it was trained on). A transcoder reads its
    paired rows [input | output] and encodes the input half."""
    _check_pass1_arguments(sae, shards, settings, batch_rows)
    dev = _resolve_device(sae, device)
    part = open_checked(store, sae, partition_key, group)
    version = part.path.rstrip("/").rsplit("/", 1)[-1]  # the version actually read, pinned in the partial
    return partials_of_rows(sae, part.acts, part.n_rows, partition_key, version, shards, settings,
                            batch_rows=batch_rows, device=dev, on_codes=on_codes, group=group)


@torch.no_grad()
def partials_of_rows(sae, acts, n_rows: int, partition_key: str, version: str, shards: list[tuple[int, int]],
                     settings: FeatureSettings, *, batch_rows: int = 4096, device=None, on_codes=None,
                     group: str = FIRST_STORE) -> list[Partial]:
    """Pass 1 over ``acts``, rows [0, n_rows) of any array that slices into numpy blocks ``[rows,
    width]`` (a partition's zarr array, or rows in memory: ``benchmarks/gpu_check.py`` times pass 1
    on a machine with no store); ``version`` is recorded as the partition's. Everything else as
    :func:`compute_partials`, which opens the partition first; FeatureError for the same bad arguments."""
    _check_pass1_arguments(sae, shards, settings, batch_rows)
    shards = [(int(a), int(b)) for a, b in shards]
    top_k, reservoir_factor, seed = settings.top_k, settings.reservoir_factor, settings.seed
    check_features = settings.check_features
    dev = _resolve_device(sae, device)
    res_size = reservoir_factor * top_k
    sparse = _sparse_route(sae)
    rows_per_batch = _effective_batch_rows(sae, batch_rows, max(b - a for a, b in shards))
    salt = partition_salt(seed, partition_key)
    states = [_ShardState(a, b, top_k, res_size, salt, witness_features(a, b, check_features, seed), dev)
              for a, b in shards]
    # Sparse route: the entries of several token batches are split among the shards at once (a
    # few tensor ops per group, not per batch and shard: small ops cost mostly their overhead).
    pending, n_pending = [], 0

    # Shards in latent order and disjoint (the pipeline's feature_shards): entries are split by one
    # stable sort on their shard number (order kept within a shard), not by a mask per shard.
    by_start = sorted(range(len(states)), key=lambda i: states[i].start)
    disjoint = all(states[a].stop <= states[b].start for a, b in zip(by_start, by_start[1:]))
    starts = torch.tensor([states[i].start for i in by_start], dtype=torch.long, device=dev)
    stops = torch.tensor([states[i].stop for i in by_start], dtype=torch.long, device=dev)

    def dispatch():
        if not pending:
            return
        rows, idx, vals = (torch.cat(t) for t in zip(*pending)) if len(pending) > 1 else pending[0]
        pending.clear()
        if len(states) == 1 and states[0].start == 0 and states[0].stop == sae.n_latents:
            states[0].add(rows, idx, vals)
        elif not disjoint:
            for s in states:
                inside = (idx >= s.start) & (idx < s.stop)
                s.add(rows[inside], idx[inside] - s.start, vals[inside])
        else:
            shard = torch.searchsorted(starts, idx, right=True) - 1
            outside = (shard < 0) | (idx >= stops[shard.clamp_min(0)])
            shard = shard.masked_fill_(outside, len(states))
            order = torch.argsort(shard, stable=True)
            counts = torch.bincount(shard, minlength=len(states) + 1).tolist()
            rows, idx, vals = rows[order], idx[order], vals[order]
            lo = 0
            for i, count in zip(by_start, counts):
                s = states[i]
                s.add(rows[lo:lo + count], idx[lo:lo + count] - s.start, vals[lo:lo + count])
                lo += count

    for offset, x in token_batches(sae, acts, n_rows, rows_per_batch, partition_key, dev):
        if sparse:  # one selection per row, its codes split among the shards
            codes = sae.encode(x)
            if on_codes is not None:
                on_codes(offset, codes.values, codes.indices, n_rows)
            flat_values = codes.values.reshape(-1)
            on = torch.nonzero(flat_values > 0).squeeze(1)  # flat positions: 1-d gathers, row-major order
            rows = on // codes.values.shape[1]
            pending.append((rows + offset, codes.indices.reshape(-1)[on], flat_values[on].float()))
            n_pending += len(rows)
            if n_pending >= UPDATE_ENTRIES:
                with _bookkeeping_threads(dev):
                    dispatch()
                n_pending = 0
            del codes
        else:
            for s in (s for s in states if s.stop > s.start):  # an empty shard has no latent to encode
                acts = sae.encode_slice(x, s.start, s.stop)
                r, f = (acts > 0).nonzero(as_tuple=True)
                with _bookkeeping_threads(dev):
                    s.add(r + offset, f, acts[r, f].float())
                del acts
        del x
    with _bookkeeping_threads(dev):
        dispatch()
    partials = []
    fingerprint = {"config": sae.config, "fingerprint": sae_fingerprint(sae)}
    for s in states:
        with _bookkeeping_threads(dev):
            arrays = s.finish()
        diagnostics = {**arrays.pop("diagnostics"), "route": "sparse" if sparse else "dense",
                       "shards_per_encode": len(states)}
        partials.append(Partial(
            partition=partition_key, partition_version=version, start=s.start, stop=s.stop, top_k=top_k,
            reservoir_size=res_size, seed=int(seed), batch_rows=rows_per_batch, n_tokens=n_rows,
            sae=fingerprint, diagnostics=diagnostics, group=group, **arrays))
    states.clear()
    return partials


def compute_partial(store: ArtifactStore, sae, partition_key: str, start: int, stop: int,
                    settings: FeatureSettings, *, batch_rows: int = 4096, device=None,
                    group: str = FIRST_STORE) -> Partial:
    """Pass 1 for one activation partition and latents [start, stop) (``compute_partials`` with
    one shard). For TopK-style variants prefer one ``compute_partials`` call over all shards:
    each call runs the full selection."""
    return compute_partials(store, sae, partition_key, [(start, stop)], settings, batch_rows=batch_rows,
                            device=device, group=group)[0]

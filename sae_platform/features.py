"""Feature tables: per-feature top activations, a uniform random sample, interval examples,
density and a histogram, computed streaming and sharded (docs/design.md, "Feature tables, context
windows, browser", passes 1 and 2).

Sharding. One job of pass 1 reads one *dataset shard* (one activation partition) once and feeds
every *feature shard* (latents [start, stop), see ``feature_shards``) from the same encode
(``compute_partials``); per feature it keeps a fixed amount of state, whatever the partition's
length:

- the ``top_k`` largest activations with their row;
- a uniform random sample of ``R = reservoir_factor * top_k`` activating tokens (activation > 0);
- the count, sum and max of the activations, and a histogram on fixed bins;
- and, per shard, the number of tokens (for density).

Pass 2 (``merge_partials``) folds the partials of every partition of one feature shard into the
final tables. Both passes are exact: the merged tables equal what one job reading the whole
dataset would produce (``brute_force_check`` verifies it without a second pass: pass 1 records
every activating token of a fixed sample of *witness* features apart from the selection, and
counts and sums that must agree across the passes), whatever the feature sharding, the
grouping of partitions and the merge order. The activation values themselves are the SAE's: a
matmul's rounding can depend on its shape (on CPU a one-row batch takes another kernel; CUDA picks
kernels by shape), so the brute-force check replays pass 1's batch boundaries and then compares
bit for bit.

Order and ties. Examples are ordered by activation (descending), then partition key (ascending,
the order of ``catalog.list_partitions``), then row (ascending). Inside pass 1 the activation's
float32 bits and the row are packed into one int64 ``(bits << 32) | (2**32 - 1 - row)``, so integer
comparisons give exactly this order on any device.

Random sample (bottom-R sampling). Every activating (partition, row, feature) gets a 63-bit key
from a counter-based RNG: splitmix64's finaliser applied to (seed, partition key, row, feature), so
the key does not depend on batch size, feature sharding or device. Each feature keeps the R
activating tokens with the *smallest* keys. Keys are i.i.d. uniform, so this is a uniform sample
without replacement of that feature's activating tokens; and the R smallest keys of a union are
the R smallest of each part's R smallest, so merging two shards' samples is "bottom R of the
union" and stays exactly uniform over all activating tokens of the dataset (no weights needed).
Ties between keys have probability ~n^2 / 2^63 and are ignored.

Streaming selection. Each feature has a fixed int64 buffer of 2m slots (m = top_k or R). The
active entries of a few token batches at a time (at most ~n_features * (top_k + R) / 4 entries)
are filtered: only candidates that can still enter (activation above the feature's current k-th
best; sample key below its current R-th smallest) are appended to the free half of their
feature's row; a row that overflows is compacted (sort, keep the m best, update the threshold).
Memory: O(n_features * (top_k + R + bins)) plus one token batch, never the partition's length.
Pass 1 runs on the SAE's device (CPU or CUDA; there ``sum`` is accumulated with atomics, so its
last bits may vary from run to run; everything else is deterministic).

Activations come from ``sae.encode_slice(x, start, stop)`` per shard (ReLU / JumpReLU / BatchTopK
multiply only the slice's encoder rows: all shards together multiply W_enc once). For variants
whose activations are a slice of the full sparse selection (TopK, Switch: ``encode_slice`` not
overridden) each token batch is encoded once with ``sae.encode`` and its sparse codes are split
among the shards: the same values, without a dense [batch, n_features] matrix, and the selection
runs once per row whatever the number of shards. Those codes are also committed per partition
(``write_codes``) so that pass 3 looks the window activations up instead of encoding again.

Histogram. 64 log-spaced bins over [1e-4, 1e4] (``HIST_EDGES``: 65 float32 edges,
``np.logspace(-4, 4, 65)``) plus underflow and overflow, 66 counts per feature:
``histogram[0]`` counts 0 < a < 1e-4, ``histogram[i]`` (1 <= i <= 64) counts
HIST_EDGES[i-1] <= a < HIST_EDGES[i], ``histogram[65]`` counts a >= 1e4. The same bins for every
shard, so histograms add.

Interval examples. A feature's range (0, max] is split into ``n_intervals`` (default 5) equal-width
intervals; interval j holds j*max/n <= a < (j+1)*max/n (the last also holds max), computed as
``j = min(floor(a / max * n), n - 1)`` in float64. Each interval gets up to ``per_interval``
(default 4) examples: the reservoir members falling in it with the smallest keys, i.e. a uniform
random sample of the feature's activating tokens in that interval (deterministic). High intervals
are often sparse in the reservoir; the top examples cover them.

Tables (polars), one pair per feature shard, committed together under
``features/<run>/tables/f<shard_index>/`` as ``stats.parquet``, ``examples.parquet`` and
``meta.json`` (the schemas: ``tables.STATS_SCHEMA`` and ``tables.EXAMPLE_SCHEMA``):

``feature_stats`` (one row per feature of the shard, sorted by feature)
    feature         Int64    global latent id
    n_tokens_total  Int64    tokens seen (all partitions)
    count           Int64    tokens with activation > 0
    density         Float64  count / n_tokens_total
    max             Float32  largest activation (0.0 when count == 0)
    mean            Float64  sum / count over activating tokens (null when count == 0)
    sum             Float64  sum of activations (float64 accumulation; equal up to rounding
                             across shardings, as is mean)
    histogram       List[Int64]  66 counts on the bins above; sums to count

``feature_examples`` (sorted by feature, kind [top, interval, random], interval, rank)
    feature     Int64
    kind        Utf8     "top" | "interval" | "random"
    rank        Int32    0-based within (feature, kind[, interval]): top by activation order,
                         random and interval by sample key (any prefix of "random" is itself a
                         uniform sample)
    interval    Int32    interval index for kind "interval", null otherwise
    activation  Float32
    partition   Utf8     activation partition key
    row         Int64    row in that partition's hook-point store ``meta["group"]``
                         (``open_partition(store, partition, group).acts[row]``)

``meta.json`` holds ``hist_bin_edges`` (the 65 edges), the shard range, top_k, reservoir size,
seed, n_intervals, per_interval, the SAE's config and weight fingerprint, ``group`` (the hook-point
store inside each partition whose rows were read: ``data.zarr`` for the first entry of
``caching.config.hook_points``, ``hooks/<i>.zarr`` for entry i) and every partition's key,
pinned version, token count and pass-1 batch size.

Partials (pass-1 output) are committed under ``features/<run>/partial/<partition>/f<shard_index>``
as ``partial.npz`` (arrays) plus ``meta.json``.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from sae_platform.activations import open_partition
from sae_platform.catalog import (
    FIRST_STORE,
    codes_name,
    list_partitions,
    partial_name,
    partials_folder,
    partition_name,
    tables_name,
)
from sae_platform.errors import PlatformError
from sae_platform.sae import SparseAutoencoder
from sae_platform.settings import setting, validate
from sae_platform.storage import ArtifactStore
from sae_platform.tables import (
    ACTIVATION,
    COUNT,
    DENSITY,
    EXAMPLE_COLUMNS,
    EXAMPLE_SCHEMA,
    FEATURE,
    HISTOGRAM,
    INTERVAL,
    KIND,
    KIND_INTERVAL,
    KIND_ORDER,
    KIND_RANDOM,
    KIND_TOP,
    MAX,
    MEAN,
    N_TOKENS_TOTAL,
    PARTITION,
    RANK,
    ROW,
    STATS_SCHEMA,
    SUM,
)

HIST_EDGES = np.logspace(-4, 4, 65).astype(np.float32)
N_HIST_BINS = len(HIST_EDGES) + 1  # + underflow and overflow
KEY_PAD = np.iinfo(np.int64).max    # an empty slot in a bottom-m buffer
MAX_ROWS = 2**31 - 1                # rows per partition (the top-k key packs 32 bits of row)
# Dense route (ReLU-like variants): bound the [batch, n_features] activation block.
DENSE_BATCH_ELEMENTS = 1 << 22
# Pass 1 folds the active entries of several token batches at once, up to about this many (and
# no more than a quarter of the feature slice's slots, so memory stays O(n_features * (top_k + R))).
UPDATE_ENTRIES = 1 << 18
MIN_UPDATE_ENTRIES = 1 << 14
# Compaction processes features in blocks of at most about this many slots.
COMPACT_BLOCK_ENTRIES = 1 << 18

_U64 = 1 << 64
_GOLDEN = 0x9E3779B97F4A7C15
_FEATURE_MULT = 0xD1B54A32D192ED03
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@dataclass(frozen=True)
class FeatureSettings:
    """Settings of the feature tables, context windows and browser (``resources.features.config``):
    which SAE they describe and how many examples they keep."""

    sae_name: str = setting("topk-16k-k32", "sweep entry whose checkpoint the tables describe")
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
    rebuild: bool = setting(False, "rebuild the tables and browser even when they describe the current checkpoint")

    def __post_init__(self):
        validate(self, "resources.features.config")


class FeatureError(PlatformError):
    """Bad input to the feature-table passes (ranges, shapes, mismatched partials)."""


def _signed(value: int) -> int:
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


# ---------------------------------------------------------------------------------------------
# Feature shards
# ---------------------------------------------------------------------------------------------

def feature_shards(n_latents: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous latent ranges [start, stop) covering [0, n_latents), sizes differing by at most 1."""
    for name, value in (("n_latents", n_latents), ("n_shards", n_shards)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FeatureError(f"{name} must be a positive integer, got {value!r}", f"set {name} to an integer >= 1")
    if n_shards > n_latents:
        raise FeatureError(f"{n_shards} feature shards is more than the SAE's {n_latents} latents",
                           f"use at most {n_latents} feature shards")
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


def _check_range(sae, start: int, stop: int) -> None:
    if not (_is_int(start) and _is_int(stop) and 0 <= start < stop <= sae.n_latents):
        raise FeatureError(f"feature range [{start}, {stop}) is outside the SAE's latents [0, {sae.n_latents})",
                           f"pass 0 <= start < stop <= {sae.n_latents} (feature_shards(n_latents, n_shards) "
                           "gives valid ranges)")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FeatureError(f"{name} must be a positive integer, got {value!r}", f"set {name} to an integer >= 1")


# ---------------------------------------------------------------------------------------------
# Counter-based sample keys (torch on the device; a numpy twin for checks and tests)
# ---------------------------------------------------------------------------------------------

def partition_salt(seed: int, partition: str) -> int:
    """A signed 64-bit salt per (seed, partition key)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic)."""
    z = (z ^ _lsr(z, 30)) * _signed(_MIX1)
    z = (z ^ _lsr(z, 27)) * _signed(_MIX2)
    return z ^ _lsr(z, 31)


def sample_keys(salt: int, rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Uniform 63-bit keys in [0, 2**63 - 1) for (row, feature) pairs (int64, any device)."""
    h = _mix((rows.long() + 1) * _signed(_GOLDEN) + salt)
    key = _lsr(_mix(h + (features.long() + 1) * _signed(_FEATURE_MULT)), 1)
    return key.clamp_max(KEY_PAD - 1)


def sample_keys_numpy(salt: int, rows: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The numpy twin of ``sample_keys`` (uint64 arithmetic), for brute-force checks."""
    with np.errstate(over="ignore"):
        def mix(z):
            z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
            return z ^ (z >> np.uint64(31))

        rows = np.asarray(rows, dtype=np.int64).astype(np.uint64)
        features = np.asarray(features, dtype=np.int64).astype(np.uint64)
        h = mix((rows + np.uint64(1)) * np.uint64(_GOLDEN) + np.uint64(salt % _U64))
        key = mix(h + (features + np.uint64(1)) * np.uint64(_FEATURE_MULT)) >> np.uint64(1)
    return np.minimum(key.astype(np.int64), KEY_PAD - 1)


def _top_keys(vals: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering by activation (desc) then row (asc); vals float32 > 0."""
    bits = vals.float().contiguous().view(torch.int32).long()
    return (bits << 32) | (0xFFFFFFFF - rows.long())


def _decode_top(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    empty = keys < 0
    act = (keys >> 32).to(torch.int32).view(torch.float32)
    row = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return torch.where(empty, 0.0, act), torch.where(empty, -1, row)


def hist_bins(vals: np.ndarray) -> np.ndarray:
    """Histogram bin of each activation (float32), as documented in the module docstring."""
    return np.searchsorted(HIST_EDGES, np.asarray(vals, dtype=np.float32), side="right")


def hist_bin_edges() -> list[float]:
    return [float(e) for e in HIST_EDGES]


# ---------------------------------------------------------------------------------------------
# Streaming bottom-m per feature
# ---------------------------------------------------------------------------------------------

class _Selector:
    """Per feature, the m entries with the smallest int64 sort keys seen so far.

    Entries are int64 *slots* (EMPTY = -1 marks a free one) from which ``sort_key(slots, features)``
    (1-d, occupied slots only) derives the key, so a buffer is one int64 [n, 2m] matrix: the top-k
    slot is its own key, a reservoir slot packs (row << 32 | activation bits) and its key is
    recomputed from the row.
    New candidates (key below the feature's current m-th smallest, ``threshold``) are appended to
    the free half of their feature's row; a row that overflows is compacted (sort, keep the m
    smallest, threshold = the m-th), in blocks of features so temporaries stay small. Each
    compaction frees m slots, so the cost is O(log m) per accepted candidate, and accepted
    candidates get rarer as the stream goes on (about m/n of the n-th activating token)."""

    EMPTY = -1

    def __init__(self, n: int, m: int, sort_key, device):
        self.n, self.m, self.device, self.sort_key = n, m, device, sort_key
        self.slots = torch.full((n, 2 * m), self.EMPTY, dtype=torch.long, device=device)
        self.fill = torch.zeros(n, dtype=torch.long, device=device)
        self.threshold = torch.full((n,), KEY_PAD, dtype=torch.long, device=device)
        self.compactions = 0
        self.block = max(1, COMPACT_BLOCK_ENTRIES // (3 * m))

    def add(self, feat: torch.Tensor, key: torch.Tensor, slot: torch.Tensor, feat_sorted: bool = False) -> None:
        """Offer entries (feature, key, slot); ``feat_sorted``: feat is already ascending (stably)."""
        keep = key < self.threshold[feat]
        feat, key, slot = feat[keep], key[keep], slot[keep]
        if feat.numel() == 0:
            return
        if not feat_sorted:
            order = torch.argsort(feat, stable=True)
            feat, key, slot = feat[order], key[order], slot[order]
        counts = torch.bincount(feat, minlength=self.n)
        rank = torch.arange(feat.numel(), device=self.device) - (counts.cumsum(0) - counts)[feat]
        pos = self.fill[feat] + rank
        direct = pos < 2 * self.m
        self.slots[feat[direct], pos[direct]] = slot[direct]
        self.fill += counts
        over = self.fill > 2 * self.m
        if bool(over.any()):
            left = ~direct
            self._compact(torch.nonzero(over).squeeze(1), feat[left], key[left], slot[left])

    def _compact(self, features: torch.Tensor, feat: torch.Tensor, key: torch.Tensor, slot: torch.Tensor) -> None:
        """Keep the m smallest of each listed feature's row plus its leftover candidates
        (feat sorted ascending; every leftover's feature is listed)."""
        m = self.m
        if feat.numel():  # only the m smallest leftovers of a feature can enter
            order = torch.argsort(key, stable=True)
            order = order[torch.argsort(feat[order], stable=True)]
            feat, key, slot = feat[order], key[order], slot[order]
            counts = torch.bincount(feat, minlength=self.n)
            rank = torch.arange(feat.numel(), device=self.device) - (counts.cumsum(0) - counts)[feat]
            keep = rank < m
            feat, slot, rank = feat[keep], slot[keep], rank[keep]
        self.compactions += 1
        for b0 in range(0, features.numel(), self.block):
            fs = features[b0:b0 + self.block]
            rows = self.slots[fs]
            if feat.numel():
                lo = int(torch.searchsorted(feat, fs[:1])[0])
                hi = int(torch.searchsorted(feat, fs[-1:], right=True)[0])
                if hi > lo:
                    cand = torch.full((fs.numel(), m), self.EMPTY, dtype=torch.long, device=self.device)
                    cand[torch.searchsorted(fs, feat[lo:hi]), rank[lo:hi]] = slot[lo:hi]
                    rows = torch.cat([rows, cand], 1)
            keys, idx = self.keys_of(rows, fs).sort(dim=1)
            kept = rows.gather(1, idx[:, :m])
            self.slots[fs] = torch.cat([kept, torch.full_like(kept, self.EMPTY)], 1)
            self.fill[fs] = (kept != self.EMPTY).sum(1)
            full = self.fill[fs] == m
            self.threshold[fs] = torch.where(full, keys[:, m - 1], KEY_PAD)

    def keys_of(self, rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Sort keys of a [len(features), w] block of slots; KEY_PAD for empty slots (only the
        occupied ones are hashed: early in a stream most slots are empty)."""
        width, flat = rows.shape[1], rows.reshape(-1)
        keys = torch.full_like(flat, KEY_PAD)
        # flat integer indices, not a boolean mask: masked indexing of a 2-d block costs ~8x more
        real = torch.nonzero(flat != self.EMPTY).squeeze(1)
        keys[real] = self.sort_key(flat[real], features[real // width])
        return keys.view(rows.shape)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([n, m] slots, [n, m] their sort keys), ascending by key, EMPTY / KEY_PAD-padded; frees
        the buffer. Each block of features is sorted once, straight into the outputs."""
        m = self.m
        slots = torch.empty((self.n, m), dtype=torch.long, device=self.device)
        keys = torch.empty((self.n, m), dtype=torch.long, device=self.device)
        for b0 in range(0, self.n, self.block):
            b1 = min(b0 + self.block, self.n)
            rows = self.slots[b0:b1]
            block_keys, idx = self.keys_of(rows, torch.arange(b0, b1, device=self.device)).sort(dim=1)
            keys[b0:b1] = block_keys[:, :m]
            slots[b0:b1] = rows.gather(1, idx[:, :m])
        self.slots = None
        return slots, keys


# ---------------------------------------------------------------------------------------------
# Pass 1
# ---------------------------------------------------------------------------------------------

@dataclass
class Partial:
    """Pass-1 state of one (partition, feature shard), as numpy arrays (feature i = start + i)."""

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
    group: str = FIRST_STORE  # the partition's hook-point store the rows were read from (activations.store_group)

    ARRAYS = ("top_act", "top_row", "res_key", "res_row", "res_act", "count", "sum", "max", "hist")
    WITNESS = ("witness", "witness_feature", "witness_row", "witness_act")

    @property
    def n_features(self) -> int:
        return self.stop - self.start

    def meta(self) -> dict:
        return {"partition": self.partition, "partition_version": self.partition_version, "start": self.start,
                "stop": self.stop, "top_k": self.top_k, "reservoir_size": self.reservoir_size, "seed": self.seed,
                "batch_rows": self.batch_rows, "n_tokens": self.n_tokens, "sae": self.sae,
                "n_entries": self.n_entries, "entries_sum": self.entries_sum, "hist_bin_edges": hist_bin_edges(),
                "group": self.group}


def sae_fingerprint(sae) -> str:
    """A digest of the SAE's config and weights: partials of different SAEs must never merge."""
    digest = hashlib.blake2b(json.dumps(sae.config, sort_keys=True).encode(), digest_size=16)
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _sae_device(sae) -> torch.device:
    return sae.W_dec.device


def _resolve_device(sae, device) -> torch.device:
    sae_device = _sae_device(sae)
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
    return type(sae).encode_slice is SparseAutoencoder.encode_slice


def _effective_batch_rows(sae, batch_rows: int, n_features: int) -> int:
    if _sparse_route(sae):
        return batch_rows
    return max(1, min(batch_rows, DENSE_BATCH_ELEMENTS // n_features))


def row_widths(sae) -> tuple[int, ...]:
    """The stored row widths ``sae`` reads: d_model; for a transcoder also its paired rows
    [input | output] (d_model + d_out), of which it encodes the input half."""
    return (sae.d_model, sae.d_model + sae.d_out) if sae.is_transcoder else (sae.d_model,)


def _open_checked(store: ArtifactStore, sae, key: str, group: str = FIRST_STORE):
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
        self.top = _Selector(self.n, top_k, lambda slots, features: -slots, dev)
        # reservoir slot = row << 32 | activation bits; its key = the row's sample key
        self.res = _Selector(self.n, res_size,
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
        top_slot = _top_keys(vals, rows)
        self.top.add(feat, -top_slot, top_slot, feat_sorted=True)
        bits = vals.contiguous().view(torch.int32).long()
        self.res.add(feat, sample_keys(self.salt, rows, feat + self.start), (rows << 32) | bits, feat_sorted=True)

    def finish(self) -> dict:
        """The state as numpy arrays (frees the device buffers)."""
        self.flush()
        n_feat, res_size = self.n, self.res_size
        top_act, top_row = (t.cpu().numpy() for t in _decode_top(self.top.finish()[0]))
        top_compactions = self.top.compactions
        self.top = None
        res = self.res
        res_slots, res_key = res.finish()  # frees the [n, 2R] buffer
        res_compactions = res.compactions
        res_keys = res_key.cpu().numpy()
        del res_key
        res_row = np.empty((n_feat, res_size), dtype=np.int64)
        res_act = np.empty((n_feat, res_size), dtype=np.float32)
        for f0 in range(0, n_feat, res.block):  # blockwise: no [n_feat, R] temporaries beyond the outputs
            f1 = min(f0 + res.block, n_feat)
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
        cpu = lambda t: t.cpu().numpy()  # noqa: E731
        return dict(top_act=top_act, top_row=top_row, res_key=res_keys, res_row=res_row, res_act=res_act,
                    count=cpu(self.count), sum=cpu(self.total), max=cpu(self.vmax),
                    hist=cpu(self.hist.view(n_feat, N_HIST_BINS)), witness=self.witness.copy(),
                    witness_feature=wf.astype(np.int64), witness_row=wr.astype(np.int64),
                    witness_act=wa.astype(np.float32),
                    n_entries=int(self.n_entries), entries_sum=float(self.entries_sum),
                    diagnostics={"top_compactions": top_compactions, "res_compactions": res_compactions})


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
    codes and the partition's row count (sparse route only; ``write_codes`` keeps them for pass 3).

    ``group``: the partition's hook-point store to read (``activations.store_group``; the SAE's
    own: ``catalog.shuffled_input_group`` of the shuffled store it was trained on). A transcoder reads its
    paired rows [input | output] and encodes the input half."""
    if not shards:
        raise FeatureError("compute_partials needs at least one feature shard", "pass feature_shards(n_latents, n)")
    for start, stop in shards:
        _check_range(sae, start, stop)
    shards = [(int(a), int(b)) for a, b in shards]
    top_k, reservoir_factor, seed = settings.top_k, settings.reservoir_factor, settings.seed
    check_features = settings.check_features
    for name, value in (("top_k", top_k), ("reservoir_factor", reservoir_factor), ("batch_rows", batch_rows)):
        _positive(name, value)
    if isinstance(check_features, bool) or not isinstance(check_features, int) or check_features < 0:
        raise FeatureError(f"check_features must be an integer >= 0, got {check_features!r}",
                           "set check_features to the number of features per shard the exactness check recomputes")
    dev = _resolve_device(sae, device)
    part = _open_checked(store, sae, partition_key, group)
    version = part.path.rstrip("/").rsplit("/", 1)[-1]  # the version actually read, pinned in the partial
    n_rows, res_size = part.n_rows, reservoir_factor * top_k
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

    for offset, block in _batches(part.acts, n_rows, rows_per_batch):
        finite = np.isfinite(block).all(1)  # on the host block: one cheap numpy pass, on any device
        if not finite.all():
            bad = offset + int(np.flatnonzero(~finite)[0])
            raise FeatureError(f"activation partition {partition_key!r} has NaN/inf values (first at row {bad})",
                               "re-cache that partition (materialize its activations again)")
        x = torch.from_numpy(np.ascontiguousarray(block)).to(dev, non_blocking=True).to(sae.W_dec.dtype)
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
            for s in states:
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


def compute_and_write_partials(store: ArtifactStore, sae, run: str, partition_key: str, shards: list[tuple[int, int]],
                               settings: FeatureSettings, **options) -> list[Partial]:
    """Pass 1 as the pipeline runs it: ``compute_partials`` over every shard, each partial
    committed (shard i at ``partial_name(run, partition_key, i)``), and for TopK-style variants the
    partition's sparse codes committed too (``write_codes``), so that pass 3 looks activations up
    instead of encoding the rows again.

    Memory: the partition's codes are held until written, float32 + int32 per code (8 * K bytes
    per row, K = the SAE's k), in arrays allocated once, plus their serialised copy while they are
    written (docs/scale.md, "Feature tables")."""
    codes: dict = {}

    def keep(offset, vals, idx, n_rows):
        if not codes:  # the partition's length is known up front: fill in place, no concatenation copy
            codes["values"] = np.empty((n_rows, vals.shape[1]), dtype=np.float32)
            codes["indices"] = np.empty((n_rows, idx.shape[1]), dtype=np.int32)
        codes["values"][offset:offset + len(vals)] = vals.float().cpu().numpy()
        codes["indices"][offset:offset + len(idx)] = idx.to(torch.int32).cpu().numpy()

    partials = compute_partials(store, sae, partition_key, shards, settings, on_codes=keep, **options)
    for index, partial in enumerate(partials):
        write_partial(store, run, partition_key, index, partial)
    if codes:
        write_codes(store, run, partition_key, codes["values"], codes["indices"],
                    partition_version=partials[0].partition_version, fingerprint=partials[0].sae["fingerprint"])
    return partials


def write_codes(store: ArtifactStore, run: str, partition_key: str, values: np.ndarray, indices: np.ndarray, *,
                partition_version: str | None, fingerprint: str) -> str:
    """Commit pass 1's sparse codes of one partition: ``values`` float32 [n_rows, K] and
    ``indices`` int32 [n_rows, K] (row r's activations are values[r] at latents indices[r]; 0 =
    inactive), with the partition version and SAE fingerprint they came from."""
    buffer = io.BytesIO()
    np.savez(buffer, values=np.ascontiguousarray(values, np.float32), indices=np.ascontiguousarray(indices, np.int32))
    name = codes_name(run, partition_key)
    with store.writing(name, partition=partition_key, partition_version=partition_version) as version:
        store.write_bytes_atomic(f"{version}/codes.npz", buffer.getvalue())
        store.write_json(f"{version}/meta.json", {"partition": partition_key, "partition_version": partition_version,
                                                  "sae_fingerprint": fingerprint, "n_rows": int(len(values))})
    return store.resolve(name)


def read_codes(store: ArtifactStore, run: str, partition_key: str, sae) -> tuple[np.ndarray, np.ndarray] | None:
    """Pass 1's sparse codes (values, indices) of a partition, or None when there are none or they
    were computed by other SAE weights or from another version of the partition."""
    path = store.resolve(codes_name(run, partition_key))
    if path is None:
        return None
    meta = store.read_json(f"{path}/meta.json")
    current = (store.pointer(partition_name(partition_key)) or {}).get("version")
    if meta.get("partition_version") != current or meta.get("sae_fingerprint") != sae_fingerprint(sae):
        return None
    with np.load(io.BytesIO(store.fs.cat_file(f"{path}/codes.npz")), allow_pickle=False) as arrays:
        return arrays["values"], arrays["indices"]


def write_partial(store: ArtifactStore, run: str, partition_key: str, shard_index: int, partial: Partial) -> str:
    """Commit a partial atomically; returns the committed version path."""
    if partial.partition != partition_key:
        raise FeatureError(f"this partial was computed on partition {partial.partition!r}, not {partition_key!r}",
                           "pass the partition key the partial came from")
    buffer = io.BytesIO()
    np.savez(buffer, **{name: getattr(partial, name) for name in Partial.ARRAYS + Partial.WITNESS})
    name = partial_name(run, partition_key, shard_index)
    with store.writing(name, partition=partition_key, partition_version=partial.partition_version,
                       start=partial.start, stop=partial.stop, top_k=partial.top_k) as version:
        store.write_bytes_atomic(f"{version}/partial.npz", buffer.getvalue())
        store.write_json(f"{version}/meta.json", {**partial.meta(), "run": run, "shard_index": int(shard_index)})
    return store.resolve(name)


def read_partial(store: ArtifactStore, run: str, partition_key: str, shard_index: int) -> Partial:
    path = store.require(partial_name(run, partition_key, shard_index),
                         f"feature partial of run {run!r}, partition {partition_key!r}, shard {shard_index}",
                         "run pass 1 (compute_partial + write_partial) for that partition and feature shard")
    meta = store.read_json(f"{path}/meta.json")
    with np.load(io.BytesIO(store.fs.cat_file(f"{path}/partial.npz")), allow_pickle=False) as arrays:
        data = {name: arrays[name] for name in Partial.ARRAYS + Partial.WITNESS if name in arrays.files}
    fields = {k: meta[k] for k in ("partition", "partition_version", "start", "stop", "top_k", "reservoir_size",
                                   "seed", "batch_rows", "n_tokens", "sae")}
    fields.update({k: meta.get(k) for k in ("n_entries", "entries_sum")})
    return Partial(**fields, **data, group=meta.get("group", FIRST_STORE))


def list_partials(store: ArtifactStore, run: str, shard_index: int) -> list[str]:
    """Partition keys that have a committed partial for this run and feature shard, sorted."""
    try:
        entries = store.fs.ls(partials_folder(store, run), detail=False)
    except FileNotFoundError:
        return []
    keys = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return sorted(k for k in keys if store.pointer(partial_name(run, k, shard_index)) is not None)


def read_partials(store: ArtifactStore, run: str, shard_index: int,
                  partitions: Iterable[str] | None = None) -> Iterator[Partial]:
    """The committed partials of one feature shard, one at a time (pass 2's input)."""
    for key in (list_partials(store, run, shard_index) if partitions is None else partitions):
        yield read_partial(store, run, key, shard_index)


# ---------------------------------------------------------------------------------------------
# Pass 2
# ---------------------------------------------------------------------------------------------

@dataclass
class FeatureTables:
    stats: pl.DataFrame
    examples: pl.DataFrame
    meta: dict


@dataclass
class _Merged:
    """Running merge state: partitions sorted by key; *_part index into that list."""

    partitions: list[dict]
    top_act: np.ndarray
    top_part: np.ndarray
    top_row: np.ndarray
    res_key: np.ndarray
    res_part: np.ndarray
    res_row: np.ndarray
    res_act: np.ndarray
    count: np.ndarray
    sum: np.ndarray
    max: np.ndarray
    hist: np.ndarray
    n_tokens: int


def _as_merged(p: Partial) -> _Merged:
    part = lambda rows: np.where(rows >= 0, 0, -1).astype(np.int32)  # noqa: E731
    info = {"key": p.partition, "version": p.partition_version, "n_tokens": p.n_tokens, "batch_rows": p.batch_rows}
    return _Merged([info], p.top_act, part(p.top_row), p.top_row, p.res_key, part(p.res_row), p.res_row,
                   p.res_act, p.count.copy(), p.sum.copy(), p.max.copy(), p.hist.copy(), p.n_tokens)


def _fold(a: _Merged, b: _Merged) -> _Merged:
    keys = sorted([p["key"] for p in a.partitions] + [p["key"] for p in b.partitions])
    where = {k: i for i, k in enumerate(keys)}
    remap = lambda m: np.array([where[p["key"]] for p in m.partitions], dtype=np.int32)  # noqa: E731
    ra, rb = remap(a), remap(b)
    reindex = lambda parts, r: np.where(parts >= 0, r[np.maximum(parts, 0)], -1).astype(np.int32)  # noqa: E731

    # top: activation desc, partition asc, row asc; empty slots (row -1) last
    act = np.concatenate([a.top_act, b.top_act], 1)
    part = np.concatenate([reindex(a.top_part, ra), reindex(b.top_part, rb)], 1)
    row = np.concatenate([a.top_row, b.top_row], 1)
    n, width = act.shape
    k = a.top_act.shape[1]
    feature = np.repeat(np.arange(n), width)
    order = np.lexsort((row.ravel(), part.ravel(), -act.ravel().astype(np.float64), (row < 0).ravel(), feature))
    order = order.reshape(n, width)[:, :k] - (np.arange(n) * width)[:, None]
    take = lambda x: np.take_along_axis(x, order, 1)  # noqa: E731
    top_act, top_part, top_row = take(act), take(part), take(row)

    # reservoir: bottom R of the union by key
    rkey = np.concatenate([a.res_key, b.res_key], 1)
    r = a.res_key.shape[1]
    pick = np.argsort(rkey, axis=1, kind="stable")[:, :r]
    takes = lambda x, y: np.take_along_axis(np.concatenate([x, y], 1), pick, 1)  # noqa: E731
    return _Merged(
        sorted(a.partitions + b.partitions, key=lambda p: p["key"]),
        top_act, top_part, top_row,
        np.take_along_axis(rkey, pick, 1), takes(reindex(a.res_part, ra), reindex(b.res_part, rb)),
        takes(a.res_row, b.res_row), takes(a.res_act, b.res_act),
        a.count + b.count, a.sum + b.sum, np.maximum(a.max, b.max), a.hist + b.hist, a.n_tokens + b.n_tokens,
    )


def _check_compatible(first: Partial, p: Partial) -> None:
    for name in ("start", "stop", "top_k", "reservoir_size", "seed", "group"):
        if getattr(first, name) != getattr(p, name):
            raise FeatureError(f"partials disagree on {name}: partition {first.partition!r} has "
                               f"{getattr(first, name)!r}, partition {p.partition!r} has {getattr(p, name)!r}",
                               "recompute the partials of one feature shard with the same settings")
    if first.sae.get("fingerprint") != p.sae.get("fingerprint"):
        raise FeatureError(f"partials of partitions {first.partition!r} and {p.partition!r} were computed "
                           "with different SAE weights",
                           "recompute every partial of this run with the current checkpoint")


def merge_partials(partials: Iterable[Partial], settings: FeatureSettings) -> FeatureTables:
    """Pass 2: fold the partials of one feature shard (one per partition, any order) into tables.
    Of ``settings`` it reads n_intervals and per_interval (top_k, the reservoir size and the seed
    are the partials' own)."""
    n_intervals, per_interval = settings.n_intervals, settings.per_interval
    _positive("n_intervals", n_intervals)
    _positive("per_interval", per_interval)
    state, first, seen = None, None, set()
    n_entries, entries_sum = 0, 0.0
    for p in partials:
        if first is None:  # its settings only: the big arrays are not kept alive
            first = dataclasses.replace(p, **{name: None for name in Partial.ARRAYS + Partial.WITNESS[1:]})
        _check_compatible(first, p)
        if not np.array_equal(first.witness, p.witness):
            raise FeatureError(f"partials of partitions {first.partition!r} and {p.partition!r} recorded different "
                               "witness features for the exactness check",
                               "recompute every partial of this run with the same check_features and seed")
        n_entries = None if n_entries is None or p.n_entries is None else n_entries + p.n_entries
        entries_sum = None if entries_sum is None or p.entries_sum is None else entries_sum + p.entries_sum
        if p.partition in seen:
            raise FeatureError(f"partition {p.partition!r} appears twice among the partials",
                               "pass one partial per partition (its counts would be doubled)")
        seen.add(p.partition)
        state = _as_merged(p) if state is None else _fold(state, _as_merged(p))
    if state is None:
        raise FeatureError("no partials to merge", "run pass 1 (compute_partial) for at least one partition")
    meta = {"start": first.start, "stop": first.stop, "top_k": first.top_k, "reservoir_size": first.reservoir_size,
            "seed": first.seed, "n_intervals": n_intervals, "per_interval": per_interval,
            "n_tokens_total": state.n_tokens, "partitions": state.partitions, "sae": first.sae,
            "witness": first.witness.tolist(), "n_entries": n_entries, "entries_sum": entries_sum, "group": first.group,
            "hist_bin_edges": hist_bin_edges(),
            "hist_bins": "histogram[0]: 0 < a < edges[0]; histogram[i]: edges[i-1] <= a < edges[i]; "
                         "histogram[65]: a >= edges[64]"}
    return FeatureTables(_stats_frame(state, first.start), _examples_frame(state, first.start, n_intervals,
                                                                            per_interval), meta)


def _stats_frame(s: _Merged, start: int) -> pl.DataFrame:
    n = len(s.count)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(s.count > 0, s.sum / np.maximum(s.count, 1), np.nan)
    return pl.DataFrame({
        FEATURE: pl.Series(np.arange(start, start + n, dtype=np.int64)),
        N_TOKENS_TOTAL: pl.Series(np.full(n, s.n_tokens, dtype=np.int64)),
        COUNT: pl.Series(s.count.astype(np.int64)),
        DENSITY: pl.Series(s.count / max(s.n_tokens, 1)).cast(pl.Float64),
        MAX: pl.Series(s.max.astype(np.float32)),
        MEAN: pl.Series(mean, nan_to_null=True).cast(pl.Float64),
        SUM: pl.Series(s.sum.astype(np.float64)),
        HISTOGRAM: pl.Series(s.hist.astype(np.int64)).cast(pl.List(pl.Int64)),
    }, schema=STATS_SCHEMA)


def interval_of(act: np.ndarray, vmax: np.ndarray, n_intervals: int) -> np.ndarray:
    """Equal-width interval of each activation in (0, max]: min(floor(a / max * n), n - 1)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.floor(np.asarray(act, np.float64) / np.asarray(vmax, np.float64) * n_intervals)
    return np.clip(np.nan_to_num(j, nan=0.0), 0, n_intervals - 1).astype(np.int32)


def _examples_frame(s: _Merged, start: int, n_intervals: int, per_interval: int) -> pl.DataFrame:
    """Pieces are laid out kind by kind (top, interval 0..n-1, random), each in (feature, rank)
    order, so one stable sort by feature gives (feature, kind, interval, rank) order."""
    n, k = s.top_act.shape
    r = s.res_key.shape[1]
    cols: dict[str, list[np.ndarray]] = {c: [] for c in EXAMPLE_COLUMNS}

    def piece(kind, mask, rank, act, part, row, interval=-1):
        f, c = np.nonzero(mask)
        for name, values in ((FEATURE, f.astype(np.int64) + start),
                             (KIND, np.full(len(f), KIND_ORDER.index(kind), dtype=np.int8)),
                             (RANK, rank[f, c].astype(np.int32)), (INTERVAL, np.full(len(f), interval, np.int32)),
                             (ACTIVATION, act[f, c].astype(np.float32)), (PARTITION, part[f, c].astype(np.int32)),
                             (ROW, row[f, c].astype(np.int64))):
            cols[name].append(values)

    piece(KIND_TOP, s.top_row >= 0, np.broadcast_to(np.arange(k), (n, k)), s.top_act, s.top_part, s.top_row)
    filled = s.res_row >= 0
    interval = np.where(filled, interval_of(s.res_act, s.max[:, None], n_intervals), -1)
    for j in range(n_intervals):
        inside = interval == j
        rank = np.cumsum(inside, axis=1) - 1  # the reservoir is in key order: smallest keys first
        piece(KIND_INTERVAL, inside & (rank < per_interval), rank, s.res_act, s.res_part, s.res_row, j)
    piece(KIND_RANDOM, filled, np.broadcast_to(np.arange(r), (n, r)), s.res_act, s.res_part, s.res_row)
    order = np.argsort(np.concatenate(cols[FEATURE]), kind="stable")
    names = [p["key"] for p in s.partitions]
    frame = {}
    for name in list(cols):  # one column at a time: bounded temporaries
        values = np.concatenate(cols.pop(name))[order]
        if name == KIND:
            frame[name] = pl.Series(values.astype(np.int64)).replace_strict(list(range(len(KIND_ORDER))),
                                                                            list(KIND_ORDER), return_dtype=pl.Utf8)
        elif name == PARTITION:
            frame[name] = pl.Series(values.astype(np.int64)).replace_strict(list(range(len(names))), names,
                                                                            return_dtype=pl.Utf8)
        elif name == INTERVAL:
            frame[name] = pl.Series(values).set(pl.Series(values < 0), None)
        else:
            frame[name] = pl.Series(values)
    return pl.DataFrame(frame, schema=EXAMPLE_SCHEMA)


def write_tables(store: ArtifactStore, run: str, shard_index: int, tables: FeatureTables) -> str:
    """Commit stats.parquet, examples.parquet and meta.json of one feature shard together."""
    name = tables_name(run, shard_index)
    with store.writing(name, start=tables.meta["start"], stop=tables.meta["stop"],
                       n_tokens_total=tables.meta["n_tokens_total"]) as version:
        store.write_parquet(f"{version}/stats.parquet", tables.stats)
        store.write_parquet(f"{version}/examples.parquet", tables.examples)
        store.write_json(f"{version}/meta.json", {**tables.meta, "run": run, "shard_index": int(shard_index)})
    return store.resolve(name)


def read_tables(store: ArtifactStore, run: str, shard_index: int) -> FeatureTables:
    path = store.require(tables_name(run, shard_index), f"feature tables of run {run!r}, shard {shard_index}",
                         "run pass 2 (merge_partials + write_tables) for that feature shard")
    return FeatureTables(store.read_parquet(f"{path}/stats.parquet"), store.read_parquet(f"{path}/examples.parquet"),
                         store.read_json(f"{path}/meta.json"))


def build_feature_tables(store: ArtifactStore, sae, run: str, settings: FeatureSettings, *, n_feature_shards: int = 1,
                         partitions: list[str] | None = None, batch_rows: int = 4096, device=None,
                         group: str = FIRST_STORE) -> list[dict]:
    """Both passes, in this process: every partition's partials (all feature shards from one
    encode), then every shard's tables. The Dagster layer runs the same functions as separate
    partitioned steps."""
    keys = list_partitions(store) if partitions is None else sorted(partitions)
    if not keys:
        raise FeatureError("there are no activation partitions to build feature tables from",
                           "materialize the activations asset first")
    shards = feature_shards(sae.n_latents, n_feature_shards)
    for key in keys:
        partials = compute_partials(store, sae, key, shards, settings, batch_rows=batch_rows, device=device,
                                    group=group)
        for index, partial in enumerate(partials):
            write_partial(store, run, key, index, partial)
    summaries = []
    for index, (start, stop) in enumerate(shards):
        tables = merge_partials(read_partials(store, run, index, keys), settings)
        path = write_tables(store, run, index, tables)
        summaries.append({"shard_index": index, "start": start, "stop": stop, "path": path,
                          "n_tokens_total": tables.meta["n_tokens_total"],
                          "n_examples": tables.examples.height,
                          "dead_features": int((tables.stats["count"] == 0).sum())})
    return summaries


# ---------------------------------------------------------------------------------------------
# Exactness check
# ---------------------------------------------------------------------------------------------

def _read_witness(store: ArtifactStore, run: str, key: str, shard_index: int) -> tuple[dict, dict]:
    """A partial's meta and its witness arrays only (not the selection state)."""
    path = store.require(partial_name(run, key, shard_index),
                         f"feature partial of run {run!r}, partition {key!r}, shard {shard_index}",
                         "run pass 1 (compute_partials + write_partial) for that partition")
    meta = store.read_json(f"{path}/meta.json")
    with np.load(io.BytesIO(store.fs.cat_file(f"{path}/partial.npz")), allow_pickle=False) as arrays:
        if "witness" not in arrays.files:
            raise FeatureError(f"the partial of partition {key!r}, shard {shard_index} has no exactness witness "
                               "(it was computed by an older version)",
                               "rebuild the feature tables (resources.features.config.rebuild: true)")
        return meta, {name: arrays[name] for name in Partial.WITNESS}


@torch.no_grad()
def brute_force_check(store: ArtifactStore, sae, run: str, shard_index: int, start: int, stop: int,
                      sample_features: int = 8, seed: int = 0, reencode: bool = False) -> dict:
    """Check the committed tables of one feature shard, exactly, without a second pass by default.

    Every feature: invariants that must agree across the passes: the feature ids, token totals
    against the partitions' current row counts, histogram sums against counts, the number of top
    and random examples against min(count, top_k / R), max against the first top example, and
    the shard's total count and sum against what pass 1 counted apart (``n_entries``,
    ``entries_sum``).

    Witness features (``witness_features``: ``check_features`` per shard, every feature when it
    is at least the shard's width): every activating token pass 1 recorded for them, sorted by
    numpy, must give exactly the tables' top-k (activations and (partition, row), same tie order),
    count, max, sum, histogram, random sample (numpy twin of the sample keys, bottom R) and
    interval examples.

    ``reencode=True`` instead recomputes ``sample_features`` features by brute force from the
    activations: every row of every partition densely encoded (``encode_slice`` with pass 1's batch
    boundaries, so floating-point results are bit-identical): one more full encode per shard for
    TopK-style variants, for tests and audits."""
    _check_range(sae, start, stop)
    tables = read_tables(store, run, shard_index)
    meta = tables.meta
    if (meta["start"], meta["stop"]) != (start, stop):
        raise FeatureError(f"feature tables of run {run!r} shard {shard_index} cover [{meta['start']}, "
                           f"{meta['stop']}), not [{start}, {stop})",
                           "pass the shard's own range (feature_shard(n_latents, n_shards, index))")
    mismatches = []

    def bad(feature, what, expected, got):
        mismatches.append({"feature": feature, "what": what, "expected": expected, "got": got})

    if meta["sae"].get("fingerprint") != sae_fingerprint(sae):
        bad(None, "sae_fingerprint", sae_fingerprint(sae), meta["sae"].get("fingerprint"))
    stats = tables.stats.sort("feature")
    if stats["feature"].to_list() != list(range(start, stop)):
        bad(None, "stats features", f"[{start}, {stop})", f"{stats.height} rows, {stats['feature'].n_unique()} ids")
        stats = stats.filter(pl.col("feature").is_between(start, stop - 1)).unique("feature", keep="first").sort(
            "feature")
    examples = tables.examples
    k, r, n_int = meta["top_k"], meta["reservoir_size"], meta["n_intervals"]
    keys = [p["key"] for p in meta["partitions"]]

    # -- invariants over every feature (no pass over the data) --
    count_all = stats["count"].to_numpy()
    feats_all = stats["feature"].to_numpy()
    hist_sum = np.array([sum(h) for h in stats["histogram"].to_list()], dtype=np.int64)
    for f in feats_all[hist_sum != count_all].tolist():
        bad(f, "histogram total", int(count_all[feats_all == f][0]), int(hist_sum[feats_all == f][0]))
    per_kind = examples.group_by("feature", "kind").len()
    for kind, cap in (("top", k), ("random", r)):
        n_have = dict(zip(*per_kind.filter(pl.col("kind") == kind).select("feature", "len").to_numpy().T.tolist())) \
            if per_kind.height else {}
        for f, c in zip(feats_all.tolist(), count_all.tolist()):
            if n_have.get(f, 0) != min(c, cap):
                bad(f, f"{kind} examples", min(c, cap), n_have.get(f, 0))
    first_top = examples.filter((pl.col("kind") == "top") & (pl.col("rank") == 0))
    top_max = dict(zip(first_top["feature"].to_list(), first_top["activation"].to_list()))
    for f, m, c in zip(feats_all.tolist(), stats["max"].to_list(), count_all.tolist()):
        if c > 0 and f in top_max and np.float32(top_max[f]) != np.float32(m):
            bad(f, "max vs top", top_max[f], m)
    if meta.get("n_entries") is not None and int(count_all.sum()) != meta["n_entries"]:
        bad(None, "total count", meta["n_entries"], int(count_all.sum()))
    if meta.get("entries_sum") is not None and not math.isclose(float(stats["sum"].sum()), meta["entries_sum"],
                                                                 rel_tol=1e-9, abs_tol=1e-9):
        bad(None, "total sum", meta["entries_sum"], float(stats["sum"].sum()))

    # -- the partitions the tables were built from, as they are now --
    n_tokens = 0
    parts = []
    for info in meta["partitions"]:
        pointer = store.pointer(partition_name(info["key"])) or {}
        if pointer.get("version") != info["version"]:
            bad(None, f"partition {info['key']} version", info["version"], pointer.get("version"))
        part = _open_checked(store, sae, info["key"], meta.get("group", FIRST_STORE))
        if part.n_rows != info["n_tokens"]:
            bad(None, f"partition {info['key']} n_rows", info["n_tokens"], part.n_rows)
        n_tokens += part.n_rows
        parts.append(part)
    extra_partitions = sorted(set(list_partitions(store)) - set(keys))

    # -- the checked features' activating tokens: (activation, partition index, row) each --
    entries: dict[int, list] = {}
    if reencode:
        counts = np.zeros(stop - start, dtype=np.int64)
        counts[stats["feature"].to_numpy() - start] = stats["count"].to_numpy()
        # mostly features that fire (where there is something to get wrong), plus one that never does
        rng = np.random.default_rng(seed)
        active, inactive = np.nonzero(counts > 0)[0], np.nonzero(counts == 0)[0]
        n_pick = min(sample_features, stop - start)
        n_inactive = min(len(inactive), max(n_pick - len(active), 1 if n_pick > 1 else 0))
        n_active = min(len(active), n_pick - n_inactive)
        local = np.sort(np.concatenate([rng.choice(active, n_active, replace=False),
                                        rng.choice(inactive, n_inactive, replace=False)]).astype(np.int64))
        device = _sae_device(sae)
        for index, (info, part) in enumerate(zip(meta["partitions"], parts)):
            values = []
            for lo in range(0, part.n_rows, info["batch_rows"]):
                x = torch.from_numpy(np.ascontiguousarray(part.acts[lo:lo + info["batch_rows"]])).to(device)
                dense = sae.encode_slice(x, start, stop)[:, torch.as_tensor(local, device=device)]
                values.append(dense.float().cpu().numpy())
            values = np.concatenate(values) if values else np.zeros((0, len(local)), np.float32)
            for col, f in enumerate(local.tolist()):
                on = np.nonzero(values[:, col] > 0)[0]
                entries.setdefault(f, []).append((values[on, col], np.full(len(on), index), on.astype(np.int64)))
    else:
        local = np.asarray(meta.get("witness") or [], dtype=np.int64)
        for index, info in enumerate(meta["partitions"]):
            pmeta, w = _read_witness(store, run, info["key"], shard_index)
            if pmeta.get("partition_version") != info["version"] or not np.array_equal(w["witness"], local):
                bad(None, f"partition {info['key']} partial", {"version": info["version"], "witness": local.tolist()},
                    {"version": pmeta.get("partition_version"), "witness": w["witness"].tolist()})
                continue
            order = np.argsort(w["witness_feature"], kind="stable")
            wf, wr, wa = w["witness_feature"][order], w["witness_row"][order], w["witness_act"][order]
            cuts = np.searchsorted(wf, local, side="left"), np.searchsorted(wf, local, side="right")
            for f, lo, hi in zip(local.tolist(), *cuts):
                entries.setdefault(f, []).append((wa[lo:hi], np.full(hi - lo, index), wr[lo:hi]))
    features = (local + start).tolist()

    salts = np.array([partition_salt(meta["seed"], key) for key in keys], dtype=object)
    for f_local, feature in zip(local.tolist(), features):
        found = stats.filter(pl.col("feature") == feature)
        if found.height == 0:
            continue  # already reported as a stats mismatch
        srow = found.row(0, named=True)
        pieces = entries.get(f_local, [])
        aa = np.concatenate([p[0] for p in pieces]).astype(np.float32) if pieces else np.zeros(0, np.float32)
        pp = np.concatenate([p[1] for p in pieces]).astype(np.int64) if pieces else np.zeros(0, np.int64)
        rr = np.concatenate([p[2] for p in pieces]).astype(np.int64) if pieces else np.zeros(0, np.int64)
        if srow["n_tokens_total"] != n_tokens:
            bad(feature, "n_tokens_total", n_tokens, srow["n_tokens_total"])
        if srow["count"] != len(aa):
            bad(feature, "count", int(len(aa)), srow["count"])
        vmax = np.float32(aa.max()) if len(aa) else np.float32(0)
        if np.float32(srow["max"]) != vmax:
            bad(feature, "max", float(vmax), srow["max"])
        total = float(np.sum(aa, dtype=np.float64))
        if not math.isclose(srow["sum"], total, rel_tol=1e-9, abs_tol=1e-12):
            bad(feature, "sum", total, srow["sum"])
        mean = total / len(aa) if len(aa) else None
        if (mean is None) != (srow["mean"] is None) or (mean is not None and not math.isclose(srow["mean"], mean,
                                                                                              rel_tol=1e-9)):
            bad(feature, "mean", mean, srow["mean"])
        if not math.isclose(srow["density"], len(aa) / max(n_tokens, 1), rel_tol=1e-12):
            bad(feature, "density", len(aa) / max(n_tokens, 1), srow["density"])
        hist = np.bincount(hist_bins(aa), minlength=N_HIST_BINS)
        if srow["histogram"] != hist.tolist():
            bad(feature, "histogram", hist.tolist(), srow["histogram"])
        ex = examples.filter(pl.col("feature") == feature)
        # top-k: activation desc, partition asc, row asc
        order = np.lexsort((rr, pp, -aa.astype(np.float64)))[:k]
        expect = list(zip(aa[order].tolist(), [keys[i] for i in pp[order]], rr[order].tolist()))
        top = ex.filter(pl.col("kind") == "top").sort("rank")
        got = list(zip(top["activation"].to_list(), top["partition"].to_list(), top["row"].to_list()))
        if got != expect or top["rank"].to_list() != list(range(len(got))):
            bad(feature, "top", expect, got)
        # random sample: the R smallest sample keys among activating tokens
        skeys = np.empty(len(aa), dtype=np.int64)
        for i in np.unique(pp):
            m = pp == i
            skeys[m] = sample_keys_numpy(int(salts[i]), rr[m], np.full(m.sum(), feature))
        order = np.argsort(skeys, kind="stable")[:r]
        expect = list(zip(aa[order].tolist(), [keys[i] for i in pp[order]], rr[order].tolist()))
        rand = ex.filter(pl.col("kind") == "random").sort("rank")
        got = list(zip(rand["activation"].to_list(), rand["partition"].to_list(), rand["row"].to_list()))
        if got != expect:
            bad(feature, "random", expect, got)
        # interval examples: the first per_interval reservoir members of each interval, in key order
        ivals = interval_of(np.array([e[0] for e in expect], dtype=np.float32), np.float64(vmax), n_int) \
            if expect else np.zeros(0, np.int32)
        inter = ex.filter(pl.col("kind") == "interval").sort(["interval", "rank"])
        got = list(zip(inter["interval"].to_list(), inter["rank"].to_list(), inter["activation"].to_list(),
                       inter["partition"].to_list(), inter["row"].to_list()))
        want = []
        for j in range(n_int):
            members = [e for e, iv in zip(expect, ivals) if iv == j][:meta["per_interval"]]
            want += [(j, rank, *e) for rank, e in enumerate(members)]
        if got != want:
            bad(feature, "interval", want, got)
    return {"ok": not mismatches, "mismatches": mismatches, "features_checked": features,
            "mode": "reencode" if reencode else "witness", "n_tokens": n_tokens, "partitions": keys,
            "partitions_not_in_tables": extra_partitions}

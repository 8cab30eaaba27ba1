"""Pass 1's streaming selection per feature: the order of the top activations, the counter-based
keys of the random sample, and the bottom-m selector that keeps a stream's best entries in a fixed
buffer (docs/design.md, "Feature tables, context windows, browser"). ``features.compute_partials``
drives it; the exactness check (``feature_check``) recomputes the sample keys with the numpy twin.

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
Memory: O(n_features * m) per selector, never the stream's length.
"""

import hashlib

import numpy as np
import torch

KEY_PAD = np.iinfo(np.int64).max    # an empty slot in a bottom-m buffer
# Compaction processes features in blocks of at most about this many slots.
COMPACT_BLOCK_ENTRIES = 1 << 18

_U64 = 1 << 64
_GOLDEN = 0x9E3779B97F4A7C15
_FEATURE_MULT = 0xD1B54A32D192ED03
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


# ---------------------------------------------------------------------------------------------
# Counter-based sample keys (torch on the device; a numpy twin for checks and tests)
# ---------------------------------------------------------------------------------------------

def partition_salt(seed: int, partition: str, stream: str = "") -> int:
    """A signed 64-bit salt per (seed, partition key[, stream]). ``stream`` names an independent
    draw over the same tokens: the interval examples (``feature_intervals``) use "interval", so
    they are not the random sample's members again; "" is the random sample's own."""
    text = f"{int(seed)}\x00{partition}" + (f"\x00{stream}" if stream else "")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
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


# ---------------------------------------------------------------------------------------------
# Top-k order
# ---------------------------------------------------------------------------------------------

def top_keys(vals: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering by activation (desc) then row (asc); vals float32 > 0."""
    bits = vals.float().contiguous().view(torch.int32).long()
    return (bits << 32) | (0xFFFFFFFF - rows.long())


def decode_top(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation, row) of ``top_keys`` keys; (0.0, -1) for empty slots (negative keys)."""
    empty = keys < 0
    act = (keys >> 32).to(torch.int32).view(torch.float32)
    row = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return torch.where(empty, 0.0, act), torch.where(empty, -1, row)


# ---------------------------------------------------------------------------------------------
# Streaming bottom-m per feature
# ---------------------------------------------------------------------------------------------

class Selector:
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

    def finish(self, features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """([F, m] slots, [F, m] their sort keys) of ``features`` (1-d int64 ids, default every
        feature: F = n), ascending by key, EMPTY / KEY_PAD-padded; frees the buffer. Why a subset:
        pass 1 keeps only the features that got entries (``features.Partial``), and a feature that
        got none is all EMPTY / KEY_PAD, so sorting it would be wasted work. Each block of features
        is sorted once, straight into the outputs."""
        m = self.m
        features = torch.arange(self.n, device=self.device) if features is None else features
        slots = torch.empty((features.numel(), m), dtype=torch.long, device=self.device)
        keys = torch.empty((features.numel(), m), dtype=torch.long, device=self.device)
        for b0 in range(0, features.numel(), self.block):
            block = features[b0:b0 + self.block]
            rows = self.slots[block]
            block_keys, idx = self.keys_of(rows, block).sort(dim=1)
            keys[b0:b0 + block.numel()] = block_keys[:, :m]
            slots[b0:b0 + block.numel()] = rows.gather(1, idx[:, :m])
        self.slots = None
        return slots, keys


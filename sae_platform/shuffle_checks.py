"""Checks of a committed shuffled store (docs/design.md, "The shuffle"), streamed in bounded memory:
``permutation_check`` (the output is its inputs, each row once with its own bytes) and
``uniformity_stats`` / ``uniformity_from_ids`` (evidence that the order is uniformly random), with
the hashing and the chi² and Kolmogorov tail probabilities they use.
"""

import math
from collections.abc import Iterable

import numpy as np

from sae_platform.errors import StorageError
from sae_platform.shuffle import partition_blocks, run_from_index
from sae_platform.shuffled import open_shuffled
from sae_platform.storage import ArtifactStore


def permutation_check(store: ArtifactStore, name: str) -> dict:
    """The invariant that matters most: output = input as a multiset of (id, row bytes).

    Order-independent sums of a 64-bit hash per row (over the id and the activation bytes
    together, so an id paired with another row's vector is caught) compare input and output;
    a bitmap of ids finds duplicates and, with equal counts, proves nothing is missing.
    """
    shuffled = open_shuffled(store, name)
    run = run_from_index(shuffled.index)
    inputs = _Digest()
    for ids, acts in partition_blocks(store, run, 0, run.plan.n_rows, run.plan.block_rows):
        inputs.add(ids, acts)
    outputs, seen = _Digest(), np.zeros((shuffled.n_rows + 7) // 8, dtype=np.uint8)
    duplicates = out_of_range = 0
    for ids, acts in shuffled.blocks():
        outputs.add(ids, acts)
        valid = (ids >= 0) & (ids < shuffled.n_rows)
        out_of_range += int((~valid).sum())
        duplicates += _mark(seen, ids[valid])
    distinct = int(np.unpackbits(seen).sum())
    result = {
        "input_rows": inputs.rows, "output_rows": outputs.rows, "distinct_ids": distinct,
        "duplicate_ids": duplicates, "out_of_range_ids": out_of_range,
        "missing_ids": run.plan.n_rows - distinct,
        "id_checksum_match": inputs.id_sum == outputs.id_sum,
        "row_checksum_match": inputs.row_sum == outputs.row_sum,
        "input_row_checksum": f"{inputs.row_sum:016x}", "output_row_checksum": f"{outputs.row_sum:016x}",
    }
    result["ok"] = bool(result["input_rows"] == result["output_rows"] == distinct and not duplicates
                        and not out_of_range and result["id_checksum_match"] and result["row_checksum_match"])
    return result



def _mark(seen: np.ndarray, ids: np.ndarray) -> int:
    """Set the ids' bits; return how many were already set or repeat within ``ids``."""
    ids = np.sort(ids)
    repeats = int((ids[1:] == ids[:-1]).sum())
    ids = np.unique(ids)
    byte, bit = ids >> 3, (1 << (ids & 7)).astype(np.uint8)
    already = int(((seen[byte] & bit) != 0).sum())
    np.bitwise_or.at(seen, byte, bit)
    return repeats + already


class _Digest:
    """Row count and order-independent checksums (sums mod 2^64) of ids and of whole rows."""

    def __init__(self):
        self.rows, self.id_sum, self.row_sum = 0, 0, 0

    def add(self, ids: np.ndarray, acts: np.ndarray) -> None:
        id_hash = _fmix(ids.astype(np.uint64) ^ np.uint64(0x9E3779B97F4A7C15))
        row_hash = _fmix(_words_hash(acts) + id_hash)
        self.rows += len(ids)
        self.id_sum = (self.id_sum + int(id_hash.sum(dtype=np.uint64))) % (1 << 64)
        self.row_sum = (self.row_sum + int(row_hash.sum(dtype=np.uint64))) % (1 << 64)


def _words_hash(acts: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes: position-salted mixed words, summed."""
    raw = np.ascontiguousarray(acts).view(np.uint8).reshape(len(acts), -1)
    width = next(w for w in (8, 4, 2, 1) if raw.shape[1] % w == 0)
    words = raw.view(f"<u{width}").astype(np.uint64)
    words ^= _fmix(np.arange(1, words.shape[1] + 1, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93))
    return _fmix(words).sum(axis=1, dtype=np.uint64)


def _fmix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def uniformity_stats(store: ArtifactStore, name: str, n_groups: int = 16) -> dict:
    """Evidence that the order is uniformly random, streamed over the output's row ids."""
    shuffled = open_shuffled(store, name)
    return uniformity_from_ids((ids for ids, _ in shuffled.blocks()), shuffled.n_rows, n_groups)


def uniformity_from_ids(id_blocks: Iterable[np.ndarray], n_rows: int, n_groups: int = 16) -> dict:
    """Statistics of an output order given as blocks of input indices (a permutation of 0..n-1).

    - chi²: G source shards (equal ranges of input index) × G output blocks (equal ranges of output
      position); a uniform permutation makes them independent. ``chi2_mod`` does the same with
      shards of index mod G, which catches round-robin-like assignments that contiguous shards miss.
    - Spearman rho of input index vs output position: ≈ 0, sd ≈ 1/√(n-1); ``spearman_z`` is rho·√(n-1).
    - neighbours: the fraction of adjacent output pairs that were adjacent in the input, ≈ 2/n.
    - KS: each source shard's output positions against U(0,1); the smallest p, Bonferroni-corrected.
    """
    n = int(n_rows)
    G = max(2, min(n_groups, int(math.sqrt(n / 5))))  # expected cell count >= 5
    shard_sizes = np.diff([-(-s * n // G) for s in range(G + 1)])
    table, table_mod = np.zeros(G * G, dtype=np.int64), np.zeros(G * G, dtype=np.int64)
    seen_in_shard = np.zeros(G, dtype=np.int64)
    ks = np.zeros(G)
    sum_d2, adjacent, position, last = 0.0, 0, 0, None
    for ids in id_blocks:
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.arange(position, position + len(ids), dtype=np.int64)
        shard, block = ids * G // n, pos * G // n
        table += np.bincount(shard * G + block, minlength=G * G)
        table_mod += np.bincount(ids % G * G + block, minlength=G * G)
        sum_d2 += float(np.square((ids - pos).astype(np.float64)).sum())
        chain = ids if last is None else np.concatenate([[last], ids])
        adjacent += int((np.abs(np.diff(chain)) == 1).sum())
        for s in range(G):
            where = pos[shard == s]
            if len(where):
                rank = seen_in_shard[s] + np.arange(1, len(where) + 1)
                u = (where + 0.5) / n
                ks[s] = max(ks[s], float(np.max(rank / shard_sizes[s] - u)),
                            float(np.max(u - (rank - 1) / shard_sizes[s])))
                seen_in_shard[s] += len(where)
        position += len(ids)
        last = int(ids[-1]) if len(ids) else last
    if position != n:
        raise StorageError(f"the output holds {position} rows, expected {n}", "check the shuffle's inputs")
    chi2, df = _chi2_independence(table.reshape(G, G))
    chi2_mod, _ = _chi2_independence(table_mod.reshape(G, G))
    rho = 1.0 - 6.0 * sum_d2 / (n * (n * n - 1.0)) if n > 1 else 0.0
    ks_p = [_kolmogorov_sf(float(d), int(m)) for d, m in zip(ks, shard_sizes)]
    return {
        "n_rows": n, "groups": G,
        "chi2": chi2, "chi2_df": df, "chi2_p": chi2_sf(chi2, df), "chi2_mod": chi2_mod,
        "chi2_mod_p": chi2_sf(chi2_mod, df),
        "spearman_rho": rho, "spearman_z": rho * math.sqrt(max(n - 1, 1)), "spearman_sd": 1 / math.sqrt(max(n - 1, 1)),
        "adjacent_pairs": adjacent, "adjacent_fraction": adjacent / max(n - 1, 1), "adjacent_expected": 2 / n,
        "ks_max_d": float(ks.max()), "ks_min_p": min(1.0, G * min(ks_p)),
    }


def _chi2_independence(table: np.ndarray) -> tuple[float, int]:
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    keep = expected > 0
    stat = float((((table - expected) ** 2)[keep] / expected[keep]).sum())
    return stat, (table.shape[0] - 1) * (table.shape[1] - 1)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi²(df): the regularized upper incomplete gamma Q(df/2, x/2)."""
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:  # series for the lower part converges fast here
        term = total = 1.0 / a
        k = a
        while abs(term) > abs(total) * 1e-15:
            k += 1
            term *= z / k
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Lentz's continued fraction for the upper part
    tiny = 1e-300
    b = z + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def _kolmogorov_sf(d: float, n: int) -> float:
    """Asymptotic P(D_n >= d) (Stephens' small-n correction). Sampling positions without
    replacement makes D smaller than this assumes, so the p-value errs on the safe side."""
    if n < 1 or d <= 0:
        return 1.0
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))

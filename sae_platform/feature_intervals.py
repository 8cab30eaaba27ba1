"""Feature tables, interval examples: per feature, up to ``per_interval`` examples drawn uniformly
from ALL of its activating tokens in each of ``n_intervals`` equal-width activation intervals of
(0, max] (docs/design.md, "Feature tables, context windows, browser").

This is how SAEDashboard picks its quantile examples (jbloomAus/SAEDashboard,
``sae_dashboard/feature_data_generator.py`` with ``utils_fns.py``'s ``random_range_indices``: for
each interval of activation values, k indices sampled uniformly among all activations falling in
it). Drawing them from the random sample instead (as the tables did before) makes them mostly the
random examples again, and leaves the high intervals of a dense feature nearly empty.

Intervals. Interval j holds j*max/n <= a < (j+1)*max/n (the last also holds max), computed as
``j = min(floor(a / max * n), n - 1)`` in float64 (``interval_of``), max being the feature's
largest activation over the whole dataset.

Why after the merge. Which tokens fall in interval j depends on max, known only once every
partition has been seen (pass 2 merges it); no bounded pass-1 state holds the sample of every
interval for every possible max. So pass 2, after merging the partials, reads each partition again
(``add_interval_examples``): for TopK-style variants the shard's own committed sparse codes
(``feature_codes.read_range_codes``: no encode, only its latents read), otherwise the rows encoded
again for the shard's latents with pass 1's batch boundaries (its recorded ``batch_rows``), so the
activations are pass 1's bit for bit on the same device (one more encode of the shard's slice:
together one W_enc multiply).

Sampling (bottom-k, exact and mergeable). Every activating (partition, row, feature) gets a
priority from ``feature_select.sample_keys``, on its own stream (salt
``partition_salt(seed, partition, "interval")``): i.i.d. uniform and independent of the random
sample's keys. Per (feature, interval) the ``per_interval`` smallest priorities are kept: a uniform
sample without replacement of the interval's tokens; the k smallest of a union are the k smallest
of each part's k smallest, so the result does not depend on batch size, partitioning or merge
order, and equals a brute force over all tokens (``feature_check`` recomputes it). Rank = order
of priority. Memory: per feature shard one ``Selector`` of n_features * n_intervals rows of
2 * per_interval int64 slots, plus one token batch; the fold over partitions keeps
[n_features, n_intervals, per_interval] arrays.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np
import polars as pl
import torch

from sae_platform.feature_codes import REPLAY_ENTRIES, read_range_codes
from sae_platform.feature_select import KEY_PAD, Selector, partition_salt, sample_keys
from sae_platform.features import (
    FeatureError,
    _batches,
    _sparse_route,
    check_range,
    device_of,
    open_checked,
    weights_dtype,
)
from sae_platform.storage import ArtifactStore
from sae_platform.tables import (
    ACTIVATION,
    EXAMPLE_SCHEMA,
    FEATURE,
    INTERVAL,
    KIND,
    KIND_INTERVAL,
    KIND_ORDER,
    MAX,
    PARTITION,
    RANK,
    ROW,
)

INTERVAL_STREAM = "interval"  # the sample-key stream of the interval examples (partition_salt)
# what the tables' meta records about how the interval examples were drawn (feature_check reads it)
SAMPLING = "bottom-k priority per (feature, interval) over all activating tokens"


def interval_of(act, vmax, n_intervals: int) -> np.ndarray:
    """Equal-width interval of each activation in (0, max]: min(floor(a / max * n), n - 1), int32
    (float64 arithmetic; 0 where max is 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.floor(np.asarray(act, np.float64) / np.asarray(vmax, np.float64) * n_intervals)
    return np.clip(np.nan_to_num(j, nan=0.0), 0, n_intervals - 1).astype(np.int32)


def interval_bounds(vmax, n_intervals: int, interval):
    """[low, high) in activation units of equal-width interval ``interval`` of (0, vmax] (the last
    also holds vmax itself): the interval ``interval_of`` puts an activation in, float64
    (``interval * (vmax / n)``, ``(interval + 1) * (vmax / n)``). ``vmax``, ``interval``: numbers or
    numpy arrays (the Neuronpedia export's binMin/binMax of every window at once), the same floats
    either way; not polars expressions: polars divides by a constant as a product with its
    reciprocal, an ulp off."""
    width = np.asarray(vmax, np.float64) / n_intervals
    return interval * width, (interval + 1) * width


def interval_salt(seed: int, partition: str) -> int:
    """The salt of the interval examples' priorities in one partition (independent of the random sample's)."""
    return partition_salt(seed, partition, INTERVAL_STREAM)


@dataclasses.dataclass
class IntervalSample:
    """Per (feature, interval) the kept examples, [n_features, n_intervals, per_interval] each,
    ascending by priority ``key``; empty slots: key KEY_PAD, part and row -1, act 0."""

    key: np.ndarray   # int64
    part: np.ndarray  # int32, index into the tables' partition list
    row: np.ndarray   # int64
    act: np.ndarray   # float32


class _IntervalSelector:
    """Bottom-``per_interval`` priorities per (feature, interval) of one partition's stream;
    selector row = feature * n_intervals + interval."""

    def __init__(self, start: int, vmax: np.ndarray, n_intervals: int, per_interval: int, salt: int, dev):
        self.start, self.n_intervals, self.salt = start, n_intervals, salt
        self.vmax = torch.from_numpy(np.asarray(vmax, np.float64)).to(dev)
        self.selector = Selector(len(vmax) * n_intervals, per_interval,
                                 lambda slots, cells: sample_keys(salt, slots >> 32, cells // n_intervals + start), dev)

    def add(self, rows: torch.Tensor, feat: torch.Tensor, vals: torch.Tensor) -> None:
        """(row, feature - start, activation > 0 float32) entries."""
        if vals.numel() == 0:
            return
        j = torch.nan_to_num(torch.floor(vals.double() / self.vmax[feat] * self.n_intervals), nan=0.0)
        cell = feat * self.n_intervals + j.clamp_(0, self.n_intervals - 1).long()
        slot = (rows << 32) | vals.contiguous().view(torch.int32).long()
        self.selector.add(cell, sample_keys(self.salt, rows, feat + self.start), slot)

    def finish(self, part_index: int) -> IntervalSample:
        slots, keys = self.selector.finish()
        n, k = len(self.vmax), slots.shape[1]
        empty = slots < 0
        row = torch.where(empty, -1, slots >> 32)
        act = torch.where(empty, 0.0, (slots & 0xFFFFFFFF).to(torch.int32).view(torch.float32))
        shape = (n, self.n_intervals, k)
        return IntervalSample(keys.cpu().numpy().reshape(shape),
                              np.where(empty.cpu().numpy(), -1, part_index).astype(np.int32).reshape(shape),
                              row.cpu().numpy().reshape(shape), act.cpu().numpy().reshape(shape))


def _fold(a: IntervalSample, b: IntervalSample) -> IntervalSample:
    """Bottom-k of the union, per (feature, interval)."""
    k = a.key.shape[-1]
    key = np.concatenate([a.key, b.key], -1)
    pick = np.argsort(key, axis=-1, kind="stable")[..., :k]
    take = lambda x, y: np.take_along_axis(np.concatenate([x, y], -1), pick, -1)  # noqa: E731
    return IntervalSample(np.take_along_axis(key, pick, -1), take(a.part, b.part), take(a.row, b.row),
                          take(a.act, b.act))


@torch.no_grad()
def _partition_entries(store: ArtifactStore, sae, sae_name: str, info: dict, start: int, stop: int,
                       group: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(row, feature - start, activation) of every activating token of latents [start, stop) in
    one partition, in token batches, with pass 1's values (its codes, or its encode and batches)."""
    key, batch_rows, dev = info["key"], int(info["batch_rows"]), device_of(sae)
    part = open_checked(store, sae, key, group)
    version = part.path.rstrip("/").rsplit("/", 1)[-1]
    if version != info["version"]:
        raise FeatureError(f"activation partition {key!r} is now version {version}, but the feature partials were "
                           f"computed from version {info['version']}",
                           "run pass 1 again for that partition, then pass 2 (the tables must describe one version)")
    codes = read_range_codes(store, sae_name, key, sae, start, stop) if _sparse_route(sae) else None
    if codes is not None:  # this shard's entries only, in pass 1's order
        rows, latents, values = codes
        for lo in range(0, len(values), REPLAY_ENTRIES):
            yield (torch.from_numpy(rows[lo:lo + REPLAY_ENTRIES]).to(dev).long(),
                   torch.from_numpy(latents[lo:lo + REPLAY_ENTRIES]).to(dev).long(),
                   torch.from_numpy(values[lo:lo + REPLAY_ENTRIES]).to(dev))
        return
    if not hasattr(sae, "encode_slice"):  # no weights to encode with: the codes pass 1 stored are required
        raise FeatureError(f"partition {key!r} has no stored sparse codes of latents [{start}, {stop}) from the SAE "
                           f"weights its partials recorded (fingerprint {sae.fingerprint})",
                           "run pass 1 again for that partition (it writes the codes), then pass 2")
    for lo, block in _batches(part.acts, part.n_rows, batch_rows):
        x = torch.from_numpy(np.ascontiguousarray(block)).to(dev, non_blocking=True).to(weights_dtype(sae))
        if _sparse_route(sae):
            out = sae.encode(x)
            yield _select(out.values.float(), out.indices.long(), lo, start, stop)
        else:
            acts = sae.encode_slice(x, start, stop)
            r, f = (acts > 0).nonzero(as_tuple=True)
            yield r + lo, f, acts[r, f].float()


def _select(values: torch.Tensor, indices: torch.Tensor, offset: int, start: int, stop: int):
    """The active sparse codes of latents [start, stop): (row, feature - start, activation)."""
    on = (values > 0) & (indices >= start) & (indices < stop)
    r, c = on.nonzero(as_tuple=True)
    return r + offset, indices[r, c] - start, values[r, c]


def sample_intervals(store: ArtifactStore, sae, sae_name: str, meta: dict, vmax: np.ndarray) -> IntervalSample:
    """The interval examples of one feature shard: per feature (``vmax``: its max over the whole
    dataset, float32 [stop - start]) and interval, the ``per_interval`` activating tokens with the
    smallest priorities, over every partition of ``meta`` (the merged tables' meta: start, stop,
    seed, n_intervals, per_interval, group, partitions with key, version and batch_rows).

    Raises FeatureError when a partition's version is not the one the partials were computed from."""
    start, stop = int(meta["start"]), int(meta["stop"])
    check_range(sae, start, stop)
    n_int, k = int(meta["n_intervals"]), int(meta["per_interval"])
    result = None
    for index, info in enumerate(meta["partitions"]):
        selector = _IntervalSelector(start, vmax, n_int, k, interval_salt(meta["seed"], info["key"]), device_of(sae))
        for rows, feat, vals in _partition_entries(store, sae, sae_name, info, start, stop, meta["group"]):
            selector.add(rows, feat, vals)
        sample = selector.finish(index)
        result = sample if result is None else _fold(result, sample)
    if result is None:
        shape = (stop - start, n_int, k)
        result = IntervalSample(np.full(shape, KEY_PAD, np.int64), np.full(shape, -1, np.int32),
                                np.full(shape, -1, np.int64), np.zeros(shape, np.float32))
    return result


def interval_frame(sample: IntervalSample, start: int, partitions: list[str]) -> pl.DataFrame:
    """The interval examples as ``feature_examples`` rows (schema EXAMPLE_SCHEMA), sorted by
    feature, interval, rank (rank = order of priority)."""
    f, j, rank = np.nonzero(sample.row >= 0)  # C order: feature, interval, rank
    names = pl.Series(np.asarray(partitions, dtype=object)[sample.part[f, j, rank]].tolist(), dtype=pl.String) \
        if len(f) else pl.Series([], dtype=pl.String)
    return pl.DataFrame({FEATURE: f.astype(np.int64) + start, KIND: [KIND_INTERVAL] * len(f),
                         RANK: rank.astype(np.int32), INTERVAL: j.astype(np.int32),
                         ACTIVATION: sample.act[f, j, rank], PARTITION: names, ROW: sample.row[f, j, rank]},
                        schema=EXAMPLE_SCHEMA)


def add_interval_examples(store: ArtifactStore, sae, sae_name: str, tables):
    """``tables`` (a merged ``FeatureTables`` of one feature shard, pass 2) with its interval
    examples sampled from all activating tokens (``sample_intervals``) and put in the examples
    table's order (feature, kind [top, interval, random], interval, rank); any interval rows it
    had are replaced. Top and random examples are unchanged. Returns a new FeatureTables."""
    meta = tables.meta
    vmax = np.zeros(meta["stop"] - meta["start"], np.float32)
    stats = tables.stats
    vmax[stats[FEATURE].to_numpy() - meta["start"]] = stats[MAX].to_numpy()
    sample = sample_intervals(store, sae, sae_name, meta, vmax)
    inter = interval_frame(sample, meta["start"], [p["key"] for p in meta["partitions"]])
    kind_index = pl.col(KIND).replace_strict({kind: i for i, kind in enumerate(KIND_ORDER)}, default=len(KIND_ORDER),
                                             return_dtype=pl.Int32)
    examples = pl.concat([tables.examples.filter(pl.col(KIND) != KIND_INTERVAL), inter]) \
        .sort([pl.col(FEATURE), kind_index, pl.col(INTERVAL), pl.col(RANK)], nulls_last=False, maintain_order=True)
    return dataclasses.replace(tables, examples=examples,
                               meta={**meta, "interval_sampling": SAMPLING, "interval_stream": INTERVAL_STREAM})

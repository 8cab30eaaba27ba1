"""Committed pass-1 partials (docs/design.md, "Feature tables"): writing one atomically, reading
one back, listing a shard's partitions, and telling whether a partition's partials are current for
the SAE's checkpoint and the feature-shard layout. The state itself and how pass 1 computes it:
``features``.

Layout of partial.npz (``meta.json``'s ``"layout"``). ``filled-slots`` (what ``write_partial``
writes): the latents that fired (``fired``, ascending local ids), their ``count``, ``sum`` and
``max`` (one each), and of their top-k and reservoir rows only the filled slots
(``features.filled_slots``: the first min(count, width) of each row, which follows from the
count), concatenated in latent order, each array of its own dtype; the histogram as its nonzero
bins: ``hist_nonzero`` (uint8 [F, 9], each latent's 66 bins as bits, ``np.packbits``) and
``hist`` (their int64 counts, in latent then bin order). So a partial's bytes grow with the
examples it holds, not with ``top_k`` or ``reservoir_factor`` (at the 10x demo a latent fires ~50
times a batch, and a reservoir row has 200 slots), and never exceed the full rows by more than
9 B a latent. Two layouts of partials written before still read: a row of every array per fired
latent (``fired``, no ``"layout"``), and a row per latent of the shard (no ``fired``). Every
layout reads back as the same in-memory ``Partial`` (full rows for its fired latents, or for
every latent of the old dense one), so the merge and its tables are the same bit for bit.
"""

import io
from collections.abc import Iterable, Iterator

import numpy as np

from sae_platform.catalog import FIRST_STORE, checkpoint_pin, is_current, partial_name, partials_folder, partition_name
from sae_platform.features import EMPTY_LATENT, N_HIST_BINS, FeatureError, FeatureSettings, Partial, filled_slots
from sae_platform.storage import ArtifactStore

FILLED_SLOTS = "filled-slots"  # meta.json's "layout" of a partial written by write_partial
HIST_NONZERO = "hist_nonzero"  # the filled-slots layout's bitmask of each latent's nonzero histogram bins
HIST_NONZERO_BYTES = -(-N_HIST_BINS // 8)  # a latent's bins, one bit each (np.packbits)
RERUN = "run pass 1 again for that partition and feature shard (it rewrites the partial)"


def write_partial(store: ArtifactStore, sae_name: str, partition_key: str, shard_index: int, partial: Partial, *,
                  checkpoint: str | None = None) -> str:
    """Commit a partial atomically, pinning the SAE ``checkpoint`` version it was computed with (when
    known); returns the committed version path. Stores the latents that fired only
    (``Partial.sparse``), whatever the form it is given in, and of those the filled slots only
    (module docstring, ``filled_slot_arrays``)."""
    if partial.partition != partition_key:
        raise FeatureError(f"this partial was computed on partition {partial.partition!r}, not {partition_key!r}",
                           "pass the partition key the partial came from")
    buffer = io.BytesIO()
    np.savez(buffer, **filled_slot_arrays(partial))
    name = partial_name(sae_name, partition_key, shard_index)
    with store.writing(name, partition=partition_key, partition_version=partial.partition_version,
                       start=partial.start, stop=partial.stop, top_k=partial.top_k,
                       **(checkpoint_pin(checkpoint) if checkpoint else {})) as version:
        store.write_bytes_atomic(f"{version}/partial.npz", buffer.getvalue())
        store.write_json(f"{version}/meta.json", {**partial.meta(), "run": sae_name, "shard_index": int(shard_index),
                                                  "layout": FILLED_SLOTS})
    return store.resolve(name)


def partial_current(store: ArtifactStore, sae_name: str, partition_key: str, index: int, shard: tuple[int, int],
                    settings: FeatureSettings) -> bool:
    """Whether pass 1 of partition ``partition_key`` is done for feature shard ``index`` (latents
    ``shard`` = (start, stop)) with the current checkpoint of ``sae_name``: the shard's partial covers
    that range, pins that checkpoint (``checkpoint_pin``), the partition's current version and
    ``settings.top_k``. Then only new batches are encoded when a kept SAE's tables are brought up to
    date (``sae_platform.refresh``); a partial written before partials pinned their checkpoint, or in
    another layout (a changed memory budget), never counts."""
    current = (store.pointer(partition_name(partition_key)) or {}).get("version")
    pointer = store.pointer(partial_name(sae_name, partition_key, index))
    return (pointer is not None and is_current(store, sae_name, pointer)
            and pointer.get("partition_version") == current and pointer.get("top_k") == settings.top_k
            and (pointer.get("start"), pointer.get("stop")) == tuple(shard))


def read_partial(store: ArtifactStore, sae_name: str, partition_key: str, shard_index: int) -> Partial:
    """The committed partial of one (partition, feature shard), in any layout (module docstring):
    full rows for its fired latents (``fired``), or for every latent when it was written before
    partials were sparse (``fired`` None). Raises StorageError when it is missing, FeatureError
    (naming the file) when its arrays disagree on its latents or filled slots."""
    what = f"feature partial of SAE {sae_name!r}, partition {partition_key!r}, shard {shard_index}"
    path = store.require(partial_name(sae_name, partition_key, shard_index), what,
                         "run pass 1 (compute_partial + write_partial) for that partition and feature shard")
    meta = store.read_json(f"{path}/meta.json")
    with np.load(io.BytesIO(store.fs.cat_file(f"{path}/partial.npz")), allow_pickle=False) as arrays:
        data = {name: arrays[name] for name in (*Partial.STORED, HIST_NONZERO) if name in arrays.files}
    fields = {k: meta[k] for k in ("partition", "partition_version", "start", "stop", "top_k", "reservoir_size",
                                   "seed", "batch_rows", "n_tokens", "sae")}
    fields.update({k: meta.get(k) for k in ("n_entries", "entries_sum")})
    what = f"the {what} ({path}/partial.npz)"
    if meta.get("layout") == FILLED_SLOTS:
        data = _full_rows(data, fields["top_k"], fields["reservoir_size"], what)
    partial = Partial(**fields, **data, group=meta.get("group", FIRST_STORE))
    _check_rows(partial, what)
    return partial


def filled_slot_arrays(partial: Partial) -> dict[str, np.ndarray]:
    """partial.npz's arrays in the ``filled-slots`` layout (module docstring): of the latents that
    fired (``Partial.sparse``), the slot arrays' filled slots, flat, and the histogram's nonzero
    bins. Raises FeatureError if a slot past a latent's filled ones is not empty (it would be lost:
    never the case for pass 1's state, ``features.filled_slots``)."""
    partial = partial.sparse()
    arrays = {name: getattr(partial, name) for name in ("fired", "count", "sum", "max", *Partial.WITNESS)}
    for name in Partial.SLOTS:
        values, filled = getattr(partial, name), partial.filled(name)
        if not (values[~filled] == EMPTY_LATENT[name][1]).all():
            raise FeatureError(f"partition {partial.partition!r}'s partial holds {name} entries past the first "
                               "min(count, width) slots of a latent, which the stored layout would drop",
                               "store partials as pass 1 (features.compute_partials) returns them")
        arrays[name] = values[filled]
    nonzero = partial.hist != EMPTY_LATENT["hist"][1]
    arrays[HIST_NONZERO], arrays["hist"] = np.packbits(nonzero, axis=1), partial.hist[nonzero]
    return arrays


def _full_rows(data: dict, top_k: int, reservoir_size: int, what: str) -> dict:
    """``data`` (a ``filled-slots`` partial.npz's arrays) with full rows again: each latent's
    filled slots first, the others and the histogram's zero bins in ``EMPTY_LATENT``'s state, so
    exactly the arrays pass 1 returned. FeatureError naming ``what`` if the lengths disagree."""
    missing = [name for name in (*Partial.SLOTS, "count", "hist", HIST_NONZERO) if name not in data]
    if missing:
        raise FeatureError(f"{what} lacks the arrays {missing} of its layout ({FILLED_SLOTS!r})", RERUN)
    count = data["count"]
    full = {name: value for name, value in data.items() if name not in (*Partial.SLOTS, "hist", HIST_NONZERO)}
    for name in Partial.SLOTS:
        filled = filled_slots(count, top_k if name.startswith("top") else reservoir_size)
        if data[name].shape != (int(filled.sum()),):
            raise FeatureError(f"{what} has {name} of shape {data[name].shape}, not ({int(filled.sum())},) "
                               "(the filled slots of its latents' counts)", RERUN)
        dtype, value = EMPTY_LATENT[name]
        full[name] = np.full(filled.shape, value, dtype)
        full[name][filled] = data[name]
    bits, bins = data[HIST_NONZERO], data["hist"]
    if bits.dtype != np.uint8 or bits.shape != (len(count), HIST_NONZERO_BYTES):
        raise FeatureError(f"{what} has {HIST_NONZERO} of {bits.dtype} {bits.shape}, not uint8 "
                           f"({len(count)}, {HIST_NONZERO_BYTES}) (a latent's {N_HIST_BINS} bins as bits)", RERUN)
    nonzero = np.unpackbits(bits, axis=1, count=N_HIST_BINS).astype(bool)
    if bins.shape != (int(nonzero.sum()),):
        raise FeatureError(f"{what} has hist of shape {bins.shape}, not ({int(nonzero.sum())},) (one count per "
                           f"bit of {HIST_NONZERO})", RERUN)
    dtype, value = EMPTY_LATENT["hist"]
    full["hist"] = np.full(nonzero.shape, value, dtype)
    full["hist"][nonzero] = bins
    return full


def _check_rows(partial: Partial, what: str) -> None:
    """FeatureError unless ``fired`` is ascending local ids and every per-latent array has one row
    of its shape per latent: a partial that is not whole would merge wrong tables silently."""
    latents, fix = partial.latents, RERUN
    if latents.ndim != 1 or not np.array_equal(np.unique(latents[(latents >= 0) & (latents < partial.n_features)]),
                                               latents):
        raise FeatureError(f"{what} lists fired latents that are not ascending ids in [0, {partial.n_features})", fix)
    for name in Partial.ARRAYS:
        shape, expected = getattr(partial, name).shape, (len(latents), *partial.row_shape(name))
        if shape != expected:
            raise FeatureError(f"{what} has {name} of shape {shape}, not {expected} (a row per listed latent)", fix)


def list_partials(store: ArtifactStore, sae_name: str, shard_index: int) -> list[str]:
    """Partition keys that have a committed partial for this SAE and feature shard, sorted."""
    try:
        entries = store.fs.ls(partials_folder(store, sae_name), detail=False)
    except FileNotFoundError:
        return []
    keys = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return sorted(k for k in keys if store.pointer(partial_name(sae_name, k, shard_index)) is not None)


def read_partials(store: ArtifactStore, sae_name: str, shard_index: int,
                  partitions: Iterable[str] | None = None) -> Iterator[Partial]:
    """The committed partials of one feature shard, one at a time (pass 2's input)."""
    for key in (list_partials(store, sae_name, shard_index) if partitions is None else partitions):
        yield read_partial(store, sae_name, key, shard_index)


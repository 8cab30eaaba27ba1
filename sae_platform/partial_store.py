"""Committed pass-1 partials (docs/design.md, "Feature tables"): writing one atomically, reading
one back as stored, listing a shard's partitions, and telling whether a partition's partials are
current for the SAE's checkpoint and the feature-shard layout. A partial stores only the latents
that fired in its batch (``Partial.sparse``); one written before partials were sparse has a row
for every latent and reads as it is. The state itself and how pass 1 computes it: ``features``."""

import io
from collections.abc import Iterable, Iterator

import numpy as np

from sae_platform.catalog import FIRST_STORE, checkpoint_pin, is_current, partial_name, partials_folder, partition_name
from sae_platform.features import FeatureError, FeatureSettings, Partial
from sae_platform.storage import ArtifactStore


def write_partial(store: ArtifactStore, sae_name: str, partition_key: str, shard_index: int, partial: Partial, *,
                  checkpoint: str | None = None) -> str:
    """Commit a partial atomically, pinning the SAE ``checkpoint`` version it was computed with (when
    known); returns the committed version path. Stores the latents that fired only
    (``Partial.sparse``: ``fired`` and their rows), whatever the form it is given in."""
    if partial.partition != partition_key:
        raise FeatureError(f"this partial was computed on partition {partial.partition!r}, not {partition_key!r}",
                           "pass the partition key the partial came from")
    partial = partial.sparse()
    buffer = io.BytesIO()
    np.savez(buffer, **{name: getattr(partial, name) for name in Partial.STORED})
    name = partial_name(sae_name, partition_key, shard_index)
    with store.writing(name, partition=partition_key, partition_version=partial.partition_version,
                       start=partial.start, stop=partial.stop, top_k=partial.top_k,
                       **(checkpoint_pin(checkpoint) if checkpoint else {})) as version:
        store.write_bytes_atomic(f"{version}/partial.npz", buffer.getvalue())
        store.write_json(f"{version}/meta.json", {**partial.meta(), "run": sae_name, "shard_index": int(shard_index)})
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
    """The committed partial of one (partition, feature shard) as stored: rows for its fired latents
    (``fired``), or for every latent when it was written before partials were sparse (``fired``
    None). Raises StorageError when it is missing, FeatureError when its arrays disagree on rows."""
    what = f"feature partial of SAE {sae_name!r}, partition {partition_key!r}, shard {shard_index}"
    path = store.require(partial_name(sae_name, partition_key, shard_index), what,
                         "run pass 1 (compute_partial + write_partial) for that partition and feature shard")
    meta = store.read_json(f"{path}/meta.json")
    with np.load(io.BytesIO(store.fs.cat_file(f"{path}/partial.npz")), allow_pickle=False) as arrays:
        data = {name: arrays[name] for name in Partial.STORED if name in arrays.files}
    fields = {k: meta[k] for k in ("partition", "partition_version", "start", "stop", "top_k", "reservoir_size",
                                   "seed", "batch_rows", "n_tokens", "sae")}
    fields.update({k: meta.get(k) for k in ("n_entries", "entries_sum")})
    partial = Partial(**fields, **data, group=meta.get("group", FIRST_STORE))
    _check_rows(partial, f"the {what} ({path}/partial.npz)")
    return partial


def _check_rows(partial: Partial, what: str) -> None:
    """FeatureError unless ``fired`` is ascending local ids and every per-latent array has one row
    of its shape per latent: a partial that is not whole would merge wrong tables silently."""
    latents, fix = partial.latents, "run pass 1 again for that partition and feature shard (it rewrites the partial)"
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


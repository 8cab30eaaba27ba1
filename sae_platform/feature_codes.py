"""Feature tables, pass 1 sharded over data AND features (docs/design.md, "Feature tables, context
windows, browser"): each activation batch is encoded once and its sparse codes are committed split
by feature shard; pass 1 of one (batch, feature shard) then reads only the codes of its latents,
so its memory grows with the shard's latents and its share of the batch's codes, never with
``n_latents`` (``feature_plan.plan_feature_shards`` sizes the shards from a budget per job).

Codes layout: ``features/<sae_name>/codes/<key>`` (``catalog.codes_name``), one committed version
holding ``f<i>.npz`` per feature shard i of ``shards`` (the latent ranges [start, stop) the encode
split them by) with three arrays of the shard's activating (row, latent) entries, in row-major
order (rows ascending, then the code's position in the row):

    row     int32  row in the partition's hook-point store ``meta["group"]``
    latent  int32  latent - start
    value   float32 > 0

and ``meta.json`` (partition, partition_version, sae_fingerprint, sae config, n_rows, k the code
width, batch_rows the encode's token batch, shards, group); the commit pins the checkpoint version
encoded with (``pinned_codes`` finds them by it, without the weights). Entries of inactive codes
(value 0) are not stored. Pass 3 and the interval examples read them back (``read_codes`` for a whole
partition's [n_rows, k] view, ``read_range_codes`` for one shard's); codes of other SAE weights, of
another partition version or of another shard layout are never used (None: the caller encodes).

Exactness. Replaying a shard's entries in their stored order gives pass 1's partial of the
single-encode path (``features.compute_partials`` over every shard) bit for bit in everything the
tables are made of: the selections keep the same keys whatever the grouping of entries, and each
feature's count, max, histogram and float64 sum fold its entries in the same (row) order. Only
``entries_sum``, the shard-wide sum the exactness check compares to float tolerance, and the
order of the witness arrays depend on the grouping.

Variants whose activations are not a slice of one sparse selection (ReLU, JumpReLU, BatchTopK:
``encode_slice`` overridden) store no codes: pass 1 of a shard encodes only that shard's latents
(all shards together multiply W_enc once).
"""

import io
from collections.abc import Iterator

import numpy as np
import torch

from sae_platform.catalog import FIRST_STORE, checkpoint_pin, codes_name, partition_name, pinned_checkpoint
from sae_platform.feature_select import partition_salt
from sae_platform.features import (
    FeatureError,
    FeatureSettings,
    Partial,
    _bookkeeping_threads,
    _check_pass1_arguments,
    _resolve_device,
    _ShardState,
    _sparse_route,
    compute_partials,
    open_checked,
    sae_fingerprint,
    token_batches,
    witness_features,
)
from sae_platform.partial_store import write_partial
from sae_platform.storage import ArtifactStore

REPLAY_ENTRIES = 1 << 18  # stored entries handed to a shard's state at once (its own grouping bounds memory)


def shard_file(index: int) -> str:
    """The file of feature shard ``index``'s codes inside a codes version."""
    return f"f{int(index)}.npz"


@torch.no_grad()
def encode_codes(store: ArtifactStore, sae, sae_name: str, partition_key: str, shards: list[tuple[int, int]], *,
                 batch_rows: int = 4096, device=None, group: str = FIRST_STORE, checkpoint: str | None = None) -> dict:
    """The batch's one encode (TopK-style variants): stream partition ``partition_key`` through
    ``sae.encode`` in token batches of ``batch_rows`` rows, split each batch's activating codes by
    the feature shards ``shards`` (disjoint latent ranges in order, ``features.feature_shards``)
    and commit them (module docstring), pinning the SAE ``checkpoint`` version they were encoded
    with when given (``catalog.checkpoint_pin``: what lets pass 1 of a shard group find them
    without loading the weights, ``pinned_codes``). Returns the committed meta.

    Memory: the SAE, one token batch's pre-activations, and the partition's activating codes
    (12 B each) until they are written. Raises FeatureError for a dense variant (it has no sparse
    codes), overlapping or unordered shards, bad rows (NaN/inf: naming the partition and row)."""
    if not _sparse_route(sae):
        raise FeatureError(f"{type(sae).__name__} computes per-latent activations, not one sparse selection: "
                           "it has no codes to share among feature shards",
                           "run pass 1 per shard with compute_partials (its encode_slice multiplies only the shard)")
    _check_pass1_arguments(sae, shards, FeatureSettings(), batch_rows)
    if any(a[1] > b[0] for a, b in zip(shards, shards[1:])):
        raise FeatureError(f"feature shards {shards} overlap or are not in latent order",
                           "pass feature_shards(n_latents, n_shards)")
    dev = _resolve_device(sae, device)
    part = open_checked(store, sae, partition_key, group)
    version = part.path.rstrip("/").rsplit("/", 1)[-1]
    starts = torch.tensor([a for a, _ in shards], dtype=torch.long, device=dev)
    pieces: list[list[tuple[np.ndarray, ...]]] = [[] for _ in shards]
    width = 0
    for offset, x in token_batches(sae, part.acts, part.n_rows, batch_rows, partition_key, dev):
        codes = sae.encode(x)
        width = codes.values.shape[1]
        flat = codes.values.reshape(-1)
        on = torch.nonzero(flat > 0).squeeze(1)  # row-major: rows ascending, then position in the row
        rows, latents, values = on // width + offset, codes.indices.reshape(-1)[on].long(), flat[on].float()
        shard = torch.searchsorted(starts, latents, right=True) - 1
        order = torch.argsort(shard, stable=True)
        counts = torch.bincount(shard, minlength=len(shards)).tolist()
        rows, latents, values = rows[order], latents[order], values[order]
        lo = 0
        for index, count in enumerate(counts):
            if count:
                pieces[index].append(((rows[lo:lo + count]).to(torch.int32).cpu().numpy(),
                                      (latents[lo:lo + count] - shards[index][0]).to(torch.int32).cpu().numpy(),
                                      values[lo:lo + count].cpu().numpy()))
            lo += count
        del codes, x
    meta = {"partition": partition_key, "partition_version": version, "sae_fingerprint": sae_fingerprint(sae),
            "sae_config": sae.config, "n_rows": int(part.n_rows), "k": int(width), "batch_rows": int(batch_rows),
            "shards": [[int(a), int(b)] for a, b in shards], "group": group}
    with store.writing(codes_name(sae_name, partition_key), partition=partition_key, partition_version=version,
                       **(checkpoint_pin(checkpoint) if checkpoint else {})) as path:
        for index in range(len(shards)):
            columns = list(zip(*pieces[index])) or [(), (), ()]
            arrays = {name: np.concatenate(column) if column else np.zeros(0, dtype)
                      for name, column, dtype in zip(("row", "latent", "value"), columns,
                                                     (np.int32, np.int32, np.float32))}
            pieces[index] = []  # freed as written: the peak is the codes plus one shard's serialised copy
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            store.write_bytes_atomic(f"{path}/{shard_file(index)}", buffer.getvalue())
        store.write_json(f"{path}/meta.json", meta)
    return meta


def codes_meta(store: ArtifactStore, sae_name: str, partition_key: str, fingerprint: str) -> tuple[str, dict] | None:
    """(path, meta) of the partition's committed codes when they were encoded by the SAE weights
    of ``fingerprint`` (``features.sae_fingerprint``) from the partition's current version; else None."""
    path = store.resolve(codes_name(sae_name, partition_key))
    if path is None:
        return None
    meta = store.read_json(f"{path}/meta.json")
    current = (store.pointer(partition_name(partition_key)) or {}).get("version")
    if meta.get("partition_version") != current or meta.get("sae_fingerprint") != fingerprint or "shards" not in meta:
        return None
    return path, meta


def pinned_codes(store: ArtifactStore, sae_name: str, partition_key: str, shards: list[tuple[int, int]], *,
                 checkpoint: str | None, group: str = FIRST_STORE) -> tuple[str, dict] | None:
    """(path, meta) of the partition's committed codes when they were encoded with the SAE
    checkpoint version ``checkpoint`` (their commit pins it: ``encode_codes``), from the
    partition's current version, split by exactly the layout ``shards`` and read from the
    hook-point store ``group``; else None. Reads the commit pointer and ``meta.json`` only, never
    the weights: pass 1 of a shard group and the encode step's up-to-date rule ask it without
    loading the SAE (``codes_meta`` asks by the weights' fingerprint, which needs them)."""
    pointer = store.pointer(codes_name(sae_name, partition_key))
    current = (store.pointer(partition_name(partition_key)) or {}).get("version")
    if (pointer is None or checkpoint is None or pinned_checkpoint(pointer) != checkpoint
            or pointer.get("partition_version") != current):
        return None
    path = store.resolve(codes_name(sae_name, partition_key))
    meta = store.read_json(f"{path}/meta.json")
    if meta.get("shards") != [[int(a), int(b)] for a, b in shards] or meta.get("group") != group:
        return None
    return path, meta


def ensure_codes(store: ArtifactStore, sae, sae_name: str, partition_key: str, shards: list[tuple[int, int]], *,
                 checkpoint: str | None = None, batch_rows: int = 4096, device=None,
                 group: str = FIRST_STORE) -> tuple[str, dict]:
    """The batch's codes in the layout ``shards``, as (path, meta): the stored ones when they were
    encoded by these SAE weights (``codes_meta``) in this layout from this store (and, when
    ``checkpoint`` is given, pin it), else the batch's one encode (``encode_codes``). The encode
    step of the pipeline (``feature_codes`` asset); FeatureError for a dense variant (no codes)."""
    layout = [[int(a), int(b)] for a, b in shards]
    found = codes_meta(store, sae_name, partition_key, sae_fingerprint(sae))
    if (found is None or found[1]["shards"] != layout or found[1]["group"] != group
            or (checkpoint is not None and pinned_checkpoint(store.pointer(codes_name(sae_name, partition_key)))
                != checkpoint)):
        encode_codes(store, sae, sae_name, partition_key, shards, batch_rows=batch_rows, device=device, group=group,
                     checkpoint=checkpoint)
        found = codes_meta(store, sae_name, partition_key, sae_fingerprint(sae))
    return found


def codes_bytes(store: ArtifactStore, path: str, shard_indices: list[int]) -> int:
    """Stored bytes of the codes of the feature shards ``shard_indices`` in the codes version ``path``."""
    return sum(int(store.fs.size(f"{path}/{shard_file(i)}")) for i in shard_indices)


def _load_shard(store: ArtifactStore, path: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard's stored entries; StorageError naming the file when it does not decode (pickles
    are refused: nothing stored is executable)."""
    file = f"{path}/{shard_file(index)}"
    with store.damaged(file, f"sparse codes of feature shard {index}"):
        with np.load(io.BytesIO(store.fs.cat_file(file)), allow_pickle=False) as arrays:
            return arrays["row"], arrays["latent"], arrays["value"]


def read_range_codes(store: ArtifactStore, sae_name: str, partition_key: str, sae, start: int,
                     stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The stored (row int32, latent - start int32, value float32) entries of latents [start, stop)
    in partition ``partition_key``, reading only that shard's file; None when no current codes of
    this SAE hold exactly that shard (``codes_meta``)."""
    found = codes_meta(store, sae_name, partition_key, sae_fingerprint(sae))
    if found is None or [start, stop] not in found[1]["shards"]:
        return None
    return _load_shard(store, found[0], found[1]["shards"].index([start, stop]))


def read_codes(store: ArtifactStore, sae_name: str, partition_key: str, sae) -> tuple[np.ndarray, np.ndarray] | None:
    """The partition's codes as (values float32, indices int32), each [n_rows, k]: row r's
    activations are values[r] at latents indices[r] (0 = inactive, padding the row's unused
    codes), assembled from every shard's file (pass 3 looks window activations up in them). None
    when there are none of this SAE's weights and the partition's current version."""
    found = codes_meta(store, sae_name, partition_key, sae_fingerprint(sae))
    if found is None:
        return None
    path, meta = found
    values = np.zeros((meta["n_rows"], meta["k"]), np.float32)
    indices = np.zeros((meta["n_rows"], meta["k"]), np.int32)
    filled = np.zeros(meta["n_rows"], np.int64)
    for index, (start, _) in enumerate(meta["shards"]):
        rows, latents, vals = _load_shard(store, path, index)
        # rows ascend within a shard: an entry's slot is the row's fill so far plus its rank in the row
        first = np.searchsorted(rows, rows, side="left")
        slot = filled[rows] + (np.arange(len(rows)) - first)
        values[rows, slot], indices[rows, slot] = vals, latents + start
        np.add.at(filled, rows, 1)
    return values, indices


def shard_partial(store: ArtifactStore, sae_name: str, partition_key: str, shard_index: int, meta: dict, path: str,
                  settings: FeatureSettings) -> Partial:
    """Pass 1 of one (activation batch, feature shard) from the batch's stored codes (``meta`` and
    ``path`` from ``codes_meta``): replays only the shard's entries into its state, on the CPU,
    without the SAE. Memory: the shard's state and partial plus its entries. Raises FeatureError for
    a shard index outside the stored layout."""
    if not 0 <= shard_index < len(meta["shards"]):
        raise FeatureError(f"the codes of partition {partition_key!r} hold {len(meta['shards'])} feature shards, "
                           f"not shard {shard_index}", "encode the batch again with the current shard layout")
    start, stop = meta["shards"][shard_index]
    rows, latents, values = _load_shard(store, path, shard_index)
    dev = torch.device("cpu")
    res_size = settings.reservoir_factor * settings.top_k
    state = _ShardState(start, stop, settings.top_k, res_size, partition_salt(settings.seed, partition_key),
                        witness_features(start, stop, settings.check_features, settings.seed), dev)
    with _bookkeeping_threads(dev):
        for lo in range(0, len(values), REPLAY_ENTRIES):
            hi = lo + REPLAY_ENTRIES
            state.add(torch.from_numpy(rows[lo:hi]).long(), torch.from_numpy(latents[lo:hi]).long(),
                      torch.from_numpy(values[lo:hi]))
        del rows, latents, values
        arrays = state.finish()
    diagnostics = {**arrays.pop("diagnostics"), "route": "sparse codes", "shards_per_encode": len(meta["shards"])}
    return Partial(partition=partition_key, partition_version=meta["partition_version"], start=start, stop=stop,
                   top_k=settings.top_k, reservoir_size=res_size, seed=int(settings.seed),
                   batch_rows=meta["batch_rows"], n_tokens=meta["n_rows"],
                   sae={"config": meta["sae_config"], "fingerprint": meta["sae_fingerprint"]},
                   diagnostics=diagnostics, group=meta["group"], **arrays)


def partials_from_codes(store: ArtifactStore, sae_name: str, partition_key: str, codes: tuple[str, dict],
                        shard_indices: list[int], settings: FeatureSettings, *,
                        checkpoint: str | None = None) -> Iterator[dict]:
    """Pass 1 of one (activation batch, shard group) from the batch's stored ``codes`` ((path,
    meta): ``pinned_codes`` / ``ensure_codes``): for each of ``shard_indices`` in turn, replay only
    that shard's file (``shard_partial``) and commit its partial (``write_partial``, pinning
    ``checkpoint``) before the next is read, so a crash resumes at the next shard and memory holds
    one shard's entries, state and partial, never another shard's codes or the SAE's weights.
    Yields per shard {shard_index, start, stop, n_tokens, version} once it is committed."""
    path, meta = codes
    for index in shard_indices:
        partial = shard_partial(store, sae_name, partition_key, index, meta, path, settings)
        version = write_partial(store, sae_name, partition_key, index, partial, checkpoint=checkpoint)
        yield {"shard_index": index, "start": partial.start, "stop": partial.stop, "n_tokens": partial.n_tokens,
               "version": version}
        del partial


def compute_and_write_partials(store: ArtifactStore, sae, sae_name: str, partition_key: str,
                               shards: list[tuple[int, int]], settings: FeatureSettings, *,
                               shard_indices: list[int] | None = None, checkpoint: str | None = None,
                               batch_rows: int = 4096, device=None, group: str = FIRST_STORE) -> list[dict]:
    """Pass 1 of one activation batch in one call, for the feature shards ``shard_indices`` of the
    layout ``shards`` (default: all), one shard at a time, each partial committed
    (``write_partial``, pinning ``checkpoint``). The pipeline runs the same two steps as separate
    jobs: the encode (``ensure_codes``) once per batch, then ``partials_from_codes`` per shard group.

    TopK-style variants: the batch is encoded once (``ensure_codes``) unless current codes of
    this SAE with this layout are stored; each shard's partial replays its own codes
    (``partials_from_codes``). Dense variants: ``compute_partials`` on each shard alone (its
    ``encode_slice`` multiplies only the shard's encoder rows). Returns per shard {shard_index,
    start, stop, n_tokens, version}; memory is one shard's at a time (plus the encode's, once per batch)."""
    indices = list(range(len(shards))) if shard_indices is None else list(shard_indices)
    if _sparse_route(sae):
        codes = ensure_codes(store, sae, sae_name, partition_key, shards, checkpoint=checkpoint,
                             batch_rows=batch_rows, device=device, group=group)
        return list(partials_from_codes(store, sae_name, partition_key, codes, indices, settings,
                                        checkpoint=checkpoint))
    summaries = []
    for index in indices:
        partial = compute_partials(store, sae, partition_key, [shards[index]], settings, batch_rows=batch_rows,
                                   device=device, group=group)[0]
        path = write_partial(store, sae_name, partition_key, index, partial, checkpoint=checkpoint)
        summaries.append({"shard_index": index, "start": partial.start, "stop": partial.stop,
                          "n_tokens": partial.n_tokens, "version": path})
        del partial
    return summaries

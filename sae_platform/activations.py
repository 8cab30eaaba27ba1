"""Cached activations: one partition per batch of text, written atomically as zarr v3.

Layout of a committed partition (``activations/<key>/<version>/``)::

    data.zarr/
      acts        [n_rows, d_model]  residual stream, one row per *training* token (dtype: float16)
      token_id    [n_rows] int32     the token at that row
      doc_id      [n_rows] int32     document index within this batch (documents.parquet)
      context_id  [n_rows] int32     row of ``tokens`` the token came from
      position    [n_rows] int16     position inside its context (never 0)
      tokens      [n_contexts, ctx_len] int32  the full contexts, start tokens included
      context_doc_id [n_contexts, ctx_len] int32  document of every context token (windows stop there)
      (attrs)     model, layer, d_model, dtype, counts and norm statistics, the training-row rule
    documents.parquet                doc_id, source, n_tokens

Rows exclude every start token: position 0 is the attention sink (residual norm ~100x the rest)
and would dominate both SAE training and max-activating examples, and the separator between
packed documents is the same token and behaves the same way. Measured on SmolLM2 layer 15, the
token right after the start token is sometimes a sink too (a leading newline: norm ~20,000 against
a median of ~166), so rows whose norm exceeds ``sink_norm_factor`` x the batch median are excluded
as well and counted in the metadata. ``tokens`` keeps everything so context windows show in full.
The rule is ``training_rows.training_rows``; each store records it in its attrs (``RowRule.attrs``)
and everything that scores an SAE on text reads it back from there.

The rows of all partitions, in partition-key order, form the dataset that the shuffle permutes;
a row's global index is its partition's offset plus its row number.
"""

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from sae_platform.catalog import (
    ACTIVATIONS,
    FIRST_STORE,
    HookEntry,
    partition_name,
    store_group,
    store_group_of,
    trained_on,
)
from sae_platform.corpus import (
    MAX_RECORD_CHARS,
    Contexts,
    Document,
    TextFile,
    access_stamp,
    source_stamp,
    stream_contexts,
)
from sae_platform.errors import ModelError, SourceError, SourceUnavailable, StorageError
from sae_platform.hooks import HOOK_DEFINITIONS, check_definitions, check_hook_point, hook_name
from sae_platform.inbox import clear_failed_attempt, content_digest, record_failed_attempt
from sae_platform.model import HookedModel
from sae_platform.settings import SettingsError, setting, validate
from sae_platform.shuffled import open_shuffled
from sae_platform.storage import ArtifactStore
from sae_platform.training_rows import RowRule, training_rows

StoredDtype = Literal["float16", "float32"]  # zarr has no bfloat16
STORED_DTYPES: tuple[StoredDtype, ...] = get_args(StoredDtype)
FLOAT16_MAX = 65504.0
CHUNK_BYTES = 4 << 20  # ~4 MB chunks: big enough for streaming reads, small enough to shuffle
MIN_CHUNK_ROWS = 256   # rows of a very wide model still come at least this many to a chunk


@dataclass(frozen=True)
class CacheSettings:
    """Settings of the caching stage (``resources.caching.config``)."""

    ctx_len: int = setting(128, "tokens per context, start token included", ge=2)
    batch_size: int = setting(16, "contexts per forward pass", ge=1)
    dtype: StoredDtype = setting("float16", "stored dtype (zarr has no bfloat16)", choices=STORED_DTYPES)
    max_contexts: int | None = setting(None, "contexts kept per batch of text (demo/CI); null: all", ge=1)
    max_record_chars: int = setting(MAX_RECORD_CHARS, "characters one JSONL line or parquet text value may hold; "
                                                      "a file with a longer record fails alone (bounds memory)", ge=1)
    sink_norm_factor: float = setting(10.0, "drop rows whose norm exceeds this factor x the batch median "
                                            "(attention sinks); 0 keeps every non-start token", ge=0)
    recache: bool = setting(False, "cache batches again even when stored and their file is unchanged")
    hook_points: list = setting(None, "hook points read in one forward pass, TransformerLens names (e.g. "
                                      "blocks.4.hook_mlp_out), or 'IN -> OUT' pairs for a transcoder (e.g. "
                                      "'blocks.4.ln2.hook_normalized -> blocks.4.hook_mlp_out'); one store per "
                                      "entry, the first is what the pipeline trains on; 'blocks.*.' in an entry: "
                                      "one entry per block (e.g. 'blocks.*.ln2.hook_normalized -> "
                                      "blocks.*.hook_mlp_out' for a transcoder set); empty: the language model's "
                                      "blocks.<layer>.hook_resid_post", default_factory=list)

    def __post_init__(self):
        validate(self, "resources.caching.config")
        if not isinstance(self.hook_points, list | tuple) or not all(isinstance(h, str) for h in self.hook_points):
            raise SettingsError(f"resources.caching.config.hook_points must be a list of hook point names, got "
                                f"{self.hook_points!r}", "e.g. [blocks.4.hook_mlp_out, blocks.4.hook_resid_post]")


EVERY_BLOCK = "blocks.*."  # in a hook_points entry: the same entry for every block of the model


def expand_every_block(specs: list[str], n_layers: int) -> list[str]:
    """``specs`` with each entry naming ``blocks.*.`` replaced by one entry per block 0..n_layers-1
    (``*`` -> the block index, in block order), in place: so a transcoder set's pairs
    (``catalog.TranscoderSet``) are cached in one pass from one line,
    ``'blocks.*.ln2.hook_normalized -> blocks.*.hook_mlp_out'``."""
    expanded = []
    for spec in specs:
        if EVERY_BLOCK in spec:
            expanded.extend(spec.replace(EVERY_BLOCK, f"blocks.{i}.") for i in range(n_layers))
        else:
            expanded.append(spec)
    return expanded


def hook_entries(model: HookedModel, settings: CacheSettings) -> list[HookEntry]:
    """The stores one caching pass writes, checked against the model (ModelError naming the valid
    hook points when one is wrong; a transcoder's input must come before its output)."""
    specs = expand_every_block(list(settings.hook_points) or [model.hook_name], model.n_layers)
    entries = []
    for spec in specs:
        entry = HookEntry.parse(spec)
        points = [check_hook_point(model.model, p) for p in entry.names]
        if len(points) == 2 and points[0].order >= points[1].order:
            raise ModelError(f"in the transcoder pair {spec!r} the input is computed after the output",
                             "name the input first: 'blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out'")
        entries.append(entry)
    if len({e.spec for e in entries}) != len(entries):
        raise ModelError(f"hook_points lists an entry twice: {specs}", "list each hook point once")
    return entries




def fingerprint(model: HookedModel, model_source: str, entries: list[HookEntry] | None = None) -> dict:
    entries = entries or [HookEntry(model.hook_name)]
    first = entries[0]
    return {"model": model_source, "layer": model.layer, "hook_name": first.hook_name, "d_model": model.d_model,
            **({"hook_name_in": first.hook_name_in} if first.hook_name_in else {}),
            "hook_points": [e.spec for e in entries], "hook_definitions": HOOK_DEFINITIONS}


def _held_hook_points(attrs: dict) -> list[str]:
    """Every hook point a fingerprint or store's attributes name (each entry's input and output)."""
    specs = attrs.get("hook_points") or [HookEntry.spec_of(attrs)]
    return [name for spec in specs if spec for name in HookEntry.parse(spec).names]


def check_compatible(store: ArtifactStore, expected: dict, writing_key: str) -> None:
    """Refuse to mix activations of different models/layers under one root: SAEs would train on garbage."""
    for name in store.committed_names(ACTIVATIONS):
        if name == partition_name(writing_key):
            continue
        stored = store.pointer(name).get("fingerprint", {})
        check_definitions(_held_hook_points(stored), stored.get("hook_definitions"), f"activation partition {name!r}")
        for field in ("d_model", "model", "layer", "hook_name", "hook_name_in", "hook_points"):
            if field in stored and stored[field] != expected[field]:
                raise ModelError(
                    f"activation partition {name!r} was cached with {field}={stored[field]!r} "
                    f"({stored.get('model')}, layer {stored.get('layer')}, d_model {stored.get('d_model')}), "
                    f"but the configured model gives {field}={expected[field]!r}",
                    "cache into a different artifact root (storage.root_url), or delete the existing "
                    "activation partitions before switching model, layer or hook points",
                )
        return  # one stored partition suffices: they were all checked against each other on write


class _ChunkWriter:
    """Stages rows into whole zarr chunks and writes them on a background thread.

    Whole-chunk writes avoid read-modify-write; the thread lets disk I/O overlap the next forward.
    """

    def __init__(self, array, chunk_rows: int, np_dtype):
        self.array, self.chunk_rows = array, chunk_rows
        self.buffer = np.empty((chunk_rows, array.shape[1]), dtype=np_dtype)
        self.filled, self.written = 0, 0
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        while (job := self.jobs.get()) is not None:
            start, block = job
            try:
                if self.error is None:
                    self.array[start:start + len(block)] = block
            except BaseException as error:  # surfaced on the caller's thread
                self.error = error

    def append(self, rows: np.ndarray) -> None:
        while len(rows):
            take = min(len(rows), self.chunk_rows - self.filled)
            self.buffer[self.filled:self.filled + take] = rows[:take]
            self.filled += take
            rows = rows[take:]
            if self.filled == self.chunk_rows:
                self._flush()

    def _flush(self):
        if self.error:
            raise self.error
        if self.filled:
            self.jobs.put((self.written, self.buffer[: self.filled].copy()))
            self.written += self.filled
            self.filled = 0

    def close(self):
        self._flush()
        self.jobs.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def chunk_rows(max_rows: int, row_bytes: int, chunk_bytes: int | None = None, min_rows: int | None = None) -> int:
    """Rows per chunk of a partition's activation store of ``max_rows`` rows of ``row_bytes`` bytes:
    about ``chunk_bytes`` (None: CHUNK_BYTES), at least ``min_rows`` rows (None: MIN_CHUNK_ROWS),
    evened out over the partition, since uncompressed zarr stores a partial last chunk at full size
    (up to 4 MB wasted), and never more than the partition (at least 1). Why it matters beyond
    reads: a shuffle's memory budget must hold about four such chunks (``shuffle_plan.plan_shuffle``)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(MIN_CHUNK_ROWS if min_rows is None else min_rows, chunk_bytes // row_bytes)
    if max_rows:
        rows = -(-max_rows // -(-max_rows // rows))
    return min(rows, max(max_rows, 1))


class _HookStore:
    """One entry's activation store while a partition is being cached."""

    def __init__(self, group, entry: HookEntry, mask: np.ndarray, width: int, settings: CacheSettings):
        self.entry, self.mask, self.group = entry, mask.copy(), group
        max_rows = int(mask.sum())
        np_dtype = np.dtype(settings.dtype)
        self.acts = group.create_array("acts", shape=(max_rows, width), dtype=np_dtype,
                                       chunks=(chunk_rows(max_rows, width * np_dtype.itemsize), width),
                                       compressors=None)
        self.writer = _ChunkWriter(self.acts, self.acts.chunks[0], np_dtype)
        self.stats, self.kept, self.max_rows, self.width = _RunningNorms(), [], max_rows, width

    def add(self, values: dict[str, torch.Tensor], batch_mask: torch.Tensor, settings: CacheSettings, key: str,
            tokens: np.ndarray, rule: RowRule):
        read = values[self.entry.names[0]]
        rows = read[batch_mask.to(read.device)]
        # the sink rule on this batch (one median group); a pair keeps or drops its rows together
        norms = np.zeros(tokens.shape, dtype=np.float32)
        norms[batch_mask.numpy()] = rows.norm(dim=-1).float().cpu().numpy()
        keep_np = training_rows(tokens, rule, norms)[batch_mask.numpy()]
        keep = torch.from_numpy(keep_np).to(rows.device)
        self.kept.append(keep_np)
        rows = rows[keep]
        if self.entry.hook_name_in is not None:
            out = values[self.entry.hook_name]
            rows = torch.cat([rows, out[batch_mask.to(out.device)][keep]], dim=1)
        self.stats.update(rows, key)
        if settings.dtype == "float16" and self.stats.max_abs > FLOAT16_MAX:
            raise ModelError(f"activations at {self.entry.spec} in partition {key!r} reach "
                             f"{self.stats.max_abs:.0f}, beyond float16's range", "store activations as float32 "
                             "(dtype: float32)")
        self.writer.append(rows.to(_torch_dtype(settings.dtype)).cpu().numpy())

    def finish(self, contexts: Contexts) -> int:
        kept = np.concatenate(self.kept) if self.kept else np.zeros(0, dtype=bool)
        n_rows = int(kept.sum())
        self.acts.resize((n_rows, self.width))
        self.mask[self.mask] = kept  # from here on: exactly the stored rows
        _write_index(self.group, contexts, self.mask)
        return n_rows


def cache_partition(store: ArtifactStore, key: str, model: HookedModel, model_source: str,
                    docs: list[Document], contexts: Contexts, settings: CacheSettings,
                    progress: Callable[[int, int], None] | None = None, source_stamp: str | None = None,
                    source_digest: str | None = None, *, entries: list[HookEntry] | None = None,
                    provenance: dict | None = None) -> dict:
    """Run the model over ``contexts`` and commit partition ``key``; returns its statistics.
    ``source_stamp`` (of the text file, taken before reading it) and ``source_digest`` (its content
    identity, ``inbox.content_digest``) go on the commit pointer.

    Every entry of ``settings.hook_points`` (``hook_entries``) is read from the same forward
    pass, which stops after the deepest of them, and gets its own store (``store_group``) with
    its own rows (the sink rule applies per store; a transcoder pair keeps or drops a token's
    input and output together, by the input's norm).

    ``model`` may be any source of rows with a HookedModel's ``residual``, ``d_model``,
    ``layer``, ``hook_name`` and ``start_token_id`` (``synthetic.SyntheticSource``); such a source
    passes its ``entries`` itself, since hook points are checked against a real model.
    ``provenance`` is added to the fingerprint and every store's attributes."""
    import polars as pl  # here, not at the top: GPU machines without polars still train (gpu_check.py)

    entries = entries or hook_entries(model, settings)
    expected = {**fingerprint(model, model_source, entries), **(provenance or {})}
    check_compatible(store, expected, key)
    rule = RowRule(model.start_token_id, settings.sink_norm_factor, settings.batch_size)  # one median group a batch
    mask = training_rows(contexts.tokens, rule)  # the candidates; each store drops its own sinks
    max_rows, d_model = int(mask.sum()), model.d_model
    names = tuple(dict.fromkeys(n for e in entries for n in e.names))
    started = time.perf_counter()
    with store.writing(partition_name(key), fingerprint=expected, source_stamp=source_stamp,
                       source_digest=source_digest) as version:
        hooks = []
        for i, entry in enumerate(entries):
            group = store.open_group(f"{version}/{store_group(i)}", mode="w")
            hooks.append(_HookStore(group, entry, mask, d_model * len(entry.names), settings))
        try:
            for first in range(0, contexts.n_contexts, settings.batch_size):
                batch = slice(first, first + settings.batch_size)
                ids = torch.from_numpy(contexts.tokens[batch]).long()
                # one forward pass for every entry (HookedModel.read); the plain case keeps .residual
                values = {names[0]: model.residual(ids)} if names == (model.hook_name,) else model.read(ids, names)
                batch_mask = torch.from_numpy(mask[batch])
                for hook in hooks:
                    hook.add(values, batch_mask, settings, key, contexts.tokens[batch], rule)
                if progress:
                    progress(min(first + settings.batch_size, contexts.n_contexts), contexts.n_contexts)
        finally:
            for hook in hooks:
                hook.writer.close()
        elapsed = time.perf_counter() - started
        summaries = []
        for i, hook in enumerate(hooks):
            n_rows = hook.finish(contexts)
            entry = hook.entry
            summary = {
                "key": key, **expected, "hook_name": entry.hook_name, "store": store_group(i),
                **({"hook_name_in": entry.hook_name_in, "d_in": d_model, "d_out": d_model}
                   if entry.hook_name_in else {}),
                "dtype": settings.dtype, "ctx_len": settings.ctx_len, **rule.attrs(),
                "n_rows": n_rows, "n_contexts": contexts.n_contexts, "n_documents": len(docs),
                "dropped_tokens": contexts.dropped_tokens, "excluded_start_tokens": contexts.tokens.size - max_rows,
                "excluded_sink_rows": max_rows - n_rows,
                "seconds": elapsed, "tokens_per_second": contexts.tokens.size / elapsed, **hook.stats.summary(),
            }
            if not entry.hook_name_in:
                summary.pop("hook_name_in", None)
            hook.group.attrs.update(summary)
            summaries.append(summary)
        summary = summaries[0]
        n_tokens = np.bincount(contexts.doc_ids[hooks[0].mask], minlength=len(docs))
        store.write_parquet(f"{version}/documents.parquet", pl.DataFrame({
            "doc_id": [d.doc_id for d in docs], "source": [d.source for d in docs],
            "n_tokens": [int(n_tokens[d.doc_id]) for d in docs],
        }))
    summary = {**summary, "stores": [{k: s[k] for k in ("hook_name", "store", "n_rows")} for s in summaries]}
    summary["bytes"] = store.size_bytes(store.resolve(partition_name(key)))
    return summary


def cache_text_file(store: ArtifactStore, text_file: TextFile, model: HookedModel, model_source: str,
                    settings: CacheSettings, text_field: str = "text", encoding: str = "utf-8",
                    storage_options: dict | None = None, max_contexts: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """The whole caching path for one batch: read, tokenize and pack (streamed, stopping at
    ``max_contexts``, records of at most ``settings.max_record_chars``), forward, commit. Any failure
    reading the file is a ``SourceError`` naming it (``corpus.iter_pieces``) and is recorded with
    the file's stamp (``inbox.record_failed_attempt``, ``FAILED.json``), so that version is not
    retried; one caused by its permissions (``SourceUnavailable``) with its access stamp too, so it
    is retried once they change; a commit clears the record."""
    try:
        stamp = source_stamp(text_file, storage_options)  # before reading: a file replaced meanwhile looks changed
    except FileNotFoundError as error:
        raise SourceError(f"{text_file.url} vanished before it could be read",
                          "restore the file, or delete its partition") from error
    try:
        docs, contexts = stream_contexts(text_file, model.tokenizer, settings.ctx_len, model.start_token_id,
                                         settings.max_contexts if max_contexts is None else max_contexts,
                                         text_field, encoding, storage_options, settings.max_record_chars)
    except SourceUnavailable as error:  # its permissions, not its text: tried again once they change
        record_failed_attempt(store, text_file.key, stamp, str(error), access=access_stamp(text_file))
        raise
    except SourceError as error:
        record_failed_attempt(store, text_file.key, stamp, str(error))
        raise
    summary = cache_partition(store, text_file.key, model, model_source, docs, contexts, settings, progress, stamp,
                              _source_digest(text_file, stamp, storage_options))
    clear_failed_attempt(store, text_file.key)
    return summary


def _source_digest(text_file: TextFile, stamp: str, storage_options: dict | None) -> str | None:
    """The file's content identity (``inbox.content_digest``) for the commit pointer: a file renamed
    later is recognized as this partition and not cached again. None when it cannot be read now."""
    try:
        return content_digest(text_file, stamp, storage_options)
    except (OSError, SourceError):
        return None


def activation_attrs(store, shuffle_name: str) -> dict:
    """The caching attrs (model, hook_name, layer, d_model, ctx_len, …) of the activations behind
    shuffled store ``shuffle_name``: where its rows were read."""
    index = open_shuffled(store, shuffle_name).index
    first = index["inputs"][0]
    group = store_group_of(index)
    return dict(store.open_checked_group(partition_name(first["key"]), first["version"], group,
                                         f"activation partition {first['key']!r}").attrs)


def activation_hook_entry(store, shuffle_name: str) -> HookEntry:
    """Where the rows of shuffled store ``shuffle_name`` were read (``activation_attrs``): the SAE
    trained on it encodes ``HookEntry.reads`` and its reconstruction belongs at ``hook_name``.
    Stores cached before hook points were named hold only their ``layer``: its resid_post."""
    attrs = activation_attrs(store, shuffle_name)
    name = attrs.get("hook_name") or (hook_name(int(attrs["layer"])) if attrs.get("layer") is not None else None)
    if not name:
        raise StorageError(f"the activations behind shuffled/{shuffle_name} do not say which hook point they "
                           "were read at (no hook_name or layer in their attrs)",
                           "cache the activations again with this version, then shuffle and train again")
    entry = HookEntry(name, attrs.get("hook_name_in"))
    check_definitions(entry.names, attrs.get("hook_definitions"), f"the activations behind shuffled/{shuffle_name}")
    return entry


def activation_row_rule(store, shuffle_name: str, start_token_id: int | None = None) -> RowRule:
    """Which tokens were training rows of shuffled store ``shuffle_name``: the rule caching
    recorded in the attrs of its activations (``RowRule.from_attrs``, which names the fallback for
    stores cached before it was recorded; ``start_token_id``: the model's, for stores without one)."""
    return RowRule.from_attrs(activation_attrs(store, shuffle_name), start_token_id)


def sae_hook_entry(store, sae_name: str, cfg: dict | None = None) -> HookEntry:
    """Where SAE ``sae_name`` reads and writes: the hook point of the shuffled store its checkpoint
    (``cfg``: the cfg.json of a loaded checkpoint version; default the committed one) was trained on
    (``catalog.trained_on``); the one source every consumer of an SAE uses (evaluation, feature
    metrics, explanations, the live server; the SAELens export reads ``activation_hook_entry`` of
    the same store)."""
    return activation_hook_entry(store, trained_on(store, sae_name, cfg))


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _write_index(group, contexts: Contexts, mask: np.ndarray) -> None:
    context_id, position = np.nonzero(mask)
    group.create_array("token_id", data=contexts.tokens[mask].astype(np.int32))
    group.create_array("doc_id", data=contexts.doc_ids[mask].astype(np.int32))
    group.create_array("context_id", data=context_id.astype(np.int32))
    group.create_array("position", data=position.astype(np.int16))
    group.create_array("tokens", data=contexts.tokens)
    group.create_array("context_doc_id", data=contexts.doc_ids.astype(np.int32))


class _RunningNorms:
    """Norm statistics of the stored rows, and a guard against values the dtype cannot hold."""

    def __init__(self):
        self.count, self.total, self.total_sq, self.max, self.max_abs = 0, 0.0, 0.0, 0.0, 0.0

    def update(self, rows: torch.Tensor, key: str) -> None:
        if not torch.isfinite(rows).all():
            raise ModelError(f"the model produced NaN/inf activations in partition {key!r}",
                             "check the model weights; try autocast: none (fp32)")
        norms = rows.norm(dim=-1).double()
        self.count += len(norms)
        self.total += float(norms.sum())
        self.total_sq += float((norms**2).sum())
        self.max = max(self.max, float(norms.max())) if len(norms) else self.max
        self.max_abs = max(self.max_abs, float(rows.abs().max())) if len(norms) else self.max_abs

    def summary(self) -> dict:
        mean = self.total / max(self.count, 1)
        std = max(self.total_sq / max(self.count, 1) - mean**2, 0.0) ** 0.5
        return {"norm_mean": mean, "norm_std": std, "norm_max": self.max, "max_abs_value": self.max_abs}


@dataclass
class Partition:
    """A committed activation partition, opened for reading."""

    key: str
    path: str
    group: object
    store: ArtifactStore | None = None

    @property
    def acts(self):
        if self.store is None:
            return self.group["acts"]
        name, version = self.path.rstrip("/").rsplit("/", 2)[-2:]
        what = f"activation partition {self.key!r}"
        with self.store.reading(partition_name(name), version, what):
            return VersionChecked(self.group["acts"], self.store, partition_name(name), version, what)

    @property
    def n_rows(self) -> int:
        return int(self.group["acts"].shape[0])

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)


class VersionChecked:
    """A zarr array of a committed version whose reads are followed by a check that the version
    still exists: a chunk removed under a reader reads back as the fill value (zeros), so without
    the check a superseded version removed mid-read would give wrong data, not an error."""

    def __init__(self, array, store: ArtifactStore, name: str, version: str, what: str):
        self._array, self._store, self._name, self._version, self._what = array, store, name, version, what

    def __getattr__(self, attr):
        return getattr(self._array, attr)

    def _read(self, read, *args):
        with self._store.reading(self._name, self._version, self._what):
            data = read(*args)
        self._store.check_version(self._name, self._version, self._what)
        return data

    def __getitem__(self, selection):
        return self._read(self._array.__getitem__, selection)

    def get_orthogonal_selection(self, selection):
        return self._read(self._array.get_orthogonal_selection, selection)

    def __len__(self):
        return len(self._array)


def open_partition(store: ArtifactStore, key: str, group: str = FIRST_STORE) -> Partition:
    """The committed partition ``key``, opened on one of its hook-point stores (``group``: what
    ``catalog.store_group`` names; ``catalog.shuffled_input_group`` gives a shuffled store's; default the first).
    Each store has its own rows and its own index (token_id, context_id, position, …)."""
    path = store.require(partition_name(key), f"activation partition {key!r}",
                         "materialize the activations asset for that partition first")
    version = path.rstrip("/").rsplit("/", 1)[-1]
    with store.reading(partition_name(key), version, f"activation partition {key!r}"):
        if group != FIRST_STORE and not store.fs.exists(f"{path}/{group}"):
            held = dict(store.open_group(f"{path}/{FIRST_STORE}", mode="r").attrs).get("hook_points") or ["one store"]
            raise StorageError(f"activation partition {key!r} has no hook-point store {group!r} (it holds: "
                               f"{', '.join(held)})", "cache that partition again with the SAE's hook point in "
                               "resources.caching.config.hook_points")
        return Partition(key, path, store.open_checked_group(partition_name(key), version, group,
                                                             f"activation partition {key!r}"), store)



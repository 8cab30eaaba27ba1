"""Pass 3 of the feature pipeline: context windows around the chosen examples.

The examples (per feature: top activations, activation-interval samples, random activating
tokens) come out of pass 2 as one ``feature_examples`` table whose rows point into the
activation partitions (``partition``, ``row``). They are scattered over the whole dataset, so
this pass is sharded over the *dataset*: one job per activation partition takes the examples
that fall in it, opens the partition once, and emits every window. A second step regroups the
per-partition outputs by feature shard, which is what the browser reads.

Windows. An example is row ``r`` of a partition; the partition's index gives its context and
position ``(c, p)``. Its window is the run of tokens of context ``c`` from ``p - before`` to
``p + after``, clipped to the context and cut at the first token, on either side, that

* belongs to another document (``context_doc_id``): text of an unrelated document packed into
  the same context is not context, and
* is a start token: position 0 (the attention sink; a special token, not text) and the
  separator start tokens between packed documents. A separator belongs to the *next* document
  (``corpus.pack_contexts``), so a window of that document stops right after it and one of the
  previous document stops right before it; either way it never shows. Any other occurrence of
  the start-token id is treated the same way: the start-token part of ``training_rows.training_rows``.

Window activations. Each window token's activation, for the example's feature only, comes from
its stored activation row (the inverse map ``(context, position) -> row`` of the partition
index). For TopK-style variants pass 1 committed the partition's sparse codes
(``feature_codes.encode_codes``); when they were computed by the same SAE weights from the same
partition version (``feature_codes.read_codes``), the activations are looked up in them
(``codes=``) and no row is encoded again. Otherwise the window rows are encoded, as below.
Tokens without a row (start tokens never appear; attention-sink rows excluded at
caching time can) get ``0.0`` and ``has_act = False``, so the browser can draw them as "no data"
rather than "inactive". The encoding is batched: the (row, feature) pairs of all windows are
deduplicated (neighbouring examples overlap), and each distinct row is read from zarr once, in
sorted order, into a resident block on the SAE's device (at most ``RESIDENT_BYTES``, 1 GiB:
every needed row of a typical partition at once). Then

* variants whose activation is per latent (ReLU, JumpReLU, thresholded BatchTopK: they override
  ``encode_slice``) run ``encode_slice`` over narrow feature slices, each only on the rows that
  need one of its features (``_feature_slices``): close to one dot product per (row, feature)
  pair rather than a dense encode of every needed row;
* TopK-style variants (TopK, Switch) must run the full selection anyway, so each row is encoded
  once with ``sae.encode`` (``batch_rows`` rows per call) and each pair looks its feature up in
  the sparse codes: exactly what the default ``encode_slice`` computes, without a dense
  [rows, width] tensor.

The activation found at the example's own token must equal the stored ``activation`` of
the example (within RTOL/ATOL); if not, the SAE checkpoint or the activations changed after the
tables were built and :class:`StorageError` says so (as it does for rows past the end of the
partition). Up to ``MAX_MISMATCH_FRACTION`` (1%) of a partition's examples may disagree, with a
logged warning: a TopK selection at a near-tie can flip between the pass that built the tables
and this one (another device, another batch shape), and no rebuild would change that, whereas a
changed SAE or changed activations make nearly every example disagree.

Token strings. ``token_strs`` are the exact text of each token, so ``"".join(token_strs)`` is the
window's decoded text; ``sae_platform.tokens`` (``window_strings``) says how, byte tokens included.

Reuse. A window depends only on its (feature, row) and on what ``windows_basis`` records in the
partition's pointer (checkpoint, batch version, store, before/after, activation source), with the
(feature, row) selection it covers. ``build_partition_windows`` given the checkpoint version reuses
the stored windows of the pairs still selected when that basis is unchanged (a kept SAE's refresh)
and computes only the others; the frame equals a build from scratch.

Storage (every write goes through ``ArtifactStore.writing``: nothing half-written is visible)::

    features/<sae_name>/contexts_partial/<partition>/<version>/windows.parquet   one per partition
    features/<sae_name>/contexts/f<shard>/<version>/contexts.parquet             one per feature shard

Both are sorted by feature and written in small row groups with statistics, so reading one
feature range (``regroup_by_feature``, ``read_feature_contexts(feature=…)``) fetches only the
row groups that can hold it, also on S3.
"""

import copy
import hashlib
import io
import logging

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae_platform import catalog
from sae_platform.activations import Partition, open_partition
from sae_platform.errors import ModelError, PlatformError, StorageError
from sae_platform.sae import SparseAutoencoder
from sae_platform.tables import (
    ACTIVATION,
    ACTS,
    CENTER,
    CONTEXT_ID,
    DOC_ID,
    EXAMPLE_COLUMNS,
    EXAMPLE_SCHEMA,
    FEATURE,
    HAS_ACT,
    INTERVAL,
    KIND,
    KIND_ORDER,
    PARTITION,
    POSITION,
    RANK,
    ROW,
    TOKEN_IDS,
    TOKEN_STRS,
    WINDOW_SCHEMA,
)
from sae_platform.tokens import window_strings
from sae_platform.training_rows import RowRule, training_rows

PARTIAL_FILE = "windows.parquet"
SHARD_FILE = "contexts.parquet"
ROW_GROUP_ROWS = 1024  # windows per parquet row group: the unit a feature-range read fetches
ENCODE_ELEMENTS = 1 << 24  # elements of one [rows, latents] encode_slice block
SLICE_CALL_ELEMENTS = 1 << 13  # fixed cost of one encode_slice call, in (row x latent) elements
PAIR_CHUNK = 1 << 18  # (row, feature) lookups per step in TopK codes
RESIDENT_BYTES = 1 << 30  # distinct activation rows held at once (float32, on the SAE's device)
READ_ROWS = 1 << 15  # rows per zarr read into the resident block
BATCH_ROWS = 4096  # rows per sae.encode call (TopK-style variants without pass 1's codes)
RTOL, ATOL = 1e-3, 1e-4  # recomputed vs stored example activation (fp32 vs fp32, other batching/device)
# Examples of a partition allowed to disagree beyond RTOL/ATOL: float-level differences between
# the pass that built the tables and this one (another device or batch shape) can flip a TopK
# selection at a near-tie, which no rebuild would fix. A changed SAE or changed activations
# make nearly every example disagree.
MAX_MISMATCH_FRACTION = 0.01
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

def shown_examples(examples: pl.DataFrame, random_examples: int) -> pl.DataFrame:
    """The examples that get context windows: all top and interval ones, and the first
    ``random_examples`` of the random sample (ranked by sample key, so still a uniform sample).
    The whole sample stays in the tables for interval picking and statistics."""
    return examples.filter((pl.col(KIND) != "random") | (pl.col(RANK) < random_examples))


def requests_for_partition(examples: pl.DataFrame, partition_key: str) -> pl.DataFrame:
    """The example rows that point into activation partition ``partition_key`` (schema
    ``EXAMPLE_SCHEMA``, sorted by feature, kind, interval, rank)."""
    _check_examples(examples)
    chosen = examples.filter(pl.col(PARTITION) == partition_key)
    return _sort_examples(_cast_examples(chosen))


def _check_examples(frame: pl.DataFrame) -> None:
    missing = [c for c in EXAMPLE_COLUMNS if c not in frame.columns]
    if missing:
        raise PlatformError(f"the feature examples table has no column(s) {', '.join(missing)} "
                            f"(columns: {', '.join(frame.columns)})",
                            "pass the feature_examples table written by the feature tables pass "
                            f"(columns {', '.join(EXAMPLE_COLUMNS)})")


def _cast_examples(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select([pl.col(c).cast(t) for c, t in EXAMPLE_SCHEMA.items()])


def _kind_key() -> pl.Expr:
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return pl.col(KIND).replace_strict(order, default=len(KIND_ORDER), return_dtype=pl.Int32)


def _sort_examples(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort([pl.col(FEATURE), _kind_key(), pl.col(KIND), pl.col(INTERVAL), pl.col(RANK)],
                      nulls_last=False, maintain_order=True)


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------

def _sae_device(sae: SparseAutoencoder) -> torch.device:
    return sae.W_dec.device


class _Index:
    """A partition's index arrays, read once."""

    def __init__(self, part: Partition):
        g = part.group
        self.part = part
        self.n_rows = part.n_rows
        self.context_id = g["context_id"][:].astype(np.int64)
        self.position = g["position"][:].astype(np.int64)
        self.token_id = g["token_id"][:]
        self.tokens = g["tokens"][:]
        self.context_doc_id = g["context_doc_id"][:]
        n_contexts, self.ctx_len = self.tokens.shape
        # Recorded at caching time; older partitions: position 0 always holds it (corpus.pack_contexts).
        recorded = part.attrs.get("start_token_id")
        self.start_token_id = int(recorded) if recorded is not None else int(self.tokens[0, 0]) if n_contexts else -1
        # Tokens that can be rows: the start-token part of the rule (sinks are text: they show, without an activation).
        self.can_be_row = training_rows(self.tokens, RowRule.from_attrs(part.attrs, self.start_token_id))
        self.row_of = np.full(self.tokens.shape, -1, dtype=np.int64)
        self.row_of[self.context_id, self.position] = np.arange(self.n_rows, dtype=np.int64)


def context_windows(store, sae: SparseAutoencoder, partition_key: str, requests: pl.DataFrame, tokenizer, *,
                    before: int, after: int, device=None, batch_rows: int = BATCH_ROWS,
                    rtol: float = RTOL, atol: float = ATOL,
                    max_mismatch_fraction: float = MAX_MISMATCH_FRACTION, codes=None,
                    group: str = catalog.FIRST_STORE) -> pl.DataFrame:
    """One window per request (schema ``WINDOW_SCHEMA``, in request order): the example's tokens
    ± (before, after) within its document, their strings, and the feature's activation on each
    (``FeatureSettings.before`` and ``.after`` in the pipeline).

    Raises StorageError for a missing partition, a row past its end, or an example activation
    the SAE no longer reproduces (stale tables); ModelError for an SAE of another width.

    ``codes``: pass 1's sparse codes of the whole partition (``feature_codes.read_codes``: values
    float32 and indices [n_rows, K]); the activations are then looked up in them instead of
    encoding the window rows again (TopK-style variants), and ``sae`` may be one without weights
    (``features.StoredSAE``: only its d_model and n_latents are read).

    ``group``: the partition's hook-point store whose rows the examples point into (the one the
    feature tables were built from, their ``meta["group"]``); its own index gives the windows. A
    transcoder's store holds paired rows [input | output]; the SAE encodes the input half."""
    windows = _windows(store, sae, partition_key, requests, tokenizer, before=before, after=after, device=device,
                       batch_rows=batch_rows, codes=codes, group=group)
    _check_reproduced(windows, partition_key, rtol=rtol, atol=atol, max_mismatch_fraction=max_mismatch_fraction)
    return windows


def _windows(store, sae: SparseAutoencoder, partition_key: str, requests: pl.DataFrame, tokenizer, *,
             before: int, after: int, device=None, batch_rows: int = BATCH_ROWS, codes=None,
             group: str = catalog.FIRST_STORE) -> pl.DataFrame:
    """``context_windows`` without the check that the examples still reproduce."""
    if before < 0 or after < 0 or batch_rows < 1:
        raise PlatformError(f"bad window settings before={before}, after={after}, batch_rows={batch_rows}",
                            "use before >= 0, after >= 0, batch_rows >= 1")
    _check_examples(requests)
    part = open_partition(store, partition_key, group)
    d_model = int(part.attrs.get("d_model", part.acts.shape[1]))
    if d_model != sae.d_model:
        raise ModelError(f"activation partition {partition_key!r} has d_model {d_model} but the SAE expects "
                         f"{sae.d_model}", "use the SAE trained on this model and layer's activations")
    requests = _cast_examples(requests)
    wrong = requests.filter(pl.col(PARTITION) != partition_key)
    if len(wrong):
        raise PlatformError(f"{len(wrong)} request(s) point into partition {wrong[PARTITION][0]!r}, "
                            f"not {partition_key!r}", "select them with requests_for_partition(examples, key)")
    if len(requests) == 0:
        return empty_windows()
    features = requests[FEATURE].to_numpy().astype(np.int64)
    rows = requests[ROW].to_numpy().astype(np.int64)
    bad = (features < 0) | (features >= sae.n_latents)
    if bad.any():
        raise PlatformError(f"the examples name feature {int(features[bad][0])}, but the SAE has "
                            f"{sae.n_latents} latents", "use the SAE checkpoint the feature tables were built from")
    index = _Index(part)
    stale = (rows < 0) | (rows >= index.n_rows)
    if stale.any():
        raise StorageError(
            f"{int(stale.sum())} example(s) point at rows past the end of activation partition {partition_key!r} "
            f"(e.g. row {int(rows[stale][0])}; it has {index.n_rows} rows): the feature tables are stale",
            "re-materialize the feature tables for the current activations before the context windows")

    ctx, pos = index.context_id[rows], index.position[rows]
    lo, hi = _window_bounds(index, ctx, pos, before, after)
    lengths = hi - lo + 1
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    which = np.repeat(np.arange(len(rows)), lengths)
    flat_pos = lo[which] + (np.arange(total) - starts[:-1][which])
    flat_ctx = ctx[which]
    flat_tok = index.tokens[flat_ctx, flat_pos]
    flat_row = index.row_of[flat_ctx, flat_pos]
    center = pos - lo

    center_flat = starts[:-1] + center
    if not (flat_tok[center_flat] == index.token_id[rows]).all():
        raise StorageError(f"activation partition {partition_key!r} has an inconsistent index "
                           "(token_id disagrees with tokens[context_id, position])",
                           "re-materialize that activation partition")

    flat_act = np.zeros(total, dtype=np.float32)
    has = flat_row >= 0
    if codes is not None:  # looked up: the SAE's d_model and n_latents are all that is read of it
        if len(codes[0]) != index.n_rows:
            raise PlatformError(f"the stored codes of partition {partition_key!r} have {len(codes[0])} rows, the "
                                f"partition {index.n_rows}", "pass the codes pass 1 computed from this partition")
        flat_act[has] = _pairs_from_stored(codes, flat_row[has], features[which][has])
    else:
        run_sae = sae
        if device is not None and torch.device(device) != _sae_device(sae):
            run_sae = copy.deepcopy(sae).to(torch.device(device))
        flat_act[has] = _pair_activations(run_sae, part, flat_row[has], features[which][has], batch_rows)

    strs = window_strings(tokenizer, flat_tok, starts)
    return pl.DataFrame([
        *[requests[c] for c in EXAMPLE_COLUMNS],
        pl.Series(CONTEXT_ID, ctx.astype(np.int32)),
        pl.Series(POSITION, pos.astype(np.int32)),
        pl.Series(DOC_ID, index.context_doc_id[ctx, pos].astype(np.int32)),
        pl.Series(CENTER, center.astype(np.int32)),
        _list_series(TOKEN_IDS, starts, pa.array(flat_tok.astype(np.int32))),
        _list_series(TOKEN_STRS, starts, pa.array(strs, pa.large_string())),
        _list_series(ACTS, starts, pa.array(flat_act)),
        _list_series(HAS_ACT, starts, pa.array(has)),
    ]).cast(WINDOW_SCHEMA)


def _check_reproduced(windows: pl.DataFrame, partition_key: str, *, rtol: float = RTOL, atol: float = ATOL,
                      max_mismatch_fraction: float = MAX_MISMATCH_FRACTION) -> None:
    """The activation each window shows at its example's own token against the example's stored
    ``activation``: more than ``max_mismatch_fraction`` of the partition's examples off means stale
    tables (StorageError); fewer are near-tie TopK flips (a warning)."""
    if windows.is_empty():
        return
    features, rows = windows[FEATURE].to_numpy(), windows[ROW].to_numpy()
    expected = windows[ACTIVATION].to_numpy().astype(np.float32)
    got = windows.select(pl.col(ACTS).list.get(pl.col(CENTER))).to_series().to_numpy().astype(np.float32)
    off = ~(np.abs(got - expected) <= atol + rtol * np.abs(expected))
    if off.sum() > int(max_mismatch_fraction * len(rows)):
        i = int(np.flatnonzero(off)[0])
        raise StorageError(
            f"{int(off.sum())} of {len(rows)} examples in partition {partition_key!r} no longer reproduce: "
            f"feature {int(features[i])} at row {int(rows[i])} has stored activation {expected[i]:.6g} but the SAE "
            f"gives {got[i]:.6g} — the SAE checkpoint or the activations changed after the feature tables were built",
            "re-materialize the feature tables with the current SAE and activations, then the context windows")
    if off.any():
        log.warning("%d of %d examples in partition %r differ from their stored activation beyond float "
                    "tolerance (within the %.2g%% allowed for near-tie TopK flips); windows show the recomputed "
                    "values", int(off.sum()), len(rows), partition_key, 100 * max_mismatch_fraction)


def empty_windows() -> pl.DataFrame:
    return pl.DataFrame(schema=WINDOW_SCHEMA)


def _window_bounds(index: _Index, ctx: np.ndarray, pos: np.ndarray, before: int, after: int):
    """[lo, hi] (inclusive) per example: the run around ``pos`` of same-document, non-start
    tokens, at most ``before`` to the left and ``after`` to the right."""
    offsets = np.arange(-before, after + 1)
    q = pos[:, None] + offsets
    inside = (q >= 0) & (q < index.ctx_len)
    qc = np.clip(q, 0, index.ctx_len - 1)
    doc = index.context_doc_id[ctx[:, None], qc]
    ok = inside & (doc == index.context_doc_id[ctx, pos][:, None]) & index.can_be_row[ctx[:, None], qc]
    n_left = np.cumprod(ok[:, :before][:, ::-1], axis=1).sum(1) if before else np.zeros(len(pos), np.int64)
    n_right = np.cumprod(ok[:, before + 1:], axis=1).sum(1) if after else np.zeros(len(pos), np.int64)
    return pos - n_left, pos + n_right


def _slices_by_latent(sae: SparseAutoencoder) -> bool:
    """True if encode_slice multiplies only the slice (per-latent activations)."""
    return type(sae).encode_slice is not SparseAutoencoder.encode_slice


@torch.no_grad()
def _pair_activations(sae: SparseAutoencoder, part: Partition, rows: np.ndarray, features: np.ndarray,
                      batch_rows: int) -> np.ndarray:
    """Activation of ``features[i]`` on stored row ``rows[i]``, each distinct row read once.

    The distinct rows are held on the SAE's device in resident blocks of at most RESIDENT_BYTES
    (read from zarr in sorted order). Per-latent variants then work feature slice by feature
    slice across the whole block, so a feature's pairs meet in one narrow slice however
    scattered its rows are; TopK-style variants encode the block batch_rows rows at a time."""
    n_lat = sae.n_latents
    keys, inverse = np.unique(rows * n_lat + features, return_inverse=True)  # sorted by row, then feature
    pair_rows, pair_feats = keys // n_lat, keys % n_lat
    needed = np.unique(pair_rows)
    device, dtype = _sae_device(sae), sae.W_dec.dtype
    width = int(part.acts.shape[1])  # d_model; a transcoder's paired rows: d_model + d_out
    resident = max(batch_rows, RESIDENT_BYTES // (width * torch.finfo(dtype).bits // 8))
    out = np.empty(len(keys), dtype=np.float32)
    for b in range(0, len(needed), resident):
        block = needed[b:b + resident]
        a, z = np.searchsorted(pair_rows, [block[0], block[-1] + 1])
        local = np.searchsorted(block, pair_rows[a:z])
        x = torch.empty(len(block), width, dtype=dtype, device=device)
        for s in range(0, len(block), READ_ROWS):
            part_rows = block[s:s + READ_ROWS]
            data = np.ascontiguousarray(part.acts.get_orthogonal_selection((part_rows, slice(None))))
            x[s:s + len(part_rows)] = torch.from_numpy(data).to(device)  # float16 travels, then widens
        if _slices_by_latent(sae):
            out[a:z] = _pairs_by_slices(sae, x, local, pair_feats[a:z])
        else:
            out[a:z] = _pairs_from_codes(sae, x, local, pair_feats[a:z], batch_rows)
    return out[inverse]


def _feature_slices(features: np.ndarray, counts: np.ndarray) -> list[tuple[int, int, int]]:
    """Group the sorted needed features into latent slices [start, stop) for encode_slice.

    A slice costs about (pairs in it) x (its width) multiply-adds per d_model, plus a fixed
    overhead per call (SLICE_CALL_ELEMENTS). Greedily, the next feature joins the current slice
    while that is cheaper than a call of its own and the block stays under ENCODE_ELEMENTS: few
    pairs per feature (the usual case: a few dozen windows of a feature in one partition) give
    narrow slices, so the work is close to one dot product per (row, feature) pair instead of a
    dense encode of every row. Returns (start, stop, number of features) triples."""
    slices = []
    s, e, pairs, n = int(features[0]), int(features[0]) + 1, int(counts[0]), 1
    for f, c in zip(features[1:].tolist(), counts[1:].tolist(), strict=True):
        merged = (pairs + c) * (f + 1 - s)
        if merged <= pairs * (e - s) + c + SLICE_CALL_ELEMENTS and merged <= ENCODE_ELEMENTS:
            e, pairs, n = f + 1, pairs + c, n + 1
        else:
            slices.append((s, e, n))
            s, e, pairs, n = f, f + 1, c, 1
    slices.append((s, e, n))
    return slices


def _pairs_by_slices(sae, x: torch.Tensor, local: np.ndarray, feats: np.ndarray) -> np.ndarray:
    order = np.argsort(feats, kind="stable")
    feats_sorted, local_sorted = feats[order], local[order]
    wanted, first, counts = np.unique(feats_sorted, return_index=True, return_counts=True)
    out = torch.empty(len(feats), dtype=torch.float32, device=x.device)
    i = 0
    for start, stop, n in _feature_slices(wanted, counts):
        a = int(first[i])
        z_end = int(first[i + n]) if i + n < len(first) else len(feats_sorted)
        rows_here, inv = np.unique(local_sorted[a:z_end], return_inverse=True)
        z = sae.encode_slice(x[torch.from_numpy(rows_here).to(x.device)], start, stop)
        pick_r = torch.from_numpy(inv).to(z.device)
        pick_f = torch.from_numpy(feats_sorted[a:z_end] - start).to(z.device)
        out[a:z_end] = z[pick_r, pick_f].float()
        i += n
    result = np.empty(len(feats), dtype=np.float32)
    result[order] = out.cpu().numpy()  # one transfer per block
    return result


def _pairs_from_codes(sae, x: torch.Tensor, local: np.ndarray, feats: np.ndarray, batch_rows: int) -> np.ndarray:
    """TopK-style variants: one full encode per row (in batches), then each (row, feature) pair
    looks its feature up in the row's sparse codes: what the default encode_slice computes."""
    out = torch.empty(len(feats), dtype=torch.float32, device=x.device)
    bounds = np.searchsorted(local, np.arange(0, len(x) + batch_rows, batch_rows))  # local is sorted
    for i, start in enumerate(range(0, len(x), batch_rows)):
        a, z = int(bounds[i]), int(bounds[i + 1])
        if a == z:
            continue
        codes = sae.encode(x[start:start + batch_rows])
        for s in range(a, z, PAIR_CHUNK):
            e = min(s + PAIR_CHUNK, z)
            r = torch.from_numpy(local[s:e] - start).to(x.device)
            f = torch.from_numpy(feats[s:e]).to(x.device)
            out[s:e] = (codes.values[r] * (codes.indices[r] == f[:, None])).sum(1).float()
    return out.cpu().numpy()


def _pairs_from_stored(codes: tuple[np.ndarray, np.ndarray], rows: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Activation of feats[i] on row rows[i], looked up in stored sparse codes (values, indices)."""
    values, indices = codes
    out = np.empty(len(rows), dtype=np.float32)
    for s in range(0, len(rows), PAIR_CHUNK):
        r, f = rows[s:s + PAIR_CHUNK], feats[s:s + PAIR_CHUNK]
        out[s:s + PAIR_CHUNK] = (values[r] * (indices[r] == f[:, None])).sum(1, dtype=np.float32)
    return out


def _list_series(name: str, starts: np.ndarray, values: pa.Array) -> pl.Series:
    arr = pa.LargeListArray.from_arrays(pa.array(starts, pa.int64()), values)
    return pl.from_arrow(arr).alias(name)


# ---------------------------------------------------------------------------------------------
# Storage: per-partition partials, regrouped per feature shard
# ---------------------------------------------------------------------------------------------

def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    """Parquet in row groups of ROW_GROUP_ROWS with min/max statistics (a page reads only its
    feature's groups). Written by pyarrow: polars' writer spends ~10x longer on these small row
    groups of list columns (5.3 s against 0.5 s for a demo shard of 227k windows) and writes a
    file 1.5x larger."""
    buffer = io.BytesIO()
    pq.write_table(frame.to_arrow(), buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                   write_statistics=True)
    return buffer.getvalue()


def _check_windows(frame: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in WINDOW_SCHEMA if c not in frame.columns]
    if missing:
        raise PlatformError(f"the windows frame has no column(s) {', '.join(missing)}",
                            "pass the frame returned by context_windows")
    return _sort_examples(frame.select(list(WINDOW_SCHEMA)).cast(WINDOW_SCHEMA))


def write_partition_windows(store, sae_name: str, partition_key: str, frame: pl.DataFrame, *,
                            built_from: dict | None = None) -> dict:
    """Commit one partition's windows at ``features/<sae_name>/contexts_partial/<partition_key>``.

    ``built_from`` (``windows_basis``): what the windows were built from, recorded in the pointer
    with the (feature, row) pairs they cover, so the next build of this partition may reuse them."""
    frame = _check_windows(frame)
    name = catalog.contexts_partial_name(sae_name, partition_key)
    info = {"partition": partition_key, "n_windows": len(frame), "n_features": frame[FEATURE].n_unique()}
    reuse = {} if built_from is None else {BUILT_FROM: built_from, SELECTION: _selection(frame)}
    with store.writing(name, **info, **reuse) as version:
        store.write_bytes_atomic(f"{version}/{PARTIAL_FILE}", _parquet_bytes(frame))
    return {**info, "path": store.url(store.resolve(name))}


def build_partition_windows(store, sae_name: str, sae: SparseAutoencoder, partition_key: str,
                            examples: pl.DataFrame, tokenizer, *, before: int, after: int,
                            checkpoint: str | None = None, codes=None, group: str = catalog.FIRST_STORE,
                            rtol: float = RTOL, atol: float = ATOL,
                            max_mismatch_fraction: float = MAX_MISMATCH_FRACTION, **build) -> dict:
    """Pass 3 for one activation partition: select its examples, build and commit the windows.

    A window depends on its (feature, row) and on nothing else that ``windows_basis`` does not
    record. So with the ``checkpoint`` version the SAE was loaded from, the windows this partition
    committed before are reused for every (feature, row) still selected when they were built from
    the same basis, and only the newly selected pairs are computed (a kept SAE's refresh: the old
    batches' examples barely change). The frame equals a build from scratch: same rows, order and
    values; the check that the examples reproduce runs over all of it. Anything else rebuilds.

    Returns the commit's info plus ``n_reused`` and ``n_computed`` (windows) and ``rebuilt_because``
    (why nothing was reused; None when the stored windows were used). Raises as ``context_windows``."""
    requests = requests_for_partition(examples, partition_key)
    name = catalog.contexts_partial_name(sae_name, partition_key)
    basis = windows_basis(store, partition_key, checkpoint=checkpoint, group=group, before=before, after=after,
                          codes=codes)
    pointer = store.pointer(name)
    reason = _why_rebuilt(pointer, basis)
    stored = None if reason else _stored_windows(store, name, pointer, requests.select(FEATURE, ROW).unique())
    if reason is None and stored is None:
        reason = "the stored windows do not cover the selection their pointer records"
    build = {"before": before, "after": after, "codes": codes, "group": group, **build}
    check = {"rtol": rtol, "atol": atol, "max_mismatch_fraction": max_mismatch_fraction}
    frame, n_reused = _windows_reusing(store, sae, partition_key, requests, stored, tokenizer, build, check)
    log.info("pass 3 [%s]: %d windows reused, %d computed%s", partition_key, n_reused, len(frame) - n_reused,
             f" (rebuilt: {reason})" if reason else "")
    info = write_partition_windows(store, sae_name, partition_key, frame, built_from=basis)
    return {**info, "n_reused": n_reused, "n_computed": len(frame) - n_reused, "rebuilt_because": reason}


# ---------------------------------------------------------------------------------------------
# Reuse: a partition's windows committed before, for the same checkpoint and batch version
# ---------------------------------------------------------------------------------------------

BUILT_FROM = "built_from"  # contexts_partial pointer field: what its windows were built from (windows_basis)
SELECTION = "selection"  # ... and the (feature, row) pairs they cover: {"n_pairs", "sha256"}
COMPUTED = (CONTEXT_ID, POSITION, DOC_ID, CENTER, TOKEN_IDS, TOKEN_STRS, ACTS, HAS_ACT)  # what a window adds
ORDER = "_request_order"


def windows_basis(store, partition_key: str, *, checkpoint: str | None, group: str, before: int, after: int,
                  codes) -> dict | None:
    """What a window of this partition depends on besides its (feature, row): the SAE checkpoint
    version, the batch's committed version, the hook-point store, the window size and where the
    activations come from (pass 1's stored codes or a new encode, equal only to float tolerance).
    None without a checkpoint version: nothing pins the SAE, so nothing is reused."""
    if checkpoint is None:
        return None
    version = (store.pointer(catalog.partition_name(partition_key)) or {}).get("version")
    return {**catalog.checkpoint_pin(checkpoint), "partition_version": version, "group": group,
            "before": int(before), "after": int(after), "activations": "encoded" if codes is None else "pass 1 codes"}


def _selection(frame: pl.DataFrame) -> dict:
    """The distinct (feature, row) pairs a windows frame covers: their number and sha256."""
    pairs = np.unique(frame.select(FEATURE, ROW).to_numpy().astype(np.int64).reshape(-1, 2), axis=0)
    return {"n_pairs": len(pairs), "sha256": hashlib.sha256(np.ascontiguousarray(pairs).tobytes()).hexdigest()}


def _why_rebuilt(pointer: dict | None, basis: dict | None) -> str | None:
    """Why the committed windows (``pointer``) cannot be reused for ``basis``; None when they can."""
    if basis is None:
        return "no checkpoint version pins the SAE"
    if pointer is None:
        return "no windows stored"
    built = pointer.get(BUILT_FROM)
    if built is None or SELECTION not in pointer:
        return "the stored windows do not record what they were built from"
    changed = [key for key in basis if built.get(key) != basis[key]]
    return f"built from another {', '.join(changed)}" if changed else None


def _stored_windows(store, name: str, pointer: dict, wanted: pl.DataFrame) -> pl.DataFrame | None:
    """The committed windows of the (feature, row) pairs in ``wanted`` (one per pair: a pair's
    window is the same whatever its kind or rank), read one row group at a time so at most the
    reused windows are held. None when the file is gone or covers another selection than its
    pointer records."""
    try:
        with store.fs.open(f"{store.path(name, pointer['version'])}/{PARTIAL_FILE}", "rb") as f:
            pf = pq.ParquetFile(f)
            if _selection(pl.from_arrow(pf.read(columns=[FEATURE, ROW]))) != pointer[SELECTION]:
                return None
            kept = [pl.from_arrow(pf.read_row_group(i, columns=[FEATURE, ROW, *COMPUTED]))
                    .join(wanted, on=[FEATURE, ROW], how="semi") for i in range(pf.num_row_groups)]
    except FileNotFoundError:
        return None
    schema = {c: WINDOW_SCHEMA[c] for c in (FEATURE, ROW, *COMPUTED)}
    if not kept:
        return pl.DataFrame(schema=schema)
    return pl.concat(kept).cast(schema).unique([FEATURE, ROW], keep="first", maintain_order=True)


def _windows_reusing(store, sae, partition_key: str, requests: pl.DataFrame, stored: pl.DataFrame | None,
                     tokenizer, build: dict, check: dict) -> tuple[pl.DataFrame, int]:
    """The windows of ``requests`` in request order: the ``stored`` ones joined to their request,
    the others computed; checked together (``_check_reproduced``). Returns (windows, reused)."""
    if stored is None:
        return context_windows(store, sae, partition_key, requests, tokenizer, **build, **check), 0
    ordered = requests.with_row_index(ORDER)
    reused = ordered.join(stored, on=[FEATURE, ROW], how="inner")
    missing = ordered.join(stored.select(FEATURE, ROW), on=[FEATURE, ROW], how="anti")
    parts = [reused.select(ORDER, *WINDOW_SCHEMA)]
    if missing.height:
        computed = _windows(store, sae, partition_key, missing.drop(ORDER), tokenizer, **build)
        parts.append(computed.with_columns(missing[ORDER]).select(ORDER, *WINDOW_SCHEMA))
    frame = pl.concat(parts).sort(ORDER).drop(ORDER).cast(WINDOW_SCHEMA)
    _check_reproduced(frame, partition_key, **check)
    return frame, reused.height


def _read_feature_range(store, path: str, start: int | None, stop: int | None) -> pl.DataFrame:
    """Rows of a feature-sorted parquet file with start <= feature < stop, reading only the row
    groups whose statistics can hold them."""
    with store.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        col = pf.schema_arrow.get_field_index(FEATURE)
        groups = []
        for i in range(pf.num_row_groups):
            stats = pf.metadata.row_group(i).column(col).statistics
            if stats is not None and stats.has_min_max and (
                    (start is not None and stats.max < start) or (stop is not None and stats.min >= stop)):
                continue
            groups.append(i)
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    frame = pl.from_arrow(table) if table.num_rows else pl.DataFrame(schema=WINDOW_SCHEMA)
    if start is not None:
        frame = frame.filter(pl.col(FEATURE) >= start)
    if stop is not None:
        frame = frame.filter(pl.col(FEATURE) < stop)
    return frame.cast(WINDOW_SCHEMA)


def regroup_by_feature(store, sae_name: str, partition_keys: list[str], start: int, stop: int) -> pl.DataFrame:
    """All windows of features [start, stop) from the partials of ``partition_keys``, sorted by
    feature, kind (top, interval, random), interval, rank; none for an empty range (a feature
    shard with no latent)."""
    if not 0 <= start <= stop:
        raise PlatformError(f"feature range [{start}, {stop}) is negative", "pass 0 <= start <= stop")
    paths = []
    for key in partition_keys:
        path = store.require(catalog.contexts_partial_name(sae_name, key),
                             f"context windows of partition {key!r} (SAE {sae_name!r})",
                             "materialize the context windows of every activation partition first")
        paths.append(f"{path}/{PARTIAL_FILE}")
    frames = [_read_feature_range(store, p, start, stop) for p in paths]
    if not frames:
        return empty_windows()
    return _sort_examples(pl.concat(frames, how="vertical"))


def write_feature_contexts(store, sae_name: str, shard_index: int, frame: pl.DataFrame) -> dict:
    """Commit one feature shard's windows at ``features/<sae_name>/contexts/f<shard_index>``."""
    frame = _check_windows(frame)
    name = catalog.contexts_name(sae_name, shard_index)
    features = frame[FEATURE]
    info = {"shard": int(shard_index), "n_windows": len(frame), "n_features": features.n_unique(),
            "min_feature": None if frame.is_empty() else int(features.min()),
            "max_feature": None if frame.is_empty() else int(features.max())}
    with store.writing(name, **info) as version:
        store.write_bytes_atomic(f"{version}/{SHARD_FILE}", _parquet_bytes(frame))
    return {**info, "path": store.url(store.resolve(name))}


def read_feature_contexts(store, sae_name: str, shard_index: int, feature: int | None = None) -> pl.DataFrame:
    """A committed feature shard's windows; with ``feature``, only that feature's (a page)."""
    path = store.require(catalog.contexts_name(sae_name, shard_index),
                         f"context windows of feature shard {shard_index} (SAE {sae_name!r})",
                         "materialize the feature contexts asset for that shard")
    if feature is None:
        return _read_feature_range(store, f"{path}/{SHARD_FILE}", None, None)
    return _read_feature_range(store, f"{path}/{SHARD_FILE}", int(feature), int(feature) + 1)

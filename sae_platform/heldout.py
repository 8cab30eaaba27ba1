"""Which rows a checkpoint never trained on: its held-out rows, named so they survive shuffle rebuilds.

The one rule: a training that starts afresh holds out the last ``holdout_rows`` rows of the shuffled
store it starts on (:func:`tail`), and its checkpoints record *which rows* those are
(``catalog.HELDOUT_ROWS_FILE``), each named by its activation batch (key and version) and its row in
that batch. A row's position in the shuffled store, and even its global row id (partitions in key
order, then row number), change when the store is rebuilt with new batches; its name does not.

So when new batches arrive and the store is re-shuffled, the checkpoint's held-out rows stay the
rows it never saw: a checkpoint the refresh policy keeps (``refresh.kept_unseen``) is evaluated on
them, not on the rebuilt store's last rows, which hold rows it trained on; and one it resumes
(``refresh.Continuation``) leaves them out of every batch it trains on (``HeldoutRows.global_ids`` of
the grown store: the trainer's ``exclude``; :func:`batch_rows` refills such a batch from the rows
after it, so none is short or empty) and records the same names again. Evaluation reads them with
:func:`heldout_blocks`: from the shuffled store's last rows when they are exactly those rows (a
checkpoint of the current store, the usual case), else from the activation batches they name.

A checkpoint written before held-out rows were recorded is refused by the evaluation on a store
rebuilt since (:func:`checkpoint_heldout`), and is not kept nor resumed by the refresh policy.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sae_platform.catalog import HELDOUT_ROWS_FILE, checkpoint_name, partition_name, store_group_of
from sae_platform.errors import StorageError
from sae_platform.shuffled import Shuffled, iter_shuffled

READ_ROWS = 65_536  # held-out rows gathered from the activation batches per read


@dataclass(frozen=True)
class HeldoutRows:
    """Held-out rows in their evaluation order: row ``i`` is row ``row[i]`` of activation batch
    ``batches[batch[i]]`` ((key, version)). ``batch``, ``row``: int64 [n]."""

    batches: tuple[tuple[str, str], ...]
    batch: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def record(self) -> bytes:
        """What a checkpoint stores (``catalog.HELDOUT_ROWS_FILE``): JSON, no pickle."""
        return json.dumps({"batches": [{"key": k, "version": v} for k, v in self.batches],
                           "batch": self.batch.tolist(), "row": self.row.tolist()}).encode()

    @classmethod
    def from_record(cls, data: bytes) -> "HeldoutRows":
        record = json.loads(data)
        return cls(tuple((b["key"], b["version"]) for b in record["batches"]),
                   np.asarray(record["batch"], dtype=np.int64), np.asarray(record["row"], dtype=np.int64))

    def names(self) -> list[tuple[str, str, int]]:
        """Each row's (key, version, row), in order: equal names are the same row."""
        return [(*self.batches[b], r) for b, r in zip(self.batch.tolist(), self.row.tolist(), strict=True)]

    def describe(self, i: int) -> str:
        key, version = self.batches[int(self.batch[i])]
        return f"row {int(self.row[i])} of activation batch {key!r} (version {version})"

    def global_ids(self, index: dict) -> np.ndarray | None:
        """int64 [n]: the rows' global row ids in shuffled store ``index`` (its ``index.json``);
        None when one of their batches is not among its inputs at the same version."""
        offsets = {(i["key"], i["version"]): int(i["offset"]) for i in index["inputs"]}
        if any(b not in offsets for b in self.batches):
            return None
        return np.asarray([offsets[b] for b in self.batches], dtype=np.int64)[self.batch] + self.row


def named(index: dict, ids: np.ndarray) -> HeldoutRows:
    """The names of global row ids ``ids`` [n] of shuffled store ``index``."""
    inputs = sorted(index["inputs"], key=lambda i: int(i["offset"]))
    offsets = np.asarray([int(i["offset"]) for i in inputs], dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    batch = np.searchsorted(offsets, ids, side="right") - 1
    return HeldoutRows(tuple((i["key"], i["version"]) for i in inputs), batch, ids - offsets[batch])


def tail(shuffled: Shuffled, holdout_rows: int) -> HeldoutRows:
    """The last ``holdout_rows`` rows of ``shuffled``: what a training starting on it holds out."""
    ids = [ids for ids, _ in shuffled.blocks(max(shuffled.n_rows - holdout_rows, 0))]
    return named(shuffled.index, np.concatenate(ids) if ids else np.zeros(0, np.int64))


def same_rows(a: HeldoutRows, b: HeldoutRows) -> bool:
    """Whether ``a`` and ``b`` name the same rows in the same order."""
    return a.names() == b.names()


def recorded(store, sae_name: str, version: str) -> HeldoutRows | None:
    """The held-out rows checkpoint ``version`` of ``sae_name`` records (None: written before they were)."""
    file = f"{store.path(checkpoint_name(sae_name), version)}/{HELDOUT_ROWS_FILE}"
    return HeldoutRows.from_record(store.fs.cat_file(file)) if store.fs.exists(file) else None


def training_heldout(store, sae_name: str, shuffled: Shuffled, holdout_rows: int,
                     resumed: bool) -> tuple[HeldoutRows, np.ndarray | None]:
    """(the rows a training of ``sae_name`` on ``shuffled`` holds out, the global row ids its batches
    must leave out): those its checkpoint records when it ``resumed`` one (on a rebuilt store they
    lie anywhere in it), else the store's last ``holdout_rows``, which no batch reaches (None:
    nothing to leave out). Raises StorageError when the recorded rows' batches are not in the store."""
    last = tail(shuffled, holdout_rows)
    kept = recorded(store, sae_name, store.pointer(checkpoint_name(sae_name))["version"]) if resumed else None
    if kept is None or same_rows(kept, last):
        return last, None
    ids = kept.global_ids(shuffled.index)
    if ids is None:  # refresh.unseen_since resumes only where every trained batch is as it was
        raise StorageError(f"the held-out rows of {sae_name!r}'s checkpoint name batches shuffled store "
                           f"{shuffled.name!r} does not hold", "delete that checkpoint and train again")
    return kept, ids


def batch_rows(shuffled: Shuffled, start: int, stop: int, exclude: np.ndarray | None = None, wrap: int | None = None,
               part: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """(global row ids [m], acts [m, d_model]) of part r of R (``part``) of the batch of shuffled rows
    [start, stop): its m = (stop - start) / R rows from the r-th on.

    With ``exclude`` (global row ids: a resumed checkpoint's held-out rows, anywhere in a rebuilt store)
    those rows are left out of the batch and it is refilled from the rows after ``stop`` (wrapping to
    row 0 at ``wrap``, the end of the training rows), so it keeps its size: a batch of held-out rows
    only would be empty (and its loss NaN). Each part then reads the whole batch, so the R parts are
    one process's batch, split. Raises StorageError when the rows before ``wrap`` hold less than one
    batch outside ``exclude``."""
    rank, parts = part
    share = (stop - start) // parts
    if exclude is None:
        return _rows(shuffled, start + rank * share, start + (rank + 1) * share)
    size, wrap = stop - start, shuffled.n_rows if wrap is None else wrap
    ids, acts, held, at, scanned = [], [], 0, start, 0
    while held < size:
        if scanned >= wrap:
            raise StorageError(
                f"the {wrap:,} training rows of shuffled store {shuffled.name!r} hold fewer than one batch "
                f"({size:,} rows) outside the {len(exclude):,} rows the resumed checkpoint held out",
                "lower batch_size, or delete the checkpoint and train from scratch on the rebuilt store")
        end = min(at + size - held, wrap)
        read_ids, read_acts = _rows(shuffled, at, end)
        kept = ~np.isin(read_ids, exclude)
        ids.append(read_ids[kept])
        acts.append(read_acts[kept])
        held, scanned, at = held + int(kept.sum()), scanned + end - at, 0 if end == wrap else end
    ids, acts = np.concatenate(ids), np.concatenate(acts)
    return ids[rank * share:(rank + 1) * share], acts[rank * share:(rank + 1) * share]


def _rows(shuffled: Shuffled, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(global row ids, acts) of shuffled rows [start, stop)."""
    ids, acts = zip(*shuffled.blocks(start, stop))
    return np.concatenate(ids), np.concatenate(acts)


def checkpoint_heldout(store, sae_name: str, version: str, cfg: dict, shuffled: Shuffled) -> HeldoutRows:
    """The held-out rows of checkpoint ``version`` of ``sae_name`` (its ``cfg.json``: ``cfg``).

    A checkpoint written before they were recorded held out the last ``holdout_rows`` rows of the
    store it trained on: those are ``shuffled``'s when it is that store (same plan). Raises
    StorageError when it is not: the rebuilt store's last rows include rows the SAE trained on."""
    heldout = recorded(store, sae_name, version)
    if heldout is not None:
        return heldout
    trained_on = cfg["data"].get("plan_id")
    if trained_on != shuffled.index["plan_id"]:
        raise StorageError(
            f"SAE {sae_name!r} (checkpoint {version}) was trained on plan {trained_on} of shuffled store "
            f"{shuffled.name!r} before checkpoints recorded their held-out rows, and the store has been rebuilt "
            f"since (plan {shuffled.index['plan_id']}): its last rows now include rows this SAE trained on, so "
            "they cannot measure it, and which rows it never saw is not known",
            "retrain it (materialize sae_checkpoint: the refresh policy trains such a checkpoint again on the "
            "rebuilt store, and the new checkpoint records its held-out rows)")
    return tail(shuffled, int(cfg["training"]["holdout_rows"]))


def heldout_blocks(store, shuffled: Shuffled, heldout: HeldoutRows,
                   batch_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(position in ``heldout`` of the block's first row, acts [b, d_model]) in ``heldout``'s order,
    blocks of ``batch_rows`` rows (the last may be shorter): from ``shuffled``'s last rows when they
    are ``heldout`` (its own store), else from the activation batches the rows name. Raises
    StorageError naming the batch when a version it names is no longer stored."""
    if same_rows(tail(shuffled, len(heldout)), heldout):
        start = shuffled.n_rows - len(heldout)
        for i, (_, acts) in enumerate(iter_shuffled(store, shuffled.name, batch_rows, start=start)):
            yield i * batch_rows, acts
        return
    for first in range(0, len(heldout), READ_ROWS):
        acts = _gathered(store, shuffled, heldout, first, min(first + READ_ROWS, len(heldout)))
        for lo in range(0, len(acts), batch_rows):
            yield first + lo, acts[lo:lo + batch_rows]


def _gathered(store, shuffled: Shuffled, heldout: HeldoutRows, start: int, stop: int) -> np.ndarray:
    """acts [stop - start, d_model] of held-out rows [start, stop), read from their activation batches."""
    out = np.empty((stop - start, shuffled.d_model), dtype=shuffled.dtype)
    batch, row = heldout.batch[start:stop], heldout.row[start:stop]
    for b in np.unique(batch).tolist():
        key, version = heldout.batches[b]
        name, what = partition_name(key), f"activation batch {key!r} (version {version})"
        if not store.fs.exists(store.path(name, version)):
            raise StorageError(
                f"held-out rows of this SAE come from {what}, which is no longer stored (the batch was re-cached "
                "or removed): they cannot be read, and the shuffled store's other rows include rows it trained on",
                "retrain the SAE on the current store (materialize sae_checkpoint; a batch re-cached or removed "
                "trains it from scratch)")
        here = batch == b
        wanted = np.unique(row[here])
        with store.reading(name, version, what):
            acts = store.open_checked_group(name, version, store_group_of(shuffled.index), what)["acts"]
            values = acts.get_orthogonal_selection((wanted, slice(None)))
        store.check_version(name, version, what)
        out[here] = values[np.searchsorted(wanted, row[here])]
    return out

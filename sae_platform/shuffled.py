"""The committed shuffled store, read back: ``open_shuffled`` and ``iter_shuffled`` stream its rows
in shuffled order (docs/design.md, "The shuffle").

``sae_platform.shuffle`` writes the store (``commit_shuffled``): zarr v3 pieces, acts [n, d_model]
and row_id [n] in fixed-size uncompressed chunks, one piece per final bucket, listed in order by
the store's index. This module only reads, so the trainer and the evaluation need nothing of the
shuffle's machinery.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from sae_platform import catalog
from sae_platform.errors import StorageError
from sae_platform.storage import ArtifactStore


@dataclass(frozen=True)
class Shuffled:
    """A committed shuffled store: n_rows rows in uniformly random order, in pieces read in sequence."""

    store: ArtifactStore
    name: str
    n_rows: int
    d_model: int
    dtype: str
    chunk_rows: int
    pieces: tuple[dict, ...]
    index: dict = field(repr=False)
    # each piece's (zarr group, version) once checked: a reader checks a piece when it first reads it,
    # not at every read (a training step reads one batch: the listing and checksum reads of a piece of
    # many chunks cost more than the step's own rows). Each read still checks the version is there.
    _opened: dict = field(default_factory=dict, repr=False, compare=False)
    _kept: dict = field(default_factory=dict, repr=False, compare=False)  # the chunk of the last part (_kept_chunk)

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row_id, acts) for rows [start, stop), in reads of whole chunks (~8 MB each, ``read_rows``).

        A read that covers a whole block yields it as read. A smaller one (a training step's batch)
        is served from the chunk that holds it, which this reader keeps (zarr decodes a whole chunk
        for any part of it): the next batches in that chunk cost a copy of their rows, not two zarr
        reads (~7 ms here, against a 128-row step of ~16 ms at 512 latents), and the reader holds one
        chunk, no more than one read of a part held before. Those rows are copies: changing them
        changes no later read."""
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        for piece in self.pieces:
            lo, hi = max(start - piece["offset"], 0), min(stop - piece["offset"], piece["n_rows"])
            while lo < hi:
                first = lo // self.read_rows * self.read_rows
                last = min(piece["n_rows"], first + self.read_rows)
                if lo == first and hi >= last:  # the whole block: handed over as read
                    yield self._read(piece, first, last)
                    lo = last
                    continue
                first = lo // self.chunk_rows * self.chunk_rows  # a part: from the chunk holding it, kept
                end = min(hi, first + self.chunk_rows, piece["n_rows"])
                row_id, acts = self._kept_chunk(piece, first, min(first + self.chunk_rows, piece["n_rows"]))
                yield row_id[lo - first:end - first].copy(), acts[lo - first:end - first].copy()
                lo = end

    @property
    def read_rows(self) -> int:
        """Rows of one read: whole chunks, ~8 MB."""
        return self.chunk_rows * max(1, (8 << 20) // (self.chunk_rows * self.d_model * np.dtype(self.dtype).itemsize))

    def _read(self, piece: dict, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """(row_id, acts) of rows [first, last) of ``piece``, read now."""
        group, version = self._open_piece(piece)
        what = f"piece {piece['name']} of shuffled store {self.name!r} (plan {self.index['plan_id']})"
        with self.store.reading(piece["name"], version, what):
            block = group["row_id"][first:last], group["acts"][first:last]
        # a removed chunk reads back as zeros: the version must still exist after the read
        self.store.check_version(piece["name"], version, what)
        return block

    def _kept_chunk(self, piece: dict, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [first, last) of ``piece`` (one chunk) from the chunk this reader kept, or read now and
        kept (one chunk, swapped whole: safe for a reader thread beside another)."""
        key = (piece["name"], first, last)
        kept = self._kept.get("chunk")
        if kept is None or kept[0] != key:
            kept = (key, self._read(piece, first, last))
            self._kept["chunk"] = kept
        return kept[1]

    def check_pieces(self) -> "Shuffled":
        """Every piece checked now (``_open_piece``: each recorded file there with its size, the
        metadata as written), not when a read first reaches it: a reader of the whole store (training)
        finds a damaged piece before its first step, not hours in, and its steps then pay no piece's
        check. StorageError naming the piece and the fix. Returns this reader."""
        for piece in self.pieces:
            self._open_piece(piece)
        return self

    def _open_piece(self, piece: dict):
        if piece["name"] not in self._opened:
            self._opened[piece["name"]] = self._open_checked(piece)
        return self._opened[piece["name"]]

    def _open_checked(self, piece: dict):
        pointer = self.store.pointer(piece["name"])
        if pointer is None:
            current = self.store.pointer(catalog.shuffled_name(self.name))
            if current is not None and current.get("plan_id") != self.index["plan_id"]:
                raise StorageError(
                    f"piece {piece['name']} of shuffled store {self.name!r} (plan {self.index['plan_id']}), which "
                    f"this run was reading, has been removed: the store was re-shuffled (plan "
                    f"{current.get('plan_id')}) and the superseded pieces outlived the grace period of "
                    f"{self.store.grace_s:g} s",
                    "re-run this step: it reads the current shuffled store. So that long reads finish, raise "
                    "SAE_PLATFORM_GRACE_S (seconds a superseded version stays readable) for every run that commits")
        if pointer is None or pointer.get("plan_id") != self.index["plan_id"] or pointer["n_rows"] != piece["n_rows"]:
            raise StorageError(f"piece {piece['name']} of shuffled store {self.name!r} changed or vanished after "
                               "the store was committed", "re-run the shuffle (finalize and commit)")
        what = f"piece {piece['name']} of shuffled store {self.name!r}"
        with self.store.reading(piece["name"], pointer["version"], what):
            group = self.store.open_checked_group(piece["name"], pointer["version"], catalog.PIECE_STORE, what)
        return group, pointer["version"]


def open_shuffled(store: ArtifactStore, name: str) -> Shuffled:
    path = store.require(catalog.shuffled_name(name), f"shuffled store {name!r}",
                         "run the shuffle (commit_shuffled) first")
    store.check_intact(catalog.shuffled_name(name), store.version_of(path), what=f"shuffled store {name!r}")
    index = store.read_json(f"{path}/{catalog.SHUFFLED_INDEX}")
    return Shuffled(store, name, index["n_rows"], index["d_model"], index["dtype"], index["chunk_rows"],
                    tuple(p for p in index["pieces"] if p["n_rows"]), index)


def iter_shuffled(store: ArtifactStore, name: str, batch_rows: int, start: int = 0, stop: int | None = None,
                  drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (row_id [b], acts [b, d_model]) batches in shuffled order; [start, stop) selects a split.

    Reads are sequential and chunk-aligned (~8 MB each), whatever the batch size.
    """
    if batch_rows < 1:
        raise StorageError(f"batch_rows={batch_rows} is not a batch size", "use batch_rows >= 1")
    shuffled = open_shuffled(store, name)  # fail here, not at the first batch
    return _rebatch(shuffled.blocks(start, stop), batch_rows, drop_last)


def _rebatch(blocks: Iterable[tuple[np.ndarray, np.ndarray]], batch_rows: int,
             drop_last: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Exact-size batches across block and piece boundaries."""
    held_ids, held_acts, held = [], [], 0
    for ids, acts in blocks:
        held_ids.append(ids)
        held_acts.append(acts)
        held += len(ids)
        if held < batch_rows:
            continue
        ids, acts = np.concatenate(held_ids), np.concatenate(held_acts)
        cut = held - held % batch_rows
        for lo in range(0, cut, batch_rows):
            yield ids[lo:lo + batch_rows], acts[lo:lo + batch_rows]
        held_ids, held_acts, held = [ids[cut:]], [acts[cut:]], held - cut
    if held and not drop_last:
        yield np.concatenate(held_ids), np.concatenate(held_acts)

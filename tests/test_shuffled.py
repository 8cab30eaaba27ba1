"""The committed shuffled store read back (sae_platform/shuffled.py): what a training step's read costs
and that small reads return the rows one whole read does."""

import numpy as np
import pytest
from test_trainer import make_shuffled

from sae_platform.heldout import batch_rows
from sae_platform.shuffled import Shuffled, open_shuffled


def _small_reads(monkeypatch) -> None:
    """Reads of one chunk (1,024 rows here), not ~8 MB: a few hundred rows span several reads."""
    monkeypatch.setattr(Shuffled, "read_rows", property(lambda self: self.chunk_rows))


def _whole(store) -> tuple[np.ndarray, np.ndarray]:
    ids, acts = zip(*open_shuffled(store, "main").blocks())
    return np.concatenate(ids), np.concatenate(acts)


def test_a_reader_checks_each_piece_once_not_at_every_batch(store, monkeypatch):
    make_shuffled(store)
    _small_reads(monkeypatch)
    shuffled = open_shuffled(store, "main")
    checked, check_intact = [], type(store).check_intact

    def counted(self, name, *args, **kwargs):
        checked.append(name)
        return check_intact(self, name, *args, **kwargs)

    monkeypatch.setattr(type(store), "check_intact", counted)
    for start in range(0, shuffled.n_rows - 64, 64):  # a training run's batches, in order
        batch_rows(shuffled, start, start + 64)
    assert sorted(checked) == sorted(piece["name"] for piece in shuffled.pieces)


def test_batches_read_one_by_one_are_the_rows_of_one_whole_read(store, monkeypatch):
    make_shuffled(store)
    shuffled, (ids, acts) = open_shuffled(store, "main"), _whole(store)
    _small_reads(monkeypatch)
    batches = [batch_rows(shuffled, start, min(start + 100, shuffled.n_rows))
               for start in range(0, shuffled.n_rows, 100)]  # 100 rows: some straddle two reads
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), ids)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), acts)
    assert shuffled.n_rows > 4 * shuffled.read_rows


def test_rows_a_caller_changes_are_not_what_the_next_read_returns(store, monkeypatch):
    make_shuffled(store)
    _small_reads(monkeypatch)
    shuffled, (ids, acts) = open_shuffled(store, "main"), _whole(store)
    for read in (lambda: batch_rows(shuffled, 0, 10), lambda: next(shuffled.blocks(5, 20))):
        got_ids, got_acts = read()
        got_ids[:], got_acts[:] = -1, np.nan
    again_ids, again_acts = batch_rows(shuffled, 0, 20)
    np.testing.assert_array_equal(again_ids, ids[:20])
    np.testing.assert_array_equal(again_acts, acts[:20])


def test_training_checks_every_piece_before_its_first_step(store, monkeypatch):
    """A damaged piece fails a training before its first step, naming the piece, not when a batch first
    reaches it (hours in, on a large store); an intact store's steps then check no piece again."""
    from sae_platform import shuffle, trainer
    from sae_platform.errors import StorageError

    make_shuffled(store)
    shuffle.run_shuffle(store, "pieces", n_buckets=4, memory_budget_bytes=200_000, n_jobs=2, seed=0)
    shuffled = open_shuffled(store, "pieces")
    assert len(shuffled.pieces) > 1
    last = shuffled.pieces[-1]["name"]
    monkeypatch.setattr(trainer, "CALIBRATION_ROWS", 64)  # the init reads the first piece only
    settings = trainer.TrainSettings(n_latents=32, k=4, batch_size=64, token_budget=shuffled.n_rows, holdout_rows=0,
                                     log_every_steps=1)  # an epoch: every piece
    checked, check_intact = [], type(store).check_intact

    def counted(self, name, *args, **kwargs):
        checked.append(name)
        return check_intact(self, name, *args, **kwargs)

    monkeypatch.setattr(type(store), "check_intact", counted)
    steps = []
    trainer.train_sae(store, "pieces", "intact", settings, log=lambda m: None,
                      on_metrics=lambda row: steps.append(list(checked)))
    assert steps and all(seen == steps[0] for seen in steps)  # no piece checked during the steps
    assert set(steps[0]) >= {piece["name"] for piece in shuffled.pieces}
    version = store.pointer(last)["version"]
    chunk = next(p for p in store.fs.find(store.path(last, version)) if "/acts/c" in p)
    store.fs.rm(chunk)
    steps.clear()
    settings = trainer.TrainSettings(**{**settings.__dict__, "token_budget": 64 * 2})  # two steps in the first piece
    with pytest.raises(StorageError, match=last.split("/")[-1]):
        trainer.train_sae(store, "pieces", "damaged", settings, log=lambda m: None,
                          on_metrics=lambda row: steps.append(row))
    assert steps == []

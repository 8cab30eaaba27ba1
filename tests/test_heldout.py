"""A checkpoint's held-out rows stay the rows it never trained on when the shuffled store is rebuilt.

The fault: held-out rows were the last ``holdout_rows`` rows of the *current* shuffled store, so a
checkpoint the refresh policy kept (or resumed) after new batches re-shuffled the store was
evaluated on rows it had trained on, and a resumed one trained on the rows it had held out: its
held-out figures were optimistic. Rows are checked by name (activation batch, version, row), and the
new batch sorts first, so every earlier row's global row id shifts with the rebuild.
"""

import numpy as np
import pytest
import torch
from test_trainer import SETTINGS, make_shuffled

from sae_platform import catalog, shuffle, trainer
from sae_platform.errors import StorageError
from sae_platform.evaluate import evaluate_sae
from sae_platform.heldout import checkpoint_heldout, named, recorded, same_rows
from sae_platform.shuffled import open_shuffled
from sae_platform.trainer import TrainSettings, finished_checkpoint, train_sae

FIGURES = ("fvu", "nmse", "l0", "heldout_tokens", "heldout_dead_fraction")


def _add_batch(store, key: str, rows: int) -> None:
    """Cache batch ``key`` (sorting before p0: every other row's global row id shifts) and re-shuffle."""
    acts = np.random.default_rng(7).standard_normal((rows, 16)).astype(np.float32)
    with store.writing(catalog.partition_name(key)) as version:
        group = store.open_group(f"{version}/{catalog.FIRST_STORE}", "w")
        group.create_array("acts", data=acts, chunks=(512, 16), compressors=None)
        group.attrs.update({"d_model": 16, "dtype": "float32", "n_rows": rows})
    shuffle.run_shuffle(store, "main", n_buckets=4, memory_budget_bytes=1 << 20, n_jobs=2, seed=0)


def _row_names(store, start: int, stop: int | None = None) -> set:
    """(batch, version, row) of rows [start, stop) of the current shuffled store."""
    shuffled = open_shuffled(store, "main")
    ids = np.concatenate([ids for ids, _ in shuffled.blocks(start, stop)])
    return set(named(shuffled.index, ids).names())


def _figures(store) -> dict:
    report, _ = evaluate_sae(store, "main", "run", None, None, torch.device("cpu"), ablation_tokens=0)
    return {k: report[k] for k in FIGURES}


def _trained_once(store) -> tuple[set, set]:
    """Train ``run`` on a fresh store: (names of the rows it trained on, of the rows it held out)."""
    make_shuffled(store)
    train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    n_rows = open_shuffled(store, "main").n_rows
    assert SETTINGS.token_budget > n_rows  # more than an epoch: every row before the held-out ones trained
    return _row_names(store, 0, n_rows - SETTINGS.holdout_rows), _row_names(store, n_rows - SETTINGS.holdout_rows)


def test_a_kept_checkpoint_is_evaluated_on_the_rows_it_held_out_not_the_rebuilt_stores_last_rows(store):
    trained, held = _trained_once(store)
    truly_held_out = _figures(store)  # on the store it trained on: its last rows are the held-out ones
    plan = open_shuffled(store, "main").index["plan_id"]

    _add_batch(store, "a-small", 300)  # 300 rows: 3.9% of the 7,680 tokens trained on
    rebuilt = open_shuffled(store, "main")
    assert rebuilt.index["plan_id"] != plan and finished_checkpoint(store, "main", "run", SETTINGS) is not None
    assert _row_names(store, rebuilt.n_rows - SETTINGS.holdout_rows) & trained  # the new last rows: trained on

    assert _figures(store) == truly_held_out  # the same rows, in the same order: the same figures
    version = catalog.checkpoint_version(store, "run")
    cfg = store.read_json(f"{store.path(catalog.checkpoint_name('run'), version)}/cfg.json")
    evaluated = set(checkpoint_heldout(store, "run", version, cfg, rebuilt).names())
    assert evaluated == held and not evaluated & trained


def _rows_read_by_training(monkeypatch) -> list[np.ndarray]:
    """From now on, the row ids of every batch the trainer reads (``trainer.prefetch``), in order."""
    read, real = [], trainer.prefetch

    def recording(*args, **kwargs):
        for x, ids, start in real(*args, **kwargs):
            read.append(ids)
            yield x, ids, start

    monkeypatch.setattr(trainer, "prefetch", recording)
    return read


def test_a_resumed_checkpoint_never_trains_on_its_held_out_rows_and_keeps_them(store, monkeypatch):
    trained, held = _trained_once(store)
    first = recorded(store, "run", catalog.checkpoint_version(store, "run"))
    assert set(first.names()) == held

    _add_batch(store, "a-large", 1500)  # 19.5% of the tokens trained on: resumed for 5 more steps
    read = _rows_read_by_training(monkeypatch)
    result = train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    assert result["resumed_from_step"] == 30 and result["steps"] == 30 + 1500 // SETTINGS.batch_size
    rebuilt = open_shuffled(store, "main")
    continued = set(named(rebuilt.index, np.concatenate(read)).names())
    assert len(continued) > 1000 and not continued & held  # 1,280 rows read, minus the held-out ones skipped
    assert same_rows(recorded(store, "run", catalog.checkpoint_version(store, "run")), first)
    version = catalog.checkpoint_version(store, "run")
    cfg = store.read_json(f"{store.path(catalog.checkpoint_name('run'), version)}/cfg.json")
    assert set(checkpoint_heldout(store, "run", version, cfg, rebuilt).names()) == held
    assert _figures(store)["heldout_tokens"] == SETTINGS.holdout_rows


def test_a_resumed_batch_of_held_out_rows_only_is_refilled_not_empty(store, monkeypatch):
    """A tiny batch (2 rows) on a rebuilt store, where the checkpoint's held-out rows (2,048 of them) lie
    anywhere: some batches hold nothing else. Each is refilled from the rows after it, so every step
    trains on 2 rows, none held out, and the run finishes (an empty batch was a NaN loss)."""
    tiny = TrainSettings(**{**SETTINGS.__dict__, "batch_size": 2, "token_budget": 2 * 30,
                            "checkpoint_every_tokens": 2 * 10, "holdout_rows": 2048})
    make_shuffled(store)
    train_sae(store, "main", "run", tiny, log=lambda m: None)
    _add_batch(store, "a-small", 300)  # 150 more steps of 2 rows, resumed from step 30
    rebuilt = open_shuffled(store, "main")
    held = recorded(store, "run", catalog.checkpoint_version(store, "run")).global_ids(rebuilt.index)
    ids = np.concatenate([ids for ids, _ in rebuilt.blocks(2 * 30, 2 * 180)]).reshape(-1, 2)
    assert np.isin(ids, held).all(1).any(), "the test needs a batch of held-out rows only"
    read = _rows_read_by_training(monkeypatch)
    result = train_sae(store, "main", "run", tiny, log=lambda m: None)
    assert result["resumed_from_step"] == 30 and result["steps"] == 180
    assert [len(batch) for batch in read] == [2] * 150 and not np.isin(np.concatenate(read), held).any()


def test_batch_rows_refill_from_the_rows_after_and_refuse_when_too_few_remain(store):
    from sae_platform.heldout import batch_rows

    make_shuffled(store)
    shuffled = open_shuffled(store, "main")
    first = np.concatenate([ids for ids, _ in shuffled.blocks(0, 9)])
    ids, acts = batch_rows(shuffled, 0, 4, exclude=first[:5], wrap=100)  # rows 0-3 held out, and row 4
    assert ids.tolist() == first[5:9].tolist() and acts.shape == (4, shuffled.d_model)
    tail_ids = np.concatenate([ids for ids, _ in shuffled.blocks(98, 100)])
    wrapped, _ = batch_rows(shuffled, 98, 100, exclude=tail_ids[:1], wrap=100)  # row 98 out: row 0 refills
    assert wrapped.tolist() == [tail_ids[1], first[0]]
    halves = [batch_rows(shuffled, 0, 4, exclude=first[:1], wrap=100, part=(r, 2))[0] for r in range(2)]
    assert np.concatenate(halves).tolist() == first[1:5].tolist()  # two replicas split one process's batch
    everything = np.concatenate([ids for ids, _ in shuffled.blocks(0, 100)])
    with pytest.raises(StorageError, match="fewer than one batch"):
        batch_rows(shuffled, 0, 4, exclude=everything[:98], wrap=100)


def test_a_checkpoint_without_recorded_held_out_rows_is_refused_on_a_rebuilt_store(store):
    make_shuffled(store)
    shuffled = open_shuffled(store, "main")
    cfg = {"data": {"plan_id": "an-older-plan"}, "training": {"holdout_rows": 512}}
    with pytest.raises(StorageError, match="(?s)before checkpoints recorded their held-out rows.*retrain it"):
        checkpoint_heldout(store, "old", "v-before", cfg, shuffled)
    same_store = {**cfg, "data": {"plan_id": shuffled.index["plan_id"]}}  # its own store: its last rows
    assert len(checkpoint_heldout(store, "old", "v-before", same_store, shuffled)) == 512

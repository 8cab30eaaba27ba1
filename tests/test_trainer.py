"""The training loop: kill-and-resume reaches the same weights, bad data stops it cleanly."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sae_platform import catalog, shuffle
from sae_platform.shuffled import iter_shuffled, open_shuffled
from sae_platform.trainer import (
    TrainingError,
    TrainSettings,
    checkpoint_name,
    load_sae,
    train_sae,
)

SETTINGS = TrainSettings(variant="topk", n_latents=64, k=4, batch_size=256, token_budget=256 * 30,
                         checkpoint_every_tokens=256 * 10, holdout_rows=512, log_every_steps=5,
                         dead_after_tokens=256 * 8)
# the lr rises over 4 steps, then falls linearly to 0 after the 30th: a kill mid-run resumes on the same lrs
DECAYING = TrainSettings(**{**SETTINGS.__dict__, "lr_schedule": "linear_decay", "lr_warmup_tokens": 256 * 4})


def make_shuffled(store, n_partitions=3, rows=1500, d_model=16, nan_row=None, first=0, attrs=None):
    """Synthetic activations (sparse combinations of a hidden dictionary) in partitions p<first>, …,
    cached beside those already stored, then every cached partition shuffled; ``attrs``: more
    attributes of each partition's store (e.g. its hook_name)."""
    rng = np.random.default_rng(first)
    dictionary = np.random.default_rng(0).standard_normal((48, d_model)).astype(np.float32)
    if first == 0:
        rng.standard_normal((48, d_model))  # the dictionary's draws: the same data as before ``first`` existed
    for p in range(first, first + n_partitions):
        codes = rng.random((rows, 48)) * (rng.random((rows, 48)) < 0.08)
        acts = (codes @ dictionary + 0.05 * rng.standard_normal((rows, d_model))).astype(np.float32)
        if nan_row is not None and p == 0:
            acts[nan_row] = np.nan
        with store.writing(f"activations/p{p}") as version:
            group = store.open_group(f"{version}/data.zarr", "w")
            group.create_array("acts", data=acts, chunks=(512, d_model), compressors=None)
            group.attrs.update({"d_model": d_model, "dtype": "float32", "n_rows": rows, **(attrs or {})})
    shuffle.run_shuffle(store, "main", n_buckets=4, memory_budget_bytes=1 << 20, n_jobs=2, seed=0)
    return store


def test_training_reduces_error_and_writes_a_loadable_checkpoint(store):
    make_shuffled(store)
    result = train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    first, last = result["history"][0], result["history"][-1]
    assert result["steps"] == 30 and last["tokens"] == 30 * 256
    assert last["nmse"] < 0.75 * first["nmse"]
    sae, cfg = load_sae(store, "run")
    assert cfg["final"] and cfg["data"]["plan_id"] == open_shuffled(store, "main").index["plan_id"]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    x = torch.from_numpy(next(iter_shuffled(store, "main", 64))[1])
    assert (sae.encode(x).values > 0).sum(1).max() <= 4


@pytest.mark.parametrize("settings", [SETTINGS, DECAYING], ids=["constant_lr", "warmup_and_linear_decay"])
def test_killed_run_resumes_to_bitwise_identical_weights(store, tmp_path, settings):
    make_shuffled(store)
    uninterrupted = train_sae(store, "main", "whole", settings, log=lambda m: None)
    script = tmp_path / "train_and_die.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from sae_platform.storage import ArtifactStore
        from sae_platform.trainer import TrainSettings, train_sae
        settings = TrainSettings(**{settings.__dict__!r})
        def die(row):
            if row["step"] >= 25:  # after the checkpoint at step 20, mid-way to the next
                os.kill(os.getpid(), signal.SIGKILL)
        train_sae(ArtifactStore({store.root_url!r}), "main", "killed", settings, log=print, on_metrics=die)
    """))
    killed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    pointer = store.pointer(checkpoint_name("killed"))
    assert pointer["step"] == 20 and not pointer["final"]
    logs = []
    resumed = train_sae(store, "main", "killed", settings, log=logs.append)
    assert resumed["resumed_from_step"] == 20 and any("resuming" in m for m in logs)
    a, _ = load_sae(store, "whole")
    b, _ = load_sae(store, "killed")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), f"{name} differs after resume"
    def curve(history):
        return [{k: v for k, v in row.items() if k != "tokens_per_second"} for row in history]

    assert curve(resumed["history"]) == curve(uninterrupted["history"])


def count_inits(monkeypatch) -> dict[str, list]:
    """Record every init an SAE draws (``unit_rows``: the dictionary's rows, by latent range) and every
    calibration (``calibrate_``: input scale and b_pre from a data sample) from now on."""
    from sae_platform.sae import base

    seen = {"drawn": [], "calibrated": []}
    draw, calibrate = base.unit_rows, base.SparseAutoencoder.calibrate_

    def drawing(seed, rows, *args, **kwargs):
        seen["drawn"].append(rows)
        return draw(seed, rows, *args, **kwargs)

    def calibrating(self, *args, **kwargs):
        seen["calibrated"].append(type(self).__name__)
        return calibrate(self, *args, **kwargs)

    monkeypatch.setattr(base, "unit_rows", drawing)
    monkeypatch.setattr(base.SparseAutoencoder, "calibrate_", calibrating)
    return seen


def _stop_after_checkpoint(row):
    if row["step"] >= 25:  # the checkpoint at step 20 is committed
        raise KeyboardInterrupt


def test_a_resume_draws_no_init_and_calibrates_nothing_yet_ends_bit_identical(store, monkeypatch):
    """A resume builds its SAE on the meta device and takes the checkpoint's tensors as its parameters
    (as load_sae does): the random init and the calibration only a fresh SAE needs (at 2^20 latents:
    seconds of RNG and a second multi-GB copy) never run, and the run still ends bit for bit where an
    uninterrupted one does; so does a finished SAE going on over its grown store."""
    make_shuffled(store)
    uninterrupted = train_sae(store, "main", "whole", SETTINGS, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        train_sae(store, "main", "killed", SETTINGS, log=lambda m: None, on_metrics=_stop_after_checkpoint)
    seen = count_inits(monkeypatch)
    logs = []
    resumed = train_sae(store, "main", "killed", SETTINGS, log=logs.append)
    assert resumed["resumed_from_step"] == 20 and any("resuming" in m for m in logs), logs
    assert seen == {"drawn": [], "calibrated": []}
    a, _ = load_sae(store, "whole")
    b, _ = load_sae(store, "killed")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), f"{name} differs after resume"
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in uninterrupted["history"]]
    make_shuffled(store, n_partitions=1, first=3)  # the finished SAE goes on over the new batch
    grown = train_sae(store, "main", "killed", SETTINGS, log=logs.append)
    assert grown["resumed_from_step"] == 30 < grown["steps"] and seen == {"drawn": [], "calibrated": []}, logs
    restarted = train_sae(store, "main", "fresh", SETTINGS, log=lambda m: None)  # the counting sees a fresh SAE
    assert restarted["resumed_from_step"] == 0 and seen["drawn"] == [range(0, 64)] and seen["calibrated"]


def test_finished_run_is_not_retrained_but_changed_settings_are(store):
    make_shuffled(store)
    train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    version = store.pointer(checkpoint_name("run"))["version"]
    logs = []
    train_sae(store, "main", "run", SETTINGS, log=logs.append)
    assert store.pointer(checkpoint_name("run"))["version"] == version and "already trained" in logs[0]
    changed = TrainSettings(**{**SETTINGS.__dict__, "k": 8})
    train_sae(store, "main", "run", changed, log=logs.append)
    assert store.pointer(checkpoint_name("run"))["settings"]["k"] == 8


def tensor_reads(monkeypatch, block_bytes: int | None = None, hashed: list | None = None) -> list[tuple[str, int]]:
    """Record (file, bytes) of every read of tensor bytes from a checkpoint's safetensors files from now
    on (``checkpoint_files``: headers aside); every other way to load one fails. ``block_bytes``: what
    the "already finished" check holds of a weight at a time. ``hashed``: gets (file, bytes) of each pass
    that hashes a file as recorded and copies its tensors out of the blocks it hashes (a whole file read)."""
    import safetensors.torch

    from sae_platform import checkpoint_files, checksums, sharded_checkpoint

    reads, read_into, digest_file = [], checkpoint_files._read_into, checksums.digest_file

    def recording(store, path, file, handle, offset, target):
        reads.append((file, target.numel()))
        return read_into(store, path, file, handle, offset, target)

    def hashing(fs, path, progress=None, consume=None):
        if hashed is not None and isinstance(consume, sharded_checkpoint.Copier):
            hashed.append((path.rsplit("/", 1)[-1], fs.size(path)))
        return digest_file(fs, path, progress, consume)

    monkeypatch.setattr(checksums, "digest_file", hashing)

    def refused(*args, **kwargs):
        raise AssertionError("a checkpoint file was loaded another way")

    monkeypatch.setattr(checkpoint_files, "_read_into", recording)
    monkeypatch.setattr(safetensors.torch, "load", refused)
    monkeypatch.setattr(sharded_checkpoint, "safe_open", refused)
    if block_bytes is not None:
        monkeypatch.setattr(checkpoint_files, "KEPT_BLOCK_BYTES", block_bytes)
    return reads


def assert_finished_summary(found: dict, trained: dict, renamed: tuple[str, ...] = ()) -> None:
    """``found`` (the "already trained" exit's summary) is what that exit always returned: the finished
    run's figures and history (``trained``: its training's summary), resumed from its last step, no
    throughput; keys in ``renamed`` (another SAE's copy: run, path) aside."""
    assert set(found) == set(trained)
    for key in set(trained) - {"seconds", "tokens_per_second", "resumed_from_step", "peak_memory_bytes_per_rank",
                               *renamed}:
        assert found[key] == trained[key], key
    assert found["resumed_from_step"] == trained["steps"] and math.isnan(found["tokens_per_second"])


def test_the_already_trained_exit_reads_only_json_and_the_weights_block_by_block(store, monkeypatch):
    """Every refresh finds the SAE trained again: the exit read every tensor whole and Adam's state
    (the 2^20-latent run's 2 x 7.26 GB of shards) to return a few numbers. It reads the checkpoint's
    JSON, and the weights only to check them finite, one block at a time (256 bytes here), NaN in
    the last block still refused."""
    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    from sae_platform.errors import StorageError

    make_shuffled(store)
    trained = train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    path = store.resolve(checkpoint_name("run"))
    weights = load_st(store.fs.cat_file(f"{path}/sae_weights.safetensors"))
    reads, logs = tensor_reads(monkeypatch, block_bytes=256), []
    assert_finished_summary(train_sae(store, "main", "run", SETTINGS, log=logs.append), trained)
    assert "already trained" in logs[0]
    assert {file for file, _ in reads} == {"sae_weights.safetensors"} and max(n for _, n in reads) <= 256
    assert sum(n for _, n in reads) == sum(t.nbytes for t in weights.values())
    weights["W_dec"][-1, -1] = float("nan")
    store.fs.pipe_file(f"{path}/sae_weights.safetensors", save_st(weights))
    with pytest.raises(StorageError, match=r"holds NaN/inf in W_dec \(sae_weights.safetensors\)"):
        train_sae(store, "main", "run", SETTINGS, log=lambda m: None)


def test_a_resume_reads_each_tensor_once_into_the_memory_it_trains_in_and_ends_bit_identical(store, monkeypatch):
    """An unsharded resume read each file whole as bytes, copied every tensor out of them and copied it
    again to align it (~11 s and 3 GiB at 2^17 latents). Each file is read once, in the pass that hashes
    it as its writer recorded, its tensors copied from those blocks into memory the run trains in (nothing
    copied after; one without checksums is read straight into it: the indexed-layout test below), and it
    ends where an uninterrupted run does."""
    from sae_platform import trainer

    make_shuffled(store)
    uninterrupted = train_sae(store, "main", "whole", SETTINGS, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        train_sae(store, "main", "killed", SETTINGS, log=lambda m: None, on_metrics=_stop_after_checkpoint)
    path = store.resolve(checkpoint_name("killed"))
    sizes = {file: store.fs.size(f"{path}/{file}")
             for file in ("sae_weights.safetensors", "optimizer.safetensors", "trainer_state.safetensors")}
    hashed, copied, owned = [], [], trainer._owned
    reads = tensor_reads(monkeypatch, hashed=hashed)

    def watching(tensors, device):
        before = {name: tensor.data_ptr() for name, tensor in tensors.items()}
        kept = owned(tensors, device)
        copied.extend(name for name, tensor in kept.items() if tensor.data_ptr() != before[name])
        return kept

    monkeypatch.setattr(trainer, "_owned", watching)
    resumed = train_sae(store, "main", "killed", SETTINGS, log=lambda m: None)
    assert resumed["resumed_from_step"] == 20 and copied == []
    assert reads == [] and sorted(hashed) == sorted(sizes.items())  # each file once, whole, hashed
    a, _ = load_sae(store, "whole")
    b, _ = load_sae(store, "killed")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), f"{name} differs after resume"
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in uninterrupted["history"]]


def test_on_s3_a_resume_and_the_already_trained_exit_read_the_checkpoint_by_range(s3, s3_endpoint):
    """The same reads (tensors into their memory, the weights block by block) on a real S3 server."""
    from sae_platform.storage import ArtifactStore

    store = ArtifactStore(f"s3://{s3[1]}/root", {"endpoint_url": s3_endpoint})
    make_shuffled(store, n_partitions=2)
    short = TrainSettings(**{**SETTINGS.__dict__, "token_budget": 256 * 12, "checkpoint_every_tokens": 256 * 5})
    with pytest.raises(KeyboardInterrupt):  # at step 10, before its checkpoint: the one at step 5 is committed
        train_sae(store, "main", "run", short, log=lambda m: None,
                  on_metrics=lambda row: _stop_after_checkpoint({"step": 25 if row["step"] >= 10 else 0}))
    resumed = train_sae(store, "main", "run", short, log=lambda m: None)
    logs = []
    assert_finished_summary(train_sae(store, "main", "run", short, log=logs.append), resumed)
    assert resumed["resumed_from_step"] == 5 and "already trained" in logs[0]
    assert torch.isfinite(load_sae(store, "run")[0].W_dec).all()


def test_a_grown_store_resumes_the_finished_sae_with_the_added_budget_unless_its_settings_changed(store):
    """Above the refresh threshold the SAE is retrained by going on from its finished checkpoint:
    the step continues from the checkpoint's, for the new tokens' steps (weights, Adam state and
    dead-latent counters loaded), at the same constant lr; changed settings train from scratch and
    say why; a re-cached batch (data changed, not grown) too."""
    make_shuffled(store)
    train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    finished = store.pointer(checkpoint_name("run"))
    make_shuffled(store, n_partitions=1, first=3)           # p3: 1,500 new rows, 19.5% of 7,680 trained tokens
    logs, rows = [], []
    resumed = train_sae(store, "main", "run", SETTINGS, log=logs.append, on_metrics=rows.append)
    grown = store.pointer(checkpoint_name("run"))
    added = 1500 // SETTINGS.batch_size
    assert rows and all(row["step"] <= row["n_steps"] == 30 + added for row in rows)  # progress: not "step 35/30"
    assert resumed["resumed_from_step"] == finished["step"] == 30 and grown["step"] == 30 + added, logs
    assert grown["final"] and grown["tokens"] == finished["tokens"] + added * SETTINGS.batch_size
    assert any(f"resume from step 30 for {added} more step(s)" in m and "1,500 new tokens (batches p3)" in m
               for m in logs), logs
    assert grown["settings"] == finished["settings"] and "p3" in {b["key"] for b in grown["trained_batches"]}
    assert resumed["history"][0]["step"] < 30 < resumed["history"][-1]["step"]  # the curves go on from the first's
    logs.clear()
    assert train_sae(store, "main", "run", SETTINGS, log=logs.append)["steps"] == 30 + added
    assert "already trained" in logs[0]                     # finished on the grown store: nothing more

    make_shuffled(store, n_partitions=1, first=4)
    wider = TrainSettings(**{**SETTINGS.__dict__, "n_latents": 96})
    logs.clear()
    retrained = train_sae(store, "main", "run", wider, log=logs.append)
    assert retrained["resumed_from_step"] == 0 and retrained["steps"] == 30, logs
    assert any("from scratch" in m and "settings changed" in m and "n_latents 64 → 96" in m for m in logs), logs


def test_nan_activation_stops_training_and_keeps_the_last_checkpoint(store):
    make_shuffled(store, nan_row=7)  # global row id 7
    every_step = TrainSettings(**{**SETTINGS.__dict__, "checkpoint_every_tokens": 256, "token_budget": 256 * 20})
    with pytest.raises(TrainingError) as error:
        train_sae(store, "main", "run", every_step, log=lambda m: None)
    message = str(error.value)
    assert "global row id 7" in message and "How to fix" in message
    pointer = store.pointer(checkpoint_name("run"))
    if pointer is not None:  # the NaN row may fall in the very first batch: then nothing was committed
        sae, cfg = load_sae(store, "run")
        assert not cfg["final"] and all(torch.isfinite(t).all() for t in sae.state_dict().values())


def test_budget_beyond_the_data_loops_over_epochs(store):
    make_shuffled(store)
    logs = []
    long = TrainSettings(**{**SETTINGS.__dict__, "token_budget": 256 * 40})
    result = train_sae(store, "main", "run", long, log=logs.append)
    assert result["steps"] == 40 and "2.67 epochs" in logs[0]


def test_batch_larger_than_the_training_rows(store):
    make_shuffled(store, n_partitions=1, rows=600)
    with pytest.raises(Exception, match="fewer than one batch of 256"):
        train_sae(store, "main", "run", SETTINGS, log=lambda m: None)


def test_k_larger_than_n_latents(store):
    make_shuffled(store)
    with pytest.raises(Exception, match="k"):
        train_sae(store, "main", "run", TrainSettings(**{**SETTINGS.__dict__, "k": 128}), log=lambda m: None)
    assert store.pointer(checkpoint_name("run")) is None


# -- nothing read from a checkpoint can run code (issue 13.1) ----------------------------------

class _Plant:
    """A pickle that, when loaded by the full unpickler, creates a file (as an attacker's would)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(marker) -> bytes:
    import io
    import pickle

    buffer = io.BytesIO()
    pickle.dump({"step": 1, "payload": _Plant(marker)}, buffer)
    return buffer.getvalue()


def test_checkpoint_holds_no_pickle(store):
    make_shuffled(store)
    train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    path = store.resolve(checkpoint_name("run"))
    names = {p.rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False)}
    assert names >= {"sae_weights.safetensors", "cfg.json", "optimizer.safetensors", "optimizer.json",
                     "trainer_state.safetensors", "trainer_state.json"}
    assert not {n for n in names if n.endswith((".pt", ".pkl", ".bin"))}


@pytest.mark.parametrize("file", ["trainer_state.safetensors", "optimizer.safetensors", "sae_weights.safetensors"])
def test_crafted_pickle_in_a_checkpoint_is_refused(store, tmp_path, file):
    """Overwriting a committed checkpoint's file with a pickle: the re-run refuses it, runs nothing.
    The writer's checksums catch the swap first (the file is damaged); without checksums (a
    checkpoint committed before they existed) the file itself is refused as a pickle."""
    make_shuffled(store)
    every = TrainSettings(**{**SETTINGS.__dict__, "checkpoint_every_tokens": 256 * 10})
    assert train_sae(store, "main", "run", every, log=lambda m: None)["steps"] == 30
    marker = tmp_path / "pwned"
    path = store.resolve(checkpoint_name("run"))
    store.fs.pipe_file(f"{path}/{file}", _pickle_bytes(marker))
    with pytest.raises(Exception) as error:
        train_sae(store, "main", "run", every, log=lambda m: None)
    assert not marker.exists(), "the pickle ran"
    message = str(error.value)
    assert file in message and "damaged" in message and "How to fix" in message
    _as_committed_before_checksums(store, checkpoint_name("run"))
    with pytest.raises(Exception) as error:
        train_sae(store, "main", "run", every, log=lambda m: None)
    assert not marker.exists(), "the pickle ran"
    message = str(error.value)
    assert file in message and "refused" in message and "How to fix" in message


def test_legacy_pickled_trainer_state_is_read_safely_or_refused(store, tmp_path):
    """A checkpoint of an earlier version (optimizer.pt / trainer_state.pt): plain tensors load with
    torch's restricted unpickler and training resumes; a crafted pickle is refused and never run."""
    import io

    make_shuffled(store)
    first = TrainSettings(**{**SETTINGS.__dict__, "checkpoint_every_tokens": 256 * 10})
    train_sae(store, "main", "run", first, log=lambda m: None)
    path = store.resolve(checkpoint_name("run"))
    from safetensors.torch import load as load_st

    # rewrite it in the old layout: optimizer.pt and trainer_state.pt (plain tensors and containers)
    meta = json_load(store, f"{path}/trainer_state.json")
    tensors = load_st(store.fs.cat_file(f"{path}/trainer_state.safetensors"))
    opt_meta = json_load(store, f"{path}/optimizer.json")
    opt = load_st(store.fs.cat_file(f"{path}/optimizer.safetensors"))
    index = {name: i for i, name in enumerate(_parameter_order(first))}
    state = {}
    for name, value in opt.items():  # adam.<parameter>.<key>: torch's state_dict is keyed by parameter index
        param, _, k = name.removeprefix("adam.").rpartition(".")
        state.setdefault(index[param], {})[k] = value
    for name in ("trainer_state.json", "trainer_state.safetensors", "optimizer.json", "optimizer.safetensors"):
        store.fs.rm_file(f"{path}/{name}")
    for name, obj in (("trainer_state.pt", {**meta, **tensors}),
                      ("optimizer.pt", {"state": state, "param_groups": opt_meta["param_groups"]})):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        store.fs.pipe_file(f"{path}/{name}", buffer.getvalue())
    _as_committed_before_checksums(store, checkpoint_name("run"))
    logs = []          # the same settings again: the finished run is found (its state read back safely)
    train_sae(store, "main", "run", first, log=logs.append)
    assert "already trained" in logs[0]
    marker = tmp_path / "pwned"
    store.fs.pipe_file(f"{path}/trainer_state.pt", _pickle_bytes(marker))
    with pytest.raises(Exception) as error:
        train_sae(store, "main", "run", first, log=lambda m: None)
    assert not marker.exists(), "the pickle ran"
    assert "trainer_state.pt" in str(error.value) and "refused" in str(error.value)


def _parameter_order(settings: TrainSettings) -> list[str]:
    """The parameter name of each optimizer index of a training with ``settings`` (d_model 16)."""
    from sae_platform.sae import build_sae
    from sae_platform.sharded_checkpoint import parameter_names
    from sae_platform.trainer import _optimizer

    sae = build_sae(settings.variant, 16, settings.n_latents, **settings.sae_kwargs())
    return parameter_names(sae, _optimizer(sae, settings, torch.device("cpu")).param_groups)


def _adam_as_indexed(store, name: str, settings: TrainSettings) -> None:
    """Rewrite the committed checkpoint ``name``'s Adam files in the layout one process wrote before Adam's
    state was named by parameter: tensors ``state.<index>.<key>``, optimizer.json's ``state`` by index."""
    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    path, order = store.resolve(checkpoint_name(name)), _parameter_order(settings)
    tensors = load_st(store.fs.cat_file(f"{path}/optimizer.safetensors"))
    meta = json_load(store, f"{path}/optimizer.json")
    indexed = {}
    for stored, value in tensors.items():
        param, _, key = stored.removeprefix("adam.").rpartition(".")
        indexed[f"state.{order.index(param)}.{key}"] = value
    plain = {str(order.index(param)): entries for param, entries in meta["state_by_name"].items()}
    store.fs.pipe_file(f"{path}/optimizer.safetensors", save_st(indexed))
    old_meta = {"param_groups": meta["param_groups"], "state": plain}
    store.fs.pipe_file(f"{path}/optimizer.json", json.dumps(old_meta).encode())
    _as_committed_before_checksums(store, checkpoint_name(name))


def test_adam_state_is_named_by_parameter_and_a_checkpoint_of_the_indexed_layout_still_resumes(store):
    """One rule for Adam's files (sharded_checkpoint.adam_tensors): an unsharded checkpoint names them as a
    sharded one does (adam.<parameter>.<key>); one written before (state.<index>.<key>) is renamed when read
    (stored_adam_state) and resumes to the same weights, bit for bit, as the uninterrupted run."""
    from safetensors.torch import load as load_st

    make_shuffled(store)
    uninterrupted = train_sae(store, "main", "whole", SETTINGS, log=lambda m: None)

    def stop_after_checkpoint(row):
        if row["step"] >= 25:  # the checkpoint at step 20 is committed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(store, "main", "old", SETTINGS, log=lambda m: None, on_metrics=stop_after_checkpoint)
    path = store.resolve(checkpoint_name("old"))
    named = set(load_st(store.fs.cat_file(f"{path}/optimizer.safetensors")))
    assert named == {f"adam.{p}.{k}" for p in _parameter_order(SETTINGS) for k in ("exp_avg", "exp_avg_sq", "step")}
    _adam_as_indexed(store, "old", SETTINGS)
    logs = []
    resumed = train_sae(store, "main", "old", SETTINGS, log=logs.append)
    assert resumed["resumed_from_step"] == 20 and not any("afresh" in m for m in logs), logs
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in uninterrupted["history"]]
    a, _ = load_sae(store, "whole")
    b, _ = load_sae(store, "old")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), f"{name} differs after resuming the indexed layout"
    path = store.resolve(checkpoint_name("old"))  # the checkpoint it commits is in the named layout
    assert set(load_st(store.fs.cat_file(f"{path}/optimizer.safetensors"))) == named


def _as_committed_before_checksums(store, name):
    """The checkpoint as that earlier version committed it: no CHECKSUMS.json, none in the pointer."""
    from sae_platform.catalog import CHECKSUMS
    from sae_platform.storage import POINTER

    store.fs.rm_file(f"{store.resolve(name)}/{CHECKSUMS}")
    pointer = store.pointer(name)
    del pointer["checksums"]
    store.write_json(store.path(name, POINTER), pointer)


def json_load(store, path):
    import json

    return json.loads(store.fs.cat_file(path))


# -- non-finite weights are never committed (issue 13.5) ---------------------------------------

def _diverging(settings: TrainSettings) -> TrainSettings:
    """Settings whose training overflows to inf at once. Validation refuses lr = 1e39 where it is
    declared (test_settings.py); the trainer's own finite check must hold even so (an overflow can
    come from the data or float16 too), so this bypasses the validation on purpose."""
    object.__setattr__(settings, "lr", 1e39)
    return settings


def test_diverged_weights_are_not_committed_and_the_message_is_true(store):
    make_shuffled(store)
    good = TrainSettings(**{**SETTINGS.__dict__, "token_budget": 256 * 10, "checkpoint_every_tokens": 256 * 10})
    train_sae(store, "main", "run", good, log=lambda m: None)
    before = store.pointer(checkpoint_name("run"))
    files_before = {p: store.fs.cat_file(p) for p in store.fs.find(store.resolve(checkpoint_name("run")))}
    huge = _diverging(TrainSettings(**{**SETTINGS.__dict__, "token_budget": 256 * 2, "checkpoint_every_tokens": 256}))
    with pytest.raises(TrainingError) as error:
        train_sae(store, "main", "run", huge, log=lambda m: None)
    message = str(error.value)
    assert "NaN/inf" in message and "not committed" in message or "loss became" in message
    assert f"version {before['version']}" in message and "starts afresh" in message
    assert store.pointer(checkpoint_name("run")) == before          # the last good checkpoint ...
    after = {p: store.fs.cat_file(p) for p in store.fs.find(store.resolve(checkpoint_name("run")))}
    assert after == files_before                                     # ... really untouched, byte for byte
    sae, _ = load_sae(store, "run")
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values())
    # the same run again fails again, from the good state: nothing garbage to resume from
    with pytest.raises(TrainingError):
        train_sae(store, "main", "run", huge, log=lambda m: None)
    assert store.pointer(checkpoint_name("run")) == before


def test_diverged_first_checkpoint_says_nothing_was_committed(store):
    make_shuffled(store)
    huge = _diverging(TrainSettings(**{**SETTINGS.__dict__, "token_budget": 256 * 1}))
    with pytest.raises(TrainingError) as error:
        train_sae(store, "main", "fresh", huge, log=lambda m: None)
    assert "no checkpoint of 'fresh' was committed" in str(error.value)
    assert store.pointer(checkpoint_name("fresh")) is None


def test_a_non_finite_checkpoint_of_an_earlier_version_is_not_resumed(store):
    make_shuffled(store)
    every = TrainSettings(**{**SETTINGS.__dict__, "checkpoint_every_tokens": 256 * 10})
    train_sae(store, "main", "run", every, log=lambda m: None)
    path = store.resolve(checkpoint_name("run"))
    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    weights = load_st(store.fs.cat_file(f"{path}/sae_weights.safetensors"))
    weights["W_dec"][0, 0] = float("nan")
    store.fs.pipe_file(f"{path}/sae_weights.safetensors", save_st(weights))
    with pytest.raises(Exception, match="holds NaN/inf in W_dec.*not resumed from"):
        train_sae(store, "main", "run", every, log=lambda m: None)


def _poison(store, sae_name, tensor="W_enc"):
    """The committed checkpoint again, its weights holding NaN, as a version before the finite check
    committed it (its writer recorded those bytes: one whose bytes were changed since its commit is
    refused for that first, by every reader that reads them whole); returns its version's path."""
    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    from sae_platform.catalog import CHECKSUMS
    from sae_platform.storage import CHECKSUMS_FIELD

    name, old = checkpoint_name(sae_name), store.resolve(checkpoint_name(sae_name))
    fields = {k: v for k, v in store.pointer(name).items() if k not in ("version", "committed_at", CHECKSUMS_FIELD)}
    with store.writing(name, **fields) as version:
        for path in store.fs.find(old):
            rel, data = path[len(old.rstrip("/")) + 1:], store.fs.cat_file(path)
            if rel == "sae_weights.safetensors":
                weights = load_st(data)
                weights[tensor][0, 0] = float("nan")
                data = save_st(weights)
            if rel != CHECKSUMS and not rel.startswith("."):  # the writer records its own
                store.fs.pipe_file(f"{version}/{rel}", data)
    return store.resolve(name)


def test_a_non_finite_finished_checkpoint_is_refused_by_every_reader(store):
    """Issue 31.4: a finished checkpoint holding NaN was kept by the "already finished" skip (a re-run
    that exits 0) and loaded by evaluation, export and the feature tables (NaN metrics)."""
    from sae_platform.errors import StorageError
    from sae_platform.evaluate import evaluate_sae
    from sae_platform.export import export_run
    from sae_platform.trainer import finished_checkpoint

    make_shuffled(store)
    train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    assert finished_checkpoint(store, "main", "run", SETTINGS) is not None
    path = _poison(store, "run")
    readers = {"finished skip": lambda: finished_checkpoint(store, "main", "run", SETTINGS),
               "re-run": lambda: train_sae(store, "main", "run", SETTINGS, log=lambda m: None),
               "load_sae": lambda: load_sae(store, "run"),
               "evaluation": lambda: evaluate_sae(store, "main", "run", None, None, torch.device("cpu"),
                                                  ablation_tokens=0),
               "export": lambda: export_run(store, "run")}
    for what, read in readers.items():
        with pytest.raises(StorageError) as error:
            read()
        message = str(error.value)
        assert f"{store.url(path)} (step 30) holds NaN/inf in W_enc (sae_weights.safetensors)" in message, what
        assert "refused" in message and "delete that checkpoint" in message, what
    assert store.resolve(catalog.eval_name("run")) is None and store.resolve(catalog.export_name("run")) is None


def test_nan_in_held_out_rows_is_an_error_naming_the_row(store):
    from sae_platform.errors import StorageError
    from sae_platform.evaluate import heldout_activation_batches, reconstruction_metrics
    from sae_platform.heldout import tail
    from sae_platform.sae import build_sae

    make_shuffled(store, nan_row=7)  # row 7 of batch p0, wherever the shuffle put it
    shuffled = open_shuffled(store, "main")
    sae = build_sae("topk", 16, 64, k=4)
    with pytest.raises(StorageError) as error:  # every row held out
        reconstruction_metrics(sae, heldout_activation_batches(store, "main", tail(shuffled, shuffled.n_rows),
                                                               batch_rows=256))
    message = str(error.value)
    assert "held-out activations" in message and "row 7 of activation batch 'p0'" in message
    x = np.ones((10, 16), np.float32)
    x[3, 2] = np.inf
    with pytest.raises(Exception, match="row 3 of the rows evaluated"):
        reconstruction_metrics(sae, [x])


def test_ce_contexts_from_too_little_held_out_text(caplog):
    import logging

    from sae_platform.errors import SourceError
    from sae_platform.evaluate import heldout_ce_tokens

    short = [("data/holdout/tiny.txt", [[5, 6, 7] * 10])]                       # 30 tokens
    with pytest.raises(SourceError) as error:
        heldout_ce_tokens(short, ctx_len=128, n_contexts=32, start_token_id=0)
    message = str(error.value)
    assert "data/holdout/tiny.txt" in message and "ce_contexts: 0" in message and "30 tokens" in message
    some = [("data/holdout/some.txt", [list(range(1, 5 * 128))])]              # 5 contexts' worth
    with caplog.at_level(logging.WARNING):
        tokens = heldout_ce_tokens(some, ctx_len=128, n_contexts=32, start_token_id=0)
    assert tokens.shape == (4, 128) or tokens.shape == (5, 128)
    assert f"only {tokens.shape[0]} of the 32 contexts" in caplog.text and "some.txt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert heldout_ce_tokens(some, ctx_len=128, n_contexts=2, start_token_id=0).shape == (2, 128)
    assert not caplog.text


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip_transcoder"])
def test_a_transcoder_trains_on_paired_rows_cached_in_one_pass_and_is_evaluated_in_place_of_the_mlp(
        store, tiny_hooked, text_dir, skip):
    """ln2.hook_normalized -> hook_mlp_out pairs cached from one pass stay paired through the
    shuffle (each shuffled row is [input | output] of one token); the transcoder trains on them,
    is scored against the MLP output, spliced in place of the MLP for the CE, and exported with
    both hook names. A skip transcoder goes the same way, its W_skip trained, checkpointed and
    exported as SAELens's jumprelu_skip_transcoder."""
    import json

    from sae_platform.activations import CacheSettings, cache_text_file
    from sae_platform.corpus import list_source
    from sae_platform.evaluate import EvalSettings, evaluate_sae
    from sae_platform.export import export_run

    pair = "blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out"
    settings = CacheSettings(ctx_len=16, batch_size=8, dtype="float32", hook_points=[pair])
    for text_file in list_source(str(text_dir / "*")):
        cache_text_file(store, text_file, tiny_hooked, "tiny", settings)
    shuffle.run_shuffle(store, "main", n_buckets=2, memory_budget_bytes=1 << 20, n_jobs=1, seed=0)
    rows = next(iter_shuffled(store, "main", 4096))[1]
    assert rows.shape[1] == 64
    block = dict(tiny_hooked.model.model.layers[1].named_children())
    gain = block["post_attention_layernorm"].weight  # the input is normalized, before the norm's gain
    with torch.no_grad():  # still paired after the shuffle: the output is the MLP of the input
        np.testing.assert_allclose(block["mlp"](torch.from_numpy(rows[:, :32]) * gain).numpy(), rows[:, 32:],
                                   rtol=1e-4, atol=1e-5)

    train = TrainSettings(variant="batchtopk", n_latents=64, k=8, batch_size=128, token_budget=128 * 40, lr=3e-3,
                          checkpoint_every_tokens=128 * 40, holdout_rows=128, log_every_steps=10,
                          dead_after_tokens=128 * 10, hparams={"skip_connection": True} if skip else {})
    result = train_sae(store, "main", "tc", train, log=lambda m: None)
    assert result["history"][-1]["nmse"] < 0.8 * result["history"][0]["nmse"]
    sae, cfg = load_sae(store, "tc")
    assert sae.is_transcoder and sae.d_model == 32 and sae.d_out == 32 and cfg["sae"]["d_out"] == 32
    assert sae.skip_connection == skip and (not skip or float(sae.W_skip.abs().max()) > 0)  # trained off zero

    report, _ = evaluate_sae(store, "main", "tc", tiny_hooked, _heldout_tokens(tiny_hooked), torch.device("cpu"),
                             metric_tokens=_heldout_tokens(tiny_hooked, seed=1),
                             ablation_tokens=EvalSettings().ablation_tokens)
    assert report["hook_name"] == "blocks.1.hook_mlp_out"
    assert report["hook_name_in"] == "blocks.1.ln2.hook_normalized"
    _assert_feature_metrics_read(report, store, "tc", sae, tiny_hooked, "blocks.1.hook_mlp_out",
                                 "blocks.1.ln2.hook_normalized")
    assert 0 < report["fvu"] < 1 and report["ce_zero"] != report["ce_clean"]
    assert report["loss_recovered"] is not None and report["ce_n_spliced"] > 0

    exported = export_run(store, "tc")
    cfg_json = json.loads(store.fs.cat_file(exported["cfg_path"]))
    assert exported["architecture"] == ("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder")
    assert cfg_json["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert cfg_json["hook_name_out"] == "blocks.1.hook_mlp_out"


def _heldout_tokens(hooked, n=4, ctx_len=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, hooked.model.config.vocab_size, size=(n, ctx_len))
    tokens[:, 0] = hooked.start_token_id
    return tokens.astype(np.int32)


def _assert_feature_metrics_read(report, store, run, sae, hooked, hook_point, input_hook_point=None):
    """evaluate_sae's feature metrics came from the SAE's own hook point (sae_hook_entry, the same
    source the explanations and the live server use), not from the model's default layer."""
    from sae_platform.activations import activation_row_rule, sae_hook_entry
    from sae_platform.catalog import HookEntry, trained_on
    from sae_platform.metrics import heldout_codes, probe_metrics

    assert sae_hook_entry(store, run) == HookEntry(hook_point, input_hook_point)
    rule = activation_row_rule(store, trained_on(store, run), hooked.start_token_id)
    assert report["ablation_pairs"] > 0 and report["n2g_features_scored"] >= 0
    tokens = _heldout_tokens(hooked, seed=1)
    own = probe_metrics(heldout_codes(hooked, sae, tokens, hook_point=hook_point, input_hook_point=input_hook_point,
                                      rule=rule, keep_neurons=True), hooked.tokenizer, sae.n_latents)[0]
    assert report["probe_loss_neurons"] == pytest.approx(own["probe_loss_neurons"], rel=1e-6)
    assert report["probe_loss"] == pytest.approx(own["probe_loss"], rel=1e-6)
    if input_hook_point is None:  # an SAE of the default hook point would give other neurons
        default = probe_metrics(heldout_codes(hooked, sae, tokens, hook_point=hooked.hook_name, rule=rule,
                                              keep_neurons=True), hooked.tokenizer, sae.n_latents)[0]
        assert default["probe_loss_neurons"] != pytest.approx(own["probe_loss_neurons"], rel=1e-6)


def test_one_sae_per_hook_point_from_one_caching_pass(store, tiny_hooked, text_dir):
    """Two hook points cached in one pass; each entry has its own shuffled store
    (``hook_store_name``); an SAE trained on the second is evaluated by splicing at its own hook
    point and exported under that name."""
    import json

    from sae_platform.activations import CacheSettings, cache_text_file
    from sae_platform.corpus import list_source
    from sae_platform.evaluate import EvalSettings, evaluate_sae
    from sae_platform.export import export_run

    hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
    settings = CacheSettings(ctx_len=16, batch_size=8, dtype="float32", hook_points=hooks)
    for text_file in list_source(str(text_dir / "*")):
        cache_text_file(store, text_file, tiny_hooked, "tiny", settings)
    names = [catalog.hook_store_name("main", i) for i in range(2)]
    assert names == ["main", "main.h1"]
    for index, name in enumerate(names):
        shuffle.run_shuffle(store, name, n_buckets=2, memory_budget_bytes=1 << 20, n_jobs=1, seed=0,
                            store_index=index)
    a, b = (next(iter_shuffled(store, n, 4096))[1] for n in names)
    assert a.shape[1] == b.shape[1] == 32 and not np.allclose(a[:10], b[:10])
    train = TrainSettings(variant="topk", n_latents=64, k=4, batch_size=128, token_budget=128 * 10,
                          checkpoint_every_tokens=128 * 10, holdout_rows=128, dead_after_tokens=128 * 10)
    train_sae(store, "main.h1", "mlp0", train, log=lambda m: None)
    report, _ = evaluate_sae(store, "main.h1", "mlp0", tiny_hooked, _heldout_tokens(tiny_hooked), torch.device("cpu"),
                             metric_tokens=_heldout_tokens(tiny_hooked, seed=1),
                             ablation_tokens=EvalSettings().ablation_tokens)
    assert report["hook_name"] == "blocks.0.hook_mlp_out" and report["loss_recovered"] is not None
    _assert_feature_metrics_read(report, store, "mlp0", load_sae(store, "mlp0")[0], tiny_hooked,
                                 "blocks.0.hook_mlp_out")
    cfg = json.loads(store.fs.cat_file(export_run(store, "mlp0")["cfg_path"]))
    assert cfg["hook_name"] == "blocks.0.hook_mlp_out" and cfg["hook_layer"] == 0


@pytest.mark.parametrize("damage", ["cfg_missing_field", "cfg_truncated", "w_enc_wrong_shape"])
def test_a_damaged_checkpoint_names_the_file_and_the_fix(store, damage):
    """cfg.json without a field, truncated, or weights whose W_enc has another shape than cfg.json
    says: load_sae raises StorageError naming the file and the fix, not KeyError / RuntimeError."""
    import json

    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    from sae_platform.errors import StorageError

    make_shuffled(store)
    train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    path = store.resolve(checkpoint_name("run"))
    cfg = json.loads(store.fs.cat_file(f"{path}/cfg.json"))
    if damage == "cfg_missing_field":
        del cfg["sae"]["n_latents"]
        store.fs.pipe_file(f"{path}/cfg.json", json.dumps(cfg).encode())
        file = "cfg.json"
    elif damage == "cfg_truncated":
        store.fs.pipe_file(f"{path}/cfg.json", json.dumps(cfg).encode()[:40])
        file = "cfg.json"
    else:
        weights = load_st(store.fs.cat_file(f"{path}/sae_weights.safetensors"))
        weights["W_enc"] = weights["W_enc"][:, :-1].contiguous()
        store.fs.pipe_file(f"{path}/sae_weights.safetensors", save_st(weights))
        file = "sae_weights.safetensors"
    with pytest.raises(StorageError) as error:
        load_sae(store, "run")
    # found by the checksums recorded at commit (storage.check_intact), or, for a checkpoint written
    # before they were, when its cfg.json or weights are read
    assert path.rsplit("/", 1)[-1] in error.value.problem and file in error.value.problem
    assert "sae-platform train run" in error.value.fix and "delete" in error.value.fix


@pytest.mark.parametrize("n_latent_shards", [0, 2], ids=["plain", "sharded"])
def test_a_checkpoint_edited_in_place_is_refused_by_both_loaders_naming_the_file(store, n_latent_shards):
    """A committed checkpoint's weights file edited in place (the same size, a few bytes of W_dec
    flipped, every weight still finite): ``latent_slice.stored_sae`` refused a plain one for its sha256
    while ``load_sae`` loaded it (the store's check on every read compares sizes only). Both keep one
    rule (``sharded_checkpoint.as_recorded``): refused naming the file and the fix. Untouched, both load."""
    import struct

    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    from sae_platform import features
    from sae_platform import sharded_checkpoint as sc
    from sae_platform.errors import StorageError
    from sae_platform.latent_slice import stored_sae
    from sae_platform.sae import build_sae

    sae = build_sae("topk", 16, 64, k=4)
    weights = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
    if n_latent_shards:
        sc.save_sharded(store, checkpoint_name("run"), "topk", sc.LatentLayout(64, n_latent_shards),
                        {sc.SAE + k: v for k, v in weights.items()}, json_files={"cfg.json": {"sae": sae.config}})
        file, tensor = sc.shard_file(1, n_latent_shards), "sae.W_dec"
    else:
        with store.writing(checkpoint_name("run")) as version:
            store.fs.pipe_file(f"{version}/{sc.UNSHARDED_WEIGHTS}", save_st(weights))
            store.fs.pipe_file(f"{version}/cfg.json", json.dumps({"sae": sae.config}).encode())
        file, tensor = sc.UNSHARDED_WEIGHTS, "W_dec"
    loaded, _ = load_sae(store, "run")
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in weights.items())
    assert stored_sae(store, "run").fingerprint == features.sae_fingerprint(loaded)

    version_path = store.resolve(checkpoint_name("run"))
    data = bytearray(committed := store.fs.cat_file(f"{version_path}/{file}"))
    (length,) = struct.unpack("<Q", data[:8])
    begin = 8 + length + json.loads(data[8:8 + length])[tensor]["data_offsets"][0]
    for offset in range(begin, begin + 64, 4):  # the lowest mantissa byte of 16 float32 weights
        data[offset] ^= 0x5A
    store.fs.pipe_file(f"{version_path}/{file}", bytes(data))
    edited = load_st(bytes(data))[tensor]
    assert torch.isfinite(edited).all() and not torch.equal(edited, load_st(committed)[tensor])
    for loader in (lambda: load_sae(store, "run"), lambda: stored_sae(store, "run")):
        with pytest.raises(StorageError) as error:
            loader()
        problem = error.value.problem
        assert f"{store.url(version_path)}/{file} differs from the bytes recorded at its commit (sha256" in problem
        assert "sae-platform train run" in error.value.fix and "delete" in error.value.fix


def test_the_trainer_warns_when_jumprelu_thresholds_stop_moving(store):
    """Issue 31.6: thresholds frozen (their lr 0) leave the sparsity term without effect; the log says
    so once. The trainer builds Adam from the SAE's parameter groups, so threshold_lr_scale reaches it."""
    make_shuffled(store)
    logged = {}
    for scale in (0.0, None):
        hparams = {"target_l0": 2, "l0_coeff": 1.0, **({"threshold_lr_scale": scale} if scale is not None else {})}
        settings = TrainSettings(**{**SETTINGS.__dict__, "variant": "jumprelu", "hparams": hparams})
        lines = logged[scale] = []
        train_sae(store, "main", f"jump-{scale}", settings, log=lines.append)
    (warning,) = [line for line in logged[0.0] if line.startswith("warning:")]
    assert "thresholds stopped moving" in warning and "target_l0 2" in warning
    assert "threshold_lr_scale (now 0)" in warning
    assert not [line for line in logged[None] if line.startswith("warning:")], logged[None]
    frozen, _ = load_sae(store, "jump-0.0")
    moving, _ = load_sae(store, "jump-None")
    assert torch.equal(frozen.threshold, torch.full_like(frozen.threshold, frozen.hparams["init_threshold"]))
    assert not torch.equal(moving.threshold, torch.full_like(moving.threshold, moving.hparams["init_threshold"]))

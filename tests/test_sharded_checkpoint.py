"""Latent-sharded checkpoints (sae_platform/sharded_checkpoint.py): one safetensors file per shard
plus an index, committed through the store's protocol, read back under any layout from only the
overlapping shards, refused by name when half-written or changed, never a pickle."""

import dataclasses
import json
import struct
import threading
from pathlib import Path

import pytest
import torch

from sae_platform import sharded_checkpoint as sc
from sae_platform.catalog import checkpoint_name
from sae_platform.errors import PlatformError, StorageError
from sae_platform.latent_parallel import Layout
from sae_platform.sae import build_sae, with_weights
from sae_platform.sharded_checkpoint import LatentLayout
from sae_platform.trainer import TrainSettings, _load_state, _optimizer, load_sae, train_sae
from tests.test_trainer import SETTINGS, assert_finished_summary, count_inits, make_shuffled, tensor_reads

N_LATENTS, D_MODEL = 12, 8
D_SHUFFLED = 16  # the rows of test_trainer.make_shuffled
REPO = Path(__file__).resolve().parent.parent


def _trained(variant="topk", steps=3, **hparams):
    """A tiny SAE after a few Adam steps: (sae, optimizer, its checkpoint tensors, optimizer.json)."""
    torch.manual_seed(0)
    sae = build_sae(variant, D_MODEL, N_LATENTS, **({"k": 3} if variant == "topk" else {}), **hparams)
    optimizer = torch.optim.Adam(sae.param_groups(1e-2), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(32, D_MODEL)
        loss, _ = sae.loss(x, sae(x, dead_mask=torch.zeros(N_LATENTS, dtype=torch.bool)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tensors, meta = sc.training_tensors(sae, optimizer, torch.arange(N_LATENTS) * 7)
    return sae, optimizer, tensors, {**meta, "sae": sae.config}


def _save(store, tensors, meta, n_shards, variant="topk", name="run"):
    """``meta`` (from ``_trained``) also carries the SAE config, written as cfg.json."""
    return sc.save_sharded(store, checkpoint_name(name), variant, LatentLayout(N_LATENTS, n_shards), tensors,
                           {"optimizer.json": meta, "cfg.json": {"sae": meta["sae"], "step": 3}})


def _assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("variant", ["topk", "jumprelu"])
def test_each_shard_reads_back_as_written(store, variant):
    _, _, tensors, meta = _trained(variant)
    _save(store, tensors, meta, 2, variant)
    layout = LatentLayout(N_LATENTS, 2)
    for shard in range(2):
        _assert_same(sc.read_shard(store, "run", layout, shard), sc.shard_slice(tensors, variant, layout, shard))
    index = json.loads(store.fs.cat_file(f"{store.resolve(checkpoint_name('run'))}/{sc.INDEX}"))
    assert index["layout"] == {"n_latents": N_LATENTS, "n_shards": 2}
    assert index["tensors"]["sae.W_dec"] == {"dtype": "F32", "shape": [N_LATENTS, D_MODEL], "axis": 0}
    assert index["tensors"]["sae.b_pre"]["axis"] is None
    # JumpReLU's threshold is per latent; BatchTopK's (a scalar of the same name) would be replicated
    assert (index["tensors"].get("sae.threshold", {}).get("axis") == 0) == (variant == "jumprelu")


@pytest.mark.parametrize("written,read", [(2, 1), (1, 4), (4, 2), (3, 4)])
def test_a_checkpoint_reads_back_under_another_layout_with_its_adam_state(store, written, read):
    sae, optimizer, tensors, meta = _trained("jumprelu")
    _save(store, tensors, meta, written, "jumprelu")
    layout = LatentLayout(N_LATENTS, read)
    for shard in range(read):
        _assert_same(sc.read_shard(store, "run", layout, shard), sc.shard_slice(tensors, "jumprelu", layout, shard))
    # gathered into one process, the training goes on exactly as it would have
    gathered = sc.gathered_state(store, "run")
    fresh = with_weights(build_sae("jumprelu", D_MODEL, N_LATENTS, device="meta"), sc.sae_state(gathered))
    fresh_optimizer = torch.optim.Adam(fresh.param_groups(1e-2), lr=1e-2)
    counters = sc.restore_training(fresh, fresh_optimizer, gathered, meta)
    assert torch.equal(counters, torch.arange(N_LATENTS) * 7)
    x = torch.randn(32, D_MODEL)
    for model, opt in ((sae, optimizer), (fresh, fresh_optimizer)):
        loss, _ = model.loss(x, model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _assert_same(fresh.state_dict(), sae.state_dict())


def test_a_shard_is_assembled_from_only_the_overlapping_source_shards(store, monkeypatch):
    _, _, tensors, meta = _trained()
    _save(store, tensors, meta, 4)
    opened = []
    real = sc._opened

    def recording(checkpoint, file, **kwargs):
        opened.append(file)
        return real(checkpoint, file, **kwargs)

    monkeypatch.setattr(sc, "_opened", recording)
    sc.read_shard(store, "run", LatentLayout(N_LATENTS, 2), 1)  # latents [6, 12): source shards 2 and 3
    assert opened == [sc.REPLICATED, sc.shard_file(2, 4), sc.shard_file(3, 4)]


@pytest.mark.parametrize("written,read", [(2, 1), (1, 4), (4, 2)])
def test_a_shards_rows_are_read_in_the_pass_that_hashes_it(store, monkeypatch, written, read):
    """A resume hashed each shard file as recorded (sha256), then read its rows again by slice: two
    passes over each of the 2^20-latent run's 7.26 GB shards. The rows are copied out as the bytes
    are hashed (in 97-byte blocks here, so rows straddle them): no slice read, the same tensors."""
    from sae_platform import checksums

    sae, optimizer, tensors, meta = _trained("jumprelu")
    _save(store, tensors, meta, written, "jumprelu")
    real = sc.safe_open

    class NoSlices:
        def __init__(self, *args, **kwargs):
            self.opened = real(*args, **kwargs)

        def __enter__(self):
            self.handle = self.opened.__enter__()
            return self

        def __exit__(self, *exc):
            return self.opened.__exit__(*exc)

        def get_tensor(self, name):
            return self.handle.get_tensor(name)

        def get_slice(self, name):
            raise AssertionError(f"{name} read again by slice")

    monkeypatch.setattr(sc, "safe_open", NoSlices)
    monkeypatch.setattr(checksums, "READ_BLOCK", 97)
    layout = LatentLayout(N_LATENTS, read)
    for shard in range(read):
        _assert_same(sc.read_shard(store, "run", layout, shard), sc.shard_slice(tensors, "jumprelu", layout, shard))


def _two_ranks(store, tensors, fail_on=None) -> list[BaseException]:
    """sharded_commit with two ranks (threads standing in for processes): the root's version path
    is shared, each writes its shard (rank ``fail_on`` raises instead); the errors raised."""
    layout, shared, errors = LatentLayout(N_LATENTS, 2), [], []
    barrier = threading.Barrier(2, timeout=30)

    def share(version):
        if version is not None:
            shared.append(version)
        barrier.wait()
        return shared[0]

    def rank(shard):
        try:
            with sc.sharded_commit(store, checkpoint_name("run"), "topk", layout, root=shard == 0, share=share,
                                   wait=barrier.wait, step=3) as version:
                if shard == fail_on:
                    raise RuntimeError(f"rank {shard} failed")
                sc.write_shard(store, version, "topk", layout, shard, sc.shard_slice(tensors, "topk", layout, shard))
                if shard == 0:
                    assert store.pointer(checkpoint_name("run")) is None  # nothing visible mid-write
                    sc.write_replicated(store, version, "topk", tensors)
        except BaseException as error:  # noqa: BLE001 (returned)
            errors.append(error)

    threads = [threading.Thread(target=rank, args=(shard,)) for shard in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a rank was left waiting"
    return errors


def test_ranks_write_their_own_shards_and_the_root_commits_after_all(store):
    _, _, tensors, _ = _trained()
    assert _two_ranks(store, tensors) == []
    pointer = store.pointer(checkpoint_name("run"))
    assert pointer["sharded"] == {"n_latents": N_LATENTS, "n_shards": 2} and pointer["step"] == 3
    _assert_same(sc.gathered_state(store, "run"), tensors)


def test_a_rank_that_fails_leaves_no_rank_waiting_and_nothing_committed(store):
    _, _, tensors, _ = _trained()
    errors = sorted(_two_ranks(store, tensors, fail_on=1), key=lambda e: type(e).__name__)
    assert [type(e) for e in errors] == [RuntimeError, StorageError]
    assert f"{sc.shard_file(1, 2)} was not written" in str(errors[1])
    assert store.pointer(checkpoint_name("run")) is None


def test_a_shard_its_writer_left_unfinished_is_never_committed(store):
    _, _, tensors, _ = _trained()
    layout = LatentLayout(N_LATENTS, 1)
    with pytest.raises(StorageError, match=rf"{sc.shard_file(0, 1)} holds [\d,]+ bytes, its header describes"):
        with sc.sharded_commit(store, checkpoint_name("run"), "topk", layout) as version:
            sc.write_shard(store, version, "topk", layout, 0, tensors)
            sc.write_replicated(store, version, "topk", tensors)
            path = f"{version}/{sc.shard_file(0, 1)}"
            store.fs.pipe_file(path, store.fs.cat_file(path)[:-100])  # killed mid-file
    assert store.pointer(checkpoint_name("run")) is None


def test_a_shard_set_missing_a_shard_is_never_committed(store):
    _, _, tensors, _ = _trained()
    layout = LatentLayout(N_LATENTS, 2)
    with pytest.raises(StorageError, match=sc.shard_file(1, 2)) as error:
        with sc.sharded_commit(store, checkpoint_name("run"), "topk", layout) as version:
            sc.write_shard(store, version, "topk", layout, 0, sc.shard_slice(tensors, "topk", layout, 0))
            sc.write_replicated(store, version, "topk", tensors)
    assert "not committed" in str(error.value) and store.pointer(checkpoint_name("run")) is None
    assert store.fs.ls(store.path(checkpoint_name("run")), detail=False) == []  # the half-written version is gone


def test_a_shard_of_the_wrong_width_is_refused_by_its_writer(store):
    _, _, tensors, _ = _trained()
    with pytest.raises(PlatformError, match=r"sae.W_\w+ has 12 latents on axis 0, but shard 0 of 2 holds 6"):
        sc.write_shard(store, store.path("x"), "topk", LatentLayout(N_LATENTS, 2), 0, tensors)


def _committed_file(store, file):
    return f"{store.resolve(checkpoint_name('run'))}/{file}"


@pytest.mark.parametrize("damage", ["index deleted", "shard deleted", "shard changed", "never indexed"])
def test_a_half_written_or_changed_shard_set_is_refused_naming_the_file(store, damage):
    _, _, tensors, meta = _trained()
    if damage == "never indexed":  # shards committed without the index (not through sharded_commit)
        with store.writing(checkpoint_name("run")) as version:
            sc.write_shard(store, version, "topk", LatentLayout(N_LATENTS, 1), 0, tensors)
            store.write_json(f"{version}/cfg.json", {"sae": meta["sae"], "step": 3})
        file = sc.INDEX
    else:
        _save(store, tensors, meta, 2)
        file = sc.INDEX if damage == "index deleted" else sc.shard_file(1, 2)
        path = _committed_file(store, file)
        if damage == "shard changed":  # same size, one byte of W_dec's data flipped
            data = bytearray(store.fs.cat_file(path))
            data[-1] ^= 0xFF
            store.fs.pipe_file(path, bytes(data))
        else:
            store.fs.rm_file(path)
    for read in (lambda: sc.read_shard(store, "run", LatentLayout(N_LATENTS, 2), 1),
                 lambda: sc.gathered_state(store, "run"), lambda: load_sae(store, "run")):
        with pytest.raises(StorageError, match=file) as error:
            read()
        assert ("sha256" in str(error.value)) == (damage == "shard changed")
        assert error.value.fix


def test_no_file_of_a_sharded_checkpoint_is_a_pickle(store):
    _, _, tensors, meta = _trained()
    _save(store, tensors, meta, 3)
    folder = store.resolve(checkpoint_name("run"))
    files = [p.rsplit("/", 1)[-1] for p in store.fs.ls(folder, detail=False)]
    assert sorted(f for f in files if f.endswith(".safetensors")) == \
        sorted([sc.REPLICATED] + [sc.shard_file(i, 3) for i in range(3)])
    for file in files:
        data = store.fs.cat_file(f"{folder}/{file}")
        assert data[:1] != b"\x80"  # a pickle's PROTO opcode
        if file.endswith(".json"):
            json.loads(data)
        else:
            assert file.endswith(".safetensors")
            (length,) = struct.unpack("<Q", data[:8])
            json.loads(data[8:8 + length])  # a JSON header, then raw tensor bytes


def _sharded_copy(store, plain: str, sharded: str, n_shards: int, settings: TrainSettings) -> None:
    """Rewrite ``plain``'s committed (unsharded) checkpoint as ``sharded`` in ``n_shards`` latent
    shards, by hand: the same weights, Adam state, counters, RNG, JSON files and pointer."""
    pointer = store.pointer(checkpoint_name(plain))
    resume = _load_state(store, plain, pointer, settings, D_SHUFFLED, None, Layout(), "cpu", print)
    sae = resume.sae
    optimizer = _optimizer(sae, settings, torch.device("cpu"))
    state = resume.restore(optimizer, "cpu")
    tensors, meta = sc.training_tensors(sae, optimizer, state.tokens_since_fired)
    path = store.resolve(checkpoint_name(plain))
    files = {f: json.loads(store.fs.cat_file(f"{path}/{f}")) for f in ("cfg.json", "trainer_state.json")}
    info = {k: v for k, v in pointer.items() if k not in ("version", "committed_at", "checksums")}
    sc.save_sharded(store, checkpoint_name(sharded), sae.variant, LatentLayout(sae.n_latents, n_shards), tensors,
                    {**files, "optimizer.json": meta}, **info)


def test_training_resumed_from_two_shards_in_one_process_ends_as_from_the_unsharded_checkpoint(store):
    make_shuffled(store)

    def stop_after_checkpoint(row):
        if row["step"] >= 25:  # the checkpoint at step 20 is committed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(store, "main", "plain", SETTINGS, log=lambda m: None, on_metrics=stop_after_checkpoint)
    _sharded_copy(store, "plain", "sharded", 2, SETTINGS)
    assert sc.is_sharded(store, store.resolve(checkpoint_name("sharded")))
    logs = []
    plain = train_sae(store, "main", "plain", SETTINGS, log=lambda m: None)
    sharded = train_sae(store, "main", "sharded", SETTINGS, log=logs.append)
    assert sharded["resumed_from_step"] == plain["resumed_from_step"] == 20, logs
    a, _ = load_sae(store, "plain")
    b, _ = load_sae(store, "sharded")
    _assert_same(b.state_dict(), a.state_dict())
    assert [r["loss"] for r in sharded["history"]] == [r["loss"] for r in plain["history"]]


def test_the_already_trained_exit_of_a_sharded_checkpoint_reads_only_its_weights_block_by_block(store, monkeypatch):
    """The 2^20-latent run's case: a sharded finished checkpoint found again was read shard by shard with
    its Adam state (2 x 7.26 GB). Only the shards' ``sae.*`` tensors are read, 256 bytes at a time, and
    the summary is the one that exit always returned."""
    make_shuffled(store)
    trained = train_sae(store, "main", "plain", SETTINGS, log=lambda m: None)
    _sharded_copy(store, "plain", "sharded", 2, SETTINGS)
    reads, logs = tensor_reads(monkeypatch, block_bytes=256), []
    found = train_sae(store, "main", "sharded", SETTINGS, log=logs.append)
    assert "already trained" in logs[0]
    assert_finished_summary(found, trained, renamed=("run", "path"))
    checkpoint = sc.open_sharded(store, "sharded")
    assert {file for file, _ in reads} <= {checkpoint.index["replicated"], sc.shard_file(0, 2), sc.shard_file(1, 2)}
    assert sum(n for _, n in reads) == checkpoint.whole_bytes(sc.SAE) and max(n for _, n in reads) <= 256


def test_a_latent_shard_resumes_its_own_rows_without_drawing_an_init(store, monkeypatch):
    """Latent rank 1 of 2 resuming (one process stands in: the read needs no collective) builds its
    shard on the meta device and takes the checkpoint's rows [32, 64) as its parameters, from an
    unsharded checkpoint (read whole, its rows copied out: the shard holds no view of the whole) and
    from a sharded one (the overlapping shards only): no init drawn, nothing calibrated."""
    make_shuffled(store)
    train_sae(store, "main", "plain", SETTINGS, log=lambda m: None)
    _sharded_copy(store, "plain", "sharded", 4, SETTINGS)
    whole, _ = load_sae(store, "plain")
    rank = dataclasses.replace(SETTINGS, world_size=2, latent_parallel=2)
    seen = count_inits(monkeypatch)
    for name in ("plain", "sharded"):
        resume = _load_state(store, name, store.pointer(checkpoint_name(name)), rank, D_SHUFFLED, None,
                             Layout(latent_parallel=2, latent_rank=1), "cpu", print)
        local = resume.sae.local
        for tensor in ("W_enc", "W_dec", "b_enc"):
            got = getattr(local, tensor)
            assert torch.equal(got, getattr(whole, tensor)[32:64]), (name, tensor)
            assert got.untyped_storage().nbytes() == got.nbytes and got.data_ptr() % 64 == 0, (name, tensor)
        assert torch.equal(local.b_pre, whole.b_pre) and torch.equal(local.input_scale, whole.input_scale)
        state = resume.restore(_optimizer(resume.sae, rank, torch.device("cpu")), "cpu")
        assert state.step == 30 and state.tokens_since_fired.shape == (32,)
    assert seen == {"drawn": [], "calibrated": []}


def test_a_sharded_checkpoint_loads_and_exports_whole_where_it_fits_and_is_refused_naming_size_and_limit(
        store, monkeypatch):
    from safetensors.torch import load_file

    from sae_platform.export import export_run

    make_shuffled(store, attrs={"hook_name": "blocks.0.hook_resid_post"})
    train_sae(store, "main", "plain", SETTINGS, log=lambda m: None)
    _sharded_copy(store, "plain", "sharded", 4, SETTINGS)
    a, cfg_a = load_sae(store, "plain")
    b, cfg_b = load_sae(store, "sharded")
    _assert_same(b.state_dict(), a.state_dict())
    assert cfg_b == cfg_a
    logs = []
    train_sae(store, "main", "sharded", SETTINGS, log=logs.append)  # finished: checked shard by shard, kept
    assert "already trained" in logs[0]
    plain, sharded = export_run(store, "plain"), export_run(store, "sharded")  # SAELens's layout: one whole SAE
    _assert_same(load_file(sharded["weights_path"]), load_file(plain["weights_path"]))
    monkeypatch.setenv(sc.GATHER_LIMIT_ENV, "1000")
    whole = sum(t.numel() * t.element_size() for t in a.state_dict().values())
    for read, purpose in ((lambda: load_sae(store, "sharded"), "load SAE 'sharded' whole"),
                          (lambda: export_run(store, "sharded"), "export it to SAELens's layout")):
        with pytest.raises(StorageError, match=f"would take {whole:,} bytes .* more than the 1,000 bytes") as error:
            read()
        assert purpose in str(error.value) and sc.GATHER_LIMIT_ENV in error.value.fix


def _model(kind):
    """A tiny SAE of each inference rule, trained a few steps (BatchTopK learns its threshold), and
    the width of the rows it reads."""
    torch.manual_seed(0)
    if kind == "skip transcoder":
        sae = build_sae("jumprelu", D_MODEL, N_LATENTS, d_out=5, skip_connection=True)
        with torch.no_grad():
            sae.W_skip.normal_()  # zero at init: make it count
        return sae.eval(), D_MODEL + 5
    hparams = {"k": 3} if "topk" in kind else {}
    if kind == "switch":  # 3 experts of 4 latents: one per shard of the 3-shard layout below
        hparams = {"k": 2, "n_experts": 3}
    if kind == "matryoshka_batchtopk":
        hparams["matryoshka_widths"] = [4, 8]
    sae = build_sae(kind, D_MODEL, N_LATENTS, **hparams)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(32, D_MODEL)
        loss, _ = sae.loss(x, sae(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sae.eval(), D_MODEL


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "relu",
                                  "skip transcoder", "switch"])
def test_shard_by_shard_evaluation_equals_the_whole_sae(store, kind):
    from sae_platform.evaluate import firing_counts, reconstruction_metrics
    from sae_platform.sharded_sae import ShardedSAE

    sae, width = _model(kind)
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    sc.save_sharded(store, checkpoint_name("run"), sae.variant, LatentLayout(N_LATENTS, 3), tensors,
                    {"cfg.json": {"sae": sae.config}})
    view = ShardedSAE(store, "run", {"sae": sae.config}, rows_per_pass=40)  # chunks of 2 batches
    batches = [torch.randn(32, width) * 2 for _ in range(5)]
    whole, sharded = reconstruction_metrics(sae, batches), reconstruction_metrics(view, batches)
    for figure, value in whole.items():
        if figure == "per_row":
            for key, rows in value.items():
                assert rows == pytest.approx(sharded[figure][key], rel=1e-5, abs=1e-6), key
        else:
            assert sharded[figure] == pytest.approx(value, rel=1e-5, abs=1e-7), figure
    assert whole["l0"] > 0
    counts, n = firing_counts(view, batches)
    assert (counts == firing_counts(sae, batches)[0]).all() and n == 160


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu", "skip transcoder", "switch"])
def test_opening_a_checkpoint_draws_no_init_and_holds_the_stored_weights(store, monkeypatch, kind):
    """``load_sae`` (evaluation, export, the feature tables, the live browser) and ``ShardedSAE.shard_model``
    (shard-by-shard evaluation) build the model on the meta device and take the stored tensors: no init is
    drawn (at 2^20 latents x 576, seconds of RNG and a second copy of GBs), the global RNG does not move,
    and the model holds exactly the stored weights."""
    from safetensors.torch import save

    from sae_platform.sae import base
    from sae_platform.sharded_sae import ShardedSAE

    sae, _ = _model(kind)
    cfg = {"sae": sae.config, "step": 3}
    with store.writing(checkpoint_name("plain"), step=3) as version:
        store.fs.pipe_file(f"{version}/{sc.UNSHARDED_WEIGHTS}", save(sae.state_dict()))
        store.fs.pipe_file(f"{version}/cfg.json", json.dumps(cfg).encode())
    whole = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    sc.save_sharded(store, checkpoint_name("sharded"), sae.variant, LatentLayout(N_LATENTS, 3), whole,
                    {"cfg.json": cfg})

    def no_init(*args, **kwargs):
        raise AssertionError("an initial dictionary was drawn to open a checkpoint")

    monkeypatch.setattr(base, "unit_rows", no_init)
    rng = torch.get_rng_state()
    loaded, _ = load_sae(store, "plain")
    _assert_same(loaded.state_dict(), sae.state_dict())
    view = ShardedSAE(store, "sharded", cfg)
    for shard in range(3):
        stored = sc.shard_slice(whole, sae.variant, view.layout, shard)
        _assert_same(view.shard_model(shard).state_dict(), {k.removeprefix("sae."): v for k, v in stored.items()})
    assert torch.equal(torch.get_rng_state(), rng), "opening a checkpoint moved the global RNG"


def test_a_switch_sae_whose_shards_would_split_an_expert_is_not_read_shard_by_shard(store, monkeypatch):
    """Expert parallelism writes whole experts per shard; a checkpoint split otherwise (3 experts in 2
    shards: a conversion, never training) is refused shard-wise, naming why, and gathered to evaluate.
    Its SAELens export declines (None: SAELens has no router) from cfg.json, gathering nothing."""
    from sae_platform.export import export_run
    from sae_platform.sharded_sae import ShardedSAE

    sae, _ = _model("switch")
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    sc.save_sharded(store, checkpoint_name("run"), "switch", LatentLayout(N_LATENTS, 2), tensors,
                    {"cfg.json": {"sae": sae.config, "step": 3}})
    with pytest.raises(PlatformError, match="3 experts do not split into its 2 latent shards") as error:
        ShardedSAE(store, "run", {"sae": sae.config})
    assert "evaluated gathered" in error.value.fix
    monkeypatch.setenv(sc.GATHER_LIMIT_ENV, "0")  # gathering it would be refused
    assert export_run(store, "run") is None


def test_sae_eval_reads_a_sharded_checkpoint_shard_by_shard_without_gathering_it(store, monkeypatch):
    from sae_platform import evaluate, sharded_sae
    from sae_platform.evaluate import evaluate_sae

    make_shuffled(store)
    train_sae(store, "main", "plain", SETTINGS, log=lambda m: None)
    _sharded_copy(store, "plain", "sharded", 3, SETTINGS)  # 64 latents: 21, 21, 22
    want, want_density = evaluate_sae(store, "main", "plain", None, None, torch.device("cpu"), ablation_tokens=0)
    monkeypatch.setenv(sc.GATHER_LIMIT_ENV, "0")  # too little memory to hold the whole SAE

    def gathering(*args, **kwargs):
        raise AssertionError("the whole SAE was gathered")

    monkeypatch.setattr(evaluate, "load_sae", gathering)
    monkeypatch.setattr(sc, "gathered_state", gathering)
    widths = []
    real = sharded_sae.ShardedSAE.shard_model
    monkeypatch.setattr(sharded_sae.ShardedSAE, "shard_model",
                        lambda self, shard: widths.append(self.layout.width(shard)) or real(self, shard))
    got, density = evaluate_sae(store, "main", "sharded", None, None, torch.device("cpu"), ablation_tokens=0)
    assert set(widths) == {21, 22}  # never more than one shard's latents in a model
    assert got["latent_shards"] == 3 and got["whole_sae_figures"].startswith("left out: the whole SAE takes")
    for figure in ("fvu", "nmse", "l0", "mse", "dead_fraction", "n_dead", "heldout_dead_fraction", "frac_alive",
                   "explained_variance", "cossim", "l2_ratio", "dead_window_tokens", "heldout_tokens"):
        assert got[figure] == pytest.approx(want[figure], rel=1e-5), figure
    assert density == pytest.approx(want_density)
    monkeypatch.undo()  # where it fits, the figures that need the whole SAE are there too
    got, _ = evaluate_sae(store, "main", "sharded", None, None, torch.device("cpu"), ablation_tokens=0)
    assert got["whole_sae_figures"] == "gathered"
    assert got["average_max_decoder_cosine"] == pytest.approx(want["average_max_decoder_cosine"])


def test_a_sharded_checkpoint_on_s3_reads_back_under_another_layout_and_refuses_a_changed_shard(s3, s3_endpoint):
    from sae_platform.storage import ArtifactStore

    _, bucket = s3
    store = ArtifactStore(f"s3://{bucket}/root", {"endpoint_url": s3_endpoint})
    _, _, tensors, meta = _trained("jumprelu")
    _save(store, tensors, meta, 2, "jumprelu")
    layout = LatentLayout(N_LATENTS, 3)
    for shard in range(3):
        _assert_same(sc.read_shard(store, "run", layout, shard), sc.shard_slice(tensors, "jumprelu", layout, shard))
    path = _committed_file(store, sc.shard_file(0, 2))
    data = bytearray(store.fs.cat_file(path))
    data[-1] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    store.fs.invalidate_cache()
    with pytest.raises(StorageError, match=rf"{sc.shard_file(0, 2)} differs from the bytes recorded"):
        sc.read_shard(store, "run", layout, 0)


def test_two_gloo_ranks_write_their_shards_and_rank0_commits(store, tmp_path):
    """sharded_commit across real processes: torch.distributed (gloo) shares rank 0's version
    folder and the barrier; each rank holds and writes only its own rows."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        sys.path.insert(0, {str(REPO)!r})
        from sae_platform import sharded_checkpoint as sc
        from sae_platform.catalog import checkpoint_name
        from sae_platform.storage import ArtifactStore

        def whole():
            torch.manual_seed(0)
            return {{"sae.W_enc": torch.randn(12, 8), "sae.b_pre": torch.randn(8),
                     "adam.W_enc.exp_avg": torch.randn(12, 8), "adam.W_enc.step": torch.tensor(3.0)}}

        def share(version):
            box = [version]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        def rank(r):
            dist.init_process_group("gloo", init_method="file://{tmp_path}/rendezvous", rank=r, world_size=2)
            store, layout = ArtifactStore({store.root_url!r}), sc.LatentLayout(12, 2)
            mine = sc.shard_slice(whole(), "topk", layout, r)  # what this rank holds
            with sc.sharded_commit(store, checkpoint_name("run"), "topk", layout, root=r == 0, share=share,
                                   wait=dist.barrier, step=7) as version:
                sc.write_shard(store, version, "topk", layout, r, mine)
                if r == 0:
                    sc.write_replicated(store, version, "topk", mine)
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.spawn(rank, nprocs=2)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store.pointer(checkpoint_name("run"))["step"] == 7
    got = sc.gathered_state(store, "run")
    torch.manual_seed(0)
    want = {"sae.W_enc": torch.randn(12, 8), "sae.b_pre": torch.randn(8), "adam.W_enc.exp_avg": torch.randn(12, 8),
            "adam.W_enc.step": torch.tensor(3.0)}
    _assert_same(got, want)

"""Resilience at the operator level: a real SIGKILL in the middle of each kind of stage.

- training, launched through Dagster's own CLI (``dagster job execute``): killed mid-run, the last
  checkpoint stays loadable and re-launching the same command resumes from it;
- the whole shuffle (``run_shuffle``), killed while it writes a final piece of a *new* shuffle:
  readers keep seeing the previous complete store until a re-run commits the new one;
- a feature-table pass (pass 1 partial / pass 2 tables), killed after the first file of its new
  version is down: the previously committed table stays what readers get, whole.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_platform import catalog, partial_store
from sae_platform import features as ft
from sae_platform import shuffle as sh
from sae_platform.errors import StorageError
from sae_platform.feature_check import brute_force_check
from sae_platform.feature_merge import build_feature_tables, read_tables
from sae_platform.sae import build_sae
from sae_platform.shuffle_checks import permutation_check
from sae_platform.shuffled import iter_shuffled, open_shuffled
from sae_platform.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
# The venv's `dagster` console script (the real CLI), else the same CLI through `python -m dagster`.
DAGSTER = ([str(Path(sys.executable).with_name("dagster"))] if Path(sys.executable).with_name("dagster").exists()
           else [sys.executable, "-m", "dagster"])


def _versions(store, name) -> list[str]:
    """Every version directory of ``name`` on disk, committed or not (full paths)."""
    try:
        entries = store.fs.ls(store.path(name), detail=False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/") for e in entries if e.rstrip("/").rsplit("/", 1)[-1].startswith("v-"))


def _debris(store, name) -> list[str]:
    """Version directories of ``name`` that are neither committed now nor a superseded version kept
    for the grace period (``.superseded.json``): what a killed writer left."""
    current = store.resolve(name)
    return [v for v in _versions(store, name) if v != current and not store.fs.exists(f"{v}/.superseded.json")]


def _files(store, path) -> set[str]:
    return {e.rstrip("/").rsplit("/", 1)[-1] for e in store.fs.ls(path, detail=False)}


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its own session / process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


# ---------------------------------------------------------------------------------------------
# 1. Training through `dagster job execute`: kill mid-run, re-launch, resume
# ---------------------------------------------------------------------------------------------

SAE_NAME = "topk-4k-k32"
BATCH = 128
N_STEPS = 60
TRAIN_CONFIG = {"token_budget": BATCH * N_STEPS, "batch_size": BATCH,
                "checkpoint_every_tokens": BATCH * 5, "holdout_rows": 256, "dead_after_tokens": BATCH * 40,
                "device": "cpu"}


@pytest.fixture
def shuffled_store(store, tiny_model_dir, tiny_hooked, text_dir):
    """Cached activations of the tiny model, shuffled as ``shuffled/main`` (as test_dagster_training)."""
    from sae_platform.activations import CacheSettings, cache_text_file
    from sae_platform.corpus import list_source

    for name in ("delta", "epsilon"):
        (text_dir / f"{name}.txt").write_text((text_dir / "gamma.txt").read_text())
    for text_file in list_source(str(text_dir / "*")):
        cache_text_file(store, text_file, tiny_hooked, str(tiny_model_dir), CacheSettings(ctx_len=32, batch_size=4))
    sh.run_shuffle(store, "main", n_buckets=4, memory_budget_bytes=1 << 20, n_jobs=2, seed=0)
    return store


def test_training_killed_through_dagster_cli_resumes_from_its_last_checkpoint(shuffled_store, dagster_home,
                                                                             tmp_path, text_dir):
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus

    from assets.training import settings_for
    from resources import stage_resource
    from sae_platform.catalog import checkpoint_name
    from sae_platform.trainer import load_sae, train_sae

    store = shuffled_store
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(json.dumps({"resources": {"training": {"config": TRAIN_CONFIG},
                                                  "shuffle": {"config": {"name": "main"}}}}))
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "SAE_PLATFORM_ROOT": store.root_url,
           "SAE_PLATFORM_DATA": str(tmp_path), "SAE_PLATFORM_INBOX": str(text_dir / "*"),
           "SAE_PLATFORM_HOLDOUT": str(tmp_path / "holdout" / "*"), "TOKENIZERS_PARALLELISM": "false"}
    command = [*DAGSTER, "asset", "materialize", "-m", "jobs.definitions", "--select", "sae_checkpoint",
               "--partition", SAE_NAME, "-c", str(run_yaml)]  # what Materialize in the UI runs
    ckpt = checkpoint_name(SAE_NAME)

    first_log = tmp_path / "first_run.log"
    with first_log.open("w") as log_file:  # the child keeps its own copy of the descriptor
        first = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                                 stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            pointer = store.pointer(ckpt)
            if pointer is not None and pointer["step"] > 0 and not pointer["final"]:
                break
            assert first.poll() is None, f"the run ended before it could be killed:\n{first_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint was committed within 120 s"
            time.sleep(0.02)
    finally:
        _kill_group(first)  # the CLI process and the step worker it spawned
    assert first.returncode == -signal.SIGKILL

    # The kill left a committed, loadable, unfinished checkpoint (and maybe an uncommitted one).
    killed = store.pointer(ckpt)
    assert 0 < killed["step"] < N_STEPS and not killed["final"] and killed["step"] % 5 == 0, killed
    sae, cfg = load_sae(store, SAE_NAME)
    assert cfg["step"] == killed["step"] and cfg["tokens"] == killed["step"] * BATCH and not cfg["final"]
    assert sae.n_latents == 4096 and all(torch.isfinite(t).all() for t in sae.state_dict().values())
    assert _files(store, store.resolve(ckpt)) >= {"sae_weights.safetensors", "cfg.json", "optimizer.safetensors",
                                                  "optimizer.json", "trainer_state.safetensors",
                                                  "trainer_state.json"}

    with DagsterInstance.get() as instance:
        (killed_run,) = instance.get_runs()
        assert killed_run.status == DagsterRunStatus.STARTED  # nothing is left to report its end
        assert instance.event_log_storage.get_concurrency_run_ids() == {killed_run.run_id}  # holds the gpu slot
    # Without this the re-launch waits forever for the dead run's `gpu` pool slot.
    recover = subprocess.run([str(Path(sys.executable).parent / "sae-platform"), "recover"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert recover.returncode == 0 and killed_run.run_id in recover.stdout, recover.stdout + recover.stderr
    with DagsterInstance.get() as instance:
        assert instance.get_run_by_id(killed_run.run_id).status == DagsterRunStatus.FAILURE
        assert not instance.event_log_storage.get_concurrency_run_ids()

    second = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = second.communicate(timeout=180)
    finally:
        _kill_group(second)
    assert second.returncode == 0, output[-5000:]
    assert f"resuming {SAE_NAME} from step {killed['step']} ({killed['step'] * BATCH:,} tokens)" in output

    with DagsterInstance.get() as instance:
        runs = instance.get_runs()  # newest first
        assert [r.status for r in runs] == [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE]
        (record,) = instance.fetch_materializations(AssetKey("sae_checkpoint"), limit=1).records
        metadata = {k: getattr(v, "value", v) for k, v in record.asset_materialization.metadata.items()}
    assert metadata["resumed_from_step"] == killed["step"]
    assert metadata["steps"] == N_STEPS and metadata["tokens"] == N_STEPS * BATCH

    final = store.pointer(ckpt)
    assert final["final"] and final["step"] == N_STEPS and final["tokens"] == TRAIN_CONFIG["token_budget"]
    assert not _debris(store, ckpt), "killed versions are swept on commit (superseded ones kept for the grace period)"
    resumed, cfg = load_sae(store, SAE_NAME)
    assert cfg["final"] and cfg["tokens"] == TRAIN_CONFIG["token_budget"]
    # Resuming through Dagster reaches the same weights as one uninterrupted run (CPU, same data).
    settings = settings_for(SAE_NAME, stage_resource("training", TRAIN_CONFIG))
    train_sae(store, "main", "uninterrupted", settings, device="cpu", log=lambda m: None)
    whole, _ = load_sae(store, "uninterrupted")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), f"{name} differs after the kill and resume"


# ---------------------------------------------------------------------------------------------
# 2. The whole shuffle: a new shuffle killed mid-way leaves the previous store readable
# ---------------------------------------------------------------------------------------------

SHUFFLE = dict(n_buckets=4, memory_budget_bytes=1 << 20, n_jobs=3, seed=11)  # d_model 16 fp16: 2 passes

SHUFFLE_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from sae_platform import shuffle as sh
    from sae_platform.storage import ArtifactStore

    real, written = sh._write_piece, []

    def write_then_die(store, run, path, acts, ids, **kwargs):
        # The second final piece's data is fully down, its version not yet committed: die here.
        real(store, run, path, acts, ids, **kwargs)
        written.append(path)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    sh._write_piece = write_then_die
    sh.run_shuffle(ArtifactStore(sys.argv[1]), "s", **json.loads(sys.argv[2]))
""")


def _partition(store, key, n_rows, seed, d_model=16):
    acts = np.random.default_rng(seed).standard_normal((n_rows, d_model)).astype("float16")
    with store.writing(f"activations/{key}") as version:
        group = store.open_group(f"{version}/data.zarr", "w")
        group.create_array("acts", data=acts, chunks=(1024, d_model), compressors=None)
        group.attrs.update({"d_model": d_model, "dtype": "float16", "n_rows": n_rows})
    return acts


def _read_shuffled(store, name):
    batches = list(iter_shuffled(store, name, batch_rows=4096))
    return np.concatenate([i for i, _ in batches]), np.concatenate([a for _, a in batches])


def _assert_exact_permutation(store, name, rows):
    ids, acts = _read_shuffled(store, name)
    assert np.array_equal(np.sort(ids), np.arange(len(rows))), "every input row exactly once"
    assert np.array_equal(acts.view(np.uint8), rows[ids].view(np.uint8)), "each row carries its own bytes"
    return ids


def test_killed_reshuffle_leaves_the_previous_store_whole_and_a_rerun_commits_the_new_one(store):
    old_rows = np.concatenate([_partition(store, "p00", 10000, 0), _partition(store, "p01", 10000, 1)])
    sh.run_shuffle(store, "s", **SHUFFLE)
    old_pointer = store.pointer("shuffled/s")
    old_ids = _assert_exact_permutation(store, "s", old_rows)
    old_plan = old_pointer["plan_id"]

    new_rows = np.concatenate([old_rows, _partition(store, "p02", 10000, 2)])  # a new batch arrives
    killed = subprocess.run([sys.executable, "-c", SHUFFLE_SCRIPT, store.root, json.dumps(SHUFFLE)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    # The kill landed mid-way through the new shuffle's final pass ...
    new_plan = store.pointer("shuffle/s/plan")["plan_id"]
    assert new_plan != old_plan
    run = sh.load_run(store, "s")
    assert run.plan.n_passes == 2 and run.plan.n_final_buckets == 4 and run.plan.n_rows == 30000
    assert store.pointer(sh._piece_name(run, 0))["plan_id"] == new_plan, "piece 0 was committed"
    assert store.pointer(sh._piece_name(run, 1)) is None, "piece 1 was not"
    (half,) = _versions(store, sh._piece_name(run, 1))
    assert store.size_bytes(half) > 10000 * 16 * 2 // 8, "its data was already on disk when the kill came"
    # ... and readers still get the previous store, complete and unchanged.
    assert store.pointer("shuffled/s") == old_pointer
    shuffled = open_shuffled(store, "s")
    assert shuffled.n_rows == 20000 and shuffled.index["plan_id"] == old_plan
    assert np.array_equal(_assert_exact_permutation(store, "s", old_rows), old_ids)
    check = permutation_check(store, "s")
    assert check["ok"] and check["output_rows"] == 20000, check

    summary = sh.run_shuffle(store, "s", **SHUFFLE)  # the re-run
    assert summary["plan_id"] == new_plan and summary["n_rows"] == 30000
    check = permutation_check(store, "s")
    assert check["ok"] and check["output_rows"] == 30000, check
    _assert_exact_permutation(store, "s", new_rows)
    pieces = [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path("shuffled", "s"), detail=False)]
    old = [p for p in pieces if p.startswith("pieces-") and p != f"pieces-{new_plan}"]
    assert all(store.fs.exists(store.path("shuffled", "s", p, ".superseded.json")) for p in old), \
        "old pieces are retired: readable for the grace period, then dropped"
    for bucket in range(run.plan.n_final_buckets):
        assert not _debris(store, sh._piece_name(run, bucket)), "the killed attempt's debris is swept"


# ---------------------------------------------------------------------------------------------
# 3. Feature tables: a pass killed mid-write leaves the committed table whole
# ---------------------------------------------------------------------------------------------

D, N_LATENTS, N_SHARDS = 16, 64, 2
TABLES = dict(top_k=5, reservoir_factor=4)

TABLES_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from sae_platform import features as ft
    from sae_platform import partial_store
    from sae_platform.feature_merge import merge_shard_tables, write_tables
    from sae_platform.sae import build_sae
    from sae_platform.storage import ArtifactStore

    root, sae_file, kill_after = sys.argv[1], sys.argv[2], sys.argv[3]
    real = ArtifactStore.write_bytes_atomic

    def write_then_die(self, path, data):  # every file of a version goes through here
        real(self, path, data)
        if path.rsplit("/", 1)[-1] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    ArtifactStore.write_bytes_atomic = write_then_die
    store = ArtifactStore(root)
    sae = build_sae("relu", {D}, {N_LATENTS}).eval()
    sae.load_state_dict(torch.load(sae_file))
    shards = ft.feature_shards(sae.n_latents, {N_SHARDS})
    settings = ft.FeatureSettings(**{TABLES})
    # The new batch p1 arrived: pass 1 for it, then pass 2 over every batch, shard by shard.
    for index, (start, stop) in enumerate(shards):
        partial = ft.compute_partial(store, sae, "p1", start, stop, settings)
        partial_store.write_partial(store, "run", "p1", index, partial)
    for index in range(len(shards)):
        write_tables(store, "run", index, merge_shard_tables(store, sae, "run", index, ["p0", "p1"], settings))
""").replace("{D}", str(D)).replace("{N_LATENTS}", str(N_LATENTS)).replace("{N_SHARDS}", str(N_SHARDS)) \
    .replace("{TABLES}", repr(TABLES))


def _feature_rows(n, seed):
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((48, D))
    codes = rng.exponential(1.0, (n, 48)) * (rng.random((n, 48)) < 0.1)
    return (codes @ dictionary + 0.2 * rng.standard_normal((n, D))).astype(np.float16)


def _write_acts(store, key, acts):
    with store.writing(f"activations/{key}") as version:
        group = store.open_group(f"{version}/data.zarr", "w")
        group.create_array("acts", data=acts, chunks=(512, D), compressors=None)
        group.attrs.update({"d_model": D, "dtype": "float16", "n_rows": len(acts)})


def _feature_sae():
    torch.manual_seed(0)
    sae = build_sae("relu", D, N_LATENTS).eval()
    with torch.no_grad():
        sae.b_enc.copy_(-torch.rand(N_LATENTS) * 2.5)  # rare and common features
    return sae


@pytest.mark.parametrize("kill_after, killed_name", [
    ("partial.npz", catalog.partial_name("run", "p1", 0)),  # pass 1: the partial's arrays down, its meta not
    ("stats.parquet", catalog.tables_name("run", 0)),       # pass 2: stats down, examples and meta not
], ids=["pass1-partial", "pass2-tables"])
def test_killed_table_pass_leaves_the_committed_table_whole(store, tmp_path, kill_after, killed_name):
    p0, p1 = _feature_rows(1500, seed=0), _feature_rows(1000, seed=1)
    sae = _feature_sae()
    sae_file = tmp_path / "sae.pt"
    torch.save(sae.state_dict(), sae_file)
    _write_acts(store, "p0", p0)
    # the first complete run
    build_feature_tables(store, sae, "run", ft.FeatureSettings(**TABLES), n_feature_shards=N_SHARDS)
    before = {i: (store.pointer(catalog.tables_name("run", i)), read_tables(store, "run", i))
              for i in range(N_SHARDS)}
    assert all(t.meta["n_tokens_total"] == 1500 for _, t in before.values())

    _write_acts(store, "p1", p1)
    killed = subprocess.run([sys.executable, "-c", TABLES_SCRIPT, store.root, str(sae_file), kill_after], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    # Readers see exactly the tables of the first run ...
    for i, (pointer, tables) in before.items():
        assert store.pointer(catalog.tables_name("run", i)) == pointer
        again = read_tables(store, "run", i)
        assert again.stats.equals(tables.stats) and again.examples.equals(tables.examples)
        assert again.meta == tables.meta and again.meta["n_tokens_total"] == 1500
    # ... although the kill landed inside a new version: its first file is down, the rest is not.
    committed = store.resolve(killed_name)
    (half,) = [v for v in _versions(store, killed_name) if v != committed]
    assert kill_after in _files(store, half) and "meta.json" not in _files(store, half)
    assert not [f for f in _files(store, half) if ".tmp-" in f]
    if kill_after == "partial.npz":  # pass 2 must not find a half-written partial
        assert partial_store.list_partials(store, "run", 0) == ["p0"]
        with pytest.raises(StorageError, match="feature partial"):
            partial_store.read_partial(store, "run", "p1", 0)
    else:
        assert [partial_store.list_partials(store, "run", i) for i in range(N_SHARDS)] == [["p0", "p1"]] * N_SHARDS

    rerun = subprocess.run([sys.executable, "-c", TABLES_SCRIPT, store.root, str(sae_file), "-"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    clean = ArtifactStore(str(tmp_path / "clean"))  # the same data computed once, without a kill
    _write_acts(clean, "p0", p0)
    _write_acts(clean, "p1", p1)
    build_feature_tables(clean, sae, "run", ft.FeatureSettings(**TABLES), n_feature_shards=N_SHARDS)
    for i in range(N_SHARDS):
        got, want = read_tables(store, "run", i), read_tables(clean, "run", i)
        assert got.meta["n_tokens_total"] == 2500 and [p["key"] for p in got.meta["partitions"]] == ["p0", "p1"]
        assert got.stats.equals(want.stats) and got.examples.equals(want.examples)
        assert not got.examples.equals(before[i][1].examples)
        assert not _debris(store, catalog.tables_name("run", i))
    assert not _debris(store, killed_name), "the killed attempt's version is swept on commit"
    start, stop = ft.feature_shard(N_LATENTS, N_SHARDS, 0)
    check = brute_force_check(store, sae, "run", 0, start, stop)
    assert check["ok"], check["mismatches"][:3]

"""The multi-pass shuffle: an exact permutation, uniformly random, bounded memory, crash-safe.

Activation partitions are synthetic (random rows written in the activations layout), so no
language model is needed.
"""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sae_platform import shuffle
from sae_platform.errors import StorageError
from sae_platform.settings import SettingsError
from sae_platform.shuffle_checks import chi2_sf, permutation_check, uniformity_from_ids, uniformity_stats
from sae_platform.shuffle_plan import FINAL_SHARE, final_bucket_rows, plan_shuffle
from sae_platform.shuffled import iter_shuffled, open_shuffled
from sae_platform.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def make_partition(store, key, n_rows, d_model=16, dtype="float16", chunk_rows=1024, seed=None):
    """A committed partition in the layout of sae_platform.activations; returns its rows."""
    rng = np.random.default_rng(seed if seed is not None else abs(hash(key)) % 2**32)
    acts = rng.standard_normal((n_rows, d_model)).astype(dtype)
    with store.writing(f"activations/{key}") as version:
        group = store.open_group(f"{version}/data.zarr", "w")
        group.create_array("acts", data=acts, chunks=(min(chunk_rows, max(n_rows, 1)), d_model), compressors=None)
        group.attrs.update({"d_model": d_model, "dtype": dtype, "n_rows": n_rows})
    return acts


def make_dataset(store, sizes, **kwargs):
    """Partitions p00, p01, ...; returns all rows in global-index order."""
    return np.concatenate([make_partition(store, f"p{i:02d}", n, seed=i, **kwargs) for i, n in enumerate(sizes)])


def read_all(store, name):
    batches = list(iter_shuffled(store, name, batch_rows=4096))
    return np.concatenate([i for i, _ in batches]), np.concatenate([a for _, a in batches])


def assert_exact_permutation(store, name, rows):
    ids, acts = read_all(store, name)
    assert len(ids) == len(rows)
    assert np.array_equal(np.sort(ids), np.arange(len(rows))), "ids must be each input index exactly once"
    assert np.array_equal(acts.view(np.uint8), rows[ids].view(np.uint8)), "each row must carry its own bytes"
    return ids


SMALL = dict(n_buckets=4, memory_budget_bytes=1 * MiB, n_jobs=3)  # d_model 16 fp16: 2 passes up to ~43k rows


# -- the plan -------------------------------------------------------------------------------


def test_plan_follows_the_seed_arithmetic():
    row, K, M = 1000, 10, 100 * MiB
    cap = final_bucket_rows(M, row)  # rows one job shuffles in memory
    assert cap == int(FINAL_SHARE * M) // (row + 16)

    def passes(n_rows):
        return plan_shuffle(n_rows, row, K, M, 4).n_passes

    margin = int(6 * cap**0.5) + 1  # bucket sizes are random: room for 6 standard deviations
    assert passes(cap) == 1 and passes(cap + 1) == 2
    assert passes(K * (cap - margin)) == 2 and passes(K * cap) == 3
    assert passes(K**2 * (cap - margin)) == 3 and passes(K**2 * cap) == 4
    three = plan_shuffle(K * cap, row, K, M, 4)
    assert three.n_final_buckets == K**2
    assert [three.jobs_in_pass(p) for p in (1, 2, 3)] == [4, K, K**2]
    assert three.block_rows * (4 * three.record_bytes) <= M
    with pytest.raises(StorageError, match="pass 4 does not exist"):
        three.jobs_in_pass(4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(memory_budget_bytes=100_000, input_chunk_rows=1024), "cannot hold one input chunk"),
    (dict(memory_budget_bytes=10), "cannot hold"),
    (dict(n_buckets=1), "at least 2 buckets"),
    (dict(n_jobs=0), "at least one job"),
    (dict(n_rows=10**12, memory_budget_bytes=1 * MiB, n_buckets=2), "more than 6 passes"),
])
def test_plan_rejects_impossible_settings(kwargs, match):
    args = dict(n_rows=10_000, row_bytes=128, n_buckets=4, memory_budget_bytes=64 * MiB, n_jobs=2) | kwargs
    with pytest.raises(StorageError, match=match) as error:
        plan_shuffle(**args)
    assert error.value.fix


# -- the invariant and the statistics ---------------------------------------------------------


def test_output_is_an_exact_permutation(store):
    rows = make_dataset(store, [9000, 15000, 1, 24000])
    summary = shuffle.run_shuffle(store, "s", seed=7, **(SMALL | {"n_buckets": 2}))
    assert summary["n_passes"] == 3 and summary["n_rows"] == len(rows)
    ids = assert_exact_permutation(store, "s", rows)
    assert not np.array_equal(ids, np.arange(len(rows)))
    check = permutation_check(store, "s")
    assert check["ok"] and check["missing_ids"] == 0 and check["duplicate_ids"] == 0, check
    assert not store.fs.exists(store.path("shuffle", "s", summary["plan_id"])), "scratch is dropped"


def test_single_pass_when_the_data_fits(store):
    rows = make_dataset(store, [3000, 2000], dtype="float32", d_model=8)
    summary = shuffle.run_shuffle(store, "s", n_buckets=4, memory_budget_bytes=8 * MiB, n_jobs=2, seed=0)
    assert summary["n_passes"] == 1 and summary["pieces"] == 1
    assert_exact_permutation(store, "s", rows)


def test_chunk_files_read_and_written_directly_match_zarr(store):
    """Pass 1 reads local chunk files itself and the final pass writes the pieces' files itself
    (no zarr pipeline): an all-zero chunk zarr left unwritten reads as zeros, job ranges that
    split chunks read the right rows, and plain zarr reads every piece back, edge chunks included."""
    import zarr

    rows = make_dataset(store, [5000, 3001], chunk_rows=1000)
    zero_rows = rows[1000:2000]  # partition p00's second chunk: zarr skips writing a chunk of zeros
    zero_rows[:] = 0
    with store.writing("activations/p00") as version:
        group = store.open_group(f"{version}/data.zarr", "w")
        group.create_array("acts", data=rows[:5000], chunks=(1000, 16), compressors=None)
    folder = store.path("activations", "p00", store.pointer("activations/p00")["version"], "data.zarr", "acts")
    assert sorted(os.listdir(folder)) == ["c", "zarr.json"] and len(os.listdir(f"{folder}/c")) == 4, \
        "the all-zero chunk must be absent for this test to test it"
    summary = shuffle.run_shuffle(store, "s", seed=3, **(SMALL | {"n_jobs": 7, "memory_budget_bytes": 256 << 10}))
    assert summary["n_passes"] == 2 and summary["pieces"] > 1
    assert_exact_permutation(store, "s", rows)
    index = store.read_json(f"{store.resolve('shuffled/s')}/index.json")
    C = index["chunk_rows"]
    for piece in index["pieces"]:
        path = store.path(piece["name"], store.pointer(piece["name"])["version"], "data.zarr")
        group = zarr.open_group(path, mode="r", zarr_format=3)
        acts, ids = group["acts"][:], group["row_id"][:]
        assert acts.shape == (piece["n_rows"], 16) and group["acts"].chunks == (C, 16)
        assert np.array_equal(acts.view(np.uint8), rows[ids].view(np.uint8))
        n_chunks = -(-piece["n_rows"] // C)
        assert sorted(os.listdir(f"{path}/acts")) == sorted(["zarr.json"] + [f"c.{i}.0" for i in range(n_chunks)])
        assert all(os.path.getsize(f"{path}/acts/c.{i}.0") == C * 16 * 2 for i in range(n_chunks)), \
            "edge chunks are stored at the full chunk shape"


def test_same_seed_same_order_other_seed_other_order(store):
    make_dataset(store, [20000, 20000])
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        shuffle.run_shuffle(store, name, seed=seed, **SMALL)
    a, b, c = (read_all(store, n)[0] for n in "abc")
    assert np.array_equal(a, b)
    assert (a != c).mean() > 0.99


def test_order_is_uniformly_random(store):
    make_dataset(store, [30000, 30000, 20000], d_model=4)
    shuffle.run_shuffle(store, "s", n_buckets=4, memory_budget_bytes=1 * MiB, n_jobs=2, seed=3)
    stats = uniformity_stats(store, "s")
    # Thresholds a uniform permutation fails ~1 time in 1000 at most.
    assert stats["groups"] == 16 and stats["chi2_df"] == 225
    assert stats["chi2_p"] > 1e-3 and stats["chi2_mod_p"] > 1e-3, stats
    assert abs(stats["spearman_z"]) < 3.5, stats
    assert stats["adjacent_pairs"] <= 9, stats  # Poisson(2)
    assert stats["ks_min_p"] > 1e-3, stats


def test_uniformity_stats_catch_orders_that_are_not_shuffled():
    n, rng = 80_000, np.random.default_rng(0)
    identity = uniformity_from_ids(np.array_split(np.arange(n), 7), n)
    assert identity["chi2_p"] < 1e-12 and identity["spearman_rho"] > 0.999 and identity["adjacent_fraction"] > 0.99
    # A mixing buffer (shuffle within windows) looks random locally but keeps the global order.
    windows = np.concatenate([w[rng.permutation(len(w))] for w in np.array_split(np.arange(n), 80)])
    mixing = uniformity_from_ids([windows], n)
    assert mixing["chi2_p"] < 1e-12 and mixing["spearman_z"] > 100 and mixing["ks_min_p"] < 1e-6
    # Round-robin buckets (id mod 4), each shuffled: contiguous shards see nothing wrong.
    round_robin = np.concatenate([rng.permutation(np.arange(r, n, 4)) for r in range(4)])
    strided = uniformity_from_ids([round_robin], n)
    assert strided["chi2_p"] > 1e-3 and strided["chi2_mod_p"] < 1e-12
    uniform = uniformity_from_ids([rng.permutation(n)], n)
    assert uniform["chi2_p"] > 1e-3 and uniform["chi2_mod_p"] > 1e-3 and abs(uniform["spearman_z"]) < 3.5


# Tabulated quantiles, and (df 225) numerical integration of the density.
@pytest.mark.parametrize("x, df, p", [(3.841459, 1, 0.05), (18.307038, 10, 0.05), (0.5, 3, 0.918891),
                                      (249.4452, 225, 0.1262613), (0.0, 5, 1.0), (400.0, 225, 6.078744e-12)])
def test_chi2_survival_function(x, df, p):
    assert chi2_sf(x, df) == pytest.approx(p, rel=2e-3)


def test_permutation_check_catches_lost_duplicated_and_altered_rows(store):
    make_dataset(store, [6000, 6000], dtype="float32")
    shuffle.run_shuffle(store, "s", n_buckets=4, memory_budget_bytes=1 * MiB, n_jobs=2, seed=0)
    piece = open_shuffled(store, "s").pieces[0]
    group = store.open_group(f"{store.resolve(piece['name'])}/data.zarr", "r+")
    acts, row_id = group["acts"], group["row_id"]

    first_row = acts[0:1]
    acts[0:1] = first_row + np.float32(1e-3)
    check = permutation_check(store, "s")
    assert not check["ok"] and not check["row_checksum_match"] and check["id_checksum_match"]
    acts[0:1] = first_row
    assert permutation_check(store, "s")["ok"]

    second_id = row_id[1:2]
    row_id[1:2] = row_id[0:1]  # row 0's id twice: one id duplicated, one lost
    check = permutation_check(store, "s")
    assert not check["ok"] and check["duplicate_ids"] == 1 and check["missing_ids"] == 1
    row_id[1:2] = second_id

    acts[0:2] = acts[0:2][::-1].copy()  # two vectors swapped between their ids
    check = permutation_check(store, "s")
    assert not check["ok"] and check["id_checksum_match"] and not check["row_checksum_match"]


def test_iter_shuffled_batches_and_splits(store):
    make_dataset(store, [5000, 7000])
    shuffle.run_shuffle(store, "s", seed=0, **SMALL)
    batches = list(iter_shuffled(store, "s", batch_rows=1000))
    assert [len(i) for i, _ in batches] == [1000] * 12 and batches[0][1].shape == (1000, 16)
    everything = np.concatenate([i for i, _ in batches])
    ragged = list(iter_shuffled(store, "s", batch_rows=5000))
    assert [len(i) for i, _ in ragged] == [5000, 5000, 2000]
    assert [len(i) for i, _ in iter_shuffled(store, "s", 5000, drop_last=True)] == [5000, 5000]
    train = np.concatenate([i for i, _ in iter_shuffled(store, "s", 999, stop=10000)])
    holdout = np.concatenate([i for i, _ in iter_shuffled(store, "s", 999, start=10000)])
    assert np.array_equal(np.concatenate([train, holdout]), everything)


# -- bounded memory on data much larger than the budget --------------------------------------


MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from sae_platform import shuffle
    from sae_platform.storage import ArtifactStore

    def status(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    root, warm_root, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # A worker that has shuffled once already: imports, zarr's thread pool, numpy's RNG are set up.
    shuffle.run_shuffle(ArtifactStore(warm_root), "warm", n_buckets=2, memory_budget_bytes=budget, n_jobs=2, seed=0)
    store = ArtifactStore(root)
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    baseline = status("VmRSS")
    result = shuffle.run_shuffle(store, "big", n_buckets=8, memory_budget_bytes=budget, n_jobs=2, seed=0)
    print(json.dumps({"n_passes": result["n_passes"], "extra_mib": status("VmHWM") - baseline,
                      "torch_imported": "torch" in sys.modules}))
""")


def _peak_above_baseline(root, warm_root, budget):
    """Peak RSS of a warmed-up worker process while it shuffles, above what it held before.

    ru_maxrss cannot be used: importing polars/zarr peaks higher than a 4 MiB budget ever
    could, hiding the shuffle; resetting VmHWM through clear_refs measures the shuffle alone.
    """
    # no MALLOC_ARENA_MAX: the shuffle jobs limit the malloc arenas themselves (glibc_malloc.limit_arenas)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(root), str(warm_root), str(budget)],
                         cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=120, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
def test_multi_pass_shuffle_of_12x_the_budget_stays_within_memory(tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    rows = make_dataset(store, [65536] * 3, d_model=64, dtype="float32")  # 48 MiB; the budget is 4 MiB
    warm_root = str(tmp_path / "warm")
    make_dataset(ArtifactStore(warm_root), [2000, 2000], d_model=64, dtype="float32")
    small = _peak_above_baseline(store.root, warm_root, 4 * MiB)
    print(f"peak RSS above baseline: {small['extra_mib']:.1f} MiB for 48 MiB of rows, budget 4 MiB, "
          f"{small['n_passes']} passes")
    assert small["n_passes"] == 3
    # A worker that imports torch holds ~150-250 MiB more, which its warm-up here would hide.
    assert not small["torch_imported"], "a shuffle worker imported torch (sae_platform.activations?)"
    # The budget bounds the shuffle's arrays; the allocator's slack (measured: 4-5.5 MiB in all) fits in 2x.
    assert small["extra_mib"] < 4 * 2, f"the shuffle held {small['extra_mib']:.1f} MiB with a 4 MiB budget"
    assert permutation_check(store, "big")["ok"]
    assert_exact_permutation(store, "big", rows)
    # The measurement sees a whole-data load: one in-memory pass over the same rows.
    store.delete("shuffled/big")
    whole = _peak_above_baseline(store.root, warm_root, 256 * MiB)
    assert whole["n_passes"] == 1 and whole["extra_mib"] > 48, whole


# -- crash safety ----------------------------------------------------------------------------


SLOW_JOB_SCRIPT = textwrap.dedent("""
    import sys, time
    from sae_platform import shuffle
    from sae_platform.storage import ArtifactStore

    def slow(done, total):
        print(done, flush=True)
        time.sleep(0.3)

    shuffle.scatter_job(ArtifactStore(sys.argv[1]), "s", 1, 0, progress=slow)
""")


def test_a_killed_job_leaves_nothing_visible_and_a_rerun_gives_one_copy(store):
    rows = make_dataset(store, [20000, 20000], d_model=32)
    run = shuffle.start_shuffle(store, "s", n_buckets=16, memory_budget_bytes=512 << 10, n_jobs=2, seed=5)
    assert run.plan.n_passes == 2 and run.plan.block_rows < 20000 // 4, "the job must take several blocks"
    child = subprocess.Popen([sys.executable, "-c", SLOW_JOB_SCRIPT, store.root], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(2):  # two blocks written, more to come
            assert child.stdout.readline(), "the job ended before it could be killed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    job = shuffle._job_name(run, 1, 0)
    assert store.pointer(job) is None, "a killed job must not be committed"
    (debris,) = [p for p in store.fs.ls(store.path(job), detail=False) if p.rsplit("/", 1)[-1].startswith("v-")]
    assert sum(store.fs.size(f) for f in store.fs.ls(debris, detail=False)) > 0, "the kill came mid-write"
    with pytest.raises(StorageError, match="pass 1 job 0"):
        shuffle.finalize_bucket(store, "s", 0)  # the partial output is never read

    shuffle.scatter_job(store, "s", 1, 0)  # the re-run
    for job_index in (1, 1):  # a job run twice is still one copy
        shuffle.scatter_job(store, "s", 1, job_index)
    versions = [p for p in store.fs.ls(store.path(job), detail=False) if p.rsplit("/", 1)[-1].startswith("v-")]
    assert len(versions) == 1, "the killed attempt's debris is swept on commit"
    with pytest.raises(StorageError, match="not finalized"):
        shuffle.commit_shuffled(store, "s")
    for bucket in range(run.plan.n_final_buckets):
        shuffle.finalize_bucket(store, "s", bucket)
    assert store.resolve("shuffled/s") is None, "nothing is visible before the commit"
    shuffle.commit_shuffled(store, "s")
    assert permutation_check(store, "s")["ok"]
    assert_exact_permutation(store, "s", rows)


def test_a_new_plan_leaves_the_committed_store_readable_until_it_commits(store):
    rows = make_dataset(store, [10000, 10000])
    shuffle.run_shuffle(store, "s", seed=1, **SMALL)
    before = read_all(store, "s")[0]
    run = shuffle.start_shuffle(store, "s", seed=2, **SMALL)
    for job in range(run.plan.n_jobs):
        shuffle.scatter_job(store, "s", 1, job)
    shuffle.finalize_bucket(store, "s", 0)
    assert np.array_equal(read_all(store, "s")[0], before)
    assert permutation_check(store, "s")["ok"]  # checked against the committed store's inputs
    for bucket in range(1, run.plan.n_final_buckets):
        shuffle.finalize_bucket(store, "s", bucket)
    shuffle.commit_shuffled(store, "s")
    assert not np.array_equal(assert_exact_permutation(store, "s", rows), before)
    pieces = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path("shuffled", "s"), detail=False)
                    if p.rsplit("/", 1)[-1].startswith("pieces-"))
    (old,) = [p for p in pieces if p != f"pieces-{run.plan_id}"]        # superseded: kept for the grace period
    assert store.fs.exists(store.path("shuffled", "s", old, ".superseded.json"))
    shuffle._drop_stale_pieces(ArtifactStore(store.root_url, grace_s=0), run)   # grace over: dropped
    pieces = [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path("shuffled", "s"), detail=False)]
    assert [p for p in pieces if p.startswith("pieces-")] == [f"pieces-{run.plan_id}"], "old pieces dropped"


# -- bad input -------------------------------------------------------------------------------


def _nothing_written(store):
    return not store.fs.exists(store.path("shuffle")) and not store.fs.exists(store.path("shuffled"))


def test_partitions_of_different_width_or_dtype_are_refused(store):
    make_partition(store, "a", 100, d_model=16)
    make_partition(store, "b", 100, d_model=32)
    with pytest.raises(StorageError, match="differ in d_model or dtype.*a: d_model 16.*b: d_model 32"):
        shuffle.start_shuffle(store, "s", seed=0, **SMALL)
    with pytest.raises(StorageError, match="differ in d_model or dtype"):
        make_partition(store, "b", 100, d_model=16, dtype="float32")
        shuffle.start_shuffle(store, "s", seed=0, **SMALL)
    assert _nothing_written(store)
    assert store.resolve("activations/a") and store.resolve("activations/b"), "inputs untouched"


def test_missing_or_absent_inputs_are_refused(store):
    with pytest.raises(StorageError, match="no committed activation partitions"):
        shuffle.start_shuffle(store, "s", seed=0, **SMALL)
    make_partition(store, "a", 100)
    with pytest.raises(StorageError, match="partition 'zz' is missing") as error:
        shuffle.start_shuffle(store, "s", seed=0, keys=["a", "zz"], **SMALL)
    assert "materialize the activations asset" in error.value.fix
    with pytest.raises(StorageError, match="no committed artifact"):
        iter_shuffled(store, "s", 10)
    assert _nothing_written(store)


def test_bad_settings_are_refused_before_anything_is_written(store):
    make_partition(store, "a", 5000, chunk_rows=4096)
    with pytest.raises(StorageError, match="cannot hold one input chunk") as error:
        shuffle.start_shuffle(store, "s", n_buckets=4, memory_budget_bytes=64 << 10, n_jobs=2, seed=0)
    assert "raise memory_budget_bytes" in error.value.fix
    with pytest.raises(SettingsError, match="not a safe name"):
        shuffle.start_shuffle(store, "../s", seed=0, **SMALL)
    with pytest.raises(StorageError, match="seed"):
        shuffle.start_shuffle(store, "s", seed=-1, **SMALL)
    assert _nothing_written(store)
    with pytest.raises(StorageError, match="plan of shuffle 's' is missing"):
        shuffle.scatter_job(store, "s", 1, 0)


def test_jobs_refuse_indices_outside_the_plan_and_changed_inputs(store):
    make_dataset(store, [20000, 20000])
    run = shuffle.start_shuffle(store, "s", seed=0, **SMALL)
    assert run.plan.n_passes == 2
    with pytest.raises(StorageError, match="job 3 does not exist"):
        shuffle.scatter_job(store, "s", 1, run.plan.n_jobs)
    with pytest.raises(StorageError, match="not a scatter pass"):
        shuffle.scatter_job(store, "s", run.plan.n_passes, 0)
    with pytest.raises(StorageError, match="bucket 4 does not exist"):
        shuffle.finalize_bucket(store, "s", run.plan.n_final_buckets)
    make_partition(store, "p01", 20000, seed=99)  # re-cached after the plan pinned it
    with pytest.raises(StorageError, match="'p01' changed or vanished"):
        shuffle.scatter_job(store, "s", 1, run.plan.n_jobs - 1)
    assert store.pointer(shuffle._job_name(run, 1, run.plan.n_jobs - 1)) is None


# -- the scatter files' segments and the final pass's gather ---------------------------------------

def _segment_file(tmp_path, blocks, d_model=4):
    """A scatter file of K=2 buckets written block by block as scatter_job does; returns the path of
    bucket 0's file and its rows (ids, acts) in file order."""
    rng = np.random.default_rng(0)
    kept_ids, kept_acts, start = [], [], 0
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(tmp_path / f"b{k}", "wb")) for k in range(2)]
        for n in blocks:
            ids = np.arange(start, start + n, dtype=np.int64)
            acts = rng.standard_normal((n, d_model)).astype(np.float16)
            buckets = rng.integers(0, 2, size=n, dtype=np.uint16)
            sorted_ids, sorted_acts, counts = shuffle._group_by_bucket(ids, acts, buckets, 2, np.empty_like(acts))
            shuffle._write_segments(files, sorted_ids, sorted_acts, counts)
            kept_ids.append(sorted_ids[:counts[0]]), kept_acts.append(sorted_acts[:counts[0]].copy())
            start += n
    return str(tmp_path / "b0"), np.concatenate(kept_ids), np.concatenate(kept_acts)


@pytest.mark.parametrize("block_rows", [1, 7, 50, 10_000])
def test_segments_read_back_in_order_whatever_the_block_size(tmp_path, block_rows):
    path, ids, acts = _segment_file(tmp_path, [40, 3, 0, 61, 17])
    store = ArtifactStore(str(tmp_path / "store"))
    run = type("Run", (), {"d_model": 4, "dtype": "float16"})()
    blocks = [(i.copy(), a.copy()) for i, a in shuffle._segment_blocks(store, run, path, len(ids), block_rows)]
    assert all(len(i) == min(block_rows, len(ids)) for i, _ in blocks[:-1]), "every block but the last is full"
    assert np.array_equal(np.concatenate([i for i, _ in blocks]), ids)
    assert np.array_equal(np.concatenate([a for _, a in blocks]).view(np.uint16), acts.view(np.uint16))
    # the final pass reads the same file straight into place
    into_ids, into_acts = np.empty(len(ids), np.int64), np.empty((len(ids), 4), np.float16)
    shuffle._read_bucket(store, run, [(path, len(ids))], into_ids, into_acts)
    assert np.array_equal(into_ids, ids) and np.array_equal(into_acts.view(np.uint16), acts.view(np.uint16))


def test_damaged_scatter_files_are_refused_by_name(tmp_path):
    path, ids, _ = _segment_file(tmp_path, [40, 30])
    store = ArtifactStore(str(tmp_path / "store"))
    run = type("Run", (), {"d_model": 4, "dtype": "float16"})()
    with pytest.raises(StorageError, match="b0 has a segment of .* rows where 5 remain"):
        list(shuffle._segment_blocks(store, run, path, 5, 8))  # the manifest says fewer rows than the file holds
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-3])
    with pytest.raises(StorageError, match="b0 is shorter than its manifest and segments say") as caught:
        list(shuffle._segment_blocks(store, run, path, len(ids), 8))
    assert "re-run the scatter job" in str(caught.value)


def test_scatter_files_of_an_older_layout_are_refused_with_the_fix(store):
    make_dataset(store, [20000, 20000])
    run = shuffle.start_shuffle(store, "s", seed=0, **SMALL)
    for job in range(run.plan.n_jobs):
        shuffle.scatter_job(store, "s", 1, job)
    path = store.resolve(shuffle._job_name(run, 1, 0))
    manifest = store.read_json(f"{path}/manifest.json")
    del manifest["layout"]  # what the jobs wrote before segments
    store.fs.pipe_file(f"{path}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(StorageError, match="pass 1 job 0 .* interleaved records .* not in 'segments'") as caught:
        shuffle.finalize_bucket(store, "s", 0)
    assert "re-run every job of scatter pass 1" in str(caught.value)


def test_the_final_pass_keeps_the_permutation_of_a_seed():
    """The final pass gathers each output row from where it arrived: the inverse of the
    Fisher-Yates destinations it drew when it scattered rows, so a seed shuffles as it did."""
    for n in (0, 1, 2, 1000):
        source = shuffle._output_order(np.random.default_rng([3, n]), n)
        destination = np.random.default_rng([3, n]).permutation(n)
        assert np.array_equal(source[destination], np.arange(n))


@pytest.mark.parametrize("sizes, settings, passes, fingerprint", [
    ([3000, 2000], dict(n_buckets=4, memory_budget_bytes=8 * MiB, n_jobs=2), 1, "526195fdb94044de"),
    ([20000, 20000], SMALL, 2, "84d67de9c5f2d074"),
    ([30000, 30000, 30000], dict(n_buckets=3, memory_budget_bytes=1 * MiB, n_jobs=3), 3, "f08bed592c8cee80"),
])
def test_a_seed_shuffles_as_it_did_before_segments_and_the_gather(store, sizes, settings, passes, fingerprint):
    """The order of the row ids (sha256 of their int64 bytes) that the shuffle gave these inputs and
    seed before its scatter files became segments and its final pass a gather (commit 4659ea5): a
    stored shuffle, and every SAE trained on it, must be reproducible by a later version."""
    rows = make_dataset(store, sizes)
    shuffle.run_shuffle(store, "s", seed=5, **settings)
    assert shuffle.load_run(store, "s").plan.n_passes == passes
    ids = assert_exact_permutation(store, "s", rows)
    assert hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()[:16] == fingerprint


def test_the_store_index_is_recorded_whatever_the_name(store):
    """Which hook-point store a shuffle reads is recorded in its plan and index, never read back from
    its name: a shuffle named like a second hook point's store still reads the store it was given."""
    make_dataset(store, [2000], d_model=8)
    run = shuffle.start_shuffle(store, "exp.h2", seed=0, **SMALL)
    assert run.store_index == 0 and shuffle.load_run(store, "exp.h2").store_index == 0
    with pytest.raises(SettingsError, match="collide"):
        shuffle.ShuffleSettings(name="main.h1")


# -- nothing missing is read as zeros (issue 31.3) ----------------------------------------------

def _acts_path(store, key, *parts):
    from sae_platform import catalog

    return catalog.partition_store_path(store, key, store.version_of(store.resolve(f"activations/{key}")),
                                        "data.zarr", "acts", *parts)


def test_a_deleted_chunk_or_an_edited_shape_is_refused_by_the_shuffle_and_its_permutation_check(store):
    """A deleted chunk used to read back as zeros on both sides of the permutation check, which then
    passed; an edited zarr.json shape added zero rows. Both are now errors naming the file and the fix."""
    make_dataset(store, [3000, 3000], chunk_rows=1024)
    shuffle.run_shuffle(store, "s", n_buckets=4, memory_budget_bytes=1 * MiB, n_jobs=2, seed=0)
    assert permutation_check(store, "s")["ok"]

    os.remove(_acts_path(store, "p00", "c", "1", "0"))     # rows 1024..2047 of p00
    for run in (lambda: permutation_check(store, "s"),
                lambda: shuffle.run_shuffle(store, "t", n_buckets=4, memory_budget_bytes=1 * MiB, n_jobs=2, seed=1)):
        with pytest.raises(StorageError) as error:
            run()
        message = str(error.value)
        assert "activation partition 'p00'" in message and "is damaged" in message
        assert "data.zarr/acts/c/1/0 is missing" in message and "sae-platform backfill p00" in message
    assert open_shuffled(store, "s").n_rows == 6000, "the committed shuffled store is untouched"

    meta = Path(_acts_path(store, "p01", "zarr.json"))
    body = json.loads(meta.read_text())
    body["shape"][0] += 1024                                     # 1024 more rows: all zeros
    meta.write_text(json.dumps(body))
    with pytest.raises(StorageError, match=r"activation partition 'p01'.*data.zarr/acts/zarr.json"):
        shuffle.start_shuffle(store, "u", n_buckets=4, memory_budget_bytes=1 * MiB, n_jobs=2, seed=0, keys=["p01"])
    assert store.resolve("shuffle/u/plan") is None


def test_a_deleted_chunk_of_a_shuffled_piece_is_refused_when_read(store):
    rows = make_dataset(store, [5000])
    shuffle.run_shuffle(store, "s", n_buckets=2, memory_budget_bytes=1 * MiB, n_jobs=1, seed=0)
    assert_exact_permutation(store, "s", rows)
    piece = open_shuffled(store, "s").pieces[0]
    folder = Path(store.resolve(piece["name"])) / "data.zarr" / "acts"
    chunk = sorted(p for p in folder.iterdir() if p.name != "zarr.json")[-1]
    chunk.unlink()
    with pytest.raises(StorageError, match=rf"piece {piece['name']} of shuffled store 's'.*acts/{chunk.name} is "
                                           "missing"):
        read_all(store, "s")

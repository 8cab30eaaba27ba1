"""Shuffle throughput: the multi-pass shuffle against the naive one, and one pass against a copy.

    python benchmarks/shuffle_throughput.py --quick        # ~200 MB, under a minute on 2 cores
    python benchmarks/shuffle_throughput.py --mb 2048      # bigger

(a) The whole multi-pass shuffle (scatter into K buckets, then an in-memory shuffle per bucket)
    against the naive approach: K jobs, each streaming the whole input and keeping the rows that
    one global permutation sends to its 1/K of the output. Both get the same memory per job,
    run their jobs one after another in this process, and write the same zarr layout.
(b) One scatter pass against a plain sequential copy (read the same zarr input, write its bytes
    to one file per partition).

Every side reads the input with the shuffle's own reader (``shuffle.partition_blocks``: on a
local store it reads uncompressed chunk files straight into its buffer, ~3x faster than zarr's
decode pipeline on page-cached data), so neither the naive shuffle nor the copy that defines the
ideal pays for zarr overhead the shuffle avoids. The copy writes files of the shuffled store's
chunk size (``plan.chunk_rows`` rows, ~3-4 MB), as many as the shuffle's final pass writes chunk
files, since the store's format fixes that granularity; on this machine that costs the copy
~0.06-0.07 s per 0.2 GB against ~0.05 s for one file per partition.

(c) The whole shuffle against the ideal for its pass count: one sequential read + write of the
    data per pass (the plain copy of (b), measured in the same run, times the number of passes).
    Goal >= 0.7 of ideal.
(d) Full mode only (not --quick): a 4 GB synthetic shuffle through a 64 MB memory budget, in a
    fresh process, its peak RSS (VmHWM) against budget + 64 MB. The figure is the peak above the
    process's RSS once imports are done and the store is opened (the interpreter, numpy, zarr:
    what any process holds before it touches data); the absolute peak is in the line too.

What bounds (c) here: the input and every intermediate file sit in the page cache, so the copy
runs at memory speed (2-4 GB/s read + write). The shuffle also moves every row through memory
once more per pass (a gather by bucket in the scatter pass, a gather into each output chunk in the
final pass: ~10-15 ms per 0.2 GB each, overlapped with writes), and pays fixed costs the copy
does not (the pieces' metadata, and per job a commit with an fsync: ~4 ms per scatter job here).
Where reads and writes cost more (disk or object storage, data beyond RAM) these fixed costs
shrink relative to the I/O.

Input: synthetic activations (random float16 rows, d_model 768) written in the activations
layout in a temporary directory. Every figure is the median of --repeats runs; the two sides
alternate which goes first; between measurements outputs are emptied and moved aside and dirty
pages flushed (``clear``). On this machine's file system (ext4 without a journal) deleting many
files makes creating new ones slow for a minute or more (up to ~0.8 ms a file instead of ~12 us),
and creating ~185 files per shuffle (and ~75 per copy) then costs as much as the data: a run right
after another one in the same folder, or after any mass deletion there, measures that, not the
shuffle. So the run measures how long creating a file takes, before and after (``file_create_us``
in every JSON line), and marks the figures noisy above 100 us (re-run a few minutes later, or in a
fresh folder with --root). The last lines are one JSON object per figure.

What bounds (a): the naive shuffle costs K reads + 1 write of the data, two passes cost
2 reads + 2 writes. Here the input sits in the page cache, so a zarr read costs about half a
zarr write, and the ratio cannot approach (K+1)/4 as it would where reads cost as much as
writes (object storage, data much larger than RAM); read amplification shows the I/O saving.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_help import HelpFormatter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_platform import catalog, shuffle  # noqa: E402
from sae_platform.shuffle_checks import permutation_check  # noqa: E402
from sae_platform.shuffle_plan import ID_BYTES, MIN_GOOD_FILE_BYTES  # noqa: E402
from sae_platform.storage import ArtifactStore  # noqa: E402

CHUNK_BYTES = 4 << 20  # as sae_platform.activations writes them
GOAL_OF_IDEAL = 0.7
BIG_MB, BIG_BUDGET, RSS_SLACK = 4000, 64 << 20, 64 << 20
SLOW_CREATE_US = 100  # a file creation slower than this (median; ~12 us normally) marks the run noisy


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def big_worker(root: str, budget: int, d_model: int) -> None:
    """(d) in a fresh process: the whole shuffle of the store at ``root`` through ``budget``."""
    store = ArtifactStore(root)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _vm("VmRSS")
    started = time.perf_counter()
    summary = shuffle.run_shuffle(store, "big", n_buckets=8, memory_budget_bytes=budget, n_jobs=8, seed=0)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rss_before": before, "hwm": _vm("VmHWM"),
                      "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, dict))}}))


def make_inputs(store: ArtifactStore, total_bytes: int, d_model: int, dtype: str, n_partitions: int) -> int:
    row_bytes = d_model * np.dtype(dtype).itemsize
    rows = total_bytes // row_bytes // n_partitions
    chunk = max(1, CHUNK_BYTES // row_bytes)
    rng = np.random.default_rng(0)
    for p in range(n_partitions):
        with store.writing(catalog.partition_name(f"b{p:03d}")) as version:
            group = store.open_group(f"{version}/{catalog.FIRST_STORE}", "w")
            acts = group.create_array("acts", shape=(rows, d_model), dtype=dtype, chunks=(chunk, d_model),
                                      compressors=None)
            for lo in range(0, rows, chunk * 8):
                hi = min(rows, lo + chunk * 8)
                acts[lo:hi] = rng.standard_normal((hi - lo, d_model), dtype=np.float32).astype(dtype)
            group.attrs.update({"d_model": d_model, "dtype": dtype, "n_rows": rows})
    return rows * n_partitions


def multipass(store: ArtifactStore, k: int, n_jobs: int, budget: int, seed: int) -> dict:
    run = shuffle.start_shuffle(store, "mp", n_buckets=k, memory_budget_bytes=budget, n_jobs=n_jobs, seed=seed)
    started, read = time.perf_counter(), 0
    for p in range(1, run.plan.n_passes):
        read += sum(shuffle.scatter_job(store, "mp", p, j)["bytes_read"] for j in range(run.plan.jobs_in_pass(p)))
    read += sum(shuffle.finalize_bucket(store, "mp", b)["bytes_read"] for b in range(run.plan.n_final_buckets))
    shuffle.commit_shuffled(store, "mp")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes_read": read, "n_passes": run.plan.n_passes, "plan": run.plan}


def naive(store: ArtifactStore, run: shuffle.ShuffleRun, k: int, seed: int) -> dict:
    """K jobs; each draws the global permutation, streams everything, keeps its 1/K."""
    n, d, dtype = run.plan.n_rows, run.d_model, run.dtype
    started, read = time.perf_counter(), 0
    for job in range(k):
        position = np.empty(n, dtype=np.int64)
        position[np.random.default_rng(seed).permutation(n)] = np.arange(n)
        lo, hi = job * n // k, (job + 1) * n // k
        acts_out, ids_out = np.empty((hi - lo, d), dtype=dtype), np.empty(hi - lo, dtype=np.int64)
        for ids, block in shuffle.partition_blocks(store, run, 0, n, run.plan.block_rows):  # the shuffle's reader
            dest = position[ids]
            mine = (dest >= lo) & (dest < hi)
            acts_out[dest[mine] - lo] = block[mine]
            ids_out[dest[mine] - lo] = ids[mine]
            read += block.nbytes
        with store.writing(f"naive/job{job:03d}") as version:
            group = store.open_group(f"{version}/{catalog.FIRST_STORE}", "w")
            c, config = run.plan.chunk_rows, {"write_empty_chunks": True}  # as shuffle._write_piece
            group.create_array("acts", data=acts_out, chunks=(c, d), compressors=None, config=config)
            group.create_array("row_id", data=ids_out, chunks=(c,), compressors=None, config=config)
    return {"seconds": time.perf_counter() - started, "bytes_read": read}


def scatter_pass(store: ArtifactStore, k: int, n_jobs: int, budget: int, seed: int) -> float:
    run = shuffle.start_shuffle(store, "onepass", n_buckets=k, memory_budget_bytes=budget, n_jobs=n_jobs, seed=seed)
    started = time.perf_counter()
    for job in range(run.plan.n_jobs):
        shuffle.scatter_job(store, "onepass", 1, job)
    return time.perf_counter() - started


def plain_copy(store: ArtifactStore, run: shuffle.ShuffleRun) -> float:
    """The floor for one pass: read every input block once (with the shuffle's own reader, so the
    floor is as fast as the shuffle can read), write its bytes once, in files of the shuffled
    store's chunk size (``plan.chunk_rows`` rows)."""
    started = time.perf_counter()
    rows = run.plan.chunk_rows
    folder = store.path("copy")
    store.fs.makedirs(folder, exist_ok=True)
    for part in run.inputs:
        lo, hi = part["offset"], part["offset"] + part["n_rows"]
        for _, block in shuffle.partition_blocks(store, run, lo, hi, run.plan.block_rows):
            for start in range(0, len(block), rows):
                with open(os.path.join(folder, f"{part['key']}.{lo}"), "wb") as f:
                    f.write(block[start:start + rows])
                lo += len(block[start:start + rows])
    return time.perf_counter() - started


def file_create_us(root: str, tag: str, n: int = 100) -> float:
    """Median microseconds to create an empty file under ``root`` now. The files stay until the run
    ends (deleting them would slow the next creations: see ``clear``)."""
    folder = os.path.join(root, f"create-probe-{tag}")
    os.makedirs(folder)
    times = []
    for i in range(n):
        started = time.perf_counter()
        os.close(os.open(os.path.join(folder, str(i)), os.O_CREAT | os.O_WRONLY))
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def clear(store: ArtifactStore, *names: str) -> None:
    """Put a measurement's outputs out of the way: empty every file (its memory is free for the next
    measurement at once), move the folders aside, and flush dirty pages (os.sync) so that writeback
    does not slow the next measurement. The emptied files are deleted when the run ends.

    Not deleted between measurements: ext4 without a journal (this machine's root file system)
    skips, when it creates a file, every inode deleted in the last 60 s (360 s while the inode's
    table block is dirty; fs/ext4/ialloc.c, ``recently_deleted``), so a run that deleted its
    thousands of outputs between measurements made its own file creations slower and slower
    (12 -> ~120 us each over a --quick run), and the shuffle, which creates more files than the
    copy, paid most of it. Keeping outputs whole instead made every side slower and noisier:
    fresh memory costs more here than memory just freed."""
    trash = store.path("trash")
    os.makedirs(trash, exist_ok=True)
    for name in names:
        path = store.path(name)
        if not os.path.exists(path):
            continue
        for folder, _, files in os.walk(path):
            for file in files:
                os.truncate(os.path.join(folder, file), 0)
        os.rename(path, os.path.join(trash, str(len(os.listdir(trash)))))
    os.sync()


def big_shuffle(args, tmp: str) -> dict:
    """(d): a --big-mb synthetic shuffle through a 64 MB budget, in a fresh process."""
    import subprocess

    big = ArtifactStore(os.path.join(tmp, "big"))
    n_rows = make_inputs(big, args.big_mb * 10**6, args.d_model, "float16", n_partitions=8)
    os.sync()
    data = n_rows * args.d_model * 2
    out = subprocess.run([sys.executable, __file__, "--big-worker", big.root, "--d-model", str(args.d_model)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    growth = result["hwm"] - result["rss_before"]
    print(f"(d) {data / 1e9:.2f} GB through a {BIG_BUDGET >> 20} MiB budget: {result['seconds']:.1f} s, peak RSS "
          f"{result['hwm'] / 2**20:.0f} MiB ({growth / 2**20:.0f} MiB above the {result['rss_before'] / 2**20:.0f} MiB "
          f"after imports); goal <= budget + {RSS_SLACK >> 20} MiB = {(BIG_BUDGET + RSS_SLACK) >> 20} MiB")
    shutil.rmtree(big.root, ignore_errors=True)
    return {"metric": "big_shuffle_peak_rss_bytes", "value": growth, "baseline": BIG_BUDGET + RSS_SLACK,
            "ratio": growth / (BIG_BUDGET + RSS_SLACK), "goal": 1.0, "lower_is_better": True, "unit": "bytes",
            "value_is": "VmHWM - VmRSS after imports and opening the store, whole shuffle in one fresh process",
            "baseline_is": "memory budget (64 MiB) + 64 MiB", "peak_rss_absolute": result["hwm"],
            "rss_after_imports": result["rss_before"], "memory_budget_bytes": BIG_BUDGET, "data_GB": data / 1e9,
            "seconds": result["seconds"], "GBps": data / result["seconds"] / 1e9, "synthetic": True,
            "summary": result["summary"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~200 MB: under a minute")
    parser.add_argument("--mb", type=int, default=1024, help="input size in MB")
    parser.add_argument("--d-model", type=int, default=768, help="activation width of the synthetic rows")
    parser.add_argument("--buckets", type=int, default=8, help="K: buckets, and jobs of the naive shuffle")
    parser.add_argument("--repeats", type=int, default=9, help="runs per figure (medians)")
    parser.add_argument("--root", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--big-mb", type=int, default=BIG_MB, help="(d) input size in MB (full mode)")
    parser.add_argument("--big-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.big_worker:
        big_worker(args.big_worker, BIG_BUDGET, args.d_model)
        return
    if args.quick:
        args.mb = 200
    k = args.buckets
    tmp = tempfile.mkdtemp(prefix="shuffle-bench-", dir=args.root)
    try:
        store = ArtifactStore(tmp)
        create_before = file_create_us(tmp, "before")
        n_rows = make_inputs(store, args.mb * 10**6, args.d_model, "float16", n_partitions=4)
        os.sync()
        data = n_rows * args.d_model * 2
        # The naive job holds its 1/K share; both get the same budget, at least 4 input chunks' worth.
        budget = max(int(2 * data / k), 24 << 20)
        # First-pass jobs: as many as K, but few enough that each (job, bucket) file has >= 4 MB.
        n_jobs = max(1, min(k, data // (k * MIN_GOOD_FILE_BYTES)))
        out_bytes = n_rows * (args.d_model * 2 + ID_BYTES)
        print(f"synthetic activations in {tmp}: {n_rows} rows x d_model {args.d_model} float16 = "
              f"{data / 1e9:.3f} GB in 4 partitions; K={k} buckets, {n_jobs} first-pass jobs, "
              f"memory budget per job {budget / 2**20:.0f} MiB (both sides); "
              f"{os.cpu_count()} CPUs; medians of {args.repeats} runs, jobs run one after another")

        ours, theirs, passes, copies = [], [], [], []
        run = shuffle.start_shuffle(store, "probe", n_buckets=k, memory_budget_bytes=budget, n_jobs=n_jobs, seed=0)
        for r in range(args.repeats):
            for side in ("ours", "naive") if r % 2 == 0 else ("naive", "ours"):
                if side == "ours":
                    ours.append(multipass(store, k, n_jobs, budget, seed=r))
                    if r == 0:
                        print(f"  permutation check of the multi-pass output: "
                              f"{'ok' if permutation_check(store, 'mp')['ok'] else 'FAILED'}")
                    clear(store, catalog.shuffle_scratch_name("mp"), catalog.shuffled_name("mp"))
                else:
                    theirs.append(naive(store, run, k, seed=r))
                    clear(store, "naive")
            for side in ("pass", "copy") if r % 2 == 0 else ("copy", "pass"):
                if side == "pass":
                    passes.append(scatter_pass(store, k, n_jobs, budget, seed=r))
                    clear(store, catalog.shuffle_scratch_name("onepass"))
                else:
                    copies.append(plain_copy(store, run))
                    clear(store, "copy")
            print(f"  run {r}: multi-pass {ours[-1]['seconds']:.2f} s ({ours[-1]['n_passes']} passes), "
                  f"naive {theirs[-1]['seconds']:.2f} s, one scatter pass {passes[-1]:.2f} s, copy {copies[-1]:.2f} s")

        t_ours = statistics.median(o["seconds"] for o in ours)
        t_naive = statistics.median(t["seconds"] for t in theirs)
        t_pass, t_copy = statistics.median(passes), statistics.median(copies)
        amp_ours, amp_naive = ours[0]["bytes_read"] / out_bytes, theirs[0]["bytes_read"] / out_bytes
        print(f"(a) full shuffle: multi-pass {data / t_ours / 1e9:.3f} GB/s vs naive {data / t_naive / 1e9:.3f} GB/s "
              f"-> {t_naive / t_ours:.2f}x; read amplification {amp_ours:.2f} vs {amp_naive:.2f} bytes read "
              "per byte of output (naive: K full reads)")
        print(f"(b) one scatter pass {data / t_pass / 1e9:.3f} GB/s vs plain copy {data / t_copy / 1e9:.3f} GB/s "
              f"-> {t_copy / t_pass:.2f} of copy speed")
        n_passes = ours[0]["n_passes"]
        t_ideal = n_passes * t_copy
        print(f"(c) full shuffle {t_ours:.2f} s vs ideal {t_ideal:.2f} s ({n_passes} passes x one sequential "
              f"read+write {t_copy:.2f} s) -> {t_ideal / t_ours:.2f} of ideal (goal >= {GOAL_OF_IDEAL})")
        figures = [
            {"metric": "full_shuffle_throughput_GBps", "value": data / t_ours / 1e9, "baseline": data / t_naive / 1e9,
             "ratio": t_naive / t_ours, "goal": 3.0, "unit": "GB/s", "baseline_is": f"naive, K={k} full reads",
             "n_passes": ours[0]["n_passes"], "data_GB": data / 1e9, "synthetic": True},
            {"metric": "scatter_pass_throughput_GBps", "value": data / t_pass / 1e9, "baseline": data / t_copy / 1e9,
             "ratio": t_copy / t_pass, "goal": 0.5, "unit": "GB/s", "baseline_is": "sequential read+write copy",
             "data_GB": data / 1e9, "synthetic": True},
            {"metric": "read_amplification", "value": amp_ours, "baseline": amp_naive, "ratio": amp_ours / amp_naive,
             "goal": 1 / 3, "lower_is_better": True, "unit": "bytes read per byte of output",
             "baseline_is": f"naive, K={k}", "synthetic": True},
            {"metric": "full_shuffle_fraction_of_ideal", "value": data / t_ours / 1e9,
             "baseline": data / t_ideal / 1e9, "ratio": t_ideal / t_ours, "goal": GOAL_OF_IDEAL, "unit": "GB/s",
             "baseline_is": f"ideal for {n_passes} passes: {n_passes} x (one sequential read + write of the data, "
                            "the plain copy of (b), same run)", "n_passes": n_passes, "data_GB": data / 1e9,
             "synthetic": True},
        ]
        if not args.quick:
            figures.append(big_shuffle(args, tmp))
        load, create_us = os.getloadavg()[0], max(create_before, file_create_us(tmp, "after"))
        slow_files = create_us > SLOW_CREATE_US
        print(f"creating a file here took {create_us:.0f} us (median, the slower of before and after)")
        if slow_files:
            print(f"WARNING: creating a file took {create_us:.0f} us, not ~12: this file system deleted many files "
                  "here in the last minutes (ext4 without a journal then skips those inodes on every creation), "
                  "so the ~185 files of a shuffle and the ~75 of a copy cost more than their data; re-run a few "
                  "minutes later, or with --root in a fresh folder")
        for figure in figures:
            figure["noisy"] = load > (os.cpu_count() or 1) + 0.5 or slow_files
            figure["file_create_us"] = create_us
        for figure in figures:
            print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in figure.items()}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.sync()  # inode-table blocks clean: later creations skip the deleted inodes for 60 s, not 360


if __name__ == "__main__":
    main()

"""Multi-pass global shuffle of cached activations (docs/design.md, "The shuffle").

An SAE trained on rows in cache order learns order-dependent artefacts, so the training store
must be a uniformly random permutation of every cached row, and the data is bigger than any one
job's memory. The seed's algorithm: a *scatter* pass sends every row to a uniformly random
bucket; once a bucket fits in memory, an in-memory Fisher–Yates shuffle finishes it, and the
buckets concatenated in bucket order are a uniform permutation (Jane Street, "How to shuffle a
big dataset"). If buckets are still too big, another scatter pass runs inside each bucket.
With job memory M and K buckets, P passes (the final in-memory one included) shuffle
M, K·M, K²·M, ... Every pass reads and writes the data once; the naive "K jobs each stream
everything" reads it K times.

Rows are identified by their global index (activation partitions in key order, then row
number), which travels with the row so the result can be checked and traced.

Every step is a separate, restartable function, so a Dagster asset partitioned by job index can
call one of them per partition:

    start_shuffle(store, name, ...)            pin inputs + plan    shuffle/<name>/plan
    scatter_job(store, name, pass_index, job)  passes 1..P-1        shuffle/<name>/<plan_id>/pass<p>/job<j>
    finalize_bucket(store, name, bucket)       pass P               shuffled/<name>/pieces-<plan_id>/b<bucket>
    commit_shuffled(store, name)               the visible result   shuffled/<name>  (index.json)

Each output is written through ArtifactStore.writing, so a killed job leaves an uncommitted
version that nobody reads, and a re-run replaces it with exactly one copy of its rows. Jobs are
deterministic given (seed, plan), so a re-run writes the same bytes.

Memory: ``memory_budget_bytes`` bounds the arrays a job allocates (a scatter block and its
regrouped copy; a final bucket, its permutation and the chunks being written). glibc adds slack:
zarr reads on a thread pool and each thread's malloc arena keeps what it freed (the chunk
buffers of every read), so with default malloc settings a worker's peak RSS grew by up to ~1.9x
the budget (4-64 MiB budgets; 135 MiB above a 64 MiB budget over a 4 GB, 4-pass shuffle).
Every job therefore first limits the process to ``MALLOC_ARENAS`` (2) malloc arenas
(``glibc_malloc.limit_arenas``: glibc's ``mallopt(M_ARENA_MAX)``, what ``MALLOC_ARENA_MAX=2`` in the
environment does; an explicit ``MALLOC_ARENA_MAX`` is left as set): at most ~1.35x the budget,
at no cost in speed (docs/design.md, "The shuffle"). The limit is process-wide and stays.

Scatter outputs are raw little-endian files, one per (job, bucket), each a sequence of segments
(one per block the job read that sent the bucket rows): the segment's row count (int64), its rows'
ids (int64), then their acts. Cheap to append while streaming, each bucket is read back with a
few large sequential reads, and neither side interleaves ids and acts row by row
(``_write_segments``). The training-ready store is zarr v3 (acts [n, d_model], row_id [n]) with
fixed-size uncompressed chunks, one piece per final bucket, read back in order by
``sae_platform.shuffled.iter_shuffled``.

Beside this module: the plan's arithmetic (``sae_platform.shuffle_plan``), the committed store's
reader (``sae_platform.shuffled``) and its permutation and uniformity checks
(``sae_platform.shuffle_checks``).
"""

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import NDBuffer

from sae_platform import catalog
from sae_platform.errors import StorageError
from sae_platform.glibc_malloc import limit_arenas
from sae_platform.settings import SettingsError, setting, validate
from sae_platform.shuffle_plan import ShufflePlan, final_bucket_rows, mib, plan_shuffle, require
from sae_platform.storage import ArtifactStore

SCATTER_LAYOUT = "segments"  # the scatter files' layout, named in each job's manifest (_write_segments)
# Threads writing a piece's chunk files: nothing else runs then, and the kernel's page-cache copies
# of two files proceed in parallel (final pass 0.091 -> 0.071 s per 0.2 GB here). The scatter pass
# keeps one writer thread: a second one contended with its reading and grouping and was slower.
PIECE_WRITERS = 2
ROW_ID_CHUNKS = 8  # acts chunks per row_id chunk: 8 x 8 B ids per 1.5-4 KB row, few small files
_SCATTER, _FINAL = 1, 2  # RNG stream tags: scatter and final draws never share a stream
MALLOC_ARENAS = 2  # glibc malloc arenas a shuffle worker keeps (see the module docstring, "Memory")


@dataclass(frozen=True)
class ShuffleSettings:
    """Settings of one shuffle, shared by its plan, passes, final pass and checks
    (``resources.shuffle.config``); docs/design.md ("The shuffle") derives the plan from them."""

    name: str = setting("main", "name of the shuffled store (shuffled/<name>): letters, digits, . _ -")
    n_buckets: int = setting(8, "K: buckets per scatter job", ge=2)
    memory_budget_bytes: int = setting(1 << 30, "M: bytes one shuffle job may hold in memory", ge=1 << 16)
    seed: int = setting(0, "same seed + same inputs = same permutation", ge=0)

    def __post_init__(self):
        validate(self, "resources.shuffle.config")
        catalog.check_name(self.name, "resources.shuffle.config.name")
        if catalog.is_hook_store_name(self.name):
            raise SettingsError(f"resources.shuffle.config.name {self.name!r} ends like the shuffled store of a "
                                "second hook point (<name>.h<i>), which it would collide with",
                                "choose a name that does not end in .h and a number")


# -- starting a shuffle: pin the inputs ---------------------------------------------------------


@dataclass(frozen=True)
class ShuffleRun:
    """A plan bound to pinned input versions and a seed: what every job of one shuffle agrees on."""

    name: str
    plan_id: str
    seed: int
    d_model: int
    dtype: str
    inputs: tuple[dict, ...]  # key, version, n_rows, offset (global index of its first row)
    plan: ShufflePlan = field(repr=False)
    store_index: int = 0  # the hook-point entry whose store (catalog.store_group) every input is read from


def describe_plan(store: ArtifactStore, name: str, *, n_buckets: int, memory_budget_bytes: int, n_jobs: int,
                  seed: int, keys: list[str] | None = None, store_index: int = 0) -> dict:
    """The plan the current inputs and settings give, with its ``plan_id``, without writing it.
    ``store_index``: which hook-point entry's store of each partition to read (``catalog.store_group``).
    It is always recorded; 0, the first, is left out of the hashed body so that the plan ids of
    first-entry stores are those of the stores shuffled before the index was recorded."""
    catalog.check_name(name, "shuffle name")
    require(isinstance(seed, int) and seed >= 0, f"seed={seed!r} is not a non-negative integer",
             "use a seed such as 0")
    inputs, d_model, dtype, chunk_rows = _describe_inputs(store, keys, catalog.store_group(store_index))
    n_rows = sum(i["n_rows"] for i in inputs)
    plan = plan_shuffle(n_rows, d_model * np.dtype(dtype).itemsize, n_buckets, memory_budget_bytes, n_jobs,
                        chunk_rows)
    body = {"name": name, "seed": seed, "d_model": d_model, "dtype": dtype, "inputs": inputs,
            "plan": _plan_dict(plan), **({"store_index": store_index} if store_index else {})}
    plan_id = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
    return {**body, "plan_id": plan_id, "store_index": store_index}


def start_shuffle(store: ArtifactStore, name: str, *, n_buckets: int, memory_budget_bytes: int, n_jobs: int,
                  seed: int, keys: list[str] | None = None, store_index: int = 0) -> ShuffleRun:
    """Validate and pin the inputs, plan, and commit the plan so that every job sees the same rows.

    Re-running with the same inputs and settings keeps the plan (and the jobs already done).
    """
    body = describe_plan(store, name, n_buckets=n_buckets, memory_budget_bytes=memory_budget_bytes, n_jobs=n_jobs,
                         seed=seed, keys=keys, store_index=store_index)
    current = store.pointer(_plan_name(name))
    if current is None or current.get("plan_id") != body["plan_id"]:
        with store.writing(_plan_name(name), plan_id=body["plan_id"]) as version:
            store.write_json(f"{version}/plan.json", body)
    return load_run(store, name)


def planned_id(store: ArtifactStore, name: str) -> str | None:
    """The plan id of the shuffle's current plan (None before any plan)."""
    pointer = store.pointer(_plan_name(name))
    return pointer.get("plan_id") if pointer else None


def pinned_keys(store: ArtifactStore, name: str) -> list[str]:
    """The activation partitions the committed shuffled store was built from, sorted: what the SAEs
    trained on it (and their feature tables) describe."""
    path = store.require(catalog.shuffled_name(name), f"the shuffled store {name!r}",
                         "materialize shuffled_activations first")
    return sorted(i["key"] for i in store.read_json(f"{path}/{catalog.SHUFFLED_INDEX}")["inputs"])


def committed_plan_id(store: ArtifactStore, name: str) -> str | None:
    """The plan id of the committed shuffled store (None when nothing is committed)."""
    pointer = store.pointer(catalog.shuffled_name(name))
    return pointer.get("plan_id") if pointer else None


def load_run(store: ArtifactStore, name: str) -> ShuffleRun:
    path = store.require(_plan_name(name), f"the plan of shuffle {name!r}", "run start_shuffle first")
    body = store.read_json(f"{path}/plan.json")
    return ShuffleRun(body["name"], body["plan_id"], body["seed"], body["d_model"], body["dtype"],
                      tuple(body["inputs"]), _plan_from_dict(body["plan"]), catalog.shuffled_store_index(body))


def run_from_index(index: dict) -> ShuffleRun:
    """The run a committed store came from (its ``index.json``), even if a newer plan has been
    started since: what ``shuffle_checks.permutation_check`` reads the inputs by."""
    return ShuffleRun(index["name"], index["plan_id"], index["seed"], index["d_model"], index["dtype"],
                      tuple(index["inputs"]), _plan_from_dict(index["plan"]), catalog.shuffled_store_index(index))


def _describe_inputs(store: ArtifactStore, keys: list[str] | None,
                     group: str = catalog.FIRST_STORE) -> tuple[list[dict], int, str, int]:
    """Pinned versions and offsets of the input partitions; refuses mixes that cannot be one dataset."""
    if keys is None:
        keys = catalog.list_partitions(store)
    require(len(keys) > 0, "there are no committed activation partitions to shuffle",
             "materialize the activations asset first")
    require(len(set(keys)) == len(keys), f"input keys repeat: {sorted(keys)}", "list each partition once")
    inputs, shapes, offset = [], {}, 0
    for key in sorted(keys):
        pointer = store.pointer(catalog.partition_name(key))
        if pointer is None:
            raise StorageError(f"activation partition {key!r} is missing (nothing committed at "
                               f"{store.url(store.path(catalog.partition_name(key)))})",
                               "materialize the activations asset for that partition first, "
                               "or leave it out of the shuffle's inputs")
        acts = _open_acts(store, key, pointer["version"], group)
        require(acts.ndim == 2, f"activation partition {key!r} has acts of shape {acts.shape}, not [rows, d_model]",
                 "re-materialize that partition")
        shapes[key] = (int(acts.shape[1]), str(acts.dtype), int(acts.chunks[0]))
        inputs.append({"key": key, "version": pointer["version"], "n_rows": int(acts.shape[0]), "offset": offset})
        offset += int(acts.shape[0])
    kinds = {(d, t) for d, t, _ in shapes.values()}
    if len(kinds) > 1:
        listing = ", ".join(f"{k}: d_model {d} {t}" for k, (d, t, _) in shapes.items())
        raise StorageError(f"activation partitions differ in d_model or dtype ({listing}); their rows cannot "
                           "form one training set",
                           "shuffle only partitions cached with the same model, layer and dtype (pass keys=...), "
                           "or re-cache the odd ones")
    (d_model, dtype), = kinds
    return inputs, d_model, dtype, max(c for _, _, c in shapes.values())


def _open_acts(store: ArtifactStore, key: str, version: str, group: str = catalog.FIRST_STORE):
    what = f"activation partition {key!r}"
    return store.open_checked_group(catalog.partition_name(key), version, group, what)["acts"]


# -- scatter passes -----------------------------------------------------------------------------


def scatter_job(store: ArtifactStore, name: str, pass_index: int, job_index: int,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Stream this job's rows once, sending each to a random bucket; commit one file per bucket.

    Files hold rows in arrival order: the final in-memory shuffle makes any within-file order
    irrelevant, so shuffling here would be wasted work.
    """
    limit_arenas(MALLOC_ARENAS)
    run = load_run(store, name)
    plan = run.plan
    require(1 <= pass_index < plan.n_passes,
             f"pass {pass_index} is not a scatter pass: the plan has scatter passes 1..{plan.n_passes - 1}",
             "run scatter passes 1..n_passes-1, then finalize_bucket")
    _check_index("job", job_index, plan.jobs_in_pass(pass_index))
    K = plan.n_buckets
    base = 0 if pass_index == 1 else job_index * K  # sub-buckets of bucket j are j*K .. j*K+K-1
    rng = np.random.default_rng([run.seed, _SCATTER, pass_index, job_index])
    counts = np.zeros(K, dtype=np.int64)
    total = _job_rows(store, run, pass_index, job_index)
    started, done = time.perf_counter(), 0
    with store.writing(_job_name(run, pass_index, job_index), plan_id=run.plan_id) as version:
        with contextlib.ExitStack() as files:
            out = [files.enter_context(_open_for_write(store, f"{version}/{_bucket_file(base + k)}"))
                   for k in range(K)]
            # One writer thread: block i is written while block i+1 is read and grouped (writes and
            # numpy's copies release the GIL). Two gathered buffers take turns, which with the read
            # block is three of the plan's four blocks (plan_shuffle, per_row). The writer shuts
            # down (waiting for the last write) before the files close. A second writer thread was
            # no faster: the pass is bound by the kernel's page-cache writes, not by the thread.
            writer = files.enter_context(ThreadPoolExecutor(1, thread_name_prefix="shuffle-writer"))
            gathered = [np.empty((min(plan.block_rows, max(total, 1)), run.d_model), dtype=run.dtype)
                        for _ in range(2)]
            pending = None
            for ids, acts in _job_blocks(store, run, pass_index, job_index):
                buckets = rng.integers(0, K, size=len(ids), dtype=np.uint16 if K <= 1 << 16 else np.uint32)
                grouped = _group_by_bucket(ids, acts, buckets, K, gathered[0])
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write_segments, out, *grouped)
                gathered.reverse()
                counts += grouped[2]
                done += len(ids)
                if progress:
                    progress(done, total)
            if pending is not None:
                pending.result()
        require(done == total, f"pass {pass_index} job {job_index} read {done} rows, expected {total}",
                 "an input changed while the job ran: re-run the job")
        manifest = {"plan_id": run.plan_id, "first_bucket": base, "counts": counts.tolist(),
                    "layout": SCATTER_LAYOUT}
        store.fs.pipe_file(f"{version}/manifest.json", json.dumps(manifest).encode())  # the commit makes it visible
    seconds = time.perf_counter() - started
    read = done * (plan.row_bytes if pass_index == 1 else plan.record_bytes)
    return {"pass": pass_index, "job": job_index, "rows": done, "bytes_read": read,
            "bytes_written": done * plan.record_bytes, "seconds": seconds, "rows_per_second": done / max(seconds, 1e-9),
            "min_file_rows": int(counts.min()), "max_file_rows": int(counts.max())}


def _group_by_bucket(ids, acts, buckets, n_buckets, into: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, acts, rows per bucket) with the rows ordered by bucket (a stable radix sort for <=16-bit
    keys); the acts are gathered into ``into`` in one pass (``np.take`` with an in-range index
    needs no temporary)."""
    order = np.argsort(buckets, kind="stable")
    sorted_acts = into[:len(ids)] if len(ids) <= len(into) else np.empty_like(acts)
    np.take(acts, order, axis=0, out=sorted_acts, mode="clip")
    return ids[order], sorted_acts, np.bincount(buckets, minlength=n_buckets)


def _write_segments(out: list, ids: np.ndarray, acts: np.ndarray, counts: np.ndarray) -> None:
    """Append bucket k's rows (rows [sum(counts[:k]), sum(counts[:k+1])) of ``ids``/``acts``) to file k
    as one segment: its row count (int64), the rows' ids (int64), then their acts, all little-endian
    (``_segments`` reads them). Ids and acts apart, each contiguous, so that neither side
    interleaves rows into records: a strided copy of every row that cost ~3x the gather itself."""
    for file, (lo, hi) in zip(out, _spans(counts)):
        if hi > lo:
            file.write(np.int64(hi - lo).astype("<i8").tobytes() + ids[lo:hi].astype("<i8", copy=False).tobytes())
            file.write(acts[lo:hi].astype(acts.dtype.newbyteorder("<"), copy=False).view(np.uint8).data)


def _spans(counts: np.ndarray) -> list[tuple[int, int]]:
    ends = np.cumsum(counts)
    return list(zip((ends - counts).tolist(), ends.tolist()))


def _job_rows(store: ArtifactStore, run: ShuffleRun, pass_index: int, job_index: int) -> int:
    if pass_index == 1:
        lo, hi = _job_range(run, job_index)
        return hi - lo
    return sum(n for _, n in _bucket_sources(store, run, pass_index - 1, job_index))


def _job_blocks(store, run, pass_index, job_index) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pass 1 reads its 1/N share of the partitions; later passes read their parent bucket's files."""
    if pass_index == 1:
        yield from partition_blocks(store, run, *_job_range(run, job_index), run.plan.block_rows)
    else:
        for path, count in _bucket_sources(store, run, pass_index - 1, job_index):
            yield from _segment_blocks(store, run, path, count, run.plan.block_rows)


def _job_range(run: ShuffleRun, job_index: int) -> tuple[int, int]:
    n, N = run.plan.n_rows, run.plan.n_jobs
    return job_index * n // N, (job_index + 1) * n // N


def partition_blocks(store, run, lo: int, hi: int, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Global rows [lo, hi) as (ids, acts) blocks, each read ending on a chunk boundary; acts is
    a view of one buffer per partition, valid until the next block is requested."""
    for part in run.inputs:
        start, stop = max(lo - part["offset"], 0), min(hi - part["offset"], part["n_rows"])
        if start >= stop:
            continue
        acts = _open_pinned(store, run, part)
        chunk = acts.chunks[0]
        block = max(chunk, block_rows - block_rows % chunk)
        # One buffer per partition, allocated here, that zarr reads into: zarr would otherwise
        # allocate every block on its I/O thread, in that thread's malloc arena.
        buffer = np.empty((min(block, stop - start), acts.shape[1]), dtype=acts.dtype)
        folder = _raw_chunk_folder(store, run, part, acts)
        while start < stop:
            end = min(stop, (start // chunk) * chunk + block)
            out = buffer[:end - start]
            if folder is None:
                acts.get_basic_selection((slice(start, end),), out=NDBuffer.from_numpy_array(out))
            else:
                _read_raw_rows(acts, folder, start, end, out)
            yield np.arange(part["offset"] + start, part["offset"] + end, dtype=np.int64), out
            start = end


def _raw_chunk_folder(store, run, part: dict, acts) -> str | None:
    """The folder of ``acts``'s chunk files when they can be read straight into a buffer: a local
    store, one chunk across d_model and the bytes codec alone in the machine's byte order (what
    sae_platform.activations writes), so a chunk file is its rows' bytes (zarr v3 spec, "Chunk
    encoding"). Reading them directly skips zarr's decode pipeline and its copy of every chunk:
    about 3x faster on page-cached input (docs/design.md, "The shuffle"). None: read through zarr."""
    codecs = acts.metadata.codecs
    if not store.is_local or len(codecs) != 1 or acts.chunks[1] != acts.shape[1] \
            or codecs[0].to_dict().get("name") != "bytes":
        return None
    endian = (codecs[0].to_dict().get("configuration") or {}).get("endian", "little")
    if np.dtype(acts.dtype).itemsize > 1 and endian != sys.byteorder:
        return None
    group = catalog.store_group(run.store_index)
    return catalog.partition_store_path(store, part["key"], part["version"], group, "acts")


def _read_raw_rows(acts, folder: str, start: int, end: int, out: np.ndarray) -> None:
    """Rows [start, end) of ``acts`` into ``out``, from the chunk files in ``folder``."""
    chunk, row_bytes = acts.chunks[0], out[:1].nbytes
    view = memoryview(out.reshape(-1).view(np.uint8))
    fill = acts.metadata.fill_value
    row = start
    while row < end:
        c = row // chunk
        upto = min(end, (c + 1) * chunk)
        into = view[(row - start) * row_bytes:(upto - start) * row_bytes]
        path = f"{folder}/{acts.metadata.encode_chunk_key((c, 0))}"
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek((row - c * chunk) * row_bytes)
                _read_into(f, into, f"chunk file {path} is shorter than its array's chunk shape",
                           "re-materialize that activation partition")
        except FileNotFoundError:  # zarr leaves chunks equal to the fill value unwritten
            out[row - start:upto - start] = fill
        row = upto


def _open_pinned(store: ArtifactStore, run: ShuffleRun, part: dict):
    pointer = store.pointer(catalog.partition_name(part['key']))
    if pointer is None or pointer["version"] != part["version"]:
        raise StorageError(f"activation partition {part['key']!r} changed or vanished since shuffle "
                           f"{run.name!r} was planned; its row indices would no longer match",
                           "re-run start_shuffle (the shuffle asset) from scratch")
    return _open_acts(store, part["key"], part["version"], catalog.store_group(run.store_index))


def _segment_blocks(store, run, path: str, count: int, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, acts) of a scatter file of ``count`` rows in blocks of ``block_rows`` rows (the last one
    shorter), read into one buffer: each block is valid until the next one is requested. Acts are
    read straight into the buffer; a segment may span blocks."""
    rows = min(block_rows, count)
    acts_buffer = np.empty((rows, run.d_model), dtype=np.dtype(run.dtype).newbyteorder("<"))
    ids_buffer = np.empty(rows, dtype="<i8")
    filled = 0
    with store.fs.open(path, "rb") as f:
        for n, segment_ids in _segments(f, path, count):
            at = 0
            while at < n:
                m = min(n - at, rows - filled)
                _read_rows(f, acts_buffer[filled:filled + m], path)
                ids_buffer[filled:filled + m] = segment_ids[at:at + m]
                filled, at = filled + m, at + m
                if filled == rows:
                    yield ids_buffer, acts_buffer
                    filled = 0
        if filled:
            yield ids_buffer[:filled], acts_buffer[:filled]


def _segments(f, path: str, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """Per segment of a scatter file of ``count`` rows (``_write_segments``): its row count n and its
    ids; the caller reads the segment's n rows of acts before asking for the next segment."""
    left = 0
    while left < count:
        header = np.empty(1, dtype="<i8")
        _read_rows(f, header, path)
        n = int(header[0])
        require(0 < n <= count - left, f"bucket file {path} has a segment of {n} rows where {count - left} remain: "
                 "it is damaged, or not a scatter file of this plan", "re-run the scatter job that wrote it")
        ids = np.empty(n, dtype="<i8")
        _read_rows(f, ids, path)
        yield n, ids
        left += n


def _read_rows(f, into: np.ndarray, path: str) -> None:
    """Fill the contiguous array ``into`` from a scatter file."""
    _read_into(f, memoryview(into.reshape(-1).view(np.uint8)), f"bucket file {path} is shorter than its "
               "manifest and segments say", "re-run the scatter job that wrote it")


def _read_into(f, view: memoryview, problem: str, fix: str) -> None:
    """Fill ``view`` from ``f``; StorageError(problem, fix) when the file ends first."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise StorageError(problem, fix)
        got += n


def _bucket_sources(store, run: ShuffleRun, after_pass: int, bucket: int) -> list[tuple[str, int]]:
    """(file, rows) making up ``bucket`` after scatter pass ``after_pass``: every pass-1 job wrote
    one file per bucket; in later passes only the parent bucket's job wrote it."""
    K = run.plan.n_buckets
    jobs = range(run.plan.n_jobs) if after_pass == 1 else [bucket // K]
    sources = []
    for job in jobs:
        path = store.require(_job_name(run, after_pass, job), f"pass {after_pass} job {job} of shuffle {run.name!r}",
                             f"run scatter_job(pass_index={after_pass}, job_index={job}) first")
        manifest = store.read_json(f"{path}/manifest.json")
        layout = manifest.get("layout")
        require(layout == SCATTER_LAYOUT,
                 f"pass {after_pass} job {job} of shuffle {run.name!r} wrote its files in "
                 f"{'layout ' + repr(layout) if layout else 'interleaved records (no layout named)'}, not in "
                 f"{SCATTER_LAYOUT!r}: an older sae-platform wrote them",
                 f"re-run every job of scatter pass {after_pass} (scatter_job(pass_index={after_pass}, job_index=j) "
                 "for each j) and the passes after it, or the whole shuffle (delete_scratch, then every pass)")
        count = manifest["counts"][bucket - manifest["first_bucket"]]
        if count:
            sources.append((f"{path}/{_bucket_file(bucket)}", count))
    return sources


# -- the final pass: in-memory Fisher–Yates per bucket ------------------------------------------


def finalize_bucket(store: ArtifactStore, name: str, bucket: int) -> dict:
    """Shuffle one final bucket in memory (a permutation drawn with Generator.permutation, i.e.
    Fisher–Yates); commit it as one zarr piece.

    The bucket is read once, in arrival order, straight into one array; each output chunk then
    gathers its rows into a chunk buffer that is written at once, so the gathering of one chunk
    overlaps the writing of another (``_write_piece``) and the bucket is held once.
    """
    limit_arenas(MALLOC_ARENAS)
    run = load_run(store, name)
    plan = run.plan
    _check_index("bucket", bucket, plan.n_final_buckets)
    started = time.perf_counter()
    sources = None if plan.n_passes == 1 else _bucket_sources(store, run, plan.n_passes - 1, bucket)
    n = plan.n_rows if sources is None else sum(count for _, count in sources)
    if n > final_bucket_rows(plan.memory_budget_bytes, plan.row_bytes):
        raise StorageError(f"final bucket {bucket} holds {n} rows ({mib(n * plan.record_bytes)}), more than the "
                           f"{mib(plan.memory_budget_bytes)} budget can shuffle in memory",
                           "re-plan with more buckets (n_buckets) or a larger memory_budget_bytes")
    source = _output_order(np.random.default_rng([run.seed, _FINAL, plan.n_passes, bucket]), n)
    acts, ids = np.empty((n, run.d_model), dtype=run.dtype), np.empty(n, dtype=np.int64)
    _read_bucket(store, run, sources, ids, acts)
    with store.writing(_piece_name(run, bucket), plan_id=run.plan_id, n_rows=n) as version:
        if n:
            _write_piece(store, run, f"{version}/{catalog.PIECE_STORE}", acts, ids, order=source)
    seconds = time.perf_counter() - started
    return {"bucket": bucket, "rows": n, "bytes_read": n * (plan.row_bytes if sources is None else plan.record_bytes),
            "bytes_written": n * plan.record_bytes, "seconds": seconds}


def _read_bucket(store, run: ShuffleRun, sources, ids: np.ndarray, acts: np.ndarray) -> None:
    """Every row of a final bucket into ``ids``/``acts``, in arrival order: the scatter files'
    segments are read straight into place; a single-pass plan's bucket is the whole input."""
    filled = 0
    if sources is None:
        # a quarter block at a time: the bucket (70% of the budget) is already allocated
        quarter = max(1, run.plan.block_rows // 4)
        for block_ids, block_acts in partition_blocks(store, run, 0, run.plan.n_rows, quarter):
            ids[filled:filled + len(block_ids)], acts[filled:filled + len(block_ids)] = block_ids, block_acts
            filled += len(block_ids)
    for path, count in sources or []:
        with store.fs.open(path, "rb") as f:
            for n, segment_ids in _segments(f, path, count):
                ids[filled:filled + n] = segment_ids
                _read_rows(f, acts[filled:filled + n], path)
                filled += n
    require(filled == len(ids), f"final bucket read {filled} rows, its manifests say {len(ids)}",
             "re-run the scatter jobs of its pass")
    if sources and sys.byteorder != "little":  # the files hold little-endian acts, read as raw bytes
        acts.byteswap(inplace=True)


def _output_order(rng: np.random.Generator, n: int) -> np.ndarray:
    """Which arrival row lands at each output position: the inverse of ``rng.permutation(n)``, the
    destination of each arrival row (Fisher–Yates). The inverse keeps the permutation of a seed what
    it was when the final pass scattered rows to their destinations instead of gathering them, so
    stores (and SAEs trained on them) shuffled before stay reproducible."""
    destination = rng.permutation(n)
    source = np.empty(n, dtype=np.int64)
    source[destination] = np.arange(n)
    return source


def _write_piece(store, run: ShuffleRun, path: str, acts: np.ndarray, ids: np.ndarray,
                 order: np.ndarray | None = None) -> None:
    """The piece as a zarr v3 group of uncompressed arrays acts [n, d_model] (chunks of
    ``chunk_rows`` rows) and row_id [n] (chunks of ``ROW_ID_CHUNKS`` x ``chunk_rows``), its files
    written here from ``acts[order]`` and ``ids[order]`` (``acts`` and ``ids`` when order is None).
    ``PIECE_WRITERS`` threads write every file of the piece; with an order, each thread gathers a
    chunk's rows into a buffer of its own (one chunk per array), then writes it, so gathering one
    chunk overlaps writing another and the piece is never held twice.

    With the bytes codec alone a chunk file is its rows' little-endian bytes, the edge chunk padded
    to the full chunk shape (zarr v3 spec, "Chunk encoding"); chunk keys use "." separators, so an
    array's chunks share one directory. The metadata documents are zarr's own (``_piece_layout``),
    with this piece's shape. Going through zarr instead costs a copy, a directory, a temporary file
    and a rename per chunk, and a round trip to zarr's I/O thread per call: about half the final
    pass's time (docs/design.md, "The shuffle"). The rename would buy nothing: the version directory
    is invisible until ``ArtifactStore.writing`` commits it.
    """
    layout = _piece_layout(run.dtype, run.d_model, run.plan.chunk_rows)
    documents, chunks = [(f"{path}/zarr.json", layout["group"])], []
    for name, data in (("acts", acts), ("row_id", ids)):
        array = layout[name]
        _makedirs(store, f"{path}/{name}")
        documents.append((f"{path}/{name}/zarr.json",
                          json.dumps({**array["meta"], "shape": list(data.shape)}, indent=2).encode()))
        data = data.astype(data.dtype.newbyteorder("<"), copy=False)
        rows = array["rows"]
        chunks += [(f"{path}/{name}/{array['key'](i)}", data, order, i * rows, rows)
                   for i in range(math.ceil(len(data) / rows))]
    buffers = threading.local()  # per writer thread: a chunk buffer per array it gathered into

    def write_chunk(file, data, rows_of, start, rows):
        if rows_of is None:
            block = data[start:start + rows]
        else:
            key, mine = (rows, data.shape[1:], data.dtype.str), buffers.__dict__.setdefault("chunks", {})
            if key not in mine:
                mine[key] = np.empty((rows,) + data.shape[1:], dtype=data.dtype)
            buffer = mine[key]
            picked = rows_of[start:start + rows]
            block = buffer[:len(picked)]
            np.take(data, picked, axis=0, out=block, mode="clip")  # in range: no temporary
        with _open_for_write(store, file) as f:
            f.write(np.ascontiguousarray(block).view(np.uint8).data)
            if len(block) < rows:  # the edge chunk, padded with the fill value (0)
                f.write(bytes((rows - len(block)) * block[:1].nbytes))

    with ThreadPoolExecutor(PIECE_WRITERS, thread_name_prefix="shuffle-piece") as pool:
        done = [pool.submit(write_chunk, *chunk) for chunk in chunks]
        done += [pool.submit(_put_file, store, file, body) for file, body in documents]
        for future in done:
            future.result()  # re-raises a failed write here


@functools.lru_cache(maxsize=16)
def _piece_layout(dtype: str, d_model: int, chunk_rows: int) -> dict:
    """zarr's metadata documents for a piece's group and arrays (built once, in memory), the rows per
    chunk and the chunk key of chunk i of each array."""
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    flat = {"name": "default", "separator": "."}
    layout = {"group": group.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()}
    for name, shape, chunks, dt in (("acts", (1, d_model), (chunk_rows, d_model), dtype),
                                    ("row_id", (1,), (chunk_rows * ROW_ID_CHUNKS,), "int64")):
        array = group.create_array(name, shape=shape, dtype=dt, chunks=chunks, compressors=None,
                                   chunk_key_encoding=flat)
        codecs = [c.to_dict() for c in array.metadata.codecs]
        require([c["name"] for c in codecs] == ["bytes"] and codecs[0].get("configuration", {}).get("endian", "little")
                 == "little", f"zarr encodes uncompressed {dt} arrays with {codecs}, not the little-endian bytes codec "
                 "alone, which the shuffle writes itself", "report this with the zarr version installed")
        meta = json.loads(array.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
        layout[name] = {"meta": meta, "rows": chunks[0],
                        "key": functools.partial(lambda md, i: md.encode_chunk_key((i,) + (0,) * (len(md.shape) - 1)),
                                                 array.metadata)}
    return layout


def _put_file(store: ArtifactStore, path: str, data: bytes) -> None:
    with _open_for_write(store, path) as f:
        f.write(data)


def _makedirs(store: ArtifactStore, path: str) -> None:
    if store.is_local:
        os.makedirs(path, exist_ok=True)  # as _open_for_write: fsspec's local makedirs costs more
    else:
        store.fs.makedirs(path, exist_ok=True)


def _open_for_write(store: ArtifactStore, path: str):
    # The local file system straight through the OS: fsspec's local opener adds a few hundred
    # microseconds per file, most of it os.makedirs of the (existing) folder; the caller makes the
    # folder once. Other file systems (S3) through fsspec.
    return open(path, "wb") if store.is_local else store.fs.open(path, "wb")


# -- commit and clean up ------------------------------------------------------------------------


def commit_shuffled(store: ArtifactStore, name: str) -> dict:
    """Make the result visible at once: an index of every final piece, written only if all exist."""
    run = load_run(store, name)
    pieces, missing, offset = [], [], 0
    for bucket in range(run.plan.n_final_buckets):
        pointer = store.pointer(_piece_name(run, bucket))
        if pointer is None or pointer.get("plan_id") != run.plan_id:
            missing.append(bucket)
            continue
        pieces.append({"name": _piece_name(run, bucket), "n_rows": pointer["n_rows"], "offset": offset})
        offset += pointer["n_rows"]
    if missing:
        raise StorageError(f"{len(missing)} of {run.plan.n_final_buckets} final buckets of shuffle {name!r} are "
                           f"not finalized (first: {missing[:5]})",
                           "run finalize_bucket for each of them, then commit again")
    if offset != run.plan.n_rows:
        raise StorageError(f"the final buckets of shuffle {name!r} hold {offset} rows, the inputs {run.plan.n_rows}",
                           "delete the shuffle (delete_shuffle) and run it again from start_shuffle")
    index = {"name": name, "plan_id": run.plan_id, "seed": run.seed, "n_rows": offset, "d_model": run.d_model,
             "dtype": run.dtype, "chunk_rows": run.plan.chunk_rows, "n_passes": run.plan.n_passes,
             "inputs": list(run.inputs), "plan": _plan_dict(run.plan), "pieces": pieces,
             "store_index": run.store_index}
    with store.writing(catalog.shuffled_name(name), plan_id=run.plan_id, n_rows=offset) as version:
        store.write_json(f"{version}/{catalog.SHUFFLED_INDEX}", index)
    _drop_stale_pieces(store, run)
    return {"n_rows": offset, "pieces": len(pieces), "n_passes": run.plan.n_passes, "plan_id": run.plan_id}


def _drop_stale_pieces(store, run: ShuffleRun) -> None:
    # Pieces of earlier plans are superseded: a run still training on them keeps reading them for
    # the store's grace period (ArtifactStore.retire), then they go.
    keep = catalog.shuffle_pieces_folder(run.plan_id)
    for entry in store.fs.ls(catalog.shuffled_folder(store, run.name), detail=False):
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(catalog.PIECES_PREFIX) and base != keep:
            store.retire(entry, superseded_by=keep)


def delete_scratch(store: ArtifactStore, name: str) -> None:
    """The scatter files are as large as the data; drop them once the result is committed."""
    with contextlib.suppress(FileNotFoundError):
        for entry in store.fs.ls(catalog.shuffle_scratch_folder(store, name), detail=False):
            if entry.rstrip("/").rsplit("/", 1)[-1] != "plan":
                store.fs.rm(entry, recursive=True)


def delete_shuffle(store: ArtifactStore, name: str) -> None:
    """Forget a shuffle entirely: its plan, scratch files and committed result."""
    catalog.check_name(name, "shuffle name")
    store.delete(catalog.shuffled_name(name))
    store.delete(catalog.shuffle_scratch_name(name))


def run_shuffle(store: ArtifactStore, name: str, *, n_buckets: int, memory_budget_bytes: int, n_jobs: int,
                seed: int, keys: list[str] | None = None, keep_scratch: bool = False, store_index: int = 0) -> dict:
    """Every step in sequence in this process: for tests, benchmarks and small local runs.
    ``store_index``: the hook-point entry whose store to shuffle (``start_shuffle``)."""
    run = start_shuffle(store, name, n_buckets=n_buckets, memory_budget_bytes=memory_budget_bytes,
                        n_jobs=n_jobs, seed=seed, keys=keys, store_index=store_index)
    started = time.perf_counter()
    for p in range(1, run.plan.n_passes):
        for job in range(run.plan.jobs_in_pass(p)):
            scatter_job(store, name, p, job)
    for bucket in range(run.plan.n_final_buckets):
        finalize_bucket(store, name, bucket)
    summary = commit_shuffled(store, name)
    if not keep_scratch:
        delete_scratch(store, name)
    return {**summary, "seconds": time.perf_counter() - started, "plan": _plan_dict(run.plan)}


# -- small helpers ------------------------------------------------------------------------------


def _plan_dict(plan: ShufflePlan) -> dict:
    d = asdict(plan)
    d["warnings"] = list(d["warnings"])
    return d


def _plan_from_dict(d: dict) -> ShufflePlan:
    return ShufflePlan(**{**d, "warnings": tuple(d["warnings"])})


def _plan_name(name: str) -> str:
    return catalog.shuffle_plan_name(name)


def _job_name(run: ShuffleRun, pass_index: int, job_index: int) -> str:
    return catalog.shuffle_job_name(run.name, run.plan_id, pass_index, job_index)


def _piece_name(run: ShuffleRun, bucket: int) -> str:
    return catalog.shuffle_piece_name(run.name, run.plan_id, bucket)


def _bucket_file(bucket: int) -> str:
    # ".seg": the segment layout (_write_segments). Record files were ".rec", so a worker of an
    # older sae-platform, which reads records, finds no file instead of misreading segments.
    return f"b{bucket:06d}.seg"


def _check_index(what: str, index: int, count: int) -> None:
    require(0 <= index < count, f"{what} {index} does not exist: this pass has {what}s 0..{count - 1}",
             f"use a {what} index from the plan")


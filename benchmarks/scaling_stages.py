"""The jobs ``benchmarks/scaling.py`` measures, each in its own forked process, and the stages they
run, as the pipeline runs them (docs/design.md, "Feature tables, context windows, browser"): one
caching job per activation batch, the shuffle over every batch, training, pass 1 per batch (the
batch's encode and its feature shards' partials: ``pass_1_job``), pass 2 per feature shard over
every batch's partials, pass 3's windows per batch and its regroup per feature shard, the browser
writer once. A stage's figures at one size are its jobs' (``combine``): times summed, peaks the
largest job's (what a worker needs).

A job is a dict: ``root`` (the artifact store), ``batches`` / ``batch_rows`` (the activation batches
the stage reads and their rows), ``shuffle`` and ``sae`` (the names it reads and writes), ``tokens``,
``n_latents``, ``d_model``, ``memory_budget_bytes`` and the caching and training settings;
a per-batch job adds ``batch`` and ``batch_tokens``.
"""

import gc
import multiprocessing
import os
import resource
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial, wraps
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow
import torch

from benchmarks.cache_throughput import benchmark_text
from benchmarks.feature_tables import _reset_peak as reset_peak
from benchmarks.feature_tables import _status as memory_status
from sae_platform import activations, shuffle
from sae_platform import contexts as ctx
from sae_platform import feature_codes as fc
from sae_platform import features as ft
from sae_platform.activations import CacheSettings, cache_text_file
from sae_platform.browser.publish import build_site
from sae_platform.catalog import browser_dir
from sae_platform.corpus import TextFile
from sae_platform.feature_layout import layout_ranges, plan_layout
from sae_platform.feature_merge import merge_stored_shard, read_tables, write_tables
from sae_platform.feature_plan import FeatureShardPlan
from sae_platform.glibc_malloc import release_free_heap
from sae_platform.model import load_stored_model, load_stored_tokenizer
from sae_platform.sae import build_sae
from sae_platform.storage import ArtifactStore
from sae_platform.trainer import TrainSettings, selection_dtype, train_sae

K = 32  # the feature stages' random TopK SAE's code width
SHUFFLE_JOBS = 4  # the shuffle's first-pass scatter jobs
JOB_FIGURES = ("label", "tokens", "seconds", "cpu_seconds", "peak_bytes", "peak_rss", "rss_before", "process_seconds",
               "process_cpu_seconds")  # what a record keeps of each of its jobs
SUMMED = ("seconds", "cpu_seconds", "process_seconds", "process_cpu_seconds", "tokens",
          "n_windows")  # over a stage's jobs
LARGEST = ("peak_bytes", "peak_rss")  # the largest job's: what one worker needs


# ---------------------------------------------------------------------------------------------
# one job, in a forked process
# ---------------------------------------------------------------------------------------------

class Meter:
    """Times a stage's body and measures its peak RSS (``memory_status``, ``reset_peak``). Before
    the clock starts, the disk's pending writes are flushed (``os.sync``): the commit protocol
    fsyncs each file a job writes, and on ext4 an fsync waits for whatever else is waiting to be
    written back, so a job that followed a stage writing MBs (the 16x shuffle, training's
    checkpoints) was timed with that stage's writeback in its own (measured: 0.09-0.26 s of a
    0.45 s pass-1 job's wall). Each job's time is then its own work, its own fsyncs included."""

    def start(self) -> None:
        os.sync()
        gc.collect()
        release_free_heap()
        self.hwm_reset = reset_peak()
        self.before = memory_status()
        self.started, self.cpu_started = time.perf_counter(), process_cpu_seconds()

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = process_cpu_seconds() - self.cpu_started
        self.after = memory_status()

    def result(self) -> dict:
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                "peak_bytes": self.after["VmHWM"] - self.before["VmRSS"], "peak_rss": self.after["VmHWM"],
                "rss_before": self.before["VmRSS"], "hwm_reset": self.hwm_reset}


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(conn, stage, job: dict) -> None:
    try:
        meter = Meter()
        extra = stage(meter, job)
        conn.send({**meter.result(), **extra, "label": job.get("label"),
                   "process_cpu_seconds": process_cpu_seconds()})  # the whole process: loading, the stage
    except BaseException:  # noqa: BLE001 - the parent reports it, naming the stage
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def measure(stage, job: dict) -> dict:
    """Run ``stage(meter, job)`` in a forked process; its figures (``Meter.result`` plus what it
    returns, and the job's label). Raises SystemExit naming the stage and the job when it fails or
    dies (the kernel's OOM killer). The forking process's objects are frozen out of the child's
    garbage collector (``gc.freeze``): a child's collection would otherwise walk every object it
    inherited (a model host holds millions) and write to each one's page, copying it (measured:
    ~0.5 s of CPU per caching job); the child's own objects are collected as before."""
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    started = time.perf_counter()
    process = fork.Process(target=_child, args=(send, stage, job))
    gc.freeze()  # the forking process's objects out of the child's collections (``Meter.start``'s included)
    try:
        process.start()
    finally:
        gc.unfreeze()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"error": f"the process died (exit code {process.exitcode}; -9: killed, e.g. out of memory)"}
    process.join()
    if "error" in result:
        raise SystemExit(f"stage {stage.__name__} at {job.get('label')} failed:\n{result['error']}")
    # the whole process (fork, loading the model / SAE / tokenizer, the stage, exit): where the run's time goes
    return {**result, "process_seconds": time.perf_counter() - started}


def measure_hosted(setup: Callable[[list[dict]], object], stage, jobs: list[dict]) -> Iterator[dict]:
    """Each of ``jobs`` measured by ``stage(loaded, meter, job)`` in its own process (``measure``),
    every one forked from one host process that ran ``loaded = setup(jobs)`` once: loading a
    135M-parameter model (or a tokenizer) is not the stage's cost, and a load per job was most of
    what the short jobs spent. A job's ``peak_bytes`` is still what it allocates above what its
    process held, ``loaded`` included (``Meter``), and its ``peak_rss`` what a worker that loaded
    it would hold. The host runs torch on one thread (an OpenMP thread pool does not survive a
    fork); each job restores the thread count. Yields each job's figures as it ends, with the
    host's ``setup_seconds``; SystemExit naming the stage and the job when one fails."""
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    host = fork.Process(target=_host, args=(send, setup, stage, jobs))
    host.start()
    send.close()
    try:
        for job in jobs:
            try:
                result = receive.recv()
            except EOFError:
                result = {"error": f"the host process died (exit code {host.exitcode}; -9: killed, e.g. out of "
                                   "memory)"}
            if "error" in result:
                raise SystemExit(f"stage {stage.__name__} at {job.get('label')} failed:\n{result['error']}")
            yield result
    finally:
        host.join()


def _host(conn, setup, stage, jobs: list[dict]) -> None:
    """The process ``measure_hosted`` forks its jobs from."""
    try:
        threads, started = torch.get_num_threads(), time.perf_counter()
        torch.set_num_threads(1)
        loaded = setup(jobs)

        @wraps(stage)
        def hosted(meter: Meter, job: dict) -> dict:
            torch.set_num_threads(threads)
            return stage(loaded, meter, job)

        figures = {"setup_seconds": time.perf_counter() - started}
        for job in jobs:
            conn.send({**measure(hosted, job), **figures})
    except BaseException:  # noqa: BLE001 - the parent reports it, naming the job
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def combine(figures: list[dict]) -> dict:
    """One stage's figures at one size from its jobs' (``measure``): the times and the tokens
    summed (the stage's cost), the peaks the largest job's (what a worker needs), each job's own
    figures in ``jobs``; a single job's stage-specific figures (training's ``seconds_per_token``)
    are kept as they are."""
    first = {k: v for k, v in figures[0].items() if k not in JOB_FIGURES or k in SUMMED + LARGEST}
    if len(figures) > 1:
        first.pop("seconds_per_token", None)
    return {**first, **{k: sum(f.get(k, 0) for f in figures) for k in SUMMED if any(k in f for f in figures)},
            **{k: max(f[k] for f in figures) for k in LARGEST},
            "hwm_reset": all(f["hwm_reset"] for f in figures), "n_jobs": len(figures),
            "jobs": [{k: f[k] for k in JOB_FIGURES if k in f} for f in figures]}


def one_batch(job: dict, index: int) -> dict:
    """The job of activation batch ``job['batches'][index]`` in a stage that runs one job per batch."""
    key = job["batches"][index]
    return {**job, "batch": key, "batch_tokens": job["batch_rows"][index], "label": f"{job['label']} [{key}]"}


# ---------------------------------------------------------------------------------------------
# caching: one job per activation batch, every one forked from one process holding the model
# ---------------------------------------------------------------------------------------------

def write_texts(tokenizer, jobs: list[dict]) -> None:
    """Setup, not measured: each caching job's text file (``job['text']``), consecutive slices of
    the corpus (``job['corpus']``), so every batch caches text of its own, each packing into exactly
    ``job['n_contexts']`` contexts of ``job['ctx_len']`` tokens (half a context to spare, for the
    tokens a cut splits). SystemExit when the corpus is too short."""
    body = jobs[0]["ctx_len"] - 1
    wanted = [job["n_contexts"] * body + body // 2 for job in jobs]
    text = benchmark_text(tokenizer, Path(jobs[0]["corpus"]), sum(wanted))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    if len(offsets) < sum(wanted):
        raise SystemExit(f"the corpus in {jobs[0]['corpus']} cut into {len(jobs)} batches tokenizes to "
                         f"{len(offsets)} tokens, fewer than the {sum(wanted)} wanted: pass a larger --corpus")
    first = 0
    for job, n_tokens in zip(jobs, wanted):
        start, stop = offsets[first][0], offsets[first + n_tokens - 1][1]
        Path(job["text"]).write_text(text[start:stop], encoding="utf-8")
        first += n_tokens


def load_caching_model(jobs: list[dict]):
    """``measure_hosted``'s setup for caching: the model (the first job's model, layer and autocast),
    loaded once, its weights in the host's own memory (``own_weights``), and every job's text written."""
    first = jobs[0]
    model, _ = load_stored_model(ArtifactStore(first["model_root"]), first["model"], first["layer"], "cpu",
                                 first["autocast"])
    write_texts(model.tokenizer, jobs)
    own_weights(model)
    return model


def own_weights(model) -> None:
    """Every weight of ``model`` copied out of its file mapping into the host's anonymous memory.
    Why: the stored weights are mapped from their file, and a fork does not carry a file mapping's
    pages over: each job would fault every page in again (it read every weight before its peak was
    reset, else caching's embedding lookups fault rows in as new token ids appear: the model's fixed
    bytes, not caching's growth; measured ~0.3 s of CPU per job, most of it the kernel's). Anonymous
    pages are shared with every job the host forks, already resident: a job's RSS holds the whole
    model either way, as a worker's does."""
    with torch.no_grad():
        for tensor in [*model.model.parameters(), *model.model.buffers()]:
            tensor.data = tensor.data.clone()


EXACT_CHUNK_ROWS = 1  # the row floor under --chunk-bytes: chunks of that size, however few rows it holds


def use_chunk_bytes(chunk_bytes: int | None) -> None:
    """This process caches chunks of ``chunk_bytes`` (None: the pipeline's ``activations.CHUNK_BYTES``),
    below the pipeline's floor of ``activations.MIN_CHUNK_ROWS`` rows too: the shuffle's budget must
    hold about four input chunks (``shuffle_plan.plan_shuffle``), and a budget smaller than the
    token sweep's 1x data needs chunks of fewer rows than that floor. Sets the module's constants,
    which ``activations.chunk_rows`` reads at each partition: for this (forked) process only."""
    if chunk_bytes:
        activations.CHUNK_BYTES, activations.MIN_CHUNK_ROWS = chunk_bytes, EXACT_CHUNK_ROWS


def cached_chunk_rows(chunk_bytes: int | None, rows: int, row_bytes: int) -> int:
    """Rows per chunk of a cached batch of ``rows`` rows under ``use_chunk_bytes(chunk_bytes)``."""
    return activations.chunk_rows(rows, row_bytes, *((chunk_bytes, EXACT_CHUNK_ROWS) if chunk_bytes else ()))


def cache_with(model, meter: Meter, job: dict) -> dict:
    """Caching's job: ``job['text']`` cached into ``job['root']`` as batch ``job['key']`` by
    ``model`` (loaded, its weights resident: ``load_caching_model``). The untimed warm-up (the
    first zarr / parquet / forward calls) runs here, in the job, not once in the host: zarr's
    event-loop thread and polars' pool, which those calls start, do not survive a fork (a job
    forked after them hangs)."""
    use_chunk_bytes(job["chunk_bytes"])
    settings = CacheSettings(ctx_len=job["ctx_len"], batch_size=job["batch_size"])
    warm_up = ArtifactStore(job["root"] + "-warm-up")  # untimed: the first zarr / parquet / forward calls
    cache_text_file(warm_up, TextFile(job["text"], job["key"]), model, job["model"], settings, max_contexts=1)
    shutil.rmtree(warm_up.root)
    meter.start()
    summary = cache_text_file(ArtifactStore(job["root"]), TextFile(job["text"], job["key"]), model, job["model"],
                              settings, max_contexts=job["n_contexts"])
    meter.stop()
    return {"tokens": summary["n_rows"], "d_model": model.d_model,
            "path": f"layer {model.layer}/{model.n_layers}, autocast "
                    f"{str(model.autocast).removeprefix('torch.') if model.autocast else 'none (float32)'}"}


def measure_caching(jobs: list[dict]) -> Iterator[dict]:
    """Caching of every batch of ``jobs``, one job each, forked from one process that loaded the
    model once (``measure_hosted``). Yields each batch's figures as it ends."""
    return measure_hosted(load_caching_model, cache_with, jobs)


# ---------------------------------------------------------------------------------------------
# the stages after caching
# ---------------------------------------------------------------------------------------------

def stage_shuffle(meter: Meter, job: dict) -> dict:
    store = ArtifactStore(job["root"])
    meter.start()
    summary = shuffle.run_shuffle(store, job["shuffle"], n_buckets=job["shuffle_buckets"],
                                  memory_budget_bytes=job["shuffle_budget"], n_jobs=SHUFFLE_JOBS, seed=0,
                                  keys=job["batches"])
    meter.stop()
    data_bytes = summary["n_rows"] * job["d_model"] * 2  # float16 rows
    return {"tokens": summary["n_rows"], "data_bytes": data_bytes, "n_passes": summary["n_passes"],
            "path": f"{summary['n_passes']} pass(es), {data_bytes / 2**20:.1f} MiB through a "
                    f"{job['shuffle_budget'] / 2**20:.2f} MiB budget, {job['shuffle_buckets']} buckets"}


def stage_train(meter: Meter, job: dict) -> dict:
    """Training's job, measured over its steady steps, as "a training step" (issue 25): its time
    per token from the first step's metrics row to the last, its peak (``peak_bytes``,
    ``peak_rss``) the VmHWM over those steps (reset at the first row, after the setup's freed heap
    is handed back), ``peak_bytes`` above the RSS before the job (the SAE, Adam's moments, a step's
    tensors and the reader's chunk: what a step holds). What
    comes before (building the SAE, calibrating it on up to ``trainer.CALIBRATION_ROWS`` rows, which
    fills with the tokens below that cap, the first step) is ``setup_peak_rss`` / ``setup_peak_bytes``;
    the final checkpoint after the last step is in neither.

    Its rows: the job's batches shuffled again (untimed, before the job's figures start) with the
    pipeline's bucket count (``ShuffleSettings``) and the budget whose output chunks hold one
    activation batch's rows (``shuffle_plan``: a chunk is a 16th of the budget), not the shuffle
    stage's store, which the benchmark cuts into pieces and chunks of a few dozen rows to run that
    stage out of core at every size: a training step would then read a new chunk at every step, and
    that reader's Python (zarr's calls) takes the GIL from the step's (measured: 2-3x the step time
    while the reader works). A chunk of one batch is the reader's buffer (``shuffled.Shuffled``
    keeps the chunk a batch is read from) full at 1x, as the other stages' buffers are."""
    store = ArtifactStore(job["root"])
    rows, row_bytes = f"{job['shuffle']}-train", job["d_model"] * 2  # float16 rows
    shuffle.run_shuffle(store, rows, n_buckets=shuffle.ShuffleSettings().n_buckets,
                        memory_budget_bytes=16 * row_bytes * min(job["batch_rows"]), n_jobs=SHUFFLE_JOBS, seed=0,
                        keys=job["batches"])
    tokens = job["train_batch"] * job["train_steps"]
    settings = TrainSettings(n_latents=job["n_latents"], k=K, batch_size=job["train_batch"], token_budget=tokens,
                             checkpoint_every_tokens=tokens, holdout_rows=0, dead_after_tokens=tokens,
                             log_every_steps=1)
    steps = {}

    def on_metrics(row: dict) -> None:
        now = time.perf_counter()
        if not steps:  # the first step is done: the steady steps start here, the setup's freed heap handed back
            steps["setup_peak_rss"] = memory_status()["VmHWM"]
            release_free_heap()
            steps["hwm_reset"] = reset_peak()
            steps["first"] = (now, row["tokens"])
        steps["last"] = (now, row["tokens"], memory_status()["VmHWM"])

    meter.start()
    summary = train_sae(store, rows, job["sae"], settings, device="cpu",
                        log=lambda message: None, on_metrics=on_metrics)
    meter.stop()
    (t0, n0), (t1, n1, hwm_last) = steps["first"], steps["last"]
    picks = selection_dtype(settings.selection_precision, "cpu")
    return {"tokens": summary["tokens"], "seconds_per_token": (t1 - t0) / (n1 - n0),
            "peak_bytes": hwm_last - meter.before["VmRSS"], "peak_rss": hwm_last,
            "hwm_reset": steps["hwm_reset"], "setup_peak_rss": steps["setup_peak_rss"],
            "setup_peak_bytes": steps["setup_peak_rss"] - meter.before["VmRSS"],
            "path": f"picks in {str(picks or torch.float32).removeprefix('torch.')}; the steady steps "
                    f"{n0 // job['train_batch'] + 1}-{n1 // job['train_batch']}"}


def random_sae(job: dict):
    """The feature stages' SAE: random TopK weights, the same in every process (seeded)."""
    torch.manual_seed(0)
    return build_sae("topk", job["d_model"], job["n_latents"], k=K).eval()


def feature_settings(job: dict) -> ft.FeatureSettings:
    return ft.FeatureSettings(sae_name=job["sae"], memory_budget_bytes=job["memory_budget_bytes"])


def feature_layout(job: dict) -> FeatureShardPlan:
    """The feature-shard layout the pipeline plans for this job's SAE over its largest activation
    batch (``feature_layout.plan_layout``, sized from ``--memory-budget-bytes``: by default that of
    resources.features.config), which every feature stage here follows: the same at every number
    of batches."""
    return plan_layout({"variant": "topk", "n_latents": job["n_latents"], "d_model": job["d_model"], "k": K},
                       feature_settings(job), max(job["batch_rows"]))


def layout_figures(plan: FeatureShardPlan) -> dict:
    """The planned layout as each record carries it."""
    return {"feature_shards": plan.n_shards, "shards_per_group": plan.shards_per_group,
            "latents_per_shard": plan.latents_per_shard, "memory_budget_bytes": plan.memory_budget_bytes}


def pass_1_job(store: ArtifactStore, sae, settings: ft.FeatureSettings, partition_key: str, plan: FeatureShardPlan,
               batch_rows: int | None = None) -> dict:
    """Pass 1 of one activation batch as ``assets/feature_pass_1.py`` runs it: the batch encoded
    once, its codes committed split by feature shard, then each shard's partial folded from its
    own codes, one shard's state in memory at a time (``feature_codes.compute_and_write_partials``
    over the shards of ``plan``, the planned layout). Returns what the job held, so that the memory
    figures follow the layout: the encode holds the whole SAE, the state one shard's latents.
    ``batch_rows``: the encode's token batch (None: the pipeline's)."""
    shards = layout_ranges(plan)
    fc.compute_and_write_partials(store, sae, settings.sae_name, partition_key, shards, settings,
                                  **({"batch_rows": batch_rows} if batch_rows else {}))
    return {**layout_figures(plan), "shards_per_job": len(shards), "latents_per_job": plan.latents_per_shard}


def stage_pass_1(meter: Meter, job: dict) -> dict:
    sae = random_sae(job)
    meter.start()
    held = pass_1_job(ArtifactStore(job["root"]), sae, feature_settings(job), job["batch"], feature_layout(job),
                      job["encode_rows"])
    meter.stop()
    return {"tokens": job["batch_tokens"], **held}


def stage_pass_2(meter: Meter, job: dict) -> dict:
    """Pass 2 of every feature shard over every batch's partials, as the pipeline's ``feature_topk``
    runs it for a TopK SAE (``merge_stored_shard``: no SAE weights); one shard after another, so
    the peak is the largest shard's job. No logit effects."""
    store, settings, plan = ArtifactStore(job["root"]), feature_settings(job), feature_layout(job)
    meter.start()
    for index in range(plan.n_shards):
        write_tables(store, job["sae"], index,
                     merge_stored_shard(store, job["sae"], index, job["batches"], settings, "cpu"))
    meter.stop()
    return {"tokens": job["tokens"], **layout_figures(plan)}


def load_tokenizer(jobs: list[dict]):
    """``measure_hosted``'s setup for pass 3's window jobs: the stored tokenizer, loaded once, and
    pandas imported (pyarrow's first ``pa.array`` imports it, inside the windows' timed part: ~1 s
    of CPU per job), here rather than in the parent, whose other jobs never import it."""
    pyarrow.array(np.zeros(1))
    return load_stored_tokenizer(ArtifactStore(jobs[0]["model_root"]), jobs[0]["model"])


def stage_windows(tokenizer, meter: Meter, job: dict) -> dict:
    """Pass 3 of one activation batch (``feature_context_windows``): the windows of the shown
    examples that fall in it, from pass 1's codes."""
    store, sae, settings = ArtifactStore(job["root"]), random_sae(job), feature_settings(job)
    plan = feature_layout(job)
    meter.start()
    examples = pl.concat([ctx.shown_examples(read_tables(store, job["sae"], i).examples, settings.random_examples)
                          for i in range(plan.n_shards)])
    info = ctx.build_partition_windows(store, job["sae"], sae, job["batch"], examples, tokenizer,
                                       before=settings.before, after=settings.after,
                                       codes=fc.read_codes(store, job["sae"], job["batch"], sae))
    meter.stop()
    return {"tokens": job["batch_tokens"], "n_windows": info["n_windows"], **layout_figures(plan)}


def stage_regroup(meter: Meter, job: dict) -> dict:
    """Pass 3 regrouped (``feature_contexts``): every batch's windows sorted by feature, one
    feature shard after another."""
    store, plan = ArtifactStore(job["root"]), feature_layout(job)
    meter.start()
    for index, (start, stop) in enumerate(layout_ranges(plan)):
        frame = ctx.regroup_by_feature(store, job["sae"], job["batches"], start, stop)
        ctx.write_feature_contexts(store, job["sae"], index, frame)
    meter.stop()
    return layout_figures(plan)


def stage_browser(meter: Meter, job: dict) -> dict:
    store, settings = ArtifactStore(job["root"]), feature_settings(job)
    plan = feature_layout(job)

    def load(index: int) -> dict:  # as assets/features.py's browser_shard: read when the writer reaches it
        tables = read_tables(store, job["sae"], index)
        return {"feature_stats": tables.stats,
                "feature_examples": ctx.shown_examples(tables.examples, settings.random_examples),
                "feature_contexts": ctx.read_feature_contexts(store, job["sae"], index)}

    meter.start()
    shards = [{"start": start, "stop": stop, "load": partial(load, index)}
              for index, (start, stop) in enumerate(layout_ranges(plan))]
    summary = build_site(browser_dir(store, job["sae"]), sae_name=job["sae"], shards=shards,
                         hist_bin_edges=ft.hist_bin_edges(), lineage={}, n_intervals=settings.n_intervals)
    meter.stop()
    return {"tokens": job["tokens"], "site_bytes": summary["bytes"], "n_features": summary["n_features"],
            "summary_bytes": summary["summary_bytes"], **layout_figures(plan)}


# ---------------------------------------------------------------------------------------------
# each stage's jobs, as the pipeline runs them
# ---------------------------------------------------------------------------------------------

def per_batch_pass_1(job: dict) -> list[dict]:
    """Pass 1: one job per activation batch (the pipeline's ``feature_codes`` and
    ``feature_stats_partial`` of that batch)."""
    return [measure(stage_pass_1, one_batch(job, i)) for i in range(len(job["batches"]))]


def per_batch_pass_3(job: dict) -> list[dict]:
    """Pass 3: one windows job per activation batch, forked from one process holding the
    tokenizer (``measure_hosted``), then the regroup over every batch."""
    windows = list(measure_hosted(load_tokenizer, stage_windows, [one_batch(job, i)
                                                                   for i in range(len(job["batches"]))]))
    return [*windows, measure(stage_regroup, job)]


def one_job(stage) -> Callable[[dict], list[dict]]:
    """A stage the pipeline runs as one job whatever the number of batches."""
    return lambda job: [measure(stage, job)]


STAGE_JOBS = {"shuffle": one_job(stage_shuffle), "train": one_job(stage_train), "pass_1": per_batch_pass_1,
              "pass_2": one_job(stage_pass_2), "pass_3": per_batch_pass_3, "browser": one_job(stage_browser)}

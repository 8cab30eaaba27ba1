"""How each stage's cost grows with the work (issue 25, item 4): time per token and peak RSS of
caching, the shuffle, a training step, feature passes 1-3 and the browser writer at 1x, 4x and 16x
the tokens, and of training and the feature stages at growing SAE widths. Not the Gao et al.
scaling *law* of loss against latents (that is ``sae_platform/scaling.py`` and
``benchmarks/scaling_grid.py``): this is the platform's own cost.

    python benchmarks/scaling.py --quick   # 512 / 2,048 / 8,192 tokens at 4,096 latents, caching at
                                           # layer 1; 4,096 and 16,384 latents on the same 512 tokens
    python benchmarks/scaling.py --plot docs/scaling.png
                                           # 2,048 / 8,192 / 32,768 tokens at 16,384 latents; 16,384 /
                                           # 65,536 / 262,144 / 1,048,576 latents on 1,024 tokens

Everything runs through the core functions on a real artifact store in a temporary directory:
the demo corpus (``data/demo_corpus``, `make setup`) cut to exactly the contexts wanted, cached
by ``activations.cache_text_file`` with the real default model (SmolLM2-135M, converted once into
``--model-root`` as ``benchmarks/cache_throughput.py`` does; ``--model DIR`` takes any Hugging Face
model directory; ``--layer`` the hook layer, where the forward stops), shuffled by
``shuffle.run_shuffle`` through one memory budget at every size (``Sizes.shuffle_budget``),
trained by ``trainer.train_sae``,
and described by the feature stages exactly as ``assets/features.py`` runs them: pass 1
(``features.compute_and_write_partials`` over every feature shard: :func:`pass_1_job`), pass 2
(``feature_merge.merge_shard_tables`` + ``write_tables`` per shard; the blocking exactness check
is not timed), pass 3 (``contexts.build_partition_windows`` of the batch from pass 1's codes, then
``regroup_by_feature`` + ``write_feature_contexts`` per shard) and the browser writer
(``browser.publish.build_site``; no logit tables or explanations). The feature stages describe a
random-weight TopK SAE (k 32; the same seeded weights in each stage's process): their cost does
not depend on training. Training runs ``--train-steps`` steps of ``--train-batch`` rows per 1x
(so 16x the tokens is 16x the steps) and per width; its time per token is the steady step time
(from the first metrics row to the last: the SAE's initialisation, the first step and the final
checkpoint are in its peak RSS but not in its time per token). Everything runs on the CPU.

Each stage runs in its own forked process (the parent only imports, and loads the tokenizer once
so that transformers' lazy imports are shared: :func:`import_lazy_modules`). Caching runs first at
every size, each size's process forked from one process that loaded the model once
(:func:`measure_caching`; each reads every weight before its peak is reset, :func:`cache_with`:
the weights are file-mapped pages); the latent sweep reuses the token sweep's store when one size
matches (--quick: 1x), so the same text is cached and shuffled once. Each record carries the
process's wall and CPU seconds (``process_seconds``, ``process_cpu_seconds``): on a loaded machine
the CPU time is the measure of the run's cost. The stage loads what it
needs (SAE, tokenizer), the heap's free pages are handed back (:func:`release_free_heap`), then
the kernel's high-water mark is reset (``echo 5 >
/proc/self/clear_refs``, as ``benchmarks/feature_tables.py``), the stage runs, and its peak is
VmHWM - VmRSS before it (``peak_bytes``: the stage's own allocations, whatever was loaded) and
VmHWM itself (``peak_rss``: what a worker needs for the job). A width whose predicted peak
(the previous width's, scaled by the widths' ratio) exceeds 80% of MemAvailable is skipped, and
the JSON line says so: training 1,048,576 latents needs ~23 GB (weights, gradients and Adam's
moments: 40 bytes per latent per d_model dimension), more than this machine has.

Figures: one JSON line per (stage, sweep, figure), the value at the largest size, the baseline at
the smallest, their ratio and the goal (issue 25): time per token at 16x the tokens <= 1.25x that
at 1x; peak RSS (``peak_bytes``, and ``bytes_per_added_token`` between the smallest and the largest
size) at 16x <= 1.2x; pass 1's memory per job (VmHWM) grows no
faster than its latents per feature shard (``goal`` = the latents-per-shard ratio). Time against
width has no goal (a TopK encode multiplies by every latent: linear is expected). ``--plot``
draws docs/scaling.png (``plots.stage_scaling_png``). ``--record FILE`` appends each stage's
figures as it ends (a long run that dies keeps them); ``--from-record FILE`` measures nothing and
prints the figures and plot of a record file (several runs' records may be concatenated);
``--sweeps`` runs one sweep.

What the memory ratios against the tokens measure at these sizes: a stage's fixed buffers fill
before its memory can be flat, and --quick's 1x is below several of them: caching's forward batch
(16 contexts; 1x is 4) and its 4 MiB zarr chunks, the shuffle's budget (every size shuffles in
memory), pass 1's 4,096-row encode batch, and the feature stages' per-feature examples (a 4,096-latent
SAE fires ~4 times per latent in 512 tokens; the reservoirs hold 200). Pass 1 and pass 3 also hold
their batch's codes by design (12 B per code: 384 B per token at k 32). ``bytes_per_added_token``
says how much each added token cost.
"""

import argparse
import ctypes
import gc
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from bench_help import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the package importable without installing it
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the stages fork: tokenizers' pool would not survive it

import polars as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks.cache_throughput import benchmark_text  # noqa: E402
from benchmarks.feature_tables import _reset_peak as reset_peak  # noqa: E402
from benchmarks.feature_tables import _status as memory_status  # noqa: E402
from sae_platform import activations, shuffle  # noqa: E402
from sae_platform import contexts as ctx  # noqa: E402
from sae_platform import feature_codes as fc  # noqa: E402
from sae_platform import features as ft  # noqa: E402
from sae_platform.activations import CacheSettings, cache_text_file  # noqa: E402
from sae_platform.browser.publish import build_site  # noqa: E402
from sae_platform.catalog import N_FEATURE_SHARDS, browser_dir  # noqa: E402
from sae_platform.corpus import TextFile  # noqa: E402
from sae_platform.feature_layout import layout_ranges, plan_layout  # noqa: E402
from sae_platform.feature_merge import merge_shard_tables, read_tables, write_tables  # noqa: E402
from sae_platform.feature_plan import FeatureShardPlan  # noqa: E402
from sae_platform.model import EMBEDDED_MODEL, load_stored_model, load_stored_tokenizer  # noqa: E402
from sae_platform.plots import stage_scaling_png  # noqa: E402
from sae_platform.sae import build_sae  # noqa: E402
from sae_platform.settings import SettingsError, default_of  # noqa: E402
from sae_platform.storage import ArtifactStore  # noqa: E402
from sae_platform.trainer import TrainSettings, selection_dtype, train_sae  # noqa: E402

TOKEN_FACTORS = (1, 4, 16)
GOAL_TIME_GROWTH = 1.25  # time per token at 16x the tokens / at 1x (issue 25)
GOAL_RSS_GROWTH = 1.2    # peak RSS at 16x the tokens / at 1x: flat
GOAL_MEMORY_PER_SHARD_LATENT = 1.0  # a feature job's peak grows no faster than its latents per shard
MEMORY_HEADROOM = 0.8    # a width runs only if its predicted peak fits in this fraction of MemAvailable
K = 32
BATCH_KEY, SHUFFLE_NAME, SAE_NAME = "scaling", "scaling", "scaling-bench"
TOKEN_STAGES = ("cache", "shuffle", "train", "pass_1", "pass_2", "pass_3", "browser")
LATENT_STAGES = ("train", "pass_1", "pass_2", "pass_3", "browser")
FEATURE_STAGES = ("pass_1", "pass_2", "pass_3", "browser")


@dataclass(frozen=True)
class Sizes:
    """What one mode measures."""

    tokens: int              # 1x of the token sweep
    token_latents: int       # the SAE width of the token sweep
    latents: tuple[int, ...]  # the widths of the latent sweep
    latent_tokens: int       # tokens the latent sweep runs on
    train_batch: int         # rows per training step
    train_steps: int         # steps per 1x of the token sweep, and per width of the latent sweep
    ctx_len: int = 128
    batch_size: int = 16     # contexts per forward pass
    # The shuffle's memory budget, the same at every size: the smallest plan_shuffle accepts for the
    # activations' 4 MiB chunks at d_model 576 (4 chunks per scatter job); the full mode's 16x
    # data (37.7 MB) goes beyond it, the smaller sizes shuffle in memory.
    shuffle_budget: int = 17 << 20
    layer: int | None = None  # the hook layer, where caching's forward stops (None: the middle layer, as the pipeline)
    # Fixed buffers a stage fills before its memory can be flat in the tokens; None: the pipeline's own.
    chunk_bytes: int | None = None  # the cached activations' zarr chunks (activations.CHUNK_BYTES)
    encode_rows: int | None = None  # pass 1's token batch (compute_and_write_partials' batch_rows)


# --quick hooks layer 1 (the forward stops after block 1): caching's cost is then mostly the store's,
# not the model's 16 blocks to the middle layer, and the whole run fits in a minute on 2 cores.
QUICK = Sizes(tokens=512, token_latents=4096, latents=(4096, 16_384), latent_tokens=512, train_batch=128,
              train_steps=2, layer=1)
FULL = Sizes(tokens=2048, token_latents=16_384, latents=(16_384, 65_536, 262_144, 1_048_576), latent_tokens=1024,
             train_batch=256, train_steps=3)


# ---------------------------------------------------------------------------------------------
# one stage, in a forked process
# ---------------------------------------------------------------------------------------------

class Meter:
    """Times a stage's body and measures its peak RSS (``memory_status``, ``reset_peak``)."""

    def start(self) -> None:
        gc.collect()
        release_free_heap()
        self.hwm_reset = reset_peak()
        self.before = memory_status()
        self.started = time.perf_counter()

    def stop(self) -> None:
        self.seconds = time.perf_counter() - self.started
        self.after = memory_status()

    def result(self) -> dict:
        return {"seconds": self.seconds, "peak_bytes": self.after["VmHWM"] - self.before["VmRSS"],
                "peak_rss": self.after["VmHWM"], "rss_before": self.before["VmRSS"], "hwm_reset": self.hwm_reset}


def release_free_heap() -> bool:
    """glibc's malloc_trim(0): hand the heap's free pages back to the kernel before the peak is reset.
    Why: a forked stage inherits its parent's heap, free blocks included (the parent loaded and
    dropped a tokenizer), and allocations that reuse them raise no RSS: the peak above the RSS
    before would miss them. False on other C libraries."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _child(conn, stage, job: dict) -> None:
    try:
        meter = Meter()
        extra = stage(meter, job)
        usage = resource.getrusage(resource.RUSAGE_SELF)  # the whole process: loading, the stage, its threads
        conn.send({**meter.result(), **extra, "process_cpu_seconds": usage.ru_utime + usage.ru_stime})
    except BaseException:  # noqa: BLE001 - the parent reports it, naming the stage
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def measure(stage, job: dict) -> dict:
    """Run ``stage(meter, job)`` in a forked process; its figures (``Meter.result`` plus what it returns).
    Raises SystemExit naming the stage and the size when it fails or dies (the kernel's OOM killer)."""
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    started = time.perf_counter()
    process = fork.Process(target=_child, args=(send, stage, job))
    process.start()
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


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------

def write_texts(tokenizer, texts: dict[str, int], ctx_len: int, corpus: str) -> None:
    """Setup, not measured: one text file per size (path -> contexts) that packs into exactly the
    contexts wanted."""
    body = ctx_len - 1
    for path, n_contexts in texts.items():
        Path(path).write_text(benchmark_text(tokenizer, Path(corpus), n_contexts * body + body // 2), encoding="utf-8")


def measure_caching(jobs: list[dict]) -> Iterator[dict]:
    """Caching at each of ``jobs`` (``stage_cache``), each in its own process forked from one that
    loaded the model once (the first job's model, layer and autocast) and wrote every job's text:
    loading a 135M-parameter model is not caching's cost, and three loads were most of what the
    caching processes of ``--quick`` spent. A child's ``peak_bytes`` is still what caching allocates
    above what its process held, the model included (``Meter``). Yields each job's figures as it
    ends; SystemExit naming the size when one fails."""
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    host = fork.Process(target=_model_host, args=(send, jobs))
    host.start()
    send.close()
    try:
        for job in jobs:
            try:
                result = receive.recv()
            except EOFError:
                result = {"error": f"the process holding the model died (exit code {host.exitcode}; -9: killed, "
                                   "e.g. out of memory)"}
            if "error" in result:
                raise SystemExit(f"stage cache at {job['label']} failed:\n{result['error']}")
            yield result
    finally:
        host.join()


def _model_host(conn, jobs: list[dict]) -> None:
    """The process ``measure_caching`` forks the caching processes from. It runs torch on one thread:
    an OpenMP thread pool does not survive a fork (the children start their own)."""
    try:
        threads, started = torch.get_num_threads(), time.perf_counter()
        torch.set_num_threads(1)
        first = jobs[0]
        model, _ = load_stored_model(ArtifactStore(first["model_root"]), first["model"], first["layer"], "cpu",
                                     first["autocast"])
        write_texts(model.tokenizer, {job["text"]: job["n_contexts"] for job in jobs}, first["ctx_len"],
                    first["corpus"])

        def stage_cache(meter: Meter, job: dict) -> dict:
            torch.set_num_threads(threads)
            return cache_with(model, meter, job)

        setup = {"setup_seconds": time.perf_counter() - started}  # the model's load and the texts, once
        for job in jobs:
            conn.send({**measure(stage_cache, job), **setup})
    except BaseException:  # noqa: BLE001 - the parent reports it, naming the size
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def cache_with(model, meter: Meter, job: dict) -> dict:
    """Caching's stage: ``job['text']`` cached into ``job['root']`` by ``model`` (loaded)."""
    if job["chunk_bytes"]:  # this process only: the module's constant is the size of every chunk it writes
        activations.CHUNK_BYTES = job["chunk_bytes"]
    settings = CacheSettings(ctx_len=job["ctx_len"], batch_size=job["batch_size"])
    warm_up = ArtifactStore(job["root"] + "-warm-up")  # untimed: the first zarr / parquet / forward calls
    cache_text_file(warm_up, TextFile(job["text"], BATCH_KEY), model, job["model"], settings, max_contexts=1)
    shutil.rmtree(warm_up.root)
    # Every weight read once before the peak is reset: the stored weights are mapped from their file (a fork
    # does not carry such pages over), and a page is resident only once touched, so caching's embedding
    # lookups would fault in rows as new token ids appear (measured: RssFile +18 / +38 / +51 MiB at 512 /
    # 2,048 / 8,192 tokens): the model's fixed bytes, not caching's growth.
    with torch.no_grad():
        for weights in model.model.parameters():
            weights.sum()
    meter.start()
    summary = cache_text_file(ArtifactStore(job["root"]), TextFile(job["text"], BATCH_KEY), model, job["model"],
                              settings, max_contexts=job["n_contexts"])
    meter.stop()
    return {"tokens": summary["n_rows"], "d_model": model.d_model,
            "path": f"layer {model.layer}/{model.n_layers}, autocast "
                    f"{str(model.autocast).removeprefix('torch.') if model.autocast else 'none (float32)'}"}


def stage_shuffle(meter: Meter, job: dict) -> dict:
    store = ArtifactStore(job["root"])
    meter.start()
    summary = shuffle.run_shuffle(store, SHUFFLE_NAME, n_buckets=4, memory_budget_bytes=job["shuffle_budget"],
                                  n_jobs=4, seed=0)
    meter.stop()
    data_bytes = summary["n_rows"] * job["d_model"] * 2  # float16 rows
    return {"tokens": summary["n_rows"], "data_bytes": data_bytes,
            "path": f"{summary['n_passes']} pass(es), {data_bytes / 2**20:.1f} MiB through a "
                    f"{job['shuffle_budget'] / 2**20:.1f} MiB budget"}


def stage_train(meter: Meter, job: dict) -> dict:
    tokens = job["train_batch"] * job["train_steps"]
    settings = TrainSettings(n_latents=job["n_latents"], k=K, batch_size=job["train_batch"], token_budget=tokens,
                             checkpoint_every_tokens=tokens, holdout_rows=0, dead_after_tokens=tokens,
                             log_every_steps=1)
    marks = []
    meter.start()
    summary = train_sae(ArtifactStore(job["root"]), SHUFFLE_NAME, SAE_NAME, settings, device="cpu",
                        log=lambda message: None,
                        on_metrics=lambda row: marks.append((time.perf_counter(), row["tokens"])))
    meter.stop()
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    picks = selection_dtype(settings.selection_precision, "cpu")
    return {"tokens": summary["tokens"],
            "seconds_per_token": (t1 - t0) / (n1 - n0) if n1 > n0 else meter.seconds / summary["tokens"],
            "path": f"picks in {str(picks or torch.float32).removeprefix('torch.')}"}


def random_sae(job: dict):
    """The feature stages' SAE: random TopK weights, the same in every process (seeded)."""
    torch.manual_seed(0)
    return build_sae("topk", job["d_model"], job["n_latents"], k=K).eval()


def feature_layout(job: dict) -> FeatureShardPlan:
    """The feature-shard layout the pipeline plans for this job's SAE over its one batch
    (``feature_layout.plan_layout``, sized from ``--memory-budget-bytes``: by default that of
    resources.features.config), which every feature stage here follows."""
    settings = ft.FeatureSettings(sae_name=SAE_NAME, memory_budget_bytes=job["memory_budget_bytes"])
    return plan_layout({"variant": "topk", "n_latents": job["n_latents"], "d_model": job["d_model"], "k": K},
                       settings, job["tokens"])


def layout_figures(plan: FeatureShardPlan) -> dict:
    """The planned layout as each record carries it."""
    return {"feature_shards": plan.n_shards, "shards_per_group": plan.shards_per_group,
            "latents_per_shard": plan.latents_per_shard, "memory_budget_bytes": plan.memory_budget_bytes}


def pass_1_job(store: ArtifactStore, sae, partition_key: str, settings: ft.FeatureSettings, plan: FeatureShardPlan,
               batch_rows: int | None = None) -> dict:
    """One pass-1 job as ``assets/features.py`` runs it: the batch encoded once, its codes committed
    split by feature shard, then each shard's partial folded from its own codes, one shard's state
    in memory at a time (``feature_codes.compute_and_write_partials`` over the shards of ``plan``,
    the planned layout). Returns what the job held, so that the memory figures follow the layout:
    the encode holds the whole SAE, the state one shard's latents. ``batch_rows``: the encode's
    token batch (None: the pipeline's)."""
    shards = layout_ranges(plan)
    fc.compute_and_write_partials(store, sae, SAE_NAME, partition_key, shards, settings,
                                  **({"batch_rows": batch_rows} if batch_rows else {}))
    return {**layout_figures(plan), "shards_per_job": len(shards), "latents_per_job": plan.latents_per_shard}


def stage_pass_1(meter: Meter, job: dict) -> dict:
    sae = random_sae(job)
    meter.start()
    held = pass_1_job(ArtifactStore(job["root"]), sae, BATCH_KEY, ft.FeatureSettings(sae_name=SAE_NAME),
                      feature_layout(job), job["encode_rows"])
    meter.stop()
    return {"tokens": job["tokens"], **held}


def stage_pass_2(meter: Meter, job: dict) -> dict:
    store, sae, settings = ArtifactStore(job["root"]), random_sae(job), ft.FeatureSettings(sae_name=SAE_NAME)
    plan = feature_layout(job)
    meter.start()
    for index in range(plan.n_shards):  # one shard after another: the peak is the largest shard's job
        write_tables(store, SAE_NAME, index, merge_shard_tables(store, sae, SAE_NAME, index, [BATCH_KEY], settings))
    meter.stop()
    return {"tokens": job["tokens"], **layout_figures(plan)}


def stage_pass_3(meter: Meter, job: dict) -> dict:
    store, sae, settings = ArtifactStore(job["root"]), random_sae(job), ft.FeatureSettings(sae_name=SAE_NAME)
    tokenizer = load_stored_tokenizer(ArtifactStore(job["model_root"]), job["model"])
    plan = feature_layout(job)
    meter.start()
    examples = pl.concat([ctx.shown_examples(read_tables(store, SAE_NAME, i).examples, settings.random_examples)
                          for i in range(plan.n_shards)])
    info = ctx.build_partition_windows(store, SAE_NAME, sae, BATCH_KEY, examples, tokenizer, before=settings.before,
                                       after=settings.after, codes=fc.read_codes(store, SAE_NAME, BATCH_KEY, sae))
    for index, (start, stop) in enumerate(layout_ranges(plan)):
        frame = ctx.regroup_by_feature(store, SAE_NAME, [BATCH_KEY], start, stop)
        ctx.write_feature_contexts(store, SAE_NAME, index, frame)
    meter.stop()
    return {"tokens": job["tokens"], "n_windows": info["n_windows"], **layout_figures(plan)}


def stage_browser(meter: Meter, job: dict) -> dict:
    store, settings = ArtifactStore(job["root"]), ft.FeatureSettings(sae_name=SAE_NAME)
    plan = feature_layout(job)

    def load(index: int) -> dict:  # as assets/features.py's browser_shard: read when the writer reaches it
        tables = read_tables(store, SAE_NAME, index)
        return {"feature_stats": tables.stats,
                "feature_examples": ctx.shown_examples(tables.examples, settings.random_examples),
                "feature_contexts": ctx.read_feature_contexts(store, SAE_NAME, index)}

    meter.start()
    shards = [{"start": start, "stop": stop, "load": partial(load, index)}
              for index, (start, stop) in enumerate(layout_ranges(plan))]
    summary = build_site(browser_dir(store, SAE_NAME), sae_name=SAE_NAME, shards=shards,
                         hist_bin_edges=ft.hist_bin_edges(), lineage={}, n_intervals=settings.n_intervals)
    meter.stop()
    return {"tokens": job["tokens"], "site_bytes": summary["bytes"], "n_features": summary["n_features"],
            "summary_bytes": summary["summary_bytes"], **layout_figures(plan)}


STAGES = {"shuffle": stage_shuffle, "train": stage_train, "pass_1": stage_pass_1,
          "pass_2": stage_pass_2, "pass_3": stage_pass_3, "browser": stage_browser}


# ---------------------------------------------------------------------------------------------
# the sweeps
# ---------------------------------------------------------------------------------------------

def mem_available() -> int:
    """Bytes the kernel says new work can use now (/proc/meminfo's MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no MemAvailable in /proc/meminfo: this benchmark measures memory through /proc (Linux)")


def run_stage(name: str, job: dict, records: list) -> dict:
    """Measure stage ``name`` on ``job`` (``measure``) and record it (``record_stage``)."""
    return record_stage(name, job, measure(STAGES[name], job), records)


def record_stage(name: str, job: dict, figures: dict, records: list) -> dict:
    """Stage ``name``'s record (its figures, the stage, the sweep and the size): printed as a table
    row, kept in ``records`` and appended to ``job['record']`` if given."""
    result = {**figures, "stage": name, "sweep": job["sweep"], "label": job["label"], "n_latents": job.get("n_latents")}
    result.setdefault("seconds_per_token", result["seconds"] / result["tokens"])
    result["load_1m"] = os.getloadavg()[0]
    keep(result, job, records)
    print(f"{name:<9}{job['label']:>20}{result['tokens']:>9,}{result['seconds']:>9.2f}"
          f"{result['seconds_per_token'] * 1e6:>11.1f}{result['peak_bytes'] / 2**20:>10.1f}"
          f"{result['peak_rss'] / 2**20:>10.1f}{result['process_seconds']:>8.1f}   {result.get('path', '')}",
          flush=True)
    return result


def keep(record: dict, job: dict, records: list) -> None:
    """Keep a record, and append it to the run's record file at once: a long run that dies (or is
    stopped) keeps every figure it measured (``--from-record`` prints them and draws the plot)."""
    records.append(record)
    if job.get("record"):
        with open(job["record"], "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def cache_all(jobs: list[dict], records: list) -> list[dict]:
    """Every job's text cached into its root (``measure_caching``: one model load for all sizes);
    the jobs with what the stages need next."""
    cached = []
    for figures, job in zip(measure_caching(jobs), jobs):
        record_stage("cache", job, figures, records)
        cached.append({**job, "tokens": figures["tokens"], "d_model": figures["d_model"]})
    return cached


def token_job(sizes: Sizes, base: dict, tmp: Path, factor: int) -> dict:
    """The token sweep's job at ``factor`` x ``sizes.tokens`` (``sizes.token_latents`` latents)."""
    return {**base, "root": str(tmp / f"tokens-{factor}x"), "label": f"{factor}x tokens", "sweep": "tokens",
            "text": base["texts"][factor], "n_contexts": factor * sizes.tokens // sizes.ctx_len,
            "n_latents": sizes.token_latents, "train_steps": sizes.train_steps * factor}


def latent_data(sizes: Sizes, base: dict, tmp: Path) -> dict:
    """The job of the latent sweep's data: ``sizes.latent_tokens`` tokens in ``tmp/latents-data``."""
    return {**base, "root": str(tmp / "latents-data"), "label": "latent sweep data", "sweep": "latent data",
            "text": base["texts"]["latents"], "n_contexts": sizes.latent_tokens // sizes.ctx_len,
            "train_steps": sizes.train_steps}


def token_sweep(sizes: Sizes, jobs: list[dict], tmp: Path, records: list, keep_tokens: int | None) -> dict | None:
    """Every stage after caching at 1x, 4x and 16x the tokens (``jobs``, cached). Returns the latent
    sweep's data when one size holds ``keep_tokens`` tokens (--quick: 1x): its shuffled store,
    copied aside before the stages write into it, so the same text is not cached and shuffled
    twice; else None."""
    kept = None
    for job in jobs:
        run_stage("shuffle", job, records)
        if job["n_contexts"] * sizes.ctx_len == keep_tokens:
            kept = {**job, "root": str(tmp / "latents-data"), "label": "latent sweep data", "sweep": "latent data",
                    "train_steps": sizes.train_steps}
            shutil.copytree(job["root"], kept["root"])
        for name in TOKEN_STAGES[2:]:
            run_stage(name, job, records)
        shutil.rmtree(job["root"])
    return kept


def predicted_peak(results: list[dict], n_latents: int) -> int:
    """A stage's peak RSS at ``n_latents`` predicted from its widest run so far (linear in the width)."""
    last = max(results, key=lambda r: r["n_latents"])
    return int(last["peak_rss"] * n_latents / last["n_latents"])


def fits(results: list[dict], n_latents: int) -> dict | None:
    """None when the stage's predicted peak at ``n_latents`` fits in MEMORY_HEADROOM of MemAvailable
    (or nothing predicts it); else why it does not."""
    if not results:
        return None
    need, free = predicted_peak(results, n_latents), mem_available()
    if need <= MEMORY_HEADROOM * free:
        return None
    return {"n_latents": n_latents, "predicted_peak_rss": need, "mem_available": free,
            "why": f"predicted peak RSS {need / 2**30:.1f} GiB > {MEMORY_HEADROOM:.0%} of MemAvailable "
                   f"{free / 2**30:.1f} GiB"}


def latent_sweep(sizes: Sizes, data: dict, tmp: Path, records: list) -> None:
    """Training and the feature stages at each width on ``data`` (``sizes.latent_tokens`` tokens,
    cached and shuffled). A stage whose predicted peak does not fit in memory is skipped (its record
    says why); the feature stages after pass 1 need its output, so they are skipped with it."""
    for n_latents in sizes.latents:
        job = {**data, "root": str(tmp / f"latents-{n_latents}"), "label": f"{n_latents:,} latents",
               "sweep": "latents", "n_latents": n_latents}
        shutil.copytree(data["root"], job["root"])
        for name in LATENT_STAGES:
            done = [r for r in records if r["sweep"] == "latents" and r["stage"] == name and "skipped" not in r]
            no_pass_1 = [r for r in records if r["stage"] == "pass_1" and r.get("skipped", {}).get("n_latents")
                         == n_latents]
            depends = name in FEATURE_STAGES[1:] and no_pass_1
            why = {**no_pass_1[0]["skipped"], "why": "pass 1 was skipped"} if depends else fits(done, n_latents)
            if why:
                keep({"stage": name, "sweep": "latents", "label": job["label"], "skipped": why}, job, records)
                print(f"{name:<9}{job['label']:>20}   skipped: {why['why']}", flush=True)
                continue
            run_stage(name, job, records)
        shutil.rmtree(job["root"])


def by_stage(records: list[dict], sweep: str, stages: tuple[str, ...]) -> dict[str, list[dict]]:
    """The measured records of one sweep, per stage, in the order measured."""
    return {name: [r for r in records if r["sweep"] == sweep and r["stage"] == name and "skipped" not in r]
            for name in stages}


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------

def planned_shards(runs: list[dict]) -> dict:
    """A feature stage's planned shard count at each size (``feature_layout``) and the budget it was
    planned from; {} for the others."""
    if "feature_shards" not in runs[-1]:
        return {}
    return {"feature_shards": [r["feature_shards"] for r in runs],
            "memory_budget_bytes": runs[-1]["memory_budget_bytes"]}


def token_lines(results: dict[str, list[dict]]) -> list[dict]:
    """Per stage: time per token and peak RSS at 16x the tokens against 1x."""
    lines = []
    for name, runs in results.items():
        if not runs:
            continue
        first, last = runs[0], runs[-1]
        sizes = {"tokens": [r["tokens"] for r in runs], "stage_path": last.get("path"), "n_latents": last["n_latents"],
                 **({"data_bytes": [r["data_bytes"] for r in runs]} if "data_bytes" in last else {}),
                 **planned_shards(runs)}
        lines.append({"metric": f"scaling_{name}_seconds_per_token_vs_tokens", "value": last["seconds_per_token"],
                      "baseline": first["seconds_per_token"],
                      "ratio": last["seconds_per_token"] / first["seconds_per_token"], "goal": GOAL_TIME_GROWTH,
                      "lower_is_better": True, "unit": "s/token", "baseline_is": "the same stage at 1x the tokens",
                      "values": [r["seconds_per_token"] for r in runs], "seconds": [r["seconds"] for r in runs],
                      **sizes})
        lines.append({"metric": f"scaling_{name}_peak_rss_vs_tokens", "value": last["peak_bytes"],
                      "baseline": first["peak_bytes"], "ratio": last["peak_bytes"] / max(first["peak_bytes"], 1),
                      "goal": GOAL_RSS_GROWTH, "lower_is_better": True, "unit": "bytes",
                      "value_is": "VmHWM during the stage - VmRSS before it (after loading model / SAE)",
                      "baseline_is": "the same stage at 1x the tokens", "values": [r["peak_bytes"] for r in runs],
                      "bytes_per_added_token": (last["peak_bytes"] - first["peak_bytes"])
                      / max(last["tokens"] - first["tokens"], 1),
                      "peak_rss_absolute": [r["peak_rss"] for r in runs], **sizes})
    return lines


def latent_lines(results: dict[str, list[dict]], skipped: dict[str, list[dict]]) -> list[dict]:
    """Per stage: time per token and peak RSS at the widest SAE measured against the narrowest. A
    feature stage's memory goal: its peak per job grows no faster than its latents per shard."""
    lines = []
    for name, runs in results.items():
        if not runs:
            continue
        first, last = runs[0], runs[-1]
        sizes = {"n_latents": [r["n_latents"] for r in runs], "tokens": last["tokens"], "skipped": skipped[name],
                 "stage_path": last.get("path"), **planned_shards(runs)}
        lines.append({"metric": f"scaling_{name}_seconds_per_token_vs_latents", "value": last["seconds_per_token"],
                      "baseline": first["seconds_per_token"],
                      "ratio": last["seconds_per_token"] / first["seconds_per_token"], "goal": None,
                      "lower_is_better": True, "unit": "s/token",
                      "latents_ratio": last["n_latents"] / first["n_latents"],
                      "baseline_is": "the same stage at the narrowest SAE",
                      "values": [r["seconds_per_token"] for r in runs],
                      **sizes})
        memory = {"metric": f"scaling_{name}_peak_rss_vs_latents", "value": last["peak_rss"],
                  "baseline": first["peak_rss"], "ratio": last["peak_rss"] / first["peak_rss"], "goal": None,
                  "lower_is_better": True, "unit": "bytes", "value_is": "VmHWM of the stage's process (the job)",
                  "baseline_is": "the same stage at the narrowest SAE", "values": [r["peak_rss"] for r in runs],
                  "peak_bytes": [r["peak_bytes"] for r in runs], **sizes}
        if name == "pass_1":  # what a job held (pass_1_job): the goal is per latent of a shard
            shard_ratio = last["latents_per_shard"] / first["latents_per_shard"]
            memory.update({"goal": shard_ratio, "goal_is": "latents-per-shard ratio: memory per job proportional "
                           "to latents per shard", "latents_per_shard": [r["latents_per_shard"] for r in runs],
                           "latents_per_job": [r["latents_per_job"] for r in runs],
                           "shards_per_job": last["shards_per_job"],
                           "bytes_per_latent_of_job": [r["peak_rss"] / r["latents_per_job"] for r in runs]})
        lines.append(memory)
    return lines


def curves(results: dict[str, list[dict]], size: str) -> dict[str, tuple[list, list, list]]:
    """Per stage (sizes, seconds per token, peak RSS bytes), for ``plots.stage_scaling_png``."""
    return {name: ([r[size] for r in runs], [r["seconds_per_token"] for r in runs], [r["peak_rss"] for r in runs])
            for name, runs in results.items() if runs}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the QUICK sizes: under a minute on 2 cores")
    parser.add_argument("--tokens", type=int, help="1x of the token sweep (a multiple of --ctx-len)")
    parser.add_argument("--token-latents", type=int, help="SAE width of the token sweep")
    parser.add_argument("--latents", help="comma-separated widths of the latent sweep")
    parser.add_argument("--latent-tokens", type=int, help="tokens the latent sweep runs on (a multiple of --ctx-len)")
    parser.add_argument("--train-batch", type=int, help="rows per training step")
    parser.add_argument("--train-steps", type=int, help="training steps per 1x and per width (at least 2)")
    parser.add_argument("--ctx-len", type=int, help="tokens per context (default 128)")
    parser.add_argument("--batch-size", type=int, help="contexts per forward pass when caching (default 16)")
    parser.add_argument("--shuffle-budget", type=int, help="the shuffle's memory budget in bytes (default 17 MiB)")
    parser.add_argument("--chunk-bytes", type=int, help="bytes per chunk of the cached activations (default: the "
                                                        "platform's activations.CHUNK_BYTES)")
    parser.add_argument("--encode-rows", type=int, help="pass 1's token batch (default: the pipeline's)")
    parser.add_argument("--memory-budget-bytes", type=int,
                        default=default_of(ft.FeatureSettings, "memory_budget_bytes"),
                        help="a feature-shard job's memory budget, as resources.features.config.memory_budget_bytes: "
                             "the planner (feature_layout.plan_layout) sizes the feature shards from it")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="base model source")
    parser.add_argument("--model-root", default=str(REPO / ".cache" / "bench_artifacts"),
                        help="persistent artifact root holding the converted base model")
    parser.add_argument("--corpus", default=str(REPO / "data" / "demo_corpus"),
                        help="directory of .txt files the text is cut from")
    parser.add_argument("--layer", type=int, default=None,
                        help="hook layer, where caching's forward stops (default: 1 with --quick, else the middle "
                             "layer, as the pipeline)")
    parser.add_argument("--autocast", default="auto", help="caching forward's autocast (sae_platform.model)")
    parser.add_argument("--plot", help="write the figure here (e.g. docs/scaling.png)")
    parser.add_argument("--sweeps", default="tokens,latents", type=lambda v: v.split(","),
                        help="which sweeps to run: tokens, latents or both")
    parser.add_argument("--record", help="append each stage's figures to this JSON-lines file as it ends")
    parser.add_argument("--from-record", help="measure nothing: print the figures (and --plot) of a --record file")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    given = {"tokens": args.tokens, "token_latents": args.token_latents, "latent_tokens": args.latent_tokens,
             "train_batch": args.train_batch, "train_steps": args.train_steps, "ctx_len": args.ctx_len,
             "batch_size": args.batch_size, "shuffle_budget": args.shuffle_budget, "layer": args.layer,
             "chunk_bytes": args.chunk_bytes, "encode_rows": args.encode_rows,
             "latents": tuple(int(n) for n in args.latents.split(",")) if args.latents else None}
    sizes = replace(sizes, **{k: v for k, v in given.items() if v is not None})
    for what in ("tokens", "latent_tokens"):
        if getattr(sizes, what) % sizes.ctx_len:
            parser.error(f"--{what.replace('_', '-')} {getattr(sizes, what)} is not a multiple of --ctx-len "
                         f"{sizes.ctx_len}: pass a multiple")
    if sizes.train_steps < 2:
        parser.error("--train-steps must be at least 2 (the time per token is timed from the first step to the last)")
    if sizes.train_batch * sizes.train_steps > min(sizes.tokens, sizes.latent_tokens):
        parser.error(f"training {sizes.train_steps} steps of {sizes.train_batch} rows needs more rows than the "
                     f"{min(sizes.tokens, sizes.latent_tokens)} cached: lower --train-batch or --train-steps")
    try:
        ft.FeatureSettings(memory_budget_bytes=args.memory_budget_bytes)
    except SettingsError as error:
        parser.error(f"--memory-budget-bytes: {error}")
    if args.from_record and not Path(args.from_record).is_file():
        parser.error(f"--from-record {args.from_record}: no such file; pass the --record file of a run")
    if not args.from_record and not sorted(Path(args.corpus).glob("*.txt")):
        parser.error(f"no .txt files in {args.corpus}: run `make setup` to fetch the demo corpus, or pass --corpus")
    return args, sizes


def noisy(load_before: float, load_after: float) -> bool:
    """Other work was running (load average above the usable cores), as benchmarks/feature_tables.py rules."""
    return max(load_before, load_after) > len(os.sched_getaffinity(0)) + 0.5


def import_lazy_modules(args) -> None:
    """Load the stored tokenizer once here, in the parent, and drop it: transformers imports its
    tokenizer classes lazily, and that import (~4 s of CPU here) was most of each pass-3 process's
    time; the forked stage processes now share it. torch runs on one thread meanwhile (a first run
    converts the model here): no OpenMP thread pool may exist when the stages fork."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_stored_tokenizer(ArtifactStore(args.model_root), args.model)
    finally:
        torch.set_num_threads(threads)


def measure_all(args, sizes: Sizes) -> list[dict]:
    """Both sweeps in a temporary directory; every stage's record (also appended to ``--record``).
    Caching runs first at every size (one model load), then the other stages size by size."""
    import_lazy_modules(args)
    records = []
    with tempfile.TemporaryDirectory(prefix="stage_scaling-") as folder:
        tmp = Path(folder)
        texts = {f: str(tmp / f"text-{f}x.txt") for f in TOKEN_FACTORS} | {"latents": str(tmp / "text-latents.txt")}
        base = {"model": args.model, "model_root": args.model_root, "layer": sizes.layer, "autocast": args.autocast,
                "texts": texts, "corpus": args.corpus, "ctx_len": sizes.ctx_len, "batch_size": sizes.batch_size,
                "train_batch": sizes.train_batch, "shuffle_budget": sizes.shuffle_budget, "record": args.record,
                "chunk_bytes": sizes.chunk_bytes, "encode_rows": sizes.encode_rows,
                "memory_budget_bytes": args.memory_budget_bytes}
        token_jobs = [token_job(sizes, base, tmp, f) for f in TOKEN_FACTORS] if "tokens" in args.sweeps else []
        # the latent sweep reuses the token sweep's store of its size (--quick: 1x) rather than caching it again
        sizes_cached = [j["n_contexts"] * sizes.ctx_len for j in token_jobs]
        reuse = "latents" in args.sweeps and sizes.latent_tokens in sizes_cached
        own = [latent_data(sizes, base, tmp)] if "latents" in args.sweeps and not reuse else []
        print(f"stage cost against the work: {sizes}\n{'stage':<9}{'size':>20}{'tokens':>9}{'s':>9}{'us/token':>11}"
              f"{'peak MiB':>10}{'RSS MiB':>10}{'proc s':>8}   path", flush=True)
        cached = cache_all(token_jobs + own, records)
        kept = token_sweep(sizes, cached[:len(token_jobs)], tmp, records, sizes.latent_tokens if reuse else None)
        if own:
            kept = cached[-1]
            run_stage("shuffle", kept, records)
        if "latents" in args.sweeps:
            latent_sweep(sizes, kept, tmp, records)
    return records


def main(argv=None) -> int:
    args, sizes = parse_args(argv)
    wall = time.perf_counter()
    if args.from_record:
        records = [json.loads(line) for line in Path(args.from_record).read_text().splitlines() if line.strip()]
    else:
        records = measure_all(args, sizes)
    wall_s = time.perf_counter() - wall
    loads = [r["load_1m"] for r in records if "load_1m" in r]
    loaded = noisy(min(loads, default=0.0), max(loads, default=0.0))
    print(f"wall time {wall_s:.1f} s; load average {min(loads, default=0):.2f} - {max(loads, default=0):.2f} "
          f"after the stages, on {os.cpu_count()} CPUs")
    if loaded:
        print("WARNING: other work was running on this machine (load average above the CPU count): timings are "
              "noisy (memory figures are not affected)")
    by_tokens, by_latents = by_stage(records, "tokens", TOKEN_STAGES), by_stage(records, "latents", LATENT_STAGES)
    skipped = {name: [r["skipped"] for r in records if r["stage"] == name and "skipped" in r] for name in LATENT_STAGES}
    if args.plot:
        Path(args.plot).write_bytes(stage_scaling_png(curves(by_tokens, "tokens"), curves(by_latents, "n_latents"),
                                                      loaded=loaded))
        print(f"plot: {args.plot}")
    common = {"quick": args.quick, "model": args.model, "layer": sizes.layer, "feature_shard_groups": N_FEATURE_SHARDS,
              "k": K, "train_batch": sizes.train_batch, "train_steps": sizes.train_steps, "ctx_len": sizes.ctx_len,
              "device": "cpu", "torch_threads": torch.get_num_threads(), "wall_s": round(wall_s, 1),
              "load_1m": [min(loads, default=None), max(loads, default=None)], "noisy": loaded,
              **({"from_record": args.from_record} if args.from_record else {})}
    print()
    for line in token_lines(by_tokens) + latent_lines(by_latents, skipped):
        print(json.dumps({**line, **common}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

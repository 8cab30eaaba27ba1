"""How each stage's cost grows with the work (issue 25, item 4): time per token and peak RSS per job
of caching, the shuffle, a training step, feature passes 1-3 and the browser writer at 1x, 4x and
16x the tokens, and of training and the feature stages at growing SAE widths. Not the Gao et al.
scaling *law* of loss against latents (that is ``sae_platform/scaling.py`` and
``benchmarks/scaling_grid.py``): this is the platform's own cost.

    python benchmarks/scaling.py --quick   # 1 / 4 / 16 batches of 512 tokens at 64 latents, caching at
                                           # layer 1; 4,096 and 16,384 latents on the first batch
    python benchmarks/scaling.py --plot docs/scaling.png
                                           # 1 / 4 / 16 batches of 2,048 tokens at 256 latents; 16,384 /
                                           # 65,536 / 262,144 / 1,048,576 latents on 1,024 tokens

More tokens are more activation batches, not a bigger one: at factor f the token sweep runs f
batches of the 1x size (distinct slices of the corpus, each its own partition key) through every
stage as the pipeline runs it (``benchmarks/scaling_stages.py``): caching, one job per batch; the
shuffle over the f batches, through one memory budget at every size (``Sizes.shuffle_budget``);
training, f times the steps; pass 1, one job per batch (its encode and its feature shards' partials
in the planner's layout: ``pass_1_job``); pass 2 over every batch's partials, one feature shard after
another; pass 3, one windows job per batch, then the regroup; the browser writer once. Each job runs
in its own forked process, and a stage's figures at a size are its jobs' (``scaling_stages.combine``):
**time per token** = the jobs' summed time / the tokens, **peak RSS per job** = the largest job's
(what a worker needs). The question each line answers is a run planner's: at 16x the tokens, does
any one job need more memory, and does the time per token stay flat? Batch i is the same caching job
at every factor (same text, same model), so it is cached once and factor f counts the first f of the
16 caching jobs; every later stage runs afresh per factor, on its own shuffled store and SAE name.

Everything runs through the core functions on one real artifact store in a temporary directory:
the demo corpus (``data/demo_corpus``, `make setup`) cut into whole contexts, cached by
``activations.cache_text_file`` with the real default model (SmolLM2-135M, converted once into
``--model-root`` as ``benchmarks/cache_throughput.py`` does; ``--model DIR`` takes any Hugging Face
model directory; ``--layer`` the hook layer, where the forward stops), shuffled by
``shuffle.run_shuffle``, trained by ``trainer.train_sae``, and described by the feature stages as
``assets/feature_pass_1.py`` and ``assets/features.py`` run them for a TopK SAE: pass 1
(``feature_codes.compute_and_write_partials`` of the batch over every feature shard), pass 2
(``feature_merge.merge_stored_shard`` + ``write_tables`` per shard; the blocking exactness check and
the logit effects are not timed), pass 3 (``contexts.build_partition_windows`` of the batch from
pass 1's codes; ``regroup_by_feature`` + ``write_feature_contexts`` per shard) and the browser writer
(``browser.publish.build_site``; no logit tables or explanations). The feature stages describe a
random-weight TopK SAE (k 32; the same seeded weights in each job's process): their cost does not
depend on training. Training runs ``--train-steps`` steps of ``--train-batch`` rows per 1x (so 16x
the tokens is 16x the steps) and per width; its time per token and its peak RSS are the steady steps' (from the
first metrics row to the last: "a training step", as the issue asks; the SAE's initialisation, its
calibration sample, the first step and the final checkpoint are not, and the record keeps the
setup's peak as ``setup_peak_rss``). Everything runs on the CPU.

The parent only imports, and makes the lazy imports the stage processes would each make (the
tokenizer classes, ``torch._dynamo`` that torch.optim imports: :func:`import_lazy_modules`), so
that the forked jobs share them. The caching jobs are forked from
one process that loaded the model once and copied its file-mapped weights into its own memory,
pass 3's windows jobs from one that loaded the tokenizer and pandas once (``measure_hosted``);
every fork freezes the forking process's objects out of the job's garbage collector
(``scaling_stages.measure``); the latent sweep reuses the token sweep's 1x batch and shuffled
store when its size matches (--quick), so the same text is cached and shuffled once. Each record
carries its jobs' summed wall and CPU seconds (``process_seconds``, ``process_cpu_seconds``: the
whole processes; ``cpu_seconds``: the timed parts'; on a loaded machine the CPU time is the
measure of the run's cost) and each job's own figures (``jobs``). A job loads what it needs
(SAE, tokenizer), the disk's pending writes are flushed (``os.sync``: the commit protocol's
fsyncs would otherwise wait for an earlier stage's writeback), the heap's free pages are handed
back (``release_free_heap``), then the kernel's high-water mark is reset (``echo 5 >
/proc/self/clear_refs``, as ``benchmarks/feature_tables.py``), the job runs, and its peak is
VmHWM - VmRSS before it (``peak_bytes``: the job's own allocations, whatever was loaded) and
VmHWM itself (``peak_rss``: what a worker needs for the job). A width whose predicted peak (the
previous width's, scaled by the widths' ratio) exceeds 80% of MemAvailable is
skipped, and the JSON line says so: training 1,048,576 latents needs ~23 GB (weights, gradients and
Adam's moments: 40 bytes per latent per d_model dimension), more than this machine has.

Figures: one JSON line per (stage, sweep, figure), the value at the largest size, the baseline at
the smallest, their ratio and the goal (issue 25): time per token at 16x the tokens <= 1.25x that
at 1x; peak RSS per job (the largest job's ``peak_bytes``; ``peak_rss_absolute``: the largest
job's VmHWM; ``n_jobs``: how many jobs ran) at 16x <= 1.2x; pass 1's memory per job (VmHWM) grows
no faster than its latents per feature shard (``goal`` = the latents-per-shard ratio). Time against
width has no goal (a TopK encode multiplies by every latent: linear is expected). ``--plot`` draws
docs/scaling.png (``plots.stage_scaling_png``). ``--record FILE`` appends each stage's figures as it
ends (a long run that dies keeps them); ``--from-record FILE`` measures nothing and prints the
figures and plot of a record file (several runs' records may be concatenated); ``--sweeps`` runs
one sweep.

What the memory ratios against the tokens measure. Caching, pass 1 and pass 3's windows run one job
per batch, the same job at every factor: their largest job stays the size of one batch's (a pass-1
or windows job holds its own batch's codes, 12 B per code, never another's), so their ratio is
flat by the layout, up to noise. The other stages run one job that reads every batch. The shuffle
goes beyond its budget at every size: one job shuffles ~70% of ``Sizes.shuffle_budget`` in memory,
fewer rows than even 1x has, in chunks small enough (``Sizes.chunk_bytes``, 128 rows: below the
pipeline's 256-row floor, ``scaling_stages.use_chunk_bytes``) for a scatter job to hold the 4 it
needs, and 16x the rows over its 32 buckets fit in the passes 1x needs (2 at every size: its line's
``n_passes``, ``out_of_core``); so its ratio measures the out-of-core shuffle's memory, bounded by
the budget, as the data grows (a budget the data fits in would measure the data filling it).
Training holds the SAE and one step's rows. Pass 2, the regroup and the browser hold what is kept
per feature, bounded by the feature settings (top 20, a reservoir of 200, 20 random and 20
interval examples shown) but filling with the firings; the token sweep's SAE is narrow enough
that a latent fires ``tokens x k / latents`` = 254 times per batch on average (508 rows x 32 / 64
latents; the full mode 2,032 x 32 / 256), so that the shown examples are full at 1x even though a
random TopK SAE fires unevenly (measured at 1x / 16x: 96% / 99% of the 60 per feature shown; at
512 latents, 45% / 75%, and the browser's peak followed). The browser's peak is mostly fixed:
~50 MiB of its libraries' code paged in (polars' parquet reader and JSON writer) and the
allocator's memory kept from the transient frames of the shards it writes, one shard's tables at a
time, which follows the shown examples per shard, not the tokens. The feature stages' lines carry
the mean firings against each buffer's capacity (``per_feature_buffers``). ``bytes_per_added_token``
says how much each added token cost the largest job.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench_help import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the package importable without installing it
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the stages fork: tokenizers' pool would not survive it

import torch  # noqa: E402

from benchmarks.feature_tables import MMAP_THRESHOLD  # noqa: E402
from benchmarks.scaling_stages import (  # noqa: E402
    STAGE_JOBS,
    K,
    combine,
    measure_caching,
)
from sae_platform import features as ft  # noqa: E402
from sae_platform.catalog import N_FEATURE_SHARDS, browser_dir, features_folder  # noqa: E402
from sae_platform.glibc_malloc import fix_mmap_threshold  # noqa: E402
from sae_platform.model import EMBEDDED_MODEL, load_stored_tokenizer  # noqa: E402
from sae_platform.plots import stage_scaling_png  # noqa: E402
from sae_platform.settings import SettingsError, default_of  # noqa: E402
from sae_platform.storage import ArtifactStore  # noqa: E402

TOKEN_FACTORS = (1, 4, 16)  # activation batches of the 1x size
GOAL_TIME_GROWTH = 1.25  # time per token at 16x the tokens / at 1x (issue 25)
GOAL_RSS_GROWTH = 1.2    # peak RSS per job at 16x the tokens / at 1x: flat
GOAL_MEMORY_PER_SHARD_LATENT = 1.0  # a feature job's peak grows no faster than its latents per shard
MEMORY_HEADROOM = 0.8    # a width runs only if its predicted peak fits in this fraction of MemAvailable
BATCH_KEY, SHUFFLE_NAME, SAE_NAME = "scaling", "scaling", "scaling-bench"  # prefixes of each batch's / run's names
TOKEN_STAGES = ("cache", "shuffle", "train", "pass_1", "pass_2", "pass_3", "browser")
LATENT_STAGES = ("train", "pass_1", "pass_2", "pass_3", "browser")
FEATURE_STAGES = ("pass_1", "pass_2", "pass_3", "browser")


@dataclass(frozen=True)
class Sizes:
    """What one mode measures."""

    tokens: int              # 1x of the token sweep: the tokens of one activation batch
    token_latents: int       # the SAE width of the token sweep
    latents: tuple[int, ...]  # the widths of the latent sweep
    latent_tokens: int       # tokens the latent sweep runs on (one batch)
    train_batch: int         # rows per training step
    train_steps: int         # steps per 1x of the token sweep, and per width of the latent sweep
    ctx_len: int = 128
    batch_size: int = 16     # contexts per forward pass
    # The shuffle's memory budget, the same at every size, too small for one job to shuffle even the
    # 1x rows in memory (70% of it: shuffle_plan.final_bucket_rows), so that every size shuffles out
    # of core (planned_shuffle): a budget the data fits in would measure the data filling it.
    shuffle_budget: int = 640 << 10
    # Its buckets per scatter pass: 32, so that 16x the rows fit in the passes 1x needs (1x above the
    # budget, 16x / 32 buckets below it): the passes, and so the time per token, are the same at every size.
    shuffle_buckets: int = 32
    layer: int | None = None  # the hook layer, where caching's forward stops (None: the middle layer, as the pipeline)
    # Fixed buffers a stage fills before its memory can be flat in the tokens; None: the pipeline's own.
    # The cached activations' zarr chunks (scaling_stages.use_chunk_bytes): 128 rows of d_model 576 in
    # float16, 4 to a 1x batch, so that a budget below the 1x data holds the 4 chunks a scatter job needs.
    chunk_bytes: int | None = 128 * 576 * 2
    encode_rows: int | None = None  # pass 1's token batch (compute_and_write_partials' batch_rows)


# --quick hooks layer 1 (the forward stops after block 1): caching's cost is then mostly the store's,
# not the model's 16 blocks to the middle layer. The token sweep's SAE: 508 rows x k 32 / 64 latents
# = 254 firings per latent per batch (the full mode: 2,032 x 32 / 256), so that the examples shown per
# feature are full at 1x even though a random TopK SAE fires unevenly (measured: 96% of them at 1x).
QUICK = Sizes(tokens=512, token_latents=64, latents=(4096, 16_384), latent_tokens=512, train_batch=128,
              train_steps=2, layer=1)
FULL = Sizes(tokens=2048, token_latents=256, latents=(16_384, 65_536, 262_144, 1_048_576), latent_tokens=1024,
             train_batch=256, train_steps=3, shuffle_budget=5 << 19)  # 2.5 MiB: 1,571 of the 1x's 2,032 rows


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
    """Measure stage ``name`` on ``job`` as the pipeline runs it (``scaling_stages.STAGE_JOBS``: one
    job, or one per activation batch) and record its figures (``combine``, ``record_stage``)."""
    return record_stage(name, job, combine(STAGE_JOBS[name](job)), records)


def record_stage(name: str, job: dict, figures: dict, records: list) -> dict:
    """Stage ``name``'s record (its figures, the stage, the sweep and the size): printed as a table
    row, kept in ``records`` and appended to ``job['record']`` if given."""
    result = {**figures, "stage": name, "sweep": job["sweep"], "label": job["label"], "n_latents": job.get("n_latents")}
    result.setdefault("seconds_per_token", result["seconds"] / result["tokens"])
    result["load_1m"] = os.getloadavg()[0]
    keep(result, job, records)
    print(f"{name:<9}{job['label']:>20}{result['n_jobs']:>5}{result['tokens']:>9,}{result['seconds']:>9.2f}"
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


def batch_job(base: dict, tmp: Path, key: str, n_contexts: int) -> dict:
    """The caching job of activation batch ``key``: ``n_contexts`` contexts of its own text."""
    return {**base, "key": key, "text": str(tmp / f"text-{key}.txt"), "n_contexts": n_contexts, "label": key}


def cache_all(sizes: Sizes, base: dict, batches: list[dict], own: list[dict], records: list) -> list[dict]:
    """Every batch cached into the store, one job each (``measure_caching``: one model load for all):
    the token sweep's ``batches``, recorded at each factor as the first ``factor`` batches' jobs
    (they are the same jobs at every factor), and the latent sweep's ``own`` batch, if any. Returns
    the batches with their rows and d_model."""
    cached, figures = [], []
    for result, job in zip(measure_caching(batches + own), batches + own):
        cached.append({**job, "tokens": result["tokens"], "d_model": result["d_model"]})
        if len(cached) > len(batches):
            record_stage("cache", latent_data(sizes, base, cached[-1]), combine([result]), records)
            continue
        figures.append(result)
        if len(figures) in TOKEN_FACTORS:
            record_stage("cache", token_job(sizes, base, cached, len(figures)), combine(figures), records)
    return cached


def run_on(job: dict, batches: list[dict]) -> dict:
    """``job`` over the cached ``batches``: their keys, rows, tokens and d_model."""
    return {**job, "batches": [b["key"] for b in batches], "batch_rows": [b["tokens"] for b in batches],
            "tokens": sum(b["tokens"] for b in batches), "d_model": batches[0]["d_model"]}


def token_job(sizes: Sizes, base: dict, cached: list[dict], factor: int) -> dict:
    """The token sweep's run at ``factor`` x ``sizes.tokens``: the first ``factor`` cached batches, its
    own shuffled store and SAE name (``sizes.token_latents`` latents), ``factor`` x the steps."""
    return run_on({**base, "label": f"{factor}x tokens", "sweep": "tokens", "n_latents": sizes.token_latents,
                   "train_steps": sizes.train_steps * factor, "shuffle": f"{SHUFFLE_NAME}-{factor}x",
                   "sae": f"{SAE_NAME}-{factor}x"}, cached[:factor])


def latent_data(sizes: Sizes, base: dict, batch: dict) -> dict:
    """The latent sweep's data: the cached ``batch`` (``sizes.latent_tokens`` tokens) and its shuffled store."""
    return run_on({**base, "label": "latent sweep data", "sweep": "latent data", "train_steps": sizes.train_steps,
                   "shuffle": f"{SHUFFLE_NAME}-latents"}, [batch])


def drop_feature_artifacts(job: dict) -> None:
    """Remove the feature tables, codes and site of ``job``'s SAE once its stages are measured: no
    later stage reads them, and the widest SAE's take GBs of disk."""
    store = ArtifactStore(job["root"])
    for folder in (features_folder(store, job["sae"]), browser_dir(store, job["sae"])):
        shutil.rmtree(folder, ignore_errors=True)


def token_sweep(sizes: Sizes, base: dict, cached: list[dict], records: list) -> None:
    """Every stage after caching at 1x, 4x and 16x the tokens: the first 1, 4 and 16 ``cached``
    batches, each factor's run with its own shuffled store and SAE."""
    for factor in TOKEN_FACTORS:
        job = token_job(sizes, base, cached, factor)
        for name in TOKEN_STAGES[1:]:
            run_stage(name, job, records)
        drop_feature_artifacts(job)


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


def latent_sweep(sizes: Sizes, data: dict, records: list) -> None:
    """Training and the feature stages at each width on ``data`` (one batch of ``sizes.latent_tokens``
    tokens, cached and shuffled), each width under its own SAE name. A stage whose predicted peak
    does not fit in memory is skipped (its record says why); the feature stages after pass 1 need
    its output, so they are skipped with it."""
    for n_latents in sizes.latents:
        job = {**data, "label": f"{n_latents:,} latents", "sweep": "latents", "n_latents": n_latents,
               "sae": f"{SAE_NAME}-{n_latents}"}
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
        drop_feature_artifacts(job)


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


def shuffle_passes(runs: list[dict]) -> dict:
    """The shuffle's passes at each size and whether every size went beyond its budget (more than
    one pass: ``out_of_core``); {} for the other stages. Why: a shuffle that fits its budget holds
    all its rows, so its memory line would measure the data filling the budget, not the bounded
    memory of the out-of-core shuffle."""
    if "n_passes" not in runs[-1]:
        return {}
    passes = [r["n_passes"] for r in runs]
    return {"n_passes": passes, "out_of_core": min(passes) > 1}


def per_feature_buffers(runs: list[dict]) -> dict:
    """What a feature stage keeps per feature against how often a latent fires: the mean firings
    per latent at each size (tokens x k / latents; at 1x that of one batch, which every per-batch job
    sees at every size) beside each per-feature buffer's capacity (the feature settings' defaults),
    and whether the mean fills it at each size. A random TopK SAE fires unevenly: means only."""
    settings = ft.FeatureSettings()
    capacity = {"top_examples": settings.top_k, "random_examples_shown": settings.random_examples,
                "interval_examples": settings.n_intervals * settings.per_interval,
                "reservoir": settings.reservoir_factor * settings.top_k}
    firings = [r["tokens"] * K / r["n_latents"] for r in runs]
    return {"mean_firings_per_latent": firings, "per_feature_capacity": capacity,
            "filled": {name: [n >= cap for n in firings] for name, cap in capacity.items()}}


def token_lines(results: dict[str, list[dict]]) -> list[dict]:
    """Per stage: time per token and peak RSS per job at 16x the tokens against 1x."""
    lines = []
    for name, runs in results.items():
        if not runs:
            continue
        first, last = runs[0], runs[-1]
        sizes = {"tokens": [r["tokens"] for r in runs], "n_jobs": [r.get("n_jobs", 1) for r in runs],
                 "stage_path": last.get("path"), "n_latents": last["n_latents"],
                 **({"data_bytes": [r["data_bytes"] for r in runs]} if "data_bytes" in last else {}),
                 **shuffle_passes(runs),
                 **planned_shards(runs)}
        lines.append({"metric": f"scaling_{name}_seconds_per_token_vs_tokens", "value": last["seconds_per_token"],
                      "baseline": first["seconds_per_token"],
                      "ratio": last["seconds_per_token"] / first["seconds_per_token"], "goal": GOAL_TIME_GROWTH,
                      "lower_is_better": True, "unit": "s/token", "value_is": "the stage's jobs' summed seconds / "
                      "its tokens", "baseline_is": "the same stage at 1x the tokens",
                      "values": [r["seconds_per_token"] for r in runs], "seconds": [r["seconds"] for r in runs],
                      "cpu_seconds": [r.get("cpu_seconds") for r in runs],  # the timed part's CPU: steadier under load
                      **sizes})
        lines.append({"metric": f"scaling_{name}_peak_rss_vs_tokens", "value": last["peak_bytes"],
                      "baseline": first["peak_bytes"], "ratio": last["peak_bytes"] / max(first["peak_bytes"], 1),
                      "goal": GOAL_RSS_GROWTH, "lower_is_better": True, "unit": "bytes",
                      "value_is": "the largest job's VmHWM during its stage - its VmRSS before it (after loading "
                                  "model / SAE)", "baseline_is": "the same stage at 1x the tokens",
                      "values": [r["peak_bytes"] for r in runs],
                      "bytes_per_added_token": (last["peak_bytes"] - first["peak_bytes"])
                      / max(last["tokens"] - first["tokens"], 1),
                      "peak_rss_absolute": [r["peak_rss"] for r in runs],
                      **({"per_feature_buffers": per_feature_buffers(runs)} if name in FEATURE_STAGES else {}),
                      **sizes})
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
                  "lower_is_better": True, "unit": "bytes", "value_is": "VmHWM of the stage's largest job",
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
    parser.add_argument("--quick", action="store_true",
                        help="the QUICK sizes: 40-50 s on 2 quiet cores")
    parser.add_argument("--tokens", type=int, help="tokens of one activation batch, the token sweep's 1x (it runs 1, "
                                                   "4 and 16 batches; a multiple of --ctx-len)")
    parser.add_argument("--token-latents", type=int, help="SAE width of the token sweep")
    parser.add_argument("--latents", help="comma-separated widths of the latent sweep")
    parser.add_argument("--latent-tokens", type=int, help="tokens the latent sweep runs on (a multiple of --ctx-len)")
    parser.add_argument("--train-batch", type=int, help="rows per training step")
    parser.add_argument("--train-steps", type=int, help="training steps per 1x and per width (at least 2)")
    parser.add_argument("--ctx-len", type=int, help="tokens per context (default 128)")
    parser.add_argument("--batch-size", type=int, help="contexts per forward pass when caching (default 16)")
    parser.add_argument("--shuffle-budget", type=int, help="the shuffle's memory budget in bytes (default: the "
                                                           "mode's, below what one job shuffles of the 1x rows)")
    parser.add_argument("--shuffle-buckets", type=int, help="the shuffle's buckets per scatter pass (default: the "
                                                            "mode's)")
    parser.add_argument("--chunk-bytes", type=int, help="bytes per chunk of the cached activations (default: the "
                                                        "mode's, 128 rows of d_model 576 in float16)")
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
                        help="which sweeps to run: tokens, latents or both (comma-separated)")
    parser.add_argument("--record", help="append each stage's figures to this JSON-lines file as it ends")
    parser.add_argument("--from-record", help="measure nothing: print the figures (and --plot) of a --record file")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    given = {"tokens": args.tokens, "token_latents": args.token_latents, "latent_tokens": args.latent_tokens,
             "train_batch": args.train_batch, "train_steps": args.train_steps, "ctx_len": args.ctx_len,
             "batch_size": args.batch_size, "shuffle_budget": args.shuffle_budget, "layer": args.layer,
             "shuffle_buckets": args.shuffle_buckets,
             "chunk_bytes": args.chunk_bytes, "encode_rows": args.encode_rows,
             "latents": tuple(int(n) for n in args.latents.split(",")) if args.latents else None}
    sizes = replace(sizes, **{k: v for k, v in given.items() if v is not None})
    unknown = sorted(set(args.sweeps) - {"tokens", "latents"})
    if unknown:
        parser.error(f"--sweeps {','.join(args.sweeps)}: no sweep {', '.join(unknown)}; pass tokens, latents or both")
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
    """Make here, in the parent, the lazy imports the forked stage processes would each make on
    their own: transformers' tokenizer classes (the stored tokenizer loaded once and dropped: ~4 s
    of CPU per pass-3 process) and ``torch._dynamo`` (imported by ``torch.optim.Optimizer.__init__``:
    ~3 s per training job; it adds ~15 MiB to every job's VmRSS). The stages fork from here and
    share them: their figures are their own work, not a fresh process's imports (pass 3's windows
    host makes its own, pandas: ``scaling_stages.load_tokenizer``). torch runs on one thread
    meanwhile (a first run converts the model here): no OpenMP thread pool may exist when the
    stages fork."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_stored_tokenizer(ArtifactStore(args.model_root), args.model)
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    finally:
        torch.set_num_threads(threads)


def measure_all(args, sizes: Sizes) -> list[dict]:
    """Both sweeps on one store in a temporary directory; every stage's record (also appended to
    ``--record``). Caching runs first for every batch (one model load), then the other stages
    factor by factor, then width by width."""
    import_lazy_modules(args)
    fix_mmap_threshold(MMAP_THRESHOLD)  # every job forked from here inherits it
    records = []
    with tempfile.TemporaryDirectory(prefix="stage_scaling-") as folder:
        tmp = Path(folder)
        base = {"model": args.model, "model_root": args.model_root, "layer": sizes.layer, "autocast": args.autocast,
                "root": str(tmp / "store"), "corpus": args.corpus, "ctx_len": sizes.ctx_len,
                "batch_size": sizes.batch_size, "train_batch": sizes.train_batch,
                "shuffle_budget": sizes.shuffle_budget, "shuffle_buckets": sizes.shuffle_buckets,
                "record": args.record, "chunk_bytes": sizes.chunk_bytes,
                "encode_rows": sizes.encode_rows, "memory_budget_bytes": args.memory_budget_bytes}
        by_tokens, by_latents = "tokens" in args.sweeps, "latents" in args.sweeps
        batches = [batch_job(base, tmp, f"{BATCH_KEY}-{i:02d}", sizes.tokens // sizes.ctx_len)
                   for i in range(max(TOKEN_FACTORS))] if by_tokens else []
        # the latent sweep reuses the token sweep's first batch and 1x shuffled store when it is its size (--quick)
        reuse = by_tokens and by_latents and sizes.latent_tokens == sizes.tokens
        own = [batch_job(base, tmp, f"{BATCH_KEY}-latents", sizes.latent_tokens // sizes.ctx_len)
               ] if by_latents and not reuse else []
        print(f"stage cost against the work: {sizes}\n{'stage':<9}{'size':>20}{'jobs':>5}{'tokens':>9}{'s':>9}"
              f"{'us/token':>11}{'peak MiB':>10}{'RSS MiB':>10}{'proc s':>8}   path", flush=True)
        cached = cache_all(sizes, base, batches, own, records)
        if batches:
            token_sweep(sizes, base, cached[:len(batches)], records)
        if by_latents:
            data = token_job(sizes, base, cached, 1) if reuse else latent_data(sizes, base, cached[-1])
            if own:
                run_stage("shuffle", data, records)
            latent_sweep(sizes, data, records)
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
              "malloc": f"M_MMAP_THRESHOLD {MMAP_THRESHOLD} (mallopt, every job)",
              "load_1m": [min(loads, default=None), max(loads, default=None)], "noisy": loaded,
              **({"from_record": args.from_record} if args.from_record else {})}
    print()
    for line in token_lines(by_tokens) + latent_lines(by_latents, skipped):
        print(json.dumps({**line, **common}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

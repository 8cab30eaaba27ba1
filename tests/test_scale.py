"""docs/scale.md's plan for a 1B-token, 1M-latent run, checked by simulation: the real shuffle planner
and the real feature sharding run at those sizes without data, and every job stays within budget."""

import math
import re
from pathlib import Path

import numpy as np
import pytest

from assets.partitions import N_FEATURE_SHARDS, N_SHUFFLE_WORKERS
from sae_platform.features import N_HIST_BINS, FeatureSettings, feature_shards
from sae_platform.shuffle_plan import SIGMAS, final_bucket_rows, plan_shuffle

DOC = Path(__file__).resolve().parents[1] / "docs" / "scale.md"
GiB = 1 << 30

# The run of docs/scale.md: SmolLM2-135M's residual stream (d_model 576) cached as float16.
TOKENS, D_MODEL, ACT_BYTES = 10**9, 576, 2
N_LATENTS, K = 1 << 20, 32
BATCH_TOKENS = 10_000_000  # tokens per activation batch (inbox file): 100 batches
RESERVOIR_FACTOR = 4  # the feature settings the page recommends at this size (default 10)
# The shuffle settings the page recommends at this size.
N_BUCKETS, SHUFFLE_MEMORY = 32, 8 * GiB
# Budgets a job must stay within (one Celery worker or Kubernetes pod: 16 GiB, files >= 64 MB).
JOB_MEMORY, MIN_FILE_BYTES, MAX_FILES_PER_PASS = 16 * GiB, 64 * 10**6, 10_000


def shuffle_figures() -> dict:
    plan = plan_shuffle(TOKENS, D_MODEL * ACT_BYTES, N_BUCKETS, SHUFFLE_MEMORY, N_SHUFFLE_WORKERS)
    data = TOKENS * plan.record_bytes
    passes = []
    for p in range(1, plan.n_passes + 1):
        jobs = plan.jobs_in_pass(p)
        per_worker = [sum(1 for j in range(jobs) if j % N_SHUFFLE_WORKERS == w) for w in range(N_SHUFFLE_WORKERS)]
        passes.append({"pass": p, "jobs": jobs, "files": jobs * N_BUCKETS if p < plan.n_passes else jobs,
                       "bytes_per_job": data / jobs, "jobs_per_worker": per_worker})
    return {"plan": plan, "data_bytes": data, "passes": passes}


def feature_figures(reservoir_factor: int = RESERVOIR_FACTOR, batch_tokens: int = BATCH_TOKENS) -> dict:
    """Bytes of one pass-1 job (one activation batch, encoded once, feeding every feature shard)
    and of its partials and codes."""
    settings = FeatureSettings(reservoir_factor=reservoir_factor)
    shards = feature_shards(N_LATENTS, N_FEATURE_SHARDS)
    top_k, reservoir = settings.top_k, settings.top_k * settings.reservoir_factor
    # Partial's arrays per feature (sae_platform/features.py): top_act f4 + top_row i8 per top-k slot,
    # res_key i8 + res_row i8 + res_act f4 per reservoir slot, count i8 + sum f8 + max f4, hist i8 per bin.
    partial_per_feature = top_k * 12 + reservoir * 20 + 20 + N_HIST_BINS * 8
    # _ShardState per feature: two selectors (an int64 [features, 2m] slot buffer each, plus fill
    # and threshold), count i8, sum f8, max f4, hist i8 per bin, the witness flag
    state_per_feature = 16 * (top_k + reservoir) + 2 * 16 + 20 + N_HIST_BINS * 8 + 1
    sae_bytes = 2 * N_LATENTS * D_MODEL * 4  # W_enc and W_dec, float32: TopK selects over every latent
    # the batch's sparse codes (float32 value + int32 index per code), held until written, plus
    # their serialised copy while they are written (compute_and_write_partials)
    codes_bytes = 2 * batch_tokens * K * 8
    # one job holds every shard's state while it streams and every shard's partial when it ends:
    # counting both at once bounds the peak
    job_memory = sae_bytes + N_LATENTS * (state_per_feature + partial_per_feature) + codes_bytes
    n_batches = math.ceil(TOKENS / batch_tokens)
    return {"shards": shards, "partial_bytes": N_LATENTS * partial_per_feature, "job_memory": job_memory,
            "sae_bytes": sae_bytes, "codes_bytes": codes_bytes, "n_jobs": n_batches,
            "n_partials": n_batches * N_FEATURE_SHARDS, "stored_codes_bytes": TOKENS * K * 8,
            "partials_bytes": n_batches * N_LATENTS * partial_per_feature, "n_batches": n_batches}


DEFAULT_FEATURES = {"reservoir_factor": FeatureSettings().reservoir_factor, "batch_tokens": 25_000_000}


def test_the_shuffle_plan_for_a_billion_tokens_stays_within_budget():
    figures = shuffle_figures()
    plan = figures["plan"]
    assert plan.n_passes == 3 and plan.n_final_buckets == N_BUCKETS ** 2 and not plan.warnings
    # memory: a scatter block and its copies, and the largest final bucket (mean + 6 sigma), fit the budget
    assert plan.block_rows * (4 * plan.record_bytes + 32) <= SHUFFLE_MEMORY <= JOB_MEMORY
    mean = TOKENS / plan.n_final_buckets
    assert mean + SIGMAS * math.sqrt(mean) <= final_bucket_rows(SHUFFLE_MEMORY, D_MODEL * ACT_BYTES)
    for p in figures["passes"]:
        assert p["files"] <= MAX_FILES_PER_PASS, p
        if p["pass"] < plan.n_passes:  # scatter files: big enough for full-speed reads
            assert figures["data_bytes"] / p["files"] >= MIN_FILE_BYTES, p
        assert max(p["jobs_per_worker"]) - min(p["jobs_per_worker"]) <= 1, p  # the workers share evenly
    # pass 1 is cut N_SHUFFLE_WORKERS ways: each job streams a quarter of the data (docs/scale.md says so)
    assert figures["passes"][0]["bytes_per_job"] == pytest.approx(figures["data_bytes"] / N_SHUFFLE_WORKERS)


def test_the_feature_sharding_for_a_million_latents_stays_within_budget():
    figures = feature_figures()
    covered = np.zeros(N_LATENTS, dtype=np.int8)
    for start, stop in figures["shards"]:
        covered[start:stop] += 1
    assert (covered == 1).all(), "every latent in exactly one shard"
    # one pass-1 job per activation batch, whatever the number of feature shards
    assert figures["n_jobs"] == figures["n_batches"] == 100
    assert figures["job_memory"] <= JOB_MEMORY, figures["job_memory"] / GiB
    # the partials scale with the number of activation batches, not with tokens: few large batches
    assert figures["partials_bytes"] <= 0.25 * TOKENS * D_MODEL * ACT_BYTES
    # docs/scale.md's warning: with the default reservoir and 25M-token batches a job does not fit
    # (the batch's codes push it over), hence the smaller batches and reservoir above
    default = feature_figures(**DEFAULT_FEATURES)
    assert default["job_memory"] > JOB_MEMORY >= default["job_memory"] - default["codes_bytes"]


def test_the_page_quotes_these_figures():
    text = DOC.read_text()
    shuffle, features = shuffle_figures(), feature_figures()
    quoted = {
        "passes": f"{shuffle['plan'].n_passes} passes",
        "final buckets": f"{shuffle['plan'].n_final_buckets:,} final buckets",
        "data": f"{shuffle['data_bytes'] / 1e12:.2f} TB",
        "feature job memory": f"{features['job_memory'] / GiB:.1f} GiB",
        "default feature job memory": f"{feature_figures(**DEFAULT_FEATURES)['job_memory'] / GiB:.1f} GiB",
        "partials": f"{features['partials_bytes'] / 1e9:.0f} GB",
        "codes": f"{features['stored_codes_bytes'] / 1e9:.0f} GB",
    }
    missing = {k: v for k, v in quoted.items() if v not in text}
    assert not missing, f"docs/scale.md does not quote the simulated figures: {missing}"
    assert re.search(r"N_SHUFFLE_WORKERS", text) and re.search(r"N_FEATURE_SHARDS", text)


# docs/scale.md, "16M latents": Gao et al.'s width on a 4,096-wide model, latent-sharded (latent_parallel.py).
GAO_LATENTS, GAO_D_MODEL, GAO_BATCH, GAO_K = 1 << 24, 4096, 4096, 32
DEVICE_MEMORY, PRE_CHUNK_LATENTS, ASSUMED_FLOPS = 80 * GiB, 65536, 400e12
MiB = 1 << 20


def latent_sharded_figures(ranks: int) -> dict:
    """Per-rank bytes and traffic of one step of a TopK SAE sharded over ``ranks`` latent ranks."""
    per_matrix = GAO_LATENTS // ranks * GAO_D_MODEL * 4  # float32 rows of W_enc or W_dec on this rank
    state = 2 * per_matrix * 4  # the two matrices, their gradients, Adam's m and v
    chunk = GAO_BATCH * PRE_CHUNK_LATENTS * 4
    gather = GAO_BATCH * GAO_K * 8 * (ranks - 1)  # f32 value + i32 index of every other rank's candidates
    all_reduce = 2 * (ranks - 1) / ranks * GAO_BATCH * GAO_D_MODEL * 4
    encoder_s = 2 * GAO_BATCH * GAO_D_MODEL * GAO_LATENTS / ranks / ASSUMED_FLOPS
    return {"state": state, "peak": state + chunk, "gather": gather, "all_reduce": all_reduce,
            "encoder_ms": encoder_s * 1e3}


def test_sixteen_million_latents_fit_only_latent_sharded():
    replicated = latent_sharded_figures(1)
    assert replicated["state"] == 2048 * GiB > DEVICE_MEMORY  # no device holds the replicated SAE
    fits = [r for r in (16, 32, 64) if latent_sharded_figures(r)["peak"] <= DEVICE_MEMORY]
    assert fits[0] == 32, "the smallest latent-sharded layout on 80 GiB devices"
    rows = {}
    for line in DOC.read_text().splitlines():  # the page's table: | R | state | + chunk | gather | all-reduce | ms |
        cells = [c.strip().replace("**", "").split(" (")[0] for c in line.split("|")[1:-1]]
        if len(cells) == 6 and cells[0].isdigit():
            rows[int(cells[0])] = cells[1:]
    for ranks in (16, 32, 64):
        f = latent_sharded_figures(ranks)
        assert rows.get(ranks) == [f"{f['state'] / GiB:.1f} GiB", f"{f['peak'] / GiB:.1f} GiB",
                                   f"{f['gather'] / MiB:.0f} MiB", f"{f['all_reduce'] / MiB:.0f} MiB",
                                   f"{f['encoder_ms']:.0f} ms"], (ranks, rows.get(ranks))
    text = DOC.read_text()
    assert "2,048 GiB per rank" in text and "512 GiB of gradients" in text

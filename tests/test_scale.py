"""docs/scale.md's plan for a 1B-token, 1M-latent run, checked by simulation: the real shuffle planner
and the real feature sharding run at those sizes without data, and every job stays within budget."""

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

from assets.partitions import N_FEATURE_SHARDS, N_SHUFFLE_WORKERS
from sae_platform.feature_plan import (
    FIXED_JOB_BYTES,
    FeaturePlanError,
    plan_feature_shards,
    stored_partials_bytes,
)
from sae_platform.features import N_HIST_BINS, FeatureSettings, feature_shards
from sae_platform.sae.topk import ENCODE_CHUNK_ELEMENTS
from sae_platform.shuffle_plan import SIGMAS, final_bucket_rows, plan_shuffle

DOC = Path(__file__).resolve().parents[1] / "docs" / "scale.md"
GiB = 1 << 30

# The run of docs/scale.md: SmolLM2-135M's residual stream (d_model 576) cached as float16.
TOKENS, D_MODEL, ACT_BYTES = 10**9, 576, 2
N_LATENTS, K = 1 << 20, 32
BATCH_TOKENS = 10_000_000  # tokens per activation batch (inbox file): 100 batches
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


def sae_weight_bytes(n_latents: int) -> int:
    """The SAE as ``load_sae`` loads it: W_enc, W_dec and b_enc, float32."""
    return n_latents * (2 * D_MODEL + 1) * 4


def shard_plan(n_latents: int = N_LATENTS, reservoir_factor: int = FeatureSettings().reservoir_factor,
               batch_tokens: int = BATCH_TOKENS, weights_by_shard: bool = False):
    """plan_feature_shards for the page's run at one worker's budget (JOB_MEMORY). A shard job holds
    the SAE's weights: the whole SAE (the page's conservative figures, as a job that loads it would),
    or with ``weights_by_shard`` only its shard's rows (what the pipeline's passes 1-2 read:
    ``feature_layout.plan_layout``)."""
    settings = FeatureSettings(reservoir_factor=reservoir_factor)
    weights = {"weight_bytes_per_latent": sae_weight_bytes(1)} if weights_by_shard \
        else {"sae_bytes": sae_weight_bytes(n_latents)}
    return plan_feature_shards(n_latents, top_k=settings.top_k, reservoir_size=settings.top_k * reservoir_factor,
                               n_hist_bins=N_HIST_BINS, batch_tokens=batch_tokens, k=K,
                               memory_budget_bytes=JOB_MEMORY, n_groups=N_FEATURE_SHARDS, **weights)


def encode_job_bytes(n_latents: int, batch_tokens: int, chunk_latents: int | None = None) -> int:
    """One batch's encode job (feature_codes.encode_codes): the SAE as ``load_sae`` loads it (W_enc,
    W_dec and b_enc, float32), or with ``chunk_latents`` only one chunk of W_enc and b_enc at a time
    (planned: read shard by shard from a latent-sharded checkpoint), one pre-activation chunk
    (ENCODE_CHUNK_ELEMENTS float32 values: the TopK encode never holds [batch, n_latents]), the
    batch's activating codes until they are written (12 B each, k per token) and the job's fixed
    memory."""
    weights = chunk_latents * (D_MODEL + 1) * 4 if chunk_latents else sae_weight_bytes(n_latents)
    return FIXED_JOB_BYTES + weights + ENCODE_CHUNK_ELEMENTS * 4 + batch_tokens * K * 12


def feature_figures(reservoir_factor: int = FeatureSettings().reservoir_factor,
                    batch_tokens: int = BATCH_TOKENS, n_latents: int = N_LATENTS,
                    weights_by_shard: bool = False) -> dict:
    """The feature passes of the page's run: the plan, one shard's job, one batch's encode job, and
    what they store (partials: one per batch and shard, at most ``stored_partials_bytes`` a batch;
    codes: 12 B per activating code)."""
    plan = shard_plan(n_latents, reservoir_factor, batch_tokens, weights_by_shard)
    settings = FeatureSettings(reservoir_factor=reservoir_factor)
    n_batches = math.ceil(TOKENS / batch_tokens)
    partials = stored_partials_bytes(n_latents, batch_tokens * K, settings.top_k, settings.top_k * reservoir_factor,
                                     N_HIST_BINS)
    return {"plan": plan, "shards": feature_shards(n_latents, plan.n_shards), "shard_job": plan.job_bytes,
            "encode_job": encode_job_bytes(n_latents, batch_tokens),
            "n_pass_1_jobs": n_batches * plan.n_shards, "n_batches": n_batches,
            "partials_bytes": n_batches * partials, "stored_codes_bytes": TOKENS * K * 12}


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
    plan = figures["plan"]
    covered = np.zeros(N_LATENTS, dtype=np.int8)
    for start, stop in figures["shards"]:
        covered[start:stop] += 1
    assert (covered == 1).all(), "every latent in exactly one shard"
    assert plan.n_shards % N_FEATURE_SHARDS == 0  # every shard group runs as many shards
    # every job within one worker, with the default reservoir: pass 1 of one (batch, shard), pass 2
    # of one shard, and the batch's one encode
    assert figures["shard_job"] <= JOB_MEMORY and figures["encode_job"] <= JOB_MEMORY, figures
    # the shard job is the planner's fewest: one shard group fewer would not fit
    assert plan.n_shards == N_FEATURE_SHARDS \
        or dataclasses.replace(plan, n_shards=plan.n_shards - N_FEATURE_SHARDS).job_bytes > JOB_MEMORY
    # memory per job grows with the latents per shard, not with n_latents: 4x the latents, more shards
    # of the same job, once pass 2 reads only its shard's weights (the whole SAE is then 18 GiB)
    wide = feature_figures(n_latents=4 * N_LATENTS, weights_by_shard=True)
    assert wide["plan"].n_shards > plan.n_shards and wide["shard_job"] <= JOB_MEMORY
    # 25M-token batches with the default reservoir fit too (the old single-group job needed 25.1 GiB)
    assert feature_figures(batch_tokens=25_000_000)["shard_job"] <= JOB_MEMORY


def test_sixteen_million_latents_over_a_billion_tokens_plan_every_feature_job_within_budget():
    """Gao et al.'s width through the feature passes of the page's run (d_model 576, 1B tokens):
    the planner cuts pass 1 and pass 2 into shard jobs within one worker, each reading only its
    shard's rows (as the pipeline's passes 1-2 do); the whole SAE is 72 GiB, which no job that loads
    it whole can hold, and the encode still does (encode_job_bytes: chunked, it would fit)."""
    with pytest.raises(FeaturePlanError, match="shard by shard"):
        shard_plan(GAO_LATENTS)  # a shard job that loaded the whole SAE
    figures = feature_figures(n_latents=GAO_LATENTS, weights_by_shard=True)
    plan = figures["plan"]
    assert figures["shard_job"] <= JOB_MEMORY, plan
    assert figures["encode_job"] > JOB_MEMORY  # the encode holds the whole SAE
    chunked = encode_job_bytes(GAO_LATENTS, BATCH_TOKENS, chunk_latents=plan.latents_per_shard)
    assert chunked <= JOB_MEMORY
    text = DOC.read_text()
    for figure in (f"{plan.n_shards} shards of {plan.latents_per_shard:,} latents", f"{plan.job_bytes / GiB:.1f} GiB",
                   f"{figures['encode_job'] / GiB:.1f} GiB", f"{chunked / GiB:.1f} GiB",
                   f"{figures['n_pass_1_jobs']:,} pass-1 jobs", f"{figures['partials_bytes'] / 1e12:.1f} TB"):
        assert figure in text, f"docs/scale.md does not quote {figure!r}"


def test_the_page_quotes_these_figures():
    text = DOC.read_text()
    shuffle, features = shuffle_figures(), feature_figures()
    quoted = {
        "passes": f"{shuffle['plan'].n_passes} passes",
        "final buckets": f"{shuffle['plan'].n_final_buckets:,} final buckets",
        "data": f"{shuffle['data_bytes'] / 1e12:.2f} TB",
        "feature shards": f"{features['plan'].n_shards} shards of {features['plan'].latents_per_shard:,} latents",
        "shard job memory": f"{features['shard_job'] / GiB:.1f} GiB",
        "encode job memory": f"{features['encode_job'] / GiB:.1f} GiB",
        "pass-1 jobs": f"{features['n_pass_1_jobs']:,} pass-1 jobs",
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

"""Feature tables sharded over data AND features: peak RSS of every job of the feature stages for a
wide SAE, against the single-group layout where one pass-1 job holds every latent's state.

    python benchmarks/feature_shards.py --quick     # 2^16 latents, 16 shards of 4,096, one batch: < 1 min quiet
    python benchmarks/feature_shards.py             # 2^20 latents, 16 shards of 65,536, two batches
    python benchmarks/feature_shards.py --pass2-only  # the same, only what pass 2 needs (no baseline)
    python benchmarks/feature_shards.py --quick --pass2-only --latents 131072 --d-model 576  # the check at d 576

Data: activation batches of 2,048 synthetic rows (d_model 64, ``--d-model``; float16, the partition
layout; the feature stages' memory does not depend on d_model beyond the SAE's own weights). SAE: TopK, k 32,
random weights (torch seed 0; the stages' cost does not depend on training). Feature settings: the
pipeline's defaults (top 20, reservoir 200, 5 intervals x 4). ``--shards`` (default 16, the goal's
layout); ``plan_feature_shards``' own choice at the 2 GiB goal budget is printed beside it.

Jobs, each a fresh subprocess, as the pipeline runs them (``sae_platform/feature_codes.py``):
- encode (one per batch): ``encode_codes``, the batch's one encode, its codes committed split by
  shard and pinned to the checkpoint (the ``feature_codes`` asset);
- pass 1 (one per batch x shard group, as the ``feature_stats_partial`` asset runs it):
  ``pinned_codes`` + ``partials_from_codes``, the group's shards g, g + 4, … in turn, each from its
  own codes file only and committed before the next, without the SAE;
- pass 2 (one per shard), as the ``feature_topk`` asset runs it: ``merge_stored_shard`` (the merge,
  and the interval examples from the shard's codes, without the SAE's weights) + ``write_tables``,
  then the logit effects from the shard's decoder rows only (``sharded_checkpoint.decoder_rows``, read
  by slice from the committed checkpoint) against a random W_U of GPT-2's vocabulary, committed;
- the exactness check of pass 2's first shard (``matches_brute_force``, witness mode), as the
  ``check_brute_force`` step runs it: the committed checkpoint without its weights
  (``latent_slice.stored_sae``: its fingerprint taken 64 MiB at a time) and ``brute_force_check``;
  beside it ``check_whole``, the same check with the whole SAE loaded (``load_sae``), as the step
  ran before: its weights (2 x n_latents x d_model floats) were most of its peak.
The SAE is committed first as a latent-sharded checkpoint (``LATENT_SHARDS`` files, as a wide SAE's
training writes it), in a job of its own that is not measured.
The full mode runs pass 1 for every shard group of the first batch and for the groups of the first
and last shard of the second, then pass 2 of the first and last shard (every shard has the same
width, so the same memory); the quick mode one batch, pass 1 of those two groups and pass 2 of the
first shard. The baseline is
today's single-group pass-1 job: ``compute_partials`` over every latent of one batch in one process,
measured at 2^16 latents (at 2^20 it would take ~9 GiB beside the other work on this machine) and
scaled by the latent count, which its state is proportional to.

Peak RSS: each job's own VmHWM when it ends (the whole process: interpreter, torch, the store
client and the job), with MALLOC_MMAP_THRESHOLD_=256 KiB so that RSS follows live
allocations (as benchmarks/feature_tables.py). The plan (``feature_plan.plan_feature_shards``)
and its modelled job bytes are printed beside the measured peaks. Each pass-1 job also reports the
bytes of the partials it committed (each partial's committed version: ``partial.npz``, its meta and
checksums), which grow with the latents that fired in the batch, not with the shard's width
(``features.Partial``). The last lines are one JSON object per figure.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_help import HelpFormatter
from feature_tables import MMAP_THRESHOLD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D_MODEL, K, N_GROUPS = 64, 32, 4
GOAL_JOB_BYTES, GOAL_SHARDS = 2 << 30, 16  # issue 25: <= 2 GiB per job at 16 shards of 65,536 latents
BATCHES = ("b0", "b1")
SAE_NAME = "bench"
LATENT_SHARDS = 4  # files of the committed checkpoint
VOCAB = 50_257  # GPT-2's: the width of the logit effects' W_U


def make_sae(n_latents: int, d_model: int = D_MODEL):
    import torch

    from sae_platform.sae import build_sae

    torch.manual_seed(0)
    return build_sae("topk", d_model, n_latents, k=K).eval()


def make_data(root: str, tokens: int, batches: tuple[str, ...], d_model: int = D_MODEL) -> None:
    """Batches of sparse combinations of random directions plus noise (float16, as cached)."""
    from sae_platform import catalog
    from sae_platform.storage import ArtifactStore

    store = ArtifactStore(root)
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((256, d_model))
    for key in batches:
        codes = rng.exponential(1.0, (tokens, 256)) * (rng.random((tokens, 256)) < 0.05)
        acts = (codes @ directions + 0.2 * rng.standard_normal((tokens, d_model))).astype(np.float16)
        with store.writing(catalog.partition_name(key)) as version:
            group = store.open_group(f"{version}/{catalog.FIRST_STORE}", "w")
            group.create_array("acts", data=acts, chunks=(min(4096, tokens), d_model), compressors=None)
            group.attrs.update({"d_model": d_model, "dtype": "float16", "n_rows": tokens})


def worker(args) -> None:
    """One job in this process; prints {"seconds", "peak_bytes"} (pass 1: and "partial_bytes", "partials")."""
    import torch

    from sae_platform import catalog
    from sae_platform import feature_codes as fc
    from sae_platform import features as F
    from sae_platform import sharded_checkpoint as sc
    from sae_platform.feature_check import brute_force_check
    from sae_platform.feature_merge import merge_stored_shard, write_tables
    from sae_platform.latent_slice import stored_sae
    from sae_platform.logits import decoder_logit_effects
    from sae_platform.storage import ArtifactStore
    from sae_platform.synthetic import SyntheticTokenizer

    store, settings = ArtifactStore(args.store), F.FeatureSettings()
    shards = F.feature_shards(args.latents, args.shards)
    started = time.perf_counter()
    checkpoint = catalog.checkpoint_version(store, SAE_NAME)
    written = {}
    if args.worker == "checkpoint":  # what training commits; not measured
        sae = make_sae(args.latents, args.d_model)
        weights = {sc.SAE + name: tensor.detach() for name, tensor in sae.state_dict().items()}
        sc.save_sharded(store, catalog.checkpoint_name(SAE_NAME), "topk", sc.LatentLayout(args.latents, LATENT_SHARDS),
                        weights, json_files={"cfg.json": {"sae": sae.config}})
    elif args.worker == "encode":  # the batch's one encode, pinned to the checkpoint for pass 1 to find
        fc.encode_codes(store, make_sae(args.latents, args.d_model), SAE_NAME, args.batch, shards,
                        batch_rows=args.batch_rows, checkpoint=checkpoint)
    elif args.worker == "pass1":  # one (batch, shard group): no SAE, its shards' codes only, one shard at a time
        codes = fc.pinned_codes(store, SAE_NAME, args.batch, shards, checkpoint=checkpoint)
        group_shards = list(range(args.shard, args.shards, N_GROUPS))
        versions = [c["version"] for c in fc.partials_from_codes(store, SAE_NAME, args.batch, codes, group_shards,
                                                                 settings, checkpoint=checkpoint)]
        written = {"partial_bytes": sum(store.fs.du(version) for version in versions), "partials": len(versions)}
    elif args.worker == "pass2":  # no SAE: the shard's codes, and its decoder rows for the logit effects
        tables = merge_stored_shard(store, SAE_NAME, args.shard, args.batches.split(","), settings, "cpu", checkpoint)
        write_tables(store, SAE_NAME, args.shard, tables)
        start, stop = shards[args.shard]
        rows = sc.decoder_rows(store, SAE_NAME, start, stop, version=checkpoint)
        tokenizer = SyntheticTokenizer(VOCAB - 2)
        unembedding = torch.randn(VOCAB, args.d_model, generator=torch.Generator().manual_seed(1))
        with store.writing(catalog.logits_name(SAE_NAME, args.shard)) as version:
            store.write_parquet(f"{version}/{catalog.LOGIT_EFFECTS}",
                                decoder_logit_effects(rows, unembedding, tokenizer, start))
    elif args.worker in ("check", "check_whole"):  # the committed checkpoint without its weights, or whole
        from sae_platform.trainer import load_sae

        sae = stored_sae(store, SAE_NAME) if args.worker == "check" else load_sae(store, SAE_NAME)[0]
        check = brute_force_check(store, sae, SAE_NAME, args.shard, *shards[args.shard])
        if not check["ok"]:
            raise SystemExit(f"the check of shard {args.shard} failed: {check['mismatches'][:3]}")
    elif args.worker == "baseline":
        F.compute_partials(store, make_sae(args.latents, args.d_model), BATCHES[0], [(0, args.latents)], settings,
                           batch_rows=args.batch_rows)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_bytes": peak_rss_bytes(), **written}))


def run_job(args, root: str, job: str, *, latents: int | None = None, batch: str = BATCHES[0],
            shard: int = 0) -> dict:
    """Run one job in a fresh subprocess; its seconds and peak RSS (bytes)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, __file__, "--worker", job, "--store", root, "--latents", str(latents or args.latents),
           "--shards", str(args.shards), "--batches", args.batches, "--batch", batch, "--shard", str(shard),
           "--batch-rows", str(args.batch_rows), "--d-model", str(args.d_model)]
    run = subprocess.run(cmd, capture_output=True, env=env, text=True)
    if run.returncode:
        raise SystemExit(f"{job} job failed:\n{run.stderr[-3000:]}")
    return {"job": job, "shard": shard, "batch": batch, **json.loads(run.stdout.strip().splitlines()[-1])}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM): the interpreter, torch, the store client and the job."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark reads Linux's peak RSS)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2^16 latents, one batch of 2,048 tokens")
    parser.add_argument("--latents", type=int, default=None)
    parser.add_argument("--shards", type=int, default=GOAL_SHARDS, help="feature shards (the goal's layout)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per batch")
    parser.add_argument("--d-model", type=int, default=D_MODEL, help="the SAE's and the rows' width")
    parser.add_argument("--batch-rows", type=int, default=None, help="rows per encode (pre-activations: x latents)")
    parser.add_argument("--pass2-only", action="store_true",
                        help="only the jobs pass 2 needs (encode, pass 1 of its shards) and pass 2; no baseline")
    parser.add_argument("--worker", choices=["checkpoint", "encode", "pass1", "pass2", "check", "check_whole",
                                             "baseline"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--batches", default=",".join(BATCHES), help=argparse.SUPPRESS)
    parser.add_argument("--batch", default=BATCHES[0], help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.latents = args.latents or (1 << 16 if args.quick else 1 << 20)
    args.batch_rows = args.batch_rows or max(16, (1 << 26) // args.latents)  # a 256 MiB pre-activation block
    if args.worker:
        worker(args)
        return 0

    from sae_platform.feature_plan import plan_feature_shards
    from sae_platform.features import N_HIST_BINS, FeatureSettings

    latents, n_shards = args.latents, args.shards
    tokens = args.tokens or 2048
    batches = BATCHES[:1] if args.quick else BATCHES
    args.batches = ",".join(batches)
    settings = FeatureSettings()
    plan = plan_feature_shards(latents, top_k=settings.top_k, reservoir_size=settings.top_k * settings.reservoir_factor,
                               n_hist_bins=N_HIST_BINS, batch_tokens=tokens, k=K, memory_budget_bytes=GOAL_JOB_BYTES,
                               n_groups=N_GROUPS)
    wall = time.perf_counter()
    load_before = os.getloadavg()[0]
    jobs = []
    last = n_shards - 1
    with tempfile.TemporaryDirectory(prefix="feature_shards_") as root:
        make_data(root, tokens, batches, args.d_model)
        run_job(args, root, "checkpoint")
        for batch in batches:
            jobs.append(run_job(args, root, "encode", batch=batch))
        # every shard group of the first batch (each must fit); the groups of the first and last shard of
        # the others (for pass 2). A pass-1 job's "shard" is its group g: shards g, g + N_GROUPS, …
        every = not (args.quick or args.pass2_only)
        for batch in batches:
            for group in (range(N_GROUPS) if batch == batches[0] and every else sorted({0, last % N_GROUPS})):
                jobs.append(run_job(args, root, "pass1", batch=batch, shard=group))
        for shard in (0,) if args.quick else (0, last):
            jobs.append(run_job(args, root, "pass2", shard=shard))
        jobs += [run_job(args, root, "check", shard=0), run_job(args, root, "check_whole", shard=0)]
        baseline_latents = min(latents, 1 << 16)
        baseline = None if args.pass2_only else run_job(args, root, "baseline", latents=baseline_latents)
    wall_s = time.perf_counter() - wall
    baseline_bytes = None if baseline is None else baseline["peak_bytes"] * latents / baseline_latents
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"feature shards: TopK d_model {args.d_model}, {latents:,} latents, k {K}; {len(batches)} batch(es) of "
          f"{tokens:,} tokens; {n_shards} shards of {-(-latents // n_shards):,} latents")
    print(f"plan_feature_shards at a {mib(GOAL_JOB_BYTES):,.0f} MiB budget: {plan.n_shards} shards of "
          f"{plan.latents_per_shard:,}, modelled {mib(plan.job_bytes):,.0f} MiB per shard job")
    print(f"{'job':<12}{'batch':>6}{'shard':>7}{'seconds':>9}{'peak MiB':>10}{'partials MiB':>14}"
          "   (pass1: shard = its shard group)")
    for job in jobs:
        written = f"{mib(job['partial_bytes']):>14.1f}" if "partial_bytes" in job else ""
        print(f"{job['job']:<12}{job['batch']:>6}{job['shard']:>7}{job['seconds']:>9.2f}{mib(job['peak_bytes']):>10.0f}"
              + written)
    if baseline is not None:
        print(f"baseline (one pass-1 job over all latents, today's single group): {mib(baseline['peak_bytes']):,.0f} "
              f"MiB at {baseline_latents:,} latents" + ("" if baseline_latents == latents else
                                                        f", {mib(baseline_bytes):,.0f} MiB scaled to {latents:,}"))
    load_after = os.getloadavg()[0]
    print(f"wall time {wall_s:.1f} s; load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs")
    print()
    peak = {kind: max(j["peak_bytes"] for j in jobs if j["job"] == kind)
            for kind in ("encode", "pass1", "pass2", "check", "check_whole")}
    common = {"n_latents": latents, "n_shards": n_shards, "latents_per_shard": -(-latents // n_shards),
              "shards_per_pass1_job": -(-n_shards // N_GROUPS),
              "d_model": args.d_model, "k": K, "tokens_per_batch": tokens, "n_batches": len(batches),
              "planned_shards_at_goal_budget": plan.n_shards, "quick": args.quick, "wall_s": round(wall_s, 1),
              "baseline_measured_at_latents": baseline_latents, "load_before": load_before, "load_after": load_after}
    lines = [{"metric": metric, "value": value, "baseline": baseline_bytes,
              "ratio": None if baseline_bytes is None else value / baseline_bytes,
              "goal": GOAL_JOB_BYTES, "unit": "bytes", **common}
             for metric, value in (("feature_pass1_shard_job_peak_rss_bytes", peak["pass1"]),
                                   ("feature_pass2_shard_job_peak_rss_bytes", peak["pass2"]),
                                   ("feature_encode_job_peak_rss_bytes", peak["encode"]))]
    lines.append({"metric": "feature_check_job_peak_rss_bytes", "value": peak["check"],
                  "baseline": peak["check_whole"], "baseline_is": "the same check with the whole SAE loaded",
                  "ratio": peak["check"] / peak["check_whole"], "goal": GOAL_JOB_BYTES, "unit": "bytes", **common})
    pass_1 = [j for j in jobs if j["job"] == "pass1"]
    n_partials = sum(j["partials"] for j in pass_1)
    lines.append({"metric": "feature_pass1_partial_bytes_per_shard", "unit": "bytes",
                  "value": round(sum(j["partial_bytes"] for j in pass_1) / n_partials),
                  "pass1_seconds_per_shard": round(sum(j["seconds"] for j in pass_1) / n_partials, 3), **common})
    for line in lines:
        print(json.dumps(line))
    return 0 if max(v for kind, v in peak.items() if kind != "check_whole") <= GOAL_JOB_BYTES else 1


if __name__ == "__main__":
    raise SystemExit(main())

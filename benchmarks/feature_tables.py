"""Feature tables, pass 1: the streaming per-shard top-K / reservoir / histogram pass against the
approach of common dashboard tools, side by side on the same data and SAE.

    python benchmarks/feature_tables.py --quick     # 12.5k / 50k tokens, 16k latents: under a minute on 2 cores
    python benchmarks/feature_tables.py             # 50k / 200k tokens, 3 repeats

Data: synthetic residual activations (d_model 576, float16, the activations partition layout):
each row is a sparse combination of 24 of the SAE's decoder directions, drawn with Zipf-like
frequencies (a few common features, a long tail, as in trained SAEs), plus noise. Two partitions:
"small" (1x tokens) and "large" (4x tokens). SAE: TopK, 16,384 latents, k 32, random init (the
pass's cost does not depend on training).

Sides (each run in a fresh subprocess; identical token batches of --batch-rows rows):
- streaming: ``features.compute_partial`` over all latents as one feature shard (for TopK every
  feature shard pays the full selection, so one shard covering the dictionary is the cheapest
  layout, and its memory does not grow with the partition): top 20, reservoir of 200 activating
  tokens per feature, count / sum / max / 66-bin histogram.
- baseline (SAEDashboard-style): for each batch of --feature-batch features, materialise the dense
  [all tokens, features] activation matrix (``encode_slice`` per token batch; for TopK that is the
  full selection each time, as SAEDashboard re-runs the SAE per feature batch), then torch.topk
  per feature, count / sum / max, and the same histogram (computed in row blocks to spare it
  temporaries). It keeps no random sample: that favours the baseline. Every feature batch costs
  the same, so the baseline runs --baseline-batches of them and its throughput is
  tokens x features-processed / seconds.

Figures: throughput (tokens x features per second, on the large partition), peak memory (large
partition) and the growth of peak memory when tokens grow 4x (small -> large).

The baseline's feature batch is a trade-off it cannot escape: for a TopK SAE every batch pays a
full encode of all tokens (throughput ~ batch size), while its memory is tokens x batch x 4 bytes.
At 4096 (4 batches for 16k latents) it holds 0.8 GB at 50k tokens and 3.3 GB at 200k; one batch of
all 16k latents would match streaming's single encode but hold 3.3 GB at 50k tokens (13 GB at
200k), smaller batches (SAEDashboard uses a few hundred features) multiply the encodes.

Peak memory: in each subprocess, after imports, the SAE load and opening the store, the kernel's
high-water mark is reset (``echo 5 > /proc/self/clear_refs``), the current VmRSS is read, the pass
runs, and VmHWM - that VmRSS is the figure: every byte the pass touched (torch tensors, numpy,
zarr buffers), not an estimate. Both sides run with MALLOC_MMAP_THRESHOLD_=256 KiB so that RSS
follows live allocations: by default glibc keeps freed blocks of up to 32 MB in its heap, and the
streaming side's peak then wobbles by 10-15% with fragmentation (measured here: 186-220 MiB against
~163 MiB live; --default-malloc shows it). The baseline's peak is one big mmapped matrix either way.
Timings are medians of --repeats runs. The last lines are one JSON object per figure.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_help import HelpFormatter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D_MODEL, N_LATENTS, K = 576, 16384, 32
TOP_K, RESERVOIR_FACTOR = 20, 10
GOAL_THROUGHPUT = 2.0
GOAL_MEMORY_RATIO = 0.25
GOAL_MEMORY_GROWTH = 1.1
GOAL_STAGES_OVER_ENCODE = 2.0
STAGE_SIDES = ("encode", "stages_one_encode", "stages_per_shard")
CHUNK_BYTES = 4 << 20
MMAP_THRESHOLD = 256 << 10  # glibc: blocks above this are mmapped, so freeing returns them at once


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                name, value = line.split(":")
                out[name] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# worker (one side, one partition, in a fresh process)
# ---------------------------------------------------------------------------------------------

def worker(args) -> None:
    import torch

    from sae_platform import features
    from sae_platform.activations import open_partition
    from sae_platform.sae import build_sae
    from sae_platform.storage import ArtifactStore

    torch.manual_seed(0)
    sae = build_sae("topk", D_MODEL, N_LATENTS, k=K).eval()
    sae.load_state_dict(torch.load(args.sae, weights_only=True))
    store = ArtifactStore(args.store)
    part = open_partition(store, args.partition)
    n_tokens = part.n_rows
    settings = features.FeatureSettings(top_k=TOP_K, reservoir_factor=RESERVOIR_FACTOR)
    import gc

    gc.collect()
    reset = _reset_peak()
    before = _status()
    started = time.perf_counter()
    if args.worker in STAGE_SIDES:
        extra = stages_worker(args, store, sae, part)
        n_features = N_LATENTS
    elif args.worker == "streaming":
        partial = features.compute_partial(store, sae, args.partition, 0, N_LATENTS, settings,
                                           batch_rows=args.batch_rows)
        n_features = N_LATENTS
        extra = {"diagnostics": partial.diagnostics, "check_count": int(partial.count.sum())}
    else:
        n_features, total = 0, 0
        edges = torch.from_numpy(features.HIST_EDGES)
        for b in range(args.baseline_batches):
            f0, f1 = b * args.feature_batch, min((b + 1) * args.feature_batch, N_LATENTS)
            dense = torch.empty(n_tokens, f1 - f0)
            for lo in range(0, n_tokens, args.batch_rows):
                x = torch.from_numpy(part.acts[lo:lo + args.batch_rows])
                dense[lo:lo + len(x)] = sae.encode_slice(x, f0, f1)
            top_vals, top_rows = torch.topk(dense, TOP_K, dim=0)
            count = torch.zeros(f1 - f0, dtype=torch.long)
            vsum = torch.zeros(f1 - f0, dtype=torch.float64)
            hist = torch.zeros((f1 - f0) * features.N_HIST_BINS, dtype=torch.long)
            dense.amax(0)  # each feature's max, as a dashboard computes it (the value is not compared)
            for lo in range(0, n_tokens, args.batch_rows):
                block = dense[lo:lo + args.batch_rows]
                on = block > 0
                count += on.sum(0)
                vsum += block.sum(0, dtype=torch.float64)
                rows, feat = on.nonzero(as_tuple=True)
                bins = torch.bucketize(block[rows, feat], edges, right=True)
                hist += torch.bincount(feat * features.N_HIST_BINS + bins, minlength=hist.numel())
            total += int(count.sum())
            n_features += f1 - f0
            del dense, top_vals, top_rows
        extra = {"check_count": total}
    seconds = time.perf_counter() - started
    after = _status()
    print(json.dumps({"side": args.worker, "partition": args.partition, "n_tokens": n_tokens,
                      "n_features": n_features, "seconds": seconds, "peak_bytes": after["VmHWM"] - before["VmRSS"],
                      "rss_before": before["VmRSS"], "hwm_reset": reset, **extra}))


def planned_layout(n_rows: int):
    """The feature-shard layout the pipeline plans for this benchmark's SAE over a batch of
    ``n_rows`` (``feature_layout.plan_layout``, sized from ``FeatureSettings.memory_budget_bytes``:
    the default of resources.features.config), which the stage sides follow."""
    from sae_platform.feature_layout import plan_layout
    from sae_platform.features import FeatureSettings

    return plan_layout({"variant": "topk", "n_latents": N_LATENTS, "d_model": D_MODEL, "k": K},
                       FeatureSettings(top_k=TOP_K, reservoir_factor=RESERVOIR_FACTOR), n_rows)


def stages_worker(args, store, sae, part) -> dict:
    """Passes 1-2 and the blocking exactness check of every feature shard, as the pipeline runs
    them (``encode``: the bare encode of the same rows, the ratio's denominator)."""
    import torch

    from sae_platform import features, partial_store
    from sae_platform.feature_check import brute_force_check
    from sae_platform.feature_layout import layout_ranges
    from sae_platform.feature_merge import merge_shard_tables, write_tables

    shards = layout_ranges(planned_layout(part.n_rows))
    settings = features.FeatureSettings(top_k=TOP_K, reservoir_factor=RESERVOIR_FACTOR)
    seconds = {}
    t0 = time.perf_counter()
    if args.worker == "encode":
        with torch.no_grad():
            for lo in range(0, part.n_rows, args.batch_rows):
                sae.encode(torch.from_numpy(np.ascontiguousarray(part.acts[lo:lo + args.batch_rows])).float())
        return {"stage_seconds": {"encode": time.perf_counter() - t0}}
    if args.worker == "stages_one_encode":  # today's layout: one encode per row feeds every shard
        partials = features.compute_partials(store, sae, args.partition, shards, settings,
                                             batch_rows=args.batch_rows)
        for index, partial in enumerate(partials):
            partial_store.write_partial(store, "bench", args.partition, index, partial)
        del partials
    else:  # the previous layout: one pass-1 job per (batch, feature shard), each with the full selection
        for index, (start, stop) in enumerate(shards):
            partial_store.write_partial(store, "bench", args.partition, index, features.compute_partial(
                store, sae, args.partition, start, stop, settings, batch_rows=args.batch_rows))
    seconds["pass_1"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    for index in range(len(shards)):
        write_tables(store, "bench", index, merge_shard_tables(store, sae, "bench", index, [args.partition], settings))
    seconds["pass_2"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    checks = [brute_force_check(store, sae, "bench", index, start, stop, reencode=args.worker == "stages_per_shard")
              for index, (start, stop) in enumerate(shards)]
    seconds["check"] = time.perf_counter() - t2
    return {"stage_seconds": seconds, "checks_ok": all(c["ok"] for c in checks),
            "features_checked": sum(len(c["features_checked"]) for c in checks)}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def make_data(root: str, sizes: dict[str, int], sae_path: str) -> None:
    import torch

    from sae_platform import catalog
    from sae_platform.sae import build_sae
    from sae_platform.storage import ArtifactStore

    torch.manual_seed(0)
    sae = build_sae("topk", D_MODEL, N_LATENTS, k=K).eval()
    torch.save(sae.state_dict(), sae_path)
    dictionary = sae.W_dec.detach().numpy()
    rng = np.random.default_rng(0)
    freq = 1.0 / np.arange(1, N_LATENTS + 1) ** 0.7
    freq = freq[rng.permutation(N_LATENTS)]
    cdf = np.cumsum(freq / freq.sum())
    store = ArtifactStore(root)
    chunk = CHUNK_BYTES // (D_MODEL * 2)
    for key, n in sizes.items():
        with store.writing(catalog.partition_name(key)) as version:
            group = store.open_group(f"{version}/{catalog.FIRST_STORE}", "w")
            acts = group.create_array("acts", shape=(n, D_MODEL), dtype="float16", chunks=(chunk, D_MODEL),
                                      compressors=None)
            for lo in range(0, n, chunk):
                m = min(chunk, n - lo)
                idx = np.minimum(np.searchsorted(cdf, rng.random((m, 24))), N_LATENTS - 1)
                coef = rng.exponential(2.0, (m, 24)).astype(np.float32)
                rows = np.einsum("mk,mkd->md", coef, dictionary[idx]) + 0.3 * rng.standard_normal((m, D_MODEL))
                acts[lo:lo + m] = rows.astype(np.float16)
            group.attrs.update({"d_model": D_MODEL, "dtype": "float16", "n_rows": n})


def run_worker(side: str, partition: str, args, root: str, sae_path: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--partition", partition, "--store", root, "--sae", sae_path,
           "--batch-rows", str(args.batch_rows), "--feature-batch", str(args.feature_batch),
           "--baseline-batches", str(args.baseline_batches)]
    env = dict(os.environ)
    if not args.default_malloc and side not in STAGE_SIDES:  # a memory figure's setting; timings run as deployed
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12.5k / 50k tokens, 1 run per side and size")
    parser.add_argument("--tokens", type=int, default=None, help="tokens of the small partition (large = 4x)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch-rows", type=int, default=1024, help="token rows encoded at once, both sides")
    parser.add_argument("--feature-batch", type=int, default=4096,
                        help="baseline features per dense [tokens, features] matrix")
    parser.add_argument("--baseline-batches", type=int, default=1, help="passes of the baseline over the batch")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's mmap threshold alone (peaks then include its retained free blocks)")
    parser.add_argument("--worker", choices=["streaming", "baseline", *STAGE_SIDES], help=argparse.SUPPRESS)
    parser.add_argument("--partition", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--sae", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    small = args.tokens or (12_500 if args.quick else 50_000)
    repeats = args.repeats or (1 if args.quick else 3)
    wall = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="feature_bench_") as tmp:
        root, sae_path = f"{tmp}/store", f"{tmp}/sae.pt"
        t0 = time.perf_counter()
        make_data(root, {"small": small, "large": 4 * small}, sae_path)
        setup_s = time.perf_counter() - t0
        runs = {(side, p): [] for side in ("streaming", "baseline") for p in ("small", "large")}
        for r in range(repeats):  # the sides alternate which goes first
            order = ("streaming", "baseline") if r % 2 == 0 else ("baseline", "streaming")
            for side in order:
                for p in ("small", "large"):
                    runs[(side, p)].append(run_worker(side, p, args, root, sae_path))
        # the feature stages (passes 1-2 + the check, the planned feature shards) over one bare encode, on the small
        # partition; the previous per-shard layout (full mode only: it costs ~8 encodes) for comparison
        stage_sides = ("encode", "stages_one_encode") + (() if args.quick else ("stages_per_shard",))
        stage_runs = {side: [] for side in stage_sides}
        for r in range(repeats):
            for side in stage_sides if r % 2 == 0 else stage_sides[::-1]:
                stage_runs[side].append(run_worker(side, "small", args, root, sae_path))
    wall_s = time.perf_counter() - wall

    med = lambda side, p, f: statistics.median(x[f] for x in runs[(side, p)])  # noqa: E731
    tput = {s: 4 * small * runs[(s, "large")][0]["n_features"] / med(s, "large", "seconds")
            for s in ("streaming", "baseline")}
    peak = {(s, p): med(s, p, "peak_bytes") for s in ("streaming", "baseline") for p in ("small", "large")}
    diag = runs[("streaming", "large")][0]["diagnostics"]
    mb = lambda b: b / 2**20  # noqa: E731
    print(f"feature tables pass 1: TopK SAE d_model {D_MODEL}, {N_LATENTS:,} latents, k {K}; top {TOP_K}, "
          f"reservoir {TOP_K * RESERVOIR_FACTOR}; token batches of {args.batch_rows}; data setup {setup_s:.1f} s")
    print(f"baseline: dense [tokens, {args.feature_batch}] per feature batch, {args.baseline_batches} batch(es) run")
    print(f"{'side':<11}{'tokens':>8}{'features':>10}{'median s':>10}{'tok*feat/s':>14}{'peak MiB':>10}   runs (s)")
    for (side, p), rs in runs.items():
        n_tok, n_feat = rs[0]["n_tokens"], rs[0]["n_features"]
        sec = med(side, p, "seconds")
        times = " ".join(f"{x['seconds']:.2f}" for x in rs)
        print(f"{side:<11}{n_tok:>8}{n_feat:>10}{sec:>10.2f}{n_tok * n_feat / sec:>14.3g}{mb(peak[(side, p)]):>10.1f}"
              f"   {times}")
    growth_s = peak[("streaming", "large")] / peak[("streaming", "small")]
    growth_b = peak[("baseline", "large")] / peak[("baseline", "small")]
    print(f"throughput ratio {tput['streaming'] / tput['baseline']:.2f} (goal >= {GOAL_THROUGHPUT}); "
          f"peak memory ratio {peak[('streaming', 'large')] / peak[('baseline', 'large')]:.3f} "
          f"(goal <= {GOAL_MEMORY_RATIO}); 4x tokens: streaming peak x{growth_s:.2f}, baseline x{growth_b:.2f}")
    print(f"streaming diagnostics (large): {diag}; hwm reset: {runs[('streaming', 'large')][0]['hwm_reset']}")
    load_after = os.getloadavg()[0]
    print(f"wall time {wall_s:.1f} s; load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs")
    noisy = max(load_before, load_after) > (os.cpu_count() or 1) + 0.5
    if noisy:
        print("WARNING: other work was running on this machine (load average above the CPU count): timings are "
              "noisy (memory figures are not affected)")
    print()
    common = {"d_model": D_MODEL, "n_latents": N_LATENTS, "k": K, "top_k": TOP_K,
              "reservoir": TOP_K * RESERVOIR_FACTOR, "batch_rows": args.batch_rows,
              "baseline_feature_batch": args.feature_batch, "repeats": repeats, "quick": args.quick,
              "wall_s": round(wall_s, 1), "load_before": load_before, "load_after": load_after, "noisy": noisy}
    lines = [
        {"metric": "feature_pass1_token_features_per_s", "value": tput["streaming"], "baseline": tput["baseline"],
         "ratio": tput["streaming"] / tput["baseline"], "goal": GOAL_THROUGHPUT, "unit": "tokens*features/s",
         "tokens": 4 * small, "baseline_is": "SAEDashboard-style dense [tokens, features] per feature batch + topk",
         "streaming_runs_s": [round(x["seconds"], 3) for x in runs[("streaming", "large")]],
         "baseline_runs_s": [round(x["seconds"], 3) for x in runs[("baseline", "large")]], **common},
        {"metric": "feature_pass1_peak_memory_bytes", "value": peak[("streaming", "large")],
         "baseline": peak[("baseline", "large")],
         "ratio": peak[("streaming", "large")] / peak[("baseline", "large")], "goal": GOAL_MEMORY_RATIO,
         "lower_is_better": True, "unit": "bytes", "tokens": 4 * small,
         "measured_as": "VmHWM after the pass - VmRSS before it, HWM reset via /proc/self/clear_refs",
         "malloc": "default" if args.default_malloc else f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (both sides)",
         **common},
        {"metric": "feature_pass1_peak_memory_growth_4x_tokens", "value": peak[("streaming", "large")],
         "baseline": peak[("streaming", "small")], "ratio": growth_s, "goal": GOAL_MEMORY_GROWTH,
         "lower_is_better": True, "unit": "bytes", "tokens": [small, 4 * small],
         "baseline_is": "streaming peak at 1x tokens", "dashboard_growth": growth_b,
         "dashboard_peak_bytes": [peak[("baseline", "small")], peak[("baseline", "large")]], **common},
    ]
    stage_s = {side: statistics.median(x["seconds"] for x in rs) for side, rs in stage_runs.items()}
    layout = planned_layout(small)  # as the stage workers planned it over the small partition
    for side, rs in stage_runs.items():
        parts = {k: round(statistics.median(x["stage_seconds"][k] for x in rs), 2) for k in rs[0]["stage_seconds"]}
        print(f"{side:<18} {small:>7} tokens  median {stage_s[side]:6.2f} s  {parts}  checks ok: "
              f"{all(x.get('checks_ok', True) for x in rs)}")
    ratio = stage_s["stages_one_encode"] / stage_s["encode"]
    lines.append({"metric": "feature_stages_over_one_encode", "value": stage_s["stages_one_encode"],
                  "baseline": stage_s["encode"], "ratio": ratio, "goal": GOAL_STAGES_OVER_ENCODE,
                  "lower_is_better": True, "unit": "s", "tokens": small, "feature_shards": layout.n_shards,
                  "memory_budget_bytes": layout.memory_budget_bytes,
                  "stages": "pass 1 (every shard) + pass 2 merge + matches_brute_force check (64 witness "
                            "features per shard + invariants), writes included; not pass 3 / browser",
                  "baseline_is": "sae.encode of the same rows, same batches, same SAE, same device",
                  "stage_seconds": {k: round(statistics.median(x["stage_seconds"][k] for x in stage_runs[
                      "stages_one_encode"]), 3) for k in ("pass_1", "pass_2", "check")},
                  "per_shard_layout_ratio": (stage_s["stages_per_shard"] / stage_s["encode"]
                                             if "stages_per_shard" in stage_s else None),
                  "checks_ok": all(x["checks_ok"] for x in stage_runs["stages_one_encode"]), **common})
    sys.stdout.flush()
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

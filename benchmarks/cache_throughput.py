"""Throughput of the activation cache against the bare forward pass it is built on.

What is measured, in one run, on the same token batches:

* **bare**: only ``HookedModel.residual`` (the forward pass that stops after the hook layer) over
  pre-packed batches of ``batch_size`` x ``ctx_len`` tokens. This is the floor: no caching path
  can be faster than the model computing the activations.
* **full**: ``cache_text_file``, the whole caching path of one partition: read the text file,
  tokenize, pack contexts, forward to the hook layer, filter sinks, write zarr through the
  background chunk writer, write the index arrays and ``documents.parquet``, commit the pointer.
  The text file holds just enough text for the benchmark's contexts, and it packs to exactly the
  bare side's batches.

Both sides count ``n_contexts x ctx_len`` tokens. The figure of merit is full/bare tokens/s
(goal >= 0.90): everything the cache adds on top of the model (tokenizing, copying to float16,
disk I/O, committing) should hide behind, or be small next to, the forward pass. The sides run
alternately, after an untimed warm-up of each, and medians are quoted, so drift (thermal, other
processes) hits both alike. The table also shows the median of the per-pair ratios and the ratio of
the fastest runs, and the load average: on a shared machine other processes steal cores from
both sides unevenly, so a low ratio with a high load average is noise, not overhead.

Optionally (on by default) the early exit is checked too: a full-model forward (all layers and the
vocabulary head, what a naive hook would run) against the stop-at-layer forward on one batch
(goal >= 2x for the default middle layer).

The base model is converted from the embedded GGUF once into a persistent artifact root
(``--root``, default ``.cache/bench_artifacts``, gitignored); partitions are written into a scratch
root next to it and deleted afterwards. Output: a table, then one JSON object per line, one per
figure, each with ``metric``, ``value``, ``baseline``, ``ratio`` and ``goal``.

    python benchmarks/cache_throughput.py --quick     # < 1 minute on 2 CPU cores
    python benchmarks/cache_throughput.py             # more tokens, more repeats
"""

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_help import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the package importable without installing it
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sae_platform.activations import CacheSettings, cache_text_file  # noqa: E402
from sae_platform.corpus import TextFile, pack_contexts, read_documents, tokenize  # noqa: E402
from sae_platform.model import AUTOCAST_HELP, EMBEDDED_MODEL, ensure_base_model, load_hooked_model  # noqa: E402
from sae_platform.storage import ArtifactStore  # noqa: E402

GOAL_CACHE_RATIO = 0.90
GOAL_EARLY_STOP = 2.0
GOAL_BYTES_OVERHEAD = 1.05  # stored bytes / raw activation bytes (index arrays, parquet, metadata)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few tokens and repeats: < 1 minute on 2 CPU cores")
    parser.add_argument("--root", default=str(REPO / ".cache" / "bench_artifacts"),
                        help="persistent artifact root holding the converted base model")
    parser.add_argument("--corpus", default=str(REPO / "data" / "demo_corpus"),
                        help="directory of .txt files the benchmark text is cut from")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="base model source")
    parser.add_argument("--layer", type=int, default=None, help="hook layer (default: the middle layer)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--autocast", default="auto", help=AUTOCAST_HELP)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored activation dtype")
    parser.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    parser.add_argument("--ctx-len", type=int, default=128, help="tokens per context")
    parser.add_argument("--batches", type=int, default=None, help="forward batches per timed run (quick: 3, else 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each side (quick: 3, else 5)")
    parser.add_argument("--no-early-stop", action="store_true", help="skip the full-model vs early-exit comparison")
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = 3 if args.quick else 8
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_text(tokenizer, corpus: Path, n_tokens: int) -> str:
    """A prefix of the corpus (files in name order) that tokenizes to a little over ``n_tokens``."""
    files = sorted(corpus.glob("*.txt"))
    if not files:
        raise SystemExit(f"no .txt files in {corpus}: run `make setup` to fetch the demo corpus, or pass --corpus")
    text = ""
    for path in files:
        text = (text + "\n\n" if text else "") + path.read_text(encoding="utf-8")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if len(enc["input_ids"]) > n_tokens:
            return text[: enc["offset_mapping"][n_tokens][1]]
    raise SystemExit(f"the corpus in {corpus} has fewer than {n_tokens} tokens: lower --batches")


def time_bare(model, batches) -> float:
    sync(model.device)
    start = time.perf_counter()
    for ids in batches:
        model.residual(ids)
    sync(model.device)
    return time.perf_counter() - start


def time_full(store, text_file, model, model_source, settings, n_contexts) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = cache_text_file(store, text_file, model, model_source, settings, max_contexts=n_contexts)
    return time.perf_counter() - start, summary


@torch.inference_mode()
def time_full_model(model, ids) -> float:
    """A whole forward (all layers + vocabulary head), as a hook that does not stop early would run."""
    sync(model.device)
    start = time.perf_counter()
    enabled = model.autocast is not None
    with torch.autocast(model.device.type, dtype=model.autocast or torch.bfloat16, enabled=enabled):
        out = model.model(input_ids=ids.to(model.device), use_cache=False)
    del out
    sync(model.device)
    return time.perf_counter() - start


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def main(argv=None) -> int:
    wall_start = time.perf_counter()
    args = parse_args(argv)
    load_before = load_average()

    store = ArtifactStore(args.root)
    start = time.perf_counter()
    model_dir, converted = ensure_base_model(store, args.model)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    model = load_hooked_model(model_dir, args.layer, args.device, args.autocast)
    load_s = time.perf_counter() - start

    settings = CacheSettings(ctx_len=args.ctx_len, batch_size=args.batch_size, dtype=args.dtype)
    n_contexts = args.batches * args.batch_size
    n_tokens = n_contexts * args.ctx_len
    body = args.ctx_len - 1
    scratch_parent = Path(args.root).parent if "://" not in args.root else Path(tempfile.gettempdir())
    scratch_parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="bench_scratch-", dir=scratch_parent) as scratch:
        # The input: a text file that packs into exactly n_contexts contexts (plus a short tail).
        text_path = Path(scratch) / "bench_input.txt"
        text_path.write_text(benchmark_text(model.tokenizer, Path(args.corpus), n_contexts * body + body // 2),
                             encoding="utf-8")
        probe = TextFile(str(text_path), "probe")
        docs = read_documents(probe)
        contexts = pack_contexts(tokenize(model.tokenizer, docs), [d.doc_id for d in docs], args.ctx_len,
                                 model.start_token_id, n_contexts)
        if contexts.n_contexts != n_contexts:
            raise SystemExit(f"benchmark text packs into {contexts.n_contexts} contexts, not {n_contexts}")
        batches = [torch.from_numpy(contexts.tokens[i:i + args.batch_size]).long()
                   for i in range(0, n_contexts, args.batch_size)]

        write_store = ArtifactStore(str(Path(scratch) / "artifacts"))
        # Warm-up, untimed: one forward batch, and one tiny partition (first zarr/parquet/fsspec calls).
        model.residual(batches[0])
        sync(model.device)
        cache_text_file(write_store, TextFile(str(text_path), "warmup"), model, args.model, settings, max_contexts=1)

        bare_s, full_s, part_tps, summaries = [], [], [], []
        for rep in range(args.repeats):
            order = ("bare", "full") if rep % 2 == 0 else ("full", "bare")  # alternate who goes first
            for side in order:
                gc.collect()
                if side == "bare":
                    bare_s.append(time_bare(model, batches))
                else:
                    seconds, summary = time_full(write_store, TextFile(str(text_path), f"bench_{rep}"), model,
                                                 args.model, settings, n_contexts)
                    full_s.append(seconds)
                    part_tps.append(summary["tokens_per_second"])
                    summaries.append(summary)

        early = None
        if not args.no_early_stop:
            reps = 1 if args.quick else 3
            time_full_model(model, batches[0][:1])  # warm-up: the vocabulary head's first call (one context)
            whole, stop = [], []
            for _ in range(reps):
                gc.collect()
                whole.append(time_full_model(model, batches[0]))
                stop.append(time_bare(model, batches[:1]))
            tok = args.batch_size * args.ctx_len
            early = (tok / statistics.median(whole), tok / statistics.median(stop), reps)

    load_after = load_average()
    # Per-pair ratios: runs of the two sides taken back to back share whatever load was on the machine.
    pair_ratio = statistics.median(b / f for b, f in zip(bare_s, full_s, strict=True))
    best_ratio = min(bare_s) / min(full_s)
    bare_tps = n_tokens / statistics.median(bare_s)
    full_tps = n_tokens / statistics.median(full_s)
    part_tps_med = statistics.median(part_tps)
    last = summaries[-1]
    raw_bytes = last["n_rows"] * model.d_model * (2 if args.dtype == "float16" else 4)
    stored_bytes = statistics.median(s["bytes"] for s in summaries)
    wall_s = time.perf_counter() - wall_start

    common = {
        "model": args.model, "layer": model.layer, "device": str(model.device),
        "autocast": str(model.autocast).replace("torch.", "") if model.autocast else "none",
        "batch_size": args.batch_size, "ctx_len": args.ctx_len, "n_contexts": n_contexts, "tokens": n_tokens,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_1m": [load_before, load_after], "quick": args.quick,
    }

    print(f"sae-platform cache throughput  ({args.model}, layer {model.layer}/{model.n_layers}, "
          f"{common['device']}, autocast {common['autocast']}, {torch.get_num_threads()} threads)")
    print(f"base model: {'CONVERTED from GGUF this run' if converted else 'cached'} in {setup_s:.1f} s, "
          f"loaded in {load_s:.1f} s  ({args.root})")
    print(f"{args.repeats} alternating runs per side of {n_contexts} contexts x {args.ctx_len} tokens "
          f"= {n_tokens} tokens ({args.batches} batches of {args.batch_size}); medians\n")
    rows = [
        ("bare forward to hook layer", statistics.median(bare_s), bare_tps, bare_s),
        ("full caching path (cache_text_file)", statistics.median(full_s), full_tps, full_s),
    ]
    print(f"{'side':<38}{'median s':>10}{'tokens/s':>11}   runs (s)")
    for name, sec, tps, runs in rows:
        print(f"{name:<38}{sec:>10.3f}{tps:>11.0f}   {' '.join(f'{r:.3f}' for r in runs)}")
    print(f"\ncache / bare                            {full_tps / bare_tps:.3f}   (goal >= {GOAL_CACHE_RATIO}); "
          f"median of pairs {pair_ratio:.3f}, fastest runs {best_ratio:.3f}")
    print(f"partition's own tokens/s (forward+write) {part_tps_med:.0f}   ({part_tps_med / bare_tps:.3f} of bare)")
    print(f"bytes written per partition              {stored_bytes:,.0f}   "
          f"({last['n_rows']} rows; raw activations {raw_bytes:,} B, x{stored_bytes / raw_bytes:.3f})")
    if early:
        whole_tps, stop_tps, reps = early
        print(f"early exit: full-model forward {whole_tps:.0f} tok/s, stop at layer {model.layer} "
              f"{stop_tps:.0f} tok/s -> {stop_tps / whole_tps:.2f}x  (goal >= {GOAL_EARLY_STOP}; "
              f"{reps} run(s) of one batch)")
    # Before the run the load is other work's; after it, it includes this run's torch threads.
    busy = load_before is not None and (load_before > 1.0 or load_after > torch.get_num_threads() + 1.0)
    spread = max(max(bare_s) / min(bare_s), max(full_s) / min(full_s))  # same work, so ~1.0 on a quiet machine
    noisy = busy or spread > 1.25
    print(f"wall time {wall_s:.1f} s; load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs"
          if load_before is not None else f"wall time {wall_s:.1f} s")
    if noisy:
        print(f"WARNING: noisy timings (slowest/fastest run of one side x{spread:.2f}"
              f"{', other work was running' if busy else ''}): rerun on a quiet machine")
    print()

    lines = [
        {"metric": "cache_tokens_per_s", "value": full_tps, "baseline": bare_tps, "ratio": full_tps / bare_tps,
         "goal": GOAL_CACHE_RATIO, "unit": "tokens/s", "baseline_is": "bare forward to the hook layer",
         "noisy": noisy, "run_spread": spread, "pair_ratio_median": pair_ratio, "fastest_runs_ratio": best_ratio,
         "bare_runs_s": bare_s, "full_runs_s": full_s,
         "model_converted": converted, "model_setup_s": setup_s, "wall_s": wall_s, **common},
        {"metric": "partition_tokens_per_s", "value": part_tps_med, "baseline": bare_tps,
         "ratio": part_tps_med / bare_tps, "goal": GOAL_CACHE_RATIO, "unit": "tokens/s",
         "baseline_is": "bare forward to the hook layer", "note": "cache_partition's own figure: forward + "
         "activation writes, without read/tokenize/index/commit", **common},
        {"metric": "bytes_written", "value": stored_bytes, "baseline": raw_bytes, "ratio": stored_bytes / raw_bytes,
         "goal": GOAL_BYTES_OVERHEAD, "goal_is": "at most", "unit": "bytes",
         "baseline_is": f"n_rows x d_model x {args.dtype} itemsize", "n_rows": last["n_rows"], **common},
    ]
    if early:
        whole_tps, stop_tps, reps = early
        lines.append({"metric": "bare_forward_tokens_per_s", "value": stop_tps, "baseline": whole_tps,
                      "ratio": stop_tps / whole_tps, "goal": GOAL_EARLY_STOP, "unit": "tokens/s",
                      "baseline_is": "full-model forward (all layers + vocabulary head), same batch",
                      "early_stop_runs": reps, "bare_tokens_per_s_main": bare_tps, **common})
    else:
        lines.append({"metric": "bare_forward_tokens_per_s", "value": bare_tps, "baseline": None, "ratio": None,
                      "goal": None, "unit": "tokens/s", **common})
    sys.stdout.flush()
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Caching k hook points from one forward pass against k separate caching passes (issue 14).

What is measured, in one run, on the same token batches (``batch_size`` x ``ctx_len`` contexts):

* **one pass**: ``cache_partition`` with ``hook_points`` = the k hook points: one forward pass per
  batch (stopping after the deepest hook point) feeds k activation stores.
* **k passes** (the baseline): k ``cache_partition`` runs, one hook point each, each with its own
  forward passes, as the platform had to do before it could read several hook points per pass.

Both sides write the same k stores (same rows, same bytes), so the difference is the forward
passes saved. The default hook points lie in the same block (``hook_attn_out``, ``hook_mlp_out``
and ``hook_resid_post`` of the middle layer, "the same layer range"), where k separate passes
each run nearly the whole prefix of the model: the figure is (k passes seconds) / (one pass
seconds), goal >= 0.8 * k. The sides alternate, after an untimed warm-up of each; medians are
quoted, and ``noisy`` is set when the load average exceeded the core count.

**The peers** (each in its own venv, ``make peer-venvs``; benchmarks/peer_venv.py runs it as a
subprocess and skips it, naming the make target, when absent), on the same model folder and the same
token batches (a safetensors file), with the same thread count, interleaved with ours:

* **SAELens** (``sae-lens``, multi-hook caching since 6.44): ``ActivationsStore.from_config_multi_hook``
  over TransformerLens's ``HookedTransformer`` of the same Hugging Face folder, one ``run_with_cache``
  forward per batch for all k hook points, stopping after the deepest, flattened to rows in memory.
* **sparsify** (``eai-sparsify``): its all-layers path, the forward ``Trainer.fit`` runs per batch
  with a forward hook on each hook point's module (``layers.L``, ``layers.L.mlp``,
  ``layers.L.self_attn``), each keeping a flattened copy of the output; the whole forward pass.

Each figure is tokens per second with every token read at all k hook points (``ratio`` = ours / the
peer's). Ours also writes the k stores to disk (zarr, committed); the peers keep the rows in memory,
which is what their training loops consume. Goal: ours at least as fast as each (>= 1x).

The base model is converted from the embedded GGUF once into a persistent artifact root
(``--root``, default ``.cache/bench_artifacts``, gitignored); stores are written into a scratch
root and deleted. Token ids are drawn at random (the forward pass does not care what they say).

    python benchmarks/multihook_cache.py --quick     # < 1 minute on 2 CPU cores
    python benchmarks/multihook_cache.py --hook-points blocks.4.hook_mlp_out blocks.8.hook_mlp_out \
        blocks.12.hook_mlp_out
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
sys.path.insert(0, str(REPO / "benchmarks"))  # peer_venv beside this script

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peer_venv import open_peer  # noqa: E402

from sae_platform.activations import CacheSettings, cache_partition  # noqa: E402
from sae_platform.corpus import Contexts  # noqa: E402
from sae_platform.model import AUTOCAST_HELP, EMBEDDED_MODEL, ensure_base_model, load_hooked_model  # noqa: E402
from sae_platform.storage import ArtifactStore  # noqa: E402

GOAL_PER_HOOK = 0.8  # one pass must be >= 0.8 * k times faster than k passes
GOAL_VS_PEER = 1.0  # ours (one pass, k stores written) at least as fast as each peer's multi-hook read
PEER_READ_IS = {
    "sae-lens": "ActivationsStore.from_config_multi_hook over HookedTransformer (run_with_cache, stop at the "
                "deepest hook), rows in memory",
    "sparsify": "Trainer.fit's forward with a hook on each hook point's module (flattened copies kept), rows in "
                "memory",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few batches and repeats: < 1 minute on 2 CPU cores")
    parser.add_argument("--root", default=str(REPO / ".cache" / "bench_artifacts"),
                        help="persistent artifact root holding the converted base model")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="base model source")
    parser.add_argument("--hook-points", nargs="+", default=None,
                        help="hook points (default: attn_out, mlp_out and resid_post of the middle block)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--autocast", default="auto", help=AUTOCAST_HELP)
    parser.add_argument("--batch-size", type=int, default=None, help="contexts per forward pass (default 16)")
    parser.add_argument("--ctx-len", type=int, default=None, help="tokens per context (default 128)")
    parser.add_argument("--batches", type=int, default=None, help="forward batches per timed run (quick: 2, else 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each side (quick: 3, else 5)")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or 16
    args.ctx_len = args.ctx_len or 128
    args.batches = args.batches or (2 if args.quick else 4)
    args.repeats = args.repeats or (3 if args.quick else 5)
    return args


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = load_average()
    store = ArtifactStore(args.root)
    model_dir, _ = ensure_base_model(store, args.model)
    model = load_hooked_model(model_dir, None, args.device, args.autocast)
    hooks = args.hook_points or [f"blocks.{model.layer}.{site}" for site in
                                 ("hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    k = len(hooks)
    rng = np.random.default_rng(0)
    n_contexts = args.batches * args.batch_size
    tokens = rng.integers(1, model.model.config.vocab_size, size=(n_contexts, args.ctx_len)).astype(np.int32)
    tokens[tokens == model.start_token_id] = model.start_token_id + 1
    tokens[:, 0] = model.start_token_id
    contexts = Contexts(tokens, np.zeros_like(tokens), dropped_tokens=0)

    def settings(points):
        return CacheSettings(ctx_len=args.ctx_len, batch_size=args.batch_size, dtype="float32", hook_points=points)

    scratch_parent = Path(args.root).parent
    scratch_parent.mkdir(parents=True, exist_ok=True)
    one_s, sep_s = [], []
    peers, peer_s = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_scratch-", dir=scratch_parent) as scratch:
        runs = {"n": 0}
        peers = start_peers(Path(scratch), model_dir, hooks, tokens, args)
        peer_s = {name: [] for name in peers}

        def run(points) -> float:
            runs["n"] += 1  # each run its own root: the compatibility check must not mix hook points
            root = ArtifactStore(str(Path(scratch) / f"r{runs['n']}"))
            start = time.perf_counter()
            cache_partition(root, "bench", model, args.model, [], contexts, settings(points))
            return time.perf_counter() - start

        run(hooks)  # warm-up, untimed
        for hook in hooks:
            run([hook])
        for peer in peers.values():  # warm-up, untimed
            peer.call("multihook_run")
        try:
            for rep in range(args.repeats):
                sides = ["one", "sep", *peers]
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    gc.collect()
                    if side == "one":
                        one_s.append(run(hooks))
                    elif side == "sep":
                        sep_s.append(sum(run([hook]) for hook in hooks))
                    else:
                        peer_s[side].append(peers[side].call("multihook_run")["seconds"])
        finally:
            for peer in peers.values():
                peer.close()
    load_after = load_average()
    one, sep = statistics.median(one_s), statistics.median(sep_s)
    cores = os.cpu_count() or 1
    noisy = any(load is not None and load > cores for load in (load_before, load_after))
    n_tokens = contexts.tokens.size
    print(f"{k} hook points: {', '.join(hooks)}")
    print(f"{'':>22} {'median s':>10} {'tokens/s':>10}")
    print(f"{'one pass (k stores)':>22} {one:>10.3f} {n_tokens / one:>10.0f}")
    print(f"{'k separate passes':>22} {sep:>10.3f} {n_tokens / sep:>10.0f}")
    peer_med = {name: statistics.median(times) for name, times in peer_s.items()}
    for name, seconds in peer_med.items():
        label = f"{peers[name].package} {peers[name].version}"
        print(f"{label:>22} {seconds:>10.3f} {n_tokens / seconds:>10.0f}   ours {seconds / one:.2f}x "
              f"(goal >= {GOAL_VS_PEER})")
    print(f"speed-up {sep / one:.2f}x (goal >= {GOAL_PER_HOOK * k:.1f}x); load average {load_before} -> {load_after}")
    print(json.dumps({"metric": f"multihook_cache_tokens_per_s_k{k}", "value": round(n_tokens / one, 1),
                      "baseline": round(n_tokens / sep, 1), "ratio": round(sep / one, 3),
                      "goal": round(GOAL_PER_HOOK * k, 2), "unit": "tokens/s (each token cached at all k hook points)",
                      "baseline_is": f"{k} separate caching passes, one hook point each",
                      "seconds_one_pass": round(one, 3), "seconds_k_passes": round(sep, 3),
                      "hook_points": hooks, "tokens": int(n_tokens), "noisy": noisy}))
    for name, seconds in peer_med.items():
        print(json.dumps({"metric": f"multihook_cache_tokens_per_s_k{k}_vs_{name.replace('-', '')}",
                          "value": round(n_tokens / one, 1), "baseline": round(n_tokens / seconds, 1),
                          "ratio": round(seconds / one, 3), "goal": GOAL_VS_PEER, **peers[name].label,
                          "unit": "tokens/s (each token read at all k hook points)",
                          "value_is": "one forward pass per batch, k stores written and committed",
                          "baseline_is": f"{peers[name].package} {peers[name].version} {PEER_READ_IS[name]}",
                          "seconds_ours": round(one, 3), "seconds_peer": round(seconds, 3),
                          "peer_runs_s": [round(t, 3) for t in peer_s[name]], "model": args.model,
                          "hook_points": hooks, "tokens": int(n_tokens), "batch_size": args.batch_size,
                          "ctx_len": args.ctx_len, "threads": torch.get_num_threads(), "noisy": noisy}))
    return 0


def start_peers(scratch: Path, model_dir, hooks: list[str], tokens: np.ndarray, args) -> dict:
    """Each peer whose venv is built, set up on the same model folder, hook points and token batches."""
    from safetensors.numpy import save_file

    path = scratch / "tokens.safetensors"
    save_file({"tokens": tokens.astype(np.int64)}, str(path))
    # TransformerLens reads a local folder whose path says "llama" as a Llama it knows by name (and fails):
    # the peers see the same folder under a neutral name.
    neutral = scratch / "base-model"
    neutral.symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    peers = {}
    for name in PEER_READ_IS:
        peer = open_peer(name, torch.get_num_threads())
        if peer is not None:
            peer.call("load", path=str(path))
            peer.call("multihook_setup", model_dir=str(neutral), hook_points=hooks, tokens="tokens",
                      batch_size=args.batch_size, ctx_len=args.ctx_len)
            peers[name] = peer
    return peers


if __name__ == "__main__":
    sys.exit(main())

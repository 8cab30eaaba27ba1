"""Feature dashboards: our feature stages against sae-dashboard 0.8.0's own runner, in one run, on the
same SAE, the same tokens and the same number of features.

    python benchmarks/dashboards_vs_saedashboard.py --quick   # 4k tokens, 256 features
    python benchmarks/dashboards_vs_saedashboard.py           # 16k tokens, 2,048 features (the README's figures)

The model: sae-dashboard runs the model itself through TransformerLens, whose ``from_pretrained`` only
takes names from its list of official models (it looks the name up before it would read a local
folder), and SmolLM2 is not on that list; so the script builds a tiny random Llama (``build_tiny_model``
of tests/conftest.py: a real byte-level BPE tokenizer, 4 blocks, d_model 256) that both load from the
same folder: we with ``load_hooked_model``, sae-dashboard's side through TransformerLens's own
conversion of a local Hugging Face folder (``get_pretrained_model_config`` and
``get_pretrained_state_dict``, no processing, so its ``blocks.2.hook_resid_post`` is the Hugging Face
model's; checked against it). The SAE: TopK, k 32, random weights calibrated on the cached
activations, written in SAELens's layout by ``export.export_saelens`` and loaded by sae-dashboard with
``SAE.load_from_disk``. The tokens: the demo corpus packed into contexts of 128 by our caching stage
(``cache_text_file``, stores float16 as deployed, sinks kept: ``sink_norm_factor`` 0), and exactly the
stored ``tokens`` [contexts, 128] handed to sae-dashboard.

Sides, each a fresh subprocess (its peak memory is the child's ``ru_maxrss`` from ``os.wait4``: the
whole process, imports included; the work alone is reported too, as VmHWM after minus VmRSS before):

- ours (this venv): the feature stages as the pipeline runs them, through the compute core: pass 1
  (``compute_and_write_partials``, every feature shard), pass 2 (``merge_shard_tables``, logit effects,
  the blocking ``brute_force_check``), pass 3 (``build_partition_windows`` from pass 1's codes,
  ``regroup_by_feature``) and the browser writer (``build_site``), every artifact committed to a local
  store. It reads the cached activations; the caching forward pass is timed apart (``caching_s``).
- sae-dashboard (its venv, ``SAE_DASHBOARD_PYTHON``, default /work/venvs/sae-dashboard/bin/python, built
  by ``make sae-dashboard-venv``): ``SaeVisRunner(SaeVisConfig(hook_point, features)).run(encoder, model,
  tokens)`` for every latent at its defaults (256 features per batch, each batch a forward pass over all
  tokens in minibatches of 64 contexts; top 20, 10 quantile groups of 5; 12-token windows), then
  ``save_feature_centric_vis`` (its HTML dashboards). One change to the SAE: its runner folds the decoder
  norms, which SAELens 6.54 refuses for a TopK SAE saved without ``rescale_acts_by_decoder_norm``; that
  flag is set on the loaded SAE, which changes nothing here (every decoder row of ours has the same norm).
  After its timed run (memory peak recorded), its activations at the positions the agreement needs.

Agreement: sae-dashboard picks examples only from positions 6..122 of each context (its sequence
buffer); ours from every position but the start token. Per feature that activates, the share of our
top-20 token positions (context, position) inside that range that are among its top-20 (ours restricted
to the range is the top of the same tokens, so each must be there); the mean over features
(``top_agreement``). It ranks float32 activations (``SaeVisConfig.dtype``, float32 by default) with
``torch.topk``, which orders equal values arbitrarily (ours: the lower row first); so each figure is
given strict and up to ties: a position of ours it lacks counts when its own activation there equals its
20th (above zero), one for each of its picks at that 20th that ours lacks (a tie swaps one for one). Two
figures (``top_overlap``):

- each side on its own activations (``dashboard_top20_overlap``): ours are codes of the cache's float16
  rows, its of its own float32 forward. In the full mode the rounding moves a code by 7e-5 of its size
  (median; at most 6e-4) and a latent in or out of the row's top k in 1.2% of rows: enough to swap
  near-ties at the 20th, or to add or drop an example.
- the peer picking from our rows (``dashboard_top20_overlap_same_rows``, what the goal is judged on):
  after its timed run, its own encode and ``k_largest_indices`` on the rows ours read (``peer_values``,
  which first checks that recomputing its own activations gives its run's top-20).

Prints a table, then one JSON line per figure (metric, value, baseline, ratio, goal, lower_is_better,
peer, peer_version); the full mode also writes them to benchmarks/results/dashboards.jsonl (``--out``).
Without sae-dashboard's venv it prints why and the make target, and exits 0 having run nothing.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_help import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

PEER, PEER_VERSION = "sae-dashboard", "0.8.0"
MAKE_TARGET = "sae-dashboard-venv"
PEER_PYTHON = os.environ.get("SAE_DASHBOARD_PYTHON", "/work/venvs/sae-dashboard/bin/python")
RESULTS = REPO / "benchmarks" / "results" / "dashboards.jsonl"
GOAL_THROUGHPUT, GOAL_MEMORY, GOAL_OVERLAP = 3.0, 0.5, 1.0
SAME_ROWS = "dashboard_top20_overlap_same_rows"  # the agreement the goal is judged on (lines_for)
TOP = 20  # top examples per feature, both sides (FeatureSettings.top_k; SequencesConfig.top_acts_group_size)
LAYER, N_LAYERS, CTX_LEN, K = 2, 4, 128, 32
HOOK = f"blocks.{LAYER}.hook_resid_post"
SAE_NAME, PARTITION = "bench", "text"
SIZES = {"quick": {"contexts": 32, "latents": 256}, "full": {"contexts": 128, "latents": 2048}}


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _status() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmHWM", "VmRSS")}


def _begin_measuring(args) -> tuple[Path, dict, dict, float]:
    """Both sides start alike: the prepared inputs read, garbage collected, the peak RSS reset;
    returns (work dir, prepared.json, /proc status now, CPU seconds now)."""
    work = Path(args.work)
    info = json.loads((work / "prepared.json").read_text())
    gc.collect()
    _reset_peak()
    return work, info, _status(), time.process_time()


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peer_missing() -> str | None:
    """Why sae-dashboard's side cannot run (its interpreter is absent), naming the make target; None if it can."""
    if Path(PEER_PYTHON).is_file():
        return None
    return (f"{PEER} side skipped: its venv is not built (no {PEER_PYTHON}); run `make {MAKE_TARGET}`, or point "
            "SAE_DASHBOARD_PYTHON at a python that has sae-dashboard==0.8.0")


# ---------------------------------------------------------------------------------------------
# prepare (this venv): model, tokens, cached activations, the SAE in both layouts
# ---------------------------------------------------------------------------------------------

def prepare(work: Path, args) -> dict:
    import numpy as np
    import torch
    from circuit_tracer_check import readable_by_older_transformers
    from conftest import build_tiny_model

    from sae_platform.activations import CacheSettings, cache_text_file, open_partition
    from sae_platform.corpus import TextFile
    from sae_platform.export import export_saelens
    from sae_platform.model import load_hooked_model
    from sae_platform.sae import build_sae
    from sae_platform.storage import ArtifactStore

    # TransformerLens reads a local folder as a Llama only when its path says "llama", and then
    # without reading its config: so this folder's name must not.
    model_dir = build_tiny_model(work / "tiny_model", hidden=args.d_model, layers=N_LAYERS)
    readable_by_older_transformers(model_dir)  # the peer's transformers 4.56 reads the tokenizer too
    model = load_hooked_model(str(model_dir), LAYER, "cpu", "none")
    corpus = sorted(Path(args.corpus).glob("*.txt"))
    if not corpus:
        raise SystemExit(f"no .txt files in {args.corpus}: run `make setup` (it fetches the demo corpus) or pass "
                         "--corpus DIR")
    text = work / "text.txt"
    text.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in corpus[:2]), encoding="utf-8")
    store = ArtifactStore(str(work / "store"))
    settings = CacheSettings(ctx_len=CTX_LEN, dtype=args.dtype, sink_norm_factor=0, hook_points=[HOOK])
    started = time.perf_counter()
    summary = cache_text_file(store, TextFile(str(text), PARTITION), model, str(model_dir), settings,
                              max_contexts=args.contexts)
    caching_s = time.perf_counter() - started
    part = open_partition(store, PARTITION)
    tokens = np.asarray(part.group["tokens"][:])
    if tokens.shape[0] != args.contexts:
        raise SystemExit(f"the corpus packs into {tokens.shape[0]} contexts, not {args.contexts}: pass a bigger "
                         "--corpus")
    np.save(work / "tokens.npy", tokens)
    # the rows our side reads, laid out [contexts, positions, d_model] (zeros where the cache keeps no row: the
    # start tokens), for the peer's recomputation on the same rows (``peer_values``)
    context, position = np.asarray(part.group["context_id"][:]), np.asarray(part.group["position"][:])
    acts = np.asarray(part.acts[:])
    rows = np.zeros((*tokens.shape, acts.shape[1]), dtype=acts.dtype)
    rows[context, position] = acts
    is_row = np.zeros(tokens.shape, dtype=bool)
    is_row[context, position] = True
    np.savez(work / "rows.npz", acts=rows, is_row=is_row)
    torch.manual_seed(0)
    sae = build_sae("topk", model.d_model, args.latents, k=K).eval()
    sae.calibrate_(torch.from_numpy(np.asarray(part.acts[:4096])).float())
    torch.save(sae.state_dict(), work / "sae.pt")
    export_saelens(sae, str(work / "saelens"), hook_name=HOOK, model_name=str(model_dir), context_size=CTX_LEN)
    return {"model_dir": str(model_dir), "n_tokens": int(tokens.size), "n_contexts": int(tokens.shape[0]),
            "n_rows": int(part.n_rows), "caching_s": caching_s, "cached_tokens_per_s": summary["tokens_per_second"]}


# ---------------------------------------------------------------------------------------------
# our side (this venv, a fresh process)
# ---------------------------------------------------------------------------------------------

def ours(args) -> None:

    import numpy as np
    import polars as pl
    import torch
    import transformers  # noqa: F401  (load_hooked_model imports it lazily: an import, outside the timing)

    from sae_platform import catalog
    from sae_platform import contexts as ctx
    from sae_platform import feature_codes as fc
    from sae_platform import features as ft
    from sae_platform.activations import open_partition
    from sae_platform.browser.publish import build_site
    from sae_platform.feature_check import brute_force_check
    from sae_platform.feature_layout import layout_ranges, plan_layout
    from sae_platform.feature_merge import merge_shard_tables, read_tables, write_tables
    from sae_platform.logits import logit_effects, unembedding_matrix
    from sae_platform.model import load_hooked_model
    from sae_platform.sae import build_sae
    from sae_platform.storage import ArtifactStore

    work, info, before, cpu = _begin_measuring(args)
    seconds, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        seconds[name], t = now - t, now

    store = ArtifactStore(str(work / "store"))
    sae = build_sae("topk", args.d_model, args.latents, k=K).eval()
    sae.load_state_dict(torch.load(work / "sae.pt", weights_only=True))
    hooked = load_hooked_model(info["model_dir"], LAYER, "cpu", "none")
    settings = ft.FeatureSettings(sae_name=SAE_NAME, top_k=TOP)
    layout = plan_layout({"variant": "topk", "n_latents": sae.n_latents, "d_model": args.d_model, "k": K}, settings,
                         open_partition(store, PARTITION).n_rows)  # the shards the pipeline plans for this SAE
    shards = layout_ranges(layout)
    lap("load")
    fc.compute_and_write_partials(store, sae, SAE_NAME, PARTITION, shards, settings)
    lap("pass_1")
    unembedding = unembedding_matrix(hooked.model)
    checks = []
    for index, (start, stop) in enumerate(shards):
        write_tables(store, SAE_NAME, index, merge_shard_tables(store, sae, SAE_NAME, index, [PARTITION], settings))
        with store.writing(catalog.logits_name(SAE_NAME, index)) as version:
            store.write_parquet(f"{version}/{catalog.LOGIT_EFFECTS}",
                                logit_effects(sae, unembedding, hooked.tokenizer, start, stop))
        checks.append(brute_force_check(store, sae, SAE_NAME, index, start, stop)["ok"])
    lap("pass_2")
    tables = [read_tables(store, SAE_NAME, index) for index in range(len(shards))]
    shown = [ctx.shown_examples(t.examples, settings.random_examples) for t in tables]
    ctx.build_partition_windows(store, SAE_NAME, sae, PARTITION, pl.concat(shown), hooked.tokenizer,
                                before=settings.before, after=settings.after,
                                codes=fc.read_codes(store, SAE_NAME, PARTITION, sae))
    for index, (start, stop) in enumerate(shards):
        ctx.write_feature_contexts(store, SAE_NAME, index, ctx.regroup_by_feature(store, SAE_NAME, [PARTITION],
                                                                                  start, stop))
    lap("pass_3")
    site = build_site(catalog.browser_dir(store, SAE_NAME), sae_name=SAE_NAME, hist_bin_edges=ft.hist_bin_edges(),
                      lineage={}, n_intervals=settings.n_intervals, hook_point=HOOK, shards=[
                          {"start": start, "stop": stop, "feature_stats": t.stats, "feature_examples": s,
                           "feature_contexts": ctx.read_feature_contexts(store, SAE_NAME, index),
                           "logit_effects": store.read_parquet(
                               f"{store.resolve(catalog.logits_name(SAE_NAME, index))}/{catalog.LOGIT_EFFECTS}")}
                          for index, ((start, stop), t, s) in enumerate(zip(shards, tables, shown, strict=True))])
    lap("browser")
    after, cpu = _status(), time.process_time() - cpu
    part = open_partition(store, PARTITION)
    top = pl.concat([t.examples.filter(pl.col("kind") == "top") for t in tables])
    rows = top["row"].to_numpy()
    np.savez(work / "ours_top.npz", feature=top["feature"].to_numpy(),
             context=np.asarray(part.group["context_id"][:])[rows],
             position=np.asarray(part.group["position"][:])[rows])
    emit(side="ours", seconds=sum(seconds.values()), stage_seconds=seconds, checks_ok=all(checks),
         n_features=int(site["n_features"]), site_bytes=int(site["bytes"]), feature_shards=layout.n_shards,
         work_peak_bytes=after["VmHWM"] - before["VmRSS"], cpu_seconds=cpu, torch_threads=torch.get_num_threads())


# ---------------------------------------------------------------------------------------------
# sae-dashboard's side (its venv, a fresh process; nothing of the platform is imported there)
# ---------------------------------------------------------------------------------------------

def load_transformer_lens(model_dir: str):
    """The Hugging Face folder as a HookedSAETransformer, unprocessed (no folding or centring, so every
    hook point holds the Hugging Face model's values), through TransformerLens's own conversion."""
    import torch
    from sae_lens import HookedSAETransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = loading.get_pretrained_model_config(model_dir, fold_ln=False, device="cpu", dtype=torch.float32)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = HookedSAETransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    model.load_and_process_state_dict(loading.get_pretrained_state_dict(model_dir, cfg, hf_model=hf_model),
                                      fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False)
    return model.eval(), hf_model


def tl_matches_hugging_face(model, hf_model, tokens) -> float:
    """The largest difference between TransformerLens's hook point and the Hugging Face model's
    hidden state after the same block, on two contexts; SystemExit past float32 rounding."""
    import torch

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[:2], names_filter=HOOK)
        expected = hf_model(tokens[:2], output_hidden_states=True).hidden_states[LAYER + 1]
    diff = float((cache[HOOK] - expected).abs().max())
    if diff > 1e-4 * max(1.0, float(expected.abs().max())):
        raise SystemExit(f"TransformerLens's {HOOK} differs from the Hugging Face model's by {diff}")
    return diff


def peer_values(work: Path, cfg, model, sae, tokens, top: dict) -> dict:
    """sae-dashboard's own activations at the positions the agreement figures need, recomputed after its
    timed run (its memory peak is recorded by then; this holds one minibatch's codes, then the nonzero ones).

    Its runner, for a TopK SAE, encodes every latent per minibatch of contexts (``get_model_acts``, then
    ``encoder.encode`` in ``cfg.dtype``, float32 by default) and ranks each feature's column with
    ``k_largest_indices`` over its buffer (``torch.topk``: among equal values the order is unspecified).
    This repeats that on two inputs, with the SAE as its run left it (decoder norms folded in):

    - ``own``: its model's forward, what it ranked. Its top-20 there must be the run's (``top``: feature ->
      {(context, position)}), activating positions compared; SystemExit otherwise, as these values would
      not be the ones it ranked.
    - ``same``: our stored rows (rows.npz: the cache's float16 residuals, zero where the cache keeps no
      row), ranked by its own ``k_largest_indices``: its picks on the rows ours read.

    Returns {"own_at_ours", "same_at_ours": its activation at each of our top positions (ours_top.npz's
    order), "own_cut", "same_cut": [features] its 20th activation in its buffer (the smallest it picked),
    "own_tied", "same_tied": [m, 3] (feature, context, position) of each of its picks whose activation
    equals its 20th, above zero (the ones a tie may have swapped; on its own activations the same as its
    run's, whose activating picks these match), "same_feature", "same_context", "same_position": its
    top-20 on our rows}."""
    import numpy as np
    import torch
    from sae_dashboard.sae_vis_runner import DTYPES, FeatureDataGeneratorFactory
    from sae_dashboard.sequence_data_generator import SequenceDataGenerator
    from sae_dashboard.utils_fns import k_largest_indices

    n_features = len(list(cfg.features))
    generator = FeatureDataGeneratorFactory.create(cfg, model, sae, tokens)
    hook = generator.model.activation_config.primary_hook_point
    buffer = SequenceDataGenerator(cfg=cfg, tokens=tokens, W_U=model.W_U).buffer
    stored = np.load(work / "rows.npz")
    rows, is_row = torch.from_numpy(stored["acts"]), torch.from_numpy(stored["is_row"])
    codes = {"own": [], "same": []}  # per input: (context, position, feature, value) of every nonzero code
    with torch.inference_mode():
        start = 0
        for index, minibatch in enumerate(generator.token_minibatches):
            n = minibatch.shape[0]
            inputs = {"own": generator.get_model_acts(index, minibatch)[hook],
                      "same": rows[start:start + n].to(torch.float32)}
            for name, x in inputs.items():
                acts = sae.encode(x).to(DTYPES[cfg.dtype])
                if name == "same":
                    acts = acts * is_row[start:start + n, :, None]
                on = acts.nonzero()
                codes[name].append((on[:, 0] + start, on[:, 1], on[:, 2], acts[on[:, 0], on[:, 1], on[:, 2]]))
            start += n
    ours = {k: torch.from_numpy(v) for k, v in np.load(work / "ours_top.npz").items()}
    wanted: dict[int, list[int]] = {}  # feature -> its entries in ours_top.npz
    for i, f in enumerate(ours["feature"].tolist()):
        wanted.setdefault(f, []).append(i)
    out, mismatched = {}, []
    for name, parts in codes.items():
        context, position, feature, value = (torch.cat(column) for column in zip(*parts, strict=True))
        order = torch.argsort(feature, stable=True)
        context, position, feature, value = context[order], position[order], feature[order], value[order]
        bounds = torch.searchsorted(feature, torch.arange(n_features + 1)).tolist()
        at_ours, cut, picked = np.zeros(len(ours["feature"]), np.float32), np.zeros(n_features, np.float32), []
        tied = []
        for f in range(n_features):
            column = torch.zeros(tokens.shape, dtype=value.dtype)
            lo, hi = bounds[f], bounds[f + 1]
            column[context[lo:hi], position[lo:hi]] = value[lo:hi]
            best = k_largest_indices(column, k=TOP, buffer=buffer)
            its = column[best[:, 0], best[:, 1]]
            cut[f] = float(its.min())
            if its.min() > 0:
                tied += [(f, c, p) for c, p in best[its == its.min()].tolist()]
            mine = torch.tensor(wanted.get(f, []), dtype=torch.long)
            at_ours[mine.numpy()] = column[ours["context"][mine].long(), ours["position"][mine].long()].numpy()
            if name == "own":
                active = {(c, p) for c, p in best.tolist() if column[c, p] > 0}
                if active != {(c, p) for c, p in top.get(f, set()) if column[c, p] > 0}:
                    mismatched.append(f)
            else:
                picked += [(f, c, p) for c, p in best.tolist()]
        out[f"{name}_at_ours"], out[f"{name}_cut"] = at_ours, cut
        out[f"{name}_tied"] = np.array(tied, dtype=np.int64).reshape(-1, 3)
    if mismatched:
        raise SystemExit(f"{PEER}'s activations recomputed after its run do not give its own top-{TOP} for "
                         f"{len(mismatched)} features (first {mismatched[:5]}): the agreement up to ties would "
                         "be judged on values it did not rank")
    out.update(zip(("same_feature", "same_context", "same_position"), np.array(picked).T))
    return out


def peer(args) -> None:
    from importlib.metadata import version

    import numpy as np
    import torch
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE

    installed = version(PEER)
    if installed != PEER_VERSION:
        raise SystemExit(f"{PEER_PYTHON} has {PEER} {installed}, this benchmark pins {PEER_VERSION}: run "
                         f"`make {MAKE_TARGET}`")
    work, info, before, cpu = _begin_measuring(args)
    seconds, t = {}, time.perf_counter()
    model, hf_model = load_transformer_lens(info["model_dir"])
    sae = SAE.load_from_disk(str(work / "saelens"), device="cpu")
    # SaeVisRunner folds the decoder norms into the encoder, which SAELens refuses for a TopK SAE unless
    # it selects on norm-scaled pre-activations. Every decoder row of ours has the same norm (1 /
    # input_scale), so that scaling is uniform: the same top k, each code scaled by the same factor.
    sae.cfg.rescale_acts_by_decoder_norm = True
    tokens = torch.from_numpy(np.load(work / "tokens.npy")).long()
    cfg = SaeVisConfig(hook_point=HOOK, features=range(args.latents), device="cpu")  # its defaults otherwise
    # where it picks examples from: its sequence group's buffer skips each context's first buffer[0] + 1
    # and last buffer[1] positions (SequenceDataGenerator.get_buffer_and_padding)
    if cfg.feature_centric_layout.seq_cfg.top_acts_group_size != TOP:
        raise SystemExit(f"{PEER} {installed} shows {cfg.feature_centric_layout.seq_cfg.top_acts_group_size} top "
                         f"examples by default, this benchmark compares {TOP}")
    buffer = cfg.feature_centric_layout.seq_cfg.buffer
    eligible = (0, tokens.shape[1]) if buffer is None else (buffer[0] + 1, tokens.shape[1] - buffer[1])
    seconds["load"] = time.perf_counter() - t
    t = time.perf_counter()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    seconds["run"] = time.perf_counter() - t
    t = time.perf_counter()
    save_feature_centric_vis(data, work / "sae_dashboard.html")
    seconds["write"] = time.perf_counter() - t
    after, cpu = _status(), time.process_time() - cpu
    diff = tl_matches_hugging_face(model, hf_model, tokens)
    feature, context, position = [], [], []
    top: dict[int, set] = {}
    for f, fd in data.feature_data_dict.items():
        for seq in fd.sequence_data.seq_group_data[0].seq_data:  # the top-activations group
            feature.append(f)
            context.append(seq.original_index)
            position.append(seq.qualifying_token_index)
            top.setdefault(f, set()).add((seq.original_index, seq.qualifying_token_index))
    np.savez(work / "peer_top.npz", feature=np.array(feature), context=np.array(context), position=np.array(position),
             eligible=np.array(eligible))
    n_features = len(data.feature_data_dict)
    del data
    np.savez(work / "peer_values.npz", **peer_values(work, cfg, model, sae, tokens, top))
    emit(side="peer", seconds=sum(seconds.values()), stage_seconds=seconds, n_features=n_features,
         html_bytes=(work / "sae_dashboard.html").stat().st_size, work_peak_bytes=after["VmHWM"] - before["VmRSS"],
         cpu_seconds=cpu,
         peer_version=installed, torch_threads=torch.get_num_threads(), tl_vs_hf_max_abs_diff=diff)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def run_side(python: str, side: str, args, work: Path, env: dict) -> dict:
    """One side in a fresh process: its JSON line plus ``peak_rss_bytes``, the process's maximum resident
    set (``ru_maxrss`` of that child alone, from ``os.wait4``). SystemExit with its stderr if it fails."""
    cmd = [python, __file__, "--side", side, "--work", str(work), "--latents", str(args.latents),
           "--d-model", str(args.d_model)]
    with open(work / f"{side}.stderr", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"the {side} side failed (exit {proc.returncode}):\n{err.read()[-4000:]}")
    result = {**json.loads(out.strip().splitlines()[-1]), "peak_rss_bytes": usage.ru_maxrss * 1024}
    print(f"# {side}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def top_agreement(ours: dict, theirs: dict, their_at_ours: dict, their_cut: dict, their_tied: dict) -> dict:
    """How far our top examples are sae-dashboard's, per feature that has any of ours.

    ours, theirs: feature -> set of (context, position), ours restricted to the positions it picks from
    (ours, ranked over every position, restricted to those is the top of the same tokens, so each must be
    among its top-20); their_at_ours: (feature, context, position) -> its activation at each of ours;
    their_cut: feature -> its 20th activation (the smallest it picked); their_tied: feature -> its picks
    (context, position) whose activation equals its 20th, above zero.

    Strict ("mean", "all_agree"): the share of our positions in its top-20. Up to ties ("mean_up_to_ties",
    "all_agree_up_to_ties"): a position of ours missing from its list counts as agreeing when its own
    activation there equals its 20th and is above zero: a tie at its cut in its own precision, which
    ``torch.topk`` breaks in no stated order (ours: the lower row first). A tie swaps one of ours for one
    of its picks at the cut that ours lacks, so no more of ours count so than it has of those: were two
    of ours at its cut where it picked one, ours would lack one of its picks above the cut, a real
    difference. "ties_at_cut": positions so counted; "differing": the features below 1 up to ties.
    Our list holds activating tokens only, so a rare feature's is shorter than 20."""
    import numpy as np

    strict, fair, ties, differing = [], [], 0, []
    for f, o in sorted(ours.items()):
        if not o:
            continue
        found = o & theirs.get(f, set())
        at_cut = sum(their_cut[f] > 0 and their_at_ours[(f, c, p)] == their_cut[f] for c, p in o - found)
        tied = min(at_cut, len(their_tied.get(f, set()) - o))  # one of its picks at the cut per swap
        strict.append(len(found) / len(o))
        fair.append((len(found) + tied) / len(o))
        ties += tied
        if fair[-1] < 1:
            differing.append(f)
    return {"mean": float(np.mean(strict)), "min": float(np.min(strict)), "n_features": len(strict),
            "all_agree": sum(s == 1.0 for s in strict), "mean_up_to_ties": float(np.mean(fair)),
            "all_agree_up_to_ties": sum(s == 1.0 for s in fair), "ties_at_cut": ties, "differing": differing}


def top_overlap(work: Path) -> dict:
    """The agreement figures (``top_agreement``) of our top-20 (ours_top.npz) against sae-dashboard's, twice:
    "deployed": its top-20 from its own run, each side on its own activations (ours: the cache's float16
    rows; its: its model's float32 forward); "same_rows": its picks on the rows ours read (``peer_values``),
    which leaves only how each side ranks and rounds. Plus the positions compared ([lo, hi): where it picks
    from) and our positions there per feature."""
    import numpy as np

    theirs_npz, values = np.load(work / "peer_top.npz"), np.load(work / "peer_values.npz")
    ours_npz = np.load(work / "ours_top.npz")
    lo, hi = theirs_npz["eligible"].tolist()

    def by_feature(feature, context, position, keep=lambda p: True):
        groups: dict[int, set] = {}
        for f, c, p in zip(feature.tolist(), context.tolist(), position.tolist(), strict=True):
            if keep(p):
                groups.setdefault(f, set()).add((c, p))
        return groups

    ours = by_feature(ours_npz["feature"], ours_npz["context"], ours_npz["position"], lambda p: lo <= p < hi)
    keys = list(zip(*(ours_npz[k].tolist() for k in ("feature", "context", "position")), strict=True))
    figures = {}
    for name, theirs in (("deployed", by_feature(theirs_npz["feature"], theirs_npz["context"],
                                                  theirs_npz["position"])),
                         ("same_rows", by_feature(values["same_feature"], values["same_context"],
                                                  values["same_position"]))):
        prefix = "own" if name == "deployed" else "same"
        figures[name] = top_agreement(ours, theirs, dict(zip(keys, values[f"{prefix}_at_ours"].tolist())),
                                      dict(enumerate(values[f"{prefix}_cut"].tolist())),
                                      by_feature(*values[f"{prefix}_tied"].reshape(-1, 3).T))
    return {**figures, "positions_compared": [lo, hi],
            "positions_per_feature": float(np.mean([len(o) for o in ours.values()]))}


def lines_for(args, prepared: dict, o: dict, p: dict, overlap: dict, common: dict) -> list[dict]:
    n_features, n_tokens = args.latents, prepared["n_tokens"]
    fps = {s: n_features / r["seconds"] for s, r in (("ours", o), ("peer", p))}
    tps = {s: n_tokens / r["seconds"] for s, r in (("ours", o), ("peer", p))}
    peer_fields = {"peer": PEER, "peer_version": p["peer_version"]}
    deployed, same = overlap["deployed"], overlap["same_rows"]
    where = {f"overlap_{k}": overlap[k] for k in ("positions_compared", "positions_per_feature")}
    return [
        {"metric": "dashboard_features_per_s", "value": fps["ours"], "baseline": fps["peer"],
         "ratio": fps["ours"] / fps["peer"], "goal": GOAL_THROUGHPUT, "unit": "features per second", **peer_fields,
         **common},
        {"metric": "dashboard_tokens_per_s", "value": tps["ours"], "baseline": tps["peer"],
         "ratio": tps["ours"] / tps["peer"], "goal": GOAL_THROUGHPUT, "unit": "tokens/s", **peer_fields, **common},
        {"metric": "dashboard_features_per_cpu_s", "value": n_features / o["cpu_seconds"],
         "baseline": n_features / p["cpu_seconds"], "ratio": p["cpu_seconds"] / o["cpu_seconds"],
         "goal": GOAL_THROUGHPUT, "unit": "features per CPU second (every thread; steadier than wall time on a "
                                         "shared machine)", **peer_fields, **common},
        {"metric": "dashboard_peak_rss_bytes", "value": o["peak_rss_bytes"], "baseline": p["peak_rss_bytes"],
         "ratio": o["peak_rss_bytes"] / p["peak_rss_bytes"], "goal": GOAL_MEMORY, "lower_is_better": True,
         "unit": "bytes", "measured_as": "ru_maxrss of each side's process (os.wait4), imports included",
         "work_peak_bytes": {"ours": o["work_peak_bytes"], "peer": p["work_peak_bytes"]}, **peer_fields, **common},
        {"metric": "dashboard_top20_overlap", "value": deployed["mean"], "baseline": 1.0, "ratio": deployed["mean"],
         "goal": GOAL_OVERLAP, "unit": "share of our top-20 positions in the peer's top-20, mean over features; "
                                       f"each side on its own activations (ours: the cache's {args.dtype} rows, "
                                       "the peer: its own float32 forward)",
         **{f"overlap_{k}": v for k, v in deployed.items() if k != "mean"}, **where, "goal_judged_on": SAME_ROWS,
         **peer_fields, **common},
        {"metric": SAME_ROWS, "value": same["mean_up_to_ties"], "baseline": 1.0, "ratio": same["mean_up_to_ties"],
         "goal": GOAL_OVERLAP, "unit": "share of our top-20 positions in the peer's top-20 picked from our rows (its "
                                       "encode and its k_largest_indices), mean over features, a tie at its 20th "
                                       "counting as agreeing",
         "goal_judged_here": "the goal is the same examples from the same data: here the peer picks from the rows we "
                             "read, and only exact ties at its 20th (which torch.topk orders arbitrarily) may differ",
         **{f"overlap_{k}": v for k, v in same.items() if k != "mean_up_to_ties"}, **where, **peer_fields, **common},
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4k tokens, 256 features")
    parser.add_argument("--contexts", type=int, default=None, help="contexts of 128 tokens")
    parser.add_argument("--latents", type=int, default=None, help="SAE latents = features given dashboards")
    parser.add_argument("--d-model", type=int, default=256, help="the tiny model's width")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored activations")
    parser.add_argument("--corpus", default=os.path.join(os.environ.get("SAE_PLATFORM_DATA", REPO / "data"),
                                                         "demo_corpus"), help="folder of .txt files (the demo corpus)")
    parser.add_argument("--out", default=None, help=f"JSON lines file (full mode default: {RESULTS})")
    parser.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        (ours if args.side == "ours" else peer)(args)
        return 0
    why = peer_missing()
    if why:
        print(why)
        emit(metric="dashboard_features_per_s", skipped=why, peer=PEER, peer_version=PEER_VERSION)
        return 0
    size = SIZES["quick" if args.quick else "full"]
    args.contexts = args.contexts or size["contexts"]
    args.latents = args.latents or size["latents"]
    wall, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dashboards_bench_") as tmp:
        work = Path(tmp)
        prepared = prepare(work, args)
        (work / "prepared.json").write_text(json.dumps(prepared))
        peer_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its venv only
        peer_env["HF_HUB_OFFLINE"] = "1"
        o = run_side(sys.executable, "ours", args, work, dict(os.environ))
        p = run_side(PEER_PYTHON, "peer", args, work, peer_env)
        overlap = top_overlap(work)
    wall_s, load_after = time.perf_counter() - wall, os.getloadavg()[0]
    noisy = max(load_before, load_after) > (os.cpu_count() or 1) + 0.5
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"{args.latents} features, {prepared['n_tokens']:,} tokens ({prepared['n_contexts']} x {CTX_LEN}), TopK k "
          f"{K}, d_model {args.d_model}, {HOOK} of a tiny random Llama; stored {args.dtype}; caching "
          f"{prepared['caching_s']:.1f} s (ours, apart)")
    for name, r in (("ours", o), (f"{PEER} {p['peer_version']}", p)):
        parts = {k: round(v, 2) for k, v in r["stage_seconds"].items()}
        print(f"{name:<22} {r['seconds']:7.1f} s  {args.latents / r['seconds']:8.1f} features/s  "
              f"{prepared['n_tokens'] / r['seconds']:9.0f} tokens/s  CPU {r['cpu_seconds']:6.1f} s  "
              f"peak RSS {mib(r['peak_rss_bytes']):7.0f} MiB "
              f"(work {mib(r['work_peak_bytes']):6.0f} MiB)  {parts}")
    for name, figure in (("each on its own activations", overlap["deployed"]),
                         ("the peer picking from our rows", overlap["same_rows"])):
        print(f"top-{TOP} agreement, {name}: {figure['mean']:.4f} ({figure['all_agree']} of {figure['n_features']} "
              f"features identical), up to ties at its 20th {figure['mean_up_to_ties']:.4f} "
              f"({figure['all_agree_up_to_ties']}; {figure['ties_at_cut']} ties); differing: {figure['differing']}")
    print(f"positions compared {overlap['positions_compared']}, ours there per feature "
          f"{overlap['positions_per_feature']:.1f}; our checks ok: {o['checks_ok']}")
    print(f"wall {wall_s:.0f} s; load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs"
          + ("  WARNING: a loaded machine, timings are noisy" if noisy else ""))
    common = {"n_features": args.latents, "n_tokens": prepared["n_tokens"], "d_model": args.d_model, "k": K,
              "hook": HOOK, "model": "tiny random Llama (4 blocks)", "dtype": args.dtype, "quick": args.quick,
              "caching_s": round(prepared["caching_s"], 2), "ours_seconds": round(o["seconds"], 2),
              "peer_seconds": round(p["seconds"], 2), "wall_s": round(wall_s, 1), "load_before": load_before,
              "load_after": load_after, "noisy": noisy}
    lines = lines_for(args, prepared, o, p, overlap, common)
    out = args.out or (None if args.quick else str(RESULTS))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(json.dumps(line) + "\n" for line in lines))
    for line in lines:
        emit(**line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SAEBench's core figures and the meta-SAE decoder check of one trained SAE, with their seconds
(not in CI): runs ``evaluate.evaluate_sae`` as ``sae_eval`` does (default ``EvalSettings``) on an
artifact root and prints the SAEBench figures of the report.

    python benchmarks/saebench_core_figures.py ROOT SAE_NAME HOLDOUT_FILE [--shuffle main]

ROOT is an artifact root the run may write to (it commits ``eval/<SAE_NAME>``): copy the stored
model, activations, shuffled store and checkpoint of a demo root there rather than writing into
one that is in use. HOLDOUT_FILE: the held-out text (the demo's ``data/holdout/*.txt``).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from bench_help import HelpFormatter

from sae_platform.corpus import TextFile, read_documents, tokenize
from sae_platform.evaluate import EvalSettings, evaluate_sae, heldout_ce_tokens
from sae_platform.model import load_stored_model
from sae_platform.storage import ArtifactStore

FIGURES = ("fvu", "explained_variance", "explained_variance_about_zero", "mse", "cossim", "l2_norm_in", "l2_norm_out",
           "l2_ratio", "relative_reconstruction_bias", "l0", "l1", "frac_alive", "freq_over_1_percent",
           "freq_over_10_percent", "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
           "consistent_activation_heuristic", "loss_recovered", "ce_clean", "ce_sae", "ce_zero", "kl_div_score",
           "kl_div_with_sae", "kl_div_with_ablation", "average_max_encoder_cosine", "average_max_decoder_cosine",
           "mean_encoder_decoder_cosine", "meta_sae_fve", "meta_sae_mse", "meta_sae_width", "meta_sae_k")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("root")
    parser.add_argument("sae_name")
    parser.add_argument("holdout_file")
    parser.add_argument("--shuffle", default="main", help="the shuffled store the SAE was trained on")
    parser.add_argument("--ablation-tokens", type=int, default=None,
                        help="override EvalSettings' ablation_tokens (0 skips the slowest feature metric)")
    args = parser.parse_args()
    settings = EvalSettings()
    store = ArtifactStore(args.root)
    hooked, _ = load_stored_model(store, device="cpu")
    path = str(Path(args.holdout_file).resolve())
    docs = read_documents(TextFile(path, "holdout"))
    sources = [(path, tokenize(hooked.tokenizer, docs))]
    tokens = heldout_ce_tokens(sources, settings.ctx_len, settings.ce_contexts, hooked.start_token_id)
    metric_tokens = heldout_ce_tokens(sources, settings.ctx_len, settings.metric_contexts, hooked.start_token_id)
    lines = []
    started = time.perf_counter()
    ablation = settings.ablation_tokens if args.ablation_tokens is None else args.ablation_tokens
    report, _ = evaluate_sae(store, args.shuffle, args.sae_name, hooked, tokens, torch.device("cpu"),
                             metric_tokens=metric_tokens, ablation_tokens=ablation,
                             meta_sae_steps=settings.meta_sae_steps,
                             max_cosine_latents=settings.max_cosine_latents, log=lines.append)
    print("\n".join(lines), flush=True)
    print(f"evaluate_sae: {time.perf_counter() - started:.1f} s")
    print(json.dumps({key: report.get(key) for key in FIGURES}, indent=1))


if __name__ == "__main__":
    main()

"""Cross-check our core metrics against SAEBench's own core eval (``sae-bench`` 0.6.0), on the same
SAE, model and tokens (not in CI; docs/results.md, "SAEBench", holds the figures).

    python benchmarks/saebench_core_crosscheck.py ROOT SAE_NAME HOLDOUT_FILE [--saebench-python PY]

ROOT: an artifact root holding the stored base model and checkpoint ``SAE_NAME`` (read only).
SAEBench runs in its own venv (``PY``, default /work/venvs/sae-bench/bin/python: ``pip install
sae-bench==0.6.0`` there), as a child process reading:

- the model: SAEBench's TransformerLens cannot fetch our embedded SmolLM2-135M by name offline, so
  the child builds a ``HookedTransformer`` from the stored model's own ``config.json`` with
  TransformerLens's Llama config mapping and ``convert_llama_weights`` (no weight processing: no
  LayerNorm folding or centring, so its forward is the Hugging Face model's);
- the SAE: our SAELens export (``export.export_saelens``, written to a temporary folder) loaded by
  SAELens's ``SAE.load_from_disk``;
- the tokens: ``ce_contexts`` (``--contexts``) held-out contexts of ``ctx_len`` tokens, packed as ``sae_eval`` packs
  them, passed as a .npy file; the start token is SAEBench's ignored token (its masks) and ours
  (never a training row); no attention-sink rule on our side (``sink_norm_factor`` 0).

Ours: ``evaluate.reconstruction_metrics`` on the hook point's values at every non-start position,
``evaluate.downstream_ce`` and ``core_metrics.latent_geometry``. Prints one row per metric (ours,
SAEBench's, difference) and writes them as JSON with ``--out``.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_help import HelpFormatter

from sae_platform.catalog import model_name
from sae_platform.core_metrics import frequency_figures, geometry_figures, latent_geometry
from sae_platform.corpus import TextFile, read_documents, tokenize
from sae_platform.evaluate import CE_BATCH_SIZE, EvalSettings, downstream_ce, heldout_ce_tokens, reconstruction_metrics
from sae_platform.export import export_saelens, saelens_placement
from sae_platform.model import EMBEDDED_MODEL, load_hooked_model
from sae_platform.storage import ArtifactStore
from sae_platform.trainer import load_sae
from sae_platform.training_rows import RowRule

CHILD = r'''
import importlib.util, json, sys
# The venv's torchvision does not match its CPU torch build (torchvision::nms is missing) and the core
# eval never uses it: hide it from transformers' optional-import probe.
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] == "torchvision" else _find_spec(name, package))
import numpy as np, torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
from sae_lens import SAE
from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_bench.evals.core.main import run_evals, get_featurewise_weight_based_metrics, calculate_misc_metrics

model_dir, sae_dir, tokens_path, start, batch = sys.argv[1:6]
hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
c = AutoConfig.from_pretrained(model_dir)
theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
cfg = HookedTransformerConfig(
    d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
    d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps,
    d_vocab=c.vocab_size, act_fn=c.hidden_act,
    n_key_value_heads=c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None,
    normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
    rotary_dim=c.hidden_size // c.num_attention_heads, rotary_base=theta, final_rms=True, gated_mlp=True,
    original_architecture="LlamaForCausalLM", default_prepend_bos=False, tokenizer_prepends_bos=False)
model = HookedTransformer(cfg)
model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                  center_unembed=False, fold_value_biases=False,
                                  refactor_factored_attn_matrices=False)
model.eval()
del hf
sae = SAE.load_from_disk(sae_dir, device="cpu")
# sae-bench 0.6.0 reads SAELens 5's flat config (cfg.hook_name, hook_layer, hook_head_index,
# architecture_str); SAELens 6 keeps the hook in cfg.metadata: give its core eval the names it reads.
sae.cfg.hook_name = sae.cfg.metadata.hook_name
sae.cfg.hook_head_index = getattr(sae.cfg.metadata, "hook_head_index", None)
sae.cfg.hook_layer = int(sae.cfg.hook_name.split(".")[1])
sae.cfg.architecture_str = sae.cfg.architecture()
tokens = torch.from_numpy(np.load(tokens_path).astype(np.int64))


class Contexts:  # what run_evals reads of an ActivationsStore: our packed held-out contexts, in order
    context_size = tokens.shape[1]
    store_batch_size_prompts = int(batch)

    def __init__(self):
        self.next = 0

    def get_batch_tokens(self, n):
        out = tokens[self.next:self.next + n]
        self.next += n
        return out

    def reset_input_dataset(self):
        self.next = 0


n_batches = len(tokens) // int(batch)
config = CoreEvalConfig(batch_size_prompts=int(batch), n_eval_reconstruction_batches=n_batches,
                        n_eval_sparsity_variance_batches=n_batches, context_size=tokens.shape[1], compute_kl=True,
                        compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
                        compute_variance_metrics=True, compute_featurewise_density_statistics=True,
                        compute_featurewise_weight_based_metrics=True,
                        exclude_special_tokens_from_reconstruction=True)
with torch.no_grad():
    metrics, features = run_evals(sae, Contexts(), model, config, ignore_tokens={int(start)})
features |= get_featurewise_weight_based_metrics(sae)
flat = {k: v for group in metrics.values() for k, v in group.items()}
flat |= calculate_misc_metrics(features)
print("SAEBENCH" + json.dumps(flat))
'''

# (our report key, SAEBench's name) of each figure compared
PAIRS = (("explained_variance", "explained_variance"), ("explained_variance_about_zero", "explained_variance"),
         ("explained_variance_about_zero", "explained_variance_legacy"), ("mse", "mse"), ("cossim", "cossim"),
         ("l2_norm_in", "l2_norm_in"), ("l2_norm_out", "l2_norm_out"), ("l2_ratio", "l2_ratio"),
         ("relative_reconstruction_bias", "relative_reconstruction_bias"), ("l0", "l0"), ("l1", "l1"),
         ("ce_clean", "ce_loss_without_sae"), ("ce_sae", "ce_loss_with_sae"), ("ce_zero", "ce_loss_with_ablation"),
         ("loss_recovered", "ce_loss_score"), ("kl_div_with_sae", "kl_div_with_sae"),
         ("kl_div_with_ablation", "kl_div_with_ablation"), ("kl_div_score", "kl_div_score"),
         ("frac_alive", "frac_alive"), ("freq_over_1_percent", "freq_over_1_percent"),
         ("freq_over_10_percent", "freq_over_10_percent"),
         ("average_max_encoder_cosine", "average_max_encoder_cosine_sim"),
         ("average_max_decoder_cosine", "average_max_decoder_cosine_sim"))


def ours(store, sae_name: str, hooked, sae, tokens: np.ndarray, hook: str) -> dict:
    """Our figures on ``tokens``: reconstruction on the hook point's value at every non-start
    position, the downstream CE / KL with no sink rule, frequencies over the same positions."""
    mask = tokens != hooked.start_token_id
    rows = []
    for start in range(0, len(tokens), CE_BATCH_SIZE):
        ids = torch.from_numpy(tokens[start:start + CE_BATCH_SIZE].astype(np.int64))
        value = hooked.read(ids, (hook,))[hook]
        rows.append(value[torch.from_numpy(mask[start:start + CE_BATCH_SIZE])].numpy())
    figures = reconstruction_metrics(sae, rows)
    density = figures.pop("density")
    rule = RowRule(hooked.start_token_id, 0.0, CE_BATCH_SIZE)
    figures |= downstream_ce(hooked, sae, tokens, rule=rule, hook_point=hook)
    return figures | frequency_figures(density) | geometry_figures(latent_geometry(sae))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("root")
    parser.add_argument("sae_name")
    parser.add_argument("holdout_file")
    parser.add_argument("--saebench-python", default="/work/venvs/sae-bench/bin/python",
                        help="the Python of the environment SAEBench is installed in")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--contexts", type=int, default=None,
                        help="held-out contexts to compare on (default: the evaluation's ce_contexts); fewer on a "
                             "loaded machine")
    args = parser.parse_args()
    settings = EvalSettings()
    store = ArtifactStore(args.root)
    model_dir = store.resolve(model_name(EMBEDDED_MODEL))
    sae, _ = load_sae(store, args.sae_name)
    sae.eval()
    placement = saelens_placement(store, args.sae_name)
    hooked = load_hooked_model(model_dir, device="cpu", autocast="none", hook_points=(placement["hook_name"],))
    path = str(Path(args.holdout_file).resolve())
    sources = [(path, tokenize(hooked.tokenizer, read_documents(TextFile(path, "holdout"))))]
    tokens = heldout_ce_tokens(sources, settings.ctx_len, args.contexts or settings.ce_contexts, hooked.start_token_id)
    with tempfile.TemporaryDirectory() as scratch:
        export_saelens(sae, f"{scratch}/sae", **placement)
        np.save(f"{scratch}/tokens.npy", tokens)
        child = subprocess.run([args.saebench_python, "-c", CHILD, model_dir, f"{scratch}/sae", f"{scratch}/tokens.npy",
                                str(hooked.start_token_id), str(CE_BATCH_SIZE)], capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"SAEBench's core eval failed in {args.saebench_python}:\n{child.stderr[-4000:]}")
    theirs = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("SAEBENCH"))[8:])
    mine = ours(store, args.sae_name, hooked, sae, tokens, placement["hook_name"])
    rows = [{"ours": key, "saebench": name, "ours_value": mine.get(key), "saebench_value": theirs.get(name)}
            for key, name in PAIRS]
    print(f"{len(tokens)} contexts x {tokens.shape[1]} tokens, hook {placement['hook_name']}")
    print(f"{'ours':32} {'SAEBench':32} {'ours':>12} {'SAEBench':>12} {'diff':>10}")
    for row in rows:
        a, b = row["ours_value"], row["saebench_value"]
        diff = f"{a - b:+.4g}" if isinstance(a, float) and isinstance(b, float) else ""
        print(f"{row['ours']:32} {row['saebench']:32} {a if a is None else f'{a:.6g}':>12} "
              f"{b if b is None else f'{b:.6g}':>12} {diff:>10}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

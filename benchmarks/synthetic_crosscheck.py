"""Our synthetic generator and ground-truth figures against SAELens's own (``sae_lens.synthetic``).

Not in CI: it needs sae-lens (the ``dev`` extra) and, for part B on a trained SAE, an
artifact root where config/synthetic.yaml ran.

A. Generator: SAELens's ``ActivationGenerator`` fed our truth's firing probabilities, low-rank
   correlation (factor √ρ·F, diagonal 1 − ρ) and magnitudes, beside ``synthetic.sample`` on the
   same settings without hierarchy (SAELens's hierarchy is another construction): per-feature
   firing rates and mean L0 of both.
B. Metrics: one SAE and one truth, both implementations: MCC and uniqueness (same definitions: the
   numbers must agree to float precision), and the classification and shrinkage figures, which
   SAELens defines differently (per latent against its best-matching feature; shrinkage as
   ‖output‖ / ‖input‖), shown side by side.

    python benchmarks/synthetic_crosscheck.py                       # B on a noisy true dictionary
    python benchmarks/synthetic_crosscheck.py --root artifacts-synthetic --sae syn-topk
"""

import argparse
import json
import time

import numpy as np
import torch
from bench_help import HelpFormatter

from sae_platform import ground_truth, synthetic


def generator_check(settings: synthetic.SyntheticSettings, rows: int) -> dict:
    from sae_lens.synthetic.activation_generator import ActivationGenerator

    flat = synthetic.SyntheticSettings(**{**settings.__dict__, "n_parents": 0, "children_per_parent": 0})
    truth = synthetic.make_truth(flat)
    ours = synthetic.sample(truth, np.random.default_rng(7), rows).codes
    rho = flat.correlation_strength
    factor = torch.from_numpy(truth.loadings).float() * rho ** 0.5
    diag = torch.full((truth.n_features,), 1 - rho)
    torch.manual_seed(7)
    generator = ActivationGenerator(truth.n_features, torch.from_numpy(truth.firing_prob).float(),
                                    std_firing_magnitudes=flat.magnitude_std, mean_firing_magnitudes=1.0,
                                    correlation_matrix=(factor, diag))
    theirs = torch.cat([generator.sample(4096) for _ in range(-(-rows // 4096))])[:rows].numpy()
    rate_ours, rate_theirs = (ours > 0).mean(0), (theirs > 0).mean(0)
    return {"rows": rows, "features": truth.n_features,
            "mean_l0": {"ours": float((ours > 0).sum(1).mean()), "sae_lens": float((theirs > 0).sum(1).mean()),
                        "declared": flat.mean_l0},
            "firing_rate_max_abs_diff": float(np.abs(rate_ours - rate_theirs).max()),
            "firing_rate_corr": float(np.corrcoef(rate_ours, rate_theirs)[0, 1]),
            "mean_magnitude": {"ours": float(ours[ours > 0].mean()), "sae_lens": float(theirs[theirs > 0].mean())}}


def metric_check(sae, truth, rows: int) -> dict:
    from sae_lens.synthetic.evals import (
        compute_classification_metrics,
        feature_uniqueness,
        mean_correlation_coefficient,
    )

    decoder = sae.W_dec.detach().float()
    directions = torch.from_numpy(truth.directions)
    started = time.perf_counter()
    settings = synthetic.SyntheticSettings(**{**truth.settings.__dict__, "heldout_rows": rows})
    ours = ground_truth.score_sae(sae, synthetic.Truth(settings, *[getattr(truth, a) for a in synthetic.Truth.ARRAYS]),
                                  synthetic.heldout_draws(truth))
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    mcc = mean_correlation_coefficient(decoder, directions)
    uniqueness = feature_uniqueness(decoder, directions)
    draw = synthetic.sample(truth, synthetic.heldout_stream(truth.settings), rows)
    with torch.no_grad():
        latents = sae.encode_dense(torch.from_numpy(draw.acts))
        recon = sae.decode(sae.encode(torch.from_numpy(draw.acts)))
    classification = compute_classification_metrics(latents, torch.from_numpy(draw.codes), decoder, directions)
    norms = torch.from_numpy(draw.acts).norm(dim=1)
    lit = norms > 0  # a row where no feature fires is all zeros: no ratio (1e-6 floors made it 10^5)
    shrinkage = float((recon.norm(dim=1)[lit] / norms[lit]).mean())
    theirs_s = time.perf_counter() - started
    return {"mcc": {"ours": ours["gt_mcc"], "sae_lens": mcc, "abs_diff": abs(ours["gt_mcc"] - mcc)},
            "uniqueness": {"ours": ours["gt_uniqueness"], "sae_lens": uniqueness,
                           "abs_diff": abs(ours["gt_uniqueness"] - uniqueness)},
            "f1": {"ours_per_true_feature_hungarian": ours["gt_f1"], "sae_lens_per_latent_best_match":
                   classification.f1_score},
            "precision": {"ours": ours["gt_precision"], "sae_lens": classification.precision},
            "recall": {"ours": ours["gt_recall"], "sae_lens": classification.recall},
            "shrinkage": {"ours_along_true_direction": ours["gt_shrinkage"], "sae_lens_output_over_input_norm":
                          shrinkage},
            "seconds": {"ours": ours_s, "sae_lens": theirs_s}}


def noisy_true_dictionary(truth, noise: float = 0.5):
    """A TopK SAE whose decoder is the true dictionary plus Gaussian noise (|cos| ≈ 1/√(1 + noise²) = 0.89)."""
    from sae_platform.sae import build_sae

    s = truth.settings
    sae = build_sae("topk", s.d_model, s.n_features, k=int(round(s.mean_l0)))
    rng = np.random.default_rng(12345)  # not 0: default_rng(0) draws what the truth's default_rng([0, 0]) drew
    noisy = truth.directions + noise * rng.standard_normal(truth.directions.shape) / np.sqrt(s.d_model)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(ground_truth.unit_rows(noisy)).float())
        sae.W_enc.copy_(torch.from_numpy(truth.directions))
    return sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--root", help="artifact root where config/synthetic.yaml ran")
    parser.add_argument("--sae", default="syn-topk", help="a trained SAE of that root")
    parser.add_argument("--rows", type=int, default=8192, help="fresh synthetic rows each check draws")
    args = parser.parse_args()
    if args.root:
        from sae_platform.activations import activation_attrs
        from sae_platform.storage import ArtifactStore
        from sae_platform.trainer import load_sae

        store = ArtifactStore(args.root)
        sae, cfg = load_sae(store, args.sae, torch.device("cpu"))
        truth = synthetic.read_truth(store, activation_attrs(store, cfg["data"]["shuffle"])["synthetic"]["truth_id"])
        what = f"{args.sae} of {args.root}"
    else:
        truth = synthetic.make_truth(synthetic.SyntheticSettings(n_features=1024, d_model=128, n_parents=16,
                                                                 children_per_parent=4, mean_l0=12))
        sae, what = noisy_true_dictionary(truth), "the true dictionary plus noise (TopK encoder)"
    report = {"sae": what, "truth": truth.settings.truth_id(),
              "generator": generator_check(truth.settings, args.rows), "metrics": metric_check(sae, truth, args.rows)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

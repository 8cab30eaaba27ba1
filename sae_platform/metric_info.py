"""What each evaluation figure means: the one table of metric definitions.

Every place that shows an SAE's evaluation figures reads it from here, so a figure has the same
name, unit, direction and definition everywhere: ``sae_eval``'s Dagster metadata (one Markdown
table per group), the sweep comparison page (``sae_platform.compare``) and the feature browser's
overview (``index.json``'s ``metric_info``). The figures themselves are computed by
``sae_platform.evaluate`` and ``sae_platform.metrics``; the sources are Gao et al. 2024,
"Scaling and evaluating sparse autoencoders" (sections cited as "Gao §N") and Bricken et al. 2023,
"Towards Monosemanticity" (dead latents), and SAEBench's core eval (Karvonen et al. 2025,
"SAEBench", ``sae_bench/evals/core``; ``sae_platform.core_metrics``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

RECONSTRUCTION, SPARSITY, DOWNSTREAM, FEATURE_QUALITY, GEOMETRY, GROUND_TRUTH, TRAINING = (
    "reconstruction", "sparsity", "downstream", "feature quality", "latent geometry", "ground truth", "training")
GROUPS = (RECONSTRUCTION, SPARSITY, DOWNSTREAM, FEATURE_QUALITY, GEOMETRY, GROUND_TRUTH, TRAINING)  # in this order
SAEBENCH = "SAEBench core (Karvonen et al. 2025)"

SPARSE_PROBING_K_VALUES = (1, 2, 5)  # SAEBench's default k_values: probes on the top k latents (channels)
LOWER, HIGHER = "lower", "higher"  # which way is better; None: no direction (a size, not a score)
ARROWS = {LOWER: "↓", HIGHER: "↑", None: ""}


@dataclass(frozen=True)
class MetricInfo:
    """One evaluation figure: ``key`` in ``eval/<sae>/report.json``, ``label`` (short, for a
    column heading), ``group`` (one of ``GROUPS``), ``unit`` (a word; "" for a pure ratio),
    ``better`` (``LOWER``, ``HIGHER`` or None), a one-line ``definition`` and its ``source``."""

    key: str
    label: str
    group: str
    unit: str
    better: str | None
    definition: str
    source: str = ""

    @property
    def arrow(self) -> str:
        """↓ (lower is better), ↑ (higher is better) or "" (no direction)."""
        return ARROWS[self.better]



def sparse_probing_key(side: str, k: int | None) -> str:
    """The figure key of sparse probing's mean test accuracy on ``side`` ("sae": the SAE's latents,
    "llm": the hook point's channels) with the top ``k`` of them (None: all of them)."""
    return f"sparse_probing_{side}_{'all' if k is None else f'top_{k}'}"


def _sparse_probing_metrics() -> tuple[MetricInfo, ...]:
    """One figure per side (SAE latents, then the residual baseline) and k (``SPARSE_PROBING_K_VALUES``, then all)."""
    metrics = []
    for side, units, suffix in (("sae", "latents", ""), ("llm", "channels of the hook point", " (residual)")):
        for k in (*SPARSE_PROBING_K_VALUES, None):
            picked = (f"all {units}" if k is None else
                      f"the {k} {units} whose context means differ most between the classes")
            baseline = "; the baseline the SAE's probe is read against" if side == "llm" else ""
            metrics.append(MetricInfo(
                sparse_probing_key(side, k), f"sparse probing {'all' if k is None else f'top-{k}'}{suffix}",
                FEATURE_QUALITY, "accuracy", HIGHER,
                f"test accuracy of a logistic probe on {picked}, mean over the corpus's tasks (source text "
                f"one-vs-rest, declared labels){baseline}; sae_sparse_probing", "SAEBench sparse probing"))
    return tuple(metrics)


SPARSE_PROBING_METRICS = _sparse_probing_metrics()
METRICS = (
    MetricInfo("fvu", "FVU", RECONSTRUCTION, "fraction of variance", LOWER,
               "squared reconstruction error over the held-out rows / their squared deviation from the mean",
               "Gao §2.1"),
    MetricInfo("nmse", "normalized MSE", RECONSTRUCTION, "fraction of variance", LOWER,
               "per batch, MSE / MSE of predicting the batch mean, averaged over batches (what training logs)",
               "Gao §2.1"),
    MetricInfo("mse", "MSE", RECONSTRUCTION, "activation units²", LOWER,
               "mean squared reconstruction error per activation channel on the held-out rows"),
    MetricInfo("explained_variance", "explained variance", RECONSTRUCTION, "fraction of variance", HIGHER,
               "1 − squared error / squared deviation from the per-dimension mean (= 1 − FVU): predicting the mean "
               "scores 0", SAEBENCH),
    MetricInfo("explained_variance_about_zero", "explained variance (about zero)", RECONSTRUCTION,
               "fraction of second moment", HIGHER,
               "legacy figure: 1 − squared error / squared norm of the rows (about zero, not the mean); reads high "
               "when activations have a large mean", "SAEBench legacy; SAELens < 6.45.1 (#659)"),
    MetricInfo("cossim", "cosine", RECONSTRUCTION, "cosine", HIGHER,
               "mean over held-out rows of cos(x, reconstruction)", SAEBENCH),
    MetricInfo("l2_ratio", "L2 ratio", RECONSTRUCTION, "ratio", None,
               "mean over held-out rows of ‖reconstruction‖ / ‖x‖ (1: no shrinkage)", SAEBENCH),
    MetricInfo("relative_reconstruction_bias", "relative reconstruction bias", RECONSTRUCTION, "ratio", None,
               "E‖x̂‖² / E⟨x, x̂⟩ over the held-out rows: 1 is unbiased, below 1 shrinkage",
               "Rajamanoharan et al. 2024 eq. 10; " + SAEBENCH),
    MetricInfo("l2_norm_in", "‖x‖", RECONSTRUCTION, "activation units", None,
               "mean L2 norm of the held-out rows", SAEBENCH),
    MetricInfo("l2_norm_out", "‖x̂‖", RECONSTRUCTION, "activation units", None,
               "mean L2 norm of their reconstructions", SAEBENCH),
    MetricInfo("l0", "L0", SPARSITY, "latents per token", None,
               "mean number of latents active on a held-out token (set by k or the sparsity penalty)", "Gao §2.2"),
    MetricInfo("dead_fraction", "dead", SPARSITY, "fraction of latents", LOWER,
               "share of latents that never fired on any cached token", "Bricken et al. 2023; Gao §2.4"),
    MetricInfo("n_dead", "dead latents", SPARSITY, "latents", LOWER,
               "number of latents that never fired on any cached token"),
    MetricInfo("dead_window_tokens", "dead window", SPARSITY, "tokens", None,
               "cached tokens the dead count was measured on"),
    MetricInfo("heldout_dead_fraction", "dead (held-out)", SPARSITY, "fraction of latents", LOWER,
               "share of latents that never fired on the held-out rows (a shorter window: an upper bound)"),
    MetricInfo("heldout_tokens", "held-out tokens", SPARSITY, "tokens", None,
               "held-out rows the reconstruction and L0 were measured on"),
    MetricInfo("l1", "L1", SPARSITY, "code units per token", None,
               "mean over held-out rows of the sum of the latent activations (the SAELens export's units)", SAEBENCH),
    MetricInfo("frac_alive", "alive", SPARSITY, "fraction of latents", HIGHER,
               "share of latents that fired on at least one cached token (1 − dead)", SAEBENCH),
    MetricInfo("freq_over_1_percent", "density > 1%", SPARSITY, "fraction of latents", LOWER,
               "share of latents firing on more than 1% of cached tokens", SAEBENCH),
    MetricInfo("freq_over_10_percent", "density > 10%", SPARSITY, "fraction of latents", LOWER,
               "share of latents firing on more than 10% of cached tokens (dense latents)", SAEBENCH),
    MetricInfo("normalized_freq_over_1_percent", "firings by > 1% latents", SPARSITY, "fraction of firings", None,
               "the latents denser than 1%: their share of all firings", SAEBENCH),
    MetricInfo("normalized_freq_over_10_percent", "firings by > 10% latents", SPARSITY, "fraction of firings", None,
               "the latents denser than 10%: their share of all firings", SAEBENCH),
    MetricInfo("consistent_activation_heuristic", "tokens per firing context", SPARSITY, "tokens per context", None,
               "per latent, tokens it fires on / held-out contexts it fires in; mean over latents that fired",
               SAEBENCH),
    MetricInfo("loss_recovered", "loss recovered", DOWNSTREAM, "fraction", HIGHER,
               "1 − (CE with the reconstruction − clean CE) / (CE with the layer zeroed − clean CE)", "Gao §4.1"),
    MetricInfo("ce_clean", "CE clean", DOWNSTREAM, "nats per token", None,
               "the base model's next-token cross-entropy on held-out text"),
    MetricInfo("ce_sae", "CE with SAE", DOWNSTREAM, "nats per token", LOWER,
               "cross-entropy with the SAE's reconstruction spliced in at its hook point"),
    MetricInfo("ce_zero", "CE zero-ablated", DOWNSTREAM, "nats per token", None,
               "cross-entropy with the hook point's output zeroed (the floor loss recovered is measured to)"),
    MetricInfo("ce_delta", "CE increase", DOWNSTREAM, "nats per token", LOWER,
               "CE with the SAE − clean CE", "Gao §4.1"),
    MetricInfo("kl_div_score", "KL score", DOWNSTREAM, "fraction", HIGHER,
               "(KL zero-ablated − KL with the SAE) / KL zero-ablated, KL of the clean next-token distribution to "
               "the spliced one", SAEBENCH),
    MetricInfo("kl_div_with_sae", "KL with SAE", DOWNSTREAM, "nats per token", LOWER,
               "mean KL(clean ‖ with the reconstruction spliced in) over every position", SAEBENCH),
    MetricInfo("kl_div_with_ablation", "KL zero-ablated", DOWNSTREAM, "nats per token", None,
               "mean KL(clean ‖ with the hook point zeroed): the floor of the KL score", SAEBENCH),
    MetricInfo("n2g_precision", "N2G precision", FEATURE_QUALITY, "fraction", HIGHER,
               "mean over latents of the share of an N2G explanation's matches on which the latent fires "
               "(explanations built on half the held-out contexts, scored on the other half)", "Gao §4.4"),
    MetricInfo("n2g_recall", "N2G recall", FEATURE_QUALITY, "fraction", HIGHER,
               "mean over latents of the share of the latent's firings its N2G explanation matches", "Gao §4.4"),
    MetricInfo("ablation_sparsity", "ablation sparsity", FEATURE_QUALITY, "(L1/L2)² / (vocab × positions)", LOWER,
               "how few logits change when one latent is removed from the spliced reconstruction", "Gao §4.5"),
    MetricInfo("probe_loss", "probe loss", FEATURE_QUALITY, "nats (binary CE)", LOWER,
               "best single-latent logistic probe per token property, mean over properties", "Gao §4.2"),
    MetricInfo("probe_loss_neurons", "probe loss (neurons)", FEATURE_QUALITY, "nats (binary CE)", LOWER,
               "the same probes on the channels of the hook point the SAE reads: the baseline to beat", "Gao §4.2"),
    MetricInfo("probe_loss_base_rate", "probe loss (base rate)", FEATURE_QUALITY, "nats (binary CE)", LOWER,
               "the probes' loss when predicting each property's base rate: the no-information floor"),
    *SPARSE_PROBING_METRICS,
    MetricInfo("mean_absorption_fraction_score", "absorption fraction", FEATURE_QUALITY, "fraction", LOWER,
               "first-letter task: share of the probe's projection carried by absorbing latents instead of the "
               "letter's own, mean over letters (none: under 20 letters readable)", "SAEBench; Chanin et al. 2024"),
    MetricInfo("mean_full_absorption_score", "full absorption", FEATURE_QUALITY, "fraction", LOWER,
               "first-letter task: share of words where the letter's latents stay silent and one absorbing latent "
               "carries the probe's projection, mean over letters", "SAEBench; Chanin et al. 2024"),
    MetricInfo("mean_num_split_features", "split features", FEATURE_QUALITY, "latents", None,
               "first-letter task: latents a letter is split over (k-sparse probe F1 still rising), mean over letters",
               "SAEBench; Chanin et al. 2024"),
    # measured only on synthetic activations, whose true features are known (sae_platform/ground_truth.py)
    MetricInfo("gt_mcc", "MCC", GROUND_TRUTH, "mean |cosine|", HIGHER,
               "decoder rows matched one-to-one to the true feature directions (Hungarian); mean |cosine| of "
               "the matched pairs", "O'Neill et al. 2025 (arXiv 2505.20254); SAELens SynthSAEBench"),
    MetricInfo("gt_mcc_chance", "chance MCC", GROUND_TRUTH, "mean |cosine|", None,
               "MCC of a random decoder of the same width against the same features: what an SAE that learnt "
               "nothing scores (read MCC against it)"),
    MetricInfo("gt_uniqueness", "uniqueness", GROUND_TRUTH, "fraction", HIGHER,
               "distinct true features among the latents' best matches, over the latents", "SAELens SynthSAEBench"),
    MetricInfo("gt_f1", "firing F1", GROUND_TRUTH, "fraction", HIGHER,
               "per true feature, F1 of its matched latent firing as a detector of the feature firing, mean "
               "over the features that fire on the held-out synthetic rows"),
    MetricInfo("gt_precision", "firing precision", GROUND_TRUTH, "fraction", HIGHER,
               "per true feature, P(feature fires | its matched latent fires), mean"),
    MetricInfo("gt_recall", "firing recall", GROUND_TRUTH, "fraction", HIGHER,
               "per true feature, P(its matched latent fires | feature fires), mean"),
    MetricInfo("gt_shrinkage", "shrinkage", GROUND_TRUTH, "ratio (1: none)", None,
               "on rows where a feature and its matched latent both fire, the latent's contribution along the "
               "feature's direction / the true magnitude, mean (below 1: shrunk, as by an L1 penalty)"),
    MetricInfo("gt_absorption", "absorption", GROUND_TRUTH, "fraction", LOWER,
               "over rows where a child feature fires, the share where its matched latent is silent and its "
               "parent's matched latent fires; mean over children", "Chanin et al. 2024, \"A is for Absorption\""),
    MetricInfo("average_max_decoder_cosine", "max decoder cosine", GEOMETRY, "cosine", LOWER,
               "mean over latents of the largest cosine between its decoder row and any other latent's", SAEBENCH),
    MetricInfo("average_max_encoder_cosine", "max encoder cosine", GEOMETRY, "cosine", LOWER,
               "mean over latents of the largest cosine between its encoder row and any other latent's", SAEBENCH),
    MetricInfo("mean_encoder_decoder_cosine", "encoder–decoder cosine", GEOMETRY, "cosine", None,
               "mean over latents of the cosine between its encoder and decoder rows (SAEs, not transcoders)",
               SAEBENCH),
    MetricInfo("meta_sae_fve", "meta-SAE variance explained", GEOMETRY, "fraction of variance", None,
               "variance of the decoder rows explained by a BatchTopK meta-SAE (0.25× the latents, k 4) trained "
               "on them: high means the directions compose from shared parts",
               "Bussmann et al. 2025 App. D.1; SAEBench meta_structure"),
    MetricInfo("checkpoint_step", "steps", TRAINING, "steps", None, "optimizer steps of the evaluated checkpoint"),
    MetricInfo("training_tokens", "tokens", TRAINING, "tokens", None, "training tokens the checkpoint has seen"),
)
METRIC_INFO = {m.key: m for m in METRICS}


def metric_info(key: str) -> MetricInfo:
    """The definition of figure ``key``. Raises KeyError naming the known figures."""
    if key not in METRIC_INFO:
        raise KeyError(f"no evaluation figure named {key!r}; known: {', '.join(METRIC_INFO)}")
    return METRIC_INFO[key]


def metric_info_json() -> list[dict]:
    """Every definition as plain dicts (key, label, group, unit, better, arrow, definition,
    source), in ``METRICS`` order: what the browser's overview reads from ``index.json``."""
    return [{**asdict(m), "arrow": m.arrow} for m in METRICS]


def _figure(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if math.isfinite(value) else "–"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def grouped_markdown(report: dict) -> dict[str, str]:
    """Per group with a measured figure in ``report``: a Markdown table (figure, value, unit,
    better, definition, source), the groups in ``GROUPS`` order. Figures not in ``report`` (or not
    measured: None) are left out, so a table shows what this evaluation measured."""
    tables = {}
    for group in GROUPS:
        rows = [m for m in METRICS if m.group == group and _figure(report.get(m.key)) != "–"]
        if not rows:
            continue
        lines = ["| figure | value | unit | better | definition | source |", "|---|---:|---|---|---|---|"]
        lines += [f"| {_cell(m.label)} | {_figure(report[m.key])} | {_cell(m.unit)} | "
                  f"{m.arrow} {m.better or ''} | {_cell(m.definition)} | {_cell(m.source)} |" for m in rows]
        tables[group] = "\n".join(lines)
    return tables

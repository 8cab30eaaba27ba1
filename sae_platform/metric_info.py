"""What each evaluation figure means: the one table of metric definitions.

Every place that shows an SAE's evaluation figures reads it from here, so a figure has the same
name, unit, direction and definition everywhere: ``sae_eval``'s Dagster metadata (one Markdown
table per group), the sweep comparison page (``sae_platform.compare``) and the feature browser's
overview (``index.json``'s ``metric_info``). The figures themselves are computed by
``sae_platform.evaluate`` and ``sae_platform.metrics``; the sources are Gao et al. 2024,
"Scaling and evaluating sparse autoencoders" (sections cited as "Gao §N") and Bricken et al. 2023,
"Towards Monosemanticity" (dead latents).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

RECONSTRUCTION, SPARSITY, DOWNSTREAM, FEATURE_QUALITY, GROUND_TRUTH, TRAINING = (
    "reconstruction", "sparsity", "downstream", "feature quality", "ground truth", "training")
GROUPS = (RECONSTRUCTION, SPARSITY, DOWNSTREAM, FEATURE_QUALITY, GROUND_TRUTH, TRAINING)  # the order they are shown in

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


METRICS = (
    MetricInfo("fvu", "FVU", RECONSTRUCTION, "fraction of variance", LOWER,
               "squared reconstruction error over the held-out rows / their squared deviation from the mean",
               "Gao §2.1"),
    MetricInfo("nmse", "normalized MSE", RECONSTRUCTION, "fraction of variance", LOWER,
               "per batch, MSE / MSE of predicting the batch mean, averaged over batches (what training logs)",
               "Gao §2.1"),
    MetricInfo("mse", "MSE", RECONSTRUCTION, "activation units²", LOWER,
               "mean squared reconstruction error per activation channel on the held-out rows"),
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
    MetricInfo("sparse_probing_sae_top_1", "sparse probing top-1", FEATURE_QUALITY, "accuracy", HIGHER,
               "test accuracy of a logistic probe on the one latent whose context means differ most between the "
               "classes, mean over the corpus's tasks (source text one-vs-rest, declared labels); sae_sparse_probing",
               "SAEBench sparse probing"),
    MetricInfo("sparse_probing_llm_top_1", "sparse probing top-1 (residual)", FEATURE_QUALITY, "accuracy", HIGHER,
               "the same probe on the one channel of the hook point that differs most: the baseline to beat",
               "SAEBench sparse probing"),
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

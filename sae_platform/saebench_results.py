"""SAEBench result files: one JSON per (SAE, eval) in the output schema of ``sae-bench`` 0.6.0
(``sae_bench/evals/base_eval_output.py``: ``BaseEvalOutput``), which Neuronpedia ingests and
saebench.xyz compares, written from our own evaluations.

The writer is generic (``saebench_result``: an eval type id, its config, its metrics by category,
per-latent details); ``core_eval_result`` maps ``sae_eval``'s report onto SAEBench's core eval
(``sae_bench/evals/core/eval_output.py``: ``CoreEvalOutput``). Conventions that differ from
SAEBench's own code are stated in ``eval_result_unstructured["conventions"]`` of each file:

- ``explained_variance`` is about the *mean* (1 - FVU) and ``explained_variance_legacy`` the
  about-zero figure (``core_metrics``); the two differ most on activations with a large mean.
- A figure that was not measured (e.g. the downstream CE with ``ce_contexts: 0``) or is NaN is
  written as -1, as SAEBench's ``replace_nans_with_negative_one`` does: the schema's fields are
  required floats.

``sae_bench_commit_hash`` names this platform rather than a commit of SAEBench, and the
``sae_lens_*`` ids name the SAE by its platform name (it is not a SAELens release);
``sae_cfg_dict`` is the SAELens cfg.json its export writes (``export.saelens_cfg``).
"""

import math
import time
import uuid

import numpy as np

from sae_platform.catalog import saebench_result_file

SAEBENCH_SCHEMA = "sae-bench 0.6.0"  # whose output schema these files follow (tests validate against it)
NOT_MEASURED = -1  # SAEBench's stand-in for NaN (replace_nans_with_negative_one)
PRODUCER = f"sae_platform (not run by SAE Bench; {SAEBENCH_SCHEMA} output schema)"


def _finite(value) -> float:
    """``value`` as a float, or ``NOT_MEASURED`` for None / NaN / inf."""
    if value is None or isinstance(value, bool):
        return NOT_MEASURED
    value = float(value)
    return value if math.isfinite(value) else NOT_MEASURED


def saebench_result(eval_type_id: str, eval_config: dict, metrics: dict[str, dict], *, sae_name: str,
                    release: str, sae_cfg: dict | None, details: list[dict] | None = None,
                    unstructured: dict | None = None, eval_id: str | None = None,
                    epoch_millis: int | None = None) -> dict:
    """One result file as a JSON-ready dict in SAEBench's ``BaseEvalOutput`` layout.

    ``eval_config``: the eval's config fields (SAEBench's ``<Eval>EvalConfig``); ``metrics``:
    category -> {metric: value} (SAEBench's ``<Eval>MetricCategories``; floats, NaN/None -> -1);
    ``details``: per-item dicts (``eval_result_details``, e.g. one per latent); ``sae_name`` and
    ``release`` fill ``sae_lens_id`` / ``sae_lens_release_id``; ``sae_cfg``: SAELens cfg.json
    (None when SAELens cannot hold the SAE). ``eval_id`` defaults to a fresh UUID4 and
    ``epoch_millis`` to now."""
    return {
        "eval_type_id": eval_type_id,
        "eval_config": eval_config,
        "eval_id": eval_id or str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000) if epoch_millis is None else int(epoch_millis),
        "eval_result_metrics": {category: {key: value if isinstance(value, int) and not isinstance(value, bool)
                                           else _finite(value) for key, value in figures.items()}
                                for category, figures in metrics.items()},
        "eval_result_details": details or [],
        "eval_result_unstructured": unstructured or {},
        "sae_bench_commit_hash": PRODUCER,
        "sae_lens_id": sae_name,
        "sae_lens_release_id": release,
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg,
    }


def write_saebench_result(store, version: str, result: dict) -> str:
    """Write ``result`` as ``saebench_<eval_type_id>.json`` (``catalog.saebench_result_file``)
    into ``version``, a version directory of an open ``store.writing`` commit: it is committed,
    checksummed and pinned with the evaluation that computed it. Returns the path."""
    path = f"{version}/{saebench_result_file(result['eval_type_id'])}"
    store.write_json(path, result)
    return path


# -- the core eval ---------------------------------------------------------------------------------

# SAEBench core category -> {SAEBench metric: key in sae_eval's report}
CORE_METRICS = {
    "model_behavior_preservation": {"kl_div_score": "kl_div_score", "kl_div_with_ablation": "kl_div_with_ablation",
                                    "kl_div_with_sae": "kl_div_with_sae"},
    "model_performance_preservation": {"ce_loss_score": "loss_recovered", "ce_loss_with_ablation": "ce_zero",
                                       "ce_loss_with_sae": "ce_sae", "ce_loss_without_sae": "ce_clean"},
    "reconstruction_quality": {"explained_variance": "explained_variance",
                               "explained_variance_legacy": "explained_variance_about_zero",
                               "mse": "mse", "cossim": "cossim"},
    "shrinkage": {"l2_norm_in": "l2_norm_in", "l2_norm_out": "l2_norm_out", "l2_ratio": "l2_ratio",
                  "relative_reconstruction_bias": "relative_reconstruction_bias"},
    "sparsity": {"l0": "l0", "l1": "l1"},
    "misc_metrics": {"freq_over_1_percent": "freq_over_1_percent", "freq_over_10_percent": "freq_over_10_percent",
                     "normalized_freq_over_1_percent": "normalized_freq_over_1_percent",
                     "normalized_freq_over_10_percent": "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim": "average_max_encoder_cosine",
                     "average_max_decoder_cosine_sim": "average_max_decoder_cosine",
                     "frac_alive": "frac_alive"},
}
CORE_CONVENTIONS = {
    "explained_variance": "1 - SSE / sum ||x - mean||^2 over the held-out rows: variance about the mean (= 1 - fvu)",
    "explained_variance_legacy": "1 - SSE / sum ||x||^2: about zero (SAEBench / SAELens before v6.45.1, issue #659)",
    "ce_loss_score": "sae_eval's loss_recovered; CE, KL and the splice cover the positions that were training rows "
                     "(start tokens and attention sinks excluded), not every position",
    "feature_density": "over every cached row of the SAE's shuffled store, not a sample of batches",
    "consistent_activation_heuristic": "over sae_eval's held-out metric contexts; -1: never fired there",
    "not_measured": "-1 (SAEBench's stand-in for NaN)",
}


def core_eval_result(report: dict, latents: dict[str, np.ndarray], *, sae_name: str, sae_cfg: dict | None,
                     model_name: str, ctx_len: int, batch_size: int, llm_dtype: str) -> dict:
    """SAEBench's core result file (``CoreEvalOutput``) from ``sae_eval``'s ``report`` and the
    per-latent arrays ``latents`` [n_latents] each: ``density`` (required), and where measured
    ``consistent_activation_heuristic``, ``encoder_bias``, ``encoder_norm``,
    ``encoder_decoder_cosine``, ``max_encoder_cosine``, ``max_decoder_cosine`` (missing -> -1)."""
    metrics = {category: {ours: report.get(key) for ours, key in figures.items()}
               for category, figures in CORE_METRICS.items()}
    ce_tokens = int(report.get("ce_n_contexts") or 0) * ctx_len
    metrics["token_stats"] = {"total_tokens_eval_reconstruction": ce_tokens,
                              "total_tokens_eval_sparsity_variance": int(report.get("heldout_tokens") or 0)}
    n_ce = int(report.get("ce_n_contexts") or 0)
    config = {
        "model_name": model_name, "llm_dtype": llm_dtype, "batch_size_prompts": batch_size,
        "n_eval_reconstruction_batches": math.ceil(n_ce / batch_size),
        "n_eval_sparsity_variance_batches": 1, "dataset": "held-out text of the platform's inbox",
        "context_size": ctx_len, "compute_kl": n_ce > 0, "compute_ce_loss": n_ce > 0, "compute_l2_norms": True,
        "compute_sparsity_metrics": True, "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True, "compute_featurewise_weight_based_metrics": True,
        "exclude_special_tokens_from_reconstruction": True, "verbose": False,
    }
    names = {"feature_density": "density", "consistent_activation_heuristic": "consistent_activation_heuristic",
             "encoder_bias": "encoder_bias", "encoder_norm": "encoder_norm",
             "encoder_decoder_cosine_sim": "encoder_decoder_cosine", "max_decoder_cosine_sim": "max_decoder_cosine",
             "max_encoder_cosine_sim": "max_encoder_cosine"}
    n_latents = len(latents["density"])
    columns = {field: (np.asarray(latents[key], np.float64) if key in latents else np.full(n_latents, np.nan))
               for field, key in names.items()}
    details = [{"index": i, **{field: _finite(round(float(values[i]), 10)) for field, values in columns.items()}}
               for i in range(n_latents)]
    return saebench_result("core", config, metrics, sae_name=sae_name, release=model_name or "sae_platform",
                           sae_cfg=sae_cfg, details=details, unstructured={"conventions": CORE_CONVENTIONS})

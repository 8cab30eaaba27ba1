"""SAE training and evaluation, one partition per sweep entry (config/sweep.yaml).

``sae_checkpoint`` runs in the `gpu` pool (one training at a time per pool slot); it is up to date
when its checkpoint is a finished training with the same settings on the current shuffled store.
``sae_eval`` is up to date when its committed report was computed from the same checkpoint,
shuffled store, held-out text, base model and settings (recorded in its pointer); it carries the
threshold checks, so the catalog shows pass/fail per SAE. ``sae_sparse_probing`` (k-sparse probing on
tasks from the corpus) is up to date when its result was computed from the same checkpoint, shuffled
store, label sidecars and settings. ``sae_comparison`` puts every evaluated SAE side by side.
"""

import json

from dagster import AllPartitionMapping, AssetDep, MetadataValue

from assets.metadata import dagster_types, inline_png, inline_png_url, table_preview
from assets.partitions import SAE_RESEED_GROUPS, SAE_SWEEP, SAE_SWEEP_SPECS
from assets.stage import AssetJob, Check, Stage, StageRun, pointer_version
from sae_platform import evaluate, sparse_probing, trainer
from sae_platform.activations import activation_attrs
from sae_platform.browser.address import BROWSER_URL
from sae_platform.catalog import (
    EVAL_PROBES,
    EVAL_REPORT,
    SAEBENCH_SPARSE_PROBING,
    SCALING_LAWS,
    SCALING_LAWS_PLOT,
    SPARSE_PROBING_RESULT,
    SWEEP_COMPARISON,
    HookEntry,
    checkpoint_name,
    eval_name,
    model_name,
    report_path,
    reports_url_path,
    shuffle_for_hook_point,
    sparse_probing_name,
)
from sae_platform.compare import (
    COLUMNS,
    GROUND_TRUTH_KEYS,
    RESEEDS_TABLE_COLUMNS,
    SPREAD_KEYS,
    comparison_html,
    comparison_rows,
    figures_version,
    ground_truth_rows,
    reseeds_html,
    reseeds_table,
)
from sae_platform.corpus import read_documents, tokenize
from sae_platform.errors import PlatformError
from sae_platform.evaluate import heldout_ce_tokens
from sae_platform.export import export_run
from sae_platform.launch import launch_training
from sae_platform.metric_info import grouped_markdown
from sae_platform.model import pick_device
from sae_platform.plots import density_histogram_png, scaling_laws_png, training_curves_png
from sae_platform.reseeds import not_distinguishable, seed_consistency, sweep_units
from sae_platform.scaling import (
    SCALING_VARIANT,
    SUMMARY_COLUMNS,
    ScalingPoint,
    ScalingRefused,
    fit_scaling_laws,
    scaling_html,
    scaling_summary,
)
from sae_platform.tables import PROBE_SCHEMA
from sae_platform.text_labels import TextLabels, read_text_labels
from sae_platform.trainer import TrainSettings, finished_checkpoint
from sae_platform.training_progress import progress_reporter


def settings_for(name: str, training) -> TrainSettings:
    """The settings of sweep entry ``name``: the shared training settings, overridden by the entry."""
    if name not in SAE_SWEEP_SPECS:
        raise PlatformError(f"no SAE named {name!r} in the sweep", f"use one of {', '.join(SAE_SWEEP_SPECS)}")
    return training.settings(**SAE_SWEEP_SPECS[name])


def _settings(run: StageRun) -> TrainSettings:
    return settings_for(run.partition_key, run.resources.training)


def shuffle_name(run: StageRun) -> str:
    """The shuffled store of the sweep entry's hook point (its ``hook_point``; none: the first)."""
    return shuffle_for_hook_point(run.store, run.resources.shuffle.settings().name,
                                  SAE_SWEEP_SPECS.get(run.partition_key, {}).get("hook_point"))


def training_finished(run: StageRun) -> str | None:
    """Why the sweep entry needs no training: a finished checkpoint with these settings on the current
    shuffled store, or one the refresh policy keeps (``settings.retrain_above_fraction``), then
    stale: the reason is logged as a warning and shown as the skip's reason."""
    settings = _settings(run)  # validated first
    found = finished_checkpoint(run.store, shuffle_name(run), run.partition_key, settings)
    if found is None:
        return None
    pointer, unseen = found
    trained = f"a finished checkpoint ({pointer['step']:,} steps, {pointer['tokens']:,} tokens) with these settings"
    if not unseen.tokens:
        return f"{trained} on the current shuffled store"
    run.log.warning(f"{run.partition_key} is kept, {unseen.describe()}: below "
                    f"resources.training.config.retrain_above_fraction = {settings.retrain_above_fraction:g}; "
                    "the feature tables add the new batches")
    return (f"{trained}, kept by the refresh policy ({unseen.describe()}; retrain_above_fraction "
            f"{settings.retrain_above_fraction:g})")


def train_sae(run: StageRun) -> dict:
    """Train (or resume) one sweep entry, export it for SAELens, plot its curves."""
    name, settings = run.partition_key, _settings(run)
    store = run.store
    if settings.world_size > 1:  # torchrun: one rank per device (sae_platform.distributed)
        result = launch_training(store, shuffle_name(run), name, settings,
                                 run.resources.training.device, log=run.log.info)
        device = (f"{settings.world_size} data-parallel ranks" if settings.latent_parallel == 1 else
                  f"{settings.world_size} ranks: {settings.data_parallel} data-parallel x {settings.latent_parallel} "
                  "latent-parallel") + f" ({run.resources.training.device})"
    else:
        device = pick_device(run.resources.training.device, warn=run.log.warning)
        result = trainer.train_sae(store, shuffle_name(run), name, settings, device, log=run.log.info,
                                   on_metrics=progress_reporter(run.log.info))
    metadata = {k: result[k] for k in ("steps", "tokens", "resumed_from_step", "variant", "n_latents")}
    attrs = activation_attrs(store, shuffle_name(run))  # which hook point it reads
    spec = HookEntry.spec_of(attrs)
    metadata["hook_name"] = f"{spec} (transcoder)" if attrs.get("hook_name_in") else str(spec)
    metadata.update({k: float(result[k]) for k in ("final_nmse", "final_l0", "dead_fraction", "tokens_per_second",
                                                   "seconds") if result.get(k) is not None})
    peaks = result.get("peak_memory_bytes_per_rank") or []
    if peaks:  # what sizing a wider run needs: CUDA's peak allocation, else the peak resident set
        metadata["peak_memory_gib_per_rank"] = ", ".join(f"{p / 2**30:.2f}" for p in peaks)
        run.log.info(f"peak memory per rank: {metadata['peak_memory_gib_per_rank']} GiB ({device})")
    metadata["dead_window"] = f"silent for the last {settings.dead_after_tokens:,} training tokens (AuxK's rule)"
    if result["history"]:
        png = training_curves_png(result["history"])
        plot_path = report_path(store, name, "training_curves.png")
        store.write_bytes_atomic(plot_path, png)
        metadata["training_curves"] = inline_png(png, "training curves")
        metadata["training_curves_path"] = MetadataValue.path(store.url(plot_path))
    metadata["path"] = MetadataValue.path(result["path"])
    run.log.info(f"exporting {name} in SAELens' format")
    exported = export_run(store, name)
    metadata["saelens_export"] = MetadataValue.path(exported["path"]) if exported else "n/a (no SAELens equivalent)"
    metadata["device"] = str(device)
    return metadata


# Training and evaluation run together, one run per sweep entry.
TRAIN_JOB = AssetJob("train_saes", "Train and evaluate one SAE of the sweep (partition = sweep entry).")

SAE_CHECKPOINT = Stage(
    asset="sae_checkpoint", group="training", kinds=frozenset({"pytorch", "safetensors"}), job=TRAIN_JOB,
    description="A trained SAE (safetensors + cfg.json, resumable checkpoints, SAELens export), one per sweep entry.",
    partitions=SAE_SWEEP, deps=("shuffled_activations",), resources=("storage", "shuffle", "training"),
    pool="gpu", up_to_date=training_finished, body=train_sae,
    version=pointer_version(lambda run: checkpoint_name(run.partition_key)))


# -- evaluation -----------------------------------------------------------------------------------

def _evaluation_inputs(run: StageRun) -> dict:
    """What this evaluation would be computed from (``evaluate.evaluation_inputs``); the held-out
    text and the base model only when a setting reads them."""
    settings, model = run.resources.evaluation.settings(), run.resources.language_model
    reads_text = bool(settings.ce_contexts or settings.metric_contexts)
    pointer = run.store.pointer(model_name(model.source)) if reads_text else None
    return evaluate.evaluation_inputs(
        run.store, run.partition_key, shuffle_name(run), settings,
        holdout_stamps=run.resources.holdout_text.stamps() if reads_text else {},
        base_model={"version": pointer["version"], "autocast": model.autocast} if pointer else None)


def evaluation_unchanged(run: StageRun) -> str | None:
    if evaluate.evaluation_current(run.store, run.partition_key, _evaluation_inputs(run)):
        return "evaluated from the same checkpoint, shuffled store, held-out text, base model and settings"
    return None


def evaluate_sae(run: StageRun) -> dict:
    settings = run.resources.evaluation.settings()
    name, store = run.partition_key, run.store
    device = pick_device(run.resources.evaluation.device, warn=run.log.warning)
    hooked, tokens, metric_tokens = None, None, None
    if settings.ce_contexts or settings.metric_contexts:
        hooked, _ = run.resources.language_model.load(store, device=str(device))
    if settings.ce_contexts:
        tokens = heldout_contexts(run.resources.holdout_text, hooked, settings.ctx_len, settings.ce_contexts, run.log)
    if settings.metric_contexts:
        metric_tokens = heldout_contexts(run.resources.holdout_text, hooked, settings.ctx_len,
                                         settings.metric_contexts, run.log, setting_name="metric_contexts",
                                         what="the feature metrics")
    run.log.info(f"evaluating {name}: reconstruction on the held-out rows, latent density over every cached row"
                 + (f", downstream CE on {len(tokens)} held-out contexts" if tokens is not None else "")
                 + (f", N2G explanations, probe loss and ablation sparsity on {len(metric_tokens)} held-out "
                    "contexts" if metric_tokens is not None else ""))
    report, density = evaluate.evaluate_sae(store, shuffle_name(run), name, hooked, tokens, device,
                                            metric_tokens=metric_tokens, ablation_tokens=settings.ablation_tokens,
                                            meta_sae_steps=settings.meta_sae_steps,
                                            max_cosine_latents=settings.max_cosine_latents,
                                            inputs=_evaluation_inputs(run), log=run.log.info)
    png = density_histogram_png(density, report["dead_window_tokens"])
    plot_path = report_path(store, name, "latent_density.png")
    store.write_bytes_atomic(plot_path, png)
    run.log.info(f"{name}: fvu {report['fvu']:.4g}, L0 {report['l0']:.1f}, dead {report['dead_fraction']:.1%} "
                 f"(never fired on any of {report['dead_window_tokens']:,} cached tokens)"
                 + (f", loss recovered {report['loss_recovered']:.4g}" if report.get("loss_recovered") else ""))
    if report.get("n2g_precision") is not None:
        figure = lambda key, digits: "n/a" if report.get(key) is None else f"{report[key]:.{digits}f}"  # noqa: E731
        run.log.info(f"{name}: N2G precision {figure('n2g_precision', 3)}, recall {figure('n2g_recall', 3)}; "
                     f"ablation sparsity {figure('ablation_sparsity', 3)}; probe loss {figure('probe_loss', 4)} "
                     f"(neurons {figure('probe_loss_neurons', 4)}, base rate {figure('probe_loss_base_rate', 4)})")
    numbers = {k: v for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    first = [k for k in EVAL_HEADLINE if k in numbers]  # each dead figure beside the window it was measured on
    extra = {}
    probes_path = f"{store.resolve(eval_name(name))}/{EVAL_PROBES}"
    if report.get("probe_loss") is not None and store.fs.exists(probes_path):
        extra["probes"] = table_preview(store.read_json(probes_path), dagster_types(PROBE_SCHEMA))
    return {
        "hook_name": str(report.get("hook_name") or activation_attrs(store, shuffle_name(run))
                         .get("hook_name")),
        **_grouped_figures(report),
        **{k: numbers[k] for k in first}, **{k: v for k, v in numbers.items() if k not in first}, **extra,
        **{key: f"[{low:.4g}, {high:.4g}] (95% bootstrap)" for key, value in report.items()
           if key.endswith("_interval") and isinstance(value, list) for low, high in (value,)},
        "latent_density": inline_png(png, "latent density"),
        "latent_density_path": MetadataValue.path(store.url(plot_path)),
    }


def _grouped_figures(report: dict) -> dict:
    """One Markdown table per metric group (``metric_info.grouped_markdown``: value, unit, which
    way is better, definition, source), first in the metadata so the UI reads like a report; the
    numeric entries after it stay for plots and the comparison."""
    return {group: MetadataValue.md(table) for group, table in grouped_markdown(report).items()}


EVAL_HEADLINE = ("fvu", "nmse", "l0", "dead_fraction", "dead_window_tokens", "n_dead", "heldout_dead_fraction",
                 "heldout_tokens", "loss_recovered", "ce_clean", "ce_sae", "ce_zero", "n2g_precision", "n2g_recall",
                 "ablation_sparsity", "probe_loss", "probe_loss_neurons", "probe_loss_base_rate")


def heldout_contexts(holdout_text, hooked, ctx_len: int, n_contexts: int, log=None, **named):
    """Contexts from text the SAE never saw (the holdout source), packed like the training data."""
    sources = [(f.url, tokenize(hooked.tokenizer, read_documents(f, holdout_text.text_field, holdout_text.encoding,
                                                                 holdout_text.storage_options)))
               for f in holdout_text.files()]
    return heldout_ce_tokens(sources, ctx_len, n_contexts, hooked.start_token_id, log, **named)


def _report(run: StageRun) -> dict:
    path = run.store.require(eval_name(run.partition_key), "the evaluation report", "materialize sae_eval")
    return run.store.read_json(f"{path}/{EVAL_REPORT}")


def threshold(figure: str, setting: str, below: bool, window: str = ""):
    """A check that one figure of the report is on the right side of its threshold setting."""
    def evaluate_threshold(run: StageRun) -> dict:
        report, limit = _report(run), getattr(run.resources.evaluation.settings(), setting)
        value = report.get(figure)
        if value is None:
            return {"passed": True, "metadata": {figure: "not measured", "threshold": limit}}
        passed = value <= limit if below else value >= limit
        return {"passed": passed, "metadata": {figure: value, "threshold": limit,
                                               "rule": f"{figure} {'<=' if below else '>='} {setting}"
                                                       + (f" ({window})" if window else "")}}

    return evaluate_threshold


SAE_EVAL = Stage(
    asset="sae_eval", group="training", kinds=frozenset({"pytorch"}), job=TRAIN_JOB,
    description="Quality of one SAE: normalized MSE, FVU and L0 on held-out rows, dead latents and density on "
                "every cached token, downstream CE loss recovered on held-out text; feature metrics (Gao et al.): "
                "N2G explanation precision/recall, ablation sparsity, 1-D probe loss vs neurons.",
    partitions=SAE_SWEEP, deps=("sae_checkpoint",),
    resources=("storage", "shuffle", "evaluation", "language_model", "holdout_text"),
    up_to_date=evaluation_unchanged, body=evaluate_sae,
    version=pointer_version(lambda run: eval_name(run.partition_key)),
    checks=(  # thresholds are settings of their own: checked again on every skip (they read report.json)
        Check("fvu_below", "FVU on held-out rows <= resources.evaluation.config.max_fvu",
              threshold("fvu", "max_fvu", below=True, window="held-out rows"), recheck_when_skipped=True),
        Check("dead_fraction_below", "share of latents that never fire on any cached token <= max_dead_fraction",
              threshold("dead_fraction", "max_dead_fraction", below=True, window="every cached token"),
              recheck_when_skipped=True),
        Check("loss_recovered_above", "downstream loss recovered >= min_loss_recovered (when measured)",
              threshold("loss_recovered", "min_loss_recovered", below=False, window="held-out text"),
              recheck_when_skipped=True),
    ))



# -- k-sparse probing ----------------------------------------------------------------------------
# Up to date when its committed result was computed from the same checkpoint, shuffled store (so the
# same cached contexts), label sidecars and settings (``sparse_probing.probing_inputs``, recorded in
# its pointer). The labels are read from the text source's sidecars at every run (a few small
# files); a bad sidecar is named in the log and the metadata, and the other tasks run.

ACCURACY_COLUMNS = {key: "float" for key in sparse_probing.ACCURACIES}


def _labels(run: StageRun) -> TextLabels:
    """The inbox's label sidecars; an inbox that cannot be listed leaves only the source tasks."""
    source = run.resources.text_source
    try:
        inbox = source.scan(run.store)
    except (PlatformError, OSError) as error:
        run.log.warning(f"the text source could not be listed, so no label sidecar is read: {error}")
        return TextLabels(problems=[f"the text source could not be listed: {error}"])
    labels = read_text_labels(inbox.files, [(s.url, s.reason) for s in inbox.skipped], source.storage_options)
    for problem in labels.problems:
        run.log.warning(problem)
    return labels


def _inputs(run: StageRun, labels: TextLabels) -> dict:
    return sparse_probing.probing_inputs(run.store, run.partition_key, shuffle_name(run),
                                         run.resources.evaluation.settings(), labels.digests)


def probing_unchanged(run: StageRun) -> str | None:
    if sparse_probing.probing_current(run.store, run.partition_key, _inputs(run, _labels(run))):
        return "probed from the same checkpoint, cached contexts, label sidecars and settings"
    return None


def probe_sae(run: StageRun) -> dict:
    """Sparse probing of one SAE: a table per task and the averages, with the result files' paths."""
    store, name = run.store, run.partition_key
    labels = _labels(run)
    device = pick_device(run.resources.evaluation.device, warn=run.log.warning)
    result = sparse_probing.probe_sae(store, name, run.resources.evaluation.settings(), labels, device,
                                      inputs=_inputs(run, labels), log=run.log.info)
    folder = store.resolve(sparse_probing_name(name))
    skipped = table_preview(result["skipped"], {"task": "string", "reason": "string"})
    if result["no_score"]:
        run.log.warning(f"{name}: no sparse-probing score: {result['no_score']}")
        return {"hook_name": result["hook_name"], "no_score": result["no_score"], "skipped": skipped,
                "result": MetadataValue.path(store.url(f"{folder}/{SPARSE_PROBING_RESULT}"))}
    averages = result["averages"]["all"]
    run.log.info(f"{name}: {averages['n_tasks']} tasks, SAE top-1 {averages['sae_top_1_test_accuracy']:.3f} "
                 f"(residual top-1 {averages['llm_top_1_test_accuracy']:.3f}); {len(result['skipped'])} skipped")
    return {
        "hook_name": result["hook_name"],
        "averages": MetadataValue.md(averages_markdown(result["averages"])),
        "tasks": table_preview([{"task": t["task"], "kind": t["kind"], "n_test": t["n_test"],
                                 **{k: t[k] for k in ACCURACY_COLUMNS}} for t in result["tasks"]],
                               {"task": "string", "kind": "string", "n_test": "int", **ACCURACY_COLUMNS}),
        "skipped": skipped,
        "label_problems": MetadataValue.md("\n".join(f"- {p}" for p in result["label_problems"]) or "none"),
        **averages,
        **{f"seconds_{step}": seconds for step, seconds in result["seconds"].items()},
        "result": MetadataValue.path(store.url(f"{folder}/{SPARSE_PROBING_RESULT}")),
        "saebench_result": MetadataValue.path(store.url(f"{folder}/{SAEBENCH_SPARSE_PROBING}")),
    }


def averages_markdown(averages: dict) -> str:
    """The averages as a Markdown table: one row per group of tasks, residual and SAE side by side."""
    ks = sparse_probing.K_VALUES
    head = ("| tasks | n | " + " | ".join(f"residual top-{k}" for k in ks) + " | residual all | "
            + " | ".join(f"SAE top-{k}" for k in ks) + " | SAE all |")
    lines = [head, "|" + "---|" * (2 * len(ks) + 4)]
    for kind, row in averages.items():
        cells = [row[f"llm_top_{k}_test_accuracy"] for k in ks] + [row["llm_test_accuracy"]]
        cells += [row[f"sae_top_{k}_test_accuracy"] for k in ks] + [row["sae_test_accuracy"]]
        lines.append(f"| {kind} | {row['n_tasks']} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


SAE_SPARSE_PROBING = Stage(
    asset="sae_sparse_probing", group="training", kinds=frozenset({"pytorch"}), job=TRAIN_JOB,
    description="k-sparse probing (SAEBench): logistic probes on the top 1, 2, 5 and all mean-pooled latents per "
                "context against the same probes on the raw activations at the hook point, on binary tasks from "
                "the corpus (which text a context comes from; labels declared in <text>.labels.json sidecars).",
    partitions=SAE_SWEEP, deps=("sae_checkpoint",), resources=("storage", "shuffle", "evaluation", "text_source"),
    up_to_date=probing_unchanged, body=probe_sae,
    version=pointer_version(lambda run: sparse_probing_name(run.partition_key)))


# -- the sweep side by side -----------------------------------------------------------------------

def _error_bars(run: StageRun, rows: list[dict]) -> tuple[str, dict]:
    """The comparison's error-bar section (``compare.reseeds_html``) and its metadata table: mean ±
    sd over each reseed group, bootstrap intervals of lone seeds, "not distinguishable" marks, and
    the cross-seed decoder consistency of each group with >= 2 trained seeds."""
    units = sweep_units(rows, SAE_RESEED_GROUPS, SPREAD_KEYS)
    marks = not_distinguishable(units, SPREAD_KEYS)
    consistency = {u.sae: found for u in units if len(u.members) > 1
                   if (found := seed_consistency(run.store, list(u.members))) is not None}
    for group, found in consistency.items():
        run.log.info(f"{group}: {found['consistent_fraction']:.1%} of latents have a partner at cosine >= "
                     f"{found['threshold']:g} in another seed ({found['method']} matching)")
    metadata = {"error_bars": table_preview(reseeds_table(units, marks), RESEEDS_TABLE_COLUMNS)}
    metadata.update({f"seed_consistency/{group}": found["consistent_fraction"] for group, found in consistency.items()})
    return reseeds_html(units, marks, consistency), metadata


def compare_saes(run: StageRun) -> dict:
    """Every evaluated SAE of the sweep on every figure: a metadata table and one HTML page, with
    error bars (mean ± sd over reseeds, "not distinguishable" marks)."""
    store = run.store
    rows = comparison_rows(store, list(SAE_SWEEP_SPECS))
    error_bars, error_metadata = _error_bars(run, rows)
    points, fit, refusal = sweep_scaling_fit(run, rows)
    plot = inline_png_url(scaling_laws_png(points, fit)) if fit else None
    page = report_path(store, None, SWEEP_COMPARISON)
    sections = (error_bars, scaling_html(fit, plot, refusal))
    store.write_bytes_atomic(page, comparison_html(rows, sections=sections).encode())
    run.log.info(f"{len(rows)} of {len(SAE_SWEEP_SPECS)} sweep entries evaluated")
    kinds = {key: "int" if key in ("checkpoint_step", "training_tokens") else "float" for key, _, _ in COLUMNS}
    scored = ground_truth_rows(rows)  # SAEs of synthetic activations: their figures against the known features
    truth = {"ground_truth": table_preview(scored, {"sae": "string", "hook_point": "string",
                                                    **dict.fromkeys(GROUND_TRUTH_KEYS, "float")})} if scored else {}
    columns = {"sae": "string", "hook_point": "string", **kinds}
    scaling = ({"scaling_exponents": table_preview(scaling_summary(fit), SUMMARY_COLUMNS)} if fit
               else {"scaling_laws": f"not fitted: {refusal}"})
    refused = {f"absorption_refused/{r['sae']}": r["absorption_refusal"] for r in rows if r["absorption_refusal"]}
    return {"evaluated": len(rows), "sweep_entries": len(SAE_SWEEP_SPECS),
            "comparison": table_preview([{k: r[k] for k in columns} for r in rows], columns), **error_metadata, **truth,
            **refused,
            **scaling,
            "page": MetadataValue.path(store.url(page)),
            "page_in_browser": MetadataValue.url(BROWSER_URL + reports_url_path(SWEEP_COMPARISON))}


def comparison_version(run: StageRun) -> str:
    """The data version of the comparison: the figures it puts side by side (``compare.figures_version``
    of every sweep entry's committed sae_eval, sae_sparse_probing and sae_absorption), so Dagster sees
    it fresh after any job built it."""
    return figures_version(run.store, list(SAE_SWEEP_SPECS))


def evaluations_version(run: StageRun) -> str:
    """The data version of the scaling-law fit: every sweep entry's committed sae_eval version, all
    it reads (full_pipeline runs it before the sparse probing ends)."""
    return figures_version(run.store, list(SAE_SWEEP_SPECS), (eval_name,))


# The sweep's figures side by side and its scaling laws, both from every evaluation.
COMPARE_JOB = AssetJob("compare_sweep", "Every evaluated SAE of the sweep side by side on every evaluation figure, "
                                        "with error bars, and the sweep's scaling laws.")

SAE_COMPARISON = Stage(
    asset="sae_comparison", group="training", kinds=frozenset({"html"}), job=COMPARE_JOB,
    resources=("storage", "training"),
    description="Every evaluated SAE of the sweep side by side on every figure of sae_eval (FVU, L0, dead, loss "
                "recovered, N2G precision/recall, ablation sparsity, probe loss vs neurons, SAEBench's core "
                "figures), sparse probing's accuracy per k and absorption (or its refusal): a table and one page.",
    deps=(AssetDep("sae_eval", partition_mapping=AllPartitionMapping()),
          AssetDep("sae_sparse_probing", partition_mapping=AllPartitionMapping()),
          AssetDep("sae_absorption", partition_mapping=AllPartitionMapping())), body=compare_saes,
    version=comparison_version)


# -- Gao et al.'s scaling laws from the sweep (sae_platform.scaling) ----------------------------------

def sweep_scaling_fit(run: StageRun, rows: list[dict]) -> tuple[list[ScalingPoint], dict | None, str | None]:
    """The evaluated TopK SAEs of the sweep as points (n_latents and k from each entry's settings,
    the loss its held-out FVU), their fit (``scaling.fit_scaling_laws``), or why it was refused."""
    points = []
    for row in rows:
        settings = settings_for(row["sae"], run.resources.training)
        if settings.variant == SCALING_VARIANT and row["fvu"] is not None:
            points.append(ScalingPoint(row["sae"], settings.n_latents, settings.k, row["fvu"]))
    try:
        return points, fit_scaling_laws(points), None
    except ScalingRefused as refused:
        return points, None, str(refused)


def fit_scaling_laws_of_sweep(run: StageRun) -> dict:
    """Gao's L(N) at each k and joint L(N, k) from the sweep's evaluations: the fits, exponents with
    95% intervals and residuals (``reports/scaling_laws.json``) and the log-log plot. A sweep too
    small for a fit is refused: nothing is written, and the metadata and a warning say what the
    sweep has and what it needs (so full_pipeline on a small sweep stays green)."""
    store = run.store
    points, fit, refusal = sweep_scaling_fit(run, comparison_rows(store, list(SAE_SWEEP_SPECS)))
    if fit is None:
        run.log.warning(f"scaling laws not fitted: {refusal}")
        return {"fitted": False, "refused": refusal, "points": len(points)}
    png = scaling_laws_png(points, fit)
    plot_path = report_path(store, None, SCALING_LAWS_PLOT)
    store.write_bytes_atomic(plot_path, png)
    fit_path = report_path(store, None, SCALING_LAWS)
    store.write_bytes_atomic(fit_path, json.dumps({**fit, "points": [vars(p) for p in points]}, indent=1).encode())
    for line in fit["not_fitted"]:
        run.log.warning(f"not fitted: {line}")
    residuals = fit["joint"]["residuals"] if fit["joint"] else [r for one in fit["fixed_k"] for r in one["residuals"]]
    return {"fitted": True, "points": len(points), "exponents": table_preview(scaling_summary(fit), SUMMARY_COLUMNS),
            "residuals": table_preview(residuals, {"sae": "string", "n_latents": "int", "k": "int", "loss": "float",
                                                   "fitted": "float", "log_residual": "float"}),
            "plot": inline_png(png, "scaling laws"), "plot_path": MetadataValue.path(store.url(plot_path)),
            "fit_path": MetadataValue.path(store.url(fit_path))}


SCALING_LAWS_STAGE = Stage(
    asset="scaling_laws", group="training", kinds=frozenset({"scipy"}), job=COMPARE_JOB,
    resources=("storage", "training"),
    description="Gao et al. 2024's scaling laws fitted to the sweep's TopK evaluations: normalized MSE against "
                "n_latents at each k (L(N) = c N^a + e) and the joint L(N, k) form, exponents with 95% intervals, "
                "residuals and the log-log plot; refused (nothing written) for fewer than 4 widths at one k.",
    deps=(AssetDep("sae_eval", partition_mapping=AllPartitionMapping()),), body=fit_scaling_laws_of_sweep,
    version=evaluations_version)

STAGES = [SAE_CHECKPOINT, SAE_EVAL, SAE_SPARSE_PROBING]  # one partition per sweep entry
SWEEP_STAGES = [SAE_COMPARISON, SCALING_LAWS_STAGE]  # the whole sweep: after every per-SAE figure (absorption too)

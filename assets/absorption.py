"""Feature absorption (SAEBench's first-letter task, ``sae_platform.absorption``), one partition per
sweep entry, downstream of ``sae_checkpoint``.

``sae_absorption`` is up to date when its committed result was computed from the same checkpoint,
stored base model and settings (recorded in its pointer). A result with fewer than
``min_feats_for_eval`` letters the ground-truth probe can read is a plain refusal: the asset
materializes, says why, and shows no score.
"""

from dagster import MetadataValue

from assets.metadata import inline_png, table_preview
from assets.partitions import SAE_SWEEP
from assets.stage import AssetJob, Stage, StageRun, pointer_version
from sae_platform import absorption
from sae_platform.catalog import (
    ABSORPTION_CHART,
    ABSORPTION_REPORT,
    SAEBENCH_ABSORPTION,
    absorption_name,
    model_name,
    report_path,
)
from sae_platform.model import pick_device
from sae_platform.plots import absorption_png

LETTER_COLUMNS = {"first_letter": "string", "mean_absorption_fraction": "float", "full_absorption_rate": "float",
                  "num_full_absorption": "int", "num_probe_true_positives": "int", "num_split_features": "int",
                  "probe_f1": "float"}


def _inputs(run: StageRun) -> dict:
    """What this measurement would be computed from (``absorption.absorption_inputs``)."""
    model = run.resources.language_model
    pointer = run.store.pointer(model_name(model.source))
    base = {"version": pointer["version"], "autocast": model.autocast} if pointer else None
    return absorption.absorption_inputs(run.store, run.partition_key, run.resources.absorption.settings(), base)


def absorption_unchanged(run: StageRun) -> str | None:
    if absorption.absorption_current(run.store, run.partition_key, _inputs(run)):
        return "measured from the same checkpoint, base model and settings"
    return None


def measure_absorption(run: StageRun) -> dict:
    """Measure and commit one sweep entry's absorption; its figures, or its refusal, as metadata."""
    settings, store, name = run.resources.absorption.settings(), run.store, run.partition_key
    device = pick_device(run.resources.absorption.device, warn=run.log.warning)
    # synthetic activations: no model to prompt (and none is loaded or stored); a committed refusal
    hooked = (run.resources.language_model.load(store, device=str(device))[0]
              if absorption.reads_a_language_model(store, name) else None)
    result = absorption.absorb_checkpoint(store, name, hooked, settings, device,
                                          model_name=run.resources.language_model.source, inputs=_inputs(run),
                                          log=run.log.info)
    folder = store.resolve(absorption_name(name))
    metadata = {**_chart(store, name, result), "hook_name": result["hook_name"], "scored": result["scored"],
                "letters_counted": len(result["letters_counted"]), "test_words": result["n_test_words"],
                "train_words": result["n_train_words"], "vocabulary": result["n_vocabulary"],
                "seconds": result["seconds"], "result": MetadataValue.path(store.url(f"{folder}/{ABSORPTION_REPORT}"))}
    if not result["scored"]:
        run.log.warning(f"{name}: {result['refusal']}")
        return {"refusal": result["refusal"], **metadata,
                "probe_f1": MetadataValue.json(result["probe_f1"])}
    run.log.info(f"{name}: mean absorption fraction {result['metrics']['mean_absorption_fraction_score']:.4f}, "
                 f"full absorption {result['metrics']['mean_full_absorption_score']:.4f} over "
                 f"{len(result['letters'])} letters")
    return {**result["metrics"], **metadata,
            "letters": table_preview([{k: r[k] for k in LETTER_COLUMNS} for r in result["letters"]], LETTER_COLUMNS),
            "saebench_result": MetadataValue.path(store.url(f"{folder}/{SAEBENCH_ABSORPTION}"))}


def _chart(store, name: str, result: dict) -> dict:
    """The per-letter bar chart (``plots.absorption_png``: the scores when scored, the probe's F1 per
    letter when refused for too few letters), stored beside the SAE's other plots and inlined."""
    png = absorption_png(result)
    if png is None:
        return {}
    plot_path = report_path(store, name, ABSORPTION_CHART)
    store.write_bytes_atomic(plot_path, png)
    return {"absorption_by_letter": inline_png(png, "absorption per letter"),
            "absorption_by_letter_path": MetadataValue.path(store.url(plot_path))}


SAE_ABSORPTION = Stage(
    asset="sae_absorption", group="training", kinds=frozenset({"pytorch"}),
    job=AssetJob("absorption_eval", "Feature absorption (SAEBench's first-letter task) of one SAE of the sweep."),
    description="Feature absorption of one SAE (SAEBench 0.6.0; Chanin et al. 2024, \"A is for Absorption\"): "
                "mean absorption fraction, full-absorption rate and split features per first letter, at the "
                "SAE's own hook point; SAEBench's result file beside ours. Fewer than min_feats_for_eval letters "
                "readable by the ground-truth probe: a plain refusal, no score.",
    partitions=SAE_SWEEP, deps=("sae_checkpoint",), resources=("storage", "absorption", "language_model"),
    up_to_date=absorption_unchanged, body=measure_absorption,
    version=pointer_version(lambda run: absorption_name(run.partition_key)))

STAGES = [SAE_ABSORPTION]

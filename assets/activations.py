"""Base model and cached activations: the first two links of the lineage."""

import time

from dagster import MetadataValue

from assets.partitions import ACTIVATION_BATCHES
from assets.stage import AssetJob, Stage, StageRun, pointer_version
from sae_platform.activations import cache_text_file
from sae_platform.catalog import model_name, partition_name, synthetic_truth_name
from sae_platform.errors import SourceError
from sae_platform.freshness import changed_sources
from sae_platform.model import store_base_model
from sae_platform.synthetic import model_source as synthetic_source
from sae_platform.synthetic import write_partition

# -- base_model -----------------------------------------------------------------------------------

def _model_name(run: StageRun) -> str:
    return model_name(run.resources.language_model.source)


def base_model_stored(run: StageRun) -> str | None:
    if run.resources.synthetic.settings().enabled:
        return "the activations are synthetic (resources.synthetic.config): no base model is read"
    if run.store.resolve(_model_name(run)) is not None:
        return f"{run.resources.language_model.source} is already stored"
    return None


def convert_base_model(run: StageRun) -> dict:
    started = time.perf_counter()
    info = store_base_model(run.store, run.resources.language_model.source)
    run.log.info(f"stored {info['source']} ({info['n_params']:,} parameters) at {info['path']}")
    return {
        **{k: info[k] for k in ("source", "architecture", "n_layers", "d_model", "vocab_size", "n_params")},
        "path": MetadataValue.path(info["path"]), "bytes": info["bytes"],
        "seconds": time.perf_counter() - started,
    }


BASE_MODEL = Stage(
    asset="base_model", group="activations", kinds=frozenset({"pytorch", "safetensors"}),
    description="The base LM converted once to fp32 safetensors, so every later load takes under a second.",
    resources=("storage", "language_model", "synthetic"),
    job=AssetJob("prepare_base_model", "Convert the base model once to safetensors and store it as an artifact."),
    up_to_date=base_model_stored, body=convert_base_model, version=pointer_version(_model_name))


# -- activations ----------------------------------------------------------------------------------

def _batch_name(run: StageRun) -> str:
    return partition_name(run.partition_key)


def batch_cached(run: StageRun) -> str | None:
    """A batch is current when it is stored and its file was not replaced since (unless recache)."""
    settings = run.resources.caching.settings()
    pointer = run.store.pointer(_batch_name(run))
    if settings.recache or pointer is None:
        return None
    synthetic = run.resources.synthetic.settings()
    if synthetic.enabled:
        if pointer.get("fingerprint", {}).get("model") != synthetic_source(synthetic):
            run.log.info(f"{run.partition_key} was drawn with other synthetic settings: drawing it again")
            return None
        return "already drawn with these synthetic settings (resources.caching.config.recache forces it)"
    text_source = run.resources.text_source
    if changed_sources(run.store, text_source.stamps([text_source.file(run.partition_key, run.store)])):
        run.log.info(f"the file of {run.partition_key} was replaced since it was cached: caching it again")
        return None
    return "already cached, and its file is unchanged (resources.caching.config.recache forces it)"


def cache_batch(run: StageRun) -> dict:
    settings = run.resources.caching.settings()  # validated before anything is read or written
    synthetic = run.resources.synthetic.settings()
    if synthetic.enabled:
        return draw_batch(run, settings, synthetic)
    key, store, text_source = run.partition_key, run.store, run.resources.text_source
    text_file = text_source.file(key, store)  # the duplicate check prefers files already cached
    model, converted = run.resources.language_model.load(store)
    if converted:
        run.log.info("base model was not stored yet: converted it now (materialize base_model to track it)")
    hooks = ", ".join(settings.hook_points) or model.hook_name
    run.log.info(f"caching {text_file.url} at {hooks} (one forward pass) on {model.device}")
    summary = cache_text_file(store, text_file, model, run.resources.language_model.source, settings,
                              text_source.text_field, text_source.encoding, text_source.storage_options,
                              progress=progress_logger(run.log, "contexts"))
    run.log.info(f"{summary['n_rows']:,} rows at {summary['tokens_per_second']:.0f} tokens/s")
    return {
        "source": MetadataValue.path(text_file.url),
        "path": MetadataValue.path(store.url(store.resolve(partition_name(key)))),
        "dagster/row_count": summary["n_rows"],
        **{k: summary[k] for k in ("n_contexts", "n_documents", "bytes", "dtype", "d_model", "hook_name",
                                   "tokens_per_second", "norm_mean", "norm_std", "norm_max",
                                   "excluded_start_tokens", "excluded_sink_rows", "dropped_tokens")},
        "hook_points": MetadataValue.json(summary["stores"]),
    }


def draw_batch(run: StageRun, settings, synthetic) -> dict:
    """Partition ``synthetic-<i>`` drawn by the synthetic generator instead of cached from text."""
    key, store = run.partition_key, run.store
    run.log.info(f"drawing {key}: {synthetic.contexts_per_partition} contexts of {settings.ctx_len} rows from "
                 f"{synthetic.n_features:,} known features in {synthetic.d_model} dimensions (truth "
                 f"{synthetic.truth_id()})")
    summary = write_partition(store, key, synthetic, settings, progress=progress_logger(run.log, "contexts"))
    return {
        "source": synthetic_source(synthetic),
        "truth": MetadataValue.path(store.url(store.resolve(synthetic_truth_name(synthetic.truth_id())))),
        "path": MetadataValue.path(store.url(store.resolve(partition_name(key)))),
        "dagster/row_count": summary["n_rows"],
        **{k: summary[k] for k in ("n_contexts", "bytes", "dtype", "d_model", "hook_name", "tokens_per_second",
                                   "norm_mean", "norm_std", "norm_max")},
    }


def progress_logger(log, unit: str):
    """Log every ~10% so a long step shows life in the Dagster UI."""
    last = {"tenth": -1}

    def report(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > last["tenth"]:
            last["tenth"] = tenth
            log.info(f"{done:,}/{total:,} {unit} ({100 * done // max(total, 1)}%)")

    return report


ACTIVATIONS = Stage(
    asset="activations", group="activations", kinds=frozenset({"pytorch", "zarr"}),
    description="Residual-stream activations of one batch of text, one row per token (start tokens excluded); "
                "with resources.synthetic.config.n_features set, rows drawn from known features instead.",
    partitions=ACTIVATION_BATCHES, deps=("base_model",),
    job=AssetJob("cache_activations", "Cache the hook-layer activations of one batch of text (one partition)."),
    resources=("storage", "language_model", "text_source", "caching", "synthetic"),
    up_to_date=batch_cached, body=cache_batch, version=pointer_version(_batch_name),
    partition_errors=(SourceError,))  # recorded by cache_text_file (inbox.record_failed_attempt)

STAGES = [BASE_MODEL, ACTIVATIONS]

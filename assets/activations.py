"""Base model and cached activations: the first two links of the lineage."""

import time

from dagster import (
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.partitions import ACTIVATION_BATCHES
from resources import BaseModelResource, StorageResource, TextSourceResource
from sae_platform.activations import CacheSettings, cache_text_file
from sae_platform.model import store_base_model


@asset(group_name="activations", kinds={"pytorch", "safetensors"})
def base_model(context: AssetExecutionContext, storage: StorageResource,
               language_model: BaseModelResource) -> MaterializeResult:
    """The base LM converted once to fp32 safetensors, so every later load takes under a second."""
    return MaterializeResult(metadata=convert_base_model(context.log, storage, language_model))


def convert_base_model(log, storage: StorageResource, language_model: BaseModelResource) -> dict:
    """The body of `base_model`, shared with the full_pipeline job (which logs the same materialization)."""
    started = time.perf_counter()
    info = store_base_model(storage.store(), language_model.source)
    log.info(f"stored {info['source']} ({info['n_params']:,} parameters) at {info['path']}")
    return {
        **{k: info[k] for k in ("source", "architecture", "n_layers", "d_model", "vocab_size", "n_params")},
        "path": MetadataValue.path(info["path"]), "bytes": info["bytes"],
        "seconds": round(time.perf_counter() - started, 2),
    }


class ActivationsConfig(Config):
    ctx_len: int = Field(default=128, description="tokens per context, start token included")
    batch_size: int = Field(default=16, description="contexts per forward pass")
    dtype: str = Field(default="float16", description="stored dtype: float16 (default) or float32")
    max_contexts: int | None = Field(default=None, description="cap per batch (demo/CI); default: all")
    sink_norm_factor: float = Field(default=10.0, description="drop rows with norm > factor x median; 0: keep")


@asset(partitions_def=ACTIVATION_BATCHES, deps=[base_model], group_name="activations", kinds={"pytorch", "zarr"})
def activations(context: AssetExecutionContext, config: ActivationsConfig, storage: StorageResource,
                language_model: BaseModelResource, text_source: TextSourceResource) -> MaterializeResult:
    """Residual-stream activations of one batch of text, one row per token (start tokens excluded)."""
    return MaterializeResult(metadata=cache_batch(context.log, config, storage, language_model, text_source,
                                                  context.partition_key))


def cache_batch(log, config: ActivationsConfig, storage: StorageResource, language_model: BaseModelResource,
                text_source: TextSourceResource, key: str) -> dict:
    """The body of `activations` for batch ``key``, shared with the full_pipeline job."""
    store = storage.store()
    text_file = text_source.file(key, store)
    model, converted = language_model.load(store)
    if converted:
        log.info("base model was not stored yet: converted it now (materialize base_model to track it)")
    log.info(f"caching {text_file.url} at {model.hook_name} on {model.device}")
    settings = CacheSettings(config.ctx_len, config.batch_size, config.dtype, config.sink_norm_factor)
    summary = cache_text_file(store, text_file, model, language_model.source, settings, text_source.text_field,
                              text_source.encoding, text_source.storage_options, config.max_contexts,
                              progress=_progress_logger(log))
    log.info(f"{summary['n_rows']:,} rows at {summary['tokens_per_second']:.0f} tokens/s")
    return {
        "source": MetadataValue.path(text_file.url),
        "path": MetadataValue.path(store.url(store.resolve(f"activations/{key}"))),
        "n_tokens": summary["n_rows"], "n_contexts": summary["n_contexts"], "n_documents": summary["n_documents"],
        "bytes": summary["bytes"], "dtype": summary["dtype"], "d_model": summary["d_model"],
        "hook_name": summary["hook_name"], "tokens_per_second": round(summary["tokens_per_second"], 1),
        "norm_mean": round(summary["norm_mean"], 3), "norm_std": round(summary["norm_std"], 3),
        "norm_max": round(summary["norm_max"], 3), "excluded_start_tokens": summary["excluded_start_tokens"],
        "excluded_sink_rows": summary["excluded_sink_rows"], "dropped_tokens": summary["dropped_tokens"],
    }


def _progress_logger(log):
    """Log every ~10% so a long partition shows life in the Dagster UI."""
    last = {"tenth": -1}

    def report(done: int, total: int) -> None:
        tenth = 10 * done // total
        if tenth > last["tenth"]:
            last["tenth"] = tenth
            log.info(f"{done}/{total} contexts ({100 * done // total}%)")

    return report

"""SAE training: an op (runs in the `gpu` pool) wrapped as the `sae_checkpoint` asset, one partition per SAE.

The op also runs in the plain `train_sae_job` (pick the SAE with `sae_name`), while the asset keeps
the lineage shuffled_activations → sae_checkpoint → sae_eval.
"""

import base64

from dagster import (
    AssetExecutionContext,
    AssetIn,
    Config,
    In,
    MaterializeResult,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Out,
    asset,
    graph_asset,
    job,
    op,
)
from pydantic import Field

from assets.partitions import SAE_SWEEP, SAE_SWEEP_SPECS
from resources import BaseModelResource, ShuffleResource, StorageResource, TextSourceResource
from sae_platform.corpus import read_documents, tokenize
from sae_platform.errors import PlatformError
from sae_platform.evaluate import evaluate_sae, heldout_ce_tokens
from sae_platform.export import export_run
from sae_platform.model import pick_device
from sae_platform.plots import density_histogram_png, training_curves_png
from sae_platform.trainer import TrainSettings, train_sae


class TrainConfig(Config):
    """Training settings shared by every SAE of the sweep (a sweep entry may override any of them)."""

    token_budget: int = Field(default=1_000_000, description="training tokens (loops over epochs if larger than the data)")
    batch_size: int = Field(default=4096, description="rows per step")
    lr: float | None = Field(default=None, description="default: 2e-4 * sqrt(16384 / n_latents) (Gao et al.)")
    seed: int = Field(default=0, description="init seed; same seed + same data = same weights")
    checkpoint_every_tokens: int = Field(default=250_000, description="commit a resumable checkpoint this often")
    dead_after_tokens: int = Field(default=10_000_000, description="a latent silent this long is dead (AuxK)")
    holdout_rows: int = Field(default=8192, description="last rows of the shuffled store, kept for evaluation")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, …")
    sae_name: str | None = Field(default=None, description="sweep entry, for the plain job (assets use the partition)")


def settings_for(name: str, config: TrainConfig) -> TrainSettings:
    if name not in SAE_SWEEP_SPECS:
        raise PlatformError(f"no SAE named {name!r} in the sweep", f"use one of {', '.join(SAE_SWEEP_SPECS)}")
    shared = config.model_dump(exclude={"device", "sae_name"})
    return TrainSettings(**{**shared, **SAE_SWEEP_SPECS[name]})


@op(ins={"shuffled": In(Nothing)}, out=Out(Nothing), pool="gpu",
    description="Train one SAE of the sweep on the shuffled store; resumes from its last checkpoint.")
def train_sae_op(context: OpExecutionContext, config: TrainConfig, storage: StorageResource,
                 shuffle: ShuffleResource) -> None:
    name = context.partition_key if context.has_partition_key else config.sae_name
    if name is None:
        raise PlatformError("no SAE chosen: the plain job needs sae_name", "set ops.train_sae_op.config.sae_name")
    context.add_output_metadata(train_and_export(context.log, config, storage, shuffle, name))


def train_and_export(log, config: TrainConfig, storage: StorageResource, shuffle: ShuffleResource, name: str) -> dict:
    """Train (or resume, or find finished) one sweep entry, export it for SAELens, plot its curves."""
    settings = settings_for(name, config)
    device = pick_device(config.device)
    n_steps = max(1, settings.token_budget // settings.batch_size)
    logged = {"tenth": 0}

    def report(row: dict) -> None:  # ~10 progress lines per run in the Dagster log
        tenth = 10 * row["step"] // n_steps
        if tenth > logged["tenth"]:
            logged["tenth"] = tenth
            log.info(f"step {row['step']}/{n_steps}: {row['tokens']:,} tokens, nmse {row['nmse']:.4f}, "
                     f"L0 {row['l0']:.1f}, dead {row['dead_fraction']:.3f}, {row['tokens_per_second']:.0f} tok/s")

    store = storage.store()
    result = train_sae(store, shuffle.name, name, settings, device, log=log.info, on_metrics=report)
    metadata = {k: result[k] for k in ("steps", "tokens", "resumed_from_step", "variant", "n_latents")}
    metadata.update({k: float(result[k]) for k in ("final_nmse", "final_l0", "dead_fraction", "tokens_per_second",
                                                   "seconds") if result.get(k) is not None and result[k] == result[k]})
    metadata["path"] = MetadataValue.path(result["path"])
    exported = export_run(store, name)
    metadata["saelens_export"] = MetadataValue.path(exported["path"]) if exported else "n/a (no SAELens equivalent)"
    metadata["device"] = str(device)
    if result["history"]:
        png = training_curves_png(result["history"])
        plot_path = store.path("reports", name, "training_curves.png")
        store.write_bytes_atomic(plot_path, png)
        metadata["training_curves"] = MetadataValue.md(_inline_png(png, "training curves"))
        metadata["training_curves_path"] = MetadataValue.path(store.url(plot_path))
    return metadata


def _inline_png(png: bytes, title: str) -> str:
    """Markdown metadata that shows the picture in the Dagster UI itself."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"


@graph_asset(partitions_def=SAE_SWEEP, ins={"shuffled_activations": AssetIn(dagster_type=Nothing)},
             group_name="training", kinds={"pytorch", "safetensors"},
             description="A trained SAE (safetensors + cfg.json, resumable checkpoints), one per sweep entry.")
def sae_checkpoint(shuffled_activations):
    return train_sae_op(shuffled_activations)


@job(description="Train one SAE of the sweep outside the asset graph (set ops.train_sae_op.config.sae_name).")
def train_sae_job():
    train_sae_op()


class EvalConfig(Config):
    ce_contexts: int = Field(default=32, description="held-out contexts for the downstream CE (0 skips it)")
    ctx_len: int = Field(default=128, description="tokens per held-out context")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, …")


@asset(partitions_def=SAE_SWEEP, deps=[sae_checkpoint], group_name="training", kinds={"pytorch"})
def sae_eval(context: AssetExecutionContext, config: EvalConfig, storage: StorageResource, shuffle: ShuffleResource,
             language_model: BaseModelResource, holdout_text: TextSourceResource) -> MaterializeResult:
    """Held-out quality of one SAE: normalized MSE, FVU, L0, dead fraction, density histogram, CE loss recovered."""
    return MaterializeResult(metadata=evaluate(context.log, config, storage, shuffle, language_model, holdout_text,
                                               context.partition_key))


def evaluate(log, config: EvalConfig, storage: StorageResource, shuffle: ShuffleResource,
             language_model: BaseModelResource, holdout_text: TextSourceResource, name: str) -> dict:
    store = storage.store()
    device = pick_device(config.device)
    hooked, tokens = None, None
    if config.ce_contexts:
        hooked, _ = language_model.load(store, device=str(device))
        tokens = heldout_contexts(holdout_text, hooked, config.ctx_len, config.ce_contexts, log)
    report, density = evaluate_sae(store, shuffle.name, name, hooked, tokens, device)
    png = density_histogram_png(density, report["n_tokens"])
    plot_path = store.path("reports", name, "latent_density.png")
    store.write_bytes_atomic(plot_path, png)
    log.info(", ".join(f"{k} {report[k]:.4g}" for k in ("nmse", "fvu", "l0", "dead_fraction",
                                                          "loss_recovered") if report.get(k) is not None))
    return {
        **{k: v for k, v in report.items() if isinstance(v, int | float) and v is not None},
        "latent_density": MetadataValue.md(_inline_png(png, "latent density")),
        "latent_density_path": MetadataValue.path(store.url(plot_path)),
    }


def heldout_contexts(holdout_text: TextSourceResource, hooked, ctx_len: int, n_contexts: int, log=None):
    """Contexts from text the SAE never saw (the holdout source), packed like the training data."""
    sources = [(f.url, tokenize(hooked.tokenizer, read_documents(f, holdout_text.text_field, holdout_text.encoding,
                                                                 holdout_text.storage_options)))
               for f in holdout_text.files()]
    return heldout_ce_tokens(sources, ctx_len, n_contexts, hooked.start_token_id, log)

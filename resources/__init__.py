"""Dagster resources: configuration that says *where* (storage root, model, text source)."""

import os
from pathlib import Path

import yaml

from dagster import ConfigurableResource
from pydantic import Field

from sae_platform.corpus import TextFile, list_source, source_stamp
from sae_platform.errors import SourceError
from sae_platform.inbox import Inbox, scan_inbox
from sae_platform.model import EMBEDDED_MODEL, ensure_base_model, load_hooked_model
from sae_platform.storage import ArtifactStore


def _s3_options(endpoint_url: str | None) -> dict:
    # Credentials come from the standard AWS environment/config chain (as dagster-aws does).
    return {"endpoint_url": endpoint_url} if endpoint_url else {}


class StorageResource(ConfigurableResource):
    """The artifact root: a local folder (default) or ``s3://bucket/prefix``."""

    root_url: str = Field(description="fsspec URL of the artifact root, e.g. /data/sae or s3://bucket/sae")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto, …)")
    create_bucket: bool = Field(default=False, description="create a missing S3 bucket (default: fail with "
                                                           "'bucket does not exist'; SAE_PLATFORM_CREATE_BUCKET=1 too)")

    def store(self) -> ArtifactStore:
        url = self.root_url if "://" in self.root_url else os.path.abspath(self.root_url)
        return ArtifactStore(url, _s3_options(self.endpoint_url) if url.startswith("s3://") else {},
                             create_bucket=self.create_bucket or None)


class BaseModelResource(ConfigurableResource):
    """The language model whose residual stream we cache, and where to read it."""

    source: str = Field(default=EMBEDDED_MODEL,
                        description=f"{EMBEDDED_MODEL!r} (embedded, offline), a local HF model dir, or a hub name")
    layer: int | None = Field(default=None, description="residual stream after this block; default: middle")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, cuda:1, …")
    autocast: str = Field(default="auto", description="auto (bf16 on CUDA, fp32 on CPU), none, bfloat16, float16")

    def load(self, store: ArtifactStore, device: str | None = None):
        model_dir, converted = ensure_base_model(store, self.source)
        return load_hooked_model(model_dir, self.layer, device or self.device, self.autocast), converted


class TextSourceResource(ConfigurableResource):
    """Where new text arrives: a glob over .txt / .jsonl / .parquet files, local or s3."""

    pattern: str = Field(description="fsspec glob, e.g. data/inbox/* or s3://bucket/inbox/*.jsonl")
    text_field: str = Field(default="text", description="JSON field / parquet column holding the text")
    encoding: str = Field(default="utf-8", description="text encoding of .txt/.jsonl files")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint for s3:// patterns")
    skip_duplicates: bool = Field(default=True, description="a file byte-identical to another inbox file is "
                                                            "reported and not cached again; false caches copies")

    @property
    def storage_options(self) -> dict:
        return _s3_options(self.endpoint_url) if self.pattern.startswith("s3://") else {}

    def _resolved(self) -> str:
        return self.pattern if "://" in self.pattern else os.path.abspath(self.pattern)

    def scan(self, store: ArtifactStore | None = None) -> Inbox:
        """Files to cache (keys, stamps) and files skipped with their reason (sae_platform.inbox);
        with ``store``, of byte-identical files the cached one stays the original."""
        return scan_inbox(self._resolved(), self.storage_options, store, self.skip_duplicates)

    def files(self, store: ArtifactStore | None = None) -> list[TextFile]:
        files = self.scan(store).files
        return files if files else list_source(self._resolved(), self.storage_options)  # raises, naming why

    def file(self, key: str, store: ArtifactStore | None = None) -> TextFile:
        inbox = self.scan(store)
        for f in inbox.files:
            if f.key == key:
                return f
        raise SourceError(f"no file in text source {self.pattern!r} has partition key {key!r}",
                          "the file may have been removed from the inbox, or skipped (`sae-platform status` "
                          "lists why); restore it, or delete the stale partition")

    def stamps(self, files: list[TextFile] | None = None) -> dict[str, str]:
        """Partition key → size and modification stamp, to notice files replaced under the same name."""
        return {f.key: source_stamp(f, self.storage_options) for f in (self.files() if files is None else files)}


class ShuffleResource(ConfigurableResource):
    """One shuffle's settings, shared by its plan, passes, final pass and checks."""

    name: str = Field(default="main", description="name of the shuffled store (shuffled/<name>)")
    n_buckets: int = Field(default=8, description="K: buckets per scatter job")
    memory_budget_bytes: int = Field(default=1 << 30, description="M: what one job may hold in memory")
    seed: int = Field(default=0, description="same seed + same inputs = same permutation")


class FeatureTablesResource(ConfigurableResource):
    """Which SAE the feature tables describe, and how many examples they keep."""

    sae_name: str = Field(default="topk-16k-k32", description="sweep entry whose checkpoint is described")
    top_k: int = Field(default=20, description="top activating examples per feature")
    reservoir_factor: int = Field(default=10, description="random examples kept per feature = factor x top_k")
    random_examples: int = Field(default=20, description="random examples per feature shown with context "
                                                         "(a prefix of the uniform sample is itself uniform)")
    n_intervals: int = Field(default=5, description="activation intervals for interval examples")
    per_interval: int = Field(default=4, description="examples per interval")
    before: int = Field(default=16, description="context tokens before an example")
    after: int = Field(default=8, description="context tokens after an example")
    seed: int = Field(default=0, description="seed of the random-example sample")
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda, …")


class AutomationResource(ConfigurableResource):
    """The run config of runs that sensors and schedules launch on their own: one full_pipeline run
    config file (``config/demo.yaml`` is one), whose resources and ``ops.cache_batch`` section the
    inbox sensor's caching runs use too (as the asset's config), so automated runs match the ones a person launches."""

    run_config_path: str | None = Field(default=None, description="YAML run config of full_pipeline; "
                                                                  "default: every setting's default")

    def run_config(self) -> dict:
        if not self.run_config_path:
            return {}
        path = Path(self.run_config_path)
        if not path.is_file():
            raise FileNotFoundError(f"run config {path} (SAE_PLATFORM_RUN_CONFIG) does not exist: "
                                    "point it at a full_pipeline run config such as config/demo.yaml")
        return yaml.safe_load(path.read_text()) or {}

    def caching_run_config(self) -> dict:
        """The part of the pipeline's run config that a cache_activations run accepts."""
        config = self.run_config()
        caching = {"resources": config["resources"]} if config.get("resources") else {}
        if "cache_batch" in config.get("ops", {}):
            caching["ops"] = {"activations": config["ops"]["cache_batch"]}
        return caching

    def inbox_run_config(self, keys: list[str]) -> dict:
        """Run config of a `cache_inbox` run caching ``keys``: the file's resources and cache_batch settings."""
        config = self.run_config()
        ops = {"activation_batches": {"config": {"keys": list(keys)}}}
        if "cache_batch" in config.get("ops", {}):
            ops["cache_batch"] = config["ops"]["cache_batch"]
        return {**({"resources": config["resources"]} if config.get("resources") else {}), "ops": ops}

    def resource_setting(self, resource: str, key: str, default):
        """A resource setting as the launched runs will see it (the file's override, else ``default``)."""
        return self.run_config().get("resources", {}).get(resource, {}).get("config", {}).get(key, default)
